"""A batch job over MPI: validate the input, lay the ranks out, load each rank's shard, generate, write.

N ranks with --tp T form N/T replicas of T consecutive ranks. Rank 0 reads and checks the whole input before
any model loads, deals the requests out to the replicas (balanced by prompt length), and is the only writer:
every replica leader sends its finished records to rank 0 as they finish, and rank 0 appends and flushes
each one at once, so a killed job keeps all finished work. Exit codes: see EXIT_* below.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

from mpillm import __version__

EXIT_OK = 0            # every request answered (some may carry finish_reason "error")
EXIT_FAILURE = 1       # a rank failed; all ranks were stopped
EXIT_USAGE = 2         # bad input file, arguments, model or layout; nothing was generated
EXIT_PREEMPTED = 75    # SIGTERM/SIGUSR1: finished results are flushed; rerun with --resume to continue

TAG_RESULT, TAG_DONE, TAG_STOP = 11, 12, 13


class UsageError(Exception):
    """A problem with what the user asked for: printed once by rank 0, every rank exits EXIT_USAGE."""


@dataclass
class JobOptions:
    prompts: str
    output: str
    model: str | None = None
    tp: int = 1
    device: str = "auto"
    dtype: str = "auto"
    defaults: object = None            # jobio.SamplingParams
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int | None = None            # None: DEFAULT_MAX_NUM_SEQS of the device the job runs on
    max_num_batched_tokens: int | None = None  # None: DEFAULT_MAX_NUM_BATCHED_TOKENS of that device
    kv_cache_memory: float = 1.0       # GiB of KV cache per rank (CPU backend)
    gpu_memory_utilization: float = 0.9
    quantize: str = "auto"             # auto | none | int8 (see `mpillm run --help`)
    group_size: int | None = None      # --quantize int8; None: quant.pick_group_size
    quantize_lm_head: bool = False
    prefix_caching: bool = True
    resume: bool = False
    force: bool = False
    overwrite: bool = False
    skip_invalid: bool = False
    progress: bool = True


# This process: what it is doing right now (named in the message when it fails), its rank, and whether it
# used the GPU (mpillm.cli._exit leaves differently then).
STATE = {"what": "starting"}


def phase(what: str):
    STATE["what"] = what


def failpoint(rank: int, step: int):
    """Test hook: MPILLM_FAIL_AT="RANK:STEP" raises on that rank at that step (rank-failure tests)."""
    spec = os.environ.get("MPILLM_FAIL_AT")
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"injected failure (MPILLM_FAIL_AT={spec})")


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    world: object
    rank: int
    size: int
    tp: int
    replica: int
    group: object          # the tensor-parallel group's MPI communicator
    local_rank: int        # rank within the node: picks the GPU
    local_size: int = 1    # ranks on this node

    @property
    def is_leader(self) -> bool:
        return self.rank % self.tp == 0

    @property
    def num_replicas(self) -> int:
        return self.size // self.tp

    @property
    def leaders(self) -> list[int]:
        return [r * self.tp for r in range(self.num_replicas)]


def make_layout(world, tp: int) -> Layout:
    from mpi4py import MPI
    rank, size = world.Get_rank(), world.Get_size()
    if tp < 1 or size % tp:
        raise UsageError(f"{size} MPI rank{'s' * (size != 1)} cannot form replicas of --tp {tp}: "
                         f"the number of ranks must be a multiple of --tp")
    group = world.Split(color=rank // tp, key=rank)
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    return Layout(world, rank, size, tp, rank // tp, group, local_rank, local_size)


def assign(requests, num_replicas: int) -> list[list]:
    """Longest-prompt-first onto the least-loaded replica; each replica keeps input order."""
    def weight(r):
        return len(r.prompt) if r.prompt is not None else sum(len(m.get("content", "")) for m in r.messages)
    loads, parts = [0] * num_replicas, [[] for _ in range(num_replicas)]
    for r in sorted(requests, key=weight, reverse=True):
        i = loads.index(min(loads))
        parts[i].append(r)
        loads[i] += weight(r) + 1
    return [sorted(p, key=lambda r: r.line_no) for p in parts]


# ------------------------------------------------------------------------------------------ preemption


class StopFlag:
    """SIGTERM/SIGUSR1 on any rank stops admission on every rank. The handler only sets a flag; the main
    loop tells the other ranks (tiny MPI messages), since MPI is not safe inside a signal handler."""

    def __init__(self, layout: Layout):
        self.layout, self.local, self.sent, self.pending = layout, False, False, []
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.local = True
        self.signal_name = signal.Signals(signum).name

    def check(self) -> bool:
        from mpi4py import MPI
        w = self.layout.world
        if self.local and not self.sent:
            self.sent = True
            self.pending = [w.isend(self.signal_name, dest=r, tag=TAG_STOP)
                            for r in range(self.layout.size) if r != self.layout.rank]
        if not self.local and w.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            self.signal_name = w.recv(source=MPI.ANY_SOURCE, tag=TAG_STOP)
            self.local = True
            self.sent = True           # the sender told everyone already
        return self.local

    def finish(self):
        from mpi4py import MPI
        MPI.Request.Waitall(self.pending)
        while self.layout.world.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            self.layout.world.recv(source=MPI.ANY_SOURCE, tag=TAG_STOP)


# -------------------------------------------------------------------------------------------- progress


class Progress:
    """Rank 0's report on stderr: a bar on a terminal, a plain line every 10 s otherwise, then a summary."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.errors = total, 0, 0
        self.prompt_tokens = self.completion_tokens = 0
        self.start = self.last = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
        self.enabled = enabled

    def update(self, record: dict, usage: dict):
        self.done += 1
        self.errors += record.get("finish_reason") == "error" or record.get("error") is not None
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)
        rate = self.completion_tokens / max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s")
        elif self.enabled and time.time() - self.last >= 10:
            self.last = time.time()
            print(f"mpillm: {self.done}/{self.total} requests, {rate:.1f} tok/s", file=sys.stderr, flush=True)

    def summary(self) -> str:
        if self.bar is not None:
            self.bar.close()
        wall = time.time() - self.start
        return (f"mpillm: {self.done} requests ({self.errors} errors), {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion tokens in {wall:.1f} s "
                f"({self.completion_tokens / max(wall, 1e-9):.1f} completion tok/s)")


