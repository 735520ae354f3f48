"""The pure reward core of CAPO (DESIGN §1): no Ray, no model, no I/O.

One concept per module; import the one you need (this package imports nothing
heavy itself, and math-verify is imported only inside the verifier's worker
processes):

* `steps`      — split a response into steps; exact token → step map.
* `critique`   — parsing CAPO's `Wrong step list: [...]` critiques.
* `critique_parsers` — critique parsers by name (first-error index, JSON, user ones).
* `voting`     — the vote over critiques → per-step penalty weights.
* `capo`       — the asymmetric token reward W_outcome·r − W_process·w[step].
* `advantages` — group-normalised advantages (group_token, group_response, no_std).
* `loss`       — token-level PPO-clip loss and per-token log-probs.
* `answers`    — final-answer extraction/normalisation, exact numeric fast path.
* `verifier`   — the rule-based outcome verifier (time-limited worker pool).
"""
