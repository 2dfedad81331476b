"""The documentation against the code: the site builds strictly, the README's links resolve, every module has the
docstring the generated module index shows, and every command and option that README.md, docs/*.md, app/README.md
and data/README.md show exists in that command's own parser.

The parsers are read, not listed here: ``python -m covidxr.X ARGS`` calls the command's ``main(ARGS)`` with
``argparse.ArgumentParser.parse_known_args`` replaced by a function that hands back the parser instead of parsing, so a
new command, a subcommand or a command that dispatches by hand (``bench scale``) is checked the day it is documented.
``python benchmarks/X.py`` does the same with the script's ``main``; ``streamlit run app/streamlit_app.py -- ARGS``
checks ARGS against the page's parser; ``bash FILE`` checks that FILE exists and that the ``NAME=value`` settings
before it are read by it. Text between ``<!-- docs-check: off ... -->`` and ``<!-- docs-check: on -->`` is skipped
(a rule quoted as written before the flags it names existed).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "app" / "README.md",
               REPO / "data" / "README.md"])
SKIPPED = re.compile(r"<!-- docs-check: off.*?-->.*?<!-- docs-check: on -->", re.S)
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # inline code, possibly wrapped over lines
MODULE_COMMAND = re.compile(r"(?:^|\s)-m\s+(covidxr(?:\.\w+)*)(.*)")
SCRIPT_COMMAND = re.compile(r"(?:^|\s)python3?\s+(benchmarks/[\w/]+\.py)(.*)")
APP_COMMAND = re.compile(r"(?:^|\s)streamlit\s+run\s+(\S+)(.*)")
BASH_COMMAND = re.compile(r"((?:[A-Z][A-Z0-9_]*=\S*\s+)*)bash\s+(\S+\.sh)\b")
END = re.compile(r"\s(?:#|&&|\|\||;|\||>)\s.*|\s#.*")  # where a shell command ends: a comment, a chain, a redirect
FLAG = re.compile(r"--[a-zA-Z][\w-]*")


@dataclass(frozen=True)
class Shown:
    """A piece of code shown in a document."""

    where: str  # FILE:LINE
    text: str


def shown_code(path: Path) -> Iterator[Shown]:
    """Every line of a fenced block (backslash continuations joined) and every inline code span of ``path``."""
    raw = path.read_text(encoding="utf-8")
    text = SKIPPED.sub(lambda m: "\n" * m.group(0).count("\n"), raw)
    name = path.relative_to(REPO).as_posix()
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        pending, start = "", first
        for offset, line in enumerate(block.group(1).split("\n")):
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            if (pending + line).strip():
                yield Shown(f"{name}:{start}", pending + line)
            pending = ""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in SPAN.finditer(prose):
        yield Shown(f"{name}:{prose.count(chr(10), 0, span.start()) + 1}", " ".join(span.group(1).split()))


def words(text: str) -> list[str]:
    """Shell words of one command, up to a comment, a chain or a redirect."""
    text = END.sub("", text)
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in prose
        return text.split()


# ---------------------------------------------------------------------------------------------- reading the parsers


class _Parser(BaseException):
    """Raised instead of parsing: carries the parser a command built (not an Exception, so no handler swallows it)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(main: Callable, argv: list[str], prog: str) -> argparse.ArgumentParser:
    """The parser ``main`` builds for ``argv`` (its first ``parse_known_args`` call), without running the command."""
    original, saved_argv = argparse.ArgumentParser.parse_known_args, sys.argv

    def hand_back(self: argparse.ArgumentParser, args: object = None, namespace: object = None) -> None:
        raise _Parser(self)

    argparse.ArgumentParser.parse_known_args = hand_back  # type: ignore[method-assign]
    sys.argv = [prog, *argv]
    try:
        if inspect.signature(main).parameters:
            main(list(argv))
        else:  # a script whose main() reads sys.argv
            main()
    except _Parser as found:
        return found.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]
        sys.argv = saved_argv
    raise AssertionError(f"{prog} {' '.join(argv)}: ran without building a parser")


@cache
def module_main(module: str) -> Callable:
    """The ``main`` that ``python -m MODULE`` runs (a package's ``__main__``; a shim's imported ``main``)."""
    try:
        imported = importlib.import_module(module)
        if hasattr(imported, "__path__"):
            imported = importlib.import_module(f"{module}.__main__")
    except ModuleNotFoundError as exc:
        raise AssertionError(f"python -m {module}: no such module") from exc
    assert callable(getattr(imported, "main", None)), f"python -m {module}: no main()"
    return imported.main


