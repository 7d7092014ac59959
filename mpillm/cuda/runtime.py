"""CUDA device, stream and owned device buffers on top of PyCUDA's driver API.

The device is used through its *primary* context (the one the CUDA runtime uses), so NCCL, cuBLAS
and CUDA graphs captured through `cuda.bindings` all see the same memory as PyCUDA. pycuda is
imported lazily: the bf16 helpers and this module's import work on machines without CUDA.
"""

from __future__ import annotations

import atexit
import math
from dataclasses import dataclass, field

import numpy as np

# dtype name -> (host numpy dtype, bytes per element). numpy has no bfloat16, so bf16 lives on the
# host as its raw uint16 bits; from_numpy/to_numpy convert through f32_to_bf16/bf16_to_f32.
DTYPES: dict[str, tuple[type, int]] = {
    "bf16": (np.uint16, 2),
    "f16": (np.float16, 2),
    "f32": (np.float32, 4),
    "i32": (np.int32, 4),
    "u8": (np.uint8, 1),
}


def _driver():
    import pycuda.driver as cuda

    return cuda


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even; NaN stays a (quiet) NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32 (exact)."""
    return (np.ascontiguousarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def check_cu(result, what: str):
    """cuda.bindings calls return (err, *values): raise naming the call on error, else the value(s)."""
    from cuda.bindings import driver as cu
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


# ---------------------------------------------------------------------------------------------------
# Allocation: every device buffer of the project comes from device_alloc, so a test can prove that a
# decode step allocates nothing by reading allocation_count() before and after.

_allocations = 0


def device_alloc(nbytes: int):
    """cuMemAlloc of `nbytes` (at least 1), counted. Returns a pycuda DeviceAllocation."""
    global _allocations
    buf = _driver().mem_alloc(max(int(nbytes), 1))
    _allocations += 1
    return buf


def allocation_count() -> int:
    """Number of device_alloc calls so far in this process."""
    return _allocations


# ---------------------------------------------------------------------------------------------------


@dataclass
class CudaDevice:
    """One GPU, its primary context (pushed on this thread) and the stream every launcher uses."""

    ordinal: int
    device: object          # pycuda.driver.Device
    context: object         # pycuda.driver.Context (primary)
    stream: object          # pycuda.driver.Stream
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    max_shared_per_block_optin: int
    _closed: bool = field(default=False, repr=False)

    @property
    def arch(self) -> str:
        """nvcc target of this device, e.g. "sm_90"."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        """Pop the primary context off this thread; idempotent, also registered with atexit.

        PyCUDA aborts the interpreter at exit if a context is still on the stack. The context is popped,
        not released, as pycuda.autoprimaryctx does: buffers freed later by the garbage collector
        re-activate it briefly and need it alive.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.context.synchronize()
        finally:
            self.context.pop()
            from pycuda.tools import clear_context_caches

            clear_context_caches()


def init_device(local_rank: int = 0) -> CudaDevice:
    """Make GPU (local_rank % device count) current on this thread through its primary context."""
    cuda = _driver()
    cuda.init()
    count = cuda.Device.count()
    if count == 0:
        raise RuntimeError("init_device: no CUDA device")
    ordinal = local_rank % count
    dev = cuda.Device(ordinal)
    ctx = dev.retain_primary_context()
    ctx.push()
    attr = cuda.device_attribute
    device = CudaDevice(
        ordinal=ordinal,
        device=dev,
        context=ctx,
        stream=cuda.Stream(),
        name=dev.name(),
        compute_capability=dev.compute_capability(),
        sm_count=dev.get_attribute(attr.MULTIPROCESSOR_COUNT),
        max_shared_per_block_optin=dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
    )
    atexit.register(device.close)
    return device


# ---------------------------------------------------------------------------------------------------


class DeviceTensor:
    """A contiguous device buffer with a shape and a dtype name (see DTYPES).

    `alloc` is either a DeviceAllocation owned by this tensor or a `(base, byte_offset)` pair for a view
    into another buffer (base is kept alive by the view). Views cost no allocation, which is how
    per-step sub-buffers are carved out of preallocated ones.
    """

    def __init__(self, alloc, shape, dtype: str):
        if dtype not in DTYPES:
            raise ValueError(f"DeviceTensor: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if isinstance(alloc, tuple):
            base, offset = alloc
        else:
            base, offset = alloc, 0
        self._base = base
        self._offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    # -- properties ------------------------------------------------------------------------------
    @property
    def ptr(self) -> int:
        return int(self._base) + self._offset

    def __int__(self) -> int:
        return self.ptr

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"DeviceTensor(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def empty(cls, shape, dtype: str) -> "DeviceTensor":
        shape = tuple(int(s) for s in shape)
        return cls(device_alloc(math.prod(shape) * DTYPES[dtype][1]), shape, dtype)

    @classmethod
    def zeros(cls, shape, dtype: str) -> "DeviceTensor":
        t = cls.empty(shape, dtype)
        _driver().memset_d8(t.ptr, 0, t.nbytes)
        return t

    @classmethod
    def from_numpy(cls, arr: np.ndarray, dtype: str) -> "DeviceTensor":
        host = to_host_layout(arr, dtype)
        t = cls.empty(host.shape, dtype)
        t.copy_from_numpy(host)
        return t

    # -- views and copies ------------------------------------------------------------------------
    def view(self, offset_elems: int, shape) -> "DeviceTensor":
        """Sub-buffer starting `offset_elems` elements in, with a new shape; no allocation."""
        shape = tuple(int(s) for s in shape)
        if offset_elems < 0 or offset_elems + math.prod(shape) > self.numel:
            raise ValueError(f"view: [{offset_elems}, +{math.prod(shape)}) outside {self.numel} elements")
        return DeviceTensor((self._base, self._offset + offset_elems * self.itemsize), shape, self.dtype)

    def reshape(self, shape) -> "DeviceTensor":
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != self.numel:
            raise ValueError(f"reshape: {self.shape} -> {shape} changes the element count")
        return self.view(0, shape)

    def copy_from_numpy(self, arr: np.ndarray) -> None:
        """Synchronous host -> device copy into this buffer (same element count; converted to dtype)."""
        host = to_host_layout(arr, self.dtype)
        if host.size != self.numel:
            raise ValueError(f"copy_from_numpy: {host.size} elements into a tensor of {self.numel}")
        _driver().memcpy_htod(self.ptr, host)

    def to_numpy(self) -> np.ndarray:
        """Synchronous device -> host copy; bf16 and f16 come back as float32."""
        host = np.empty(self.shape, dtype=DTYPES[self.dtype][0])
        _driver().memcpy_dtoh(host, self.ptr)
        if self.dtype == "bf16":
            return bf16_to_f32(host).reshape(self.shape)
        if self.dtype == "f16":
            return host.astype(np.float32)
        return host

    def raw_numpy(self) -> np.ndarray:
        """Device -> host copy without conversion (bf16 as uint16 bits)."""
        host = np.empty(self.shape, dtype=DTYPES[self.dtype][0])
        _driver().memcpy_dtoh(host, self.ptr)
        return host


def to_host_layout(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Contiguous numpy array in the host representation of `dtype` (bf16: uint16 bits)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    arr = np.asarray(arr)
    if dtype == "bf16" and arr.dtype != np.uint16:
        return f32_to_bf16(arr)
    return np.ascontiguousarray(arr, dtype=DTYPES[dtype][0])
