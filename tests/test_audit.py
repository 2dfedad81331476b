"""Dataset audit: planted duplicates and odd images are found, the shared data's confounding is reported, and the
source probe runs on a tiny random-init model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxr.bench.scale_data import load_films, variant
from covidxr.data.__main__ import main
from covidxr.data.audit import audit, inspect_images
from covidxr.data.audit_report import html_report, markdown_report, report_blocks, write_report
from covidxr.data.confounding import confounding_warnings
from covidxr.data.duplicates import close_pairs, dhash, hash_bits
from covidxr.data.manifest import load_manifest
from covidxr.model.checkpoint import save_checkpoint
from covidxr.networks.architectures import build_model
from covidxr.preprocessing.transforms import Preprocess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cxr_data() -> Path:
    """The shared chest X-rays: $COVIDXR_DATA, else ../shared/data/cxr beside the checkout."""
    path = Path(os.environ.get("COVIDXR_DATA") or REPO.parent / "shared" / "data" / "cxr")
    if not (path / "metadata.csv").is_file():
        pytest.fail(f"shared chest X-ray data not found at {path}: set COVIDXR_DATA (see data/README.md)")
    return path


def shared_meta(data: Path) -> pd.DataFrame:
    return pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)


def kermany_source(meta: pd.DataFrame) -> str:
    """The ``source`` value of the Kermany (pediatric) images, whatever the repository is called."""
    (source,) = meta.loc[meta["patient_id"].str.startswith("kermany-"), "source"].unique()
    return source


# ------------------------------------------------------------------------------------------- confounding (cheap)


def table_of(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """Build a manifest-like table from (label, source, count) triples."""
    return pd.DataFrame([{"label": label, "source": source} for label, source, n in rows for _ in range(n)])


def test_confounding_warnings_dominant_class_and_single_class_source() -> None:
    warnings = confounding_warnings(table_of([("covid", "siteA", 10), ("normal", "siteB", 8), ("normal", "siteA", 2),
                                              ("pneumonia", "siteB", 5), ("pneumonia", "siteA", 5)]))
    assert any("'covid'" in w and "10 of 10" in w and "'siteA'" in w for w in warnings)
    assert any("'normal'" in w and "80%" in w and "'siteB'" in w for w in warnings)
    assert not any("'pneumonia'" in w for w in warnings)
    warnings = confounding_warnings(table_of([("covid", "siteA", 5), ("covid", "siteB", 5), ("normal", "siteB", 5),
                                              ("normal", "siteC", 5)]))
    assert warnings == ["source 'siteA' contributes only class 'covid' (5 images): the source alone predicts the label",
                        "source 'siteC' contributes only class 'normal' (5 images): the source alone predicts the "
                        "label"]


def test_confounding_warnings_quiet_when_balanced_or_single_source() -> None:
    assert confounding_warnings(table_of([("covid", "a", 5), ("covid", "b", 4), ("normal", "a", 4),
                                          ("normal", "b", 5)])) == []
    assert confounding_warnings(table_of([("covid", "a", 5), ("normal", "a", 5)])) == []
    assert confounding_warnings(table_of([("covid", "", 5), ("normal", "", 5)])) == [
        "no image has a source: confounding between class and source cannot be checked"]
    assert confounding_warnings(pd.DataFrame({"label": ["covid", "normal"]}))[0].startswith("no image has a source")


# ------------------------------------------------------------------------------------------------- hashing


def pairwise_close_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 256) -> list[tuple[int, int, int]]:
    """The reference: every pair compared (the audit's search before multi-index hashing)."""
    if len(hashes) < 2:
        return []
    packed = np.packbits(hashes.astype(bool), axis=1)
    pad = (-packed.shape[1]) % 8
    words = np.pad(packed, ((0, 0), (0, pad))).view(np.uint64)
    pairs = []
    for start in range(0, len(words), chunk):
        block = words[start : start + chunk]
        dist = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(axis=2)
        rows, cols = np.nonzero(dist <= max_distance)
        glob = rows + start
        keep = cols > glob
        pairs.extend(zip(glob[keep].tolist(), cols[keep].tolist(), dist[rows[keep], cols[keep]].tolist(),
                         strict=True))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


def test_close_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.random((70, 256)) < 0.5
    hashes[5] = hashes[3]
    hashes[9] = hashes[3]
    hashes[9, :7] ^= True
    assert close_pairs(hashes, 10) == [(3, 5, 0), (3, 9, 7), (5, 9, 7)]


def planted_hashes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    """Random hashes, a few skewed (many equal chunks), with clusters of copies at 0 to 16 flipped bits."""
    hashes = rng.random((n, bits)) < rng.uniform(0.1, 0.5, (n, 1))
    for _ in range(n // 10):
        source, copies = rng.integers(0, n), rng.integers(0, n, int(rng.integers(1, 5)))
        hashes[copies] = hashes[source]
        for row in copies:
            hashes[row, rng.choice(bits, min(bits, int(rng.integers(0, 17))), replace=False)] ^= True
    return hashes


@pytest.mark.parametrize("bits", [1, 13, 64, 256])
def test_indexed_search_equals_pairwise_search_on_planted_near_duplicates(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (0, 1, 2, 40, 300):
        hashes = planted_hashes(rng, n, bits)
        for max_distance in (-1, 0, 1, 5, 12, 20, bits - 1, bits, bits + 3):
            assert close_pairs(hashes, max_distance) == pairwise_close_pairs(hashes, max_distance), (n, max_distance)


def test_indexed_search_equals_pairwise_search_on_real_looking_variants(cxr_data: Path) -> None:
    """Re-encoded crops and contrast changes of real films (the scale benchmark's files): many true near pairs."""
    films = load_films(cxr_data.parent, 256, limit=12)
    hashes = np.stack([dhash(np.asarray(variant(film, np.random.default_rng([f, v])), dtype=np.float32) / 255)
                       for f, film in enumerate(films) for v in range(6)])
    near_pairs = {}
    for max_distance in (8, 12, 20, 30):
        near_pairs[max_distance] = close_pairs(hashes, max_distance)
        assert near_pairs[max_distance] == pairwise_close_pairs(hashes, max_distance)
    assert any(i // 6 == j // 6 for i, j, _ in near_pairs[30])  # variants of one film do come close


def test_dhash_stable_under_rescaling() -> None:
    y, x = np.mgrid[0:300, 0:240]
    image = (0.5 + 0.25 * np.sin(x / 23.0) * np.cos(y / 31.0) + 0.2 * (x / 240.0)).astype(np.float32)
    half = np.asarray(Image.fromarray(image, mode="F").resize((120, 150), Image.Resampling.BILINEAR))
    assert dhash(image).shape == (256,)
    assert (dhash(image) != dhash(half)).sum() <= 4
    assert (dhash(image) != dhash(image[:, ::-1])).sum() > 64


# ------------------------------------------------------------------------------------------------ planted


@pytest.fixture()
def planted(cxr_data: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A manifest of six real images (train) plus planted copies and odd images (test), and its split.csv."""
    meta = shared_meta(cxr_data)
    large_enough = meta[(meta["width"].astype(int) >= 600) & (meta["height"].astype(int) >= 600)]
    small = large_enough.assign(size=meta["bytes"].astype(int)).sort_values("size").groupby("label").head(2)
    rows = [{"path": str(cxr_data / r.path), "label": r.label, "patient_id": r.patient_id, "source": r.source,
             "view": r.view, "split": "train"} for r in small.itertuples()]
    originals = [Path(r["path"]) for r in rows]
    planted_dir = tmp_path / "planted"
    planted_dir.mkdir()
    exact = planted_dir / f"exact_copy{originals[0].suffix}"
    shutil.copyfile(originals[0], exact)
    near = planted_dir / "near_copy.jpg"
    with Image.open(originals[3]) as im:
        im.convert("L").resize((im.width * 3 // 5, im.height * 3 // 5), Image.Resampling.LANCZOS).save(near, quality=85)
    colour = planted_dir / "colour.png"
    rgb = np.zeros((300, 300, 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, 300, dtype=np.uint8)
    rgb[..., 2] = 80
    Image.fromarray(rgb).save(colour)
    tiny = planted_dir / "tiny.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 100), dtype=np.uint8)).save(tiny)
    lateral = planted_dir / "lateral.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (400, 300), dtype=np.uint8)).save(lateral)
    rows += [
        {"path": str(exact), "label": "normal", "patient_id": "planted-1", "source": "elsewhere", "view": "PA"},
        {"path": str(near), "label": rows[3]["label"], "patient_id": "planted-2", "source": "elsewhere", "view": "PA"},
        {"path": str(colour), "label": "covid", "patient_id": "planted-3", "source": "elsewhere", "view": "PA"},
        {"path": str(tiny), "label": "covid", "patient_id": "planted-4", "source": "elsewhere", "view": "AP"},
        {"path": str(lateral), "label": "covid", "patient_id": "planted-5", "source": "elsewhere", "view": "L"},
    ]
    for row in rows[len(originals):]:
        row["split"] = "test"
    manifest = tmp_path / "manifest.csv"
    frame = pd.DataFrame(rows)
    frame.drop(columns="split").to_csv(manifest, index=False)
    table = load_manifest(manifest)
    split_csv = tmp_path / "split.csv"
    table.assign(split=frame["split"].to_numpy())[["relpath", "label", "patient_id", "split"]].to_csv(split_csv,
                                                                                                    index=False)
    names = {"original0": table["relpath"][0], "original3": table["relpath"][3], "exact": table["relpath"][6],
             "near": table["relpath"][7], "colour": table["relpath"][8], "tiny": table["relpath"][9],
             "lateral": table["relpath"][10]}
    return manifest, split_csv, names


def relpaths(entry: dict[str, Any]) -> set[str]:
    return {image["relpath"] for image in entry["images"]}


def test_planted_duplicates_and_odd_images_are_found(planted: tuple[Path, Path, dict[str, str]]) -> None:
    manifest, split_csv, names = planted
    result = audit(load_manifest(manifest), split_csv)
    (group,) = result["exact_duplicates"]["groups"]
    assert relpaths(group) == {names["original0"], names["exact"]}
    assert group["cross_split"] and group["cross_source"] and group["cross_patient_id"]
    pairs = result["near_duplicates"]["pairs"]
    assert [relpaths(p) for p in pairs] == [{names["original3"], names["near"]}]
    assert pairs[0]["cross_split"] and pairs[0]["distance"] <= result["settings"]["near_duplicate_bits"]
    assert result["near_duplicates"]["summary"]["cross_split"] == 1
    odd = {kind: {r["relpath"] for r in rows} for kind, rows in result["suspicious"].items()}
    assert names["colour"] in odd["color"] and names["original0"] not in odd["color"]
    assert odd["tiny"] == {names["tiny"]}
    assert odd["view"] == {names["lateral"]} and odd["unreadable"] == set()
    by_split = pd.DataFrame(result["counts"]["class_by_split"]).sum(axis=1).to_dict()
    assert by_split == {"test": 5, "train": 6}
    markdown = markdown_report(report_blocks(result))
    assert "## Near duplicates" in markdown and names["near"] in markdown


def test_cli_audit_writes_html_and_json(planted: tuple[Path, Path, dict[str, str]], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    manifest, split_csv, names = planted
    out = tmp_path / "report"
    assert main(["audit", str(manifest), "--split", str(split_csv), "--out", str(out), "--format", "html"]) == 0
    printed = capsys.readouterr().out
    assert "exact duplicates 1 (across splits 1)" in printed and "near duplicates 1 (across splits 1)" in printed
    page = (out / "audit.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Exact duplicates" in page and "<table" in page
    saved = json.loads((out / "audit.json").read_text())
    assert saved["exact_duplicates"]["summary"]["total"] == 1


def test_cli_audit_missing_split_entry_is_one_line_error(planted: tuple[Path, Path, dict[str, str]],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest, split_csv, _ = planted
    bad = tmp_path / "bad_split.csv"
    pd.concat([pd.read_csv(split_csv), pd.DataFrame([{"relpath": "gone.png", "split": "test"}])]).to_csv(bad)
    assert main(["audit", str(manifest), "--split", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covidxr.data: error: ") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ shared data


@pytest.fixture(scope="module")
def shared_audit(cxr_data: Path) -> dict[str, Any]:
    return audit(load_manifest(cxr_data))


def test_cxr_data_audit_finds_what_the_readme_says(shared_audit: dict[str, Any], cxr_data: Path,
                                                      tmp_path: Path) -> None:
    meta = shared_meta(cxr_data)
    (covid_source,) = meta.loc[meta["label"] == "covid", "source"].unique()
    kermany = kermany_source(meta)
    warnings = shared_audit["confounding"]
    assert any(f"class 'covid': 152 of 152 images (100%) come from source '{covid_source}'" in w for w in warnings)
    assert any(f"class 'normal': 72 of 80 images (90%) come from source '{kermany}'" in w for w in warnings)
    assert not any("'pneumonia'" in w for w in warnings)
    assert confounding_warnings(load_manifest(cxr_data)) == warnings
    assert shared_audit["counts"]["by_class"] == {"covid": 152, "normal": 80, "pneumonia": 170}
    assert shared_audit["patients"]["n_patients"] == 366
    assert shared_audit["patients"]["per_class"] == {"covid": 152, "normal": 79, "pneumonia": 135}
    assert shared_audit["exact_duplicates"]["summary"]["total"] == 0  # identical files were merged upstream
    assert shared_audit["suspicious"]["unreadable"] == []
    report = write_report(shared_audit, tmp_path, "md")
    assert "class 'covid': 152 of 152" in report.read_text()
    assert "152 of 152" in html_report(report_blocks(shared_audit))


def test_indexed_search_equals_pairwise_search_on_the_shared_data(cxr_data: Path) -> None:
    facts = inspect_images(load_manifest(cxr_data)["path"].tolist())
    hashes = np.stack([hash_bits(h) for h in facts["hash"]])
    assert len(hashes) == 402
    for max_distance in (12, 19, 24, 32):
        found = close_pairs(hashes, max_distance)
        assert found == pairwise_close_pairs(hashes, max_distance)
    assert close_pairs(hashes, 18) == [] and close_pairs(hashes, 32)  # nothing within 18 bits (module docstring)


# ------------------------------------------------------------------------------------------------------ probe


def test_source_probe_on_tiny_model(cxr_data: Path, tmp_path: Path) -> None:
    meta = shared_meta(cxr_data)
    meta["origin"] = meta["patient_id"].str.split("-").str[0]
    picks = {("pneumonia", "ieee8023"): 10, ("pneumonia", "kermany"): 10, ("normal", "ieee8023"): 8,
             ("normal", "kermany"): 12}
    subset = pd.concat([meta[(meta["label"] == label) & (meta["origin"] == origin)].head(n)
                        for (label, origin), n in picks.items()])
    subset = subset.assign(path=[str(cxr_data / p) for p in subset["path"]])
    manifest = tmp_path / "probe.csv"
    subset.to_csv(manifest, index=False)
    model = build_model("resnet18", 2, "none")
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, {"arch": "resnet18", "classes": ["normal", "pneumonia"],
                           "preprocess": Preprocess(img_size=64).to_dict(), "model": model.state_dict()})
    result = audit(load_manifest(manifest), probe=ckpt)
    probe = result["probe"]
    assert probe["img_size"] == 64 and probe["n_features"] == 512 and probe["unreadable"] == 0
    assert 0.0 <= probe["overall"]["auc"] <= 1.0 and probe["overall"]["n_images"] == 40
    assert set(probe["per_class"]) == {"normal", "pneumonia"}
    for scope in probe["per_class"].values():
        assert 0.0 <= scope["auc"] <= 1.0 and scope["folds"] >= 2
    assert "Source probe" in markdown_report(report_blocks(result))
