"""The package layout's rules, read from the import statements: no import circle (between modules or between stages),
no import from a lower group to a higher one (:data:`LAYERS`), no loose module at the top beyond the basics and the
commands' shims, evaluation and training independent of each other, the app on the predictor, the trained model,
explanations, the reader and the saved-evaluation reader only, and no module past a generous size ceiling.

A module is judged by its concern, not its length: one concern belongs in one module even when that module is long
(a 400-line limit used to split the input gate over five modules, the report over three and the checklist over
three). :data:`MAX_LINES` is therefore only a ceiling that catches accidents (a generated table pasted in, two
modules concatenated), far above any module written on purpose; a module that reaches it is a sign that it holds more
than one concern, not a reason to cut it at an arbitrary line."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "covidxr"
MAX_LINES = 900  # a ceiling against accidents, not a design rule (see the module docstring)
# Thin modules that only keep documented commands (python -m covidxr.NAME) working: they import a stage's CLI.
SHIMS = {"covidxr.train", "covidxr.evaluate", "covidxr.compare", "covidxr.predict", "covidxr.export", "covidxr.gate",
         "covidxr.prepare"}
# What the app may use: the predictor and prediction log, the explanations, the reader, the saved-evaluation reader,
# the lung model, and the readable names of the data sources (a basic module without covidxr imports).
APP_ALLOWED = ("covidxr.inference", "covidxr.model", "covidxr.explain", "covidxr.images.reader", "covidxr.errors",
               "covidxr.evaluation.results", "covidxr.lungs", "covidxr.sources_display")
# The groups from the bottom up: a module may import its own group and the groups below it, never one above. The
# basics (errors, files, utils, html_page, sources_display) sit below all; the commands' shims above all.
LAYERS = ("covidxr.images", "covidxr.preprocessing", "covidxr.networks", "covidxr.lungs", "covidxr.model",
          "covidxr.data", ("covidxr.training", "covidxr.evaluation", "covidxr.explain", "covidxr.inference"),
          ("covidxr.crossval", "covidxr.adapt", "covidxr.bench"))
BASICS = {"covidxr", "covidxr.errors", "covidxr.files", "covidxr.utils", "covidxr.html_page", "covidxr.sources_display"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def covidxr_imports(path: Path) -> Iterator[str]:
    """Every covidxr module that ``path`` imports, at module level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if is_module(n) else node.module for n in names]
        else:
            continue
        yield from (n for n in names if n == "covidxr" or n.startswith("covidxr."))


def graph(folder: Path) -> dict[str, set[str]]:
    return {module_name(p): set(covidxr_imports(p)) - {module_name(p)} for p in sorted(folder.rglob("*.py"))}


def stage(module: str) -> str:
    """The stage sub-package a module belongs to (``covidxr.training``), or the module itself for the basics."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else module


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_graph_reader_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom covidxr.files import atomic_write_text\n\ndef f():\n"
                      "    from covidxr.training import engine\n    import covidxr.images.reader\n")
    assert set(covidxr_imports(source)) == {"covidxr.files", "covidxr.training.engine", "covidxr.images.reader"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_modules():
    assert find_cycle(graph(PACKAGE)) is None


def test_no_import_circle_between_stages():
    stages: dict[str, set[str]] = {}
    for module, imported in graph(PACKAGE).items():
        if module in SHIMS:
            continue
        stages.setdefault(stage(module), set()).update(stage(m) for m in imported)
    for name, imported in stages.items():
        imported.discard(name)
    assert find_cycle(stages) is None


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("covidxr.evaluation", "covidxr.training"),
    ("covidxr.training", "covidxr.evaluation"),
    ("covidxr.data", "covidxr.training"),
    ("covidxr.data", "covidxr.evaluation"),
])
def test_stage_does_not_import(importer, forbidden):
    offenders = {m: sorted(i for i in imported if i.startswith(forbidden))
                 for m, imported in graph(PACKAGE).items() if m.startswith(importer)}
    assert not {m: i for m, i in offenders.items() if i}


def test_app_imports_only_the_predictor_explanations_reader_and_results():
    used = {m for imported in graph(ROOT / "app").values() for m in imported}
    assert used, "the app should use the package"
    assert sorted(m for m in used if not m.startswith(APP_ALLOWED)) == []


def test_app_modules_import_each_other_as_a_package():
    """The page's modules are ``app.NAME``: no flat ``app_*`` scripts, no sibling imported by its bare name."""
    app = ROOT / "app"
    siblings = {p.stem for p in app.glob("*.py")} - {"__init__"}
    assert (app / "__init__.py").is_file()
    assert sorted(p.name for p in app.glob("app_*.py")) == []
    bare = {}
    for path in app.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bare.update({f"{path.name}: {n}": n for n in names if n.split(".")[0] in siblings})
    assert bare == {}


def test_nothing_edits_sys_path():
    """Imports resolve through the installed packages (``pip install -e .``), never through a patched sys.path."""
    edits = {}
    for folder in (PACKAGE, ROOT / "app", ROOT / "tests", ROOT / "benchmarks"):
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                        and node.value.id == "sys"):
                    edits[str(path.relative_to(ROOT))] = node.lineno
    assert edits == {}


def test_no_module_past_the_size_ceiling():
    long = {str(p.relative_to(ROOT)): n for folder in (PACKAGE, ROOT / "app") for p in folder.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def layer(module: str) -> int | None:
    """The index of ``module``'s group in :data:`LAYERS` (None for the basics and the commands' shims)."""
    for index, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in ((group,) if isinstance(group, str) else group)):
            return index
    return None


def test_layer_of_finds_groups():
    assert layer("covidxr.images.reader") == 0 and layer("covidxr.model.trained") == 4
    assert layer("covidxr.evaluation.pipeline") == layer("covidxr.inference.predictor") == 6
    assert layer("covidxr.errors") is None


def rank(module: str) -> int:
    """Where ``module`` sits: the basics lowest, then the groups of :data:`LAYERS`, the commands at the top."""
    if module in BASICS:
        return -1
    found = layer(module)
    return len(LAYERS) if found is None else found


def test_no_import_runs_back_up():
    upward = {m: sorted(i for i in imported if rank(i) > rank(m)) for m, imported in graph(PACKAGE).items()}
    assert {m: i for m, i in upward.items() if i} == {}


def test_the_top_holds_only_the_basics_and_the_commands():
    loose = {module_name(p) for p in PACKAGE.glob("*.py")} - BASICS - {"covidxr.__init__"}
    commands = {m for m in loose if m in SHIMS or (PACKAGE / (m.split(".")[-1] + ".py")).read_text(
        encoding="utf-8").lstrip('"').startswith("``python -m covidxr.")}
    assert sorted(loose - commands) == []
