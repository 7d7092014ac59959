"""NumPy layers, each loading its own shard of a checkpoint tensor (vLLM's names, gpt-fast's cuts).

Column-parallel layers own output rows and need no communication; row-parallel layers own input columns
and end in the group's sum all-reduce; the vocabulary is cut across ranks for the embedding (sum) and for
the LM head (gather). These are the only places a collective is called.
"""

from __future__ import annotations

import numpy as np

from mpillm import ops
from mpillm.checkpoint import Checkpoint
from mpillm.parallel import Shard


def _rows_of_heads(lo, hi, hd):
    return slice(lo * hd, hi * hd)


class QKVParallelLinear:
    """Column-parallel q, k, v merged: W [(n_heads + 2 n_kv) * hd, hidden] for this shard's heads."""

    def __init__(self, ckpt: Checkpoint, prefix: str, shard: Shard, hd: int, bias: bool):
        rows = [_rows_of_heads(shard.q_lo, shard.q_hi, hd), _rows_of_heads(shard.kv_lo, shard.kv_hi, hd),
                _rows_of_heads(shard.kv_lo, shard.kv_hi, hd)]
        names = ("q_proj", "k_proj", "v_proj")
        self.weight = np.concatenate([ckpt.load(f"{prefix}.{n}.weight", rows=r) for n, r in zip(names, rows)])
        self.bias = (np.concatenate([ckpt.load(f"{prefix}.{n}.bias", rows=r) for n, r in zip(names, rows)])
                     if bias else None)

    def __call__(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear:
    """gate and up merged: W [2 * ffn_local, hidden]; SwiGLU splits the halves."""

    def __init__(self, ckpt: Checkpoint, names: list[str], rows: slice):
        self.weight = np.concatenate([ckpt.load(n, rows=rows) for n in names])

    def __call__(self, x):
        return x @ self.weight.T


class RowParallelLinear:
    """y = all_reduce(x_local @ W[:, cols].T) + b: each rank holds the input columns it computes."""

    def __init__(self, ckpt: Checkpoint, name: str, cols: slice, comm, bias_name: str | None = None):
        self.weight = ckpt.load(name, cols=cols)
        self.bias = ckpt.load(bias_name) if bias_name and ckpt.has(bias_name) else None
        self.comm = comm

    def __call__(self, x):
        y = self.comm.all_reduce(x @ self.weight.T)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding:
    """Rows [vocab_lo, vocab_hi) of the table; ids outside give zeros and the sum all-reduce fills them in."""

    def __init__(self, ckpt: Checkpoint, shard: Shard, comm):
        self.lo, self.hi = shard.vocab_lo, shard.vocab_hi
        self.weight = ckpt.load("model.embed_tokens.weight", rows=slice(self.lo, self.hi))
        self.comm = comm

    def __call__(self, ids):
        local = (ids >= self.lo) & (ids < self.hi)
        out = np.zeros((len(ids), self.weight.shape[1]), np.float32)
        out[local] = self.weight[ids[local] - self.lo]
        return self.comm.all_reduce(out) if self.comm.size > 1 else out


class ParallelLMHead:
    """logits = gather over ranks of x @ W[vocab_lo:vocab_hi].T; shares the embedding shard when tied."""

    def __init__(self, ckpt: Checkpoint, shard: Shard, comm, tied: VocabParallelEmbedding | None):
        self.weight = tied.weight if tied is not None else ckpt.load(
            "lm_head.weight", rows=slice(shard.vocab_lo, shard.vocab_hi))
        self.comm = comm

    def __call__(self, x):
        return np.concatenate(self.comm.all_gather(x @ self.weight.T), axis=-1)


class RMSNorm:
    def __init__(self, ckpt: Checkpoint, name: str, eps: float):
        self.weight, self.eps = ckpt.load(name), eps

    def __call__(self, x):
        return ops.rms_norm(x, self.weight, self.eps)
