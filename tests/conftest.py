"""Shared fixtures: the path to ../shared/data (read by path, never copied)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repo; tests that need it skip with the reason if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (clone the repo beside shared/)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def model_build_dir(tmp_path_factory) -> Path:
    """One directory for the locally built tiny policy, shared by every run in the session."""
    return tmp_path_factory.mktemp("models")
