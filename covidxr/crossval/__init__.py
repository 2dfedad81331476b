"""Cross-validation by source (``python -m covidxr.crossval``): each source left out of training in turn and tested on.

A stage of its own: it uses data, training and evaluation, and nothing imports it.
"""
