"""Weight-only INT8 (mpillm.quant) and its NumPy W8A16 simulation (model.Transformer(quantize="int8")).

The scheme is checked against its derived error bound, GGUF blocks against the gguf package bit for bit,
and the simulated model against the float one on the real default model (SmolLM2-135M, whose K = 576
needs --group-size 64: 128 does not divide it).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mpillm.batch import StepInput
from mpillm.checkpoint import open_checkpoint
from mpillm.dummy import dummy_config
from mpillm.formats import dequantize as ours_dequantize
from mpillm.layers import Int8Simulated
from mpillm.model import Transformer
from mpillm.parallel import make_shard
from mpillm.perplexity import DEFAULT_TEXT, perplexity
from mpillm.quant import (ERROR_BOUND, check_group_split, dequantize_int8, dequantize_q4, from_gguf_q4,
                          from_gguf_q8_0, int8_weight_bytes, quantize_int8)
from threadcomm import ThreadGroup  # tests/threadcomm.py

GROUP = 64                       # SmolLM2: hidden 576 = 9 x 64
FP16_MIN_NORMAL = 2.0 ** -14


# ------------------------------------------------------------------------------------------------ scheme

def _check_bound(w, q, s, group):
    """The bound of quant.py's docstring, element by element; returns max |error| / scale."""
    w64 = w.astype(np.float64)
    S = np.repeat(s.astype(np.float64), group, axis=1)
    amax = np.repeat(np.abs(w64).reshape(len(w), -1, group).max(-1), group, axis=1)
    err = np.abs(w64 - dequantize_int8(q, s, group))
    assert q.dtype == np.int8 and s.dtype == np.float16 and np.abs(q.astype(int)).max() <= 127
    assert (err <= ERROR_BOUND * S).all(), float((err / np.where(S > 0, S, 1)).max())
    assert (S * 127 >= amax).all()                           # the scale never rounds below max|w| / 127
    normal = S >= FP16_MIN_NORMAL
    assert (S[normal] <= amax[normal] / 127 * (1 + 2 ** -10)).all()   # ... and at most one fp16 ulp above
    # in terms of the weights alone: |w - deq| <= max|w_g| / 254 (1 + 2^-10)(1 + 2^-17) for normal scales
    assert (err[normal] <= amax[normal] / 254 * (1 + 2 ** -10) * (1 + 2 ** -16)).all()
    # normal scales use the full range: the largest element of each group lands on +-127
    qmax = np.abs(q.astype(int)).reshape(len(w), -1, group).max(-1)
    assert (qmax[s.astype(np.float64) >= FP16_MIN_NORMAL] == 127).all()
    return float((err / np.where(S > 0, S, np.inf)).max())


@pytest.mark.parametrize("shape,group", [((7, 96), 32), ((33, 640), 64), ((5, 384), 128), ((3, 4096), 4096),
                                         ((2, 3), 1), ((11, 576), 64)])
def test_round_trip_within_derived_bound(shape, group):
    rs = np.random.RandomState(shape[0] * 1000 + shape[1])
    # rows from 1e-7 (subnormal fp16 scales) to 1e3; heavy tails so groups differ in scale
    w = (rs.standard_t(3, size=shape) * 10.0 ** rs.uniform(-7, 3, size=(shape[0], 1))).astype(np.float32)
    q, s = quantize_int8(w, group)
    assert q.shape == shape and s.shape == (shape[0], shape[1] // group)
    worst = _check_bound(w, q, s, group)
    if w.size >= 1000:
        assert worst > 0.49, "the bound is tight: some element must sit near half a step"
    np.testing.assert_array_equal(dequantize_int8(q, s, group), q.astype(np.float32).reshape(shape[0], -1, group)
                                  .__mul__(s.astype(np.float32)[..., None]).reshape(shape))


def test_zero_tiny_and_single_spike_groups():
    w = np.zeros((3, 64), np.float32)
    w[1, 32:] = 3e-7                                  # max|w| / 127 rounds to 0 in fp16 (nearest): bumped up
    w[2, 5] = -7.5                                    # a lone non-zero element
    q, s = quantize_int8(w, 32)
    assert s[0, 0] == 0 and s[0, 1] == 0 and not q[0].any()           # zero group: scale 0, q 0
    assert not np.isnan(dequantize_int8(q, s, 32)).any()
    assert s[1, 1] > 0 and (q[1, 32:] != 0).all()                      # tiny group still quantized
    assert q[2, 5] == -127 and np.count_nonzero(q[2]) == 1
    _check_bound(w, q, s, 32)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"shape \[4, 576\].*groups of 128.*--group-size 64"):
        quantize_int8(np.ones((4, 576), np.float32), 128)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(np.array([[1.0, np.nan]], np.float32), 2)
    with pytest.raises(ValueError, match="overflows an fp16 scale"):
        quantize_int8(np.array([[1e7, 0.0]], np.float32), 2)
    with pytest.raises(ValueError, match="does not match"):
        dequantize_int8(np.zeros((2, 64), np.int8), np.zeros((2, 1), np.float16), 32)


