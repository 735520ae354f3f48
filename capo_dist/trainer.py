"""The driver: starts the roles and runs the CAPO loop (DESIGN §2).

One step = rollout → judge → aggregate → train → weight sync. The first three
are chained as Ray object references, so each judge call starts the moment
its rollout chunk is done (judging streams behind generation) without a round
trip through the driver. With `trainer.max_staleness=1` the next step's
rollouts are generated while the learner trains on this one.

If a rollout or judge worker dies mid-step, Ray restarts it; the driver
re-syncs its weights and re-runs only the chunks that were lost, so every
prompt of the step is trained on exactly once. A learner rank dying ends the
run with a message naming the checkpoint to resume from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch
from omegaconf import OmegaConf
from ray.exceptions import ActorUnavailableError, RayActorError

from capo_dist import telemetry
from capo_dist.actor_logs import role_log_file
from capo_dist.aggregator import RewardAggregator
from capo_dist.checkpoint import (
    CheckpointManager,
    hf_snapshots,
    read_driver_state,
    save_hf_snapshot,
)
from capo_dist.config import RunConfig, validate
from capo_dist.data import DataError, DataStats, ProblemStream, load_jsonl, synthetic_arith
from capo_dist.evaluate import load_bench
from capo_dist.experience import BatchRecipe, Experience
from capo_dist.judge_dispatch import JudgeDispatch
from capo_dist.judge_health import JudgeUnusableError, invalid_streak_check, judge_label
from capo_dist.judge_prompt import load_judge_prompt
from capo_dist.judge_worker import JudgeWorker, judge_token_metrics
from capo_dist.learner import LearnerConfig
from capo_dist.learner_group import LearnerGroup, get_all
from capo_dist.metrics import MetricsLogger, forget_steps_after
from capo_dist.models import TinyModelSpec, build_tiny_model
from capo_dist.placement import LEARNER, ClusterPlan, reserve_roles
from capo_dist.rollout_worker import RolloutWorker
from capo_dist.shared_fs import SharedDir, require_shared
from capo_dist.types import Problem, TrainBatch
from capo_dist.weight_sync import ENGINE_BACKENDS, CollectiveSyncPlan, engines_to_reload

# Ray restarts a dead rollout/judge actor this many times before giving up on it.
ACTOR_RESTARTS = 3
# What a dead or restarting actor raises (also when it failed upstream of a task's input).
WORKER_LOST = RayActorError


class LearnerDiedError(RuntimeError):
    """A learner rank died: ZeRO-3 state is sharded, so the run cannot go on without it."""


@dataclass
class Chunk:
    """One slice of a step's problems and the refs of its rollout and judge tasks."""

    problems: list[Problem]
    rollout_stats: ray.ObjectRef
    rollouts: ray.ObjectRef
    judged: ray.ObjectRef | None
    judge_stats: ray.ObjectRef | None
    judge: int | None = None  # the index of the judge worker that judges it

    @property
    def part(self) -> ray.ObjectRef:
        return self.judged if self.judged is not None else self.rollouts


@dataclass
class PendingStep:
    """One step's collection, in flight."""

    chunks: list[Chunk]
    experience: ray.ObjectRef


def load_problems(cfg: RunConfig) -> tuple[list[Problem], DataStats, list[str]]:
    """Training problems plus a text corpus (for the tiny tokenizer when one is built)."""
    if cfg.data.path:
        problems, stats = load_jsonl(
            cfg.data.path,
            cfg.data.question_key,
            cfg.data.answer_key,
            cfg.data.answer_format,
            cfg.data.max_rows,
        )
        corpus = [p.question for p in problems]
    else:
        arith = synthetic_arith(cfg.data.synthetic_size, cfg.data.seed)
        problems = [a.problem for a in arith]
        stats = DataStats(rows=len(problems), kept=len(problems))
        corpus = [a.problem.question + "\n\n" + a.solution for a in arith]
    return problems, stats, corpus


