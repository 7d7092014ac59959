"""Tokenizers for Llama-family models, from GGUF metadata or a Hugging Face model directory.

Every source becomes one `tokenizers.Tokenizer` (Rust, fast), built the way transformers builds it for the same
files, so ids and decoded text match transformers:

* GGUF `gpt2` vocabularies (byte-level BPE, e.g. SmolLM2, Llama 3, Qwen2): tokens + merges, with the pre-tokenizer
  llama.cpp selects from `tokenizer.ggml.pre`.
* GGUF `llama` vocabularies and `tokenizer.model` files (SentencePiece, e.g. Llama 2): scores turned into BPE merges,
  `▁` for spaces, byte fallback for characters outside the vocabulary.
* `tokenizer.json` as is.
"""

from __future__ import annotations

import json
import numbers
import struct
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from .chat_template import ChatTemplateError, render_chat_template

__all__ = ["Tokenizer", "TokenizerError", "IncrementalDecoder", "ChatTemplateError"]


class TokenizerError(ValueError):
    pass


# Token types, numbered alike in GGUF's tokenizer.ggml.token_type and SentencePiece's ModelProto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's names for these pre-tokenizers (llama-vocab.cpp); unknown names are refused rather than guessed.
_LLAMA3_NAMES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}
_QWEN2_NAMES = {"qwen2", "deepseek-r1-qwen"}
_GPT2_NAMES = {"default", "gpt2", "gpt-2"}


@lru_cache(maxsize=1)
def _byte_chars() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for themselves,
    # the others are moved to U+0100 and up so that no token contains whitespace or control characters.
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    moved = iter(range(0x100, 0x200))
    return {b: chr(b) if b in keep else chr(next(moved)) for b in range(256)}


def _byte_level_pre(name, where):
    """(pre-tokenizer, normalizer, ignore_merges) for a GGUF `tokenizer.ggml.pre` value."""
    if name is None or name in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False), None, False
    if name == "smollm":  # the SmolLM2 tokenizer.json: every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)]), None, False
    if name in _LLAMA3_NAMES or name in _QWEN2_NAMES:
        llama3 = name in _LLAMA3_NAMES
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if llama3 else _QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # Llama 3 looks a whole word up before merging (its tokenizer.json's ignore_merges; llama.cpp does too);
        # Qwen2's tokenizer NFC-normalizes first.
        return pre, (None if llama3 else normalizers.NFC()), llama3
    known = sorted(_GPT2_NAMES | _LLAMA3_NAMES | _QWEN2_NAMES | {"smollm"})
    raise TokenizerError(f"{where}: unsupported tokenizer.ggml.pre {name!r} (supported: {', '.join(known)})")


def _spm_merges(tokens, scores, types):
    # SentencePiece and llama.cpp merge, at each step, the adjacent pair whose concatenation is the best-scoring
    # piece. As ranked BPE merges: every split of a piece into two pieces, ranked by that piece's score (ties as
    # transformers orders them, so both build the same merge list).
    normal = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    found = [(score, t[:k], t[k:]) for t, score, ty in zip(tokens, scores, types) if ty == NORMAL
             for k in range(1, len(t)) if t[:k] in normal and t[k:] in normal]
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in found]


def _spm_backend(tokens, scores, types, *, add_prefix_space=True, unigram=False, unk_id=None):
    if unigram:
        model = models.Unigram(list(zip(tokens, scores)), unk_id, byte_fallback=True)
    else:
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        unk = tokens[unk_id] if unk_id is not None else None
        model = models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True,
                           byte_fallback=True)
    backend = _Backend(model)
    # SentencePiece's dummy prefix and ▁-for-space as a normalizer, as in the Hub's Llama 2 tokenizer.json. Unlike
    # a Metaspace pre-tokenizer it keeps the prefix when the text already starts with a space (" hi" -> ▁▁hi, as
    # SentencePiece does), and, like llama.cpp, it also prefixes text that follows a special token.
    steps = [normalizers.Prepend("▁")] if add_prefix_space else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    return backend


