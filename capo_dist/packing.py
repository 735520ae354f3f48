"""Micro-batches of the learner: fixed row counts (padded) or a token budget (packed, no padding).

`plan_micro_batches` splits a rank's rows into micro-batches: `micro_batch_size`
rows each (`max_tokens` 0, padded rows as today), or, with `max_tokens` > 0,
first-fit-decreasing bins of at most `max_tokens` real tokens (a longer row
gets a bin of its own). `pack` lays a micro-batch's real tokens end to end in
one row with position ids restarting at 0 for each sequence, and `unpack`
puts per-token values back in the padded [b, L] layout; the model keeps
attention inside each sequence (`capo_dist.logprob_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def plan_micro_batches(
    rows: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int, max_tokens: int
) -> list[torch.Tensor]:
    """Row indices of each micro-batch (`rows` in order when padded; by size when packed).

    `lengths[i]` is the number of real tokens of row `rows[i]`.
    """
    if max_tokens <= 0:
        return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    bins: list[list[int]] = []
    room: list[int] = []
    order = sorted(range(len(rows)), key=lambda i: -int(lengths[i]))
    for i in order:
        n = int(lengths[i])
        for k, free in enumerate(room):
            if n <= free:
                bins[k].append(i)
                room[k] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return [rows[torch.tensor(b, dtype=torch.long)] for b in bins]


@dataclass
class PackedRow:
    """One micro-batch packed into a single row, and where each token came from.

    `input_ids`, `position_ids`: [1, N]; `src_row`, `src_col`: [N], the
    (row, column) of each packed token in the padded micro-batch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    src_row: torch.Tensor
    src_col: torch.Tensor


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRow:
    """The real tokens (attention_mask 1) of every row, end to end; positions restart per row."""
    src_row, src_col = attention_mask.nonzero(as_tuple=True)  # row-major: rows stay contiguous
    positions = attention_mask.long().cumsum(-1) - 1
    return PackedRow(
        input_ids=input_ids[src_row, src_col].unsqueeze(0),
        position_ids=positions[src_row, src_col].unsqueeze(0),
        src_row=src_row,
        src_col=src_col,
    )


def unpack(values: torch.Tensor, packed: PackedRow, shape: tuple[int, int]) -> torch.Tensor:
    """Per-token `values` [1, N] of a packed row back in the padded layout `shape` (0 elsewhere)."""
    out = values.new_zeros(shape)
    index = (packed.src_row.to(values.device), packed.src_col.to(values.device))
    return out.index_put(index, values[0])
