"""``python -m covidxr.gate fit --checkpoint RUN/best.pt``: fit the input gate of a trained checkpoint."""

# The program lives in covidxr.inference.gate_fit.

import sys

from covidxr.inference.gate_fit import main

if __name__ == "__main__":
    sys.exit(main())
