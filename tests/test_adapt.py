"""``python -m covidxr.adapt`` and the site profile: labels never read, the same result twice, the input gate's refused
films left out, the profile pinned to its checkpoint, the collapse guard, and the profile used by predict, evaluate,
export, the audit log and the DICOM SR."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset

from covidxr.adapt.__main__ import main as adapt_main
from covidxr.adapt.estimate import AdaptSettings, collapse_reason, em_priors, floored, mix_weights, source_priors
from covidxr.adapt.site import adapt_site
from covidxr.files import file_digest
from covidxr.images.reader import load_xray
from covidxr.inference.__main__ import main as predict_main
from covidxr.inference.dicom_out import site_text
from covidxr.inference.dicom_sr import ReportFacts, _decision_group
from covidxr.inference.prediction_log import prediction_record
from covidxr.inference.predictor import Predictor
from covidxr.model.build import model_from_checkpoint
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.model.site_profile import SiteProfileError, apply_profile, read_profile

# The tiny model of the fixtures knows nothing yet, so its calls may collapse onto one class; tests that need an
# adapted profile loosen the guard (the guard itself is tested with its defaults and with a strict one).
LOOSE = AdaptSettings(max_class_share=1.0, max_prior_shift=1.0, max_call_growth=1.0, min_films=10, batch_size=8)
VOLATILE = ("created", "seconds")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A site folder as a hospital might hand it over: class folders and a metadata.csv with labels (links to 12
    films per class of ``external/``)."""
    external = shared_data.parent / "external"
    meta = pd.read_csv(external / "metadata.csv", dtype=str, keep_default_na=False)
    folder = tmp_path_factory.mktemp("site") / "hospital"
    rows = []
    for label, group in meta.groupby("label"):
        for path in group["path"].iloc[:12]:
            target = folder / label / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(external / path)
            rows.append({"path": f"{label}/{target.name}", "label": label, "patient_id": target.stem})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run's checkpoint in a folder of its own (profiles are written beside it)."""
    folder = tmp_path_factory.mktemp("adapt-run")
    shutil.copy(tiny_run / "best.pt", folder / "best.pt")
    return folder


def profile_files(folder: Path) -> tuple[dict, dict | None]:
    """``site.json`` without its volatile fields, and the statistics (None for a refused profile)."""
    record = {k: v for k, v in json.loads((folder / "site.json").read_text()).items() if k not in VOLATILE}
    stats = torch.load(folder / "bn_stats.pt", weights_only=True) if (folder / "bn_stats.pt").is_file() else None
    return record, stats


def same_stats(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][s], b[k][s]) for k in a for s in ("mean", "var"))


@pytest.fixture(scope="module")
def adapted(run: Path, site: Path, one_torch_thread: None) -> Path:
    """An adapted profile of the run for the site (guard loosened, see LOOSE)."""
    profile = adapt_site(run / "best.pt", site, "Hospital A", run / "sites" / "Hospital A", "cpu", LOOSE)
    assert profile.adapted
    return run / "sites" / "Hospital A"


def test_same_result_twice_and_labels_never_read(run: Path, site: Path, adapted: Path, tmp_path: Path) -> None:
    again = adapt_site(run / "best.pt", site, "Hospital A", tmp_path / "again", "cpu", LOOSE)
    first, first_stats = profile_files(adapted)
    second, second_stats = profile_files(again.folder)
    assert first == second and same_stats(first_stats, second_stats)
    # Scramble the labels: every film moves to another class folder and metadata.csv gets shuffled labels.
    scrambled = tmp_path / "scrambled"
    shutil.copytree(site, scrambled, symlinks=True)
    films = sorted(p for p in scrambled.rglob("*") if p.is_symlink())
    rng = random.Random(0)
    for film in films:
        other = scrambled / rng.choice(["pneumonia", "other", "normal" if film.parent.name == "covid" else "covid"])
        other.mkdir(exist_ok=True)
        film.rename(other / f"x{rng.randrange(10**6)}-{film.name}")
    meta = pd.read_csv(scrambled / "metadata.csv")
    meta["label"] = rng.sample(list(meta["label"]), len(meta))
    meta.to_csv(scrambled / "metadata.csv", index=False)
    third = adapt_site(run / "best.pt", scrambled, "Hospital A", tmp_path / "scrambled-profile", "cpu", LOOSE)
    record, stats = profile_files(third.folder)
    assert record == first and same_stats(stats, first_stats)


