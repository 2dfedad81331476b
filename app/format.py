"""How the page writes numbers: probabilities that never claim certainty, shares and intervals.

A model's softmax output of 0.9996 is not a certainty, and a test set of 61 images cannot support one; so the page
never prints 100% or 0.0%: above 99% it says "> 99%", below 1% "< 1%". Every probability on the page (headline,
bars, tables, the results CSV's display column) goes through :func:`probability`, which is the package's
(``covidxr.inference.decision``), so the downloads made there read the same.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from covidxr.inference.decision import probability  # noqa: F401 - the page's formatter is the package's


def _number(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def pct(value: Any) -> str:
    """A share (accuracy, recall, ...) as a whole percentage, or "–" when undefined."""
    p = _number(value)
    return "–" if p is None else f"{100 * p:.0f}%"


def num(value: Any) -> str:
    """A number with two decimals (AUC, temperature), or "–" when undefined."""
    p = _number(value)
    return "–" if p is None else f"{p:.2f}"


def interval(ci: Any, fmt: Any = pct, value: Any = None) -> str:
    """``estimate (lo–hi)`` from an interval (a saved evaluation's ``Interval`` record or a mapping ``{"estimate",
    "lo", "hi"}``); just the value without bounds; a plain number as itself."""
    if dataclasses.is_dataclass(ci) and not isinstance(ci, type):
        ci = dataclasses.asdict(ci)
    if isinstance(ci, (int, float)) and not isinstance(ci, bool):
        return fmt(ci)
    ci = ci if isinstance(ci, Mapping) else {}
    estimate = ci.get("estimate", value)
    lo, hi = _number(ci.get("lo")), _number(ci.get("hi"))
    if lo is None or hi is None:
        return fmt(estimate)
    return f"{fmt(estimate)} ({fmt(lo)}–{fmt(hi)})"


def escape_markdown(text: str) -> str:
    """``text`` with Markdown's special characters escaped (a file name shown as it is)."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~$-])", r"\\\1", text)
