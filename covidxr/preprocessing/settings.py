"""The one definition of how a decoded film becomes the network's input: the lung crop, lung mask, equalisation and,
for training, the augmentation and the lung model file. Every field of it is declared here and nowhere else.

:class:`InputRecord` is what a checkpoint records (its ``preprocess`` keys ``lung_crop``, ``lung_margin``,
``equalize``, ``lung_mask``, ``lung_mask_dilation``) and holds the one rule that ties them: a lung mask is applied to
the lung crop, so ``lung_mask`` implies ``lung_crop``. The checkpoint's preprocessing record
(``covidxr.preprocessing.transforms.Preprocess``: this record plus the image size and the letterbox) and the pipeline
that carries it out (``covidxr.model.input_pipeline.InputPipeline``) are input records. :class:`InputSettings` adds what
only a run's
settings
need: the training augmentation and the lung model's file (a checkpoint carries the lung model itself).

The settings of a run (``covidxr.data.loaders.DataSettings`` and ``LoaderSettings``,
``covidxr.training.config.TrainConfig``, ``covidxr.crossval.folds.CrossvalConfig``) each hold one
:class:`InputSettings` in their ``preprocessing`` field. Their stored form (config.json, a checkpoint's ``config``, the
command line's arguments) stays flat, one key per field: :func:`flat_settings` writes it and
:func:`settings_from_dict` reads it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

EQUALIZE = ("none", "hist", "clahe")
LUNG_MARGIN = 0.05
LUNG_MASK_DILATION = 0.02
"""With a lung mask, the mask is widened by this share of the crop's longer side before the rest is blacked out, so
the lung borders (pleura, costophrenic angles) that a mask of the lung model's resolution may miss stay visible."""

Record = TypeVar("Record", bound="InputRecord")


@dataclass(frozen=True, kw_only=True)
class InputRecord:
    """The recorded input pipeline: lung crop, its margin, lung mask, the mask's widening, equalisation."""

    lung_crop: bool = False  # crop each image to the box of its lungs before the letterbox
    lung_margin: float = LUNG_MARGIN  # margin around the lung box, as a share of the image's height and width
    equalize: str = "none"  # none | hist | clahe, after the crop
    lung_mask: bool = False  # also black out what lies outside the (widened) lung mask of the crop
    lung_mask_dilation: float = LUNG_MASK_DILATION  # the mask's widening, as a share of the crop's longer side

    def __post_init__(self) -> None:
        if self.lung_mask and not self.lung_crop:
            object.__setattr__(self, "lung_crop", True)  # the mask is applied to the lung crop, and recorded as one

    def input_record(self) -> dict[str, Any]:
        """The recorded fields (:class:`InputRecord`'s) as a dict."""
        return {f.name: getattr(self, f.name) for f in fields(InputRecord)}

    @classmethod
    def from_dict(cls: type[Record], d: dict[str, Any]) -> Record:
        """Build from a stored dict (a config.json, a checkpoint's ``config``), ignoring keys of other settings and
        of older or newer versions; missing keys take their defaults."""
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True, kw_only=True)
class InputSettings(InputRecord):
    """The input pipeline of a run's settings: the record plus the training augmentation and the lung model file."""

    augment: str = "standard"  # training augmentation: standard | style (adds scanner-style randomisation)
    lung_model: str | None = None  # lung model file for a lung crop; default $COVIDXR_HOME/lungs/lung-seg.pt


Settings = TypeVar("Settings")


def settings_from_dict(cls: type[Settings], d: dict[str, Any]) -> Settings:
    """Settings of ``cls`` (a dataclass with a ``preprocessing`` field) from their flat stored form (a config.json, a
    checkpoint's ``config``, the command line's arguments), ignoring keys of other settings and of older or newer
    versions; missing keys take their defaults."""
    names = {f.name for f in fields(cls) if f.init} - {"preprocessing"}  # type: ignore[arg-type]
    return cls(preprocessing=InputSettings.from_dict(d), **{k: v for k, v in d.items() if k in names})


def flat_settings(settings: Any) -> dict[str, Any]:
    """Settings with a ``preprocessing`` field in their flat stored form: the input settings' keys first, then the
    rest (the layout of config.json and of a checkpoint's ``config``)."""
    values = asdict(settings)
    return {**values.pop("preprocessing"), **values}
