"""Decode-once cache: ``python -m covidxr.prepare``, reuse, and invalidation by file change and reader version."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidxr.data import cache
from covidxr.data.cache import fill_cache
from covidxr.data.loaders import LoaderSettings, input_pipeline
from covidxr.data.manifest import load_manifest
from covidxr.preprocessing.settings import InputSettings
from covidxr.preprocessing.transforms import cache_size
from covidxr.training import cache_command as prepare_cli


def _png(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full(size[::-1], value, dtype=np.uint8)
    pixels[::3] = 255 - value  # some structure, so that a resize is visible
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for label in ("covid", "normal"):
        for i in range(3):
            _png(tmp_path / "data" / label / f"{label}-{i}.png", 20 * i + (100 if label == "covid" else 0))
    return tmp_path / "data"


def _entries(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.glob("*.npy")}


def test_prepare_cli_fills_the_cache_then_reuses_it(folder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    cache_dir = tmp_path / "cache"
    args = ["--data", str(folder), "--img-size", "56", "--cache-dir", str(cache_dir), "--workers", "2"]
    assert prepare_cli.main(args) == 0
    assert "6 decoded, 0 already prepared, 0 unreadable" in capsys.readouterr().out
    assert len(_entries(cache_dir)) == 6
    assert prepare_cli.main(args) == 0
    assert "0 decoded, 6 already prepared" in capsys.readouterr().out
    assert len(_entries(cache_dir)) == 6


def test_prepare_cli_fills_the_cache_of_the_input_pipeline_training_reads(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache_dir = tmp_path / "cache"
    args = ["--data", str(folder), "--img-size", "56", "--cache-dir", str(cache_dir), "--workers", "0"]
    assert prepare_cli.main([*args, "--equalize", "clahe"]) == 0
    assert "(eq=clahe)" in capsys.readouterr().out
    settings = LoaderSettings(data=str(folder), img_size=56, cache_dir=str(cache_dir), workers=0,
                              preprocessing=InputSettings(equalize="clahe"))
    table = load_manifest(folder)
    filled = fill_cache(table["path"].tolist(), cache_size(56), cache_dir, pipeline=input_pipeline(settings),
                        progress=False)
    assert filled.reused == 6  # training with --equalize clahe decodes nothing again
    assert prepare_cli.main(args) == 0 and "6 decoded" in capsys.readouterr().out  # the plain squares are others


def test_prepare_cli_exit_statuses(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--data", str(folder), "--cache-dir", str(tmp_path / "cache"), "--workers", "0"]
    (folder / "covid" / "broken.png").write_bytes(b"not a png")
    assert prepare_cli.main(args) == 1  # done, one input failed
    assert "1 unreadable" in capsys.readouterr().out
    lungs = tmp_path / "no-lungs.pt"
    assert prepare_cli.main([*args, "--lung-crop", "--lung-model", str(lungs)]) == 2
    assert capsys.readouterr().err.strip() == f"covidxr.prepare: error: no lung model at {lungs}: run python -m " \
                                              "covidxr.lungs train"


def test_prepare_cli_reports_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prepare_cli.main(["--data", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("covidxr.prepare: error: dataset not found")


def test_touched_or_rewritten_file_is_prepared_again(folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    path = folder / "covid" / "covid-0.png"
    first = fill_cache([str(path)], 32, cache_dir)
    before = _entries(cache_dir)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # touch
    again = fill_cache([str(path)], 32, cache_dir)
    assert again.reused == 0 and len(_entries(cache_dir)) == 2
    np.testing.assert_array_equal(again.images[0], first.images[0])
    _png(path, 200)  # new content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 4_000_000_000))
    changed = fill_cache([str(path)], 32, cache_dir)
    assert changed.reused == 0 and len(_entries(cache_dir) - before) == 2
    assert not np.array_equal(changed.images[0], first.images[0])
    assert fill_cache([str(path)], 32, cache_dir).reused == 1


def test_new_reader_version_prepares_again_in_worker_processes(folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    paths = [str(p) for p in sorted(folder.rglob("*.png"))]
    assert fill_cache(paths, 32, cache_dir, workers=2).reused == 0
    assert fill_cache(paths, 32, cache_dir, workers=2).reused == 6
    monkeypatch.setattr(cache, "READER_VERSION", cache.READER_VERSION + "-next")
    assert fill_cache(paths, 32, cache_dir, workers=2).reused == 0
    assert len(_entries(cache_dir)) == 12


def test_damaged_entry_is_prepared_again(folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    path = str(folder / "normal" / "normal-1.png")
    good = fill_cache([path], 32, cache_dir).images[0]
    entry = cache_dir / f"{cache.cache_key(path, 32)}.npy"
    entry.write_bytes(b"not numpy")
    again = fill_cache([path], 32, cache_dir)
    assert again.reused == 0 and not again.failures
    np.testing.assert_array_equal(again.images[0], good)


def test_fill_cache_without_keeping_images_fills_the_same_entries(folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    paths = [str(p) for p in sorted(folder.rglob("*.png"))]
    filled = fill_cache(paths, 32, cache_dir, keep_images=False)
    assert filled.images == [None] * 6 and filled.reused == 0 and not filled.failures
    kept = fill_cache(paths, 32, cache_dir)
    assert kept.reused == 6 and all(img.shape == (32, 32) for img in kept.images)
    entry = cache_dir / f"{cache.cache_key(paths[0], 32)}.npy"
    entry.write_bytes(entry.read_bytes()[:40])  # truncated: found damaged without reading the pixels
    again = fill_cache(paths, 32, cache_dir, keep_images=False)
    assert again.reused == 5 and not again.failures
