"""The input gate in an evaluation (``metrics.json["gate"]`` and a report section).

How often the gate (:mod:`covidxr.model.gate`) refuses the evaluated films, per source, and how often it refuses
what it should: rotated and inverted copies of the evaluated films (``--gate-variants``) and the images of unlabelled
folders (``--gate-check FOLDER``, counted per sub-folder: ``notcxr/`` gives ``lateral`` and ``ct``), and with
``--gate-variants`` also photographs and documents made with another seed than the gate's
(:mod:`covidxr.inference.gate_kinds`). Images the gate was fitted on (matched by their SHA-256) are counted apart, so
the held-out rate is honest. Assessed films in the borderline band ("unusual film: read with care") are counted
too. Every image goes through :class:`~covidxr.inference.predictor.Predictor` as an upload would: read, letterboxed,
predicted, gated.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from covidxr.errors import ImageReadError
from covidxr.evaluation.film_pass import FilmPass
from covidxr.files import file_digest
from covidxr.html_page import paragraph_html, table_html
from covidxr.images.reader import Xray, load_xray
from covidxr.inference.__main__ import find_images
from covidxr.inference.gate_kinds import write_made_images
from covidxr.inference.predictor import Predictor
from covidxr.model.gate import GateVerdict

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rotated 90": lambda p: np.rot90(p, 1), "rotated 180": lambda p: np.rot90(p, 2),
    "rotated 270": lambda p: np.rot90(p, 3), "inverted": lambda p: 1.0 - p}
"""The copies ``--gate-variants`` makes of every evaluated film (counter-clockwise rotations, 1 - x)."""


def refusals(verdicts: Sequence[GateVerdict | None]) -> dict[str, Any]:
    """``n`` (readable images), ``refused``, ``rate`` (None without images), ``borderline`` (assessed but marked),
    ``borderline_rate`` and ``checks`` (the most likely reason's check -> count)."""
    read = [v for v in verdicts if v is not None]
    refused = [v for v in read if not v.assessable]
    borderline = sum(bool(getattr(v, "borderline", False)) for v in read)
    checks = Counter(v.checks[0] for v in refused if v.checks)
    return {"n": len(read), "refused": len(refused), "rate": len(refused) / len(read) if read else None,
            "borderline": borderline, "borderline_rate": borderline / len(read) if read else None,
            "checks": dict(sorted(checks.items()))}


def gate_verdicts(predictor: Predictor, paths: Sequence[str | os.PathLike], batch_size: int = 32,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None, desc: str = "gate",
                  progress: bool = True) -> list[GateVerdict | None]:
    """The gate's verdict on each file (None for an unreadable one), optionally on a transformed copy."""
    verdicts: list[GateVerdict | None] = []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, disable=None if progress else True, leave=False):
        xrays: list[Xray | None] = []
        for path in paths[start:start + batch_size]:
            try:
                xray = load_xray(path)
            except ImageReadError:
                xrays.append(None)
                continue
            if transform is not None:
                xray = replace(xray, pixels=np.ascontiguousarray(transform(xray.pixels)))
            xrays.append(xray)
        readable = [x for x in xrays if x is not None]
        found = iter(p.gate for p in predictor.predict_batch(readable, cam=None)) if readable else iter(())
        verdicts += [None if x is None else next(found) for x in xrays]
    return verdicts


def folder_groups(folder: Path, fitted: set[str]) -> dict[str, list[Path]]:
    """The images of ``folder`` by first sub-folder (files at the top as ``.``); when some were used to fit the gate
    (``fitted`` SHA-256s), their group's other images also as ``GROUP (not fitted on)``."""
    groups: dict[str, list[Path]] = {}
    for file in find_images([folder]):
        parts = file.relative_to(folder).parts
        groups.setdefault(parts[0] if len(parts) > 1 else ".", []).append(file)
    if fitted:
        for name, files in list(groups.items()):
            held_out = [f for f in files if file_digest(f) not in fitted]
            if len(held_out) < len(files):
                groups[f"{name} (not fitted on)"] = held_out
    return groups


MADE = 100
"""How many photographs and documents ``--gate-variants`` makes (of each, and photographs once in colour, once in
greyscale)."""


