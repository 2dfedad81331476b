"""Privacy: a DICOM's patient details never reach the page, the logs, the audit log or the disk.

The probe is a real chest X-ray written as a 12-bit MONOCHROME2 DX DICOM whose header holds a distinctive patient
name, ID, birth date, institution and referring physician, with fresh UIDs and random low bits in the pixels (so
its pixel bytes and UIDs exist nowhere else). Its file name holds none of them.

* Through the real server (``streamlit run``, stdout and stderr captured, no file watcher) in headless Chromium:
  the result and the DICOM header table are shown; then the identifiers are searched, also case-insensitively and
  with ``^`` as a space, in the page (HTML and visible text), every websocket frame the server sent, the result
  JSON and CSV downloads, the server's stdout and stderr, the audit log, the run folder, Streamlit's folders
  (``~/.streamlit``, ``.streamlit`` of the server's working folder) and every file created or changed during the
  test under the server's working folder, the temp folder, ``~/.cache`` and ``~/.streamlit``. The same changed files
  are searched for the upload's UIDs and pixel bytes: the upload is never written to disk.
* ``python -m covidxr.predict`` on the probe: its stdout, stderr, ``predictions.csv``, overlay and every file
  created or changed meanwhile (same folders, plus its working folder) hold no identifier, UID or pixel bytes.

Changed files are found by comparing listings (path, size, modification time, inode) taken before and after (and,
for the server, also while it runs with the page open, so files a browser or server removes on exit are seen).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import stat
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_server import CHROMIUM, CHROMIUM_ARGS, RESULT_TIMEOUT_MS, AppServer, require_chromium, run_app
from PIL import Image

from covidxr.images.dicom import DICOM_HEADER_FIELDS
from covidxr.images.reader import load_xray
from covidxr.inference.prediction_log import read_records

REPO = Path(__file__).resolve().parents[1]


def random_word(length: int = 14) -> str:
    """A fresh random word: long enough never to occur by chance in image bytes or cache files (a five-letter probe
    such as ``zyxwv`` did: a descending run of pixel values)."""
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(length)).capitalize()


PATIENT_NAME = f"{random_word()}^{random_word()}"
PATIENT_ID = f"PID-{secrets.randbelow(10**12):012d}-{random_word(6).upper()}"
BIRTH_DATE = f"19{secrets.randbelow(10**2):02d}0{1 + secrets.randbelow(9)}{10 + secrets.randbelow(18)}"
INSTITUTION = f"{random_word()} {random_word()} Infirmary"
PHYSICIAN = f"{random_word()}^{random_word()}"

PROBE_NAME = "privacy_probe.dcm"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CHUNK = 8 * 2**20


@dataclass(frozen=True)
class Probe:
    """The probe DICOM and what must not leak from it.

    Attributes:
        path: the file (in a folder of its own, left out of the searches).
        identifiers: lower-case byte strings of the patient details (and their variants).
        upload_marks: the upload's UIDs and windows of its pixel bytes (proof of a copy of the file).
    """

    path: Path
    identifiers: tuple[bytes, ...]
    upload_marks: tuple[bytes, ...]


def identifier_variants() -> tuple[bytes, ...]:
    """The patient details as searched: as stored, ``^`` as space, each name part; lower case, UTF-8 and UTF-16."""
    texts = {PATIENT_NAME, PATIENT_NAME.replace("^", " "), PATIENT_ID, BIRTH_DATE, INSTITUTION, PHYSICIAN,
             PHYSICIAN.replace("^", " "), *re.split(r"[\^ ]", PATIENT_NAME), *re.split(r"[\^ ]", PHYSICIAN),
             *INSTITUTION.split()[:2], PATIENT_ID.removeprefix("PID-")}
    lowered = sorted({t.lower() for t in texts})
    return tuple(t.encode() for t in lowered) + tuple(t.encode("utf-16-le") for t in lowered if len(t) >= 5)


@pytest.fixture
def probe(shared_data: Path, tmp_path: Path) -> Probe:
    """Write the probe DICOM from a real X-ray of the shared data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = pd.read_csv(shared_data / "metadata.csv", dtype=str, keep_default_na=False)
    source = load_xray(shared_data / meta[meta["label"] == "pneumonia"]["path"].iloc[0])
    image = Image.fromarray(np.round(source.pixels * 255).astype(np.uint8)).resize((512, 512), Image.BILINEAR)
    rng = np.random.default_rng(secrets.randbits(64))
    pixels = np.clip(np.asarray(image, dtype=np.uint16) * 15 + rng.integers(0, 64, (512, 512)), 0, 4095)
    pixel_bytes = pixels.astype("<u2").tobytes()

    sop_uid, study_uid, series_uid = generate_uid(), generate_uid(), generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.InstitutionName, ds.ReferringPhysicianName = INSTITUTION, PHYSICIAN
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined, ds.Manufacturer = "DX", "PA", "CHEST", "Generic"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 512, 512, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixel_bytes
    folder = tmp_path / "input"
    folder.mkdir()
    path = folder / PROBE_NAME
    ds.save_as(path, enforce_file_format=True)

    windows = tuple(pixel_bytes[o : o + 64] for o in range(4096, len(pixel_bytes) - 64, len(pixel_bytes) // 5))
    made = Probe(path, identifier_variants(), (sop_uid.encode(), study_uid.encode(), series_uid.encode(), *windows))
    # positive control: the search finds everything in the probe itself
    content = path.read_bytes().lower()
    for text in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, INSTITUTION, PHYSICIAN):
        assert text.lower().encode() in content
    assert all(mark.lower() in content for mark in made.upload_marks)
    assert not any(n in PROBE_NAME.encode() for n in made.identifiers)
    xray = load_xray(path)
    assert xray.format == "DICOM" and xray.pixels.shape == (512, 512)
    return made


# ----------------------------------------------------------------------------------------------- searching


def files_under(root: Path, skip: Iterable[Path] = ()) -> dict[Path, tuple[int, int, int]]:
    """Regular files under ``root`` (not following links): path -> (size, mtime_ns, inode)."""
    skipped = {p.resolve() for p in skip}
    found: dict[Path, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).resolve() not in skipped]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[path] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return found


