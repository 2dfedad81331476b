"""``python -m covidxr.compare``: compare evaluated runs (the program lives in :mod:`covidxr.evaluation.compare`)."""

import sys

from covidxr.evaluation.compare import main

if __name__ == "__main__":
    sys.exit(main())
