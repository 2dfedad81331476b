"""``python -m covidxr.ensemble``: combine seed runs into one checkpoint (the program lives in
:mod:`covidxr.training.ensemble`)."""

import sys

from covidxr.training.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
