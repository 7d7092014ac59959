"""Every CUDA kernel against its NumPy reference in mpillm/ops.py, on awkward sizes.

Inputs are rounded to the model dtype on the host first, so a comparison measures the kernel's own
error (fp32 math, one rounding of the output) and nothing else. Run as a script for the micro-benchmarks:
`python tests/gpu/test_kernels.py`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpillm import ops
from mpillm.cuda.runtime import DeviceTensor, allocation_count, bf16_to_f32, f32_to_bf16

DTYPES = ["bf16", "f16"]
# Output rounding of bf16 is 2^-9 relative, of fp16 2^-12; atol covers values near zero.
TOL = {"bf16": dict(rtol=1.5e-2, atol=1.5e-2), "f16": dict(rtol=3e-3, atol=3e-3), "f32": dict(rtol=1e-3, atol=1e-3)}


def rounded(a, dtype: str) -> np.ndarray:
    """a as the model dtype would hold it, back in float32."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "bf16":
        return bf16_to_f32(f32_to_bf16(a)).reshape(a.shape)
    if dtype == "f16":
        return a.astype(np.float16).astype(np.float32)
    return a


def dev(a, dtype: str) -> DeviceTensor:
    return DeviceTensor.from_numpy(np.asarray(a), dtype)


def assert_close(got, want, dtype, what=""):
    np.testing.assert_allclose(got, want, err_msg=what, **TOL[dtype])


# ---------------------------------------------------------------------------------------------------
# host helpers


def test_bf16_round_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, 1e-40, np.inf], dtype=np.float32)
    bits = f32_to_bf16(x)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa (1.0) wins; 1 + 3*2^-8 rounds up to 1 + 2^-6.
    np.testing.assert_array_equal(bf16_to_f32(bits)[:4], np.array([1.0, 1.0, 1.015625, -2.5], np.float32))
    assert np.isinf(bf16_to_f32(bits)[6])
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_device_tensor_roundtrip_and_views(cuda_device):
    a = np.arange(24, dtype=np.float32).reshape(4, 6) - 7.5
    for dtype in ("bf16", "f16", "f32"):
        t = dev(a, dtype)
        np.testing.assert_array_equal(t.to_numpy(), rounded(a, dtype))
        v = t.view(6, (2, 6))
        assert v.ptr == t.ptr + 6 * t.itemsize
        np.testing.assert_array_equal(v.to_numpy(), rounded(a[1:3], dtype))
    z = DeviceTensor.zeros((3, 5), "i32")
    assert (z.to_numpy() == 0).all()


# ---------------------------------------------------------------------------------------------------
# embedding, norms, rope, activation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1000, 577])
def test_embedding_vocab_parallel(kernels, dtype, hidden):
    rng = np.random.default_rng(0)
    v_local, vocab_start = 50, 100
    table = rounded(rng.normal(size=(v_local, hidden)), dtype)
    ids = np.array([100, 149, 99, 150, 0, 120, -5, 125, 1 << 30, 101, 133], dtype=np.int32)
    out = DeviceTensor.empty((len(ids), hidden), dtype)
    kernels.embedding(out, dev(ids, "i32"), dev(table, dtype), vocab_start)
    local = ids - vocab_start
    owned = (local >= 0) & (local < v_local)
    want = np.where(owned[:, None], table[np.clip(local, 0, v_local - 1)], 0.0)
    np.testing.assert_array_equal(out.to_numpy(), want)
    # Fed ids: -1 - j takes fed[j] (the previous step's samples on the device), then the same shard rule.
    fed = np.array([120, 7, 149, 100], dtype=np.int32)
    mixed = np.array([-1, 101, -4, -2, -3, -1], dtype=np.int32)
    out = DeviceTensor.empty((len(mixed), hidden), dtype)
    kernels.embedding(out, dev(mixed, "i32"), dev(table, dtype), vocab_start, fed=dev(fed, "i32"))
    resolved = np.where(mixed >= 0, mixed, fed[np.maximum(-1 - mixed, 0)]) - vocab_start
    owned = (resolved >= 0) & (resolved < v_local)
    want = np.where(owned[:, None], table[np.clip(resolved, 0, v_local - 1)], 0.0)
    np.testing.assert_array_equal(out.to_numpy(), want)
    # zero: another buffer of out's shape set to zeros by the same kernel (nothing else of it touched).
    zero = DeviceTensor.from_numpy(np.full((len(mixed) + 1, hidden), 3.0), dtype)
    kernels.embedding(out, dev(mixed, "i32"), dev(table, dtype), vocab_start, fed=dev(fed, "i32"),
                      zero=zero.view(0, (len(mixed), hidden)))
    np.testing.assert_array_equal(out.to_numpy(), want)
    np.testing.assert_array_equal(zero.to_numpy(), np.vstack([np.zeros((len(mixed), hidden)),
                                                              np.full((1, hidden), 3.0)]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 577, 4096])
def test_embedding_rms_norm_equals_the_two_kernels(kernels, dtype, hidden):
    """The one-GPU first-layer input: lookup (fed ids included) and RMSNorm in one kernel, the same bits as
    embedding then rms_norm."""
    rng = np.random.default_rng(hidden)
    vocab = 300
    table = dev(rounded(rng.normal(size=(vocab, hidden)) * 2, dtype), dtype)
    weight = dev(rounded(rng.normal(size=hidden), dtype), dtype)
    fed = dev(np.array([17, 299, 0], np.int32), "i32")
    ids = dev(np.array([5, -2, 299, -1, 0, -3, 123], np.int32), "i32")
    resid_a, h_a = DeviceTensor.empty((7, hidden), dtype), DeviceTensor.empty((7, hidden), dtype)
    kernels.embedding(resid_a, ids, table, 0, fed=fed)
    kernels.rms_norm(h_a, resid_a, weight, 1e-5)
    resid_b, h_b = DeviceTensor.empty((7, hidden), dtype), DeviceTensor.empty((7, hidden), dtype)
    kernels.embedding_rms_norm(h_b, resid_b, ids, table, weight, 1e-5, fed=fed)
    np.testing.assert_array_equal(resid_b.to_numpy(), resid_a.to_numpy())
    np.testing.assert_array_equal(h_b.to_numpy(), h_a.to_numpy())
    assert np.abs(h_a.to_numpy()).max() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 1000, 4104, 16384, 1001])
def test_rms_norm(kernels, dtype, hidden):
    rng = np.random.default_rng(hidden)
    x = rounded(rng.normal(size=(7, hidden)) * 3, dtype)
    w = rounded(rng.normal(1.0, 0.2, size=hidden), dtype)
    out = DeviceTensor.empty(x.shape, dtype)
    kernels.rms_norm(out, dev(x, dtype), dev(w, dtype), 1e-6)
    assert_close(out.to_numpy(), ops.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4104, 1001])
def test_add_rms_norm(kernels, dtype, hidden):
    rng = np.random.default_rng(hidden + 1)
    x = rounded(rng.normal(size=(5, hidden)), dtype)
    res = rounded(rng.normal(size=(5, hidden)) * 4, dtype)
    w = rounded(rng.normal(1.0, 0.2, size=hidden), dtype)
    x_d, res_d = dev(x, dtype), dev(res, dtype)
    kernels.add_rms_norm(x_d, x_d, res_d, dev(w, dtype), 1e-5)  # out aliases x, as the model may use it
    new_res = rounded(res + x, dtype)  # the residual stream is stored in the model dtype
    np.testing.assert_array_equal(res_d.to_numpy(), new_res)
    want, _ = ops.add_rms_norm(np.zeros_like(x), new_res, w, 1e-5)
    assert_close(x_d.to_numpy(), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(64, 8, 8), (128, 12, 4), (80, 8, 1), (96, 6, 2), (34, 3, 1)])
def test_rope_store_kv(kernels, dtype, head_dim, n_heads, n_kv):
    rng = np.random.default_rng(head_dim * 7 + n_heads)
    n_tok, num_blocks, block_size = 37, 11, 16
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192} if head_dim == 128 else None
    inv_freq = ops.rope_inv_freq(head_dim, 500000.0 if scaling else 10000.0, scaling)
    positions = rng.integers(0, 20000, size=n_tok).astype(np.int32)
    slots = rng.permutation(num_blocks * block_size)[:n_tok].astype(np.int32)
    slots[[3, 20]] = -1  # padding tokens: no cache write
    width = (n_heads + 2 * n_kv) * head_dim
    qkv = rounded(rng.normal(size=(n_tok, width)), dtype)
    cache_shape = (num_blocks, block_size, n_kv, head_dim)
    k_init = rounded(rng.normal(size=cache_shape), dtype)
    v_init = rounded(rng.normal(size=cache_shape), dtype)

    qkv_d, k_d, v_d = dev(qkv, dtype), dev(k_init, dtype), dev(v_init, dtype)
    kernels.rope_store_kv(qkv_d, dev(positions, "i32"), dev(inv_freq, "f32"), k_d, v_d, dev(slots, "i32"),
                          n_heads, n_kv, head_dim)

    cos, sin = ops.rope_cos_sin(positions, inv_freq)
    q = qkv[:, : n_heads * head_dim].reshape(n_tok, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim: (n_heads + n_kv) * head_dim].reshape(n_tok, n_kv, head_dim)
    v = qkv[:, (n_heads + n_kv) * head_dim:].reshape(n_tok, n_kv, head_dim)
    q_rot, k_rot = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    got = qkv_d.to_numpy()
    assert_close(got[:, : n_heads * head_dim].reshape(q.shape), q_rot, dtype, "q rotated in place")
    assert_close(got[:, n_heads * head_dim: (n_heads + n_kv) * head_dim].reshape(k.shape), k_rot, dtype, "k")
    np.testing.assert_array_equal(got[:, (n_heads + n_kv) * head_dim:], qkv[:, (n_heads + n_kv) * head_dim:])

    k_want = k_init.reshape(-1, n_kv, head_dim).copy()
    v_want = v_init.reshape(-1, n_kv, head_dim).copy()
    keep = slots >= 0
    k_want[slots[keep]] = k_rot[keep]
    v_want[slots[keep]] = v[keep]
    assert_close(k_d.to_numpy().reshape(k_want.shape), k_want, dtype, "k cache")
    np.testing.assert_array_equal(v_d.to_numpy().reshape(v_want.shape), v_want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1000, 1536, 577])
def test_silu_mul(kernels, dtype, inter):
    rng = np.random.default_rng(inter)
    gate_up = rounded(rng.normal(size=(5, 2 * inter)) * 3, dtype)
    out = DeviceTensor.empty((5, inter), dtype)
    kernels.silu_mul(out, dev(gate_up, dtype))
    assert_close(out.to_numpy(), ops.silu_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1000, 1536, 577])
def test_silu_mul_interleaved(kernels, dtype, inter):
    """The GPU model's [g0 u0 g1 u1 ...] layout: eight outputs per thread where inter % 8 == 0 and the buffers are
    16-byte aligned, one per thread otherwise (here forced by a 2-byte-offset output view): the same bits."""
    rng = np.random.default_rng(inter + 7)
    gate_up = rounded(rng.normal(size=(37, 2 * inter)) * 3, dtype)
    pairs = np.empty_like(gate_up)
    pairs[:, 0::2], pairs[:, 1::2] = gate_up[:, :inter], gate_up[:, inter:]
    out = DeviceTensor.empty((37, inter), dtype)
    kernels.silu_mul(out, dev(pairs, dtype), interleaved=True)
    got = out.to_numpy()
    assert_close(got, ops.silu_mul(gate_up), dtype)
    shifted = DeviceTensor.empty((37 * inter + 1,), dtype).view(1, (37, inter))
    kernels.silu_mul(shifted, dev(pairs, dtype), interleaved=True)
    np.testing.assert_array_equal(shifted.to_numpy(), got)


# ---------------------------------------------------------------------------------------------------
# linear


