"""An in-process tensor-parallel group for CPU tests: ranks are threads, collectives meet at a barrier."""

import threading

import numpy as np


class ThreadGroup:
    """T ranks in lock-step threads; collectives meet at a barrier (a hang fails by timeout, not forever)."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size
        self.calls = 0

    def comm(self, rank):
        return FakeComm(self, rank)


class FakeComm:
    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, x):
        g = self.group
        g.slots[self.rank] = np.ascontiguousarray(x)
        g.barrier.wait()
        got = list(g.slots)
        g.barrier.wait()            # nobody overwrites a slot before everyone has read it
        if self.rank == 0:
            g.calls += 1
        return got

    def all_reduce(self, x):
        got = self._exchange(x)
        assert all(a.shape == got[0].shape for a in got), [a.shape for a in got]
        out = np.zeros_like(got[0])
        for a in got:               # same order on every rank: bitwise-identical results
            out += a
        return out

    def all_gather(self, x):
        return [a.copy() for a in self._exchange(x)]
