"""The rule-based outcome verifier: is a response's final answer equal to the gold answer?

Model output is untrusted. The answer is extracted and normalised in-process
by bounded string code (`answers.py`); plain numbers/fractions are compared
exactly in-process (the fast path, which decides GSM8K-style checks without any
parser). Everything else goes to a small pool of worker processes running
math-verify (`_symbolic.py`), each check under a hard wall-clock limit: a
worker that does not answer in time is killed and replaced, a worker that
crashes is replaced, and either way the check is False with a counted reason.
Nothing here calls `eval` or `sympify`/`parse_expr` on model text.

`Verifier` is the pool; `extract_answer`/`is_correct` use a lazily created
shared default one.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait

from capo_dist.rewards.answers import (
    MAX_ANSWER_CHARS,
    MAX_NESTING,
    extract_answer,
    nesting_depth,
    normalize_answer,
    parse_number,
)

__all__ = ["Verifier", "VerifierStats", "extract_answer", "gold_answer", "is_correct"]

logger = logging.getLogger(__name__)

_WORKER_MODULE = "capo_dist.rewards._symbolic"
# How long a fresh worker may take to import math-verify and say "ready".
_START_TIMEOUT_S = 120.0
# Consecutive failed worker starts after which the pool gives up for a call.
_MAX_START_FAILURES = 3


@dataclass
class VerifierStats:
    """Counters of a `Verifier` since creation (for metrics)."""

    checks: int = 0
    fast_path: int = 0  # decided in-process (equal strings or exact numbers)
    symbolic: int = 0  # sent to a worker (after de-duplication and cache)
    cache_hits: int = 0
    no_answer: int = 0  # response (or gold) without an extractable answer
    rejected: int = 0  # refused before the worker (nesting deeper than MAX_NESTING)
    unparsed: int = 0  # math-verify read no expression from one side (False)
    timeouts: int = 0  # worker killed at the hard limit, or math-verify's soft limit
    errors: int = 0  # parser/sympy failures, worker crashes, pool unavailable
    restarts: int = 0  # workers replaced

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def gold_answer(gold: str) -> str | None:
    """The normalised gold answer: extracted when `gold` is a full solution
    (contains `\\boxed` or `####`), else `gold` itself normalised (None when
    longer than MAX_ANSWER_CHARS)."""
    if "\\boxed" in gold or "\\fbox" in gold or "####" in gold:
        return extract_answer(gold)
    if len(gold) > MAX_ANSWER_CHARS:
        return None
    return normalize_answer(gold) or None


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """In-process verdict when one is certain: equal strings or two plain numbers."""
    if pred == gold:
        return True
    a = parse_number(pred)
    if a is None:
        return None
    b = parse_number(gold)
    if b is None:
        return None
    return a == b


def _worker_entry(conn: Connection, soft_timeout_s: int) -> None:  # pragma: no mutate block
    """Process target: import math-verify only here, in the worker."""
    import importlib

    importlib.import_module(_WORKER_MODULE).serve(conn, soft_timeout_s)


class _Worker:  # pragma: no mutate block
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, soft_timeout_s: int) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_entry,
            args=(child, soft_timeout_s),
            name="capo-verifier",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.conn: Connection = parent
        self.ready = False
        self.task: int | None = None
        self.deadline = time.monotonic() + _START_TIMEOUT_S

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        except Exception:  # already gone
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(timeout=1)
        except Exception:
            pass
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class Verifier:
    """Checks final answers against gold answers, each check under a hard time limit.

    `timeout_s` bounds the wall-clock time of one symbolic check (a hung or
    crashing worker is killed and replaced); `num_workers` worker processes are
    created lazily on the first check that needs one, from a `start_method`
    context ('forkserver' with math-verify preloaded makes a replacement cost
    milliseconds). Results of symbolic checks are cached (`cache_size` pairs).
    Thread-safe (calls are serialised). As with any 'forkserver'/'spawn' pool,
    a script that uses it must guard its entry point with
    `if __name__ == "__main__":` (workers re-import the main module); if
    workers cannot start, checks are False and counted in `stats.errors`.
    """

    def __init__(
        self,
        timeout_s: float = 2.0,
        num_workers: int | None = None,
        start_method: str = "forkserver",
        cache_size: int = 4096,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers or min(2, os.cpu_count() or 1)
        self.start_method = start_method
        self.stats = VerifierStats()
        self._soft_timeout_s = max(1, int(timeout_s) - 1)
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._cache_size = cache_size
        self._workers: list[_Worker] = []
        self._ctx: multiprocessing.context.BaseContext | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------

    def check(self, response: str, gold: str) -> bool:
        """True iff the final answer of `response` equals the gold answer."""
        return self.check_many([response], [gold])[0]

    def check_many(self, responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
        """`check` for many pairs; symbolic checks run in parallel on the pool."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        with self._lock:
            results = [False] * len(responses)
            pending: dict[tuple[str, str], list[int]] = {}
            for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
                self.stats.checks += 1
                pred = extract_answer(response)
                gold_n = gold_answer(gold)
                if pred is None or gold_n is None:
                    self.stats.no_answer += 1
                    continue
                verdict = _fast_verdict(pred, gold_n)
                if verdict is not None:
                    self.stats.fast_path += 1
                    results[i] = verdict
                    continue
                if nesting_depth(pred) > MAX_NESTING or nesting_depth(gold_n) > MAX_NESTING:
                    self.stats.rejected += 1
                    continue
                key = (pred, gold_n)
                if key in self._cache:
                    self.stats.cache_hits += 1
                    self._cache.move_to_end(key)
                    results[i] = self._cache[key]
                    continue
                pending.setdefault(key, []).append(i)
            if pending:
                keys = list(pending)
                for key, equal in zip(keys, self._run(keys), strict=True):
                    for i in pending[key]:
                        results[i] = equal
            return results

    def close(self) -> None:  # pragma: no mutate block
        """Stop the worker processes (a later check starts new ones)."""
        with self._lock:
            for w in self._workers:
                w.stop()
            self._workers = []

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pool -------------------------------------------------------------------

    def _context(self) -> multiprocessing.context.BaseContext:  # pragma: no mutate block
        if self._ctx is None:
            ctx = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                # Preload math-verify in the fork server (kept: anything preloaded
                # before), so a worker, and a replacement, starts in milliseconds.
                try:
                    from multiprocessing import forkserver

                    current = list(getattr(forkserver._forkserver, "_preload_modules", []))
                except Exception:
                    current = []
                if _WORKER_MODULE not in current:
                    ctx.set_forkserver_preload([*current, _WORKER_MODULE])
            self._ctx = ctx
        return self._ctx

    def _spawn(self) -> _Worker:  # pragma: no mutate block
        return _Worker(self._context(), self._soft_timeout_s)

    def _replace(self, w: _Worker) -> None:  # pragma: no mutate block
        w.kill()
        self.stats.restarts += 1
        self._workers[self._workers.index(w)] = self._spawn()

    def _run(self, keys: list[tuple[str, str]]) -> list[bool]:  # pragma: no mutate block
        """Symbolic checks of (pred, gold) pairs on the pool, each under `timeout_s`."""
        if os.getpid() != self._pid:  # inherited through fork: the workers are not ours
            self._workers, self._pid = [], os.getpid()
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        out = [False] * len(keys)
        queue = deque(range(len(keys)))
        start_failures = 0
        while queue or any(w.task is not None for w in self._workers):
            for w in list(self._workers):
                if w.ready and w.task is None and queue:
                    if not w.proc.is_alive():  # died while idle: replace before use
                        self.stats.errors += 1
                        self._replace(w)
                        continue
                    tid = queue.popleft()
                    try:
                        w.conn.send((tid, *keys[tid]))
                    except (OSError, ValueError):
                        queue.appendleft(tid)
                        self._replace(w)
                        continue
                    w.task = tid
                    w.deadline = time.monotonic() + self.timeout_s
                    self.stats.symbolic += 1
            now = time.monotonic()
            wait_s = min(1.0, max(0.0, min(w.deadline for w in self._workers) - now))
            for conn in wait([w.conn for w in self._workers], timeout=wait_s):
                w = next(x for x in self._workers if x.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None:  # crashed
                    self.stats.errors += 1
                    if not w.ready:
                        start_failures += 1
                    self._replace(w)
                elif msg == "ready":
                    w.ready, w.deadline, start_failures = True, math.inf, 0
                else:
                    tid, equal, reason = msg
                    if tid == w.task:
                        out[tid] = bool(equal)
                        if reason == "timeout":
                            self.stats.timeouts += 1
                        elif reason == "unparsed":
                            self.stats.unparsed += 1
                        elif reason is not None:
                            self.stats.errors += 1
                        if reason != "timeout":
                            self._remember(keys[tid], out[tid])
                    w.task, w.deadline = None, math.inf
            now = time.monotonic()
            for w in list(self._workers):
                if w.deadline > now:
                    continue
                if w.task is not None:  # hung: kill at the hard limit
                    self.stats.timeouts += 1
                    self._replace(w)
                elif not w.ready:  # never started
                    self.stats.errors += 1
                    start_failures += 1
                    self._replace(w)
            if start_failures >= _MAX_START_FAILURES * self.num_workers:
                logger.error("verifier workers fail to start; %d checks count as False", len(queue))
                self.stats.errors += len(queue)
                queue.clear()
                for w in self._workers:
                    if w.task is not None:
                        self._replace(w)
        return out

    def _remember(self, key: tuple[str, str], equal: bool) -> None:
        self._cache[key] = equal
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


_default: Verifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> Verifier:
    """The shared `Verifier` that `is_correct` uses, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Verifier()
            atexit.register(_default.close)
        return _default


def is_correct(response: str, gold: str) -> bool:
    """True iff the final answer of `response` equals `gold` (shared default Verifier)."""
    return default_verifier().check(response, gold)
