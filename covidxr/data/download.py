"""Download a public dataset and extract it safely: ``python -m covidxr.data fetch covid-chestxray``.

The download fails fast without a network and names the URL, so the archive can be fetched by hand and passed with
``--archive``.
"""

from __future__ import annotations

import os
import urllib.request
import zipfile
from pathlib import Path
from urllib.error import URLError

from tqdm.auto import tqdm

from covidxr.data.sources import find_dataset_root
from covidxr.errors import DatasetError, one_line

COVID_CHESTXRAY_URL = "https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip"


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip archive below ``dest``, refusing members that would land outside it."""
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = (dest / member.filename).resolve()
                if dest != target and dest not in target.parents:
                    raise DatasetError(f"{archive}: refused: member {member.filename!r} would extract outside {dest}")
            zf.extractall(dest)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{archive}: cannot extract ({one_line(exc)})") from exc


def download(url: str, dest_file: Path, timeout: float, progress: bool = False) -> Path:
    """Download ``url`` to ``dest_file`` (via a ``.part`` file), failing fast without a network.

    Raises:
        DatasetError: unreachable URL, HTTP error, timeout or a write error; the message names the URL and says how
            to proceed by hand.
    """
    part = dest_file.with_name(dest_file.name + ".part")
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as fh:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest_file.name, disable=not progress) as bar:
                while block := response.read(1 << 20):
                    fh.write(block)
                    bar.update(len(block))
        os.replace(part, dest_file)
    except (URLError, OSError, TimeoutError, ValueError) as exc:
        part.unlink(missing_ok=True)
        cause = getattr(exc, "reason", None)  # URLError wraps the socket error
        reason = one_line(cause if isinstance(cause, BaseException) else exc)
        raise DatasetError(
            f"cannot download {url} ({reason}); download it manually, unzip it, and run: "
            f"python -m covidxr.data prepare covid-chestxray --src FOLDER --out MANIFEST.csv") from exc
    return dest_file


def fetch_covid_chestxray(dest: str | os.PathLike, url: str = COVID_CHESTXRAY_URL, timeout: float = 10.0,
                          archive: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Download (or take ``archive``) the ieee8023 GitHub zip and extract it below ``dest``.

    A zip already downloaded to ``dest`` by an earlier call is reused.

    Returns:
        The folder that holds ``metadata.csv`` and ``images/``.

    Raises:
        DatasetError: download or extraction failed, or the archive does not hold the dataset.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    if archive is not None:
        zip_path = Path(archive).expanduser()
        if not zip_path.is_file():
            raise DatasetError(f"{zip_path}: archive not found")
    else:
        zip_path = dest / "covid-chestxray-dataset.zip"
        if not zipfile.is_zipfile(zip_path):
            download(url, zip_path, timeout, progress)
    _safe_extract(zip_path, dest)
    return find_dataset_root(dest, lambda d: (d / "metadata.csv").is_file() and (d / "images").is_dir(),
                             f"ieee8023 covid-chestxray-dataset inside {zip_path.name}")
