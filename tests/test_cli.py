"""`mpillm run` end to end on the real default model, as users call it (subprocesses, mpiexec for MPI)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "prompts.jsonl"
MPIEXEC = shutil.which("mpiexec") or shutil.which("mpirun")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH")


def mpillm(*args, ranks=None, timeout=300, env=None, check=None):
    cmd = [sys.executable, "-m", "mpillm", *map(str, args)]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    e = dict(os.environ, **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr[-4000:]}"
    return p


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def rid(rec):
    return rec["custom_id"] if "custom_id" in rec else rec["id"]


def ids_of(rec):
    if "token_ids" in rec:
        return rec["token_ids"]
    return rec["response"]["body"]["choices"][0]["message"]["content"]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model(smollm_gguf):
    return str(smollm_gguf)


@pytest.fixture(scope="module")
def single_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    p = mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", out, check=0)
    return out, p


def test_version_and_help():
    p = mpillm("--version", check=0)
    assert "mpillm" in p.stdout
    assert "--tp" in mpillm("run", "--help", check=0).stdout


def test_info(model):
    p = mpillm("info", "--model", model, "--tp", "3", check=0)
    assert "llama" in p.stdout and "30 layers" in p.stdout and "rank 2" in p.stdout
    assert "134,515,008" in p.stdout   # SmolLM2-135M parameter count (tied embeddings)
    p = mpillm("info", "--model", model, "--quantize", "auto", check=0)
    assert "--quantize auto: GPU weights 0.14" in p.stdout and "(57% of 0.251 GiB in bf16)" in p.stdout


def test_run_default_model_end_to_end(single_run):
    out, p = single_run
    recs = records(out)
    expected = [rid(json.loads(line)) for line in EXAMPLES.read_text().splitlines()]
    assert sorted(map(rid, recs)) == sorted(expected)          # every id exactly once
    by = {rid(r): r for r in recs}
    assert "Paris" in by["capital"]["text"]
    assert by["capital"]["finish_reason"] == "stop"
    assert by["count"]["finish_reason"] == "length" and len(by["count"]["token_ids"]) == 16
    assert by["count"]["usage"]["completion_tokens"] == 16
    assert "\n" not in by["math"]["text"]                       # stop string honoured
    body = by["openai-1"]["response"]["body"]
    assert by["openai-1"]["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["message"]["content"]
    assert "requests (0 errors)" in p.stderr                    # the summary line
    assert Path(str(out) + ".manifest.json").exists()


def test_stop_strings_and_max_tokens(model, tmp_path):
    rows = [{"id": "a", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 12, "stop": [" 8"]},
            {"id": "b", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 3},
            {"custom_id": "c", "method": "POST", "url": "/v1/completions",
             "body": {"model": "x", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 12, "stop": ", 9"}}]
    out = tmp_path / "out.jsonl"
    mpillm("run", "--model", model, "--prompts", write_jsonl(tmp_path / "in.jsonl", rows), "--output", out, check=0)
    by = {rid(r): r for r in records(out)}
    assert by["a"]["text"] == " 6, 7," and by["a"]["finish_reason"] == "stop"
    assert by["b"]["finish_reason"] == "length" and len(by["b"]["token_ids"]) == 3
    choice = by["c"]["response"]["body"]["choices"][0]
    assert by["c"]["response"]["body"]["object"] == "text_completion"
    assert choice["text"] == " 6, 7, 8" and choice["finish_reason"] == "stop"


def test_invalid_input_exits_2_and_writes_nothing(model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": 5}\nnot json\n{"id": 1, "prompt": "dup"}\n'
                   '{"id": 4, "prompt": "x", "max_token": 3}\n')
    out = tmp_path / "out.jsonl"
    p = mpillm("run", "--model", model, "--prompts", bad, "--output", out, check=2)
    for line in (":2:", ":3:", ":4:", ":5:"):
        assert line in p.stderr
    assert "max_tokens" in p.stderr            # the typo suggestion
    assert not out.exists()
    p = mpillm("run", "--model", model, "--prompts", bad, "--output", out, "--skip-invalid", "--max-tokens", "2", check=0)
    recs = records(out)
    assert len(recs) == 5
    assert sum(r["finish_reason"] == "error" for r in recs) == 4


def test_per_request_failures_do_not_stop_the_job(model, tmp_path):
    rows = [{"id": "empty", "prompt": ""}, {"id": "long", "prompt": "word " * 300},
            {"id": "ok", "prompt": "Hello", "max_tokens": 2},
            {"id": "past", "prompt": "Hello", "max_tokens": 500}]
    out = tmp_path / "out.jsonl"
    mpillm("run", "--model", model, "--prompts", write_jsonl(tmp_path / "in.jsonl", rows), "--output", out,
           "--max-model-len", "64", check=0)
    by = {rid(r): r for r in records(out)}
    assert by["empty"]["finish_reason"] == "error" and "empty" in by["empty"]["error"]["message"]
    assert by["long"]["finish_reason"] == "error" and "64" in by["long"]["error"]["message"]
    assert by["ok"]["finish_reason"] == "length"
    assert by["past"]["finish_reason"] == "length"
    assert by["past"]["usage"]["prompt_tokens"] + by["past"]["usage"]["completion_tokens"] == 64


def test_existing_output_needs_resume_or_overwrite(model, tmp_path, single_run):
    out = tmp_path / "out.jsonl"
    shutil.copy(single_run[0], out)
    p = mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", out, check=2)
    assert "--resume" in p.stderr


def test_resume_after_torn_write(model, tmp_path, single_run):
    out = tmp_path / "out.jsonl"
    shutil.copy(single_run[0], out)
    shutil.copy(str(single_run[0]) + ".manifest.json", str(out) + ".manifest.json")
    lines = out.read_text().splitlines(keepends=True)
    kept = lines[:2]
    out.write_text("".join(kept) + lines[2][: len(lines[2]) // 2])       # a kill mid-write
    mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", out, "--resume", check=0)
    recs = records(out)
    assert out.read_text().startswith("".join(kept))                    # finished lines untouched
    assert sorted(map(rid, recs)) == sorted(map(rid, records(single_run[0])))
    greedy = {rid(r): ids_of(r) for r in records(single_run[0])}
    for r in recs:
        assert ids_of(r) == greedy[rid(r)]
    # Different settings: refused without --force.
    p = mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", out, "--resume", "--temperature", "0.5", check=2)
    assert "temperature" in p.stderr and "--force" in p.stderr


@needs_mpi
def test_tp2_equals_tp1_and_replicas_answer_once(model, tmp_path, single_run):
    base = {rid(r): ids_of(r) for r in records(single_run[0])}
    out = tmp_path / "tp2.jsonl"
    mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", out, "--tp", "2", ranks=2, check=0)
    assert {rid(r): ids_of(r) for r in records(out)} == base
    out = tmp_path / "dp2.jsonl"
    mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", out, "--tp", "1", ranks=2, check=0)
    recs = records(out)
    assert sorted(map(rid, recs)) == sorted(base)                      # each id exactly once
    assert {rid(r): ids_of(r) for r in recs} == base


@needs_mpi
def test_bad_layout_is_one_clear_error(model, tmp_path):
    t = time.time()
    p = mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", tmp_path / "o.jsonl", "--tp", "2",
               ranks=3, timeout=120, check=2)
    assert p.stderr.count("multiple of --tp") == 1
    p = mpillm("run", "--model", tmp_path / "missing.gguf", "--prompts", EXAMPLES, "--output", tmp_path / "o.jsonl",
               "--tp", "2", ranks=2, timeout=120, check=2)
    assert p.stderr.count("no such file") == 1
    assert not (tmp_path / "o.jsonl").exists()
    assert time.time() - t < 100


@needs_mpi
def test_rank_failure_ends_every_rank(model, tmp_path):
    t = time.time()
    p = mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", tmp_path / "o.jsonl", "--tp", "2",
               ranks=2, timeout=120, env={"MPILLM_FAIL_AT": "1:3"})
    assert p.returncode != 0
    assert "rank 1 of 2 failed while" in p.stderr and "injected failure" in p.stderr
    assert time.time() - t < 100


@needs_mpi
def test_sigterm_preempts_then_resume_finishes(model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Count from {i}:", "max_tokens": 24} for i in range(24)]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpillm", "run", "--model", model, "--prompts", str(prompts),
           "--output", str(out), "--tp", "1", "--max-num-seqs", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.1)
    assert proc.poll() is None, "job ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)         # mpiexec forwards it to every rank, as Slurm does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "--resume" in err
    partial = records(out)
    assert 2 <= len(partial) < len(rows)
    mpillm("run", "--model", model, "--prompts", prompts, "--output", out, "--resume", ranks=2, check=0)
    final = records(out)
    assert sorted(map(rid, final)) == sorted(r["id"] for r in rows)


def test_memory_that_does_not_fit_is_refused_before_any_request(model, tmp_path):
    out = tmp_path / "o.jsonl"
    p = mpillm("run", "--model", model, "--prompts", EXAMPLES, "--output", out, "--kv-cache-memory", "100000",
               "--device", "cpu", check=2)
    assert "GiB is available" in p.stderr and "--kv-cache-memory" in p.stderr and "--tp" in p.stderr
    assert not out.exists()


@needs_mpi
def test_killed_rank_ends_the_job(model, tmp_path):
    """A rank killed outright (no exception, no goodbye) mid-run: the launcher ends the others, no hang."""
    rows = [{"id": f"r{i}", "prompt": f"Count to {i}:", "max_tokens": 64} for i in range(16)]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpillm", "run", "--model", model, "--prompts", str(prompts),
           "--output", str(out), "--tp", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and victim is None and proc.poll() is None:
        time.sleep(0.2)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if str(out).encode() in args and (b"PMI_RANK=1\0" in env or b"OMPI_COMM_WORLD_RANK=1\0" in env) and args[0] != MPIEXEC.encode():
                victim = int(pid)
    assert victim is not None, "rank 1 never started"
    time.sleep(3)                                 # let it get into the generation loop
    t = time.time()
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.time() - t < 60


def test_shutdown_watchdog_leaves_a_hung_teardown_with_the_agreed_code():
    code = ("import time; from mpillm import job; job.SHUTDOWN_GRACE_S = 0.5; job.shutdown_watchdog(75); "
            "time.sleep(60)")   # a teardown that never returns
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 75 and "teardown took over" in p.stderr
    assert time.time() - t < 20


def test_default_model_manifest_is_stable_across_first_fetch(tmp_path, monkeypatch):
    from mpillm.job import model_identity
    monkeypatch.setenv("MPILLM_CACHE", str(tmp_path / "empty-cache"))
    before = model_identity(None)               # not cached yet
    (tmp_path / "empty-cache").mkdir()
    from mpillm.default_model import DEFAULT_MODEL_NAME
    (tmp_path / "empty-cache" / DEFAULT_MODEL_NAME).write_bytes(b"x")
    assert model_identity(None) == before      # cached now: a resume must not see "different settings"
    assert model_identity("some/dir") == os.path.abspath("some/dir")


def test_run_int8_on_cpu_picks_a_group_size_and_records_it(model, tmp_path):
    """--quantize int8 without --group-size: 128 does not divide SmolLM2's 576, so 64 is taken and said; the
    manifest records the setting; an explicit --group-size 128 is a usage error naming the one that works."""
    rows = [{"id": "a", "prompt": "The capital of France is", "max_tokens": 6}]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    p = mpillm("run", "--model", model, "--prompts", prompts, "--output", out, "--quantize", "int8",
               "--device", "cpu", "--no-progress", check=0)
    assert "--quantize int8: groups of 64" in p.stderr
    assert len(records(out)[0]["token_ids"]) == 6
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["quantize"] == "int8/gauto"
    p = mpillm("run", "--model", model, "--prompts", prompts, "--output", tmp_path / "o2.jsonl", "--quantize",
               "int8", "--group-size", "128", "--device", "cpu", check=2)
    assert "--group-size 64" in p.stderr
    p = mpillm("run", "--model", model, "--prompts", prompts, "--output", tmp_path / "o3.jsonl", "--group-size", "64",
               "--device", "cpu", check=2)
    assert "apply to --quantize int8 (got --quantize auto)" in p.stderr
    assert not (tmp_path / "o3.jsonl").exists()


def _reencode(src, dst, qtype):
    """A copy of the GGUF `src` with every Q4_1 tensor decoded and re-encoded as `qtype` by the gguf package."""
    import gguf
    import numpy as np
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = {"sub_type": f.types[-1]} if f.types[0] == gguf.GGUFValueType.ARRAY else {}
        w.add_key_value(name, f.contents(), f.types[0], **sub)
    n = 0
    for t in r.tensors:
        data, kind = np.asarray(t.data), t.tensor_type
        if kind == gguf.GGMLQuantizationType.Q4_1:
            x = gguf.quants.dequantize(data, kind).reshape([int(d) for d in reversed(t.shape)])
            data, kind, n = gguf.quants.quantize(x, qtype), qtype, n + 1
        w.add_tensor(t.name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


@needs_mpi
def test_run_a_decoded_gguf_type_at_tp2(model, single_run, tmp_path):
    """A GGUF type that loads decoded (formats.GGUF_DECODED), end to end: the default model's 210 Q4_1 projections
    re-encoded as Q5_0, at TP 2. Its greedy answers are the Q4_1 model's where those are not near a tie."""
    from gguf import GGMLQuantizationType as Q
    q5 = tmp_path / "smol-q5_0.gguf"
    assert _reencode(model, q5, Q.Q5_0) == 210
    out = tmp_path / "out.jsonl"
    mpillm("run", "--model", q5, "--prompts", EXAMPLES, "--output", out, ranks=2, check=0)
    ours, base = {rid(r): r for r in records(out)}, {rid(r): r for r in records(single_run[0])}
    assert set(ours) == set(base) and not any("error" in r and r["error"] for r in ours.values())
    assert ids_of(ours["count"]) == ids_of(base["count"])            # " 6, 7, 8, 9, 10,"
    assert "Paris" in ours["capital"]["text"]
