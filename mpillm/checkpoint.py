"""Opening a checkpoint: HF safetensors directories (single or sharded) and GGUF files.

Everything is addressed by HF parameter names (`model.layers.3.self_attn.q_proj.weight`) in HF orientation
([out_features, in_features]); a layer asks for exactly the rows/columns it owns and only those bytes are
read from the memory map. GGUF specifics stay here: tensor names are mapped, llama.cpp's Q/K row permutation
is undone, quantized blocks are dequantized on load yet stay reachable through `quantized()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mpillm.config import ConfigError, ModelConfig, config_from_gguf, load_hf_config
from mpillm.formats import (GGML_TYPE_IDS, GGML_TYPES, GGUF_DECODED, FormatError, GGUFFile, SafetensorsFile,
                            dequantize, no_duplicate_keys, to_f32)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    pass


def _gguf_name(hf: str) -> str | None:
    parts = hf.split(".")
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        i, rest = parts[2], ".".join(parts[3:])
        table = {
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        }
        mod, kind = rest.rsplit(".", 1)
        if mod in table:
            return f"blk.{i}.{table[mod]}.{kind}"
    return None


def _slice_rows(a, rows):
    return a if rows is None else a[rows]


class Checkpoint:
    """A model on disk. `config`, `load(name, rows, cols)`, `quantized(name)`, `tokenizer()`."""

    config: ModelConfig
    path: Path

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def shape(self, name: str) -> tuple:
        raise NotImplementedError

    def load(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        raise NotImplementedError

    def quantized(self, name: str):
        """(ggml type name, raw blocks [out, bytes_per_row]) for natively quantized tensors, else None."""
        return None

    def load_blocks(self, name: str, rows: slice | None = None, cols: slice | None = None):
        """(ggml type name, raw block bytes [rows, bytes]) of a slice of a natively quantized tensor, rows
        in HF order like load(); None for float tensors. Nothing is decoded."""
        return None

    def tokenizer(self):
        raise NotImplementedError


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, model_dir: Path):
        self.path = Path(model_dir)
        self.config = load_hf_config(self.path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.exists():
            try:
                data = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicate_keys)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{index}: invalid JSON at line {e.lineno}: {e.msg}") from None
            except (ValueError, RecursionError) as e:   # duplicate keys, bad UTF-8, absurd nesting or numbers
                raise CheckpointError(f"{index}: unreadable: {e}") from None
            wmap = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{index}: missing or empty 'weight_map'")
            root = self.path.resolve()
            for tname, fname in wmap.items():
                if (not isinstance(fname, str) or "/" in fname or "\\" in fname or "\0" in fname
                        or fname in ("", ".", "..")):
                    raise CheckpointError(f"{index}: weight_map[{tname!r}] = {fname!r} must be a file name inside {self.path}")
                fpath = (self.path / fname).resolve()
                if fpath.parent != root:
                    raise CheckpointError(f"{index}: weight_map[{tname!r}] = {fname!r} leaves the model directory")
                self.where[tname] = fname
            for fname in sorted(set(self.where.values())):
                self.files[fname] = self._open(self.path / fname)
            for tname, fname in self.where.items():
                if tname not in self.files[fname].tensors:
                    raise CheckpointError(f"{index}: tensor {tname!r} is mapped to {fname} but that file does not hold it")
        elif single.exists():
            self.files["model.safetensors"] = self._open(single)
            self.where = {n: "model.safetensors" for n in self.files["model.safetensors"].tensors}
        else:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(f"{self.path}: only pickle checkpoints found ({', '.join(pickles)}); they can run "
                                      "arbitrary code and are refused. Convert them to safetensors.")
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        if "lm_head.weight" not in self.where and not self.config.tie_word_embeddings:
            self.config.tie_word_embeddings = True

    @staticmethod
    def _open(p: Path) -> SafetensorsFile:
        if not p.exists():
            raise CheckpointError(f"{p}: missing weight file")
        return SafetensorsFile(str(p))

    def _info(self, name):
        if name not in self.where:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        f = self.files[self.where[name]]
        return f, f.tensors[name]

    def has(self, name):
        return name in self.where

    def shape(self, name):
        return self._info(name)[1].shape

    def load(self, name, rows=None, cols=None):
        f, info = self._info(name)
        a = _slice_rows(f.array(name), rows)
        if cols is not None:
            a = a[:, cols]
        return to_f32(np.ascontiguousarray(a), info.dtype)

    def tokenizer(self):
        from mpillm.tokenizer import Tokenizer
        return Tokenizer.from_pretrained_dir(self.path)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = GGUFFile(str(self.path))
        emb = self.file.tensors.get("token_embd.weight")
        if emb is None:
            raise CheckpointError(f"{self.path}: GGUF has no 'token_embd.weight' tensor")
        self.config = config_from_gguf(self.file.metadata, emb.shape[0], str(self.path))
        self.config.tie_word_embeddings = "output.weight" not in self.file.tensors
        # llama.cpp's converter permutes Q/K rows (per head: interleaved pairs instead of halves) for its RoPE;
        # Qwen2's converter does not.
        self.permuted = self.config.arch == "llama"

    def _gguf(self, name):
        g = _gguf_name(name)
        if g is None or g not in self.file.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} (GGUF {g!r}) not found")
        return g

    def has(self, name):
        g = _gguf_name(name)
        return g is not None and g in self.file.tensors

    def shape(self, name):
        return self.file.tensors[self._gguf(name)].shape

    def _heads(self, name):
        if not self.permuted:
            return None
        if ".self_attn.q_proj." in name:
            return self.config.num_heads
        if ".self_attn.k_proj." in name:
            return self.config.num_kv_heads
        return None

    def _raw_slice(self, name, info, raw, rows, cols):
        raw = _slice_rows(raw, rows)
        if cols is not None:
            _, block, bsize = GGML_TYPES[GGML_TYPE_IDS[info.dtype]]
            start, stop, step = cols.indices(info.shape[1])
            if step != 1 or start % block or stop % block:
                raise CheckpointError(f"{self.path}: tensor {name!r}: column slice {start}:{stop} does not fall on "
                                      f"{info.dtype} block boundaries ({block})")
            # Plain types are typed arrays (index by element); quantized rows are bytes (index by block).
            raw = raw[:, start:stop] if block == 1 else raw[:, start // block * bsize: stop // block * bsize]
        return np.ascontiguousarray(raw)

    def _unpermute(self, name, info, rows, a):
        """Undo llama.cpp's Q/K row permutation on rows of `a` (floats or raw block bytes: it moves whole rows)."""
        heads = self._heads(name)
        if heads is None:
            return a
        hd = self.config.head_dim
        start, stop, step = (rows or slice(None)).indices(info.shape[0])
        if step != 1 or start % hd or stop % hd:
            raise CheckpointError(f"{self.path}: tensor {name!r}: row slice {start}:{stop} must cover whole "
                                  f"heads of {hd} rows (the Q/K un-permutation works per head)")
        # GGUF row h*hd + 2*j + t holds HF row h*hd + t*hd/2 + j: swap the (j, t) axes back.
        return np.ascontiguousarray(a.reshape(-1, hd // 2, 2, a.shape[-1]).swapaxes(1, 2).reshape(a.shape))

    def load(self, name, rows=None, cols=None):
        g = self._gguf(name)
        info = self.file.tensors[g]
        raw = self.file.raw(g)
        if raw.ndim == 1:
            w = dequantize(np.array(raw[rows] if rows is not None else raw), info.dtype)
        else:
            w = dequantize(self._raw_slice(name, info, raw, rows, cols), info.dtype)
        if info.dtype in GGUF_DECODED and not np.isfinite(w).all():
            raise CheckpointError(f"{self.path}: tensor {g!r} ({info.dtype}): a block decodes to inf or NaN "
                                  f"(a non-finite scale): the file is damaged")
        return w if raw.ndim == 1 else self._unpermute(name, info, rows, w)

    def load_blocks(self, name, rows=None, cols=None):
        g = self._gguf(name)
        info = self.file.tensors[g]
        raw = self.file.raw(g)
        if info.dtype in ("F32", "F16", "BF16") or raw.ndim != 2:
            return None
        return info.dtype, self._unpermute(name, info, rows, self._raw_slice(name, info, raw, rows, cols))

    def quantized(self, name):
        g = self._gguf(name)
        info = self.file.tensors[g]
        if info.dtype in ("F32", "F16", "BF16"):
            return None
        return info.dtype, self.file.raw(g)

    def tokenizer(self):
        from mpillm.tokenizer import Tokenizer
        return Tokenizer.from_gguf_metadata(self.file.metadata)


def open_checkpoint(path) -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    try:
        if p.is_dir():
            return SafetensorsCheckpoint(p)
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: pickle checkpoints can run arbitrary code and are refused; use safetensors or GGUF")
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return GGUFCheckpoint(p)
        if p.suffix == ".safetensors":
            raise CheckpointError(f"{p}: pass the model directory (with config.json), not a single .safetensors file")
        raise CheckpointError(f"{p}: not a GGUF file or a model directory")
    except (FormatError, ConfigError) as e:
        raise CheckpointError(str(e)) from None
