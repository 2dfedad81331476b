"""``python -m covidxr.evaluate``: evaluate a checkpoint and write its report."""

# The program lives in covidxr.evaluation.__main__.

import sys

from covidxr.evaluation.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
