"""Moved to :mod:`covidxr.model.gate_files`;
the old name stays so that ``import covidxr.inference.gate_files`` keeps working, and is the very same module object."""

import sys

import covidxr.model.gate_files

sys.modules[__name__] = covidxr.model.gate_files
