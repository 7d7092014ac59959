"""NumPy layers, each loading its own shard of a checkpoint tensor (vLLM's names, gpt-fast's cuts).

Column-parallel layers own output rows and need no communication; row-parallel layers own input columns
and end in the group's sum all-reduce; the vocabulary is cut across ranks for the embedding (sum) and for
the LM head (gather). These are the only places a collective is called.
`Int8Simulated` wraps a checkpoint so every projection shard is loaded int8-quantized then dequantized: the
W8A16 numerics (float32 compute on int8-rounded weights), the oracle for a GPU W8A16 kernel.
"""

from __future__ import annotations

import numpy as np

from mpillm import ops
from mpillm.checkpoint import Checkpoint
from mpillm.parallel import Shard
from mpillm.quant import check_group_split, dequantize_int8, quantize_int8

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


class Int8Simulated:
    """A checkpoint whose projection weights come back as dequantize_int8(quantize_int8(shard)).

    Each layer loads its own shard of each source tensor, so quantization happens per source tensor and per
    shard, before q/k/v or gate/up are merged; groups run along K (input columns). Column-parallel shards
    hold whole rows, so their groups are the full tensor's; a row-parallel shard must start and end on a group
    boundary (check_group_split), and then TP ranks together hold exactly the TP=1 quantized weight.
    The embedding and LM head are quantized only with `lm_head`; norms and biases never are."""

    def __init__(self, ckpt: Checkpoint, group_size: int = 128, lm_head: bool = False):
        self.ckpt, self.group_size, self.lm_head = ckpt, group_size, lm_head

    def __getattr__(self, name):            # config, path, has, shape, tokenizer, quantized: the checkpoint's
        return getattr(self.ckpt, name)

    def quantizes(self, name: str) -> bool:
        if name in _VOCAB:
            return self.lm_head
        parts = name.split(".")
        return name.endswith(".weight") and len(parts) >= 3 and parts[-2] in _PROJECTIONS

    def load(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        w = self.ckpt.load(name, rows=rows, cols=cols)
        if not self.quantizes(name):
            return w
        try:
            if cols is not None:
                K = self.ckpt.shape(name)[-1]
                start, stop, _ = cols.indices(K)
                check_group_split(K, self.group_size, start, stop)
            return dequantize_int8(*quantize_int8(w, self.group_size), self.group_size)
        except ValueError as e:
            raise ValueError(f"int8 quantization of {name}: {e}") from None


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
