"""From command-line options to a ready replica on this rank: model path, backend, shard, KV cache, engine."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mpillm.checkpoint import CheckpointError, open_checkpoint
from mpillm.job import UsageError


def resolve_model(model: str | None, fetch: bool = True) -> Path | None:
    """The --model path, or the default model (fetched on first use when `fetch`)."""
    if model:
        p = Path(model)
        if not p.exists():
            raise UsageError(f"--model {model}: no such file or directory")
        return p
    from mpillm.default_model import DEFAULT_MODEL_NAME, DefaultModelError, cache_dir, default_model_path
    if not fetch:
        cached = cache_dir() / DEFAULT_MODEL_NAME
        return cached if cached.exists() else None
    try:
        return default_model_path()
    except DefaultModelError as e:
        raise UsageError(str(e)) from None


# Batch shape when the job does not set it. A GPU decodes far more sequences per step than the NumPy backend
# can, and more sequences amortise each step's weight reads: on Llama-3-8B with 1,000 ShareGPT-like requests at
# 8,192 tokens per step, 512 sequences gave 9,688 output tok/s and 1,024 gave 10,178 on one H100, 256 gave 8,537
# and 512 9,472 on another (docs/PERFORMANCE.md). The KV cache still bounds how many run at once (decode
# batches beyond the largest CUDA-graph bucket, 512, run eagerly).
DEFAULT_MAX_NUM_SEQS = {"cuda": 1024, "cpu": 64}
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 8192, "cpu": 2048}


def pick_device(requested: str, log) -> str:
    if requested in ("cpu", "cuda"):
        return requested
    try:
        import pycuda.driver as drv
        drv.init()
        if drv.Device.count() > 0:
            log("mpillm: --device auto: using CUDA")
            return "cuda"
        reason = "no CUDA device"
    except Exception as e:  # pycuda missing or no driver: the GPU extras are not usable here
        reason = f"GPU extras unavailable ({type(e).__name__})"
    log(f"mpillm: --device auto: {reason}; using the NumPy CPU backend")
    return "cpu"


@dataclass
class Replica:
    engine: object | None      # only on the group leader
    runner: object             # GroupRunner
    model_name: str
    close: callable = lambda: None


def _fetch_default(layout):
    """Rank 0 of each node fetches the default model into the cache (once), the others wait for it."""
    from mpi4py import MPI
    err = None
    node = layout.world.Split_type(MPI.COMM_TYPE_SHARED, key=layout.rank)
    if node.Get_rank() == 0:
        try:
            resolve_model(None)
        except UsageError as e:
            err = str(e)
    err = node.bcast(err, root=0)
    node.Free()
    if err:
        raise UsageError(err)
    return resolve_model(None)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_runner(ckpt, opts, layout, comm, max_len: int, block_size: int, log):
    """The NumPy backend (float32): KV cache sized by --kv-cache-memory, everything checked against the
    node's available memory before anything big is allocated."""
    from mpillm.model import Transformer
    from mpillm.parallel import make_shard
    from mpillm.runner import NumpyRunner
    cfg = ckpt.config
    shard = make_shard(cfg, layout.group.Get_rank(), layout.tp)
    per_token = 2 * cfg.num_layers * shard.n_kv_heads * cfg.head_dim * 4
    num_blocks = int(opts.kv_cache_memory * (1 << 30)) // (per_token * block_size)
    if num_blocks < 1:
        raise UsageError(f"--kv-cache-memory {opts.kv_cache_memory} GiB holds no {block_size}-token block "
                         f"({per_token * block_size / 2**20:.1f} MiB each)")
    if num_blocks * block_size < max_len:
        max_len = num_blocks * block_size
        log(f"mpillm: the {opts.kv_cache_memory} GiB KV cache holds {max_len} tokens: context capped there "
            f"(raise --kv-cache-memory for longer)")
    h, hd = cfg.hidden_size, cfg.head_dim
    weights = 4 * (cfg.num_layers * (h * (shard.n_heads + 2 * shard.n_kv_heads) * hd + shard.n_heads * hd * h
                                     + 3 * h * (shard.ffn_hi - shard.ffn_lo) + 2 * h)
                   + (shard.vocab_hi - shard.vocab_lo) * h * (1 if cfg.tie_word_embeddings else 2))
    need = weights + num_blocks * block_size * per_token
    free = _mem_available()
    per_node = layout.local_size
    if free is not None and need * per_node > free:
        raise UsageError(
            f"rank {layout.rank}: needs {need / 2**30:.2f} GiB (float32 weights {weights / 2**30:.2f} GiB + KV cache "
            f"{(need - weights) / 2**30:.2f} GiB) x {per_node} ranks on this node, but only {free / 2**30:.2f} GiB "
            f"is available. Use --tp {layout.tp * 2} (more ranks per replica), a smaller --kv-cache-memory, "
            f"--max-model-len, or --device cuda.")
    # The NumPy backend computes in float32 on exactly dequantized GGUF blocks, which is what --quantize auto
    # means on the GPU too; int8 simulates W8A16 (int8-rounded weights, float32 math).
    int8 = opts.quantize == "int8"
    net = Transformer(ckpt, comm, quantize="int8" if int8 else None, group_size=opts.group_size or 128,
                      quantize_lm_head=int8 and opts.quantize_lm_head)
    return NumpyRunner(net, num_blocks, block_size), num_blocks, max_len