def prepare_policy(cfg: RunConfig, corpus: list[str]) -> str:
    """The policy checkpoint path: `model.path`, or a tiny Llama built locally (cached)."""
    if cfg.model.path:
        return cfg.model.path
    if cfg.model.warm_start:
        from capo_dist.warmstart import warm_start

        print("[capo_dist] building the warm-started tiny policy (once; cached in model.build_dir)")
        return str(warm_start(cfg.model.build_dir, prompt_template=cfg.data.prompt_template))
    t = cfg.model.tiny
    spec = TinyModelSpec(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        seed=cfg.trainer.seed,
    )
    texts = corpus + [
        cfg.data.prompt_template,
        load_judge_prompt(cfg.judge.prompt).render("Q", ["a", "b"], "1"),
    ]
    key = hashlib.sha256(json.dumps([asdict(spec), texts]).encode()).hexdigest()[:12]
    return str(build_tiny_model(Path(cfg.model.build_dir) / f"tiny-{key}", texts, spec))


def cluster_address(cfg: RunConfig) -> str | None:
    """The cluster to join: `ray.address`, else RAY_ADDRESS (set by Slurm scripts and
    `ray job submit`); None: this run starts its own local cluster."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster at `cluster_address`, or start a local one with enough logical
    CPUs for every role."""
    if ray.is_initialized():
        return
    # Worker output (vLLM, DeepSpeed) goes to <run_dir>/logs unless logging.verbose.
    log_to_driver = cfg.logging.verbose
    address = cluster_address(cfg)
    if address:
        # A running cluster brings its own resources, dashboard and metrics port:
        # Ray refuses num_cpus/num_gpus here and ignores the dashboard options.
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    rollout_cpus = cfg.rollout.num_workers * math.ceil(cfg.rollout.num_cpus_per_worker)
    roles = rollout_cpus + cfg.judge.num_workers + 1 + cfg.trainer.num_learners
    kwargs = dict(include_dashboard=cfg.ray.dashboard, log_to_driver=log_to_driver)
    if cfg.ray.dashboard:
        kwargs["dashboard_host"] = cfg.ray.dashboard_host
    if cfg.ray.metrics_export_port:
        kwargs["_metrics_export_port"] = cfg.ray.metrics_export_port
    # "local": a new cluster even if `ray start` left an address in /tmp/ray.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, roles)
    ray.init(address="local", num_cpus=num_cpus, **kwargs)


def prepare_cluster(cfg: RunConfig) -> ClusterPlan:
    """Reserve every role's resources (bounded wait, plan printed) and check that the
    directories the learners write are shared by their nodes and the driver's; on
    failure nothing stays reserved. Call after `init_ray`, before any actor."""
    plan = reserve_roles(cfg)
    try:
        nodes = {n.node_id: f"{n.label} (hosts learner ranks)" for n in plan.nodes_of(LEARNER)}
        driver = ray.get_runtime_context().get_node_id()
        nodes.setdefault(driver, f"node {driver[:8]} (the driver's)")
        dirs = [SharedDir("trainer.checkpoint_dir", cfg.trainer.checkpoint_dir)]
        if cfg.trainer.export_hf:
            dirs.append(SharedDir("run_dir (the exported policy)", cfg.run_dir))
        require_shared(dirs, nodes)
    except BaseException:
        plan.release()
        raise
    return plan


