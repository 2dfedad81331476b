"""Reading a trained run back: its checkpoint, configuration, split, training data and input pipeline.

``python -m covidxr.train --out RUN`` leaves ``best.pt``, ``last.pt``, ``config.json`` and ``split.csv`` in the run
folder, and each checkpoint carries the configuration and the split too, so a checkpoint copied away from its folder
still reads. Evaluation, the input gate's fit and ``explain score`` all read a run through :class:`RunFolder`: the
same split (``split.csv`` beside the checkpoint first, else the checkpoint's), the same default data (the data the
run was trained on) and the same loader settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from covidxr.data.loaders import LoaderSettings
from covidxr.data.manifest import resolve_data_path
from covidxr.errors import DatasetError
from covidxr.model.build import read_preprocess
from covidxr.model.checkpoint import load_checkpoint
from covidxr.model.input_pipeline import InputPipeline, pipeline_from_checkpoint
from covidxr.model.trained import TrainedModel
from covidxr.preprocessing.transforms import Preprocess

SPLIT_FILE = "split.csv"


def training_data(record: Mapping[str, Any]) -> str | None:
    """The dataset a checkpoint was trained on (its record's ``config.data``, else ``data.root``), or None."""
    return (record.get("config") or {}).get("data") or (record.get("data") or {}).get("root") or None


@dataclass(frozen=True)
class RunFolder:
    """A trained run, read from its checkpoint file (and the files beside it)."""

    checkpoint: Path
    ckpt: dict[str, Any]

    @classmethod
    def read(cls, checkpoint: str | os.PathLike) -> RunFolder:
        """Load the checkpoint.

        Raises:
            CheckpointError: a missing, unreadable or foreign checkpoint (one line).
        """
        return cls(Path(checkpoint), load_checkpoint(checkpoint))

    @classmethod
    def of(cls, trained: TrainedModel) -> RunFolder:
        """The run of a model already loaded (its training record; the checkpoint is not read again)."""
        return cls(trained.path, dict(trained.record))

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings (``TrainConfig.to_dict``); empty for a checkpoint without them."""
        return self.ckpt.get("config") or {}

    @property
    def training_data(self) -> str | None:
        """The dataset the run was trained on, or None (:func:`training_data`)."""
        return training_data(self.ckpt)

    def data_path(self, data: str | os.PathLike | None = None) -> Path:
        """``data``, else the run's training data, resolved as ``--data`` is (else ``$COVIDXR_DATA``, else
        ``data/cxr``).

        Raises:
            DatasetError: the dataset is not there.
        """
        return resolve_data_path(data or self.training_data)

    def split(self) -> tuple[pd.DataFrame | None, str | None]:
        """The run's recorded split (``relpath``, ``label``, ``patient_id``, ``split`` and maybe ``source``/``view``)
        and where it came from: ``split.csv`` beside the checkpoint, else the checkpoint's; ``(None, None)`` when the
        run recorded none."""
        split_csv = self.checkpoint.parent / SPLIT_FILE
        if split_csv.is_file():
            return pd.read_csv(split_csv, dtype=str, keep_default_na=False), str(split_csv)
        recorded = self.ckpt.get("split")
        if isinstance(recorded, dict) and {"relpath", "split"} <= set(recorded):
            return pd.DataFrame(recorded).astype(str), "checkpoint"
        return None, None

    def require_split(self) -> pd.DataFrame:
        """:meth:`split`'s table.

        Raises:
            DatasetError: the run recorded no split.
        """
        table, _ = self.split()
        if table is None:
            raise DatasetError(f"{self.checkpoint}: the run recorded no split (no {SPLIT_FILE} beside it, none in "
                               "the checkpoint)")
        return table

    @property
    def preprocess(self) -> Preprocess:
        """The checkpoint's preprocessing record, checked (``CheckpointError`` when malformed)."""
        return read_preprocess(self.ckpt, str(self.checkpoint))

    def pipeline(self) -> InputPipeline:
        """The input pipeline the run was trained with, with the lung model the checkpoint carries."""
        return pipeline_from_checkpoint(self.ckpt.get("lung_model"), self.preprocess,
                                        str(self.checkpoint))

    def loader_settings(self, data: str | os.PathLike | None = None, **overrides: Any) -> LoaderSettings:
        """The run's data and loader settings, reading ``data`` (default: the run's training data, as given) at the
        checkpoint's image size through its input pipeline; ``overrides`` replace more fields (batch size,
        workers)."""
        settings = LoaderSettings.from_dict(self.config)
        data = str(data) if data is not None else settings.data
        pipeline = self.pipeline()
        preprocessing = replace(settings.preprocessing, **pipeline.input_record())
        return replace(settings, data=data, img_size=int(self.preprocess.img_size), preprocessing=preprocessing,
                       lung_entry=pipeline.lung_entry, **overrides)
