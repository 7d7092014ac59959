"""Continuous batching in plain Python (no GPU import): who runs in the next step, and how many tokens.

Every step carries at most `max_num_batched_tokens` new tokens: running sequences first (one decode token,
or the next chunk of an unfinished prefill), then waiting sequences are admitted as blocks allow, their
prompts chunked to the budget left. When the cache runs out, the most recently admitted sequence is
preempted by recompute: its blocks are freed and it waits again with everything generated so far.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mpillm.block_manager import BlockManager


@dataclass(eq=False)   # identity: `seq in running` must not compare token lists
class Sequence:
    seq_id: int
    token_ids: list[int]           # prompt followed by generated tokens
    num_prompt: int
    max_tokens: int                # completion tokens allowed (already capped by the context length)
    payload: object = None         # the engine's per-request state
    num_computed: int = 0          # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    preemptions: int = 0
    stopping: bool = False         # its last allowed token is in flight: nothing more to schedule
    finished: bool = False

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.blocks.free_table(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed = 0
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of new tokens)] for the next step; every sequence has blocks for them."""
        budget, out = self.budget, []
        preempted: set[Sequence] = set()       # this step, to make room for an earlier sequence
        for seq in list(self.running):
            if seq in preempted or seq.stopping:
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.blocks.grow(seq.block_table, seq.num_computed + n):
                if self.running == [seq] and not out:
                    # Alone and still short of blocks: preempting itself would only loop forever.
                    raise RuntimeError(
                        f"KV cache too small: {self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens "
                        f"cannot hold a sequence of {seq.num_computed + n} tokens")
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim)
                if victim is seq:
                    break
            if seq not in preempted:
                out.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            got = self.blocks.allocate_prompt(seq.token_ids, budget)
            if got is None:
                if not self.running and not out:
                    raise RuntimeError(
                        f"KV cache too small: {self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens "
                        f"cannot hold one step of a {len(seq.token_ids)}-token sequence")
                break
            table, hashes, cached = got
            n = min(len(seq.token_ids) - cached, budget)
            self.waiting.popleft()
            seq.block_table, seq.block_hashes, seq.num_computed = table, hashes, cached
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out

    def finish(self, seq: Sequence):
        """Done: its blocks go back. A sequence can end while waiting: preempted while its last token was
        still on the device (the engine reads tokens back one step late)."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_table(seq.block_table)
        else:
            self.waiting.remove(seq)

    def drop_all(self) -> list[Sequence]:
        """Stop everything (preemption signal): free every block, return the unfinished sequences."""
        left = self.running + list(self.waiting)
        for seq in self.running:
            self.blocks.free_table(seq.block_table)
        self.running, self.waiting = [], deque()
        return left
