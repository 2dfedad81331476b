"""Shared fixtures: the real chest X-rays in ../shared/data/cxr, small manifests of them, a tiny trained run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_cxr() -> Path:
    """The shared dataset: $COVIDXR_DATA, else ../shared/data/cxr beside the checkout."""
    path = Path(os.environ.get("COVIDXR_DATA") or REPO.parent / "shared" / "data" / "cxr")
    if not (path / "metadata.csv").is_file():
        pytest.fail(f"shared chest X-ray data not found at {path}: set COVIDXR_DATA (see data/README.md)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_cxr()


@pytest.fixture(scope="session")
def shared_dicom_dir() -> Path:
    return shared_cxr().parent / "dicom"


def pytest_configure(config: pytest.Config) -> None:
    """Make the session hermetic before any test or fixture runs: covidxr's home (lung model, logs), the prepared-image
    cache and matplotlib's cache live in fresh folders of this session, never in the user's home, so the suite behaves
    the same on a machine that never ran covidxr as on one where earlier runs left a lung model behind. A cache folder
    CI chose ($COVIDXR_CACHE, outside the home) is kept; subprocesses inherit all of it."""
    root = Path(tempfile.mkdtemp(prefix="covidxr-tests-"))
    os.environ["COVIDXR_HOME"] = str(root / "home")
    os.environ["MPLCONFIGDIR"] = str(root / "matplotlib")
    if not os.environ.get("COVIDXR_CACHE"):
        os.environ["COVIDXR_CACHE"] = str(root / "prepared-cache")
    config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread for a module: on a shared, busy machine two spinning threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_subset_manifest(data: Path, out: Path, per_class: int, seed: int = 0) -> Path:
    """Write a CSV manifest of ``per_class`` real images per class (whole patients, absolute paths)."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    parts = []
    for _, group in meta.groupby("label"):
        patients = group["patient_id"].drop_duplicates().sample(frac=1.0, random_state=seed)
        chosen = group[group["patient_id"].isin(patients.iloc[:per_class])]
        parts.append(chosen)
    subset = pd.concat(parts)
    subset["path"] = [str(data / p) for p in subset["path"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    subset.to_csv(out, index=False)
    return out


def fit_gated_run(shared_data: Path, run: Path, img_size: int) -> Path:
    """Make ``run`` a run of real films split by patient (45 per class) around an ImageNet EfficientNet-Lite0 with an
    untrained head (the gate needs only the backbone) at ``img_size``, and fit its input gate with ``python -m
    covidxr.gate fit`` (the lateral films and CT slices of ``notcxr/``, 60 made photographs and documents each);
    return ``run``."""
    from covidxr.data.manifest import load_manifest
    from covidxr.data.split import make_split, save_split
    from covidxr.inference.gate_fit import main as gate
    from covidxr.model.checkpoint import save_checkpoint
    from covidxr.networks.architectures import build_model, preprocess_for

    manifest = write_subset_manifest(shared_data, run / "manifest.csv", per_class=45)
    save_split(make_split(load_manifest(manifest), (0.5, 0.3, 0.2), seed=0), run / "split.csv")
    model = build_model("efficientnet_lite0", 3, "imagenet")
    save_checkpoint(run / "best.pt", {
        "arch": model.arch, "classes": ["covid", "normal", "pneumonia"],
        "preprocess": preprocess_for(model, img_size).to_dict(), "model": model.state_dict(),
        "config": {"data": str(manifest), "img_size": img_size, "workers": 0}})
    laterals = shared_data.parent / "notcxr" / "lateral"
    assert gate(["fit", "--checkpoint", str(run / "best.pt"), "--laterals", str(laterals), "--ct",
                 str(laterals.parent / "ct"), "--device", "cpu", "--made", "60"]) == 0
    return run


@pytest.fixture(scope="session")
def small_manifest(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 16 patients per class of the real shared data, as a CSV manifest with absolute paths."""
    return write_subset_manifest(shared_data, tmp_path_factory.mktemp("subset") / "manifest.csv", per_class=16)


@pytest.fixture(scope="session")
def tiny_run(small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 (random init) trained for one epoch at 64 px on the small manifest: a real run folder (without a
    fitted input gate: a gate of such a model would refuse real films at random; tests/test_gate.py fits its own)."""
    from covidxr.training.__main__ import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    status = main(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "64",
                   "--epochs", "1", "--batch-size", "8", "--workers", "0", "--freeze-epochs", "0", "--no-gate",
                   "--out", str(out)])
    assert status == 0
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests (a Streamlit server and Chromium) count as slow: ``pytest -m "not slow"`` skips them."""
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(pytest.mark.slow)
