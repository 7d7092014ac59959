"""Checkpoint loading: GGUF tensor types (F32/F16/BF16/Q8_0/Q4_0/Q4_1) against the `gguf` package and against
their quantization error bounds, and the types decoded through it (K-quants and others) against its reader; row /
column slices, tiny llama GGUFs with llama.cpp's Q/K permutation against HF, and the config / pickle refusals."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mpillm.batch import StepInput
from mpillm.checkpoint import CheckpointError, GGUFCheckpoint, open_checkpoint
from mpillm.config import ConfigError, load_hf_config
from mpillm.formats import GGML_TYPES, GGUF_DECODED, GGUFFile, dequantize
from mpillm.model import Transformer

torch.set_num_threads(2)


def assert_close(ours, ref, rel=1e-4, what=""):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err = float(np.abs(ours - ref).max())
    tol = rel * float(np.abs(ref).max()) + 1e-5
    assert err <= tol, f"{what}: max|ours-ref| = {err:.3g} > {tol:.3g}"


def write_gguf(path, tensors, arch="llama", meta=None):
    """tensors: name -> (float32 array in numpy/HF orientation, GGML type), or (uint8 raw blocks [..., bytes], GGML
    type) for a quantized type written as it is. meta: {key: value} added as kv."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (meta or {}).items():
        if k == "general.alignment":
            w.add_custom_alignment(v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            raise TypeError(k)
    for name, (arr, qtype) in tensors.items():
        if arr.dtype == np.uint8 and qtype not in (Q.F32, Q.F16):   # raw blocks [..., bytes], written as they are
            w.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=qtype)
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_roundtrip(arr, qtype):
    """What the `gguf` package itself decodes after quantizing `arr`."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).astype(np.float32)


# --------------------------------------------------------------------------------------------- tensor types

def _f16_err(v):
    """Half an f16 ulp at |v| (normal range: relative 2^-11; subnormals: absolute 2^-25)."""
    return np.maximum(np.abs(v) * 2.0 ** -11, 2.0 ** -25)


def quant_error_bound(x, qtype):
    """Per-element bound on |dequant(quant(x)) - x| for one row x (length a multiple of 32), derived from the
    reference quantizers (ggml-quants.c, mirrored by gguf.quants):
      Q8_0: d = amax/127, q = round(x/d)            -> |err| <= d/2 + 127 * f16err(d)
      Q4_0: d = -xmax/8 (xmax: signed value of largest |x|), q = clip(trunc(x/d + 8.5), 0, 15), x' = d(q-8):
            x/d in [-8, 8]; x/d = 8 (i.e. x = -xmax) would need q = 16, clipped to 15: one full step off
                                                    -> |err| <= |d| + 8 * f16err(d)
      Q4_1: d = (max-min)/15, m = min, q = trunc((x-m)/d + 0.5) in 0..15
                                                    -> |err| <= d/2 + 15 * f16err(d) + f16err(m)
    plus float32 rounding noise."""
    b = x.reshape(-1, 32).astype(np.float64)
    if qtype == Q.Q8_0:
        d = np.abs(b).max(axis=1, keepdims=True) / 127
        bound = d / 2 + 127 * _f16_err(d)
    elif qtype == Q.Q4_0:
        d = np.abs(b).max(axis=1, keepdims=True) / 8
        bound = d + 8 * _f16_err(d)
    elif qtype == Q.Q4_1:
        lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
        d = (hi - lo) / 15
        bound = d / 2 + 15 * _f16_err(d) + _f16_err(lo)
    elif qtype == Q.F16:
        bound = _f16_err(b)
    elif qtype == Q.BF16:
        bound = np.abs(b) * 2.0 ** -8
    else:
        bound = np.zeros_like(b)
    return (np.broadcast_to(bound, b.shape) + 1e-6 * np.abs(b) + 1e-9).reshape(x.shape)


def _test_matrix(rows, cols, seed):
    rs = np.random.RandomState(seed)
    a = rs.randn(rows, cols).astype(np.float32)
    a[0, :32] = 0.0                            # an all-zero block (scale 0)
    a[1, :32] = 2.5                            # a constant block
    a[1, 32:64] = -np.abs(a[1, 32:64])         # all-negative block
    a[2, 5] = 40.0                             # an outlier dominating its block
    a[2, 6] = -40.0                            # ... and its negation in the same block (Q4_0's clipped side)
    a[2, 40] = -40.0                           # a negative outlier
    a[3, :32] *= 1e-3                          # a tiny block: f16-subnormal scales
    return a


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("typed") / "typed.gguf"
    tensors = {}
    for i, t in enumerate(TYPES):
        tensors[f"t.{t.name}"] = (_test_matrix(7, 96, i), t)
        tensors[f"v.{t.name}"] = (np.random.RandomState(50 + i).randn(64).astype(np.float32), t)   # 1-D
    tensors["c3d.Q8_0"] = (np.random.RandomState(9).randn(3, 2, 64).astype(np.float32), Q.Q8_0)      # 3-D
    write_gguf(path, tensors, meta={"general.alignment": 64})
    return path, tensors


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_types_decode_like_gguf_package_and_within_error(typed_gguf, qtype):
    path, tensors = typed_gguf
    f = GGUFFile(str(path))
    for prefix in ("t", "v"):
        name = f"{prefix}.{qtype.name}"
        orig, _ = tensors[name]
        info = f.tensors[name]
        assert info.dtype == qtype.name and info.shape == orig.shape
        assert info.offset % 64 == 0                                   # general.alignment honoured
        ours = dequantize(f.raw(name), info.dtype)
        assert ours.dtype == np.float32 and ours.shape == orig.shape
        np.testing.assert_array_equal(ours, gguf_roundtrip(orig, qtype), err_msg=name)
        err = np.abs(ours.astype(np.float64) - orig)
        if qtype == Q.F32:
            assert err.max() == 0
        else:
            bound = quant_error_bound(orig.reshape(-1) if orig.ndim == 1 else orig, qtype).reshape(orig.shape)
            worst = np.unravel_index(np.argmax(err - bound), err.shape)
            assert (err <= bound).all(), f"{name}: err {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
            assert err.max() > 0                                       # it really is a lossy type
    if qtype == Q.Q4_0:
        # the clipped side: x = -xmax lands one full step (|d| = 40/8 = 5) away; the bound must allow exactly that
        got = dequantize(f.raw("t.Q4_0"), "Q4_0")
        assert abs(got[2, 6] - (-40.0)) > 4.9


def test_gguf_3d_tensor_and_raw_layout(typed_gguf):
    path, tensors = typed_gguf
    f = GGUFFile(str(path))
    orig = tensors["c3d.Q8_0"][0]
    assert f.tensors["c3d.Q8_0"].shape == (3, 2, 64)
    raw = f.raw("c3d.Q8_0")
    assert raw.shape == (3, 2, 2 * 34)
    np.testing.assert_array_equal(dequantize(raw, "Q8_0"), gguf_roundtrip(orig, Q.Q8_0))
    # the same bytes the gguf package wrote
    np.testing.assert_array_equal(raw, gguf.quants.quantize(orig, Q.Q8_0))


def test_our_reader_agrees_with_gguf_reader(typed_gguf):
    path, _ = typed_gguf
    f = GGUFFile(str(path))
    r = gguf.GGUFReader(str(path))
    assert set(f.tensors) == {t.name for t in r.tensors}
    for t in r.tensors:
        mine = f.tensors[t.name]
        assert mine.offset == t.data_offset          # absolute in both
        assert mine.nbytes == t.n_bytes
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
    assert f.metadata["general.architecture"] == "llama"
    assert f.metadata["general.alignment"] == 64



# The types that load as float through the `gguf` package's decoder (formats.GGUF_DECODED): llama.cpp's K-quants and
# the others of its usual quantizations. The gguf package cannot quantize most of them, so the tests write random
# blocks whose fp16 scale fields are set finite (offsets from ggml's block structs).
DECODED = [getattr(Q, n) for n in GGUF_DECODED]
F16_FIELDS = {"Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
              "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def random_blocks(qtype, shape, seed, std=0.05):
    """Random raw blocks [..., bytes] of a tensor of `shape` (elements) whose decoded values have about `std`."""
    block, bsize = gguf.GGML_QUANT_SIZES[qtype]
    *lead, cols = shape
    raw = np.random.RandomState(seed).randint(0, 256, size=(*lead, cols // block, bsize)).astype(np.uint8)

    def set_scales(v):
        for off in F16_FIELDS[qtype.name]:
            raw[..., off:off + 2] = np.frombuffer(np.float16(v).tobytes(), np.uint8)
    set_scales(1.0)
    set_scales(std / float(gguf.quants.dequantize(raw.reshape(*lead, -1), qtype).std()))
    return raw.reshape(*lead, -1)


@pytest.fixture(scope="module")
def decoded_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoded") / "decoded.gguf"
    tensors = {}
    for i, t in enumerate(DECODED):
        tensors[f"t.{t.name}"] = (random_blocks(t, (5, 512), 100 + i), t)
        tensors[f"v.{t.name}"] = (random_blocks(t, (256,), 200 + i), t)                    # 1-D
    write_gguf(path, tensors, meta={"general.alignment": 64})
    return path, tensors


def test_decoded_types_cover_our_table():
    assert set(F16_FIELDS) == set(GGUF_DECODED)
    for tid, (name, block, bsize) in GGML_TYPES.items():                  # ids and block sizes are ggml's
        assert Q(tid).name == name and gguf.GGML_QUANT_SIZES[Q(tid)] == (block, bsize), name


@pytest.mark.parametrize("qtype", DECODED, ids=lambda t: t.name)
def test_gguf_decoded_types_load_as_the_gguf_package_reads_them(decoded_gguf, qtype, monkeypatch):
    import mpillm.formats
    path, tensors = decoded_gguf
    f = GGUFFile(str(path))
    theirs = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for prefix, shape in (("t", (5, 512)), ("v", (256,))):
        name = f"{prefix}.{qtype.name}"
        info = f.tensors[name]
        assert info.dtype == qtype.name and info.shape == shape
        assert info.offset == theirs[name].data_offset and info.nbytes == theirs[name].n_bytes
        raw = f.raw(name)
        np.testing.assert_array_equal(raw, tensors[name][0])                # the bytes written, [..., bytes]
        ours = dequantize(raw, info.dtype)
        want = gguf.quants.dequantize(np.asarray(theirs[name].data), qtype).reshape(shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        np.testing.assert_array_equal(ours, want, err_msg=name)
        assert np.isfinite(ours).all() and 0.03 < float(ours.std()) < 0.08
        for chunk in (300, 1024):                          # decoded a run of rows at a time: one row, two rows
            monkeypatch.setattr(mpillm.formats, "DECODE_CHUNK_ELEMS", chunk)
            np.testing.assert_array_equal(dequantize(raw, info.dtype), want, err_msg=f"{name}, chunk {chunk}")
        monkeypatch.undo()

# ------------------------------------------------------------------------------------- tiny llama as GGUF

HD, NH, NKV = 16, 4, 2


def permute_llama_cpp(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (per head: halves -> interleaved pairs)."""
    out, inp = w.shape[0], w.shape[1]
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _tiny_hf(tied, seed, hidden=64, intermediate=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=NH,
                      num_key_value_heads=NKV, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=tied)
    hf = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.08 * torch.randn(p.shape, generator=g))
    return hf


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def hf_to_gguf(hf, path, types=None, raw=None):
    """Write `hf` as a llama GGUF the way llama.cpp's converter does; `types`: gguf name -> GGML type for
    2-D weights (default F32). Replaces `hf`'s weights by what the GGUF decodes to, so HF stays the reference.
    `raw`: gguf name -> raw blocks in HF orientation, written instead of quantizing (`hf` must already hold what
    they decode to)."""
    types, raw = types or {}, raw or {}
    cfg = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    tensors = {}
    for k, w in sd.items():
        if k == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif k == "model.norm.weight":
            g = "output_norm.weight"
        elif k == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            g = "output.weight"
        else:
            _, _, i, *rest = k.split(".")
            mod = ".".join(rest[:-1])
            g = f"blk.{i}.{GGUF_NAMES[mod]}.{rest[-1]}"
        qtype = types.get(g, Q.F32) if w.ndim == 2 else Q.F32
        if g in raw:
            w = raw[g]                            # rows of blocks: the Q/K permutation moves them like rows
        if ".attn_q." in g:
            w = permute_llama_cpp(w, cfg.num_attention_heads)
        elif ".attn_k." in g:
            w = permute_llama_cpp(w, cfg.num_key_value_heads)
        tensors[g] = (w, qtype)
    write_gguf(path, tensors, meta={
        "llama.block_count": cfg.num_hidden_layers, "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size, "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "llama.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})
    # quantize(permute(w)) == permute(quantize(w)) (blocks run along rows), so HF gets the decoded weights
    with torch.no_grad():
        for k, p in hf.state_dict().items():
            g = next((gn for gn, (w, t) in tensors.items() if _matches(k, gn)), None)
            if g is not None and tensors[g][1] != Q.F32 and g not in raw:
                p.copy_(torch.from_numpy(gguf_roundtrip(sd[k], tensors[g][1])))
    return tensors


def _matches(hf_name, gguf_name):
    from mpillm.checkpoint import _gguf_name
    return _gguf_name(hf_name) == gguf_name


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def _ours(model, ids, bs=8):
    n = -(-len(ids) // bs)
    cache = model.new_cache(n + 1, bs)
    return model.forward(StepInput.build([(ids, 0, list(range(n))[::-1], True)], bs), cache, all_logits=True)


PROMPTS = [[int(t) for t in np.random.RandomState(s).randint(0, 300, n)] for s, n in ((1, 1), (2, 9), (3, 29))]


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    hf = _tiny_hf(tied=False, seed=11)
    path = tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf"
    hf_to_gguf(hf, path)
    return hf, path


QTYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1,
          "ffn_up": Q.F16, "ffn_down": Q.Q4_0, "token_embd": Q.Q4_1}


@pytest.fixture(scope="module")
def tiny_quant(tmp_path_factory):
    hf = _tiny_hf(tied=True, seed=12)
    path = tmp_path_factory.mktemp("tinyq") / "tiny-q.gguf"
    types = {f"blk.{i}.{k}.weight": v for i in range(2) for k, v in QTYPES.items()}
    types["token_embd.weight"] = QTYPES["token_embd"]
    hf_to_gguf(hf, path, types)
    return hf, path


def test_tiny_gguf_f32_matches_hf(tiny_f32):
    hf, path = tiny_f32
    ck = open_checkpoint(path)
    assert isinstance(ck, GGUFCheckpoint) and ck.permuted
    c = ck.config
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == ("llama", 2, NH, NKV, HD, 300)
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.rope_theta == 10000.0 and not c.tie_word_embeddings
    assert c.eos_token_id == [2] and c.bos_token_id == 1
    # HF-named loads come back in HF orientation and order (the Q/K permutation undone exactly)
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(ck.load(k), v.numpy(), err_msg=k)
    model = Transformer(ck)
    for ids in PROMPTS:
        assert_close(_ours(model, ids), _hf_logits(hf, ids), what=f"len {len(ids)}")


def test_tiny_gguf_without_unpermute_is_detectably_wrong(tiny_f32):
    hf, path = tiny_f32
    ck = open_checkpoint(path)
    ck.permuted = False
    ids = PROMPTS[2]
    with pytest.raises(AssertionError):
        assert_close(_ours(Transformer(ck), ids), _hf_logits(hf, ids))


def test_tiny_gguf_quantized_tied_matches_hf(tiny_quant):
    hf, path = tiny_quant
    ck = open_checkpoint(path)
    assert ck.config.tie_word_embeddings and not ck.has("lm_head.weight")
    assert ck.quantized("model.layers.1.self_attn.k_proj.weight")[0] == "Q4_0"
    assert ck.quantized("model.layers.0.mlp.up_proj.weight") is None        # F16 is not "quantized"
    assert ck.quantized("model.embed_tokens.weight")[0] == "Q4_1"
    for k, v in hf.state_dict().items():
        if k != "lm_head.weight":
            np.testing.assert_array_equal(ck.load(k), v.numpy(), err_msg=k)
    model = Transformer(ck)
    for ids in PROMPTS:
        assert_close(_ours(model, ids), _hf_logits(hf, ids), what=f"len {len(ids)}")



# Llama.cpp's K-quants and the other decoded types in one model (dimensions in whole 256-element blocks, also for
# TP 2's row-parallel shards), with a native Q4_0 among them and a Q6_K LM head, as in a Q4_K_M file.
KQTYPES = [{"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q3_K, "ffn_gate": Q.Q2_K,
            "ffn_up": Q.IQ4_XS, "ffn_down": Q.Q6_K},
           {"attn_q": Q.Q5_0, "attn_k": Q.Q5_1, "attn_v": Q.IQ4_NL, "attn_output": Q.Q4_K, "ffn_gate": Q.Q4_K,
            "ffn_up": Q.Q5_K, "ffn_down": Q.Q4_0}]


def write_tiny_typed(path, layer_types, other_types, seed, block_seed):
    """A tiny untied llama (hidden 512: whole 256-element blocks) with the GGML types of layer_types (one dict of
    gguf short names a layer) and other_types (gguf tensor names), written to `path`: random blocks for the decoded
    types, the others quantized by hf_to_gguf. Returns the HF model holding what the file decodes to."""
    from mpillm.checkpoint import _gguf_name
    hf = _tiny_hf(tied=False, seed=seed, hidden=512, intermediate=1024)
    types = {f"blk.{i}.{k}.weight": v for i, lt in enumerate(layer_types) for k, v in lt.items()} | other_types
    raw = {}
    with torch.no_grad():
        for j, (k, p) in enumerate(hf.named_parameters()):
            g = _gguf_name(k)
            if types.get(g) in DECODED:
                raw[g] = random_blocks(types[g], tuple(p.shape), block_seed + j)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(raw[g], types[g])))
    hf_to_gguf(hf, path, types, raw)
    return hf