@cache
def script_main(script: str) -> Callable:
    """The ``main`` of a script run as ``python SCRIPT`` (imported under another name: nothing runs)."""
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script}: no main()"
    return module.main


def app_parser() -> argparse.ArgumentParser:
    from app.settings import _parser

    return _parser()


def is_placeholder(word: str) -> bool:
    """A value written for the reader to fill in (``PATH``, ``RUN/best.pt``, ``{a,b}``, ``...``)."""
    return "..." in word or any(c.isupper() for c in word) or "{" in word or "<" in word


def check_words(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """What is wrong with ``argv`` for ``parser``: unknown options, unknown subcommands, values outside choices."""
    problems = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-[\d.]+", word) and word != "...":
            name, _, inline = word.partition("=")
            action = parser._option_string_actions.get(name)
            if action is None:
                problems.append(f"{parser.prog}: no option {name}")
                i += 1
                continue
            values: list[str] = []
            if inline:
                values = [inline]
            elif action.nargs in (None, "?") or isinstance(action.nargs, int) and action.nargs:
                count = action.nargs if isinstance(action.nargs, int) else 1
                while len(values) < count and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    i += 1
                    values.append(argv[i])
            elif action.nargs in ("+", "*"):
                while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    i += 1
                    values.append(argv[i])
            if action.choices is not None:
                bad = [v for v in values if not is_placeholder(v) and v not in {str(c) for c in action.choices}]
                # nargs "+" may run into positional arguments: only its first value is surely the option's
                problems += [f"{parser.prog}: {name} {v} is not one of {sorted(map(str, action.choices))}"
                             for v in bad[:1] if action.nargs not in ("+", "*") or v == values[0]]
            i += 1
            continue
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subcommands and not is_placeholder(word):
            choices = subcommands[0].choices
            if word not in choices:
                problems.append(f"{parser.prog}: no subcommand {word} (has {', '.join(choices)})")
                return problems
            parser = choices[word]
        i += 1
    return problems


# ------------------------------------------------------------------------------------------------ collecting commands


@dataclass(frozen=True)
class Command:
    where: str
    kind: str  # "module", "script", "app" or "bash"
    target: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.target} {' '.join(self.argv)}"


def commands_in(shown: Shown) -> Iterator[Command]:
    """The commands one piece of shown code runs."""
    shown = Shown(shown.where, END.sub("", shown.text))
    if (m := MODULE_COMMAND.search(shown.text)) and not is_placeholder(m.group(1)):  # not `python -m covidxr.X`
        yield Command(shown.where, "module", m.group(1), tuple(words(m.group(2))))
    elif m := SCRIPT_COMMAND.search(shown.text):
        yield Command(shown.where, "script", m.group(1), tuple(words(m.group(2))))
    elif m := APP_COMMAND.search(shown.text):
        argv = words(m.group(2))
        yield Command(shown.where, "app", m.group(1), tuple(argv[argv.index("--") + 1:] if "--" in argv else []))
    elif m := BASH_COMMAND.search(shown.text):
        yield Command(shown.where, "bash", m.group(2), tuple(m.group(1).split()))


def all_commands() -> list[Command]:
    found = {str(c): c for path in DOCS for shown in shown_code(path) for c in commands_in(shown)}
    return list(found.values())


def command_problems(command: Command) -> list[str]:
    argv = list(command.argv)
    if command.kind in ("module", "script"):
        main = module_main(command.target) if command.kind == "module" else script_main(command.target)
        return check_words(parser_of(main, argv, command.target), argv)
    if command.kind == "app":
        assert (REPO / command.target).is_file(), f"{command.target} does not exist"
        return check_words(app_parser(), argv)
    script = REPO / command.target
    if not script.is_file():
        return [f"{command.target} does not exist"]
    text = script.read_text(encoding="utf-8")
    return [f"{command.target} does not read {setting.split('=')[0]}" for setting in command.argv
            if not re.search(rf"\b{re.escape(setting.split('=')[0])}\b", text)]


COMMANDS = all_commands()


def test_the_documents_show_commands() -> None:
    kinds = {c.kind for c in COMMANDS}
    assert {"module", "script", "app", "bash"} <= kinds, kinds
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command_and_options_exist(command: Command) -> None:
    """Each documented command runs a real module or file, and its options and subcommands are in its parser."""
    assert command_problems(command) == []


