"""Device, precision, seeding, logging and command-line helpers; nothing here runs at import time."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import sys
import typing
from collections.abc import Callable

import numpy as np
import scipy.special
import torch

from covidxr.errors import CovidxrError, one_line


def pick_device(name: str = "auto") -> torch.device:
    """Return the device for ``name`` ("auto" tries CUDA, then MPS, then CPU).

    Raises:
        CovidxrError: an explicitly requested device is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CovidxrError("--device cuda requested but CUDA is not available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CovidxrError("--device mps requested but MPS is not available")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Return the mixed-precision dtype for ``device``: bf16 where supported, else fp16 on CUDA, None on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """Return a factory of autocast contexts (a no-op when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (called by CLIs only)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger for a CLI run: one line per message on stderr."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries that decide results."""
    import PIL
    import pydicom
    import sklearn
    import torchvision

    from covidxr import __version__

    return {"covidxr": __version__, "python": sys.version.split()[0], "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": np.__version__, "pillow": PIL.__version__,
            "pydicom": pydicom.__version__, "scikit-learn": sklearn.__version__}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``covidxr.NAME: error: ...`` without the usage text,
    with exit status 2 (the covidxr command lines that take file paths: evaluate, compare, explain, predict,
    export)."""

    def error(self, message: str) -> typing.NoReturn:
        """Print ``message`` on one line and exit with status 2."""
        self.exit(2, f"{command_name(self.prog)}: error: {message} (see --help)\n")


def command_name(prog: str) -> str:
    """``covidxr.NAME`` for a parser's ``prog`` (``python -m covidxr.NAME``)."""
    return prog.removeprefix("python -m ")


def cli_error(prog: str, error: BaseException) -> int:
    """Print a failure that is not a usage error (bad data, unusable checkpoint) as ``covidxr.NAME: error: ...``
    on one line of stderr, without the ``--help`` hint, and return the exit status 2."""
    print(f"{command_name(prog)}: error: {one_line(error)}", file=sys.stderr)
    return 2


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` along the last axis.

    Args:
        logits: Array of shape ``(..., C)``.
        temperature: Positive temperature; > 1 softens, < 1 sharpens.

    Returns:
        float64 array of the same shape whose last axis sums to 1.

    Raises:
        ValueError: If ``temperature`` is not a positive finite number.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(z - scipy.special.logsumexp(z, axis=-1, keepdims=True))
