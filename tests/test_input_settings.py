"""One definition of the input settings (lung crop and mask, equalisation, augmentation, lung model file): what the
command line asks for is what training prepares, what the checkpoint records and what evaluation and prediction
prepare again; the lung rule holds everywhere, and stored records of every age still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covidxr.crossval.__main__ import get_args_parser as crossval_parser
from covidxr.crossval.folds import CrossvalConfig
from covidxr.data.loaders import LoaderSettings, input_pipeline
from covidxr.data.run_folder import RunFolder
from covidxr.evaluation.inputs import EvalOptions, eval_settings
from covidxr.model.input_pipeline import InputPipeline, pipeline_from_checkpoint
from covidxr.preprocessing.settings import InputSettings
from covidxr.preprocessing.transforms import Preprocess
from covidxr.training.config import TrainConfig, config_from_args, get_args_parser

FLAGS = ["--equalize", "clahe", "--lung-margin", "0.1", "--augment", "style", "--img-size", "64"]


def test_a_lung_mask_implies_the_crop_wherever_it_is_asked_for() -> None:
    cfg = config_from_args(get_args_parser().parse_args(["--lung-mask"]))
    assert cfg.preprocessing.lung_crop and cfg.loader_settings().preprocessing.lung_crop
    assert Preprocess(lung_mask=True).lung_crop and InputSettings(lung_mask=True).lung_crop
    assert InputPipeline(lung_mask=True, lung_entry={"sha256": "0" * 64}).lung_crop
    cv = crossval_parser().parse_args(["--by", "source", "--data", "x.csv", "--lung-mask"])
    assert CrossvalConfig.from_dict({**vars(cv), "out": Path("cv")}).preprocessing.lung_crop
    assert not TrainConfig().preprocessing.lung_crop


def test_training_passes_its_input_settings_on_to_the_loaders_and_folds() -> None:
    args = get_args_parser().parse_args(["--lung-mask", "--lung-mask-dilation", "0.04", "--equalize", "clahe",
                                         "--augment", "style", "--lung-model", "lungs.pt"])
    cfg = config_from_args(args)
    expected = InputSettings(lung_crop=True, lung_mask=True, lung_mask_dilation=0.04, equalize="clahe",
                             augment="style", lung_model="lungs.pt")
    assert cfg.preprocessing == expected and cfg.loader_settings().preprocessing == expected
    fold = CrossvalConfig(data="x.csv", out=Path("cv"), preprocessing=InputSettings.from_dict(vars(args)))
    assert fold.train_config("A", Path("cv/A")).preprocessing == expected


def test_what_training_records_is_what_evaluation_prepares_again(tmp_path: Path) -> None:
    """A checkpoint written from given settings (as ``covidxr.training.run_files.checkpoint_dict`` writes its
    ``preprocess`` and ``config``) gives the same pipeline and the same input settings when it is read back."""
    cfg = config_from_args(get_args_parser().parse_args(FLAGS))
    trained = input_pipeline(cfg.loader_settings())  # what training prepares its films with
    ckpt = {"preprocess": trained.record(Preprocess(img_size=cfg.img_size)).to_dict(),
            "config": json.loads(json.dumps(cfg.to_dict())), "classes": ["a", "b"]}
    run = RunFolder(tmp_path / "best.pt", ckpt)
    assert run.pipeline() == trained == pipeline_from_checkpoint(ckpt, Preprocess.from_dict(ckpt["preprocess"]))
    settings = eval_settings(run, EvalOptions(checkpoint=tmp_path / "best.pt", batch_size=5, workers=0), tmp_path)
    assert settings.preprocessing == cfg.preprocessing and input_pipeline(settings) == trained
    assert (settings.img_size, settings.batch_size, settings.workers, settings.data) == (64, 5, 0, str(tmp_path))
    assert (trained.equalize, trained.lung_margin, settings.preprocessing.augment) == ("clahe", 0.1, "style")


def test_stored_records_of_every_age_load() -> None:
    old = {"img_size": 96, "mean": [0.5] * 3, "std": [0.5] * 3, "geometry": "letterbox"}  # before lung crops
    assert Preprocess.from_dict(old) == Preprocess(img_size=96, mean=(0.5,) * 3, std=(0.5,) * 3)
    masked = Preprocess.from_dict({**old, "lung_crop": False, "lung_mask": 1, "equalize": "hist", "new_key": 3})
    assert (masked.lung_crop, masked.lung_mask, masked.equalize) == (True, True, "hist")
    config = TrainConfig(preprocessing=InputSettings(lung_crop=True)).to_dict()
    assert config["lung_crop"] is True and "preprocessing" not in config  # config.json stays one key per setting
    assert LoaderSettings.from_dict(config).preprocessing.lung_crop
    assert TrainConfig.from_dict(config) == TrainConfig(preprocessing=InputSettings(lung_crop=True))
    assert TrainConfig.from_dict({"lung_mask": True, "retired_option": 1}).preprocessing.lung_crop


@pytest.mark.parametrize("flag", ["--lung-crop", "--lung-mask", "--lung-margin", "--lung-mask-dilation",
                                  "--equalize", "--augment", "--lung-model"])
def test_every_input_flag_lands_in_config_json_under_its_own_name(flag: str) -> None:
    key = flag.removeprefix("--").replace("-", "_")
    value = {"--equalize": "hist", "--augment": "style", "--lung-model": "x.pt", "--lung-margin": "0.2",
             "--lung-mask-dilation": "0.03"}.get(flag)
    cfg = config_from_args(get_args_parser().parse_args([flag] + ([value] if value else [])))
    stored = cfg.to_dict()
    assert stored[key] == getattr(cfg.preprocessing, key) != getattr(InputSettings(), key)
    assert TrainConfig.from_dict(stored) == cfg
