"""The Llama-family transformer on NumPy, float32: the reference backend and the oracle for the CUDA kernels.

embed -> for each layer: x += attn(norm(x)); x += mlp(norm(x)) -> norm -> logits.
Llama 2/3/3.1, SmolLM2, Mistral and Qwen2 (q/k/v biases) differ only in config.
"""

from __future__ import annotations

import numpy as np

from mpillm import ops
from mpillm.batch import StepInput
from mpillm.checkpoint import Checkpoint
from mpillm.comm import SingleComm
from mpillm.config import ModelConfig
from mpillm.layers import (ColumnParallelLinear, Int8Simulated, ParallelLMHead, RMSNorm, RowParallelLinear,
                           VocabParallelEmbedding, projection_sources)
from mpillm.parallel import Shard, make_shard


class KVCache:
    """Paged cache of one rank: per layer k, v [num_blocks, block_size, n_kv_local, hd]."""

    def __init__(self, cfg: ModelConfig, shard: Shard, num_blocks: int, block_size: int):
        shape = (num_blocks, block_size, shard.n_kv_heads, cfg.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.block_size = block_size

    def store(self, layer: int, k, v, slots):
        flat = (-1,) + self.k[layer].shape[2:]
        self.k[layer].reshape(flat)[slots] = k
        self.v[layer].reshape(flat)[slots] = v

    def gather(self, layer: int, table, ctx: int):
        """k, v [ctx, n_kv_local, hd] of one sequence, read through its block table."""
        blocks = table[: -(-ctx // self.block_size)]
        flat = (-1,) + self.k[layer].shape[2:]
        return self.k[layer][blocks].reshape(flat)[:ctx], self.v[layer][blocks].reshape(flat)[:ctx]


class Attention:
    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, shard: Shard, comm, i: int):
        self.layer, self.shard, self.hd = i, shard, cfg.head_dim
        src = projection_sources(cfg, shard, i)
        self.qkv_proj = ColumnParallelLinear(ckpt, src["qkv"], cfg.attention_bias)
        self.o_proj = RowParallelLinear(ckpt, src["o"], comm)

    def __call__(self, x, step: StepInput, rope, cache: KVCache):
        nq, nkv, hd = self.shard.n_heads, self.shard.n_kv_heads, self.hd
        qkv = self.qkv_proj(x)                                            # [T, (nq + 2 nkv) * hd]
        q = qkv[:, : nq * hd].reshape(-1, nq, hd)
        k = qkv[:, nq * hd: (nq + nkv) * hd].reshape(-1, nkv, hd)
        v = qkv[:, (nq + nkv) * hd:].reshape(-1, nkv, hd)
        cos, sin = rope
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        cache.store(self.layer, k, v, step.slot_mapping)
        out = np.empty_like(q)                                            # [T, nq, hd]
        for s in range(step.num_seqs):
            a, b = step.query_start[s], step.query_start[s + 1]
            ks, vs = cache.gather(self.layer, step.block_tables[s], step.context_lens[s])
            out[a:b] = ops.attention(q[a:b], ks, vs, step.positions[a:b], self.shard.group, self.shard.head_offset)
        return self.o_proj(out.reshape(len(x), nq * hd))


class MLP:
    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, shard: Shard, comm, i: int):
        src = projection_sources(cfg, shard, i)
        self.gate_up_proj = ColumnParallelLinear(ckpt, src["gate_up"])
        self.down_proj = RowParallelLinear(ckpt, src["down"], comm)

    def __call__(self, x):
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer:
    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, shard: Shard, comm, i: int):
        p = f"model.layers.{i}"
        self.input_layernorm = RMSNorm(ckpt, f"{p}.input_layernorm.weight", cfg.rms_norm_eps)
        self.self_attn = Attention(ckpt, cfg, shard, comm, i)
        self.post_attention_layernorm = RMSNorm(ckpt, f"{p}.post_attention_layernorm.weight", cfg.rms_norm_eps)
        self.mlp = MLP(ckpt, cfg, shard, comm, i)

    def __call__(self, x, step, rope, cache):
        x = x + self.self_attn(self.input_layernorm(x), step, rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer:
    """One tensor-parallel rank's share of the model. `forward` returns logits [L, vocab] for step.logits_index.

    quantize="int8": every projection weight is int8-quantized (groups of `group_size` along K) and
    dequantized right after loading, i.e. W8A16 numerics; the embedding/LM head too with `quantize_lm_head`."""

    def __init__(self, ckpt: Checkpoint, comm=None, quantize: str | None = None, group_size: int = 128,
                 quantize_lm_head: bool = False):
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize={quantize!r}: only None and 'int8' are supported")
        if quantize:
            ckpt = Int8Simulated(ckpt, group_size, quantize_lm_head)
        comm = comm or SingleComm()
        cfg = self.config = ckpt.config
        self.shard = make_shard(cfg, comm.rank, comm.size)
        self.embed_tokens = VocabParallelEmbedding(ckpt, self.shard, comm)
        self.layers = [DecoderLayer(ckpt, cfg, self.shard, comm, i) for i in range(cfg.num_layers)]
        self.norm = RMSNorm(ckpt, "model.norm.weight", cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(ckpt, self.shard, comm, self.embed_tokens if cfg.tie_word_embeddings else None)
        self.inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        return KVCache(self.config, self.shard, num_blocks, block_size)

    def forward(self, step: StepInput, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        rope = ops.rope_cos_sin(step.positions, self.inv_freq)
        x = self.embed_tokens(step.input_ids)                             # [T, hidden]
        for layer in self.layers:
            x = layer(x, step, rope, cache)
        x = x if all_logits else x[step.logits_index]                     # only the rows we sample from
        return self.lm_head(self.norm(x))                                 # [L, vocab]
