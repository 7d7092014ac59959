"""Decode tok/s of gpt-fast (the peer) on the shapes and schedule that scripts/bench.py times for mpillm.

gpt-fast is not ours and is not in this repository: pass the folder that holds its model.py and quantize.py
(`--gptfast DIR`; see scripts/peers/README.md). This script only builds its Transformer with random weights,
quantizes them with its own int8 / int4 functions, and times its decode step the way its generate.py runs it:
`torch.compile(mode="reduce-overhead", fullgraph=True)` (Inductor + CUDA graphs), the math SDPA backend that
its decode loop asks for, the next token fed back on the device without a host sync.

Under torchrun (`torchrun --nproc-per-node N ...`) it applies gpt-fast's tensor parallelism (its tp.py, NCCL
all-reduces inside the compiled graph), as its generate.py does under torchrun; rank 0 reports.

The schedule matches bench.py's decode: batch 1, a prompt of --context tokens (prefill not timed), then
--steps timed decode steps, greedy. gpt-fast quantizes every nn.Linear, the LM head included; compare it
with `bench.py --quantize-lm-head` for the quantized modes.

    python scripts/peers/gptfast_bench.py --gptfast .peers/gpt-fast --mode int8 --json out.jsonl
"""

import argparse
import json
import os
import sys
import time


def llama3_8b():
    """gpt-fast's ModelArgs for bench.py's dummy:llama3-8b."""
    from mpillm.dummy import dummy_config
    c = dummy_config("dummy:llama3-8b")
    return dict(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_layers,
                n_head=c.num_heads, n_local_heads=c.num_kv_heads, dim=c.hidden_size,
                intermediate_size=c.intermediate_size, rope_base=c.rope_theta, norm_eps=c.rms_norm_eps)


def build(args, torch):
    from model import ModelArgs, Transformer     # gpt-fast's

    with torch.device("meta"):
        model = Transformer(ModelArgs(**llama3_8b()))
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if args.mode != "bf16":
        quantize(model, args, torch)
    return model.eval()


def quantize(model, args, torch):
    """gpt-fast's handlers build a state dict on the CPU; this does the same per linear, on the GPU."""
    import quantize as q                          # gpt-fast's

    def swap(parent):
        for name, child in parent.named_children():
            if not isinstance(child, torch.nn.Linear):
                swap(child)
                continue
            w = child.weight.data
            if args.mode == "int8":
                qw, scales, _ = q.dynamically_quantize_per_channel(w.float(), -128, 127, torch.int8)
                new = q.WeightOnlyInt8Linear(child.in_features, child.out_features).to("cuda")
                new.weight, new.scales = qw, scales.to(torch.bfloat16)
            else:
                w_int32, scales_and_zeros = q.group_quantize_tensor(w, n_bit=4, groupsize=args.groupsize)
                # torch >= 2.5 takes the codes two to a byte (gpt-fast's later quantize.py packs them so too).
                packed = (w_int32[:, ::2] << 4 | w_int32[:, 1::2]).to(torch.uint8)
                new = q.WeightOnlyInt4Linear(child.in_features, child.out_features, args.groupsize)
                new.weight = torch.ops.aten._convert_weight_to_int4pack(packed, args.inner_k_tiles)
                new.scales_and_zeros = scales_and_zeros
            setattr(parent, name, new)
            del child, w

    swap(model)
    torch.cuda.empty_cache()


def weight_bytes(model, torch):
    """Bytes of weights a decode step reads, counted as bench.py counts them: every weight but the embedding table
    (a step gathers one row of it) and the KV cache; the int4 linears' packed tensors are plain attributes."""
    total = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if "cache" not in n and not n.startswith("tok_embeddings."))
    for mod in model.modules():
        if type(mod).__name__ == "WeightOnlyInt4Linear":
            total += sum(t.numel() * t.element_size() for t in (mod.weight, mod.scales_and_zeros))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gptfast", required=True, help="folder with gpt-fast's model.py and quantize.py")
    ap.add_argument("--mode", default="bf16", choices=["bf16", "int8", "int4"])
    ap.add_argument("--groupsize", type=int, default=32, help="int4 group size (gpt-fast's quantize.py default: 32)")
    ap.add_argument("--inner-k-tiles", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the compiling one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    sys.path.insert(0, args.gptfast)
    import torch
    import torch._inductor.config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # gpt-fast's generate.py settings.
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.triton.unique_kernel_names = True
    torch._inductor.config.fx_graph_cache = True

    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1:
        import tp                                  # gpt-fast's
        tp.maybe_init_dist()
    t0 = time.perf_counter()
    model = build(args, torch)
    if world > 1:
        tp.apply_tp(model)
        # Its shards are views of the whole weight; gpt-fast's loader copies them to the GPU after apply_tp, which
        # leaves each one contiguous. Do the same here.
        for mod in model.modules():
            for name in ("weight", "scales"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor) and not t.is_contiguous():
                    setattr(mod, name, torch.nn.Parameter(t.contiguous(), requires_grad=False)
                            if isinstance(t, torch.nn.Parameter) else t.contiguous())
        torch.cuda.empty_cache()
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0
    nbytes = weight_bytes(model, torch)
    say = print if rank0 else (lambda *a, **k: None)
    say(f"gpt-fast {args.mode} tp {world}: built in {time.perf_counter() - t0:.1f} s, {nbytes / 1e9:.2f} GB of "
        "weights read per step per rank", flush=True)
    with torch.device("cuda"):
        model.setup_caches(max_batch_size=1, max_seq_length=args.context + args.steps + 8)

    def decode_one_token(model, x, input_pos):
        logits = model(x, input_pos)
        return torch.argmax(logits[:, -1], dim=-1, keepdim=True).to(torch.int)

    decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, llama3_8b()["vocab_size"], (1, args.context), device="cuda", dtype=torch.int)

    for r in range(-1, args.rounds):
        with torch.no_grad():
            tok = decode_one_token(model, prompt, torch.arange(0, args.context, device="cuda"))  # prefill, eager
            input_pos = torch.tensor([args.context], device="cuda", dtype=torch.int)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = []
            with sdpa_kernel(SDPBackend.MATH):
                for _ in range(args.steps):
                    # A CUDA-graph output is overwritten by the next replay: clone it, as gpt-fast's loop does.
                    tok = decode(model, tok.view(1, -1), input_pos).clone()
                    input_pos += 1
                    out.append(tok)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / args.steps
        if r < 0:
            say(f"gpt-fast {args.mode} tp {world}: compiled and ran in {dt * args.steps:.1f} s", flush=True)
            continue
        say(f"gpt-fast {args.mode} tp {world} batch 1: {1 / dt:9.1f} tok/s  {dt * 1e3:7.3f} ms/step  "
            f"{nbytes / dt / 1e9:7.0f} GB/s of weights per rank", flush=True)
        if args.json and rank0:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(kind="peer", peer="gpt-fast", mode=args.mode, tp=world, batch=1, tok_s=1 / dt,
                                        ms_step=dt * 1e3, weight_bytes=nbytes, context=args.context,
                                        steps=args.steps, groupsize=args.groupsize if args.mode == "int4" else None,
                                        torch=torch.__version__, gpu=torch.cuda.get_device_name())) + "\n")
    if world > 1:
        # torch's process-group teardown hung after the timed rounds on the lent machines (docs/PERFORMANCE.md,
        # twenty-sixth session): every rank past the rounds, then out without it.
        torch.distributed.barrier()
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
