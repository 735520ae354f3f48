"""A supervised warm start of the tiny CPU policy, so that RL has something to shape.

A randomly initialised tiny Llama never answers an arithmetic word problem
correctly: every reward is zero and neither GRPO nor CAPO learns anything. This
module trains it briefly, with plain torch, on generated problems whose
solutions are the reference steps most of the time and *flawed* otherwise: one
equation gets a wrong result, and then either the wrong value is carried to
the end (the final answer is wrong) or the solution gets back on track (a
compensating error, or it simply continues from the correct value) so that the
final answer is right by luck. The resulting policy makes outcome errors and
process errors of its own, which is what GRPO's group advantages and CAPO's
step penalties need. Number tokens start with Fourier features of their value
(a stand-in for pretraining); without them the tiny model barely learns
addition and subtraction in a CPU-minutes budget.

The build is deterministic (seeded init and data order, one intra-op thread)
and cached on disk, keyed by a hash of the configuration and prompt template;
the checkpoint is an ordinary Hugging Face directory (weights + tokenizer) with
`warmstart.json` recording the configuration, training figures and the
held-out evaluation of `evaluate_policy`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capo_dist.config import DataConfig
from capo_dist.data import ArithProblem, synthetic_arith
from capo_dist.models import TinyModelSpec, build_tiny_model
from capo_dist.step_checker import solution_is_clean
from capo_dist.types import Problem

try:
    from capo_dist.rewards.verifier import is_correct
except ImportError:  # the verifier's dependencies are missing: a strict final-answer match

    def is_correct(response: str, gold: str) -> bool:
        """True iff the response ends with 'The answer is N.' and N is `gold`."""
        m = re.search(r"The answer is (-?\d+)\.\s*$", response)
        return m is not None and m.group(1) == gold.strip()


logger = logging.getLogger(__name__)

# Bump when a change here changes what a configuration builds (invalidates caches).
WARMSTART_VERSION = 1
META_FILE = "warmstart.json"

# A reference step of `make_arith_problem`: "12 + 7 = 19, so Ava has 19 apples."
_STEP_RE = re.compile(
    r"^(?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<c>\d+), so (?P<who>\w+) has (?P=c) (?P<item>\w+)\.$"
)
# Typical arithmetic slips: off by one or two, a carry missed or added.
_SLIPS = (-10, -2, -1, 1, 2, 10)


# ------------------------------------------------------------- flawed solutions


def _apply(op: str, a: int, b: int) -> int | None:
    """The exact result of one generated operation, None where it is not a valid step."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a - b >= 1 else None
    if op == "*":
        return a * b
    return a // 2 if a % 2 == 0 else None  # "/ 2": the problems only ever halve even numbers


def _carry_forward(eqs: list[re.Match[str]], i: int, wrong: int) -> list[str] | None:
    """Equation steps from step `i` on, when step `i` results in `wrong` and every
    later step computes correctly from the value before it; None when a later
    operation stops being a valid one (halving an odd number, giving away all)."""
    m = eqs[i]
    out = [f"{m['a']} {m['op']} {m['b']} = {wrong}, so {m['who']} has {wrong} {m['item']}."]
    value = wrong
    for m in eqs[i + 1 :]:
        result = _apply(m["op"], value, int(m["b"]))
        if result is None:
            return None
        out.append(
            f"{value} {m['op']} {m['b']} = {result}, so {m['who']} has {result} {m['item']}."
        )
        value = result
    return out