def _add_tokens(backend, tokens, types, named):
    # Control/unknown tokens and the named special ones (bos, eos, ...) are matched whole in the text and skipped by
    # decode; user-defined ones are matched whole but kept, as transformers and llama.cpp do.
    special = [i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN) or i in named]
    user = [i for i, ty in enumerate(types) if ty == USER_DEFINED and i not in named]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def _set_post_processor(backend, bos, eos, add_bos, add_eos):
    """bos/eos are (token, id) or None."""
    single = ([bos[0]] if add_bos and bos else []) + ["$A"] + ([eos[0]] if add_eos and eos else [])
    pair = single + [p.replace("$A", "$B") for p in single]
    specials = [t for t, on in ((bos, add_bos), (eos, add_eos)) if t and on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---------------------------------------------------------------------------------------------- GGUF metadata

def _meta(meta, key, kind, where, default=None, required=False):
    if key not in meta:
        if required:
            raise TokenizerError(f"{where}: missing {key}")
        return default
    value = meta[key]
    ok = {"str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
          "list": lambda v: hasattr(v, "__len__") and not isinstance(v, (str, bytes, dict))}[kind]
    if not ok(value):
        raise TokenizerError(f"{where}: {key} must be a {kind}, got {type(value).__name__}")
    return int(value) if kind == "int" else value


def _meta_id(meta, key, n, where, lenient=False):
    i = _meta(meta, key, "int", where)
    if i is not None and not 0 <= i < n:
        if lenient:  # some converters write -1 or 2**32-1 for "no padding token"
            return None
        raise TokenizerError(f"{where}: {key} = {i} is outside the vocabulary (size {n})")
    return i


# ------------------------------------------------------------------------------------------ SentencePiece file

def _varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _proto(buf) -> dict[int, list]:
    """Fields of one protobuf message: number -> values (int, bytes or float). Enough for SentencePiece's ModelProto,
    so that reading a tokenizer.model needs neither sentencepiece's protobuf bindings nor protobuf itself."""
    fields, i, n = {}, 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = struct.unpack_from("<f", buf, i)[0], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def _read_sentencepiece(path: Path) -> dict:
    try:
        model = _proto(memoryview(path.read_bytes()))
        pieces = [_proto(p) for p in model.get(1, [])]
        tokens = [bytes(p[1][0]).decode("utf-8") for p in pieces]
        scores = [p.get(2, [0.0])[0] for p in pieces]
        types = [p.get(3, [NORMAL])[0] for p in pieces]
        trainer = _proto(model[2][-1]) if 2 in model else {}
        norm = _proto(model[3][-1]) if 3 in model else {}
    except Exception as e:
        raise TokenizerError(f"{path}: not a readable SentencePiece model ({type(e).__name__}: {e})") from None
    if not tokens:
        raise TokenizerError(f"{path}: SentencePiece model has no pieces")

    def special(field, default):  # trainer_spec ids are int32; -1 (none) arrives as a 64-bit two's complement
        v = trainer.get(field, [default])[-1]
        v = v - (1 << 64) if v >= 1 << 63 else v
        return v if 0 <= v < len(tokens) else None

    model_type = trainer.get(3, [1])[-1]  # 1 unigram, 2 BPE
    if model_type not in (1, 2):
        raise TokenizerError(f"{path}: SentencePiece model_type {model_type} unsupported (only unigram and BPE)")
    return dict(tokens=tokens, scores=scores, types=types, unigram=model_type == 1,
                add_dummy_prefix=bool(norm.get(3, [1])[-1]),
                unk_id=special(40, 0), bos_id=special(41, 1), eos_id=special(42, 2), pad_id=special(43, -1))


# ------------------------------------------------------------------------------------------- HF directories

def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_string(data, key, path):
    """A special token given as a string or as an AddedToken dict {"content": ...}."""
    value = data.get(key)
    if isinstance(value, dict):
        value = value.get("content")
        if not isinstance(value, str):
            raise TokenizerError(f"{path}: field {key!r} is a dict without a string 'content'")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{path}: field {key!r} must be a string or an AddedToken dict, "
                             f"got {type(value).__name__}")
    return value


