"""The timeline of a decode step's CUDA graph, read back from the kernels themselves (`scripts/bench.py --timeline`).

The lent GPU machines have no nsys, and ncu runs a graph's kernels one at a time, so neither shows what a graph
of a few hundred kernels linked by programmatic edges (mpillm/cuda/graphs.py) does at its joints: when the next
kernel's blocks are placed, when its wait returns, how long the last block of a kernel trails the others. A
build with `-DMPILLM_TRACE` (MPILLM_TRACE=1; cuda_src/common.cuh) has thread 0 of every block stamp %globaltimer
when it reaches pdl_wait() and when the wait returns, and the projection, decode attention and sampling kernels
stamp each block's end. Tracer points every module at a record buffer; `timeline` lays the records out per node of
the graph, step by step; `summarize` and `report` reduce them to a table per kernel.

The stamps are what the blocks saw, to the timer's resolution (tens of ns): a wait's return lags the end of the
kernel before it by the GPU's own signalling, which is the point of measuring it. Production builds compile none
of it (the define is off, the SASS unchanged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

ENV = "MPILLM_TRACE"
RECORD_WORDS = 4             # u64: %gridid, kind << 63 | %smid << 32 | block, two %globaltimer stamps (ns)
KIND_END = 1 << 63


def trace_setting(environ=os.environ) -> bool:
    """Whether the kernels are built with the trace stamps (MPILLM_TRACE=1; bench.py --timeline sets it)."""
    value = environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 or 1")
    return value == "1"


class Tracer:
    """Points every module of a trace build at a buffer of records (TraceBuf in cuda_src/common.cuh) between
    start() and stop(). Each block takes two slots from a counter (its wait, its end), so the buffer keeps the
    first `cap` slots' worth of launches after start()."""

    def __init__(self, kernels):
        if not kernels.trace:
            raise ValueError(f"Tracer: the kernels were built without the trace stamps (set {ENV}=1 before "
                             f"Kernels() compiles them)")
        self.kernels = kernels
        self.recs = self.count = None
        self.cap = 0

    def _point(self, recs_ptr: int) -> None:
        import pycuda.driver as cuda
        self.kernels.device.synchronize()       # no graph of the steps before may still read the old setting
        # struct TraceBuf { u64* recs; u32* count; u32 cap, pad; }: 24 bytes.
        host = np.array([recs_ptr, self.count.ptr, self.cap], np.uint64)
        for module in self.kernels._modules.values():
            ptr, size = module.get_global("mpillm_trace")
            if size != host.nbytes:
                raise RuntimeError(f"mpillm_trace: {size} bytes in the module, expected {host.nbytes}")
            cuda.memcpy_htod(ptr, host)

    def start(self, sequence: list[tuple[str, int]], steps: int = 16) -> None:
        """Record from now on, room for `steps` replays of a graph of `sequence` ([(name, blocks)])."""
        from mpillm.cuda.runtime import DeviceTensor
        import pycuda.driver as cuda
        self.cap = 2 * sum(blocks for _, blocks in sequence) * int(steps)
        if self.cap >= 1 << 32:
            raise ValueError(f"Tracer: {self.cap} record slots do not fit the kernels' 32-bit counter")
        n = self.cap * RECORD_WORDS * 8
        if self.recs is None or self.recs.nbytes < n:
            self.recs = DeviceTensor.empty((n,), "u8")
        if self.count is None:
            self.count = DeviceTensor.empty((1,), "i32")
        cuda.memset_d8(self.recs.ptr, 0, n)
        cuda.memset_d8(self.count.ptr, 0, 4)
        self._point(self.recs.ptr)

    def stop(self) -> np.ndarray:
        """Stop recording (after the work on the stream) and return the records [n, 4] u64 written since start()."""
        self._point(0)
        out = self.recs.view(0, (self.cap * RECORD_WORDS * 8,)).raw_numpy().view(np.uint64).reshape(-1, RECORD_WORDS)
        return out[out[:, 0] != 0]           # slots past a block without an end stamp, or past the last


