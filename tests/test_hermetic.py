"""The test session is hermetic: nothing it reads or writes under covidxr's home is the user's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from covidxr.data.cache import default_cache_dir
from covidxr.errors import CovidxrError
from covidxr.lungs import load_lung_model
from covidxr.lungs.model import default_lung_model_path


def test_covidxr_home_and_cache_are_the_sessions_own() -> None:
    home = Path.home().resolve()
    for path in (default_lung_model_path(), default_cache_dir(), Path(os.environ["MPLCONFIGDIR"])):
        assert not path.resolve().is_relative_to(home / ".cache"), path


def test_no_lung_model_is_found_unless_a_test_makes_one() -> None:
    with pytest.raises(CovidxrError):
        load_lung_model()
