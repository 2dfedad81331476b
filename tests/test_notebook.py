"""The exploration notebook runs top to bottom on an evaluated tiny run."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from covidxr.evaluation.__main__ import main as evaluate_main

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explore_run.ipynb"
RUN_FILES = ("best.pt", "split.csv", "history.csv", "config.json")


@pytest.fixture(scope="module")
def evaluated_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run, evaluated."""
    run = tmp_path_factory.mktemp("notebook") / "run"
    run.mkdir()
    for name in RUN_FILES:
        shutil.copy2(tiny_run / name, run / name)
    assert evaluate_main(["--checkpoint", str(run / "best.pt"), "--bootstrap", "50", "--workers", "0"]) == 0
    return run


@pytest.mark.slow  # a Jupyter kernel
def test_notebook_runs_on_an_evaluated_run(evaluated_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDXR_RUN", str(evaluated_run))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"evaluation folder: {evaluated_run / 'eval'}" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # the report's figures and the Grad-CAM examples
    shown = re.search(r"Grad-CAM examples shown: (\d+) of (\d+)", text)
    assert shown and int(shown[1]) == int(shown[2]) > 0, text[-500:]
