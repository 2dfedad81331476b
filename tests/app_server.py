"""Helpers for the browser tests: run the real app with ``streamlit run`` on a free local port.

Used by tests/test_app_browser.py, tests/test_app_load.py and tests/test_privacy.py. Chromium is Debian's
(``/usr/bin/chromium``, or ``$COVIDXR_CHROMIUM``); Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app" / "streamlit_app.py"
CHROMIUM = os.environ.get("COVIDXR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
START_TIMEOUT_S = 90
RESULT_TIMEOUT_MS = 120_000


def require_chromium() -> None:
    """Skip the test when there is no Chromium to drive."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (set COVIDXR_CHROMIUM)")


def free_port() -> int:
    """A TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class AppServer:
    """A running ``streamlit run`` of the app.

    Attributes:
        url: its base URL (``http://127.0.0.1:PORT``).
        process: the server process.
        audit: the audit log file it was told to write.
        stdout: file holding the server's standard output.
        stderr: file holding the server's standard error.
    """

    url: str
    process: subprocess.Popen
    audit: Path
    stdout: Path
    stderr: Path

    def output(self) -> str:
        """The server's stdout and stderr so far (for failure messages)."""
        return "".join(p.read_text(errors="replace") for p in (self.stdout, self.stderr) if p.is_file())


def wait_healthy(server: AppServer) -> None:
    """Poll the server's health endpoint until it answers ``ok`` (or the server dies, or time runs out)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"streamlit exited with {server.process.returncode}:\n{server.output()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as response:
                if response.status == 200 and response.read().strip() == b"ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)  # polling interval, not synchronisation
    pytest.fail(f"streamlit did not become healthy in {START_TIMEOUT_S} s:\n{server.output()[-3000:]}")


@contextmanager
def run_app(checkpoint: Path, folder: Path, extra_args: Sequence[str] = (),
            extra_env: Mapping[str, str] | None = None) -> Iterator[AppServer]:
    """Start the app on a free port of 127.0.0.1 and wait until it is healthy; stop it afterwards.

    The server runs in the repository root (so it reads ``.streamlit/config.toml``), headless, without usage
    statistics or file watcher, with ``--checkpoint`` and ``--audit-log FOLDER/audit.jsonl``, and ``COVIDXR_HOME``
    in ``FOLDER/home`` (no lung model from the home folder). Its stdout and stderr
    go to ``FOLDER/streamlit.out`` and ``FOLDER/streamlit.err``.

    Args:
        checkpoint: the checkpoint to serve.
        folder: where the audit log and the server's output go.
        extra_args: more ``streamlit run`` options (before the script's ``--``).
        extra_env: more environment variables for the server.

    Yields:
        The running server.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVIDXR_CHECKPOINT", "COVIDXR_AUDIT_LOG"))}
    env["COVIDXR_HOME"] = str(folder / "home")  # nothing from the home folder (no lung model unless a test adds one)
    env.update(extra_env or {})
    command = [sys.executable, "-m", "streamlit", "run", str(APP.relative_to(REPO)), "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", *extra_args,
               "--", "--checkpoint", str(checkpoint), "--audit-log", str(folder / "audit.jsonl")]
    stdout, stderr = folder / "streamlit.out", folder / "streamlit.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
    server = AppServer(f"http://127.0.0.1:{port}", process, folder / "audit.jsonl", stdout, stderr)
    try:
        wait_healthy(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
