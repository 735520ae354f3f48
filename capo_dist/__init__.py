"""capo_dist: CAPO (Credit Assignment Policy Optimization) for LLM reasoning on Ray.

The reward math lives in `capo_dist.rewards` (pure, no Ray); the Ray roles are
`rollout_worker`, `judge_worker`, `aggregator` and `learner`; `trainer` is the
driver loop and `launch` the Hydra entry point.
"""

__version__ = "0.1.0"
