"""covidxr: transfer-learning chest X-ray classifier with Grad-CAM explanations and honest evaluation."""

__version__ = "0.1.0"
