"""Adapters that turn public chest X-ray datasets into covidxr manifests, keeping where every image came from.

Every adapter reads a dataset in its published layout and returns a table that :func:`write_manifest` saves as a
CSV manifest readable by :func:`covidxr.data.manifest.load_manifest`. Columns, in this order:

    path            image file: relative to the manifest's folder when the image lies below it, else absolute
    label           class used for training (``covid``, ``normal``, ``pneumonia`` by default)
    patient_id      patient identifier, prefixed by the dataset (``ieee8023-12``, ``covidx-cohen-3``)
    source          where the image originally came from (short name, see :func:`source_from_url`)
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

``--classes`` (:func:`parse_class_spec`) maps and merges labels after the adapter's default mapping: either a list
of kept classes (``covid,normal``) or ``new=old,old;new=old`` entries (``covid=covid,COVID-19;non-covid=normal,
pneumonia,Lung_Opacity``). Names are matched case-insensitively against, in this order: the dataset's own label
(``original_label``); the levels of a hierarchical finding from the most specific down to, but not including,
the top level (``SARS``, then ``Viral`` for ``Pneumonia/Viral/SARS``); then the default class. So
``covid,pneumonia`` keeps ``Pneumonia/Viral/COVID-19`` as covid (the top level ``Pneumonia`` is never matched on
its own), and ``sars=SARS;pneumonia`` splits SARS off the other pneumonias and drops covid. Rows that map to
nothing are dropped and counted.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from covidxr.data.manifest import IMAGE_SUFFIXES, load_manifest
from covidxr.errors import DatasetError
from covidxr.files import atomic_write_text

MANIFEST_COLUMNS = ("path", "label", "patient_id", "source", "view")
PROVENANCE_COLUMNS = ("patient_id_kind", "original_label")
COVID_CHESTXRAY_URL = "https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip"

KAGGLE_CLASSES = {"covid": "covid", "covid-19": "covid", "normal": "normal", "viral pneumonia": "pneumonia",
                  "lung_opacity": ""}  # "COVID-19" and "NORMAL" are the folder names of the 2020 releases
COVIDX_CLASSES = {"covid-19": "covid", "covid": "covid", "positive": "covid", "normal": "normal",
                  "pneumonia": "pneumonia", "negative": "non-covid"}
OFFICIAL_SPLITS = ("train", "val", "test")

# (substring of "host/path" of a URL, lower case) -> short source name; the first match wins.
KNOWN_SOURCES: tuple[tuple[str, str], ...] = (
    ("github.com/ieee8023/covid-chestxray-dataset", "ieee8023"),
    ("paultimothymooney/chest-xray-pneumonia", "kermany"),
    ("data.mendeley.com/datasets/rscbjbr9sj", "kermany"),
    ("rsna-pneumonia-detection-challenge", "rsna"),
    ("bimcv", "bimcv"),
    ("padchest", "bimcv"),
    ("github.com/ml-workgroup/covid-19-image-repository", "hannover"),
    ("github.com/armiro/covid-cxnet", "covid-cxnet"),
    ("figure1-covid-chestxray-dataset", "figure1"),
    ("actualmed-covid-chestxray-dataset", "actualmed"),
    ("sirm.org", "sirm"),
    ("eurorad.org", "eurorad"),
    ("radiopaedia.org", "radiopaedia"),
    ("twitter.com", "twitter"),
    ("nih.gov", "nih"),
)


@dataclass
class Prepared:
    """What an adapter produced: the manifest rows and what was left out.

    Attributes:
        table: one row per kept image; ``path`` is absolute until :func:`write_manifest` rewrites it.
        dropped: reason -> number of images left out (unmapped labels, lateral views, CT, missing files).
        notes: facts about the dataset worth reporting (for example, that it has no patient ids).
    """

    table: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ class mapping


def _key(name: str) -> str:
    """Normalise a class name for matching: case-folded, spaces collapsed."""
    return re.sub(r"\s+", " ", str(name)).strip().casefold()


def parse_class_spec(spec: str) -> dict[str, str]:
    """Parse a ``--classes`` spec into ``{normalised old name: new class}``.

    Args:
        spec: ``"covid,normal"`` (keep these classes) or ``"covid=covid,COVID-19;non-covid=normal,pneumonia"``
            (map the names after ``=`` to the class before it); entries without ``=`` keep their own names.

    Returns:
        The mapping; keys are normalised with case folding.

    Raises:
        DatasetError: empty spec or entry, or a name mapped to two different classes.
    """
    mapping: dict[str, str] = {}
    entries = [e for e in re.split(r"[;]" if "=" in spec else r"[;,]", spec) if e.strip()]
    if not entries:
        raise DatasetError(f"--classes {spec!r} names no class; e.g. 'covid,normal' or 'covid=covid;other=normal'")
    for entry in entries:
        new, sep, olds = entry.partition("=")
        new = new.strip()
        names = [o.strip() for o in olds.split(",")] if sep else [new]
        if not new or not any(names):
            raise DatasetError(f"--classes entry {entry.strip()!r} is incomplete; expected NEW=OLD[,OLD...]")
        for old in filter(None, names):
            previous = mapping.setdefault(_key(old), new)
            if previous != new:
                raise DatasetError(f"--classes maps {old!r} to both {previous!r} and {new!r}")
    return mapping


def _candidates(original: str, default: str) -> list[str]:
    """Names a row can be matched by, in the order given in the module docstring."""
    parts = [p.strip() for p in original.split("/") if p.strip()]
    return [original, *reversed(parts[1:]), default]


def apply_classes(table: pd.DataFrame, mapping: dict[str, str] | None) -> tuple[pd.DataFrame, Counter]:
    """Map labels with a parsed ``--classes`` spec and drop the rows that map to nothing.

    Args:
        table: adapter output with ``label`` (default class, ``""`` when the adapter has none) and
            ``original_label``.
        mapping: output of :func:`parse_class_spec`, or None to keep the default classes.

    Returns:
        The kept rows (index reset) and a counter of dropped rows by reason.
    """
    if mapping is None:
        labels = table["label"]
    else:
        labels = pd.Series([
            next((mapping[_key(c)] for c in _candidates(orig, default) if c and _key(c) in mapping), "")
            for orig, default in zip(table["original_label"], table["label"], strict=True)
        ], index=table.index, dtype=object)
    keep = labels != ""
    why = "not in --classes" if mapping is not None else "no default class"
    dropped = Counter(f"label {orig!r} {why}" for orig in table.loc[~keep, "original_label"])
    return table.assign(label=labels)[keep].reset_index(drop=True), dropped


# ------------------------------------------------------------------------------------------------------ helpers


def source_from_url(url: str) -> str:
    """Return a short name for the collection a URL points to.

    Known collections (``KNOWN_SOURCES``) get their usual name (``ieee8023``, ``kermany``, ``rsna``, ``bimcv``,
    ``sirm``, ``eurorad``, ``radiopaedia``, ...). Other GitHub and Kaggle URLs give ``owner/name``; anything else
    its host name without ``www.``. An empty URL gives ``unknown``.
    """
    text = str(url or "").strip()
    if not text or text.lower() in ("nan", "none"):
        return "unknown"
    parsed = urlparse(text if "://" in text else f"https://{text}")
    host = (parsed.hostname or "").removeprefix("www.")
    where = f"{host}{parsed.path}".lower()
    for pattern, name in KNOWN_SOURCES:
        if pattern in where:
            return name
    segments = [s for s in parsed.path.split("/") if s]
    if host in ("github.com", "kaggle.com") and len(segments) >= 2:
        return "/".join(segments[-2:] if host == "kaggle.com" else segments[:2])
    return host or "unknown"


def _find_root(src: Path, is_root: Callable[[Path], bool], what: str) -> Path:
    """Return ``src`` or the single nested folder (two levels at most) that holds the dataset."""
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
        raise DatasetError(f"{path}: cannot read spreadsheet ({exc})".replace("\n", " ")) from exc


def _read_table(path: Path) -> pd.DataFrame:
    """Read a CSV file as strings, with one-line errors."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})".replace("\n", " ")) from exc


