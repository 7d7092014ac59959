"""Host-side logic of the CUDA backend that needs no GPU."""

import numpy as np
import pytest

from mpillm.batch import StepInput
from mpillm.cuda.kernels import decode_split_settings
from mpillm.cuda.model import _attention_groups, kv_cache_over_asked, kv_cache_shortfall
from mpillm.cuda.runtime import bf16_to_f32, f32_to_bf16


def test_attention_groups_split_decodes_from_prefills():
    rows = [([1], 5, [0], True), ([1], 9, [1], True), ([1, 2, 3], 0, [2], True), ([4], 3, [3], True),
            ([5, 6], 16, [4, 5], False), ([7, 8, 9, 10], 0, [6], True)]
    step = StepInput.build(rows, 16)
    assert _attention_groups(step) == [(0, 2, 1, 10), (2, 3, 3, 3), (3, 4, 1, 4), (4, 6, 4, 18)]
    decode_only = StepInput.build([([1], 5, [0], True), ([2], 7, [1], True)], 16)
    assert _attention_groups(decode_only) == [(0, 2, 1, 8)]


def test_bf16_round_trip_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -3.5e-3, 65504.0, 1e-40], np.float32)
    y = bf16_to_f32(f32_to_bf16(x))
    assert y[0] == 1.0 and y[1] == 1.0           # halfway: ties to even (1.0)
    assert y[2] == np.float32(1.015625)          # halfway between 1.0078125 and 1.015625: even mantissa
    assert np.all(np.abs(y - x) <= np.abs(x) * 2 ** -8 + 1e-38)


class _Recorder:
    """Kernels' launchers with the GPU taken out: every launch is recorded as (kernel, grid, block, args)."""

    def __init__(self):
        from types import SimpleNamespace

        from mpillm.cuda.kernels import QGEMV_X1_Q4_1_MIN_K, Kernels
        self.k = Kernels.__new__(Kernels)
        self.k.device = SimpleNamespace(sm_count=132)
        self.k.blas = None
        self.k.qgemv_persist = True
        self.k.qgemv_rt_tiles = 2 * 132
        self.k.qgemv_rt_wide_tiles = 6 * 132
        self.k.qgemv_x1 = True
        self.k.qgemv_x1_q4_1_min_k = QGEMV_X1_Q4_1_MIN_K
        self.k.qgemv_x1_deep = True
        self.k.gemv_wide = True
        self.launches = []
        self.shared = []     # dynamic shared memory of each launch

        def launch(fn, grid, block, *args, shared=0):
            self.launches.append((fn, grid, block, args))
            self.shared.append(shared)
        self.k._fn = lambda module, name, fmt, shared=0: name
        self.k._launch = launch


def _tensor(addr, shape, dtype="bf16"):
    from mpillm.cuda.runtime import DeviceTensor
    return DeviceTensor(addr, shape, dtype)


