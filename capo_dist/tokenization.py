"""How text meets a tokenizer: the token ids an engine is given, and the padding id.

Every prompt a generation engine sees is built here, so the policy's rollouts,
its evaluation and the judge format text the same way:

* raw: `tok(text)["input_ids"]` (the tokenizer adds its own special tokens);
* chat: `text` as ONE user message through the tokenizer's chat template with
  the generation prompt appended, rendered to text and then tokenised with
  `add_special_tokens=False` (the template writes its own BOS). That is exactly
  the ids `apply_chat_template(..., tokenize=True, return_dict=False)` gives in
  transformers 5, whose default (`return_dict=True`) returns a `BatchEncoding`.

Llama-3 tokenizers define no pad token; `pad_token_id` picks the one fallback
(EOS, else 0) every padder uses. A pad id only fills positions that attention
and the loss mask ignore, so any valid token id is correct; one rule keeps the
batches identical across roles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ChatTemplateError(ValueError):
    """A chat-formatted prompt was asked of a tokenizer that has no chat template."""


def has_chat_template(tok: Any) -> bool:
    """Whether `tok` carries a chat template."""
    return bool(getattr(tok, "chat_template", None))


def require_chat_template(tok: Any, model: str, key: str) -> None:
    """Raise `ChatTemplateError` naming `key` when `tok` (of `model`) has no chat template."""
    if not has_chat_template(tok):
        raise ChatTemplateError(
            f"{key}=true but the tokenizer of {model!r} has no chat template; set {key}=false "
            "for a base model, or use a model whose tokenizer_config.json has a chat_template"
        )


def chat_text(tok: Any, content: str) -> str:
    """`content` as one user message rendered by `tok`'s chat template, generation prompt added."""
    return tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def encode_prompt(tok: Any, text: str, chat: bool) -> list[int]:
    """The token ids of `text`, chat-formatted (one user message) when `chat` is true."""
    if chat:
        return list(tok(chat_text(tok, text), add_special_tokens=False)["input_ids"])
    return list(tok(text)["input_ids"])


def policy_prompt_ids(tok: Any, template: str, question: str, chat: bool) -> list[int]:
    """What the policy is given for `question`: `template` filled in, then `encode_prompt`.

    The one recipe of the rollout workers and of evaluation (`data.prompt_template`,
    `data.chat_template`).
    """
    return encode_prompt(tok, template.format(question=question), chat)


def pad_token_id(pad: int | None, eos: int | Sequence[int] | None) -> int:
    """The padding id: `pad` when defined, else the (first) EOS id, else 0.

    Takes the ids rather than a tokenizer so a model config (`pad_token_id`,
    `eos_token_id`, which may be a list) resolves the same way.
    """
    if pad is not None:
        return int(pad)
    if isinstance(eos, Sequence) and not isinstance(eos, str):
        eos = eos[0] if len(eos) else None
    return int(eos) if eos is not None else 0
