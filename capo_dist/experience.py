"""The experience maker: judged rollouts → token-level CAPO rewards, advantages, a TrainBatch.

Pure code (no Ray), batched: the verifier decides each response's outcome,
critiques are parsed against the response's own steps, votes are taken over a
padded `[B, N, S]` flag array, each generated token is mapped to its step
through exact character offsets, and the reward and advantage kernels run on
padded `[B, T]` tensors. The metrics it returns are the per-step figures the
driver logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from capo_dist.config import CapoConfig
from capo_dist.rewards.advantages import compute_advantages
from capo_dist.rewards.capo import token_rewards_batch
from capo_dist.rewards.critique_parsers import get_parser
from capo_dist.rewards.groups import first_mixed_rows, group_outcomes, process_gate
from capo_dist.rewards.overlong import overlong_penalty
from capo_dist.rewards.steps import split_steps, token_char_offsets, token_steps
from capo_dist.rewards.voting import vote_batch
from capo_dist.types import JudgedRollout, TrainBatch


@dataclass
class Experience:
    """A training batch plus what was measured while making it."""

    batch: TrainBatch
    metrics: dict[str, float]
    # One JSON-ready record per response: text, steps, token offsets, token rewards and
    # advantages, critiques, the exact prompt the judge model read (`judge_prompt`, or
    # None) and the voted step weights (what the credit report renders).
    samples: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class BatchRecipe:
    """What the driver's config asks of a batch beyond the CAPO reward.

    `truncated` (rollout.truncated): keep | mask (a response cut at the length
    limit gets no loss and takes no part in its group's statistics) |
    soft_penalty (DAPO's `overlong_penalty` over the last `overlong_buffer`
    tokens before `max_new_tokens`, added to the outcome reward).
    `max_groups` (trainer.filter_groups=outcome: rollout.prompts_per_step):
    only the first `max_groups` groups whose outcomes differ are packed for the
    learner; None packs every group.
    """

    truncated: str = "keep"
    max_new_tokens: int = 0
    overlong_buffer: int = 0
    overlong_penalty: float = 0.0
    max_groups: int | None = None


def make_experience(
    judged: Sequence[JudgedRollout],
    tokenizer,
    correct: Sequence[bool],
    cfg: CapoConfig,
    pad_token_id: int,
    *,
    critique_parser: str = "wrong_step_list",
    recipe: BatchRecipe | None = None,
) -> Experience:
    """Score `judged` (whole groups, in order) and pack them for the learner.

    Responses are grouped by problem uid for the advantage, so a problem held
    twice in one step would silently merge two groups: that is refused
    (ValueError) before any work (`capo_dist.data` makes uids unique and a
    step's problems distinct). Critiques are read by the parser named
    `critique_parser` (the judge prompt's; capo_dist.rewards.critique_parsers).

    The metrics describe every response scored (all groups); `advantage_abs_mean`,
    `groups_trained` and the samples describe the rows packed for the learner
    (fewer under `recipe.max_groups`).
    """
    recipe = recipe or BatchRecipe()
    seen = {(j.rollout.problem.uid, j.rollout.group_index) for j in judged}
    if len(seen) < len(judged):
        raise ValueError("a step holds the same problem uid twice: its groups would merge")
    B = len(judged)
    texts = [j.rollout.completion.text for j in judged]
    spans = [split_steps(t) for t in texts]
    num_steps = [max(len(s), 1) for s in spans]
    S = max(num_steps)
    N = max((len(j.critiques) for j in judged), default=0)
    use_judge = cfg.w_process > 0 and N > 0
    parse = get_parser(critique_parser)

    # Critiques → flags [B, N, S] and validity [B, N].
    flags = np.zeros((B, max(N, 1), S), dtype=bool)
    valid = np.zeros((B, max(N, 1)), dtype=bool)
    dropped = invalid = total_critiques = 0
    if use_judge:
        for b, j in enumerate(judged):
            for n, text in enumerate(j.critiques):
                total_critiques += 1
                if text is None:
                    invalid += 1
                    continue
                parsed = parse(text, len(spans[b]))
                dropped += parsed.dropped
                if parsed.wrong is None:
                    invalid += 1
                    continue
                valid[b, n] = True
                if parsed.wrong:
                    flags[b, n, list(parsed.wrong)] = True
        step_weights = torch.from_numpy(vote_batch(flags, valid, cfg.vote)).float()
    else:
        step_weights = torch.zeros(B, S)

    # Which responses count: a truncated one is left out of everything under `mask`.
    truncated = torch.tensor(
        [j.rollout.completion.finish_reason == "length" for j in judged], dtype=torch.bool
    )
    counted = ~truncated if recipe.truncated == "mask" else torch.ones(B, dtype=torch.bool)
    correct_b = torch.tensor([bool(c) for c in correct], dtype=torch.bool)
    uids = [j.rollout.problem.uid for j in judged]
    groups = group_outcomes(uids, correct_b, counted)

    # Tokens → steps, padded [B, T].
    resp = [j.rollout.completion.token_ids for j in judged]
    T = max((len(r) for r in resp), default=1) or 1
    tok_steps = torch.zeros(B, T, dtype=torch.long)
    resp_mask = torch.zeros(B, T)
    offsets: list[list[tuple[int, int]]] = []
    for b, ids in enumerate(resp):
        offsets.append(token_char_offsets(tokenizer, ids) if ids else [])
        if ids:
            tok_steps[b, : len(ids)] = torch.tensor(token_steps(offsets[b], spans[b]))
            resp_mask[b, : len(ids)] = 1.0

    lengths = torch.tensor([len(r) for r in resp], dtype=torch.float32)
    resp_mask *= counted[:, None].float()
    correct_t = correct_b.float()
    gate = process_gate(groups, cfg.all_wrong_groups)
    rewards = token_rewards_batch(
        correct_t,
        tok_steps,
        step_weights * gate[:, None],
        resp_mask,
        w_outcome=cfg.w_outcome,
        w_process=cfg.w_process,
        penalize_correct=cfg.penalize_correct,
        penalize_incorrect=cfg.penalize_incorrect,
    )
    outcome = cfg.w_outcome * correct_t
    overlong = torch.zeros(B)
    if recipe.truncated == "soft_penalty":
        overlong = overlong_penalty(
            lengths, recipe.max_new_tokens, recipe.overlong_buffer, recipe.overlong_penalty
        )
        rewards = rewards + overlong[:, None] * resp_mask
    process = rewards - (outcome + overlong)[:, None] * resp_mask  # <= 0, 0 off the mask
    advantages = compute_advantages(
        rewards, resp_mask, groups.group, mode=cfg.advantage, eps=cfg.adv_eps
    )

    rows = torch.arange(B)
    if recipe.max_groups is not None:
        rows = first_mixed_rows(groups, recipe.max_groups)
    kept = [judged[int(b)] for b in rows]
    batch = _pack(kept, advantages[rows], resp_mask[rows], pad_token_id)
    # A token is penalised when the process term lowered its reward below the outcome's.
    penalised = (process < -1e-9).float() * resp_mask
    n_tokens = float(resp_mask.sum())
    tokens = resp_mask.sum(1).clamp(min=1)
    per_response_reward = (rewards * resp_mask).sum(1) / tokens
    has_flag = step_weights.amax(1) > 0
    kept_mask = resp_mask[rows]
    metrics = {
        "reward_mean": _mean(per_response_reward, counted),
        "reward_outcome_mean": _mean(outcome + overlong, counted),
        "reward_process_mean": _mean(process.sum(1) / tokens, counted),
        "reward_overlong_mean": _mean(overlong, counted),
        "accuracy": float(correct_t.mean()),
        "clean_correct": float((correct_t.bool() & ~has_flag).float().mean()),
        "process_penalty_rate": float(penalised.sum() / max(n_tokens, 1.0)),
        "judge_invalid_rate": invalid / total_critiques if total_critiques else 0.0,
        "judge_abstain_rate": _mean(torch.from_numpy(~valid.any(1)).float(), counted)
        if use_judge
        else 0.0,
        "judge_dropped_indices": float(dropped),
        "response_length": float(lengths.mean()) if B else 0.0,
        "response_length_min": float(lengths.min()) if B else 0.0,
        "response_length_max": float(lengths.max()) if B else 0.0,
        "response_tokens": float(lengths.sum()),
        "truncated_share": float(truncated.float().mean()) if B else 0.0,
        "zero_variance_group_share": float(groups.constant.float().mean()) if B else 0.0,
        "all_wrong_group_share": float(groups.all_wrong.float().mean()) if B else 0.0,
        "groups": float(groups.constant.numel()),
        "groups_trained": float(len(dict.fromkeys(uids[int(b)] for b in rows))),
        "num_steps_mean": float(np.mean([len(s) for s in spans])) if spans else 0.0,
        "advantage_abs_mean": float(
            (advantages[rows].abs() * kept_mask).sum() / max(float(kept_mask.sum()), 1.0)
        ),
    }
    samples = [
        {
            "uid": j.rollout.problem.uid,
            "group_index": j.rollout.group_index,
            "question": j.rollout.problem.question,
            "gold": j.rollout.problem.gold,
            "response": texts[b],
            "correct": bool(correct[b]),
            "steps": [list(sp) for sp in spans[b]],
            "token_offsets": [list(o) for o in offsets[b]],
            "token_rewards": [round(float(x), 4) for x in rewards[b, : len(resp[b])]],
            "advantages": [round(float(x), 4) for x in advantages[b, : len(resp[b])]],
            "critiques": list(j.critiques),
            "judge_prompt": j.judge_prompt,
            "step_weights": [round(float(x), 4) for x in step_weights[b, : len(spans[b])]],
            "vote": cfg.vote,
            "critique_parser": critique_parser,
            "truncated": bool(truncated[b]),
        }
        for b, j in ((int(b), judged[int(b)]) for b in rows)
    ]
    return Experience(batch=batch, metrics=metrics, samples=samples)


def _mean(values: torch.Tensor, where: torch.Tensor) -> float:
    """Mean of `values` [B] over the rows `where` [B] bool is set (0.0 if none)."""
    return float(values[where].mean()) if bool(where.any()) else 0.0


def _pack(
    judged: Sequence[JudgedRollout], advantages: torch.Tensor, resp_mask: torch.Tensor, pad: int
) -> TrainBatch:
    """Right-padded [prompt; response] rows with response-aligned advantages and log-probs."""
    B = len(judged)
    lengths = [
        len(j.rollout.prompt_token_ids) + len(j.rollout.completion.token_ids) for j in judged
    ]
    L = max(lengths, default=1)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.long)
    loss_mask = torch.zeros(B, L)
    adv = torch.zeros(B, L)
    sampler = torch.zeros(B, L)
    for b, j in enumerate(judged):
        p, c = j.rollout.prompt_token_ids, j.rollout.completion
        n_p, n_c = len(p), len(c.token_ids)
        input_ids[b, : n_p + n_c] = torch.tensor(list(p) + list(c.token_ids), dtype=torch.long)
        attention[b, : n_p + n_c] = 1
        loss_mask[b, n_p : n_p + n_c] = resp_mask[b, :n_c]
        adv[b, n_p : n_p + n_c] = advantages[b, :n_c]
        if c.logprobs:
            sampler[b, n_p : n_p + n_c] = torch.tensor(c.logprobs[:n_c], dtype=torch.float32)
    version = torch.tensor([j.rollout.policy_version for j in judged], dtype=torch.long)
    return TrainBatch(input_ids, attention, loss_mask, adv, sampler, version)
