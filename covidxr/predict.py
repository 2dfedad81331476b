"""``python -m covidxr.predict``: predict with Grad-CAM overlays."""

# The program lives in covidxr.inference.__main__.

import sys

from covidxr.inference.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
