"""Model configuration: one dataclass filled from an HF `config.json` or from GGUF metadata."""

from __future__ import annotations

import json
import math
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


_KINDS = {"int": "an integer", "float": "a finite number", "dict": "an object", "bool": "true or false",
          "str": "a string"}


def _typed(value, kind: str, name: str, where: str, optional: bool = False):
    """`value` checked to be of `kind`, else a ConfigError naming the field (a malformed file is user input)."""
    if value is None and optional:
        return None
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "dict": lambda v: isinstance(v, dict), "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind](value)
    if not ok:
        raise ConfigError(f"{where}: field {name!r} must be {_KINDS[kind]}, got {value!r:.80}")
    return value


def _int_list(value, name: str, where: str) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_typed(v, "int", name, where) for v in items]


def _rope_scaling(raw: dict | None, where: str) -> dict | None:
    if not raw:
        return None
    _typed(raw, "dict", "rope_scaling", where)
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
        _typed(out[key], "float", f"rope_scaling.{key}", where)
    return out


def config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: field 'architectures' must be a list of strings, got {archs!r:.80}")
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(f"{where}: unsupported architecture: field 'architectures' = {archs!r} "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    # transformers >= 5 writes rope settings under "rope_parameters"; older files use rope_theta/rope_scaling.
    rope_params = _typed(cfg.get("rope_parameters"), "dict", "rope_parameters", where, optional=True) or {}
    theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = rope_params

    def field(key, kind, default=None):
        v = cfg.get(key, default)
        return _typed(v, kind, key, where, optional=default is None)

    heads = field("num_attention_heads", "int")
    hidden = field("hidden_size", "int")
    max_pos = field("max_position_embeddings", "int", 4096)
    window = field("sliding_window", "int") if arch == "mistral" else None
    if window:
        # Full attention equals sliding-window attention up to the window, so cap the context there.
        max_pos = min(max_pos, window)
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        raise ConfigError(f"{where}: field 'use_sliding_window' = true is not supported")
    head_dim = field("head_dim", "int") or (hidden // heads if hidden and heads else None)
    c = ModelConfig(
        arch=arch,
        vocab_size=field("vocab_size", "int"),
        hidden_size=hidden,
        intermediate_size=field("intermediate_size", "int"),
        num_layers=field("num_hidden_layers", "int"),
        num_heads=heads,
        num_kv_heads=field("num_key_value_heads", "int") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(field("rms_norm_eps", "float", 1e-6)),
        rope_theta=float(_typed(theta, "float", "rope_theta", where)),
        rope_scaling=_rope_scaling(scaling, where),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(field("tie_word_embeddings", "bool", False)),
        attention_bias=bool(field("attention_bias", "bool", arch == "qwen2")),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=_typed(cfg.get("bos_token_id"), "int", "bos_token_id", where, optional=True),
        eos_token_id=_int_list(cfg.get("eos_token_id"), "eos_token_id", where),
        name=str(cfg.get("_name_or_path", "")),
    )
    return c.validate(where)


def load_hf_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (a model directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:   # bad UTF-8, absurd nesting or numbers
        raise ConfigError(f"{path}: unreadable: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_hf(cfg, str(path))


GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def config_from_gguf(meta: dict, n_vocab_rows: int | None, where: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHS:
        raise ConfigError(f"{where}: unsupported GGUF architecture: field 'general.architecture' = {arch!r:.80} "
                          f"(supported: {', '.join(GGUF_ARCHS)})")

    def get(key, kind="int", default=None):
        full = f"{arch}.{key}"
        if full not in meta:
            if default is None:
                raise ConfigError(f"{where}: missing GGUF field {full!r}")
            return default
        return _typed(meta[full], kind, full, where)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads <= 0 or hidden <= 0:
        raise ConfigError(f"{where}: GGUF fields '{arch}.attention.head_count' ({heads}) and "
                          f"'{arch}.embedding_length' ({hidden}) must be positive")
    scaling = None
    stype = get("rope.scaling.type", "str", "none")
    if stype != "none":
        if stype != "linear":
            raise ConfigError(f"{where}: unsupported rope scaling: field '{arch}.rope.scaling.type' = {stype!r}")
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", "float"))}
    vocab = get("vocab_size", "int", 0) or n_vocab_rows or len(meta.get("tokenizer.ggml.tokens", []))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    c = ModelConfig(
        arch=GGUF_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", "int", heads),
        head_dim=get("attention.key_length", "int", 0) or hidden // heads,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", "float", 1e-5)),
        rope_theta=float(get("rope.freq_base", "float", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=get("context_length", "int", 4096),
        tie_word_embeddings=False,   # decided by the loader: tied when output.weight is absent
        attention_bias=arch == "qwen2",
        torch_dtype="float32",
        bos_token_id=None if bos is None else _typed(bos, "int", "tokenizer.ggml.bos_token_id", where),
        eos_token_id=_int_list(eos, "tokenizer.ggml.eos_token_id", where),
        name=str(meta.get("general.name", "")),
    )
    return c.validate(where)
