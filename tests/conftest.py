"""Shared fixtures: real config composition and the real dev data location."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WBC_DEV = REPO_ROOT.parent / "shared" / "data" / "segmentation_WBC-dev"


@pytest.fixture
def wbc_root() -> Path:
    if not WBC_DEV.is_dir():
        pytest.skip(f"real dev data not found at {WBC_DEV}")
    return WBC_DEV
