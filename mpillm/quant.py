"""Weight-only INT8 quantization (W8A16): int8 weights, one fp16 scale per group of K elements.

A weight W [N, K] (HF orientation: out_features x in_features) is cut along K into groups of `group_size`
consecutive elements; each group g stores s_g = max|W_g| / 127 as fp16 and q = round(W / s_g) as int8, so
W ~ q * s_g. GGUF's Q8_0 is exactly this scheme with group 32, so its blocks are taken over as they are;
Q4_0/Q4_1 blocks are unpacked to 4-bit codes with their fp16 scales (and mins) for a later 4-bit kernel.

Error bound of `quantize_int8` (per element, s the stored fp16 scale of the element's group):

    |w - q * s| <= s * (1/2 + 127 * 2**-24)              and   max|w_g| / 127 <= s

The scale is max|w_g| / 127 rounded *up* to fp16 (nearest, bumped one fp16 ulp when nearest fell below).
Hence |w / s| <= 127: clipping never bites, and a tiny non-zero group never gets a zero scale. w / s is
one float32 division (relative error <= 2**-24 of a value <= 127) before rounding to the nearest integer
(error <= 1/2); dequantization q * s is exact in float32 (7-bit q times 11-bit s). For a normal fp16 scale,
rounding up costs at most one ulp: s <= max|w_g| / 127 * (1 + 2**-10), so the bound is within 0.1% of
max|w_g| / 254, the best any symmetric 255-level grid can do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

ERROR_BOUND = 0.5 + 127 * 2.0 ** -24     # |w - deq| <= ERROR_BOUND * scale (see the module docstring)
GGUF_BLOCK = 32                          # elements per Q8_0 / Q4_0 / Q4_1 block


def _group_hint(K: int, group_size: int) -> str:
    g = math.gcd(K, group_size)
    return f"use --group-size {g} (it divides {K})" if g > 1 else "use a --group-size that divides it"


def _fp16_scales(amax: np.ndarray) -> np.ndarray:
    """max|w_g| / 127 rounded up to fp16 (so |w / s| <= 127 exactly); 0 only for all-zero groups."""
    amax = amax.astype(np.float64)
    with np.errstate(over="ignore"):                   # overflow -> inf, reported by the caller
        s = (amax / 127).astype(np.float16)
    # s * 127 is exact in float64 (11-bit times 7-bit), so this comparison is exact.
    low = s.astype(np.float64) * 127 < amax
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    return s


def quantize_int8(w: np.ndarray, group_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] float32 -> (q int8 [N, K], scales float16 [N, K / group_size]); symmetric, per group along K."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8 takes a 2-D weight [N, K], got shape {list(w.shape)}")
    N, K = w.shape
    if group_size < 1 or K % group_size:
        raise ValueError(f"cannot quantize a weight of shape [{N}, {K}] in groups of {group_size}: K = {K} is not "
                         f"a multiple of the group size; {_group_hint(K, group_size)}")
    g = w.reshape(N, K // group_size, group_size)
    amax = np.abs(g).max(axis=-1)
    if not np.isfinite(amax).all():
        raise ValueError(f"cannot quantize a weight of shape [{N}, {K}]: it holds inf or NaN")
    scales = _fp16_scales(amax)
    if not np.isfinite(scales).all():
        raise ValueError(f"cannot quantize a weight of shape [{N}, {K}]: max |w| = {amax.max():g} overflows an "
                         f"fp16 scale (max|w| / 127 must stay below 65504)")
    s = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(g / s), 0)            # zero groups: scale 0, q 0
    return np.clip(q, -127, 127).astype(np.int8).reshape(N, K), scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """(q int8 [N, K], scales fp16 [N, K / group_size]) -> float32 [N, K] = q * scale, exact in float32."""
    N, K = q.shape
    if group_size < 1 or K % group_size or scales.shape != (N, K // group_size):
        raise ValueError(f"int8 weight [{N}, {K}] with scales {list(scales.shape)} does not match "
                         f"group size {group_size}")
    out = q.reshape(N, K // group_size, group_size).astype(np.float32) * scales.astype(np.float32)[..., None]
    return out.reshape(N, K)


# -------------------------------------------------------------------------------------------- GGUF blocks

def _blocks(raw: np.ndarray, block_bytes: int, kind: str) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)     # memory-mapped rows are fine; copies only if needed
    if raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"{kind} data must be [rows, blocks * {block_bytes}] bytes, got shape {list(raw.shape)}")
    return raw.reshape(raw.shape[0], -1, block_bytes)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 at byte `at` of every block: [N, blocks]."""
    return np.ascontiguousarray(b[..., at:at + 2]).view(np.float16)[..., 0]


