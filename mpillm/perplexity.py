"""Perplexity of a model on a text, with the NumPy backend: HF's strided sliding-window evaluation.

Windows of up to `context` tokens start every `stride` tokens; each window scores only the tokens no earlier
window scored, with at least `context - stride` tokens of context (less at the very start). With
stride < context every token after the first is scored exactly once; with stride == context the windows do
not overlap and the first token of each window, which has no context, is not scored. Position ids restart
at 0 in every window, as in transformers' recipe, so the numbers are comparable with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpillm.batch import StepInput

DEFAULT_TEXT = Path(__file__).parent / "data" / "perplexity.txt"


@dataclass
class PerplexityResult:
    tokens: int          # tokens in the evaluated sequence
    scored: int          # tokens predicted and scored (tokens - 1 when stride < context)
    windows: int
    nll: float           # mean negative log-likelihood, nats per scored token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64 (sums over thousands of tokens stay accurate)."""
    z = logits.astype(np.float64)
    m = z.max(axis=-1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=-1))
    return lse - z[np.arange(len(z)), targets]


def windows(n: int, context: int, stride: int):
    """(begin, end, first scored position) of each window over n tokens."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        yield begin, end, max(prev_end, begin + 1)      # position 0 has nothing to be predicted from
        prev_end = end
        if end == n:
            return


def perplexity(model, ids, context: int = 512, stride: int = 256, block_size: int = 16,
               progress=None) -> PerplexityResult:
    """Strided perplexity of `model` (a model.Transformer) on token ids. `progress(done, total)` per window."""
    ids = np.asarray(ids, dtype=np.int32)
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context (got context {context}, stride {stride})")
    spans = list(windows(len(ids), context, stride))
    table = list(range(-(-context // block_size)))
    cache = model.new_cache(len(table), block_size)     # every window rewrites positions 0.. of the same blocks
    total, scored = 0.0, 0
    for i, (begin, end, first) in enumerate(spans):
        step = StepInput.build([(ids[begin:end].tolist(), 0, table, True)], block_size)
        # Logits only at the positions that predict newly scored tokens: saves most of the LM head.
        step = dataclasses.replace(step, logits_index=np.arange(first - 1 - begin, end - 1 - begin, dtype=np.int32))
        total += float(token_nll(model.forward(step, cache), ids[first:end]).sum())
        scored += end - first
        if progress:
            progress(i + 1, len(spans))
    return PerplexityResult(tokens=len(ids), scored=scored, windows=len(spans), nll=total / scored)
