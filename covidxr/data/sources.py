"""Adapters that turn public chest X-ray datasets into covidxr manifests, keeping where every image came from.

Every adapter reads a dataset in its published layout and returns a table that ``manifest.write_manifest`` saves
as a CSV manifest readable by ``manifest.load_manifest``. Columns, in this order:

    path            image file: relative to the manifest's folder when the image lies below it, else absolute
    label           class used for training (``covid``, ``normal``, ``pneumonia`` by default)
    patient_id      patient identifier, prefixed by the dataset (``ieee8023-12``, ``covidx-cohen-3``)
    source          where the image originally came from (short name, see ``mapping.source_from_url``)
    view            view position (``PA``, ``AP``, ``AP Supine``, ...); empty when the dataset does not say
    patient_id_kind ``patient`` when the dataset gives patient ids; ``image`` when it does not and every image
                    was made its own patient (then patient-grouped splits cannot prevent a patient from appearing
                    in two splits)
    original_label  the dataset's own label (folder name, finding, class column) before any mapping
    ...             dataset-specific extras: ``finding``, ``age``, ``sex``, ``url``, ``license``, ``split``, ...

Adapters (``ADAPTERS``):

* ``kaggle-radiography``: the Kaggle "COVID-19 Radiography Database" (Chowdhury et al., Rahman et al.). Class
  folders ``COVID``, ``Normal``, ``Lung_Opacity`` and ``Viral Pneumonia`` with ``images/`` (and ``masks/``,
  ignored), plus ``<class>.metadata.xlsx`` sheets (``FILE NAME, FORMAT, SIZE, URL``; ``.csv`` copies are accepted
  too). The URL names the original collection and becomes ``source`` (:func:`source_from_url`). The release has
  no patient ids: each image is its own patient (``patient_id_kind=image``). Default classes: ``COVID`` -> covid,
  ``Normal`` -> normal, ``Viral Pneumonia`` -> pneumonia; ``Lung_Opacity`` (RSNA non-COVID opacities, not
  necessarily pneumonia) is dropped unless ``--classes`` maps it. The 2020 releases (folders ``COVID-19``,
  ``NORMAL``, ``Viral Pneumonia`` holding the images directly) are read too.
* ``covid-chestxray``: ieee8023/covid-chestxray-dataset (Cohen et al.), ``metadata.csv`` plus ``images/``. The
  hierarchical ``finding`` string maps to a class by this rule (case-insensitive, first match wins):

  1. contains ``COVID-19`` -> ``covid`` (``Pneumonia/Viral/COVID-19``, ``COVID-19, ARDS``);
  2. starts with ``Pneumonia`` -> ``pneumonia`` (``Pneumonia/Bacterial/Streptococcus``, ``Pneumonia/Viral/SARS``,
     plain ``Pneumonia``);
  3. equals ``No Finding`` -> ``normal``;
  4. anything else (``Tuberculosis``, ``todo``, ...) is dropped unless ``--classes`` maps it.

  Only frontal radiographs are kept by default: ``modality`` must be ``X-ray`` (CT rows are dropped) and the
  ``view`` must start with ``PA`` or ``AP`` (``PA``, ``AP``, ``AP Supine``, ``AP semi erect``, ``AP Erect``);
  lateral (``L``) and other views are dropped unless ``all_views`` is set. ``source`` is ``ieee8023``; the
  collection each image was taken from (Radiopaedia, Eurorad, SIRM, a journal) is kept in ``origin``.
* ``covidx``: COVIDx CXR-2/3/4 (Wang et al.): ``train.txt``, optional ``val.txt`` and ``test.txt`` with lines
  ``patient_id filename class source`` and images in ``train/``, ``val/`` and ``test/``. The official split is
  kept in a ``split`` column. Classes ``COVID-19``/``positive`` -> covid, ``normal`` -> normal, ``pneumonia`` ->
  pneumonia, ``negative`` -> non-covid.
* ``kermany``: Kermany et al. 2018 pediatric pneumonia set (Mendeley 10.17632/rscbjbr9sj, the Kaggle
  "chest-xray-pneumonia" copy): ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; the official split is
  kept in ``split``. ``NORMAL`` -> normal, ``PNEUMONIA`` -> pneumonia, with ``bacteria``/``virus`` from the file name
  in ``finding`` (``original_label`` ``PNEUMONIA/bacteria``, so ``--classes "bacterial=bacteria;viral=virus"``
  works). Patient ids come from the file names: ``person12_bacteria_3`` -> ``kermany-person12``; ``IM-0115-0001``
  and ``NORMAL2-IM-1427-0001`` -> ``kermany-IM-0115``, ``kermany-NORMAL2-IM-1427`` (the last number counts
  images of one study). All patients are children aged 1-5 (``age_group`` = pediatric).
* ``folder`` and ``csv``: any layout :func:`~covidxr.data.manifest.load_manifest` reads (one folder per class, or
  a CSV manifest), rewritten with the standard columns.

``--classes`` maps and merges labels after the adapter's default mapping (:mod:`covidxr.data.mapping`).
:func:`build_manifest` runs an adapter and the mapping; :func:`covidxr.data.manifest.write_manifest` saves the
result.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from covidxr.data.manifest import IMAGE_SUFFIXES, load_manifest
from covidxr.data.mapping import apply_classes, is_frontal, name_key, parse_class_spec, source_from_url
from covidxr.errors import DatasetError, one_line

MANIFEST_COLUMNS = ("path", "label", "patient_id", "source", "view")
PROVENANCE_COLUMNS = ("patient_id_kind", "original_label")

KAGGLE_CLASSES = {"covid": "covid", "covid-19": "covid", "normal": "normal", "viral pneumonia": "pneumonia",
                  "lung_opacity": ""}  # "COVID-19" and "NORMAL" are the folder names of the 2020 releases
COVIDX_CLASSES = {"covid-19": "covid", "covid": "covid", "positive": "covid", "normal": "normal",
                  "pneumonia": "pneumonia", "negative": "non-covid"}
OFFICIAL_SPLITS = ("train", "val", "test")


@dataclass
class Manifest:
    """What an adapter (or :func:`build_manifest`) produced: the manifest rows and what was left out.

    Attributes:
        table: one row per kept image; ``path`` is absolute until the manifest is written.
        dropped: reason -> number of images left out (unmapped labels, lateral views, CT, missing files).
        notes: facts about the dataset worth reporting (for example, that it has no patient ids).
    """

    table: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ helpers


def find_dataset_root(src: Path, is_root: Callable[[Path], bool], what: str) -> Path:
    """Return ``src`` or the first nested folder (two levels down at most) for which ``is_root`` holds.

    Raises:
        DatasetError: ``src`` is not a folder, or no folder below it looks like the ``what``.
    """
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder; expected the {what}")
    level = [src]
    for _ in range(3):
        found = [d for d in level if is_root(d)]
        if found:
            return found[0]
        level = [c for d in level for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith((".", "__"))]
    raise DatasetError(f"{src}: does not look like the {what}; see data/README.md for the expected layout")


def _child(folder: Path, name: str) -> Path | None:
    """Return the entry of ``folder`` called ``name``, ignoring case, or None."""
    wanted = name.casefold()
    return next((c for c in sorted(folder.iterdir()) if c.name.casefold() == wanted), None)


def _images_in(folder: Path) -> list[Path]:
    """Return the image files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_sheet(path: Path) -> pd.DataFrame:
    """Read a metadata spreadsheet (``.xlsx`` with openpyxl, or ``.csv``) as strings."""
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_excel(path, dtype=str, engine="openpyxl").fillna("")
    except ImportError as exc:
        raise DatasetError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl), or pass a .csv copy") from exc
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot read spreadsheet ({one_line(exc)})") from exc


