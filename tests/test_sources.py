"""Public-dataset adapters: each runs on a small tree built here with the published layout and column names."""

from __future__ import annotations

import socket
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
from PIL import Image

from covidxr.data.__main__ import main
from covidxr.data.manifest import load_manifest, write_manifest
from covidxr.data.mapping import apply_classes, is_frontal, parse_class_spec, source_from_url
from covidxr.data.sources import build_manifest, finding_to_class
from covidxr.data.split import make_split
from covidxr.errors import DatasetError

IEEE_COLUMNS = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "intubated",
                "went_icu", "needed_supplemental_O2", "extubated", "temperature", "pO2_saturation",
                "leukocyte_count", "neutrophil_count", "lymphocyte_count", "view", "modality", "date", "location",
                "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes", "Unnamed: 29"]

# (patientid, finding, view, modality, folder, filename, url) as in ieee8023/covid-chestxray-dataset's metadata.csv
IEEE_ROWS = [
    ("2", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam"
     "_coronavirus.jpeg", "https://www.auntminnie.com/index.aspx?sec=ser&sub=def&pag=dis&ItemID=727990"),
    ("2", "Pneumonia/Viral/COVID-19", "L", "X-ray", "images", "auntminnie-c-2020_01_28_23_51_6665_2020_01_28_Vietnam"
     "_coronavirus.jpeg", "https://www.auntminnie.com/index.aspx?sec=ser&sub=def&pag=dis&ItemID=727990"),
    ("4", "COVID-19, ARDS", "AP Supine", "X-ray", "images", "nejmc2001573_f1a.jpeg",
     "https://www.nejm.org/doi/full/10.1056/NEJMc2001573"),
    ("11", "Pneumonia/Bacterial/Streptococcus", "AP Supine", "X-ray", "images", "streptococcus-pneumoniae-1.jpg",
     "https://radiopaedia.org/cases/pneumococcal-pneumonia"),
    ("12", "No Finding", "PA", "X-ray", "images", "nofinding-1.png", "https://eurorad.org/case/16601"),
    ("13", "Pneumonia/Viral/SARS", "AP semi erect", "X-ray", "images", "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-"
     "day0.jpeg", "https://pubs.rsna.org/doi/10.1148/rg.242035193"),
    ("14", "Tuberculosis", "PA", "X-ray", "images", "tb-1.png", "https://radiopaedia.org/cases/tuberculosis"),
    ("15", "todo", "PA", "X-ray", "images", "todo-1.png", ""),
    ("16", "Pneumonia/Viral/COVID-19", "Axial", "CT", "volumes", "coronacases_org_001.nii.gz",
     "https://zenodo.org/record/3757476"),
    ("17", "Pneumonia", "AP", "X-ray", "images", "pneumonia-1.jpg", "https://www.sirm.org/2020/03/10/covid-19-caso-40/"),
]


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32), fmt: str | None = None) -> Path:
    """Write a small random grey image (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"))
    return path


def write_xlsx(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """Write a Kaggle metadata sheet (FILE NAME, FORMAT, SIZE, URL) with openpyxl."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
    for row in rows:
        sheet.append(list(row))
    book.save(path)


KAGGLE_FILES = {  # folder -> [(file stem, sheet name, URL)]
    "COVID": [("COVID-1", "COVID-1", "https://github.com/ieee8023/covid-chestxray-dataset"),
              ("COVID-2", "COVID-2", "https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/#1590858128006-9e640421-6711"),
              ("COVID-3", "COVID-3", "https://sirm.org/category/senza-categoria/covid-19/")],
    "Normal": [("Normal-1", "NORMAL-1", "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data"),
               ("Normal-2", "NORMAL-2", "https://www.kaggle.com/paultimothymooney/chest-xray-pneumonia")],
    "Lung_Opacity": [("Lung_Opacity-1", "Lung_Opacity-1",
                      "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data")],
    "Viral Pneumonia": [("Viral Pneumonia-1", "Viral Pneumonia-1",
                         "https://www.kaggle.com/paultimothymooney/chest-xray-pneumonia")],
}