def build_replica(opts, layout) -> Replica:
    from mpillm.comm import MPIComm, SingleComm
    from mpillm.engine import Engine, EngineConfig
    from mpillm.parallel import ShardingError
    from mpillm.runner import GroupRunner
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if layout.rank == 0 else (lambda m: None)
    path = resolve_model(opts.model) if opts.model else _fetch_default(layout)
    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    cfg = ckpt.config
    max_len = min(opts.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if opts.max_model_len and opts.max_model_len > cfg.max_position_embeddings:
        log(f"mpillm: --max-model-len {opts.max_model_len} exceeds the model's {cfg.max_position_embeddings}; using that")
    device = pick_device(opts.device, log)
    if opts.max_num_seqs is None:
        opts.max_num_seqs = DEFAULT_MAX_NUM_SEQS[device]
    if opts.max_num_batched_tokens is None:
        opts.max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS[device]
    block_size = 16
    if opts.quantize == "int8" and opts.group_size is None:
        from mpillm.quant import pick_group_size
        try:
            opts.group_size = pick_group_size(cfg, layout.tp)     # the same on every rank: same model, same --tp
        except ValueError as e:
            raise UsageError(f"--quantize int8: {e}") from None
        log(f"mpillm: --quantize int8: groups of {opts.group_size} along the input dimension")
    try:
        if device == "cuda":
            try:
                from mpillm.cuda.backend import build_cuda_runner
            except ImportError as e:
                raise UsageError(f"--device cuda: the CUDA backend is unavailable here ({e}); "
                                 "install the GPU extras (pip install mpillm[cuda]) or use --device cpu") from None
            local, num_blocks = build_cuda_runner(ckpt, opts, layout, max_len, block_size, log)
        else:
            comm = MPIComm(layout.group) if layout.tp > 1 else SingleComm()
            local, num_blocks, max_len = _cpu_runner(ckpt, opts, layout, comm, max_len, block_size, log)
    except ShardingError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:                 # --quantize int8 with a --group-size the weights cannot take
        if opts.quantize != "int8":
            raise
        raise UsageError(f"--quantize int8 --group-size {opts.group_size}: {e}") from None
    runner = GroupRunner(local, layout.group)
    engine = None
    if layout.is_leader:
        tok = ckpt.tokenizer()
        engine = Engine(runner, tok, EngineConfig(
            max_model_len=max_len, num_blocks=num_blocks, block_size=block_size, max_num_seqs=opts.max_num_seqs,
            max_num_batched_tokens=max(opts.max_num_batched_tokens, block_size),
            prefix_caching=opts.prefix_caching, global_seed=opts.seed))
    name = os.path.basename(str(path).rstrip("/"))
    return Replica(engine, runner, name, getattr(local, "close", lambda: None))
