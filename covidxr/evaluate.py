"""``python -m covidxr.evaluate``: evaluate a checkpoint and write its report."""

# The program lives in covidxr.evaluation.pipeline.

import sys

from covidxr.evaluation.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