def corrupt_solution(
    ap: ArithProblem, rng: random.Random, flaw_rate: float = 0.3, lucky_share: float = 0.5
) -> tuple[list[str], bool]:
    """One SFT target for `ap`: its steps and whether every step is correct.

    With probability `1 - flaw_rate` it is the reference solution. Otherwise one
    equation step (chosen uniformly) gets a wrong result, a typical slip
    (±1, ±2, ±10); then, with probability `lucky_share`, the solution is still
    right by luck — the next step either compensates (computes from the wrong
    value but lands on the correct one: a second wrong step) or simply carries
    on from the correct value — and otherwise the wrong value is carried
    forward correctly, so the final answer is wrong. The final step stays
    "The answer is N.". Deterministic for a seeded `rng`.
    """
    steps = list(ap.steps)
    if rng.random() >= flaw_rate:
        return steps, True
    eqs = [_STEP_RE.match(s) for s in steps[:-1]]
    if not eqs or any(m is None for m in eqs):
        raise ValueError(f"not a generated arithmetic solution: {steps!r}")
    lucky = rng.random() < lucky_share
    i = rng.randrange(len(eqs))
    m = eqs[i]
    correct = int(m["c"])
    slips = [d for d in _SLIPS if correct + d >= 1]
    rng.shuffle(slips)
    if lucky:
        wrong = correct + slips[0]
        steps[i] = f"{m['a']} {m['op']} {m['b']} = {wrong}, so {m['who']} has {wrong} {m['item']}."
        if i + 1 < len(eqs) and rng.random() < 0.5:  # compensate in the next step
            n = eqs[i + 1]
            steps[i + 1] = (
                f"{wrong} {n['op']} {n['b']} = {n['c']}, so {n['who']} has {n['c']} {n['item']}."
            )
        return steps, False
    # Carried forward: the first slip whose later steps stay valid operations; a
    # slip of +2^h (h = later halvings) always does, so it is the fallback.
    halvings = sum(e["op"] == "/" for e in eqs[i + 1 :])
    tail = next(
        t for d in [*slips, 2**halvings] if (t := _carry_forward(eqs, i, correct + d)) is not None
    )
    final = _STEP_RE.match(tail[-1])["c"]
    return [*steps[:i], *tail, f"The answer is {final}."], False


# ------------------------------------------------------------------ the build


@dataclass(frozen=True)
class WarmStartConfig:
    """Everything that determines a warm-started policy (all of it is in the cache key).

    The SFT set is `train_size` generated problems (seed `seed`; the RL run's
    own problems use `data.seed`, 0 by default, so keep them apart); a share
    `flaw_rate` of its solutions has a wrong step, and a share `lucky_share`
    of those still ends on the gold answer. Training is `steps` AdamW updates
    of `batch_size` sequences, linear warmup then cosine decay to 10 % of `lr`,
    loss on the solution tokens and EOS only. `number_features` is the scale
    of the Fourier features of their value added to the number tokens'
    embeddings before training (0: plain random init); without them the tiny
    model barely learns addition and subtraction within this budget. The
    held-out evaluation samples `eval_samples` responses for each of
    `eval_size` fresh problems (same operation counts) at `eval_temperature`.

    Defaults (measured on one CPU core, ~3 min): sampled accuracy ~0.35,
    ~65 % of responses with a wrong step, ~60 % of 4-sample groups mixed.
    """

    train_size: int = 4000
    seed: int = 1
    min_ops: int = 1
    max_ops: int = 3
    flaw_rate: float = 0.3
    lucky_share: float = 0.5
    steps: int = 1800
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_size: int = 128
    eval_samples: int = 4
    eval_temperature: float = 1.0
    eval_max_new_tokens: int = 96
    number_features: float = 0.2
    spec: TinyModelSpec = field(default_factory=TinyModelSpec)


