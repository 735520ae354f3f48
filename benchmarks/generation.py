"""Generation: vLLM (CPU build) vs Hugging Face `generate`, same model, prompts and sampling.

Both engines are built with `capo_dist.engines.make_engine("vllm" | "hf", ...)`
— exactly what the rollout workers use — each in its own child process (vLLM
on CPU rebinds the process's OpenMP threads; a fresh process keeps the two
sides independent). Both run with the same number of threads: ONE by
default, as in a run, where a rollout worker is a 1-CPU Ray actor and Ray
sets OMP_NUM_THREADS=1, so its vLLM engine computes on one thread.

Prompts: `--prompts` generated arithmetic word problems
(`capo_dist.data.synthetic_arith`) in the run's prompt template; `n` samples
per prompt, `max_tokens`, `temperature` as a rollout step uses them (one
batched `generate` call = one rollout step). After one untimed warm-up call,
`--repeats` calls are timed; tokens/s = completion tokens generated (EOS
included, as in `Completion.token_ids`) / seconds, median over the repeats.

Models: the tiny_cpu policy (`capo_dist.models`; its vocabulary is what the
BPE trainer reaches on the run's corpus, so it is smaller than the configured
2048 and the model has well under 1 M parameters) and a larger config-built
Llama (hidden 512, 8 layers, ~28 M parameters, same builder; `--no-large`
skips it). The parameter counts printed are read from the checkpoints.
`--cores N` gives both children N cores (process affinity; vLLM then binds
its OpenMP threads to them, HF gets `torch.set_num_threads(N)`; 0 = all the
cores): on a busy machine a 2-thread OpenMP team whose threads keep being
descheduled can be many times slower than one thread (seen here: HF decode
steps 40x slower), so compare figures taken at the same --cores.
Run: `python -m benchmarks.generation` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks._common import REPO, last_json_line, median, report

LARGE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "vocab_size": 2048,
}


def model_paths(large: bool) -> dict[str, str]:
    """The tiny_cpu policy (built as the trainer builds it) and, optionally, a larger one."""
    import tempfile

    from benchmarks._common import bench_build_dir, compose_run_config
    from capo_dist.models import TinyModelSpec, build_tiny_model
    from capo_dist.trainer import load_problems, prepare_policy

    cfg = compose_run_config(tempfile.gettempdir(), [])
    corpus = load_problems(cfg)[2]
    paths = {"tiny": prepare_policy(cfg, corpus)}
    if large:
        spec = TinyModelSpec(**LARGE, num_key_value_heads=LARGE["num_attention_heads"])
        name = "bench-gen-{hidden_size}x{num_hidden_layers}".format(**LARGE)
        paths["large"] = str(build_tiny_model(os.path.join(bench_build_dir(), name), corpus, spec))
    return paths


def checkpoint_params(path: str) -> int:
    """Parameters stored in a checkpoint directory (read from the safetensors headers)."""
    import math

    from safetensors import safe_open

    total = 0
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as h:
                total += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return total


def child(args) -> None:
    """One engine, one model: prints one JSON line with its timings."""
    import torch

    from capo_dist.data import synthetic_arith
    from capo_dist.engines import make_engine
    from capo_dist.types import SamplingSpec

    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    engine = make_engine(
        args.child, args.model, dtype="float32", max_model_len=1024, kv_cache_space_gib=0.5, seed=0
    )
    start_s = time.perf_counter() - t0
    tok = engine.tokenizer()
    template = (
        "Question: {question}\nAnswer step by step, one step per paragraph, "
        "and end with 'The answer is N.'\n\n"
    )
    problems = [a.problem for a in synthetic_arith(args.prompts, seed=1)]
    prompts = [tok(template.format(question=p.question))["input_ids"] for p in problems]

    def once(seed: int) -> tuple[int, float]:
        spec = SamplingSpec(
            n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, seed=seed
        )
        t = time.perf_counter()
        out = engine.generate(prompts, spec)
        dt = time.perf_counter() - t
        return sum(len(c.token_ids) for group in out for c in group), dt

    warm_tokens, warm_s = once(1000)
    runs = [once(i) for i in range(args.repeats)]
    rates = [n / dt for n, dt in runs]
    print(
        json.dumps(
            {
                "tokens_per_s": median(rates),
                "all_tokens_per_s": rates,
                "tokens": [n for n, _ in runs],
                "seconds": [dt for _, dt in runs],
                "warmup_s": warm_s,
                "start_s": start_s,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    if hasattr(engine, "close"):
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cores",
        type=int,
        default=1,
        help="cores for each engine (0: all; default 1, as in a run)",
    )
    ap.add_argument("--no-large", action="store_true", help="only the tiny_cpu policy")
    ap.add_argument("--quick", action="store_true", help="tiny model, short generations")
    ap.add_argument("--child", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.no_large, args.max_tokens, args.repeats = True, 32, 2
    if args.child:
        child(args)
        return

    paths = model_paths(large=not args.no_large)
    results: dict[str, dict[str, dict]] = {}
    for name, path in paths.items():
        results[name] = {}
        for backend in ("vllm", "hf"):
            print(f"[generation] {name} model, {backend} ...", flush=True)
            cmd = [
                sys.executable, "-m", "benchmarks.generation", "--child", backend,
                "--model", path, "--prompts", str(args.prompts), "--n", str(args.n),
                "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
                "--repeats", str(args.repeats), "--cores", str(args.cores),
            ]  # fmt: skip
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
            figures = last_json_line(out.stdout)
            if out.returncode != 0 or figures is None:
                raise SystemExit(
                    f"{backend} on {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}"
                )
            results[name][backend] = figures

    params = {name: checkpoint_params(path) for name, path in paths.items()}

    rows = [
        (
            "sampling",
            f"{args.prompts} prompts × n={args.n}, max_tokens={args.max_tokens}, "
            f"temperature={args.temperature}, median of {args.repeats} after 1 warm-up",
        )
    ]
    ratio = {}
    for name, r in results.items():
        v, h = r["vllm"], r["hf"]
        ratio[name] = v["tokens_per_s"] / h["tokens_per_s"]
        rows.append(
            (
                f"{name} (~{params[name] / 1e6:.1f} M params)",
                f"vLLM {v['tokens_per_s']:8.0f} tok/s   HF {h['tokens_per_s']:8.0f} tok/s   "
                f"vLLM/HF {ratio[name]:.2f}x   (threads {v['threads']}/{h['threads']}; "
                f"start {v['start_s']:.1f}/{h['start_s']:.1f} s, "
                f"first call {v['warmup_s']:.1f}/{h['warmup_s']:.1f} s)",
            )
        )
    report(
        "generation",
        rows,
        {
            "vllm_tokens_per_s": {
                k: round(r["vllm"]["tokens_per_s"], 1) for k, r in results.items()
            },
            "hf_tokens_per_s": {k: round(r["hf"]["tokens_per_s"], 1) for k, r in results.items()},
            "ratio": {k: round(v, 3) for k, v in ratio.items()},
            "params": params,
            "start_s": {k: {b: round(r[b]["start_s"], 2) for b in r} for k, r in results.items()},
            "prompts": args.prompts,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "repeats": args.repeats,
            "cores": args.cores,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
