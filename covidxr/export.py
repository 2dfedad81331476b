"""``python -m covidxr.export``: export a checkpoint for ONNX Runtime."""

# The program lives in covidxr.inference.export.

import sys

from covidxr.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
