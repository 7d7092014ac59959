"""Token sampling on the host (NumPy): greedy, temperature, top-k, top-p, min-p, repetition penalty.

Each draw uses a generator keyed by (request seed, generation step) alone, so a request's samples never
depend on which other requests share its batch, on the data-parallel layout, or on a preemption.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mpillm import ops


def request_seed(seed: int | None, global_seed: int, request_id: str) -> int:
    """The request's own seed, else one derived from the job seed and the request id."""
    if seed is not None:
        return int(seed) & 0xFFFFFFFFFFFFFFFF
    digest = hashlib.sha256(f"{global_seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """HF's rule: for every token already seen, divide a positive logit by the penalty, multiply a negative one."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    logits = logits.copy()
    seen = np.unique(history)
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p and min-p (HF's order), renormalised."""
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = cum - p[order] < top_p          # keep the smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
    if min_p > 0.0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


def sample_token(logits: np.ndarray, params, seed: int, step: int, history: np.ndarray) -> int:
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    p = filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    u = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, step]).random()
    idx = int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))
    return min(idx, len(p) - 1)


def top_logprobs(logits: np.ndarray, token: int, k: int):
    """(logprob of `token`, [(id, logprob)] of the k most likely) under the model's raw distribution."""
    lp = ops.log_softmax(logits.astype(np.float64))
    top = np.argsort(-lp, kind="stable")[:k]
    return float(lp[token]), [(int(i), float(lp[i])) for i in top]
