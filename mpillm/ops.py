"""NumPy reference operators, float32.

These are the oracle: the NumPy backend is built from them and every CUDA kernel is tested against them.
They follow HF transformers' Llama/Qwen2 modelling code operation for operation, so keep them plain.
"""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, H] -> x / sqrt(mean(x^2) + eps) * weight, computed in float32."""
    x = x.astype(np.float32, copy=False)
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * weight


def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float):
    """The fused pre-norm step: residual += x, returns (rms_norm(residual), residual)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim/2] of the rotary embedding, with HF's `linear` and `llama3` scalings."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r}")
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray):
    """cos, sin [T, head_dim] for integer positions [T] (HF layout: the half-frequencies repeated twice)."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, head_dim] rotated HF-style (rotate_half pairs element i with i + head_dim/2)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU: gate_up [T, 2I] (gate first) -> silu(gate) * up [T, I]."""
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    return gate / (1.0 + np.exp(-gate)) * up


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
              group: int | None = None, head_offset: int = 0) -> np.ndarray:
    """Causal GQA attention of one sequence.

    q [n, n_heads, hd] at absolute positions q_positions [n]; k, v [ctx, n_kv, hd] for positions 0..ctx-1.
    Query at position p sees keys 0..p. Query head h reads kv head (h + head_offset) // group, which is HF's
    repeat_kv when head_offset = 0 and group = n_heads / n_kv; a tensor-parallel shard whose first head is
    not the first of its group passes head_offset = (first head) % group. Returns [n, n_heads, hd].
    """
    n, n_heads, hd = q.shape
    ctx, n_kv, _ = k.shape
    group = group or n_heads // n_kv
    kv_of = (np.arange(n_heads) + head_offset) // group
    qh = q.transpose(1, 0, 2)                                       # [n_heads, n, hd]
    kh = k[:, kv_of].transpose(1, 2, 0)                             # [n_heads, hd, ctx]
    vh = v[:, kv_of].transpose(1, 0, 2)                             # [n_heads, ctx, hd]
    scores = qh @ kh * (1.0 / math.sqrt(hd))                        # [n_heads, n, ctx]
    visible = np.arange(ctx)[None, :] <= q_positions[:, None]       # [n, ctx]
    scores = np.where(visible[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ vh).transpose(1, 0, 2)                              # [n, n_heads, hd]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
