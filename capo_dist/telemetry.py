"""Live figures for the Ray dashboard / Prometheus (`ray.util.metrics`), one place for all roles.

Each process creates the metrics it records on first use; every series is
tagged with the role that recorded it (`rollout-0`, `judge-1`, `driver`, …)
so the dashboard shows them per actor. Ray exports them from each node's
metrics agent (Prometheus format) while the run is up.
"""

from __future__ import annotations

from ray.util import metrics

_GAUGES = {
    "capo_rollout_tokens_per_s": "Generated tokens per second of a rollout worker's last call",
    "capo_judge_latency_s": "Seconds a judge worker spent on its last chunk",
    "capo_judge_failed_share": "Share of responses in a judge call that got no critique at all",
    "capo_judge_invalid_rate": "Share of critiques of the last step that were invalid (abstained)",
    "capo_reward_mean": "Mean token reward of the last step",
    "capo_accuracy": "Share of correct responses in the last step",
    "capo_process_penalty_rate": "Share of response tokens penalised in the last step",
    "capo_chunks_in_flight": "Rollout/judge chunks submitted and not yet scored (queue depth)",
    "capo_learner_step_s": "Seconds of the learner's last update",
    "capo_weight_sync_s": "Seconds of the last learner -> rollout weight sync",
    "capo_step_s": "Wall seconds of the last training step",
}
_made: dict[str, metrics.Gauge] = {}


def record(name: str, value: float, role: str) -> None:
    """Set gauge `name` (one of `_GAUGES`) to `value` for `role`."""
    gauge = _made.get(name)
    if gauge is None:
        gauge = _made[name] = metrics.Gauge(name, description=_GAUGES[name], tag_keys=("role",))
    gauge.set(float(value), tags={"role": role})
