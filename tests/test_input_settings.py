"""One definition of the input settings (lung crop and mask, equalisation, augmentation, lung model file): every
settings class shares it, the lung rule holds in each, and stored records of every age still load."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from covidxr.crossval.folds import CrossvalConfig
from covidxr.data.loaders import LoaderSettings
from covidxr.input_settings import InputRecord, InputSettings
from covidxr.model_input import InputPipeline
from covidxr.preprocess import Preprocess
from covidxr.training.config import TrainConfig, config_from_args, get_args_parser

RECORD = {f.name for f in fields(InputRecord)}


@pytest.mark.parametrize("make", [
    lambda **kw: TrainConfig(**kw), lambda **kw: LoaderSettings(**kw), lambda **kw: Preprocess(**kw),
    lambda **kw: CrossvalConfig(data="x.csv", out=Path("cv"), **kw),
    lambda **kw: InputPipeline(lung_entry={"sha256": "0" * 64}, **kw)])
def test_every_settings_class_is_an_input_record_and_a_mask_implies_the_crop(make) -> None:
    settings = make(lung_mask=True)
    assert isinstance(settings, InputRecord) and settings.lung_crop and settings.input_record()["lung_crop"]
    assert not make().lung_crop


def test_the_settings_classes_declare_no_input_field_of_their_own() -> None:
    for cls in (TrainConfig, LoaderSettings, CrossvalConfig):
        assert issubclass(cls, InputSettings)
        own = set(vars(cls).get("__annotations__", {}))  # the fields the class itself declares
        assert not own & {f.name for f in fields(InputSettings)}, cls


def test_training_passes_its_input_settings_on_to_the_loaders_and_folds() -> None:
    args = get_args_parser().parse_args(["--lung-mask", "--lung-mask-dilation", "0.04", "--equalize", "clahe",
                                         "--augment", "style", "--lung-model", "lungs.pt"])
    cfg = config_from_args(args)
    expected = {"lung_crop": True, "lung_mask": True, "lung_mask_dilation": 0.04, "equalize": "clahe",
                "augment": "style", "lung_model": "lungs.pt", "lung_margin": 0.05}
    assert cfg.input_settings() == expected and cfg.loader_settings().input_settings() == expected
    fold = CrossvalConfig(data="x.csv", out=Path("cv"), **InputSettings.from_dict(vars(args)).input_settings())
    assert fold.train_config("A", Path("cv/A")).input_settings() == expected


def test_stored_records_of_every_age_load() -> None:
    old = {"img_size": 96, "mean": [0.5] * 3, "std": [0.5] * 3, "geometry": "letterbox"}  # before lung crops
    assert Preprocess.from_dict(old).input_record() == InputRecord().input_record()
    masked = Preprocess.from_dict({**old, "lung_crop": False, "lung_mask": 1, "equalize": "hist", "new_key": 3})
    assert (masked.lung_crop, masked.lung_mask, masked.equalize) == (True, True, "hist")
    assert set(Preprocess(img_size=96).to_dict()) == RECORD | {"img_size", "mean", "std", "geometry"}
    config = TrainConfig(lung_crop=True).to_dict()
    assert LoaderSettings.from_dict(config).lung_crop and TrainConfig.from_dict(config) == TrainConfig(lung_crop=True)
    assert TrainConfig.from_dict({"lung_mask": True, "retired_option": 1}).lung_crop
