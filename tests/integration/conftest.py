"""Fixtures for tests that start real Flower processes."""

import pytest

from support.flower_processes import stop_processes


@pytest.fixture
def flwr_home(tmp_path):
    """A private FLWR_HOME; every process started under it is stopped afterwards."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    yield home
    stop_processes(str(home))
