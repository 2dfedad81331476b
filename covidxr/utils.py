"""Device, precision, seeding, logging and command-line helpers; nothing here runs at import time."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

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


EXIT_DONE = 0
EXIT_SOME_FAILED = 1  # done, but some inputs (image files) could not be used
EXIT_BAD_INPUT = 2  # bad arguments or input: a one-line error, nothing done
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
DEVICES = ("auto", "cpu", "cuda", "mps")


class OneLineParser(argparse.ArgumentParser):
    """The parser of every covidxr command: its usage errors are one line, ``covidxr.NAME: error: ...`` without
    the usage text, with exit status 2."""

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
    return EXIT_BAD_INPUT


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
            argv: Sequence[str] | None = None, errors: tuple[type[Exception], ...] = (CovidxrError,),
            interrupted: str = "interrupted") -> int:
    """Parse ``argv`` (default: the process's arguments) with ``parser``, call ``run(args)`` and return the exit
    status every covidxr command uses; ``main`` functions return it and never raise ``SystemExit``.

    0 done (``run`` returned None or 0); 1 done, but some inputs failed (``run`` returned 1); 2 bad arguments or
    input (a usage error, or one of ``errors`` raised: one line on stderr); 130 interrupted (Ctrl-C; ``interrupted``
    is printed after the command's name). ``--help`` returns 0.
    """
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        status = run(args)
    except SystemExit as exc:  # --help, or a usage error found by argparse or by the command (parser.error)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT if exc.code else EXIT_DONE
    except errors as exc:
        return cli_error(parser.prog, exc)
    except KeyboardInterrupt:
        print(f"{command_name(parser.prog)}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_DONE if status is None else int(status)


def add_checkpoint_arg(parser: argparse.ArgumentParser, help: str, required: bool = True,
                       old_name: str | None = None) -> None:
    """Add ``--checkpoint PATH`` (a ``Path``); ``old_name`` (e.g. ``--model``) is kept as a hidden, deprecated
    alias that warns and sets the same value."""
    parser.add_argument("--checkpoint", type=Path, required=required, metavar="PATH", help=help)
    if old_name:
        parser.add_argument(old_name, dest="checkpoint", type=Path, action=_DeprecatedAlias, help=argparse.SUPPRESS)


def add_device_arg(parser: argparse.ArgumentParser, help: str = "where the network runs; auto: CUDA, then MPS, "
                   "then CPU (default: %(default)s)") -> None:
    """Add ``--device {auto,cpu,cuda,mps}`` (default auto)."""
    parser.add_argument("--device", choices=DEVICES, default="auto", help=help)


def add_out_arg(parser: argparse.ArgumentParser, help: str, default: Path | None = None) -> None:
    """Add ``--out FOLDER`` (a ``Path``): where a command writes its files, always a folder."""
    parser.add_argument("--out", type=Path, default=default, metavar="FOLDER", help=help)


def out_file(out: Path, name: str, prog: str) -> Path:
    """The file ``name`` in the ``--out`` folder ``out``. An ``out`` that already ends in ``name``'s suffix is the
    file itself, as older versions took it; that still works, with a deprecation warning on stderr."""
    suffix = Path(name).suffix
    if suffix and out.suffix.lower() == suffix:
        print(f"{command_name(prog)}: warning: --out {out}: --out is a folder now; writing {out} as given "
              f"(pass --out {out.parent} to write {out.parent / name})", file=sys.stderr)
        return out
    return out / name


class _DeprecatedAlias(argparse.Action):
    """Store the value under the new option's name and say on stderr that the old name is deprecated."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"{command_name(parser.prog)}: warning: {option_string} is deprecated; use --{self.dest}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


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