def _usage_of(record: dict) -> dict:
    if "usage" in record:
        return record["usage"] or {}
    body = ((record.get("response") or {}).get("body") or {})
    return body.get("usage") or {}


# -------------------------------------------------------------------------------------------- the job


def model_identity(model: str | None) -> str:
    """What the manifest records as the model: stable across runs (the default model is the same file
    whether or not it is in the cache yet)."""
    if model is None:
        from mpillm.default_model import DEFAULT_MODEL_NAME, GGUF_SHA256
        return f"default: {DEFAULT_MODEL_NAME} (sha256 {GGUF_SHA256[:16]})"
    return os.path.abspath(model)


def _prepare_input(opts: JobOptions, model_id: str):
    """Rank 0: read and check the input and the output file; returns (requests, invalid lines, manifest)."""
    from mpillm import jobio
    problems = opts.defaults.problems()
    if problems:
        raise UsageError("bad sampling flags: " + "; ".join(problems))
    if opts.quantize != "int8" and (opts.group_size is not None or opts.quantize_lm_head):
        raise UsageError(f"--group-size and --quantize-lm-head apply to --quantize int8 (got --quantize {opts.quantize})")
    if not os.path.exists(opts.prompts):
        raise UsageError(f"{opts.prompts}: no such prompts file")
    requests, invalid = jobio.read_requests(opts.prompts, opts.defaults, skip_invalid=opts.skip_invalid)
    manifest = {
        "mpillm_version": __version__, "model": model_id, "input_sha256": jobio.file_sha256(opts.prompts),
        "defaults": asdict(opts.defaults), "seed": opts.seed, "device": opts.device, "dtype": opts.dtype,
        "max_model_len": opts.max_model_len,
        "quantize": opts.quantize if opts.quantize != "int8" else
        f"int8/g{opts.group_size or 'auto'}" + ("/lm_head" if opts.quantize_lm_head else ""),
    }
    done = set()
    if os.path.exists(opts.output) and os.path.getsize(opts.output) > 0:
        if opts.resume:
            diffs = jobio.check_manifest(opts.output, manifest)
            if diffs and not opts.force:
                raise UsageError(f"{opts.output}: refusing to resume with different settings "
                                 f"({'; '.join(diffs)}); pass --force to resume anyway")
            done, _ = jobio.scan_existing_output(opts.output)
        elif not opts.overwrite:
            raise UsageError(f"{opts.output} already exists: pass --resume to continue it or --overwrite to replace it")
    requests = [r for r in requests if r.id not in done]
    invalid = [bad for bad in invalid if bad[2] is None or str(bad[2]) not in done]
    return requests, invalid, manifest, len(done)


