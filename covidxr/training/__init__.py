"""Training (``python -m covidxr.train``): configuration, the training run and loop, torchrun, seed ensembles and the
source adversary."""
