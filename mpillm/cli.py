"""Command line: `mpillm run`, `mpillm info`, `mpillm perplexity`, `mpillm --version`. Also `python -m mpillm`."""

from __future__ import annotations

import os
import sys
import time
import traceback

import click

from mpillm import __version__
from mpillm.threads import limit_blas_threads

limit_blas_threads()   # before anything imports NumPy


def _fail(exc: BaseException) -> None:
    """Any exception on any rank ends every rank: name the rank and what it was doing, then MPI Abort."""
    from mpillm.job import EXIT_FAILURE, STATE
    try:
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        rank, size = world.Get_rank(), world.Get_size()
    except Exception:  # mpi4py itself broken: still report
        world, rank, size = None, 0, 1
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{tb}mpillm: rank {rank} of {size} failed while {STATE['what']}: "
                     f"{type(exc).__name__}: {exc}\n")
    sys.stderr.flush()
    if world is not None and size > 1:
        # The launcher forwards our stderr asynchronously, and MPI_Abort tears the job down at once: on a
        # loaded node (CI, 2 cores) MPICH's hydra lost this message. A moment's grace lets it through.
        time.sleep(1.0)
        world.Abort(EXIT_FAILURE)   # never leave the other ranks waiting in a collective
    sys.exit(EXIT_FAILURE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpillm")
def main():
    """Batch inference for Llama-family LLMs over MPI (mpirun -n N mpillm run ...)."""


@main.command()
@click.option("--model", default=None, help="HF model directory (safetensors) or GGUF file [default: SmolLM2-135M-Instruct Q4_1, fetched on first use]")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), help="input JSONL, one request a line")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="output JSONL (rank 0 appends as requests finish)")
@click.option("--tp", default=1, show_default=True, help="tensor-parallel degree; N ranks form N/TP replicas")
@click.option("--max-tokens", default=256, show_default=True, help="default completion length")
@click.option("--temperature", default=0.0, show_default=True, help="default temperature (0 = greedy)")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True, help="0 = off")
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True, help="job seed; a request's own seed wins")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True,
              help="GPU compute dtype (the CPU backend always computes in float32)")
@click.option("--max-model-len", default=None, type=int, help="context length cap [default: the model's]")
@click.option("--max-num-seqs", default=None, type=click.IntRange(min=1),
              help="sequences decoded together [default: 1024 on a GPU, 64 on CPU]")
@click.option("--max-num-batched-tokens", default=None, type=click.IntRange(min=1),
              help="token budget of one step (chunked prefill) [default: 8192 on a GPU, 2048 on CPU]")
@click.option("--kv-cache-memory", default=1.0, show_default=True, help="GiB of KV cache per rank (CPU backend)")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, help="share of free GPU memory for the KV cache")
@click.option("--quantize", type=click.Choice(["auto", "none", "int8"]), default="auto", show_default=True,
              help="weights: auto = GGUF Q8_0/Q4_0/Q4_1 tensors run as stored (W8A16/W4A16 on the GPU), Q4_K as "
                   "W4A16 in Q4_1's form (d q + m per 32), others (the other K-quants too, decoded on load) in "
                   "--dtype; none = everything in --dtype; int8 = W8A16, projections quantized at load")
@click.option("--group-size", default=None, type=int,
              help="--quantize int8: elements per scale along the input dimension (32, 64, 128, 256) "
                   "[default: 128, or the largest of 64, 32 that the model's shapes take at this --tp]")
@click.option("--quantize-lm-head", is_flag=True, help="--quantize int8: the LM head too")
@click.option("--no-prefix-caching", is_flag=True, help="do not share KV blocks between equal prompt prefixes")
@click.option("--resume", is_flag=True, help="skip requests already in --output (manifest must match)")
@click.option("--force", is_flag=True, help="with --resume: accept changed settings")
@click.option("--overwrite", is_flag=True, help="replace an existing --output")
@click.option("--skip-invalid", is_flag=True, help="write an error record for each bad input line and go on")
@click.option("--no-progress", is_flag=True, help="no progress reports on stderr")
def run(model, prompts, output, tp, max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
        device, dtype, max_model_len, max_num_seqs, max_num_batched_tokens, kv_cache_memory,
        gpu_memory_utilization, quantize, group_size, quantize_lm_head, no_prefix_caching, resume, force, overwrite,
        skip_invalid, no_progress):
    """Generate completions for every request in PROMPTS, appending results to OUTPUT.

    Exit codes: 0 done; 1 a rank failed; 2 bad input/arguments/model (nothing generated);
    75 stopped by SIGTERM/SIGUSR1 (finished results kept: rerun with --resume).
    """
    try:
        from mpillm.job import JobOptions, run_job
        from mpillm.jobio import SamplingParams
        defaults = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  min_p=min_p, repetition_penalty=repetition_penalty)
        opts = JobOptions(prompts=prompts, output=output, model=model, tp=tp, device=device, dtype=dtype,
                          defaults=defaults, seed=seed, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
                          gpu_memory_utilization=gpu_memory_utilization, quantize=quantize, group_size=group_size,
                          quantize_lm_head=quantize_lm_head, prefix_caching=not no_prefix_caching,
                          resume=resume, force=force, overwrite=overwrite, skip_invalid=skip_invalid,
                          progress=not no_progress)
        code = run_job(opts)
    except Exception as e:
        _fail(e)
    _exit(code)