def from_gguf_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows [N, K/32 * 34] (block: fp16 d, 32 x int8) -> (q int8 [N, K], scales fp16 [N, K/32]).

    No requantization: a Q8_0 block is one group of this module's scheme (x = d * q), group size 32."""
    b = _blocks(raw, 34, "Q8_0")
    return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(b.shape[0], -1), _f16(b, 0)


def from_gguf_q4(raw: np.ndarray, kind: str):
    """Q4_0 / Q4_1 rows -> (q uint8 [N, K] in 0..15, scales fp16 [N, K/32], mins fp16 [N, K/32] or None).

    llama.cpp's block: fp16 d (Q4_1: then fp16 m), 16 bytes of nibbles; the low nibbles are elements 0..15,
    the high nibbles 16..31. Q4_0: x = d * (q - 8); Q4_1: x = d * q + m (see `dequantize_q4`)."""
    if kind not in ("Q4_0", "Q4_1"):
        raise ValueError(f"from_gguf_q4: kind must be 'Q4_0' or 'Q4_1', got {kind!r}")
    size = 18 if kind == "Q4_0" else 20
    b = _blocks(raw, size, kind)
    qs = b[..., size - 16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(b.shape[0], -1)
    return q, _f16(b, 0), (_f16(b, 2) if kind == "Q4_1" else None)


def from_gguf_q4_k(raw: np.ndarray):
    """Q4_K rows [N, K/256 * 144] -> (q uint8 [N, K] in 0..15, scales fp16 [N, K/32], mins fp16 [N, K/32]): the Q4_1
    form x = d' q + m', which the 4-bit kernels with mins run (kind "q4").

    llama.cpp's super-block of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales sc_j and mins m_j (j < 4:
    the low 6 bits of bytes j and j + 4; j >= 4: the nibbles of byte j + 4 with the top 2 bits of bytes j - 4 and j),
    then 128 bytes of nibbles: each 64 elements are 32 bytes, low nibbles first (sub-block 2c), high nibbles next
    (2c + 1). Sub-block j of 32 elements holds x = d sc_j q - dmin m_j, so d' = d sc_j and m' = -dmin m_j. Those
    products are rounded to fp16 here, where the gguf package keeps them in float32: each is off by at most half an
    fp16 ulp (2^-11 relative), so a weight is off by at most 2^-11 (15 |d'| + |m'|), under 1% of its quantization step
    d' where |m'| <= 4 d' (about 0.05% of |x| for the largest codes). ValueError where a product overflows fp16."""
    b = _blocks(raw, 144, "Q4_K")
    n, nb = b.shape[:2]
    d = _f16(b, 0).astype(np.float32)[..., None]
    dmin = _f16(b, 2).astype(np.float32)[..., None]
    k = b[..., 4:16]
    sc = np.concatenate([k[..., 0:4] & 63, (k[..., 8:12] & 0x0F) | ((k[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([k[..., 4:8] & 63, (k[..., 8:12] >> 4) | ((k[..., 4:8] >> 6) << 4)], axis=-1)
    qs = b[..., 16:].reshape(n, nb, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb * 256)     # chunk c: low nibbles, then high
    with np.errstate(over="ignore"):
        scales = (d * sc.astype(np.float32)).astype(np.float16).reshape(n, nb * 8)
        mins = (-(dmin * mn.astype(np.float32))).astype(np.float16).reshape(n, nb * 8)
    if not (np.isfinite(scales).all() and np.isfinite(mins).all()):
        raise ValueError("Q4_K: a sub-block's scale or min (d sc, dmin m) overflows fp16")
    return q, scales, mins


def q4_1_form(kind: str, raw: np.ndarray):
    """GGUF Q4_0 / Q4_1 / Q4_K rows as (q, d, m) with x = d q + m (the 4-bit kernels with mins, kind "q4"), so that
    a projection merged from sources of these types packs as one weight. Q4_0's m = -8 d is exact (a power of two)."""
    if kind == "Q4_K":
        return from_gguf_q4_k(raw)
    q, d, m = from_gguf_q4(raw, kind)
    if m is None:
        with np.errstate(over="ignore"):
            m = (d.astype(np.float32) * -8).astype(np.float16)
        if not np.isfinite(m).all():
            raise ValueError("Q4_0: -8 d overflows fp16")
    return q, d, m


def dequantize_q4(q: np.ndarray, scales: np.ndarray, mins: np.ndarray | None = None) -> np.ndarray:
    """4-bit codes [N, K] -> float32: d * (q - 8) without mins (Q4_0), d * q + m with them (Q4_1).

    The float32 operations are llama.cpp's and the gguf package's, in their order, so results are bitwise equal."""
    N, K = q.shape
    if K % GGUF_BLOCK or scales.shape != (N, K // GGUF_BLOCK):
        raise ValueError(f"4-bit codes [{N}, {K}] do not match scales {list(scales.shape)} (blocks of {GGUF_BLOCK})")
    qf = q.reshape(N, -1, GGUF_BLOCK).astype(np.float32)
    d = scales.astype(np.float32)[..., None]
    out = d * (qf - 8.0) if mins is None else d * qf + mins.astype(np.float32)[..., None]
    return out.reshape(N, K)


# ------------------------------------------------------------------------------------- tensor parallelism

def check_group_split(K: int, group_size: int, col_start: int, col_stop: int) -> None:
    """A row-parallel rank holds input columns [col_start, col_stop) of a [N, K] weight. Quantizing that shard
    alone gives the same groups as quantizing the whole weight only when both ends sit on group boundaries."""
    if group_size < 1 or K % group_size:
        raise ValueError(f"K = {K} is not a multiple of the quantization group size {group_size}; "
                         f"{_group_hint(K, group_size)}")
    if not 0 <= col_start < col_stop <= K:
        raise ValueError(f"shard columns [{col_start}, {col_stop}) are not a non-empty range inside K = {K}")
    if col_start % group_size or col_stop % group_size:
        g = math.gcd(group_size, col_start, col_stop)
        raise ValueError(f"a row-parallel shard holds columns [{col_start}, {col_stop}) of K = {K}, which do not "
                         f"fall on quantization group boundaries of {group_size}: a group would straddle two ranks; "
                         f"use --group-size {g} or another --tp")


GROUP_SIZES = (128, 64, 32)     # what --group-size picks from when it is not given, largest first


def group_size_fits(cfg, shard, group_size: int) -> bool:
    """Whether every int8 weight of this rank can be quantized in groups of group_size: each K a multiple of it,
    and each row-parallel shard (o_proj's head columns, down_proj's MLP columns) cut on group boundaries."""
    h, hd = cfg.hidden_size, cfg.head_dim
    spans = [(h, 0, h), (cfg.num_heads * hd, shard.q_lo * hd, shard.q_hi * hd),
             (cfg.intermediate_size, shard.ffn_lo, shard.ffn_hi)]
    try:
        for K, lo, hi in spans:
            check_group_split(K, group_size, lo, hi)
    except ValueError:
        return False
    return True


def pick_group_size(cfg, tp: int = 1) -> int:
    """The largest of GROUP_SIZES that every rank of a TP group can take (128 for Llama shapes; 64 for
    SmolLM2's hidden 576). ValueError naming the shapes when none can."""
    from mpillm.parallel import make_shard
    shards = [make_shard(cfg, r, tp) for r in range(tp)]
    for g in GROUP_SIZES:
        if all(group_size_fits(cfg, s, g) for s in shards):
            return g
    raise ValueError(f"no int8 group size of {', '.join(map(str, GROUP_SIZES))} divides this model's weights at "
                     f"--tp {tp} (hidden {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}, intermediate "
                     f"{cfg.intermediate_size}); try another --tp")


# ------------------------------------------------------------------------------------------------ memory

class WeightBytes(NamedTuple):
    int8: int       # projections int8 + fp16 scales; everything else bf16
    bf16: int       # everything bf16

    @property
    def ratio(self) -> float:
        return self.int8 / self.bf16


def int8_weight_bytes(cfg, shard, group_size: int = 128, lm_head: bool = False) -> WeightBytes:
    """Weight bytes of one rank (`shard` from parallel.make_shard) with W8A16 projections vs all bf16.

    Norms stay bf16; the embedding and LM head are quantized only with `lm_head` (as in the NumPy simulation)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    proj = cfg.num_layers * (h * (shard.n_heads + 2 * shard.n_kv_heads) * hd     # q, k, v
                             + shard.n_heads * hd * h                            # o
                             + 3 * h * (shard.ffn_hi - shard.ffn_lo))            # gate, up, down
    vocab = (shard.vocab_hi - shard.vocab_lo) * h * (1 if cfg.tie_word_embeddings else 2)
    norms = (2 * cfg.num_layers + 1) * h
    q8 = lambda n: n + 2 * n // group_size                                        # noqa: E731  int8 + fp16 scale
    return WeightBytes(int8=q8(proj) + (q8(vocab) if lm_head else 2 * vocab) + 2 * norms,
                       bf16=2 * (proj + vocab + norms))


# ------------------------------------------------------------------------------------ GPU memory

def auto_form(kinds: set) -> str | None:
    """How `--quantize auto` runs a projection merged from sources of these GGUF types (None: a float source):
    "Q8_0" (W8A16 in groups of 32), "Q4_0" / "Q4_1" (W4A16 bit for bit), "Q4_1_FORM" (W4A16 in Q4_1's form,
    q4_1_form: Q4_K, or Q4_0 / Q4_1 merged with another 4-bit type), or None (float: mpillm.layers.load_packed)."""
    if kinds == {"Q8_0"}:
        return "Q8_0"
    if len(kinds) == 1 and kinds <= {"Q4_0", "Q4_1"}:
        return next(iter(kinds))
    if kinds and kinds <= {"Q4_0", "Q4_1", "Q4_K"}:
        return "Q4_1_FORM"
    return None


# Bytes per weight as the GPU holds each auto_form.
FORM_BYTES_PER_WEIGHT = {"Q8_0": 34 / 32, "Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q4_1_FORM": 20 / 32}
# The benchmarks' random 4-bit weights: "q4" in the Q4_0 layout (d only), "q4_1" with a min.
RANDOM_Q4_BYTES_PER_WEIGHT = {"q4": FORM_BYTES_PER_WEIGHT["Q4_0"], "q4_1": FORM_BYTES_PER_WEIGHT["Q4_1"]}


def gpu_weight_bytes(cfg, shard, quantize: str = "none", group_size: int = 128, lm_head: bool = False,
                     ckpt=None) -> int:
    """About the bytes one rank's weights take on the GPU (bf16/fp16 model dtype) for `mpillm run --quantize`:
    projections as quantized; the embedding table always in the model dtype; the LM head quantized with
    int8 + lm_head, or under auto when the file stores it as Q8_0/Q4 (then it is held besides the table).
    "q4" / "q4_1" are the benchmarks' random 4-bit weights. Under auto, each merged projection of each layer as
    auto_form takes its sources' types (a Q4_K_M file mixes Q4_K and Q6_K)."""
    h = cfg.hidden_size
    proj = cfg.num_layers * (h * (shard.n_heads + 2 * shard.n_kv_heads) * cfg.head_dim
                             + shard.n_heads * cfg.head_dim * h + 3 * h * (shard.ffn_hi - shard.ffn_lo))
    vocab = (shard.vocab_hi - shard.vocab_lo) * h
    proj_bytes, head = 2.0 * proj, None
    if quantize in ("int8", *RANDOM_Q4_BYTES_PER_WEIGHT):
        per = 1 + 2 / group_size if quantize == "int8" else RANDOM_Q4_BYTES_PER_WEIGHT[quantize]
        proj_bytes, head = proj * per, (per if lm_head else None)
    elif quantize == "auto" and ckpt is not None:
        # imported here: mpillm.layers imports this module
        from mpillm.layers import projection_sources

        def kind(name):
            got = ckpt.quantized(name)
            return got[0] if got else None

        def count(name, sl, dim):
            return len(range(*sl.indices(ckpt.shape(name)[dim]))) if sl is not None else ckpt.shape(name)[dim]
        proj_bytes = 0.0
        for i in range(cfg.num_layers):
            for sources in projection_sources(cfg, shard, i).values():
                elems = sum(count(n, rows, 0) * count(n, cols, 1) for n, rows, cols in sources)
                proj_bytes += elems * FORM_BYTES_PER_WEIGHT.get(auto_form({kind(n) for n, _, _ in sources}), 2.0)
        name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        head = FORM_BYTES_PER_WEIGHT.get(auto_form({kind(name)}))
    head_bytes = vocab * head if head else (0 if cfg.tie_word_embeddings else 2 * vocab)
    return int(proj_bytes + head_bytes) + 2 * vocab + 2 * (2 * cfg.num_layers + 1) * h


# ------------------------------------------------------------------------------------ GPU packed layout

SB_BYTES = 64            # bytes of one row's super-block: what the 4 lanes of a quad load per step
CHUNK = 32               # elements per chunk: the unit of a scale (int8: a scale per group of chunks)
PACK_KINDS = ("int8", "q4", "q4_0")


class PackedLinear(NamedTuple):
    """A quantized weight [N, K] in the byte order the GPU kernels of cuda_src/gemv_quant.cu read.

    Each row is cut into super-blocks of 64 bytes (int8: 64 elements, 2 chunks; q4, q4_0: 128 elements, 4
    chunks of 32). Lane t (0..3) of a quad loads bytes [16 t, 16 t + 16) of a super-block and owns
    elements 8 t .. 8 t + 7 of every chunk in it, so one 16-byte load feeds tensor-core fragments for whole
    chunks and each chunk's scale multiplies the fp32 result of its own mma:
      int8: byte 16 t + 8 j + e = element 32 j + 8 t + e, signed; x = q * scale[group].
      q4:   word j of the lane's 16 bytes holds chunk j's 8 nibbles in the order e0 e2 e4 e6 e1 e3 e5 e7
            (nibble 0 = low bits), so (word >> 4 p) & 0x000F000F is the pair (e_2p, e_2p+1); x = d q + m.
      q4_0: the same codes; x = d (q - 8).
    Rows are zero-padded to whole super-blocks (K need only be a multiple of 32); padded chunks have zero
    scales.
      int8 scales: float16 [N, ceil(K / group_size)], group_size a power-of-two multiple of 32.
      q4 scales:   float16 [N, n_super_blocks, 4, 2], (d, m) per chunk.
      q4_0 scales: float16 [N, n_super_blocks, 4], d per chunk.
    Packing is a permutation of the same bits: no value is rounded again."""
    kind: str
    n: int
    k: int
    data: np.ndarray          # uint8 [N, n_super_blocks * 64]
    scales: np.ndarray        # see above
    group_size: int           # int8: elements per scale; q4, q4_0: 32

    @property
    def super_blocks(self) -> int:
        return self.data.shape[1] // SB_BYTES

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes


def _check_group_size(K: int, group_size: int) -> None:
    g = group_size // CHUNK
    if group_size < CHUNK or group_size % CHUNK or g & (g - 1):
        raise ValueError(f"group size {group_size}: the GPU kernels take 32, 64, 128, 256, ... (a power of two "
                         f"times 32)")
    if K % group_size:
        raise ValueError(f"K = {K} is not a multiple of the quantization group size {group_size}; "
                         f"{_group_hint(K, group_size)}")


def pack_int8(q: np.ndarray, scales: np.ndarray, group_size: int) -> PackedLinear:
    """(q int8 [N, K], scales fp16 [N, K / group_size]) from quantize_int8 or from_gguf_q8_0 -> PackedLinear."""
    N, K = q.shape
    _check_group_size(K, group_size)
    if scales.shape != (N, K // group_size):
        raise ValueError(f"int8 weight [{N}, {K}]: scales {list(scales.shape)}, expected {[N, K // group_size]}")
    sb = -(-K // 64)
    padded = np.zeros((N, sb * 64), np.int8)
    padded[:, :K] = q
    # [N, sb, j, t, e] -> [N, sb, t, j, e]
    data = padded.reshape(N, sb, 2, 4, 8).transpose(0, 1, 3, 2, 4).reshape(N, sb * 64).view(np.uint8)
    return PackedLinear("int8", N, K, np.ascontiguousarray(data), np.ascontiguousarray(scales, np.float16),
                        group_size)


_Q4_NIBBLES = (0, 2, 4, 6, 1, 3, 5, 7)      # element held by nibble 0..7 of a lane's word


def pack_q4(q: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> PackedLinear:
    """4-bit codes [N, K] (0..15) with fp16 d [N, K/32] and m [N, K/32] (x = d q + m; Q4_1 -> kind "q4") or
    no mins (x = d (q - 8); Q4_0 -> kind "q4_0", d alone: 4.5 bits per weight instead of 5) -> PackedLinear."""
    N, K = q.shape
    if K % CHUNK or scales.shape != (N, K // CHUNK) or (mins is not None and mins.shape != scales.shape):
        raise ValueError(f"4-bit weight [{N}, {K}] does not match scales {list(scales.shape)} in blocks of {CHUNK}")
    sb = -(-K // 128)
    codes = np.zeros((N, sb * 128), np.uint8)
    codes[:, :K] = q
    c = codes.reshape(N, sb, 4, 4, 8)[..., _Q4_NIBBLES]          # [N, sb, j, t, nibble]
    words = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)  # bytes: nibbles (0,1), (2,3), ...
    data = words.transpose(0, 1, 3, 2, 4).reshape(N, sb * 64)    # [N, sb, t, j, 4 bytes]
    if mins is None:
        d = np.zeros((N, sb * 4), np.float16)
        d[:, :K // CHUNK] = scales
        return PackedLinear("q4_0", N, K, np.ascontiguousarray(data), d.reshape(N, sb, 4), CHUNK)
    sm = np.zeros((N, sb * 4, 2), np.float16)
    sm[:, :K // CHUNK, 0] = scales
    sm[:, :K // CHUNK, 1] = mins
    return PackedLinear("q4", N, K, np.ascontiguousarray(data), sm.reshape(N, sb, 4, 2), CHUNK)


def unpack(p: PackedLinear) -> np.ndarray:
    """PackedLinear -> float32 [N, K]: the exact dequantized weight (the GPU kernels' reference)."""
    N, K, sb = p.n, p.k, p.super_blocks
    if p.kind == "int8":
        q = p.data.view(np.int8).reshape(N, sb, 4, 2, 8).transpose(0, 1, 3, 2, 4).reshape(N, sb * 64)[:, :K]
        return dequantize_int8(np.ascontiguousarray(q), p.scales, p.group_size)
    b = p.data.reshape(N, sb, 4, 4, 4).transpose(0, 1, 3, 2, 4)  # [N, sb, j, t, byte]
    nib = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(N, sb, 4, 4, 8)
    codes = np.empty_like(nib)
    codes[..., list(_Q4_NIBBLES)] = nib
    q = codes.reshape(N, sb * 128)[:, :K].astype(np.float32).reshape(N, -1, CHUNK)
    if p.kind == "q4_0":
        d = p.scales.reshape(N, sb * 4)[:, :K // CHUNK].astype(np.float32)
        return ((q - 8) * d[..., None]).reshape(N, K)
    sm = p.scales.reshape(N, sb * 4, 2)[:, :K // CHUNK].astype(np.float32)
    return (q * sm[..., 0:1] + sm[..., 1:2]).reshape(N, K)


def concat_rows(parts: list[PackedLinear]) -> PackedLinear:
    """Stack packed weights along N (merged q/k/v or gate/up); all must share kind, K and group size."""
    first = parts[0]
    for p in parts[1:]:
        if (p.kind, p.k, p.group_size) != (first.kind, first.k, first.group_size):
            raise ValueError(f"cannot merge {p.kind}/K={p.k}/group {p.group_size} rows with "
                             f"{first.kind}/K={first.k}/group {first.group_size}")
    return PackedLinear(first.kind, sum(p.n for p in parts), first.k,
                        np.concatenate([p.data for p in parts]), np.concatenate([p.scales for p in parts]),
                        first.group_size)
