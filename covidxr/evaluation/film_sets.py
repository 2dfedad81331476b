"""Which films of an evaluated set the film pass (:mod:`covidxr.evaluation.film_pass`) reads, and for what: every film
for the metrics' logits (unless test-time augmentation asks for the loaders' views) and for the gate report (the
internal set), the lung share's seeded sample for Grad-CAM; then, once the metrics are known, the gallery's errors."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from covidxr.evaluation.film_pass import FilmPass, film_pass, gallery_films
from covidxr.evaluation.gallery import error_paths
from covidxr.evaluation.inputs import EvalOptions
from covidxr.evaluation.lung_share import pick_rows
from covidxr.inference.predictor import Predictor
from covidxr.lungs import LungModel


def set_films(predictor: Predictor, lungs: LungModel | None, table: pd.DataFrame, opts: EvalOptions, gate: bool,
              desc: str) -> FilmPass:
    """Run the film pass over one evaluated set, before its metrics.

    Args:
        predictor: the evaluation's one trained model (torch).
        lungs: the lung model of the lung share (None: no lung share).
        table: the evaluated rows (``path``).
        opts: the evaluation options (``lung_share_limit``, ``seed``, ``tta``, ``progress``).
        gate: also judge every film with the input gate (the internal set, whose refusals the report gives).
        desc: the progress bar's label.
    """
    paths = table["path"].astype(str).tolist()
    sample = pick_rows(table, opts.lung_share_limit, opts.seed) if opts.lung_share_limit > 0 and lungs else []
    return film_pass(predictor, paths, gate=set(paths) if gate else set(), explain=set(sample), every=not opts.tta,
                     lungs=lungs, progress=opts.progress, desc=desc)


def with_gallery(predictor: Predictor, lungs: LungModel | None, films: FilmPass, frame: pd.DataFrame,
                 classes: Sequence[str], opts: EvalOptions, desc: str) -> FilmPass:
    """``films`` with the failure gallery's films added (chosen on the set's predictions ``frame``)."""
    errors = error_paths(frame, classes, opts.gallery) if opts.gallery > 0 else []
    return gallery_films(predictor, films, errors, lungs, opts.progress, desc) if errors else films