@pytest.fixture()
def kaggle_tree(tmp_path: Path) -> Path:
    """A miniature COVID-19_Radiography_Dataset (v4 layout: <class>/images, <class>/masks, <class>.metadata.xlsx)."""
    root = tmp_path / "COVID-19_Radiography_Dataset"
    seed = 0
    for folder, files in KAGGLE_FILES.items():
        for stem, _, _ in files:
            write_image(root / folder / "images" / f"{stem}.png", seed := seed + 1, size=(299, 299))
            write_image(root / folder / "masks" / f"{stem}.png", seed := seed + 1, size=(256, 256))
        rows = [(name, "PNG", "256*256", url) for _, name, url in files]
        if folder == "Viral Pneumonia":  # a .csv copy of the sheet is accepted too
            pd.DataFrame(rows, columns=["FILE NAME", "FORMAT", "SIZE", "URL"]).to_csv(
                root / f"{folder}.metadata.csv", index=False)
        else:
            write_xlsx(root / f"{folder}.metadata.xlsx", rows)
    (root / "README.md.txt").write_text("COVID-19 Radiography Database\n")
    return tmp_path


@pytest.fixture()
def ieee_tree(tmp_path: Path) -> Path:
    """A miniature ieee8023/covid-chestxray-dataset checkout: metadata.csv, images/, volumes/."""
    root = tmp_path / "covid-chestxray-dataset"
    records = []
    for i, (pid, finding, view, modality, folder, filename, url) in enumerate(IEEE_ROWS):
        file = root / folder / filename
        if modality == "CT":
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(b"\x1f\x8b not really a volume")
        else:
            write_image(file, seed=100 + i)
        record = dict.fromkeys(IEEE_COLUMNS, "")
        record.update(patientid=pid, offset="0", sex="M" if i % 2 else "F", age=str(40 + i), finding=finding,
                      RT_PCR_positive="Y" if "COVID" in finding else "", survival="Y", view=view, modality=modality,
                      date="2020", location="Somewhere", folder=folder, filename=filename, doi="10.1/x", url=url,
                      license="CC BY-NC-SA 4.0", clinical_notes="A patient, with a comma.")
        records.append(record)
    pd.DataFrame(records, columns=IEEE_COLUMNS).to_csv(root / "metadata.csv", index=False)
    return root


# ------------------------------------------------------------------------------------------------- kaggle


def test_kaggle_radiography_default_classes_and_sources(kaggle_tree: Path) -> None:
    manifest = build_manifest("kaggle-radiography", kaggle_tree)  # the dataset folder is found one level down
    table = manifest.table.set_index(manifest.table["path"].map(lambda p: Path(p).stem))
    assert sorted(table.index) == ["COVID-1", "COVID-2", "COVID-3", "Normal-1", "Normal-2", "Viral Pneumonia-1"]
    assert table.loc["COVID-1", "label"] == "covid" and table.loc["Viral Pneumonia-1", "label"] == "pneumonia"
    assert table["source"].to_dict() == {"COVID-1": "ieee8023", "COVID-2": "bimcv", "COVID-3": "sirm",
                                         "Normal-1": "rsna", "Normal-2": "kermany", "Viral Pneumonia-1": "kermany"}
    assert (table["patient_id_kind"] == "image").all() and table["patient_id"].is_unique
    assert not any("masks" in p for p in table["path"])
    assert manifest.dropped == {"label 'Lung_Opacity' no default class": 1}
    assert any("no patient ids" in note for note in manifest.notes)


def test_kaggle_radiography_manifest_round_trip(kaggle_tree: Path) -> None:
    root = kaggle_tree / "COVID-19_Radiography_Dataset"
    manifest = build_manifest("kaggle-radiography", root,
                              classes="covid=COVID;non-covid=Normal,Lung_Opacity,Viral Pneumonia")
    inside = write_manifest(manifest.table, root / "manifest.csv")
    outside = write_manifest(manifest.table, kaggle_tree / "elsewhere" / "kaggle.csv")
    written = pd.read_csv(inside, dtype=str, keep_default_na=False)
    assert list(written.columns[:7]) == ["path", "label", "patient_id", "source", "view", "patient_id_kind",
                                         "original_label"]
    assert all(not Path(p).is_absolute() for p in written["path"])  # below the manifest: relative
    assert all(Path(p).is_absolute() for p in pd.read_csv(outside)["path"])  # elsewhere: absolute
    for where in (inside, outside, root):
        table = load_manifest(where)
        assert table["label"].value_counts().to_dict() == {"non-covid": 4, "covid": 3}
        assert all(Path(p).is_file() for p in table["path"])