@dataclass
class Grid:
    """One launch's records: its blocks' wait entries and returns (ns), and the ends of those that stamp one."""
    gridid: int
    entered: np.ndarray
    released: np.ndarray
    ends: np.ndarray

    @property
    def blocks(self) -> int:
        return len(self.released)


class TimelineError(ValueError):
    pass


def grids(records: np.ndarray, split_ns: int = 20_000) -> list[Grid]:
    """Records grouped by launch, in the order the launches' waits returned. %gridid names a graph node, the same
    at each replay, so records are first put in steps: the first wait to return belongs to the graph's first node
    (the buffer starts with no graph running), whose own waits mark where each replay begins (its launches are
    more than split_ns apart, its blocks' waits return within microseconds); a record belongs to the last step
    begun before its wait returned (an end stamp: before it ended). The decode graphs of one batch alternate between
    two captures (one per metadata turn, mpillm.cuda.model.StepBuffers): the other capture's nodes then have ids of
    their own, each launched once between two replays of the first node, so every launch still gets a group."""
    if len(records) == 0:
        return []
    is_end = (records[:, 1] & np.uint64(KIND_END)) != 0
    wait, end = records[~is_end], records[is_end]
    if len(wait) == 0:
        return []
    first = np.sort(wait[wait[:, 0] == wait[np.argmin(wait[:, 3]), 0], 3].astype(np.int64))
    starts = first[np.concatenate([[0], np.flatnonzero(np.diff(first) > split_ns) + 1])]
    w_step = np.searchsorted(starts, wait[:, 3].astype(np.int64), side="right") - 1
    e_step = np.searchsorted(starts, end[:, 2].astype(np.int64), side="right") - 1
    # One sort by (node, step) instead of a mask per launch (a traced 8B step has ~10^5 records).
    ids, w_node = np.unique(wait[:, 0], return_inverse=True)
    e_node = np.searchsorted(ids, end[:, 0])
    known = (e_node < len(ids)) & (ids[np.minimum(e_node, len(ids) - 1)] == end[:, 0])
    span = len(starts) + 1
    w_key, e_key = w_node * span + w_step, (e_node * span + e_step)[known]
    order = np.argsort(w_key, kind="stable")
    keys, first_at = np.unique(w_key[order], return_index=True)
    e_order = np.argsort(e_key, kind="stable")
    e_vals = end[known][e_order, 2].astype(np.int64)
    e_lo, e_hi = np.searchsorted(e_key[e_order], keys, "left"), np.searchsorted(e_key[e_order], keys, "right")
    out = []
    for i, part in enumerate(np.split(wait[order], first_at[1:])):
        out.append(Grid(int(ids[keys[i] // span]), part[:, 2].astype(np.int64), part[:, 3].astype(np.int64),
                        e_vals[e_lo[i]:e_hi[i]]))
    out.sort(key=lambda gr: int(gr.released.min()))
    return out


def timeline(records: np.ndarray, sequence: list[tuple[str, int]]) -> list[list[Grid]]:
    """The whole steps among the records: lists of Grids, one per node of `sequence` ([(kernel name, blocks)] of
    the graph in order, graphs.kernel_sequence). TimelineError when the launches do not line up with it."""
    if not sequence:
        raise TimelineError("timeline: the graph has no kernel of ours")
    gs = grids(records)
    n = len(sequence)
    want = [b for _, b in sequence]
    got = [g.blocks for g in gs]
    # Where the steps begin among the launches (the first recorded launch is a step's first, unless the buffer
    # was started mid-step): the offset at which every launch has its node's blocks.
    # The launches after the last whole step are not checked: the buffer may have filled up in the middle of one.
    for offset in range(n):
        first = (n - offset) % n
        full = (len(gs) - first) // n
        if all(got[i] == want[(i + offset) % n] for i in range(first + full * n)):
            if full == 0:
                raise TimelineError(f"timeline: {len(gs)} launches recorded, no whole step of {n}")
            return [gs[first + s * n: first + (s + 1) * n] for s in range(full)]
    bad = next((i for i in range(len(gs)) if got[i] != want[i % n]), 0)
    raise TimelineError(f"timeline: {len(gs)} launches do not line up with the graph's {n} kernels: launch {bad} has "
                        f"{got[bad]} blocks where {sequence[bad % n][0]} has {want[bad % n]}")


def summarize(steps: list[list[Grid]], sequence: list[tuple[str, int]]) -> list[dict]:
    """Per node of the graph, medians over the steps, in µs:
      span   its release (its first block's wait returning) to the next node's (for the last node, to the next
             step's first: that includes the time between graph launches); the node's share of the step
      lead   its release minus its first block's wait entry: how long blocks sat placed, loading weights, before
             the kernel before it finished
      early  the share of its blocks that entered the wait before the release (placed while the kernel before ran)
      late   its last block's wait return minus the release (blocks placed only as the kernel before left SMs)
      end    its last block's end minus the release; tail: that minus its blocks' median end; gap: the next node's
             release minus that end (nan where the kernel stamps no ends)"""
    rows = []
    n = len(sequence)
    for i, (name, blocks) in enumerate(sequence):
        vals = {key: [] for key in ("span", "lead", "early", "late", "end", "tail", "gap")}
        for k, s in enumerate(steps):
            # The node after this one: the next in the step, or the next step's first (none after the last step).
            g = s[i]
            after = s[i + 1] if i + 1 < n else (steps[k + 1][0] if k + 1 < len(steps) else None)
            rel = int(g.released.min())
            if after is not None:
                vals["span"].append(int(after.released.min()) - rel)
            vals["lead"].append(rel - int(g.entered.min()))
            vals["early"].append(float(np.mean(g.entered < rel)))
            vals["late"].append(int(g.released.max()) - rel)
            if len(g.ends):
                last = int(g.ends.max())
                vals["end"].append(last - rel)
                vals["tail"].append(last - float(np.median(g.ends)))
                if after is not None:
                    vals["gap"].append(int(after.released.min()) - last)
        row = {"index": i, "kernel": name, "blocks": blocks}
        for key, v in vals.items():
            med = float(np.median(v)) if v else float("nan")
            row[key] = med if key == "early" else med / 1e3
        rows.append(row)
    return rows


def by_kernel(rows: list[dict]) -> list[dict]:
    """summarize's rows folded per kernel name: launches per step, span summed (µs per step), the rest averaged
    per launch; largest span first."""
    out: dict[str, dict] = {}
    for r in rows:
        o = out.setdefault(r["kernel"], {"kernel": r["kernel"], "launches": 0, "blocks": r["blocks"], "vals": []})
        o["launches"] += 1
        o["vals"].append(r)
    table = []
    for o in out.values():
        vs = o.pop("vals")
        o["span"] = float(np.nansum([v["span"] for v in vs]))
        for key in ("lead", "early", "late", "end", "tail", "gap"):
            xs = [v[key] for v in vs if not np.isnan(v[key])]
            o[key] = float(np.mean(xs)) if xs else float("nan")
        table.append(o)
    table.sort(key=lambda o: -o["span"])
    return table


def report(rows: list[dict], title: str) -> str:
    """The by_kernel table as '#'-prefixed lines."""
    table = by_kernel(rows)
    total = sum(o["span"] for o in table)
    lines = [f"# timeline {title}: {total:.1f} µs from the first kernel's release to the next step's",
             "#   µs/step   share  launches blocks  µs/launch   lead  early   late    end   tail    gap  kernel"]

    def f(x):
        return f"{x:6.2f}" if not np.isnan(x) else f"{'-':>6}"
    for o in table:
        lines.append(f"#  {o['span']:8.1f} {100 * o['span'] / total:6.1f}%  {o['launches']:8d} {o['blocks']:6d} "
                     f"{o['span'] / o['launches']:10.2f} {f(o['lead'])} {o['early']:6.2f} {f(o['late'])} "
                     f"{f(o['end'])} {f(o['tail'])} {f(o['gap'])}  {o['kernel']}")
    return "\n".join(lines)
