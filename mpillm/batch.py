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
