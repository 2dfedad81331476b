"""``evaluate --pdf``: print report.html to report.pdf with headless Chromium, when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from covidxr.errors import one_line

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 180


def find_chromium() -> str | None:
    """The first Chromium-like browser on the PATH (or /usr/bin/chromium), else None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def write_pdf(page: Path, pdf: Path, browser: str | None = None) -> str:
    """Print ``page`` to ``pdf`` with headless Chromium (the report's print stylesheet applies).

    Returns:
        One line saying what was written, or why no PDF was written (no browser, or it failed); the HTML report is
        written either way.
    """
    browser = browser or find_chromium()
    if browser is None:
        return f"no PDF: Chromium is not installed (install it, or print {page} from a browser)"
    tmp = pdf.with_name(f".{pdf.name}.tmp")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
               f"--print-to-pdf={tmp}", page.resolve().as_uri()]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no PDF: {browser} failed ({one_line(exc)})"
    if done.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        return f"no PDF: {browser} exited with status {done.returncode}"
    tmp.replace(pdf)
    return f"pdf: {pdf}"
