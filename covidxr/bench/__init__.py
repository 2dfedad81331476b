"""Benchmarks of this machine (``python -m covidxr.bench``): training, loading, inference, and the data stages at
size N."""
