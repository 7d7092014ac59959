"""The benchmark's workload is part of the contract of its numbers: fixed, seeded, in the stated ranges."""

import sys
from pathlib import Path

import numpy as np
import pytest


def test_sharegpt_like_workload_is_seeded_and_in_range(bench):
    a, b = bench.sharegpt_like(1000, 32000), bench.sharegpt_like(1000, 32000)
    assert [(p, o) for p, o in a] == [(p, o) for p, o in b]           # same requests every run
    plen = np.array([len(p) for p, _ in a])
    olen = np.array([o for _, o in a])
    assert plen.min() >= 4 and plen.max() <= 1024 and olen.min() >= 4 and olen.max() <= 512
    assert 100 < np.median(plen) < 300 and 100 < np.median(olen) < 350   # ShareGPT-like medians
    assert all(0 <= t < 32000 for p, _ in a[:50] for t in p)
    assert bench.sharegpt_like(10, 32000, seed=1) != bench.sharegpt_like(10, 32000, seed=0)


def test_engine_only_runs_every_request_without_a_gpu(bench, tmp_path, monkeypatch, capsys):
    """bench --throughput N --engine-only: the engine's host work per step, with a stand-in runner."""
    import json
    import sys
    out = tmp_path / "b.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", "dummy:llama3-8b", "--throughput", "30", "--engine-only",
                                      "--max-num-seqs", "8", "--json", str(out)])
    got = bench.main()
    assert got["requests"] == 30 and got["steps"] > 30 and got["ms_step"] > 0
    assert json.loads(out.read_text())["kind"] == "engine"
    assert "engine host work: 30 requests" in capsys.readouterr().out


def test_engine_only_with_a_checkpoint_uses_its_tokenizer(bench, smollm_gguf, monkeypatch, capsys):
    import sys
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", str(smollm_gguf), "--throughput", "12", "--engine-only",
                                      "--max-num-seqs", "4"])
    assert bench.main()["requests"] == 12
    assert "the checkpoint tokenizer" in capsys.readouterr().out


# A hand-made workload for the static schedules: prompts of 3, 5, 2, 7, 1 tokens (ids from 1, so a 0 is a pad),
# outputs of 4, 9, 2, 6, 3; the longest prompt (7) + the longest output (9) = 16 tokens reserved per row.
WORK = [([11, 12, 13], 4), ([21, 22, 23, 24, 25], 9), ([31, 32], 2), ([41, 42, 43, 44, 45, 46, 47], 6), ([51], 3)]


def test_static_hf_batch_size_is_what_a_contiguous_cache_holds(bench):
    assert bench.static_plan(WORK, "static-hf", 16 * 2, 8)[0] == 2          # 32 KV tokens // (7 + 9)
    assert bench.static_plan(WORK, "static-hf", 16 * 3 + 15, 8)[0] == 3     # rounds down: 63 // 16
    assert bench.static_plan(WORK, "static-hf", 16 * 100, 4)[0] == 4        # capped by max_num_seqs
    assert bench.static_plan(WORK, "static-hf", 15, 8)[0] == 1              # one row even if it does not fit
    # The reservation is the workload's longest prompt + longest output, not the longest request (7 + 6 = 13).
    assert bench.static_plan(WORK, "static-hf", 26, 8)[0] == 1
    # The paged schedules ignore the cache's size: batches of max_num_seqs.
    for mode in ("static", "static-padded"):
        size, batches = bench.static_plan(WORK, mode, 16, 2)
        assert size == 2 and [len(b) for b in batches] == [2, 2, 1]