def test_kaggle_radiography_2020_layout(tmp_path: Path) -> None:
    """The 2020 releases: folders COVID-19, NORMAL, Viral Pneumonia with the images directly inside."""
    root = tmp_path / "COVID-19 Radiography Database"
    for i, name in enumerate(["COVID-19/COVID-19 (1).png", "NORMAL/NORMAL (1).png",
                              "Viral Pneumonia/Viral Pneumonia (1).png"]):
        write_image(root / name, seed=i)
    write_xlsx(root / "COVID-19.metadata.xlsx",
               [("COVID-19(1)", "PNG", "1024*1024", "https://www.sirm.org/category/senza-categoria/covid-19/")])
    write_xlsx(root / "NORMAL.metadata.xlsx",
               [("NORMAL (1).png", "PNG", "1024*1024", "https://www.kaggle.com/paultimothymooney/chest-xray-pneumonia")])
    manifest = build_manifest("kaggle-radiography", root)
    assert manifest.table["label"].tolist() == ["covid", "normal", "pneumonia"]
    assert manifest.table["source"].tolist() == ["sirm", "kermany", "unknown"]
    assert manifest.notes[0] == "Viral Pneumonia: no Viral Pneumonia.metadata.xlsx; source is 'unknown' for its images"

# ------------------------------------------------------------------------------------------- covid-chestxray


@pytest.mark.parametrize(("finding", "label"), [
    ("Pneumonia/Viral/COVID-19", "covid"), ("COVID-19, ARDS", "covid"), ("COVID-19", "covid"),
    ("Pneumonia/Bacterial/Streptococcus", "pneumonia"), ("Pneumonia/Viral/SARS", "pneumonia"),
    ("Pneumonia", "pneumonia"), ("No Finding", "normal"), ("Tuberculosis", ""), ("todo", ""), ("", ""),
])
def test_finding_to_class(finding: str, label: str) -> None:
    assert finding_to_class(finding) == label


@pytest.mark.parametrize(("view", "frontal"), [("PA", True), ("AP", True), ("AP Supine", True),
                                               ("AP semi erect", True), ("L", False), ("Lateral", False),
                                               ("Axial", False), ("Coronal", False), ("", False)])
def test_is_frontal(view: str, frontal: bool) -> None:
    assert is_frontal(view) is frontal


def test_covid_chestxray_mapping_and_view_filter(ieee_tree: Path) -> None:
    manifest = build_manifest("covid-chestxray", ieee_tree)
    table = manifest.table
    assert sorted(zip(table["patient_id"], table["label"], table["view"], strict=True)) == [
        ("ieee8023-11", "pneumonia", "AP Supine"), ("ieee8023-12", "normal", "PA"),
        ("ieee8023-13", "pneumonia", "AP semi erect"), ("ieee8023-17", "pneumonia", "AP"),
        ("ieee8023-2", "covid", "PA"), ("ieee8023-4", "covid", "AP Supine")]
    assert manifest.dropped == {"view L (not frontal)": 1, "modality CT": 1,
                                "label 'Tuberculosis' no default class": 1, "label 'todo' no default class": 1}
    assert set(table["source"]) == {"ieee8023"}
    row = table.set_index("patient_id").loc["ieee8023-11"]
    assert (row["finding"], row["original_label"], row["origin"]) == (
        "Pneumonia/Bacterial/Streptococcus", "Pneumonia/Bacterial/Streptococcus", "radiopaedia")
    assert row["age"] == "43" and row["sex"] == "M" and row["license"] == "CC BY-NC-SA 4.0"
    assert "clinical_notes" not in table.columns


