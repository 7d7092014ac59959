"""Keep ranks that share a node from oversubscribing its cores.

With N ranks on a node, each rank's BLAS would start one thread per core; N x cores spinning threads make
the NumPy backend many times slower than one rank. This must run before NumPy is first imported.
"""

from __future__ import annotations

import os

_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "MV2_COMM_WORLD_LOCAL_SIZE")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads() -> None:
    if any(v in os.environ for v in _THREAD_VARS):
        return                      # the user decided
    for var in _LOCAL_SIZE_VARS:
        try:
            local = int(os.environ[var].split("(")[0].split(",")[0])
        except (KeyError, ValueError):
            continue
        if local > 1:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            n = str(max(1, cores // local))
            for t in _THREAD_VARS:
                os.environ[t] = n
        return
