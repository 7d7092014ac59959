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

    def run(self, work, timeout=120):
        """work(rank) on every rank's thread; the results in rank order. An exception on one rank aborts the
        others' collectives and is raised here; a rank still running after `timeout` seconds fails the test."""
        out, errors = [None] * self.size, []

        def one(r):
            try:
                out[r] = work(r)
            except BaseException as e:          # noqa: surface in the main thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in threads), "tensor-parallel ranks hung"
        if errors:
            raise errors[0]
        return out


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
