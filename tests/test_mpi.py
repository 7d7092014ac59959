"""In-process MPI tests: `mpirun -n 2 pytest --with-mpi --only-mpi` (skipped in a plain pytest run)."""

import numpy as np
import pytest

mpi = pytest.mark.mpi(min_size=2)


@mpi
def test_comm_collectives():
    from mpi4py import MPI

    from mpillm.comm import MPIComm
    c = MPIComm(MPI.COMM_WORLD)
    x = np.arange(6, dtype=np.float32).reshape(2, 3) * (c.rank + 1)
    total = sum(range(1, c.size + 1))
    np.testing.assert_allclose(c.all_reduce(x), np.arange(6, dtype=np.float32).reshape(2, 3) * total)
    parts = c.all_gather(np.full((2, c.rank + 1), c.rank, np.float32))   # uneven widths, like vocab shards
    assert [p.shape for p in parts] == [(2, r + 1) for r in range(c.size)]
    assert all((p == r).all() for r, p in enumerate(parts))


@mpi
def test_layout_groups_and_node_local_rank():
    from mpi4py import MPI

    from mpillm.job import UsageError, make_layout
    w = MPI.COMM_WORLD
    lay = make_layout(w, 2 if w.Get_size() % 2 == 0 else 1)
    assert lay.group.Get_size() == lay.tp
    assert lay.group.Get_rank() == w.Get_rank() % lay.tp
    assert 0 <= lay.local_rank < w.Get_size()
    with pytest.raises(UsageError, match="multiple of --tp"):
        make_layout(w, w.Get_size() + 1)


@mpi
def test_tensor_parallel_logits_equal_single_rank(smollm_gguf):
    """Every rank of a TP group computes the same full logits, equal to one rank holding the whole model."""
    from mpi4py import MPI

    from mpillm.batch import StepInput
    from mpillm.checkpoint import open_checkpoint
    from mpillm.comm import MPIComm
    from mpillm.model import Transformer
    w = MPI.COMM_WORLD
    ck = open_checkpoint(smollm_gguf)
    ids = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 33, 34, 35]
    step = StepInput.build([(ids, 0, [0, 1], True), (ids[:7], 0, [2], True)], 16)
    tp = Transformer(ck, MPIComm(w))
    got = tp.forward(step, tp.new_cache(4, 16))
    ref_model = Transformer(ck)
    ref = ref_model.forward(step, ref_model.new_cache(4, 16))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    everyone = w.allgather(got)
    for other in everyone:
        np.testing.assert_array_equal(other, everyone[0])
