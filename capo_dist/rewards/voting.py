"""The vote over a response's critiques → a penalty weight per step (DESIGN §1.3).

Over the k VALID critiques of a response (invalid ones abstain), with
c[s] = the number of critiques flagging step s:

| mode           | weight of step s         |
| -------------- | ------------------------ |
| `intersection` | 1 if c[s] == k else 0     |
| `union`        | 1 if c[s] > 0 else 0      |
| `majority`     | 1 if c[s] > k/2 (strict)  |
| `average`      | c[s] / k                  |

k = 0 (every critique invalid) → all weights 0 (outcome reward only).
`vote` handles one response; `vote_batch` a padded batch of them, vectorised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _intersection(counts: np.ndarray, k: np.ndarray) -> np.ndarray:
    return ((counts == k) & (k > 0)).astype(np.float32)


def _union(counts: np.ndarray, k: np.ndarray) -> np.ndarray:
    return (counts > 0).astype(np.float32)


def _majority(counts: np.ndarray, k: np.ndarray) -> np.ndarray:
    return (2 * counts > k).astype(np.float32)


def _average(counts: np.ndarray, k: np.ndarray) -> np.ndarray:
    return (counts / np.maximum(k, 1)).astype(np.float32)


# mode → f(counts [..., S], k [..., 1]) → weights [..., S] in [0, 1].
VOTE_MODES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "intersection": _intersection,
    "majority": _majority,
    "union": _union,
    "average": _average,
}


def _mode_fn(mode: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    try:
        return VOTE_MODES[mode]
    except KeyError:
        raise ValueError(
            f"unknown vote mode {mode!r}; valid modes: {', '.join(VOTE_MODES)}"
        ) from None


def vote(critiques: Sequence[frozenset[int] | None], mode: str, num_steps: int) -> list[float]:
    """Per-step penalty weights in [0, 1] of one response from its parsed critiques.

    `None` critiques are invalid and abstain; indices outside `[0, num_steps)`
    are ignored (the parser already drops them).
    """
    fn = _mode_fn(mode)
    counts = np.zeros(num_steps, dtype=np.int64)
    k = 0
    for c in critiques:
        if c is None:
            continue
        k += 1
        idx = [s for s in c if 0 <= s < num_steps]
        counts[idx] += 1
    return fn(counts, np.asarray(k)).tolist()


def vote_batch(flags: np.ndarray, valid: np.ndarray, mode: str) -> np.ndarray:
    """Vectorised `vote`: flags bool [B, N, S] (critique n of response b flags
    step s), valid bool [B, N] (critique is valid; padding is invalid)
    → weights float32 [B, S]. Padded steps must not be flagged."""
    fn = _mode_fn(mode)
    flags = np.asarray(flags, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if flags.ndim != 3 or valid.shape != flags.shape[:2]:
        raise ValueError(
            f"flags [B, N, S] and valid [B, N] expected, got {flags.shape}, {valid.shape}"
        )
    counts = np.einsum("bns,bn->bs", flags.astype(np.int32), valid.astype(np.int32))
    k = valid.sum(axis=1, keepdims=True)
    return fn(counts, k)


def stack_critiques(
    critiques: Sequence[Sequence[frozenset[int] | None]], num_steps: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pack parsed critiques of B responses into `vote_batch` inputs.

    `critiques[b]` holds response b's parsed critiques (None = invalid).
    Returns flags bool [B, N, S] and valid bool [B, N] with N the most
    critiques of any response and S = `num_steps` (default: 1 + the largest
    flagged index, at least 1). Indices outside `[0, S)` are ignored.
    """
    b_count = len(critiques)
    n_max = max((len(c) for c in critiques), default=0)
    bi: list[int] = []
    ni: list[int] = []
    si: list[int] = []
    valid = np.zeros((b_count, n_max), dtype=bool)
    for b, crits in enumerate(critiques):
        for n, c in enumerate(crits):
            if c is None:
                continue
            valid[b, n] = True
            for s in c:
                bi.append(b)
                ni.append(n)
                si.append(s)
    s_arr = np.asarray(si, dtype=np.int64)
    size = num_steps if num_steps is not None else int(s_arr.max(initial=-1)) + 1
    size = max(size, 1)
    keep = (s_arr >= 0) & (s_arr < size)
    flags = np.zeros((b_count, n_max, size), dtype=bool)
    flags[
        np.asarray(bi, dtype=np.int64)[keep], np.asarray(ni, dtype=np.int64)[keep], s_arr[keep]
    ] = True
    return flags, valid
