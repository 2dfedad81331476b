"""Project exceptions: every failure a user can cause surfaces as one of these, with a one-line message."""


class CovidxrError(Exception):
    """Base class of all errors covidxr raises on purpose."""


class ImageReadError(CovidxrError):
    """An image file or upload could not be read as a chest X-ray (message names the file and the reason)."""


class DatasetError(CovidxrError):
    """A dataset folder or manifest is missing, empty or inconsistent."""


class CheckpointError(CovidxrError):
    """A checkpoint file is missing, unsafe, corrupt or does not match what was asked for."""
