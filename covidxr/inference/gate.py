"""Moved to :mod:`covidxr.model.gate`;
the old name stays so that ``import covidxr.inference.gate`` keeps working, and is the very same module object."""

import sys

import covidxr.model.gate

sys.modules[__name__] = covidxr.model.gate
