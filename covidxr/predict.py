"""``python -m covidxr.predict``: predict with Grad-CAM overlays."""

# The program lives in covidxr.inference.predictor.

import sys

from covidxr.inference.predictor import main

if __name__ == "__main__":
    sys.exit(main())
