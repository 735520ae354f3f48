"""The verifier's in-process decisions and bookkeeping: which checks are decided without
a worker, which are refused, how symbolic results are de-duplicated and cached, and what
each counter counts. Exact counts, so that a wrong branch or an off-by-one shows.

The pool here has a generous limit (60 s per check): these tests are about what is
counted and cached, not about time, and must hold on a loaded machine (they run under
`make mutation`, see pyproject's [tool.mutmut])."""

from __future__ import annotations

import os

import pytest

from capo_dist.rewards.answers import MAX_NESTING
from capo_dist.rewards.verifier import Verifier, VerifierStats

ZERO = VerifierStats().as_dict()


def _nested(depth: int) -> str:
    return "(" * depth + "x" + ")" * depth


def _delta(v: Verifier, before: dict[str, int]) -> dict[str, int]:
    """The counters that changed since `before`, by how much."""
    after = v.stats.as_dict()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_stats_start_at_zero_and_as_dict_names_every_counter():
    assert ZERO == {
        "checks": 0,
        "fast_path": 0,
        "symbolic": 0,
        "cache_hits": 0,
        "no_answer": 0,
        "rejected": 0,
        "unparsed": 0,
        "timeouts": 0,
        "errors": 0,
        "restarts": 0,
    }


def test_constructor_limits_and_defaults():
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        Verifier(timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Verifier(timeout_s=-1.0)
    assert Verifier().timeout_s == 2.0 and Verifier()._cache_size == 4096
    v = Verifier(timeout_s=0.25)  # any positive limit is accepted
    assert v.timeout_s == 0.25 and isinstance(Verifier(timeout_s=3).timeout_s, float)
    assert v.num_workers == min(2, os.cpu_count() or 1)
    assert Verifier(num_workers=3).num_workers == 3
    assert v.start_method == "forkserver" and Verifier(start_method="spawn").start_method == "spawn"
    # math-verify's own (soft) limit inside the worker: 1 s under the hard one, at least 1 s
    assert Verifier(timeout_s=5.0)._soft_timeout_s == 4
    assert Verifier(timeout_s=2.9)._soft_timeout_s == 1
    assert v._soft_timeout_s == 1
    assert v.stats.as_dict() == ZERO


def test_in_process_verdicts_and_refusals_start_no_worker():
    """Equal strings, two plain numbers, a missing answer and too-deep nesting are all
    decided without the pool; each is counted once, in its own counter."""
    v = Verifier(timeout_s=60.0, num_workers=1)
    deep = _nested(MAX_NESTING + 1)
    pairs = [
        ("\\boxed{x+1}", "x + 1", True),  # equal after normalisation (not numbers)
        ("#### 0.5", "\\frac{1}{2}", True),  # exact numbers
        ("\\boxed{3}", "4", False),
        ("\\boxed{-2}", "2", False),
        ("no answer here", "3", False),  # no answer in the response
        ("\\boxed{3}", "", False),  # no gold answer
        ("\\boxed{" + deep + "}", "x", False),  # too deep on the response's side
        ("\\boxed{x}", deep, False),  # too deep on the gold's side
    ]
    responses, golds, expected = zip(*pairs, strict=True)
    assert v.check_many(list(responses), list(golds)) == list(expected)
    assert v.stats.as_dict() == {**ZERO, "checks": 8, "fast_path": 4, "no_answer": 2, "rejected": 2}
    assert v._workers == []  # nothing here needed a worker
    assert v.check_many([], []) == []
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        v.check_many(["a", "b"], ["a"])
    v.close()


@pytest.fixture(scope="module")
def pool():
    v = Verifier(timeout_s=60.0, num_workers=1, cache_size=2)
    yield v
    v.close()


def test_symbolic_checks_are_deduplicated_cached_and_evicted_oldest_first(pool):
    v = pool
    before = v.stats.as_dict()
    a = ("\\boxed{2}", "\\sqrt{4}")  # a number against an expression: symbolic, True
    b = ("\\boxed{1+x}", "x+1")  # True
    c = ("\\boxed{x}", "2x")  # False
    got = v.check_many([a[0], b[0], b[0], c[0]], [a[1], b[1], b[1], c[1]])
    assert got == [True, True, True, False]
    assert _delta(v, before) == {"checks": 4, "symbolic": 3}  # b checked once for two rows
    # cache_size=2: a (the oldest) was evicted; b and c are cached, with their verdicts
    before = v.stats.as_dict()
    assert v.check(*c) is False
    assert v.check(*b) is True  # b becomes the most recently used
    assert _delta(v, before) == {"checks": 2, "cache_hits": 2}
    before = v.stats.as_dict()
    assert v.check(*a) is True  # evicted: checked again, and evicts c (least recently used)
    assert v.check(*b) is True
    assert _delta(v, before) == {"checks": 2, "symbolic": 1, "cache_hits": 1}
    before = v.stats.as_dict()
    assert v.check(*c) is False
    assert _delta(v, before) == {"checks": 1, "symbolic": 1}
    # b and c are cached now; in-process verdicts and cache hits mixed in one call
    before = v.stats.as_dict()
    got = v.check_many(["#### 7", c[0], b[0], "#### 8"], ["7", c[1], b[1], "8"])
    assert got == [True, False, True, True]
    assert _delta(v, before) == {"checks": 4, "fast_path": 2, "cache_hits": 2}


def test_default_number_of_workers(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert Verifier().num_workers == 2
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one worker
    assert Verifier().num_workers == 1


def test_nesting_at_the_limit_goes_to_the_worker():
    """MAX_NESTING deep is still sent to a worker (one deeper is refused, above). math-verify
    spends its whole limit on it, so this pool's limit is short: only the counts matter."""
    v = Verifier(timeout_s=1.0, num_workers=1)
    assert v.check("\\boxed{" + _nested(MAX_NESTING) + "}", "y") is False
    assert v.check("\\boxed{y}", _nested(MAX_NESTING)) is False  # the gold's side
    delta = _delta(v, ZERO)
    assert delta["checks"] == 2 and delta["symbolic"] == 2 and "rejected" not in delta
    v.close()


def test_is_correct_uses_one_shared_verifier_created_on_first_use(monkeypatch):
    from capo_dist.rewards import verifier as verifier_module

    monkeypatch.setattr(verifier_module, "_default", None)  # as in a fresh process
    v = verifier_module.default_verifier()
    assert isinstance(v, Verifier) and verifier_module.default_verifier() is v
    assert verifier_module.is_correct("so \\boxed{3}.", "3") is True  # in-process verdicts
    assert verifier_module.is_correct("so \\boxed{3}.", "4") is False
    assert v.stats.as_dict() == {**ZERO, "checks": 2, "fast_path": 2}
