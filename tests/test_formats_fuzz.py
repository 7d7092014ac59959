"""Hostile-input tests for the hand-written safetensors / GGUF / index / config readers.

A small valid safetensors file and a small valid GGUF are mutated a few hundred times (seeded truncations,
bit flips in the header, targeted edits of every header field); every open must either succeed (and then
every tensor must be readable) or raise `FormatError` / `CheckpointError` / `ConfigError` -- never another
exception type, never take more than a couple of seconds, never allocate more than 50 MB.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import tracemalloc

import numpy as np
import pytest

from mpillm.checkpoint import CheckpointError, open_checkpoint
from mpillm.config import ConfigError
from mpillm.formats import FormatError, GGUFFile, SafetensorsFile, dequantize

ALLOWED = (FormatError, CheckpointError, ConfigError)
CASE_SECONDS = 2.0
PEAK_BYTES = 50 << 20


class CaseTimeout(BaseException):
    pass


@contextlib.contextmanager
def bounded():
    """Fail (not hang) a case after CASE_SECONDS; measure the traced allocation peak of the case."""
    def on_alarm(signum, frame):
        raise CaseTimeout()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    box = {}
    try:
        yield box
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        box["peak"] = tracemalloc.get_traced_memory()[1] - base


@pytest.fixture(scope="module", autouse=True)
def _tracemalloc():
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


class Checker:
    """Runs cases, records every violation; the test asserts the list is empty at the end."""

    def __init__(self, tmp_path):
        self.tmp, self.n, self.bad, self.outcomes = tmp_path, 0, [], {"ok": 0, "refused": 0}

    def run(self, label, fn):
        self.n += 1
        err = None
        try:
            with bounded() as box, np.errstate(all="ignore"):   # random bytes decode to NaN/inf: fine
                fn()
        except CaseTimeout:
            err = f"took more than {CASE_SECONDS}s"
        except ALLOWED as e:
            self.outcomes["refused"] += 1
            if not str(e):
                err = f"{type(e).__name__} with an empty message"
        except BaseException as e:  # noqa: anything else is the finding
            err = f"{type(e).__name__}: {str(e)[:160]}"
        else:
            self.outcomes["ok"] += 1
        if err is None and box.get("peak", 0) > PEAK_BYTES:
            err = f"allocated {box['peak'] >> 20} MB"
        if err:
            self.bad.append(f"{label}: {err}")

    def file(self, name, data: bytes):
        p = self.tmp / f"{self.n:04d}-{name}"
        p.write_bytes(data)
        return p

    def check(self, min_cases, min_refused=1):
        assert not self.bad, f"{len(self.bad)} of {self.n} cases misbehaved:\n" + "\n".join(self.bad[:40])
        assert self.n >= min_cases
        assert self.outcomes["refused"] >= min_refused, self.outcomes


# ------------------------------------------------------------------------------------------- safetensors

ST_TENSORS = [("model.embed_tokens.weight", "F32", [2, 3]), ("model.norm.weight", "F16", [4]),
              ("lm_head.weight", "BF16", [2, 2])]
ITEM = {"F32": 4, "F16": 2, "BF16": 2}


def st_header():
    h, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape in ST_TENSORS:
        n = int(np.prod(shape)) * ITEM[dt]
        h[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    return h, off


def st_bytes(header, data_len=None, hlen=None, raw_header: bytes | None = None, seed=0):
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    if data_len is None:
        data_len = st_header()[1]
    data = np.random.RandomState(seed).randint(0, 256, data_len, dtype=np.uint8).tobytes()
    return struct.pack("<Q", len(hb) if hlen is None else hlen) + hb + data


ST_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 3, "intermediate_size": 4,
             "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2,
             "vocab_size": 2, "max_position_embeddings": 16}


def open_st(chk: Checker, label: str, data: bytes):
    """The file directly (FormatError) and as a model directory (CheckpointError); read every tensor."""
    d = chk.tmp / f"{chk.n:04d}-dir"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ST_CONFIG))
    (d / "model.safetensors").write_bytes(data)

    def direct():
        f = SafetensorsFile(str(d / "model.safetensors"))
        for name in f.tensors:
            f.array(name).sum()

    def via_checkpoint():
        ck = open_checkpoint(d)
        for name in ck.where:
            ck.load(name)
            if len(ck.shape(name)) == 2:
                ck.load(name, rows=slice(0, 1), cols=slice(0, 1))

    chk.run(label + " [file]", direct)
    chk.run(label + " [dir]", via_checkpoint)


def test_safetensors_baseline_is_valid(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ST_CONFIG))
    (d / "model.safetensors").write_bytes(st_bytes(st_header()[0]))
    f = SafetensorsFile(str(d / "model.safetensors"))
    assert set(f.tensors) == {n for n, _, _ in ST_TENSORS} and f.metadata == {"format": "pt"}
    ck = open_checkpoint(d)
    assert ck.load("lm_head.weight").shape == (2, 2)


def _st_edits():
    """(label, header dict or raw header bytes, kwargs) targeted edits."""
    E = "model.embed_tokens.weight"
    out = []

    def edit(label, fn, **kw):
        h, _ = st_header()
        h = json.loads(json.dumps(h))
        fn(h)
        out.append((label, h, kw))

    def entry(field, value):
        return lambda h: h[E].__setitem__(field, value)

    for v in ([-1, 24], [0, 2 ** 70], [24, 0], [0, 23], [0, 25], [4, 28], [8, 32], ["0", 24], [0], [0, 24, 48],
              None, [0.0, 24.0], [True, 24], {}, [0, -24], [2 ** 64, 2 ** 64 + 24]):
        edit(f"data_offsets={v!r}", entry("data_offsets", v))
    edit("overlapping ranges", lambda h: h["model.norm.weight"].__setitem__("data_offsets", [16, 24]))
    edit("gap between ranges", lambda h: (h["model.norm.weight"].__setitem__("data_offsets", [26, 34])))
    for v in ("F33", "f32", "", None, 5, ["F32"], {"F32": 1}, "I64", "U8", "BOOL", "F64"):
        edit(f"dtype={v!r}", entry("dtype", v))
    for v in ([2, 4], [3, 2], [6], [], [-2, -3], [2 ** 40, 2 ** 40], [2.0, 3], "23", [True, 3], [1] * 9,
              [[2], 3], None, [0, 3], [2 ** 63, 0]):
        edit(f"shape={v!r}", entry("shape", v))
    edit("extra entry key", entry("extra", 1))
    edit("missing data_offsets", lambda h: h[E].pop("data_offsets"))
    edit("entry is a list", lambda h: h.__setitem__(E, [1, 2, 3]))
    edit("entry is a string", lambda h: h.__setitem__(E, "F32"))
    edit("__metadata__ a list", lambda h: h.__setitem__("__metadata__", [1]))
    edit("__metadata__ a string", lambda h: h.__setitem__("__metadata__", "x"))
    edit("__metadata__ nested", lambda h: h.__setitem__("__metadata__", {"a": {"b": [1, 2]}}))
    edit("no tensors", lambda h: [h.pop(n) for n, _, _ in ST_TENSORS], data_len=0)
    edit("no tensors, data left", lambda h: [h.pop(n) for n, _, _ in ST_TENSORS])
    edit("trailing data", lambda h: None, data_len=st_header()[1] + 7)
    edit("short data", lambda h: None, data_len=st_header()[1] - 1)
    edit("empty tensor", lambda h: h.__setitem__("z", {"dtype": "F32", "shape": [0, 5], "data_offsets": [40, 40]}))
    good = json.dumps(st_header()[0]).encode()
    n = len(good)
    raw = [
        ("header length 0", good, {"hlen": 0}),
        ("header length huge", good, {"hlen": 2 ** 63}),
        ("header length max", good, {"hlen": 2 ** 64 - 1}),
        ("header length +1", good, {"hlen": n + 1}),
        ("header length -1", good, {"hlen": n - 1}),
        ("header length = file", good, {"hlen": n + 40}),
        ("header length past file", good, {"hlen": n + 41}),
        ("header is a list", b"[1, 2, 3]", {}),
        ("header is a string", b'"abc"', {}),
        ("header is null", b"null", {}),
        ("header empty object", b"{}", {"data_len": 0}),
        ("header not JSON", b"{not json", {}),
        ("header invalid utf-8", b'{"\xff\xfe": 1}', {}),
        ("header NUL padded", good[:-1] + b"}" + b"\0" * 8, {}),
        ("header space padded", good + b"        ", {}),
        ("duplicate tensor key", good[:-1] + b', "model.norm.weight": {"dtype": "F16", "shape": [4], '
                                              b'"data_offsets": [24, 32]}}', {}),
        ("duplicate inner key", good.replace(b'"dtype": "F32"', b'"dtype": "F32", "dtype": "F16"'), {}),
        ("NaN offset", good.replace(b"[0, 24]", b"[NaN, 24]"), {}),
        ("Infinity offset", good.replace(b"[0, 24]", b"[0, Infinity]"), {}),
        ("1e999 offset", good.replace(b"[0, 24]", b"[0, 1e999]"), {}),
        ("5000-digit offset", good.replace(b"[0, 24]", b"[0, " + b"9" * 5000 + b"]"), {}),
        ("deeply nested header", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
        ("deeply nested metadata", good.replace(b'{"format": "pt"}', b"[" * 50_000 + b"]" * 50_000), {}),
    ]
    out += [(label, hb, kw) for label, hb, kw in raw]
    return out


def test_safetensors_targeted_edits(tmp_path):
    chk = Checker(tmp_path)
    for label, header, kw in _st_edits():
        if isinstance(header, bytes):
            data = st_bytes(None, raw_header=header, **kw)
        else:
            data = st_bytes(header, **kw)
        open_st(chk, label, data)
    chk.check(min_cases=100, min_refused=50)


def test_safetensors_random_truncation_and_bitflips(tmp_path):
    chk = Checker(tmp_path)
    rnd = random.Random(1234)
    good = st_bytes(st_header()[0])
    hend = 8 + struct.unpack_from("<Q", good)[0]
    cuts = sorted({0, 1, 7, 8, 9, hend - 1, hend, hend + 1, len(good) - 1} | {rnd.randrange(len(good)) for _ in range(30)})
    for c in cuts:
        open_st(chk, f"truncated at {c}", good[:c])
    for i in range(80):
        b = bytearray(good)
        for _ in range(rnd.choice((1, 1, 2, 3))):
            pos = rnd.randrange(hend)
            b[pos] ^= 1 << rnd.randrange(8)
        open_st(chk, f"bitflip #{i}", bytes(b))
    for i in range(5):                               # flips in the data section: must still open
        b = bytearray(good)
        b[rnd.randrange(hend, len(good))] ^= 0xFF
        open_st(chk, f"data flip #{i}", bytes(b))
    chk.check(min_cases=200, min_refused=60)
    assert chk.outcomes["ok"] >= 10


# ------------------------------------------------------------------------------------------------- GGUF

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def gstr(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode()
    return struct.pack("<Q", len(b)) + b


def gkv(key, vtype, value) -> bytes:
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}
    if vtype == STR:
        payload = gstr(value)
    elif vtype == ARR:
        etype, items = value
        payload = struct.pack("<IQ", etype, len(items)) + b"".join(
            gstr(x) if etype == STR else struct.pack(fmt[etype], x) for x in items)
    else:
        payload = struct.pack(fmt[vtype], value)
    return gstr(key) + struct.pack("<I", vtype) + payload


GGUF_META = [("general.architecture", STR, "llama"), ("llama.block_count", U32, 1),
             ("llama.embedding_length", U32, 32), ("llama.feed_forward_length", U32, 64),
             ("llama.attention.head_count", U32, 2), ("llama.attention.head_count_kv", U32, 1),
             ("llama.context_length", U32, 128), ("llama.rope.freq_base", F32, 10000.0),
             ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
             ("tokenizer.ggml.tokens", ARR, (STR, ["<s>", "</s>", "a", "b"])),
             ("tokenizer.ggml.scores", ARR, (F32, [0.0, 0.0, -1.0, -2.0])),
             ("tokenizer.ggml.eos_token_id", U32, 1)]
# name, dims (ggml order: ne0 first), type id, nbytes
GGUF_TENSORS = [("token_embd.weight", [32, 4], 0, 512), ("blk.0.attn_q.weight", [32, 32], 8, 32 * 34),
                ("blk.0.attn_norm.weight", [32], 1, 64), ("output.weight", [32, 4], 2, 4 * 18),
                ("blk.0.ffn_up.weight", [32, 64], 3, 64 * 20), ("x.bf16", [8], 30, 16)]


def gguf_bytes(magic=b"GGUF", version=3, meta=None, tensors=None, n_tensors=None, n_kv=None, align=32,
               raw_meta: bytes | None = None, raw_infos: bytes | None = None, data_pad=0, seed=0):
    meta = GGUF_META if meta is None else meta
    kv = raw_meta if raw_meta is not None else b"".join(gkv(*m) for m in meta)
    tensors = GGUF_TENSORS if tensors is None else tensors
    infos, off, layout = b"", 0, []
    for t in tensors:
        name, dims, ttype, nbytes = t[:4]
        offset = t[4] if len(t) > 4 else off
        infos += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ttype, offset)
        layout.append((offset, nbytes))
        base = offset if offset + nbytes < 1 << 20 else off
        off = (base + nbytes + align - 1) // align * align
    if raw_infos is not None:
        infos = raw_infos
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(meta) if n_kv is None else n_kv) + kv + infos
    head += b"\0" * ((-len(head)) % align)
    rs = np.random.RandomState(seed)
    end = max([o + n for o, n in layout if o + n < 1 << 20], default=0)   # absurd offsets get no data
    data = rs.randint(0, 256, end + data_pad, dtype=np.uint8).tobytes()
    return head + data


def open_gguf(chk: Checker, label: str, data: bytes):
    p = chk.file("m.gguf", data)

    def direct():
        f = GGUFFile(str(p))
        for name, t in f.tensors.items():
            dequantize(f.raw(name), t.dtype)

    def via_checkpoint():
        ck = open_checkpoint(p)
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                     "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"):
            if ck.has(name):
                ck.load(name)
                ck.quantized(name)
                ck.shape(name)

    chk.run(label + " [file]", direct)
    chk.run(label + " [ckpt]", via_checkpoint)


def test_gguf_baseline_is_valid(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(gguf_bytes())
    import gguf
    r = gguf.GGUFReader(str(p))                      # the reference parser accepts our hand-built file
    assert len(r.tensors) == len(GGUF_TENSORS)
    f = GGUFFile(str(p))
    assert {n: t.dtype for n, t in f.tensors.items()} == {
        "token_embd.weight": "F32", "blk.0.attn_q.weight": "Q8_0", "blk.0.attn_norm.weight": "F16",
        "output.weight": "Q4_0", "blk.0.ffn_up.weight": "Q4_1", "x.bf16": "BF16"}
    for t in r.tensors:
        assert f.tensors[t.name].offset == t.data_offset
    ck = open_checkpoint(p)
    assert ck.config.num_heads == 2 and ck.config.vocab_size == 4
    assert ck.load("model.layers.0.self_attn.q_proj.weight").shape == (32, 32)


def _gguf_edits():
    out = []
    T = GGUF_TENSORS

    def add(label, **kw):
        out.append((label, kw))

    def tensors_with(i, **chg):
        ts = [list(t) for t in T]
        name, dims, ttype, nbytes = ts[i]
        t = {"name": name, "dims": dims, "ttype": ttype, "nbytes": nbytes, **chg}
        ts[i] = [t["name"], t["dims"], t["ttype"], t["nbytes"]] + ([t["offset"]] if "offset" in t else [])
        return [tuple(x) for x in ts]

    for magic in (b"GGUG", b"\0\0\0\0", b"FUGG", b"ggml"):
        add(f"magic {magic!r}", magic=magic)
    for v in (0, 1, 2, 4, 99, 2 ** 32 - 1):
        add(f"version {v}", version=v)
    for n in (0, len(T) - 1, len(T) + 1, 10 ** 6, 2 ** 40, 2 ** 63, 2 ** 64 - 1):
        add(f"n_tensors {n}", n_tensors=n)
    for n in (0, len(GGUF_META) - 1, len(GGUF_META) + 1, 10 ** 7, 2 ** 63, 2 ** 64 - 1):
        add(f"n_kv {n}", n_kv=n)
    # string lengths: key, string value, tensor name
    first = gkv(*GGUF_META[0])
    for n in (2 ** 64 - 1, 2 ** 63, 10 ** 9, len(first) + 10_000):
        add(f"key length {n}", raw_meta=struct.pack("<Q", n) + first[8:] + b"".join(gkv(*m) for m in GGUF_META[1:]))
        add(f"string value length {n}", raw_meta=first[:-5 - 8] + struct.pack("<Q", n) + b"llama"
            + b"".join(gkv(*m) for m in GGUF_META[1:]))
        add(f"tensor name length {n}", raw_infos=struct.pack("<Q", n) + b"token_embd.weight")
    add("key not utf-8", meta=GGUF_META + [(b"\xff\xfe".decode("latin-1"), U8, 1)],
        raw_meta=b"".join(gkv(*m) for m in GGUF_META) + gstr(b"\xff\xfe") + struct.pack("<IB", U8, 1),
        n_kv=len(GGUF_META) + 1)
    add("tensor name not utf-8", tensors=[(b"\xc3\x28".decode("latin-1"), [8], 0, 32)],
        raw_infos=gstr(b"\xc3\x28") + struct.pack("<IQIQ", 1, 8, 0, 0))
    for vt in (13, 99, 2 ** 32 - 1):
        add(f"value type {vt}", raw_meta=gstr("general.architecture") + struct.pack("<I", vt) + b"\0" * 16,
            n_kv=1)
    for et, cnt in ((13, 1), (ARR, 1), (U32, 2 ** 62), (U64, 2 ** 61), (STR, 2 ** 61), (STR, 10 ** 6), (U8, 2 ** 64 - 1)):
        add(f"array etype {et} count {cnt}", raw_meta=gkv("general.architecture", STR, "llama")
            + gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, et, cnt) + b"\0" * 64, n_kv=2)
    add("array string item length huge", raw_meta=gkv("general.architecture", STR, "llama")
        + gstr("tokenizer.ggml.tokens") + struct.pack("<IIQQ", ARR, STR, 2, 2 ** 62) + b"\0" * 32, n_kv=2)
    add("duplicate key", meta=GGUF_META + [GGUF_META[1]])
    add("duplicate tensor", tensors=T + [T[0]])
    for nd in (0, 5, 2 ** 32 - 1):
        dims = [4] * min(nd, 6)
        add(f"ndim {nd}", raw_infos=gstr("token_embd.weight") + struct.pack("<I", nd)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", 0, 0))
    for dims in ([0, 4], [32, 0], [2 ** 63, 2], [2 ** 40, 2 ** 40], [2 ** 64 - 1], [33, 32], [31, 32], [32, 4, 1, 1]):
        add(f"q8 dims {dims}", tensors=tensors_with(1, dims=dims))
    for tt in (4, 6, 7, 9, 10, 12, 99, 2 ** 32 - 1, 31):
        add(f"type id {tt}", tensors=tensors_with(0, ttype=tt))
    add("declared type F16 for F32 bytes", tensors=tensors_with(0, ttype=1))
    for a in (3, 0, 1, 2 ** 17, 2 ** 31):
        add(f"alignment {a}", meta=GGUF_META + [("general.alignment", U32, a)])
    add("alignment u64 2^40", meta=GGUF_META + [("general.alignment", U64, 2 ** 40)])
    add("alignment -32", meta=GGUF_META + [("general.alignment", I32, -32)])
    add("alignment float", meta=GGUF_META + [("general.alignment", F32, 32.0)])
    add("alignment string", meta=GGUF_META + [("general.alignment", STR, "32")])
    add("alignment bool", meta=GGUF_META + [("general.alignment", BOOL, True)])
    add("alignment array", meta=GGUF_META + [("general.alignment", ARR, (U32, [32]))])
    add("alignment 64 (valid)", meta=GGUF_META + [("general.alignment", U32, 64)], align=64)
    for off in (1, 16, 2 ** 40, 2 ** 64 - 32, 10 ** 6):
        add(f"offset {off}", tensors=tensors_with(1, offset=off))
    add("overlapping offsets", tensors=tensors_with(2, offset=0))
    add("offset = last byte", tensors=tensors_with(5, offset=4096))
    add("data short by 1", data_pad=-1)
    add("data padded", data_pad=100)
    return out


# config-level metadata edits: the file is fine, the model description is not
def _gguf_meta_edits():
    out = []

    def meta_with(key, vtype, value):
        return [x for x in GGUF_META if x[0] != key] + [(key, vtype, value)]

    def meta_without(key):
        return [x for x in GGUF_META if x[0] != key]

    for key in ("llama.attention.head_count", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count_kv", "llama.context_length"):
        for vt, v in ((U32, 0), (I32, -4), (STR, "abc"), (F32, 2.5), (ARR, (U32, [2])), (U64, 2 ** 63),
                      (BOOL, True), (F32, float("nan"))):
            out.append((f"{key}={v!r} ({vt})", meta_with(key, vt, v)))
        out.append((f"{key} missing", meta_without(key)))
    out.append(("head_count 3 (32 not divisible)", meta_with("llama.attention.head_count", U32, 3)))
    out.append(("head_count_kv 3 of 2", meta_with("llama.attention.head_count_kv", U32, 3)))
    out.append(("key_length 0", meta_with("llama.attention.key_length", U32, 0)))
    out.append(("key_length 7", meta_with("llama.attention.key_length", U32, 7)))
    out.append(("key_length string", meta_with("llama.attention.key_length", STR, "x")))
    for key in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
        for vt, v in ((STR, "x"), (F32, float("nan")), (F32, -1.0), (ARR, (F32, [1.0]))):
            out.append((f"{key}={v!r}", meta_with(key, vt, v)))
    for vt, v in ((U32, 3), (STR, "gpt2"), (STR, ""), (ARR, (STR, ["llama"])), (STR, "qwen2")):
        out.append((f"architecture={v!r}", meta_with("general.architecture", vt, v)))
    out.append(("architecture missing", meta_without("general.architecture")))
    for vt, v in ((STR, "yarn"), (U32, 1), (STR, "linear"), (ARR, (STR, ["linear"]))):
        out.append((f"rope.scaling.type={v!r}", meta_with("llama.rope.scaling.type", vt, v)))
    out.append(("rope.scaling.factor string", meta_with("llama.rope.scaling.type", STR, "linear")
                + [("llama.rope.scaling.factor", STR, "x")]))
    out.append(("vocab_size string", meta_with("llama.vocab_size", STR, "x")))
    out.append(("vocab_size 0", meta_with("llama.vocab_size", U32, 0)))
    out.append(("eos id string", meta_with("tokenizer.ggml.eos_token_id", STR, "x")))
    out.append(("eos id array", meta_with("tokenizer.ggml.eos_token_id", ARR, (U32, [1]))))
    out.append(("general.name array", meta_with("general.name", ARR, (U32, [1, 2]))))
    return out


def test_gguf_targeted_edits(tmp_path):
    chk = Checker(tmp_path)
    for label, kw in _gguf_edits():
        open_gguf(chk, label, gguf_bytes(**kw))
    chk.check(min_cases=150, min_refused=100)


def test_gguf_metadata_edits(tmp_path):
    chk = Checker(tmp_path)
    for label, meta in _gguf_meta_edits():
        open_gguf(chk, label, gguf_bytes(meta=meta))
    chk.check(min_cases=100, min_refused=50)


def test_gguf_random_truncation_and_bitflips(tmp_path):
    chk = Checker(tmp_path)
    rnd = random.Random(4321)
    good = gguf_bytes()
    hend = good.index(b"x.bf16") + len("x.bf16") + 4 + 8 + 4 + 8      # end of the last tensor info
    cuts = sorted({0, 3, 4, 8, 16, 24, hend - 1, hend, len(good) - 1} | {rnd.randrange(len(good)) for _ in range(40)})
    for c in cuts:
        open_gguf(chk, f"truncated at {c}", good[:c])
    for i in range(100):
        b = bytearray(good)
        for _ in range(rnd.choice((1, 1, 2, 4))):
            pos = rnd.randrange(hend)
            b[pos] ^= 1 << rnd.randrange(8)
        open_gguf(chk, f"bitflip #{i}", bytes(b))
    for i in range(30):                           # random bytes written over a random 8-byte field
        b = bytearray(good)
        pos = rnd.randrange(24, hend - 8)
        b[pos:pos + 8] = rnd.choice([b"\xff" * 8, b"\0" * 8, struct.pack("<Q", rnd.getrandbits(64)),
                                     struct.pack("<Q", rnd.randrange(1, 4096))])
        open_gguf(chk, f"field overwrite #{i} at {pos}", bytes(b))
    chk.check(min_cases=300, min_refused=150)
    assert chk.outcomes["ok"] >= 5


# ---------------------------------------------------------------------------------------- sharded index

def _sharded(tmp_path, weight_map, files=None, index_text=None):
    d = tmp_path
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(ST_CONFIG))
    files = files if files is not None else {"model-00001.safetensors": st_bytes(st_header()[0])}
    for name, data in files.items():
        (d / name).write_bytes(data)
    text = index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    (d / "model.safetensors.index.json").write_text(text)
    return d


def _wm(fname="model-00001.safetensors"):
    return {n: fname for n, _, _ in ST_TENSORS}


def test_sharded_index_valid(tmp_path):
    ck = open_checkpoint(_sharded(tmp_path / "ok", _wm()))
    assert set(ck.where) == {n for n, _, _ in ST_TENSORS}
    assert ck.load("model.embed_tokens.weight").shape == (2, 3)


@pytest.mark.parametrize("target", ["../x.safetensors", "../ok/model-00001.safetensors", "/tmp/x.safetensors",
                                    "sub/model-00001.safetensors", "..\\x.safetensors", "..", ".", "",
                                    "C:\\x.safetensors"])
def test_sharded_index_path_escape_refused(tmp_path, target):
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(st_bytes(st_header()[0]))
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "model-00001.safetensors").write_bytes(st_bytes(st_header()[0]))
    wm = _wm()
    wm["lm_head.weight"] = target
    d = _sharded(tmp_path / "m", wm, files={"model-00001.safetensors": st_bytes(st_header()[0])})
    (d / "sub").mkdir()
    (d / "sub" / "model-00001.safetensors").write_bytes(st_bytes(st_header()[0]))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    assert "weight_map" in str(e.value) or "missing" in str(e.value)


def test_sharded_index_symlink_out_of_dir_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(st_bytes(st_header()[0]))
    d = _sharded(tmp_path / "m", _wm("link.safetensors"), files={})
    os.symlink(outside / "x.safetensors", d / "link.safetensors")
    with pytest.raises(CheckpointError, match="leaves the model directory"):
        open_checkpoint(d)


def test_sharded_index_tensor_missing_from_file(tmp_path):
    wm = _wm()
    wm["model.layers.0.self_attn.q_proj.weight"] = "model-00001.safetensors"
    with pytest.raises(CheckpointError, match="q_proj") as e:
        open_checkpoint(_sharded(tmp_path, wm))
    assert "does not hold" in str(e.value)


def test_sharded_index_missing_file(tmp_path):
    wm = _wm()
    wm["lm_head.weight"] = "model-00002.safetensors"
    with pytest.raises(CheckpointError, match="model-00002"):
        open_checkpoint(_sharded(tmp_path, wm))


def test_sharded_index_malformed(tmp_path):
    chk = Checker(tmp_path)
    good = json.dumps({"weight_map": _wm()})
    texts = {
        "not json": "{", "list": "[1]", "no weight_map": "{}", "weight_map list": '{"weight_map": [1]}',
        "weight_map empty": '{"weight_map": {}}', "weight_map null": '{"weight_map": null}',
        "value int": json.dumps({"weight_map": {"lm_head.weight": 3}}),
        "value list": json.dumps({"weight_map": {"lm_head.weight": ["a"]}}),
        "value null": json.dumps({"weight_map": {"lm_head.weight": None}}),
        "duplicate tensor key": good[:-2] + ', "lm_head.weight": "model-00001.safetensors"}}',
        "duplicate weight_map": '{"weight_map": {"a": "b"}, ' + good[1:],
        "NUL in name": json.dumps({"weight_map": {"lm_head.weight": "model\u0000.safetensors"}}),
        "5000-digit number": '{"x": ' + "7" * 5000 + ', "weight_map": ' + json.dumps(_wm()) + "}",
        "deeply nested": '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "invalid utf-8": None,
    }
    for label, text in texts.items():
        d = chk.tmp / f"idx-{len(os.listdir(chk.tmp))}"
        if text is None:
            _sharded(d, _wm())
            (d / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "x"}}')
        else:
            _sharded(d, None, index_text=text)

        def refused(d=d):
            open_checkpoint(d)
            raise AssertionError("opened")
        chk.run(label, refused)
    assert not chk.bad, "\n".join(chk.bad)
    assert chk.outcomes["refused"] == len(texts)


# ----------------------------------------------------------------------------------------- config.json

def test_config_json_malformed(tmp_path):
    """config.json is user input too: bad types and shapes must give CheckpointError, not a Python error."""
    chk = Checker(tmp_path)
    edits = {
        "hidden_size string": {"hidden_size": "3"}, "heads 0": {"num_attention_heads": 0},
        "heads string": {"num_attention_heads": "1"}, "kv heads 0": {"num_key_value_heads": 0},
        "eps string": {"rms_norm_eps": "x"}, "eps list": {"rms_norm_eps": [1]},
        "theta string": {"rope_theta": "x"}, "architectures nested list": {"architectures": [["LlamaForCausalLM"]]},
        "architectures dict item": {"architectures": [{"a": 1}]}, "architectures string": {"architectures": "Llama"},
        "rope_scaling list": {"rope_scaling": [1, 2]}, "rope_scaling string": {"rope_scaling": "linear"},
        "rope_parameters list": {"rope_parameters": [1]},
        "rope_type list": {"rope_scaling": {"rope_type": ["linear"], "factor": 2.0}},
        "eos string": {"eos_token_id": "x"}, "layers float": {"num_hidden_layers": 1.5},
        "sliding_window string": {"architectures": ["MistralForCausalLM"], "sliding_window": "x"},
        "head_dim odd": {"head_dim": 3}, "vocab negative": {"vocab_size": -1},
    }
    for label, edit in edits.items():
        d = chk.tmp / f"cfg-{len(os.listdir(chk.tmp))}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(ST_CONFIG, **edit)))
        (d / "model.safetensors").write_bytes(st_bytes(st_header()[0]))
        chk.run(label, lambda d=d: open_checkpoint(d))
    for label, raw in (("deeply nested", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                       ("5000-digit number", '{"a": ' + "1" * 5000 + "}"), ("invalid utf-8", None)):
        d = chk.tmp / f"cfg-{len(os.listdir(chk.tmp))}"
        d.mkdir()
        if raw is None:
            (d / "config.json").write_bytes(b'{"\xff": 1}')
        else:
            (d / "config.json").write_text(raw)
        (d / "model.safetensors").write_bytes(st_bytes(st_header()[0]))
        chk.run(label, lambda d=d: open_checkpoint(d))
    assert not chk.bad, f"{len(chk.bad)} of {chk.n}:\n" + "\n".join(chk.bad)
