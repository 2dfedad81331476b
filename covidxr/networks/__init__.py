"""The networks: the per-architecture table and model zoo, seed ensembles as one network, test-time
augmentation and the per-sample inference pass."""
