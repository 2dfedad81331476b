"""Project exceptions: every failure a user can cause surfaces as one of these, with a one-line message."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """Return the informative part of a (multi-line) exception message on one line, at most ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."



class CovidxrError(Exception):
    """Base class of all errors covidxr raises on purpose."""


class ImageReadError(CovidxrError):
    """An image file or upload could not be read as a chest X-ray (message names the file and the reason)."""


class DatasetError(CovidxrError):
    """A dataset folder or manifest is missing, empty or inconsistent."""


class CheckpointError(CovidxrError):
    """A checkpoint file is missing, unsafe, corrupt or does not match what was asked for."""
