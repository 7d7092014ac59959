"""The metadata of one forward step: what the scheduler decides and every rank of a group replays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepInput:
    """T new tokens of S sequences, flattened in sequence order.

    input_ids     [T] int32   token ids
    positions     [T] int32   absolute position of each token in its sequence
    slot_mapping  [T] int32   KV-cache slot (block * block_size + offset) each token's k/v is written to
    query_start   [S+1] int32 sequence s owns tokens query_start[s]:query_start[s+1]
    context_lens  [S] int32   KV length of sequence s after this step (cached + new)
    block_tables  [S, max_blocks] int32, padded with 0
    logits_index  [L] int32   flat token indices whose logits are wanted (last token of each sequence that samples)
    """
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    logits_index: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @classmethod
    def build(cls, seqs: list[tuple[list[int], int, list[int], bool]], block_size: int) -> "StepInput":
        """seqs: (new token ids, number already cached, block table, wants logits) per sequence."""
        n = [len(tokens) for tokens, _, _, _ in seqs]
        starts = np.zeros(len(seqs) + 1, np.int32)
        np.cumsum(n, out=starts[1:])
        width = max((len(t) for _, _, t, _ in seqs), default=1) or 1
        tables = np.zeros((len(seqs), width), np.int32)
        for i, (_, _, table, _) in enumerate(seqs):
            tables[i, :len(table)] = table
        cached = np.array([c for _, c, _, _ in seqs], np.int32)
        seq_of = np.repeat(np.arange(len(seqs)), n)                     # [T] sequence of each token
        positions = (cached[seq_of] + np.arange(starts[-1]) - starts[:-1][seq_of]).astype(np.int32)
        slots = tables[seq_of, positions // block_size] * block_size + positions % block_size
        ids = np.fromiter((t for tokens, _, _, _ in seqs for t in tokens), np.int32, count=int(starts[-1]))
        want = np.array([starts[i + 1] - 1 for i, (_, _, _, w) in enumerate(seqs) if w], np.int32)
        return cls(ids, positions, slots.astype(np.int32), starts, cached + np.array(n, np.int32), tables, want)


def split_step(step: StepInput, t1: int) -> tuple[StepInput, StepInput]:
    """The step as two that run one after the other: tokens [0, t1) and [t1, T).

    A sequence whose tokens straddle t1 becomes two chunks, the first ending t1 - query_start[s] tokens into
    its new tokens (its context_len shortened by what the second chunk adds), exactly as chunked prefill
    would have cut it, so running the halves in order writes the same KV cache and computes every token
    against the same keys as the whole step. Each half is a step of its own (query_start counts from its
    first token); logits_index is left empty: the caller takes logits from the whole step's rows.
    """
    T, qs = step.num_tokens, step.query_start
    if not 0 < t1 < T:
        raise ValueError(f"t1: {t1} must split the step's {T} tokens into two non-empty halves")
    s_cut = int(np.searchsorted(qs, t1, side="right")) - 1       # the sequence holding token t1
    straddles = qs[s_cut] < t1
    empty = np.zeros(0, np.int32)

    hi1 = s_cut + 1 if straddles else s_cut                      # sequences [0, hi1) in the first half
    qs1 = qs[: hi1 + 1].copy()
    ctx1 = step.context_lens[:hi1].copy()
    if straddles:
        qs1[-1] = t1
        ctx1[-1] -= int(qs[s_cut + 1]) - t1
    first = StepInput(step.input_ids[:t1], step.positions[:t1], step.slot_mapping[:t1], qs1, ctx1,
                      step.block_tables[:hi1], empty)

    qs2 = qs[s_cut:] - t1
    qs2[0] = 0
    second = StepInput(step.input_ids[t1:], step.positions[t1:], step.slot_mapping[t1:], qs2,
                       step.context_lens[s_cut:].copy(), step.block_tables[s_cut:], empty)
    return first, second
