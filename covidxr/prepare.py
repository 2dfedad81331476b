"""``python -m covidxr.prepare``: decode every image of a dataset once into the prepared cache (the program lives in
:mod:`covidxr.training.cache_command`)."""

import sys

from covidxr.training.cache_command import get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
