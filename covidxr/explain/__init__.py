"""Explanations: Grad-CAM and related methods (``covidxr.explain.cam``), heat maps on the original film
(``display``), and rating the methods (``python -m covidxr.explain score``)."""
