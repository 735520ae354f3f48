"""Learner memory for long responses: peak memory and tokens/s of one train step on CPU.

The learner's real update (`capo_dist.ppo_update.PPOUpdate.train_step` on a
one-rank DeepSpeed ZeRO-3 engine over `LogprobModel`, gloo, CPU) for a small
Llama-shaped policy with a large vocabulary (hidden 256, 4 layers, 32,768
tokens by default, random weights), on ONE batch of mixed-length responses
(the same rows for every configuration), at two response lengths:

* today          — padded micro-batches of `micro_batch_size` rows, full logits
* checkpointing  — `gradient_checkpointing`
* chunked        — `logprob_chunk_size` positions per LM-head chunk
* packing        — `max_tokens_per_micro_batch` = the longest row's length (a packed
                   micro-batch never holds more tokens than one padded row)
* all            — the three together

Each configuration runs in a FRESH subprocess: build the engine, run one
small warm-up step (allocates the optimizer state), then reset the kernel's
peak-RSS mark (`/proc/self/clear_refs` ← 5) and run the measured step; peak
memory = VmHWM after the step − RSS before it (the step's own high-water
mark: activations, logits, gradients; weights and optimizer state excluded).
tokens/s = real (non-padding) tokens of the batch / wall seconds of the step,
the median of `--repeats` steps on the same batch (the first included).

Goals (issue 13): peak memory of "all" ≤ 0.4× today's, tokens/s ≥ 1.0× today's.

Run: `python -m benchmarks.learner_memory` (`--quick`: smaller model, batch and
lengths, for a smoke pass). Pinned to one core (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks._common import REPO, last_json_line, pin_one_core, report

CONFIGS: dict[str, dict[str, bool]] = {
    "today": {},
    "checkpointing": {"gradient_checkpointing": True},
    "chunked": {"chunked": True},
    "packing": {"packing": True},
    "all": {"gradient_checkpointing": True, "chunked": True, "packing": True},
}


def _rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _batch(rows: int, max_response: int, prompt: int, vocab: int, seed: int = 0):
    """Right-padded rows: a `prompt`-token prompt and a response of 1/4..1 × max_response."""
    import torch

    from capo_dist.types import TrainBatch

    g = torch.Generator().manual_seed(seed)
    # spread evenly over [max/4, max], shuffled: mixed lengths, the longest always present
    lengths = torch.linspace(max_response // 4, max_response, rows).round().long()
    lengths = lengths[torch.randperm(rows, generator=g)]
    width = prompt + max_response
    ids = torch.zeros(rows, width, dtype=torch.long)
    att = torch.zeros_like(ids)
    mask = torch.zeros(rows, width)
    for r, n in enumerate(lengths.tolist()):
        ids[r, : prompt + n] = torch.randint(3, vocab, (prompt + n,), generator=g)
        att[r, : prompt + n] = 1
        mask[r, prompt : prompt + n] = 1
    adv = torch.randn(rows, width, generator=g) * mask
    sampler = -torch.rand(rows, width, generator=g) * mask
    return TrainBatch(ids, att, mask, adv, sampler)


def run_one(args: argparse.Namespace) -> dict:
    """One configuration at one length, in this (fresh) process."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from capo_dist.deepspeed_setup import deepspeed_config, quiet_deepspeed, skip_shm_comm_op
    from capo_dist.learner import LearnerConfig
    from capo_dist.logprob_model import LogprobModel
    from capo_dist.ppo_update import PPOUpdate

    opts = CONFIGS[args.config]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0")
    os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")
    quiet_deepspeed()
    skip_shm_comm_op()
    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    width = args.prompt + args.length
    cfg = LearnerConfig(
        model_path="(built here)",
        lr=1e-5,
        micro_batch_size=args.micro_batch_size,
        gradient_checkpointing=opts.get("gradient_checkpointing", False),
        logprob_chunk_size=args.chunk if opts.get("chunked") else 0,
        max_tokens_per_micro_batch=width if opts.get("packing") else 0,
    )
    hf = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=width,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(hf)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    engine, *_ = deepspeed.initialize(
        model=LogprobModel(model, cfg.logprob_chunk_size),
        optimizer=optimizer,
        config=deepspeed_config(cfg),
    )
    update = PPOUpdate(cfg, engine, None, torch.device("cpu"), 0, 1)
    update.train_step(_batch(2, 16, 8, args.vocab, seed=1))  # warm-up: optimizer state
    batch = _batch(args.rows, args.length, args.prompt, args.vocab)
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        how = "VmHWM after the step minus VmRSS before it (clear_refs reset)"
    except OSError:
        how = "ru_maxrss-style VmHWM (could not reset: includes the build's peak)"
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        metrics = update.train_step(batch)
        walls.append(time.perf_counter() - t0)
        if len(walls) == 1:
            peak = _rss_kib("VmHWM") - before
            first = metrics
    seconds = sorted(walls)[len(walls) // 2]
    metrics = first
    tokens = int(batch.attention_mask.sum())
    return {
        "config": args.config,
        "length": args.length,
        "peak_mib": peak / 1024,
        "seconds": seconds,
        "tokens": tokens,
        "padded_tokens": int(batch.attention_mask.numel()),
        "tokens_per_s": tokens / seconds,
        "loss": metrics["loss"],
        "entropy": metrics["entropy"],
        "how": how,
        "walls": walls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke pass")
    ap.add_argument("--lengths", default=None, help="response lengths (default 1024,2048)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512, help="logprob_chunk_size when chunked")
    ap.add_argument("--repeats", type=int, default=3, help="steps timed (median)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--one", dest="config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29611, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.layers, args.chunk, args.repeats = 8192, 64, 2, 128, 1
        args.lengths = args.lengths or "256"
    lengths = [int(x) for x in (args.lengths or "1024,2048").split(",")]
    if args.config is not None:  # the child: one measurement, one JSON line
        pin_one_core()
        print(json.dumps(run_one(args)))
        return

    results: dict[int, dict[str, dict]] = {}
    for length in lengths:
        for name in args.configs.split(","):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.learner_memory",
                *("--one", name, "--length", str(length)),
                *("--rows", str(args.rows), "--micro-batch-size", str(args.micro_batch_size)),
                *("--prompt", str(args.prompt), "--vocab", str(args.vocab)),
                *("--hidden", str(args.hidden), "--layers", str(args.layers)),
                *("--chunk", str(args.chunk), "--repeats", str(args.repeats)),
                *("--port", str(29611 + len(results))),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} at {length} failed:\n{out.stderr[-3000:]}")
            results.setdefault(length, {})[name] = last_json_line(out.stdout)

    rows: list[tuple[str, str]] = []
    payload: dict = {"lengths": lengths, "rows": args.rows, "vocab": args.vocab, "results": {}}
    for length, by in results.items():
        base = by.get("today")
        for name, r in by.items():
            mem = r["peak_mib"] / base["peak_mib"] if base else float("nan")
            speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            rows.append(
                (
                    f"{length} tok, {name}",
                    f"peak {r['peak_mib']:8.0f} MiB ({mem:4.2f}x)  "
                    f"{r['tokens_per_s']:7.0f} tok/s ({speed:4.2f}x)  loss {r['loss']:+.6f}",
                )
            )
            payload["results"].setdefault(str(length), {})[name] = {
                **{k: r[k] for k in ("peak_mib", "tokens_per_s", "seconds", "tokens", "loss")},
                "mem_ratio": mem,
                "speed_ratio": speed,
            }
        rows.append((f"{length} tok, how", base["how"] if base else ""))
    alls = [by["all"] for by in payload["results"].values() if "all" in by]
    payload["all_mem_ratio"] = max((a["mem_ratio"] for a in alls), default=float("nan"))
    payload["all_speed_ratio"] = min((a["speed_ratio"] for a in alls), default=float("nan"))
    report("learner_memory", rows, payload)


if __name__ == "__main__":
    main()
