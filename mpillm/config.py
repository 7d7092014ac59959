"""Model configuration: one dataclass filled from an HF `config.json` or from GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    arch: str                      # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None      # HF rope_scaling with "rope_type" normalised; None = plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool           # q/k/v biases (Qwen2)
    torch_dtype: str = "float32"   # dtype the checkpoint stores ("bfloat16", "float16", "float32")
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    def validate(self, where: str) -> "ModelConfig":
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"{where}: {msg}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"field {name!r} must be a positive integer, got {getattr(self, name)!r}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        return self


def _rope_scaling(raw: dict | None, where: str) -> dict | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: unsupported rope scaling: field 'rope_scaling.rope_type' = {kind!r} "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if kind == "default":
        return None
    out = dict(raw, rope_type=kind)
    required = {"linear": ["factor"],
                "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
    for key in required[kind]:
        if key not in out:
            raise ConfigError(f"{where}: rope scaling {kind!r} needs field 'rope_scaling.{key}'")
    return out


def config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(f"{where}: unsupported architecture: field 'architectures' = {archs!r} "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    # transformers >= 5 writes rope settings under "rope_parameters"; older files use rope_theta/rope_scaling.
    rope_params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = rope_params
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    eos = cfg.get("eos_token_id")
    if arch == "mistral" and cfg.get("sliding_window") not in (None, 0):
        # Full attention equals sliding-window attention up to the window, so cap the context there.
        cfg = dict(cfg, max_position_embeddings=min(cfg.get("max_position_embeddings", 1 << 30), cfg["sliding_window"]))
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        raise ConfigError(f"{where}: field 'use_sliding_window' = true is not supported")
    c = ModelConfig(
        arch=arch,
        vocab_size=cfg.get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size"),
        num_layers=cfg.get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or (hidden // heads if hidden and heads else None),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=_rope_scaling(scaling, where),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        name=cfg.get("_name_or_path", ""),
    )
    return c.validate(where)


def load_hf_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (a model directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_hf(cfg, str(path))


GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def config_from_gguf(meta: dict, n_vocab_rows: int | None, where: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"{where}: unsupported GGUF architecture: field 'general.architecture' = {arch!r} "
                          f"(supported: {', '.join(GGUF_ARCHS)})")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full not in meta:
            if required and default is None:
                raise ConfigError(f"{where}: missing GGUF field {full!r}")
            return default
        return meta[full]

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = None
    stype = get("rope.scaling.type", "none", required=False)
    if stype not in ("none", None):
        if stype != "linear":
            raise ConfigError(f"{where}: unsupported rope scaling: field '{arch}.rope.scaling.type' = {stype!r}")
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    vocab = meta.get(f"{arch}.vocab_size") or n_vocab_rows or len(meta.get("tokenizer.ggml.tokens", []))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    c = ModelConfig(
        arch=GGUF_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", 0, required=False) or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=False,   # decided by the loader: tied when output.weight is absent
        attention_bias=arch == "qwen2",
        torch_dtype="float32",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=[] if eos is None else [int(eos)],
        name=str(meta.get("general.name", "")),
    )
    return c.validate(where)
