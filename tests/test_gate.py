"""The input gate: file checks, the learned checks on synthetic features, the checkpoint round trip, and (slow) real
films with a small pretrained model: rotated, inverted, lateral, CT and colour images refused, frontal films passed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidxr.errors import CheckpointError
from covidxr.images.reader import Xray
from covidxr.inference.gate_data import patient_halves
from covidxr.inference.gate_fit import fit_ood, fit_view, invert_content, main, variant
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.model.gate import (
    BORDERLINE,
    FRONTAL,
    NO_GATE,
    OOD_REASON,
    InputGate,
    OodModel,
    file_checks,
    weights_sha256,
)
from covidxr.model.gate_files import TINY_SIDE
from covidxr.model.sidecars import read_gate

FEATURES = 16


def xray(side: int = 512, color: bool = False, header: dict | None = None, fmt: str = "PNG") -> Xray:
    return Xray(np.full((side, side + 10), 0.5, np.float32), fmt, color, header or {}, "x")


@pytest.mark.parametrize(("image", "check", "expected"), [
    (xray(color=True), "colour", "colour picture"),
    (xray(side=TINY_SIDE - 1), "size", "too small"),
    (xray(header={"Modality": "CT"}, fmt="DICOM"), "dicom", "says a CT scan"),
    (xray(header={"Modality": "DX", "BodyPartExamined": "KNEE"}, fmt="DICOM"), "dicom", "body part is KNEE"),
    (xray(header={"Modality": "CR", "ViewPosition": "LL"}, fmt="DICOM"), "dicom", "side (lateral) view"),
    (xray(header={"ViewPosition": "RAO"}, fmt="DICOM"), "dicom", "oblique view"),
])
def test_file_checks_refuse(image: Xray, check: str, expected: str) -> None:
    reasons, _ = file_checks(image)
    assert len(reasons) == 1 and reasons[0][0] == check and expected in reasons[0][1]
    verdict = InputGate().check(image)
    assert not verdict.assessable and verdict.headline() == f"not assessed: {reasons[0][1]}"
    assert verdict.checks == (check,) and verdict.status == "not assessed" and not verdict.learned


def test_file_checks_pass_a_frontal_film_and_warn_on_small_ones() -> None:
    header = {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}
    assert file_checks(xray(header=header, fmt="DICOM")) == ([], [])
    reasons, warnings = file_checks(xray(side=200))
    assert reasons == [] and "small image" in warnings[0]
    reasons, _ = file_checks(xray(side=64, color=True, header={"Modality": "MR"}))
    assert len(reasons) == 3


def clusters(n: int, seed: int) -> dict[str, np.ndarray]:
    """Four well-separated Gaussian clusters in FEATURES dimensions, one per view class."""
    rng = np.random.default_rng(seed)
    centres = {c: 6.0 * np.eye(FEATURES)[i] for i, c in enumerate((FRONTAL, "rotated", "inverted", "lateral"))}
    return {c: centre + rng.normal(size=(n, FEATURES)) for c, centre in centres.items()}


@pytest.fixture(scope="module")
def fitted() -> InputGate:
    train, val = clusters(200, 0), clusters(100, 1)
    view = fit_view(train, C=1.0, min_frontal=0.5, seed=0)
    ood = fit_ood(train[FRONTAL], val[FRONTAL], k=5, alpha=0.01)
    return InputGate(view, ood, "digest", {"n_train": 200}, unavailable=None)


def test_learned_checks_on_synthetic_clusters(fitted: InputGate) -> None:
    test = clusters(100, 2)
    assert fitted.refused(test[FRONTAL]).mean() <= 0.05
    for name in ("rotated", "inverted", "lateral"):
        assert fitted.refused(test[name]).all()
    far = test[FRONTAL] + 25.0 * np.eye(FEATURES)[-1]  # frontal-looking, far from the training films
    assert fitted.refused(far).all()
    verdicts = fitted.check_batch([xray(), xray()], np.stack([test[FRONTAL][0], test["lateral"][0]]))
    assert verdicts[0].learned and set(verdicts[0].view_probs) == {FRONTAL, "rotated", "inverted", "lateral"}
    assert verdicts[0].ood_threshold == pytest.approx(fitted.ood.threshold)
    assert not verdicts[1].assessable and verdicts[1].checks == ("lateral",)  # one reason: the view, not also OOD
    assert verdicts[1].reason == "This looks like a side (lateral) view: the model reads only frontal chest X-rays"
    assert verdicts[1].to_dict()["assessable"] is False
    with pytest.raises(ValueError, match="backbone features"):
        fitted.check(xray(), np.zeros(FEATURES + 1))


def test_borderline_band_between_the_threshold_and_the_refusal() -> None:
    """Distances just above the conformal threshold are assessed and marked; only beyond the band are they refused."""
    train, val = clusters(200, 0), clusters(100, 1)
    ood = fit_ood(train[FRONTAL], val[FRONTAL], k=5, alpha=0.05, band=1.0)
    median = float(np.median(ood.distance(val[FRONTAL])))
    assert ood.outer == pytest.approx(ood.threshold + (ood.threshold - median))
    gate = InputGate(None, ood, "digest", unavailable=None)
    direction = np.eye(FEATURES)[-1]
    scales = np.linspace(0, 30, 301)
    distances = ood.distance(train[FRONTAL][0] + scales[:, None] * direction)
    inside = scales[(distances > ood.threshold) & (distances <= ood.outer)][0]
    beyond = scales[distances > ood.outer][0]
    near, far = (gate.check(xray(), train[FRONTAL][0] + s * direction) for s in (inside, beyond))
    assert near.assessable and near.borderline and near.status == "borderline" and near.headline() == BORDERLINE
    assert near.ood_outer == pytest.approx(ood.outer) and "Unusual film" in near.warnings[-1]
    assert not far.assessable and not far.borderline and far.reason == OOD_REASON and far.checks == ("ood",)
    no_band = fit_ood(train[FRONTAL], val[FRONTAL], k=5, alpha=0.05, band=0.0)
    assert no_band.refuse_above == no_band.threshold
    old = {**ood.to_dict()}
    del old["outer"]  # a gate stored before the band: refused above the threshold, as it was
    assert OodModel.from_dict(old).refuse_above == pytest.approx(ood.threshold, rel=1e-6)


def test_made_photographs_and_documents_are_reproducible(tmp_path: Path) -> None:
    from PIL import Image

    from covidxr.inference.gate_kinds import write_made_images

    photos = write_made_images(tmp_path / "a", "photo", 3, seed=1, grey=False)
    again = write_made_images(tmp_path / "b", "photo", 3, seed=1, grey=False)
    other = write_made_images(tmp_path / "c", "photo", 3, seed=2, grey=False)
    assert [p.read_bytes() for p in photos] == [p.read_bytes() for p in again] != [p.read_bytes() for p in other]
    pixels = np.asarray(Image.open(photos[0]))
    assert pixels.ndim == 3 and np.abs(pixels[..., 0].astype(int) - pixels[..., 2]).mean() > 5  # in colour
    documents = write_made_images(tmp_path / "d", "document", 2, seed=1)
    page = np.asarray(Image.open(documents[0]))
    assert page.ndim == 2 and np.median(page) > 200 and (page < 100).mean() > 0.02  # light paper, dark ink


def test_two_view_classes_keep_one_row_per_class() -> None:
    train = clusters(50, 0)
    view = fit_view({FRONTAL: train[FRONTAL], "rotated": train["rotated"]}, C=1.0, min_frontal=0.5, seed=0)
    probs = view.probs(np.stack([train[FRONTAL][0], train["rotated"][0]]))
    assert view.classes == (FRONTAL, "rotated") and probs.shape == (2, 2)
    assert probs[0, 0] > 0.5 > probs[1, 0]


def tiny_checkpoint(gate: InputGate | None = None) -> dict:
    model = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3)}
    ckpt = {"arch": "x", "classes": ["a", "b"], "preprocess": {"img_size": 32}, "model": model}
    if gate is not None:
        ckpt["gate"] = InputGate(gate.view, gate.ood, weights_sha256(model), gate.info, None).to_dict()
    return ckpt


def inside(ckpt: dict, source: str = "checkpoint") -> InputGate:
    """The gate an older checkpoint carries inside, read where the model package reads it (no sidecar here)."""
    return read_gate(Path(source).with_name("no-such.pt"), "", ckpt.get("gate"), weights_sha256(ckpt["model"]),
                     source)


def test_gate_round_trip_through_a_checkpoint(fitted: InputGate, tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, tiny_checkpoint(fitted))
    ckpt = torch.load(path, weights_only=True)  # plain tensors, floats, strings and lists only
    loaded = inside(ckpt, str(path))
    assert loaded.learned and loaded.info == {"n_train": 200}
    features = clusters(20, 3)["rotated"]
    np.testing.assert_allclose(loaded.view.probs(features), fitted.view.probs(features), atol=1e-5)
    np.testing.assert_allclose(loaded.ood.distance(features), fitted.ood.distance(features), rtol=1e-4)
    assert loaded.ood.threshold == fitted.ood.threshold and loaded.view.classes == fitted.view.classes

    ckpt["model"]["w"] = ckpt["model"]["w"] + 1  # other weights: the learned checks switch off, with the reason
    other = inside(ckpt)
    verdict = other.check(xray(), features[0])
    assert not other.learned and verdict.assessable and not verdict.learned
    assert "other model weights" in other.unavailable

    ckpt["gate"]["ood"]["reference"] = torch.zeros(3, 5)
    with pytest.raises(CheckpointError, match="feature sizes differ"):
        inside(ckpt, "best.pt")
    with pytest.raises(CheckpointError, match="not a covidxr gate"):
        inside({**ckpt, "gate": {"view": None}}, "best.pt")


def test_checkpoint_without_gate_runs_the_file_checks_only(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    save_checkpoint(path, tiny_checkpoint())
    gate = inside(load_checkpoint(path), str(path))
    assert not gate.learned and gate.unavailable == NO_GATE
    verdict = gate.check(xray(), np.zeros(FEATURES))
    assert verdict.assessable and verdict.warnings == () and verdict.view_probs is None and not verdict.learned
    assert gate.check(xray(color=True)).reason.startswith("This is a colour picture")
    with pytest.raises(ValueError, match="nothing to store"):
        gate.to_dict()


def test_variants_keep_the_letterbox_padding_black() -> None:
    square = torch.zeros(1, 1, 8, 8)
    square[0, 0, 2:6] = 0.25  # a wide film: padding above and below
    square[0, 0, 2, 0] = 0.0  # a black pixel inside the film is inverted with it
    inverted = invert_content(square)[0, 0]
    assert (inverted[:2] == 0).all() and (inverted[6:] == 0).all()
    assert inverted[2, 0] == 1.0 and (inverted[3:6] == 0.75).all()
    tall = square.transpose(-1, -2)
    assert torch.equal(invert_content(tall), inverted.T[None, None])
    assert torch.equal(invert_content(torch.zeros(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    assert torch.equal(variant(square, "rot180"), square.flip(-1).flip(-2))
    assert torch.equal(variant(square, "upright"), square)


def test_lateral_patients_split_in_halves(tmp_path: Path) -> None:
    folder = tmp_path / "notcxr" / "lateral"
    folder.mkdir(parents=True)
    rows = []
    for i in range(10):
        for k in range(1 + i % 2):
            (folder / f"p{i}_{k}.jpg").write_bytes(b"x")
            rows.append({"path": f"lateral/p{i}_{k}.jpg", "patient_id": f"p{i}"})
    (folder / "extra.jpg").write_bytes(b"x")  # no metadata row: its own patient
    pd.DataFrame(rows).to_csv(tmp_path / "notcxr" / "metadata.csv", index=False)
    table = patient_halves(folder, seed=0)
    assert len(table) == 16 and table.groupby("patient_id")["role"].nunique().max() == 1
    assert table.drop_duplicates("patient_id")["role"].value_counts().to_dict() == {"holdout": 6, "fit": 5}
    assert table.equals(patient_halves(folder, seed=0)) and not table.equals(patient_halves(folder, seed=1))


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip().endswith("checkpoint not found")
    assert main(["fit", "--checkpoint", "x.pt", "--alpha", "2"]) == 2


# ------------------------------------------------------------------------------------------ real films (slow)

REAL_SIZE = 96  # network input side: small enough for a quick CPU test, large enough to tell the views apart


def colour_photo(seed: int) -> np.ndarray:
    """A synthetic colour 'photograph': sky over ground, coloured blobs, texture noise; (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    t = np.linspace(0, 1, h)[:, None, None]
    img = (1 - t) * rng.uniform(0, 1, 3) * [0.4, 0.6, 1.0] + t * rng.uniform(0.4, 1, 3) * [0.6, 0.8, 0.4]
    img = np.broadcast_to(img, (h, w, 3)).copy()
    for _ in range(6):
        y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 60)
        img[max(0, y - r):y + r, max(0, x - r):x + r] = rng.uniform(0, 1, 3)
    return (np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def gate_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet EfficientNet-Lite0 (no training: the gate needs only its backbone) as a run of real films split
    by patient, with its gate fitted by ``python -m covidxr.gate fit``."""
    from conftest import fit_gated_run

    return fit_gated_run(shared_data, tmp_path_factory.mktemp("gate-run"), REAL_SIZE)


@pytest.mark.slow
def test_real_films_pass_and_other_images_are_refused(gate_run: Path, shared_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from covidxr.data.manifest import load_manifest
    from covidxr.data.split import apply_split
    from covidxr.evaluation.gate_report import TRANSFORMS, gate_report
    from covidxr.inference.__main__ import main as predict
    from covidxr.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(gate_run / "best.pt", device="cpu", backend="torch")
    info = predictor.gate.info
    assert info["n_lateral_fit"] > 0 and info["n_lateral_holdout"] > 0 and info["n_val"] > 0
    assert predictor.gate.learned and predictor.info["gate"]["learned"]
    table = apply_split(load_manifest(gate_run / "manifest.csv"), gate_run / "split.csv")
    rows = table[table["split"] == "test"]
    notcxr = shared_data.parent / "notcxr"
    report = gate_report(predictor, rows, [notcxr], variants=True, progress=False)
    # An ImageNet backbone at 96 px tells the views apart less well than a trained model at 224 (docs/gate.md: the gate
    # of a trained run passes 96% of its test films): simulated over six splits, 84-97% of untouched films passed,
    # 93-100% of inverted and all rotated, lateral and CT images were refused.
    assert report["learned"] and report["evaluated"]["n"] == len(rows) >= 25
    assert report["evaluated"]["rate"] <= 0.25, report["refused_files"]
    for name in TRANSFORMS:
        assert report["variants"][name]["rate"] >= 0.85, (name, report["variants"][name])
    groups = report["folders"][str(notcxr)]
    assert groups["lateral (not fitted on)"]["n"] == info["n_lateral_holdout"]
    assert groups["ct (not fitted on)"]["n"] == info["n_ct_holdout"] > 0
    for name in ("lateral", "lateral (not fitted on)", "ct", "ct (not fitted on)"):
        assert groups[name]["rate"] >= 0.9, (name, groups[name])

    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        Image.fromarray(colour_photo(seed)).save(photos / f"photo{seed}.jpg")
    film = rows["path"].iloc[0]
    upright = Image.open(film)
    upright.save(photos / "upright.png")
    upright.rotate(90, expand=True).save(photos / "sideways.png")
    assert predict(["--checkpoint", str(gate_run / "best.pt"), str(photos), "--out", str(tmp_path / "out"),
                    "--cam", "none", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False).set_index("path")
    for seed in range(3):
        assert f"photo{seed}.jpg: not assessed: This is a colour picture" in out
    assert f"{photos / 'sideways.png'}: not assessed: This film looks rotated" in out
    assert csv.loc[str(photos / "sideways.png"), "gate"] == "not assessed"
    assert csv.loc[str(photos / "sideways.png"), "predicted"] == ""
    assert float(csv.loc[str(photos / "sideways.png"), "prob_covid"]) >= 0.0  # the output is still recorded
    if csv.loc[str(photos / "upright.png"), "gate"] == "assessed":  # the OOD check may refuse a single film
        assert csv.loc[str(photos / "upright.png"), "predicted"] in predictor.classes