def _exit(code: int):
    """Leave with the exit code every rank agreed on; all results are written and closed.

    After a GPU run we finalize MPI ourselves and leave without the interpreter's teardown, which would free
    GPU buffers after their context is gone and run NCCL/CUDA finalizers in arbitrary order (a hang seen
    on H200s; job.shutdown_watchdog is the backstop). CPU runs exit normally: MPICH's launcher reports the
    code reliably only then (with os._exit it sometimes reports the SIGKILL it sends the slower ranks)."""
    from mpillm.job import STATE
    if not STATE.get("used_cuda"):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    finally:
        os._exit(code)


@main.command()
@click.option("--model", default=None, help="model directory or GGUF file [default: the default model]")
@click.option("--tp", default=1, show_default=True, help="tensor-parallel degree to size the shards for")
@click.option("--max-model-len", default=None, type=int, help="context length for the KV estimate [default: the model's]")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype for the memory estimate")
@click.option("--quantize", type=click.Choice(["auto", "none", "int8"]), default="none", show_default=True,
              help="also estimate GPU weight memory as `mpillm run --quantize` holds it")
@click.option("--group-size", default=None, type=int, help="--quantize int8: elements per scale [default: as run picks it]")
@click.option("--quantize-lm-head", is_flag=True, help="--quantize int8: the LM head too")
def info(model, tp, max_model_len, dtype, quantize, group_size, quantize_lm_head):
    """Architecture, parameter count, and weight and KV memory per rank for a TP degree."""
    from mpillm.checkpoint import CheckpointError, open_checkpoint
    from mpillm.job import UsageError
    from mpillm.loading import resolve_model
    from mpillm.parallel import ShardingError, make_shard
    try:
        path = resolve_model(model)
        ckpt = open_checkpoint(path)
        cfg = ckpt.config
        shards = [make_shard(cfg, r, tp) for r in range(tp)]
    except (UsageError, CheckpointError, ShardingError) as e:
        click.echo(f"mpillm: error: {e}", err=True)
        sys.exit(2)
    nbytes = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    ctx = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    h, hd = cfg.hidden_size, cfg.head_dim
    click.echo(f"model:            {path}")
    click.echo(f"architecture:     {cfg.arch} ({cfg.num_layers} layers, hidden {h}, {cfg.num_heads} heads, "
               f"{cfg.num_kv_heads} kv heads, head_dim {hd}, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size})")
    click.echo(f"rope:             theta {cfg.rope_theta:g}, scaling {cfg.rope_scaling or 'none'}; "
               f"context {cfg.max_position_embeddings}; tied embeddings: {cfg.tie_word_embeddings}")
    click.echo(f"parameters:       {cfg.num_parameters():,}")
    click.echo(f"per rank at --tp {tp}, {dtype}:")
    for s in shards:
        attn = h * (s.n_heads + 2 * s.n_kv_heads) * hd + s.n_heads * hd * h
        mlp = 3 * h * (s.ffn_hi - s.ffn_lo)
        vocab = (s.vocab_hi - s.vocab_lo) * h * (1 if cfg.tie_word_embeddings else 2)
        weights = (cfg.num_layers * (attn + mlp + 2 * h) + vocab + h) * nbytes
        kv_token = 2 * cfg.num_layers * s.n_kv_heads * hd * nbytes
        click.echo(f"  rank {s.rank}: weights {weights / 2**30:.3f} GiB; KV {kv_token / 1024:.1f} KiB/token, "
                   f"{kv_token * ctx / 2**30:.3f} GiB for one {ctx}-token sequence")
        if quantize != "none":
            from mpillm.quant import gpu_weight_bytes, pick_group_size
            q = gpu_weight_bytes(cfg, s, quantize, group_size or pick_group_size(cfg, tp), quantize_lm_head, ckpt)
            full = gpu_weight_bytes(cfg, s)
            click.echo(f"          --quantize {quantize}: GPU weights {q / 2**30:.3f} GiB "
                       f"({100 * q / full:.0f}% of {full / 2**30:.3f} GiB in bf16)")