def test_quantized_small_m_launches_tile_rows_by_32():
    """45 rows: a 32-row tile (4 token tiles) then a 13-row one (2), each pointing at its own rows of x and y;
    with SwiGLU the output rows are N / 2 wide."""
    from mpillm.cuda.kernels import QuantWeight
    n, k = 1000, 576
    w = QuantWeight("int8", n, k, 64, _tensor(0x100000, (n, 9 * 64), "u8"), _tensor(0x200000, (n, 18), "u8"))
    x = _tensor(0x300000, (45, k))
    rec = _Recorder()
    rec.k.linear(_tensor(0x400000, (45, n)), x, w)
    assert [(name, args[0], args[1], args[5]) for name, _, _, args in rec.launches] == [
        ("qgemv8_bf16_bf16_m4", 0x400000, 0x300000, 32),
        ("qgemv8_bf16_bf16_m2", 0x400000 + 32 * n * 2, 0x300000 + 32 * k * 2, 13)]
    assert all(grid == (63, 1) and block == 256 for _, grid, block, _ in rec.launches)
    rec.launches.clear()
    rec.k.linear_swiglu(_tensor(0x500000, (45, n // 2)), x, w, _tensor(0x600000, (45, n)))
    assert [(name, args[0], args[1], args[4], args[5]) for name, _, _, args in rec.launches] == [
        ("qgemv8_swiglu_bf16_bf16_m4", 0x500000, 0x300000, 0, 32),
        ("qgemv8_swiglu_bf16_bf16_m2", 0x500000 + 32 * (n // 2) * 2, 0x300000 + 32 * k * 2, 0, 13)]


def test_quantized_row_tile_kernels_where_the_tiles_allow():
    """9-32 rows of int8 or Q4_0 weights over at least 2 tiles per SM take the row-tile kernels (two 16-row tiles a
    block, 256 threads; Q4_0 over at least 6 tiles per SM 128), plain, with SwiGLU and with rope; on fewer tiles
    Q4_0 takes their one-tile twins (8 warps) and int8 keeps quant_linear; Q4_1, up to 8 rows and MPILLM_QGEMV_RT=0
    keep quant_linear."""
    from mpillm.cuda.kernels import QuantWeight, qgemv_rt_setting
    assert qgemv_rt_setting({}, 132) == 264 and qgemv_rt_setting({"MPILLM_QGEMV_RT": "0"}, 132) is None
    with pytest.raises(ValueError, match="MPILLM_QGEMV_RT"):
        qgemv_rt_setting({"MPILLM_QGEMV_RT": "yes"}, 132)
    k = 4096

    def launch(kind, rows, n, op="linear", rt=264, wide=792):
        w = QuantWeight(kind, n, k, 128 if kind == "int8" else 32, _tensor(0x100000, (n, 64 * 64), "u8"),
                        _tensor(0x200000, (n, 256), "u8"))
        rec = _Recorder()
        rec.k.qgemv_rt_tiles, rec.k.qgemv_rt_wide_tiles = rt, wide
        x = _tensor(0x300000, (rows, k))
        if op == "swiglu":
            rec.k.linear_swiglu(_tensor(0x400000, (rows, n // 2)), x, w, _tensor(0x500000, (rows, n)))
        elif op == "rope":
            rec.k.linear_rope(_tensor(0x400000, (rows, n)), x, w, None, _tensor(0x500000, (rows,), "i32"),
                              _tensor(0x600000, (64,), "f32"), _tensor(0x700000, (8, 16, 8, 128)),
                              _tensor(0x800000, (8, 16, 8, 128)), _tensor(0x900000, (rows,), "i32"), 32, 8, 128,
                              _tensor(0xA00000, (rows, n)))
        else:
            rec.k.linear(_tensor(0x400000, (rows, n)), x, w)
        return [(fn, g[0], block) for fn, g, block, _ in rec.launches]

    # Q4_0 over at least 6 tiles per SM (gate/up): the 4-warp twins
    assert launch("q4_0", 20, 28672) == [("qgemv4s_bf16_bf16_m4rw", 896, 128)]
    assert launch("q4_0", 12, 792 * 16) == [("qgemv4s_bf16_bf16_m2rw", 396, 128)]
    assert launch("q4_0", 12, 791 * 16) == [("qgemv4s_bf16_bf16_m2r", 396, 256)]
    assert launch("q4_0", 20, 6144) == [("qgemv4s_bf16_bf16_m4r", 192, 256)]
    assert launch("int8", 12, 6144) == [("qgemv8_bf16_bf16_m2r", 192, 256)]
    assert launch("int8", 32, 28672 + 16) == [("qgemv8_bf16_bf16_m4r", 897, 256)]   # an odd tile count
    assert launch("q4_0", 32, 264 * 16) == [("qgemv4s_bf16_bf16_m4r", 132, 256)]   # the threshold: 2 tiles per SM
    # below it Q4_0 takes the one-tile twins (one block a tile, 8 warps), int8 quant_linear (o and down: 256 tiles)
    assert launch("q4_0", 32, 263 * 16) == [("qgemv4s_bf16_bf16_m4r1", 263, 256)]
    assert launch("q4_0", 16, 4096, "swiglu") == [("qgemv4s_swiglu_bf16_bf16_m2r1", 256, 256)]
    assert launch("q4_0", 20, 4096, rt=None) == [("qgemv4s_bf16_bf16_m4", 256, 128)]
    assert launch("int8", 16, 4096) == [("qgemv8_bf16_bf16_m2", 256, 256)]
    assert launch("q4", 20, 28672) == [("qgemv4_bf16_bf16_m4", 1792, 128)]         # Q4_1
    assert launch("int8", 8, 28672)[0][0] == "qgemv8_bf16_bf16_m1"
    assert launch("int8", 20, 28672, rt=None) == [("qgemv8_bf16_bf16_m4", 1792, 256)]
    assert launch("q4_0", 45, 28672) == [("qgemv4s_bf16_bf16_m4rw", 896, 128), ("qgemv4s_bf16_bf16_m2rw", 896, 128)]
    assert launch("int8", 20, 28672, "swiglu") == [("qgemv8_swiglu_bf16_bf16_m4r", 896, 256)]
    assert launch("q4_0", 20, 28672, "swiglu") == [("qgemv4s_swiglu_bf16_bf16_m4rw", 896, 128)]
    assert launch("q4_0", 9, 6144, "rope") == [("qgemv4s_rope_bf16_m2r", 192, 256)]
    assert launch("q4_0", 9, 6144, "rope", rt=1, wide=1) == [("qgemv4s_rope_bf16_m2rw", 192, 128)]
    assert launch("q4_0", 32, 6144, "rope", rt=10 ** 6) == [("qgemv4s_rope_bf16_m4r1", 384, 256)]
    assert launch("q4_0", 9, 6144, "rope", rt=None)[0][0] == "qgemv4s_rope_bf16_m2"


def test_quantized_ring_kernels_loop_over_tiles_evenly():
    """The tile-looping kernels (int8 and Q4_0 up to 16 rows) get at most 2 blocks per SM, each the same number of
    16-row tiles where the count allows; the others (Q4_1, 17-32 rows) and MPILLM_QGEMV_PERSIST=0 one tile per
    block. (The row-tile kernels, which would take 9-32 rows on this many tiles, are off here.)"""
    from mpillm.cuda.kernels import QGEMV_PERSIST, QGEMV_X1_PERSIST, QuantWeight, qgemv_grid, qgemv_persist_setting
    assert qgemv_grid(6144, 132) == 192            # 384 tiles: 2 each, not 264 blocks in two waves
    assert qgemv_grid(28672, 132) == 256           # 1,792 tiles: 7 each
    assert qgemv_grid(4096, 132) == 256 and qgemv_grid(1000, 132) == 63 and qgemv_grid(16, 132) == 1
    for n in (1, 17, 4096, 6144, 28672, 128256, 10 ** 6):
        tiles, grid = -(-n // 16), qgemv_grid(n, 132)
        assert grid <= 264 or grid == tiles
        per = -(-tiles // grid)
        assert (grid - 1) * per < tiles <= grid * per     # every block but the last the same count, none empty
    assert QGEMV_PERSIST[("8", 1, "")] == 2 and QGEMV_PERSIST[("8", 1, "rope")] == 3
    assert not any((fmt == "4" or tiles == 4) for fmt, tiles, _ in QGEMV_PERSIST)
    assert ("4s", 1, "swiglu") not in QGEMV_PERSIST and ("4s", 1, "rope") not in QGEMV_PERSIST
    # the _x1 kernels all loop over tiles; int8's at the m1 shapes' counts (2 blocks per SM, rope 3), Q4_0's at 3
    # (6,144 rows: 384 blocks of one tile)
    assert all(QGEMV_X1_PERSIST["8", e] == QGEMV_PERSIST[("8", 1, e)] for e in ("", "swiglu", "rope"))
    assert all(QGEMV_X1_PERSIST[f, e] == 3 for f in ("4s", "4") for e in ("", "swiglu", "rope"))
    assert set(QGEMV_X1_PERSIST) == {(f, e) for f in ("8", "4s", "4") for e in ("", "swiglu", "rope")}
    n, k = 6144, 4096
    for kind, rows, name, grid in (("q4_0", 1, "qgemv4s_bf16_bf16_x1", 384), ("q4_0", 20, "qgemv4s_bf16_bf16_m4", 384),
                                   ("q4_0", 2, "qgemv4s_bf16_bf16_m1", 192),
                                   ("int8", 12, "qgemv8_bf16_bf16_m2", 192), ("int8", 20, "qgemv8_bf16_bf16_m4", 384),
                                   ("q4", 2, "qgemv4_bf16_bf16_m1", 384), ("q4", 1, "qgemv4_bf16_bf16_x1", 384)):
        w = QuantWeight(kind, n, k, 128 if kind == "int8" else 32, _tensor(0x100000, (n, 64 * 64), "u8"),
                        _tensor(0x200000, (n, 256), "u8"))
        for persist, want in ((True, grid), (False, 384)):
            rec = _Recorder()
            rec.k.qgemv_persist = persist
            rec.k.qgemv_rt_tiles = None
            rec.k.linear(_tensor(0x400000, (rows, n)), _tensor(0x300000, (rows, k)), w)
            assert [(fn, g) for fn, g, _, _ in rec.launches] == [(name, (want, 1))], (kind, rows, persist)
    # SwiGLU twins: int8 loops; Q4_0 at 2-8 rows runs the register stages, one tile per block, and one token the
    # _x1 kernels, which loop (MPILLM_QGEMV_PERSIST=0: one tile per block for all)
    for kind, rows, name, grid in (("int8", 1, "qgemv8_swiglu_bf16_bf16_x1", 192),
                                   ("q4_0", 1, "qgemv4s_swiglu_bf16_bf16_x1", 384),
                                   ("q4_0", 2, "qgemv4s_swiglu_bf16_bf16_m1", 384)):
        w = QuantWeight(kind, n, k, 128 if kind == "int8" else 32, _tensor(0x100000, (n, 64 * 64), "u8"),
                        _tensor(0x200000, (n, 256), "u8"))
        for persist in (True, False):
            rec = _Recorder()
            rec.k.qgemv_persist = persist
            rec.k.linear_swiglu(_tensor(0x400000, (rows, n // 2)), _tensor(0x300000, (rows, k)), w,
                                _tensor(0x500000, (rows, n)))
            assert [(fn, g) for fn, g, _, _ in rec.launches] == [(name, (grid if persist else 384, 1))]
    # the q/k/v projection with rope, int8 at M <= 8: 3 blocks per SM, so Llama-3-8B's 384 tiles are one wave
    nh, nkv, hd = 32, 8, 128
    w = QuantWeight("int8", n, k, 128, _tensor(0x100000, (n, 64 * 64), "u8"), _tensor(0x200000, (n, 64), "u8"))
    rec = _Recorder()
    rec.k.linear_rope(_tensor(0x400000, (1, n)), _tensor(0x300000, (1, k)), w, None, _tensor(0x500000, (1,), "i32"),
                      _tensor(0x600000, (hd // 2,), "f32"), _tensor(0x700000, (8, 16, nkv, hd)),
                      _tensor(0x800000, (8, 16, nkv, hd)), _tensor(0x900000, (1,), "i32"), nh, nkv, hd,
                      _tensor(0xA00000, (1, n)))
    assert [(fn, g) for fn, g, _, _ in rec.launches] == [("qgemv8_rope_bf16_x1", (qgemv_grid(n, 132, 3), 1))]
    assert qgemv_grid(n, 132, 3) == 384 and qgemv_grid(2 * n, 132, 3) == 384
    assert qgemv_persist_setting({}) is True and qgemv_persist_setting({"MPILLM_QGEMV_PERSIST": "0"}) is False
    with pytest.raises(ValueError, match="MPILLM_QGEMV_PERSIST"):
        qgemv_persist_setting({"MPILLM_QGEMV_PERSIST": "yes"})
    with pytest.raises(ValueError, match="kind"):
        QuantWeight("q5", n, k, 32, _tensor(0x100000, (n, 64 * 64), "u8"), _tensor(0x200000, (n, 256), "u8"))


def test_float_gemv_takes_the_wide_block_where_a_block_per_sm_is_all_there_is():
    """Up to 8 tokens, no more 16-row tiles than SMs and K >= 2,048: the 16-warp m1w kernels (plain, SwiGLU, rope,
    send); more tiles, more tokens, shorter K or MPILLM_GEMV_WIDE=0: the 8-warp ones. The grid is a tile per block
    either way."""
    from mpillm.cuda.kernels import gemv_takes_wide, gemv_wide_setting
    assert gemv_takes_wide(1, 1536, 4096, 132) and gemv_takes_wide(1, 2112, 2048, 132)
    assert not gemv_takes_wide(1, 2113, 4096, 132) and not gemv_takes_wide(1, 1536, 2040, 132)
    assert not gemv_takes_wide(2, 1536, 4096, 132)
    assert gemv_wide_setting({}) is True and gemv_wide_setting({"MPILLM_GEMV_WIDE": "0"}) is False
    with pytest.raises(ValueError, match="MPILLM_GEMV_WIDE"):
        gemv_wide_setting({"MPILLM_GEMV_WIDE": "2"})
    nh, nkv, hd, k = 8, 2, 128, 4096        # Llama-3-8B's q/k/v projection at TP 4: 1,536 rows, 96 tiles
    n = (nh + 2 * nkv) * hd
    for wide in (True, False):
        for rows, shape in ((1, "m1"), (8, "m1"), (9, "m2")):
            rec = _Recorder()
            rec.k.gemv_wide = wide
            w = _tensor(0x100000, (n, k))
            rec.k.linear_rope(_tensor(0x400000, (rows, n)), _tensor(0x300000, (rows, k)), w, None,
                              _tensor(0x500000, (rows,), "i32"), _tensor(0x600000, (hd // 2,), "f32"),
                              _tensor(0x700000, (8, 16, nkv, hd)), _tensor(0x800000, (8, 16, nkv, hd)),
                              _tensor(0x900000, (rows,), "i32"), nh, nkv, hd, _tensor(0xA00000, (rows, n)))
            rec.k.linear_swiglu(_tensor(0x400000, (rows, n // 2)), _tensor(0x300000, (rows, k)), w,
                                _tensor(0x500000, (rows, n)))
            rec.k.linear(_tensor(0x400000, (rows, n)), _tensor(0x300000, (rows, k)), w)
            rec.k.linear(_tensor(0x400000, (rows, n)), _tensor(0x300000, (rows, k)), w,
                         send=(_tensor(0xB00000, (1,), "u8"), 1 << 20, 0, 2))
            rec.k.linear(_tensor(0x400000, (rows, 2 * 132 * 16)), _tensor(0x300000, (rows, k)),
                         _tensor(0x100000, (2 * 132 * 16, k)))                     # 264 tiles: never wide
            rec.k.linear(_tensor(0x400000, (rows, n)), _tensor(0x300000, (rows, 1024)), _tensor(0x100000, (n, 1024)))
            s = "w" if wide and rows <= 8 else ""
            assert [(fn, g, b) for fn, g, b, _ in rec.launches] == [
                (f"gemv_rope_bf16_{shape}{s}", (96, 1), 512 if s else 256),
                (f"gemv_swiglu_bf16_bf16_{shape}{s}", (96, 1), 512 if s else 256),
                (f"gemv_bf16_bf16_{shape}{s}", (96, 1), 512 if s else 256),
                (f"gemv_send_bf16_{shape}{s}", (96, 1), 512 if s else 256),
                (f"gemv_bf16_bf16_{shape}", (264, 1), 256),
                (f"gemv_bf16_bf16_{shape}", (96, 1), 256)], (wide, rows)


def test_q4_0_tiles_store_each_tiles_super_block_as_one_run():
    """The device's Q4_0 order (gemv_quant.cu Q4_0_TILES): row r's super-block sb at byte ((r // 16) n_sb + sb)
    1024 + (r % 16) 64 of the codes and ((r // 16) n_sb + sb) 128 + (r % 8) 16 + (r % 16 // 8) 8 of the scales (rows
    r and r + 8 side by side); N padded with zero rows to whole tiles."""
    from mpillm.cuda.kernels import q4_0_tiles
    rng = np.random.default_rng(0)
    n, n_sb = 37, 3
    data = rng.integers(0, 256, (n, n_sb * 64), dtype=np.uint8)
    scales = rng.integers(0, 256, (n, n_sb * 8), dtype=np.uint8)
    codes, sc = q4_0_tiles(data, scales)
    assert codes.shape == (48, n_sb * 64) and sc.shape == (48, n_sb * 8)
    assert codes.dtype == sc.dtype == np.uint8 and codes.flags.c_contiguous and sc.flags.c_contiguous
    codes, sc = codes.reshape(-1), sc.reshape(-1)
    for r in range(48):
        for sb in range(n_sb):
            at = ((r // 16) * n_sb + sb) * 1024 + (r % 16) * 64
            want = data[r, sb * 64:(sb + 1) * 64] if r < n else np.zeros(64, np.uint8)
            np.testing.assert_array_equal(codes[at:at + 64], want, err_msg=f"row {r}, super-block {sb}")
            at = ((r // 16) * n_sb + sb) * 128 + (r % 8) * 16 + (r % 16 // 8) * 8
            want = scales[r, sb * 8:(sb + 1) * 8] if r < n else np.zeros(8, np.uint8)
            np.testing.assert_array_equal(sc[at:at + 8], want, err_msg=f"scales of row {r}, super-block {sb}")
    whole, whole_sc = q4_0_tiles(data[:32], scales[:32])      # whole tiles: no padding
    assert whole.shape == (32, n_sb * 64) and whole_sc.shape == (32, n_sb * 8)
    from mpillm.cuda.kernels import QuantWeight               # the kernels read whole tiles: padding is required
    QuantWeight("q4_0", n, 384, 32, _tensor(0x100000, (48, 192), "u8"), _tensor(0x200000, (48, 24), "u8"))
    with pytest.raises(ValueError, match="q4_0 weight of 37 rows.*37 and 37 rows"):
        QuantWeight("q4_0", n, 384, 32, _tensor(0x100000, (37, 192), "u8"), _tensor(0x200000, (37, 24), "u8"))


def test_q4_0_plain_projections_of_one_tile_a_block_take_the_deep_ring():
    """Q4_0's one-token plain projections with bf16 out over at most 2 tiles per SM (one tile a block, one wave at
    the _x1d kernel's 2 blocks per SM) take _x1d; more tiles, f32 out, SwiGLU, rope, a folded pre-norm, int8 and
    MPILLM_QGEMV_X1_DEEP=0 keep their kernels."""
    from mpillm.cuda.kernels import QuantWeight, qgemv_grid, qgemv_x1_deep, qgemv_x1_deep_setting
    assert qgemv_x1_deep("4s", "", False, "bf16", 264 * 16, 132)
    assert not qgemv_x1_deep("4s", "", False, "bf16", 264 * 16 + 1, 132)
    assert not any(qgemv_x1_deep(*a) for a in (("8", "", False, "bf16", 4096, 132),
                                               ("4s", "swiglu", False, "bf16", 4096, 132),
                                               ("4s", "rope", False, "bf16", 4096, 132),
                                               ("4s", "", True, "bf16", 4096, 132),
                                               ("4s", "", False, "f32", 4096, 132)))
    assert qgemv_x1_deep_setting({}) and not qgemv_x1_deep_setting({"MPILLM_QGEMV_X1_DEEP": "0"})
    with pytest.raises(ValueError, match="MPILLM_QGEMV_X1_DEEP"):
        qgemv_x1_deep_setting({"MPILLM_QGEMV_X1_DEEP": "yes"})

    def launch(n, k=4096, out="bf16", kind="q4_0", deep=True):
        rows = -(-n // 16) * 16           # Q4_0 data padded to whole tiles
        w = QuantWeight(kind, n, k, 32, _tensor(0x100000, (rows, k), "u8"), _tensor(0x200000, (rows, k // 16), "u8"))
        rec = _Recorder()
        rec.k.qgemv_x1_deep = deep
        rec.k.linear(_tensor(0x400000, (1, n), out), _tensor(0x300000, (1, k)), w)
        return [(fn, g) for fn, g, _, _ in rec.launches]

    assert launch(264 * 16) == [("qgemv4s_bf16_bf16_x1d", (264, 1))]          # every block one tile, one wave
    assert launch(264 * 16 - 5) == [("qgemv4s_bf16_bf16_x1d", (264, 1))]      # the last tile partly past N
    assert launch(264 * 16 + 16) == [("qgemv4s_bf16_bf16_x1", (qgemv_grid(264 * 16 + 16, 132, 3), 1))]
    assert launch(4096, deep=False) == [("qgemv4s_bf16_bf16_x1", (256, 1))]
    assert launch(4096, out="f32") == [("qgemv4s_bf16_f32_x1", (256, 1))]
    assert launch(4096, kind="int8") == [("qgemv8_bf16_bf16_x1", (256, 1))]


def test_one_token_int8_bf16_takes_the_x1_kernels():
    """One token of bf16 x with int8, Q4_0 or Q4_1 weights: the _x1 twin of the m1 kernel (same grid), with x's fp16
    copy in dynamic shared memory (whole super-blocks: int8 64 elements, 128 bytes; Q4_0 128 elements and 4 chunk
    biases stored 4 times, 320 bytes, in whole steps of 8 super-blocks, then a ring for its scales; Q4_1 also its
    4 chunk sums of x, 336 bytes, and a ring twice Q4_0's, over K >= 2,048); fp16 activations, more tokens, K past
    the shared memory and MPILLM_QGEMV_X1=0 keep the m1 kernel."""
    import re
    from mpillm.cuda.kernels import (CUDA_SRC, Q4_0_X1_SCALE_RING, Q4_1_X1_SCALE_RING, QGEMV_X1_MAX_BYTES,
                                     QuantWeight, qgemv_grid, qgemv_x1_bytes, qgemv_x1_setting)
    assert qgemv_x1_bytes(4096) == 64 * 128 and qgemv_x1_bytes(14336) == 224 * 128
    assert qgemv_x1_bytes(576) == 16 * 128 and qgemv_x1_bytes(608) == 16 * 128 and qgemv_x1_bytes(2080) == 40 * 128
    assert qgemv_x1_bytes(32768) == QGEMV_X1_MAX_BYTES < qgemv_x1_bytes(32768 + 32)
    # Q4_0: then the scale ring, for the deepest _x1 ring (the kernel traps on less): 8 warps' 128 bytes a stage
    stages = re.search(r"^#define Q4_0_X1_MAX_STAGES (\d+)", (CUDA_SRC / "gemv_quant.cu").read_text(), re.M)
    ring = int(stages[1]) * 8 * 128
    assert ring == Q4_0_X1_SCALE_RING == 5 * 8 * 128
    assert qgemv_x1_bytes(4096, "4s") == 32 * 320 + ring and qgemv_x1_bytes(608, "4s") == 8 * 320 + ring
    assert qgemv_x1_bytes(184 * 128, "4s") <= QGEMV_X1_MAX_BYTES < qgemv_x1_bytes(184 * 128 + 32, "4s")
    ring1 = int(stages[1]) * 8 * 256      # Q4_1: 16 rows' (d, m) a step
    assert ring1 == Q4_1_X1_SCALE_RING
    assert qgemv_x1_bytes(4096, "4") == 32 * 336 + ring1 and qgemv_x1_bytes(576, "4") == 8 * 336 + ring1
    assert qgemv_x1_bytes(160 * 128, "4") <= QGEMV_X1_MAX_BYTES < qgemv_x1_bytes(160 * 128 + 32, "4")

    def launch(kind, rows, k, dtype="bf16", x1=True, n=6144):
        w = QuantWeight(kind, n, k, 32, _tensor(0x100000, (n, k), "u8"), _tensor(0x200000, (n, k // 16), "u8"))
        rec = _Recorder()
        rec.k.qgemv_x1 = x1
        rec.k.linear(_tensor(0x400000, (rows, n), dtype), _tensor(0x300000, (rows, k), dtype), w)
        return [(fn, g) for fn, g, _, _ in rec.launches], rec.shared

    grid, grid_x1 = qgemv_grid(6144, 132), qgemv_grid(6144, 132, 3)
    assert launch("int8", 1, 4096) == ([("qgemv8_bf16_bf16_x1", (grid, 1))], [8192])
    assert launch("int8", 1, 4096, x1=False) == ([("qgemv8_bf16_bf16_m1", (grid, 1))], [0])
    assert launch("int8", 1, 4096, dtype="f16") == ([("qgemv8_f16_f16_m1", (grid, 1))], [0])
    assert launch("int8", 2, 4096)[0] == [("qgemv8_bf16_bf16_m1", (grid, 1))]
    assert launch("q4_0", 1, 4096) == ([("qgemv4s_bf16_bf16_x1", (grid_x1, 1))], [32 * 320 + ring])
    assert launch("q4_0", 1, 4096, x1=False) == ([("qgemv4s_bf16_bf16_m1", (grid, 1))], [0])
    assert launch("q4_0", 1, 184 * 128 + 32)[0] == [("qgemv4s_bf16_bf16_m1", (grid, 1))]
    # 4,096 rows, 256 tiles: one per block, also _x1; Q4_0 takes its deep-ring twin there (qgemv_x1_deep)
    assert launch("q4_0", 1, 4096, n=4096) == ([("qgemv4s_bf16_bf16_x1d", (256, 1))], [32 * 320 + ring])
    assert launch("q4_0", 1, 14336, n=4096) == ([("qgemv4s_bf16_bf16_x1d", (256, 1))], [112 * 320 + ring])
    assert launch("int8", 1, 4096, n=4096)[0] == [("qgemv8_bf16_bf16_x1", (256, 1))]
    assert launch("q4", 1, 4096) == ([("qgemv4_bf16_bf16_x1", (grid_x1, 1))], [32 * 336 + ring1])  # Q4_1
    assert launch("q4", 1, 4096, n=4096)[0] == [("qgemv4_bf16_bf16_x1", (qgemv_grid(4096, 132, 3), 1))]  # no x1d
    assert launch("q4", 1, 4096, x1=False)[0] == [("qgemv4_bf16_bf16_m1", (384, 1))]  # m1: one tile per block
    assert launch("q4", 1, 160 * 128 + 32)[0] == [("qgemv4_bf16_bf16_m1", (384, 1))]       # K past shared memory
    # Q4_1 below QGEMV_X1_Q4_1_MIN_K (SmolLM2's 576 and 1,536): m1, where the _x1 kernels lost; a lower bound (the
    # GPU tests' knob) lets them take the _x1 kernel
    from mpillm.cuda.kernels import QGEMV_X1_Q4_1_MIN_K
    assert QGEMV_X1_Q4_1_MIN_K == 2048
    assert launch("q4", 1, 2048)[0] == [("qgemv4_bf16_bf16_x1", (grid_x1, 1))]
    assert launch("q4", 1, 1536)[0] == [("qgemv4_bf16_bf16_m1", (384, 1))]
    assert launch("q4_0", 1, 576)[0] == [("qgemv4s_bf16_bf16_x1", (grid_x1, 1))]   # Q4_0 and int8: every K
    rec1 = _Recorder()
    w1 = QuantWeight("q4", 1152, 576, 32, _tensor(0x100000, (1152, 288), "u8"), _tensor(0x200000, (1152, 72), "u8"))
    assert not rec1.k._takes_x1(w1, "bf16", 1) and not rec1.k.prenorm_fusable(w1, "bf16", 1, 576)
    assert rec1.k.starts_dependents_late(w1, "bf16", 1)
    rec1.k.qgemv_x1_q4_1_min_k = 0
    assert rec1.k._takes_x1(w1, "bf16", 1) and rec1.k.prenorm_fusable(w1, "bf16", 1, 576)
    assert not rec1.k.starts_dependents_late(w1, "bf16", 1)
    assert launch("int8", 1, 32768 + 64) == ([("qgemv8_bf16_bf16_m1", (grid, 1))], [0])
    # 33 rows: a 32-row tile, then one row on its own, which takes the _x1 kernel
    names, shared = launch("int8", 33, 576)
    assert [fn for fn, _ in names] == ["qgemv8_bf16_bf16_m4r", "qgemv8_bf16_bf16_x1"] and shared == [0, 16 * 128]
    # a pre-norm folded in: the _x1n kernel, its five arguments after the usual ones
    w = QuantWeight("int8", 6144, 4096, 128, _tensor(0x100000, (6144, 4096), "u8"), _tensor(0x200000, (6144, 64), "u8"))
    pn = (_tensor(0x610000, (1, 4096)), _tensor(0x620000, (1, 4096)), _tensor(0x630000, (1, 4096)),
          _tensor(0x640000, (4096,)), 1e-5)
    rec = _Recorder()
    assert rec.k.prenorm_fusable(w, "bf16", 1, 4096) and not rec.k.prenorm_fusable(w, "bf16", 2, 4096)
    rec.k.linear_swiglu(_tensor(0x400000, (1, 3072)), _tensor(0x300000, (1, 4096)), w, _tensor(0x500000, (1, 6144)),
                        prenorm=pn)
    (fn, _, _, args), = rec.launches
    assert fn == "qgemv8_swiglu_bf16_bf16_x1n" and args[-5:] == (0x610000, 0x620000, 0x630000, 0x640000, 1e-5)
    assert rec.shared == [8192]
    w4 = QuantWeight("q4_0", 6144, 4096, 32, _tensor(0x100000, (6144, 2048), "u8"),
                     _tensor(0x200000, (6144, 256), "u8"))
    rec4 = _Recorder()        # Q4_0: its own _x1n kernel, 3 blocks per SM as its _x1 twin
    assert rec4.k._takes_x1(w4, "bf16", 1) and rec4.k.prenorm_fusable(w4, "bf16", 1, 4096)
    rec4.k.linear_swiglu(_tensor(0x400000, (1, 3072)), _tensor(0x300000, (1, 4096)), w4,
                         _tensor(0x500000, (1, 6144)), prenorm=pn)
    (fn, grid4, _, args), = rec4.launches
    assert (fn, grid4) == ("qgemv4s_swiglu_bf16_bf16_x1n", (qgemv_grid(6144, 132, 3), 1))
    assert rec4.shared == [32 * 320 + ring] and args[-5:] == (0x610000, 0x620000, 0x630000, 0x640000, 1e-5)
    w41 = QuantWeight("q4", 6144, 4096, 32, _tensor(0x100000, (6144, 2048), "u8"), _tensor(0x200000, (6144, 512), "u8"))
    rec41 = _Recorder()       # Q4_1: its _x1n kernel too, and the kernel before it may start it early
    assert rec41.k._takes_x1(w41, "bf16", 1) and rec41.k.prenorm_fusable(w41, "bf16", 1, 4096)
    assert not rec41.k.prenorm_reads_early(w41) and not rec41.k.starts_dependents_late(w41, "bf16", 1)
    rec41.k.linear_swiglu(_tensor(0x400000, (1, 3072)), _tensor(0x300000, (1, 4096)), w41,
                          _tensor(0x500000, (1, 6144)), prenorm=pn)
    (fn, grid41, _, args), = rec41.launches
    assert (fn, grid41) == ("qgemv4_swiglu_bf16_bf16_x1n", (qgemv_grid(6144, 132, 3), 1))
    assert rec41.shared == [32 * 336 + ring1] and args[-5:] == (0x610000, 0x620000, 0x630000, 0x640000, 1e-5)
    assert not rec41.k.prenorm_fusable(w41, "bf16", 1, 4160)     # K is not the hidden size
    with pytest.raises(ValueError, match="prenorm"):
        rec41.k.linear_swiglu(_tensor(0x400000, (2, 3072)), _tensor(0x300000, (2, 4096)), w41,
                              _tensor(0x500000, (2, 6144)), prenorm=pn)
    rec.k.qgemv_x1 = False          # MPILLM_QGEMV_X1=0: nothing folds
    assert not rec.k.prenorm_fusable(w, "bf16", 1, 4096)
    with pytest.raises(ValueError, match="prenorm"):
        rec.k.linear_swiglu(_tensor(0x400000, (1, 3072)), _tensor(0x300000, (1, 4096)), w,
                            _tensor(0x500000, (1, 6144)), prenorm=pn)
    assert qgemv_x1_setting({}) is True and qgemv_x1_setting({"MPILLM_QGEMV_X1": "0"}) is False
    with pytest.raises(ValueError, match="MPILLM_QGEMV_X1"):
        qgemv_x1_setting({"MPILLM_QGEMV_X1": "on"})


def test_one_bf16_token_folds_the_pre_norm_into_the_8_warp_gemv():
    """bf16 weights, one bf16 token: linear_swiglu / linear_rope with prenorm launch the _m1n kernels (gemv.cu
    PRENORM) with x' in dynamic shared memory (whole k blocks of 64, bf16) and PreNorm's five arguments; not where the
    wide block would run (its launch keeps the norm kernel), nor fp16, two tokens or hidden past 8,192."""
    from mpillm.cuda.kernels import gemv_prenorm_bytes
    assert gemv_prenorm_bytes(4096) == 8192 and gemv_prenorm_bytes(8192) == 16384
    assert gemv_prenorm_bytes(576) == 576 * 2 and gemv_prenorm_bytes(600) == 640 * 2
    pn = (_tensor(0x610000, (1, 4096)), _tensor(0x620000, (1, 4096)), _tensor(0x630000, (1, 4096)),
          _tensor(0x640000, (4096,)), 1e-5)
    w = _tensor(0x100000, (28672, 4096))
    rec = _Recorder()
    assert rec.k.prenorm_fusable(w, "bf16", 1, 4096) and not rec.k.prenorm_fusable(w, "bf16", 2, 4096)
    assert not rec.k.prenorm_fusable(w, "f16", 1, 4096) and not rec.k.prenorm_fusable(w, "bf16", 1, 2048)
    assert not rec.k.prenorm_fusable(_tensor(0x100000, (1000, 4096), "f16"), "bf16", 1, 4096)
    assert not rec.k.prenorm_fusable(_tensor(0x100000, (1000, 16384)), "bf16", 1, 16384)
    rec.k.linear_swiglu(_tensor(0x400000, (1, 14336)), _tensor(0x300000, (1, 4096)), w, _tensor(0x500000, (1, 28672)),
                        prenorm=pn)
    wq = _tensor(0x100000, (6144, 4096))
    rec.k.linear_rope(_tensor(0x400000, (1, 6144)), _tensor(0x300000, (1, 4096)), wq, None,
                      _tensor(0x700000, (1,), "i32"), _tensor(0x710000, (64,), "f32"),
                      _tensor(0x720000, (1, 16, 8, 128)), _tensor(0x730000, (1, 16, 8, 128)),
                      _tensor(0x740000, (1,), "i32"), 32, 8, 128, _tensor(0x750000, (1, 6144)), prenorm=pn)
    (f1, g1, b1, a1), (f2, g2, b2, a2) = rec.launches
    assert (f1, g1, b1) == ("gemv_swiglu_bf16_bf16_m1n", (1792, 1), 256)
    assert (f2, g2, b2) == ("gemv_rope_bf16_m1n", (384, 1), 256)
    assert a1[-5:] == a2[-5:] == (0x610000, 0x620000, 0x630000, 0x640000, 1e-5) and rec.shared == [8192, 8192]
    # 1,000 rows (63 tiles <= 132 SMs) of K 4,096: the wide block's launch, which has no fold
    narrow = _tensor(0x100000, (1000, 4096))
    assert not rec.k.prenorm_fusable(narrow, "bf16", 1, 4096)
    with pytest.raises(ValueError, match="prenorm"):
        rec.k.linear_swiglu(_tensor(0x400000, (1, 500)), _tensor(0x300000, (1, 4096)), narrow,
                            _tensor(0x500000, (1, 1000)), prenorm=pn)
    rec.k.gemv_wide = False           # MPILLM_GEMV_WIDE=0: the 8-warp kernel there too, so it folds
    assert rec.k.prenorm_fusable(narrow, "bf16", 1, 4096)


def test_float_small_m_and_swiglu_launch_one_gemv():
    n, k = 1000, 576
    w, x = _tensor(0x100000, (n, k)), _tensor(0x300000, (9, k))
    rec = _Recorder()
    rec.k.linear(_tensor(0x400000, (9, n)), x, w)
    rec.k.linear_swiglu(_tensor(0x500000, (9, n // 2)), x, w, _tensor(0x600000, (9, n)))
    assert [(name, grid, block, args) for name, grid, block, args in rec.launches] == [
        ("gemv_bf16_bf16_m2", (63, 1), 256, (0x400000, 0x300000, 0x100000, 0, 9, n, k)),
        ("gemv_swiglu_bf16_bf16_m2", (63, 1), 256, (0x500000, 0x300000, 0x100000, 0, 9, n, k))]


def test_kv_cache_asked_beyond_free_memory_says_the_numbers():
    mib = 1 << 20
    msg = kv_cache_over_asked(0, 131600, 16, 2 * mib, 60000 * mib, 81559 * mib)
    assert msg.startswith("rank 0: the KV cache was asked for 131600 blocks of 16 tokens (263,200 MiB)")
    assert "60,000 MiB of 81,559 MiB are free" in msg and "256 MiB stay" in msg and "fewer blocks" in msg


def test_kv_cache_shortfall_says_what_it_got_and_what_helps():
    mib = 1 << 20
    budget = kv_cache_shortfall(0, 100 * mib, 3, False, 16, 2 * mib, 2048, 500 * mib, 80000 * mib, 0.9)
    assert budget.startswith("rank 0: the KV cache gets 100 MiB (3 blocks of 16 tokens) but one 2048-token "
                             "sequence needs 128 blocks (256 MiB); free 500 MiB of 80,000 MiB.")
    assert "--max-model-len" in budget and "--gpu-memory-utilization (now 0.9)" in budget and "--tp" in budget
    # A block count given by the caller is reported as such, not as the memory budget it ignored.
    asked = kv_cache_shortfall(1, 127706 * mib, 64, True, 16, 2 * mib, 2048, 142277 * mib, 143156 * mib, 0.9)
    assert asked.startswith("rank 1: the KV cache gets 64 blocks of 16 tokens as asked (128 MiB) but one")
    assert kv_cache_shortfall(0, -5, -1, False, 16, 1, 16, 0, 1, 0.5).startswith(
        "rank 0: the KV cache gets 0 MiB (0 blocks of 16 tokens)")


def _fake_driver(monkeypatch, kernels: dict, edges: list):
    """A stand-in for cuda.bindings.driver holding one graph: kernels {node: name or None (not a kernel)}, edges
    [(from, to, type)]. Records what link_programmatic removes and adds."""
    import sys
    from types import ModuleType, SimpleNamespace
    ok = "ok"
    cu = ModuleType("cuda.bindings.driver")
    cu.CUresult = SimpleNamespace(CUDA_SUCCESS=ok)
    cu.CUgraphNodeType = SimpleNamespace(CU_GRAPH_NODE_TYPE_KERNEL="kernel", CU_GRAPH_NODE_TYPE_MEMCPY="memcpy")
    cu.CUgraphDependencyType = SimpleNamespace(CU_GRAPH_DEPENDENCY_TYPE_DEFAULT=0, CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC=1)
    cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC = 1

    class CUgraphEdgeData:
        def __init__(self, type=0):
            self.from_port, self.to_port, self.type = 0, 0, type
    cu.CUgraphEdgeData = CUgraphEdgeData
    cu.cuGraphGetEdges = lambda graph, n=0: (ok, [e[0] for e in edges][:n], [e[1] for e in edges][:n],
                                             [CUgraphEdgeData(e[2]) for e in edges][:n], len(edges))
    cu.cuGraphNodeGetType = lambda node: (ok, "kernel" if kernels[node] is not None else "memcpy")
    cu.cuGraphKernelNodeGetParams = lambda node: (ok, SimpleNamespace(func=100 + node))
    cu.cuFuncGetName = lambda func: (ok, kernels[func - 100].encode())
    log = {"removed": [], "added": []}

    def remove(graph, frm, to, data, n):
        assert [d.type for d in data] == [0] * n
        log["removed"] += list(zip(frm, to))
        return ok

    def add(graph, frm, to, data, n):
        assert all(d.type == 1 and d.from_port == 1 for d in data) and len(data) == n
        log["added"] += list(zip(frm, to))
        return ok
    cu.cuGraphRemoveDependencies, cu.cuGraphAddDependencies = remove, add
    bindings = ModuleType("cuda.bindings")
    bindings.driver = cu
    monkeypatch.setitem(sys.modules, "cuda", ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", cu)
    return log


def test_link_programmatic_turns_only_edges_between_our_kernels(monkeypatch):
    """Our kernel -> our kernel becomes programmatic; edges touching NCCL/cuBLAS kernels, copies, or already
    programmatic edges stay as they are."""
    from mpillm.cuda.graphs import link_programmatic
    kernels = {1: "embedding_b16", 2: "gemv_bf16_bf16_m1", 3: "ncclDevKernel_AllReduce", 4: "add_rms_norm_bf16",
               5: None, 6: "rope_store_kv_bf16", 7: "sm90_xmma_gemm"}
    edges = [(1, 2, 0), (2, 3, 0), (3, 4, 0), (4, 6, 0), (6, 5, 0), (5, 2, 0), (6, 7, 0), (2, 6, 1)]
    log = _fake_driver(monkeypatch, kernels, edges)
    ours = {"embedding_b16", "gemv_bf16_bf16_m1", "add_rms_norm_bf16", "rope_store_kv_bf16"}
    assert link_programmatic("graph", ours.__contains__) == 2
    assert log["removed"] == log["added"] == [(1, 2), (4, 6)]


def test_link_programmatic_without_edges_and_check_cu_errors(monkeypatch):
    import pytest
    from mpillm.cuda.graphs import link_programmatic
    from mpillm.cuda.runtime import check_cu
    log = _fake_driver(monkeypatch, {1: "gemv_bf16_bf16_m1"}, [])
    assert link_programmatic("graph", lambda name: True) == 0 and log == {"removed": [], "added": []}
    assert check_cu(("ok", 5), "x") == 5 and check_cu(("ok", 1, 2), "x") == [1, 2] and check_cu("ok", "x") is None
    with pytest.raises(RuntimeError, match="cuGraphLaunch failed: boom"):
        check_cu(("boom",), "cuGraphLaunch")


def _device_part_len(ctx, P, min_part):
    """attention_decode.cu decode_part_len, term for term."""
    from mpillm.cuda.kernels import DECODE_PART_ALIGN, DECODE_PARTITION
    even = -(-ctx // P)
    return min(max(min_part, -(-even // DECODE_PART_ALIGN) * DECODE_PART_ALIGN), DECODE_PARTITION)


def test_decode_partitions_cover_every_context_within_the_scratch():
    from mpillm.cuda.kernels import (DECODE_MAX_PARTS, DECODE_PARTITION, attention_scratch_rows,
                                     decode_partitions)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        max_seqs = int(rng.integers(1, 300))
        n_seqs = int(rng.integers(1, max_seqs + 1))
        n_kv = int(rng.choice([1, 2, 3, 4, 8]))
        max_ctx = int(rng.integers(1, 40000))
        bound = int(rng.integers(max_ctx, 40001))            # the scratch's context bound
        sms = int(rng.choice([8, 108, 132]))
        split = float(rng.choice([0.0, 0.5, 1.0, 2.0, 8.0]))
        min_part = int(rng.choice([16, 32, 64, 512]))
        rows = attention_scratch_rows(max_seqs, bound)
        P = decode_partitions(n_seqs, n_kv, max_ctx, sms, rows, split, min_part)
        assert 1 <= P <= DECODE_MAX_PARTS and P * n_seqs <= rows
        assert P * DECODE_PARTITION >= max_ctx
        if split == 0 or n_kv * n_seqs * -(-max_ctx // DECODE_PARTITION) >= 0.25 * sms:
            assert P == -(-max_ctx // DECODE_PARTITION)
        for ctx in (1, max_ctx, int(rng.integers(1, max_ctx + 1))):
            part = _device_part_len(ctx, P, min_part)
            assert part % 16 == 0 or part == DECODE_PARTITION
            assert -(-ctx // part) <= P          # no key is left without a block


def test_large_decode_batches_take_whole_partitions():
    from mpillm.cuda.kernels import DECODE_MIN_PART, DECODE_PARTITION, decode_least_part
    # Llama-3-8B (8 kv heads) on 132 SMs: 66 sequences and up fill the GPU four blocks deep without a split ...
    assert decode_least_part(66, 8, 132) == DECODE_PARTITION
    assert decode_least_part(256, 8, 132) == DECODE_PARTITION
    # ... smaller batches keep spreading keys over the grid's partitions (the env's minimum, if set)
    assert decode_least_part(65, 8, 132) == DECODE_MIN_PART
    assert decode_least_part(8, 3, 132, 64) == 64
    assert decode_least_part(176, 3, 132) == DECODE_PARTITION   # SmolLM2's 3 kv heads


def test_decode_grids_beyond_a_wave_take_the_occupancy_kernel():
    from mpillm.cuda.kernels import decode_kernel_suffix
    assert decode_kernel_suffix(264, 4, 132) == ""          # 2 blocks per SM: one wave of the plain kernel
    assert decode_kernel_suffix(265, 4, 132) == "_occ"
    assert decode_kernel_suffix(8192, 1, 132) == "_occ"
    assert decode_kernel_suffix(8192, 8, 132) == "_occ"
    assert decode_kernel_suffix(8192, 16, 132) == ""        # group 16 has no such variant


def test_decode_split_fills_the_gpu_at_batch_1_only():
    from mpillm.cuda.kernels import attention_scratch_rows, decode_partitions
    rows = attention_scratch_rows(256, 4096)
    # Llama-3-8B (8 kv heads) on 132 SMs: batch 1 at a 512-key bound gets 8 partitions of >= 64 keys (16 of
    # >= 32 with a smaller minimum) ...
    assert decode_partitions(1, 8, 512, 132, rows) == 8
    assert decode_partitions(1, 8, 512, 132, rows, min_part=32) == 16
    assert decode_partitions(1, 8, 2048, 132, rows) == 17      # ... a 2,048-key bound: 4 x 8 blocks -> 132 / 8
    assert decode_partitions(1, 8, 4096, 132, rows) == 8       # 8 x 8 blocks (partition lengths adapt on the GPU)
    assert decode_partitions(32, 8, 512, 132, rows) == 1       # 256 blocks already: one partition each
    assert decode_partitions(8, 8, 512, 132, rows) == 1        # 64 blocks, half the SMs: splitting lost there
    assert decode_partitions(8, 3, 512, 132, rows) == 6        # SmolLM2's 3 kv heads at b=8: 24 blocks -> 144
    assert decode_partitions(1, 8, 512, 132, None) == 1        # no scratch, no split
    with pytest.raises(ValueError, match="MPILLM_DECODE_MIN_PART"):
        decode_split_settings({"MPILLM_DECODE_MIN_PART": "40"})
    with pytest.raises(ValueError, match="MPILLM_DECODE_SPLIT"):
        decode_split_settings({"MPILLM_DECODE_SPLIT": "lots"})
    assert decode_split_settings({"MPILLM_DECODE_SPLIT": "0", "MPILLM_DECODE_MIN_PART": "64"}) == (0.0, 64)


def test_small_decode_batches_take_the_cluster_kernel():
    from mpillm.cuda.kernels import decode_cluster_fits, decode_cluster_setting, decode_uses_cluster
    h100 = (132, (9, 0))
    # Llama-3-8B (8 kv heads, group 4) on 132 SMs: batches 1-4 (up to 33 pairs), contexts up to 512 keys
    assert decode_uses_cluster(1, 8, 4, 512, *h100)
    assert decode_uses_cluster(4, 8, 4, 1, *h100)
    assert not decode_uses_cluster(5, 8, 4, 512, *h100)          # 40 pairs: split-K
    assert not decode_uses_cluster(1, 8, 4, 513, *h100)          # more than 8 x 64 keys
    assert decode_uses_cluster(1, 8, 8, 512, *h100) and decode_uses_cluster(1, 16, 1, 512, *h100)
    assert not decode_uses_cluster(1, 2, 16, 512, *h100)         # group 16: no cluster build
    assert not decode_uses_cluster(1, 8, 4, 512, 108, (8, 0))    # A100: no clusters
    assert decode_uses_cluster(11, 3, 4, 512, *h100)             # SmolLM2's 3 kv heads: up to batch 11
    assert not decode_uses_cluster(12, 3, 4, 512, *h100)
    assert decode_cluster_fits(4, 512, (9, 0)) and decode_cluster_fits(8, 1, (10, 0))
    assert not decode_cluster_fits(16, 512, (9, 0)) and not decode_cluster_fits(4, 513, (9, 0))
    assert decode_cluster_setting({}) and not decode_cluster_setting({"MPILLM_DECODE_CLUSTER": "0"})
    with pytest.raises(ValueError, match="MPILLM_DECODE_CLUSTER"):
        decode_cluster_setting({"MPILLM_DECODE_CLUSTER": "yes"})


def test_cluster_kernel_constants_match_the_source():
    """kernels.py sizes the cluster kernel's grid, shared memory and context bound from constants that
    cuda_src/attention_decode.cu defines: the two must agree."""
    import re
    from mpillm.cuda import kernels as km
    src = (km.CUDA_SRC / "attention_decode.cu").read_text()
    names = r"DC_\w+|DECODE_THREADS|DECODE_PARTITION"
    defines = {m[0]: int(m[1]) for m in re.findall(rf"^#define ({names}) (\d+)", src, re.M)}
    assert defines == {"DECODE_THREADS": km.DECODE_THREADS, "DC_CLUSTER": km.DECODE_CLUSTER,
                       "DC_CHUNK": km.DECODE_CLUSTER_CHUNK, "DC_MAX_KEYS": km.DECODE_CLUSTER_MAX_KEYS,
                       "DECODE_PARTITION": km.DECODE_PARTITION}
    assert km.DECODE_CLUSTER_MAX_CTX == km.DECODE_PARTITION     # the short-context decode graphs' bound
    # K and V of 64 keys, or the P V sums where they need more (head_dim 64, group 8: 16 key lanes).
    assert km.decode_cluster_bytes(128, 4) == km.decode_cluster_bytes(128, 8) == 32 * 1024
    assert km.decode_cluster_bytes(64, 8) == 16 * 8 * 64 * 4 > km.decode_cluster_bytes(64, 4) == 16 * 1024


def test_rope_interleave_puts_each_rotary_pair_on_adjacent_rows():
    from mpillm.cuda.model import rope_interleave
    rows = np.arange(2 * 6)                                   # two heads of 6
    assert rope_interleave(rows, 6).tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    w = np.arange(3 * 8 * 5).reshape(3 * 8, 5)                # trailing columns move with their row
    got = rope_interleave(w, 8)
    for h in range(3):
        for i in range(4):
            assert (got[h * 8 + 2 * i] == w[h * 8 + i]).all() and (got[h * 8 + 2 * i + 1] == w[h * 8 + 4 + i]).all()
    with pytest.raises(ValueError, match="whole heads"):
        rope_interleave(np.zeros((10, 2)), 4)


def test_linear_rope_launches_one_projection_kernel_with_the_rope_arguments():
    """Small M: one launch per 32-row tile, each pointing at its rows of x, qkv, positions and slots, with the
    frequencies, caches and head counts after the projection's own arguments."""
    from mpillm.cuda.kernels import QuantWeight
    nh, nkv, hd, k = 4, 2, 64, 576
    n = (nh + 2 * nkv) * hd
    w = QuantWeight("int8", n, k, 64, _tensor(0x100000, (n, 9 * 64), "u8"), _tensor(0x200000, (n, 18), "u8"))
    rope = (_tensor(0x500000, (45,), "i32"), _tensor(0x600000, (hd // 2,), "f32"))
    caches = (_tensor(0x700000, (8, 16, nkv, hd)), _tensor(0x800000, (8, 16, nkv, hd)))
    slots = _tensor(0x900000, (45,), "i32")
    rec = _Recorder()
    rec.k.linear_rope(_tensor(0x400000, (45, n)), _tensor(0x300000, (45, k)), w, None, rope[0], rope[1], *caches,
                      slots, nh, nkv, hd, _tensor(0xA00000, (45, n)))
    assert [(name, args[0], args[1], args[5], args[11], args[13]) for name, _, _, args in rec.launches] == [
        ("qgemv8_rope_bf16_m4", 0x400000, 0x300000, 32, 0x500000, 0x900000),
        ("qgemv8_rope_bf16_m2", 0x400000 + 32 * n * 2, 0x300000 + 32 * k * 2, 13, 0x500000 + 4 * 32,
         0x900000 + 4 * 32)]
    assert all(args[12] == 0x600000 and args[14:] == (0x700000, 0x800000, nh, nkv, hd)
               for _, _, _, args in rec.launches)
    rec.launches.clear()
    wf = _tensor(0xB00000, (n, k))
    rec.k.linear_rope(_tensor(0x400000, (9, n)), _tensor(0x300000, (9, k)), wf, None, rope[0].view(0, (9,)), rope[1],
                      *caches, slots.view(0, (9,)), nh, nkv, hd, _tensor(0xA00000, (9, n)))
    assert rec.launches == [("gemv_rope_bf16_m2", (n // 16, 1), 256,
                             (0x400000, 0x300000, 0xB00000, 0, 9, n, k, 0x500000, 0x600000, 0x900000, 0x700000,
                              0x800000, nh, nkv, hd))]


def test_ipc_all_reduce_table_lists_the_buffers_then_the_counters(monkeypatch):
    """The kernels' table (allreduce.cu): every rank's buffer in rank order, the counters at AR_MAX_RANKS; the
    --comm-probe table has this rank's own buffer as the only rank's."""
    from mpillm.cuda import ipc_allreduce as ipc
    monkeypatch.setattr(ipc.DeviceTensor, "from_numpy", staticmethod(lambda a, dtype: a.view(np.uint64)))
    ar = ipc.IpcAllReduce.__new__(ipc.IpcAllReduce)
    ar._data, ar._counters, ar.rank, ar.world = 0x7000_0000_1000, 0x7000_0000_9000, 1, 3
    ar._upload_table([0x5000_0000_0000, ar._data, 0x6000_0000_0000])
    want = [0x5000_0000_0000, 0x7000_0000_1000, 0x6000_0000_0000] + [0] * (ipc.AR_MAX_RANKS - 3) + [ar._counters]
    assert ar.table.tolist() == want
    ar.exchange_nothing()
    assert (ar.rank, ar.world) == (0, 1)
    assert ar.table.tolist() == [ar._data] + [0] * (ipc.AR_MAX_RANKS - 1) + [ar._counters]


def test_ipc_all_reduce_constants_match_the_source():
    """ipc_allreduce.py sizes the table, the counters and the grid from constants that cuda_src/ll.cuh and
    allreduce.cu define: they must agree."""
    import re
    from mpillm.cuda import ipc_allreduce as ipc
    from mpillm.cuda.kernels import CUDA_SRC
    src = (CUDA_SRC / "ll.cuh").read_text() + (CUDA_SRC / "allreduce.cu").read_text()
    defines = {m[0]: int(m[1]) for m in re.findall(r"^#define (A[RG]_\w+) (\d+)", src, re.M)}
    names = ("AR_MAX_RANKS", "AR_MAX_BLOCKS", "AR_BLOCKS", "AR_THREADS", "AG_BLOCKS")
    assert {k: defines[k] for k in names} == {k: getattr(ipc, k) for k in names}
    assert ipc.AG_BLOCKS <= ipc.AR_MAX_BLOCKS and ipc.AR_BLOCKS <= ipc.AR_MAX_BLOCKS   # one counter per block


def test_ipc_gather_launches_its_fixed_grid_and_refuses_what_its_slots_cannot_hold(monkeypatch):
    """ipc_all_gather_cols: AG_BLOCKS blocks whatever the rows (every block counts every call), the widest shard
    passed for the lines every thread reads; refused (ValueError, nothing launched) when L rows of the widest
    shard overflow a slot (16 bytes per pair of floats), the shapes disagree or the rank is outside the group.
    IpcAllReduce.all_gather_cols uploads the column starts once per split and, after exchange_nothing, gathers
    only this rank's own columns as a group of one."""
    from mpillm.cuda import ipc_allreduce as ipc
    rec = _Recorder()
    table, starts = _tensor(0x200000, (9,), "u8"), _tensor(0x210000, (4,), "i32")
    out, local = _tensor(0x300000, (3, 1001), "f32"), _tensor(0x400000, (3, 334), "f32")
    slot = 16 * (3 * 334 + 1) // 2
    rec.k.ipc_all_gather_cols(out, local, starts, 2, 3, table, slot, 334)
    assert rec.launches == [("all_gather_cols_f32", (ipc.AG_BLOCKS, 1), ipc.AR_THREADS,
                             (0x300000, 0x400000, 0x210000, 3, 334, 1001, 2, 3, 0x200000, slot))]
    rec.launches.clear()
    bad = [(out, local, starts, 2, 3, table, slot - 16, 334, "slots"),
           (out, _tensor(0x400000, (2, 334), "f32"), starts, 2, 3, table, slot, 334, "local"),
           (out, local, _tensor(0x210000, (3,), "i32"), 2, 3, table, slot, 334, "starts"),
           (out, local, starts, 3, 3, table, slot, 334, "rank"),
           (out, local, starts, 2, 3, table, slot, 300, "widest"),
           (_tensor(0x300000, (3, 1001)), local, starts, 2, 3, table, slot, 334, "out")]
    for *args, what in bad:
        with pytest.raises(ValueError, match=what):
            rec.k.ipc_all_gather_cols(*args)
    assert rec.launches == []

    uploads = []
    monkeypatch.setattr(ipc.DeviceTensor, "from_numpy",
                        staticmethod(lambda a, dtype: uploads.append(a.tolist()) or _tensor(0x210000, a.shape, dtype)))
    ar = ipc.IpcAllReduce.__new__(ipc.IpcAllReduce)
    ar.k, ar.rank, ar.home, ar.world, ar.table, ar.slot_bytes = rec.k, 1, 1, 3, table, slot
    ar._data, ar._counters, ar._starts, ar._splits = 0x7000_0000_1000, 0x7000_0000_9000, None, None
    splits = [(0, 334), (334, 668), (668, 1001)]
    assert ar.fits_gather(3, splits) and not ar.fits_gather(4, splits)
    for _ in range(2):
        ar.all_gather_cols(out, _tensor(0x400000, (3, 334), "f32"), splits)
    assert uploads == [[0, 334, 668, 1001]]
    assert [a[3:8] for _, _, _, a in rec.launches] == [(3, 334, 1001, 1, 3)] * 2
    ar.exchange_nothing()
    ar.all_gather_cols(out, _tensor(0x400000, (3, 334), "f32"), splits)
    assert uploads[-1] == [334, 668]          # (the table before it: exchange_nothing uploads one too)
    assert rec.launches[-1][3][3:8] == (3, 334, 1001, 0, 1)


def test_fused_all_reduce_norm_launches_a_block_per_row_up_to_32():
    """ipc_all_reduce_add_rms_norm: min(rows, AR_BLOCKS) blocks (allreduce.cu: the blocks left out still count the
    call), the 512-thread build up to hidden 4,096 and the 1,024-thread one beyond; no rows, no launch."""
    from mpillm.cuda import ipc_allreduce as ipc
    rec = _Recorder()
    table = _tensor(0x200000, (9,), "u8")
    for m, hidden in [(1, 4096), (5, 576), (32, 4096), (40, 576), (3, 8192), (0, 4096)]:
        x, resid = _tensor(0x300000, (m, hidden)), _tensor(0x400000, (m, hidden))
        out, weight = _tensor(0x500000, (m, hidden)), _tensor(0x600000, (hidden,))
        rec.k.ipc_all_reduce_add_rms_norm(x, resid, out, weight, 1e-5, 1, 2, table, 1 << 20, sent=m == 1)
    assert [(fn, grid, block, args[4], args[-1]) for fn, grid, block, args in rec.launches] == [
        ("all_reduce_add_rms_norm_bf16_t512", (1, 1), 512, 1, 1),
        ("all_reduce_add_rms_norm_bf16_t512", (5, 1), 96, 5, 0),
        ("all_reduce_add_rms_norm_bf16_t512", (ipc.AR_BLOCKS, 1), 512, 32, 0),
        ("all_reduce_add_rms_norm_bf16_t512", (ipc.AR_BLOCKS, 1), 96, 40, 0),
        ("all_reduce_add_rms_norm_bf16", (3, 1), 1024, 3, 0)]


def test_embedding_zeroes_the_residual_in_the_same_kernel():
    """embedding's `zero`: a buffer of out's shape passed to the same launch (the TP step's residual, which the
    first fused all-reduce adds into); a mismatched one is refused."""
    rec = _Recorder()
    ids, table = _tensor(0x100000, (5,), "i32"), _tensor(0x200000, (1000, 64))
    rec.k.embedding(_tensor(0x300000, (5, 64)), ids, table, 500, zero=_tensor(0x400000, (5, 64)))
    rec.k.embedding(_tensor(0x300000, (5, 64)), ids, table, 500)
    assert [a for _, _, _, a in rec.launches] == [(0x300000, 0x400000, 0x100000, 0, 0x200000, 500, 1000, 64),
                                                  (0x300000, 0, 0x100000, 0, 0x200000, 500, 1000, 64)]
    with pytest.raises(ValueError, match="zero"):
        rec.k.embedding(_tensor(0x300000, (5, 64)), ids, table, 500, zero=_tensor(0x400000, (4, 64)))


def test_row_parallel_projection_sends_from_the_small_m_and_one_token_kernels():
    """linear's `send`: the float small-M kernel's send twin, and the one-token int8 / Q4_0 kernel's (_x1, _x1d: the
    quantized o and down projections of a decode step), with the all-reduce's table, slot size, rank and world after
    the usual arguments; refused (ValueError, nothing launched) for a quantized weight at more than one token or
    with int8 x1 turned off, an f32 output, more rows than the small-M kernel takes, a path that is not it, or y
    larger than the slots."""
    from mpillm.cuda.kernels import QuantWeight
    n, k = 576, 200
    w, table = _tensor(0x100000, (n, k)), _tensor(0x200000, (9,), "u8")
    send = (table, 1 << 20, 1, 4)
    rec = _Recorder()
    rec.k.linear(_tensor(0x400000, (9, n)), _tensor(0x300000, (9, k)), w, send=send)
    assert rec.launches == [("gemv_send_bf16_m2", (36, 1), 256,
                             (0x400000, 0x300000, 0x100000, 0, 9, n, k, 0x200000, 1 << 20, 1, 4))]
    assert rec.k.gemv_sends(w, _tensor(0x400000, (9, n)), 9)
    rec.launches.clear()
    qk = 224                                      # int8 groups of 32: 7 groups, 4 super-blocks of 64
    q = QuantWeight("int8", n, qk, 32, _tensor(0x100000, (n, 4 * 64), "u8"), _tensor(0x200000, (n, 14), "u8"))
    q4 = QuantWeight("q4_0", 4096, 4096, 32, _tensor(0x500000, (4096, 32 * 64), "u8"),
                     _tensor(0x600000, (4096, 32 * 8), "u8"))
    rec.k.linear(_tensor(0x400000, (1, n)), _tensor(0x300000, (1, qk)), q, send=send)
    rec.k.linear(_tensor(0x400000, (1, 4096)), _tensor(0x300000, (1, 4096)), q4, send=send)
    assert [(fn, grid) for fn, grid, _, _ in rec.launches] == [("qgemv8_send_bf16_x1", (36, 1)),
                                                              ("qgemv4s_send_bf16_x1d", (256, 1))]
    assert rec.launches[0][3] == (0x400000, 0x300000, 0x100000, 0x200000, 0, 1, n, qk, 4, 7, 0, 0x200000, 1 << 20, 1,
                                  4)
    assert rec.launches[1][2] == 256 and rec.shared[-1] > 0          # x staged in dynamic shared memory
    rec.launches.clear()
    # Q4_1's _x1 kernels have no send twin (not yet run on two GPUs): the all-reduce sends for them
    q41 = QuantWeight("q4", 4096, 4096, 32, _tensor(0x500000, (4096, 32 * 64), "u8"),
                      _tensor(0x600000, (4096, 32 * 16), "u8"))
    assert rec.k._takes_x1(q41, "bf16", 1) and not rec.k.gemv_sends(q41, _tensor(0x400000, (1, 4096)), 1)
    with pytest.raises(ValueError, match="send"):
        rec.k.linear(_tensor(0x400000, (1, 4096)), _tensor(0x300000, (1, 4096)), q41, send=send)
    assert rec.launches == []
    bad = [(_tensor(0x400000, (2, n)), _tensor(0x300000, (2, qk)), q, {}),
           (_tensor(0x400000, (1, n), "f32"), _tensor(0x300000, (1, qk)), q, {}),
           (_tensor(0x400000, (1, n), "f32"), _tensor(0x300000, (1, k)), w, {}),
           (_tensor(0x400000, (33, n)), _tensor(0x300000, (33, k)), w, {}),
           (_tensor(0x400000, (9, n)), _tensor(0x300000, (9, k)), w, {"path": "gemm"}),
           (_tensor(0x400000, (1, n)), _tensor(0x300000, (1, qk)), q, {"path": "dequant"})]
    for y, x, weight, kw in bad:
        with pytest.raises(ValueError, match="send"):
            rec.k.linear(y, x, weight, send=send, **kw)
    rec.k.qgemv_x1 = False                        # MPILLM_QGEMV_X1=0: no one-token kernel, nothing sends
    with pytest.raises(ValueError, match="send"):
        rec.k.linear(_tensor(0x400000, (1, n)), _tensor(0x300000, (1, qk)), q, send=send)
    rec.k.qgemv_x1 = True
    for weight, m in ((w, 9), (q, 1)):
        with pytest.raises(ValueError, match="slots"):
            rec.k.linear(_tensor(0x400000, (m, n)), _tensor(0x300000, (m, weight.shape[1])), weight,
                         send=(table, m * n * 2, 1, 4))
    assert rec.launches == []


def test_pdl_prologue_orders_match_what_each_kernel_reads_before_its_wait():
    """common.cuh: pdl_begin lets the dependents start before this kernel's wait; pdl_begin_late after it. A kernel
    may read another kernel's output before its wait only where the one before it starts it late: gemv_quant.cu's
    PreNormStage (r), after a quantized projection whose prologue is pdl_begin_late (int8's x1_linear kernels and
    every other gemv_quant.cu kernel but Q4_0's and Q4_1's x1_linear ones, which start theirs first); no other file
    uses it."""
    import re
    from mpillm.cuda.kernels import CUDA_SRC
    common = (CUDA_SRC / "common.cuh").read_text()
    body = lambda name: re.search(name + r"\(\) \{(.*?)\n\}", common, re.S).group(1)   # noqa: E731
    assert body("pdl_begin").split() == ["pdl_launch_dependents();", "pdl_wait();"]
    assert body("pdl_begin_late").split() == ["pdl_wait();", "pdl_launch_dependents();"]
    quant = (CUDA_SRC / "gemv_quant.cu").read_text()
    start = quant.index("void x1_linear(")   # the one-token kernels' prologue, where the _x1n kernels fold the norm
    assert quant.index("pre.load(prenorm, K);", start) < quant.index("pdl_begin_late();", start) < \
        quant.index("pre.finish(", start)
    prologue = quant[quant.index("if constexpr (REPLAY) pre.load(prenorm, K);", start):
                     quant.index("pre.finish(", start)]
    assert re.search(r"if constexpr \(Q4\)\s+pdl_begin\(\);\s+else\s+pdl_begin_late\(\);", prologue), prologue
    users = [p.name for p in CUDA_SRC.iterdir() if p.suffix == ".cu" and "pdl_begin_late()" in p.read_text()]
    assert users == ["gemv_quant.cu"]
    model = (CUDA_SRC.parent / "mpillm" / "cuda" / "model.py").read_text()
    assert "and (k.starts_dependents_late(w, y.dtype, 1) or not k.prenorm_reads_early(next_w))" in model
    # int8's replay is the fold that reads early; Q4_0's and bf16's read after their wait (no pdl_begin_late needed)
    from mpillm.cuda.kernels import QuantWeight
    k = _Recorder().k
    w8 = QuantWeight("int8", 6144, 4096, 128, _tensor(0x100000, (6144, 4096), "u8"),
                     _tensor(0x200000, (6144, 64), "u8"))
    w4 = QuantWeight("q4_0", 6144, 4096, 32, _tensor(0x100000, (6144, 2048), "u8"),
                     _tensor(0x200000, (6144, 256), "u8"))
    assert k.prenorm_reads_early(w8) and not k.prenorm_reads_early(w4)
    assert not k.prenorm_reads_early(_tensor(0x100000, (6144, 4096)))
    # which kernels start the next one late: the quantized ones, but Q4_0's and Q4_1's one-token _x1 kernels
    w41 = QuantWeight("q4", 6144, 4096, 32, _tensor(0x100000, (6144, 2048), "u8"), _tensor(0x200000, (6144, 512), "u8"))
    assert not k.prenorm_reads_early(w41)
    assert k.starts_dependents_late(w8, "bf16", 1) and k.starts_dependents_late(w41, "bf16", 2)
    assert not k.starts_dependents_late(w4, "bf16", 1) and not k.starts_dependents_late(w41, "bf16", 1)
    assert k.starts_dependents_late(w4, "bf16", 2) and k.starts_dependents_late(w4, "f16", 1)
    assert not k.starts_dependents_late(_tensor(0x100000, (6144, 4096)), "bf16", 1)
    k.qgemv_x1 = False
    assert k.starts_dependents_late(w4, "bf16", 1) and k.starts_dependents_late(w41, "bf16", 1)
    assert "pdl_begin_late" not in (CUDA_SRC / "gemv.cu").read_text()


def test_ipc_enable_sizes_the_gather_by_the_widest_vocab_shard_and_keeps_what_is_big_enough(monkeypatch):
    """NcclComm.enable_ipc_all_reduce: the all-reduce instances and, with gather_rows, one for the logits gather
    sized for that many rows of the widest shard; a call asking no more than what exists keeps it (the model
    calls it once per model on a shared communicator); asking more makes all of them anew; a group that cannot
    (why_not) or MPILLM_IPC_ALLREDUCE=0 keeps NCCL and makes nothing."""
    from mpillm.cuda import ipc_allreduce as ipc
    from mpillm.cuda.nccl import NcclComm
    made, closed = [], []

    class FakeIpc:
        def __init__(self, group, device, kernels, max_bytes):
            self.max_bytes = -(-max_bytes // 16) * 16
            made.append(max_bytes)

        def close(self):
            closed.append(self.max_bytes)

    reason = [None]
    monkeypatch.setattr(ipc, "IpcAllReduce", FakeIpc)
    monkeypatch.setattr(ipc, "why_not", lambda group, device: reason[0])
    comm = NcclComm.__new__(NcclComm)
    comm.group = comm.device = None
    comm.ipc = comm.ipc_norm = comm.ipc_gather = None
    comm.vocab_splits = [(0, 1001), (1001, 2001)]
    note = comm.enable_ipc_all_reduce(None, 8192, gather_rows=8)
    assert made == [8192, 8192, 8 * 1001 * 4] and "up to 8 rows" in note
    assert comm.enable_ipc_all_reduce(None, 4096, gather_rows=4) == note and len(made) == 3   # kept
    comm.enable_ipc_all_reduce(None, 8192, gather_rows=16)
    assert made[3:] == [8192, 8192, 16 * 1001 * 4] and len(closed) == 3
    fresh = NcclComm.__new__(NcclComm)
    fresh.group = fresh.device = fresh.ipc = fresh.ipc_norm = fresh.ipc_gather = None
    fresh.vocab_splits = comm.vocab_splits
    reason[0] = "the group spans several nodes"
    assert fresh.enable_ipc_all_reduce(None, 8192, 8) == "NCCL (the group spans several nodes)"
    monkeypatch.setenv("MPILLM_IPC_ALLREDUCE", "0")
    reason[0] = None
    assert fresh.enable_ipc_all_reduce(None, 8192, 8).startswith("NCCL")
    assert fresh.ipc is None and fresh.ipc_gather is None and len(made) == 6


class _StreamModel:
    """pycuda.driver's streams and events as a happens-before graph: every operation follows the one before it on
    its stream and the operations of the events its stream waited for."""

    def __init__(self):
        self.ops = []        # (label, predecessors)
        self.synced = []     # operations the host waited for, in order

    def op(self, stream, label, extra=()):
        preds = set(extra) | ({stream.last} if stream.last is not None else set())
        self.ops.append((label, preds))
        stream.last = len(self.ops) - 1
        return stream.last

    def before(self, a, b) -> bool:
        """Operation a happens before operation b."""
        todo, seen = list(self.ops[b][1]), set()
        while todo:
            o = todo.pop()
            if o == a:
                return True
            if o not in seen:
                seen.add(o)
                todo += list(self.ops[o][1])
        return False

    def driver(self):
        from types import SimpleNamespace
        model = self

        class Stream:
            def __init__(self):
                self.last = None

            def wait_for_event(self, ev):
                model.op(self, "wait", {ev.at} if ev.at is not None else ())

        class Event:
            def __init__(self, flags=0):
                self.at = None

            def record(self, stream):
                self.at = stream.last

            def synchronize(self):
                model.synced.append(self.at)

        def memcpy_htod_async(dst, src, stream):
            model.op(stream, ("copy", dst, id(src.base if src.base is not None else src)))

        return SimpleNamespace(Stream=Stream, Event=Event, event_flags=SimpleNamespace(DISABLE_TIMING=2),
                               pagelocked_empty=lambda n, dt: np.zeros(n, dt), memcpy_htod_async=memcpy_htod_async)


def test_step_metadata_upload_overlaps_the_step_before_and_never_races(monkeypatch):
    """StepBuffers: each step's metadata copy runs on the copy stream, ordered after every step that read the same
    device array (two steps back) and before the step's own kernels, but not after the step just before it (that
    one reads the other array: the copy overlaps it). The host array is rewritten only after its last copy."""
    import sys
    from types import ModuleType, SimpleNamespace

    import mpillm.cuda.model as cm
    sm = _StreamModel()
    drv = sm.driver()
    pycuda = ModuleType("pycuda")
    pycuda.driver = drv
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    ptrs = iter(range(1000, 10 ** 6, 1000))
    monkeypatch.setattr(cm, "DeviceTensor", SimpleNamespace(empty=lambda shape, dt: SimpleNamespace(ptr=next(ptrs))))
    buf = cm.StepBuffers(max_tokens=4, max_seqs=2, max_blocks=3)
    compute = drv.Stream()
    steps = []    # (copy op, the step's kernels op, device array, host array)
    for i in range(7):
        n_synced = len(sm.synced)
        buf.begin(compute)
        host = id(buf.host)
        if i >= 2:   # the host array's copy two steps back: waited for before it is rewritten
            assert steps[i - 2][0] in sm.synced[n_synced:], f"step {i}: host array rewritten before its last copy"
        buf.host_view("ids", 4)[:] = i
        buf.upload(2, compute)
        label, _ = sm.ops[buf.copy_stream.last]
        assert label[0] == "copy" and label[1] == buf.dev.ptr and label[2] == host
        kernels = sm.op(compute, ("kernels", buf.dev.ptr))
        steps.append((buf.copy_stream.last, kernels, buf.dev.ptr, host))
        if i == 3:   # other work on the compute stream between two steps (the prefill halves' own metadata copy)
            sm.op(compute, "other")
    for i, (copy, kernels, dev, host) in enumerate(steps):
        assert sm.before(copy, kernels), f"step {i}: kernels may start before the step's metadata is copied"
        if i >= 1:
            assert steps[i - 1][2] != dev, "consecutive steps share a device array"
            assert not sm.before(steps[i - 1][1], copy), f"step {i}: the copy waits for the step before"
        if i >= 2:
            assert steps[i - 2][2] == dev
            assert sm.before(steps[i - 2][1], copy), f"step {i}: copy into an array step {i - 2} may still read"
