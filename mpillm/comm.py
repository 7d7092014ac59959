"""Communicators for one tensor-parallel group. Only the parallel layers call them.

`SingleComm` is the trivial group of one rank; `MPIComm` sums and gathers NumPy arrays over mpi4py (the CPU
path). The GPU path provides the same two collectives over NCCL on device buffers.
"""

from __future__ import annotations

import numpy as np


class SingleComm:
    rank, size = 0, 1

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]


class MPIComm:
    def __init__(self, mpi_comm):
        self.comm = mpi_comm
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        from mpi4py import MPI
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=MPI.SUM)
        return out

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        """Every rank's array (shapes may differ between ranks), in rank order."""
        return self.comm.allgather(np.ascontiguousarray(x))
