"""The transformer on one GPU (this rank's tensor-parallel shard), built from the kernels in cuda_src/.

Same layers, same sharding and same order of operations as the NumPy reference in mpillm/model.py, on
device buffers that are all allocated once at startup:

    embed -> for each layer: h = norm(r); r += o_proj(attn(h)); h = norm(r); r += down(silu(gate_up(h)))
          -> norm -> LM head -> sample

The residual add is fused into the next norm (add_rms_norm), and under tensor parallelism at decode sizes also
the all-reduce before it; at decode sizes SwiGLU is fused into the gate/up projection and rotary embedding with
the KV-cache store into the q/k/v projection (their rows are interleaved at load so each tile holds the pairs). A step's metadata travels in one packed
int32 buffer (one host-to-device copy); only sampled token ids come back. Pure decode steps replay a
CUDA graph captured once per batch-size bucket.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mpillm import ops
from mpillm.batch import StepInput, split_step
from mpillm.checkpoint import Checkpoint
from mpillm.comm import SingleComm
from mpillm.config import ModelConfig
from mpillm.cuda.graphs import kernel_sequence, link_programmatic, pdl_enabled
from mpillm.cuda.kernels import DECODE_PARTITION, QGEMV_MAX_M, AttentionScratch, QuantWeight, seed_words
from mpillm.cuda.runtime import DeviceTensor, check_cu, device_alloc
from mpillm.layers import bias_sources, load_merged, load_packed, projection_sources
from mpillm.parallel import Shard
from mpillm.quant import dequantize_int8, gpu_weight_bytes, pack_int8, quantize_int8

# quantize: "none" (model dtype), "auto" (GGUF Q8_0/Q4_0/Q4_1 blocks as they are, Q4_K in Q4_1's form),
# "int8" (W8A16 at load);
# "q4" (Q4_0 layout: d per 32) and "q4_1" (with a min) only for random weights (benchmarks of the W4A16 kernels).
QUANTIZE = ("none", "auto", "int8", "q4", "q4_1")
RANDOM_QUANT_KIND = {"int8": "int8", "q4": "q4_0", "q4_1": "q4"}     # --quantize -> QuantWeight kind


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


KV_RESERVE_BYTES = 256 << 20   # left free after the KV cache: NCCL, graphs and the driver
# Tensor parallelism: logits of up to this many rows are gathered by the IPC kernel (NCCL's fixed cost dominates
# there; its buffers take 2 x 2 x world x rows x the widest vocab shard's floats, 16 MiB for Llama 3's vocab).
IPC_GATHER_ROWS = 8


class GpuMemoryError(RuntimeError):
    """Weights or KV cache do not fit: the message has the numbers and the flags that would help."""


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


class _Rows(NamedTuple):
    """Views of a range of token rows (CudaTransformer._rows)."""
    resid: DeviceTensor
    h: DeviceTensor
    delta: DeviceTensor
    qkv: DeviceTensor
    attn: DeviceTensor
    gate_up: DeviceTensor
    act: DeviceTensor
    positions: DeviceTensor
    slots: DeviceTensor
    attn_in: DeviceTensor      # the whole qkv buffer
    attn_out: DeviceTensor     # the whole attn buffer


class SideStream:
    """A second stream at the device's highest priority, with the events that order it against the main
    stream: a collective enqueued there gets SMs ahead of the main stream's GEMM blocks as they free up, instead
    of queueing behind a whole GEMM while the peer GPU waits for it. Events per micro-batch j: computed[j] (main
    -> side) and reduced[j] (side -> main), reused every layer (a wait takes the record made before it)."""

    def __init__(self, main_handle: int):
        from cuda.bindings import driver as cu
        self._cu = cu
        _, greatest = check_cu(cu.cuCtxGetStreamPriorityRange(), "cuCtxGetStreamPriorityRange")
        self.stream = check_cu(cu.cuStreamCreateWithPriority(cu.CUstream_flags.CU_STREAM_NON_BLOCKING, greatest),
                               "cuStreamCreateWithPriority")
        self.handle = int(self.stream)
        self.main = cu.CUstream(main_handle)
        flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self.computed = [check_cu(cu.cuEventCreate(flags), "cuEventCreate") for _ in range(2)]
        self.reduced = [check_cu(cu.cuEventCreate(flags), "cuEventCreate") for _ in range(2)]

    def follow_main(self, j: int):
        """What the main stream enqueued so far (micro-batch j's output) comes before the side's next work."""
        cu = self._cu
        check_cu(cu.cuEventRecord(self.computed[j], self.main), "cuEventRecord")
        check_cu(cu.cuStreamWaitEvent(self.stream, self.computed[j], 0), "cuStreamWaitEvent")

    def mark(self, j: int):
        """The event marking the side's work so far (micro-batch j's collective) done."""
        check_cu(self._cu.cuEventRecord(self.reduced[j], self.stream), "cuEventRecord")
        return self.reduced[j]

    def main_waits(self, event):
        check_cu(self._cu.cuStreamWaitEvent(self.main, event, 0), "cuStreamWaitEvent")

    def close(self):
        """No wait: every overlapped step ends with the main stream waiting on this one, and a stream with work
        still queued (a peer died mid-collective) is released by the driver once that work ends or aborts."""
        cu = self._cu
        if self.stream is not None:
            for e in self.computed + self.reduced:
                check_cu(cu.cuEventDestroy(e), "cuEventDestroy")
            check_cu(cu.cuStreamDestroy(self.stream), "cuStreamDestroy")
            self.stream = None


# Eager steps of at least this many tokens run as two micro-batches under tensor parallelism (overlap):
# below it the halves' GEMMs are too short to hide a collective behind and decode-sized all-reduces go
# through the one-shot IPC kernel anyway.
OVERLAP_MIN_TOKENS = 256


@dataclass
class LayerWeights:
    ln1: DeviceTensor          # [H]
    qkv: DeviceTensor | QuantWeight        # [(nq + 2 nkv) hd, H]
    qkv_bias: DeviceTensor | None
    o: DeviceTensor | QuantWeight          # [H, nq hd]
    ln2: DeviceTensor                      # [H]
    gate_up: DeviceTensor | QuantWeight    # [2 I_local, H], gate and up rows interleaved
    down: DeviceTensor | QuantWeight       # [H, I_local]


class StepBuffers:
    """The packed per-step metadata: one pinned host array mirrored by one device array, fixed offsets.

    int32 fields: ids, positions, slots [T]; query_start [S+1]; context_lens, logits_index, top_k, steps [S];
    seeds [S, 2]; temperature, top_p, min_p [S] (f32 bits); out_slot [1] (which half of the mapped id array the
    sampler writes); block_tables [S, max_blocks] last, so a step copies only the rows it uses.

    Two host arrays and two device arrays take turns (`begin` picks the next pair): a step is staged while the one
    before may still wait for its upload, so the array being written must not be the one that upload reads (its
    event says when that copy is done). The copy runs on a stream of its own while the step before computes, instead
    of between two steps on the compute stream (8-10 us a step: Llama-3-8B Q4_0 b=1 +0.5%, SmolLM2-135M +1-3%;
    docs/PERFORMANCE.md, twenty-seventh session), so each turn has its own device array, which the step two back may
    still be reading. Decode graphs are captured per turn (they hold the array's address).
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int):
        import pycuda.driver as cuda
        T, S = max_tokens, max_seqs
        layout = [("ids", T), ("positions", T), ("slots", T), ("query_start", S + 1), ("context_lens", S),
                  ("logits_index", S), ("top_k", S), ("steps", S), ("seeds", 2 * S), ("temperature", S),
                  ("top_p", S), ("min_p", S), ("out_slot", 1), ("block_tables", S * max_blocks)]
        self.offset, off = {}, 0
        for name, n in layout:
            self.offset[name] = off
            off += n
        self.size, self.max_blocks = off, max_blocks
        self.hosts = [cuda.pagelocked_empty(off, np.int32) for _ in range(2)]
        self.devs = [DeviceTensor.empty((off,), "i32") for _ in range(2)]
        event = lambda: cuda.Event(cuda.event_flags.DISABLE_TIMING)
        self.uploaded = [event(), event()]     # on the copy stream, after each turn's last upload
        self.released = [event(), event()]     # on the compute stream, after the last step of each turn
        self.used = [False, False]             # whether each turn has uploaded (`uploaded` recorded)
        self.ended = [False, False]            # whether each turn's `released` was recorded
        self.copy_stream = cuda.Stream()
        self.turn = 0
        self.host, self.dev = self.hosts[0], self.devs[0]
        self.max_tokens, self.max_seqs = T, S

    def begin(self, stream):
        """Switch to the other host and device arrays, once the host array's previous upload has been copied out.
        `stream` (the compute stream) holds every step of the turn left: its end is where that device array is free."""
        self.released[self.turn].record(stream)
        self.ended[self.turn] = True
        self.turn ^= 1
        if self.used[self.turn]:
            self.uploaded[self.turn].synchronize()
        self.host, self.dev = self.hosts[self.turn], self.devs[self.turn]

    def host_view(self, name: str, n: int, dtype=np.int32) -> np.ndarray:
        a = self.host[self.offset[name]: self.offset[name] + n]
        return a.view(dtype) if dtype != np.int32 else a

    def dev_view(self, name: str, shape, dtype: str = "i32") -> DeviceTensor:
        t = self.dev.view(self.offset[name], shape)
        if dtype != "i32":
            t = DeviceTensor((t._base, t._offset), shape, dtype)
        return t

    def upload(self, num_seqs: int, stream):
        """Copy the staged rows into this turn's device array on the copy stream, and make `stream` (the compute
        stream) wait for the copy before the step's work. The copy itself waits for the last step that read the
        array (`released`: recorded when `begin` left this turn)."""
        import pycuda.driver as cuda
        t = self.turn
        n = self.offset["block_tables"] + num_seqs * self.max_blocks
        if self.ended[t]:
            self.copy_stream.wait_for_event(self.released[t])
        cuda.memcpy_htod_async(self.dev.ptr, self.host[:n], self.copy_stream)
        self.uploaded[t].record(self.copy_stream)
        self.used[t] = True
        stream.wait_for_event(self.uploaded[t])


