"""Write a random-weight GGUF with a real model's shapes, for timing llama.cpp (the peer) on the same bytes that
mpillm's `dummy:` models have: Q4_0 or Q8_0 projections, F32 norms, the LM head in the same type or F16.

Codes are random, every block's scale a small constant, so the logits stay finite; the vocabulary is a
synthetic SentencePiece list (llama-bench feeds random token ids and never detokenizes). Tensors are
written one at a time, so memory stays at one tensor.

    python scripts/peers/random_gguf.py --shape llama3-8b --type q4_0 --lm-head f16 /tmp/l3-8b-q4_0.gguf
"""

import argparse

import numpy as np

# A shape small enough for tests: layers, hidden, heads, kv heads, ffn, vocab, rope base. Every other shape is
# mpillm.dummy's, so that the file holds the model bench.py's `dummy:NAME` times.
TINY = (2, 256, 4, 2, 512, 1024, 10000.0)


def shape(name):
    if name == "tiny":
        return TINY
    from mpillm.dummy import dummy_config
    try:
        cfg = dummy_config(f"dummy:{name}")
    except ValueError as e:
        raise SystemExit(f"--shape: {e}")
    if cfg.attention_bias or cfg.tie_word_embeddings:
        raise SystemExit(f"--shape {name}: biases or a tied LM head; this writer makes untied Llama files only")
    return (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.rope_theta)


BLOCK = {"q4_0": (32, 18), "q8_0": (32, 34)}      # elements, bytes per block


def random_blocks(rng, rows, cols, qtype):
    """Raw blocks [rows, cols / 32 * bytes]: random codes, the fp16 scale of every block 0.002."""
    n, nbytes = BLOCK[qtype]
    if cols % n:
        raise SystemExit(f"{cols} columns are not whole {qtype} blocks of {n}")
    raw = rng.integers(0, 256, size=(rows, cols // n, nbytes), dtype=np.uint8)
    raw[:, :, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def main():
    import gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama3-8b", help="tiny, or a name of mpillm.dummy's untied Llama shapes")
    ap.add_argument("--type", default="q4_0", choices=sorted(BLOCK))
    ap.add_argument("--lm-head", default=None, choices=["q4_0", "q8_0", "f16"],
                    help="the LM head's type (default: --type)")
    args = ap.parse_args()
    layers, dim, heads, kv_heads, ffn, vocab, rope_base = shape(args.shape)
    head_dim = dim // heads
    qtypes = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0,
              "f16": gguf.GGMLQuantizationType.F16}
    rng = np.random.default_rng(0)

    # name -> (rows, cols, type); rows x cols is numpy's [out, in] orientation, as GGUF stores it.
    plan = {"token_embd.weight": (vocab, dim, args.type)}
    for i in range(layers):
        b = f"blk.{i}."
        plan |= {b + "attn_norm.weight": (1, dim, "f32"), b + "attn_q.weight": (heads * head_dim, dim, args.type),
                 b + "attn_k.weight": (kv_heads * head_dim, dim, args.type),
                 b + "attn_v.weight": (kv_heads * head_dim, dim, args.type),
                 b + "attn_output.weight": (dim, heads * head_dim, args.type),
                 b + "ffn_norm.weight": (1, dim, "f32"), b + "ffn_gate.weight": (ffn, dim, args.type),
                 b + "ffn_up.weight": (ffn, dim, args.type), b + "ffn_down.weight": (dim, ffn, args.type)}
    plan |= {"output_norm.weight": (1, dim, "f32"), "output.weight": (vocab, dim, args.lm_head or args.type)}

    def tensor(rows, cols, qtype):
        if qtype == "f32":
            return np.ones(cols, np.float32)
        if qtype == "f16":
            return (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float16)
        return random_blocks(rng, rows, cols, qtype)

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"random {args.shape} {args.type}")
    w.add_file_type({"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[args.type])
    w.add_context_length(8192)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokens = specials + byte_tokens + [f"tok{i}" for i in range(vocab - len(specials) - len(byte_tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    T = gguf.TokenType
    w.add_token_types([T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * (vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    for name, (rows, cols, qtype) in plan.items():
        if qtype == "f32":
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        elif qtype == "f16":
            w.add_tensor_info(name, (rows, cols), np.dtype(np.float16), rows * cols * 2)
        else:
            n, nbytes = BLOCK[qtype]
            w.add_tensor_info(name, (rows, cols // n * nbytes), np.dtype(np.uint8), rows * cols // n * nbytes,
                              raw_dtype=qtypes[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, (rows, cols, qtype) in plan.items():
        w.write_tensor_data(tensor(rows, cols, qtype))
    w.close()
    print(f"wrote {args.out}: {args.shape}, {args.type}, LM head {args.lm_head or args.type}")


if __name__ == "__main__":
    main()
