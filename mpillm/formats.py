"""Bounded readers for the two weight formats we accept: safetensors and GGUF.

Both are parsed by hand rather than trusted to a library, because a model file is user input: every length,
count, offset and size is checked against the bytes actually present before anything is allocated, so a
truncated or hostile file gives a `FormatError` naming the file and field, never a crash, a hang or a huge
allocation. Tensor data stays memory-mapped; nothing is read until a caller asks for a tensor (or a slice).
Pickle checkpoints (`.bin`, `.pt`) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np


class FormatError(ValueError):
    pass


MAX_HEADER_BYTES = 100 << 20      # safetensors JSON header; real ones are a few MB at most
MAX_TENSORS = 1 << 20

# ----------------------------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {  # name -> (numpy storage dtype, itemsize); bf16 is stored as uint16 and widened on load
    "F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
    "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
    "U8": (np.uint8, 1), "BOOL": (np.bool_, 1),
}


@dataclass
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype name, or GGML type name for GGUF ("F32", "Q4_1", ...)
    shape: tuple        # numpy order: a linear weight is [out_features, in_features]
    offset: int         # absolute byte offset in the file
    nbytes: int


def no_duplicate_keys(pairs):
    """json.loads object_pairs_hook: a key given twice is an error (the last one would silently win)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _map(path: str):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError(f"{path}: empty file")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = str(path)
        self.mm, size = _map(self.path)
        where = self.path
        if size < 8:
            raise FormatError(f"{where}: file too short for a safetensors header ({size} bytes)")
        (n,) = struct.unpack_from("<Q", self.mm, 0)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise FormatError(f"{where}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit")
        try:
            header = json.loads(bytes(self.mm[8:8 + n]).decode("utf-8"), object_pairs_hook=no_duplicate_keys)
        except (ValueError, RecursionError) as e:   # bad UTF-8/JSON, duplicate keys, absurd nesting or numbers
            raise FormatError(f"{where}: header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise FormatError(f"{where}: header must be a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise FormatError(f"{where}: '__metadata__' must be an object")
        if len(header) > MAX_TENSORS:
            raise FormatError(f"{where}: {len(header)} tensors exceeds the limit of {MAX_TENSORS}")
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, e in header.items():
            field = f"{where}: tensor {name!r}"
            if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
                raise FormatError(f"{field}: entry must have exactly 'dtype', 'shape' and 'data_offsets'")
            if not isinstance(e["dtype"], str) or e["dtype"] not in SAFETENSORS_DTYPES:
                raise FormatError(f"{field}: unknown dtype {e['dtype']!r}")
            shape = e["shape"]
            if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
                raise FormatError(f"{field}: bad shape {shape!r}")
            offs = e["data_offsets"]
            if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                    and 0 <= offs[0] <= offs[1] <= data_len):
                raise FormatError(f"{field}: data_offsets {offs!r} outside the data section ({data_len} bytes)")
            expect = int(np.prod(shape, dtype=object)) * SAFETENSORS_DTYPES[e["dtype"]][1]
            if offs[1] - offs[0] != expect:
                raise FormatError(f"{field}: byte range {offs[1] - offs[0]} does not match shape {shape} x {e['dtype']} = {expect}")
            spans.append((offs[0], offs[1], name))
            self.tensors[name] = TensorInfo(name, e["dtype"], tuple(shape), data_start + offs[0], expect)
        pos = 0
        for begin, end, name in sorted(spans):
            if begin != pos:
                raise FormatError(f"{where}: tensor {name!r} starts at {begin}, expected {pos} (ranges must be contiguous and non-overlapping)")
            pos = end
        if pos != data_len:
            raise FormatError(f"{where}: tensors cover {pos} bytes of a {data_len}-byte data section")

    def array(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only memory-mapped array (bf16 as uint16)."""
        t = self.tensors[name]
        dt = SAFETENSORS_DTYPES[t.dtype][0]
        return np.frombuffer(self.mm, dtype=dt, count=t.nbytes // np.dtype(dt).itemsize, offset=t.offset).reshape(t.shape)


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(a)
    return a.astype(np.float32)


# ----------------------------------------------------------------------------------------------------- GGUF

GGUF_MAGIC = b"GGUF"
GGML_TYPES = {  # type id -> (name, elements per block, bytes per block) for the types we can load
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2),
    # The types of llama.cpp's usual quantizations (Q4_K_M, Q5_K_S, Q6_K, IQ4_XS, ...) that are not Q8_0/Q4_0/Q4_1:
    # they load as float, decoded by the `gguf` package (GGUF_DECODED); but for Q4_K under --quantize auto on the
    # GPU, whose blocks are repacked into Q4_1's form (mpillm.quant.q4_1_form).
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 20: ("IQ4_NL", 32, 18),
    23: ("IQ4_XS", 256, 136),
}
GGUF_DECODED = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
DECODE_CHUNK_ELEMS = 1 << 24  # GGUF_DECODED tensors decode this many weights at a time (dequantize)
GGML_TYPE_IDS = {v[0]: k for k, v in GGML_TYPES.items()}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
               7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _Cursor:
    def __init__(self, buf, size: int, where: str):
        self.buf, self.size, self.pos, self.where = buf, size, 0, where

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.where}: {what} needs {n} bytes at offset {self.pos}, file has {self.size}")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.where}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            if depth:
                raise FormatError(f"{self.where}: {what}: nested arrays are not supported")
            etype = self.scalar("<I", what + " element type")
            count = self.scalar("<Q", what + " element count")
            if etype in _NP_SCALARS:
                item = np.dtype(_NP_SCALARS[etype]).itemsize
                self.need(count * item, what)
                arr = np.frombuffer(self.buf, dtype=_NP_SCALARS[etype], count=count, offset=self.pos)
                self.pos += count * item
                return arr.tolist()
            if etype == 8:
                # Each string takes at least its 8-byte length: bounds the count before we loop.
                self.need(count * 8, what)
                return [self.string(f"{what}[{i}]") for i in range(count)]
            raise FormatError(f"{self.where}: {what}: unknown array element type {etype}")
        raise FormatError(f"{self.where}: {what}: unknown value type {vtype}")


class GGUFFile:
    def __init__(self, path: str):
        self.path = str(path)
        self.mm, size = _map(self.path)
        c = _Cursor(self.mm, size, self.path)
        c.need(4, "magic")
        if bytes(self.mm[:4]) != GGUF_MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (magic {bytes(self.mm[:4])!r})")
        c.pos = 4
        self.version = c.scalar("<I", "version")
        if self.version not in (2, 3):
            raise FormatError(f"{self.path}: unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors = c.scalar("<Q", "tensor count")
        n_kv = c.scalar("<Q", "metadata count")
        # Every KV pair takes >= 12 bytes and every tensor info >= 28: bounds both counts by the file size.
        if n_kv * 12 > size or n_tensors * 28 > size or n_tensors > MAX_TENSORS:
            raise FormatError(f"{self.path}: counts ({n_tensors} tensors, {n_kv} metadata) exceed what the file can hold")
        self.metadata: dict = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.scalar("<I", f"type of {key!r}")
            if key in self.metadata:
                raise FormatError(f"{self.path}: duplicate metadata key {key!r}")
            self.metadata[key] = c.value(vtype, f"metadata {key!r}")
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 16:
            raise FormatError(f"{self.path}: field 'general.alignment' = {align!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor #{i} name")
            ndim = c.scalar("<I", f"tensor {name!r} dimension count")
            if not 1 <= ndim <= 4:
                raise FormatError(f"{self.path}: tensor {name!r}: {ndim} dimensions (1..4 allowed)")
            dims = [c.scalar("<Q", f"tensor {name!r} dims") for _ in range(ndim)]
            ttype = c.scalar("<I", f"tensor {name!r} type")
            offset = c.scalar("<Q", f"tensor {name!r} offset")
            if ttype not in GGML_TYPES:
                raise FormatError(f"{self.path}: tensor {name!r}: unsupported GGML type id {ttype} "
                                  f"(supported: {', '.join(v[0] for v in GGML_TYPES.values())})")
            tname, block, bsize = GGML_TYPES[ttype]
            if any(d < 1 or d > 1 << 40 for d in dims):
                raise FormatError(f"{self.path}: tensor {name!r}: bad dims {dims}")
            if dims[0] % block:
                raise FormatError(f"{self.path}: tensor {name!r}: row length {dims[0]} is not a multiple of the {tname} block ({block})")
            n_elems = 1
            for d in dims:
                n_elems *= d                      # Python ints: no overflow
            nbytes = n_elems // block * bsize
            if nbytes > size:
                raise FormatError(f"{self.path}: tensor {name!r}: {nbytes} bytes exceeds the file size")
            infos.append((name, tname, tuple(reversed(dims)), offset, nbytes))
        data_start = (c.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, tname, shape, offset, nbytes in infos:
            if name in self.tensors:
                raise FormatError(f"{self.path}: duplicate tensor {name!r}")
            if offset % align or data_start + offset + nbytes > size:
                raise FormatError(f"{self.path}: tensor {name!r}: offset {offset} (+{nbytes} bytes) is misaligned or outside the data section")
            self.tensors[name] = TensorInfo(name, tname, shape, data_start + offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """Stored bytes as [rows..., bytes_per_row] uint8 (quantized) or the plain typed array."""
        t = self.tensors[name]
        if t.dtype in ("F32", "F16", "BF16"):
            dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t.dtype]
            return np.frombuffer(self.mm, dtype=dt, count=t.nbytes // np.dtype(dt).itemsize, offset=t.offset).reshape(t.shape)
        _, block, bsize = GGML_TYPES[GGML_TYPE_IDS[t.dtype]]
        row_bytes = t.shape[-1] // block * bsize
        return np.frombuffer(self.mm, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(*t.shape[:-1], row_bytes)


def dequantize(raw: np.ndarray, dtype: str) -> np.ndarray:
    """GGML blocks [..., bytes] or plain arrays -> float32 [..., elements], exactly as the `gguf` package decodes them."""
    if dtype == "F32":
        return np.asarray(raw, dtype=np.float32)
    if dtype == "F16":
        return raw.astype(np.float32)
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype == "Q8_0":       # block: f16 scale d, 32 x int8 q;  x = d * q
        b = raw.reshape(*raw.shape[:-1], -1, 34)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        q = b[..., 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(*raw.shape[:-1], -1)
    if dtype in ("Q4_0", "Q4_1"):  # low nibbles are elements 0..15, high nibbles 16..31
        bs = 18 if dtype == "Q4_0" else 20
        b = raw.reshape(*raw.shape[:-1], -1, bs)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        qs = b[..., bs - 16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
        if dtype == "Q4_0":       # x = d * (q - 8)
            out = d * (q - 8.0)
        else:                     # x = d * q + m
            m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
            out = d * q + m
        return out.reshape(*raw.shape[:-1], -1)
    if dtype in GGUF_DECODED:
        # The gguf package's decoder, a run of rows at a time: its intermediates take several times the output's
        # bytes (about 3x: a Q6_K LM head of 128,256 x 4,096 would peak near 6 GB decoded whole). About 75-100 M
        # weights a second on one core.
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize
        qtype = GGMLQuantizationType[dtype]
        _, block, bsize = GGML_TYPES[GGML_TYPE_IDS[dtype]]
        rows = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1])
        out = np.empty((rows.shape[0], raw.shape[-1] // bsize * block), np.float32)
        step = max(1, DECODE_CHUNK_ELEMS // max(1, out.shape[1]))
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite scale: inf / NaN (the caller refuses)
            for r in range(0, rows.shape[0], step):
                out[r:r + step] = gguf_dequantize(rows[r:r + step], qtype)
        return out.reshape(*raw.shape[:-1], out.shape[1])
    raise FormatError(f"cannot dequantize GGML type {dtype}")