def listing(roots: Iterable[Path], skip: Iterable[Path]) -> dict[Path, tuple[int, int, int]]:
    """Regular files under all existing ``roots``."""
    found: dict[Path, tuple[int, int, int]] = {}
    for root in roots:
        if root.is_dir():
            found |= files_under(root, skip)
    return found


def changed(before: dict[Path, tuple[int, int, int]], after: dict[Path, tuple[int, int, int]]) -> list[Path]:
    """Files that are new or changed in ``after``."""
    return sorted(p for p, key in after.items() if before.get(p) != key)


def search_bytes(data: bytes, needles: Iterable[bytes]) -> set[bytes]:
    """The needles found in ``data``, case-insensitively."""
    lowered = data.lower()
    return {n for n in needles if n.lower() in lowered}


def search_file(path: Path, needles: tuple[bytes, ...]) -> set[bytes]:
    """The needles found in a file (read in chunks that overlap by the longest needle); a vanished file has none."""
    overlap = max(map(len, needles)) - 1
    found: set[bytes] = set()
    try:
        with path.open("rb") as handle:
            tail = b""
            while chunk := handle.read(CHUNK):
                found |= search_bytes(tail + chunk, needles)
                tail = chunk[-overlap:]
    except OSError:
        pass
    return found


def describe(found: Iterable[bytes]) -> list[str]:
    """Printable names of found needles (pixel windows are not printable)."""
    names = set()
    for needle in found:
        text, wide = needle.decode("utf-8", errors="replace"), needle.decode("utf-16-le", errors="replace")
        if text.isprintable():
            names.add(text)
        elif needle[1:2] == b"\0" and wide.isprintable():
            names.add(f"{wide} (UTF-16)")
        else:
            names.add(f"pixel data ({len(needle)} bytes)")
    return sorted(names)


def leaks(paths: Iterable[Path], needles: tuple[bytes, ...]) -> dict[str, list[str]]:
    """``{file: [needles found]}`` for the files that hold any needle."""
    hits = {}
    for path in paths:
        found = search_file(path, needles)
        if found:
            hits[str(path)] = describe(found)
    return hits


def watched_roots(*extra: Path) -> list[Path]:
    """Folders whose new or changed files are searched: the temp folder, ~/.cache, ~/.streamlit, and ``extra``."""
    home = Path.home()
    return [Path(tempfile.gettempdir()), home / ".cache", home / ".streamlit", *extra]


def all_files(roots: Iterable[Path]) -> list[Path]:
    """Every regular file under the roots that exist (searched whole, whatever their age)."""
    return list(listing(roots, ()))


# ----------------------------------------------------------------------------------------------- the app


def use_app(server: AppServer, probe: Probe, downloads: Path, while_open: Callable[[], None]) -> dict[str, bytes]:
    """Upload the probe in headless Chromium and wait for its result; call ``while_open`` with the page still open.

    Returns:
        What the browser got from the server: page HTML and text, header table, downloads, websocket frames.
    """
    from playwright.sync_api import expect, sync_playwright

    frames: list[bytes] = []
    seen: dict[str, bytes] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
            context.set_default_timeout(RESULT_TIMEOUT_MS)
            page = context.new_page()
            page.on("websocket", lambda ws: ws.on(
                "framereceived", lambda payload: frames.append(payload if isinstance(payload, bytes)
                                                               else payload.encode())))
            page.goto(server.url)
            file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")
            expect(file_input).to_be_attached(timeout=RESULT_TIMEOUT_MS)
            file_input.set_input_files([probe.path])
            expect(page.get_by_text(f"File: {PROBE_NAME}", exact=True)).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(page.get_by_role("heading", name=re.compile("^COVID: "))).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            table = page.locator("[data-testid='stTable']", has_text="PhotometricInterpretation")
            expect(table).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(page.get_by_role("button", name="Download result (JSON)")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)
            seen["header table"] = table.inner_text().encode()
            for label, key in (("Download result (JSON)", "result JSON"), ("Download all results as CSV", "CSV")):
                with page.expect_download(timeout=RESULT_TIMEOUT_MS) as info:
                    page.get_by_role("button", name=re.compile("^" + re.escape(label))).click()
                info.value.save_as(downloads / key.replace(" ", "_"))
                seen[key] = (downloads / key.replace(" ", "_")).read_bytes()
            seen["page HTML"] = page.content().encode()
            seen["page text"] = page.inner_text("body").encode()
            while_open()
        finally:
            seen["websocket frames"] = b"\n".join(frames)
            browser.close()
    return seen