def test_covid_chestxray_all_views_keeps_lateral_not_ct(ieee_tree: Path) -> None:
    manifest = build_manifest("covid-chestxray", ieee_tree, all_views=True)
    assert "L" in set(manifest.table["view"])
    assert manifest.dropped["modality CT"] == 1 and not any("view" in k for k in manifest.dropped)


def test_covid_chestxray_classes_merge_and_subdivide(ieee_tree: Path) -> None:
    merged = build_manifest("covid-chestxray", ieee_tree, classes="covid=covid,COVID-19;non-covid=normal,pneumonia")
    assert merged.table["label"].value_counts().to_dict() == {"non-covid": 4, "covid": 2}
    sars = build_manifest("covid-chestxray", ieee_tree, classes="sars=SARS;pneumonia;tb=Tuberculosis")
    labels = dict(zip(sars.table["patient_id"], sars.table["label"], strict=True))
    assert labels == {"ieee8023-11": "pneumonia", "ieee8023-13": "sars", "ieee8023-14": "tb",
                      "ieee8023-17": "pneumonia"}
    assert sars.dropped["label 'Pneumonia/Viral/COVID-19' not in --classes"] == 1
    assert sars.dropped["label 'No Finding' not in --classes"] == 1


@pytest.mark.parametrize(("spec", "expected"), [
    ("covid,normal", {"covid": "covid", "normal": "normal"}),
    ("covid=covid,COVID-19;non-covid=normal,Lung_Opacity", {"covid": "covid", "covid-19": "covid",
                                                            "normal": "non-covid", "lung_opacity": "non-covid"}),
    ("covid=COVID;pneumonia", {"covid": "covid", "pneumonia": "pneumonia"}),
])
def test_parse_class_spec(spec: str, expected: dict[str, str]) -> None:
    assert parse_class_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", " ; ", "a=x;b=x", "=covid", "covid="])
def test_parse_class_spec_rejects(spec: str) -> None:
    with pytest.raises(DatasetError):
        parse_class_spec(spec)


def test_apply_classes_counts_dropped() -> None:
    table = pd.DataFrame({"label": ["covid", "normal", ""], "original_label": ["COVID", "Normal", "Lung_Opacity"]})
    kept, dropped = apply_classes(table, parse_class_spec("covid"))
    assert kept["label"].tolist() == ["covid"]
    assert dropped == {"label 'Normal' not in --classes": 1, "label 'Lung_Opacity' not in --classes": 1}


# ---------------------------------------------------------------------------------------------------- covidx


def covidx_tree(tmp_path: Path, binary: bool = False) -> Path:
    """A miniature COVIDx: train.txt/val.txt/test.txt and train/, val/, test/ image folders."""
    root = tmp_path / "covidx"
    pos, neg = ("positive", "negative") if binary else ("COVID-19", "normal")
    lines = {
        "train": [f"3 SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg {'negative' if binary else 'pneumonia'} "
                  "cohen", f"ricord-7 MIDRC-RICORD-1C-419639-000025-39164-0.png {pos} ricord",
                  f"8b0b4a5e-a4e4-4c1c-b5e3-6e6f1a4d0e3a 8b0b4a5e-a4e4-4c1c-b5e3-6e6f1a4d0e3a.png {neg} rsna"],
        "val": [f"sub-S03068 sub-S03068_ses-E06592_run-1_bp-chest_vp-ap_dx.png {pos} bimcv"],
        "test": [f"419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png {pos} ricord",
                 f"1a2b 1a2b (copy).png {neg} rsna"],
    }
    seed = 0
    for split, rows in lines.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
        for line in rows:
            write_image(root / split / " ".join(line.split()[1:-2]), seed := seed + 1)
    return root