def write_tiny_kquant(path):
    """The K-quant tiny llama (KQTYPES, a Q6_K LM head, a Q4_K embedding)."""
    return write_tiny_typed(path, KQTYPES, {"output.weight": Q.Q6_K, "token_embd.weight": Q.Q4_K}, 13, 300)


@pytest.fixture(scope="module")
def tiny_kquant(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyk") / "tiny-k.gguf"
    return write_tiny_kquant(path), path


def test_tiny_gguf_decoded_types_match_hf(tiny_kquant):
    from mpillm.layers import load_packed, projection_sources
    from mpillm.parallel import make_shard
    hf, path = tiny_kquant
    ck = open_checkpoint(path)
    assert ck.quantized("model.layers.0.self_attn.v_proj.weight")[0] == "Q6_K"
    assert ck.quantized("lm_head.weight")[0] == "Q6_K"
    for k, v in hf.state_dict().items():                # Q/K rows of blocks un-permuted, every type decoded
        np.testing.assert_array_equal(ck.load(k), v.numpy(), err_msg=k)
    model = Transformer(ck)
    for ids in PROMPTS:
        assert_close(_ours(model, ids), _hf_logits(hf, ids), what=f"len {len(ids)}")
    # --quantize auto keeps them float (no kernel reads their blocks), but for the native Q4_0 down projection and
    # the Q4_K o projection (W4A16 in Q4_1's form: test_q4_k_runs_as_w4a16_in_q4_1_form)
    src = projection_sources(ck.config, make_shard(ck.config, 0, 1), 1)
    assert load_packed(ck, src["qkv"], "auto") is None and load_packed(ck, src["gate_up"], "auto") is None
    assert load_packed(ck, src["down"], "auto").kind == "q4_0" and load_packed(ck, src["o"], "auto").kind == "q4"
    # a row-parallel shard's columns fall on the 256-element blocks; a cut inside one is refused
    name = "model.layers.0.mlp.down_proj.weight"
    full = ck.load(name)
    np.testing.assert_array_equal(ck.load(name, rows=slice(3, 40), cols=slice(512, 1024)), full[3:40, 512:1024])
    with pytest.raises(CheckpointError, match="Q6_K block boundaries"):
        ck.load(name, cols=slice(0, 128))


def test_tiny_gguf_decoded_types_tensor_parallel(tiny_kquant):
    """TP 2 on the NumPy backend (threads as ranks): the same logits as one rank, to the all-reduce's order."""
    from threadcomm import ThreadGroup  # tests/threadcomm.py
    _, path = tiny_kquant
    ck = open_checkpoint(path)
    ids = PROMPTS[2]
    group = ThreadGroup(2)
    models = [Transformer(ck, comm=group.comm(r)) for r in range(2)]
    assert models[0].shard.ffn_hi == 512                 # down_proj cut at column 512: two Q6_K blocks a row
    out = group.run(lambda r: _ours(models[r], ids))
    np.testing.assert_array_equal(out[0], out[1])
    assert_close(out[0], _ours(Transformer(ck), ids), rel=1e-5, what="TP 2 against TP 1")


# Q4_K, which --quantize auto runs as W4A16 in Q4_1's form (quant.q4_1_form), alone (layer 0) and merged with Q4_0
# and Q4_1 (layer 1's q/k/v); with Q6_K (layer 1's gate/up, as a Q4_K_M file has it) a projection stays float.
Q4KTYPES = [dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"), Q.Q4_K),
            {"attn_q": Q.Q4_K, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_K,
             "ffn_up": Q.Q6_K, "ffn_down": Q.Q4_K}]


def write_tiny_q4k(path):
    """The tiny llama of Q4KTYPES (a Q4_K LM head)."""
    return write_tiny_typed(path, Q4KTYPES, {"output.weight": Q.Q4_K}, 17, 500)


def q4k_bound(p):
    """Per weight of a packed kind "q4" weight, what q4_1_form's fp16 rounding of Q4_K's d sc_j and dmin m_j may move
    it: 2^-11 (15 |d'| + |m'|) from its own (d', m') pairs."""
    sm = p.scales.reshape(p.n, -1, 2)[:, :p.k // 32].astype(np.float64)
    return np.repeat(2.0 ** -11 * (15 * np.abs(sm[..., 0]) + np.abs(sm[..., 1])), 32, axis=1)


def test_q4_k_runs_as_w4a16_in_q4_1_form(tmp_path):
    """--quantize auto packs Q4_K projections as kind "q4" (d q + m per 32), alone and merged with Q4_0 / Q4_1 (whose
    values stay exact); each weight within the fp16 rounding bound of the exactly decoded one; a row-parallel shard's
    columns (whole 256-element blocks) pack as the same columns of the whole; Q4_K merged with Q6_K stays float."""
    from mpillm.layers import load_packed, projection_sources
    from mpillm.parallel import make_shard
    from mpillm.quant import gpu_weight_bytes, unpack
    hf = write_tiny_q4k(tmp_path / "q4k.gguf")
    ck = open_checkpoint(tmp_path / "q4k.gguf")
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(ck.load(k), v.numpy(), err_msg=k)
    one = make_shard(ck.config, 0, 1)
    for i in range(2):
        src = projection_sources(ck.config, one, i)
        for key, sources in src.items():
            p = load_packed(ck, sources, "auto")
            if (i, key) == (1, "gate_up"):
                assert p is None
                continue
            want = np.concatenate([ck.load(n, rows=r, cols=c) for n, r, c in sources])
            assert p.kind == "q4", (i, key)
            got = unpack(p)
            assert np.all(np.abs(got - want) <= q4k_bound(p) + 1e-12), (i, key)
            if (i, key) == (1, "o"):                   # Q4_1 alone: bit for bit, as before
                np.testing.assert_array_equal(got, want)
    # Layer 1's q/k/v: the Q4_0 and Q4_1 rows exact, in Q4_1's form
    src = projection_sources(ck.config, one, 1)["qkv"]
    p, q_rows = load_packed(ck, src, "auto"), ck.config.num_heads * ck.config.head_dim
    np.testing.assert_array_equal(unpack(p)[q_rows:], np.concatenate([ck.load(n, rows=r) for n, r, _ in src[1:]]))
    # TP 2: rank 1's down projection columns [512, 1024)
    whole = unpack(load_packed(ck, projection_sources(ck.config, one, 0)["down"], "auto"))
    half = unpack(load_packed(ck, projection_sources(ck.config, make_shard(ck.config, 1, 2), 0)["down"], "auto"))
    np.testing.assert_array_equal(half, whole[:, 512:])
    # The GPU memory estimate counts each merged projection as it loads (5 bits a weight, or float's 16)
    c = ck.config
    h, inter = c.hidden_size, c.intermediate_size
    qkv = h * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    packed = 2 * (qkv + c.num_heads * c.head_dim * h + 3 * h * inter) - 2 * h * inter   # all but layer 1's gate/up
    want = packed * 20 / 32 + 2 * h * inter * 2 + c.vocab_size * h * (20 / 32 + 2) + 2 * (2 * 2 + 1) * h
    assert abs(gpu_weight_bytes(c, one, "auto", ckpt=ck) - want) <= 1


def test_decoded_block_with_a_non_finite_scale_is_refused(tmp_path):
    hf = _tiny_hf(tied=True, seed=14, hidden=256, intermediate=512)
    raw = random_blocks(Q.Q6_K, (256, 512), 7)
    raw[2, 208:210] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)    # row 2's first block: d = inf
    hf_to_gguf(hf, tmp_path / "bad.gguf", {"blk.0.ffn_down.weight": Q.Q6_K}, {"blk.0.ffn_down.weight": raw})
    ck = open_checkpoint(tmp_path / "bad.gguf")
    name = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(ck.load(name, rows=slice(0, 2)), gguf.quants.dequantize(raw[:2], Q.Q6_K))
    for load in (lambda: ck.load(name), lambda: Transformer(ck)):
        with pytest.raises(CheckpointError, match=r"bad\.gguf: tensor 'blk\.0\.ffn_down\.weight' \(Q6_K\).*inf or NaN"):
            load()

# ------------------------------------------------------------------------------------------------ slices

SLICE_NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
               "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight",
               "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
               "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]


@pytest.mark.parametrize("which", ["tiny_f32", "tiny_quant"])
def test_row_and_column_slices_equal_slices_of_full(which, request):
    _, path = request.getfixturevalue(which)
    ck = open_checkpoint(path)
    for name in SLICE_NAMES:
        full = ck.load(name)
        out, inp = full.shape
        row_sets = [slice(HD, 3 * HD), slice(0, HD), slice(out - HD, out)] if "q_proj" in name or "k_proj" in name \
            else [slice(0, 1), slice(3, 17), slice(out - 5, None), slice(0, out)]
        col_sets = [None, slice(32, 64), slice(0, 32), slice(inp - 32, inp)]
        for r in row_sets:
            for c in col_sets:
                got = ck.load(name, rows=r, cols=c)
                want = full[r] if c is None else full[r][:, c]
                np.testing.assert_array_equal(got, want, err_msg=f"{name} rows={r} cols={c}")
    # 1-D tensors (norms) slice by rows too
    n = ck.load("model.layers.0.input_layernorm.weight")
    np.testing.assert_array_equal(ck.load("model.layers.0.input_layernorm.weight", rows=slice(5, 9)), n[5:9])


def test_column_slice_off_block_boundary_raises(tiny_quant, tiny_f32):
    _, path = tiny_quant
    ck = open_checkpoint(path)
    name = "model.layers.0.self_attn.q_proj.weight"                   # Q8_0
    for bad in (slice(16, 48), slice(0, 40), slice(1, 33), slice(0, 64, 2)):
        with pytest.raises(CheckpointError, match="column slice|block"):
            ck.load(name, cols=bad)
    # the same slices are fine on an F32 GGUF (block of one element)
    ckf = open_checkpoint(tiny_f32[1])
    full = ckf.load(name)
    np.testing.assert_array_equal(ckf.load(name, cols=slice(16, 48)), full[:, 16:48])


def test_qk_row_slice_not_on_head_boundary(tiny_f32):
    """A Q/K row slice must come back as that slice of the un-permuted tensor, or be refused; it must not
    silently un-permute rows that straddle two heads."""
    _, path = tiny_f32
    ck = open_checkpoint(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    full = ck.load(name)
    for r in (slice(HD // 2, HD // 2 + HD), slice(3, 3 + 2 * HD), slice(0, HD // 2)):
        try:
            got = ck.load(name, rows=r)
        except CheckpointError:
            continue
        np.testing.assert_array_equal(got, full[r], err_msg=f"rows={r}")


def test_safetensors_slices(tmp_path):
    hf = _tiny_hf(tied=False, seed=3).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ck = open_checkpoint(tmp_path)
    for k, v in hf.state_dict().items():
        full = ck.load(k)
        assert full.dtype == np.float32
        np.testing.assert_array_equal(full, v.float().numpy(), err_msg=k)    # bf16 widened exactly
        if full.ndim == 2:
            np.testing.assert_array_equal(ck.load(k, rows=slice(2, 9), cols=slice(5, 21)), full[2:9, 5:21])


def test_real_model_qk_row_slices(smollm_gguf):
    """The real Q4_1 model: each head range of Q/K, un-permuted on its own, equals that range of the whole."""
    ck = open_checkpoint(smollm_gguf)
    hd = ck.config.head_dim
    for name, heads in (("model.layers.7.self_attn.q_proj.weight", ck.config.num_heads),
                        ("model.layers.7.self_attn.k_proj.weight", ck.config.num_kv_heads)):
        full = ck.load(name)
        assert full.shape == (heads * hd, ck.config.hidden_size)
        for lo, hi in ((0, 1), (1, 3), (heads - 1, heads), (2, heads)):
            np.testing.assert_array_equal(ck.load(name, rows=slice(lo * hd, hi * hd)), full[lo * hd: hi * hd])
        np.testing.assert_array_equal(ck.load(name, rows=slice(hd, 3 * hd), cols=slice(64, 192)),
                                      full[hd:3 * hd, 64:192])


# ------------------------------------------------------------------------------------------ config errors

BASE_CFG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def _dir_with(tmp_path, cfg, files=("model.safetensors",)):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if "model.safetensors" in files:
        from safetensors.numpy import save_file
        save_file({"model.embed_tokens.weight": np.zeros((300, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    for f in files:
        if f != "model.safetensors":
            (tmp_path / f).write_bytes(b"\x80\x04not really a pickle")
    return tmp_path


def test_unsupported_architecture(tmp_path):
    d = _dir_with(tmp_path, dict(BASE_CFG, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError) as e:
        load_hf_config(d)
    assert "architectures" in str(e.value) and "GPT2LMHeadModel" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    assert "architectures" in str(e.value) and "GPT2LMHeadModel" in str(e.value)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_scaling(tmp_path, key):
    cfg = dict(BASE_CFG, **{key: {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                  "rope_theta": 10000.0}})
    d = _dir_with(tmp_path, cfg)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    msg = str(e.value)
    assert "rope_type" in msg and "'yarn'" in msg, msg


def test_legacy_rope_scaling_type_key(tmp_path):
    d = _dir_with(tmp_path, dict(BASE_CFG, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(CheckpointError, match="dynamic"):
        open_checkpoint(d)
    d2 = tmp_path / "lin"
    d2.mkdir()
    _dir_with(d2, dict(BASE_CFG, rope_scaling={"type": "linear", "factor": 2.0}))
    assert open_checkpoint(d2).config.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}


def test_llama3_scaling_missing_field(tmp_path):
    d = _dir_with(tmp_path, dict(BASE_CFG, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(CheckpointError, match="low_freq_factor"):
        open_checkpoint(d)


def test_pickle_only_directory_refused(tmp_path):
    d = _dir_with(tmp_path, BASE_CFG, files=("pytorch_model.bin",))
    with pytest.raises(CheckpointError, match="pickle") as e:
        open_checkpoint(d)
    assert "pytorch_model.bin" in str(e.value)


@pytest.mark.parametrize("name", ["model.bin", "consolidated.pt", "weights.pth"])
def test_pickle_file_refused(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"GGUF" + b"\0" * 60)          # even with a GGUF-looking start: the suffix decides
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(p)


def test_missing_pieces(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(BASE_CFG))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path)
    d = tmp_path / "noconf"
    d.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(d)
    single = tmp_path / "x.safetensors"
    single.write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")
    with pytest.raises(CheckpointError, match="model directory"):
        open_checkpoint(single)


def test_gguf_config_errors(tmp_path):
    emb = {"token_embd.weight": (np.zeros((10, 64), np.float32), Q.F32)}
    meta = {"llama.block_count": 1, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4}
    p = write_gguf(tmp_path / "gpt2.gguf", emb, arch="gpt2", meta={k.replace("llama", "gpt2"): v for k, v in meta.items()})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert "general.architecture" in str(e.value) and "'gpt2'" in str(e.value)
    p = write_gguf(tmp_path / "yarn.gguf", emb, meta=dict(meta, **{"llama.rope.scaling.type": "yarn",
                                                                   "llama.rope.scaling.factor": 4.0}))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert "llama.rope.scaling.type" in str(e.value) and "'yarn'" in str(e.value)
    p = write_gguf(tmp_path / "nohead.gguf", emb, meta={k: v for k, v in meta.items() if "head_count" not in k})
    with pytest.raises(CheckpointError, match="llama.attention.head_count"):
        open_checkpoint(p)
    p = write_gguf(tmp_path / "noemb.gguf", {"output.weight": emb["token_embd.weight"]}, meta=meta)
    with pytest.raises(CheckpointError, match="token_embd"):
        open_checkpoint(p)
    p = write_gguf(tmp_path / "ok.gguf", emb, meta=dict(meta, **{"llama.rope.scaling.type": "linear",
                                                                 "llama.rope.scaling.factor": 4.0}))
    ck = open_checkpoint(p)
    assert ck.config.rope_scaling == {"rope_type": "linear", "factor": 4.0} and ck.config.tie_word_embeddings
    assert ck.config.vocab_size == 10


@pytest.mark.parametrize("tp", [1, 2])
def test_native_blocks_packed_for_the_gpu_equal_float_loads(tiny_quant, tp):
    """load_blocks + load_packed (what --quantize auto/int8 upload) hold exactly the weights load() decodes:
    Q/K rows un-permuted as whole rows of blocks, row-parallel shards cut on block boundaries. Merged
    projections whose sources differ in type (q8_0 q / q4_0 k / q4_1 v; q4_1 gate / f16 up) stay float."""
    from mpillm.layers import Int8Simulated, load_merged, load_packed, projection_sources
    from mpillm.parallel import make_shard
    from mpillm.quant import unpack
    _, path = tiny_quant
    ck = open_checkpoint(path)
    assert ck.load_blocks("model.layers.0.mlp.up_proj.weight") is None                  # F16
    kind, raw = ck.load_blocks("model.layers.1.self_attn.k_proj.weight", rows=slice(HD, 2 * HD))
    assert kind == "Q4_0" and raw.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(raw, kind),
                                  ck.load("model.layers.1.self_attn.k_proj.weight", rows=slice(HD, 2 * HD)))
    for rank in range(tp):
        shard = make_shard(ck.config, rank, tp)
        for i in range(2):
            src = projection_sources(ck.config, shard, i)
            auto = {key: load_packed(ck, s, "auto") for key, s in src.items()}
            assert auto["qkv"] is None and auto["gate_up"] is None
            assert auto["o"].kind == "int8" and auto["o"].group_size == 32 and auto["down"].kind == "q4_0"
            for key in ("o", "down"):
                np.testing.assert_array_equal(unpack(auto[key]), load_merged(ck, src[key]), err_msg=key)
            assert load_packed(ck, src["o"], "none") is None
            for key, s in src.items():              # int8: every projection, as the NumPy simulation has it
                packed = load_packed(ck, s, "int8", 32)
                want = (load_merged(ck, s) if key == "o"          # Q8_0 blocks as they are
                        else load_merged(Int8Simulated(ck, 32), s))
                np.testing.assert_array_equal(unpack(packed), want, err_msg=key)
    with pytest.raises(ValueError, match="quantize mode"):
        load_packed(ck, src["o"], "int4")
