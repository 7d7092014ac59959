"""One-shot all-reduce over peer-mapped GPU memory (cuda_src/allreduce.cu) for the small messages of decode.

NCCL's all-reduce costs ~10-15 us per call at decode sizes (a few tokens x hidden), whatever the bytes, and a
tensor-parallel Llama step makes two per layer: at TP = 2 that was a third of the step. Here each rank
exports a buffer with CUDA IPC and maps its peers', and one kernel sends its part into every peer's buffer,
each word next to the call's flag, waits in its own buffer for theirs and sums (see the .cu file for the
protocol). It needs every rank of the group on one node with peer access between their GPUs; NcclComm uses
it for messages up to `max_bytes` and NCCL for the rest, and only when every rank can (the choice must be
the same on all of them).
"""

from __future__ import annotations

import numpy as np

from mpillm.cuda.runtime import DeviceTensor, device_alloc

AR_MAX_RANKS = 8        # allreduce.cu
AR_MAX_BLOCKS = 64
AR_BLOCKS = 32
AR_THREADS = 256
AG_BLOCKS = 64          # the gather's grid (allreduce.cu)
COUNTER_BYTES = 4 * AR_MAX_BLOCKS   # one call counter per block


def gather_slot_bytes(rows: int, widest: int) -> int:
    """Slot bytes the gather (allreduce.cu all_gather_cols_f32) needs for `rows` rows of up to `widest` floats:
    a 16-byte line per pair of floats, an odd last one padded."""
    return 16 * -(-rows * widest // 2)


def why_not(group, device) -> str | None:
    """None when the group can use the IPC all-reduce, else the reason. Collective: every rank must call it,
    and every rank gets the same answer."""
    import pycuda.driver as cuda
    from mpi4py import MPI
    size = group.Get_size()
    if size > AR_MAX_RANKS:
        return f"{size} ranks (at most {AR_MAX_RANKS})"
    hosts = group.allgather(MPI.Get_processor_name())
    ordinals = group.allgather(device.ordinal)
    reason = None
    if len(set(hosts)) > 1:
        reason = "the group spans several nodes"
    elif len(set(ordinals)) < size:
        reason = "several ranks share a GPU"
    else:
        me = cuda.Device(device.ordinal)
        if not all(o == device.ordinal or me.can_access_peer(cuda.Device(o)) for o in ordinals):
            reason = f"GPU {device.ordinal} cannot map the memory of every peer GPU"
    reasons = [r for r in group.allgather(reason) if r]
    return reasons[0] if reasons else None


class IpcAllReduce:
    def __init__(self, group, device, kernels, max_bytes: int):
        import pycuda.driver as cuda
        self.rank, self.world, self.k = group.Get_rank(), group.Get_size(), kernels
        self.home = self.rank            # the group rank, kept when exchange_nothing makes this a group of one
        self._starts, self._splits = None, None
        self.max_bytes = -(-int(max_bytes) // 16) * 16
        # Every rank's buffer: [2 parities][world senders][slot]; a slot carries a message as (word, flag)
        # pairs, 2 bytes for each byte. Zeroed: no flag matches before the first call (flag 1).
        self.slot_bytes = 2 * self.max_bytes
        nbytes = 2 * self.world * self.slot_bytes
        self._data = device_alloc(nbytes)
        self._counters = device_alloc(COUNTER_BYTES)
        cuda.memset_d8(int(self._data), 0, nbytes)
        cuda.memset_d8(int(self._counters), 0, COUNTER_BYTES)
        handles = group.allgather(cuda.mem_get_ipc_handle(int(self._data)))
        mapped = {r: cuda.IPCMemoryHandle(h) for r, h in enumerate(handles) if r != self.rank}
        self._mapped = list(mapped.values())
        self._upload_table([int(mapped[r]) if r in mapped else int(self._data) for r in range(self.world)])
        device.synchronize()
        group.Barrier()        # every rank's buffer is zero before any peer's first send

    def fits(self, t) -> bool:
        return t.dtype in ("bf16", "f16") and t.nbytes <= self.max_bytes and t.numel % 8 == 0

    def fits_rows(self, t) -> bool:
        """Whether all_reduce_add_rms_norm takes t [M, H]: whole rows of 16-byte vectors."""
        return (t.dtype in ("bf16", "f16") and t.nbytes <= self.max_bytes and len(t.shape) == 2
                and t.shape[1] % 8 == 0 and t.ptr % 16 == 0)

    def all_reduce(self, t) -> None:
        self.k.ipc_all_reduce(t, self.rank, self.world, self.table, self.slot_bytes)

    def all_reduce_add_rms_norm(self, t, residual, out, weight, eps: float, sent: bool = False) -> None:
        """t = sum over the ranks; residual += t; out = rms_norm(residual) * weight, in one kernel. Use an
        instance for this alone: its blocks own whole rows, the plain all-reduce's blocks other slices.
        sent: the kernel that computed t sent it already, with send_args()."""
        self.k.ipc_all_reduce_add_rms_norm(t, residual, out, weight, eps, self.rank, self.world, self.table,
                                           self.slot_bytes, sent)

    def fits_gather(self, rows: int, splits) -> bool:
        """Whether all_gather_cols takes `rows` rows of the column shards `splits`."""
        return gather_slot_bytes(rows, max(hi - lo for lo, hi in splits)) <= self.slot_bytes

    def all_gather_cols(self, out, local, splits) -> None:
        """out [L, V] f32 = every rank's local [L, hi - lo] at its columns splits[rank] = (lo, hi), in one kernel.
        Use an instance for this alone (its blocks cover other lines than the all-reduce's)."""
        if self.world < len(splits):       # exchange_nothing: this rank's own columns only
            splits = [splits[self.home]]
        if self._splits != list(splits):
            self._starts = DeviceTensor.from_numpy(np.array([lo for lo, _ in splits] + [splits[-1][1]], np.int32),
                                                   "i32")
            self._splits = list(splits)
        self.k.ipc_all_gather_cols(out, local, self._starts, self.rank, self.world, self.table, self.slot_bytes,
                                   max(hi - lo for lo, hi in splits))

    def send_args(self) -> tuple:
        """What a kernel that computes the next all_reduce_add_rms_norm's input needs to send it itself
        (Kernels.linear's `send`). Ask at every launch: exchange_nothing changes them."""
        return self.table, self.slot_bytes, self.rank, self.world

    def exchange_nothing(self) -> None:
        """Timing probe (scripts/bench.py --comm-probe): from now on every call sums only this rank's own
        partial, as a group of one, so no byte crosses GPUs and no rank waits for another; the results are
        wrong. The kernels' other work (their reads and writes, the norm) stays, so a step's time against a
        normal run is what the exchange costs. There is no way back (none is needed)."""
        self._upload_table([int(self._data)])
        self.rank, self.world = 0, 1

    def _upload_table(self, buffers: list[int]) -> None:
        """The kernels' table: every rank's buffer as this process maps it (rank order), then this rank's counters."""
        table = np.zeros(AR_MAX_RANKS + 1, np.uint64)
        table[:len(buffers)] = buffers
        table[AR_MAX_RANKS] = int(self._counters)
        self.table = DeviceTensor.from_numpy(table.view(np.uint8), "u8")

    def close(self) -> None:
        for h in self._mapped:
            h.close()
        self._mapped = []
