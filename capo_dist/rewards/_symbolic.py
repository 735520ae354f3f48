"""Symbolic answer equivalence with math-verify, run ONLY inside a verifier worker process.

Importing this module imports math-verify (and sympy); `verifier.Verifier`
imports it in its worker processes, never in the caller. Answers arrive
already extracted and normalised; each side is wrapped in `\\boxed{…}` and read
by math-verify's LaTeX path (latex2sympy), never by `eval`/`sympify` of raw
text. math-verify's own signal-based timeouts serve as a soft limit inside the
worker; the hard wall-clock limit is the parent killing the worker.
"""

from __future__ import annotations

import logging
import signal
import sys
from multiprocessing.connection import Connection

from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

# Units are already stripped by `answers.normalize_answer`; math-verify's unit
# stripping would also eat variables (it reads `4t` as 4 tonnes → 4).
_EXTRACTION = (
    LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True,
            units=False,
            malformed_operators=True,
            nits=True,
            boxed="all",
            equations=False,
        ),
    ),
)


def symbolic_equal(pred: str, gold: str, soft_timeout_s: int) -> tuple[bool, str | None]:
    """(equal, failure reason or None) for two normalised answers, via math-verify."""
    try:
        gold_p = parse(
            "\\boxed{" + gold + "}",
            extraction_config=_EXTRACTION,
            parsing_timeout=soft_timeout_s,
            raise_on_error=True,
        )
        pred_p = parse(
            "\\boxed{" + pred + "}",
            extraction_config=_EXTRACTION,
            parsing_timeout=soft_timeout_s,
            raise_on_error=True,
        )
        if not gold_p or not pred_p:
            return False, "unparsed"
        ok = verify(gold_p, pred_p, timeout_seconds=soft_timeout_s, raise_on_error=True)
        return bool(ok), None
    except TimeoutException:
        return False, "timeout"
    except Exception:  # any parser/sympy failure (RecursionError included): False, counted
        return False, "error"


def serve(conn: Connection, soft_timeout_s: int) -> None:
    """Worker loop: receive `(task_id, pred, gold)`, reply `(task_id, equal, reason)`.

    Sends `"ready"` once imports are done; exits on EOF or `None`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    sys.setrecursionlimit(4000)
    # Warm sympy/latex2sympy so the first real check is not charged with it.
    symbolic_equal("\\frac{1}{2}", "0.5", soft_timeout_s)
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, pred, gold = msg
        equal, reason = symbolic_equal(pred, gold, soft_timeout_s)
        conn.send((task_id, equal, reason))
