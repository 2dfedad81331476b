"""Explanations: Grad-CAM and related methods (``covidxr.model.cam``), heat maps on the original film
(``display``), and rating the methods (``python -m covidxr.explain score``)."""