def _require_columns(df: pd.DataFrame, columns: Iterable[str], where: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(f"{where}: lacks column(s) {', '.join(missing)}")


# ----------------------------------------------------------------------------------------- kaggle-radiography


def _kaggle_root(src: Path) -> Path:
    def is_root(d: Path) -> bool:
        return (_child(d, "COVID") or _child(d, "COVID-19")) is not None and _child(d, "Normal") is not None

    return _find_root(src, is_root,
                      "Kaggle COVID-19 Radiography Database (folders COVID, Normal, Lung_Opacity, Viral Pneumonia)")


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


def kaggle_radiography(src: Path) -> Prepared:
    """Read the Kaggle COVID-19 Radiography Database (see the module docstring)."""
    root = _kaggle_root(src)
    rows, notes = [], []
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and _key(d.name) in KAGGLE_CLASSES]
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
            rows.append({"path": str(file.resolve()), "label": KAGGLE_CLASSES[_key(class_dir.name)],
                         "patient_id": f"kaggle-{file.stem}", "source": source_from_url(url), "view": "",
                         "patient_id_kind": "image", "original_label": class_dir.name, "url": url})
        if unmatched:
            notes.append(f"{class_dir.name}: {unmatched} image(s) not listed in its metadata sheet (source 'unknown')")
    if not rows:
        raise DatasetError(f"{root}: no images found in the class folders")
    notes.append("the Kaggle COVID-19 Radiography Database has no patient ids: each image is its own patient "
                 "(patient_id_kind=image), so images of one patient may land in different splits")
    return Prepared(pd.DataFrame(rows), notes=notes)


