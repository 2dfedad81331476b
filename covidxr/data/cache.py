"""Decode once: every source image is read by the shared reader, prepared by the run's input pipeline (lung crop, lung
mask and equalisation when asked, then letterbox; ``covidxr.model.input_pipeline``) and stored as uint8 .npy.

Entries are keyed by the source file's absolute path, size and modification time, the cache side, the reader's
version and the pipeline's variant (``InputPipeline.key``: the lung model's digest, margin, mask and equalisation), so a
changed file, reader or variant is decoded again and variants never mix. :func:`fill_cache` decodes what is
missing (in several processes) and returns every image. The default folder is
``$COVIDXR_CACHE`` or ``~/.cache/covidxr/prepared``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from covidxr.errors import ImageReadError
from covidxr.images.reader import load_xray
from covidxr.model.input_pipeline import PLAIN, InputPipeline

# Bump when load_xray or letterbox change what they produce: every cache entry is then decoded again.
READER_VERSION = "1"


def default_cache_dir() -> Path:
    """Return ``$COVIDXR_CACHE`` or ``~/.cache/covidxr/prepared``."""
    return Path(os.environ.get("COVIDXR_CACHE") or Path.home() / ".cache" / "covidxr" / "prepared")


def cache_key(path: str | os.PathLike, size: int, version: str | None = None, variant: str = "") -> str:
    """Return the cache entry name for ``path`` at side ``size`` (``version``: default READER_VERSION; ``variant``:
    the pipeline's ``InputPipeline.key``, "" for the plain letterbox, which keeps the entries made before variants)."""
    stat = os.stat(path)
    version = READER_VERSION if version is None else version
    ident = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{size}|{version}"
    if variant:
        ident += f"|{variant}"
    return hashlib.sha1(ident.encode()).hexdigest()


def decode_square(path: str | os.PathLike, size: int, pipeline: InputPipeline = PLAIN) -> np.ndarray:
    """Read ``path`` with the shared reader and return it prepared by ``pipeline`` as a (size, size) uint8 square."""
    return pipeline.prepare(load_xray(path).pixels, size).square


@dataclass
class DecodedImages:
    """The outcome of :func:`fill_cache`: one uint8 (size, size) array per readable image, and the failures."""

    images: list[np.ndarray | None]  # None for an unreadable image, and for every image without keep_images
    failures: dict[int, str] = field(default_factory=dict)  # row index -> one-line reason
    reused: int = 0  # entries read from the cache rather than decoded


_PIPELINE: InputPipeline = PLAIN  # the pipeline of this process's jobs (set once per decoding process)


def _start_worker(pipeline: InputPipeline) -> None:
    global _PIPELINE
    _PIPELINE = pipeline
    # Decoding processes already use every core; torch threads inside each would only contend.
    torch.set_num_threads(1)


def _decode_one(args: tuple[str, int, str | None, str, bool],
                pipeline: InputPipeline | None = None) -> tuple[np.ndarray | None, str | None, bool]:
    path, size, cache_dir, version, keep = args
    pipeline = _PIPELINE if pipeline is None else pipeline  # decoding processes get theirs once, at start
    try:
        entry = Path(cache_dir) / f"{cache_key(path, size, version, pipeline.key)}.npy" if cache_dir else None
        if entry is not None and entry.is_file():
            try:
                square = np.load(entry, mmap_mode=None if keep else "r")  # "r": checks the entry, reads no pixels
                return (square if keep else None), None, True
            except (OSError, ValueError):
                pass  # a damaged entry is decoded again
        square = decode_square(path, size, pipeline)
        if entry is not None:
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, square)
            os.replace(tmp, entry)
        return (square if keep else None), None, False
    except ImageReadError as exc:
        return None, str(exc), False
    except OSError as exc:
        return None, f"{os.path.basename(path)}: {exc.strerror or exc}", False


def fill_cache(paths: Sequence[str], size: int, cache_dir: Path | None, workers: int = 0,
               desc: str = "decode", progress: bool = True, pipeline: InputPipeline = PLAIN,
               keep_images: bool = True) -> DecodedImages:
    """Decode every image once (reusing cache entries) and return them as uint8 squares prepared by ``pipeline``.

    Args:
        paths: image files.
        size: side of the stored square.
        pipeline: lung crop and equalisation before the letterbox (default: the plain letterbox).
        cache_dir: where entries are kept; None decodes without storing.
        workers: processes to decode with (0: in this process).
        desc: label of the progress bar.
        progress: show the progress bar.
        keep_images: return the squares; False only fills the cache (``python -m covidxr.prepare``), so memory
            does not grow with the dataset (30,000 squares of 256 px are 2 GB).
    """
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # The version travels with each job: worker processes must key entries as this process does.
    jobs = [(str(p), size, str(cache_dir) if cache_dir else None, READER_VERSION, keep_images) for p in paths]
    bar = {"total": len(jobs), "desc": desc, "dynamic_ncols": True, **({} if progress else {"disable": True})}
    if workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_start_worker, initargs=(pipeline,)) as pool:
            chunk = max(1, min(8, len(jobs) // (4 * workers)))
            results = list(tqdm(pool.map(_decode_one, jobs, chunksize=chunk), **bar))
    else:
        results = [_decode_one(job, pipeline) for job in tqdm(jobs, **bar)]
    images = [img for img, _, _ in results]
    failures = {i: err for i, (_, err, _) in enumerate(results) if err is not None}
    return DecodedImages(images=images, failures=failures, reused=sum(hit for _, _, hit in results))