def test_films_the_gate_refuses_take_no_part(run: Path, site: Path, adapted: Path, tmp_path: Path) -> None:
    folder = tmp_path / "with-photos"
    shutil.copytree(site, folder, symlinks=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / "photo.png")  # colour
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "thumb.png")  # too small
    (folder / "notes.dcm").write_bytes(b"not an image")
    profile = adapt_site(run / "best.pt", folder, "Hospital A", tmp_path / "profile", "cpu", LOOSE)
    record, stats = profile_files(profile.folder)
    clean, clean_stats = profile_files(adapted)
    assert (record["n_refused"], record["n_unreadable"], clean["n_refused"]) == (2, 1, 0)
    assert record["films_sha256"] == clean["films_sha256"] and record["n_films"] == clean["n_films"] == 24
    assert same_stats(stats, clean_stats)


def test_profile_pinned_to_its_checkpoint(run: Path, adapted: Path, site: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = load_checkpoint(run / "best.pt")
    assert json.loads((adapted / "site.json").read_text())["checkpoint_sha256"] == file_digest(run / "best.pt")
    other = tmp_path / "other.pt"
    save_checkpoint(other, {**ckpt, "epoch": 99})  # the same weights in other bytes: another checkpoint
    with pytest.raises(SiteProfileError, match="made for another checkpoint"):
        Predictor.from_checkpoint(other, device="cpu", site=adapted)
    capsys.readouterr()
    status = predict_main([str(next(site.rglob("*.jp*g"))), "--checkpoint", str(other), "--site", str(adapted),
                           "--cam", "none", "--out", str(tmp_path / "preds"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "made for another checkpoint" in err[0] and "Traceback" not in err[0]


def test_adapt_leaves_the_checkpoint_bytes(run: Path, site: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = file_digest(run / "best.pt")
    status = adapt_main(["--checkpoint", str(run / "best.pt"), "--data", str(site), "--site", "B",
                         "--out", str(tmp_path / "b"), "--device", "cpu", "--min-films", "10"])
    out = capsys.readouterr().out
    assert status in (0, 1) and file_digest(run / "best.pt") == before and (tmp_path / "b" / "site.json").is_file()
    assert ("adapted to B from 24 films on " in out) == (status == 0)
    assert adapt_main(["--checkpoint", str(run / "best.pt"), "--data", str(tmp_path / "missing"), "--site", "B",
                       "--device", "cpu"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert adapt_main(["--checkpoint", str(run / "best.pt"), "--data", str(site), "--site", "B", "--device", "cpu",
                       "--min-films", "100", "--out", str(tmp_path / "c")]) == 2
    assert "adaptation needs at least 100" in capsys.readouterr().err


def test_collapse_guard_refuses_and_the_model_runs_unadapted(run: Path, site: Path, tmp_path: Path) -> None:
    strict = AdaptSettings(max_class_share=0.34, min_films=10, batch_size=8)  # any real site breaks it
    profile = adapt_site(run / "best.pt", site, "C", tmp_path / "c", "cpu", strict)
    assert not profile.adapted and "of the films" in profile.record["reason"]
    assert not (tmp_path / "c" / "bn_stats.pt").exists()
    film = load_xray(next(site.rglob("*.jp*g")))
    plain = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch").predict(film, cam=None)
    refused = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch", site=tmp_path / "c")
    assert refused.predict(film, cam=None).probs == plain.probs
    assert refused.site.describe().startswith("not adapted to C: profile refused (the adapted model calls")
    classes = ["covid", "normal", "pneumonia"]
    flat = np.full(3, 1 / 3)
    assert "calls 95% of the films normal" in collapse_reason(np.array([1] * 19 + [0]), 3, flat, flat, classes,
                                                               AdaptSettings())
    far = collapse_reason(np.array([0, 1, 2] * 5), 3, np.array([0.9, 0.05, 0.05]), flat, classes, AdaptSettings())
    assert "differ from the training ones by 0.57" in far
    assert collapse_reason(np.array([0, 1, 1, 0]), 3, np.array([0.49, 0.49, 0.02]), flat, classes,
                           AdaptSettings()) is None
    # a class the unadapted model seldom called becomes the adapted model's usual call (held-out siim: pneumonia)
    unadapted = np.array([0] * 12 + [1] * 7 + [2])
    grown = np.array([0] * 3 + [1] * 4 + [2] * 13)
    assert "calls 65% of the films pneumonia, the unadapted model 5%" in collapse_reason(
        grown, 3, flat, flat, classes, AdaptSettings(), unadapted)
    assert collapse_reason(grown, 3, flat, flat, classes, AdaptSettings()) is None  # not asked without them
    # calls leaving a class the unadapted model over-called (external/: its pneumonia calls) are no collapse
    assert collapse_reason(np.array([0] * 10 + [1] * 9 + [2]), 3, flat, flat, classes, AdaptSettings(),
                           np.array([0] * 8 + [1] * 6 + [2] * 6)) is None


def test_adapted_model_is_the_prior_corrected_posterior(run: Path, adapted: Path, site: Path) -> None:
    profile = read_profile(adapted, file_digest(run / "best.pt"))
    record = profile.record
    assert record["status"] == "adapted" and record["n_films"] == 24 and min(record["site_priors"]) >= 0.02 - 1e-12
    film = load_xray(next(site.rglob("*.jp*g")))
    predictor = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch", site=adapted)
    assert predictor.site.describe().startswith("adapted to Hospital A from 24 films on 20")
    # The same model with only the statistics swapped in, and the priors applied by hand, gives the same output.
    ckpt = load_checkpoint(run / "best.pt")
    bn_only = apply_profile(ckpt, profile)
    bn_only["model"]["head.bias"] = ckpt["model"]["head.bias"]
    x = predictor.pipeline.network_input(film.pixels, predictor.preprocess.img_size)[0][None]
    with torch.inference_mode():
        z = model_from_checkpoint(bn_only).eval().double()(x.double()).numpy()[0]
    expected = np.exp(z / record["temperature"] + np.array(record["logit_offsets"]))
    expected /= expected.sum()
    got = predictor.predict(film, cam=None).probs
    assert np.allclose([got[c] for c in predictor.classes], expected, atol=1e-4)
    assert not torch.equal(bn_only["model"]["backbone.bn1.running_mean"], ckpt["model"]["backbone.bn1.running_mean"])


def test_em_recovers_known_priors_and_settings_behave() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([0.7, 0.25, 0.05])
    y = rng.choice(3, size=4000, p=truth)
    x = rng.normal(loc=2.0 * y, scale=1.0)  # x | y ~ N(2y, 1): overlapping classes with exact posteriors
    likelihood = np.exp(-0.5 * (x[:, None] - 2.0 * np.arange(3)) ** 2)
    source = np.full(3, 1 / 3)
    posterior = likelihood * source
    posterior /= posterior.sum(axis=1, keepdims=True)
    priors, iterations = em_priors(posterior, source)
    assert iterations > 1 and np.allclose(priors, truth, atol=0.03)
    assert np.isclose(floored(np.array([1.0, 0.0, 0.0]), 0.02).min(), 0.02)
    weights = mix_weights(10, 32, AdaptSettings(prior_strength=32))
    assert weights[0] == 0.5 and all(a > b for a, b in zip(weights, weights[1:], strict=False)) and weights[-1] > 0
    assert source_priors(["a", "b"], {"balance": "loss"}, None).tolist() == [0.5, 0.5]
    counted = {"label": ["a", "a", "a", "b", "b"], "split": ["train"] * 4 + ["test"]}
    assert source_priors(["a", "b"], {"balance": "none"}, counted).tolist() == [0.75, 0.25]


def test_predict_log_and_sr_name_the_profile(run: Path, adapted: Path, site: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    status = predict_main([str(next(site.rglob("*.jp*g"))), "--checkpoint", str(run / "best.pt"), "--site",
                           str(adapted), "--cam", "none", "--out", str(tmp_path / "preds"), "--device", "cpu"])
    assert status == 0 and "site: adapted to Hospital A from 24 films on " in capsys.readouterr().out
    predictor = Predictor.from_checkpoint(run / "best.pt", device="cpu", site=adapted)
    summary = predictor.site.summary()
    record = prediction_record(session_id="s", image_sha256="i", image_shape=(2, 2), image_format="PNG", header=None,
                               arch="a", checkpoint_sha256="c", classes=["x"], preprocess={}, temperature=1.0,
                               probabilities={"x": 1.0}, label="x", confidence=1.0, cam_method=None, cam_class=None,
                               site=summary)
    assert record["model"]["site"]["name"] == "Hospital A"
    assert record["model"]["site"]["profile_sha256"] == file_digest(adapted / "site.json")
    facts = ReportFacts(assessable=True, gate_reason="", decision="COVID: yes", covid=True, label="covid",
                        probs={"covid": 1.0}, rule="rule", threshold=0.5, arch="a", version="v",
                        checkpoint_sha256="c", site=site_text(predictor))
    report = _decision_group(facts, None, None)  # the SR's decision group: its comment and TID 4019 parameters
    texts = [str(getattr(item, "TextValue", "")) for item in _walk(report[0])]
    assert any("adapted to Hospital A from 24 films" in t and summary["profile_sha256"] in t for t in texts)


def _walk(dataset: Dataset):
    """Every content item of an SR, depth first."""
    for item in getattr(dataset, "ContentSequence", []):
        yield item
        yield from _walk(item)


@pytest.mark.slow
def test_evaluate_and_export_with_a_site(run: Path, adapted: Path, site: Path, tmp_path: Path) -> None:
    from covidxr.evaluation.__main__ import main as evaluate_main
    from covidxr.inference.export import main as export_main

    assert evaluate_main(["--checkpoint", str(run / "best.pt"), "--data", str(site), "--site", str(adapted),
                          "--bootstrap", "0", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["site"]["name"] == "Hospital A" and metrics["n_images"] == 24
    assert metrics["warnings"][0].startswith("site profile: the model is adapted to Hospital A from 24 films")
    assert evaluate_main(["--checkpoint", str(run / "best.pt"), "--site", str(adapted), "--bootstrap", "0",
                          "--device", "cpu", "--out", str(tmp_path / "own")]) == 2
    import onnx

    assert export_main(["--checkpoint", str(run / "best.pt"), "--format", "onnx", "--site", str(adapted),
                        "--exporter", "legacy"]) == 0
    exported = onnx.load(str(run / "best.site-Hospital_A.onnx"))
    meta = {p.key: p.value for p in exported.metadata_props}
    assert json.loads(meta["covidxr.site"])["name"] == "Hospital A"
    # ONNX Runtime in the predictor runs the adapted model from memory, never from (or into) the plain export's place.
    film = load_xray(next(site.rglob("*.jp*g")))
    onnx_probs = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="onnx", site=adapted).predict(
        film, cam=None).probs
    torch_probs = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch", site=adapted).predict(
        film, cam=None).probs
    assert np.allclose(list(onnx_probs.values()), list(torch_probs.values()), atol=1e-4)
    assert not (run / "best.onnx").exists()


def test_app_offers_the_site_and_names_it(run: Path, adapted: Path, site: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from covidxr.inference.prediction_log import read_records

    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv("COVIDXR_CHECKPOINT", str(run / "best.pt"))
    monkeypatch.setenv("COVIDXR_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("COVIDXR_AUDIT_LOG", str(audit))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    choice = at.sidebar.selectbox(key="site")
    assert choice.options[0] == "none (unadapted)" and "Hospital A" in choice.options
    assert not any("adapted to" in i.value for i in at.info)
    choice.set_value("Hospital A").run()
    assert not at.exception, at.exception
    date = json.loads((adapted / "site.json").read_text())["created"][:10]
    assert [i.value for i in at.info if "Site:" in i.value] == [f"Site: adapted to Hospital A from 24 films on {date}."]
    film = next(site.rglob("*.jp*g"))
    at.file_uploader[0].set_value([(film.name, film.read_bytes(), "image/jpeg")]).run()
    assert not at.exception, at.exception
    records = [r for r in read_records(audit) if r["event"] == "prediction"]
    assert len(records) == 1 and records[0]["model"]["site"]["name"] == "Hospital A"


@pytest.mark.slow
def test_benchmark_scores_films_the_adaptation_never_saw(run: Path, site: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "adapt_eval.py"
    proc = subprocess.run([sys.executable, str(script), "--checkpoint", str(run / "best.pt"), "--data", str(site),
                           "--name", "smoke", "--splits", "2", "--bootstrap", "10", "--sizes", "10", "50",
                           "--curve-splits", "1", "--time", "12", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "adapt-smoke.json").read_text())
    assert report["n_films"] == 24 and report["halves"]["splits"] == 2
    assert set(report["halves"]["arms"]) == {"unadapted", "bn", "priors", "bn+priors", "adapted"}
    arms = report["halves"]["arms"]
    assert "diff_ci95" in arms["adapted"] and "diff_ci95" not in arms["unadapted"]
    assert report["curve"][0]["splits"] == 1 and report["curve"][1] == {"n": 50, "splits": 0,
                                                                          "note": "a half has fewer accepted films"}
    assert report["timing"]["films"] == 12 and report["timing"]["accepted"] == 12
    assert (tmp_path / "adapt-smoke.md").read_text().startswith("# Site adaptation: smoke")
    # The control: the run's own test split, read through its recorded split.
    proc = subprocess.run([sys.executable, str(script), "--checkpoint", str(run / "best.pt"), "--run-test", "--name",
                           "control", "--splits", "1", "--bootstrap", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    split = load_checkpoint(run / "best.pt")["split"]
    control = json.loads((tmp_path / "adapt-control.json").read_text())
    assert control["n_films"] == sum(part == "test" for part in split["split"]) > 0


@pytest.mark.browser
def test_browser_site_choice_names_the_site(run: Path, adapted: Path, site: Path, tmp_path: Path) -> None:
    """In headless Chromium: choose the site in the sidebar, see the page name it, upload a film, find the profile
    in the audit record."""
    from app_server import CHROMIUM, CHROMIUM_ARGS, RESULT_TIMEOUT_MS, require_chromium, run_app
    from playwright.sync_api import expect, sync_playwright

    from covidxr.inference.prediction_log import read_records

    require_chromium()
    date = json.loads((adapted / "site.json").read_text())["created"][:10]
    with run_app(run / "best.pt", tmp_path) as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app.url)
            choice = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']",
                                  has_text="Site (hospital)")
            expect(choice).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(page.get_by_text("Site: adapted to", exact=False)).to_have_count(0)
            choice.click()
            page.get_by_role("option", name="Hospital A").click()
            named = page.get_by_text(f"Site: adapted to Hospital A from 24 films on {date}.", exact=True)
            expect(named).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")
            expect(file_input).to_be_attached(timeout=RESULT_TIMEOUT_MS)
            file_input.set_input_files([next(site.rglob("*.jp*g")).resolve()])
            heading = page.get_by_role("heading", name=re.compile("^(COVID: |Not assessed)"))
            expect(heading.first).to_be_visible(timeout=RESULT_TIMEOUT_MS)
        finally:
            browser.close()
    records = [r for r in read_records(app.audit) if r["event"] == "prediction"]
    assert [r["model"]["site"]["name"] for r in records] == ["Hospital A"]


@pytest.mark.slow
def test_gate_reads_the_unadapted_features(shared_data: Path, site: Path, tmp_path: Path) -> None:
    """With a fitted gate, a profile changes the answers, and the gate keeps reading the unadapted model's features
    (its reference was fitted on them), with the site's accepted films added to its reference: the view check is
    unchanged and no film moves further from the reference."""
    from conftest import fit_gated_run

    gated = fit_gated_run(shared_data, tmp_path / "gated", 96)
    profile = adapt_site(gated / "best.pt", site, "G", tmp_path / "g", "cpu", LOOSE)
    assert profile.adapted
    films = [load_xray(p) for p in sorted(site.rglob("*.jp*g"))[:6]]
    plain = Predictor.from_checkpoint(gated / "best.pt", device="cpu", backend="torch")
    adapted = Predictor.from_checkpoint(gated / "best.pt", device="cpu", backend="torch", site=tmp_path / "g")
    assert plain.gate.learned and adapted.gate_model is not None
    before, after = plain.predict_batch(films), adapted.predict_batch(films)
    assert len(adapted.gate.ood.reference) == len(plain.gate.ood.reference) + profile.record["gate_reference"]["films"]
    assert adapted.gate.ood.threshold == plain.gate.ood.threshold
    for a, b in zip(before, after, strict=True):
        assert a.gate.view_probs == b.gate.view_probs and b.gate.ood_distance <= a.gate.ood_distance + 1e-6
        assert b.gate.assessable or not a.gate.assessable
    assert any(abs(a.probs["covid"] - b.probs["covid"]) > 1e-3 for a, b in zip(before, after, strict=True))


def test_site_gate_reference_takes_the_site_films_in_and_travels_in_the_profile(tmp_path: Path) -> None:
    from covidxr.model.gate import InputGate, OodModel
    from covidxr.model.site_profile import GATE_FILE, read_gate_reference, site_gate, write_gate_reference

    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 8)) + np.array([10.0] + [0.0] * 7)  # the training films point one way
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    site = rng.normal(size=(20, 8)) + np.array([0.0, 10.0] + [0.0] * 6)  # the site's films another
    site /= np.linalg.norm(site, axis=1, keepdims=True)
    gate = InputGate(ood=OodModel(train.astype(np.float32), k=3, threshold=0.2, alpha=0.05, outer=1.5),
                     unavailable=None)
    entry = write_gate_reference(tmp_path, site)
    (tmp_path / "site.json").write_text(json.dumps({"gate_reference": entry}))
    stored = read_gate_reference(tmp_path)
    assert stored.shape == site.shape and np.allclose(stored, site, atol=1e-3)
    widened = site_gate(gate, stored)
    assert len(widened.ood.reference) == 70 and widened.ood.threshold == gate.ood.threshold
    held_out = rng.normal(size=(10, 8)) + np.array([0.0, 10.0] + [0.0] * 6)  # more films of the site
    assert gate.borderline(held_out).all() and not widened.borderline(held_out).any()
    assert (widened.ood.distance(train) <= gate.ood.distance(train) + 1e-6).all()
    (tmp_path / GATE_FILE).write_bytes(b"changed")
    assert read_gate_reference(tmp_path) is None  # its hash no longer matches site.json


def test_priors_move_the_decision_only_when_asked(run: Path, adapted: Path, site: Path, tmp_path: Path) -> None:
    """By default the estimated priors are recorded, not applied; ``--shift-priors`` adds their log-ratio to the
    calibrated logits (the same estimate either way)."""
    from dataclasses import replace

    plain = read_profile(adapted, file_digest(run / "best.pt")).record
    assert plain["settings"]["shift_priors"] is False and plain["logit_offsets"] == [0.0, 0.0, 0.0]
    shifted = adapt_site(run / "best.pt", site, "Hospital A", tmp_path / "p", "cpu", replace(LOOSE, shift_priors=True))
    record = shifted.record
    assert record["site_priors"] == plain["site_priors"]
    offsets = np.array(record["logit_offsets"])
    assert np.allclose(offsets, np.log(np.array(record["site_priors"]) / np.array(record["source_priors"])))
    assert np.abs(offsets).max() > 1e-3
    film = load_xray(next(site.rglob("*.jp*g")))
    a = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch", site=adapted).predict(film, cam=None)
    b = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch", site=tmp_path / "p").predict(
        film, cam=None)
    expected = np.array([a.probs[c] for c in record["classes"]]) * np.exp(offsets)
    assert np.allclose([b.probs[c] for c in record["classes"]], expected / expected.sum(), atol=1e-5)
    # the flag on the command line
    status = adapt_main(["--checkpoint", str(run / "best.pt"), "--data", str(site), "--site", "Flag",
                         "--out", str(tmp_path / "flag"), "--device", "cpu", "--min-films", "10", "--shift-priors"])
    flagged = json.loads((tmp_path / "flag" / "site.json").read_text())
    assert status in (0, 1) and flagged["settings"]["shift_priors"] is True
    assert np.allclose(flagged["logit_offsets"],
                       np.log(np.array(flagged["site_priors"]) / np.array(flagged["source_priors"])))