@main.command()
@click.option("--model", default=None, help="model directory or GGUF file [default: the default model]")
@click.option("--text", required=True, help="UTF-8 text file to evaluate (e.g. mpillm/data/perplexity.txt)")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="simulate W8A16: int8 projection weights with fp16 group scales [default: float32 weights]")
@click.option("--group-size", default=None, type=int,
              help="int8 group size along the input dimension [default: 128, or the largest of 64, 32 the model takes]")
@click.option("--quantize-lm-head", is_flag=True, help="with --quantize: quantize the embedding/LM head too")
@click.option("--context", default=512, show_default=True, help="tokens per window")
@click.option("--stride", default=256, show_default=True, help="window start step; each window scores new tokens only")
@click.option("--max-tokens", default=None, type=int, help="evaluate only the first N tokens of the text")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def perplexity(model, text, quantize, group_size, quantize_lm_head, context, stride, max_tokens, as_json):
    """Perplexity of a model on a text (NumPy CPU backend, strided sliding window).

    Exit codes: 0 done; 2 bad arguments, model or text."""
    import json
    import time
    from mpillm.checkpoint import CheckpointError, open_checkpoint
    from mpillm.job import UsageError
    from mpillm.loading import resolve_model
    from mpillm.model import Transformer
    from mpillm.perplexity import perplexity as evaluate

    def usage(msg):
        click.echo(f"mpillm: error: {msg}", err=True)
        sys.exit(2)

    try:
        with open(text, encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError:
        usage(f"--text {text}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        usage(f"--text {text}: cannot read it as UTF-8 text: {e}")
    if not content.strip():
        usage(f"--text {text}: the file is empty")
    if context < 2 or not 1 <= stride <= context:
        usage(f"need --context >= 2 and 1 <= --stride <= --context (got {context}, {stride})")
    if max_tokens is not None and max_tokens < 2:
        usage(f"--max-tokens {max_tokens}: at least 2 tokens are needed to score one")
    if not quantize and (group_size is not None or quantize_lm_head):
        usage("--group-size and --quantize-lm-head apply to --quantize int8")
    try:
        path = resolve_model(model)
        ckpt = open_checkpoint(path)
        if context > ckpt.config.max_position_embeddings:
            usage(f"--context {context} exceeds the model's {ckpt.config.max_position_embeddings} positions")
        ids = ckpt.tokenizer().encode(content)          # plain text: no chat template, BOS as the tokenizer adds it
        if len(ids) < 2:
            usage(f"--text {text}: {len(ids)} token(s); at least 2 are needed to score one")
        ids = ids[:max_tokens]
        if quantize and group_size is None:
            from mpillm.quant import pick_group_size
            group_size = pick_group_size(ckpt.config)
        started = time.perf_counter()
        net = Transformer(ckpt, quantize=quantize, group_size=group_size, quantize_lm_head=quantize_lm_head)
    except (UsageError, CheckpointError) as e:
        usage(str(e))
    except ValueError as e:                              # a --group-size that does not divide the weights
        usage(f"--quantize {quantize} --group-size {group_size}: {e}")
    show = None if as_json else (lambda i, n: click.echo(f"\rwindow {i}/{n}", err=True, nl=i == n))
    res = evaluate(net, ids, context=context, stride=stride, progress=show)
    seconds = time.perf_counter() - started
    scheme = (f"int8, group {group_size}, LM head {'int8' if quantize_lm_head else 'float'}" if quantize
              else "none (float32)")
    if as_json:
        click.echo(json.dumps({"model": str(path), "text": str(text), "quantize": quantize,
                               "group_size": group_size if quantize else None,
                               "quantize_lm_head": bool(quantize and quantize_lm_head), "tokens": res.tokens,
                               "tokens_scored": res.scored, "windows": res.windows, "context": context,
                               "stride": stride, "mean_nll": res.nll, "perplexity": res.perplexity,
                               "seconds": round(seconds, 2)}))
        return
    click.echo(f"model:          {path}")
    click.echo(f"quantization:   {scheme}")
    click.echo(f"tokens scored:  {res.scored} of {res.tokens} ({res.windows} windows, context {context}, "
               f"stride {stride}, {seconds:.1f} s)")
    click.echo(f"mean NLL:       {res.nll:.6f} nats/token")
    click.echo(f"perplexity:     {res.perplexity:.4f}")


if __name__ == "__main__":
    main()
