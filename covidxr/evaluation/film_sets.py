"""Which films of an evaluated set the film pass (:mod:`covidxr.evaluation.film_pass`) reads, and for what: every film
for the metrics' logits (unless test-time augmentation asks for the loaders' views) and for the gate report (the
internal set), the lung share's seeded sample for Grad-CAM; then, once the metrics are known, the gallery's errors."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from covidxr.errors import DatasetError
from covidxr.evaluation.film_pass import FilmPass, film_pass, gallery_films
from covidxr.evaluation.gallery import error_paths
from covidxr.evaluation.inputs import EvalData, EvalOptions, without_unreadable
from covidxr.evaluation.logits import SplitOutputs, evaluated_table, predict_splits
from covidxr.evaluation.lung_share import pick_rows
from covidxr.inference.predictor import Predictor
from covidxr.lungs import LungModel
from covidxr.model.trained import TrainedModel


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


def predict_set(model: TrainedModel, predictor: Predictor, lungs: LungModel | None, data: EvalData,
                opts: EvalOptions, gate: bool, desc: str, empty: str) -> tuple[EvalData, FilmPass, SplitOutputs]:
    """The film pass over one evaluated set (:func:`set_films`), then its logits: ``data`` without the films the pass
    could not read, the pass, and the predictions (the loaders run only for the rows the pass does not cover).

    Raises:
        DatasetError: no evaluated film is readable (``empty`` says which set).
    """
    films = set_films(predictor, lungs, evaluated_table(data), opts, gate, desc)
    data = without_unreadable(data, films.unreadable)
    pred = predict_splits(model, data, opts.tta, films.logits())
    if len(pred.y) == 0:
        raise DatasetError(empty)
    return data, films, pred


def with_gallery(predictor: Predictor, lungs: LungModel | None, films: FilmPass, frame: pd.DataFrame,
                 classes: Sequence[str], opts: EvalOptions, desc: str) -> FilmPass:
    """``films`` with the failure gallery's films added (chosen on the set's predictions ``frame``)."""
    errors = error_paths(frame, classes, opts.gallery) if opts.gallery > 0 else []
    return gallery_films(predictor, films, errors, lungs, opts.progress, desc) if errors else films