def run_job(opts: JobOptions) -> int:
    from mpi4py import MPI

    from mpillm import jobio
    from mpillm.loading import build_replica, resolve_model
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    STATE["rank"] = rank

    # 1. Layout and input, before any model loads. Errors here are the user's: one message, exit 2 everywhere.
    phase("checking the input")
    status = None
    try:
        layout = make_layout(world, opts.tp)
    except UsageError as e:
        layout, status = None, ("error", str(e))
    if rank == 0 and status is None:
        try:
            resolve_model(opts.model, fetch=False)            # a missing --model fails here, before any work
            requests, invalid, manifest, n_done = _prepare_input(opts, model_identity(opts.model))
            status = ("ok", (requests, invalid, manifest, n_done))
        except (UsageError, jobio.InputError, jobio.OutputError, ValueError) as e:
            status = ("error", str(e))
    status = world.bcast(status, root=0)
    if status[0] == "error":
        if rank == 0:
            print(f"mpillm: error: {status[1]}", file=sys.stderr, flush=True)
        return EXIT_USAGE

    stop = StopFlag(layout)
    writer = progress = None
    parts = None
    if rank == 0:
        requests, invalid, manifest, n_done = status[1]
        parts = [[] for _ in range(layout.size)]
        for i, part in enumerate(assign(requests, layout.num_replicas)):
            parts[i * layout.tp] = part
    mine = world.scatter(parts, root=0)

    # 2. Each rank loads its shard. Model/layout problems are found identically on every rank: exit 2.
    phase("loading the model")
    try:
        replica = build_replica(opts, layout)
        err = None
    except UsageError as e:
        replica, err = None, str(e)
    errs = world.allgather(err)
    if any(errs):
        if rank == 0:
            first = next(e for e in errs if e)
            print(f"mpillm: error: {first}", file=sys.stderr, flush=True)
        return EXIT_USAGE

    # The output is opened only now: a job refused above has written nothing, not even an empty file.
    if rank == 0:
        writer = jobio.OutputWriter(opts.output, resume=opts.resume and not opts.overwrite)
        jobio.write_manifest(opts.output, manifest)
        progress = Progress(len(requests) + len(invalid), opts.progress)
        if n_done:
            print(f"mpillm: resuming: {n_done} requests already in {opts.output}", file=sys.stderr, flush=True)
        for bad in invalid:
            rec = jobio.error_record(bad[0], bad[1], bad[2], getattr(bad, "openai", None))
            writer.write(rec)
            progress.update(rec, {})

    # 3. Generate. Leaders drive their replica; peers replay the leader's steps.
    preempted = False
    if layout.is_leader:
        preempted = _lead(replica, mine, layout, stop, writer, progress)
    else:
        phase("replaying the leader's steps")
        steps = iter(range(1 << 62))

        def each_step():
            n = next(steps)
            phase(f"replaying generation step {n}")
            failpoint(rank, n)
            stop.check()
        word = replica.runner.serve(each_step)
        preempted = word == "stop"

    # 4. Rank 0 collects from the other leaders until all are done, then everyone agrees on the exit code.
    if rank == 0:
        phase("collecting results")
        pending = set(layout.leaders) - {0}
        while pending:
            st = MPI.Status()
            # Poll with a short sleep: a blocking receive spins a core that the other ranks need.
            while not world.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st):
                stop.check()   # a signal here must still reach the ranks that are generating
                time.sleep(0.002)
            msg = world.recv(source=st.Get_source(), tag=st.Get_tag())
            if st.Get_tag() == TAG_RESULT:
                for rec in msg:
                    writer.write(rec)
                    progress.update(rec, _usage_of(rec))
            elif st.Get_tag() == TAG_DONE:
                pending.discard(st.Get_source())
                preempted |= msg
            elif st.Get_tag() == TAG_STOP:
                stop.local = stop.sent = True
        writer.close()
        print(progress.summary(), file=sys.stderr, flush=True)
        code = EXIT_PREEMPTED if preempted or stop.local else EXIT_OK
        if code == EXIT_PREEMPTED:
            print(f"mpillm: stopped by {stop.signal_name or 'a signal'}; finished results are in {opts.output}; "
                  f"rerun with --resume to finish the rest", file=sys.stderr, flush=True)
    else:
        code = None
    code = world.bcast(code, root=0)
    shutdown_watchdog(code)
    stop.finish()
    replica.close()
    return code