def encode_example(tok: Any, prompt: str, solution: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + solution + EOS and the SFT labels: -100 on the prompt.

    The prompt is tokenised alone, exactly as the rollout workers tokenise it,
    so the model learns to continue the very ids it is given at sampling time.
    """
    prompt_ids = tok(prompt)["input_ids"]
    answer_ids = tok(solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batch_order(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Example indices, one batch at a time, forever. Each epoch is a seeded
    permutation cut into windows of 16 batches; within a window examples are
    sorted by length (less padding), and the epoch's batches are shuffled."""
    window = batch_size * 16
    for epoch in itertools.count():
        rng = random.Random(seed * 1_000_003 + epoch)
        perm = list(range(len(lengths)))
        rng.shuffle(perm)
        batches = []
        for w in range(0, len(perm), window):
            chunk = sorted(perm[w : w + window], key=lengths.__getitem__)
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def _number_sense(model: Any, tok: Any, scale: float) -> None:
    """Add `scale` x Fourier features of its value (cos/sin at periods 2…2000) to
    the input and output embedding of every number token (`12` and ` 12` alike):
    a stand-in for a pretrained LLM's number sense, whose number embeddings are
    known to be Fourier-like. It makes the tiny model learn + and - in minutes."""
    import torch

    periods = (2, 3, 4, 5, 7, 10, 12, 16, 25, 50, 100, 250, 500, 1000, 2000)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for token_id in range(len(tok)):
            text = tok.decode([token_id]).strip()
            if not text.isdigit() or len(text) > 6:
                continue
            angle = 2 * math.pi * int(text) / torch.tensor(periods, dtype=torch.float64)
            feats = torch.cat([angle.cos(), angle.sin()]).float() * scale
            emb[token_id, : len(feats)] += feats
            head[token_id, : len(feats)] += feats


def _cache_key(cfg: WarmStartConfig, prompt_template: str) -> str:
    """The hash naming a build: configuration, template and code version."""
    blob = json.dumps(
        {"version": WARMSTART_VERSION, "config": asdict(cfg), "template": prompt_template},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start(
    out_root: str | os.PathLike,
    cfg: WarmStartConfig | None = None,
    prompt_template: str = DataConfig.prompt_template,
) -> Path:
    """The warm-started policy's checkpoint dir under `out_root`, built if not cached.

    The directory is `out_root/warm-<key>`, key = hash of (`cfg`, template,
    code version); when it exists it is returned at once. A build writes into
    a temporary directory and renames it into place, so a crash never leaves a
    half-written model and two concurrent builds keep one result. Same
    configuration → bit-identical weights (seeded, one intra-op thread).
    """
    import torch

    cfg = cfg or WarmStartConfig()
    root = Path(out_root)
    out = root / f"warm-{_cache_key(cfg, prompt_template)}"
    if (out / META_FILE).exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".warm-", dir=root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta = _build(staging, cfg, prompt_template)
        (staging / "model" / META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(staging / "model", out)
        except OSError:
            if not (out / META_FILE).exists():
                raise
            # Another process built the same policy first: keep theirs.
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _build(staging: Path, cfg: WarmStartConfig, prompt_template: str) -> dict[str, Any]:
    """Generate the SFT set, build the tiny model, train it, save it to `staging/model`,
    evaluate it; returns the metadata recorded beside the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started, cpu_started = time.perf_counter(), time.process_time()
    train = synthetic_arith(cfg.train_size, cfg.seed, cfg.min_ops, cfg.max_ops)
    rng = random.Random(cfg.seed)
    prompts, solutions, flawed, lucky = [], [], 0, 0
    for ap in train:
        steps, clean = corrupt_solution(ap, rng, cfg.flaw_rate, cfg.lucky_share)
        prompts.append(prompt_template.format(question=ap.problem.question))
        solutions.append("\n\n".join(steps))
        flawed += not clean
        lucky += not clean and steps[-1] == ap.steps[-1]
    texts = [p + s for p, s in zip(prompts, solutions, strict=True)]
    base = build_tiny_model(staging / "base", texts, cfg.spec)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    examples = [encode_example(tok, p, s) for p, s in zip(prompts, solutions, strict=True)]
    if cfg.number_features:
        _number_sense(model, tok, cfg.number_features)

    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )

    def lr_scale(k: int) -> float:
        if k < cfg.warmup_steps:
            return (k + 1) / cfg.warmup_steps
        progress = (k - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    batches = _batch_order([len(ids) for ids, _ in examples], cfg.batch_size, cfg.seed)
    losses: list[float] = []
    model.train()
    for k in range(cfg.steps):
        batch = [examples[i] for i in next(batches)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (k + 1) % 50 == 0 or k + 1 == cfg.steps:
            recent = losses[-50:]
            logger.info(
                "warm start step %d/%d loss %.4f", k + 1, cfg.steps, sum(recent) / len(recent)
            )
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    model.eval()
    final = staging / "model"
    model.save_pretrained(str(final), safe_serialization=True)
    tok.save_pretrained(str(final))

    seen = {ap.problem.question for ap in train}
    held_out = [
        ap.problem
        for ap in synthetic_arith(cfg.eval_size * 2, cfg.seed + 7919, cfg.min_ops, cfg.max_ops)
        if ap.problem.question not in seen
    ][: cfg.eval_size]
    evaluation = evaluate_policy(
        final,
        held_out,
        prompt_template,
        n=cfg.eval_samples,
        temperature=cfg.eval_temperature,
        max_new_tokens=cfg.eval_max_new_tokens,
        seed=cfg.seed,
    )
    tail = losses[-50:]
    return {
        "key": _cache_key(cfg, prompt_template),
        "version": WARMSTART_VERSION,
        "config": asdict(cfg),
        "prompt_template": prompt_template,
        "train": {
            "examples": len(examples),
            "flawed": flawed,
            "lucky": lucky,
            "epochs": round(cfg.steps * cfg.batch_size / len(examples), 3),
            "final_loss": round(sum(tail) / max(1, len(tail)), 5),
            "train_s": round(train_s, 1),
            "train_cpu_s": round(train_cpu_s, 1),
            "params": sum(p.numel() for p in model.parameters()),
        },
        "eval": evaluation,
    }


# ------------------------------------------------------------------ evaluation


def evaluate_policy(
    model_dir: str | os.PathLike,
    problems: Sequence[Problem],
    prompt_template: str,
    n: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """Sample `n` responses per problem (HF generate, pure temperature sampling;
    `temperature=0` is greedy, one response each) and score them as RL would see them.

    Returns `accuracy` (final answer equals gold), `clean_correct` (correct and
    every step passes the symbolic step checker), `wrong_step` (share with at
    least one wrong step), `lucky` (correct despite a wrong step),
    `mixed_groups` (share of problems whose `n` samples are neither all right
    nor all wrong: those give GRPO a non-zero advantage), `mean_tokens`
    (generated tokens incl. EOS) and `truncated` (no EOS within
    `max_new_tokens`). A non-numeric answer may start the verifier's worker
    pool: a script calling this needs an `if __name__ == "__main__":` guard.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if temperature == 0:
        n, sampling = 1, {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0}
    correct: list[list[bool]] = []
    counts = {"clean_correct": 0, "wrong_step": 0, "lucky": 0, "tokens": 0, "truncated": 0}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [tok(prompt_template.format(question=p.question))["input_ids"] for p in chunk]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for r, p in enumerate(prompts):  # left padding
                input_ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                **sampling,
            )[:, width:].tolist()
            for i, p in enumerate(chunk):
                group = []
                for row in out[i * n : (i + 1) * n]:
                    end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else None
                    counts["tokens"] += end or len(row)
                    counts["truncated"] += end is None
                    text = tok.decode(row[:end], skip_special_tokens=True)
                    ok = is_correct(text, p.gold)
                    steps_ok = solution_is_clean(text)
                    counts["clean_correct"] += ok and steps_ok
                    counts["wrong_step"] += not steps_ok
                    counts["lucky"] += ok and not steps_ok
                    group.append(ok)
                correct.append(group)
    total = max(1, len(problems) * n)
    return {
        "problems": len(problems),
        "samples": len(problems) * n,
        "temperature": temperature,
        "accuracy": round(sum(map(sum, correct)) / total, 4),
        "clean_correct": round(counts["clean_correct"] / total, 4),
        "wrong_step": round(counts["wrong_step"] / total, 4),
        "lucky": round(counts["lucky"] / total, 4),
        "mixed_groups": round(sum(0 < sum(g) < len(g) for g in correct) / max(1, len(correct)), 4),
        "mean_tokens": round(counts["tokens"] / max(1, len(problems) * n), 2),
        "truncated": round(counts["truncated"] / max(1, len(problems) * n), 4),
    }
