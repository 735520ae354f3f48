"""Chat-formatted prompts and a tokenizer without a pad token, through the real engines and roles.

The model is the session's tiny Llama whose tokenizer is given a small Jinja
chat template (role markers, BOS written by the template) and has its pad token
removed, as Llama-3 tokenizers ship. The judge's engine backend, evaluation and
(slow, on a local Ray cluster) the rollout worker, the judge worker and the
reward aggregator run on it with the Hugging Face engine.
"""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest
import ray
import torch
from transformers import AutoTokenizer

from capo_dist.aggregator import RewardAggregator
from capo_dist.config import CapoConfig, JudgeConfig, RolloutConfig
from capo_dist.evaluate import evaluate_engine
from capo_dist.experience import BatchRecipe
from capo_dist.judge_dispatch import JudgeDispatch
from capo_dist.judge_prompt import load_judge_prompt
from capo_dist.judge_worker import EngineBackend, JudgeRequest, JudgeWorker
from capo_dist.rollout_worker import RolloutWorker
from capo_dist.tokenization import (
    ChatTemplateError,
    chat_text,
    encode_prompt,
    pad_token_id,
    policy_prompt_ids,
)
from capo_dist.trainer import Chunk, PendingStep, Trainer
from capo_dist.types import Problem

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATE = "Question: {question}\n\n"
QUESTION = "what is 3 + 4?"


