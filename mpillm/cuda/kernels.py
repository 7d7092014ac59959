"""The CUDA kernels of cuda_src/ and one typed launcher per kernel family.

`Kernels(device)` compiles every cuda_src/*.cu once (nvcc through PyCUDA, cached on disk by PyCUDA)
and exposes the launchers as methods. A launcher checks shapes and dtypes (ValueError naming the
argument), does the grid/block arithmetic and enqueues the kernel on the device's stream with a
prepared call. Launchers never synchronise, allocate or copy to/from the host, so a sequence of them
can be captured into a CUDA graph; sizes that the GPU knows but the host does not (the longest query
and context of a batch) are passed in by the caller, and scratch space is preallocated by the caller.

Every kernel is the fp32-math counterpart of a reference in mpillm/ops.py; tests/gpu/test_kernels.py
pins each one against it. This module imports pycuda only when a Kernels object is built, so the
source/option helpers below also serve the CPU-only compile test.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .runtime import CudaDevice, DeviceTensor
from .trace import trace_setting

CUDA_SRC = Path(__file__).resolve().parents[2] / "cuda_src"

# No --use_fast_math: rope needs full-range sincosf and sampling needs accurate logf/expf.
NVCC_OPTIONS = ["-O3", "--std=c++17", "-DNDEBUG", "-lineinfo"]

LOG2E = 1.4426950408889634
MODEL_DTYPES = ("bf16", "f16")

# Block sizes and tile shapes, named once; each must match its #define / template in cuda_src.
EMBEDDING_THREADS = 256
ROPE_THREADS = 128
SILU_THREADS = 256
GEMV_ROWS = 16              # gemv.cu GEMV_ROWS
# Up to 32 rows the bandwidth-bound kernel wins by far (H200, N=14336 K=4096: 2376 GB/s at M=32 against
# 1453 GB/s for the tensor-core GEMM, whose 64-row tiles waste the weight reads on padding).
GEMV_MAX_M = 32
GEMV_THREADS = {1: 256, 2: 256, 4: 256}  # token tiles NT (M <= 8 NT) -> block size, as in gemv.cu GEMV_KERNELS
# Up to 8 tokens (one token tile), no more 16-row tiles than SMs and K of at least GEMV_WIDE_MIN_K: the m1w kernels,
# 16 warps on a tile instead of 8 (gemv.cu GEMV_KERNELS). With a block per SM at most, the blocks' bytes in flight
# are all there is; twice as many warps keep twice as many weight bytes in flight. The q/k/v projection at TP 4
# (Llama-3-8B: 96 tiles) is such a launch: TP 4's per-rank step +4.5% at b=1, +3.7% at b=8 (H100,
# docs/PERFORMANCE.md, fifteenth session). Below GEMV_WIDE_MIN_K a wide block has warps without a 64-element k
# block pair to read. 12 warps where tiles <= 2 x SMs (two blocks per SM) was mixed and not kept.
GEMV_WIDE_THREADS = 512
GEMV_WIDE_MIN_K = 16 * 2 * 64
QGEMV_THREADS = {(8, 1): 256, (8, 2): 256, (8, 4): 256,   # (bits, token tiles) -> block size, as in
                 (4, 1): 256, (4, 2): 256, (4, 4): 128}   # gemv_quant.cu QGEMV_KERNELS (WARPS * 32)
# (format, token tiles, epilogue: "" / "swiglu" / "rope") -> blocks per SM (their launch bounds' min blocks) of
# the kernels whose blocks loop over 16-row tiles (gemv_quant.cu QGEMV_KERNELS / QGEMV_ROPE_KERNELS, PERSIST):
# the launcher gives them that many blocks per SM at most, the same tile count each where it can; the others
# take one tile per block. MPILLM_QGEMV_PERSIST=0: one tile per block for all (the A side of an A/B; a looping
# kernel given one tile per block is the plain loop).
QGEMV_PERSIST = {("8", 1, ""): 2, ("8", 2, ""): 2, ("4s", 1, ""): 2, ("4s", 2, ""): 2,
                 ("8", 1, "swiglu"): 2, ("8", 2, "swiglu"): 2, ("4s", 2, "swiglu"): 2,
                 ("8", 1, "rope"): 3, ("8", 2, "rope"): 2, ("4s", 2, "rope"): 2}
QGEMV_BLOCKS_PER_SM = 2
# The same for the _x1 kernels (below; gemv_quant.cu x1_linear: the MINB of QGEMV_X1_ENTRY / QGEMV_X1_ROPE_ENTRY
# and the _x1n kernels' __launch_bounds__), by (format, epilogue): all of them loop over tiles.
QGEMV_X1_PERSIST = {("8", ""): 2, ("8", "swiglu"): 2, ("8", "rope"): 3, ("4s", ""): 3, ("4s", "swiglu"): 3,
                    ("4s", "rope"): 3, ("4", ""): 3, ("4", "swiglu"): 3, ("4", "rope"): 3}
# Q4_0's plain one-token projections with at most this many tiles per SM take the _x1d kernel (gemv_quant.cu: a
# 5-stage ring at 2 blocks per SM, one tile per block), qgemv_x1_deep; MPILLM_QGEMV_X1_DEEP=0: never (an A/B).
QGEMV_X1_DEEP_PER_SM = 2
# One token, int8, Q4_0 or Q4_1 weights, bf16 activations: the "_x1" kernels (gemv_quant.cu x1_linear) stage x in
# shared memory as fp16 and run the fp16 mma, whose int8 conversion costs 5 instructions per 4 weights against
# bf16's 11, and Q4_0's 5 per 8 against 11 (with the pre-norm folded in: the _x1n kernels,
# Kernels.prenorm_fusable). Every projection takes them (Q4_1 over K >= QGEMV_X1_Q4_1_MIN_K), also where a block
# gets one tile (Q4_0 once kept those on m1: docs/PERFORMANCE.md, tenth and sixteenth sessions). Their dynamic
# shared memory is qgemv_x1_bytes(K, format); up to QGEMV_X1_MAX_BYTES (int8: K <= 32,768; Q4_0: K <= 23,552; Q4_1:
# K <= 20,480), else the m1 kernel.
# MPILLM_QGEMV_X1=0: the m1 kernel always (the A side of an A/B).
QGEMV_X1_MAX_BYTES = 64 * 1024
# Q4_0's _x1 kernels copy each warp step's 128 bytes of scales into a ring after x (gemv_quant.cu x1_linear,
# ring_s), sized for the deepest of them (Q4_0_X1_MAX_STAGES = 5 stages, 8 warps); Q4_1's (format "4") copy 256
# bytes a step, (d, m) of 16 rows, into a ring of the same depth.
Q4_0_X1_SCALE_RING = 5 * 8 * 128
Q4_1_X1_SCALE_RING = 5 * 8 * 256
# The formats with _x1 kernels: int8, Q4_0 (in tiles) and Q4_1 (row-major; also GGUF Q4_K in Q4_1's form).
QGEMV_X1_FORMATS = ("8", "4s", "4")
# Q4_1 takes them only over K >= this (Kernels.qgemv_x1_q4_1_min_k). On small shapes they lost to the m1 kernel
# (H200, b=1, docs/PERFORMANCE.md, twenty-eighth session): SmolLM2-135M's shape (K 576 and 1,536) 1,960 tok/s
# against 2,215 on m1, and 1,957 with only its down projection (K = 1,536) on them; Qwen2.5-0.5B's (K 896 and
# 4,864) 1,546 against 1,503 with every projection on them and the pre-norms folded in, 1,516 with only its down
# projection; Llama-3-8B's (K 4,096 and 14,336) 459 against 400.
QGEMV_X1_Q4_1_MIN_K = 2048
# 9 to 32 tokens of int8 or Q4_0 weights over at least QGEMV_RT_TILES_PER_SM 16-row tiles per SM: the row-tile
# kernels (gemv_quant.cu quant_linear_rt, the "_m2r" / "_m4r" kernels: 8 warps, QGEMV_RT_TILES tiles a block, each
# warp's x of a step serving both). There the one-tile kernels read x from L2 once per 16 rows, 8 bytes per byte
# of Q4_0 weight at M = 32, and held 255 registers; Llama-3-8B's gate/up at M = 32 streamed 871 GB/s (H200). The
# halved grid lost on 256-tile launches (its o and down projections). Q4_0 over at least QGEMV_RT_WIDE_TILES_PER_SM
# tiles per SM (gate/up) takes the "_rw" twins: 4 warps, 4 blocks per SM; below QGEMV_RT_TILES_PER_SM (o and down)
# the "_r1" ones: one tile a block, 8 warps on a 4-stage ring, where quant_linear at 4 token tiles spilled. int8 on
# fewer tiles keeps quant_linear, which won there. MPILLM_QGEMV_RT=0: none of them (an A/B). Kernels.qgemv_rt_tiles
# and qgemv_rt_wide_tiles are the thresholds in tiles (tests set them).
QGEMV_RT_TILES = 2
QGEMV_RT_TILES_PER_SM = 2
QGEMV_RT_WIDE_TILES_PER_SM = 6
QGEMV_RT_FORMATS = ("8", "4s")
# Quantized weights: up to this many rows the small-M kernel runs in tiles of 32 rows (each tile re-reads
# the int8/4-bit weight, still fewer bytes than dequantize-to-bf16 + GEMM); beyond, dequantize + GEMM.
QGEMV_MAX_M = 128
# mpillm.quant.PackedLinear kind -> its format in gemv_quant.cu's kernel names (qgemv{fmt}_..., dequantize{fmt}_...)
QUANT_FORMATS = {"int8": "8", "q4": "4", "q4_0": "4s"}
# name -> (BM, BN, BK, threads, stages), as in gemm.cu GEMM_KERNELS
GEMM_CONFIGS = {
    "large": (128, 128, 64, 256, 3),
    "small": (64, 64, 64, 128, 3),
}
ATTN_BQ, ATTN_BKV, ATTN_THREADS = 64, 64, 128   # attention_prefill.cu
ATTN_HEAD_DIMS = (64, 80, 96, 128)
DECODE_PARTITION = 512      # attention_decode.cu: most keys per split-K partition
DECODE_MAX_PARTS = 1024     # the most partitions per sequence: contexts up to 512K keys
# Small batches spread each sequence's keys over more partitions (at least DECODE_MIN_PART keys each) until the
# grid has about DECODE_SPLIT_BLOCKS_PER_SM blocks per SM, when one partition per DECODE_PARTITION keys would
# occupy fewer than DECODE_SPLIT_BELOW of the SMs (docs/PERFORMANCE.md): Llama-3-8B b=1 at 1,024-token contexts
# +5-7% on H100 and H200; SmolLM2 at ~150 tokens +4-7% on H200, neutral on H100; 8B b=8 (64 blocks, half the
# SMs) lost 2-4%, hence the threshold. A minimum of 64 keys beat 32 and 128 for SmolLM2 b=1 / 8 on an H100 once
# steps ran back to back (1,496 / 11,491 against 1,481 / 11,437 and 1,486 / 11,145 tok/s; the 8B at 1,024 keys
# the same within 0.3%). MPILLM_DECODE_SPLIT (blocks per SM, 0 = off) and MPILLM_DECODE_MIN_PART override the
# first two.
DECODE_MIN_PART = 64
DECODE_PART_ALIGN = 16      # attention_decode.cu: partition lengths are multiples of this
DECODE_SPLIT_BLOCKS_PER_SM = 1.0
DECODE_SPLIT_BELOW = 0.25
# A batch with at least this many (sequence, kv head) pairs per SM fills the GPU without splitting anything:
# each sequence then takes whole DECODE_PARTITION-key partitions (decode_least_part).
DECODE_WHOLE_PARTS_PER_SM = 4
DECODE_OCC_GROUPS = (1, 4, 8)   # attention_decode.cu: group bounds with an "_occ" kernel (more blocks per SM)
DECODE_WAVE_BLOCKS_PER_SM = 2   # blocks per SM of the plain kernel: grids beyond that wave take "_occ"
# Partial-output rows (sequence x partition) an AttentionScratch holds beyond what its context bound needs:
# room for the small-batch split (P x n_seqs <= split blocks / n_kv + n_seqs).
DECODE_SPLIT_ROWS = 512
DECODE_THREADS = 256
DECODE_GROUPS = (1, 4, 8, 16)  # instantiated GQA group bounds
# attention_decode.cu's cluster kernels (sm_90+): DC_CLUSTER blocks per (sequence, kv head), each at most
# DC_MAX_KEYS keys, whose K and V rows it holds in dynamic shared memory at once (in stages of DC_CHUNK keys).
DECODE_CLUSTER = 8
DECODE_CLUSTER_MAX_KEYS = 64
DECODE_CLUSTER_MAX_CTX = DECODE_CLUSTER * DECODE_CLUSTER_MAX_KEYS   # = DECODE_PARTITION: the short-context graphs
DECODE_CLUSTER_CHUNK = 32
DECODE_CLUSTER_GROUPS = (1, 4, 8)   # group bounds with a cluster kernel (its softmax takes a warp per head)
# Batches of at most this share of the SM count in (sequence, kv head) pairs take it (docs/PERFORMANCE.md, H100,
# Llama-3-8B int8 end to end): batch 1 (8 pairs) +4.6%, batch 4 (32) +2.6%, batch 8 (64) -0.7%.
DECODE_CLUSTER_PAIRS_PER_SM = 0.25
SAMPLE_THREADS = 1024
SAMPLE_CANDIDATE_CAP = 4096  # sampling.cu CANDIDATE_CAP


# ---------------------------------------------------------------------------------------------------
# Sources and nvcc options (shared with tests/test_cuda_compile.py)


def kernel_sources() -> dict[str, str]:
    """{file stem: source text} of every cuda_src/*.cu, each compiled as its own module."""
    return {p.stem: p.read_text() for p in sorted(CUDA_SRC.glob("*.cu"))}


def nvcc_command(nvcc: str, source_path: str, arch: str, output_path: str) -> list[str]:
    """The nvcc command line PyCUDA runs for one of our modules (minus PyCUDA's own include dir)."""
    return [nvcc, "--cubin", *NVCC_OPTIONS, "-arch", arch, f"-I{CUDA_SRC}", source_path, "-o", output_path]


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _check(t, name: str, dtype=None, shape=None) -> DeviceTensor:
    """ValueError naming `name` unless t is a DeviceTensor of that dtype (or one of several) and shape
    (None entries match any size)."""
    if not isinstance(t, DeviceTensor):
        raise ValueError(f"{name}: expected a DeviceTensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, str) else tuple(dtype)
        if t.dtype not in allowed:
            raise ValueError(f"{name}: dtype {t.dtype}, expected {' or '.join(allowed)}")
    if shape is not None:
        if len(t.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: shape {t.shape}, expected {want}")
    return t


def _check_aligned(t: DeviceTensor, name: str) -> None:
    if t.ptr % 16:
        raise ValueError(f"{name}: device pointer must be 16-byte aligned for vector loads")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def seed_words(seeds) -> np.ndarray:
    """Per-request 64-bit seeds -> int32 [B, 2] (low word, high word), the layout sample() takes."""
    s = np.asarray(seeds, dtype=np.uint64).reshape(-1)
    words = np.stack([s & np.uint64(0xFFFFFFFF), s >> np.uint64(32)], axis=1).astype(np.uint32)
    return words.view(np.int32)


# ---------------------------------------------------------------------------------------------------
# Decode attention scratch


def attention_scratch_rows(max_seqs: int, max_context_len: int) -> int:
    """Partial-output rows (sequence x partition) of the split-K decode scratch: every sequence of a batch
    of max_seqs at max_context_len keys, plus room for the small-batch split."""
    return max_seqs * max(1, _cdiv(max_context_len, DECODE_PARTITION)) + DECODE_SPLIT_ROWS


def attention_scratch_shapes(max_seqs: int, n_heads: int, head_dim: int, max_context_len: int) -> dict:
    """Shapes (4-byte elements) of the split-K decode scratch for batches up to max_seqs sequences and
    contexts up to max_context_len keys: partial outputs and the per-partition softmax max and sum, laid out
    [n_seqs, n_heads, P(, head_dim)] for the grid's P partitions (a flat buffer of `rows` x n_heads rows),
    and the arrival counters of the partitions of each (sequence, kv head)."""
    rows = attention_scratch_rows(max_seqs, max_context_len)
    return {
        "partial_out": (rows * n_heads, head_dim),
        "partial_max": (rows * n_heads,),
        "partial_sum": (rows * n_heads,),
        "counters": (rows * n_heads,),      # i32: arrivals per (sequence, kv head); zero between launches
    }


def attention_scratch_bytes(max_seqs: int, n_heads: int, head_dim: int, max_context_len: int) -> int:
    return sum(4 * math.prod(s) for s in attention_scratch_shapes(max_seqs, n_heads, head_dim,
                                                                  max_context_len).values())


def decode_partitions(n_seqs: int, n_kv_heads: int, max_context_len: int, sm_count: int, rows: int | None,
                      split_blocks_per_sm: float = DECODE_SPLIT_BLOCKS_PER_SM,
                      min_part: int = DECODE_MIN_PART) -> int:
    """The decode grid's partition count P for a batch of n_seqs sequences of at most max_context_len keys.

    At least enough partitions of DECODE_PARTITION keys to cover max_context_len. When those blocks would
    occupy fewer than DECODE_SPLIT_BELOW of the SMs, more: up to about split_blocks_per_sm * sm_count blocks in
    all, with partitions of at least min_part keys, within the scratch's `rows` (None: no scratch, no split)."""
    need = max(1, _cdiv(max_context_len, DECODE_PARTITION))
    if rows is None or split_blocks_per_sm <= 0 or need * n_kv_heads * n_seqs >= DECODE_SPLIT_BELOW * sm_count:
        return need
    want = _cdiv(int(split_blocks_per_sm * sm_count), n_kv_heads * n_seqs)
    cap = min(_cdiv(max_context_len, min_part), rows // n_seqs, DECODE_MAX_PARTS)
    return max(need, min(want, cap))


def decode_least_part(n_seqs: int, n_kv_heads: int, sm_count: int, small_batch_min: int = DECODE_MIN_PART) -> int:
    """The least keys per partition the decode kernel may give a sequence (it spreads each sequence's keys
    evenly over the grid's P partitions, down to this length).

    Small batches spread keys to occupy the SMs. A batch whose (sequence, kv head) pairs alone fill the GPU
    several times over gains nothing from it and loses much: every partition pays the block's fixed phases and
    a merge. With a 2,048-token bound (P = 4), 256 sequences of ~150 tokens read their cache at 610 GB/s split
    four ways and at 1,229 GB/s whole (H100, docs/PERFORMANCE.md), so such a batch takes whole partitions."""
    if n_seqs * n_kv_heads >= DECODE_WHOLE_PARTS_PER_SM * sm_count:
        return DECODE_PARTITION
    return small_batch_min


def decode_kernel_suffix(blocks: int, group_bound: int, sm_count: int) -> str:
    """"_occ" (the kernel built for 3-4 resident blocks per SM) for a decode grid of more than one wave of the
    plain kernel, whose 2 blocks per SM leave its memory phases too little overlap there; "" otherwise, where
    the plain kernel's extra registers make each block a little faster (docs/PERFORMANCE.md)."""
    if group_bound in DECODE_OCC_GROUPS and blocks > DECODE_WAVE_BLOCKS_PER_SM * sm_count:
        return "_occ"
    return ""


def decode_cluster_fits(group_bound: int, max_context_len: int, compute_capability: tuple[int, int]) -> bool:
    """Whether the cluster kernel can serve a decode launch: sm_90+, a GQA group bound it is built for, contexts
    up to DECODE_CLUSTER_MAX_CTX."""
    return (compute_capability >= (9, 0) and group_bound in DECODE_CLUSTER_GROUPS
            and max_context_len <= DECODE_CLUSTER_MAX_CTX)


def decode_uses_cluster(n_seqs: int, n_kv_heads: int, group_bound: int, max_context_len: int, sm_count: int,
                        compute_capability: tuple[int, int]) -> bool:
    """Whether a decode launch takes the cluster kernel: where it fits, for batches of at most
    DECODE_CLUSTER_PAIRS_PER_SM * sm_count (sequence, kv head) pairs (where it was measured faster). The choice
    does not depend on the scratch, so a graph and an eager launch of the same batch and bound agree."""
    return (decode_cluster_fits(group_bound, max_context_len, compute_capability)
            and n_seqs * n_kv_heads <= DECODE_CLUSTER_PAIRS_PER_SM * sm_count)


def decode_cluster_bytes(head_dim: int, group_bound: int) -> int:
    """Dynamic shared memory of a cluster-kernel launch: a block's K and V rows (16-bit elements), where
    afterwards the P V sums of every key lane go (fp32: DECODE_THREADS / (head_dim / 4) lanes x group x
    head_dim)."""
    kv = 2 * DECODE_CLUSTER_MAX_KEYS * head_dim * 2
    return max(kv, DECODE_THREADS // (head_dim // 4) * group_bound * head_dim * 4)


def _switch(env, name: str) -> bool:
    """An on/off environment switch, on unless set to 0 (the A side of an A/B); anything but 0 or 1 is an error."""
    raw = env.get(name, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{name}: {raw!r}, expected 0 or 1")
    return raw == "1"


def decode_cluster_setting(env) -> bool:
    """Whether small decode batches take the cluster kernel (MPILLM_DECODE_CLUSTER, default 1)."""
    return _switch(env, "MPILLM_DECODE_CLUSTER")


def qgemv_persist_setting(env) -> bool:
    """Whether the QGEMV_PERSIST kernels get fewer blocks than tiles (MPILLM_QGEMV_PERSIST, default 1)."""
    return _switch(env, "MPILLM_QGEMV_PERSIST")


def qgemv_rt_setting(env, sm_count: int) -> int | None:
    """The fewest 16-row tiles for which a 9-32 token int8 / Q4_0 launch takes the row-tile kernels
    (QGEMV_RT_TILES_PER_SM per SM), or None: never (MPILLM_QGEMV_RT=0; default 1)."""
    return QGEMV_RT_TILES_PER_SM * sm_count if _switch(env, "MPILLM_QGEMV_RT") else None


def qgemv_row_tiles(fmt: str, n_tiles: int, rt_tiles: int | None, wide_tiles: int) -> tuple[str, int, int] | None:
    """The quant_linear_rt kernel of a 9-32 token launch over n_tiles 16-row tiles, as (name suffix after m{NT},
    tiles a block, threads), or None for quant_linear: at least rt_tiles tiles take two a block (Q4_0 at least
    wide_tiles on the 4-warp _rw kernels); Q4_0 below that one a block (_r1). rt_tiles None: never."""
    if rt_tiles is None or fmt not in QGEMV_RT_FORMATS:
        return None
    if n_tiles >= rt_tiles:
        return ("rw", QGEMV_RT_TILES, 128) if fmt == "4s" and n_tiles >= wide_tiles else ("r", QGEMV_RT_TILES, 256)
    return ("r1", 1, 256) if fmt == "4s" else None


def qgemv_x1_setting(env) -> bool:
    """Whether one-token int8 / Q4_0 / Q4_1 launches with bf16 activations take the _x1 kernels (MPILLM_QGEMV_X1,
    default 1)."""
    return _switch(env, "MPILLM_QGEMV_X1")


def qgemv_x1_deep_setting(env) -> bool:
    """Whether Q4_0 launches that qgemv_x1_deep picks take the deep-ring _x1d kernel (MPILLM_QGEMV_X1_DEEP, default
    1)."""
    return _switch(env, "MPILLM_QGEMV_X1_DEEP")


def qgemv_x1_deep(fmt: str, epilogue: str, folded: bool, out_dtype: str, n: int, sm_count: int) -> bool:
    """Whether a one-token _x1 launch takes the _x1d kernel: Q4_0, a plain projection (no SwiGLU, rope or folded
    pre-norm) with bf16 output, over at most QGEMV_X1_DEEP_PER_SM tiles per SM, so that each of its blocks gets one
    tile (qgemv_grid at the _x1 kernels' 3 per SM gives one tile a block up to there) and all of them fit one wave
    at the kernel's 2 blocks per SM: Llama-3-8B's o and down projections (256 tiles), not its q/k/v (384)."""
    return (fmt == "4s" and epilogue == "" and not folded and out_dtype == "bf16"
            and _cdiv(n, GEMV_ROWS) <= QGEMV_X1_DEEP_PER_SM * sm_count)


def gemv_wide_setting(env) -> bool:
    """Whether float GEMVs take the wide m1w kernels where they apply (GEMV_WIDE_THREADS; MPILLM_GEMV_WIDE, default
    1)."""
    return _switch(env, "MPILLM_GEMV_WIDE")


def gemv_takes_wide(tiles: int, n: int, k: int, sm_count: int) -> bool:
    """Whether a float GEMV of `tiles` token tiles over w [n, k] runs the wide m1w kernel (GEMV_WIDE_THREADS)."""
    return tiles == 1 and _cdiv(n, GEMV_ROWS) <= sm_count and k >= GEMV_WIDE_MIN_K


def qgemv_x1_bytes(k: int, fmt: str = "8") -> int:
    """Dynamic shared memory of an _x1 launch over K inputs (gemv_quant.cu x1_linear, which traps on less): x as
    fp16 in whole super-blocks, as many as make a whole number of steps for the block's 8 warps: of 64 elements for
    int8 (format "8"); of 128 for Q4_0 ("4s"), each with its 4 chunk biases (fp32, each stored 4 times) after all
    of x, then the ring of scales (Q4_0_X1_SCALE_RING); Q4_1 ("4") as Q4_0 with its 4 chunk sums of x (16 bytes a
    super-block) and a ring of 256 bytes a step (Q4_1_X1_SCALE_RING)."""
    if fmt == "4s":
        return _cdiv(_cdiv(k, 128), 8) * 8 * (128 * 2 + 4 * 16) + Q4_0_X1_SCALE_RING
    if fmt == "4":
        return _cdiv(_cdiv(k, 128), 8) * 8 * (128 * 2 + 5 * 16) + Q4_1_X1_SCALE_RING
    return _cdiv(_cdiv(k, 64), 8) * 8 * 64 * 2


def gemv_prenorm_bytes(k: int) -> int:
    """Dynamic shared memory of a bf16 _m1n launch over K inputs (gemv.cu PRENORM): x' in whole k blocks of 64."""
    return _cdiv(k, 64) * 64 * 2


def prenorm_args(prenorm, hidden: int, dtype: str) -> tuple:
    """The launch arguments of a pre-norm folded into an _x1n kernel, prenorm = (delta, resid_in, resid_out,
    weight, eps): r' = resid_in + delta goes to resid_out (another buffer: every block reads resid_in) and the
    kernel's x is rms_norm(r') * weight (int8: add_rms_norm's bits; Q4_0 and bf16 within bf16 rounding of them).
    ValueError naming the argument that does not fit."""
    delta, resid_in, resid_out, weight, eps = prenorm
    for t, name in ((delta, "delta"), (resid_in, "resid_in"), (resid_out, "resid_out")):
        _check(t, f"prenorm {name}", dtype, (1, hidden))
    _check(weight, "prenorm weight", dtype, (hidden,))
    if resid_out.ptr == resid_in.ptr:
        raise ValueError("prenorm resid_out: must not be resid_in (every block reads resid_in while block 0 writes)")
    if any(t.ptr % 16 for t in (delta, resid_in, resid_out, weight)):
        raise ValueError("prenorm: delta, resid_in, resid_out and weight must be 16-byte aligned")
    return delta.ptr, resid_in.ptr, resid_out.ptr, weight.ptr, float(eps)


def qgemv_grid(n: int, sm_count: int, blocks_per_sm: int = QGEMV_BLOCKS_PER_SM) -> int:
    """Blocks for a tile-looping quantized launch over n weight rows (16-row tiles): at most blocks_per_sm per
    SM, every block the same number of tiles where the count allows (6,144 rows on 132 SMs: 192 blocks of 2
    tiles, not 264 blocks of 1 or 2 in two waves)."""
    n_tiles = _cdiv(n, GEMV_ROWS)
    per_block = _cdiv(n_tiles, blocks_per_sm * sm_count)
    return _cdiv(n_tiles, per_block)


def decode_split_settings(env) -> tuple[float, int]:
    """(blocks per SM, min keys per partition) of the small-batch decode split, from MPILLM_DECODE_SPLIT and
    MPILLM_DECODE_MIN_PART when set."""
    raw_split = env.get("MPILLM_DECODE_SPLIT", str(DECODE_SPLIT_BLOCKS_PER_SM))
    raw_min = env.get("MPILLM_DECODE_MIN_PART", str(DECODE_MIN_PART))
    try:
        split = float(raw_split)
    except ValueError:
        split = -1.0
    if not (split >= 0 and math.isfinite(split)):
        raise ValueError(f"MPILLM_DECODE_SPLIT: {raw_split!r} is not a number >= 0 (blocks per SM; 0 = off)")
    try:
        min_part = int(raw_min)
    except ValueError:
        min_part = 0
    if not (DECODE_PART_ALIGN <= min_part <= DECODE_PARTITION and min_part % DECODE_PART_ALIGN == 0):
        raise ValueError(f"MPILLM_DECODE_MIN_PART: {raw_min!r} is not a multiple of {DECODE_PART_ALIGN} in "
                         f"[{DECODE_PART_ALIGN}, {DECODE_PARTITION}]")
    return split, min_part


class AttentionScratch:
    """Preallocated split-K decode buffers; allocate once (at engine start), pass to every attention()."""

    def __init__(self, max_seqs: int, n_heads: int, head_dim: int, max_context_len: int):
        if _cdiv(max_context_len, DECODE_PARTITION) > DECODE_MAX_PARTS:
            raise ValueError(f"max_context_len: at most {DECODE_MAX_PARTS * DECODE_PARTITION} keys")
        shapes = attention_scratch_shapes(max_seqs, n_heads, head_dim, max_context_len)
        self.max_seqs, self.n_heads, self.head_dim = max_seqs, n_heads, head_dim
        self.max_context_len = max_context_len
        self.rows = attention_scratch_rows(max_seqs, max_context_len)
        self.partial_out = DeviceTensor.empty(shapes["partial_out"], "f32")
        self.partial_max = DeviceTensor.empty(shapes["partial_max"], "f32")
        self.partial_sum = DeviceTensor.empty(shapes["partial_sum"], "f32")
        self.counters = DeviceTensor.zeros(shapes["counters"], "i32")   # the kernel leaves them at zero


# ---------------------------------------------------------------------------------------------------
# Quantized weights on the device


def q4_0_tiles(data: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 codes [N, n_sb * 64] and scale bytes [N, n_sb * 8] (row-major, as mpillm.quant packs them) in the
    device's order ("4s", gemv_quant.cu Q4_0_TILES): N padded with zero rows to whole tiles of 16, and the codes
    tile-major, each tile's super-block sb one contiguous 1 KB (its 16 rows' 64 bytes in row order), so that a
    kernel's warp step streams one run, not 16 runs of 64 bytes a row apart; the scales in tiles too, each tile's
    super-block one run of 128 bytes: its rows' 8 in the order 0, 8, 1, 9, ..., 7, 15 (a lane's rows g and g + 8
    side by side)."""
    n, n_sb = data.shape[0], data.shape[1] // 64
    n_pad = _cdiv(n, GEMV_ROWS) * GEMV_ROWS
    codes = np.zeros((n_pad, n_sb, 64), np.uint8)
    codes[:n] = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, n_sb, 64)
    codes = codes.reshape(n_pad // GEMV_ROWS, GEMV_ROWS, n_sb, 64).transpose(0, 2, 1, 3).reshape(n_pad, n_sb * 64)
    tiled = np.zeros((n_pad, n_sb, 8), np.uint8)
    tiled[:n] = np.ascontiguousarray(scales, dtype=np.uint8).reshape(n, n_sb, 8)
    tiled = tiled.reshape(n_pad // GEMV_ROWS, 2, GEMV_ROWS // 2, n_sb, 8).transpose(0, 3, 2, 1, 4)
    return codes, tiled.reshape(n_pad, n_sb * 8)


class QuantWeight:
    """A mpillm.quant.PackedLinear on the device: what `Kernels.linear` takes in place of a float weight. Q4_0's
    codes are in the kernels' tile order, its rows padded to whole tiles (q4_0_tiles).

    `random(...)` makes one with random codes of a real shape for benchmarks (no host copy of the weight)."""

    def __init__(self, kind: str, n: int, k: int, group_size: int, data: DeviceTensor, scales: DeviceTensor):
        if kind not in QUANT_FORMATS:
            raise ValueError(f"quantized weight kind {kind!r}: expected one of {', '.join(QUANT_FORMATS)}")
        if kind == "q4_0" and (data.shape[0], scales.shape[0]) != (_cdiv(n, GEMV_ROWS) * GEMV_ROWS,) * 2:
            raise ValueError(f"q4_0 weight of {n} rows: data and scales have {data.shape[0]} and {scales.shape[0]} "
                             f"rows; the kernels read whole tiles of {GEMV_ROWS} (q4_0_tiles pads)")
        self.kind, self.n, self.k, self.group_size = kind, n, k, group_size
        self.bits = 8 if kind == "int8" else 4
        self.fmt = QUANT_FORMATS[kind]        # the format in gemv_quant.cu's kernel names
        self.data, self.scales = data, scales
        self.super_blocks = data.shape[1] // 64
        self.n_groups = _cdiv(k, group_size) if kind == "int8" else 0
        self.gshift = int(math.log2(group_size // 32)) if kind == "int8" else 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    @classmethod
    def from_packed(cls, p) -> "QuantWeight":
        data, scales = p.data, np.ascontiguousarray(p.scales).view(np.uint8).reshape(p.n, -1)
        if p.kind == "q4_0":
            data, scales = q4_0_tiles(data, scales)
        return cls(p.kind, p.n, p.k, p.group_size, DeviceTensor.from_numpy(data, "u8"),
                   DeviceTensor.from_numpy(scales, "u8"))

    @classmethod
    def random(cls, kind: str, n: int, k: int, group_size: int, fill) -> "QuantWeight":
        """Codes from `fill(tensor)` (random bytes), every scale 1/512 and min 0."""
        sb = _cdiv(k, 64 if kind == "int8" else 128)
        rows = _cdiv(n, GEMV_ROWS) * GEMV_ROWS if kind == "q4_0" else n    # Q4_0: whole tiles (q4_0_tiles)
        data = DeviceTensor.empty((rows, sb * 64), "u8")
        fill(data)
        scale_bytes = {"int8": _cdiv(k, group_size) * 2, "q4": sb * 16, "q4_0": sb * 8}[kind]
        scales = DeviceTensor.empty((rows, scale_bytes), "u8")
        import pycuda.driver as cuda
        if kind in ("int8", "q4_0"):
            cuda.memset_d16(scales.ptr, 0x1800, scales.nbytes // 2)          # fp16 2^-9
        else:
            cuda.memset_d32(scales.ptr, 0x00001800, scales.nbytes // 4)      # (d, m) = (2^-9, 0)
        return cls(kind, n, k, group_size, data, scales)


# ---------------------------------------------------------------------------------------------------


class Kernels:
    """Compiled kernels plus launchers, bound to one device and its stream."""

    def __init__(self, device: CudaDevice, cache_dir: str | None = None, workers: int | None = None,
                 use_cublaslt: bool = True):
        import pycuda.driver as cuda
        from pycuda.compiler import compile as nvcc_compile

        self.device = device
        self.stream = device.stream
        self._cuda = cuda
        self.decode_split, self.decode_min_part = decode_split_settings(os.environ)
        self.decode_cluster = decode_cluster_setting(os.environ)
        self.qgemv_persist = qgemv_persist_setting(os.environ)
        self.qgemv_rt_tiles = qgemv_rt_setting(os.environ, device.sm_count)
        self.qgemv_rt_wide_tiles = QGEMV_RT_WIDE_TILES_PER_SM * device.sm_count
        self.qgemv_x1 = qgemv_x1_setting(os.environ)
        self.qgemv_x1_q4_1_min_k = QGEMV_X1_Q4_1_MIN_K     # tests lower it to run the kernels on small shapes
        self.qgemv_x1_deep = qgemv_x1_deep_setting(os.environ)
        self.gemv_wide = gemv_wide_setting(os.environ)
        # scripts/bench.py --timeline only: every block stamps its wait and end (mpillm/cuda/trace.py).
        self.trace = trace_setting(os.environ)
        options = list(NVCC_OPTIONS) + (["-DMPILLM_TRACE"] if self.trace else [])
        sources = kernel_sources()
        workers = workers or min(len(sources), os.cpu_count() or 1)

        def build(source: str) -> bytes:
            return nvcc_compile(source, options=options, no_extern_c=True, arch=device.arch,
                                include_dirs=[str(CUDA_SRC)], cache_dir=cache_dir)

        # nvcc runs out of process, so modules compile in parallel; loading needs the context (this thread).
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            cubins = dict(zip(sources, pool.map(build, sources.values())))
        self._modules = {name: cuda.module_from_buffer(cubin) for name, cubin in cubins.items()}
        # Cold: nvcc ran (seconds); warm: PyCUDA's disk cache answered (preprocessing only).
        self.compile_seconds = time.perf_counter() - start
        self._functions: dict[str, object] = {}
        # scripts/bench.py --skip-probe only: the ids of prepared functions whose launches are left out (wrong
        # results; what the rest of the step costs without them). None in every real run.
        self.skip: frozenset[int] | None = None
        # cuBLASLt (nvmath-python) for M > GEMV_MAX_M: faster than our mma.sync GEMM on every shape we
        # measured (docs/PERFORMANCE.md). Without nvmath the own GEMM serves.
        self.blas = None
        if use_cublaslt:
            try:
                from .cublaslt import CublasLt
                self.blas = CublasLt(self.stream)
            except ImportError:
                pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _fn(self, module: str, name: str, arg_format: str, shared: int = 0):
        """Prepared kernel `name` of cuda_src/<module>.cu, looked up once and cached."""
        fn = self._functions.get(name)
        if fn is None:
            fn = self._modules[module].get_function(name)
            fn.prepare(arg_format)
            # Past 48 KB in all (static + dynamic) a kernel needs the opt-in attribute.
            if shared and shared + fn.get_attribute(self._cuda.function_attribute.SHARED_SIZE_BYTES) > 48 * 1024:
                if shared > self.device.max_shared_per_block_optin:
                    raise ValueError(f"{name}: needs {shared} B of shared memory, device allows "
                                     f"{self.device.max_shared_per_block_optin}")
                fn.set_attribute(self._cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
            self._functions[name] = fn
        return fn

    def owns(self, name: str) -> bool:
        """Whether `name` is a kernel of cuda_src launched through this object (so it keeps the PDL contract
        of cuda_src/common.cuh); mpillm/cuda/graphs.py links only such kernels programmatically."""
        return name in self._functions

    def _launch(self, fn, grid, block: int, *args, shared: int = 0) -> None:
        if self.skip is not None and id(fn) in self.skip:
            return
        fn.prepared_async_call(grid, (block, 1, 1), self.stream, *args, shared_size=shared)

    # -- embedding --------------------------------------------------------------------------------
    def embedding(self, out: DeviceTensor, ids: DeviceTensor, table: DeviceTensor, vocab_start: int = 0,
                  fed: DeviceTensor | None = None, zero: DeviceTensor | None = None) -> None:
        """out[T, H] = table[ids - vocab_start], zeros for ids outside this rank's [vocab_start, +V_local).
        With `fed` (i32), an id -1 - j < 0 stands for fed[j] (the previous step's sampled ids on the device).
        zero: a buffer of out's shape and dtype set to zeros in the same kernel."""
        _check(table, "table", MODEL_DTYPES, (None, None))
        v_local, hidden = table.shape
        _check(ids, "ids", "i32", (None,))
        if fed is not None:
            _check(fed, "fed", "i32", (None,))
        n = ids.shape[0]
        _check(out, "out", table.dtype, (n, hidden))
        if zero is not None:
            _check(zero, "zero", table.dtype, (n, hidden))
        if hidden % 8 == 0:
            _check_aligned(table, "table")
            _check_aligned(out, "out")
            if zero is not None:
                _check_aligned(zero, "zero")
        if n == 0:
            return
        fn = self._fn("embedding", "embedding_b16", "PPPPPiii")
        self._launch(fn, (n, 1), EMBEDDING_THREADS, out.ptr, zero.ptr if zero is not None else 0, ids.ptr,
                     fed.ptr if fed is not None else 0, table.ptr, vocab_start, v_local, hidden)

    # -- norms ------------------------------------------------------------------------------------
    def _norm_threads(self, hidden: int, vec: bool) -> int:
        units = hidden // 8 if vec else hidden
        return min(1024, max(32, _cdiv(units, 32) * 32))

    def rms_norm(self, out: DeviceTensor, x: DeviceTensor, weight: DeviceTensor, eps: float) -> None:
        """out[T, H] = x / sqrt(mean(x^2) + eps) * weight (fp32 math). out may alias x."""
        _check(x, "x", MODEL_DTYPES, (None, None))
        n, hidden = x.shape
        _check(out, "out", x.dtype, (n, hidden))
        _check(weight, "weight", x.dtype, (hidden,))
        vec = hidden % 8 == 0 and all(t.ptr % 16 == 0 for t in (out, x, weight))
        if n == 0:
            return
        fn = self._fn("norm", f"rms_norm_{x.dtype}", "PPPifi")
        self._launch(fn, (n, 1), self._norm_threads(hidden, vec), out.ptr, x.ptr, weight.ptr, hidden,
                     float(eps), int(vec))

    def embedding_rms_norm(self, out: DeviceTensor, residual: DeviceTensor, ids: DeviceTensor, table: DeviceTensor,
                           weight: DeviceTensor, eps: float, fed: DeviceTensor | None = None) -> None:
        """residual[T, H] = table[ids] (the whole vocabulary: one GPU; ids < 0 fed as in `embedding`), then
        out = rms_norm(residual) * weight: embedding + rms_norm in one kernel, the same bits."""
        _check(table, "table", MODEL_DTYPES, (None, None))
        vocab, hidden = table.shape
        _check(ids, "ids", "i32", (None,))
        n = ids.shape[0]
        _check(residual, "residual", table.dtype, (n, hidden))
        _check(out, "out", table.dtype, (n, hidden))
        _check(weight, "weight", table.dtype, (hidden,))
        if fed is not None:
            _check(fed, "fed", "i32", (None,))
        vec = hidden % 8 == 0 and all(t.ptr % 16 == 0 for t in (out, residual, table, weight))
        if n == 0:
            return
        fn = self._fn("norm", f"embedding_rms_norm_{table.dtype}", "PPPPPPiifi")
        self._launch(fn, (n, 1), self._norm_threads(hidden, vec), out.ptr, residual.ptr, ids.ptr,
                     fed.ptr if fed is not None else 0, table.ptr, weight.ptr, vocab, hidden, float(eps), int(vec))

    def add_rms_norm(self, out: DeviceTensor, x: DeviceTensor, residual: DeviceTensor, weight: DeviceTensor,
                     eps: float) -> None:
        """residual += x (in place, rounded to the model dtype); out = rms_norm(residual). out may alias x."""
        _check(x, "x", MODEL_DTYPES, (None, None))
        n, hidden = x.shape
        _check(out, "out", x.dtype, (n, hidden))
        _check(residual, "residual", x.dtype, (n, hidden))
        _check(weight, "weight", x.dtype, (hidden,))
        vec = hidden % 8 == 0 and all(t.ptr % 16 == 0 for t in (out, x, residual, weight))
        if n == 0:
            return
        fn = self._fn("norm", f"add_rms_norm_{x.dtype}", "PPPPifi")
        self._launch(fn, (n, 1), self._norm_threads(hidden, vec), out.ptr, x.ptr, residual.ptr, weight.ptr,
                     hidden, float(eps), int(vec))

    # -- rotary embedding + KV-cache store --------------------------------------------------------
    def rope_store_kv(self, qkv: DeviceTensor, positions: DeviceTensor, inv_freq: DeviceTensor,
                      k_cache: DeviceTensor, v_cache: DeviceTensor, slot_mapping: DeviceTensor,
                      n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        """Rotate q and k of qkv[T, (nh + 2 nkv) hd] in place at `positions`, and store k, v of token t in
        cache slot slot_mapping[t] (block = slot // block_size, offset = slot % block_size; < 0 skips).
        Caches: [num_blocks, block_size, nkv, hd]."""
        if head_dim % 2:
            raise ValueError(f"head_dim: {head_dim} must be even")
        _check(qkv, "qkv", MODEL_DTYPES, (None, (n_heads + 2 * n_kv_heads) * head_dim))
        n = qkv.shape[0]
        _check(positions, "positions", "i32", (n,))
        _check(inv_freq, "inv_freq", "f32", (head_dim // 2,))
        _check(k_cache, "k_cache", qkv.dtype, (None, None, n_kv_heads, head_dim))
        _check(v_cache, "v_cache", qkv.dtype, k_cache.shape)
        _check(slot_mapping, "slot_mapping", "i32", (n,))
        self._rope(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, n_heads, n_kv_heads, head_dim)

    def _rope(self, qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, n_heads, n_kv_heads, head_dim,
              src: DeviceTensor | None = None) -> None:
        """rope_store_kv, shapes checked; src: read the pairs from a per-head interleaved projection there."""
        n = qkv.shape[0]
        if n == 0:
            return
        pairs = (n_heads + 2 * n_kv_heads) * (head_dim // 2)      # one thread per pair (rope_kv.cu)
        grid = (n, _cdiv(pairs, ROPE_THREADS))
        if src is None:
            fn = self._fn("rope_kv", f"rope_store_kv_{qkv.dtype}", "PPPPPPiii")
            self._launch(fn, grid, ROPE_THREADS, qkv.ptr, positions.ptr, inv_freq.ptr, k_cache.ptr, v_cache.ptr,
                         slot_mapping.ptr, n_heads, n_kv_heads, head_dim)
        else:
            _check(src, "interleaved_out", qkv.dtype, qkv.shape)
            # Four pairs per thread (16-byte loads) where the head splits into whole quads and rows are aligned.
            quad = head_dim % 8 == 0 and src.ptr % 16 == 0 and qkv.ptr % 8 == 0 \
                and k_cache.ptr % 8 == 0 and v_cache.ptr % 8 == 0
            if quad:
                grid = (n, _cdiv(pairs // 4, ROPE_THREADS))
            fn = self._fn("rope_kv", f"rope_store_kv_interleaved{'_quad' if quad else ''}_{qkv.dtype}", "PPPPPPPiii")
            self._launch(fn, grid, ROPE_THREADS, qkv.ptr, src.ptr, positions.ptr, inv_freq.ptr, k_cache.ptr,
                         v_cache.ptr, slot_mapping.ptr, n_heads, n_kv_heads, head_dim)

    # -- activation -------------------------------------------------------------------------------
    def silu_mul(self, out: DeviceTensor, gate_up: DeviceTensor, interleaved: bool = False) -> None:
        """out[T, I] = silu(gate) * up, with gate_up[T, 2I] = [gate | up], or, interleaved, [g0 u0 g1 u1 ...]
        (the GPU model's layout: see linear_swiglu)."""
        _check(gate_up, "gate_up", MODEL_DTYPES, (None, None))
        n, width = gate_up.shape
        if width % 2:
            raise ValueError(f"gate_up: last dimension {width} must be even (gate | up)")
        inter = width // 2
        _check(out, "out", gate_up.dtype, (n, inter))
        if interleaved:
            if n * inter == 0:
                return
            vec = inter % 8 == 0 and out.ptr % 16 == 0 and gate_up.ptr % 16 == 0
            blocks = min(_cdiv(n * inter // (8 if vec else 1), SILU_THREADS), self.device.sm_count * 16)
            fn = self._fn("activation", f"silu_mul_pairs_{gate_up.dtype}", "PPiii")
            self._launch(fn, (blocks, 1), SILU_THREADS, out.ptr, gate_up.ptr, n, inter, int(vec))
            return
        vec = inter % 8 == 0 and out.ptr % 16 == 0 and gate_up.ptr % 16 == 0
        total = n * (inter // 8 if vec else inter)
        if total == 0:
            return
        # Grid-stride loop: enough blocks to fill every SM several times over, no more.
        blocks = min(_cdiv(total, SILU_THREADS), self.device.sm_count * 16)
        fn = self._fn("activation", f"silu_mul_{gate_up.dtype}", "PPiii")
        self._launch(fn, (blocks, 1), SILU_THREADS, out.ptr, gate_up.ptr, n, inter, int(vec))

    def prenorm_fusable(self, w, dtype: str, m: int, hidden: int) -> bool:
        """Whether linear_swiglu / linear_rope can take `prenorm` for this weight: one token of bf16 x, hidden a
        multiple of 8 up to 8,192, and int8, Q4_0 or Q4_1 weights (the _x1n kernels; int8: norm.cu's block of at
        most 1,024 threads, one 8-element vector each, is what the kernel replays; Q4_0 and Q4_1 apply the norm's
        scale to their sums, gemv_quant.cu stage_x_half's FOLD) or bf16 weights on the 8-warp GEMV (the _m1n
        kernels, gemv.cu PRENORM: the scale on the sums too; not the wide block)."""
        if m != 1 or dtype != "bf16" or hidden % 8 or hidden > 8 * 1024:
            return False
        if isinstance(w, QuantWeight):
            return self._takes_x1(w, dtype, m) and w.k == hidden
        n, k = w.shape
        return (w.dtype == "bf16" and k == hidden
                and not (self.gemv_wide and gemv_takes_wide(1, n, k, self.device.sm_count)))

    def prenorm_reads_early(self, w) -> bool:
        """Whether the folded pre-norm of w's kernel reads the residual before its PDL wait (int8's replay, for its
        bits: gemv_quant.cu PreNormStage), so that the kernel before it must start it late (pdl_begin_late, as the
        quantized projections do). The other folds read everything after their wait."""
        return isinstance(w, QuantWeight) and w.fmt == "8"

    def starts_dependents_late(self, w, dtype: str, m: int) -> bool:
        """Whether the kernel of w for m tokens of dtype lets the next kernel start only once its own PDL wait has
        returned (common.cuh pdl_begin_late), as a kernel that reads the residual before its wait needs of the one
        before it (prenorm_reads_early): every quantized projection's kernel but Q4_0's and Q4_1's _x1 ones
        (gemv_quant.cu x1_linear), which let the next kernel's blocks in first. Float weights' kernels: pdl_begin,
        not late."""
        return isinstance(w, QuantWeight) and not (w.fmt in ("4s", "4") and self._takes_x1(w, dtype, m))

    def _takes_x1(self, w: "QuantWeight", dtype: str, rows: int) -> bool:
        """Whether `rows` tokens of x against w run an _x1 kernel: one bf16 token, int8, Q4_0 or Q4_1 weights (Q4_1
        over K >= qgemv_x1_q4_1_min_k), x fitting the kernel's shared memory, MPILLM_QGEMV_X1 on."""
        return (self.qgemv_x1 and rows == 1 and w.fmt in QGEMV_X1_FORMATS and dtype == "bf16"
                and (w.fmt != "4" or w.k >= self.qgemv_x1_q4_1_min_k)
                and qgemv_x1_bytes(w.k, w.fmt) <= QGEMV_X1_MAX_BYTES)

    def linear_swiglu(self, act: DeviceTensor, x: DeviceTensor, w, gate_up: DeviceTensor,
                      scratch: DeviceTensor | None = None, prenorm=None) -> None:
        """act[M, I] = silu(x @ w_gate^T) * (x @ w_up^T) for a merged gate/up weight w[2I, K] whose rows are
        interleaved (row 2i = gate_i, 2i + 1 = up_i).

        Small M (the float GEMV's or the quantized kernel's range): one kernel, whose epilogue pairs the rows
        (no gate_up round trip, one launch fewer per layer). Larger M: the GEMM into `gate_up` [M, 2I], then
        silu_mul on the pairs. Both round gate and up to the model dtype before SiLU: the same bits.

        prenorm (delta, resid_in, resid_out, weight, eps; where prenorm_fusable): x is not read but made in the
        kernel as add_rms_norm(x, delta, resid_in, weight) would (int8: its bits; Q4_0 and bf16: rstd applied to
        the sums, within bf16 rounding), the sum r' going to resid_out instead."""
        quant = isinstance(w, QuantWeight)
        n, k = w.shape
        m = x.shape[0]
        if prenorm is not None and not self.prenorm_fusable(w, x.dtype, m, k):
            raise ValueError(f"prenorm: needs one bf16 token, hidden <= 8192 and int8, Q4_0 or bf16 weights on the "
                             f"8-warp kernel (M={m}, {x.dtype})")
        if n % 2:
            raise ValueError(f"w: {n} rows; a merged gate/up weight has an even number")
        _check(act, "act", x.dtype, (m, n // 2))
        _check(gate_up, "gate_up", x.dtype, (m, n))
        if m > (QGEMV_MAX_M if quant else GEMV_MAX_M):
            self.linear(gate_up, x, w, scratch=scratch)
            self.silu_mul(act, gate_up, interleaved=True)
            return
        _check(x, "x", MODEL_DTYPES, (None, k))
        _check_aligned(x, "x")
        if m == 0:
            return
        if quant:
            self._qgemv(act, x, w, 0, swiglu=True, prenorm=prenorm)
            return
        _check(w, "w", x.dtype, (n, k))
        if k % 8:
            raise ValueError(f"w: K = {k} must be a multiple of 8 (16-byte loads)")
        _check_aligned(w, "w")
        self._gemv(act, x, w, 0, swiglu=True, prenorm=prenorm)

    def linear_rope(self, qkv: DeviceTensor, x: DeviceTensor, w, bias: DeviceTensor | None,
                    positions: DeviceTensor, inv_freq: DeviceTensor, k_cache: DeviceTensor, v_cache: DeviceTensor,
                    slot_mapping: DeviceTensor, n_heads: int, n_kv_heads: int, head_dim: int,
                    interleaved_out: DeviceTensor, scratch: DeviceTensor | None = None, prenorm=None) -> None:
        """The q/k/v projection followed by rope_store_kv, for a weight (and bias) whose rows are interleaved
        per head (row 2i = element i, 2i + 1 = element i + head_dim/2; see rope_interleave): qkv [M, N] gets
        q, k, v in the natural order, q and k rotated, and k, v go to the cache, as linear + rope_store_kv
        give them for the natural weight (the same bits).

        Small M (the float GEMV's or the quantized kernel's range): one kernel, rotation and store in its
        epilogue. Larger M: the GEMM into `interleaved_out` [>= M, N] (model dtype), then the rope kernel
        reading its pairs from there. prenorm: as in linear_swiglu."""
        quant = isinstance(w, QuantWeight)
        n, k = w.shape
        m = x.shape[0]
        if prenorm is not None and not self.prenorm_fusable(w, x.dtype, m, k):
            raise ValueError(f"prenorm: needs one bf16 token, hidden <= 8192 and int8, Q4_0 or bf16 weights on the "
                             f"8-warp kernel (M={m}, {x.dtype})")
        if head_dim % 2 or n != (n_heads + 2 * n_kv_heads) * head_dim:
            raise ValueError(f"w: {n} rows for {n_heads} + 2 x {n_kv_heads} heads of {head_dim} (even)")
        _check(qkv, "qkv", x.dtype, (m, n))
        _check(positions, "positions", "i32", (m,))
        _check(inv_freq, "inv_freq", "f32", (head_dim // 2,))
        _check(k_cache, "k_cache", x.dtype, (None, None, n_kv_heads, head_dim))
        _check(v_cache, "v_cache", x.dtype, k_cache.shape)
        _check(slot_mapping, "slot_mapping", "i32", (m,))
        if m > (QGEMV_MAX_M if quant else GEMV_MAX_M):
            _check(interleaved_out, "interleaved_out", x.dtype, (None, None))
            if interleaved_out.numel < m * n:
                raise ValueError(f"interleaved_out: {interleaved_out.numel} elements, {m} x {n} needed")
            tmp = interleaved_out.view(0, (m, n))
            self.linear(tmp, x, w, bias, scratch=scratch)
            self._rope(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, n_heads, n_kv_heads, head_dim, tmp)
            return
        _check(x, "x", MODEL_DTYPES, (None, k))
        _check_aligned(x, "x")
        if bias is not None:
            _check(bias, "bias", x.dtype, (n,))
        if m == 0:
            return
        bias_ptr = 0 if bias is None else bias.ptr
        rope = (positions, inv_freq, slot_mapping, k_cache, v_cache, n_heads, n_kv_heads, head_dim)
        if quant:
            self._qgemv(qkv, x, w, bias_ptr, rope=rope, prenorm=prenorm)
            return
        _check(w, "w", x.dtype, (n, k))
        if k % 8:
            raise ValueError(f"w: K = {k} must be a multiple of 8 (16-byte loads)")
        _check_aligned(w, "w")
        self._gemv(qkv, x, w, bias_ptr, rope=rope, prenorm=prenorm)

    # -- linear -----------------------------------------------------------------------------------
    def linear(self, y: DeviceTensor, x: DeviceTensor, w, bias: DeviceTensor | None = None,
               path: str | None = None, scratch: DeviceTensor | None = None, send: tuple | None = None) -> None:
        """y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), fp32 accumulation; y in the model dtype or f32.

        Float w: M <= GEMV_MAX_M (32) runs the bandwidth-bound small-M kernel, larger M the tensor-core GEMM.
        `path` ("gemv", "gemm" or "cublaslt") forces one (tests, benchmarks).
        QuantWeight w: see linear_quant (`scratch` serves its dequantize path).
        send (where gemv_sends says so): (table, slot_bytes, rank, world) of the fused all-reduce that follows
        (IpcAllReduce.send_args); the kernel also sends y into the peers' buffers of that all-reduce, which must
        then be told `sent`.
        """
        if send is not None and not self.gemv_sends(w, y, x.shape[0]):
            raise ValueError("send: only the small-M kernel of a float weight into y of its dtype, or the one-token "
                             "kernel of an int8 or Q4_0 weight into bf16, sends its output")
        if isinstance(w, QuantWeight):
            self.linear_quant(y, x, w, bias, path, scratch, send=send)
            return
        _check(w, "w", MODEL_DTYPES, (None, None))
        n, k = w.shape
        _check(x, "x", w.dtype, (None, k))
        m = x.shape[0]
        _check(y, "y", (w.dtype, "f32"), (m, n))
        if bias is not None:
            _check(bias, "bias", w.dtype, (n,))
        if k % 8:
            raise ValueError(f"w: K = {k} must be a multiple of 8 (16-byte loads)")
        _check_aligned(x, "x")
        _check_aligned(w, "w")
        if m == 0 or n == 0:
            return
        if path is None:
            # cuBLASLt rejects a model-dtype bias with an f32 output (never used: the LM head has no bias).
            blas = self.blas is not None and not (bias is not None and y.dtype == "f32")
            path = "gemv" if m <= GEMV_MAX_M else ("cublaslt" if blas else "gemm")
        if path == "cublaslt":
            self.blas.matmul(y, x, w, bias)
            return
        suffix = f"{w.dtype}_{y.dtype}"
        bias_ptr = 0 if bias is None else bias.ptr
        if path == "gemv":
            self._gemv(y, x, w, bias_ptr, send=send)
        elif send is not None:
            raise ValueError(f"send: path {path!r} cannot send its output")
        elif path == "gemm":
            cfg = self._gemm_config(m, n)
            bm, bn, bk, threads, stages = GEMM_CONFIGS[cfg]
            shared = stages * (bm + bn) * (bk + 8) * 2
            fn = self._fn("gemm", f"gemm_{suffix}_{cfg}", "PPPPiii", shared)
            self._launch(fn, (_cdiv(m, bm) * _cdiv(n, bn), 1), threads, y.ptr, x.ptr, w.ptr, bias_ptr, m, n, k,
                         shared=shared)
        else:
            raise ValueError(f"path: {path!r}, expected 'gemv', 'gemm', 'cublaslt' or None")

    def linear_quant(self, y: DeviceTensor, x: DeviceTensor, w: QuantWeight, bias: DeviceTensor | None = None,
                     path: str | None = None, scratch: DeviceTensor | None = None, send: tuple | None = None) -> None:
        """y[M, N] = x[M, K] @ deq(w)^T (+ bias) for a W8A16 / W4A16 weight.

        path "qgemv" (default up to QGEMV_MAX_M rows): the fused kernel of gemv_quant.cu, exact dequantized
        weights, in tiles of 32 rows. path "dequant" (default beyond): dequantize w into `scratch` (model
        dtype, >= N * K elements; each weight rounded once to it) and run the float GEMM. send: as linear's (the
        one-token kernels only, gemv_sends)."""
        _check(x, "x", MODEL_DTYPES, (None, w.k))
        m, n, k = x.shape[0], w.n, w.k
        _check(y, "y", (x.dtype, "f32"), (m, n))
        if bias is not None:
            _check(bias, "bias", x.dtype, (n,))
        if k % 32:
            raise ValueError(f"w: K = {k} must be a multiple of 32 (quantized chunks)")
        _check_aligned(x, "x")
        if m == 0 or n == 0:
            return
        if path is None:
            path = "qgemv" if m <= QGEMV_MAX_M else "dequant"
        if send is not None and (path != "qgemv" or not self.gemv_sends(w, y, m) or x.dtype != "bf16"):
            raise ValueError(f"send: path {path!r} with {m} rows of {x.dtype} x cannot send its output")
        if path == "dequant":
            if scratch is None or scratch.dtype != x.dtype or scratch.numel < n * k:
                raise ValueError(f"scratch: a {x.dtype} buffer of at least {n * k} elements is needed to dequantize "
                                 f"a [{n}, {k}] weight for M = {m}")
            dense = scratch.view(0, (n, k))
            self.dequantize(dense, w)
            self.linear(y, x, dense, bias)
            return
        if path != "qgemv":
            raise ValueError(f"path: {path!r}, expected 'qgemv', 'dequant' or None")
        self._qgemv(y, x, w, 0 if bias is None else bias.ptr, send=send)

    # The small-M kernels, shapes already checked. y has N columns, or N / 2 with swiglu (linear_swiglu).
    # rope (linear_rope): (positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim), the epilogue's
    # extra arguments; positions and slots are per row of x, so each tile points at its own.
    @staticmethod
    def _rope_args(rope, lo: int) -> tuple:
        if rope is None:
            return ()
        positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim = rope
        return (positions.ptr + 4 * lo, inv_freq.ptr, slots.ptr + 4 * lo, k_cache.ptr, v_cache.ptr, n_heads, n_kv,
                head_dim)

    def gemv_sends(self, w, y: DeviceTensor, m: int) -> bool:
        """Whether linear(y, x, w) with M = m rows can send y itself (`send`), in whole 16-byte vectors per row: the
        small-M kernel of a float weight with y in its dtype, or the one-token kernel (_x1, _x1d) of an int8 or
        Q4_0 weight with bf16 x and y. (Q4_1's _x1 kernels have no send twin: not yet run on two GPUs.)"""
        if y.ptr % 16 or w.shape[0] % 8:
            return False
        if isinstance(w, QuantWeight):
            return y.dtype == "bf16" and w.fmt != "4" and self._takes_x1(w, "bf16", m)
        return 0 < m <= GEMV_MAX_M and y.dtype == w.dtype

    @staticmethod
    def _send_args(send, y: DeviceTensor) -> tuple:
        """A send kernel's trailing arguments (table, slot_bytes, rank, world) from linear's `send`; ValueError when
        y does not fit the all-reduce's slots (each byte of a message takes two there)."""
        table, slot_bytes, rank, world = send
        if 2 * y.nbytes > slot_bytes:
            raise ValueError(f"send: y is {y.nbytes} bytes; the all-reduce's slots take {slot_bytes // 2}")
        return (table.ptr, slot_bytes, rank, world)

    def _gemv(self, y: DeviceTensor, x: DeviceTensor, w: DeviceTensor, bias_ptr: int, swiglu: bool = False,
              rope=None, send=None, prenorm=None) -> None:
        """prenorm (callers checked prenorm_fusable: one bf16 token, not the wide block): the _m1n kernel."""
        m, (n, k) = x.shape[0], w.shape
        tiles = next((nt for nt in GEMV_THREADS if m <= 8 * nt), None)
        if tiles is None:
            raise ValueError(f"x: gemv path takes at most {8 * max(GEMV_THREADS)} rows, got {m}")
        extra = ()
        if rope is not None:
            name, fmt = f"gemv_rope_{w.dtype}_m{tiles}", "PPPPiiiPPPPPiii"
            extra = self._rope_args(rope, 0)
        elif send is not None:
            name, fmt = f"gemv_send_{w.dtype}_m{tiles}", "PPPPiiiPQii"
            extra = self._send_args(send, y)
        else:
            name, fmt = f"gemv{'_swiglu' if swiglu else ''}_{w.dtype}_{y.dtype}_m{tiles}", "PPPPiii"
        threads, shared = GEMV_THREADS[tiles], 0
        if prenorm is not None:
            name, fmt, shared = name + "n", fmt + "PPPPf", gemv_prenorm_bytes(k)
            extra += prenorm_args(prenorm, k, x.dtype)
        elif self.gemv_wide and gemv_takes_wide(tiles, n, k, self.device.sm_count):
            name, threads = name + "w", GEMV_WIDE_THREADS
        self._launch(self._fn("gemv", name, fmt), (_cdiv(n, GEMV_ROWS), 1), threads, y.ptr, x.ptr,
                     w.ptr, bias_ptr, m, n, k, *extra, shared=shared)

    def _qgemv(self, y: DeviceTensor, x: DeviceTensor, w: QuantWeight, bias_ptr: int, swiglu: bool = False,
               rope=None, prenorm=None, send=None) -> None:
        """In tiles of 32 rows of x (the kernel's largest token tiling), each pointing at its rows of x and y.
        prenorm (callers checked prenorm_fusable: one token): the _x1n kernel. send (callers checked gemv_sends:
        one token, a plain projection): the _x1 / _x1d kernel's send twin."""
        m, n, k, width = x.shape[0], w.n, w.k, y.shape[1]
        extra = () if prenorm is None else prenorm_args(prenorm, k, x.dtype)
        sending = () if send is None else self._send_args(send, y)
        n_tiles = _cdiv(n, GEMV_ROWS)
        for lo in range(0, m, 32):
            rows = min(32, m - lo)
            tiles = next(nt for nt in GEMV_THREADS if rows <= 8 * nt)
            # one token of int8, Q4_0 or Q4_1 x bf16: the _x1 twin of the m1 kernel (same shapes, x staged as fp16)
            x1 = self._takes_x1(w, x.dtype, rows)
            epilogue = "rope" if rope is not None else ("swiglu" if swiglu else "")
            deep = (x1 and self.qgemv_x1_deep
                    and qgemv_x1_deep(w.fmt, epilogue, bool(extra), y.dtype, n, self.device.sm_count))
            # 9-32 tokens: the row-tile kernels where qgemv_row_tiles picks one
            rt = (None if x1 or tiles == 1
                  else qgemv_row_tiles(w.fmt, n_tiles, self.qgemv_rt_tiles, self.qgemv_rt_wide_tiles))
            suffix = ("x1n" if extra else "x1d" if deep else "x1") if x1 else f"m{tiles}{rt[0] if rt else ''}"
            if sending:
                name, fmt = f"qgemv{w.fmt}_send_{x.dtype}_{suffix}", "PPPPPiiiiiiPQii"
            elif rope is None:
                name, fmt = f"qgemv{w.fmt}{'_swiglu' if swiglu else ''}_{x.dtype}_{y.dtype}_{suffix}", "PPPPPiiiiii"
            else:
                name, fmt = f"qgemv{w.fmt}_rope_{x.dtype}_{suffix}", "PPPPPiiiiiiPPPPPiii"
            if extra:
                fmt += "PPPPf"
            if rt:
                grid, threads = _cdiv(n_tiles, rt[1]), rt[2]
            else:
                per_sm = None
                if self.qgemv_persist:
                    per_sm = QGEMV_X1_PERSIST[w.fmt, epilogue] if x1 else QGEMV_PERSIST.get((w.fmt, tiles, epilogue))
                grid = qgemv_grid(n, self.device.sm_count, per_sm) if per_sm else n_tiles
                threads = QGEMV_THREADS[(w.bits, tiles)]
            # _x1: the function allows QGEMV_X1_MAX_BYTES of dynamic shared memory once; each launch asks its own
            fn = self._fn("gemv_quant", name, fmt, QGEMV_X1_MAX_BYTES if x1 else 0)
            self._launch(fn, (grid, 1), threads, y.ptr + lo * width * y.itemsize, x.ptr + lo * k * x.itemsize,
                         w.data.ptr, w.scales.ptr, bias_ptr, rows, n, k, w.super_blocks, w.n_groups, w.gshift,
                         *self._rope_args(rope, lo), *extra, *sending, shared=qgemv_x1_bytes(k, w.fmt) if x1 else 0)

    def dequantize(self, out: DeviceTensor, w: QuantWeight) -> None:
        """out[N, K] (model dtype) = the quantized weight, each value d q (int8), d q + m (Q4_1) or d (q - 8)
        (Q4_0) rounded once."""
        _check(out, "out", MODEL_DTYPES, (w.n, w.k))
        _check_aligned(out, "out")
        fn = self._fn("gemv_quant", f"dequantize{w.fmt}_{out.dtype}", "PPPiiiii")
        units = w.n * w.super_blocks * 4
        grid = min(_cdiv(units, 256), self.device.sm_count * 16)
        self._launch(fn, (grid, 1), 256, out.ptr, w.data.ptr, w.scales.ptr, w.n, w.k, w.super_blocks,
                     w.n_groups, w.gshift)

    def _gemm_config(self, m: int, n: int) -> str:
        """Large tiles once they occupy about 3/4 of the SMs; below that the 4x more numerous small tiles
        finish sooner (H200: M=128 N=14336 large 196 TFLOP/s vs small 142; M=256 N=4096 small 152 vs 116)."""
        bm, bn = GEMM_CONFIGS["large"][:2]
        return "large" if _cdiv(m, bm) * _cdiv(n, bn) * 4 >= 3 * self.device.sm_count else "small"

    # -- collectives ------------------------------------------------------------------------------
    def ipc_all_reduce(self, t: DeviceTensor, rank: int, world: int, table: DeviceTensor, slot_bytes: int) -> None:
        """t (bf16/f16, in place) = sum over the `world` ranks of their t, through the peer-mapped buffers whose
        pointers `table` holds, slot_bytes per sender (mpillm/cuda/ipc_allreduce.py). Every rank must make the
        same calls."""
        from .ipc_allreduce import AR_BLOCKS, AR_THREADS
        _check(t, "t", MODEL_DTYPES)
        _check_aligned(t, "t")
        if t.numel % 8 or 2 * t.nbytes > slot_bytes:
            raise ValueError(f"t: {t.numel} elements; the IPC all-reduce takes multiples of 8 up to "
                             f"{slot_bytes // 2} bytes")
        fn = self._fn("allreduce", f"all_reduce_{t.dtype}", "PiiiPQ")
        self._launch(fn, (AR_BLOCKS, 1), AR_THREADS, t.ptr, t.numel // 8, rank, world, table.ptr, slot_bytes)

    def ipc_all_gather_cols(self, out: DeviceTensor, local: DeviceTensor, starts: DeviceTensor, rank: int,
                            world: int, table: DeviceTensor, slot_bytes: int, widest: int) -> None:
        """out [L, V] f32 = every rank's local [L, V_r] side by side: rank r's at columns [starts[r], starts[r + 1])
        (starts: i32 [world + 1] on the device, 0 .. V; widest: the largest V_r), through the peer-mapped
        buffers of an IpcAllReduce of its own (allreduce.cu). Every rank must make the same calls."""
        from .ipc_allreduce import AG_BLOCKS, AR_THREADS, gather_slot_bytes
        _check(out, "out", "f32", (None, None))
        L, V = out.shape
        _check(local, "local", "f32", (L, None))
        _check(starts, "starts", "i32", (world + 1,))
        if not 0 <= rank < world or not local.shape[1] <= widest <= V:
            raise ValueError(f"ipc_all_gather_cols: rank {rank} of {world}, local width {local.shape[1]}, widest "
                             f"{widest}, {V} columns")
        if gather_slot_bytes(L, widest) > slot_bytes:
            raise ValueError(f"local: {L} rows of up to {widest} floats; the IPC gather's slots take "
                             f"{slot_bytes // 16 * 2} floats")
        if L == 0:
            return
        fn = self._fn("allreduce", "all_gather_cols_f32", "PPPiiiiiPQ")
        self._launch(fn, (AG_BLOCKS, 1), AR_THREADS, out.ptr, local.ptr, starts.ptr, L, widest, V, rank, world,
                     table.ptr, slot_bytes)

    def ipc_all_reduce_add_rms_norm(self, x: DeviceTensor, residual: DeviceTensor, out: DeviceTensor,
                                    weight: DeviceTensor, eps: float, rank: int, world: int, table: DeviceTensor,
                                    slot_bytes: int, sent: bool = False) -> None:
        """x [M, H] (in place) = the sum over the ranks of their x, then residual += x; out = rms_norm(residual)
        * weight: ipc_all_reduce followed by add_rms_norm in one kernel, with the same bits. `table` must be
        an IpcAllReduce of its own (allreduce.cu says why). sent: the kernel that computed x sent it already
        (linear's `send`, with this table); this one only receives."""
        from .ipc_allreduce import AR_BLOCKS
        _check(x, "x", MODEL_DTYPES, (None, None))
        m, hidden = x.shape
        _check(residual, "residual", x.dtype, (m, hidden))
        _check(out, "out", x.dtype, (m, hidden))
        _check(weight, "weight", x.dtype, (hidden,))
        for t, name in ((x, "x"), (residual, "residual"), (out, "out"), (weight, "weight")):
            _check_aligned(t, name)
        if hidden % 8 or 2 * x.nbytes > slot_bytes:
            raise ValueError(f"x: [{m}, {hidden}]; the fused all-reduce takes rows of a multiple of 8 elements, up to "
                             f"{slot_bytes // 2} bytes in all")
        if m == 0:      # no rows: no call on any rank (a grid of 0 blocks cannot launch)
            return
        threads = self._norm_threads(hidden, True)
        name = f"all_reduce_add_rms_norm_{x.dtype}{'_t512' if threads <= 512 else ''}"   # allreduce.cu: _t512
        fn = self._fn("allreduce", name, "PPPPiifiiPQi")
        # A block per row up to AR_BLOCKS (allreduce.cu): one token launches one block, not 32 of which 31 only count
        # the call (each wanting an SM the projection before has drained; TP 2 b=1 +0.8-1.1% on H100).
        self._launch(fn, (min(m, AR_BLOCKS), 1), threads, x.ptr, residual.ptr, out.ptr, weight.ptr,
                     m, hidden, float(eps), rank, world, table.ptr, slot_bytes, int(sent))

    # -- attention --------------------------------------------------------------------------------
    def attention(self, out: DeviceTensor, qkv: DeviceTensor, k_cache: DeviceTensor, v_cache: DeviceTensor,
                  block_tables: DeviceTensor, query_start: DeviceTensor, context_lens: DeviceTensor,
                  n_heads: int, n_kv_heads: int, head_dim: int, scale: float, max_query_len: int,
                  max_context_len: int, scratch: AttentionScratch | None = None, group: int | None = None,
                  head_offset: int = 0) -> None:
        """Causal paged GQA attention of a flattened batch.

        out [T, nh, hd] (or [T, nh * hd]); q is read from qkv [T, (nh + 2 nkv) hd]; caches
        [num_blocks, block_size, nkv, hd]; block_tables [S, max_blocks] i32; query_start [S + 1] i32
        (prefix sums of the query counts); context_lens [S] i32 (KV length including the new tokens).
        Query j of sequence s sits at position context_lens[s] - n_q + j and sees keys 0..position.

        max_query_len / max_context_len must bound every sequence of the batch (they size the grid; the
        host knows them, the kernels do not need them exactly). max_query_len == 1 takes a decode kernel: for
        small batches with max_context_len <= DECODE_PARTITION on sm_90+ the cluster kernel (decode_uses_cluster),
        else split-K, which needs `scratch` when max_context_len > DECODE_PARTITION.

        GQA: query head h reads kv head (h + head_offset) // group; by default group = n_heads / n_kv_heads
        and head_offset = 0 (HF's repeat_kv). A tensor-parallel shard whose heads start inside a GQA group
        passes the model's group and its first head's position in that group (mpillm.parallel.Shard).
        """
        if head_dim not in ATTN_HEAD_DIMS:
            raise ValueError(f"head_dim: {head_dim} not in {ATTN_HEAD_DIMS}")
        if not scale > 0:          # the prefill kernel takes the running max of unscaled scores
            raise ValueError(f"scale: {scale} must be positive")
        if group is None:
            if n_heads % n_kv_heads:
                raise ValueError(f"n_heads: {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
            group = n_heads // n_kv_heads
        if not (group >= 1 and 0 <= head_offset < group and (n_heads - 1 + head_offset) // group == n_kv_heads - 1):
            raise ValueError(f"group/head_offset: {n_heads} query heads with group {group} and offset {head_offset} "
                             f"do not map onto exactly {n_kv_heads} kv heads")
        _check(qkv, "qkv", MODEL_DTYPES, (None, (n_heads + 2 * n_kv_heads) * head_dim))
        dt = qkv.dtype
        n_tokens = qkv.shape[0]
        if out.shape not in ((n_tokens, n_heads, head_dim), (n_tokens, n_heads * head_dim)):
            raise ValueError(f"out: shape {out.shape}, expected ({n_tokens}, {n_heads}, {head_dim})")
        _check(out, "out", dt)
        _check(k_cache, "k_cache", dt, (None, None, n_kv_heads, head_dim))
        _check(v_cache, "v_cache", dt, k_cache.shape)
        block_size = k_cache.shape[1]
        _check(context_lens, "context_lens", "i32", (None,))
        n_seqs = context_lens.shape[0]
        _check(query_start, "query_start", "i32", (n_seqs + 1,))
        _check(block_tables, "block_tables", "i32", (n_seqs, None))
        max_blocks = block_tables.shape[1]
        for t, name in ((qkv, "qkv"), (out, "out"), (k_cache, "k_cache"), (v_cache, "v_cache")):
            _check_aligned(t, name)
        if n_seqs == 0 or max_query_len <= 0 or max_context_len <= 0:
            return
        scale_log2 = float(scale) * LOG2E

        if max_query_len > 1:
            shared = 4 * ATTN_BKV * (head_dim + 8) * 2  # double-buffered K and V (Q staged in one V buffer)
            fn = self._fn("attention_prefill", f"attention_prefill_{dt}_hd{head_dim}", "PPPPPPPiiiifii", shared)
            self._launch(fn, (n_heads, _cdiv(max_query_len, ATTN_BQ), n_seqs), ATTN_THREADS, out.ptr, qkv.ptr,
                         k_cache.ptr, v_cache.ptr, block_tables.ptr, query_start.ptr, context_lens.ptr,
                         max_blocks, n_heads, n_kv_heads, block_size, scale_log2, group, head_offset, shared=shared)
            return

        group_bound = next((g for g in DECODE_GROUPS if group <= g), None)
        if group_bound is None:
            raise ValueError(f"n_heads: GQA group {group} exceeds {DECODE_GROUPS[-1]}")
        need = _cdiv(max_context_len, DECODE_PARTITION)
        if scratch is None:
            if need > 1:
                raise ValueError("scratch: an AttentionScratch is required when max_context_len > "
                                 f"{DECODE_PARTITION} on the decode path")
        elif not isinstance(scratch, AttentionScratch):
            raise ValueError(f"scratch: expected an AttentionScratch, got {type(scratch).__name__}")
        elif (n_seqs * need > scratch.rows or scratch.n_heads != n_heads or scratch.head_dim != head_dim):
            raise ValueError(f"scratch: sized for {scratch.max_seqs} seqs x {scratch.n_heads} heads x "
                             f"{scratch.max_context_len} keys x hd {scratch.head_dim}; this call needs "
                             f"{n_seqs} x {n_heads} x {max_context_len} x {head_dim}")
        if self.decode_cluster and decode_uses_cluster(n_seqs, n_kv_heads, group_bound, max_context_len,
                                                       self.device.sm_count, self.device.compute_capability):
            shared = decode_cluster_bytes(head_dim, group_bound)
            fn = self._fn("attention_decode", f"attention_decode_cluster_{dt}_hd{head_dim}_g{group_bound}",
                          "PPPPPPPiiiifii", shared)
            self._launch(fn, (DECODE_CLUSTER, n_kv_heads, n_seqs), DECODE_THREADS, out.ptr, qkv.ptr, k_cache.ptr,
                         v_cache.ptr, block_tables.ptr, query_start.ptr, context_lens.ptr, max_blocks, n_heads,
                         n_kv_heads, block_size, scale_log2, group, head_offset, shared=shared)
            return
        rows = scratch.rows if scratch is not None else None
        parts = decode_partitions(n_seqs, n_kv_heads, max_context_len, self.device.sm_count, rows,
                                  self.decode_split, self.decode_min_part)
        if parts == 1:
            part_ptrs = (0, 0, 0, 0)   # every sequence fits one partition: no partials, no merge
        else:
            part_ptrs = (scratch.partial_out.ptr, scratch.partial_max.ptr, scratch.partial_sum.ptr,
                         scratch.counters.ptr)
        min_part = decode_least_part(n_seqs, n_kv_heads, self.device.sm_count, self.decode_min_part)
        suffix = decode_kernel_suffix(parts * n_kv_heads * n_seqs, group_bound, self.device.sm_count)
        fn = self._fn("attention_decode", f"attention_decode_{dt}_hd{head_dim}_g{group_bound}{suffix}",
                      "PPPPPPPPPPPiiiifiii")
        self._launch(fn, (parts, n_kv_heads, n_seqs), DECODE_THREADS, out.ptr, *part_ptrs, qkv.ptr, k_cache.ptr,
                     v_cache.ptr, block_tables.ptr, query_start.ptr, context_lens.ptr, max_blocks, n_heads,
                     n_kv_heads, block_size, scale_log2, min_part, group, head_offset)

    # -- sampling ---------------------------------------------------------------------------------
    def argmax(self, out_ids: DeviceTensor, logits: DeviceTensor) -> None:
        """out_ids[b] = argmax(logits[b]) (first index among equal maxima)."""
        _check(logits, "logits", "f32", (None, None))
        b, vocab = logits.shape
        _check(out_ids, "out_ids", "i32", (b,))
        if vocab % 4 == 0:
            _check_aligned(logits, "logits")
        if b == 0:
            return
        fn = self._fn("sampling", "argmax_f32", "PPi")
        self._launch(fn, (b, 1), SAMPLE_THREADS, out_ids.ptr, logits.ptr, vocab)

    def sample(self, out_ids: DeviceTensor, logits: DeviceTensor, temperature: DeviceTensor, top_k: DeviceTensor,
               top_p: DeviceTensor, min_p: DeviceTensor, seeds: DeviceTensor, steps: DeviceTensor,
               candidate_cap: int = SAMPLE_CANDIDATE_CAP, host_ids: int = 0, host_slot: DeviceTensor | None = None,
               host_stride: int = 0) -> None:
        """One token per row of logits [B, V] f32.

        Per row: temperature <= 0 (or top_k == 1) is greedy argmax; otherwise z = logits / temperature,
        then top_k (0 = off), top_p over the top-k survivors (1 = off), min_p (p >= min_p * p_max, 0 = off),
        then an exact draw from the renormalised softmax of the survivors. seeds [B, 2] i32 holds each
        request's 64-bit seed (see seed_words); a draw depends only on (seed, steps[b]).

        candidate_cap bounds the shared-memory fast route (tests pass 0 to force the full-vocabulary
        route, which must pick the same tokens).

        host_ids: device address of mapped pinned host memory that also receives the ids, row b at
        host_slot[0] * host_stride + b (host_slot: one i32 on the device); 0 = none.
        """
        _check(logits, "logits", "f32", (None, None))
        b, vocab = logits.shape
        _check(out_ids, "out_ids", "i32", (b,))
        _check(temperature, "temperature", "f32", (b,))
        _check(top_k, "top_k", "i32", (b,))
        _check(top_p, "top_p", "f32", (b,))
        _check(min_p, "min_p", "f32", (b,))
        _check(seeds, "seeds", "i32", (b, 2))
        _check(steps, "steps", "i32", (b,))
        if vocab % 4 == 0:
            _check_aligned(logits, "logits")
        if not 0 <= candidate_cap <= SAMPLE_CANDIDATE_CAP:
            raise ValueError(f"candidate_cap: {candidate_cap} outside [0, {SAMPLE_CANDIDATE_CAP}]")
        if host_ids:
            _check(host_slot, "host_slot", "i32", (1,))
            if host_stride < b:
                raise ValueError(f"host_stride: {host_stride} is less than the {b} rows")
        if b == 0:
            return
        fn = self._fn("sampling", "sample_f32", "PPPPPPPPiiPPi")
        self._launch(fn, (b, 1), SAMPLE_THREADS, out_ids.ptr, logits.ptr, temperature.ptr, top_k.ptr, top_p.ptr,
                     min_p.ptr, seeds.ptr, steps.ptr, vocab, int(candidate_cap), int(host_ids),
                     host_slot.ptr if host_ids else 0, int(host_stride))
