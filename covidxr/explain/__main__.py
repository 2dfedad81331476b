"""``python -m covidxr.explain``: Grad-CAM explanation tools."""

import sys

from covidxr.explain.cam import main

if __name__ == "__main__":
    sys.exit(main())
