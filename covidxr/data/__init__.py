"""Datasets: manifests, patient-grouped splits, torch datasets, public-dataset adapters and audits."""