def _state_after_restart(actor, timeout_s: float = 300.0) -> dict:
    """`actor.state()`, waiting while Ray restarts the actor (it answers 'unavailable' then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.state.remote())
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Trainer:
    """Owns the roles of one run and drives the loop."""

    def __init__(self, cfg: RunConfig):
        validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.problems, self.data_stats, corpus = load_problems(cfg)
        print(f"[capo_dist] training data: {self.data_stats.summary()}")
        if len(self.problems) < cfg.rollout.prompts_per_step:
            raise DataError(
                f"the dataset has {len(self.problems)} usable problems ({self.data_stats.summary()}), "
                f"fewer than rollout.prompts_per_step={cfg.rollout.prompts_per_step}: a step would "
                "repeat a problem and merge its groups; lower rollout.prompts_per_step or add data"
            )
        self.model_path = prepare_policy(cfg, corpus)
        self.checkpoints = CheckpointManager(
            cfg.trainer.checkpoint_dir, cfg.trainer.keep_checkpoints
        )
        self.hf_snapshots = hf_snapshots(cfg.trainer.checkpoint_dir)
        self.hf_snapshots.recover()  # what a save killed half-way left
        init_ray(cfg)
        self.plan = prepare_cluster(cfg)
        self.transport = cfg.trainer.sync.transport
        self._start_roles()
        self.sync_plan: CollectiveSyncPlan | None = None
        if self.transport in ENGINE_BACKENDS:
            self._init_weight_transfer()
        self.stream = ProblemStream(self.problems, cfg.trainer.seed)
        self.benches: dict[str, list[Problem]] = {}
        for name, path in cfg.eval.benches.items():
            bench, bench_stats = load_bench(path, name)
            print(f"[capo_dist] eval bench {name}: {bench_stats.summary()}")
            self.benches[name] = bench[: cfg.eval.limit]
        self.step = self.version = 0
        # Steps in a row whose critiques were all invalid (judge.max_invalid_steps).
        self.invalid_steps = 0
        self.latest_weights: list[ray.ObjectRef] = []
        # With trainer.sync.verify: the last trained batch (its first response probes
        # restarted engines) and the largest engine/learner difference seen after a
        # restarted engine was reloaded in the current step (None: no reload).
        self._probe: TrainBatch | None = None
        self._recovery_diff: float | None = None
        self._resume()
        self.logger = MetricsLogger(self.run_dir, cfg)

    # ----------------------------------------------------------------- roles

    def _log_file(self, role: str) -> str | None:
        return role_log_file(self.run_dir, role, self.cfg.logging.verbose)

    def _start_roles(self) -> None:
        cfg = self.cfg
        if not cfg.logging.verbose:
            logs = self.run_dir / "logs"
            print(f"[capo_dist] roles' logs (vLLM, DeepSpeed): {logs} (logging.verbose=true: here)")
        self.rollout = []
        for i in range(cfg.rollout.num_workers):
            opts, engine_kwargs = self.plan.actor_options(f"rollout-{i}")
            if self.transport in ENGINE_BACKENDS:  # collective sync: vLLM's transfer engine
                engine_kwargs["weight_transfer_backend"] = ENGINE_BACKENDS[self.transport]
            self.rollout.append(
                RolloutWorker.options(**opts, max_restarts=ACTOR_RESTARTS).remote(
                    cfg.rollout,
                    self.model_path,
                    cfg.model.dtype,
                    cfg.data.prompt_template,
                    cfg.trainer.seed * 1000 + i,
                    engine_kwargs,
                    chat_template=cfg.data.chat_template,
                    log_file=self._log_file(f"rollout-{i}"),
                )
            )
        self.judges = []
        judge_prompt = load_judge_prompt(cfg.judge.prompt)  # checked by validate()
        for i in range(cfg.judge.num_workers if cfg.capo.w_process > 0 else 0):
            opts, engine_kwargs = self.plan.actor_options(f"judge-{i}")
            self.judges.append(
                JudgeWorker.options(**opts, max_restarts=ACTOR_RESTARTS).remote(
                    cfg.judge,
                    cfg.capo.num_critiques,
                    self.model_path,
                    cfg.trainer.seed * 1000 + i,
                    engine_kwargs,
                    log_file=self._log_file(f"judge-{i}"),
                    prompt=judge_prompt,
                    skip_truncated=cfg.rollout.truncated == "mask",
                )
            )
        self.judge_dispatch = JudgeDispatch(max(len(self.judges), 1))
        self._judge_refs: list[list[ray.ObjectRef]] = [[] for _ in self.judges]
        r = cfg.rollout
        recipe = BatchRecipe(
            truncated=r.truncated,
            max_new_tokens=r.max_new_tokens,
            overlong_buffer=r.overlong_buffer,
            overlong_penalty=r.overlong_penalty,
            max_groups=r.prompts_per_step if cfg.trainer.filter_groups == "outcome" else None,
        )
        self.aggregator = RewardAggregator.options(name="aggregator", num_cpus=1).remote(
            cfg.capo,
            self.model_path,
            log_file=self._log_file("aggregator"),
            critique_parser=judge_prompt.parser,
            recipe=recipe,
        )
        t = cfg.trainer
        self.learners = LearnerGroup(
            LearnerConfig(
                model_path=self.model_path,
                dtype=cfg.model.dtype,
                lr=t.lr,
                warmup_steps=t.warmup_steps,
                weight_decay=t.weight_decay,
                grad_clip=t.grad_clip,
                ppo_epochs=t.ppo_epochs,
                micro_batch_size=t.micro_batch_size,
                clip_low=t.clip_low,
                clip_high=t.clip_high,
                kl_coef=t.kl_coef,
                tis_cap=t.tis_cap,
                stale_ratio_cap=t.stale_ratio_cap,
                loss_agg=t.loss_agg,
                loss_agg_norm_tokens=cfg.rollout.max_new_tokens,
                lr_schedule=t.lr_schedule,
                min_lr_ratio=t.min_lr_ratio,
                total_optimizer_steps=t.total_steps * t.ppo_epochs,
                gradient_checkpointing=t.gradient_checkpointing,
                logprob_chunk_size=t.logprob_chunk_size,
                max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
                seed=t.seed,
                num_gpus_per_learner=t.num_gpus_per_learner,
            ),
            num_learners=t.num_learners,
            group=self.plan.learner_group,
            log_dir=None if cfg.logging.verbose else str(self.run_dir / "logs"),
        )

    # ------------------------------------------------------------ collection

    def _submit_chunk(self, problems: list[Problem], i: int) -> Chunk:
        """Rollout → judge for one slice of problems; returns refs at once."""
        worker = self.rollout[i % len(self.rollout)]
        rollouts, stats = worker.generate.options(num_returns=2).remote(problems)
        chunk = Chunk(problems, stats, rollouts, None, None)
        if self.judges:
            self._submit_judge(chunk)
        return chunk

    def _submit_judge(self, chunk: Chunk) -> None:
        """The chunk's judge call, on the least-loaded judge (capo_dist.judge_dispatch)."""
        for refs in self._judge_refs:  # keep the calls still running
            refs[:] = ray.wait(refs, num_returns=len(refs), timeout=0)[1] if refs else []
        j = self.judge_dispatch.choose([len(refs) for refs in self._judge_refs])
        chunk.judge = j
        chunk.judged, chunk.judge_stats = (
            self.judges[j].judge.options(num_returns=2).remote(chunk.rollouts)
        )
        self._judge_refs[j].append(chunk.judged)

    def _submit(self, problems: list[Problem], first: int) -> list[Chunk]:
        """`problems` in chunks across the workers, numbered from `first`; returns at once."""
        n_chunks = self.cfg.rollout.num_workers * self.cfg.rollout.chunks_per_worker
        slices = [problems[i::n_chunks] for i in range(n_chunks) if problems[i::n_chunks]]
        return [self._submit_chunk(s, first + i) for i, s in enumerate(slices)]

    def _collect(self) -> PendingStep:
        """Submit one step's rollout → judge → aggregate chain; returns at once."""
        chunks = self._submit(self.stream.take(self.cfg.rollout.prompts_per_step), 0)
        experience = self.aggregator.score_parts.remote(*(c.part for c in chunks))
        return PendingStep(chunks, experience)

    def _fill_batch(self, pending: PendingStep) -> tuple[Experience, list[dict], list[dict], int]:
        """`_finish`, then (trainer.filter_groups=outcome) refill the batch with more prompts.

        The aggregator packs only the first rollout.prompts_per_step groups whose outcomes
        differ. While it has fewer, this takes rollout.prompts_per_step more prompts from
        the stream (those already in the step are skipped), adds their chunks to the step
        and scores it all again — at most trainer.filter_max_rounds times. At the bound the
        step trains on what was kept; with nothing kept its update is skipped (WARNING).
        The stream's position then includes every prompt taken, so a resume goes on from
        there. Logs `filter_rounds` (extra rounds) beside `groups` / `groups_trained`.
        """
        exp, rollout_stats, judge_stats, recovered = self._finish(pending)
        t, want = self.cfg.trainer, self.cfg.rollout.prompts_per_step
        rounds = 0
        while t.filter_groups == "outcome" and exp.metrics["groups_trained"] < want:
            if rounds == t.filter_max_rounds:
                break
            rounds += 1
            held = {p.uid for c in pending.chunks for p in c.problems}
            more = [p for p in self.stream.take(want) if p.uid not in held]
            pending.chunks += self._submit(more, len(pending.chunks))
            pending.experience = self.aggregator.score_parts.remote(
                *(c.part for c in pending.chunks)
            )
            exp, rollout_stats, judge_stats, lost = self._finish(pending)
            recovered += lost
        exp.metrics["filter_rounds"] = float(rounds)
        if len(exp.batch) == 0:
            print(
                f"[capo_dist] WARNING: step {self.step + 1}: every group's responses had the same "
                f"outcome after {rounds} extra rounds (trainer.filter_groups=outcome): the update "
                "is skipped. Raise trainer.filter_max_rounds or rollout.prompts_per_step, or use "
                "trainer.filter_groups=off",
                file=sys.stderr,
                flush=True,
            )
        return exp, rollout_stats, judge_stats, recovered

    def _finish(self, pending: PendingStep) -> tuple[Experience, list[dict], list[dict], int]:
        """Wait for a step's experience; re-run the chunks of any worker that died."""
        recovered = 0
        for _ in range(self.cfg.trainer.max_chunk_retries + 1):
            try:
                exp = ray.get(pending.experience)
                rollout_stats = ray.get([c.rollout_stats for c in pending.chunks])
                judged = [c for c in pending.chunks if c.judge_stats is not None]
                judge_stats = ray.get([c.judge_stats for c in judged])
                for c, s in zip(judged, judge_stats, strict=True):
                    self.judge_dispatch.observe(c.judge, s["judge_seconds"])
                return exp, rollout_stats, judge_stats, recovered
            except WORKER_LOST as err:
                if getattr(
                    err, "actor_init_failed", False
                ):  # a bug or a bad setting, not a crash: say what it was
                    raise RuntimeError(f"a rollout/judge worker failed to start:\n{err}") from None
                recovered += self._recover(pending)
        raise RuntimeError(
            f"step {self.step + 1}: rollout/judge workers kept dying after "
            f"{self.cfg.trainer.max_chunk_retries} retries (trainer.max_chunk_retries); see the actor logs"
        )

    def _recover(self, pending: PendingStep) -> int:
        """Re-sync restarted engines and re-submit the lost chunks; returns how many."""
        self._resync_restarted()
        lost = 0
        for i, chunk in enumerate(pending.chunks):
            try:
                ray.get(chunk.part)
            except WORKER_LOST:
                try:
                    ray.get(chunk.rollouts)
                    self._submit_judge(chunk)
                except RayActorError:
                    pending.chunks[i] = self._submit_chunk(chunk.problems, i)
                lost += 1
        pending.experience = self.aggregator.score_parts.remote(*(c.part for c in pending.chunks))
        return lost

    def _resync_restarted(self) -> None:
        """A restarted rollout actor comes back with the base weights: load the current ones.

        A restarted engine is no longer in the collective sync group, so after a
        restart the run syncs through the object store from then on (slower, but
        it goes on).
        """
        states = [_state_after_restart(w) for w in self.rollout]
        restarted = ray.get([w.restarted.remote() for w in self.rollout])
        collective = self.transport != "object_store"
        reload = engines_to_reload(
            [s["version"] for s in states], restarted, self.version, collective
        )
        behind = [self.rollout[i] for i in reload]
        if not behind:
            return
        if self.transport != "object_store":
            print(
                "[capo_dist] a rollout engine restarted: weight sync falls back to the object store"
            )
            self.transport = "object_store"
        if not self.latest_weights:
            self.latest_weights = self._learners(
                "gather_weight_buckets", self.cfg.trainer.sync.bucket_mb << 20
            )
        ray.get([w.load_weights.remote(self.latest_weights, self.version) for w in behind])
        if self.cfg.trainer.sync.verify and self._probe is not None:
            # The reloaded engines resample the lost chunks now: check they hold the
            # learner's current policy before they do (the next sync would hide it).
            diff, _ = self._verify_sync(self._probe, behind, "reloading a restarted engine")
            self._recovery_diff = max(diff, self._recovery_diff or 0.0)

    # ------------------------------------------------------ train, sync, ckpt

    def _learners(self, method: str, *args):
        try:
            return getattr(self.learners, method)(*args)
        except RayActorError as err:
            last = self.checkpoints.latest()
            where = (
                f"the last checkpoint is {last}" if last else "no checkpoint has been written yet"
            )
            # A checkpoint or the export is written after the step counter moved on.
            step = self.step if method in ("save_checkpoint", "export_hf") else self.step + 1
            raise LearnerDiedError(
                f"a learner rank died during {method} at step {step} ({type(err).__name__}); "
                f"ZeRO-3 state is sharded across ranks, so the run stops. {where}; rerun with "
                f"trainer.resume=auto trainer.checkpoint_dir={self.checkpoints.dir} to continue."
            ) from err

    def _init_weight_transfer(self) -> None:
        """Form the learner↔engines group of the collective sync (nccl | gloo).

        Every engine worker (engine i at its own rank offset) and learner rank 0
        join at once; waits at most `trainer.sync.timeout_s` (after the
        engines have started) and names whoever did not join.
        """
        s = self.cfg.trainer.sync
        ray.get([w.state.remote() for w in self.rollout])  # engine start-up is not the rendezvous
        workers_per_engine = self.cfg.rollout.tensor_parallel_size
        self.sync_plan = self.learners.collective_sync_plan(
            s.bucket_mb << 20, [workers_per_engine] * len(self.rollout)
        )
        joins = {
            f"rollout-{i}": w.init_weight_transfer.remote(info)
            for i, (w, info) in enumerate(zip(self.rollout, self.sync_plan.init_infos, strict=True))
        }
        joins["learner-0"] = self.learners.init_weight_sync(
            self.sync_plan, self.transport, s.timeout_s
        )
        get_all(
            joins,
            timeout_s=s.timeout_s,
            what=f"forming the weight-sync group (trainer.sync.transport={self.transport})",
        )

    def _sync(self) -> list[float]:
        """Bring every engine to the learner's current weights; returns each engine's load seconds.

        object_store: learner rank 0 puts the buckets in the object store, every
        engine loads them. Collective: every engine enters its receive, the
        learners gather and rank 0 broadcasts into it, and all are awaited.
        """
        self.version += 1
        bucket_bytes = self.cfg.trainer.sync.bucket_mb << 20
        if self.transport == "object_store":
            self.latest_weights = self._learners("gather_weight_buckets", bucket_bytes)
            loads = [w.load_weights.remote(self.latest_weights, self.version) for w in self.rollout]
            return ray.get(loads)
        assert self.sync_plan is not None
        self.latest_weights = []  # nothing kept: a restarted engine gathers afresh
        loads = [
            w.receive_weights.remote(self.sync_plan.update_info, self.version) for w in self.rollout
        ]
        sends = self._learners("broadcast_weights", bucket_bytes)
        return get_all(loads + sends, what="weight sync")[: len(loads)]

    def _verify_sync(
        self, batch: TrainBatch, workers: list | None = None, when: str | None = None
    ) -> tuple[float, float]:
        """Largest |log-prob| difference between any engine and the learner on one response,
        and how far the learner's log-probs moved from the sampler's on it.

        Scores the first response of `batch` (its real prompt and sampled tokens)
        with the current weights of `workers` (default: every rollout engine) and
        the learner's, so an engine that missed the sync, or loaded it wrongly, is
        caught the step it happens instead of silently sampling from another policy.
        `when` names the occasion in the error (default: after the step's sync).
        """
        ids, att, mask = batch.input_ids[:1], batch.attention_mask[:1], batch.loss_mask[:1]
        n = int(att.sum())
        resp = mask[0, :n].nonzero().flatten()
        if len(resp) == 0:
            return 0.0, 0.0
        start, end = int(resp[0]), int(resp[-1]) + 1
        prompt, continuation = ids[0, :start].tolist(), ids[0, start:end].tolist()
        learner = self._learners("compute_logprobs", ids[:, :end], att[:, :end])[0, start:end]
        workers = self.rollout if workers is None else workers
        engines = ray.get([w.sequence_logprobs.remote(prompt, continuation) for w in workers])
        diff = max(float((torch.tensor(e) - learner).abs().max()) for e in engines)
        # How far the policy moved since this response was sampled: the check above only
        # shows the engines took the update when this is well above it.
        moved = float((learner - batch.sampler_logprobs[0, start:end]).abs().max())
        if diff > self.cfg.trainer.sync.verify_tol:
            raise RuntimeError(
                f"weight sync check failed {when or f'after step {self.step}'}: an engine's "
                "log-probs differ "
                f"from the learner's by {diff:.3g} (> trainer.sync.verify_tol="
                f"{self.cfg.trainer.sync.verify_tol}); the engines are not sampling the trained policy"
            )
        return diff, moved

    def _evaluate(self) -> dict[str, float]:
        """Evaluate the just-synced policy on rollout-0; tables in <run_dir>/eval/step_N/."""
        e = self.cfg.eval
        result = ray.get(
            self.rollout[0].evaluate.remote(self.benches, e.k, e.temperature, e.max_new_tokens)
        )
        result.write(self.run_dir / "eval" / f"step_{self.step:06d}")
        return result.as_metrics()

    def _save(self) -> Path:
        """Checkpoint learner + driver state at the end of `self.step` (nothing in flight)."""
        tmp = self.checkpoints.begin(self.step)
        self._learners("save_checkpoint", str(tmp / "learner"))
        state = {
            "step": self.step,
            "version": self.version,
            "stream": self.stream.state(),
            "rollout": ray.get([w.state.remote() for w in self.rollout]),
            "judge": ray.get([j.state.remote() for j in self.judges]),
        }
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
        return self.checkpoints.commit(tmp, self.step, state)

    def _save_hf(self) -> Path:
        """trainer.save_hf_every: the policy as a Hugging Face checkpoint (vLLM and
        transformers load it) in <checkpoint_dir>/hf/step_XXXXXXXX, written atomically."""
        return save_hf_snapshot(
            self.hf_snapshots, self.step, lambda d: self._learners("export_hf", str(d))
        )

    def _resume(self) -> None:
        ckpt = self.checkpoints.resume_from(self.cfg.trainer.resume)
        if ckpt is None:
            return
        state = read_driver_state(ckpt)
        self._learners("load_checkpoint", str(ckpt / "learner"))
        self.step, self.version = state["step"], state["version"] - 1
        self.stream = ProblemStream(self.problems, self.cfg.trainer.seed, **state["stream"])
        ray.get([w.restore.remote(s) for w, s in zip(self.rollout, state["rollout"], strict=True)])
        ray.get([j.restore.remote(s) for j, s in zip(self.judges, state["judge"], strict=True)])
        self._sync()  # engines start from the checkpoint's policy
        # Steps after the checkpoint are trained again: drop what the crashed run logged of them.
        dropped = forget_steps_after(self.run_dir, self.step)
        print(
            f"[capo_dist] resumed from {ckpt} at step {self.step}"
            + (f" ({dropped} metric rows after it dropped, to be re-logged)" if dropped else "")
        )

    # ------------------------------------------------------------------ loop

    def _record(
        self,
        exp: Experience,
        train: dict[str, float],
        rollout_stats: list[dict],
        judge_stats: list[dict],
        recovered: int,
        times: dict[str, float],
    ) -> dict[str, float]:
        """One step's metrics.jsonl row: the experience's figures, the learner's
        (`train_*`), rollout and judge totals, and `times` (seconds per stage)."""
        time_rollout = sum(s["rollout_seconds"] for s in rollout_stats) / len(self.rollout)
        rollout_tokens = sum(s["rollout_tokens"] for s in rollout_stats)
        return {
            "step": self.step,
            **exp.metrics,
            **{f"train_{k}": v for k, v in train.items()},
            "prompts": len({s["uid"] for s in exp.samples}),
            "responses": len(exp.samples),
            "chunks_recovered": recovered,
            "policy_version": self.version,
            "tokens_per_s": rollout_tokens / max(time_rollout, 1e-9),
            "time_rollout": time_rollout,
            "time_judge": sum(s["judge_seconds"] for s in judge_stats) / max(len(self.judges), 1),
            "judge_request_failures": sum(s["judge_request_failures"] for s in judge_stats),
            "judge_unchecked_steps": sum(s["judge_unchecked_steps"] for s in judge_stats),
            **judge_token_metrics(judge_stats, rollout_tokens),
            "judge_skipped_responses": sum(s["judge_skipped_responses"] for s in judge_stats),
            "judge_skipped_tokens": sum(s["judge_skipped_tokens"] for s in judge_stats),
            **times,
        }

    def _check_step(self, record: dict[str, float], exp: Experience) -> str | None:
        """The per-step checks that add to `record`: the judge's invalid streak (returns
        the problem to raise or warn about once the step is saved, or None) and, with
        trainer.sync.verify, the engines against the learner."""
        judge_problem = None
        if self.judges:
            self.invalid_steps, judge_problem = invalid_streak_check(
                self.invalid_steps,
                exp.metrics["judge_invalid_rate"],
                self.cfg.judge.max_invalid_steps,
                judge_label(self.cfg.judge, self.model_path),
            )
            record["judge_invalid_steps"] = self.invalid_steps
        if self.cfg.trainer.sync.verify and len(exp.batch):
            diff, moved = self._verify_sync(exp.batch)
            record.update(sync_max_logprob_diff=diff, sync_policy_moved=moved)
            if self._recovery_diff is not None:
                record["sync_recovery_max_logprob_diff"] = self._recovery_diff
            self._probe, self._recovery_diff = exp.batch, None
        return judge_problem

    def _log(self, record: dict[str, float], exp: Experience, in_flight: int) -> None:
        """Write the step's row (metrics.jsonl, wandb), its Ray metrics and its samples."""
        logging = self.cfg.logging
        self.logger.log(record)
        telemetry.record("capo_learner_step_s", record["time_train"], "driver")
        telemetry.record("capo_weight_sync_s", record["time_sync"], "driver")
        telemetry.record("capo_step_s", record["time_step"], "driver")
        telemetry.record("capo_chunks_in_flight", in_flight, "driver")
        if logging.samples_every and self.step % logging.samples_every == 0:
            self.logger.write_samples(self.step, exp.samples[: logging.samples_per_step])

    def run(self) -> Path:
        """Train until `trainer.total_steps`; returns the run directory."""
        cfg, t = self.cfg, self.cfg.trainer
        if self.benches and cfg.eval.before_training and self.step == 0:
            self.logger.log({"step": 0, **self._evaluate()})
        pending = self._collect() if self.step < t.total_steps else None
        while self.step < t.total_steps:
            t0 = time.perf_counter()
            exp, rollout_stats, judge_stats, recovered = self._fill_batch(pending)
            last = self.step + 1 == t.total_steps
            save = last or (t.checkpoint_every and (self.step + 1) % t.checkpoint_every == 0)
            # Overlap: the next batch is generated with weights one update behind. Not
            # before a checkpoint, so a checkpoint never has a batch in flight.
            pending = self._collect() if t.max_staleness >= 1 and not (last or save) else None
            t_train = time.perf_counter()
            # Nothing kept by trainer.filter_groups: no update (the sync still counts the step).
            train = self._learners("train_step", exp.batch, self.version) if len(exp.batch) else {}
            t_sync = time.perf_counter()
            load_times = self._sync()
            t_end = time.perf_counter()
            self.step += 1
            times = {
                "time_train": t_sync - t_train,
                "time_sync": t_end - t_sync,
                "time_sync_load": max(load_times),
                "time_wait": t_train - t0,
                "time_step": t_end - t0,
            }
            record = self._record(exp, train, rollout_stats, judge_stats, recovered, times)
            judge_problem = self._check_step(record, exp)
            if self.benches and (last or (cfg.eval.every and self.step % cfg.eval.every == 0)):
                record.update(self._evaluate())
            self._log(record, exp, len(pending.chunks) if pending else 0)
            if save:
                self._save()
            if t.save_hf_every and self.step % t.save_hf_every == 0:
                self._save_hf()
            if judge_problem is not None:  # after the step's metrics, samples and checkpoint
                if cfg.judge.on_invalid == "error":
                    raise JudgeUnusableError(judge_problem)
                print(
                    f"[capo_dist] WARNING (judge.on_invalid=warn): {judge_problem}", file=sys.stderr
                )
            if pending is None and not last:
                pending = self._collect()
        if t.export_hf:
            self._learners("export_hf", str(self.run_dir / "policy"))
        self.logger.close()
        return self.run_dir

    def close(self, shutdown_ray: bool = True) -> None:
        """Stop this run's actors and give back every placement group it reserved, so the
        next run (e.g. in a sweep on the same cluster) starts clean; the local Ray
        cluster this run started stays up for the next one if not `shutdown_ray`."""
        for actor in [*self.rollout, *self.judges, self.aggregator]:
            ray.kill(actor, no_restart=True)
        self.learners.shutdown()
        self.plan.release()
        if shutdown_ray and not cluster_address(self.cfg):
            ray.shutdown()