def test_static_hf_left_pads_each_batch_to_its_longest_prompt(bench):
    size, batches = bench.static_plan(WORK, "static-hf", 16 * 2, 8)
    assert size == 2 and [[i for i, _, _ in b] for b in batches] == [[0, 1], [2, 3], [4]]
    assert [ids for _, ids, _ in batches[0]] == [[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]]
    assert [ids for _, ids, _ in batches[1]] == [[0, 0, 0, 0, 0, 31, 32], [41, 42, 43, 44, 45, 46, 47]]
    assert [ids for _, ids, _ in batches[2]] == [[51]]                     # a batch of one: nothing to pad
    for b in batches:                                                      # the request's own ids, at the end
        assert all(len(ids) == max(len(ids) for _, ids, _ in b) and ids[len(ids) - len(WORK[i][0]):] == WORK[i][0]
                   for i, ids, _ in b)
    assert [mt for b in batches for _, _, mt in b] == [9, 9, 6, 6, 3]     # every row to its batch's longest output


def test_static_plan_max_tokens_per_mode_and_no_padding_on_the_paged_cache(bench):
    plans = {m: bench.static_plan(WORK, m, 10**6, 2)[1] for m in ("static", "static-padded", "static-hf")}
    assert [mt for b in plans["static"] for _, _, mt in b] == [4, 9, 2, 6, 3]          # each its own
    assert [mt for b in plans["static-padded"] for _, _, mt in b] == [9, 9, 6, 6, 3]   # each batch's longest
    assert [mt for b in plans["static-hf"] for _, _, mt in b] == [9, 9, 6, 6, 3]
    for mode in ("static", "static-padded"):
        assert [ids for b in plans[mode] for _, ids, _ in b] == [p for p, _ in WORK]


