#!/usr/bin/env python3
"""Write a tiny random-weight Llama checkpoint with a real tokenizer, for smoke tests without downloads.

    python scripts/make_tiny_model.py OUT_DIR [--heads 6 --kv-heads 2 --layers 2 --hidden 384]

The tokenizer is a byte-level BPE trained on this file's own text (tokenizers), with a ChatML template;
the weights are safetensors written with numpy (no torch needed). Outputs are gibberish by design.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    h, hd = args.hidden, args.hidden // args.heads
    inter = 2 * h + 128
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
           "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "eos_token_id": tok.token_to_id("<|im_end|>"), "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
    t = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(h, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(h, np.float32),
                  p + "self_attn.q_proj.weight": w(args.heads * hd, h),
                  p + "self_attn.k_proj.weight": w(args.kv_heads * hd, h),
                  p + "self_attn.v_proj.weight": w(args.kv_heads * hd, h),
                  p + "self_attn.o_proj.weight": w(h, args.heads * hd),
                  p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                  p + "mlp.down_proj.weight": w(h, inter)})
    save_file(t, str(out / "model.safetensors"))
    print(f"wrote {out}: vocab {vocab}, {args.layers} layers, hidden {h}, {args.heads}/{args.kv_heads} heads")


if __name__ == "__main__":
    main()
