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
from mpillm.quant import (PackedLinear, auto_form, check_group_split, concat_rows, dequantize_int8, from_gguf_q4,
                          from_gguf_q8_0, pack_int8, pack_q4, q4_1_form, quantize_int8)

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


def projection_sources(cfg, shard: Shard, i: int) -> dict[str, list[tuple[str, slice | None, slice | None]]]:
    """Where this rank's merged projections of layer i come from: {"qkv", "o", "gate_up", "down"} ->
    [(checkpoint tensor, rows, cols)], stacked along rows in that order. Column-parallel weights take
    whole rows (heads, MLP channels), row-parallel ones input columns. Every backend cuts through this."""
    p, hd = f"model.layers.{i}", cfg.head_dim
    q_rows = _rows_of_heads(shard.q_lo, shard.q_hi, hd)
    kv_rows = _rows_of_heads(shard.kv_lo, shard.kv_hi, hd)
    ffn = slice(shard.ffn_lo, shard.ffn_hi)
    return {
        "qkv": [(f"{p}.self_attn.q_proj.weight", q_rows, None), (f"{p}.self_attn.k_proj.weight", kv_rows, None),
                (f"{p}.self_attn.v_proj.weight", kv_rows, None)],
        "o": [(f"{p}.self_attn.o_proj.weight", None, q_rows)],
        "gate_up": [(f"{p}.mlp.gate_proj.weight", ffn, None), (f"{p}.mlp.up_proj.weight", ffn, None)],
        "down": [(f"{p}.mlp.down_proj.weight", None, ffn)],
    }


def load_merged(ckpt: Checkpoint, sources) -> np.ndarray:
    """The float32 weight of a merged projection: its sources' slices stacked along rows."""
    parts = [ckpt.load(name, rows=rows, cols=cols) for name, rows, cols in sources]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def bias_sources(sources):
    return [(name[: -len("weight")] + "bias", rows, None) for name, rows, cols in sources]


QUANT_MODES = ("auto", "none", "int8")


def load_packed(ckpt: Checkpoint, sources, mode: str, group_size: int = 128) -> PackedLinear | None:
    """A merged projection for the quantized GPU kernels, or None where it stays in float.

    mode "auto": GGUF Q8_0 blocks as W8A16 (groups of 32) and Q4_0/Q4_1 blocks as W4A16, bit for bit; Q4_K
                 blocks (and Q4_0/Q4_1 merged with them or with each other) as W4A16 in Q4_1's form, d q + m per 32
                 (q4_1_form: Q4_K's d sc_j and dmin m_j rounded to fp16); float tensors and the other GGUF
                 types (Q6_K, Q5_K, ...) stay float.
    mode "int8": every source as W8A16: Q8_0 blocks as they are when all sources are Q8_0, else each
                 source's float weight (exactly dequantized GGUF blocks included) quantized in groups of
                 `group_size` (a row-parallel shard must start and end on a group boundary).
    mode "none": None.
    Sources of kinds with no common form (e.g. Q4_K and Q6_K rows merged, as Q4_K_M files make q/k/v in some
    layers) fall back to float under "auto", as does a Q4_K block whose fp16 scale would overflow."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize mode {mode!r}: expected one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return None
    native = [ckpt.load_blocks(name, rows=rows, cols=cols) for name, rows, cols in sources]
    form = auto_form({n[0] if n else None for n in native})
    if form == "Q8_0":
        return concat_rows([pack_int8(*from_gguf_q8_0(raw), 32) for _, raw in native])
    if mode == "auto":
        if form in ("Q4_0", "Q4_1"):
            return concat_rows([pack_q4(*from_gguf_q4(raw, kind)) for kind, raw in native])
        if form == "Q4_1_FORM":
            try:
                return concat_rows([pack_q4(*q4_1_form(kind, raw)) for kind, raw in native])
            except ValueError:        # a scale past fp16: this projection stays float (exactly decoded)
                return None
        return None
    parts = []
    for name, rows, cols in sources:
        try:
            K = ckpt.shape(name)[-1]
            if cols is not None:
                start, stop, _ = cols.indices(K)
                check_group_split(K, group_size, start, stop)
            parts.append(pack_int8(*quantize_int8(ckpt.load(name, rows=rows, cols=cols), group_size), group_size))
        except ValueError as e:
            raise ValueError(f"int8 quantization of {name}: {e}") from None
    return concat_rows(parts)


class ColumnParallelLinear:
    """Output rows of this shard, no communication: q/k/v merged [(n_heads + 2 n_kv) * hd, hidden] (with
    Qwen2's biases), or gate/up merged [2 * ffn_local, hidden] (SwiGLU splits the halves)."""

    def __init__(self, ckpt: Checkpoint, sources, bias: bool = False):
        self.weight = load_merged(ckpt, sources)
        self.bias = load_merged(ckpt, bias_sources(sources)) if bias else None

    def __call__(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class RowParallelLinear:
    """y = all_reduce(x_local @ W[:, cols].T) + b: each rank holds the input columns it computes."""

    def __init__(self, ckpt: Checkpoint, sources, comm, bias_name: str | None = None):
        self.weight = load_merged(ckpt, sources)
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