# ------------------------------------------------------------------------------------------- GGUF blocks

def _gguf_arrays(rs):
    for shape in [(1, 32), (7, 96), (16, 320)]:
        w = (rs.randn(*shape) * rs.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
        w[0, :32] = 0                                  # an all-zero block
        yield w


def test_gguf_q8_0_is_int8_with_group_32():
    rs = np.random.RandomState(1)
    for w in _gguf_arrays(rs):
        raw = gguf_quantize(w, GGMLQuantizationType.Q8_0)
        q, s = from_gguf_q8_0(raw)
        assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (len(w), w.shape[1] // 32)
        deq = dequantize_int8(q, s, 32)
        np.testing.assert_array_equal(deq, gguf_dequantize(raw, GGMLQuantizationType.Q8_0))
        np.testing.assert_array_equal(deq, ours_dequantize(raw, "Q8_0"))
        # Same scheme: requantizing the decoded values gives back exactly the stored blocks.
        q2, s2 = quantize_int8(deq, 32)
        np.testing.assert_array_equal(q2, q)
        np.testing.assert_array_equal(s2, s)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_decodes_like_gguf(kind):
    rs = np.random.RandomState(2)
    for w in _gguf_arrays(rs):
        raw = gguf_quantize(w, GGMLQuantizationType[kind])
        q, s, m = from_gguf_q4(raw, kind)
        assert q.dtype == np.uint8 and q.shape == w.shape and q.max() <= 15 and s.dtype == np.float16
        assert (m is None) == (kind == "Q4_0") and (m is None or m.shape == s.shape)
        deq = dequantize_q4(q, s, m)
        np.testing.assert_array_equal(deq, gguf_dequantize(raw, GGMLQuantizationType[kind]))
        np.testing.assert_array_equal(deq, ours_dequantize(raw, kind))


def test_gguf_q4_nibble_layout():
    """Hand-made block: byte j holds element j in its low nibble and element 16 + j in its high nibble."""
    codes = np.arange(32) % 16
    packed = (codes[:16] | (codes[::-1][:16] << 4)).astype(np.uint8)          # high nibbles: 15, 14, ...
    d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    for kind, head in (("Q4_0", d), ("Q4_1", d + m)):
        raw = np.frombuffer(head + packed.tobytes(), np.uint8)[None]
        q, s, mins = from_gguf_q4(raw, kind)
        np.testing.assert_array_equal(q[0, :16], codes[:16])
        np.testing.assert_array_equal(q[0, 16:], codes[::-1][:16])
        want = 0.5 * (q[0] - 8.0) if kind == "Q4_0" else 0.5 * q[0] - 1.0
        np.testing.assert_array_equal(dequantize_q4(q, s, mins)[0], want)
    with pytest.raises(ValueError, match="Q4_1 data"):
        from_gguf_q4(np.zeros((2, 19), np.uint8), "Q4_1")


# ---------------------------------------------------------------------------------- tensor parallelism

def test_check_group_split():
    check_group_split(4096, 128, 0, 2048)
    check_group_split(576, 64, 320, 576)
    with pytest.raises(ValueError, match=r"columns \[320, 576\).*boundaries of 128.*--group-size 64"):
        check_group_split(640, 128, 320, 576)
    with pytest.raises(ValueError, match="--group-size 64"):
        check_group_split(576, 128, 0, 576)
    # the real cuts: every o_proj / down_proj shard of llama3-8b falls on 128-groups up to --tp 8
    cfg = dummy_config("dummy:llama3-8b")
    for tp in (2, 3, 4, 8):
        for r in range(tp):
            sh = make_shard(cfg, r, tp)
            check_group_split(cfg.num_heads * cfg.head_dim, 128, sh.q_lo * cfg.head_dim, sh.q_hi * cfg.head_dim)
            check_group_split(cfg.intermediate_size, 128, sh.ffn_lo, sh.ffn_hi)


def test_weight_bytes():
    smol, l8 = dummy_config("dummy:smollm2-135m"), dummy_config("dummy:llama3-8b")
    for cfg in (smol, l8):
        b = int8_weight_bytes(cfg, make_shard(cfg, 0, 1), GROUP, lm_head=False)
        assert b.bf16 == 2 * cfg.num_parameters()
        norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
        full = int8_weight_bytes(cfg, make_shard(cfg, 0, 1), GROUP, lm_head=True)
        rest = cfg.num_parameters() - norms             # everything but norms is int8 + one fp16 per group
        assert full.int8 == rest + 2 * rest // GROUP + 2 * norms
    b8 = int8_weight_bytes(l8, make_shard(l8, 0, 1), 128, lm_head=False)
    assert 0.57 < b8.ratio < 0.575                      # its 2.1 GB of vocabulary tables stay bf16
    assert abs(int8_weight_bytes(l8, make_shard(l8, 0, 1), 128, True).ratio - (0.5 + 1 / 128)) < 1e-4
    shards = [int8_weight_bytes(l8, make_shard(l8, r, 2), 128, False) for r in range(2)]
    assert sum(s.int8 for s in shards) > b8.int8        # kv heads and norms are replicated over ranks


# ------------------------------------------------------------------------------------------ real model

@pytest.fixture(scope="module")
def smol(smollm_gguf):
    ck = open_checkpoint(smollm_gguf)
    return ck, Transformer(ck), Transformer(ck, quantize="int8", group_size=GROUP)


def test_gguf_decoding_on_real_tensors(smol):
    ck = smol[0]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.29.mlp.gate_proj.weight"):
        kind, raw = ck.quantized(name)
        assert kind == "Q4_1"
        deq = dequantize_q4(*from_gguf_q4(raw, kind))
        np.testing.assert_array_equal(deq, ours_dequantize(np.asarray(raw), kind))
        np.testing.assert_array_equal(deq, gguf_dequantize(np.asarray(raw), GGMLQuantizationType.Q4_1))
    kind, raw = ck.quantized("model.embed_tokens.weight")
    assert kind == "Q8_0"
    raw = np.asarray(raw[:4096])                                 # a slice of the 49152 rows, for time
    q, s = from_gguf_q8_0(raw)
    deq = dequantize_int8(q, s, 32)
    np.testing.assert_array_equal(deq, gguf_dequantize(raw, GGMLQuantizationType.Q8_0))
    np.testing.assert_array_equal(deq, ck.load("model.embed_tokens.weight", rows=slice(0, 4096)))
    q2, s2 = quantize_int8(deq, 32)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)


def test_int8_simulation_loads_quantized_projections_only(smol):
    ck, _, model = smol
    sim = Int8Simulated(ck, GROUP)
    name = "model.layers.3.self_attn.o_proj.weight"
    w = ck.load(name, cols=slice(320, 576))
    got = sim.load(name, cols=slice(320, 576))
    np.testing.assert_array_equal(got, dequantize_int8(*quantize_int8(w, GROUP), GROUP))
    assert not np.array_equal(got, w)
    np.testing.assert_array_equal(got, sim.load(name)[:, 320:])          # shard quantized = slice of whole
    for plain in ("model.layers.3.input_layernorm.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(sim.load(plain, rows=slice(0, 8)), ck.load(plain, rows=slice(0, 8)))
    emb = Int8Simulated(ck, GROUP, lm_head=True).load("model.embed_tokens.weight", rows=slice(0, 8))
    assert not np.array_equal(emb, ck.load("model.embed_tokens.weight", rows=slice(0, 8)))
    with pytest.raises(ValueError, match=r"o_proj.*columns \[32, 576\)"):
        sim.load(name, cols=slice(32, 576))
    with pytest.raises(ValueError, match="q_proj.*--group-size 64"):
        Transformer(ck, quantize="int8")                             # the default 128 does not divide 576
    # the model really holds the simulated weights
    np.testing.assert_array_equal(model.layers[3].self_attn.o_proj.weight, sim.load(name))


def _text_ids(ck, n):
    return ck.tokenizer().encode(DEFAULT_TEXT.read_text(encoding="utf-8"))[:n]


def _logits(model, ids, bs=16):
    table = list(range(-(-len(ids) // bs)))
    return model.forward(StepInput.build([(ids, 0, table, True)], bs), model.new_cache(len(table), bs),
                         all_logits=True)


def test_int8_logits_close_to_float(smol):
    ck, ref_model, model = smol
    ids = _text_ids(ck, 96)
    ref, got = _logits(ref_model, ids), _logits(model, ids)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    worst = float(np.abs(got - ref).max() / np.abs(ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"int8 (group {GROUP}) vs float logits: relative L2 error {rel:.4f}, max error / max|logit| {worst:.4f}, "
          f"argmax agreement {agree:.3f}")
    # Measured: 3.1% (weights move 0.6%; this 135M model amplifies that ~5x, as it does bf16 rounding's 0.1%).
    assert 1e-3 < rel < 0.05, rel             # quantization changes the logits, but only a little
    assert worst < 0.08 and agree >= 0.9


def test_int8_perplexity_within_half_percent(smol):
    """The issue's target, on the whole shipped text (windows of 256 for time). Measured: -0.31% here; -0.14% at
    the CLI's default 512/256. Shorter slices cannot resolve 0.5% on this small model: the first 600 tokens give
    -1.5%, and random weight noise of int8's size (0.6% of each weight's scale) moves them by +-1%."""
    ck, ref_model, model = smol
    ids = _text_ids(ck, None)
    ref, got = perplexity(ref_model, ids, 256, 256), perplexity(model, ids, 256, 256)
    assert ref.scored == got.scored == len(ids) - ref.windows > 2500     # non-overlapping windows
    change = got.perplexity / ref.perplexity - 1
    print(f"perplexity on {len(ids)} tokens: float {ref.perplexity:.4f}, int8 {got.perplexity:.4f} "
          f"({100 * change:+.3f}%)")
    assert 5 < ref.perplexity < 50                       # a 135M model on 18th/19th-century prose
    assert got.nll != ref.nll and abs(change) < 0.005    # quantized, and within the target


GAP = 0.05


def test_int8_greedy_matches_float(smol):
    """Float greedy for 24 tokens on 3 prompts; int8's argmax after each prefix of the float output (one forward,
    equal to int8's own greedy run up to the first difference). Agreement is counted up to the first difference,
    over the steps before int8's first near-tie (top-2 gap < GAP: the model under test, as in
    test_model_parity). Int8 moves logits by ~0.3, so a float gap of 0.07 can flip: "def fibonacci" does so at
    step 0, where int8's own gap is 0.044."""
    ck, ref_model, model = smol
    tok = ck.tokenizer()
    prompts = [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
               tok.encode("The Declaration of Independence was signed in"),
               tok.encode("def fibonacci(n):\n")]
    n, bs = 24, 16
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    cache = ref_model.new_cache(24, bs)
    logits = ref_model.forward(StepInput.build([(p, 0, t, True) for p, t in zip(prompts, tables)], bs), cache)
    out = [[] for _ in prompts]
    for i in range(n):
        for s in range(3):
            out[s].append(int(np.argmax(logits[s])))
        if i < n - 1:
            logits = ref_model.forward(StepInput.build(
                [([out[s][-1]], len(prompts[s]) + i, tables[s], True) for s in range(3)], bs), cache)
    considered = agreed = 0
    for s, p in enumerate(prompts):
        mine = _logits(model, p + out[s])[len(p) - 1:-1]
        top2 = np.sort(mine, axis=-1)[:, -2:]
        before = next((i for i, g in enumerate(top2[:, 1] - top2[:, 0]) if g < GAP), n)
        same = mine[:before].argmax(-1) == np.array(out[s][:before])
        considered += before
        agreed += before if same.all() else int(np.argmin(same))
    print(f"int8 greedy agrees on {agreed} of {considered} tokens before int8's first near-tie")
    assert considered >= 24 and agreed >= 0.9 * considered
    assert "Paris" in tok.decode(out[0])


def test_tensor_parallel_int8_equals_single_rank(smol):
    ck, ref_model, model = smol
    ids = _text_ids(ck, 40)
    group = ThreadGroup(2)
    models = [Transformer(ck, comm=group.comm(r), quantize="int8", group_size=GROUP) for r in range(2)]
    assert models[0].shard.q_hi * ck.config.head_dim == 320         # o_proj cut at column 320 = 5 groups
    out = group.run(lambda r: _logits(models[r], ids))
    single, fp = _logits(model, ids), _logits(ref_model, ids)
    np.testing.assert_array_equal(out[0], out[1])
    tol = 2e-5 * np.abs(single).max()
    err = np.abs(out[0] - single).max()
    assert err < tol, (err, tol)                          # only the all-reduce's summation order differs
    assert np.abs(fp - single).max() > 100 * tol          # while float weights are far outside that tolerance


# ---------------------------------------------------------------------------------------- GPU byte layout

@pytest.mark.parametrize("K", [32, 96, 576, 640, 4096 + 32])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packed_int8_layout_is_a_permutation(K, group):
    from mpillm.quant import pack_int8, unpack
    if K % group:
        pytest.skip("group does not divide K")
    rng = np.random.default_rng(K + group)
    q, s = quantize_int8(rng.standard_normal((19, K)).astype(np.float32), group)
    p = pack_int8(q, s, group)
    assert p.data.shape == (19, -(-K // 64) * 64) and p.scales.shape == (19, K // group)
    np.testing.assert_array_equal(unpack(p), dequantize_int8(q, s, group))
    # lane t of a quad reads bytes [16 t, 16 t + 16) of a super-block: 8 elements of each of its 2 chunks
    t, j, e = 2, (1 if K >= 64 else 0), 5
    assert p.data[3, 16 * t + 8 * j + e].view(np.int8) == q[3, 32 * j + 8 * t + e]


@pytest.mark.parametrize("K", [32, 128, 576, 4096 + 96])
@pytest.mark.parametrize("with_mins", [True, False])
def test_packed_q4_layout_is_a_permutation(K, with_mins):
    from mpillm.quant import pack_q4, unpack
    rng = np.random.default_rng(K)
    q = rng.integers(0, 16, (7, K)).astype(np.uint8)
    d = rng.standard_normal((7, K // 32)).astype(np.float16)
    m = rng.standard_normal((7, K // 32)).astype(np.float16) if with_mins else None
    p = pack_q4(q, d, m)
    np.testing.assert_array_equal(unpack(p), dequantize_q4(q, d, m))
    sb = -(-K // 128)      # Q4_1: (d, m) per chunk; Q4_0: d alone (4.5 bits per weight), padded chunks zero
    assert p.kind == ("q4" if with_mins else "q4_0")
    assert p.scales.shape == ((7, sb, 4, 2) if with_mins else (7, sb, 4))
    assert p.nbytes == 7 * sb * (64 + (16 if with_mins else 8))
    # word j of lane t: (word >> 4 p) & 0x000F000F is the pair (e_2p, e_2p+1) of chunk j, lane t
    t, j = 3, 2 if K >= 128 else 0
    word = int.from_bytes(bytes(p.data[0, 16 * t + 4 * j: 16 * t + 4 * j + 4]), "little")
    for pair in range(4):
        lo, hi = (word >> 4 * pair) & 0xF, (word >> (4 * pair + 16)) & 0xF
        base = 32 * j + 8 * t + 2 * pair
        assert (lo, hi) == (q[0, base], q[0, base + 1])


def test_packing_errors():
    from mpillm.quant import pack_int8, pack_q4, unpack
    q, s = quantize_int8(np.ones((2, 96), np.float32), 32)
    with pytest.raises(ValueError, match="power of two"):
        pack_int8(q, s, 96)
    with pytest.raises(ValueError, match="scales"):
        pack_int8(q, s[:, :1], 32)
    with pytest.raises(ValueError, match="blocks of 32"):
        pack_q4(np.zeros((2, 40), np.uint8), np.zeros((2, 1), np.float16), None)
    # Q4_0 keeps d alone (no -8 d to overflow fp16): the largest scale packs and unpacks exactly
    big = pack_q4(np.zeros((1, 32), np.uint8), np.full((1, 1), 60000, np.float16), None)
    np.testing.assert_array_equal(unpack(big), np.full((1, 32), -480000.0, np.float32))


def test_gpu_weight_bytes_estimates():
    """mpillm info --quantize and the GPU's pre-load memory check: int8 agrees with int8_weight_bytes, and the
    8B shape's bf16 / int8 / random-4-bit totals match what the H200 runs allocated (docs/PERFORMANCE.md)."""
    from mpillm.quant import gpu_weight_bytes
    l8 = dummy_config("dummy:llama3-8b")
    s = make_shard(l8, 0, 1)
    assert gpu_weight_bytes(l8, s, "int8", 128) == int8_weight_bytes(l8, s, 128).int8
    assert gpu_weight_bytes(l8, s, "int8", 128, lm_head=True) < gpu_weight_bytes(l8, s, "int8", 128)
    measured = {"none": 14.96, "int8": 8.56, "q4_1": 6.02}        # GiB, CudaTransformer.weight_bytes
    for q, gib in measured.items():
        assert abs(gpu_weight_bytes(l8, s, q) / 2 ** 30 - gib) < 0.02 * gib, q
    # random 4-bit in the Q4_0 layout: 2 bytes of min fewer per 32 projection weights
    proj = 32 * 4096 * (6144 + 4096 + 3 * 14336)
    assert abs(gpu_weight_bytes(l8, s, "q4_1") - gpu_weight_bytes(l8, s, "q4") - proj * 2 / 32) <= 1
    half = [gpu_weight_bytes(l8, make_shard(l8, r, 2), "int8") for r in range(2)]
    assert abs(sum(half) - gpu_weight_bytes(l8, s, "int8")) < 0.001 * sum(half)     # only norms are repeated


def test_gpu_weight_bytes_native_gguf(smollm_gguf):
    from mpillm.quant import gpu_weight_bytes
    ck = open_checkpoint(smollm_gguf)
    s = make_shard(ck.config, 0, 1)
    # Q4_1 projections at 20 B / 32, the Q8_0 table as an int8 LM head beside the bf16 embedding
    # (the H200 run allocated 158,659,200 bytes: rows padded to whole 128-element super-blocks).
    got = gpu_weight_bytes(ck.config, s, "auto", ckpt=ck)
    assert 0.9 * 158_659_200 < got <= 158_659_200
    assert gpu_weight_bytes(ck.config, s, "none", ckpt=ck) == gpu_weight_bytes(ck.config, s)


def test_pick_group_size():
    """--group-size unset: 128 where every rank's int8 shards take it, else 64, else 32; an error otherwise."""
    from dataclasses import replace

    from mpillm.quant import group_size_fits, pick_group_size
    l8 = dummy_config("dummy:llama3-8b")
    assert pick_group_size(l8, 1) == pick_group_size(l8, 4) == 128
    smol = dummy_config("dummy:smollm2-135m")
    assert pick_group_size(smol, 1) == pick_group_size(smol, 2) == 64      # hidden 576 = 9 x 64
    odd = replace(l8, intermediate_size=96 * 7)                           # 672: 32 only
    assert pick_group_size(odd, 1) == 32
    # 9 heads of 64 over 2 ranks: columns [0, 320) and [320, 576); 320 % 128 != 0 even with hidden 1152
    wide = replace(smol, hidden_size=1152, num_heads=9, head_dim=64 * 2, intermediate_size=1536)
    assert not group_size_fits(wide, make_shard(wide, 1, 2), 256)
    with pytest.raises(ValueError, match="no int8 group size"):
        pick_group_size(replace(l8, intermediate_size=100), 1)