def test_static_plan_covers_every_request_once_in_order(bench):
    work = bench.sharegpt_like(1000, 32000)
    longest = max(len(p) for p, _ in work) + max(o for _, o in work)
    for mode, kv, seqs in (("static", 0, 1024), ("static", 0, 64), ("static-padded", 0, 300),
                           ("static-hf", 470_000, 1024), ("static-hf", 470_000, 100), ("static-hf", 1, 1024)):
        size, batches = bench.static_plan(work, mode, kv, seqs)
        assert size == (max(1, min(seqs, kv // longest)) if mode == "static-hf" else seqs)
        assert [i for b in batches for i, _, _ in b] == list(range(1000))
        assert all(len(b) == size for b in batches[:-1]) and 0 < len(batches[-1]) <= size
        for b in batches:
            width = max(len(ids) for _, ids, _ in b)
            assert all(ids[len(ids) - len(work[i][0]):] == work[i][0] for i, ids, _ in b)
            assert all(len(ids) == (width if mode == "static-hf" else len(work[i][0])) for i, ids, _ in b)
            assert all(mt >= work[i][1] for i, _, mt in b)
    with pytest.raises(ValueError):
        bench.static_plan(work, "continuous", 0, 8)


def test_bad_modes_exit_before_any_gpu_work_naming_the_schedules(bench, monkeypatch):
    import sys
    monkeypatch.setattr(sys, "argv", ["bench.py", "--throughput", "10", "--modes", "continuous,static-hff"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    msg = str(e.value)
    assert "static-hff" in msg and "continuous, static, static-padded, static-hf" in msg
    assert bench.parse_modes("continuous,static-hf,") == ["continuous", "static-hf"]


def test_timeline_without_graphs_exits_before_any_gpu_work(bench, monkeypatch, capsys):
    """--timeline lays out the captured decode graph: with --no-graph there is none, said before anything loads."""
    import sys
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", "dummy:llama3-8b", "--timeline", "--no-graph"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--timeline lays out the decode graph's kernels: not with --no-graph" in capsys.readouterr().err


class _FakeIpc:
    def __init__(self):
        self.emptied = False

    def exchange_nothing(self):
        self.emptied = True


def test_comm_probe_times_again_without_the_exchange(bench):
    """--comm-probe: the IPC instances (all-reduces and the logits gather) stop exchanging, the captured graphs go
    (they hold the old arguments), every batch is timed again, and the share is (normal - without) / normal."""
    from types import SimpleNamespace
    comm = SimpleNamespace(ipc=_FakeIpc(), ipc_norm=_FakeIpc(), ipc_gather=_FakeIpc())
    closed, timed, lines, records = [], [], [], []
    model = SimpleNamespace(drop_graphs=lambda: closed.append(True))

    def decode(B, probe=False):
        emptied = comm.ipc.emptied and comm.ipc_norm.emptied and comm.ipc_gather.emptied
        assert probe and emptied and closed   # emptied, graphs dropped first
        timed.append(B)
        return {1: 0.0029, 32: 0.0040}[B]

    bench.comm_probe(model, comm, [1, 32], {1: 0.0032, 32: 0.0050}, decode, lines.append,
                     lambda **kw: records.append(kw))
    assert timed == [1, 32]
    assert [r["batch"] for r in records] == [1, 32]
    assert records[0]["comm_share"] == pytest.approx(0.3 / 3.2)
    assert records[1]["comm_share"] == pytest.approx(0.2)
    assert "communication  0.300 ms of  3.200 ms/step ( 9.4%); without it     344.8 tok/s" in lines[0]
    assert "communication  1.000 ms of  5.000 ms/step (20.0%); without it    8000.0 tok/s" in lines[1]


def test_skip_probe_times_again_without_each_patterns_kernels(bench):
    """--skip-probe: per pattern, Kernels.skip set to it, the graphs dropped (captured again without those launches),
    every batch timed again; the difference is recorded with the kernels the pattern names; afterwards nothing is
    skipped and the graphs are dropped once more (the next capture has every kernel)."""
    from types import SimpleNamespace
    fns = {"attention_decode_x": object(), "qgemv4s_bf16_bf16_x1d": object(), "qgemv4s_bf16_bf16_x1": object()}
    kernels = SimpleNamespace(skip=None, _functions=fns)

    def skipped():      # which pattern the skipped set stands for
        if kernels.skip is None:
            return None
        return "^attention" if id(fns["attention_decode_x"]) in kernels.skip else "x1$"
    events, lines, records = [], [], []
    model = SimpleNamespace(drop_graphs=lambda: events.append(("drop", skipped())))

    def decode(B, probe=False):
        assert probe
        assert len(kernels.skip) == 1          # each pattern names one of the three
        events.append(("time", skipped(), B))
        return {"^attention": 0.0019, "x1$": 0.0015}[skipped()] + (0.001 if B == 8 else 0)

    bench.skip_probe(model, kernels, "^attention;x1$;", [1, 8], {1: 0.002, 8: 0.003}, decode, lines.append,
                     lambda **kw: records.append(kw))
    assert events == [("drop", "^attention"), ("time", "^attention", 1), ("time", "^attention", 8),
                      ("drop", "x1$"), ("time", "x1$", 1), ("time", "x1$", 8), ("drop", None)]
    assert kernels.skip is None
    assert [(r["pattern"], r["batch"], r["kernels"]) for r in records] == [
        ("^attention", 1, ["attention_decode_x"]), ("^attention", 8, ["attention_decode_x"]),
        ("x1$", 1, ["qgemv4s_bf16_bf16_x1"]), ("x1$", 8, ["qgemv4s_bf16_bf16_x1"])]
    assert records[2]["ms_step_without"] == pytest.approx(1.5)
    assert "without /x1$/   1.500 ms/step,  0.500 ms of  2.000 (25.0%) in qgemv4s_bf16_bf16_x1" in lines[2]


def test_skip_probe_patterns_are_checked_before_any_gpu_work(bench):
    """A pattern that does not compile stops the run at once, naming itself; empty ones are dropped."""
    assert [rx.pattern for rx in bench.skip_patterns("^a;;b$;", pytest.fail)] == ["^a", "b$"]
    errors = []
    bench.skip_patterns("ok;x1d[", errors.append)
    assert len(errors) == 1 and "--skip-probe" in errors[0] and "'x1d['" in errors[0]


def test_kernels_skip_leaves_out_only_the_launches_it_names():
    """Kernels._launch with skip set (the probe): a kernel in the set is not launched; others are."""
    from mpillm.cuda.kernels import Kernels
    calls = []

    class Fn:
        def __init__(self, name):
            self.name = name

        def prepared_async_call(self, *a, **kw):
            calls.append(self.name)
    k = Kernels.__new__(Kernels)
    k.stream = None
    fns = {name: Fn(name) for name in ("attention_decode_cluster", "qgemv4s_bf16_bf16_x1d")}
    k.skip = None
    for f in fns.values():
        k._launch(f, (1, 1), 32)
    k.skip = frozenset({id(fns["attention_decode_cluster"])})
    for f in fns.values():
        k._launch(f, (1, 1), 32)
    assert calls == ["attention_decode_cluster", "qgemv4s_bf16_bf16_x1d", "qgemv4s_bf16_bf16_x1d"]


def test_summarize_gives_the_targets_ratios_from_the_json_records(bench, tmp_path):
    """--summarize: per card, medians over the rounds, TP 2 / TP 4 over TP 1 (bf16) and Q4_0 over int8 (LM heads
    bf16, and quantized); other batches listed on their own, out of the ratios; other kinds and models passed over;
    a missing side said; a bad line named."""
    import json
    rec = lambda gpu, tp, q, tok, head=False, **kw: json.dumps(   # noqa: E731
        dict(dict(kind="decode", batch=1, model="dummy:llama3-8b", gpu=gpu, tp=tp, quantize=q, tok_s=tok,
                  quantize_lm_head=head), **kw))
    lines = [rec("H100", 1, "none", 180.0), rec("H100", 1, "none", 190.0), rec("H100", 1, "none", 185.0),
             rec("H100", 2, "none", 333.0), rec("H100", 4, "none", 518.0),
             rec("H100", 1, "int8", 300.0), rec("H100", 1, "q4", 480.0),
             rec("H100", 1, "int8", 320.0, True), rec("H100", 1, "q4", 560.0, True),
             rec("H100", 1, "q4", 2400.0, batch=8), rec("H100", 1, "q4", 9999.0, model="dummy:llama3-70b"),
             rec("H100", 1, "q4", 9999.0, kind="prefill"), "",
             rec("H200", 1, "int8", 385.0)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = bench.summarize_targets(str(path))
    h100, h200 = out.split("H200:")
    assert "tp 1 none: 185.0 tok/s (3 rounds)" in h100
    assert "bf16 TP 2 / TP 1: 1.800x" in h100 and "bf16 TP 4 / TP 1: 2.800x" in h100
    assert "Q4_0 / int8: 1.600x" in h100 and "LM heads quantized: 1.750x" in h100
    assert "tp 1 q4 batch 8: 2400.0 tok/s (1 rounds)" in h100
    assert "9999" not in out
    assert "tp 1 int8: 385.0 tok/s (1 rounds)" in h200 and "Q4_0 / int8: not measured here" in h200
    path.write_text(lines[0] + "\n{oops\n")
    with pytest.raises(SystemExit, match="t.jsonl:2: not a JSON record"):
        bench.summarize_targets(str(path))


_FAKE_BENCH = r"""
import json, sys
argv = sys.argv[1:]
ranks = 1
if argv[:2] == ["-m", "torch.distributed.run"]:
    at = argv.index("--nproc-per-node")
    ranks, argv = int(argv[at + 1]), argv[at + 2:]
script, a = argv[0], argv[1:]
val = lambda flag, d: a[a.index(flag) + 1] if flag in a else d
if script.endswith("random_gguf.py"):
    open(a[-1], "w").close()
elif script.endswith("batched_records.py"):      # the real one, on the stand-in's output
    import runpy
    sys.argv = [script] + a
    runpy.run_path(script, run_name="__main__")
    sys.exit()
elif script.endswith("gptfast_bench.py"):
    mode = val("--mode", "bf16")
    with open(val("--json", None), "a") as f:
        tok = {"bf16": 150.0, "int8": 160.0, "int4": 200.0}[mode] * (1.5 if ranks > 1 else 1)
        f.write(json.dumps(dict(kind="peer", peer="gpt-fast", mode=mode, tp=ranks, gpu="FAKE", groupsize=32,
                                tok_s=tok)) + "\n")
elif "--summarize" in a:
    sys.path.insert(0, "scripts")
    sys.argv = ["bench.py"] + a
    import bench
    bench.main()
    sys.exit()
else:
    tp, q, head = int(val("--tp", "1")), val("--quantize", "none"), "--quantize-lm-head" in a
    tok = {("none", 1): 185.0, ("none", 2): 330.0, ("none", 4): 520.0, ("int8", 1): 300.0, ("q4", 1): 450.0}[q, tp]
    group = int(val("--group-size", "128")) if q == "int8" else None
    with open(val("--json", None), "a") as f:
        for b in [int(x) for x in val("--batch", "1").split(",")]:
            f.write(json.dumps(dict(kind="decode", batch=b, model=val("--model", ""), gpu="FAKE", tp=tp, quantize=q,
                                    quantize_lm_head=head, group_size=group,
                                    tok_s=tok * (1.1 if head else 1.0) * (0.9 if group == 32 else 1.0)
                                    * (1 if b == 1 else b * 2 / 3))) + "\n")
print("ran", script, " ".join(a), "ranks", ranks)
"""

# A stand-in llama-batched-bench: a line of its log, then a jsonl line per -npl count (8, 32).
_FAKE_LLAMA_BATCHED = r"""#!/bin/sh
echo "main: n_kv_max = 6400"
echo '{"n_kv_max": 6400, "flash_attn": 1, "pp": 128, "tg": 64, "pl": 8, "n_kv": 1536, "speed_tg": 1200.0}'
echo '{"n_kv_max": 6400, "flash_attn": 1, "pp": 128, "tg": 64, "pl": 32, "n_kv": 6144, "speed_tg": 3200.0}'
"""

# A stand-in llama-bench: one `-o jsonl` line, tok/s by file.
_FAKE_LLAMA_BENCH = r"""#!/bin/sh
m=$2
case "$m" in *q4_0-f16head.gguf) ts=300;; *q4_0.gguf) ts=330;; *q8_0.gguf) ts=250;; esac
echo "{\"model_filename\": \"$m\", \"n_prompt\": 0, \"n_gen\": 64, \"flash_attn\": true, \"avg_ts\": $ts, \"gpu_info\": \"FAKE\"}"
"""


@pytest.mark.parametrize("gpus,peers", [(1, False), (4, False), (1, True), (4, True), (1, "batched")])
def test_targets_script_runs_each_configuration_every_round_then_summarizes(tmp_path, gpus, peers):
    """scripts/targets.sh with stand-ins for nvidia-smi, python and mpiexec: per round int8 and Q4_0 (LM heads bf16,
    then quantized); with 2+ GPUs bf16 TP 1 and TP 2 (under MPIRUN -n 2), with 4 TP 4 and then the 70B run; then
    the summary of the records, written to OUTDIR/summary.txt. With the peers there (GPTFAST, LLAMA_BENCH): gpt-fast
    bf16 / int8 / int4 and, with 4 GPUs, bf16 under torchrun at TP 2 and 4; llama-bench on the three random GGUFs;
    llama-batched-bench at 8 and 32 sequences (LLAMA_BATCHED, its lines through peers/batched_records.py); ours at
    the configurations they are set against; each peer's line in the summary with ours over it. With
    llama-batched-bench alone: its file written, ours at its batches, nothing else."""
    import os
    import subprocess
    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nif [ \"$1\" != -L ]; then echo FAKE; exit; fi\n"
                                        + "".join(f"echo 'GPU {i}: FAKE'\n" for i in range(gpus)))
    (tmp_path / "fake_bench.py").write_text(_FAKE_BENCH)
    (bin_dir / "py").write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'fake_bench.py'} \"$@\"\n")
    (bin_dir / "mpirun").write_text("#!/bin/sh\nshift 2\nexec \"$@\"\n")
    (bin_dir / "llama-bench").write_text(_FAKE_LLAMA_BENCH)
    (bin_dir / "llama-batched-bench").write_text(_FAKE_LLAMA_BATCHED)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    gptfast = tmp_path / "gpt-fast"
    gptfast.mkdir()
    if peers is True:
        (gptfast / "model.py").write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PY=str(bin_dir / "py"),
               MPIRUN=str(bin_dir / "mpirun"), GPTFAST=str(gptfast), TMPDIR=str(tmp_path),
               LLAMA_BENCH=str(bin_dir / "llama-bench") if peers is True else str(tmp_path / "none"),
               LLAMA_BATCHED=str(bin_dir / "llama-batched-bench") if peers else str(tmp_path / "none"))
    out = tmp_path / "out"
    r = subprocess.run(["bash", "scripts/targets.sh", str(out), "3"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ran = [line[4:] for line in (out / "targets.log").read_text().splitlines() if line.startswith("ran ")]
    summary = (out / "summary.txt").read_text()
    assert "Q4_0 / int8: 1.500x" in summary and "LM heads quantized: 1.500x" in summary
    if gpus >= 4:
        assert "TP 2 / TP 1: 1.784x" in summary and "TP 4 / TP 1: 2.811x" in summary
    else:
        assert "TP 2 / TP 1: not measured here" in summary
    if peers == "batched":
        assert len(ran) == 3 * 4 + 2        # the rounds, the file, ours at 8 and 32 (the tagging: not "ran")
        assert sum("--batch 8,32 --quantize q4" in c for c in ran) == 1
        assert "peer llama.cpp q4_0-f16head batch 8: 1200.0 tok/s (1 runs); ours 2.000x" in summary
        assert summary.count("peer ") == 2
        assert [p.name for p in (tmp_path / "mpillm-peer-gguf").iterdir()] == ["q4_0-f16head.gguf"]
        return
    if not peers:
        per_round = 4 + (3 if gpus >= 4 else 0)
        assert len(ran) == 3 * per_round + (1 if gpus >= 4 else 0)
        assert sum("--quantize q4 --quantize-lm-head" in c for c in ran) == 3
        assert sum("--tp 4" in c and "llama3-8b" in c for c in ran) == (3 if gpus >= 4 else 0)
        if gpus >= 4:
            assert "llama3-70b" in ran[-1] and "--batch 1,32" in ran[-1]
        assert "peer" not in summary and not (tmp_path / "mpillm-peer-gguf").exists()
        return
    assert "peer gpt-fast bf16 tp 1: 150.0 tok/s (1 runs); ours 1.233x" in summary
    assert "peer gpt-fast int8 tp 1: 160.0 tok/s (1 runs); ours 2.062x" in summary       # 330 (LM head quantized)
    assert "peer gpt-fast int4 groups of 32 tp 1: 200.0 tok/s (1 runs); ours 2.475x" in summary
    assert "peer llama.cpp q4_0-f16head: 300.0 tok/s (1 runs); ours 1.500x" in summary
    assert "peer llama.cpp q4_0: 330.0 tok/s (1 runs); ours 1.500x" in summary
    assert "peer llama.cpp q8_0: 250.0 tok/s (1 runs); ours 1.188x" in summary          # 300 x 1.1 x 0.9
    assert "tp 1 int8 groups of 32 (LM head quantized): 297.0 tok/s" in summary
    assert "peer llama.cpp q4_0-f16head batch 8: 1200.0 tok/s (1 runs); ours 2.000x" in summary    # 2400
    assert "peer llama.cpp q4_0-f16head batch 32: 3200.0 tok/s (1 runs); ours 3.000x" in summary   # 9600
    assert sum("--batch 8,32 --quantize q4" in c for c in ran) == 1
    gguf_dir = tmp_path / "mpillm-peer-gguf"                       # not under OUTDIR: the files are large
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["q4_0-f16head.gguf", "q4_0.gguf", "q8_0.gguf"]
    assert not list(out.rglob("*.gguf"))
    if gpus >= 4:
        assert "peer gpt-fast bf16 tp 2: 225.0 tok/s (1 runs); ours 1.467x" in summary
        assert "peer gpt-fast bf16 tp 4: 225.0 tok/s (1 runs); ours 2.311x" in summary
        assert sum("ranks 4" in c for c in ran) == 1 and sum("ranks 2" in c for c in ran) == 1
    else:
        assert "tp 2" not in summary.split("peer", 1)[1]
        assert sum(c.startswith("scripts/bench.py") and "--tp" not in c and "--quantize" not in c for c in ran) == 1


def test_comm_probe_says_why_it_cannot_run_over_nccl(bench):
    from types import SimpleNamespace
    lines = []
    bench.comm_probe(SimpleNamespace(drop_graphs=lambda: None), SimpleNamespace(ipc=None), [1], {1: 0.003},
                     lambda B, probe=False: pytest.fail("timed without an IPC all-reduce"), lines.append,
                     lambda **kw: pytest.fail("recorded"))
    assert "skipped" in lines[0] and "NCCL" in lines[0]


def test_rank_of_runs_rank_zeros_share_as_a_whole_model(bench):
    """bench --rank-of N: the model is rank 0's share of a TP N step (mpillm.parallel.make_shard), the rest as it
    was; a share whose heads do not group evenly, or a shard past the heads, is refused with the reason."""
    from mpillm.config import ConfigError
    from mpillm.dummy import dummy_config
    from mpillm.parallel import ShardingError, make_shard
    for name, tp in (("llama3-8b", 2), ("llama3-8b", 4), ("llama3-70b", 4), ("qwen2-7b", 4)):
        cfg = dummy_config(f"dummy:{name}")
        share, s = bench.rank_share(cfg, tp), make_shard(cfg, 0, tp)
        assert (share.num_heads, share.num_kv_heads) == (s.n_heads, s.n_kv_heads)
        assert (share.intermediate_size, share.vocab_size) == (s.ffn_hi - s.ffn_lo, s.vocab_hi - s.vocab_lo)
        assert (share.hidden_size, share.head_dim, share.num_layers) == (cfg.hidden_size, cfg.head_dim, cfg.num_layers)
    share = bench.rank_share(dummy_config("dummy:llama3-8b"), 4)
    assert (share.num_heads, share.num_kv_heads, share.intermediate_size, share.vocab_size) == (8, 2, 3584, 32064)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        bench.rank_share(dummy_config("dummy:smollm2-135m"), 2)        # 5 query heads over 2 kv heads
    with pytest.raises(ShardingError, match="attention heads"):
        bench.rank_share(dummy_config("dummy:smollm2-135m"), 16)


def test_code_size_reads_elf_text_sections_and_names_bad_input(tmp_path, capsys, code_size):
    """scripts/code_size.py on a hand-made ELF64 with two .text sections and one other: their sizes, the report's
    total, and clear errors for a file that is not a cubin, a pattern that is not a regex and one that matches
    nothing. (On real cubins: tests/test_cuda_compile.py.)"""
    import struct
    cs = code_size
    names = b"\0.shstrtab\0.text.kern_a\0.nv.info\0.text._Z6helperv\0"
    at = {n: names.index(n.encode() + b"\0") for n in (".shstrtab", ".text.kern_a", ".nv.info", ".text._Z6helperv")}
    body = names + bytes(-len(names) % 8)
    sections = [(0, 0, 0), (at[".shstrtab"], 64, len(names)), (at[".text.kern_a"], 0, 320), (at[".nv.info"], 0, 24),
                (at[".text._Z6helperv"], 0, 48)]
    shoff = 64 + len(body)
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x28, shoff)
    struct.pack_into("<HHH", head, 0x3A, 64, len(sections), 1)
    table = b"".join(struct.pack("<IIQQQQIIQQ", n, 0, 0, 0, off, size, 0, 0, 0, 0) for n, off, size in sections)
    cubin = bytes(head) + body + table
    assert cs.text_sizes(cubin) == {"kern_a": 320, "_Z6helperv": 48}
    report = cs.report({"m": cubin}, ["kern", "helper"]).splitlines()
    assert report[0].split()[:3] == ["320", "B", "20"] and report[-1].split()[:3] == ["368", "B", "23"]
    f = tmp_path / "m.cubin"
    f.write_bytes(cubin)
    cs.main(["--cubin", str(f), "kern_a"])
    assert "kern_a  (m)" in capsys.readouterr().out
    bad = tmp_path / "bad.cubin"
    bad.write_bytes(b"not an elf")
    with pytest.raises(SystemExit, match="bad.cubin: not a little-endian ELF64 cubin"):
        cs.main(["--cubin", str(bad)])
    bad.write_bytes(cubin[:40])                    # the magic, cut short
    with pytest.raises(SystemExit, match="bad.cubin: not a little-endian ELF64 cubin"):
        cs.main(["--cubin", str(bad)])
    bad.write_bytes(cubin[:shoff + 100])           # the section table cut short
    with pytest.raises(SystemExit, match="bad.cubin: cubin: section header table out of bounds"):
        cs.main(["--cubin", str(bad)])
    with pytest.raises(SystemExit, match="no function matches"):
        cs.main(["--cubin", str(f), "nothing_here"])
    with pytest.raises(SystemExit):
        cs.main(["--cubin", str(f), "(unclosed"])
    assert "pattern '(unclosed'" in capsys.readouterr().err


def test_batched_records_tags_llama_batched_bench_lines_and_names_bad_ones(bench, tmp_path):
    """scripts/peers/batched_records.py: llama-batched-bench's jsonl lines with the peer, GGUF and card added (its
    log lines passed over), and --summarize sets them against ours at the same batch; a JSON line without the
    fields the summary reads, a broken one, or no record at all stops it with the line named."""
    import json
    import subprocess
    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "peers" / "batched_records.py"

    def run(text):
        return subprocess.run([sys.executable, str(script), "--model", "/g/q4_0-f16head.gguf", "--gpu", "H200"],
                              input=text, capture_output=True, text=True, timeout=60, check=False)
    good = '{"pp": 128, "tg": 64, "pl": 8, "flash_attn": 1, "speed_tg": 1250.5}\n'
    r = run("llama_context: n_ctx = 6400\n" + good + "\n")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec == dict(json.loads(good), peer="llama.cpp batched", model_filename="/g/q4_0-f16head.gguf", gpu="H200")
    path = tmp_path / "t.jsonl"
    ours = {"kind": "decode", "batch": 8, "model": "dummy:llama3-8b", "gpu": "H200", "tp": 1, "quantize": "q4",
            "tok_s": 3001.2, "quantize_lm_head": False}
    path.write_text(json.dumps(ours) + "\n" + r.stdout)
    out = bench.summarize_targets(str(path))
    assert "peer llama.cpp q4_0-f16head batch 8: 1250.5 tok/s (1 runs); ours 2.400x" in out
    for bad, says in [('{"pp": 128, "pl": 8}\n', "line 1: no tg, speed_tg"), (good + "{oops\n", "line 2: not a JSON"),
                      ("only a log line\n", "no llama-batched-bench record")]:
        r = run(bad)
        assert r.returncode != 0 and says in r.stderr, r.stderr