def _flag(data, key, path):
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{path}: field {key!r} must be true or false, got {value!r}")
    return value


def _template(value, path):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}.get("default")
    raise TokenizerError(f"{path}: field 'chat_template' must be a string or a list of {{name, template}} objects")


def _id_list(data, key, path):
    value = data.get(key)
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{path}: field {key!r} must be an int or a list of ints, got {value!r}")
    return ids


# ---------------------------------------------------------------------------------------------------- Tokenizer

class Tokenizer:
    """Text <-> token ids, special tokens and chat template of one model.

    Build with `from_gguf_metadata`, `from_gguf_file` or `from_pretrained_dir`.
    """

    def __init__(self, backend: _Backend, *, vocab_size: int, bos_id=None, eos_id=None, extra_eos_ids=(),
                 pad_id=None, unk_id=None, chat_template=None, source="tokenizer", bos_token=None, eos_token=None):
        self._backend = backend
        self.vocab_size = vocab_size
        self.bos_id, self.pad_id, self.unk_id = bos_id, pad_id, unk_id
        self.eos_ids = frozenset({eos_id, *extra_eos_ids} - {None})
        self.chat_template = chat_template
        self.source = source

        def name(i):
            return None if i is None else backend.id_to_token(i)

        self.bos_token, self.eos_token = bos_token or name(bos_id), eos_token or name(eos_id)
        self.pad_token, self.unk_token = name(pad_id), name(unk_id)
        self.add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]

    # -- construction

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF metadata") -> "Tokenizer":
        """`meta` maps GGUF keys to plain values (lists for arrays); `source` names the file in error messages."""
        where = source
        kind = _meta(meta, "tokenizer.ggml.model", "str", where, required=True)
        tokens = list(_meta(meta, "tokenizer.ggml.tokens", "list", where, required=True))
        n = len(tokens)
        types = [int(t) for t in _meta(meta, "tokenizer.ggml.token_type", "list", where, default=[NORMAL] * n)]
        if len(types) != n:
            raise TokenizerError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        ids = {k: _meta_id(meta, f"tokenizer.ggml.{k}_token_id", n, where, lenient=k in ("padding", "unknown"))
               for k in ("bos", "eos", "eot", "eom", "padding", "unknown")}
        special_ids = {i for i in ids.values() if i is not None}
        pre = _meta(meta, "tokenizer.ggml.pre", "str", where)

        if kind == "gpt2":
            merges = _meta(meta, "tokenizer.ggml.merges", "list", where, required=True)
            pre_tok, norm, ignore_merges = _byte_level_pre(pre, where)
            chars = _byte_chars()
            alphabet = set(chars.values())
            added = {i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN, USER_DEFINED)} | special_ids
            vocab = {}
            for i, t in enumerate(tokens):
                # Added tokens are matched as plain text, so they keep their spelling; some converters also store
                # ordinary tokens as plain text, which merges can only reach in the byte alphabet.
                if i not in added and not alphabet.issuperset(t):
                    t = "".join(chars[b] for b in t.encode("utf-8"))
                vocab.setdefault(t, i)
            try:
                pairs = [tuple(m.split(" ", 1)) for m in merges]
                backend = _Backend(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
            except Exception as e:
                raise TokenizerError(f"{where}: bad tokenizer.ggml.merges ({e})") from None
            backend.normalizer, backend.pre_tokenizer = norm, pre_tok
            backend.decoder = decoders.ByteLevel()
            default_bos = pre in _LLAMA3_NAMES  # llama.cpp's defaults when add_bos_token is absent
        elif kind == "llama":
            scores = [float(x) for x in _meta(meta, "tokenizer.ggml.scores", "list", where, required=True)]
            if len(scores) != n:
                raise TokenizerError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
            backend = _spm_backend(tokens, scores, types, unk_id=ids["unknown"],
                                   add_prefix_space=_meta(meta, "tokenizer.ggml.add_space_prefix", "bool", where, True))
            default_bos = True
        else:
            raise TokenizerError(f"{where}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)")

        _add_tokens(backend, tokens, types, special_ids)
        bos, eos = ids["bos"], ids["eos"]
        add_bos = _meta(meta, "tokenizer.ggml.add_bos_token", "bool", where, default_bos)
        add_eos = _meta(meta, "tokenizer.ggml.add_eos_token", "bool", where, False)
        _set_post_processor(backend, bos is not None and (tokens[bos], bos), eos is not None and (tokens[eos], eos),
                            add_bos, add_eos)
        return cls(backend, vocab_size=n, bos_id=bos, eos_id=eos, extra_eos_ids=(ids["eot"], ids["eom"]),
                   pad_id=ids["padding"], unk_id=ids["unknown"], source=where,
                   chat_template=_meta(meta, "tokenizer.chat_template", "str", where))

    @classmethod
    def from_gguf_file(cls, path) -> "Tokenizer":
        import gguf

        reader = gguf.GGUFReader(str(path))
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        return cls.from_gguf_metadata(meta, source=str(path))

    @classmethod
    def from_pretrained_dir(cls, path) -> "Tokenizer":
        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"{d}: not a directory")
        cfg_path, map_path = d / "tokenizer_config.json", d / "special_tokens_map.json"
        cfg, stm = _read_json(cfg_path), _read_json(map_path)

        def token(key):  # -> (string, the file it came from)
            for data, p in ((cfg, cfg_path), (stm, map_path)):
                if (value := _token_string(data, key, p)) is not None:
                    return value, p
            return None, cfg_path

        (bos_token, bos_src), (eos_token, eos_src), (pad_token, _), (unk_token, _) = (
            token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
        add_bos, add_eos = _flag(cfg, "add_bos_token", cfg_path), _flag(cfg, "add_eos_token", cfg_path)

        if (d / "tokenizer.json").exists():
            try:
                backend = _Backend.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{d / 'tokenizer.json'}: cannot load ({e})") from None
            # transformers keeps tokenizer.json's post-processor unless the config sets add_bos/eos_token explicitly.
            rebuild = add_bos is not None or add_eos is not None
        elif (d / "tokenizer.model").exists():
            sp = _read_sentencepiece(d / "tokenizer.model")
            prefix = _flag(cfg, "add_prefix_space", cfg_path)
            backend = _spm_backend(sp["tokens"], sp["scores"], sp["types"], unigram=sp["unigram"], unk_id=sp["unk_id"],
                                   add_prefix_space=sp["add_dummy_prefix"] if prefix is None else prefix)
            named = {sp[k] for k in ("bos_id", "eos_id", "unk_id", "pad_id") if sp[k] is not None}
            _add_tokens(backend, sp["tokens"], sp["types"], named)
            _add_config_tokens(backend, cfg, cfg_path)
            bos_token = bos_token or (sp["bos_id"] is not None and sp["tokens"][sp["bos_id"]]) or None
            eos_token = eos_token or (sp["eos_id"] is not None and sp["tokens"][sp["eos_id"]]) or None
            unk_token = unk_token or (sp["unk_id"] is not None and sp["tokens"][sp["unk_id"]]) or None
            add_bos = True if add_bos is None else add_bos  # LlamaTokenizer's defaults: BOS, no EOS
            rebuild = True
        else:
            raise TokenizerError(f"{d}: no tokenizer.json or tokenizer.model")

        def tid(tok, field, src=None):  # bos/eos (with src) must exist; a missing pad/unk just stays unset
            i = None if tok is None else backend.token_to_id(tok)
            if i is None and tok is not None and src is not None:
                raise TokenizerError(f"{src}: {field} {tok!r} is not in the vocabulary")
            return i

        bos_id, eos_id = tid(bos_token, "bos_token", bos_src), tid(eos_token, "eos_token", eos_src)
        if rebuild:
            _set_post_processor(backend, bos_id is not None and (bos_token, bos_id),
                                eos_id is not None and (eos_token, eos_id), bool(add_bos), bool(add_eos))
        gen_path, conf_path = d / "generation_config.json", d / "config.json"
        eos_ids = set()
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for p, data in ((gen_path, _read_json(gen_path)), (conf_path, _read_json(conf_path))):
            for i in _id_list(data, "eos_token_id", p):
                if not 0 <= i < vocab_size:
                    raise TokenizerError(f"{p}: eos_token_id {i} is outside the vocabulary (size {vocab_size})")
                eos_ids.add(i)

        template = _template(cfg.get("chat_template"), cfg_path)
        if (d / "chat_template.json").exists():  # newer transformers save the template beside the config
            template = _template(_read_json(d / "chat_template.json").get("chat_template"), d / "chat_template.json")
        if (d / "chat_template.jinja").exists():
            try:
                template = (d / "chat_template.jinja").read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{d / 'chat_template.jinja'}: not UTF-8 ({e})") from None
        return cls(backend, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id, extra_eos_ids=eos_ids,
                   pad_id=tid(pad_token, "pad_token"), unk_id=tid(unk_token, "unk_token"),
                   chat_template=template, source=str(d), bos_token=bos_token, eos_token=eos_token)

    # -- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_piece(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level or ▁-spelled, as stored), not its decoded text."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    # -- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.source} has no chat template")
        specials = {k: v for k, v in (("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v is not None}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token,
                                    template_name=f"chat template of {self.source}", **{**specials, **extra})

    def encode_chat(self, messages: list[dict], **extra) -> list[int]:
        # The template writes BOS itself when the model wants one, so nothing more is added (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True, **extra),
                           add_special_tokens=False)

    def __repr__(self):
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})")