# ------------------------------------------------------------------------------------------- covid-chestxray


def finding_to_class(finding: str) -> str:
    """Map an ieee8023 ``finding`` to covid / pneumonia / normal, or ``""`` (see the module docstring)."""
    text = _key(finding)
    if "covid-19" in text:
        return "covid"
    if text.startswith("pneumonia"):
        return "pneumonia"
    if text == "no finding":
        return "normal"
    return ""


def is_frontal(view: str) -> bool:
    """Return True for PA/AP views (``PA``, ``AP``, ``AP Supine``, ``AP semi erect``), False for the rest."""
    words = _key(view).replace("-", " ").split()
    return bool(words) and words[0] in ("pa", "ap")


IEEE_EXTRAS = ("finding", "age", "sex", "offset", "modality", "date", "location", "RT_PCR_positive", "survival",
               "intubated", "went_icu", "doi", "url", "license")


def covid_chestxray(src: Path, all_views: bool = False) -> Prepared:
    """Read ieee8023/covid-chestxray-dataset (see the module docstring for the class rule and view filter)."""
    root = _find_root(src, lambda d: (d / "metadata.csv").is_file() and (d / "images").is_dir(),
                      "ieee8023 covid-chestxray-dataset (metadata.csv and images/)")
    meta = _read_table(root / "metadata.csv")
    _require_columns(meta, ("patientid", "finding", "view", "modality", "filename"), root / "metadata.csv")
    dropped: Counter = Counter()
    rows = []
    for rec in meta.to_dict("records"):
        file = root / (rec.get("folder") or "images") / rec["filename"]
        if _key(rec["modality"]) not in ("x-ray", "xray", "x ray", "cr", "dx"):
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
    return Prepared(pd.DataFrame(rows), dropped=dict(dropped))


# ---------------------------------------------------------------------------------------------------- covidx


def _parse_covidx_line(line: str, where: str) -> tuple[str, str, str, str]:
    """Split ``patient_id filename class source`` (a file name may hold spaces; source may be absent)."""
    tokens = line.split()
    if len(tokens) == 3:
        return tokens[0], tokens[1], tokens[2], "unknown"
    if len(tokens) < 3:
        raise DatasetError(f"{where}: expected 'patient_id filename class source', got {line.strip()!r}")
    return tokens[0], " ".join(tokens[1:-2]), tokens[-2], tokens[-1]