def made_report(predictor: Predictor, batch_size: int, progress: bool, seed: int) -> dict[str, Any]:
    """Refusals of :data:`MADE` made photographs (colour, and greyscale: past the colour check) and documents."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="covidxr-made-") as tmp:
        for name, kind, grey in (("photographs (colour)", "photo", False), ("photographs (greyscale)", "photo", True),
                                 ("documents", "document", True)):
            paths = write_made_images(Path(tmp) / name, kind, MADE, seed, grey=grey)
            out[name] = refusals(gate_verdicts(predictor, paths, batch_size, desc=f"gate: {name}",
                                               progress=progress))
    return out


def gate_report(predictor: Predictor, rows: pd.DataFrame, folders: Sequence[str | os.PathLike] = (),
                variants: bool = False, batch_size: int = 32, progress: bool = True,
                films: FilmPass | None = None) -> dict[str, Any]:
    """Refusal rates of the evaluated rows (``path``, ``source``), their copies and unlabelled folders.

    Returns:
        ``learned``, ``unavailable``, ``fitted`` (the gate's own validation rates), ``evaluated`` and ``by_source``
        (:func:`refusals`), ``variants`` (name -> refusals) and ``folders`` (folder -> group -> refusals).
    """
    gate = predictor.gate
    paths = rows["path"].tolist()
    verdicts = (films.verdicts(paths) if films is not None  # the evaluation's film pass judged them already
                else gate_verdicts(predictor, paths, batch_size, desc="gate: evaluated", progress=progress))
    sources = rows["source"].astype(str).replace("", "(unknown)")
    report: dict[str, Any] = {
        "learned": gate.learned, "unavailable": gate.unavailable, "fitted": gate.info.get("validation"),
        "evaluated": refusals(verdicts),
        "by_source": {s: refusals([v for v, t in zip(verdicts, sources, strict=True) if t == s])
                      for s in sorted(set(sources))},
        "refused_files": {str(p): v.reason for p, v in zip(paths, verdicts, strict=True) if v and not v.assessable},
        "variants": {}, "made": {}, "folders": {}}
    if variants:
        for name, transform in TRANSFORMS.items():
            report["variants"][name] = refusals(gate_verdicts(predictor, paths, batch_size, transform,
                                                              f"gate: {name}", progress))
        report["made"] = made_report(predictor, batch_size, progress, seed=int(gate.info.get("seed", 0)) + 1)
    fitted = set(gate.info.get("fit_sha256") or gate.info.get("lateral_fit_sha256") or [])
    for folder in map(Path, folders):
        groups = folder_groups(folder, fitted)
        report["folders"][str(folder)] = {name: refusals(gate_verdicts(predictor, files, batch_size,
                                                                      desc=f"gate: {name}", progress=progress))
                                          for name, files in groups.items()}
    return report


def _label(folder: str, group: str) -> str:
    return Path(folder).name if group == "." else f"{Path(folder).name}/{group}"


def gate_summary(report: dict[str, Any]) -> str:
    """One line: the refusal rate of the evaluated films and of every check set."""
    def rate(r: dict[str, Any]) -> str:
        return f"{r['refused']}/{r['n']}" + ("" if r["rate"] is None else f" ({r['rate']:.1%})")

    evaluated = report["evaluated"]
    parts = [f"refused {rate(evaluated)} evaluated images ({evaluated.get('borderline', 0)} more borderline: "
             "assessed and marked)"]
    parts += [f"{name} copies {rate(r)}" for name, r in report["variants"].items()]
    parts += [f"made {name} {rate(r)}" for name, r in report.get("made", {}).items()]
    parts += [f"{_label(folder, name)} {rate(r)}" for folder, groups in report["folders"].items()
              for name, r in groups.items()]
    learned = "" if report["learned"] else f" (file checks only: {report['unavailable']})"
    return "input gate: " + "; ".join(parts) + learned


def gate_html(report: dict[str, Any] | None) -> str:
    """The report section: refusal rates per source, of the copies and of the checked folders."""
    if not report:
        return paragraph_html("The input gate was not run.")
    columns = ["set", "n", "refused", ("rate", "refusal rate"), ("borderline", "borderline (shown, marked)"),
               ("checks", "reasons given")]

    def row(name: str, r: dict[str, Any]) -> dict[str, Any]:
        return {"set": name, **r, "checks": ", ".join(f"{k} {v}" for k, v in r["checks"].items())}

    intro = ("The input gate answers, before the classifier, whether an image is an assessable frontal chest "
             "radiograph. Refused images are shown as 'not assessed' by the predictor and the app. Untouched test "
             "films should pass; the copies and the checked folders should be refused.")
    if not report["learned"]:
        intro += f" Only the file checks ran: {report['unavailable']}."
    parts = [paragraph_html(intro),
             table_html([row("all evaluated images", report["evaluated"])]
                        + [row(f"source: {s}", r) for s, r in report["by_source"].items()], columns,
                        caption="Evaluated images (should pass)")]
    expected = [row(f"{name} copies", r) for name, r in report["variants"].items()]
    expected += [row(f"made {name}", r) for name, r in report.get("made", {}).items()]
    expected += [row(_label(folder, name), r) for folder, groups in report["folders"].items()
                 for name, r in groups.items()]
    if expected:
        parts.append(table_html(expected, columns, caption="Images the gate should refuse"))
    if report["fitted"]:
        measured = ", ".join(f"{k} {v:.1%}" for k, v in report["fitted"].items())
        parts.append(paragraph_html("Measured when the gate was fitted (validation split copies, held-out lateral "
                                    f"and CT patients): {measured}"))
    return "\n".join(parts)