def _add_config_tokens(backend, cfg, path):
    """tokenizer_config.json's added_tokens_decoder: tokens appended after a tokenizer.model's vocabulary."""
    table = cfg.get("added_tokens_decoder") or {}
    if not isinstance(table, dict):
        raise TokenizerError(f"{path}: field 'added_tokens_decoder' must be an object")
    for key in sorted(table, key=lambda k: int(k) if str(k).isdigit() else -1):
        entry = table[key]
        if not str(key).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{path}: bad added_tokens_decoder entry {key!r}")
        content, want = entry["content"], int(key)
        token = AddedToken(content, special=bool(entry.get("special", False)), normalized=False,
                           lstrip=bool(entry.get("lstrip")), rstrip=bool(entry.get("rstrip")),
                           single_word=bool(entry.get("single_word")))
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if backend.token_to_id(content) != want:
            raise TokenizerError(f"{path}: added token {content!r} would get id {backend.token_to_id(content)}, "
                                 f"not {want} as added_tokens_decoder says")


# ---------------------------------------------------------------------------------------- streaming detokenizer

class IncrementalDecoder:
    """Turns generated ids into text one token at a time.

    Each step decodes only a short window: the ids of the previously emitted chunk plus those not yet emitted, and
    returns what the window added beyond that chunk (vLLM's scheme). Text is held back while the window ends in an
    incomplete UTF-8 character (U+FFFD), so no delta holds half a character; `flush()` releases that remainder at the
    end (what `decode` shows as U+FFFD). The deltas, flush included, concatenate to `tokenizer.decode(ids)` exactly
    for any valid UTF-8 output. The one exception: in SentencePiece byte-fallback vocabularies a run of <0xNN> tokens
    that is not valid UTF-8 is decoded (by transformers and us) as one U+FFFD per byte token for the whole run, so
    when a model emits such garbage after a complete character of the same run, `text` keeps that character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._start = 0  # first id of the last emitted chunk
        self._read = 0  # ids before this are in `text`
        self._chunk_text = ""  # decode(ids[_start:_read]): the window's text that was already emitted

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Text held back at the end of generation (possibly ending in U+FFFD, exactly as decode shows it)."""
        return self._emit(final=True) if self._read < len(self.ids) else ""

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        window = decode(self.ids[self._start:], self.skip_special_tokens)
        if not final and (len(window) <= len(self._chunk_text) or window.endswith("\ufffd")):
            return ""
        delta = window[len(self._chunk_text):]
        self._start, self._read = self._read, len(self.ids)
        self._chunk_text = decode(self.ids[self._start:self._read], self.skip_special_tokens)
        self.text += delta
        return delta
