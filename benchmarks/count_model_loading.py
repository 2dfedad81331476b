"""Count how the package turns a checkpoint into a network (issue #28), from the source alone (nothing is run).

    python benchmarks/count_model_loading.py [REPO]      # REPO: a checkout (default: this one)

Prints four counts, each with the places it found:

* ``checkpoint dict -> network``: calls of ``model_from_checkpoint`` (the function that rebuilds a network from a
  checkpoint dictionary) and of the wrappers that passed a dictionary to it (``load_classifier``,
  ``build_eval_model``).
* ``TrainedModel.load callers``: places that load a checkpoint file as one typed model.
* ``raw-dict signatures``: functions with a parameter named ``ckpt``/``ckpts`` (the dictionary ``load_checkpoint``
  returns), outside the loader (``covidxr/model/checkpoint.py``, ``covidxr/model/``), the lung model and training's own
  save/resume.
* ``evaluation predictors``: ``Predictor.from_checkpoint`` calls in ``covidxr/evaluation/``.
* ``evaluation Grad-CAM``: calls computing heat maps in ``covidxr/evaluation/`` (``compute_cam``, ``predict*`` with a
  ``cam=`` argument, ``run(..., cams=True)``).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

BUILDERS = {"model_from_checkpoint", "load_classifier", "build_eval_model"}
LOADER = ("covidxr/model/checkpoint.py", "covidxr/model/", "covidxr/lungs/")  # lungs: the lung model's own checkpoints
TRAINING_OWN = ("covidxr/training/trainer.py", "covidxr/training/__main__.py")


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}" if isinstance(func.value, (ast.Name, ast.Attribute)) else func.attr
    return ""


def _files(root: Path) -> Iterator[tuple[str, ast.AST]]:
    for path in sorted((root / "covidxr").rglob("*.py")):
        yield str(path.relative_to(root)), ast.parse(path.read_text(encoding="utf-8"))


def count(root: Path) -> dict[str, list[str]]:
    """The four lists of places (``file:line name``) in the checkout at ``root``."""
    found: dict[str, list[str]] = {"checkpoint dict -> network": [], "TrainedModel.load callers": [],
                                   "raw-dict signatures": [], "evaluation predictors": [], "evaluation Grad-CAM": []}
    for rel, tree in _files(root):
        evaluation = rel.startswith("covidxr/evaluation/")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _name(node.func)
                last = name.rsplit(".", 1)[-1]
                if last in BUILDERS:
                    found["checkpoint dict -> network"].append(f"{rel}:{node.lineno} {name}")
                if name.endswith("TrainedModel.load"):
                    found["TrainedModel.load callers"].append(f"{rel}:{node.lineno} {name}")
                if evaluation and name.endswith("Predictor.from_checkpoint"):
                    found["evaluation predictors"].append(f"{rel}:{node.lineno} {name}")
                keywords = {k.arg: k.value for k in node.keywords}
                cams = keywords.get("cams")
                if evaluation and (last == "compute_cam" or (last.startswith("predict") and "cam" in keywords
                                                             and not (isinstance(keywords["cam"], ast.Constant)
                                                                      and keywords["cam"].value is None))
                                   or (last == "run" and isinstance(cams, ast.Constant) and cams.value is True)):
                    found["evaluation Grad-CAM"].append(f"{rel}:{node.lineno} {name}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if rel.startswith(LOADER) or rel in TRAINING_OWN:
                    continue
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.arg in ("ckpt", "ckpts") for a in args):
                    found["raw-dict signatures"].append(f"{rel}:{node.lineno} {node.name}")
    return found


def main(argv: list[str]) -> int:
    """Print the counts for the checkout named in ``argv`` (default: this one)."""
    parser = argparse.ArgumentParser(prog="python benchmarks/count_model_loading.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("repo", nargs="?", type=Path, default=Path(__file__).resolve().parents[1],
                        help="a checkout of covidxr (default: this one)")
    root = parser.parse_args(argv).repo.resolve()
    for key, places in count(root).items():
        print(f"{key}: {len(places)}")
        for place in places:
            print(f"    {place}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
