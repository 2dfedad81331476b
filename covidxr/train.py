"""``python -m covidxr.train``: train a classifier (the program lives in :mod:`covidxr.training.__main__`)."""

import sys

from covidxr.training.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
