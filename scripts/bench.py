#!/usr/bin/env python3
"""Decode and prefill speed of the GPU backend, against the card's measured copy bandwidth.

    python scripts/bench.py --model dummy:llama3-8b --batch 1,8,32,128 --prefill 512,2048
    python scripts/bench.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --batch 1,8
    mpiexec -n 2 python scripts/bench.py --model dummy:llama3-8b --tp 2 --batch 1,32

Decode: B sequences with a 128-token context each step one token at a time through the runner the engine
uses (metadata staging, CUDA graph replay, sampling on the GPU, ids back to the host), so the number is
what `mpillm run` gets per step, less the scheduler's Python. Reports tok/s, ms/step, the bytes a step
must read (weights + KV), achieved GB/s and its share of the measured device copy bandwidth (the decode
roofline). Prefill: one sequence of N tokens, tok/s and dense TFLOP/s (2 x params x N, plus attention).
Writes a JSON line per measurement to --json if given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def copy_bandwidth(cuda, stream, nbytes=1 << 30, reps=20) -> float:
    """Device-to-device copy GB/s, counting read + write (the README's roofline convention)."""
    a, b = cuda.mem_alloc(nbytes), cuda.mem_alloc(nbytes)
    cuda.memcpy_dtod_async(b, a, nbytes, stream)
    stream.synchronize()
    start, end = cuda.Event(), cuda.Event()
    start.record(stream)
    for _ in range(reps):
        cuda.memcpy_dtod_async(b, a, nbytes, stream)
    end.record(stream)
    end.synchronize()
    secs = end.time_since(start) / 1e3
    a.free(), b.free()
    return 2 * nbytes * reps / secs / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama3-8b", help="dummy:NAME (random weights, real shapes) or a checkpoint")
    ap.add_argument("--batch", default="1,8,32,128", help="decode batch sizes")
    ap.add_argument("--prefill", default="512,2048", help="prefill lengths ('' = none)")
    ap.add_argument("--context", type=int, default=128, help="tokens of context per sequence during decode")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rank-of", type=int, default=0, metavar="N",
                    help="dummy models, one GPU: run rank 0's share of a TP N step alone (its heads, MLP slice and "
                         "vocabulary slice as weights; no all-reduce): the compute part of a tensor-parallel step")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--no-graph", action="store_true", help="eager launches instead of CUDA graph replay")
    ap.add_argument("--sync-steps", action="store_true",
                    help="decode: read each step's ids back before launching the next (the A side of an A/B with "
                         "the engine's default, which launches step n + 1 first and feeds its ids on the device)")
    ap.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    ap.add_argument("--throughput", type=int, default=0, metavar="N",
                    help="instead: N requests (ShareGPT-like lengths, seeded) through the engine, continuous "
                         "batching vs static batching")
    ap.add_argument("--max-num-seqs", type=int, default=1024,
                    help="--throughput: sequences decoded together (mpillm run's GPU default)")
    ap.add_argument("--engine-only", action="store_true",
                    help="--throughput: the engine's host work alone (scheduling, step metadata, detokenising), with a "
                         "stand-in runner that samples random ids: no GPU needed")
    ap.add_argument("--gemm", action="store_true", help="instead: our GEMM vs cuBLASLt on the model's shapes")
    ap.add_argument("--qgemv", action="store_true", help="instead: quantized small-M kernel variants vs bf16 GEMV")
    ap.add_argument("--qgemv-rows", default="1,8,32", help="--qgemv: the token counts M to time [default: 1,8,32]")
    ap.add_argument("--attention", action="store_true",
                    help="instead: the decode attention kernel alone at --batch sizes of --context keys each (grid "
                         "sized for a decode graph's bound: 512 keys where the context fits, else 2,048 or the "
                         "context), the plain and _occ builds and the cluster kernel")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="--throughput: tokens per step")
    ap.add_argument("--modes", default="continuous,static,static-padded,static-hf",
                    help="--throughput: which schedules to run, comma-separated, of continuous, static, static-padded "
                         "and static-hf (see throughput()); the ratios need continuous")
    ap.add_argument("--quantize", default=None, choices=["none", "auto", "int8", "q4", "q4_1"],
                    help="weights: none, auto (a GGUF's own Q8_0/Q4 blocks), int8 (W8A16), q4 (random W4A16 in GGUF "
                         "Q4_0's scheme: d per 32 weights, 4.5 bits), q4_1 (random, Q4_1's d and min per 32, 5 bits); "
                         "q4 and q4_1 for dummy models only [default: auto for a checkpoint, none for dummy:]")
    ap.add_argument("--group-size", type=int, default=None,
                    help="--quantize int8: elements per scale [default: 128, or 64/32 where the shapes need it]")
    ap.add_argument("--quantize-lm-head", action="store_true", help="--quantize int8/q4/q4_1: the LM head too")
    ap.add_argument("--no-fuse-swiglu", action="store_true",
                    help="gate/up projection and SwiGLU as two kernels (the A side of an A/B with the fused one)")
    ap.add_argument("--no-fuse-rope", action="store_true",
                    help="q/k/v projection and rope/KV store as two kernels (the A side of an A/B with the fused one)")
    ap.add_argument("--no-fuse-prenorm", action="store_true",
                    help="one GPU, batch 1, int8, Q4_0 or bf16: the residual add + RMSNorm before the q/k/v and "
                         "gate/up projections as a kernel of its own (the A side of an A/B with it folded into theirs)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="decode graphs without programmatic dependent launch (the A side of an A/B; sets MPILLM_PDL=0)")
    ap.add_argument("--overlap", action="store_true",
                    help="--tp > 1: prefill steps as two micro-batches whose all-reduces overlap the other's GEMMs on a "
                         "second stream (the B side of an A/B with the default: one batch, all-reduces in line)")
    ap.add_argument("--no-fuse-ar-norm", action="store_true",
                    help="--tp > 1: the IPC all-reduce and the next residual add + RMSNorm as two kernels (the A side of an "
                         "A/B with the fused kernel)")
    ap.add_argument("--no-presend", action="store_true",
                    help="--tp > 1: the fused all-reduce kernel sends this rank's part itself, instead of the projection "
                         "that computes it (bf16 GEMV, int8 / Q4_0 one-token kernels; the A side of an A/B)")
    ap.add_argument("--profile", action="store_true",
                    help="after each decode batch and prefill: one eager step with a CUDA event pair around every kernel, "
                         "summed per kernel (events serialise the launches; the ratios are what matter)")
    ap.add_argument("--comm-probe", action="store_true",
                    help="--tp > 1: after the other measurements, time the decode batches again with every one-shot "
                         "IPC all-reduce exchanging nothing (each rank sums its own partial: wrong tokens, same kernels "
                         "otherwise); the difference is the share of the step spent communicating")
    ap.add_argument("--skip-probe", default="", metavar="RE[;RE...]",
                    help="after the other measurements, time the decode batches again once per regular expression, "
                         "with the launches of every kernel whose name it finds left out (wrong tokens); the "
                         "difference is what those kernels cost inside the decode graph, their starts and ends "
                         "included, e.g. 'attention_decode;_x1n;^gemv_bf16'")
    ap.add_argument("--timeline", action="store_true",
                    help="the decode batches again with every block stamping its wait and end (kernels built with "
                         "MPILLM_TRACE=1, mpillm/cuda/trace.py): per kernel, its share of the step from release to "
                         "release, how early its blocks were placed, its last block's lag and the next kernel's start "
                         "after it. The normal measurement runs on the trace build too (stamps off): not an A/B with "
                         "a normal build")
    ap.add_argument("--summarize", default=None, metavar="JSONL",
                    help="instead (no GPU): issue 5's and 6's ratios from the decode records that --json appended to "
                         "JSONL (scripts/targets.sh), per card: TP 2 and TP 4 over TP 1 (bf16, Llama-3-8B, b=1) and "
                         "Q4_0 over int8 (b=1; both LM heads bf16, and both quantized), medians over the rounds")
    ap.add_argument("--nccl-only", action="store_true",
                    help="--tp > 1: every all-reduce through NCCL (no one-shot IPC kernel for small messages)")
    args = ap.parse_args()
    if args.throughput and not args.engine_only:
        parse_modes(args.modes)       # a typo exits here, not after minutes of loading weights
    skip_patterns(args.skip_probe, ap.error)      # so does a bad --skip-probe pattern
    if args.timeline and args.no_graph:
        ap.error("--timeline lays out the decode graph's kernels: not with --no-graph")
    if args.summarize:
        print(summarize_targets(args.summarize))
        return

    if args.engine_only:
        return engine_overhead(args)
    from mpi4py import MPI

    import pycuda.driver as cuda
    from mpillm.batch import StepInput
    from mpillm.cuda.kernels import Kernels
    from mpillm.cuda.model import CudaTransformer
    from mpillm.cuda.runtime import init_device
    from mpillm.dummy import dummy_config, is_dummy
    from mpillm.engine import SampleSpec
    from mpillm.jobio import SamplingParams
    from mpillm.parallel import make_shard

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if args.nccl_only:
        os.environ["MPILLM_IPC_ALLREDUCE"] = "0"
    if args.no_pdl:
        os.environ["MPILLM_PDL"] = "0"
    if args.timeline:
        os.environ["MPILLM_TRACE"] = "1"
    if size != args.tp:
        sys.exit(f"run with {args.tp} ranks for --tp {args.tp} (got {size})")
    if args.quantize is None:
        args.quantize = "none" if is_dummy(args.model) else "auto"
    if is_dummy(args.model):
        ckpt, cfg = None, dummy_config(args.model)
    else:
        from mpillm.checkpoint import open_checkpoint
        ckpt = open_checkpoint(args.model)
        cfg = ckpt.config
    if args.rank_of:
        if args.rank_of < 0 or not is_dummy(args.model) or args.tp != 1 or args.throughput:
            sys.exit("--rank-of N: N >= 1, a dummy: model on one rank (--tp 1), not with --throughput")
        try:
            cfg = rank_share(cfg, args.rank_of)
        except ValueError as e:     # ShardingError, ConfigError: a share that cannot stand alone
            sys.exit(f"--rank-of {args.rank_of}: {e}")
    label = args.model + (f" (rank 0 of TP {args.rank_of})" if args.rank_of else "")
    if args.group_size is None:
        from mpillm.quant import pick_group_size
        args.group_size = pick_group_size(cfg, args.tp)
    if args.throughput:
        return throughput(args, ckpt, cfg, world)
    if args.gemm:
        return gemm_compare(args, cfg)
    if args.qgemv:
        return qgemv_compare(args, cfg)
    if args.attention:
        return attention_compare(args, cfg)
    batches = [int(b) for b in args.batch.split(",") if b]
    prefills = [int(p) for p in args.prefill.split(",") if p]
    max_seqs = max(batches + [1])
    max_len = max(prefills + [args.context + args.steps + 16]) + 16
    max_tokens = max(prefills + [max_seqs, args.context])
    say = print if rank == 0 else (lambda *a, **k: None)

    device = init_device(rank)
    comm = None
    if args.tp > 1:
        from mpillm.cuda.nccl import NcclComm
        comm = NcclComm(world, device, [(s.vocab_lo, s.vocab_hi) for s in (make_shard(cfg, r, size) for r in range(size))])
        comm.reserve(max_seqs)
    t0 = time.perf_counter()
    kernels = Kernels(device)
    compile_s = time.perf_counter() - t0
    shard = make_shard(cfg, rank, size)
    # The cache holds the decode batches (each sequence its context and the timed steps) or one prefill,
    # whichever needs more: they run one after the other on the same blocks.
    decode_blocks = -(-(args.context + args.steps + 16) // 16)
    blocks_needed = max([max_seqs * decode_blocks] + [-(-p // 16) + 1 for p in prefills]) + 16
    model = CudaTransformer(ckpt, cfg, shard, device, kernels, dtype=args.dtype, comm=comm, max_tokens=max_tokens,
                            max_seqs=max_seqs, max_model_len=max_len, num_blocks=blocks_needed,
                            overlap=args.overlap, fuse_allreduce_norm=not args.no_fuse_ar_norm,
                            presend=not args.no_presend, **quant_args(args))
    bw = copy_bandwidth(cuda, device.stream)
    weight_bytes = model.streamed_bytes          # bytes a decode step reads (the embedding table is not streamed)
    if size > 1:
        say(f"# all-reduce: {'one-shot IPC kernel up to %d bytes, NCCL beyond' % comm.ipc.max_bytes if comm.ipc else 'NCCL'}")
    say(f"# {device.name}, {label}, tp={size}, {args.dtype}, weights {model._scheme()}; "
        f"kernels compiled in {compile_s:.2f} s; "
        f"weights {model.weight_bytes / 2**30:.2f} GiB/rank, {weight_bytes / 2**30:.2f} GiB read per decode step; "
        f"copy bandwidth {bw:.0f} GB/s; decode split {kernels.decode_split:g} blocks/SM (min {kernels.decode_min_part} "
        f"keys), cluster kernel {'on' if kernels.decode_cluster else 'off'}"
        + (f"; prefill micro-batch overlap {'on' if model.overlap else 'off'}" if size > 1 else ""))
    results = []

    def record(**kw):
        kw.update(gpu=device.name, model=label, tp=size, dtype=args.dtype, quantize=args.quantize,
                  allreduce="nccl" if args.nccl_only or size == 1 else "ipc+nccl", fuse_swiglu=not args.no_fuse_swiglu,
                  pdl=model.pdl, overlap=model.overlap, decode_split=kernels.decode_split,
                  decode_cluster=kernels.decode_cluster,
                  fuse_ar_norm=model.fuse_allreduce_norm, presend=model.presend, fuse_rope=model.fuse_rope,
                  fuse_prenorm=model.fuse_prenorm, quantize_lm_head=bool(args.quantize_lm_head),
                  group_size=args.group_size if args.quantize == "int8" else None)
        results.append(kw)

    greedy = SamplingParams(temperature=0.0)
    kv_per_token = 2 * cfg.num_layers * shard.n_kv_heads * cfg.head_dim * 2

    def decode(B: int, probe: bool = False, around_timed=None) -> float:
        """Times args.steps decode steps of B sequences; returns seconds per step. around_timed: a context manager
        entered just before the timed steps (after the warm-up ones, which capture the graph) and left after them."""
        tables = [list(range(i * decode_blocks, (i + 1) * decode_blocks)) for i in range(B)]
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, cfg.vocab_size, args.context).tolist() for _ in range(B)]
        specs = [SampleSpec(greedy, 0, 0, None) for _ in range(B)]
        # Prefill the contexts (chunked so the step fits the buffers).
        per = max(1, max_tokens // args.context)
        for lo in range(0, B, per):
            rows = [(prompts[i], 0, tables[i], True) for i in range(lo, min(B, lo + per))]
            model.forward(StepInput.build(rows, 16), specs[: len(rows)])
        toks = [[1] for _ in range(B)]
        pos = args.context
        pending = None      # the step launched last, not yet read back

        def step():
            """One decode step as the engine runs it: launched before the previous step's ids are read back, its
            input ids fed on the device from that step's samples (--sync-steps: read back, then launch)."""
            nonlocal pos, pending
            if args.sync_steps:
                st = StepInput.build([(toks[i], pos, tables[i], True) for i in range(B)], 16)
                ids = model.collect(_launch(model, st, specs, not args.no_graph))
                for i in range(B):
                    toks[i] = [int(ids[i])]
            else:
                rows = [([-1 - i] if pending is not None else toks[i], pos, tables[i], True) for i in range(B)]
                handle = _launch(model, StepInput.build(rows, 16), specs, not args.no_graph)
                if pending is not None:
                    model.collect(pending)
                pending = handle
            pos += 1

        def drain():
            nonlocal pending
            if pending is not None:
                model.collect(pending)
                pending = None

        for _ in range(3):
            step()
        drain()
        device.synchronize()
        world.Barrier()
        with around_timed() if around_timed else nullcontext():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            drain()
            device.synchronize()
            dt = (time.perf_counter() - t) / args.steps
        ctx = pos - args.steps // 2
        step_bytes = weight_bytes + B * ctx * kv_per_token
        gbs = step_bytes / dt / 1e9
        if probe:
            return dt
        say(f"decode  batch {B:4d}: {B / dt:9.1f} tok/s  {dt * 1e3:7.3f} ms/step  {gbs:7.0f} GB/s  "
            f"{100 * gbs / bw:5.1f}% of copy bandwidth (roofline {bw * 1e9 / step_bytes * B:9.1f} tok/s)"
            + ("" if args.no_graph else f"  [graph: {model.pdl_edges} programmatic edges]")
            + (" [steps read back one by one]" if args.sync_steps else ""))
        record(kind="decode", batch=B, tok_s=B / dt, ms_step=dt * 1e3, gb_s=gbs, roofline_frac=gbs / bw,
               graph=not args.no_graph, pipelined=not args.sync_steps)
        if args.profile:
            st = StepInput.build([(toks[i], pos, tables[i], True) for i in range(B)], 16)
            say(profile_step(cuda, model, kernels, st, specs, f"decode batch {B}, context {pos}"))
        return dt

    decode_s = {B: decode(B) for B in batches}

    h = cfg.hidden_size
    # FLOPs a prefill performs: every token through every layer, the LM head only for the one row sampled
    # (counting the head for all n tokens, as the sessions before the sixth did, overstated 8B prefill by ~7%).
    layer_params = cfg.num_layers * (h * (shard.n_heads + 2 * shard.n_kv_heads) * cfg.head_dim
                                     + shard.n_heads * cfg.head_dim * h + 3 * h * (shard.ffn_hi - shard.ffn_lo))
    head_params = (shard.vocab_hi - shard.vocab_lo) * h
    for n in prefills:
        ids = np.random.default_rng(1).integers(0, cfg.vocab_size, n).tolist()
        table = list(range(-(-n // 16) + 1))
        st = StepInput.build([(ids, 0, table, True)], 16)
        spec = [SampleSpec(greedy, 0, 0, None)]
        model.forward(st, spec)
        device.synchronize()
        reps = 5
        world.Barrier()
        t = time.perf_counter()
        for _ in range(reps):
            model.forward(st, spec)
        device.synchronize()
        dt = (time.perf_counter() - t) / reps
        flops = 2 * layer_params * n + 2 * head_params + 2 * 2 * cfg.num_layers * shard.n_heads * cfg.head_dim * n * n / 2
        say(f"prefill {n:5d} tokens: {n / dt:9.0f} tok/s  {dt * 1e3:8.2f} ms  {flops / dt / 1e12:6.1f} TFLOP/s per GPU")
        record(kind="prefill", tokens=n, tok_s=n / dt, ms=dt * 1e3, tflops=flops / dt / 1e12, flops="performed")
        if args.profile:
            say(profile_step(cuda, model, kernels, st, spec, f"prefill {n} tokens"))

    if args.comm_probe:
        if size > 1:
            comm_probe(model, comm, batches, decode_s, decode, say, record)
        else:
            say("# --comm-probe: nothing to measure at --tp 1 (no all-reduce)")

    if args.skip_probe:
        skip_probe(model, kernels, args.skip_probe, batches, decode_s, decode, say, record)

    if args.timeline:
        timeline_probe(model, kernels, batches, decode_s, decode, say, record)

    if args.json and rank == 0:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    model.close()                 # the decode graphs hold the NCCL communicator: destroy them first
    if comm is not None:
        comm.abort()
    device.close()
    sys.stdout.flush()
    world.Barrier()
    MPI.Finalize()
    os._exit(0)   # skip interpreter teardown (see mpillm.cli._exit)


# Peers in --summarize's records (scripts/peers/README.md) and the configuration of ours each one is set against:
# (tp, quantize, LM head quantized, int8 group size), at the peer's batch. gpt-fast quantizes its LM head; the
# llama.cpp files are the ones scripts/targets.sh writes with scripts/peers/random_gguf.py, by file name.
GPTFAST_AGAINST = {"bf16": ("none", False, None), "int8": ("int8", True, 128), "int4": ("q4", True, None)}
LLAMACPP_AGAINST = {"q4_0-f16head": ("q4", False, None), "q4_0": ("q4", True, None), "q8_0": ("int8", True, 32)}


def _peer_run(r: dict):
    """(gpu, peer label, ours key, tok/s) of a peer's record, or None: gptfast_bench.py's lines (kind "peer"),
    llama-bench's `-o jsonl` lines (text generation only, flash attention on, a file named in LLAMACPP_AGAINST) and
    llama-batched-bench's (scripts/peers/batched_records.py: generation of `pl` sequences together). The key is
    ours: (tp, quantize, LM head quantized, group size, batch)."""
    if r.get("kind") == "peer" and r.get("peer") == "gpt-fast" and r.get("mode") in GPTFAST_AGAINST:
        tp, mode = int(r.get("tp", 1)), r["mode"]
        label = f"gpt-fast {mode}" + (f" groups of {r.get('groupsize')}" if mode == "int4" else "") + f" tp {tp}"
        return r.get("gpu"), label, (tp,) + GPTFAST_AGAINST[mode] + (1,), float(r["tok_s"])
    if "model_filename" not in r:
        return None
    name = Path(str(r["model_filename"])).name.removesuffix(".gguf")
    if name not in LLAMACPP_AGAINST:
        return None
    if "avg_ts" in r and r.get("n_prompt") == 0 and r.get("n_gen", 0) > 0 and r.get("flash_attn"):
        return r.get("gpu_info"), f"llama.cpp {name}", (1,) + LLAMACPP_AGAINST[name] + (1,), float(r["avg_ts"])
    if r.get("peer") == "llama.cpp batched" and r.get("tg", 0) > 0 and r.get("flash_attn"):
        pl = int(r["pl"])
        return (r.get("gpu"), f"llama.cpp {name} batch {pl}", (1,) + LLAMACPP_AGAINST[name] + (pl,),
                float(r["speed_tg"]))
    return None


def summarize_targets(path: str) -> str:
    """--summarize: issue 5's and 6's ratios from bench --json records (one JSON object a line; other kinds and
    models are passed over), per card name (one file per machine: records of two cards of one name count together),
    then ours against each peer whose records are there (_peer_run), at the peer's batch. Each configuration's
    tok/s is the median of its rounds; a ratio whose two sides are not both there says so. SystemExit naming the
    file and line of a record that is not JSON."""
    import statistics
    runs: dict[tuple, list[float]] = {}
    peers: dict[tuple, list[float]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not a JSON record: {e}")
            peer = _peer_run(r)
            if peer:
                peers.setdefault(peer[:3], []).append(peer[3])
                continue
            if r.get("kind") != "decode" or r.get("model") != "dummy:llama3-8b":
                continue
            q = r.get("quantize")
            key = (r.get("gpu"), r.get("tp"), q, bool(r.get("quantize_lm_head")),
                   (r.get("group_size") or 128) if q == "int8" else None,   # records before group_size: 128
                   r.get("batch"))
            runs.setdefault(key, []).append(float(r["tok_s"]))
    lines = [f"# {path}: Llama-3-8B shape, batch 1 unless said, median tok/s of each configuration's rounds"]
    for gpu in sorted({k[0] for k in runs} | {k[0] for k in peers}, key=str):
        med = {k[1:]: (statistics.median(v), len(v)) for k, v in runs.items() if k[0] == gpu}
        lines.append(f"{gpu}:")
        by_batch = lambda kv: (str(kv[0][:4]), kv[0][4] or 0)
        for (tp, q, head, group, batch), (tok, n) in sorted(med.items(), key=by_batch):
            lines.append(f"  tp {tp} {q}{f' groups of {group}' if group and group != 128 else ''}"
                         f"{' (LM head quantized)' if head else ''}{f' batch {batch}' if batch != 1 else ''}: "
                         f"{tok:.1f} tok/s ({n} rounds)")

        def ratio(what, num, den, target):
            num, den = num + (1,), den + (1,)      # the targets are at batch 1
            if num in med and den in med:
                lines.append(f"  {what}: {med[num][0] / med[den][0]:.3f}x (target {target})")
            else:
                lines.append(f"  {what}: not measured here")
        ratio("issue 5, bf16 TP 2 / TP 1", (2, "none", False, None), (1, "none", False, None), ">= 1.75x on H100")
        ratio("issue 5, bf16 TP 4 / TP 1", (4, "none", False, None), (1, "none", False, None), ">= 2.8x on H100")
        ratio("issue 6, Q4_0 / int8", (1, "q4", False, None), (1, "int8", False, 128), ">= 1.6x on H100")
        ratio("issue 6, Q4_0 / int8, LM heads quantized", (1, "q4", True, None), (1, "int8", True, 128), "-")
        # by peer, then by batch (the label ends in its batch where it has one)
        by_peer = lambda kv: (str(kv[0][0]), kv[0][1].rsplit(" batch ", 1)[0], kv[0][2][-1])
        for (pgpu, label, ours), toks in sorted(peers.items(), key=by_peer):
            if pgpu != gpu:
                continue
            tok = statistics.median(toks)
            vs = f"ours {med[ours][0] / tok:.3f}x" if ours in med else "ours not measured here"
            lines.append(f"  peer {label}: {tok:.1f} tok/s ({len(toks)} runs); {vs}")
    return "\n".join(lines)


def skip_patterns(text: str, fail) -> list:
    """--skip-probe's patterns (';'-separated, empty ones dropped) compiled; fail(message) on one that does not
    compile, naming it."""
    import re
    out = []
    for pat in [p for p in text.split(";") if p]:
        try:
            out.append(re.compile(pat))
        except re.error as e:
            fail(f"--skip-probe: pattern {pat!r}: {e}")
    return out


def skip_probe(model, kernels, patterns, batches, decode_s, decode, say, record):
    """--skip-probe: the decode batches again once per pattern, every launch of a kernel whose name the pattern
    finds (among those looked up by the normal measurement) left out of the captured graph (Kernels.skip). The
    kernels that remain run on whatever the skipped ones left in memory, so the tokens are wrong and an attention
    or sampling kernel may see other data; the times are what counts. Each pattern's difference from the normal
    step is the in-graph cost of those kernels, including the start and end of each, which an isolated timing of
    the kernel does not show."""
    for rx in skip_patterns(patterns, sys.exit):
        pat = rx.pattern
        names = sorted(n for n in kernels._functions if rx.search(n))
        kernels.skip = frozenset(id(kernels._functions[n]) for n in names)
        model.drop_graphs()
        for B in batches:
            dt, without = decode_s[B], decode(B, probe=True)
            say(f"decode  batch {B:4d}: without /{pat}/ {1e3 * without:7.3f} ms/step, {1e3 * (dt - without):6.3f} ms "
                f"of {1e3 * dt:6.3f} ({100 * (dt - without) / dt:4.1f}%) in {', '.join(names) or 'no kernel'}")
            record(kind="skip_probe", batch=B, pattern=pat, kernels=names, ms_step=dt * 1e3,
                   ms_step_without=without * 1e3)
    kernels.skip = None
    model.drop_graphs()


def timeline_probe(model, kernels, batches, decode_s, decode, say, record):
    """--timeline: the decode batches again with the trace stamps on (mpillm/cuda/trace.py): the first steps' records
    read back and laid out per node of the graph. Each block's thread 0 takes its slots with an atomic at its wait
    and stores two records: the traced step time, against the untraced one of the same build, says how much that
    disturbs."""
    from mpillm.cuda import trace
    tracer = trace.Tracer(kernels)
    for B in batches:
        model.drop_graphs()                   # the warm-up steps capture B's graph again: model.graph_kernels is B's
        got = {}

        @contextmanager
        def traced():
            tracer.start(model.graph_kernels)
            try:
                yield
            finally:
                got["records"] = tracer.stop()
        dt = decode(B, probe=True, around_timed=traced)
        try:
            steps = trace.timeline(got["records"], model.graph_kernels)
        except trace.TimelineError as e:
            say(f"# timeline batch {B}: {e}")
            continue
        rows = trace.summarize(steps, model.graph_kernels)
        say(trace.report(rows, f"batch {B} ({len(steps)} steps of {len(model.graph_kernels)} kernels; "
                               f"{1e3 * dt:.3f} ms/step traced, {1e3 * decode_s[B]:.3f} untraced)"))
        record(kind="timeline", batch=B, ms_step=dt * 1e3, ms_step_untraced=decode_s[B] * 1e3, steps=len(steps),
               rows=rows)
    model.drop_graphs()


def comm_probe(model, comm, batches, decode_s, decode, say, record):
    """--comm-probe: the decode steps again with the IPC all-reduces (the per-layer ones and the embedding's)
    and the IPC gather of the logits exchanging nothing. What remains is each rank's own work at this TP degree,
    kernels and launches included; the difference from the normal step is what the exchange (data over NVLink,
    waiting for the slower rank's data) costs. A gather of more rows than the IPC kernel takes (NCCL) still
    runs."""
    if comm.ipc is None:
        say("# --comm-probe: skipped (no one-shot IPC all-reduce on this group; NCCL calls cannot be emptied)")
        return
    for ipc in (comm.ipc, comm.ipc_norm, comm.ipc_gather):
        if ipc is not None:
            ipc.exchange_nothing()
    model.drop_graphs()           # the captured graphs hold the old arguments: capture again
    for B in batches:
        dt, alone = decode_s[B], decode(B, probe=True)
        say(f"decode  batch {B:4d}: communication {1e3 * (dt - alone):6.3f} ms of {1e3 * dt:6.3f} ms/step "
            f"({100 * (dt - alone) / dt:4.1f}%); without it {B / alone:9.1f} tok/s")
        record(kind="comm_probe", batch=B, ms_step=dt * 1e3, ms_step_no_exchange=alone * 1e3,
               comm_share=(dt - alone) / dt)


def gemm_compare(args, cfg):
    """TFLOP/s of our mma.sync GEMM and of cuBLASLt on the model's projection shapes."""
    import pycuda.driver as cuda
    from mpillm.cuda.kernels import Kernels
    from mpillm.cuda.runtime import DeviceTensor, init_device
    device = init_device(0)
    k = Kernels(device)
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    print(f"# {device.name}: GEMM y[M,N] = x[M,K] w[N,K]^T, {args.dtype}, TFLOP/s (own mma.sync | cuBLASLt)")
    start, end = cuda.Event(), cuda.Event()
    for m in (64, 128, 256, 512, 2048, 8192):
        row = []
        for n, kk in ((qkv, h), (h, h), (2 * i, h), (h, i)):
            x, w, y = DeviceTensor.empty((m, kk), args.dtype), DeviceTensor.empty((n, kk), args.dtype), DeviceTensor.empty((m, n), args.dtype)
            for path in ("gemm", "cublaslt"):
                if path == "cublaslt" and k.blas is None:
                    row.append("n/a")
                    continue
                k.linear(y, x, w, path=path)
                reps = 20
                start.record(device.stream)
                for _ in range(reps):
                    k.linear(y, x, w, path=path)
                end.record(device.stream)
                end.synchronize()
                secs = end.time_since(start) / 1e3 / reps
                row.append(f"{2 * m * n * kk / secs / 1e12:.0f}")
        print(f"M={m:5d}: " + "   ".join(f"{n}x{kk}: {row[2 * j]}|{row[2 * j + 1]}"
                                         for j, (n, kk) in enumerate(((qkv, h), (h, h), (2 * i, h), (h, i)))))
    device.close()


def attention_compare(args, cfg):
    """Decode attention alone on the model's heads (one query per sequence, each sequence's blocks consecutive
    in the paged cache): microseconds per launch and GB/s of K and V read, for both builds of the split-K kernel
    (plain: 2 blocks per SM; _occ: 3-4), the cluster kernel (sm_90+: at every batch, though the launcher takes
    it for small ones only) and which one the launcher picks, so the picking rules (kernels.decode_kernel_suffix,
    kernels.decode_uses_cluster) can be checked on any card."""
    import pycuda.driver as cuda
    import mpillm.cuda.kernels as km
    from mpillm.cuda.runtime import DeviceTensor, init_device
    device = init_device(0)
    k = km.Kernels(device)
    dt = args.dtype
    nh, nkv, hd, bs = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16
    bound = 512 if args.context <= 512 else max(2048, args.context)   # as the decode graphs (or a 2,048-token bound)
    per_seq = -(-bound // bs)
    print(f"# {device.name}: decode attention, {nh} heads / {nkv} kv heads x {hd}, {dt}, {args.context} keys per "
          f"sequence, grid for a {bound}-key bound; us per launch, GB/s of K and V")
    start, end = cuda.Event(), cuda.Event()
    rng = np.random.default_rng(0)
    picked, uses_cluster = km.decode_kernel_suffix, km.decode_uses_cluster
    group_bound = next(g for g in km.DECODE_GROUPS if nh // nkv <= g)
    choice = picked(1 << 30, group_bound, device.sm_count)           # "" where this group has no _occ build
    # The cluster kernel at every batch its build allows (the launcher takes it for small ones only).
    cluster_ok = km.decode_cluster_fits(group_bound, bound, device.compute_capability)
    variants = [(s, False) for s in (("", "_occ") if choice == "_occ" else ("",))] + [("", True)] * cluster_ok
    for B in [int(b) for b in args.batch.split(",") if b]:
        kc = DeviceTensor.empty((B * per_seq, bs, nkv, hd), dt)
        vc = DeviceTensor.empty((B * per_seq, bs, nkv, hd), dt)
        cuda.memset_d8(kc.ptr, 0, kc.nbytes)
        cuda.memset_d8(vc.ptr, 0, vc.nbytes)
        tables = DeviceTensor.from_numpy(np.arange(B * per_seq, dtype=np.int32).reshape(B, per_seq), "i32")
        qkv = DeviceTensor.from_numpy(rng.normal(size=(B, (nh + 2 * nkv) * hd)).astype(np.float32), dt)
        out = DeviceTensor.empty((B, nh, hd), dt)
        qs = DeviceTensor.from_numpy(np.arange(B + 1, dtype=np.int32), "i32")
        cl = DeviceTensor.from_numpy(np.full(B, args.context, np.int32), "i32")
        scratch = km.AttentionScratch(B, nh, hd, bound)

        def launch():
            k.attention(out, qkv, kc, vc, tables, qs, cl, nh, nkv, hd, hd ** -0.5, max_query_len=1,
                        max_context_len=bound, scratch=scratch)

        row = []
        for suffix, cluster in variants:
            km.decode_kernel_suffix = lambda blocks, g, sms, s=suffix: s
            km.decode_uses_cluster = lambda *a, c=cluster: c
            try:
                best = float("inf")
                for _ in range(3):
                    launch()
                    start.record(device.stream)
                    for _ in range(20):
                        launch()
                    end.record(device.stream)
                    end.synchronize()
                    best = min(best, end.time_since(start) / 20 * 1e-3)
            finally:
                km.decode_kernel_suffix, km.decode_uses_cluster = picked, uses_cluster
            gbs = 2 * B * args.context * nkv * hd * 2 / best / 1e9
            row.append(f"{'cluster' if cluster else suffix or 'plain'} {best * 1e6:8.1f} us {gbs:6.0f} GB/s")
        parts = km.decode_partitions(B, nkv, bound, device.sm_count, scratch.rows, k.decode_split, k.decode_min_part)
        shipped = picked(parts * nkv * B, group_bound, device.sm_count) or "plain"
        if k.decode_cluster and uses_cluster(B, nkv, group_bound, bound, device.sm_count, device.compute_capability):
            shipped = "cluster"
        print(f"batch {B:5d}: " + " | ".join(row) + f"   (launcher picks {shipped}; P = {parts})")
    device.close()


# (warps, unroll, min blocks per SM, L2::256B hint, weight ring stages) of the quantized small-M kernel tried by
# --qgemv. Stages 0: two register stages, one 16-row tile per block; >= 2: a per-warp cp.async ring of that
# many stages (warps x stages x unroll KB of static shared memory, plus warps x 2 KB of partial sums at 4 token
# tiles: at most 48 KB), whose blocks loop over tiles (launched at most min-blocks per SM; kernels.qgemv_grid).
# Earlier sweeps (docs/PERFORMANCE.md, sessions 3-4) ruled out the other register-stage shapes, 16 warps and
# 6-stage rings.
QGEMV_VARIANTS = [(8, 1, 2, True, 4), (8, 1, 3, True, 4), (8, 1, 2, True, 3), (4, 1, 4, True, 4),
                  (8, 2, 2, False, 0), (4, 2, 2, False, 0)]
QGEMV_TILES = (1, 4)       # token tiles NT the sweep instantiates: M <= 8 and M <= 32
QGEMV_FORMATS = (("8", 8, "false", "int8"), ("4", 4, "false", "q4"), ("4s", 4, "true", "q4_0"))  # name, bits, SYM, kind


def qgemv_variant_source() -> str:
    """What --qgemv compiles: gemv_quant.cu without its production kernels, plus one bf16 entry point
    qgemv{fmt}_v{i}_m{nt} per variant, format and token tiles. Needs no GPU (tests/test_qgemv_variants.py)."""
    from mpillm.cuda.kernels import CUDA_SRC
    src = "#define QGEMV_VARIANTS_ONLY\n" + (CUDA_SRC / "gemv_quant.cu").read_text()
    for fmt, bits, sym, _ in QGEMV_FORMATS:
        for nt in QGEMV_TILES:
            for v, (wp, un, mb, l2, stages) in enumerate(QGEMV_VARIANTS):
                loop = "true" if stages else "false"      # ring variants loop over tiles (kernels.qgemv_grid)
                src += (f"QGEMV_ENTRY(bf16, bf16, qgemv{fmt}_v{v}_m{nt}, {bits}, {nt}, {wp}, {un}, {mb}, "
                        f"{'true' if l2 else 'false'}, {stages}, false, {sym}, {loop})\n")
    return src


def qgemv_compare(args, cfg):
    """GB/s of the quantized small-M kernel shapes (QGEMV_VARIANTS) against the bf16 GEMV, on the model's
    projection shapes: which variant to ship (gemv_quant.cu QGEMV_KERNELS).

    Timed as decode runs them: from DRAM, back to back in a CUDA graph (programmatic edges where the decode
    graphs have them). Each measurement rotates through enough copies of the weight (>= 400 MB) that none is
    still in L2 (50-60 MB on H100/H200) when it comes round again, and the graph takes the host's launch
    cost (~5 us, more than a 16 MB weight takes to stream) out of the number."""
    import pycuda.driver as cuda
    from cuda.bindings import driver as cu
    from pycuda.compiler import SourceModule
    from mpillm.cuda.graphs import link_programmatic, pdl_enabled
    from mpillm.cuda.kernels import CUDA_SRC, NVCC_OPTIONS, QGEMV_PERSIST, Kernels, QuantWeight, qgemv_grid
    from mpillm.cuda.runtime import DeviceTensor, check_cu, init_device
    device = init_device(0)
    k = Kernels(device)
    pdl = pdl_enabled(device.compute_capability)
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = ((qkv, h), (h, cfg.num_heads * cfg.head_dim), (2 * i, h), (h, i))
    mod = SourceModule(qgemv_variant_source(), options=list(NVCC_OPTIONS), no_extern_c=True, arch=device.arch,
                       include_dirs=[str(CUDA_SRC)])
    fns = {}
    for fmt, *_ in QGEMV_FORMATS:
        for nt in QGEMV_TILES:
            for v in range(len(QGEMV_VARIANTS)):
                fns[fmt, nt, v] = fn = mod.get_function(f"qgemv{fmt}_v{v}_m{nt}")
                fn.prepare("PPPPPiiiiii")
    start, end = cuda.Event(), cuda.Event()
    stream = cu.CUstream(device.stream.handle)
    rng = np.random.default_rng(0)
    min_bytes, max_copies, reps = 400 << 20, 64, 10
    try:
        rows = [int(m) for m in args.qgemv_rows.split(",") if m]
    except ValueError:
        rows = []
    if not rows or any(not 1 <= m <= 32 for m in rows):
        raise SystemExit(f"--qgemv-rows {args.qgemv_rows}: token counts from 1 to 32 (the small-M kernels' range)")

    def copies_for(nbytes):
        return min(max_copies, -(-min_bytes // nbytes))

    def graph_seconds(launch, copies):
        """Seconds per launch of launch(c) for c = 0..copies-1, captured once as a graph and replayed."""
        for c in range(copies):          # first launches load modules; nothing may do that during capture
            launch(c)
        device.synchronize()
        check_cu(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                 "cuStreamBeginCapture")
        try:
            for c in range(copies):
                launch(c)
        finally:
            graph = check_cu(cu.cuStreamEndCapture(stream), "cuStreamEndCapture")
        try:
            if pdl:                      # every node is a kernel of gemv.cu / gemv_quant.cu
                link_programmatic(graph, lambda name: True)
            exe = check_cu(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            check_cu(cu.cuGraphDestroy(graph), "cuGraphDestroy")
        try:
            check_cu(cu.cuGraphLaunch(exe, stream), "cuGraphLaunch")
            start.record(device.stream)
            for _ in range(reps):
                check_cu(cu.cuGraphLaunch(exe, stream), "cuGraphLaunch")
            end.record(device.stream)
            end.synchronize()
        finally:
            check_cu(cu.cuGraphExecDestroy(exe), "cuGraphExecDestroy")
        return end.time_since(start) / 1e3 / (reps * copies)

    def fill_random(t):
        cuda.memcpy_htod(t.ptr, rng.integers(0, 256, t.nbytes, dtype=np.uint8))

    def quant_copies(kind, n, kk):
        """Distinct device copies of one random quantized weight (same codes, so every copy gives one y)."""
        first = QuantWeight.random(kind, n, kk, 128 if kind == "int8" else 32, fill_random)
        same = lambda t: cuda.memcpy_dtod(t.ptr, first.data.ptr, t.nbytes)  # noqa: E731
        return [first] + [QuantWeight.random(kind, n, kk, first.group_size, same)
                          for _ in range(copies_for(first.nbytes) - 1)]

    legend = " ".join(f"v{v}=({wp},{un},{mb},{'L2' if l2 else '-'},{st})"
                      for v, (wp, un, mb, l2, st) in enumerate(QGEMV_VARIANTS))
    print(f"# {device.name}: quantized small-M kernel variants vs the bf16 GEMV, GB/s of weight bytes (data + scales), "
          f"from DRAM (>= {min_bytes >> 20} MB of weight copies rotated, CUDA graph{', PDL edges' if pdl else ''})")
    print(f"# variants (warps, unroll, min blocks/SM, L2::256B hint, ring stages): {legend}")
    print("# per kind: 'prod' the production launch (kernels.QGEMV_PERSIST loop over tiles), 'tiles' the same kernel one tile "
          "per block (MPILLM_QGEMV_PERSIST=0), then the variants (ring ones looping over tiles)")
    print("# after a cell: '=' output bitwise equal to the production kernel, '~' within 1e-2 of max|y| (another "
          "summation order), '!' MISMATCH; max|dy|/max|y| over the variants per kind at the end of the line")
    names = " ".join(f"{'v%d' % v:>6s}" for v in range(len(QGEMV_VARIANTS)))
    kinds = [kind for *_, kind in QGEMV_FORMATS]
    print(f"# {'shape':22s} {'bf16':>5s}  " + "  ".join(f"{kind} {'prod':>6s} {'tiles':>6s} {names}" for kind in kinds)
          + "  max|dy|/max|y| " + " ".join(kinds))
    mismatches = []

    def sweep(n, kk):
        """One projection shape; its weight copies are freed on return."""
        # bf16 weights uninitialised: their values do not change the GEMV's speed (no output is checked).
        dense = [DeviceTensor.empty((n, kk), "bf16") for _ in range(copies_for(n * kk * 2))]
        quant = {kind: quant_copies(kind, n, kk) for kind in kinds}
        for m in rows:
            x = DeviceTensor.from_numpy(rng.standard_normal((m, kk)).astype(np.float32), "bf16")
            y = DeviceTensor.empty((m, n), "bf16")
            secs = graph_seconds(lambda c: k.linear(y, x, dense[c], path="gemv"), len(dense))
            line = [f"N={n:6d} K={kk:6d} M={m:3d}: {dense[0].nbytes / secs / 1e9:5.0f}"]
            rel, before = [], len(mismatches)
            for fmt, bits, _, kind in QGEMV_FORMATS:
                ws = quant[kind]
                nt = 1 if m <= 8 else 4
                # The production path (kernels.py _qgemv) on copy 0 is the reference. A variant that changes
                # only how the weights reach registers (L2 hint, ring) with the production warps and unroll
                # must match it bitwise, whatever its grid; other warps / unroll sum in another fp32 order (a
                # few bf16 ulps).
                k.linear(y, x, ws[0])
                y_ref = y.to_numpy()
                scale = max(float(np.abs(y_ref).max()), 1e-30)
                cells, worst = [], 0.0
                # A kernel that does not loop over tiles launches the same grid either way: timed once.
                loops = (fmt, 1 if m <= 8 else 2 if m <= 16 else 4, "") in QGEMV_PERSIST   # production's tiling
                for persist in (True, False) if loops else (True,):
                    k.qgemv_persist = persist
                    secs = graph_seconds(lambda c: k.linear(y, x, ws[c]), len(ws))
                    k.linear(y, x, ws[0])
                    same = np.array_equal(y.to_numpy(), y_ref)   # the grid must not change the bits
                    if not same:
                        mismatches.append(f"{kind} production kernel, persist={persist}: other bits N={n} K={kk} M={m}")
                    cells.append(f"{ws[0].nbytes / secs / 1e9:5.0f}{'=' if same else '!'}")
                if not loops:
                    cells.append(cells[-1])
                k.qgemv_persist = True
                for v, (wp, _, mb, _, stages) in enumerate(QGEMV_VARIANTS):
                    fn = fns[fmt, nt, v]
                    grid = qgemv_grid(n, device.sm_count, mb) if stages else -(-n // 16)   # rings loop over tiles

                    def launch(c, fn=fn, wp=wp, grid=grid):
                        w = ws[c]
                        fn.prepared_async_call((grid, 1), (wp * 32, 1, 1), device.stream, y.ptr, x.ptr,
                                               w.data.ptr, w.scales.ptr, 0, m, n, kk, w.super_blocks, w.n_groups,
                                               w.gshift)
                    cuda.memset_d16(y.ptr, 0x7FC0, y.numel)          # NaN: a variant that skips a store shows
                    launch(0)
                    diff = float(np.nan_to_num(np.abs(y.to_numpy() - y_ref), nan=np.inf).max())
                    err = diff / scale
                    worst = max(worst, err)
                    flag = "=" if diff == 0 else ("~" if err <= 1e-2 else "!")
                    if flag == "!":
                        mismatches.append(f"{kind} v{v}{QGEMV_VARIANTS[v]} N={n} K={kk} M={m}: max|dy| {diff:.3g}")
                    cells.append(f"{ws[0].nbytes / graph_seconds(launch, len(ws)) / 1e9:5.0f}{flag}")
                line.append(f"{kind} " + " ".join(cells))
                rel.append(f"{worst:.1e}")
            bad = len(mismatches) > before
            print("  ".join(line) + "  " + " ".join(rel) + ("  MISMATCH" if bad else ""), flush=True)

    for n, kk in shapes:
        sweep(n, kk)
    if mismatches:
        print("MISMATCH (variant output differs from the production kernel by more than 1e-2 of max|y|):")
        for line in mismatches:
            print("  MISMATCH " + line)
    device.close()


def sharegpt_like(n: int, vocab: int, seed: int = 0):
    """n (prompt ids, output length) pairs: log-normal lengths clipped to prompts 4-1024 and outputs 4-512
    tokens, roughly the shape of ShareGPT conversations (medians ~170 and ~200)."""
    rng = np.random.default_rng(seed)
    plen = np.clip(rng.lognormal(5.1, 1.0, n), 4, 1024).astype(int)
    olen = np.clip(rng.lognormal(5.2, 0.9, n), 4, 512).astype(int)
    return [(rng.integers(0, vocab, p).tolist(), int(o)) for p, o in zip(plen, olen)]


PAD_ID = 0
STATIC_MODES = ("static", "static-padded", "static-hf")


def parse_modes(text: str) -> list:
    modes = [m for m in text.split(",") if m]
    unknown = set(modes) - {"continuous", *STATIC_MODES}
    if unknown:
        sys.exit(f"--modes: unknown schedule(s) {sorted(unknown)}; choose from continuous, {', '.join(STATIC_MODES)}")
    return modes


def static_plan(work, mode: str, kv_tokens: int, max_num_seqs: int):
    """The batches a static schedule submits, one after the other: (batch size, [[(request index, prompt ids,
    max_tokens), ...], ...]), every request once and in order. Pure, so the schedules can be checked without a GPU.

    "static" and "static-padded" fill batches of max_num_seqs on the paged cache (which holds them: the engine
    admits what fits); "static-hf" sizes its batch as a contiguous pre-allocated cache must be sized, before
    anything runs: every row reserves the workload's longest prompt plus its longest output, whatever its own."""
    if mode not in STATIC_MODES:
        raise ValueError(f"not a static schedule: {mode!r}")
    batch_size = max_num_seqs
    if mode == "static-hf":
        per_row = max((len(p) for p, _ in work), default=0) + max((o for _, o in work), default=0)
        batch_size = max(1, min(max_num_seqs, kv_tokens // max(per_row, 1)))
    batches = []
    for lo in range(0, len(work), batch_size):
        chunk = list(enumerate(work[lo: lo + batch_size], lo))
        longest_out = max(o for _, (_, o) in chunk)
        # HF left-pads so every row's next token lands in the same column; the pads go through the model
        # like real tokens (masked out of attention there, attended here: the cost is the same).
        width = max(len(p) for _, (p, _) in chunk) if mode == "static-hf" else 0
        batches.append([(i, [PAD_ID] * (width - len(p)) + list(p), o if mode == "static" else longest_out)
                        for i, (p, o) in chunk])
    return batch_size, batches


def engine_overhead(args) -> dict:
    """Host time per step of continuous batching outside the runner: what the GPU waits for between steps
    (the runner here returns random ids at once). Returns the numbers it prints."""
    from mpillm.dummy import IdsOnlyTokenizer, dummy_config, is_dummy
    from mpillm.engine import Engine, EngineConfig
    from mpillm.jobio import Request, SamplingParams
    if is_dummy(args.model):
        vocab, tokenizer = dummy_config(args.model).vocab_size, IdsOnlyTokenizer()
    else:                       # a checkpoint: its own tokenizer turns the ids into text
        from mpillm.checkpoint import open_checkpoint
        ckpt = open_checkpoint(args.model)
        vocab, tokenizer = ckpt.config.vocab_size, ckpt.tokenizer()
    n = args.throughput or 1000

    class StandIn:
        def __init__(self):
            self.rng, self.steps = np.random.default_rng(0), 0

        def execute(self, step, specs, sample=True):
            self.steps += 1
            return [(int(t), None) for t in self.rng.integers(0, vocab, len(specs))] if sample else []

    runner = StandIn()
    work = sharegpt_like(n, vocab)
    # Room for every sequence at full length: no preemption, and no million-entry free list to build.
    eng = Engine(runner, tokenizer, EngineConfig(max_model_len=2048, num_blocks=args.max_num_seqs * 2048 // 16,
                                                         max_num_seqs=args.max_num_seqs,
                                                         max_num_batched_tokens=args.max_num_batched_tokens,
                                                         prefix_caching=True))
    for i, (p, o) in enumerate(work):
        eng.add(Request(str(i), i, i, "", None, SamplingParams(max_tokens=o, ignore_eos=True), None), prompt_ids=p)
    t, done = time.perf_counter(), 0
    while eng.has_work():
        done += len(eng.step())
    secs = time.perf_counter() - t
    assert done == n
    out = dict(kind="engine", requests=n, steps=runner.steps, seconds=secs, ms_step=1e3 * secs / runner.steps)
    print(f"engine host work: {n} requests in {runner.steps} steps, {secs:.2f} s, {out['ms_step']:.3f} ms/step "
          f"(max {args.max_num_seqs} sequences, {args.max_num_batched_tokens} tokens per step, prefix caching on, "
          f"{'ids-only' if is_dummy(args.model) else 'the checkpoint'} tokenizer)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


def quant_args(args) -> dict:
    return dict(quantize=args.quantize, group_size=args.group_size, quantize_lm_head=args.quantize_lm_head,
                fuse_swiglu=not args.no_fuse_swiglu, fuse_rope=not args.no_fuse_rope,
                fuse_prenorm=not args.no_fuse_prenorm)


def throughput(args, ckpt, cfg, world):
    """Offline throughput: the same requests through continuous batching, then through static batching
    (a new batch starts only when the whole previous batch has finished), by the schedules of --modes:

    continuous     the engine as `mpillm run` drives it: rows join and leave the running batch every step.
    static         batches of --max-num-seqs on the paged cache; a finished row stops computing.
    static-padded  the same batches, but every row decodes until the batch's longest output is done.
    static-hf      HF generate() with a static (contiguous, pre-allocated) KV cache: one batch size for the whole
                   job, as many rows as fit when each reserves the workload's longest prompt + longest output;
                   prompts left-padded to the batch's longest, every row decoding to the batch's longest output.

    Every schedule is credited only each request's own prompt and output tokens, so the numbers compare."""
    from mpillm.cuda.backend import CudaRunner
    from mpillm.cuda.kernels import Kernels
    from mpillm.cuda.model import CudaTransformer
    from mpillm.cuda.runtime import init_device
    from mpillm.dummy import IdsOnlyTokenizer
    from mpillm.engine import Engine, EngineConfig
    from mpillm.jobio import Request, SamplingParams
    from mpillm.parallel import make_shard
    if world.Get_size() != 1:
        sys.exit("--throughput runs on one rank")
    device = init_device(0)
    kernels = Kernels(device)
    model = CudaTransformer(ckpt, cfg, make_shard(cfg, 0, 1), device, kernels, dtype=args.dtype,
                            max_tokens=args.max_num_batched_tokens, max_seqs=args.max_num_seqs, max_model_len=2048,
                            gpu_memory_utilization=0.9, **quant_args(args))
    runner = CudaRunner(model, device)
    # Seconds in the runner (staging and launching a step, then waiting for its ids), steps, decode-only steps,
    # their seconds. The engine launches step n + 1 before collecting step n, so collects come in launch order.
    gpu_time = [0.0, 0, 0, 0.0]
    launch, collect, kinds = runner.launch, runner.collect, deque()

    def account(dt, decode_only):
        gpu_time[0] += dt
        gpu_time[3] += dt if decode_only else 0.0

    def timed_launch(step, specs, fetch=True):
        t = time.perf_counter()
        handle = launch(step, specs, fetch)
        decode_only = step.num_tokens == step.num_seqs
        account(time.perf_counter() - t, decode_only)
        gpu_time[1] += 1
        gpu_time[2] += decode_only
        kinds.append(decode_only)
        return handle

    def timed_collect(handle):
        t = time.perf_counter()
        out = collect(handle)
        account(time.perf_counter() - t, kinds.popleft())
        return out
    runner.launch, runner.collect = timed_launch, timed_collect
    work = sharegpt_like(args.throughput, cfg.vocab_size)
    n_out = sum(o for _, o in work)
    n_in = sum(len(p) for p, _ in work)
    print(f"# {device.name}, {args.model}, {args.dtype}: {len(work)} requests, {n_in} prompt + {n_out} output tokens; "
          f"KV cache {model.num_blocks} blocks x 16")
    results = {}
    # The static schedules' batches come from static_plan(); pads and rows decoding past their own output
    # are work the GPU does, but only each request's own tokens count (n_in, n_out), as for continuous.
    modes = parse_modes(args.modes)
    kv_tokens = model.num_blocks * 16
    longest_in, longest_out = max(len(p) for p, _ in work), max(o for _, o in work)
    fit = kv_tokens // (longest_in + longest_out)
    hf_size = (f"{kv_tokens:,} KV tokens // ({longest_in} + {longest_out}) per row"
               + ("" if 1 <= fit <= args.max_num_seqs else
                  f" = {fit}, {'capped at --max-num-seqs' if fit else 'but at least one row'}"))
    for mode in modes:
        eng = Engine(runner, IdsOnlyTokenizer(), EngineConfig(max_model_len=2048, num_blocks=model.num_blocks,
                                                     max_num_seqs=args.max_num_seqs,
                                                     max_num_batched_tokens=args.max_num_batched_tokens,
                                                     prefix_caching=False))
        peak_used = peak_live = 0
        batch_size = None
        gpu_time[:] = [0.0, 0, 0, 0.0]
        kinds.clear()
        t = time.perf_counter()
        done = 0
        if mode == "continuous":
            for i, (p, o) in enumerate(work):
                eng.add(Request(str(i), i, i, "", None, SamplingParams(max_tokens=o, ignore_eos=True), None),
                        prompt_ids=p)
            while eng.has_work():
                done += len(eng.step())
                used = eng.blocks.num_blocks - eng.blocks.num_free
                if used > peak_used:   # live tokens in the blocks held at the peak: 1 - this = fragmentation
                    peak_used = used
                    peak_live = sum(seq.num_computed for seq in eng.scheduler.running)
        else:
            batch_size, batches = static_plan(work, mode, kv_tokens, args.max_num_seqs)
            for batch in batches:
                for i, ids, max_tokens in batch:
                    eng.add(Request(str(i), i, i, "", None, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                    None), prompt_ids=ids)
                while eng.has_work():
                    done += len(eng.step())
        secs = time.perf_counter() - t
        assert done == len(work)
        results[mode] = secs
        print(f"{mode:13s}: {len(work) / secs:7.2f} req/s  {n_out / secs:9.1f} output tok/s  "
              f"{(n_in + n_out) / secs:9.1f} total tok/s  ({secs:.1f} s, {gpu_time[1]} steps ({gpu_time[2]} decode-only), "
              f"{gpu_time[0]:.1f} s in the runner, {gpu_time[3]:.1f} s of it in decode-only steps, "
              f"{eng.scheduler.num_preemptions} preemptions"
              + (f", peak KV blocks in use {peak_used}/{eng.blocks.num_blocks}, holding live tokens in "
                 f"{100 * peak_live / (peak_used * 16):.1f}% of their slots" if mode == "continuous" else "")
              + (f", batch size {batch_size} = {hf_size}" if mode == "static-hf" else "") + ")")
        if args.json:
            rec = dict(kind="throughput", mode=mode, gpu=device.name, model=args.model, requests=len(work),
                       req_s=len(work) / secs, out_tok_s=n_out / secs, total_tok_s=(n_in + n_out) / secs)
            if batch_size is not None:
                rec["batch_size"] = batch_size
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if "continuous" in results:
        print("; ".join(f"continuous vs {m}: {results[m] / results['continuous']:.2f}x"
                        for m in STATIC_MODES if m in results))
    model.close()
    device.close()


def rank_share(cfg, tp: int):
    """The config whose whole model is rank 0's share of cfg at tensor parallelism tp (mpillm.parallel.make_shard):
    the same layers, hidden size and head size, with that rank's query and kv heads, MLP slice and vocabulary slice."""
    from mpillm.parallel import make_shard
    s = make_shard(cfg, 0, tp)
    return dataclasses.replace(cfg, num_heads=s.n_heads, num_kv_heads=s.n_kv_heads, intermediate_size=s.ffn_hi - s.ffn_lo,
                               vocab_size=s.vocab_hi - s.vocab_lo).validate(cfg.name)


def profile_step(cuda, model, kernels, st, specs, what: str) -> str:
    """One eager step with an event pair around every launch of ours and every cuBLASLt call; returns a table of
    the time per kernel name (summed over the layers), largest first."""
    spans = []
    launch, blas = kernels._launch, kernels.blas

    def timed(label, call, *a, **kw):
        start, end = cuda.Event(), cuda.Event()
        start.record(kernels.stream)
        call(*a, **kw)
        end.record(kernels.stream)
        spans.append((label, start, end))

    names = {}

    def launch_timed(fn, *a, **kw):
        if id(fn) not in names:
            names.update({id(f): n for n, f in kernels._functions.items()})
        timed(names.get(id(fn), "?"), launch, fn, *a, **kw)
    kernels._launch = launch_timed
    if blas is not None:
        matmul = blas.matmul
        blas.matmul = lambda y, x, w, bias=None: timed(f"cublaslt {x.shape[0]}x{w.shape[0]}x{x.shape[1]}", matmul,
                                                       y, x, w, bias)
    try:
        kernels.stream.synchronize()
        _eager(model, st, specs)
        kernels.stream.synchronize()
    finally:
        kernels._launch = launch
        if blas is not None:
            del blas.matmul
    per = {}
    for label, start, end in spans:
        n, us = per.get(label, (0, 0.0))
        per[label] = (n + 1, us + 1e3 * end.time_since(start))
    total = sum(us for _, us in per.values())
    lines = [f"# profile, {what}: {len(spans)} launches, {total / 1e3:.3f} ms of kernel time (events serialise them)"]
    for label, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"#   {us / 1e3:8.3f} ms {100 * us / total:5.1f}%  x{n:<4d} {label}")
    return "\n".join(lines)


@contextmanager
def _eager_only(model):
    """Steps inside the block take the eager path (the staging and launches of --no-graph), no graph replay."""
    graphable = model._graphable
    model._graphable = lambda step: False
    try:
        yield
    finally:
        model._graphable = graphable


def _launch(model, st, specs, graph: bool = True):
    """model.launch, or (graph=False) the same step through the eager path."""
    if graph:
        return model.launch(st, specs)
    with _eager_only(model):
        return model.launch(st, specs)


def _eager(model, st, specs):
    """One step without graph replay (--profile): forward() on the eager path."""
    with _eager_only(model):
        return model.forward(st, specs)


if __name__ == "__main__":
    main()
