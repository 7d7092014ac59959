"""Tensor parallelism over NCCL: `mpiexec -n 2 pytest --with-mpi --only-mpi tests/gpu` on a multi-GPU machine."""

import time

import numpy as np
import pytest

mpi = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def tp_env():
    pytest.importorskip("pycuda")
    pytest.importorskip("nccl.bindings")
    from mpi4py import MPI

    import pycuda.driver as cuda
    cuda.init()
    world = MPI.COMM_WORLD
    if cuda.Device.count() < world.Get_size():
        pytest.skip(f"{world.Get_size()} ranks need as many GPUs, found {cuda.Device.count()}")
    from mpillm.cuda.kernels import Kernels
    from mpillm.cuda.runtime import init_device
    dev = init_device(world.Get_rank())
    return world, dev, Kernels(dev)


@mpi
def test_all_reduce_and_vocab_gather(tp_env):
    from mpillm.cuda.nccl import NcclComm
    from mpillm.cuda.runtime import DeviceTensor
    from mpillm.parallel import split_even
    world, dev, _ = tp_env
    r, n = world.Get_rank(), world.Get_size()
    V, L = 1001, 3                                        # uneven vocab shards
    splits = [split_even(V, n, i) for i in range(n)]
    comm = NcclComm(world, dev, splits)
    comm.reserve(8)
    x = DeviceTensor.from_numpy(np.full((4, 130), r + 1, np.float32), "bf16")
    comm.all_reduce_device(x)
    dev.synchronize()
    assert (x.to_numpy() == sum(range(1, n + 1))).all()
    lo, hi = splits[r]
    full = np.arange(L * V, dtype=np.float32).reshape(L, V)
    local = DeviceTensor.empty((8 * (-(-V // n)),), "f32")
    local.view(0, (L, hi - lo)).copy_from_numpy(full[:, lo:hi])
    out = DeviceTensor.empty((L, V), "f32")
    comm.all_gather_vocab(out, local.view(0, (L, hi - lo)))
    dev.synchronize()
    np.testing.assert_array_equal(out.to_numpy(), full)
    comm.destroy()


@mpi
def test_ipc_vocab_gather_equals_nccl_in_and_out_of_graphs(tp_env):
    """The IPC gather of logits: uneven shards of odd widths (a row's last word shares a line with the next row's
    first), 1 to 8 rows equal to NCCL's gather bit for bit, 9 rows through NCCL; 41 calls back to back with one
    rank late now and then (the two buffers alternate; every call has its own input and output, so one that read
    a stale or a later call's lines would show); a captured graph replayed on new inputs."""
    from cuda.bindings import driver as cu

    from mpillm.cuda.nccl import NcclComm
    from mpillm.cuda.runtime import DeviceTensor
    from mpillm.parallel import split_even
    world, dev, kernels = tp_env
    r, n = world.Get_rank(), world.Get_size()
    V = 2 * 1001 * n + 3
    splits = [split_even(V, n, i) for i in range(n)]
    lo, hi = splits[r]
    comm = NcclComm(world, dev, splits)
    comm.reserve(9)
    note = comm.enable_ipc_all_reduce(kernels, 1 << 14, gather_rows=8)
    if comm.ipc_gather is None:
        comm.destroy()
        pytest.skip(note)
    rng = np.random.default_rng(5)                             # the same logits on every rank

    def logits(L):
        a = rng.normal(size=(L, V)).astype(np.float32)
        a[:, ::7] = -np.inf                                    # every bit pattern crosses as it is
        return a

    for L in (1, 2, 3, 8, 9):
        full = logits(L)
        mine = DeviceTensor.from_numpy(full[:, lo:hi], "f32")
        out = DeviceTensor.from_numpy(np.full((L, V), np.nan, np.float32), "f32")
        assert comm.ipc_gather.fits_gather(L, splits) == (L <= 8)
        comm.all_gather_vocab(out, mine)
        dev.synchronize()
        np.testing.assert_array_equal(out.to_numpy(), full)
        if L <= 8:                                             # NCCL's gather of the same rows: the same bits
            ipc_gather, comm.ipc_gather = comm.ipc_gather, None
            nccl_out = DeviceTensor.empty((L, V), "f32")
            comm.all_gather_vocab(nccl_out, mine)
            comm.ipc_gather = ipc_gather
            dev.synchronize()
            np.testing.assert_array_equal(nccl_out.to_numpy(), out.to_numpy())
    calls, L = 41, 3
    fulls = [logits(L) for _ in range(calls)]
    ins = [DeviceTensor.from_numpy(f[:, lo:hi], "f32") for f in fulls]
    outs = [DeviceTensor.empty((L, V), "f32") for _ in range(calls)]
    dev.synchronize()
    for k in range(calls):
        if r == 0 and k % 8 == 0:
            time.sleep(0.002)
        comm.all_gather_vocab(outs[k], ins[k])
    dev.synchronize()
    for k in range(calls):
        np.testing.assert_array_equal(outs[k].to_numpy(), fulls[k], err_msg=f"call {k}")
    stream = cu.CUstream(dev.stream.handle)
    cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
    comm.all_gather_vocab(outs[0], ins[0])
    _, graph = cu.cuStreamEndCapture(stream)
    _, exe = cu.cuGraphInstantiate(graph, 0)
    for k in range(5):
        full = logits(L)
        ins[0].copy_from_numpy(full[:, lo:hi])
        dev.synchronize()
        cu.cuGraphLaunch(exe, stream)
        dev.synchronize()
        np.testing.assert_array_equal(outs[0].to_numpy(), full, err_msg=f"replay {k}")
    cu.cuGraphExecDestroy(exe)
    cu.cuGraphDestroy(graph)
    comm.destroy()


PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def _group_comm(world, dev, cfg):
    """The world as one TP group for cfg: NCCL with its vocab shards, gather scratch for 8 rows."""
    from mpillm.cuda.nccl import NcclComm
    from mpillm.parallel import make_shard
    n = world.Get_size()
    comm = NcclComm(world, dev, [(s.vocab_lo, s.vocab_hi) for s in (make_shard(cfg, i, n) for i in range(n))])
    comm.reserve(8)
    return comm


def _tp_and_single(tp_env, smollm_gguf, **kw):
    """The default model at TP = world size (its own NCCL group) and at TP = 1 on this rank's GPU."""
    from mpillm.checkpoint import open_checkpoint
    from mpillm.cuda.model import CudaTransformer
    from mpillm.parallel import make_shard
    world, dev, kernels = tp_env
    r, n = world.Get_rank(), world.Get_size()
    ck = open_checkpoint(smollm_gguf)
    cfg = ck.config
    comm = _group_comm(world, dev, cfg)
    kw = dict(dtype="bf16", max_tokens=256, max_seqs=8, max_model_len=512, num_blocks=64, **kw)
    tp = CudaTransformer(ck, cfg, make_shard(cfg, r, n), dev, kernels, comm=comm, **kw)
    single = CudaTransformer(ck, cfg, make_shard(cfg, 0, 1), dev, kernels, **kw)
    return comm, tp, single


def _greedy_both(world, tp, single, steps=24):
    """Greedy ids of the TP model (fed its own tokens) and of the single-GPU one fed the same tokens; asserts
    that every rank of the group sampled the same ids."""
    from mpillm.batch import StepInput
    from mpillm.engine import SampleSpec
    from mpillm.jobio import SamplingParams
    spec = [SampleSpec(SamplingParams(temperature=0.0), 0, 0, None)]
    ids_tp, ids_one = [], []
    step = StepInput.build([(PROMPT, 0, [0, 1, 2], True)], 16)
    for i in range(steps):                     # a fixed count on every rank: NCCL calls must match
        a, _ = tp.forward(step, spec)          # graph replay with the collectives inside on decode steps
        b, _ = single.forward(step, spec)
        ids_tp.append(int(a[0]))
        ids_one.append(int(b[0]))
        step = StepInput.build([([ids_tp[-1]], len(PROMPT) + i, [0, 1, 2], True)], 16)
    everyone = world.allgather(ids_tp)
    assert all(e == everyone[0] for e in everyone), "ranks of a TP group sampled different tokens"
    return ids_tp, ids_one


def _close(comm, *models):
    for m in models:
        m.close()                              # graphs before the communicator they captured
    comm.destroy()


@mpi
def test_tp_logits_and_greedy_equal_single_gpu(tp_env, smollm_gguf):
    """The real default model (9 heads, 3 kv heads: uneven head split) at TP = world size vs TP = 1."""
    from mpillm.batch import StepInput
    from mpillm.engine import SampleSpec
    from mpillm.jobio import SamplingParams
    comm, tp, single = _tp_and_single(tp_env, smollm_gguf)
    spec = [SampleSpec(SamplingParams(temperature=0.0), 0, 0, None)]
    step = StepInput.build([(PROMPT, 0, [0, 1, 2], True)], 16)
    _, lt = tp.forward(step, spec, want_logits=True)
    _, l1 = single.forward(step, spec, want_logits=True)
    assert np.abs(lt - l1).max() < 3e-2 * np.abs(l1).max()
    ids_tp, ids_one = _greedy_both(tp_env[0], tp, single)
    assert ids_tp[:7] == ids_one[:7]
    _close(comm, tp, single)


@mpi
def test_tp_int8_greedy_equals_single_gpu_int8(tp_env, smollm_gguf):
    """W8A16 (group 64) at TP = world size: every rank's row-parallel shard starts on a group boundary, so the
    group holds exactly the TP = 1 int8 weights and greedy ids agree."""
    comm, tp, single = _tp_and_single(tp_env, smollm_gguf, quantize="int8", group_size=64)
    ids_tp, ids_one = _greedy_both(tp_env[0], tp, single)
    assert ids_tp[:7] == ids_one[:7]
    _close(comm, tp, single)


@mpi
@pytest.mark.parametrize("kind", ["llama", "qwen2", "int8", "q4_0"])
def test_tp_tiny_models_equal_single_gpu(tp_env, tmp_path, kind):
    """Tiny random-weight checkpoints written here (no model to stage): HF Llama (8 heads, 2 kv heads), Qwen2 (q/k/v
    biases, one kv head replicated on every rank), Llama as int8 W8A16 (group 64), and a GGUF whose projections
    are Q4_0 (its own bits; one head per rank at TP 4, a row-parallel shard of 64 columns, half a super-block). At
    TP = world size against TP = 1 on this rank's GPU, both fed the same tokens: every step's logits within bf16
    rounding (eager), the ids sampled through the decode graphs (the collectives inside) equal wherever the top
    two logits are apart, and the same on every rank."""
    from gpu.test_model_gpu import tiny_checkpoint, tiny_q4_0_checkpoint

    from mpillm.batch import StepInput
    from mpillm.cuda.model import CudaTransformer
    from mpillm.engine import SampleSpec
    from mpillm.jobio import SamplingParams
    from mpillm.parallel import make_shard
    world, dev, kernels = tp_env
    r, n = world.Get_rank(), world.Get_size()
    if kind == "q4_0":
        ck = tiny_q4_0_checkpoint(tmp_path)
    else:
        ck = tiny_checkpoint(tmp_path, "qwen2" if kind == "qwen2" else "llama")
    cfg = ck.config
    quant = {"int8": dict(quantize="int8", group_size=64), "q4_0": dict(quantize="auto")}.get(kind, {})
    comm = _group_comm(world, dev, cfg)
    kw = dict(dtype="bf16", max_tokens=256, max_seqs=8, max_model_len=512, num_blocks=64, **quant)
    tp = CudaTransformer(ck, cfg, make_shard(cfg, r, n), dev, kernels, comm=comm, **kw)
    single = CudaTransformer(ck, cfg, make_shard(cfg, 0, 1), dev, kernels, **kw)
    if kind == "q4_0":
        assert tp.layers[0].o.kind == single.layers[0].o.kind == "q4_0"
    spec = [SampleSpec(SamplingParams(temperature=0.0), 0, 0, None)]
    prompt = np.random.default_rng(7).integers(0, cfg.vocab_size, 13).tolist()
    step = StepInput.build([(prompt, 0, [0, 1, 2], True)], 16)
    ids_tp, gaps, compared = [], [], 0
    for i in range(10):                        # a fixed count on every rank: NCCL calls must match
        _, lt = tp.forward(step, spec, want_logits=True)
        _, l1 = single.forward(step, spec, want_logits=True)
        top, diff = np.abs(l1).max(), np.abs(lt - l1).max()
        assert diff < 3e-2 * top, f"step {i}: logits"
        a, _ = tp.forward(step, spec)          # the same step again (same KV slots, same values), sampled
        b, _ = single.forward(step, spec)
        ids_tp.append(int(a[0]))
        top2 = np.sort(l1[-1])[-2:]
        gaps.append(round(float((top2[1] - top2[0]) / top), 4))
        if top2[1] - top2[0] > 2 * diff + 2e-3 * top:  # no logit moved by more than diff: the top one stays on top
            assert int(a[0]) == int(b[0]), f"step {i}: TP sampled {int(a[0])}, one GPU {int(b[0])}"
            compared += 1
        tok = world.bcast(int(b[0]), root=0)   # both models go on from the same token
        step = StepInput.build([([tok], len(prompt) + i, [0, 1, 2], True)], 16)
    assert compared >= 3, f"{compared} steps with a clear top token (top-2 gaps / max |logit|: {gaps})"
    everyone = world.allgather(ids_tp)
    assert all(e == everyone[0] for e in everyone), "ranks of a TP group sampled different tokens"
    _close(comm, tp, single)


@mpi
def test_tp_overlapped_micro_batches_equal_one_batch(tp_env, smollm_gguf):
    """A mixed step over OVERLAP_MIN_TOKENS (two prompts, one straddling the cut, and a decode) runs as two
    micro-batches whose all-reduces overlap; its logits and the KV cache it writes equal those of the
    one-batch step (overlap=False), and every rank samples the same ids."""
    from mpillm.batch import StepInput
    from mpillm.checkpoint import open_checkpoint
    from mpillm.cuda.model import OVERLAP_MIN_TOKENS, CudaTransformer
    from mpillm.engine import SampleSpec
    from mpillm.jobio import SamplingParams
    from mpillm.parallel import make_shard
    world, dev, kernels = tp_env
    r, n = world.Get_rank(), world.Get_size()
    ck = open_checkpoint(smollm_gguf)
    cfg = ck.config
    comm = _group_comm(world, dev, cfg)
    kw = dict(comm=comm, dtype="bf16", max_tokens=512, max_seqs=8, max_model_len=512, num_blocks=64)
    models = {flag: CudaTransformer(ck, cfg, make_shard(cfg, r, n), dev, kernels, overlap=flag, **kw)
              for flag in (False, True)}
    assert models[True].overlap and not models[False].overlap
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 40000, 150).tolist(), rng.integers(0, 40000, 170).tolist()
    spec = [SampleSpec(SamplingParams(temperature=0.0), 0, 0, None)] * 3
    warm = StepInput.build([(PROMPT + PROMPT[:4], 0, [21, 22], True)], 16)     # sequence 3: 20 cached tokens
    step = StepInput.build([(a, 0, list(range(0, 10)), True), (b, 0, list(range(10, 21)), True),
                            ([7], 20, [21, 22], True)], 16)
    assert step.num_tokens >= OVERLAP_MIN_TOKENS
    assert step.query_start[1] < step.num_tokens // 2 < step.query_start[2]     # the cut is inside prompt b
    logits, ids = {}, {}
    for flag, m in models.items():
        m.forward(warm, spec[:1])
        _, logits[flag] = m.forward(step, spec, want_logits=True)
        ids[flag], _ = m.forward(step, spec)                                     # sampled on the GPU, same KV
    ref, tol = logits[False], 2e-2 * np.abs(logits[False]).max()
    np.testing.assert_allclose(logits[True], ref, rtol=0, atol=tol)
    for flag in models:
        assert list(ids[flag]) == list(logits[flag].argmax(-1))
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol                                    # not a near tie
    assert (logits[True].argmax(-1) == ref.argmax(-1))[clear].all()
    for i in range(cfg.num_layers):
        for cache in ("k_cache", "v_cache"):
            want = getattr(models[False], cache)[i].to_numpy()[:23]
            got = getattr(models[True], cache)[i].to_numpy()[:23]
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max(), err_msg=f"{cache} {i}")
    everyone = world.allgather(list(ids[True]))
    assert all(e == everyone[0] for e in everyone), "ranks of a TP group sampled different tokens"
    _close(comm, *models.values())


@mpi
def test_fused_all_reduce_add_rms_norm_equals_the_two_kernels(tp_env):
    """all_reduce_add_rms_norm: the same bits as the IPC all-reduce followed by add_rms_norm, for row counts
    that leave blocks idle or give them two rows, hidden sizes that need one or many vectors per thread, back to
    back calls of both kernels (each on its own buffers), row counts and lengths mixed call by call without a
    synchronisation (the grid follows the rows), and the same bits on every rank."""
    from mpillm.cuda.nccl import NcclComm
    from mpillm.cuda.runtime import DeviceTensor
    world, dev, kernels = tp_env
    r, n = world.Get_rank(), world.Get_size()
    comm = NcclComm(world, dev, [(0, 1)] * n)
    note = comm.enable_ipc_all_reduce(kernels, 64 * 4096 * 2)
    if comm.ipc_norm is None:
        comm.destroy()
        pytest.skip(note)
    rng = np.random.default_rng(7)                        # the same residual and weight on every rank
    for it, (m, hidden) in enumerate([(1, 4096), (3, 576), (33, 576), (64, 4096), (2, 8192 // 4)]):
        resid0 = rng.normal(size=(m, hidden)).astype(np.float32)
        weight = DeviceTensor.from_numpy(rng.normal(1, 0.1, hidden).astype(np.float32), "bf16")
        part = np.random.default_rng(100 * r + it).normal(size=(m, hidden)).astype(np.float32)
        got, want = {}, {}
        for fused in (True, False):
            x = DeviceTensor.from_numpy(part, "bf16")
            resid = DeviceTensor.from_numpy(resid0, "bf16")
            h = DeviceTensor.empty((m, hidden), "bf16")
            if fused:
                assert comm.all_reduce_add_rms_norm(x, resid, h, weight, 1e-5)
            else:
                comm.all_reduce_device(x)
                kernels.add_rms_norm(h, x, resid, weight, 1e-5)
            comm.all_reduce_device(DeviceTensor.from_numpy(np.ones(8, np.float32), "bf16"))   # interleave calls
            dev.synchronize()
            (got if fused else want)[0] = (h.to_numpy(), resid.to_numpy())
        np.testing.assert_array_equal(got[0][0], want[0][0], err_msg=f"out, {m} x {hidden}")
        np.testing.assert_array_equal(got[0][1], want[0][1], err_msg=f"residual, {m} x {hidden}")
        everyone = world.allgather(got[0][0])
        assert all(np.array_equal(e, everyone[0]) for e in everyone), f"ranks differ at {m} x {hidden}"
    # The grid is a block per row (up to 32); the blocks it leaves out must still count the call, or a later call's
    # block would take a line left by another block's call of the same number (a row's lines move with its length).
    # Row counts and lengths mixed back to back with no synchronisation, each call against the two kernels' bits.
    seq = [(1, 4096), (5, 576), (1, 576), (40, 576), (2, 4096), (1, 4096), (1, 576), (33, 576), (3, 4096)] * 3
    weights = {h: DeviceTensor.from_numpy(rng.normal(1, 0.1, h).astype(np.float32), "bf16") for h in (576, 4096)}
    resid0 = [rng.normal(size=mh).astype(np.float32) for mh in seq]
    parts = [np.random.default_rng(1000 * r + i).normal(size=mh).astype(np.float32) for i, mh in enumerate(seq)]
    runs = {}
    for fused in (True, False):
        xs = [DeviceTensor.from_numpy(p, "bf16") for p in parts]
        resids = [DeviceTensor.from_numpy(r0, "bf16") for r0 in resid0]
        hs = [DeviceTensor.empty(p.shape, "bf16") for p in parts]
        for x, resid, h in zip(xs, resids, hs):
            weight = weights[x.shape[1]]
            if fused:
                assert comm.all_reduce_add_rms_norm(x, resid, h, weight, 1e-5)
            else:
                comm.all_reduce_device(x)
                kernels.add_rms_norm(h, x, resid, weight, 1e-5)
        dev.synchronize()
        runs[fused] = [(h.to_numpy(), resid.to_numpy()) for h, resid in zip(hs, resids)]
    for i, ((h1, r1), (h2, r2)) in enumerate(zip(runs[True], runs[False])):
        np.testing.assert_array_equal(h1, h2, err_msg=f"out, call {i} ({seq[i]})")
        np.testing.assert_array_equal(r1, r2, err_msg=f"residual, call {i} ({seq[i]})")
    too_big = DeviceTensor.empty((65, 4096), "bf16")
    assert not comm.all_reduce_add_rms_norm(too_big, too_big, too_big, weight, 1e-5)    # over the limit: caller's job
    comm.destroy()


@mpi
def test_projection_sending_its_tiles_equals_the_all_reduce_sending(tp_env):
    """The row-parallel projection sending its output tiles itself (linear's `send`) and the fused all-reduce + norm
    only receiving (`sent`): the same bits as the all-reduce kernel sending them, for the bf16 GEMV at token counts
    of each tiling (1, 9, 32 rows; and the wide m1w kernel, few tiles with a long K) and the one-token int8 and
    Q4_0 kernels (_x1d at one tile a block; _x1 at two, hidden 8,200: a block sends each of its tiles in turn),
    hidden sizes whose last tile is half full, the two ways alternating call by call (the
    call counters and parities stay in step), and the pair captured in a graph with programmatic edges and
    replayed back to back."""
    from cuda.bindings import driver as cu

    from mpillm.cuda.graphs import link_programmatic
    from mpillm.cuda.nccl import NcclComm
    from mpillm.cuda.runtime import DeviceTensor, check_cu
    world, dev, kernels = tp_env
    r, n = world.Get_rank(), world.Get_size()
    comm = NcclComm(world, dev, [(0, 1)] * n)
    comm.enable_ipc_all_reduce(kernels, 32 * 4104 * 2)
    if comm.ipc_norm is None:
        comm.destroy()
        pytest.skip("no IPC all-reduce on this machine")
    shared = np.random.default_rng(11)                       # the same residual and norm weight on every rank
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.quant import pack_int8, pack_q4, quantize_int8
    for kind, m, hidden, k in [("bf16", 1, 4096, 1024), ("bf16", 9, 576, 200), ("bf16", 32, 4104, 64),
                               ("bf16", 2, 2056, 512), ("bf16", 1, 2056, 4096), ("bf16", 5, 1032, 2048),
                               ("int8", 1, 4096, 1024), ("int8", 1, 2056, 512), ("q4_0", 1, 4096, 2048),
                               ("q4_0", 1, 2056, 1024), ("int8", 1, 8200, 256), ("q4_0", 1, 8200, 512)]:
        resid0 = shared.normal(size=(m, hidden)).astype(np.float32)
        norm_w = DeviceTensor.from_numpy(shared.normal(1, 0.1, hidden).astype(np.float32), "bf16")
        own = np.random.default_rng(1000 * r + m + k)
        w_float = own.normal(size=(hidden, k)) / np.sqrt(k)
        if kind == "bf16":
            w = DeviceTensor.from_numpy(w_float.astype(np.float32), "bf16")
        elif kind == "int8":
            w = QuantWeight.from_packed(pack_int8(*quantize_int8(w_float, 128), 128))
        else:
            d = (own.uniform(0.5, 1.5, (hidden, k // 32)) / (8 * np.sqrt(k))).astype(np.float16)
            w = QuantWeight.from_packed(pack_q4(own.integers(0, 16, (hidden, k)).astype(np.uint8), d, None))
        x = DeviceTensor.from_numpy(own.normal(size=(m, k)).astype(np.float32), "bf16")
        y = DeviceTensor.empty((m, hidden), "bf16")
        resid, h = DeviceTensor.from_numpy(resid0, "bf16"), DeviceTensor.empty((m, hidden), "bf16")
        assert kernels.gemv_sends(w, y, m)

        def step(sent):
            send = comm.row_send(y) if sent else None
            assert (send is not None) == sent
            kernels.linear(y, x, w, send=send)
            assert comm.all_reduce_add_rms_norm(y, resid, h, norm_w, 1e-5, sent=sent)

        got = []
        for sent in (False, True, True, False, True):
            resid.copy_from_numpy(resid0)
            step(sent)
            dev.synchronize()
            got.append((h.to_numpy(), resid.to_numpy(), y.to_numpy()))
        for i, g in enumerate(got[1:], 1):
            for a, b, what in zip(g, got[0], ("out", "residual", "sum")):
                np.testing.assert_array_equal(a, b, err_msg=f"{what}, call {i}, {kind} {m} x {hidden}")
        everyone = world.allgather(got[1][0])
        assert all(np.array_equal(e, everyone[0]) for e in everyone), f"ranks differ at {kind} {m} x {hidden}"
        # Replays: each adds the same sum to the residual again; the eager twin gives the bits to expect.
        resid.copy_from_numpy(resid0)
        want = []
        for _ in range(3):
            step(False)
            dev.synchronize()
            want.append(resid.to_numpy())
        stream = cu.CUstream(dev.stream.handle)
        resid.copy_from_numpy(resid0)
        dev.synchronize()
        check_cu(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "capture")
        step(True)
        graph = check_cu(cu.cuStreamEndCapture(stream), "end capture")
        link_programmatic(graph, kernels.owns)
        exe = check_cu(cu.cuGraphInstantiate(graph, 0), "instantiate")
        for i in range(3):
            check_cu(cu.cuGraphLaunch(exe, stream), "launch")
            dev.synchronize()
            np.testing.assert_array_equal(resid.to_numpy(), want[i], err_msg=f"replay {i}, {kind} {m} x {hidden}")
        cu.cuGraphExecDestroy(exe)
        cu.cuGraphDestroy(graph)
    with pytest.raises(ValueError, match="sent"):
        comm.all_reduce_add_rms_norm(DeviceTensor.empty((65, 4104), "bf16"), resid, h, norm_w, 1e-5, sent=True)
    comm.destroy()


@mpi
@pytest.mark.parametrize("quant", [{}, dict(quantize="int8", group_size=64)], ids=["bf16", "int8"])
def test_tp_fused_all_reduce_norm_model_equals_unfused(tp_env, smollm_gguf, quant):
    """The model with the fused all-reduce + norm (default; its o and down projections send their own tiles: the
    bf16 GEMV, and int8's one-token kernel in the decode graphs) and without: the same logits bit for bit on a
    prompt, and the same greedy ids through the decode graphs."""
    comm, fused, single = _tp_and_single(tp_env, smollm_gguf, **quant)
    single.close()
    from mpillm.checkpoint import open_checkpoint
    from mpillm.cuda.model import CudaTransformer
    from mpillm.parallel import make_shard
    world, dev, kernels = tp_env
    ck = open_checkpoint(smollm_gguf)
    plain = CudaTransformer(ck, ck.config, make_shard(ck.config, world.Get_rank(), world.Get_size()), dev, kernels,
                            comm=comm, dtype="bf16", max_tokens=256, max_seqs=8, max_model_len=512, num_blocks=64,
                            fuse_allreduce_norm=False, **quant)
    assert fused.presend and kernels.gemv_sends(fused.layers[0].o, fused.delta.view(0, (1, ck.config.hidden_size)), 1)
    from mpillm.batch import StepInput
    from mpillm.engine import SampleSpec
    from mpillm.jobio import SamplingParams
    spec = [SampleSpec(SamplingParams(temperature=0.0), 0, 0, None)]
    step = StepInput.build([(PROMPT, 0, [0, 1, 2], True)], 16)
    _, a = fused.forward(step, spec, want_logits=True)
    _, b = plain.forward(step, spec, want_logits=True)
    np.testing.assert_array_equal(a, b)
    ids_fused, ids_plain = _greedy_both(world, fused, plain, steps=12)
    assert ids_fused == ids_plain
    _close(comm, fused, plain)


@mpi
def test_ipc_all_reduce_sums_like_nccl_in_and_out_of_graphs(tp_env):
    """The one-shot IPC all-reduce: sums for sizes up to its limit, the same bits on every rank, many calls
    back to back (the two buffers alternate), replays of a captured graph, and NCCL beyond the limit."""
    from cuda.bindings import driver as cu

    from mpillm.cuda.nccl import NcclComm
    from mpillm.cuda.runtime import DeviceTensor, bf16_to_f32, f32_to_bf16
    world, dev, kernels = tp_env
    r, n = world.Get_rank(), world.Get_size()
    comm = NcclComm(world, dev, [(0, 1)] * n)
    note = comm.enable_ipc_all_reduce(kernels, 1 << 16)
    if comm.ipc is None:
        comm.destroy()
        pytest.skip(note)
    bf = lambda a: bf16_to_f32(f32_to_bf16(a)).reshape(a.shape)  # noqa: E731
    for it, numel in enumerate([8, 4096, 8 * 1001, 1 << 15, 3 * (1 << 14)]):   # the last one goes to NCCL
        x = bf(np.random.default_rng(100 * r + it).normal(size=numel).astype(np.float32))
        want = np.sum(world.allgather(x), axis=0)
        t = DeviceTensor.from_numpy(x, "bf16")
        comm.all_reduce_device(t)
        dev.synchronize()
        got = t.to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-2 * n)
        everyone = world.allgather(got)
        assert all(np.array_equal(e, everyone[0]) for e in everyone), f"ranks differ at {numel} elements"
    t = DeviceTensor.from_numpy(np.full(4096, r + 1, np.float32), "bf16")
    zeros = DeviceTensor.from_numpy(np.zeros(4096, np.float32), "bf16")
    for _ in range(101):                                   # odd count: the parity ends flipped
        comm.all_reduce_device(t)
        comm.all_reduce_device(zeros)
        dev.synchronize()
        t.copy_from_numpy(np.full(4096, r + 1, np.float32))
    comm.all_reduce_device(t)
    dev.synchronize()
    assert (t.to_numpy() == n * (n + 1) / 2).all()
    # back to back with no sync, one rank launching late now and then: each call sums the last result again,
    # so a call that read a stale or a later call's data would show (the values stay exact in bf16)
    t.copy_from_numpy(np.full(4096, r + 1, np.float32))
    calls = 40
    for k in range(calls):
        if r == 0 and k % 8 == 0:
            time.sleep(0.002)
        comm.all_reduce_device(t)
    dev.synchronize()
    assert (t.to_numpy() == n * (n + 1) / 2 * float(n) ** (calls - 1)).all()
    # captured once, replayed: each replay sums the previous result again
    stream = cu.CUstream(dev.stream.handle)
    t.copy_from_numpy(np.full(4096, r + 1, np.float32))
    dev.synchronize()
    cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
    comm.all_reduce_device(t)
    _, graph = cu.cuStreamEndCapture(stream)
    _, exe = cu.cuGraphInstantiate(graph, 0)
    value = float(r + 1)
    total = n * (n + 1) / 2
    for k in range(6):
        cu.cuGraphLaunch(exe, stream)
        dev.synchronize()
        value = total * n ** k
        assert (t.to_numpy() == value).all(), k
    cu.cuGraphExecDestroy(exe)
    cu.cuGraphDestroy(graph)
    comm.destroy()
