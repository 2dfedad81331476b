"""Moved to :mod:`covidxr.model.site_profile`;
the old name stays so that ``import covidxr.inference.site_profile`` keeps working (the same module object)."""

import sys

import covidxr.model.site_profile

sys.modules[__name__] = covidxr.model.site_profile
