"""Load a dataset (class-per-folder tree or CSV manifest) into one table with a fixed schema; write manifests.

Schema of the returned DataFrame (one row per image):
    path        absolute path of the image file (str)
    relpath     path relative to the dataset root, used as the stable key in split.csv and reports
    label       class name (str)
    patient_id  patient identifier; images without one get their own id ``"image:<relpath>"``
    source      where the image came from (hospital, repository); "" when unknown
    view        view position (PA, AP, ...); "" when unknown
Any other manifest columns are kept as they are.

Relative paths in a CSV manifest are resolved against the manifest's own folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from covidxr.errors import DatasetError
from covidxr.files import atomic_write_text

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
MANIFEST_NAMES = ("manifest.csv", "metadata.csv")
# Folders that sit beside images in public layouts but hold no radiographs (Kaggle's lung masks).
SKIPPED_DIRS = frozenset({"masks", "mask", "__MACOSX"})
REQUIRED_COLUMNS = ("path", "label")
ENV_VAR = "COVIDXR_DATA"
REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "cxr"
HOW_TO_GET_DATA = "see data/README.md for how to obtain a dataset"


def resolve_data_path(arg: str | os.PathLike | None) -> Path:
    """Return the dataset location: ``arg``, else ``$COVIDXR_DATA``, else ``data/cxr`` in the repository."""
    for candidate, origin in ((arg, "--data"), (os.environ.get(ENV_VAR), f"${ENV_VAR}"), (REPO_DATA, None)):
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.exists():
            return path.resolve()
        if origin is not None:
            raise DatasetError(f"dataset not found: {path} (from {origin}); {HOW_TO_GET_DATA}")
    raise DatasetError(f"no dataset given: pass --data PATH or set {ENV_VAR}; {HOW_TO_GET_DATA}")


def dataset_root(path: Path) -> Path:
    """Return the folder that relative image paths of ``path`` (folder or manifest) are relative to."""
    return path if path.is_dir() else path.parent


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Load a class-per-folder tree or a CSV manifest into the schema described in the module docstring.

    A folder that holds ``manifest.csv`` or ``metadata.csv`` with ``path`` and ``label`` columns is read
    through that file, so patient ids and sources are kept.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}; {HOW_TO_GET_DATA}")
    if path.is_dir():
        for name in MANIFEST_NAMES:
            csv = path / name
            if csv.is_file() and set(REQUIRED_COLUMNS) <= set(pd.read_csv(csv, nrows=0).columns):
                return read_csv_manifest(csv)
        return scan_folder(path)
    return read_csv_manifest(path)


def read_csv_manifest(csv: Path) -> pd.DataFrame:
    """Read a CSV manifest with at least ``path`` and ``label`` columns."""
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{csv}: cannot read manifest ({exc})".replace("\n", " ")) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{csv}: manifest lacks column(s) {', '.join(missing)}; it needs path,label")
    root = csv.parent.resolve()
    df = df[df["path"].str.strip() != ""].copy()
    absolute = [Path(p) if Path(p).is_absolute() else root / p for p in df["path"]]
    df["path"] = [str(p) for p in absolute]
    df["relpath"] = [_relative(p, root) for p in absolute]
    return normalise(df)


def scan_folder(root: Path) -> pd.DataFrame:
    """Find images recursively below one sub-folder per class (``COVID/images/x.png`` is class ``COVID``)."""
    root = root.resolve()
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
            for fname in sorted(filenames):
                file = Path(dirpath) / fname
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append({"path": str(file), "relpath": _relative(file, root), "label": class_dir.name})
    return normalise(pd.DataFrame(rows, columns=["path", "relpath", "label"]))


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Fill the optional schema columns and strip whitespace from labels."""
    df = df.reset_index(drop=True).copy()
    df["label"] = df["label"].astype(str).str.strip()
    for column in ("patient_id", "source", "view"):
        if column not in df.columns:
            df[column] = ""
        df[column] = df[column].fillna("").astype(str).str.strip()
    no_patient = df["patient_id"] == ""
    df.loc[no_patient, "patient_id"] = "image:" + df.loc[no_patient, "relpath"]
    return df


def class_names(df: pd.DataFrame) -> list[str]:
    """Return the sorted class names present in ``df``."""
    return sorted(df["label"].unique().tolist())


def validate_for_training(df: pd.DataFrame, where: str) -> None:
    """Refuse a dataset that cannot train a classifier: empty, one class, or naming files that do not exist."""
    if df.empty:
        raise DatasetError(f"{where}: no images found; {HOW_TO_GET_DATA}")
    classes = class_names(df)
    if len(classes) < 2:
        raise DatasetError(f"{where}: only one class ({classes[0]}); a classifier needs at least two")
    missing = [p for p in df["path"] if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DatasetError(f"{where}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}{more}")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def manifest_path(path: str, folder: Path) -> str:
    """Return ``path`` relative to ``folder`` (POSIX) when it lies below it, else the absolute path."""
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(absolute)


def write_manifest(table: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write ``table`` as a CSV manifest at ``out`` (atomically), with paths relative to its folder when possible.

    Returns:
        The manifest's path.
    """
    out = Path(out).expanduser()
    folder = out.parent if str(out.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    written = table.assign(path=[manifest_path(p, folder) for p in table["path"]])
    atomic_write_text(out, written.to_csv(index=False))
    return out
