"""The policy as the learner's DeepSpeed engine sees it: per-token log-probs and entropy.

`LogprobModel` wraps a Hugging Face causal LM; its forward returns the
log-prob of every token given the ones before it and the policy's entropy at
that position, both [b, L] float32, instead of the [b, L, V] logits. Doing
the head inside the engine's module (not after it) matters under ZeRO-3:
DeepSpeed starts its backward bookkeeping from a hook on the module's
outputs, which must see the gradient before any parameter does.

`logprob_chunk_size` > 0: the base model runs to its last hidden states and
the LM head + log-softmax run over chunks of that many positions, each under
`torch.utils.checkpoint` (non-reentrant) while gradients are on. Backward
then keeps only the hidden states, never a [b, L, V] tensor (the float32
logits of one chunk live during that chunk's forward or recompute). 0: one
full forward, logits kept for backward (the plain path). Both give the same
values (tests/learner/test_logprob_model.py). The LM head is called as a
module, so a ZeRO-3 partitioned or tied (`tie_word_embeddings`) head is
gathered by DeepSpeed's module hooks on each call — a collective, so every
rank must call the head equally often: `num_chunks` (agreed over the ranks
by the caller) pads a rank with fewer positions with extra one-position head
calls whose output joins the result with weight 0 (so their backward, another
collective, runs too).

Packed rows (token-budget micro-batches, `capo_dist.packing`): pass
`attention_mask=None` and `position_ids` restarting at 0 for every
sequence; transformers' masking (`find_packed_sequence_indices`) then keeps
attention inside each sequence, and the log-prob of a token at position 0
(a sequence's first) is 0, as for a row's first token.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from capo_dist.rewards.loss import logprobs_and_entropy


class LogprobModel(torch.nn.Module):
    """An HF causal LM whose forward gives (log-probs, entropy) per token, optionally chunked."""

    def __init__(self, policy: torch.nn.Module, logprob_chunk_size: int = 0) -> None:
        super().__init__()
        self.policy = policy
        self.logprob_chunk_size = logprob_chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_chunks: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(token t | tokens < t), entropy of p(· | tokens < t)) at each t, [b, L] each.

        Positions whose `position_ids` is 0 (a sequence's first token) hold 0
        in both. `attention_mask` None: the rows may be packed (see module doc).
        `num_chunks`: head calls to make in all when chunked (at least the
        chunks the positions need; see module doc).
        """
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        b, length = input_ids.shape
        targets = input_ids[:, 1:]
        if self.logprob_chunk_size <= 0:
            logits = self.policy(**kwargs).logits[:, :-1]
            # Row by row, so the float32 temporaries stay at one row's [L, V].
            rows = [logprobs_and_entropy(logits[r], targets[r]) for r in range(b)]
            lp = torch.stack([r[0] for r in rows])
            ent = torch.stack([r[1] for r in rows])
        else:
            hidden = self.policy.base_model(**kwargs).last_hidden_state[:, :-1]
            lp, ent = self._chunked(
                hidden.reshape(b * (length - 1), -1), targets.reshape(-1), num_chunks
            )
            lp, ent = lp.view(b, length - 1), ent.view(b, length - 1)
        first = position_ids[:, 1:] == 0  # a new sequence starts: nothing predicts it
        zero = lp.new_zeros((b, 1))
        lp = torch.cat([zero, lp.masked_fill(first, 0.0)], dim=1)
        ent = torch.cat([zero, ent.masked_fill(first, 0.0)], dim=1)
        return lp, ent

    def _chunked(
        self, hidden: torch.Tensor, targets: torch.Tensor, num_chunks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head + log-softmax over `logprob_chunk_size` positions at a time ([n, H] -> 2 × [n])."""
        head = self.policy.get_output_embeddings()
        size = self.logprob_chunk_size
        starts = list(range(0, hidden.shape[0], size))
        lps, ents = [], []
        for k in range(max(num_chunks, len(starts))):
            # Past the data: a one-position call, weighted 0 below (see module doc).
            at = slice(starts[k], starts[k] + size) if k < len(starts) else slice(0, 1)
            if torch.is_grad_enabled():
                lp, ent = checkpoint(
                    _head_logprobs, head, hidden[at], targets[at], use_reentrant=False
                )
            else:
                lp, ent = _head_logprobs(head, hidden[at], targets[at])
            if k < len(starts):
                lps.append(lp)
                ents.append(ent)
            else:
                lps[0] = lps[0] + 0.0 * lp.sum()
        return torch.cat(lps), torch.cat(ents)


def _head_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: logits = head(hidden), then log p(target) and entropy (float32)."""
    return logprobs_and_entropy(head(hidden), targets)
