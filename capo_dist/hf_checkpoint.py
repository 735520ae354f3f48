"""Hugging Face checkpoints on the learner side: finding one (local directory or hub id),
loading it into ZeRO-3 partitions, and the files that travel with an exported policy.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

# The tokenizer (fast, sentencepiece or BPE vocab/merges), its chat template (transformers 5
# saves it as chat_template.jinja; older repos in chat_template.json or tokenizer_config.json)
# and the generation defaults.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# What the learner needs of a hub repo: config, weights, tokenizer; never the other formats
# (`original/*.pth`, GGUF, ONNX) that many repos also hold.
HUB_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", *SIDE_FILES)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_cache_dir() -> str:
    """The hub cache the environment names now (HF_HUB_CACHE, else HF_HOME/hub, else the default).

    Read at call time: huggingface_hub reads these variables once, at import.
    """
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE if flag is None else flag.upper() in {"1", "ON", "YES", "TRUE"}


def resolve_checkpoint_dir(path_or_id: str | os.PathLike) -> Path:
    """The local directory holding checkpoint `path_or_id`: a directory as is, a hub id resolved.

    A hub id (`meta-llama/Llama-3.2-3B-Instruct`) goes through
    `huggingface_hub.snapshot_download` (config, safetensors, tokenizer and
    generation files only), honouring HF_HOME / HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 (then only the local cache is read). Anything that can
    not be resolved raises FileNotFoundError naming the id, the cache and the fix.
    """
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    text = str(path_or_id)
    if not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"model {text!r} is neither an existing directory nor a hub id like 'org/name': "
            "give the path of a Hugging Face checkpoint directory or a hub model id"
        )
    from huggingface_hub import snapshot_download

    cache, offline = _hub_cache_dir(), _offline()
    try:
        snapshot = Path(
            snapshot_download(
                text, allow_patterns=list(HUB_FILES), cache_dir=cache, local_files_only=offline
            )
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes the same actionable error
        where = "HF_HUB_OFFLINE=1, so only the local cache was read" if offline else "online"
        raise FileNotFoundError(
            f"model {text!r}: not a local directory, and the hub id does not resolve ({where}; "
            f"hub cache {cache}, from HF_HOME={os.environ.get('HF_HOME', '<unset>')}): "
            f"{type(e).__name__}: {e}. Fix: download it once where the hub is reachable "
            f"(`hf download {text}`, or huggingface_hub.snapshot_download) into the HF_HOME every "
            "node sees, log in first for gated models (`hf auth login`), or give a local "
            "checkpoint directory instead"
        ) from e
    if not (snapshot / "config.json").exists() or not any(snapshot.glob("*.safetensors")):
        raise FileNotFoundError(
            f"model {text!r} resolved to {snapshot}, which lacks config.json or *.safetensors "
            "weights (the learner reads safetensors only): re-download it, or convert the "
            "checkpoint to safetensors"
        )
    return snapshot


def load_checkpoint_weights(model: torch.nn.Module, path: Path, rank: int) -> None:
    """Fill a ZeRO-3-partitioned HF model from the safetensors files in `path`.

    One module at a time: every rank gathers the module's parameters, rank 0
    copies the checkpoint tensors in, and DeepSpeed re-partitions them from
    rank 0 on exit — so no rank ever holds more than one module's full
    weights. Checkpoint keys must be the module's parameter names (true of
    dense Llama/Qwen/Mistral checkpoints). A tied head (`tie_weights()` made
    `lm_head.weight` the embedding's parameter) is loaded once, from the
    embedding: tied checkpoints hold no `lm_head.weight`. Every rank reads the
    file headers and raises the same error before any collective if a
    parameter is missing (an untied head absent from the checkpoint, say), so
    a bad checkpoint fails cleanly instead of hanging.
    """
    import deepspeed
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    key_file: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            key_file.update(dict.fromkeys(h.keys(), f))
    modules = [(m_name, m) for m_name, m in model.named_modules() if m._parameters]
    loaded: set[int] = set()
    plan: list[tuple[torch.nn.Module, dict[str, str]]] = []
    for m_name, module in modules:
        names = {}
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{m_name}.{p_name}" if m_name else p_name
            if full in key_file:
                names[p_name] = full
                loaded.add(id(p))
        plan.append((module, names))
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    if missing:
        raise KeyError(
            f"{path}: checkpoint has no tensor for {missing[:5]} ({len(missing)} missing)"
        )
    with ExitStack() as stack, torch.no_grad():
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        for module, names in plan:
            if not names:
                continue
            params = [module._parameters[p] for p in names]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if rank == 0:
                    for p_name, full in names.items():
                        module._parameters[p_name].data.copy_(
                            handles[key_file[full]].get_tensor(full)
                        )


def copy_side_files(src: Path, out: Path) -> None:
    """Copy the tokenizer and generation files of checkpoint `src` next to an export in `out`."""
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
