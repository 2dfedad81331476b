"""Moved to :mod:`covidxr.model.cam`;
the old name stays so that ``import covidxr.explain.cam`` keeps working, and is the very same module object."""

import sys

import covidxr.model.cam

sys.modules[__name__] = covidxr.model.cam