@pytest.mark.browser
def test_dicom_identifiers_reach_neither_page_nor_logs_nor_disk(probe: Probe, tiny_run: Path,
                                                                  tmp_path: Path) -> None:
    require_chromium()
    psutil = pytest.importorskip("psutil")
    server_folder, downloads = tmp_path / "server", tmp_path / "downloads"
    server_folder.mkdir()
    downloads.mkdir()
    skip = [probe.path.parent]
    before = listing(watched_roots(REPO), skip)
    with run_app(tiny_run / "best.pt", server_folder) as server:
        cwd = Path(psutil.Process(server.process.pid).cwd())
        during: list[Path] = []
        seen = use_app(server, probe, downloads,
                       lambda: during.extend(changed(before, listing(watched_roots(REPO, cwd), skip))))
        hits_during = leaks(during, probe.identifiers + probe.upload_marks)
    after = changed(before, listing(watched_roots(REPO, cwd), skip))

    # the page did show the result and the technical header fields
    text = seen["page text"].decode()
    assert re.search(r"^COVID: (yes|no)", text, re.MULTILINE) and PROBE_NAME in text
    for field, value in (("Modality", "DX"), ("ViewPosition", "PA"), ("PhotometricInterpretation", "MONOCHROME2")):
        assert re.search(rf"{field}\s+{value}", seen["header table"].decode()), seen["header table"]
    result = json.loads(seen["result JSON"])
    assert set(result["image"]["dicom_header"]) <= set(DICOM_HEADER_FIELDS)
    assert [row["file"] for row in csv.DictReader(io.StringIO(seen["CSV"].decode()))] == [PROBE_NAME]
    records = read_records(server.audit)
    assert len(records) == 1 and records[0]["image_format"] == "DICOM"
    assert len(seen["websocket frames"]) > 1000 and server.stdout.is_file() and server.stderr.is_file()

    assert search_bytes(seen["websocket frames"], [PROBE_NAME.encode()])  # the search does see the frames
    problems = {f"browser: {what}": describe(found)
                for what, data in seen.items() if (found := search_bytes(data, probe.identifiers))}
    fixed = [server.stdout, server.stderr, server.audit, *all_files([tiny_run, Path.home() / ".streamlit",
                                                                     cwd / ".streamlit"])]
    problems |= leaks(fixed, probe.identifiers)
    problems |= hits_during
    problems |= leaks(after, probe.identifiers + probe.upload_marks)
    print(f"\nsearched: {len(seen)} browser captures, {len(fixed)} server/run/streamlit files, "
          f"{len(set(during) | set(after))} files created or changed during the test")
    assert not problems, f"patient details or upload content found: {problems}"


# ----------------------------------------------------------------------------------------------- the CLI


def test_predict_cli_writes_no_identifiers(probe: Probe, tiny_run: Path, tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "predictions"
    work.mkdir()
    skip = [probe.path.parent]
    roots = watched_roots(REPO, work)
    before = listing(roots, skip)
    command = [sys.executable, "-m", "covidxr.predict", "--checkpoint", str(tiny_run / "best.pt"), str(probe.path),
               "--out", str(out), "--cam", "gradcam"]
    proc = subprocess.run(command, cwd=work, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    after = changed(before, listing(roots, skip))

    rows = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))
    assert len(rows) == 1 and rows[0]["path"] == str(probe.path) and rows[0]["predicted"]
    assert (out / rows[0]["overlay"]).read_bytes().startswith(b"\x89PNG")

    assert search_bytes(proc.stdout, [PROBE_NAME.encode()])  # it reports the file by its name
    problems = {f"CLI {name}": describe(found)
                for name, data in (("stdout", proc.stdout), ("stderr", proc.stderr))
                if (found := search_bytes(data, probe.identifiers))}
    problems |= leaks(all_files([out]), probe.identifiers + probe.upload_marks)
    problems |= leaks(after, probe.identifiers + probe.upload_marks)
    print(f"\nsearched: CLI stdout and stderr, {len(all_files([out]))} output files, "
          f"{len(after)} files created or changed during the run")
    assert not problems, f"patient details or upload content found: {problems}"
