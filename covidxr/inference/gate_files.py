"""Moved to :mod:`covidxr.model.gate_files` (issue #28: what is fitted to a trained model lives with it in :mod:`covidxr.model`); this
name stays so that ``import covidxr.inference.gate_files`` keeps working, and is the very same module object."""

import sys

import covidxr.model.gate_files

sys.modules[__name__] = covidxr.model.gate_files