def test_the_check_finds_what_does_not_exist() -> None:
    shown = Shown("x:1", "python -m covidxr.train --data PATH --no-such-flag --equalize sideways  # comment --nope")
    (command,) = commands_in(shown)
    assert command.argv == ("--data", "PATH", "--no-such-flag", "--equalize", "sideways")
    problems = command_problems(command)
    assert len(problems) == 2 and "--no-such-flag" in problems[0] and "sideways" in problems[1]
    assert command_problems(Command("x:1", "module", "covidxr.gate", ("fitt", "--band", "1")))[0].endswith(
        "(has fit)")
    assert command_problems(Command("x:1", "module", "covidxr.bench", ("scale", "--images", "10", "--band", "1")))
    assert command_problems(Command("x:1", "bash", "scripts/quickstart.sh", ("NO_SUCH_SETTING=1",)))
    with pytest.raises(AssertionError, match="no such module"):
        command_problems(Command("x:1", "module", "covidxr.nosuchcommand", ()))


# -------------------------------------------------------------------------------------------- options in the prose


@cache
def every_option() -> frozenset[str]:
    """Every option of every covidxr command, its subcommands, the benchmark scripts and the page."""
    parsers = [app_parser()]
    for path in sorted((REPO / "covidxr").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "get_args_parser" for n in tree.body):
            parsers.append(importlib.import_module(module).get_args_parser())
        if path.name == "__main__.py" or 'if __name__ == "__main__"' in path.read_text(encoding="utf-8"):
            command = module.removesuffix(".__main__")
            parsers.append(parser_of(module_main(command), [], command))
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        script = path.relative_to(REPO).as_posix()
        parsers.append(parser_of(script_main(script), [], script))
    options: set[str] = set()
    while parsers:
        parser = parsers.pop()
        options.update(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return frozenset(options)


def prose_options() -> list[tuple[str, str]]:
    """``(FILE:LINE, --flag)`` for every option named in inline code that is not part of a command."""
    found = []
    for path in DOCS:
        for shown in shown_code(path):
            if next(commands_in(shown), None) is None and re.match(r"\[?--[a-zA-Z]", shown.text):
                found += [(shown.where, flag) for flag in FLAG.findall(shown.text)]
    return found


def test_options_named_in_the_prose_exist() -> None:
    """An option written on its own (`--band`, `--lung-crop [--lung-margin 0.05]`) belongs to some command."""
    options = every_option()
    assert "--band" in options and "--images" in options  # a subcommand's and a hand-dispatched command's
    missing = [f"{where}: {flag}" for where, flag in prose_options() if flag not in options]
    assert missing == []


# ---------------------------------------------------------------------------------------- the README and the site


def test_the_examples_train_with_the_quickstarts_recipe() -> None:
    """The README's "train and evaluate" section and every example training run on ``data/kaggle`` (the documents'
    running example) carry the recipe scripts/quickstart.sh trains with by default."""
    quickstart = (REPO / "scripts" / "quickstart.sh").read_text(encoding="utf-8")
    recipe = re.search(r'^RECIPE="\$\{RECIPE-(.*)\}"$', quickstart, re.M).group(1)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### 2. Train and evaluate"):readme.index("### 3.")]
    assert f"`{recipe}`" in section
    examples = [shown for path in DOCS for shown in shown_code(path)
                if "-m covidxr.train " in shown.text and "--data data/kaggle" in shown.text]
    assert len(examples) >= 2 and [s.where for s in examples if recipe not in s.text] == [], recipe


def test_readme_links_resolve() -> None:
    for path in (REPO / "README.md", REPO / "app" / "README.md", REPO / "data" / "README.md"):
        text = path.read_text(encoding="utf-8")
        targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)]
        missing = [t for t in targets if t and not re.match(r"[a-z]+:", t) and not (path.parent / t).exists()]
        assert missing == [], path


def test_every_module_has_a_docstring() -> None:
    """The module index (docs/modules.md) is generated from these; a module without one would show a blank row."""
    missing = [p.relative_to(REPO).as_posix() for folder in ("covidxr", "app", "benchmarks")
               for p in sorted((REPO / folder).rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert missing == []


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link or anchor, a page missing from the nav, a missing picture all fail."""
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    modules = (tmp_path / "modules" / "index.html").read_text(encoding="utf-8")
    assert "covidxr/training/engine.py" in modules and "app/streamlit_app.py" in modules
    architecture = (tmp_path / "architecture" / "index.html").read_text(encoding="utf-8")
    assert "covidxr.inference.predictor" in architecture  # the app's imports, generated
