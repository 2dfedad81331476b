"""Adaptation to a new hospital from its own unlabelled films (``python -m covidxr.adapt``): the estimates
(:mod:`covidxr.adapt.estimate`), the run over a site's folder (:mod:`covidxr.adapt.site`) and the command line
(:mod:`covidxr.adapt.__main__`). The profile it writes, and how a model applies it, is
:mod:`covidxr.model.site_profile`."""