class CudaTransformer:
    """One rank's shard of the model on its GPU, with its KV cache and step buffers."""

    def __init__(self, ckpt: Checkpoint | None, cfg: ModelConfig, shard: Shard, device, kernels, *,
                 dtype: str = "bf16", comm=None, max_tokens: int = 2048, max_seqs: int = 64,
                 max_model_len: int = 4096, block_size: int = 16, gpu_memory_utilization: float = 0.9,
                 num_blocks: int | None = None, quantize: str = "none", group_size: int = 128,
                 quantize_lm_head: bool = False, fuse_swiglu: bool = True, pdl: bool | None = None,
                 overlap: bool = False, fuse_allreduce_norm: bool = True, fuse_rope: bool = True,
                 fuse_prenorm: bool = True, presend: bool = True, log=lambda m: None):
        import pycuda.driver as cuda
        if quantize not in QUANTIZE or (quantize in ("q4", "q4_1") and ckpt is not None):
            raise ValueError(f"--quantize {quantize}: expected none, auto or int8"
                             + (" (4-bit weights come from GGUF Q4_0/Q4_1 files with auto)"
                                if quantize in ("q4", "q4_1") else ""))
        self.quantize, self.group_size, self.quantize_lm_head = quantize, group_size, quantize_lm_head
        self.fuse_swiglu = fuse_swiglu     # False: gate/up projection and silu_mul as two kernels (A/B runs)
        # Tensor parallelism: decode-sized all-reduces fused with the next residual add + RMSNorm (allreduce.cu);
        # False: the IPC all-reduce and add_rms_norm as two kernels (A/B runs).
        self.fuse_allreduce_norm = fuse_allreduce_norm
        # ... and the row-parallel projection's kernel sends its tiles to the peers itself (Kernels.linear's `send`:
        # the bf16 GEMV, int8 / Q4_0 at one token); False: the all-reduce kernel sends them (A/B runs).
        self.presend = presend
        # One GPU, one token: the residual add + RMSNorm before the q/k/v and gate/up projections folded into their
        # int8, Q4_0, Q4_1 or bf16 kernels (Kernels.prenorm_fusable; int8 with add_rms_norm's bits, the others within
        # bf16 rounding of them), the residual alternating between two buffers;
        # False: add_rms_norm as a kernel of its own (A/B runs).
        self.fuse_prenorm = fuse_prenorm
        self.prenorm_folds = 0             # pre-norms folded in the last forward enqueued (_run)
        # Rotary embedding and the KV store in the q/k/v projection's epilogue (Kernels.linear_rope), its weight
        # rows interleaved per head at load; False: the projection and rope_store_kv as two kernels (A/B runs).
        # Needs the gate/up buffer to hold a q/k/v row (it stages prefill-sized projections).
        self.fuse_rope = bool(fuse_rope) and 2 * (shard.ffn_hi - shard.ffn_lo) >= \
            (shard.n_heads + 2 * shard.n_kv_heads) * cfg.head_dim
        # Programmatic edges between our kernels in the decode graphs (mpillm/cuda/graphs.py); None: on where
        # the GPU has them (sm_90) unless MPILLM_PDL=0.
        self.pdl = pdl_enabled(device.compute_capability) if pdl is None else bool(pdl)
        self.pdl_edges = 0                 # programmatic edges in the last captured graph
        self.graph_kernels: list[tuple[str, int]] = []   # its kernels, (name, blocks), where the kernels trace
        self.cuda, self.cfg, self.shard, self.dev, self.k = cuda, cfg, shard, device, kernels
        self.comm = comm or SingleComm()
        # Tensor parallelism, overlap=True: eager steps of at least OVERLAP_MIN_TOKENS run as two micro-batches
        # whose all-reduces (on a second stream) hide behind each other's GEMMs. Off by default: on 2 x H200 it
        # lost to one batch with the collectives in line (docs/PERFORMANCE.md).
        self.overlap = bool(overlap) and self.comm.size > 1 and hasattr(self.comm, "all_reduce_device")
        self.dtype, self.block_size = dtype, block_size
        self.max_tokens, self.max_seqs, self.max_model_len = max_tokens, max_seqs, max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        hd, H = cfg.head_dim, cfg.hidden_size
        nq, nkv = shard.n_heads, shard.n_kv_heads
        self.qkv_width = (nq + 2 * nkv) * hd
        self.inter = shard.ffn_hi - shard.ffn_lo
        self.vocab_local = shard.vocab_hi - shard.vocab_lo

        self._check_weight_memory(ckpt, log)
        t0 = time.perf_counter()
        self._pool = self._qpool = None
        self.layers = [self._load_layer(ckpt, i) for i in range(cfg.num_layers)]
        vocab_rows = slice(shard.vocab_lo, shard.vocab_hi)

        def embed_rows():
            w = ckpt.load("model.embed_tokens.weight", rows=vocab_rows)
            if quantize == "int8" and quantize_lm_head:      # the gather reads int8-rounded rows, as on CPU
                w = dequantize_int8(*quantize_int8(w, group_size), group_size)
            return w
        self.embed = self._param(ckpt, "model.embed_tokens.weight", (self.vocab_local, H), embed_rows)
        self.norm = self._param(ckpt, "model.norm.weight", (H,), lambda: ckpt.load("model.norm.weight"))
        self.lm_head = self._load_lm_head(ckpt, vocab_rows)
        device.synchronize()
        self._pool = self._qpool = None
        # Dequantized weights for steps over QGEMV_MAX_M tokens (prefill): one buffer, the largest projection.
        quantized = [w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
                     if isinstance(w, QuantWeight)]
        self.wscratch = None
        if quantized and max_tokens > QGEMV_MAX_M:
            self.wscratch = DeviceTensor.empty((max(w.n * w.k for w in quantized),), dtype)
        self.weight_bytes = sum(t.nbytes for t in self._weights())
        # What a decode step reads: every weight but the embedding table, of which only the step's rows are
        # gathered (unless it doubles as the LM head).
        self.streamed_bytes = self.weight_bytes - (self.embed.nbytes if self.embed is not self.lm_head else 0)
        self.inv_freq = DeviceTensor.from_numpy(ops.rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling), "f32")
        device.synchronize()
        self.load_seconds = time.perf_counter() - t0

        # Activations, sized for the largest step.
        T, S, dt = max_tokens, max_seqs, dtype
        self.resid = DeviceTensor.empty((T, H), dt)        # the residual stream r
        self.resid_alt = DeviceTensor.empty((1, H), dt)    # its other buffer when pre-norms fold (one token)
        self.h = DeviceTensor.empty((T, H), dt)            # norm(r)
        self.delta = DeviceTensor.empty((T, H), dt)        # a sub-layer's output, added into r
        self.qkv = DeviceTensor.empty((T, self.qkv_width), dt)
        self.attn = DeviceTensor.empty((T, nq * hd), dt)
        self.gate_up = DeviceTensor.empty((T, 2 * self.inter), dt)
        self.act = DeviceTensor.empty((T, self.inter), dt)
        self.last = DeviceTensor.empty((S, H), dt)         # rows we take logits of
        # Room for S rows of the widest vocab shard: NCCL's all-gather sends equal counts from every rank.
        vocab_pad = -(-cfg.vocab_size // shard.size)
        self.logits_local = DeviceTensor.empty((S * max(vocab_pad, self.vocab_local),), "f32")
        self.logits = (self.logits_local if self.comm.size == 1
                       else DeviceTensor.empty((S, cfg.vocab_size), "f32"))
        # Sampled ids: on the device (a later step's fed tokens read them there, see `launch`) and written by the
        # sampler straight into one half of a mapped pinned host array (the half named by the step's out_slot),
        # so the step after may be launched before this one's ids are read, and no copy waits in the stream.
        self.out_ids = DeviceTensor.empty((S,), "i32")
        self._ids_aside = DeviceTensor.empty((S,), "i32")
        self.out_mapped = cuda.pagelocked_empty(2 * S, np.int32, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
        self.out_mapped_dev = int(self.out_mapped.base.get_device_pointer())
        self.out_ready = [cuda.Event(cuda.event_flags.DISABLE_TIMING) for _ in range(2)]
        self._out_turn = 0
        self.buf = StepBuffers(T, S, self.max_blocks)
        self.scratch = AttentionScratch(S, nq, hd, self.max_blocks * block_size)
        self.side = None
        if self.overlap:
            self.side = SideStream(device.stream.handle)   # the micro-batches' all-reduces
            # query_start [S + 1] and context_lens [S] of each micro-batch (query_start in whole-step rows).
            self.half_host = cuda.pagelocked_empty(2 * (2 * S + 1), np.int32)
            self.half_dev = DeviceTensor.empty((2 * (2 * S + 1),), "i32")

        if self.comm.size > 1 and hasattr(self.comm, "enable_ipc_all_reduce"):
            # Decode-sized all-reduces (up to 64 tokens) through the one-shot IPC kernel; larger ones NCCL. The
            # logits of up to IPC_GATHER_ROWS sequences are gathered by an IPC kernel too.
            note = self.comm.enable_ipc_all_reduce(kernels, min(max_tokens, 64) * H * self.resid.itemsize,
                                                   min(max_seqs, IPC_GATHER_ROWS))
            log(f"mpillm: rank {shard.rank}: all-reduce: {note}")
        self._alloc_kv_cache(num_blocks, gpu_memory_utilization, log)
        # Decode batch sizes that get a CUDA graph: a batch runs in the smallest bucket that holds it.
        self.buckets = sorted({b for b in GRAPH_BUCKETS if b < max_seqs} | {min(max_seqs, GRAPH_BUCKETS[-1])})
        self.graphs: dict[tuple, object] = {}   # (bucket, context bound, turn) -> executable graph
        self.graph_seconds = 0.0

    # ---------------------------------------------------------------------------------------- weights
    def _weight_bytes(self, ckpt) -> int:
        """About the bytes this rank's weights take on the GPU (checked before anything is loaded)."""
        return gpu_weight_bytes(self.cfg, self.shard, self.quantize, self.group_size, self.quantize_lm_head, ckpt)

    def _check_weight_memory(self, ckpt, log):
        free, total = self.cuda.mem_get_info()
        need = self._weight_bytes(ckpt)
        if need > free * 0.95:
            raise GpuMemoryError(
                f"rank {self.shard.rank}: the weights need {_mib(need)} but GPU {self.dev.ordinal} "
                f"({self.dev.name}) has {_mib(free)} free of {_mib(total)}. Use more GPUs per replica "
                f"(--tp {self.shard.size * 2}).")
        log(f"mpillm: rank {self.shard.rank}: weights about {_mib(need)} ({self._scheme()}) of {_mib(free)} free "
            f"on {self.dev.name}")

    def _scheme(self) -> str:
        return {"none": self.dtype, "auto": "GGUF blocks as stored, else " + self.dtype,
                "int8": f"int8 groups of {self.group_size}", "q4": "random 4-bit (Q4_0 layout)",
                "q4_1": "random 4-bit with mins (Q4_1 layout)"}[self.quantize]

    def _weights(self):
        seen = set()
        for layer in self.layers:
            for t in vars(layer).values():
                if t is not None:
                    yield t
        for t in (self.embed, self.norm, self.lm_head):
            if id(t) not in seen:
                seen.add(id(t))
                yield t

    def _param(self, ckpt, name, shape, load) -> DeviceTensor:
        if ckpt is not None:
            arr = load()
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: checkpoint shard has shape {arr.shape}, expected {shape}")
            return DeviceTensor.from_numpy(arr, self.dtype)
        return self._random(shape)

    def _random(self, shape) -> DeviceTensor:
        """Random weights with real shapes (benchmarks): device copies of one random pool, no host traffic."""
        if self._pool is None:
            rng = np.random.default_rng(0)
            self._pool = DeviceTensor.from_numpy(rng.standard_normal(1 << 22, np.float32) * 0.02, self.dtype)
        t = DeviceTensor.empty(shape, self.dtype)
        done, n = 0, t.nbytes
        while done < n:
            step = min(self._pool.nbytes, n - done)
            self.cuda.memcpy_dtod_async(t.ptr + done, self._pool.ptr, step, self.dev.stream)
            done += step
        return t

    def _random_quant(self, n: int, k: int) -> QuantWeight:
        if self._qpool is None:
            rng = np.random.default_rng(1)
            self._qpool = DeviceTensor.from_numpy(rng.integers(0, 256, 1 << 22, dtype=np.uint8), "u8")
        pool = self._qpool

        def fill(t):
            done = 0
            while done < t.nbytes:
                step = min(pool.nbytes, t.nbytes - done)
                self.cuda.memcpy_dtod_async(t.ptr + done, pool.ptr, step, self.dev.stream)
                done += step
        kind = RANDOM_QUANT_KIND[self.quantize]
        return QuantWeight.random(kind, n, k, self.group_size if kind == "int8" else 32, fill)

    def _projection(self, ckpt, sources, shape, reorder=None):
        """One merged projection on the GPU: quantized per self.quantize where it applies, else model dtype.
        reorder: a function of the rows, applied to float weights and to packed data and scales alike
        (interleave_halves for Kernels.linear_swiglu, rope_interleave for Kernels.linear_rope)."""
        if ckpt is None:       # random weights: their row order means nothing
            return self._random_quant(*shape) if self.quantize in RANDOM_QUANT_KIND else self._random(shape)
        packed = load_packed(ckpt, sources, self.quantize, self.group_size)
        if packed is not None:
            if reorder is not None:
                packed = packed._replace(data=reorder(packed.data), scales=reorder(packed.scales))
            return QuantWeight.from_packed(packed)
        w = load_merged(ckpt, sources)
        if w.shape != tuple(shape):
            raise ValueError(f"{sources[0][0]}: checkpoint shard has shape {w.shape}, expected {shape}")
        return DeviceTensor.from_numpy(reorder(w) if reorder is not None else w, self.dtype)

    def _load_layer(self, ckpt, i: int) -> LayerWeights:
        c, s = self.cfg, self.shard
        H, hd = c.hidden_size, c.head_dim
        src = projection_sources(c, s, i) if ckpt is not None else {}
        by_head = (lambda a: rope_interleave(a, hd)) if self.fuse_rope else None
        reorder = {"gate_up": interleave_halves, "qkv": by_head}
        proj = lambda key, shape: self._projection(ckpt, src.get(key), shape, reorder.get(key))  # noqa: E731
        norm = lambda name: self._param(ckpt, name, (H,), lambda: ckpt.load(name))  # noqa: E731
        bias = None
        if c.attention_bias:
            def load_bias():
                b = load_merged(ckpt, bias_sources(src["qkv"]))
                return by_head(b) if by_head is not None else b
            bias = self._param(ckpt, "qkv bias", (self.qkv_width,), load_bias)
        return LayerWeights(norm(f"model.layers.{i}.input_layernorm.weight"), proj("qkv", (self.qkv_width, H)), bias,
                            proj("o", (H, s.n_heads * hd)), norm(f"model.layers.{i}.post_attention_layernorm.weight"),
                            proj("gate_up", (2 * self.inter, H)), proj("down", (H, self.inter)))

    def _load_lm_head(self, ckpt, rows):
        """The LM head: the embedding table when tied, unless it is quantized (auto: the file's Q8_0/Q4 blocks;
        int8 with quantize_lm_head), in which case the embedding keeps its float copy for the gather."""
        c = self.cfg
        name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        shape = (self.vocab_local, c.hidden_size)
        if self.quantize in RANDOM_QUANT_KIND and self.quantize_lm_head and ckpt is None:
            return self._random_quant(*shape)
        if ckpt is not None and self.quantize == "auto":
            packed = load_packed(ckpt, [(name, rows, None)], "auto")
            if packed is not None:
                return QuantWeight.from_packed(packed)
        if ckpt is not None and self.quantize == "int8" and self.quantize_lm_head:
            try:
                return QuantWeight.from_packed(pack_int8(*quantize_int8(ckpt.load(name, rows=rows), self.group_size),
                                                         self.group_size))
            except ValueError as e:
                raise ValueError(f"int8 quantization of {name}: {e}") from None
        if c.tie_word_embeddings:
            return self.embed
        return self._param(ckpt, name, shape, lambda: ckpt.load(name, rows=rows))

    # --------------------------------------------------------------------------------------- KV cache
    def _alloc_kv_cache(self, num_blocks, utilization, log):
        c, s = self.cfg, self.shard
        per_block = 2 * c.num_layers * self.block_size * s.n_kv_heads * c.head_dim * 2
        free, total = self.cuda.mem_get_info()
        # Budget: `utilization` of the whole card, less what is in use already (weights, activations, other
        # processes), with 256 MiB left for NCCL, graphs and the driver.
        budget = int(total * utilization) - (total - free) - KV_RESERVE_BYTES
        one_seq = -(-self.max_model_len // self.block_size)
        asked = num_blocks is not None
        if not asked:
            num_blocks = budget // per_block
        if num_blocks < one_seq:
            raise GpuMemoryError(kv_cache_shortfall(s.rank, budget, num_blocks, asked, self.block_size, per_block,
                                                    self.max_model_len, free, total, utilization))
        if asked and num_blocks * per_block > free - KV_RESERVE_BYTES:
            raise GpuMemoryError(kv_cache_over_asked(s.rank, num_blocks, self.block_size, per_block, free, total))
        self.num_blocks = int(num_blocks)
        shape = (self.num_blocks, self.block_size, s.n_kv_heads, c.head_dim)
        per_layer = math.prod(shape)
        self._kv = device_alloc(2 * c.num_layers * per_layer * 2)     # one allocation for every layer
        base = DeviceTensor(self._kv, (2 * c.num_layers * per_layer,), self.dtype)
        self.k_cache = [base.view((2 * i) * per_layer, shape) for i in range(c.num_layers)]
        self.v_cache = [base.view((2 * i + 1) * per_layer, shape) for i in range(c.num_layers)]
        log(f"mpillm: rank {s.rank}: KV cache {self.num_blocks} blocks x {self.block_size} tokens "
            f"({_mib(self.num_blocks * per_block)})")

    # ---------------------------------------------------------------------------------------- forward
    def _stage(self, step: StepInput, specs):
        """Write the step's metadata into the pinned host buffer (no device work)."""
        b = self.buf
        T, S, L = step.num_tokens, step.num_seqs, len(step.logits_index)
        if T > b.max_tokens or S > b.max_seqs:
            raise ValueError(f"step of {T} tokens / {S} sequences exceeds the buffers ({b.max_tokens} / {b.max_seqs})")
        b.host_view("ids", T)[:] = step.input_ids
        b.host_view("positions", T)[:] = step.positions
        b.host_view("slots", T)[:] = step.slot_mapping
        b.host_view("query_start", S + 1)[:] = step.query_start
        b.host_view("context_lens", S)[:] = step.context_lens
        b.host_view("logits_index", L)[:] = step.logits_index
        bt = b.host_view("block_tables", S * b.max_blocks).reshape(S, b.max_blocks)
        w = min(step.block_tables.shape[1], b.max_blocks)
        bt[:, :w] = step.block_tables[:, :w]
        bt[:, w:] = 0
        self._stage_sampling(specs)

    def _stage_halves(self, step: StepInput):
        """Split the step at its middle token (split_step) and upload each half's query_start (in whole-step
        rows) and context_lens. Returns [(first row, end row, attention runs)] for _run_overlapped."""
        T, S = step.num_tokens, self.buf.max_seqs
        t1 = T // 2
        host, dev, out, off = self.half_host, self.half_dev, [], 0
        for j, (half, lo) in enumerate(zip(split_step(step, t1), (0, t1))):
            n = half.num_seqs
            host[off: off + n + 1] = half.query_start + lo
            host[off + S + 1: off + S + 1 + n] = half.context_lens
            seq_lo = 0 if j == 0 else step.num_seqs - n            # the second half's sequences end the step's
            tables = self.buf.dev_view("block_tables", (step.num_seqs, self.buf.max_blocks))
            meta = self._seq_meta(dev.view(off, (n + 1,)), dev.view(off + S + 1, (n,)),
                                  tables.view(seq_lo * self.buf.max_blocks, (n, self.buf.max_blocks)),
                                  _attention_groups(half))
            out.append((lo, lo + half.num_tokens, meta))
            off += 2 * S + 1
        self.cuda.memcpy_htod_async(dev.ptr, host, self.dev.stream)
        return out

    def _stage_sampling(self, specs):
        b = self.buf
        n = len(specs)
        if n == 0:
            return
        b.host_view("temperature", n, np.float32)[:] = [s.params.temperature for s in specs]
        b.host_view("top_p", n, np.float32)[:] = [s.params.top_p for s in specs]
        b.host_view("min_p", n, np.float32)[:] = [s.params.min_p for s in specs]
        b.host_view("top_k", n)[:] = [s.params.top_k for s in specs]
        b.host_view("steps", n)[:] = [s.step for s in specs]
        b.host_view("seeds", 2 * n)[:] = seed_words([s.seed for s in specs]).reshape(-1)

    def _run(self, T: int, S: int, L: int, attn_groups, sample: bool):
        """Enqueue the whole forward (and sampling) for the staged step. Capturable: no host sync or copy.

        attn_groups: [(first seq, end seq, longest query, longest context)] runs of consecutive sequences
        that are all decodes (one query) or all prefill chunks; each run gets the attention kernel made for
        it, sized by its own longest query and context (a mixed step would otherwise launch prefill tiles
        for every decode sequence)."""
        b = self.buf
        rows = self._rows(0, T)
        meta = self._seq_meta(b.dev_view("query_start", (S + 1,)), b.dev_view("context_lens", (S,)),
                              b.dev_view("block_tables", (S, b.max_blocks)), attn_groups)
        self._embed(rows, b.dev_view("ids", (T,)))
        self.prenorm_folds = 0
        resid, pending = rows.resid, None     # pending: a pre-norm folded into the next projection (_row_parallel)
        for i, w in enumerate(self.layers):
            self._attention_block(i, w, rows, meta, prenorm=pending)
            resid, pending = self._row_parallel(rows.delta, rows.attn, w.o, rows, w.ln2,   # r += o(attn); h = norm(r)
                                                resid, w.gate_up if self.fuse_swiglu else None)
            self._mlp_block(w, rows, prenorm=pending)
            last = i + 1 == len(self.layers)
            after = self.norm if last else self.layers[i + 1].ln1
            nxt = None if last or not self.fuse_rope else self.layers[i + 1].qkv
            resid, pending = self._row_parallel(rows.delta, rows.act, w.down, rows, after,  # r += down(act); h = norm(r)
                                                resid, nxt)
        return self._head(T, L, sample)

    def _run_overlapped(self, T: int, S: int, L: int, halves, sample: bool):
        """_run as two micro-batches (mpillm.batch.split_step) that take turns: while one half's all-reduce
        runs on the side stream, the main stream computes the other half's next sub-layer. The halves touch
        disjoint rows of every activation buffer; the second reads the first's KV only after the first
        wrote it on the main stream. The same kernels on the same rows as _run (the GEMMs see half the M, so
        cuBLASLt may pick another algorithm: equal up to rounding)."""
        k, b, eps = self.k, self.buf, self.cfg.rms_norm_eps
        parts = [(self._rows(lo, hi), meta) for lo, hi, meta in halves]
        pending = [None, None]           # each half's all-reduce in flight (an event on the side stream)

        def settle(j):                   # the main stream waits for half j's sum before reading it
            if pending[j] is not None:
                self.side.main_waits(pending[j])
                pending[j] = None

        whole = self._rows(0, T)
        self._embed(whole, b.dev_view("ids", (T,)))
        for i, w in enumerate(self.layers):
            for j, (rows, meta) in enumerate(parts):
                settle(j)
                if i > 0:
                    k.add_rms_norm(rows.h, rows.delta, rows.resid, w.ln1, eps)
                self._attention_block(i, w, rows, meta)
                pending[j] = self._row_parallel_async(rows.delta, rows.attn, w.o, j)
            for j, (rows, meta) in enumerate(parts):
                settle(j)
                k.add_rms_norm(rows.h, rows.delta, rows.resid, w.ln2, eps)
                self._mlp_block(w, rows)
                pending[j] = self._row_parallel_async(rows.delta, rows.act, w.down, j)
        settle(0)
        settle(1)
        k.add_rms_norm(whole.h, whole.delta, whole.resid, self.norm, eps)
        return self._head(T, L, sample)

    def _rows(self, lo: int, hi: int):
        """Views of token rows lo..hi-1 of the activations and per-token metadata. attn_in / attn_out are
        whole: the attention kernel addresses its rows through query_start."""
        n, b, s, hd = hi - lo, self.buf, self.shard, self.cfg.head_dim
        H = self.cfg.hidden_size
        return _Rows(self.resid.view(lo * H, (n, H)), self.h.view(lo * H, (n, H)), self.delta.view(lo * H, (n, H)),
                     self.qkv.view(lo * self.qkv_width, (n, self.qkv_width)),
                     self.attn.view(lo * s.n_heads * hd, (n, s.n_heads * hd)),
                     self.gate_up.view(lo * 2 * self.inter, (n, 2 * self.inter)),
                     self.act.view(lo * self.inter, (n, self.inter)),
                     b.dev_view("positions", (b.max_tokens,)).view(lo, (n,)),
                     b.dev_view("slots", (b.max_tokens,)).view(lo, (n,)),
                     self.qkv.view(0, (b.max_tokens, self.qkv_width)),
                     self.attn.view(0, (b.max_tokens, s.n_heads * hd)))

    def _seq_meta(self, query_start, context_lens, block_tables, attn_groups):
        """Per attention run: (block tables, query_start, context_lens) views of its sequences, longest query
        and context."""
        mb = self.buf.max_blocks
        return [(block_tables.view(lo * mb, (hi - lo, mb)), query_start.view(lo, (hi - lo + 1,)),
                 context_lens.view(lo, (hi - lo,)), max_q, max_ctx) for lo, hi, max_q, max_ctx in attn_groups]

    def _attention_block(self, i: int, w: LayerWeights, rows, meta, prenorm=None):
        """qkv = h Wqkv (h: the normalised residual, or made in the projection's kernel from `prenorm`), rope and
        KV store, attention."""
        k, c, s = self.k, self.cfg, self.shard
        hd = c.head_dim
        if self.fuse_rope:      # rows interleaved at load: rotation and KV store in the projection's epilogue
            k.linear_rope(rows.qkv, rows.h, w.qkv, w.qkv_bias, rows.positions, self.inv_freq, self.k_cache[i],
                          self.v_cache[i], rows.slots, s.n_heads, s.n_kv_heads, hd, rows.gate_up, self.wscratch,
                          prenorm=prenorm)
        else:
            k.linear(rows.qkv, rows.h, w.qkv, w.qkv_bias, scratch=self.wscratch)
            k.rope_store_kv(rows.qkv, rows.positions, self.inv_freq, self.k_cache[i], self.v_cache[i], rows.slots,
                            s.n_heads, s.n_kv_heads, hd)
        for tables, query_start, context_lens, max_q, max_ctx in meta:
            k.attention(rows.attn_out, rows.attn_in, self.k_cache[i], self.v_cache[i], tables, query_start,
                        context_lens, s.n_heads, s.n_kv_heads, hd, 1.0 / math.sqrt(hd), max_q, max_ctx,
                        self.scratch, s.group, s.head_offset)

    def _mlp_block(self, w: LayerWeights, rows, prenorm=None):
        """act = silu(h Wgate) * (h Wup) (h: the normalised residual, or made in the kernel from `prenorm`)."""
        k = self.k
        if self.fuse_swiglu:
            k.linear_swiglu(rows.act, rows.h, w.gate_up, rows.gate_up, scratch=self.wscratch, prenorm=prenorm)
        else:
            k.linear(rows.gate_up, rows.h, w.gate_up, scratch=self.wscratch)
            k.silu_mul(rows.act, rows.gate_up, interleaved=True)

    def _head(self, T: int, L: int, sample: bool):
        """LM head of the rows we want logits of (h holds the final norm), and (sample) token ids on the GPU."""
        k, c, b = self.k, self.cfg, self.buf
        H = c.hidden_size
        h = self.h.view(0, (T, H))
        if L == T:                     # every token samples (decode): logits_index is 0..T-1, nothing to gather
            last = h
        else:
            last = self.last.view(0, (L, H))
            k.embedding(last, b.dev_view("logits_index", (L,)), h, 0)      # gather the rows we sample from
        logits = self._lm_head(last)
        if sample:
            f32 = lambda name: b.dev_view(name, (L,), "f32")
            k.sample(self.out_ids.view(0, (L,)), logits, f32("temperature"), b.dev_view("top_k", (L,)),
                     f32("top_p"), f32("min_p"), b.dev_view("seeds", (L, 2)), b.dev_view("steps", (L,)),
                     host_ids=self.out_mapped_dev, host_slot=b.dev_view("out_slot", (1,)), host_stride=b.max_seqs)
        return logits

    # The parallel layers: the only places a collective is called (see layers.py for the NumPy twins).
    def _embed(self, rows, ids):
        """r = the embedding of ids; h = rms_norm(r) * the first layer's ln1. Vocab-parallel: each rank looks up
        the ids of its shard (zeros for the others) and the sum over the ranks fills the rows in, added into a
        zeroed r by the all-reduce that also normalises (one kernel where the fused all-reduce takes the rows).
        Fed ids (< 0, see `launch`) are the previous step's samples, still in out_ids."""
        k, ln1, eps = self.k, self.layers[0].ln1, self.cfg.rms_norm_eps
        if self.comm.size == 1:     # the whole vocabulary here: lookup and first norm in one kernel
            k.embedding_rms_norm(rows.h, rows.resid, ids, self.embed, ln1, eps, fed=self.out_ids)
            return
        k.embedding(rows.delta, ids, self.embed, self.shard.vocab_lo, fed=self.out_ids, zero=rows.resid)
        fused = self.fuse_allreduce_norm and hasattr(self.comm, "all_reduce_add_rms_norm")
        if fused and self.comm.all_reduce_add_rms_norm(rows.delta, rows.resid, rows.h, ln1, eps):
            return
        self.comm.all_reduce_device(rows.delta)
        k.add_rms_norm(rows.h, rows.delta, rows.resid, ln1, eps)

    def _row_parallel(self, y, x, w, rows, norm_weight, resid, next_w=None):
        """y = all_reduce(x_local @ w_local.T), each rank holding the input columns it computes; then the next
        pre-norm: r += y; h = rms_norm(r) * norm_weight. Decode-sized steps do the all-reduce and the norm in one
        kernel (the IPC path), with the same bits as the two. `resid` is r's buffer now; returns r's buffer after
        and the pre-norm left to the next projection's kernel (None: done here). On one GPU with one token the
        norm folds into the kernel of next_w (the projection that reads h) where it can (Kernels.prenorm_fusable):
        r + y then goes to the other residual buffer, since every block of that kernel reads r."""
        k, eps = self.k, self.cfg.rms_norm_eps
        fused = self.comm.size > 1 and self.fuse_allreduce_norm and hasattr(self.comm, "all_reduce_add_rms_norm")
        # The projection's kernel sends its tiles to the peers itself where it can: they cross while it runs.
        send = self.comm.row_send(y) if fused and self.presend and k.gemv_sends(w, y, x.shape[0]) else None
        k.linear(y, x, w, scratch=self.wscratch, send=send)
        if self.comm.size > 1:
            if fused and self.comm.all_reduce_add_rms_norm(y, resid, rows.h, norm_weight, eps, sent=send is not None):
                return resid, None
            self.comm.all_reduce_device(y)
        # int8's folded kernel reads r before its PDL wait: safe after a kernel that lets it start only once the
        # kernels before had finished (cuda_src/common.cuh, pdl_begin_late: the quantized projections' but Q4_0's
        # and Q4_1's one-token ones); the other folds read after theirs.
        elif (next_w is not None and self.fuse_prenorm and y.shape[0] == 1
              and k.prenorm_fusable(next_w, y.dtype, 1, y.shape[1])
              and (k.starts_dependents_late(w, y.dtype, 1) or not k.prenorm_reads_early(next_w))):
            out = self.resid_alt if resid.ptr == self.resid.ptr else self.resid.view(0, resid.shape)
            self.prenorm_folds += 1
            return out, (y, resid, out, norm_weight, eps)
        k.add_rms_norm(rows.h, y, resid, norm_weight, eps)
        return resid, None

    def _row_parallel_async(self, y, x, w, half: int):
        """_row_parallel's product for micro-batch `half` of _run_overlapped, its all-reduce on the side stream
        once the main stream has computed y. Returns the event that marks the sum done; the caller normalises."""
        self.k.linear(y, x, w, scratch=self.wscratch)
        self.side.follow_main(half)
        self.comm.all_reduce_device(y, stream=self.side.handle)
        return self.side.mark(half)

    def _lm_head(self, x):
        """Logits [L, vocab] f32: each rank its vocab rows, gathered side by side."""
        L = x.shape[0]
        local = self.logits_local.view(0, (L, self.vocab_local))
        # A quantized head runs the small-M kernel in 32-row tiles at any L: no vocab-sized scratch.
        self.k.linear(local, x, self.lm_head, path="qgemv" if isinstance(self.lm_head, QuantWeight) else None)
        if self.comm.size == 1:
            return local
        full = self.logits.view(0, (L, self.cfg.vocab_size))
        self.comm.all_gather_vocab(full, local)
        return full

    def forward(self, step: StepInput, specs, want_logits: bool = False):
        """Run one step. Returns (token ids [L] from GPU sampling, or None; logits [L, V] on the host when
        `want_logits`)."""
        if not want_logits:
            return self.collect(self.launch(step, specs)), None
        self.buf.begin(self.dev.stream)
        self._stage(step, specs)
        T, S, L = step.num_tokens, step.num_seqs, len(step.logits_index)
        self.buf.upload(S, self.dev.stream)
        logits = self._eager(step, T, S, L, sample=False)
        out = logits.to_numpy() if L else np.zeros((0, self.cfg.vocab_size), np.float32)
        return None, out

    def launch(self, step: StepInput, specs, fetch: bool = True):
        """Enqueue one step with sampling on the GPU and return a handle for `collect`, without waiting for the GPU,
        so the host can prepare the next step while this one runs (the engine's one-step lag, mpillm.engine).

        Fed tokens: an input id -1 - j stands for the id sampled for row j of the step launched just before this
        one; the embedding reads it from the device (out_ids), so that step need not be collected first. Its
        sampling must have run on the GPU (not `want_logits`). fetch=False: nobody will collect (group peers)."""
        self.buf.begin(self.dev.stream)
        self._stage(step, specs)
        k = self._out_turn
        self._out_turn ^= 1
        self.buf.host_view("out_slot", 1)[0] = k
        T, S, L = step.num_tokens, step.num_seqs, len(step.logits_index)
        if self._graphable(step) and L == S:
            self._replay(step, specs)
        else:
            self.buf.upload(S, self.dev.stream)
            self._eager(step, T, S, L, sample=L > 0)
        if not fetch:
            return None
        self.out_ready[k].record(self.dev.stream)
        return k, L

    def collect(self, handle) -> np.ndarray:
        """The sampled ids [L] of a launched step (waits for that step, not for any launched after it)."""
        k, L = handle
        self.out_ready[k].synchronize()
        S = self.buf.max_seqs
        return self.out_mapped[k * S: k * S + L].copy()

    def _eager(self, step: StepInput, T: int, S: int, L: int, sample: bool):
        if self.overlap and T >= OVERLAP_MIN_TOKENS:
            # The halves' metadata lives in one pinned array: the step before must have copied its own out.
            self.dev.synchronize()
            return self._run_overlapped(T, S, L, self._stage_halves(step), sample)
        return self._run(T, S, L, _attention_groups(step), sample)

    # ------------------------------------------------------------------------------------ CUDA graphs
    def _graphable(self, step: StepInput) -> bool:
        S = step.num_seqs
        return S > 0 and step.num_tokens == S and S <= self.buckets[-1] and self.buckets[-1] <= self.max_tokens

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _pad_decode(self, n: int, B: int):
        """Rows n..B-1 of a decode batch: no KV store (slot -1), one visible key, greedy."""
        b = self.buf
        if B == n:
            return
        b.host_view("ids", B)[n:] = 0
        b.host_view("positions", B)[n:] = 0
        b.host_view("slots", B)[n:] = -1
        qs = b.host_view("query_start", B + 1)
        qs[n + 1:] = np.arange(n + 1, B + 1)
        b.host_view("context_lens", B)[n:] = 1
        b.host_view("logits_index", B)[n:] = np.arange(n, B)
        b.host_view("block_tables", B * b.max_blocks)[n * b.max_blocks:] = 0
        b.host_view("temperature", B, np.float32)[n:] = 0.0
        b.host_view("top_k", B)[n:] = 0
        b.host_view("top_p", B, np.float32)[n:] = 1.0
        b.host_view("min_p", B, np.float32)[n:] = 0.0
        b.host_view("steps", B)[n:] = 0
        b.host_view("seeds", 2 * B)[2 * n:] = 0

    def _replay(self, step: StepInput, specs) -> None:
        from cuda.bindings import driver as cu
        n = step.num_seqs
        B = self._bucket(n)
        self._pad_decode(n, B)
        self.buf.upload(B, self.dev.stream)
        # Two graphs per batch bucket: contexts that fit one split-K partition run the direct attention
        # kernel (no partial outputs, no merge kernel), or at small batches the cluster kernel (the same bound:
        # kernels.DECODE_CLUSTER_MAX_CTX); longer ones the split-K pair sized for max_model_len.
        max_ctx = DECODE_PARTITION if int(step.context_lens.max()) <= DECODE_PARTITION else self.max_blocks * self.block_size
        key = (B, max_ctx, self.buf.turn)      # each turn's graph reads its own metadata array
        graph = self.graphs.get(key)
        if graph is None:
            # The capture's eager warm-up samples into out_ids, where this step's fed ids still have to be read
            # from: keep them aside until the graph runs.
            nbytes = self.out_ids.nbytes
            self.cuda.memcpy_dtod_async(self._ids_aside.ptr, self.out_ids.ptr, nbytes, self.dev.stream)
            graph = self.graphs[key] = self._capture(B, max_ctx)
            self.cuda.memcpy_dtod_async(self.out_ids.ptr, self._ids_aside.ptr, nbytes, self.dev.stream)
        stream = cu.CUstream(self.dev.stream.handle)
        check_cu(cu.cuGraphLaunch(graph, stream), "cuGraphLaunch")

    def _capture(self, B: int, max_ctx: int):
        """Capture the decode step for batch bucket B and contexts up to max_ctx. The grid of every kernel is
        fixed by B and max_ctx, so one graph serves every decode step within those bounds."""
        from cuda.bindings import driver as cu
        t0 = time.perf_counter()
        args = (B, B, B, [(0, B, 1, max_ctx)], True)
        self._run(*args)                      # warm-up: first launches load modules and set attributes
        self.dev.synchronize()
        stream = cu.CUstream(self.dev.stream.handle)
        check_cu(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                 "cuStreamBeginCapture")
        try:
            self._run(*args)
        finally:
            graph = check_cu(cu.cuStreamEndCapture(stream), "cuStreamEndCapture")
        try:
            self.pdl_edges = link_programmatic(graph, self.k.owns) if self.pdl else 0
            if self.k.trace:              # scripts/bench.py --timeline lines the records up against it
                self.graph_kernels = kernel_sequence(graph, self.k.owns)
            exe = check_cu(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            check_cu(cu.cuGraphDestroy(graph), "cuGraphDestroy")     # the executable graph is independent
        self.graph_seconds += time.perf_counter() - t0
        return exe

    def drop_graphs(self):
        """Destroy the decode graphs (the next decode step captures again, with the arguments of now)."""
        from cuda.bindings import driver as cu
        self.dev.synchronize()
        graphs, self.graphs = self.graphs, {}
        for exe in graphs.values():
            check_cu(cu.cuGraphExecDestroy(exe), "cuGraphExecDestroy")

    def close(self):
        """Destroy the decode graphs. Must come before NCCL's destroy/abort: graphs that captured collectives
        hold references on the communicator, and ncclCommDestroy / ncclCommAbort wait for them to go
        (both ranks of a TP=2 job on H200s sat in ncclCommAbort until the graphs were destroyed first)."""
        self.drop_graphs()
        if self.side is not None:
            self.side.close()


def kv_cache_over_asked(rank: int, num_blocks: int, block_size: int, per_block: int, free: int, total: int) -> str:
    """The message of a KV cache asked for (num_blocks given: tests, benchmarks) beyond the card's free memory,
    instead of the allocator's bare out-of-memory error."""
    return (f"rank {rank}: the KV cache was asked for {num_blocks} blocks of {block_size} tokens "
            f"({_mib(num_blocks * per_block)}) but {_mib(free)} of {_mib(total)} are free, of which "
            f"{_mib(KV_RESERVE_BYTES)} stay for NCCL, graphs and the driver; ask for fewer blocks (fewer or shorter "
            f"sequences)")


def kv_cache_shortfall(rank: int, budget: int, num_blocks: int, asked: bool, block_size: int, per_block: int,
                       max_model_len: int, free: int, total: int, utilization: float) -> str:
    """The message of a KV cache too small for one max_model_len sequence: what it got, what one sequence needs,
    the card's memory, and the flags that help. `asked`: num_blocks was given (tests, benchmarks), not derived
    from the budget."""
    one_seq = -(-max_model_len // block_size)
    got = (f"{num_blocks} blocks of {block_size} tokens as asked ({_mib(num_blocks * per_block)})" if asked else
           f"{_mib(max(budget, 0))} ({max(num_blocks, 0)} blocks of {block_size} tokens)")
    return (f"rank {rank}: the KV cache gets {got} but one {max_model_len}-token sequence needs {one_seq} blocks "
            f"({_mib(one_seq * per_block)}); free {_mib(free)} of {_mib(total)}. Lower --max-model-len, "
            f"raise --gpu-memory-utilization (now {utilization}), or add GPUs (--tp).")


def rope_interleave(a: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows of each head_dim-row head reordered [0, h, 1, h + 1, ...] (h = head_dim / 2): each rotary pair on
    adjacent rows, what Kernels.linear_rope takes (any trailing shape)."""
    n = a.shape[0]
    if n % head_dim or head_dim % 2:
        raise ValueError(f"rope_interleave: {n} rows are not whole heads of {head_dim} (even)")
    half = head_dim // 2
    heads = a.reshape(n // head_dim, 2, half, *a.shape[1:])
    return np.ascontiguousarray(heads.swapaxes(1, 2).reshape(a.shape))


def interleave_halves(a: np.ndarray) -> np.ndarray:
    """Rows [first half; second half] -> [a0 b0 a1 b1 ...] (any trailing shape)."""
    half = a.shape[0] // 2
    return np.ascontiguousarray(a.reshape(2, half, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape))


def _attention_groups(step: StepInput) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive sequences that are all decodes or all prefills: (lo, hi, max query, max context)."""
    n_q = np.diff(step.query_start)
    groups, lo = [], 0
    for i in range(1, len(n_q) + 1):
        if i == len(n_q) or (n_q[i] == 1) != (n_q[lo] == 1):
            groups.append((lo, i, int(n_q[lo:i].max()), int(step.context_lens[lo:i].max())))
            lo = i
    return groups
