"""Shared fixtures: real config composition and the real dev data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real data sets lie in the shared folder beside the checkout; the data configs find them
# through W3S_DATA_HOME, also in the Flower processes that the tests start.
DATA_HOME = REPO_ROOT.parent / "shared" / "data"
os.environ.setdefault("W3S_DATA_HOME", str(DATA_HOME))
WBC_DEV = Path(os.environ["W3S_DATA_HOME"]) / "segmentation_WBC-dev"


@pytest.fixture
def wbc_root() -> Path:
    if not WBC_DEV.is_dir():
        pytest.skip(f"real dev data not found at {WBC_DEV}")
    return WBC_DEV
