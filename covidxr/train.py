"""``python -m covidxr.train``: train a classifier (the program lives in :mod:`covidxr.training.trainer`)."""

import sys

from covidxr.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