def _linear_case(kernels, dtype, m, n, k, with_bias, out_dtype, path, seed=0):
    rng = np.random.default_rng(seed + m * 31 + n * 7 + k)
    x = rounded(rng.normal(size=(m, k)), dtype)
    w = rounded(rng.normal(size=(n, k)) / math.sqrt(k), dtype)
    b = rounded(rng.normal(size=n), dtype) if with_bias else None
    y = DeviceTensor.empty((m, n), out_dtype)
    kernels.linear(y, dev(x, dtype), dev(w, dtype), dev(b, dtype) if with_bias else None, path=path)
    want = x.astype(np.float64) @ w.astype(np.float64).T + (b if with_bias else 0.0)
    assert_close(y.to_numpy(), want, out_dtype if out_dtype == "f32" else dtype, f"{path} M={m} N={n} K={k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8, 13, 16, 17, 32])
@pytest.mark.parametrize("n,k", [(192, 576), (4100, 1536), (576, 4104)])
def test_linear_gemv(kernels, dtype, m, n, k):
    _linear_case(kernels, dtype, m, n, k, with_bias=m % 2 == 1, out_dtype=dtype, path="gemv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 17, 64, 100, 257])
@pytest.mark.parametrize("n,k", [(192, 576), (4100, 1536), (1536, 4104), (33, 8)])
def test_linear_gemm(kernels, dtype, m, n, k):
    _linear_case(kernels, dtype, m, n, k, with_bias=m % 2 == 1, out_dtype=dtype, path="gemm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [33, 100, 257, 2048])
@pytest.mark.parametrize("n,k", [(192, 576), (4100, 1536), (1536, 4104)])
def test_linear_cublaslt(kernels, dtype, m, n, k):
    if kernels.blas is None:
        pytest.skip("nvmath-python (cuBLASLt) not installed")
    _linear_case(kernels, dtype, m, n, k, with_bias=m % 2 == 1, out_dtype=dtype, path="cublaslt")
    _linear_case(kernels, dtype, m, n, k, with_bias=False, out_dtype="f32", path="cublaslt")


@pytest.mark.parametrize("m", [1, 9, 300])
def test_linear_f32_logits_and_dispatch(kernels, m):
    _linear_case(kernels, "bf16", m, 1000, 576, with_bias=False, out_dtype="f32", path=None)
    _linear_case(kernels, "f16", m, 4100, 1536, with_bias=True, out_dtype="f32", path=None)


def test_linear_large_gemm_tiles(kernels):
    _linear_case(kernels, "bf16", 1030, 2050, 1024, with_bias=True, out_dtype="bf16", path="gemm")


def test_linear_checks(kernels):
    x = DeviceTensor.empty((4, 4100), "bf16")
    w = DeviceTensor.empty((64, 4100), "bf16")
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.linear(DeviceTensor.empty((4, 64), "bf16"), x, w)
    w = DeviceTensor.empty((64, 576), "bf16")
    with pytest.raises(ValueError, match="^x:"):
        kernels.linear(DeviceTensor.empty((4, 64), "bf16"), DeviceTensor.empty((4, 576), "f16"), w)
    with pytest.raises(ValueError, match="^y:"):
        kernels.linear(DeviceTensor.empty((5, 64), "bf16"), DeviceTensor.empty((4, 576), "bf16"), w)


# ---------------------------------------------------------------------------------------------------
# quantized linear (W8A16, W4A16)


def _packed(rng, kind, n, k, group):
    from mpillm.quant import pack_int8, pack_q4, quantize_int8
    if kind == "int8":
        return pack_int8(*quantize_int8(rng.normal(size=(n, k)) / math.sqrt(k), group), group)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = (rng.uniform(0.5, 1.5, (n, k // 32)) / (8 * math.sqrt(k))).astype(np.float16)
    m = None if kind == "q4_0" else (-8 * d.astype(np.float32) * rng.uniform(0.8, 1.2, d.shape)).astype(np.float16)
    return pack_q4(q, d, m)


def _quant_case(kernels, dtype, kind, m, n, k, group=32, with_bias=False, out_dtype=None, path=None, seed=0):
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.quant import unpack
    rng = np.random.default_rng(seed + m * 31 + n * 7 + k + group)
    p = _packed(rng, kind, n, k, group)
    x = rounded(rng.normal(size=(m, k)), dtype)
    b = rounded(rng.normal(size=n), dtype) if with_bias else None
    out_dtype = out_dtype or dtype
    y = DeviceTensor.empty((m, n), out_dtype)
    scratch = DeviceTensor.empty((n * k,), dtype)
    kernels.linear(y, dev(x, dtype), QuantWeight.from_packed(p), dev(b, dtype) if with_bias else None, path=path,
                   scratch=scratch)
    want = x.astype(np.float64) @ unpack(p).astype(np.float64).T + (b if with_bias else 0.0)
    tol = TOL[out_dtype if out_dtype == "f32" else dtype]
    if (path or ("qgemv" if m <= 128 else "dequant")) == "dequant" and out_dtype == "f32":
        # the dequantize path rounds each weight once to the model dtype
        tol = TOL[dtype]
    np.testing.assert_allclose(y.to_numpy(), want, err_msg=f"{kind} {path} M={m} N={n} K={k} G={group}", **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,group", [("int8", 32), ("int8", 64), ("int8", 128), ("q4_1", 32), ("q4_0", 32)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 17, 32, 45, 128])
@pytest.mark.parametrize("n,k", [(192, 576), (1000, 1536), (50, 4096), (576, 96)])
def test_linear_quant_small_m(kernels, dtype, kind, group, m, n, k):
    if k % group:
        pytest.skip("group does not divide K")
    _quant_case(kernels, dtype, kind, m, n, k, group, with_bias=m % 2 == 1, path="qgemv")


@pytest.mark.parametrize("kind,group", [("int8", 64), ("q4_1", 32), ("q4_0", 32)])
@pytest.mark.parametrize("m", [1, 20, 129])
def test_linear_quant_f32_out_and_dispatch(kernels, kind, group, m):
    _quant_case(kernels, "bf16", kind, m, 1003, 576, group, out_dtype="f32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,group", [("int8", 128), ("q4_1", 32), ("q4_0", 32)])
def test_linear_quant_dequantize_path(kernels, dtype, kind, group):
    _quant_case(kernels, dtype, kind, 300, 640, 4096 + 128, group, with_bias=True, path="dequant")


@pytest.mark.parametrize("kind", ["int8", "q4_1", "q4_0"])
def test_dequantize_rounds_once(kernels, kind):
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.quant import unpack
    p = _packed(np.random.default_rng(5), kind, 77, 608, 32)
    out = DeviceTensor.empty((77, 608), "bf16")
    kernels.dequantize(out, QuantWeight.from_packed(p))
    np.testing.assert_array_equal(out.to_numpy(), rounded(unpack(p), "bf16"))


@pytest.mark.parametrize("kind", ["int8", "q4_1", "q4_0"])
@pytest.mark.parametrize("m", [1, 5, 13, 20])
def test_linear_quant_tile_loop_same_bits(kernels, kind, m):
    """The ring-streaming shapes loop over 16-row tiles (blocks fewer than tiles, unevenly where N is awkward):
    the same bits as one tile per block, with and without SwiGLU, and within tolerance of the reference."""
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.quant import unpack
    n, k = 16 * 2 * kernels.device.sm_count * 3 + 16 * 5 + 6, 576 + 64
    rng = np.random.default_rng(m)
    p = _packed(rng, kind, n, k, 64 if kind == "int8" else 32)
    w = QuantWeight.from_packed(p)
    x = dev(rounded(rng.normal(size=(m, k)), "bf16"), "bf16")
    out = {}
    saved_rt, kernels.qgemv_rt_tiles = kernels.qgemv_rt_tiles, None   # 13 and 20 rows: not the row-tile kernels
    try:
        for persist in (True, False):
            kernels.qgemv_persist = persist
            y, act = DeviceTensor.empty((m, n), "bf16"), DeviceTensor.empty((m, n // 2), "bf16")
            kernels.linear(y, x, w)
            kernels.linear_swiglu(act, x, w, DeviceTensor.empty((m, n), "bf16"))
            out[persist] = (y.to_numpy(), act.to_numpy())
    finally:
        kernels.qgemv_persist, kernels.qgemv_rt_tiles = True, saved_rt
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_array_equal(out[True][1], out[False][1])
    want = x.to_numpy().astype(np.float64) @ unpack(p).astype(np.float64).T
    np.testing.assert_allclose(out[True][0], want, **TOL["bf16"])


@pytest.mark.parametrize("kind,group", [("int8", 32), ("int8", 64), ("int8", 128), ("q4_0", 32), ("q4_1", 32)])
@pytest.mark.parametrize("k", [608, 4096 + 128, 576 * 3])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -70, 3.0e5, "spread"])
def test_linear_quant_x1_same_bits_as_m1(kernels, monkeypatch, kind, group, k, scale):
    """One token of bf16 x: the _x1 kernels (x staged as fp16 times a power of two from each warp's max |x|, then
    the fp16 mma), plain, SwiGLU, f32 out and with rope, for x of any magnitude (tiny, past fp16's range).
    int8: the m1 kernels' bits; with elements below 2^-33 of the largest (rounded on the fp16 grid) within
    tolerance. Q4_0 (codes of 16 times their value at half the elements, x / 16 there, the 1024s and 8s taken off
    with each chunk's sum of x): other fp32 sums than m1's, so within tolerance of m1 and close to the reference;
    Q4_1 likewise, its mins times each chunk's sum of x (on every K here: the model takes its _x1 kernels only over
    K >= QGEMV_X1_Q4_1_MIN_K)."""
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.cuda.model import rope_interleave
    from mpillm.quant import unpack
    if k % group:
        pytest.skip("group does not divide K")
    rng = np.random.default_rng(k + group)
    n_heads, n_kv, head_dim = 9, 3, 64
    n = 16 * 2 * kernels.device.sm_count * 3 + 16 * 5 + 6 if scale == 1.0 else (n_heads + 2 * n_kv) * head_dim
    p = _packed(rng, kind, n, k, group)
    w = QuantWeight.from_packed(p)
    x_h = rng.normal(size=(1, k))
    if scale == "spread":      # a few elements below 2^-33 of the largest: the fp16 grid rounds them
        x_h[0, ::7] *= 1e-12
    else:
        x_h *= scale
    x = dev(rounded(x_h, "bf16"), "bf16")
    rope_ok = n == (n_heads + 2 * n_kv) * head_dim
    w_int = QuantWeight.from_packed(p._replace(data=rope_interleave(p.data, head_dim),
                                               scales=rope_interleave(p.scales, head_dim))) if rope_ok else None
    positions, slots = dev(np.array([77], np.int32), "i32"), dev(np.array([5], np.int32), "i32")
    inv_freq = dev(ops.rope_inv_freq(head_dim, 10000.0), "f32")
    out = {}
    monkeypatch.setattr(kernels, "qgemv_x1_q4_1_min_k", 0)    # Q4_1's _x1 kernels on every K here, small ones too
    for x1 in (True, False):
        kernels.qgemv_x1 = x1
        try:
            y, y32 = DeviceTensor.empty((1, n), "bf16"), DeviceTensor.empty((1, n), "f32")
            act = DeviceTensor.empty((1, n // 2), "bf16")
            kernels.linear(y, x, w)
            kernels.linear(y32, x, w)
            kernels.linear_swiglu(act, x, w, DeviceTensor.empty((1, n), "bf16"))
            got = [y.to_numpy(), y32.to_numpy(), act.to_numpy()]
            if rope_ok:
                qkv = DeviceTensor.empty((1, n), "bf16")
                kc, vc = dev(np.zeros((1, 16, n_kv, head_dim)), "bf16"), dev(np.zeros((1, 16, n_kv, head_dim)), "bf16")
                kernels.linear_rope(qkv, x, w_int, None, positions, inv_freq, kc, vc, slots, n_heads, n_kv, head_dim,
                                    DeviceTensor.empty((1, n), "bf16"))
                got += [qkv.to_numpy(), kc.to_numpy(), vc.to_numpy()]
            out[x1] = got
        finally:
            kernels.qgemv_x1 = True
    want = x.to_numpy().astype(np.float64) @ unpack(p).astype(np.float64).T
    top = max(float(np.abs(want).max()), 1e-300)
    for i, (a, b) in enumerate(zip(out[True], out[False])):
        if scale == "spread" or kind != "int8":
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * float(np.abs(b).max()), err_msg=f"output {i}")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"output {i}, scale {scale}")
    # f32 out against the reference (Q4_0: the chunk sums cancel the codes' 1024 + 8, some bits lower)
    np.testing.assert_allclose(out[True][1] / top, want / top, rtol=1e-3, atol=1e-5 if kind == "int8" else 1e-4)
    if kind != "int8":     # as close to the reference as the m1 kernel, to within a few fp32 roundings of max|y|
        err_x1, err_m1 = (np.abs(o[1] - want).max() / top for o in (out[True], out[False]))
        assert err_x1 <= err_m1 + 1e-5, (err_x1, err_m1)


def _launched_names(kernels, monkeypatch) -> list:
    """A list that collects the name of every kernel `kernels` launches from now on (the launches still run)."""
    names = []
    launch = kernels._launch

    def named(fn, *a, **kw):
        names.extend(name for name, f in kernels._functions.items() if f is fn)
        launch(fn, *a, **kw)
    monkeypatch.setattr(kernels, "_launch", named)
    return names


@pytest.mark.parametrize("k", [608, 4096 + 128, 14336])
def test_q4_0_x1d_same_bits_as_x1(kernels, monkeypatch, k):
    """Q4_0's deep-ring _x1d kernel (5 stages, one tile a block) against the _x1 kernel (3 stages): the ring depth
    only changes how the weights reach the registers, so the same bits; on 60 tiles, and on as many as the rule
    allows (2 per SM, the last one partly past N), with K of 1, 5 and 14 warp steps (fewer steps than the ring
    holds, and more), x's magnitudes spread over e^18 (x's fp16 staging at its scale), and close to the reference."""
    from mpillm.cuda.kernels import QuantWeight, qgemv_x1_deep
    from mpillm.quant import unpack
    names = _launched_names(kernels, monkeypatch)
    rng = np.random.default_rng(k)
    for n in (960, 2 * 16 * kernels.device.sm_count - 5):
        assert qgemv_x1_deep("4s", "", False, "bf16", n, kernels.device.sm_count)
        p = _packed(rng, "q4_0", n, k, 32)
        w = QuantWeight.from_packed(p)
        x_h = rng.normal(size=(1, k)) * np.exp(rng.uniform(-9, 9, size=(1, k)))
        x = dev(rounded(x_h, "bf16"), "bf16")
        out = {}
        for deep in (True, False):
            kernels.qgemv_x1_deep = deep
            try:
                names.clear()
                y = dev(np.full((1, n), np.nan), "bf16")
                kernels.linear(y, x, w)
                assert names == [f"qgemv4s_bf16_bf16_{'x1d' if deep else 'x1'}"], names
                out[deep] = y.to_numpy()
            finally:
                kernels.qgemv_x1_deep = True
        np.testing.assert_array_equal(out[True], out[False], err_msg=f"N={n} K={k}")
        want = x.to_numpy().astype(np.float64) @ unpack(p).astype(np.float64).T
        np.testing.assert_allclose(out[True], want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


def _prenorm_folded_and_not(kernels, w_gu, w_qkv, resid, delta, weight, eps, n_heads, n_kv, head_dim):
    """linear_swiglu and linear_rope (one token at position 31, KV slot 3) with the pre-norm folded in (prenorm;
    resid_in must stay as it was) and after add_rms_norm: {True: folded, False: not} -> (r', act, qkv, k cache,
    v cache) as NumPy arrays."""
    hidden, n_qkv, n_gu = resid.shape[1], w_qkv.shape[0], w_gu.shape[0]
    positions, slots = dev(np.array([31], np.int32), "i32"), dev(np.array([3], np.int32), "i32")
    inv_freq = dev(ops.rope_inv_freq(head_dim, 10000.0), "f32")
    w_norm = dev(weight, "bf16")
    out = {}
    for fold in (True, False):
        r_in, r_out, h = dev(resid, "bf16"), DeviceTensor.empty((1, hidden), "bf16"), DeviceTensor.empty((1, hidden), "bf16")
        act, qkv = DeviceTensor.empty((1, n_gu // 2), "bf16"), DeviceTensor.empty((1, n_qkv), "bf16")
        kc, vc = (dev(np.zeros((1, 16, n_kv, head_dim)), "bf16") for _ in range(2))
        staging = DeviceTensor.empty((1, n_qkv), "bf16")
        if fold:
            pn = (dev(delta, "bf16"), r_in, r_out, w_norm, eps)
            kernels.linear_swiglu(act, h, w_gu, DeviceTensor.empty((1, n_gu), "bf16"), prenorm=pn)
            kernels.linear_rope(qkv, h, w_qkv, None, positions, inv_freq, kc, vc, slots, n_heads, n_kv, head_dim,
                                staging, prenorm=pn)
            np.testing.assert_array_equal(r_in.to_numpy(), resid)          # read only
            r_new = r_out.to_numpy()
        else:
            kernels.add_rms_norm(h, dev(delta, "bf16"), r_in, w_norm, eps)
            kernels.linear_swiglu(act, h, w_gu, DeviceTensor.empty((1, n_gu), "bf16"))
            kernels.linear_rope(qkv, h, w_qkv, None, positions, inv_freq, kc, vc, slots, n_heads, n_kv, head_dim,
                                staging)
            r_new = r_in.to_numpy()
        out[fold] = (r_new, act.to_numpy(), qkv.to_numpy(), kc.to_numpy(), vc.to_numpy())
    return out


@pytest.mark.parametrize("hidden", [576, 4160, 8192])
def test_prenorm_folded_into_x1_kernels_same_bits(kernels, hidden):
    """linear_swiglu and linear_rope with prenorm (the _x1n kernels: r' = r + delta and x = rms_norm(r') * weight
    made in the prologue, replaying norm.cu's threads) against add_rms_norm then the _x1 kernels: the same outputs,
    KV caches and r' bit for bit; r' lands in resid_out and resid_in is left as it was."""
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.cuda.model import rope_interleave
    rng = np.random.default_rng(hidden)
    n_heads, n_kv, head_dim, eps = 9, 3, 64, 1e-5
    n_qkv, n_gu = (n_heads + 2 * n_kv) * head_dim, 1000
    p_gu, p_qkv = _packed(rng, "int8", n_gu, hidden, 64), _packed(rng, "int8", n_qkv, hidden, 64)
    w_gu = QuantWeight.from_packed(p_gu)
    w_qkv = QuantWeight.from_packed(p_qkv._replace(data=rope_interleave(p_qkv.data, head_dim),
                                                   scales=rope_interleave(p_qkv.scales, head_dim)))
    resid = rounded(3 * rng.normal(size=(1, hidden)), "bf16")
    delta = rounded(rng.normal(size=(1, hidden)), "bf16")
    weight = rounded(rng.uniform(0.5, 1.5, hidden), "bf16")
    out = _prenorm_folded_and_not(kernels, w_gu, w_qkv, resid, delta, weight, eps, n_heads, n_kv, head_dim)
    for a, b, what in zip(out[True], out[False], ("residual", "act", "qkv", "k cache", "v cache")):
        np.testing.assert_array_equal(a, b, err_msg=what)
    np.testing.assert_array_equal(out[True][0], rounded(resid + delta, "bf16"))
    act, h, r_out = (DeviceTensor.empty((1, n), "bf16") for n in (n_gu // 2, hidden, hidden))
    w_norm = dev(weight, "bf16")
    with pytest.raises(ValueError, match="prenorm resid_out"):
        r = dev(resid, "bf16")
        kernels.linear_swiglu(act, h, w_gu, DeviceTensor.empty((1, n_gu), "bf16"),
                              prenorm=(dev(delta, "bf16"), r, r, w_norm, eps))
    with pytest.raises(ValueError, match="prenorm"):   # two tokens: no _x1n kernel
        kernels.linear_swiglu(DeviceTensor.empty((2, n_gu // 2), "bf16"), DeviceTensor.empty((2, hidden), "bf16"),
                              w_gu, DeviceTensor.empty((2, n_gu), "bf16"),
                              prenorm=(dev(delta, "bf16"), dev(resid, "bf16"), r_out, w_norm, eps))


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "bf16"])
@pytest.mark.parametrize("hidden", [576, 4160, 8192])
def test_prenorm_folded_with_rstd_on_the_sums(kernels, monkeypatch, hidden, kind):
    """Q4_0's and Q4_1's _x1n kernels and bf16's _m1n (the pre-norm folded in, its scale rstd applied to the sums:
    gemv_quant.cu stage_x_half's FOLD, gemv.cu PRENORM) against the NumPy reference of add_rms_norm then the
    projections, and against add_rms_norm then the plain kernels: r' bit for bit (to resid_out; resid_in left as it
    was); act, q/k/v and the KV caches within bf16 rounding (r' w is rounded once to bf16, where add_rms_norm rounds
    r' rstd w). Residuals of a large scale: the sum is staged unnormalised. bf16 takes more rows (over 132 tiles),
    so that its launches are not the wide block's, which has no fold."""
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.cuda.model import rope_interleave
    from mpillm.quant import unpack
    monkeypatch.setattr(kernels, "qgemv_x1_q4_1_min_k", 0)    # Q4_1's _x1n kernels at hidden 576 too
    rng = np.random.default_rng(hidden + 1)
    n_heads, n_kv, head_dim, eps = (9, 3, 64, 1e-5) if kind != "bf16" else (32, 8, 64, 1e-5)
    n_qkv, n_gu = (n_heads + 2 * n_kv) * head_dim, 1000 if kind != "bf16" else 4000
    if kind != "bf16":
        p_gu, p_qkv = _packed(rng, kind, n_gu, hidden, 32), _packed(rng, kind, n_qkv, hidden, 32)
        w_gu = QuantWeight.from_packed(p_gu)
        w_qkv = QuantWeight.from_packed(p_qkv._replace(data=rope_interleave(p_qkv.data, head_dim),
                                                       scales=rope_interleave(p_qkv.scales, head_dim)))
        gu_ref = unpack(p_gu)
    else:
        gu_ref = rounded(rng.normal(size=(n_gu, hidden)) / math.sqrt(hidden), "bf16")
        w_gu = dev(gu_ref, "bf16")
        w_qkv = dev(rope_interleave(rounded(rng.normal(size=(n_qkv, hidden)) / math.sqrt(hidden), "bf16"), head_dim),
                    "bf16")
        assert kernels.prenorm_fusable(w_gu, "bf16", 1, hidden) and kernels.prenorm_fusable(w_qkv, "bf16", 1, hidden)
    resid = rounded(300 * rng.normal(size=(1, hidden)), "bf16")
    delta = rounded(100 * rng.normal(size=(1, hidden)), "bf16")
    weight = rounded(rng.uniform(0.5, 1.5, hidden), "bf16")
    out = _prenorm_folded_and_not(kernels, w_gu, w_qkv, resid, delta, weight, eps, n_heads, n_kv, head_dim)
    r_want = rounded(resid + delta, "bf16")
    np.testing.assert_array_equal(out[True][0], r_want)
    np.testing.assert_array_equal(out[False][0], r_want)
    for a, b, what in zip(out[True][1:], out[False][1:], ("act", "qkv", "k cache", "v cache")):
        top = max(np.abs(b).max(), 1e-6)
        np.testing.assert_allclose(a / top, b / top, rtol=0, atol=2e-2, err_msg=what)
    # act against NumPy: rms_norm in float64, the dequantized gate/up rows (interleaved: 2i gate, 2i + 1 up)
    x = r_want.astype(np.float64)
    x = x / np.sqrt(np.mean(x * x) + eps) * weight
    gu = x @ gu_ref.astype(np.float64).T
    want = (gu[:, 0::2] / (1 + np.exp(-gu[:, 0::2]))) * gu[:, 1::2]
    top = np.abs(want).max()
    np.testing.assert_allclose(out[True][1] / top, want / top, rtol=0, atol=2e-2)
    err_fold, err_plain = (np.abs(o[1] - want).max() / top for o in (out[True], out[False]))
    assert err_fold <= 2 * err_plain + 4e-3, (err_fold, err_plain)


def test_linear_quant_checks(kernels):
    from mpillm.cuda.kernels import QuantWeight
    w = QuantWeight.from_packed(_packed(np.random.default_rng(0), "int8", 64, 576, 64))
    with pytest.raises(ValueError, match="^x:"):
        kernels.linear(DeviceTensor.empty((4, 64), "bf16"), DeviceTensor.empty((4, 512), "bf16"), w)
    with pytest.raises(ValueError, match="^scratch:"):
        kernels.linear(DeviceTensor.empty((200, 64), "bf16"), DeviceTensor.empty((200, 576), "bf16"), w)


# ---------------------------------------------------------------------------------------------------
# rotary embedding and KV store fused into the q/k/v projection


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["float", "int8", "q4_1", "q4_0"])
@pytest.mark.parametrize("m", [1, 7, 17, 32, 33, 129])
@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(64, 9, 3), (128, 4, 2), (80, 2, 1)])
def test_linear_rope_equals_linear_then_rope(kernels, dtype, kind, m, head_dim, n_heads, n_kv):
    """linear_rope on the per-head interleaved weight and bias (small M: one kernel; larger: GEMM into a staging
    buffer, then the rope kernel reading the pairs there) gives qkv and the caches bit for bit as linear +
    rope_store_kv on the natural weight, padding slots (-1) included."""
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.cuda.model import rope_interleave
    from mpillm.quant import unpack
    rng = np.random.default_rng(m * 13 + head_dim + n_heads)
    k, n = 576, (n_heads + 2 * n_kv) * head_dim
    if kind == "float":
        wf = rounded(rng.normal(size=(n, k)) / math.sqrt(k), dtype)
        w_nat, w_int = dev(wf, dtype), dev(rope_interleave(wf, head_dim), dtype)
    else:
        p = _packed(rng, kind, n, k, 64)
        w_nat = QuantWeight.from_packed(p)
        w_int = QuantWeight.from_packed(p._replace(data=rope_interleave(p.data, head_dim),
                                                   scales=rope_interleave(p.scales, head_dim)))
        wf = unpack(p)
    bias = rounded(rng.normal(size=n), dtype)
    x = dev(rounded(rng.normal(size=(m, k)), dtype), dtype)
    positions = dev(rng.integers(0, 5000, m).astype(np.int32), "i32")
    blocks = -(-m // 16) + 2                    # room for every token's slot
    slots_h = rng.permutation(blocks * 16)[:m].astype(np.int32)
    slots_h[::5] = -1
    slots = dev(slots_h, "i32")
    inv_freq = dev(ops.rope_inv_freq(head_dim, 10000.0), "f32")
    cache = rounded(rng.normal(size=(blocks, 16, n_kv, head_dim)), dtype)
    out = {}
    scratch = DeviceTensor.empty((n * k,), dtype)
    for fused in (True, False):
        qkv = DeviceTensor.empty((m, n), dtype)
        kc, vc = dev(cache, dtype), dev(cache, dtype)
        if fused:
            stage = DeviceTensor.empty((m, n), dtype)
            kernels.linear_rope(qkv, x, w_int, dev(rope_interleave(bias, head_dim), dtype), positions, inv_freq, kc,
                                vc, slots, n_heads, n_kv, head_dim, stage, scratch)
        else:
            kernels.linear(qkv, x, w_nat, dev(bias, dtype), scratch=scratch)
            kernels.rope_store_kv(qkv, positions, inv_freq, kc, vc, slots, n_heads, n_kv, head_dim)
        out[fused] = (qkv.to_numpy(), kc.to_numpy(), vc.to_numpy())
    from mpillm.cuda.kernels import GEMV_MAX_M, QGEMV_MAX_M
    small = m <= (GEMV_MAX_M if kind == "float" else QGEMV_MAX_M)
    for a, b, what in zip(out[True], out[False], ("qkv", "k cache", "v cache")):
        if small:    # the same dot products, rounded and rotated the same way
            np.testing.assert_array_equal(a, b, err_msg=f"{what}, {kind} M={m}")
        else:        # the GEMM sees the rows in another order: its tiling may sum differently
            assert_close(a, b, dtype, f"{what}, {kind} M={m}")
    # and against NumPy: the projection, then the rotation of q and k
    yy = rounded(x.to_numpy().astype(np.float64) @ wf.astype(np.float64).T + bias, dtype)
    cos, sin = ops.rope_cos_sin(positions.to_numpy(), inv_freq.to_numpy())
    q = ops.apply_rope(yy[:, : n_heads * head_dim].reshape(m, n_heads, head_dim), cos, sin)
    got = out[True][0][:, : n_heads * head_dim].reshape(m, n_heads, head_dim)
    # The rotation turns an error in either element of a pair into an error in both, so the tolerance scales
    # with the pair's norm (rotation-invariant), not the element's own size: a large pre-rotation value that
    # rounds one ulp apart (the dequantize path rounds every weight to the model dtype first) may come out
    # next to a small rotated one.
    half = head_dim // 2
    pair = np.sqrt(q[..., :half] ** 2 + q[..., half:] ** 2)
    tol = TOL[dtype]
    bound = tol["atol"] + tol["rtol"] * np.concatenate([pair, pair], axis=-1)
    worst = np.unravel_index(np.argmax(np.abs(got - q) - bound), q.shape)
    assert np.all(np.abs(got - q) <= bound), (f"q, {kind} M={m}: token, head, dim {worst}: {got[worst]} vs "
                                              f"{q[worst]} (bound {bound[worst]:.4f})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_wide_gemv_blocks(kernels, monkeypatch, dtype, m):
    """Few tiles and a long K (the q/k/v projection at TP 4): the 16-warp m1w kernels run, and against NumPy they are
    as close as the 8-warp ones (MPILLM_GEMV_WIDE=0); within them, linear_rope and linear_swiglu are bitwise linear
    followed by rope_store_kv / silu_mul, as for the 8-warp kernels."""
    from mpillm.cuda.model import rope_interleave
    head_dim, n_heads, n_kv, k = 64, 9, 3, 4104          # 960 rows: 60 tiles; k leaves a part-filled last k step
    n = (n_heads + 2 * n_kv) * head_dim
    if kernels.device.sm_count < n // 16:
        pytest.skip(f"{n // 16} tiles: more than this GPU's {kernels.device.sm_count} SMs, no wide kernel")
    rng = np.random.default_rng(m + 41)
    wf = rounded(rng.normal(size=(n, k)) / math.sqrt(k), dtype)
    x = rounded(rng.normal(size=(m, k)), dtype)
    bias = rounded(rng.normal(size=n), dtype)
    w_nat, w_int, xd = dev(wf, dtype), dev(rope_interleave(wf, head_dim), dtype), dev(x, dtype)
    positions = dev(rng.integers(0, 5000, m).astype(np.int32), "i32")
    slots = dev(np.arange(m, dtype=np.int32), "i32")
    inv_freq = dev(ops.rope_inv_freq(head_dim, 10000.0), "f32")
    names = _launched_names(kernels, monkeypatch)
    yy = x.astype(np.float64) @ wf.astype(np.float64).T
    out = {}
    for wide in (True, False):
        monkeypatch.setattr(kernels, "gemv_wide", wide)
        names.clear()
        qkv, y = DeviceTensor.empty((m, n), dtype), DeviceTensor.empty((m, n), dtype)
        kc, vc, kc2, vc2 = (dev(np.zeros((1, 16, n_kv, head_dim)), dtype) for _ in range(4))
        kernels.linear_rope(qkv, xd, w_int, dev(rope_interleave(bias, head_dim), dtype), positions, inv_freq, kc, vc,
                            slots, n_heads, n_kv, head_dim, DeviceTensor.empty((m, n), dtype))
        kernels.linear(y, xd, w_nat, dev(bias, dtype))
        kernels.rope_store_kv(y, positions, inv_freq, kc2, vc2, slots, n_heads, n_kv, head_dim)
        act, plain, ref = (DeviceTensor.empty((m, w), dtype) for w in (n // 2, n, n // 2))
        kernels.linear_swiglu(act, xd, w_nat, DeviceTensor.empty((m, n), dtype))
        kernels.linear(plain, xd, w_nat)
        kernels.silu_mul(ref, plain, interleaved=True)
        s = "w" if wide else ""
        assert names[:3] == [f"gemv_rope_{dtype}_m1{s}", f"gemv_{dtype}_{dtype}_m1{s}", f"rope_store_kv_{dtype}"]
        assert names[3:5] == [f"gemv_swiglu_{dtype}_{dtype}_m1{s}", f"gemv_{dtype}_{dtype}_m1{s}"]
        for a, b, what in ((qkv, y, "qkv"), (kc, kc2, "k cache"), (vc, vc2, "v cache"), (act, ref, "act")):
            np.testing.assert_array_equal(a.to_numpy(), b.to_numpy(), err_msg=f"{what}, wide={wide}")
        got = plain.to_numpy().astype(np.float64)
        out[wide] = np.abs(got - yy).max() / np.abs(yy).max()
        assert_close(got, yy, dtype, f"wide={wide} M={m}")
        assert_close(act.to_numpy(), ops.silu_mul(np.concatenate([yy[:, 0::2], yy[:, 1::2]], axis=1)), dtype)
    assert out[True] <= 2 * out[False] + 1e-6, out      # the same rounding of y, summed in another order


@pytest.fixture(params=["r", "rw", "r1"])
def row_tiles(request, kernels):
    """Kernels with every 9-32 token int8 / Q4_0 launch on the row-tile kernels (quant_linear_rt), whatever its
    tile count (by default only launches with at least 2 tiles per SM take them): Q4_0's on the 8-warp ("r") or
    the 4-warp twins ("rw"); or ("r1") none of them, so that Q4_0 takes the one-tile twins (int8: quant_linear)."""
    saved = kernels.qgemv_rt_tiles, kernels.qgemv_rt_wide_tiles
    kernels.qgemv_rt_tiles = 1 << 30 if request.param == "r1" else 0
    kernels.qgemv_rt_wide_tiles = 0 if request.param == "rw" else 1 << 30
    yield kernels
    kernels.qgemv_rt_tiles, kernels.qgemv_rt_wide_tiles = saved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,group", [("int8", 32), ("int8", 128), ("q4_0", 32)])
@pytest.mark.parametrize("m", [9, 16, 17, 32, 45])
@pytest.mark.parametrize("n,k", [(192, 576), (1000, 1536), (50, 4096), (1000, 96), (1040, 4096 + 128)])
def test_linear_quant_row_tiles(row_tiles, dtype, kind, group, m, n, k):
    """The row-tile kernels (two 16-row tiles a block: 1,000 rows leave the last block's second tile past N, 50
    rows a tile partly past it; K of 96 half a Q4_0 super-block) and Q4_0's one-tile twins against NumPy, and at
    9-16 tokens (8 warps) bit for bit quant_linear, whose 8 warps sum in the same order."""
    from mpillm.cuda.kernels import QuantWeight
    if k % group:
        pytest.skip("group does not divide K")
    if kind == "int8" and (row_tiles.qgemv_rt_wide_tiles == 0 or row_tiles.qgemv_rt_tiles):
        pytest.skip("int8 has no 4-warp or one-tile twin")
    _quant_case(row_tiles, dtype, kind, m, n, k, group, with_bias=m % 2 == 1, path="qgemv")
    _quant_case(row_tiles, dtype, kind, m, n, k, group, out_dtype="f32", path="qgemv")
    if m > 16 or (kind == "q4_0" and row_tiles.qgemv_rt_wide_tiles == 0):
        return
    rng = np.random.default_rng(m + n + k)
    w = QuantWeight.from_packed(_packed(rng, kind, n, k, group))
    x = dev(rounded(rng.normal(size=(m, k)), dtype), dtype)
    out = []
    shape = row_tiles.qgemv_rt_tiles
    for tiles in (shape, None):
        row_tiles.qgemv_rt_tiles = tiles
        y = DeviceTensor.empty((m, n), dtype)
        row_tiles.linear(y, x, w)
        out.append(y.to_numpy())
    row_tiles.qgemv_rt_tiles = shape
    np.testing.assert_array_equal(out[0], out[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["int8", "q4_0"])
@pytest.mark.parametrize("m", [9, 17, 32])
def test_row_tiles_swiglu_and_rope(row_tiles, dtype, kind, m):
    """The row-tile kernels' SwiGLU and rope epilogues: fused bit for bit as unfused, and against NumPy (the
    fused-epilogue tests below, on row tiles; 400 and 1,024 rows: 25 and 64 tiles)."""
    test_linear_swiglu_fused_equals_unfused(row_tiles, dtype, kind, m)
    test_linear_rope_equals_linear_then_rope(row_tiles, dtype, kind, m, 80, 3, 1)
    test_linear_rope_equals_linear_then_rope(row_tiles, dtype, kind, m, 128, 4, 2)


# ---------------------------------------------------------------------------------------------------
# SwiGLU fused into the gate/up projection


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["float", "int8", "q4_1", "q4_0"])
@pytest.mark.parametrize("m", [1, 5, 17, 32, 33, 100, 140])
def test_linear_swiglu_fused_equals_unfused(kernels, dtype, kind, m):
    """act = silu(gate) * up from one kernel (small M) is bitwise the GEMV/GEMM followed by silu_mul on the
    interleaved pairs, and both match NumPy."""
    from mpillm.cuda.kernels import QuantWeight
    from mpillm.quant import unpack
    inter, k = 200, 576
    rng = np.random.default_rng(m + 7)
    if kind == "float":
        wf = rounded(rng.normal(size=(2 * inter, k)) / math.sqrt(k), dtype)
        w = dev(wf, dtype)
    else:
        p = _packed(rng, kind, 2 * inter, k, 64)
        wf, w = unpack(p), QuantWeight.from_packed(p)
    x = rounded(rng.normal(size=(m, k)), dtype)
    xd, scratch = dev(x, dtype), DeviceTensor.empty((2 * inter * k,), dtype)
    act, gate_up = DeviceTensor.empty((m, inter), dtype), DeviceTensor.empty((m, 2 * inter), dtype)
    kernels.linear_swiglu(act, xd, w, gate_up, scratch=scratch)
    y, ref = DeviceTensor.empty((m, 2 * inter), dtype), DeviceTensor.empty((m, inter), dtype)
    kernels.linear(y, xd, w, scratch=scratch)
    kernels.silu_mul(ref, y, interleaved=True)
    np.testing.assert_array_equal(act.to_numpy(), ref.to_numpy())
    yy = rounded(x.astype(np.float64) @ wf.astype(np.float64).T, dtype)
    want = ops.silu_mul(np.concatenate([yy[:, 0::2], yy[:, 1::2]], axis=1))
    assert_close(act.to_numpy(), want, dtype, f"{kind} M={m}")


# ---------------------------------------------------------------------------------------------------
# attention


def _paged_batch(rng, dtype, seqs, n_heads, n_kv, head_dim, block_size):
    """Random batch: seqs = [(n_q, context_len)]; KV for every context position in a paged cache with a
    random (non-contiguous) block table. Returns device tensors and host copies for the reference."""
    max_blocks = max(math.ceil(ctx / block_size) for _, ctx in seqs)
    num_blocks = sum(math.ceil(ctx / block_size) for _, ctx in seqs) + 3
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
    k_cache = rounded(rng.normal(size=(num_blocks, block_size, n_kv, head_dim)), dtype)
    v_cache = rounded(rng.normal(size=(num_blocks, block_size, n_kv, head_dim)), dtype)
    used = 0
    for s, (_, ctx) in enumerate(seqs):
        nb = math.ceil(ctx / block_size)
        tables[s, :nb] = perm[used: used + nb]
        used += nb
    n_tok = sum(nq for nq, _ in seqs)
    width = (n_heads + 2 * n_kv) * head_dim
    qkv = rounded(rng.normal(size=(n_tok, width)), dtype)
    query_start = np.concatenate([[0], np.cumsum([nq for nq, _ in seqs])]).astype(np.int32)
    context_lens = np.array([ctx for _, ctx in seqs], dtype=np.int32)
    host = dict(k_cache=k_cache, v_cache=v_cache, tables=tables, qkv=qkv, query_start=query_start,
                context_lens=context_lens)
    device = dict(qkv=dev(qkv, dtype), k_cache=dev(k_cache, dtype), v_cache=dev(v_cache, dtype),
                  block_tables=dev(tables, "i32"), query_start=dev(query_start, "i32"),
                  context_lens=dev(context_lens, "i32"))
    return host, device


def _attention_reference(host, seqs, n_heads, n_kv, head_dim, block_size, group=None, head_offset=0):
    outs = []
    for s, (nq, ctx) in enumerate(seqs):
        slots = host["tables"][s, np.arange(ctx) // block_size] * block_size + np.arange(ctx) % block_size
        k = host["k_cache"].reshape(-1, n_kv, head_dim)[slots]
        v = host["v_cache"].reshape(-1, n_kv, head_dim)[slots]
        q = host["qkv"][host["query_start"][s]: host["query_start"][s + 1], : n_heads * head_dim]
        q = q.reshape(nq, n_heads, head_dim)
        outs.append(ops.attention(q, k, v, np.arange(ctx - nq, ctx), group, head_offset))
    return np.concatenate(outs, axis=0)


def _run_attention(kernels, dtype, seqs, n_heads, n_kv, head_dim, block_size, seed, scratch=None, group=None,
                   head_offset=0):
    rng = np.random.default_rng(seed)
    host, d = _paged_batch(rng, dtype, seqs, n_heads, n_kv, head_dim, block_size)
    out = DeviceTensor.empty((host["qkv"].shape[0], n_heads, head_dim), dtype)
    kernels.attention(out, d["qkv"], d["k_cache"], d["v_cache"], d["block_tables"], d["query_start"],
                      d["context_lens"], n_heads, n_kv, head_dim, 1.0 / math.sqrt(head_dim),
                      max_query_len=max(nq for nq, _ in seqs), max_context_len=max(c for _, c in seqs),
                      scratch=scratch, group=group, head_offset=head_offset)
    want = _attention_reference(host, seqs, n_heads, n_kv, head_dim, block_size, group, head_offset)
    return out.to_numpy(), want


PREFILL_SEQS = [(37, 37), (64, 200), (1, 55), (130, 1000), (5, 3000), (70, 70)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(128, 4, 4), (128, 6, 2), (64, 8, 2), (64, 16, 2),
                                                   (80, 6, 2), (96, 4, 1)])
def test_attention_prefill(kernels, dtype, head_dim, n_heads, n_kv):
    got, want = _run_attention(kernels, dtype, PREFILL_SEQS, n_heads, n_kv, head_dim, 16, seed=head_dim + n_heads)
    # P is rounded to the model dtype before the P V product (as FlashAttention does).
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == "bf16" else dict(rtol=5e-3, atol=5e-3)
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("block_size", [1, 32, 256])
def test_attention_prefill_block_sizes(kernels, block_size):
    seqs = [(100, 300), (17, 17)]
    got, want = _run_attention(kernels, "f16", seqs, 8, 2, 128, block_size, seed=block_size)
    np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3)


DECODE_SEQS = [(1, 1), (1, 17), (1, 513), (1, 3000), (1, 1024), (1, 2047)]


def _cluster_mode(kernels, monkeypatch, cluster: bool, group, max_ctx):
    """Pin the decode kernel: the cluster kernel at any batch size (skip where the device or shape has none), or
    split-K."""
    import mpillm.cuda.kernels as km

    monkeypatch.setattr(kernels, "decode_cluster", cluster)
    if cluster:
        bound = next(g for g in km.DECODE_GROUPS if group <= g)
        if not km.decode_cluster_fits(bound, max_ctx, kernels.device.compute_capability):
            pytest.skip("no cluster kernel for this device or shape")
        monkeypatch.setattr(km, "decode_uses_cluster", lambda *args: True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(128, 4, 4), (128, 12, 4), (64, 8, 2), (128, 32, 4),
                                                   (80, 6, 2), (96, 32, 2)])
def test_attention_decode_split_k(kernels, dtype, head_dim, n_heads, n_kv):
    from mpillm.cuda.kernels import AttentionScratch

    scratch = AttentionScratch(8, n_heads, head_dim, 4096)
    got, want = _run_attention(kernels, dtype, DECODE_SEQS, n_heads, n_kv, head_dim, 16, seed=n_heads,
                               scratch=scratch)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("cluster", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode_single_partition(kernels, monkeypatch, cluster, dtype):
    seqs = [(1, 5), (1, 512), (1, 300)]
    _cluster_mode(kernels, monkeypatch, cluster, 8, 512)
    got, want = _run_attention(kernels, dtype, seqs, 8, 1, 64, 16, seed=3)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("split,min_part", [(0.0, 32), (1.0, 16), (1.0, 32), (4.0, 16), (1.0, 512), (64.0, 16)])
@pytest.mark.parametrize("seqs", [[(1, 150)], [(1, 1), (1, 33), (1, 512)], [(1, 0), (1, 700), (1, 16), (1, 4097)]])
def test_attention_decode_small_batch_split(kernels, monkeypatch, split, min_part, seqs):
    """Small batches spread each sequence over more partitions, chosen per sequence on the device from the
    grid's P: sequences that fit one partition (including empty ones) and ones split many ways share a
    launch, with and without the split (split 0) and with partitions down to 16 keys."""
    from mpillm.cuda.kernels import AttentionScratch

    monkeypatch.setattr(kernels, "decode_split", split)
    monkeypatch.setattr(kernels, "decode_min_part", min_part)
    monkeypatch.setattr(kernels, "decode_cluster", False)   # the split-K kernel's own rules
    nh, nkv, hd = 12, 3, 128
    rng = np.random.default_rng(len(seqs) + min_part)
    host, d = _paged_batch(rng, "bf16", seqs, nh, nkv, hd, 16)
    out = DeviceTensor.from_numpy(np.full((len(seqs), nh, hd), 7.0, np.float32), "bf16")
    scratch = AttentionScratch(4, nh, hd, 8192)
    results = []
    for _ in range(3):           # the last block of each (sequence, kv head) merges, and resets its counter
        kernels.attention(out, d["qkv"], d["k_cache"], d["v_cache"], d["block_tables"], d["query_start"],
                          d["context_lens"], nh, nkv, hd, hd ** -0.5, max_query_len=1,
                          max_context_len=max(c for _, c in seqs), scratch=scratch)
        results.append(out.to_numpy())
    assert not scratch.counters.to_numpy().any(), "arrival counters must be back at zero"
    got = results[0]
    assert all(np.array_equal(r, got) for r in results), "repeated launches must give the same bits"
    live = [i for i, (_, c) in enumerate(seqs) if c > 0]
    # The reference takes the live sequences only (an empty context has no softmax).
    sub = dict(host, tables=host["tables"][live], qkv=host["qkv"][live],
               query_start=np.arange(len(live) + 1, dtype=np.int32))
    want = _attention_reference(sub, [seqs[i] for i in live], nh, nkv, hd, 16)
    assert not np.any(np.delete(got, live, axis=0)), "an empty sequence's output must be zeros"
    assert_close(got[live], want, "bf16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(128, 32, 8), (64, 9, 3), (96, 28, 4), (80, 8, 8), (64, 48, 3)])
def test_attention_decode_large_batch_whole_partitions(kernels, dtype, head_dim, n_heads, n_kv):
    """A batch that fills the GPU by itself takes whole 512-key partitions (decode_least_part) and the kernel
    built for more blocks per SM (GQA groups 4, 8 and 1 here; group 16 has only the plain one): sequences up
    to 512 keys write their output directly, longer ones merge 2-4 partitions, in one launch whose grid's P
    allows a 2,048-key bound (as a graph captured for max_model_len 2048 does); one-key sequences too."""
    from mpillm.cuda.kernels import (DECODE_WHOLE_PARTS_PER_SM, AttentionScratch, decode_kernel_suffix,
                                     decode_least_part)

    sms = kernels.device.sm_count
    n_seqs = -(-DECODE_WHOLE_PARTS_PER_SM * sms // n_kv) + 5
    assert decode_least_part(n_seqs, n_kv, sms) == 512
    group = n_heads // n_kv
    assert decode_kernel_suffix(4 * n_kv * n_seqs, 16 if group > 8 else 8 if group > 4 else 4 if group > 1 else 1,
                                sms) == ("" if group > 8 else "_occ")
    rng = np.random.default_rng(head_dim + n_kv)
    ctx = rng.integers(1, 2048, n_seqs)
    ctx[:6] = [1, 511, 512, 513, 1024, 2047]
    seqs = [(1, int(c)) for c in ctx]
    scratch = AttentionScratch(n_seqs, n_heads, head_dim, 2048)
    got, want = _run_attention(kernels, dtype, seqs, n_heads, n_kv, head_dim, 16, seed=n_heads, scratch=scratch)
    assert_close(got, want, dtype)
    assert not scratch.counters.to_numpy().any(), "arrival counters must be back at zero"


SHORT_DECODE_SEQS = [(1, 1), (1, 17), (1, 300), (1, 512), (1, 64)]   # the cluster kernel's bound


@pytest.mark.parametrize("cluster", [False, True])
@pytest.mark.parametrize("seqs", ["prefill", "decode", "short decode"])
@pytest.mark.parametrize("n_heads,n_kv,group,head_offset", [(5, 2, 3, 0), (4, 2, 3, 2), (3, 1, 9, 6), (2, 2, 3, 2)])
def test_attention_tensor_parallel_head_offset(kernels, monkeypatch, cluster, seqs, n_heads, n_kv, group,
                                               head_offset):
    """A shard's query heads may start inside a GQA group (SmolLM2's 9 heads / 3 kv heads at --tp 2 and 4)."""
    from mpillm.cuda.kernels import AttentionScratch

    seqs = {"prefill": PREFILL_SEQS[:4], "decode": DECODE_SEQS, "short decode": SHORT_DECODE_SEQS}[seqs]
    if cluster and seqs is PREFILL_SEQS[:4]:
        pytest.skip("prefill: no decode kernel")
    _cluster_mode(kernels, monkeypatch, cluster, group, max(c for _, c in seqs))

    scratch = AttentionScratch(8, n_heads, 64, 4096)
    got, want = _run_attention(kernels, "f16", seqs, n_heads, n_kv, 64, 16, seed=n_heads + head_offset,
                               scratch=scratch, group=group, head_offset=head_offset)
    assert_close(got, want, "f16")


@pytest.mark.parametrize("seqs", [[(1, 1), (1, 0), (1, 7), (1, 512)], [(1, 9), (1, 255), (1, 257), (1, 500)]])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,n_heads,n_kv,block_size", [(128, 32, 8, 16), (64, 9, 3, 16), (96, 28, 4, 32),
                                                              (80, 8, 8, 1), (64, 16, 2, 16), (128, 40, 8, 256)])
def test_attention_decode_cluster(kernels, monkeypatch, seqs, dtype, head_dim, n_heads, n_kv, block_size):
    """The cluster kernel (small batches, sm_90+): each of the 8 blocks of a (sequence, kv head) takes an even
    share of the keys, from none (contexts below 8) to 64 in two ring stages (the 512-key bound), and the blocks
    merge in distributed shared memory. An empty sequence gets zeros; repeated launches the same bits; the
    split-K kernel agrees within rounding."""
    _cluster_mode(kernels, monkeypatch, True, n_heads // n_kv, 512)
    from mpillm.cuda.kernels import AttentionScratch

    rng = np.random.default_rng(head_dim + n_heads)
    host, d = _paged_batch(rng, dtype, seqs, n_heads, n_kv, head_dim, block_size)
    out = DeviceTensor.from_numpy(np.full((len(seqs), n_heads, head_dim), 7.0, np.float32), dtype)

    def launch():
        kernels.attention(out, d["qkv"], d["k_cache"], d["v_cache"], d["block_tables"], d["query_start"],
                          d["context_lens"], n_heads, n_kv, head_dim, head_dim ** -0.5, max_query_len=1,
                          max_context_len=512, scratch=AttentionScratch(len(seqs), n_heads, head_dim, 512))
        return out.to_numpy()

    got = launch()
    assert all(np.array_equal(launch(), got) for _ in range(2)), "repeated launches must give the same bits"
    live = [i for i, (_, c) in enumerate(seqs) if c > 0]
    assert not np.delete(got, live, axis=0).any(), "an empty sequence's output must be zeros"
    sub = dict(host, tables=host["tables"][live], qkv=host["qkv"][live],
               query_start=np.arange(len(live) + 1, dtype=np.int32))
    want = _attention_reference(sub, [seqs[i] for i in live], n_heads, n_kv, head_dim, block_size)
    assert_close(got[live], want, dtype)
    monkeypatch.setattr(kernels, "decode_cluster", False)
    assert_close(launch()[live], got[live], dtype, "split-K against cluster")


@pytest.mark.parametrize("seqs", [[(1, 1), (1, 9), (1, 64), (1, 65)], [(1, 255), (1, 257), (1, 500), (1, 512)]])
def test_attention_decode_cluster_takes_the_step_key_after_the_wait(kernels, monkeypatch, seqs):
    """The cluster kernel copies the keys of earlier steps before its PDL wait and the step's own key (position
    ctx - 1, which the kernel before it stores) after: captured after rope_store_kv with a programmatic edge and
    replayed with NaN in the new keys' slots before every replay, it matches NumPy on the stored keys every time
    (the new key first, last, alone, or at a block's end)."""
    from cuda.bindings import driver as cu

    from mpillm.cuda.graphs import link_programmatic
    from mpillm.cuda.kernels import AttentionScratch
    from mpillm.cuda.runtime import check_cu
    n_heads, n_kv, head_dim, block_size, dtype = 32, 8, 128, 16, "bf16"
    _cluster_mode(kernels, monkeypatch, True, n_heads // n_kv, 512)
    rng = np.random.default_rng(5)
    host, d = _paged_batch(rng, dtype, seqs, n_heads, n_kv, head_dim, block_size)
    ctx = host["context_lens"]
    new_slots = (host["tables"][np.arange(len(seqs)), (ctx - 1) // block_size] * block_size
                 + (ctx - 1) % block_size).astype(np.int32)
    positions, slots = dev(ctx - 1, "i32"), dev(new_slots, "i32")
    inv_freq = dev(ops.rope_inv_freq(head_dim, 10000.0), "f32")
    poisoned = {}
    for name in ("k_cache", "v_cache"):
        c = host[name].reshape(-1, n_kv, head_dim).copy()
        c[new_slots] = np.nan
        poisoned[name] = c.reshape(host[name].shape)
    out = DeviceTensor.empty((len(seqs), n_heads, head_dim), dtype)
    scratch = AttentionScratch(len(seqs), n_heads, head_dim, 512)

    def step():
        kernels.rope_store_kv(d["qkv"], positions, inv_freq, d["k_cache"], d["v_cache"], slots, n_heads, n_kv,
                              head_dim)
        kernels.attention(out, d["qkv"], d["k_cache"], d["v_cache"], d["block_tables"], d["query_start"],
                          d["context_lens"], n_heads, n_kv, head_dim, head_dim ** -0.5, max_query_len=1,
                          max_context_len=512, scratch=scratch)

    def reset():
        d["qkv"].copy_from_numpy(host["qkv"])
        d["k_cache"].copy_from_numpy(poisoned["k_cache"])
        d["v_cache"].copy_from_numpy(poisoned["v_cache"])
        kernels.stream.synchronize()

    reset()
    kernels.rope_store_kv(d["qkv"], positions, inv_freq, d["k_cache"], d["v_cache"], slots, n_heads, n_kv, head_dim)
    kernels.stream.synchronize()
    stored = dict(host, qkv=d["qkv"].to_numpy(), k_cache=d["k_cache"].to_numpy(), v_cache=d["v_cache"].to_numpy())
    assert not np.isnan(stored["k_cache"]).any() and not np.isnan(stored["v_cache"]).any()
    want = _attention_reference(stored, seqs, n_heads, n_kv, head_dim, block_size)
    reset()
    stream = cu.CUstream(kernels.stream.handle)
    check_cu(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "capture")
    step()
    graph = check_cu(cu.cuStreamEndCapture(stream), "end capture")
    assert link_programmatic(graph, kernels.owns) == 1
    exe = check_cu(cu.cuGraphInstantiate(graph, 0), "instantiate")
    try:
        for i in range(4):
            reset()
            check_cu(cu.cuGraphLaunch(exe, stream), "launch")
            kernels.stream.synchronize()
            assert_close(out.to_numpy(), want, dtype, f"replay {i}")
    finally:
        cu.cuGraphExecDestroy(exe)
        cu.cuGraphDestroy(graph)


def test_attention_rejects_inconsistent_head_mapping(kernels):
    rng = np.random.default_rng(0)
    _, d = _paged_batch(rng, "bf16", [(1, 60)], 4, 2, 64, 16)
    out = DeviceTensor.empty((1, 4, 64), "bf16")
    with pytest.raises(ValueError, match="^group/head_offset"):
        kernels.attention(out, d["qkv"], d["k_cache"], d["v_cache"], d["block_tables"], d["query_start"],
                          d["context_lens"], 4, 2, 64, 0.125, max_query_len=1, max_context_len=60, group=4,
                          head_offset=0)


def test_attention_decode_needs_scratch(kernels):
    rng = np.random.default_rng(0)
    _, d = _paged_batch(rng, "bf16", [(1, 600)], 4, 4, 64, 16)
    out = DeviceTensor.empty((1, 4, 64), "bf16")
    with pytest.raises(ValueError, match="^scratch"):
        kernels.attention(out, d["qkv"], d["k_cache"], d["v_cache"], d["block_tables"], d["query_start"],
                          d["context_lens"], 4, 4, 64, 0.125, max_query_len=1, max_context_len=600)


# ---------------------------------------------------------------------------------------------------
# sampling


def _sampling_reference(logits, temperature, top_k, top_p, min_p):
    """Filtered, renormalised probabilities with the kernel's semantics (top-k, then top-p over the
    top-k survivors, then min-p relative to the max), z computed in float32 as the kernel does."""
    z = logits.astype(np.float32) * (np.float32(1.0) / np.float32(temperature))
    keep = np.ones(z.shape, bool)
    order = np.argsort(-z, kind="stable")
    if 0 < top_k < len(z):
        keep &= z >= z[order[top_k - 1]]
    p = np.exp(z.astype(np.float64) - z.max()) * keep
    if top_p < 1.0:
        mass = p[order] / p.sum()
        before = np.cumsum(mass) - mass
        keep_sorted = before < top_p
        keep[order[~keep_sorted]] = False
        margin = np.min(np.abs(before[mass > 0] - top_p))
        assert margin > 1e-4, "test logits put an element on the top-p boundary"
    if min_p > 0:
        thr = z.max() + np.log(min_p)
        assert np.min(np.abs(z - thr)) > 1e-4, "test logits put an element on the min-p boundary"
        keep &= z >= thr
    p = np.exp(z.astype(np.float64) - z.max()) * keep
    return p / p.sum()


def _sample(kernels, logits, temperature, top_k, top_p, min_p, seeds, steps, **kw):
    from mpillm.cuda.kernels import seed_words

    b = logits.shape[0]
    out = DeviceTensor.empty((b,), "i32")
    kernels.sample(out, dev(logits, "f32"), dev(temperature, "f32"), dev(top_k, "i32"), dev(top_p, "f32"),
                   dev(min_p, "f32"), dev(seed_words(seeds), "i32"), dev(steps, "i32"), **kw)
    return out.to_numpy()


def _filled(b, value, dtype):
    return np.full(b, value, dtype=dtype)


@pytest.mark.parametrize("slot", [0, 1])
def test_sample_writes_ids_to_mapped_host_memory(kernels, slot):
    """host_ids: the sampler also writes each row's id into mapped pinned host memory, at row slot * stride, for
    greedy and sampled rows; the other slot is left alone."""
    import pycuda.driver as cuda
    rng = np.random.default_rng(slot)
    b, vocab, stride = 6, 5000, 8
    logits = rng.normal(size=(b, vocab)).astype(np.float32) * 3
    mapped = cuda.pagelocked_empty(2 * stride, np.int32, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
    mapped[:] = -7
    temperature = np.array([0.0, 1.0, 0.7, 0.0, 1.3, 1.0], np.float32)
    got = _sample(kernels, logits, temperature, _filled(b, 0, np.int32), _filled(b, 1.0, np.float32),
                  _filled(b, 0.0, np.float32), list(range(b)), _filled(b, 3, np.int32),
                  host_ids=int(mapped.base.get_device_pointer()), host_slot=dev(np.array([slot], np.int32), "i32"),
                  host_stride=stride)
    cuda.Context.synchronize()
    np.testing.assert_array_equal(mapped[slot * stride: slot * stride + b], got)
    assert (mapped[(1 - slot) * stride: (2 - slot) * stride] == -7).all() and (mapped[slot * stride + b:][:2] == -7).all()
    assert got[0] == np.argmax(logits[0]) and got[3] == np.argmax(logits[3])


@pytest.mark.parametrize("vocab", [32003, 151936, 7])
def test_argmax(kernels, vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(9, vocab)).astype(np.float32)
    logits[2, [5 % vocab, 6 % vocab]] = 50.0  # a tie resolves to the first index, as numpy does
    logits[3] = -np.inf
    out = DeviceTensor.empty((9,), "i32")
    kernels.argmax(out, dev(logits, "f32"))
    np.testing.assert_array_equal(out.to_numpy(), np.argmax(logits, axis=1))


def test_sample_greedy_rows(kernels):
    rng = np.random.default_rng(5)
    b, vocab = 12, 50000
    logits = rng.normal(size=(b, vocab)).astype(np.float32) * 3
    temperature = np.where(np.arange(b) % 2 == 0, 0.0, 0.8).astype(np.float32)
    top_k = np.where(np.arange(b) % 2 == 1, 1, 0).astype(np.int32)  # odd rows: top_k = 1
    ids = _sample(kernels, logits, temperature, top_k, _filled(b, 0.9, np.float32), _filled(b, 0.0, np.float32),
                  rng.integers(0, 2**63, size=b, dtype=np.uint64), np.arange(b, dtype=np.int32))
    np.testing.assert_array_equal(ids, np.argmax(logits, axis=1))


SAMPLING_CASES = [  # temperature, top_k, top_p, min_p
    (0.7, 0, 1.0, 0.0),
    (1.0, 10, 1.0, 0.0),
    (1.3, 0, 0.8, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.9, 20, 0.9, 0.02),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SAMPLING_CASES)
def test_sample_distribution(kernels, temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(11)
    vocab, draws = 64, 32768
    row = (rng.normal(size=vocab) * 2).astype(np.float32)
    want = _sampling_reference(row, temperature, top_k, top_p, min_p)
    # One request, many steps: every row shares logits and seed, differs in step.
    ids = _sample(kernels, np.tile(row, (draws, 1)), _filled(draws, temperature, np.float32),
                  _filled(draws, top_k, np.int32), _filled(draws, top_p, np.float32),
                  _filled(draws, min_p, np.float32), np.full(draws, 1234567890123, np.uint64),
                  np.arange(draws, dtype=np.int32))
    counts = np.bincount(ids, minlength=vocab)
    assert counts[want == 0].sum() == 0, f"filtered tokens drawn: {np.nonzero(counts * (want == 0))[0]}"
    expected = want * draws
    # Chi-square over bins expecting >= 5 draws, the rarer tokens pooled into one bin.
    big = expected >= 5
    obs = np.append(counts[big], counts[~big & (want > 0)].sum())
    exp = np.append(expected[big], expected[~big & (want > 0)].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = np.sum((obs - exp) ** 2 / exp)
    dof = len(exp) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, f"chi2 {chi2:.1f} with {dof} dof"


@pytest.mark.parametrize("vocab", [50000, 30001, 128256])
def test_sample_shared_memory_route_matches_full_route(kernels, vocab):
    """The fast route (kept set compacted into shared memory) and the full-vocabulary route choose the
    same thresholds and the same per-token noise, hence the same ids; rows cover peaked LLM-like logits,
    flat ones (too many near the max: the fast route must decline) and every filter combination."""
    rng = np.random.default_rng(vocab)
    b = 48
    logits = rng.normal(size=(b, vocab)).astype(np.float32) * 2
    logits[::3, rng.integers(0, vocab, 20)] += 12.0  # peaked rows
    logits[1::6] = rng.normal(size=(len(logits[1::6]), vocab)) * 0.01  # nearly flat rows
    temperature = rng.uniform(0.3, 1.5, b).astype(np.float32)
    top_k = rng.choice([0, 1, 7, 50, 3000, 9000], b).astype(np.int32)
    top_p = rng.choice([1.0, 0.95, 0.6, 0.1], b).astype(np.float32)
    min_p = rng.choice([0.0, 0.05, 0.3, 1e-6], b).astype(np.float32)
    seeds = rng.integers(0, 2**63, size=b, dtype=np.uint64)
    steps = rng.integers(0, 1 << 20, size=b).astype(np.int32)
    args = (logits, temperature, top_k, top_p, min_p, seeds, steps)
    fast = _sample(kernels, *args)
    full = _sample(kernels, *args, candidate_cap=0)
    np.testing.assert_array_equal(fast, full)
    # Every drawn token survives its row's filters (checked on the host with the same semantics, with a
    # little slack at the boundaries for float rounding).
    for r in range(b):
        if top_k[r] == 1:
            assert fast[r] == np.argmax(logits[r])
            continue
        z = logits[r] * (np.float32(1.0) / temperature[r])
        order = np.argsort(-z, kind="stable")
        keep = np.ones(vocab, bool)
        if 0 < top_k[r] < vocab:
            keep &= z >= z[order[top_k[r] - 1]]
        if top_p[r] < 1:
            mass = np.exp(z[order].astype(np.float64) - z.max()) * keep[order]
            before = (np.cumsum(mass) - mass) / mass.sum()
            keep[order[before >= top_p[r] + 1e-6]] = False
        if min_p[r] > 0:
            keep &= z >= z.max() + np.log(min_p[r]) - 1e-4
        assert keep[fast[r]], f"row {r}: token {fast[r]} is filtered out"


def test_sample_depends_only_on_seed_and_step(kernels):
    rng = np.random.default_rng(21)
    b, vocab = 40, 3000
    logits = rng.normal(size=(b, vocab)).astype(np.float32) * 2
    temperature = rng.uniform(0.5, 1.5, b).astype(np.float32)
    top_k = rng.choice([0, 5, 50], b).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5], b).astype(np.float32)
    min_p = rng.choice([0.0, 0.01], b).astype(np.float32)
    seeds = rng.integers(0, 2**63, size=b, dtype=np.uint64)
    steps = rng.integers(0, 1000, size=b).astype(np.int32)
    args = (logits, temperature, top_k, top_p, min_p, seeds, steps)
    ids = _sample(kernels, *args)
    np.testing.assert_array_equal(_sample(kernels, *args), ids)  # deterministic
    perm = rng.permutation(b)
    ids_perm = _sample(kernels, *(a[perm] for a in args))
    np.testing.assert_array_equal(ids_perm, ids[perm])
    # Inside a larger batch of unrelated requests.
    extra = _sample(kernels, *(np.concatenate([a, a[::-1]]) for a in args))
    np.testing.assert_array_equal(extra[:b], ids)
    # A different step changes draws (most rows are not greedy-like).
    moved = _sample(kernels, logits, temperature, top_k, top_p, min_p, seeds, steps + 1)
    assert (moved != ids).any()


# ---------------------------------------------------------------------------------------------------
# allocation-free launchers and CUDA-graph capture


def _decode_step_fixture(kernels, dtype="bf16"):
    """Buffers for one decode step of a small model: norm -> qkv proj -> rope/kv -> attention -> logits ->
    sample. Returns a function that enqueues the step and the tensors it writes."""
    from mpillm.cuda.kernels import AttentionScratch, seed_words

    rng = np.random.default_rng(8)
    b, hidden, nh, nkv, hd, vocab, bs = 4, 512, 8, 2, 64, 1000, 16
    seqs = [(1, 700), (1, 33), (1, 1500), (1, 2)]
    host, d = _paged_batch(rng, dtype, seqs, nh, nkv, hd, bs)
    x = dev(rounded(rng.normal(size=(b, hidden)), dtype), dtype)
    norm_w = dev(rounded(rng.normal(1, 0.1, hidden), dtype), dtype)
    w_qkv = dev(rounded(rng.normal(size=((nh + 2 * nkv) * hd, hidden)) / 20, dtype), dtype)
    w_out = dev(rounded(rng.normal(size=(vocab, nh * hd)) / 20, dtype), dtype)
    inv_freq = dev(ops.rope_inv_freq(hd, 10000.0), "f32")
    positions = dev(host["context_lens"] - 1, "i32")
    tables, ctx = host["tables"], host["context_lens"]
    slots = dev(tables[np.arange(b), (ctx - 1) // bs] * bs + (ctx - 1) % bs, "i32")
    normed = DeviceTensor.empty((b, hidden), dtype)
    attn = DeviceTensor.empty((b, nh, hd), dtype)
    logits = DeviceTensor.empty((b, vocab), "f32")
    ids = DeviceTensor.empty((b,), "i32")
    greedy = DeviceTensor.empty((b,), "i32")
    scratch = AttentionScratch(b, nh, hd, 2048)
    temp = dev(np.full(b, 0.8, np.float32), "f32")
    top_k = dev(np.full(b, 40, np.int32), "i32")
    top_p = dev(np.full(b, 0.95, np.float32), "f32")
    min_p = dev(np.full(b, 0.01, np.float32), "f32")
    seeds = dev(seed_words(np.arange(b, dtype=np.uint64) + 99), "i32")
    steps = dev(np.arange(b, dtype=np.int32), "i32")
    gate_up = DeviceTensor.zeros((b, 2 * 256), dtype)
    act = DeviceTensor.empty((b, 256), dtype)
    residual = dev(rounded(rng.normal(size=(b, hidden)), dtype), dtype)
    table = dev(rounded(rng.normal(size=(vocab, hidden)), dtype), dtype)
    tok = dev(np.arange(b, dtype=np.int32) * 7, "i32")
    emb = DeviceTensor.empty((b, hidden), dtype)

    def step():
        kernels.embedding(emb, tok, table, 0)
        kernels.add_rms_norm(normed, emb, residual, norm_w, 1e-5)
        kernels.rms_norm(normed, x, norm_w, 1e-5)
        kernels.linear(d["qkv"], normed, w_qkv)
        kernels.rope_store_kv(d["qkv"], positions, inv_freq, d["k_cache"], d["v_cache"], slots, nh, nkv, hd)
        kernels.attention(attn, d["qkv"], d["k_cache"], d["v_cache"], d["block_tables"], d["query_start"],
                          d["context_lens"], nh, nkv, hd, 0.125, max_query_len=1, max_context_len=2048,
                          scratch=scratch)
        kernels.silu_mul(act, gate_up)
        kernels.linear(logits, attn.reshape((b, nh * hd)), w_out)
        kernels.argmax(greedy, logits)
        kernels.sample(ids, logits, temp, top_k, top_p, min_p, seeds, steps)

    return step, (normed, attn, logits, ids, greedy)


def test_launchers_allocate_nothing(kernels, cuda_device):
    step, _ = _decode_step_fixture(kernels)
    step()  # first use looks kernels up (no device memory involved either way)
    cuda_device.synchronize()
    before = allocation_count()
    for _ in range(3):
        step()
    cuda_device.synchronize()
    assert allocation_count() == before


def test_decode_step_captures_into_cuda_graph(kernels, cuda_device):
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        pytest.skip("cuda-bindings not installed")
    import pycuda.driver as pycuda_driver

    def ok(result, what):
        err = result[0]
        assert err == cu.CUresult.CUDA_SUCCESS, f"{what}: {err}"
        return result[1] if len(result) > 1 else None

    step, outputs = _decode_step_fixture(kernels)
    step()
    cuda_device.synchronize()
    eager = [t.to_numpy() for t in outputs]
    for t in outputs:
        pycuda_driver.memset_d8(t.ptr, 0, t.nbytes)

    stream = cu.CUstream(cuda_device.stream.handle)
    ok(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL), "begin capture")
    step()
    graph = ok(cu.cuStreamEndCapture(stream), "end capture")
    exe = ok(cu.cuGraphInstantiate(graph, 0), "instantiate")
    for _ in range(2):
        ok(cu.cuGraphLaunch(exe, stream), "graph launch")
    cuda_device.synchronize()
    for got, want in zip((t.to_numpy() for t in outputs), eager):
        np.testing.assert_array_equal(got, want)
    ok(cu.cuGraphExecDestroy(exe), "destroy exec")
    ok(cu.cuGraphDestroy(graph), "destroy graph")


# ---------------------------------------------------------------------------------------------------
# micro-benchmarks (python tests/gpu/test_kernels.py)


_BANDWIDTH_PROBE = r"""
extern "C" __global__ void read_probe(const uint4* __restrict__ src, size_t n, unsigned* out) {
    unsigned acc = 0;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = __ldg(src + i), b = __ldg(src + i + stride), c = __ldg(src + i + 2 * stride), d = __ldg(src + i + 3 * stride);
        acc ^= a.x ^ a.w ^ b.y ^ b.z ^ c.x ^ c.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) acc ^= src[i].x;
    if (acc == 0x12345678u) out[0] = acc;
}
"""

# (name, "WARPS, UNROLL, L2_PREFETCH, PIPELINE") of GEMV shapes timed against the production ones
_GEMV_VARIANTS = [("w8u2", "8, 2, true, false"), ("w16u1p", "16, 1, true, true"), ("w8u2p_nol2", "8, 2, false, true")]
# (name, BM, BN, BK, WM, WN, STAGES, MIN_BLOCKS)
_GEMM_VARIANTS = [("L_k32s4", 128, 128, 32, 2, 4, 4, 2), ("W_k64s3", 128, 256, 64, 2, 4, 3, 1)]


def bench() -> None:
    import tempfile
    import time

    import pycuda.driver as cuda
    from pycuda.compiler import SourceModule

    from mpillm.cuda.kernels import CUDA_SRC, NVCC_OPTIONS, AttentionScratch, Kernels, seed_words
    from mpillm.cuda.runtime import init_device

    device = init_device(0)
    with tempfile.TemporaryDirectory() as cache:
        cold = Kernels(device, cache_dir=cache)
        k = Kernels(device, cache_dir=cache)
    print(f"device {device.name}, {device.sm_count} SMs; compile cold {cold.compile_seconds:.2f} s, "
          f"warm {k.compile_seconds:.2f} s")
    stream = device.stream

    def timed(fn, iters=100):
        fn()
        start, end = cuda.Event(), cuda.Event()
        start.record(stream)
        for _ in range(iters):
            fn()
        end.record(stream)
        end.synchronize()
        return end.time_since(start) / iters * 1e-3  # seconds per call

    def module(src):
        return SourceModule(src, no_extern_c=True, options=list(NVCC_OPTIONS), include_dirs=[str(CUDA_SRC)],
                            arch=device.arch)

    rng = np.random.default_rng(0)
    probe = module(_BANDWIDTH_PROBE).get_function("read_probe")
    probe.prepare("PQP")
    big = DeviceTensor.zeros((1 << 30,), "u8")
    sink = DeviceTensor.zeros((4,), "i32")
    t = timed(lambda: probe.prepared_async_call((device.sm_count * 8, 1), (512, 1, 1), stream, big.ptr,
                                                big.nbytes // 16, sink.ptr), iters=20)
    roof = big.nbytes / t / 1e9
    print(f"read bandwidth probe (1 GiB, 16-byte loads): {roof:.0f} GB/s")

    gemv_src = (CUDA_SRC / "gemv.cu").read_text() + "".join(
        f'extern "C" __global__ void __launch_bounds__({args.split(",")[0].strip()} * 32) gemv_var_{name}_m{nt}('
        f"bf16* y, const bf16* x, const bf16* w, const bf16* b, int M, int N, int K) "
        f"{{ small_m_linear<bf16, bf16, {nt}, {args}>(y, x, w, b, M, N, K); }}\n"
        for name, args in _GEMV_VARIANTS for nt in (1, 2, 4))
    gemv_mod = module(gemv_src)
    l2_bytes = 64 << 20
    for n, kdim in ((14336, 4096), (4096, 4096), (4096, 14336)):
        # Rotate over enough weight copies that no call finds its weights in L2 (as in a real model,
        # where every layer reads different weights).
        copies = max(2, -(-3 * l2_bytes // (n * kdim * 2)))
        ws = [dev(rng.normal(size=(n, kdim)).astype(np.float32) * 0.02, "bf16") for _ in range(copies)]
        turn = [0]

        def next_w():
            turn[0] += 1
            return ws[turn[0] % copies]

        for m in (1, 8, 16, 32):
            x = dev(rng.normal(size=(m, kdim)).astype(np.float32), "bf16")
            y = DeviceTensor.empty((m, n), "bf16")
            nbytes = (n * kdim + m * kdim + m * n) * 2
            k.linear(y, x, ws[0], path="gemv")
            want = y.to_numpy()
            for path in (("gemv", "gemm") if m >= 16 else ("gemv",)):
                t = timed(lambda: k.linear(y, x, next_w(), path=path))
                print(f"linear {path:4s} bf16 M={m:3d} N={n:5d} K={kdim:5d}: {t * 1e6:8.1f} us  "
                      f"{nbytes / t / 1e9:6.0f} GB/s ({nbytes / t / 1e9 / roof:4.0%} of probe)")
            nt = 1 if m <= 8 else 2 if m <= 16 else 4
            for name, args in _GEMV_VARIANTS:
                fn = gemv_mod.get_function(f"gemv_var_{name}_m{nt}")
                fn.prepare("PPPPiii")
                threads = int(args.split(",")[0]) * 32
                launch = lambda: fn.prepared_async_call(((n + 15) // 16, 1), (threads, 1, 1), stream, y.ptr,  # noqa: E731
                                                        x.ptr, next_w().ptr, 0, m, n, kdim)
                t = timed(launch)
                fn.prepared_async_call(((n + 15) // 16, 1), (threads, 1, 1), stream, y.ptr, x.ptr, ws[0].ptr, 0, m,
                                       n, kdim)
                err = np.abs(y.to_numpy() - want).max()
                print(f"    variant {name:10s} M={m:3d} N={n:5d} K={kdim:5d}: {t * 1e6:8.1f} us  "
                      f"{nbytes / t / 1e9:6.0f} GB/s ({nbytes / t / 1e9 / roof:4.0%})  max|diff| {err:.3g}")
        del ws

    gemm_src = (CUDA_SRC / "gemm.cu").read_text() + "".join(
        f"GEMM_KERNEL(bf16, bf16, bf16_bf16, {v[0]}, {', '.join(map(str, v[1:]))})\n" for v in _GEMM_VARIANTS)
    gemm_mod = module(gemm_src)
    for m, n, kdim in ((4096, 4096, 4096), (8192, 8192, 8192), (512, 14336, 4096), (2048, 4096, 14336),
                       (128, 14336, 4096), (256, 4096, 4096), (64, 4096, 4096)):
        x = dev(rng.normal(size=(m, kdim)).astype(np.float32), "bf16")
        w = dev(rng.normal(size=(n, kdim)).astype(np.float32) * 0.02, "bf16")
        y = DeviceTensor.empty((m, n), "bf16")
        t = timed(lambda: k.linear(y, x, w, path="gemm"), iters=10)
        want = y.to_numpy()
        print(f"linear gemm bf16 M={m} N={n} K={kdim} ({k._gemm_config(m, n)}): {t * 1e3:.3f} ms  "
              f"{2 * m * n * kdim / t / 1e12:.0f} TFLOP/s")
        for name, bm, bn, bk, wm, wn, stages, _ in _GEMM_VARIANTS:
            fn = gemm_mod.get_function(f"gemm_bf16_bf16_{name}")
            fn.prepare("PPPPiii")
            smem = stages * (bm + bn) * (bk + 8) * 2
            if smem > 48 * 1024:
                fn.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            grid = (-(-m // bm) * -(-n // bn), 1)
            launch = lambda: fn.prepared_async_call(grid, (wm * wn * 32, 1, 1), stream, y.ptr, x.ptr, w.ptr, 0,  # noqa: E731
                                                    m, n, kdim, shared_size=smem)
            t = timed(launch, iters=10)
            err = np.abs(y.to_numpy() - want).max()
            print(f"    variant {name}: {t * 1e3:.3f} ms  {2 * m * n * kdim / t / 1e12:.0f} TFLOP/s  max|diff| {err:.3g}")

    # Decode attention: 32 sequences x 4096 keys, Llama-3-8B heads.
    nh, nkv, hd, bs = 32, 8, 128, 16
    for b, ctx in ((32, 4096), (8, 16384), (128, 1024)):
        nblocks = b * ctx // bs
        kc = DeviceTensor.zeros((nblocks, bs, nkv, hd), "bf16")
        vc = DeviceTensor.zeros((nblocks, bs, nkv, hd), "bf16")
        tables = dev(rng.permutation(nblocks).reshape(b, ctx // bs).astype(np.int32), "i32")
        qkv = dev(rng.normal(size=(b, (nh + 2 * nkv) * hd)).astype(np.float32), "bf16")
        out = DeviceTensor.empty((b, nh, hd), "bf16")
        qs = dev(np.arange(b + 1, dtype=np.int32), "i32")
        cl = dev(np.full(b, ctx, np.int32), "i32")
        scratch = AttentionScratch(b, nh, hd, ctx)
        t = timed(lambda: k.attention(out, qkv, kc, vc, tables, qs, cl, nh, nkv, hd, hd ** -0.5, 1, ctx, scratch))
        print(f"attention decode B={b} ctx={ctx} GQA {nh}/{nkv}: {t * 1e6:.1f} us  "
              f"{2 * kc.nbytes / t / 1e9:.0f} GB/s ({2 * kc.nbytes / t / 1e9 / roof:.0%} of probe)")
        del kc, vc, scratch

    # Prefill attention: one 4096-token sequence.
    s = 4096
    qkv = dev(rng.normal(size=(s, (nh + 2 * nkv) * hd)).astype(np.float32), "bf16")
    out = DeviceTensor.empty((s, nh, hd), "bf16")
    kc = DeviceTensor.zeros((s // bs, bs, nkv, hd), "bf16")
    vc = DeviceTensor.zeros((s // bs, bs, nkv, hd), "bf16")
    tables = dev(np.arange(s // bs, dtype=np.int32)[None], "i32")
    qs = dev(np.array([0, s], np.int32), "i32")
    cl = dev(np.array([s], np.int32), "i32")
    t = timed(lambda: k.attention(out, qkv, kc, vc, tables, qs, cl, nh, nkv, hd, hd ** -0.5, s, s), iters=10)
    flops = 4 * s * s * hd * nh / 2
    print(f"attention prefill S={s} heads {nh}/{nkv} hd {hd}: {t * 1e3:.2f} ms  {flops / t / 1e12:.0f} TFLOP/s")

    # Sampling: 64 rows of a 128K vocabulary, LLM-like logits (a few strong candidates over noise).
    b, vocab = 64, 128256
    host = rng.normal(size=(b, vocab)).astype(np.float32) * 2
    host[np.arange(b)[:, None], rng.integers(0, vocab, (b, 30))] += rng.uniform(5, 15, (b, 30))
    logits = dev(host, "f32")
    ids = DeviceTensor.empty((b,), "i32")

    def full(v, dt):
        return dev(np.full(b, v, dt), "f32" if dt == np.float32 else "i32")

    seeds = dev(seed_words(np.arange(b, dtype=np.uint64)), "i32")
    steps = full(0, np.int32)
    for label, (temp, top_k, top_p, min_p), cap in (
            ("top-k 50, top-p 0.9, min-p 0.01", (0.8, 50, 0.9, 0.01), None),
            ("top-p 0.95", (1.0, 0, 0.95, 0.0), None),
            ("temperature only", (0.7, 0, 1.0, 0.0), None),
            ("top-k 50, top-p 0.9, min-p 0.01, full route", (0.8, 50, 0.9, 0.01), 0)):
        args = (full(temp, np.float32), full(top_k, np.int32), full(top_p, np.float32), full(min_p, np.float32),
                seeds, steps)
        kw = {} if cap is None else {"candidate_cap": cap}
        t = timed(lambda: k.sample(ids, logits, *args, **kw), iters=20)
        print(f"sample B={b} V={vocab} {label}: {t * 1e6:.0f} us")
    t = timed(lambda: k.argmax(ids, logits), iters=20)
    print(f"argmax B={b} V={vocab}: {t * 1e6:.0f} us")

    # Host launch overhead of a prepared call.
    x = DeviceTensor.empty((1, 4096), "bf16")
    wn = DeviceTensor.empty((4096,), "bf16")
    stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        k.rms_norm(x, x, wn, 1e-5)
    t1 = time.perf_counter()
    stream.synchronize()
    print(f"launcher host cost (rms_norm, checks included): {(t1 - t0) / 2000 * 1e6:.1f} us/call")
    device.close()


if __name__ == "__main__":
    bench()
