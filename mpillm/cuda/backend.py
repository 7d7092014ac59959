"""The GPU runner: what `mpillm run --device cuda` plugs into the engine in place of the NumPy runner."""

from __future__ import annotations

from mpillm.runner import pick


class CudaRunner:
    """Runs a step on the GPU model. Sampling happens on the GPU and only token ids cross to the host;
    requests that want logprobs or a repetition penalty take their logits to the host sampler instead."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def execute(self, step, specs, sample: bool = True):
        handle = self.launch(step, specs, fetch=sample)
        return self.collect(handle) if sample else []

    def launch(self, step, specs, fetch: bool = True):
        """Start the step; `collect` gives its (id, logprobs) picks. Sampled on the GPU, it runs on while the host
        goes on (mpillm.engine); a step with a host-sampled request returns its picks already made."""
        if any(s.params.logprobs or s.params.repetition_penalty != 1.0 for s in specs):
            _, logits = self.model.forward(step, specs, want_logits=True)
            return [pick(logits[i], spec) for i, spec in enumerate(specs)] if fetch else None
        return self.model.launch(step, specs, fetch)

    def collect(self, handle):
        if isinstance(handle, list):
            return handle
        return [(int(t), None) for t in self.model.collect(handle)]

    def close(self):
        self.model.close()               # graphs first: they pin the NCCL communicator
        comm = getattr(self.model, "comm", None)
        if hasattr(comm, "abort"):
            # NCCL first (it needs the context that device.close() pops); abort rather than destroy, which
            # would wait on the peers: at this point every rank is done and nothing is in flight.
            comm.abort()
        self.device.close()


def compute_dtype(requested: str, checkpoint_dtype: str) -> str:
    if requested in ("bfloat16", "auto") and not (requested == "auto" and checkpoint_dtype == "float16"):
        return "bf16"
    if requested in ("float16", "auto"):
        return "f16"
    raise ValueError(f"--dtype {requested}: the GPU backend computes in bfloat16 or float16")


def build_cuda_runner(ckpt, opts, layout, max_len: int, block_size: int, log):
    from mpillm.cuda.kernels import Kernels
    from mpillm.cuda.model import CudaTransformer, GpuMemoryError
    from mpillm.cuda.runtime import init_device
    from mpillm.job import UsageError
    from mpillm.parallel import make_shard
    from mpillm.job import STATE
    cfg = ckpt.config
    shard = make_shard(cfg, layout.group.Get_rank(), layout.tp)
    device = init_device(layout.local_rank)
    STATE["used_cuda"] = True      # mpillm.cli._exit: leave without interpreter teardown
    comm = None
    if layout.tp > 1:
        from mpillm.cuda.nccl import NcclComm
        splits = [(s.vocab_lo, s.vocab_hi) for s in (make_shard(cfg, r, layout.tp) for r in range(layout.tp))]
        comm = NcclComm(layout.group, device, splits)
        comm.reserve(opts.max_num_seqs)
    kernels = Kernels(device)
    log(f"mpillm: kernels ready in {kernels.compile_seconds:.2f} s on {device.name}")
    try:
        dtype = compute_dtype(opts.dtype, cfg.torch_dtype)
        model = CudaTransformer(ckpt, cfg, shard, device, kernels,
                                dtype=dtype, comm=comm, max_tokens=max(opts.max_num_batched_tokens, opts.max_num_seqs),
                                max_seqs=opts.max_num_seqs, max_model_len=max_len, block_size=block_size,
                                gpu_memory_utilization=opts.gpu_memory_utilization, quantize=opts.quantize,
                                group_size=opts.group_size or 128, quantize_lm_head=opts.quantize_lm_head, log=log)
    except (GpuMemoryError, ValueError) as e:
        device.close()
        raise UsageError(str(e)) from None
    return CudaRunner(model, device), model.num_blocks
