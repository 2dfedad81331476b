"""One command-line convention: every command has a console script, the project's parser, help on every option,
the same names for the same things (--checkpoint, --data, --out FOLDER, --device {auto,cpu,cuda,mps}) and the same
exit statuses (0 done, 1 done but some inputs failed, 2 bad arguments or input, 130 interrupted) from one helper."""

from __future__ import annotations

import argparse
import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from covidxr import utils
from covidxr.errors import DatasetError
from covidxr.utils import DEVICES, OneLineParser, run_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
COMMAND_PACKAGES = {"training", "evaluation", "crossval", "inference", "explain", "data", "bench", "lungs", "adapt"}


def script_module(target: str) -> ModuleType:
    return importlib.import_module(target.split(":")[0])


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser and sub-command parser, ``python -m covidxr.bench scale`` included."""
    roots = [(name, script_module(target).get_args_parser()) for name, target in sorted(SCRIPTS.items())]
    roots.append(("covidxr-bench scale", importlib.import_module("covidxr.bench.scale").get_args_parser()))
    while roots:
        name, parser = roots.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                roots.extend((f"{name} {sub}", p) for sub, p in action.choices.items())


PARSERS = dict(parsers())


def test_every_command_package_has_a_console_script() -> None:
    packages = {target.split(":")[0].split(".")[1] for target in SCRIPTS.values()}
    assert COMMAND_PACKAGES <= packages and "covidxr-lungs" in SCRIPTS
    for target in SCRIPTS.values():
        assert callable(getattr(script_module(target), target.split(":")[1]))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_the_shared_names(name: str) -> None:
    parser = PARSERS[name]
    assert isinstance(parser, OneLineParser), f"{name}: not the project's parser"
    options = {opt: action for action in parser._actions for opt in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
    if "--device" in options:
        assert tuple(options["--device"].choices) == DEVICES and options["--device"].default == "auto", name
    visible = {opt for opt, action in options.items() if action.help != argparse.SUPPRESS}
    assert not visible & {"--model", "--probe", "--ckpt"}, f"{name}: a checkpoint goes by --checkpoint"
    if "--out" in options:
        assert options["--out"].metavar == "FOLDER", f"{name}: --out is a folder"


def test_no_output_defaults_to_the_temporary_folder() -> None:
    for name, parser in PARSERS.items():
        for action in parser._actions:
            if "--out" in action.option_strings:
                assert not str(action.default or "").startswith("/tmp"), f"{name}: --out defaults to /tmp"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_returns_its_status_through_run_cli(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = script_module(SCRIPTS[name])
    seen: list[argparse.ArgumentParser] = []

    def fake_run_cli(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> int:
        seen.append(parser)
        return 77

    monkeypatch.setattr(module, "run_cli", fake_run_cli)
    assert module.main([]) == 77 and isinstance(seen[0], OneLineParser)


def _parser() -> OneLineParser:
    parser = OneLineParser("python -m covidxr.demo")
    parser.add_argument("--n", type=int, required=True, help="a number")
    return parser


@pytest.mark.parametrize(("argv", "outcome", "status"), [
    (["--n", "1"], None, 0),
    (["--n", "1"], 1, 1),  # done, some inputs failed
    (["--n", "x"], None, 2),  # usage error
    ([], None, 2),
    (["--help"], None, 0),
    (["--n", "1"], DatasetError("no images in x"), 2),
    (["--n", "1"], KeyboardInterrupt(), 130),
])
def test_run_cli_exit_statuses(argv: list[str], outcome: object, status: int,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def run(args: argparse.Namespace) -> int | None:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert run_cli(_parser(), run, argv) == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == (0 if status in (0, 1) else 1)
    if status == 2 and argv:
        assert err.startswith("covidxr.demo: error:")
    if status == 130:
        assert err == "covidxr.demo: interrupted\n"


def test_run_cli_lets_unexpected_errors_through() -> None:
    with pytest.raises(ZeroDivisionError):
        run_cli(_parser(), lambda args: 1 / 0, ["--n", "1"])


def test_old_checkpoint_names_still_work_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    lungs = PARSERS["covidxr-lungs check"].parse_args(["--model", "lungs.pt"])
    assert lungs.checkpoint == Path("lungs.pt")
    assert "--model is deprecated; use --checkpoint" in capsys.readouterr().err
    audit = PARSERS["covidxr-data audit"].parse_args(["data.csv", "--probe", "best.pt"])
    assert audit.checkpoint == Path("best.pt")
    assert "--probe is deprecated; use --checkpoint" in capsys.readouterr().err


def test_out_is_a_folder_and_an_old_file_path_still_works(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert utils.out_file(tmp_path / "run", "best.onnx", "python -m covidxr.export") == tmp_path / "run" / "best.onnx"
    assert capsys.readouterr().err == ""
    assert utils.out_file(tmp_path / "mine.onnx", "best.onnx", "python -m covidxr.export") == tmp_path / "mine.onnx"
    assert "covidxr.export: warning: --out" in capsys.readouterr().err
