"""Moved to :mod:`covidxr.model.site_profile` (issue #28: what is fitted to a trained model lives with it in :mod:`covidxr.model`); this
name stays so that ``import covidxr.inference.site_profile`` keeps working, and is the very same module object."""

import sys

import covidxr.model.site_profile

sys.modules[__name__] = covidxr.model.site_profile