@pytest.fixture(scope="module")
def chat_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint with a chat template and no pad token (Llama-3's shape)."""
    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = CHAT_TEMPLATE
    tok.pad_token = None
    tok.save_pretrained(str(out))
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded.pad_token_id is None and reloaded.chat_template == CHAT_TEMPLATE
    return str(out)


@pytest.fixture(scope="module")
def tok(chat_model: str):
    return AutoTokenizer.from_pretrained(chat_model)


def _expected_chat(tok, content: str) -> tuple[str, list[int]]:
    """transformers' own rendering and token ids of `content` as one user message."""
    messages = [{"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return text, list(ids)


def test_prompt_ids_are_exactly_the_templates(tok):
    text, ids = _expected_chat(tok, TEMPLATE.format(question=QUESTION))
    assert text == f"<|bos|><|user|>\n{TEMPLATE.format(question=QUESTION)}<|eos|>\n<|assistant|>\n"
    assert chat_text(tok, TEMPLATE.format(question=QUESTION)) == text
    assert policy_prompt_ids(tok, TEMPLATE, QUESTION, chat=True) == ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # no second BOS
    assert policy_prompt_ids(tok, TEMPLATE, QUESTION, chat=False) == encode_prompt(
        tok, TEMPLATE.format(question=QUESTION), chat=False
    )
    assert tok.decode(policy_prompt_ids(tok, TEMPLATE, QUESTION, chat=False)) == TEMPLATE.format(
        question=QUESTION
    )


def test_pad_token_fallback():
    assert pad_token_id(5, 2) == 5
    assert pad_token_id(None, 2) == 2
    assert pad_token_id(None, [128001, 128009]) == 128001
    assert pad_token_id(None, None) == 0
    assert pad_token_id(None, []) == 0


def test_judge_engine_backend_sends_chat_prompts(chat_model: str, tok):
    cfg = JudgeConfig(backend="hf", max_model_len=1024, max_tokens=4)
    backend = EngineBackend(cfg, chat_model, seed=0, engine_kwargs={})
    requests = [
        JudgeRequest("What is 3 + 4?", "7", ["3 + 4 = 7.", "The answer is 7."]),
        JudgeRequest("What is 2 + 2?", None, ["2 + 2 = 5."]),
    ]
    replies = backend.critiques(requests, n=2)
    for request, reply in zip(requests, replies, strict=True):
        text, _ = _expected_chat(
            tok,
            load_judge_prompt("capo").render(request.question, request.steps, request.reference),
        )
        assert reply.prompt == text  # what the engine received, special tokens kept
        assert reply.prompt.startswith("<|bos|><|user|>\n")
        assert reply.prompt.endswith("<|eos|>\n<|assistant|>\n")
        assert len(reply.critiques) == 2 and all(isinstance(c, str) for c in reply.critiques)


def test_evaluation_uses_the_chat_template(chat_model: str, tok):
    from capo_dist.engines import make_engine

    engine = make_engine("hf", chat_model, seed=0, max_model_len=512)
    problems = [Problem(uid="p0", question=QUESTION, gold="7")]
    result = evaluate_engine(
        engine,
        {"tiny": problems},
        k=1,
        temperature=0.0,
        max_new_tokens=3,
        prompt_template=TEMPLATE,
        chat_template=True,
    )
    assert result.samples[0]["prompt"] == _expected_chat(tok, TEMPLATE.format(question=QUESTION))[0]
    assert result.to_json()["settings"]["chat_template"] is True
    raw = evaluate_engine(
        engine, {"tiny": problems}, k=1, temperature=0.0, max_new_tokens=3, prompt_template=TEMPLATE
    )
    assert raw.samples[0]["prompt"] == TEMPLATE.format(question=QUESTION)


# ---------------------------------------------------------------- roles on Ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the role tests (logical CPUs, so three actors fit on 2 cores)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _rollout_worker(model: str, chat: bool):
    cfg = RolloutConfig(
        backend="hf",
        samples_per_prompt=2,
        max_new_tokens=6,
        max_model_len=512,
        num_cpus_per_worker=1,
    )
    return RolloutWorker.options(num_cpus=1).remote(
        cfg, model, "float32", TEMPLATE, 0, None, chat_template=chat
    )


@pytest.mark.slow
def test_roles_with_chat_template_and_no_pad_token(ray_cluster, chat_model: str, tok):
    """Rollout (chat prompts) → judge (chat prompts, recorded) → aggregator (no pad token);
    then the same rollouts under rollout.truncated=mask: a symbolic judge that skips the ones
    the engine cut at max_new_tokens, and an aggregator that trains on none of their tokens."""
    worker = _rollout_worker(chat_model, chat=True)
    judge = JudgeWorker.options(num_cpus=1).remote(
        JudgeConfig(backend="hf", max_model_len=1024, max_tokens=6), 2, chat_model, 0
    )
    aggregator = RewardAggregator.options(num_cpus=1).remote(CapoConfig(), chat_model)
    problems = [Problem(uid="p0", question=QUESTION, gold="7"), Problem("p1", "what is 12?", "12")]
    rollouts, _ = ray.get(worker.generate.remote(problems))
    assert len(rollouts) == 4
    for r in rollouts:
        assert (
            r.prompt_token_ids
            == _expected_chat(tok, TEMPLATE.format(question=r.problem.question))[1]
        )
    judged, _ = ray.get(judge.judge.remote(rollouts))
    assert all(j.judge_prompt and j.judge_prompt.startswith("<|bos|><|user|>\n") for j in judged)
    exp = ray.get(aggregator.score.remote(judged))
    assert [s["judge_prompt"] for s in exp.samples] == [j.judge_prompt for j in judged]
    # Padding with the EOS id, as the tokenizer has no pad token.
    pads = exp.batch.input_ids[exp.batch.attention_mask == 0]
    assert pads.numel() > 0 and torch.all(pads == tok.eos_token_id)

    cut = [r.completion.finish_reason == "length" for r in rollouts]
    assert any(cut)  # 6 new tokens: the engine stops most responses on length
    for actor in (judge, aggregator):  # their CPUs go to the masking pair (4 in the cluster)
        ray.kill(actor)
    masking = JudgeWorker.options(num_cpus=1).remote(
        JudgeConfig(), 2, chat_model, 0, skip_truncated=True
    )
    masked = RewardAggregator.options(num_cpus=1).remote(
        CapoConfig(), chat_model, recipe=BatchRecipe(truncated="mask")
    )
    judged, stats = ray.get(masking.judge.remote(rollouts))
    assert [not j.critiques for j in judged] == cut  # the cut ones never reached the judge
    assert stats["judge_skipped_responses"] == sum(cut)
    assert stats["judge_skipped_tokens"] == sum(
        len(r.completion.token_ids) for r, c in zip(rollouts, cut, strict=True) if c
    )
    exp = ray.get(masked.score.remote(judged))
    trained = exp.batch.loss_mask.sum(1) > 0
    assert trained.tolist() == [not c for c in cut]
    assert exp.metrics["truncated_share"] == sum(cut) / len(cut)
    for actor in (worker, masking, masked):
        ray.kill(actor)


@pytest.mark.slow
def test_chat_template_without_a_template_fails_at_worker_start(ray_cluster, tiny_model: str):
    worker = _rollout_worker(tiny_model, chat=True)  # the tiny tokenizer has no chat template
    with pytest.raises(ray.exceptions.RayActorError, match=r"data\.chat_template=true") as err:
        ray.get(worker.state.remote())
    assert ChatTemplateError.__name__ in str(err.value)
    ray.kill(worker)


@ray.remote(num_cpus=0)
class SleepyJudge:
    """A judge worker's call signature and stats, judging by sleeping `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def judge(self, rollouts):
        time.sleep(self.seconds)
        return rollouts, {"judge_seconds": self.seconds}


@pytest.mark.slow
def test_the_trainer_sends_more_chunks_to_the_fast_judge(ray_cluster):
    """Real Ray, two tiny actors (no engines): the trainer's own dispatch (`_submit_judge`,
    and `_finish` reporting each chunk's judge_seconds) over 3 steps of 4 chunks. Step 1
    knows no speeds (2 + 2); then the fast judge takes every chunk. Here, not in
    tests/test_judge_dispatch.py, to share this module's Ray cluster (no second ray.init)."""
    trainer = Trainer.__new__(Trainer)  # only the dispatch state: no engines, no learners
    trainer.cfg = SimpleNamespace(trainer=SimpleNamespace(max_chunk_retries=0))
    trainer.judges = [SleepyJudge.remote(0.5), SleepyJudge.remote(0.02)]
    trainer.judge_dispatch = JudgeDispatch(2)
    trainer._judge_refs = [[], []]
    counts = [0, 0]
    for step in range(3):
        chunks = []
        for i in range(4):
            chunk = Chunk([], ray.put({}), ray.put([i]), None, None)
            trainer._submit_judge(chunk)
            counts[chunk.judge] += 1
            chunks.append(chunk)
        trainer._finish(PendingStep(chunks, ray.put(step)))
    assert counts == [2, 10] and trainer.judge_dispatch.seconds == [0.5, 0.02]
