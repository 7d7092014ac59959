"""Real model shapes with no checkpoint (`--model dummy:llama3-8b`): for speed work, weights are random."""

from __future__ import annotations

from mpillm.config import ModelConfig

_SHAPES = {
    #              hidden  inter  layers heads kv  vocab   theta     bias   tied
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, 100000.0, False, True),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0, False, False),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256, 500000.0, False, False),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 10000.0, False, False),
    "qwen2-7b": (3584, 18944, 28, 28, 4, 152064, 1000000.0, True, False),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, 1000000.0, True, True),
}


def is_dummy(model: str | None) -> bool:
    return bool(model) and str(model).startswith("dummy:")


def dummy_config(model: str) -> ModelConfig:
    name = model.split(":", 1)[1]
    if name not in _SHAPES:
        raise ValueError(f"--model {model}: unknown shape {name!r} (known: {', '.join(sorted(_SHAPES))})")
    h, i, n, heads, kv, vocab, theta, bias, tied = _SHAPES[name]
    return ModelConfig(arch="qwen2" if bias else "llama", vocab_size=vocab, hidden_size=h, intermediate_size=i,
                       num_layers=n, num_heads=heads, num_kv_heads=kv, head_dim=h // heads, rms_norm_eps=1e-5,
                       rope_theta=theta, rope_scaling=None, max_position_embeddings=8192,
                       tie_word_embeddings=tied, attention_bias=bias, torch_dtype="bfloat16",
                       name=model).validate(model)


class IdsOnlyTokenizer:
    """Tokenizer stand-in for random-weight runs, whose prompts come as token ids: no EOS (every request runs
    to its max_tokens) and no text."""
    eos_ids = frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return ""