def covidx(src: Path) -> Prepared:
    """Read COVIDx (see the module docstring); the official split is kept in ``split``."""
    root = _find_root(src, lambda d: (d / "train.txt").is_file() and (d / "test.txt").is_file(),
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
            rows.append({"path": str(file.resolve()), "label": COVIDX_CLASSES.get(_key(cls), ""),
                         "patient_id": f"covidx-{source}-{patient}", "source": source, "view": "",
                         "patient_id_kind": "patient", "original_label": cls, "split": split})
    if not rows:
        raise DatasetError(f"{root}: the split files list no existing image")
    return Prepared(pd.DataFrame(rows), dropped=dict(dropped))


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


def kermany(src: Path) -> Prepared:
    """Read the Kermany pediatric chest X-ray set (see the module docstring); the official split is kept."""
    root = _find_root(src, _has_kermany_split, "Kermany chest_xray folder (train/, test/ with NORMAL/, PNEUMONIA/)")
    rows = []
    for split in OFFICIAL_SPLITS:
        split_dir = _child(root, split)
        if split_dir is None or not split_dir.is_dir():
            continue
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir() and _key(d.name) in KERMANY_CLASSES):
            for file in _images_in(class_dir):
                kind = next((k for k in ("bacteria", "virus") if k in file.stem.casefold()), "")
                rows.append({"path": str(file.resolve()), "label": KERMANY_CLASSES[_key(class_dir.name)],
                             "patient_id": kermany_patient(file.stem), "source": "kermany", "view": "",
                             "patient_id_kind": "patient",
                             "original_label": f"{class_dir.name}/{kind}" if kind else class_dir.name,
                             "finding": kind or _key(class_dir.name), "age_group": "pediatric", "split": split})
    if not rows:
        raise DatasetError(f"{root}: no images in train/, val/ or test/ class folders")
    return Prepared(pd.DataFrame(rows))


# ------------------------------------------------------------------------------------------- folder and csv


def from_manifest(src: Path) -> Prepared:
    """Read any layout :func:`load_manifest` understands and keep its columns."""
    table = load_manifest(src).drop(columns=["relpath"])
    if "original_label" not in table.columns:
        table["original_label"] = table["label"]
    if "patient_id_kind" not in table.columns:
        table["patient_id_kind"] = ["image" if p.startswith("image:") else "patient" for p in table["patient_id"]]
    return Prepared(table)


ADAPTERS: dict[str, Callable[..., Prepared]] = {
    "kaggle-radiography": kaggle_radiography,
    "covid-chestxray": covid_chestxray,
    "covidx": covidx,
    "kermany": kermany,
    "folder": from_manifest,
    "csv": from_manifest,
}


# ------------------------------------------------------------------------------------------------------ output


def manifest_path(path: str, folder: Path) -> str:
    """Return ``path`` relative to ``folder`` (POSIX) when it lies below it, else the absolute path."""
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(absolute)


def prepare(kind: str, src: str | os.PathLike, classes: str | None = None, all_views: bool = False) -> Prepared:
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
    prepared = covid_chestxray(src, all_views) if kind == "covid-chestxray" else ADAPTERS[kind](src)
    table, dropped = apply_classes(prepared.table, mapping)
    dropped.update(prepared.dropped)
    if table.empty:
        raise DatasetError(f"{src}: no image left after mapping classes (dropped: {dict(dropped)})")
    first = [*MANIFEST_COLUMNS, *PROVENANCE_COLUMNS]
    table = table[first + [c for c in table.columns if c not in first]]
    return Prepared(table, dict(dropped), prepared.notes)


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


# ------------------------------------------------------------------------------------------------------ fetch


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
        raise DatasetError(f"{archive}: cannot extract ({exc})") from exc


def download(url: str, dest_file: Path, timeout: float, progress: bool = False) -> Path:
    """Download ``url`` to ``dest_file`` (via a ``.part`` file), failing fast without a network.

    Raises:
        DatasetError: unreachable URL, HTTP error, timeout or a write error; the message names the URL and says how
            to proceed by hand.
    """
    import urllib.request
    from urllib.error import URLError

    from tqdm.auto import tqdm

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
        reason = str(getattr(exc, "reason", None) or exc).strip().splitlines()[0] or type(exc).__name__
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
    return _find_root(dest, lambda d: (d / "metadata.csv").is_file() and (d / "images").is_dir(),
                      f"ieee8023 covid-chestxray-dataset inside {zip_path.name}")
