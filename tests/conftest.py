"""Fixtures shared by the tests; what tests import lives in tests/helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402
from helpers import cnn_functional  # noqa: E402
from helpers import copy_model  # noqa: E402


@pytest.fixture(scope="session")
def saved_cnn(tmp_path_factory):
    """A small compiled CNN saved as .keras (for the CLI and io tests)."""
    case = cnn_functional()
    case.model.compile(optimizer="adam", loss="mse")
    path = tmp_path_factory.mktemp("models") / "cnn.keras"
    case.model.save(path)
    return path


@pytest.fixture
def model_file(saved_cnn, tmp_path):
    """A copy of `saved_cnn` that the test may change."""
    return copy_model(saved_cnn, tmp_path)
