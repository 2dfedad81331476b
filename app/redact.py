"""Names, not server paths: what the page and the report it offers show instead of absolute paths.

A clinician sees the run's name and the dataset's name; the full paths and command lines stay in the run folder's
reproducibility record (``eval/metrics.json``, ``config.json``) for researchers. :func:`strip_paths` replaces every
absolute POSIX path (and ``~/...``, ``../...``) in a text by its last component: ``/srv/runs/r50/best.pt`` reads
``best.pt``.
URLs and base64 data are left alone (a path must start a word, not follow a letter, a digit, ``:``, ``/``, ``+``
or ``=``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

PATH = re.compile(r"(?<![\w.:/+=~-])(?:(?:~|\.{1,2})/|/(?=[\w.+@-]+/))(?:[\w.+@-]+/)*([\w.+@-]+)")
"""An absolute path of at least two components (``/a/b``), or one from home or the working folder (``~/a``,
``../a``); group 1 is its last part."""


def strip_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component."""
    return PATH.sub(r"\1", text)


def public_report(html: bytes) -> bytes:
    """The evaluation's HTML report as the page offers it: the same report, its server paths reduced to names."""
    return strip_paths(html.decode("utf-8", errors="replace")).encode("utf-8")


def setting_rows(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's training settings with readable names ("Img size") and names in place of paths."""
    def value(v: Any) -> Any:
        if isinstance(v, str) and (v.startswith(("/", "~")) or "/" in v and PurePosixPath(v).suffix):
            return PurePosixPath(v).name or v
        return strip_paths(v) if isinstance(v, str) else v

    return {str(k).replace("_", " ").capitalize(): value(v) for k, v in config.items()
            if not isinstance(v, Mapping) or v}
