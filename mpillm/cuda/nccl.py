"""NCCL collectives for one tensor-parallel group, on device buffers, through nccl4py's low-level bindings.

The unique id is made on the group's first rank and broadcast over mpi4py (128 bytes); every call's
result is checked by the bindings (they raise on a non-success ncclResult_t). Collectives are enqueued on
the device's stream, so they order with our kernels and can be captured in the decode CUDA graph.
"""

from __future__ import annotations

import atexit
import os

NCCL_DTYPE = {"f16": 6, "f32": 7, "bf16": 9}   # ncclFloat16, ncclFloat32, ncclBfloat16
NCCL_SUM = 0


class NcclComm:
    def __init__(self, group, device, vocab_splits: list[tuple[int, int]] | None = None):
        from nccl.bindings import nccl as nc
        self.nc, self.device = nc, device
        self.rank, self.size = group.Get_rank(), group.Get_size()
        uid = bytes(nc.get_unique_id()) if self.rank == 0 else None
        uid = group.bcast(uid, root=0)
        # ncclCommInitRank binds to the current device: the caller made this rank's primary context current.
        self.comm = nc.comm_init_rank(self.size, nc.UniqueId.from_buffer(bytearray(uid)), self.rank)
        self.stream = device.stream.handle
        self.vocab_splits = vocab_splits
        self.group = group
        self._gathered = None
        self.ipc = None               # IpcAllReduce for small messages, once enabled
        self.ipc_norm = None          # another, for the all-reduce fused with the next residual add + RMSNorm
        self.ipc_gather = None        # and one for the vocab gather of a few rows of logits
        atexit.register(self.destroy)

    def enable_ipc_all_reduce(self, kernels, max_bytes: int, gather_rows: int = 0) -> str:
        """Route all-reduces of up to max_bytes, and vocab gathers of up to gather_rows rows, through the one-shot
        IPC kernels where the group allows it (collective: every rank calls it). MPILLM_IPC_ALLREDUCE=0 keeps
        NCCL for everything. Returns what was decided, for the log."""
        from mpillm.cuda.ipc_allreduce import IpcAllReduce, why_not
        if os.environ.get("MPILLM_IPC_ALLREDUCE", "1") == "0":
            return "NCCL (MPILLM_IPC_ALLREDUCE=0)"
        pad = max(hi - lo for lo, hi in self.vocab_splits) if self.vocab_splits else 0
        gather_bytes = max(0, gather_rows) * pad * 4
        have = self.ipc_gather.max_bytes if self.ipc_gather is not None else 0
        if self.ipc is None or self.ipc.max_bytes < max_bytes or have < gather_bytes:
            reason = why_not(self.group, self.device)
            if reason:
                return f"NCCL ({reason})"
            self._close_ipc()
            self.ipc = IpcAllReduce(self.group, self.device, kernels, max_bytes)
            self.ipc_norm = IpcAllReduce(self.group, self.device, kernels, max_bytes)   # own buffers and counters
            if gather_bytes:
                self.ipc_gather = IpcAllReduce(self.group, self.device, kernels, gather_bytes)
        note = f"one-shot IPC kernel up to {self.ipc.max_bytes} bytes, NCCL beyond"
        if self.ipc_gather is not None:
            note += f"; logits gathered by an IPC kernel up to {self.ipc_gather.max_bytes // (4 * pad)} rows"
        return note

    def all_reduce_device(self, t, stream=None):
        """In-place sum over the group: small messages through the IPC kernel when enabled, else NCCL. The
        choice depends only on the size and the stream, which every rank shares. `stream` (a raw CUstream
        handle): enqueue there instead of the device's stream (NCCL only; the caller orders it with events)."""
        if stream is None and self.ipc is not None and self.ipc.fits(t):
            self.ipc.all_reduce(t)
            return
        handle = self.stream if stream is None else stream
        self.nc.all_reduce(t.ptr, t.ptr, t.numel, NCCL_DTYPE[t.dtype], NCCL_SUM, self.comm, handle)

    def all_reduce_add_rms_norm(self, t, residual, out, weight, eps: float, sent: bool = False) -> bool:
        """t = sum over the group; residual += t; out = rms_norm(residual) * weight, as one kernel when the IPC
        path takes t (returns True); otherwise does nothing and returns False (the caller all-reduces and
        normalises in two steps). The answer depends only on t's shape, which every rank shares. sent: t's
        kernel sent it already, with row_send(t)'s arguments."""
        if self.ipc_norm is None or not self.ipc_norm.fits_rows(t):
            if sent:
                raise ValueError("all_reduce_add_rms_norm: sent, but the fused all-reduce does not take t")
            return False
        self.ipc_norm.all_reduce_add_rms_norm(t, residual, out, weight, eps, sent)
        return True

    def row_send(self, t) -> tuple | None:
        """The arguments with which the kernel that computes t can send it to the peers itself (Kernels.linear's
        `send`), when all_reduce_add_rms_norm will take t; else None."""
        if self.ipc_norm is None or not self.ipc_norm.fits_rows(t):
            return None
        return self.ipc_norm.send_args()

    def all_gather_vocab(self, out, local):
        """out [L, V] f32 = the ranks' local logits [L, V_r] side by side (vocab shards may differ in size).

        A few rows (decode) go through the IPC gather kernel: one kernel, against NCCL's fixed cost plus the
        copies below. Otherwise NCCL, which gathers equal counts: each rank sends L * max(V_r) floats (its rows,
        then slack) into a rank-major scratch, and 2-D copies lay each rank's block into its columns of `out`.
        The choice depends only on L and the splits, which every rank shares.
        """
        import pycuda.driver as cuda
        L, V = out.shape
        if self.ipc_gather is not None and self.ipc_gather.fits_gather(L, self.vocab_splits):
            self.ipc_gather.all_gather_cols(out, local, self.vocab_splits)
            return
        widths = [hi - lo for lo, hi in self.vocab_splits]
        pad = max(widths)
        need = self.size * out.shape[0] * pad
        if self._gathered is None or self._gathered.numel < need:
            raise ValueError(f"all_gather_vocab: scratch holds {0 if self._gathered is None else self._gathered.numel} "
                             f"floats, needs {need}; call reserve() at startup")
        self.nc.all_gather(local.ptr, self._gathered.ptr, L * pad, NCCL_DTYPE["f32"], self.comm, self.stream)
        for r, (lo, hi) in enumerate(self.vocab_splits):
            m = cuda.Memcpy2D()
            m.set_src_device(self._gathered.ptr + r * L * pad * 4)
            m.src_pitch = (hi - lo) * 4
            m.set_dst_device(out.ptr + lo * 4)
            m.dst_pitch = V * 4
            m.width_in_bytes = (hi - lo) * 4
            m.height = L
            m(self.device.stream)

    def reserve(self, max_rows: int):
        """Allocate the gather scratch once (startup), so steps allocate nothing."""
        from mpillm.cuda.runtime import DeviceTensor
        pad = max(hi - lo for lo, hi in self.vocab_splits)
        self._gathered = DeviceTensor.empty((self.size * max_rows * pad,), "f32")

    def _close_ipc(self):
        for ipc in (self.ipc, self.ipc_norm, self.ipc_gather):
            if ipc is not None:
                ipc.close()
        self.ipc = self.ipc_norm = self.ipc_gather = None

    def destroy(self):
        self._close_ipc()
        if self.comm is not None:
            try:
                self.nc.comm_destroy(self.comm)
            finally:
                self.comm = None

    def abort(self):
        """End in-flight collectives at once (a peer died): never leave this rank waiting forever."""
        self._close_ipc()
        if self.comm is not None:
            try:
                self.nc.comm_abort(self.comm)
            finally:
                self.comm = None
