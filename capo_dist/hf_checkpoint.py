"""Hugging Face checkpoints on the learner side: loading one into ZeRO-3 partitions, and
the files that travel with an exported policy.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def load_checkpoint_weights(model: torch.nn.Module, path: Path, rank: int) -> None:
    """Fill a ZeRO-3-partitioned HF model from the safetensors files in `path`.

    One module at a time: every rank gathers the module's parameters, rank 0
    copies the checkpoint tensors in, and DeepSpeed re-partitions them from
    rank 0 on exit — so no rank ever holds more than one module's full
    weights. Checkpoint keys must be the module's parameter names (true of
    dense Llama/Qwen/Mistral checkpoints). Every rank reads the file headers
    and raises the same error before any collective if a parameter is
    missing, so a bad checkpoint fails cleanly instead of hanging.
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
