"""Runners execute one scheduled step: the forward pass on this rank's shard, then sampling.

`NumpyRunner` is the CPU backend. `GroupRunner` makes a tensor-parallel group act as one runner: the
group's first rank (the leader, which owns the engine) broadcasts each step's small metadata over MPI and
every rank replays it; tensors move only through the model's collectives.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mpillm.batch import StepInput
from mpillm.sampler import sample_token, top_logprobs


def pick(logits_row: np.ndarray, spec) -> tuple[int, tuple | None]:
    """(next token, (token, logprob, top) when logprobs were asked) from one sequence's logits."""
    hist = spec.history if spec.history is not None else np.empty(0, np.int64)
    token = sample_token(logits_row, spec.params, spec.seed, spec.step, hist)
    if not spec.params.logprobs:
        return token, None
    lp, top = top_logprobs(logits_row, token, spec.params.logprobs)
    return token, (token, lp, top)


class NumpyRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model
        self.cache = model.new_cache(num_blocks, block_size)

    def execute(self, step: StepInput, specs, sample: bool = True):
        logits = self.model.forward(step, self.cache)
        if not sample:
            return []
        return [pick(logits[i], spec) for i, spec in enumerate(specs)]

    # The engine's one-step lag (mpillm.engine), synchronous here: the CPU has nothing to overlap, but the engine
    # runs the same bookkeeping as on the GPU. Fed ids (< 0) name rows of the previous launch's samples, which a
    # group peer (fetch=False) samples too, as every GPU rank does.
    _last = np.zeros(0, np.int32)

    def launch(self, step: StepInput, specs, fetch: bool = True):
        if (step.input_ids < 0).any():
            ids = step.input_ids.copy()
            fed = ids < 0
            ids[fed] = self._last[-1 - ids[fed]]
            step = dataclasses.replace(step, input_ids=ids)
        picks = self.execute(step, specs)
        self._last = np.array([t for t, _ in picks], np.int32)
        return picks if fetch else None

    def collect(self, picks):
        return picks

    def logits(self, step: StepInput) -> np.ndarray:
        """Logits of every token of the step (perplexity)."""
        return self.model.forward(step, self.cache, all_logits=True)


class GroupRunner:
    """One tensor-parallel group seen as a single runner by the leader's engine."""

    def __init__(self, local, group_comm):
        self.local, self.group = local, group_comm

    @property
    def is_leader(self) -> bool:
        return self.group.Get_rank() == 0

    def execute(self, step: StepInput, specs):
        return self.collect(self.launch(step, specs))

    def launch(self, step: StepInput, specs):
        if self.group.Get_size() > 1:
            self.group.bcast(("step", step, specs), root=0)
        return self.local.launch(step, specs)

    def collect(self, handle):
        return self.local.collect(handle)

    def serve(self, should_stop=lambda: False) -> str:
        """Peers: replay the leader's steps until it says stop; returns the leader's closing word. A peer never
        reads ids back: it launches and takes the next message (its own GPU keeps its ids for fed tokens)."""
        while True:
            msg = self.group.bcast(None, root=0)
            if msg[0] != "step":
                return msg[0]
            should_stop()
            self.local.launch(msg[1], msg[2], fetch=False)

    def close(self, word: str = "done"):
        if self.group.Get_size() > 1:
            self.group.bcast((word,), root=0)
