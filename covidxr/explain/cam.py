"""Moved to :mod:`covidxr.model.cam` (issue #28: what is fitted to a trained model lives with it in :mod:`covidxr.model`); this
name stays so that ``import covidxr.explain.cam`` keeps working, and is the very same module object."""

import sys

import covidxr.model.cam

sys.modules[__name__] = covidxr.model.cam