def _read_table(path: Path) -> pd.DataFrame:
    """Read a CSV file as strings, with one-line errors."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot read ({one_line(exc)})") from exc


def _require_columns(df: pd.DataFrame, columns: Iterable[str], where: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(f"{where}: lacks column(s) {', '.join(missing)}")


# ----------------------------------------------------------------------------------------- kaggle-radiography


def _kaggle_root(src: Path) -> Path:
    def is_root(d: Path) -> bool:
        return (_child(d, "COVID") or _child(d, "COVID-19")) is not None and _child(d, "Normal") is not None

    what = "Kaggle COVID-19 Radiography Database (folders COVID, Normal, Lung_Opacity, Viral Pneumonia)"
    return find_dataset_root(src, is_root, what)


def _kaggle_sheet(root: Path, folder_name: str) -> pd.DataFrame | None:
    """Return the metadata sheet of one class folder (``FILE NAME`` -> ``URL``), or None when absent."""
    for suffix in (".metadata.xlsx", ".metadata.csv"):
        for where in (root, root / folder_name):
            sheet = _child(where, folder_name + suffix) if where.is_dir() else None
            if sheet is not None:
                df = _read_sheet(sheet)
                df.columns = [str(c).strip().upper() for c in df.columns]
                _require_columns(df, ("FILE NAME", "URL"), sheet)
                return df
    return None


def _file_key(name: str) -> str:
    """Match sheet names to files: the sheets spell them differently (``NORMAL-1`` for ``Normal-1.png``)."""
    stem = name.strip()
    if Path(stem).suffix.lower() in IMAGE_SUFFIXES:
        stem = stem[: -len(Path(stem).suffix)]
    return re.sub(r"\s+", "", stem).casefold()


def kaggle_radiography(src: Path) -> Manifest:
    """Read the Kaggle COVID-19 Radiography Database (see the module docstring)."""
    root = _kaggle_root(src)
    rows, notes = [], []
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and name_key(d.name) in KAGGLE_CLASSES]
    for class_dir in class_dirs:
        images_dir = _child(class_dir, "images")
        files = _images_in(images_dir if images_dir is not None and images_dir.is_dir() else class_dir)
        sheet = _kaggle_sheet(root, class_dir.name)
        urls: dict[str, str] = {}
        if sheet is None:
            notes.append(f"{class_dir.name}: no {class_dir.name}.metadata.xlsx; source is 'unknown' for its images")
        else:
            urls = {_file_key(str(n)): str(u).strip() for n, u in zip(sheet["FILE NAME"], sheet["URL"], strict=True)}
        unmatched = 0
        for file in files:
            url = urls.get(_file_key(file.name), "")
            unmatched += bool(sheet is not None and not url)
            rows.append({"path": str(file.resolve()), "label": KAGGLE_CLASSES[name_key(class_dir.name)],
                         "patient_id": f"kaggle-{file.stem}", "source": source_from_url(url), "view": "",
                         "patient_id_kind": "image", "original_label": class_dir.name, "url": url})
        if unmatched:
            notes.append(f"{class_dir.name}: {unmatched} image(s) not listed in its metadata sheet (source 'unknown')")
    if not rows:
        raise DatasetError(f"{root}: no images found in the class folders")
    notes.append("the Kaggle COVID-19 Radiography Database has no patient ids: each image is its own patient "
                 "(patient_id_kind=image), so images of one patient may land in different splits")
    return Manifest(pd.DataFrame(rows), notes=notes)


# ------------------------------------------------------------------------------------------- covid-chestxray


def finding_to_class(finding: str) -> str:
    """Map an ieee8023 ``finding`` to covid / pneumonia / normal, or ``""`` (see the module docstring)."""
    text = name_key(finding)
    if "covid-19" in text:
        return "covid"
    if text.startswith("pneumonia"):
        return "pneumonia"
    if text == "no finding":
        return "normal"
    return ""


IEEE_EXTRAS = ("finding", "age", "sex", "offset", "modality", "date", "location", "RT_PCR_positive", "survival",
               "intubated", "went_icu", "doi", "url", "license")


def covid_chestxray(src: Path, all_views: bool = False) -> Manifest:
    """Read ieee8023/covid-chestxray-dataset (see the module docstring for the class rule and view filter)."""
    root = find_dataset_root(src, lambda d: (d / "metadata.csv").is_file() and (d / "images").is_dir(),
                             "ieee8023 covid-chestxray-dataset (metadata.csv and images/)")
    meta = _read_table(root / "metadata.csv")
    _require_columns(meta, ("patientid", "finding", "view", "modality", "filename"), root / "metadata.csv")
    dropped: Counter = Counter()
    rows = []
    for rec in meta.to_dict("records"):
        file = root / (rec.get("folder") or "images") / rec["filename"]
        if name_key(rec["modality"]) not in ("x-ray", "xray", "x ray", "cr", "dx"):
            dropped[f"modality {rec['modality'] or '(blank)'}"] += 1
        elif not all_views and not is_frontal(rec["view"]):
            dropped[f"view {rec['view'] or '(blank)'} (not frontal)"] += 1
        elif not file.is_file():
            dropped["image file missing"] += 1
        else:
            extras = {c: rec.get(c, "") for c in IEEE_EXTRAS}
            rows.append({"path": str(file.resolve()), "label": finding_to_class(rec["finding"]),
                         "patient_id": f"ieee8023-{rec['patientid']}", "source": "ieee8023", "view": rec["view"],
                         "patient_id_kind": "patient", "original_label": rec["finding"],
                         "origin": source_from_url(rec.get("url", "")), **extras,
                         "original_path": f"{rec.get('folder') or 'images'}/{rec['filename']}"})
    if not rows:
        raise DatasetError(f"{root}: no usable image rows in metadata.csv ({dict(dropped)})")
    return Manifest(pd.DataFrame(rows), dropped=dict(dropped))


# ---------------------------------------------------------------------------------------------------- covidx


def _parse_covidx_line(line: str, where: str) -> tuple[str, str, str, str]:
    """Split ``patient_id filename class source`` (a file name may hold spaces; source may be absent)."""
    tokens = line.split()
    if len(tokens) == 3:
        return tokens[0], tokens[1], tokens[2], "unknown"
    if len(tokens) < 3:
        raise DatasetError(f"{where}: expected 'patient_id filename class source', got {line.strip()!r}")
    return tokens[0], " ".join(tokens[1:-2]), tokens[-2], tokens[-1]


def covidx(src: Path) -> Manifest:
    """Read COVIDx (see the module docstring); the official split is kept in ``split``."""
    root = find_dataset_root(src, lambda d: (d / "train.txt").is_file() and (d / "test.txt").is_file(),
                             "COVIDx dataset (train.txt, test.txt and train/, test/ folders)")
    rows, dropped = [], Counter()
    for split in OFFICIAL_SPLITS:
        listing = root / f"{split}.txt"
        if not listing.is_file():
            continue
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            patient, name, cls, source = _parse_covidx_line(line, f"{listing}:{number}")
            file = root / split / name
            if not file.is_file():
                dropped["image file missing"] += 1
                continue
            rows.append({"path": str(file.resolve()), "label": COVIDX_CLASSES.get(name_key(cls), ""),
                         "patient_id": f"covidx-{source}-{patient}", "source": source, "view": "",
                         "patient_id_kind": "patient", "original_label": cls, "split": split})
    if not rows:
        raise DatasetError(f"{root}: the split files list no existing image")
    return Manifest(pd.DataFrame(rows), dropped=dict(dropped))


# --------------------------------------------------------------------------------------------------- kermany

KERMANY_CLASSES = {"normal": "normal", "pneumonia": "pneumonia"}


def kermany_patient(stem: str) -> str:
    """Return the patient id encoded in a Kermany file name (see the module docstring)."""
    person = re.match(r"(person\d+)_", stem)
    if person:
        return f"kermany-{person.group(1)}"
    study = re.match(r"(.*IM-\d+)-\d+$", stem)
    return f"kermany-{study.group(1) if study else stem}"


def _has_kermany_split(folder: Path) -> bool:
    split = next((_child(folder, s) for s in ("train", "test") if _child(folder, s) is not None), None)
    return split is not None and split.is_dir() and _child(split, "NORMAL") is not None


def kermany(src: Path) -> Manifest:
    """Read the Kermany pediatric chest X-ray set (see the module docstring); the official split is kept."""
    root = find_dataset_root(src, _has_kermany_split,
                             "Kermany chest_xray folder (train/, test/ with NORMAL/, PNEUMONIA/)")
    rows = []
    for split in OFFICIAL_SPLITS:
        split_dir = _child(root, split)
        if split_dir is None or not split_dir.is_dir():
            continue
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir() and name_key(d.name) in KERMANY_CLASSES):
            for file in _images_in(class_dir):
                kind = next((k for k in ("bacteria", "virus") if k in file.stem.casefold()), "")
                rows.append({"path": str(file.resolve()), "label": KERMANY_CLASSES[name_key(class_dir.name)],
                             "patient_id": kermany_patient(file.stem), "source": "kermany", "view": "",
                             "patient_id_kind": "patient",
                             "original_label": f"{class_dir.name}/{kind}" if kind else class_dir.name,
                             "finding": kind or name_key(class_dir.name), "age_group": "pediatric", "split": split})
    if not rows:
        raise DatasetError(f"{root}: no images in train/, val/ or test/ class folders")
    return Manifest(pd.DataFrame(rows))


# ------------------------------------------------------------------------------------------- folder and csv


def from_manifest(src: Path) -> Manifest:
    """Read any layout :func:`load_manifest` understands and keep its columns."""
    table = load_manifest(src).drop(columns=["relpath"])
    if "original_label" not in table.columns:
        table["original_label"] = table["label"]
    if "patient_id_kind" not in table.columns:
        table["patient_id_kind"] = ["image" if p.startswith("image:") else "patient" for p in table["patient_id"]]
    return Manifest(table)


ADAPTERS: dict[str, Callable[..., Manifest]] = {
    "kaggle-radiography": kaggle_radiography,
    "covid-chestxray": covid_chestxray,
    "covidx": covidx,
    "kermany": kermany,
    "folder": from_manifest,
    "csv": from_manifest,
}


# ------------------------------------------------------------------------------------------------------ build


def build_manifest(kind: str, src: str | os.PathLike, classes: str | None = None, all_views: bool = False) -> Manifest:
    """Run adapter ``kind`` on ``src`` and apply the ``--classes`` mapping.

    Args:
        kind: one of ``ADAPTERS``.
        src: the dataset's folder (or manifest file for ``csv``).
        classes: a ``--classes`` spec (:func:`parse_class_spec`) or None for the default classes.
        all_views: keep lateral and other non-frontal views (``covid-chestxray`` only).

    Returns:
        The kept rows (absolute paths, standard columns first), what was dropped and notes.

    Raises:
        DatasetError: unknown adapter, unreadable dataset, bad spec, or nothing left after mapping.
    """
    if kind not in ADAPTERS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {', '.join(ADAPTERS)}")
    src = Path(src).expanduser()
    if not src.exists():
        raise DatasetError(f"{src}: not found; see data/README.md for how to obtain the dataset")
    mapping = parse_class_spec(classes) if classes is not None else None
    read = covid_chestxray(src, all_views) if kind == "covid-chestxray" else ADAPTERS[kind](src)
    table, dropped = apply_classes(read.table, mapping)
    dropped.update(read.dropped)
    if table.empty:
        raise DatasetError(f"{src}: no image left after mapping classes (dropped: {dict(dropped)})")
    first = [*MANIFEST_COLUMNS, *PROVENANCE_COLUMNS]
    table = table[first + [c for c in table.columns if c not in first]]
    return Manifest(table, dict(dropped), read.notes)