def test_covidx_keeps_official_split(tmp_path: Path) -> None:
    table = build_manifest("covidx", covidx_tree(tmp_path)).table
    assert table["split"].value_counts().to_dict() == {"train": 3, "test": 2, "val": 1}
    assert table["label"].value_counts().to_dict() == {"covid": 3, "normal": 2, "pneumonia": 1}
    assert "1a2b (copy).png" in {Path(p).name for p in table["path"]}  # a file name with a space
    assert set(table["source"]) == {"cohen", "ricord", "rsna", "bimcv"}
    assert "covidx-cohen-3" in set(table["patient_id"])
    manifest = write_manifest(table, tmp_path / "covidx" / "manifest.csv")
    split = make_split(load_manifest(manifest))  # an official split is kept as given
    assert split.set_index("patient_id").loc["covidx-bimcv-sub-S03068", "split"] == "val"


def test_covidx_binary_labels(tmp_path: Path) -> None:
    table = build_manifest("covidx", covidx_tree(tmp_path, binary=True)).table
    assert set(table["label"]) == {"covid", "non-covid"}
    assert set(table["original_label"]) == {"positive", "negative"}


# --------------------------------------------------------------------------------------------------- kermany


def test_kermany_patients_split_and_subtypes(tmp_path: Path) -> None:
    root = tmp_path / "chest_xray" / "chest_xray"  # the Kaggle zip nests the folder twice, plus __MACOSX
    files = {"train/NORMAL/IM-0115-0001.jpeg": 1, "train/NORMAL/NORMAL2-IM-1427-0001.jpeg": 2,
             "train/PNEUMONIA/person1_bacteria_1.jpeg": 3, "train/PNEUMONIA/person1_bacteria_2.jpeg": 4,
             "train/PNEUMONIA/person1_virus_6.jpeg": 5, "val/NORMAL/NORMAL2-IM-1430-0001.jpeg": 6,
             "test/PNEUMONIA/person100_bacteria_475.jpeg": 7, "test/NORMAL/IM-0001-0001.jpeg": 8}
    for name, seed in files.items():
        write_image(root / name, seed)
    write_image(tmp_path / "chest_xray" / "__MACOSX" / "train" / "NORMAL" / "._IM-0115-0001.jpeg", 9)
    table = build_manifest("kermany", tmp_path).table
    assert len(table) == 8 and set(table["source"]) == {"kermany"} and set(table["age_group"]) == {"pediatric"}
    by_name = table.set_index(table["path"].map(lambda p: Path(p).name))
    assert by_name.loc["person1_virus_6.jpeg", ["patient_id", "finding", "split"]].tolist() == [
        "kermany-person1", "virus", "train"]
    assert by_name.loc["NORMAL2-IM-1427-0001.jpeg", "patient_id"] == "kermany-NORMAL2-IM-1427"
    assert by_name.loc["IM-0115-0001.jpeg", "patient_id"] == "kermany-IM-0115"
    assert table["split"].value_counts().to_dict() == {"train": 5, "test": 2, "val": 1}
    subtypes = build_manifest("kermany", tmp_path, classes="bacterial=bacteria;viral=virus").table
    assert subtypes["label"].value_counts().to_dict() == {"bacterial": 3, "viral": 1}


# --------------------------------------------------------------------------------------------- folder and csv


def test_folder_and_csv_adapters(tmp_path: Path) -> None:
    for i, name in enumerate(["covid/a.png", "normal/b.png", "normal/c.png"]):
        write_image(tmp_path / "tree" / name, seed=i)
    folder = build_manifest("folder", tmp_path / "tree")
    assert folder.table["label"].tolist() == ["covid", "normal", "normal"]
    manifest = tmp_path / "list.csv"
    pd.DataFrame({"path": ["tree/covid/a.png", "tree/normal/b.png"], "label": ["COVID-19", "normal"],
                  "patient_id": ["p1", "p2"], "source": ["siteA", "siteB"], "age": ["50", "60"]}).to_csv(manifest,
                                                                                                      index=False)
    csv = build_manifest("csv", manifest, classes="covid=COVID-19")
    assert csv.table[["label", "patient_id", "source", "age"]].values.tolist() == [["covid", "p1", "siteA", "50"]]
    out = write_manifest(csv.table, tmp_path / "out" / "m.csv")
    assert load_manifest(out)["path"].tolist() == [str((tmp_path / "tree/covid/a.png").resolve())]