SHUTDOWN_GRACE_S = float(os.environ.get("MPILLM_SHUTDOWN_GRACE_S", "30"))


def shutdown_watchdog(code: int):
    """Everything is written and every rank agreed on the exit code: from here, teardown (NCCL, the CUDA
    context, MPI_Finalize) gets SHUTDOWN_GRACE_S seconds. A tensor-parallel job on 2 H200s was seen to hang
    in teardown after NCCL use; a batch job must not hold its allocation for that, so we leave anyway."""
    import threading

    def force():
        import faulthandler
        print(f"mpillm: rank {STATE.get('rank', '?')}: teardown took over {SHUTDOWN_GRACE_S:.0f} s; exiting. "
              f"Where it was stuck:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(code)
    timer = threading.Timer(SHUTDOWN_GRACE_S, force)
    timer.daemon = True
    timer.start()


def _lead(replica, requests, layout: Layout, stop: StopFlag, writer, progress) -> bool:
    """Drive one replica's engine; returns True if stopped by a signal."""
    from mpillm import jobio
    engine = replica.engine
    model_name = replica.model_name
    rank0 = layout.rank == 0

    def emit(results):
        if not results:
            return
        recs = [jobio.result_record(r, model_name) for r in results]
        if rank0:
            for rec in recs:
                writer.write(rec)
                progress.update(rec, _usage_of(rec))
        else:
            layout.world.send(recs, dest=0, tag=TAG_RESULT)

    phase("queueing requests")
    emit([res for res in (engine.add(r) for r in requests) if res is not None])
    steps = 0
    stopped = False
    while engine.has_work():
        if stop.check():
            stopped = True
            emit(engine.flush())        # the step already launched: its finished requests are kept
            engine.abort_all()
            break
        phase(f"generation step {steps}")
        failpoint(layout.rank, steps)
        emit(engine.step())
        steps += 1
        if rank0:
            _drain_results(layout, writer, progress, stop)
    replica.runner.close("stop" if stopped else "done")
    if not rank0:
        layout.world.send(stopped, dest=0, tag=TAG_DONE)
    return stopped


def _drain_results(layout, writer, progress, stop):
    from mpi4py import MPI
    w = layout.world
    while w.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT):
        for rec in w.recv(source=MPI.ANY_SOURCE, tag=TAG_RESULT):
            writer.write(rec)
            progress.update(rec, _usage_of(rec))