@pytest.mark.parametrize(("url", "name"), [
    ("https://github.com/ieee8023/covid-chestxray-dataset", "ieee8023"),
    ("https://www.kaggle.com/paultimothymooney/chest-xray-pneumonia", "kermany"),
    ("https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data", "rsna"),
    ("https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/#1590858128006-9e640421-6711", "bimcv"),
    ("https://sirm.org/category/senza-categoria/covid-19/", "sirm"),
    ("https://www.eurorad.org/case/16601", "eurorad"),
    ("https://radiopaedia.org/cases/covid-19-pneumonia-12", "radiopaedia"),
    ("https://github.com/ml-workgroup/covid-19-image-repository/tree/master/png", "hannover"),
    ("https://github.com/armiro/COVID-CXNet", "covid-cxnet"),
    ("https://github.com/someone/other-repo/blob/master/x.png", "someone/other-repo"),
    ("https://www.example.org/a", "example.org"),
    ("", "unknown"),
])
def test_source_from_url(url: str, name: str) -> None:
    assert source_from_url(url) == name


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_prepare_prints_summary(ieee_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ieee"
    assert main(["prepare", "covid-chestxray", "--src", str(ieee_tree), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out / 'manifest.csv'}: 6 images" in text and "dropped 1: modality CT" in text
    assert len(load_manifest(out)) == 6  # the folder is read through its manifest.csv


@pytest.mark.parametrize("argv", [
    ["prepare", "covid-chestxray", "--src", "/nonexistent/ieee", "--out", "x"],
    ["prepare", "folder", "--src", ".", "--out", "x", "--classes", "a=x;b=x"],
])
def test_cli_prepare_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("covidxr.data: error: ") and err.count("\n") == 1 and "Traceback" not in err


def make_archive(ieee_tree: Path, zip_path: Path) -> Path:
    """Zip a dataset tree the way GitHub's archive does: one top folder named <repo>-<branch>."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for file in sorted(ieee_tree.rglob("*")):
            if file.is_file():
                zf.write(file, f"covid-chestxray-dataset-master/{file.relative_to(ieee_tree).as_posix()}")
        zf.writestr("covid-chestxray-dataset-master/README.md", "# COVID-19 image data collection\n")
    return zip_path


def test_fetch_with_local_archive(ieee_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archive = make_archive(ieee_tree, tmp_path / "master.zip")
    dest = tmp_path / "downloads" / "ieee8023"
    assert main(["fetch", "covid-chestxray", "--dest", str(dest), "--archive", str(archive)]) == 0
    assert (dest / "covid-chestxray-dataset-master" / "metadata.csv").is_file()
    written = pd.read_csv(dest / "manifest.csv", dtype=str)
    assert written["path"].str.startswith("covid-chestxray-dataset-master/images/").all()
    table = load_manifest(dest)
    assert len(table) == 6 and set(table["label"]) == {"covid", "normal", "pneumonia"}
    assert all(Path(p).is_file() for p in table["path"])


def test_fetch_refuses_zip_slip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.txt", "x")
    assert main(["fetch", "covid-chestxray", "--dest", str(tmp_path / "d"), "--archive", str(archive)]) == 2
    assert "outside" in capsys.readouterr().err and not (tmp_path / "outside.txt").exists()


def test_fetch_unreachable_url_fails_with_its_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port that was just free: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/master.zip"
    timeouts: list[float] = []
    real_urlopen = urllib.request.urlopen

    def urlopen(target: str, timeout: float) -> object:
        timeouts.append(timeout)
        return real_urlopen(target, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert main(["fetch", "covid-chestxray", "--dest", str(tmp_path / "d"), "--url", url, "--timeout", "3"]) == 2
    assert timeouts == [3.0]  # the socket gives up after --timeout seconds, not the OS default
    err = capsys.readouterr().err
    assert err.startswith(f"covidxr.data: error: cannot download {url}") and err.count("\n") == 1
    assert "manually" in err and "prepare covid-chestxray" in err
    assert not list((tmp_path / "d").glob("*.part"))
