"""The trace build (MPILLM_TRACE=1) on a GPU: bench.py --timeline reads a decode graph's stamps back, and every
launch of the graph is there, whole, in order, with times that make sense (waits return after they are entered,
blocks end after their wait, the nodes' spans add up to about the step)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("quantize", ["none", "q4"])
def test_bench_timeline_lines_the_stamps_up_with_the_graph(tmp_path, cuda_device, quantize):
    out = tmp_path / "t.jsonl"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", "dummy:smollm2-135m", "--batch", "1,4",
           "--steps", "24", "--prefill=", "--quantize", quantize, "--timeline", "--json", str(out)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    decode = {r["batch"]: r for r in lines if r["kind"] == "decode"}
    timelines = {r["batch"]: r for r in lines if r["kind"] == "timeline"}
    assert set(timelines) == {1, 4}, proc.stdout
    for B, t in timelines.items():
        rows = t["rows"]
        assert t["steps"] >= 3 and len(rows) > 30 * 4                  # 30 layers of several kernels each
        spans = np.array([r["span"] for r in rows])
        assert np.all(spans[:-1] > 0)                                  # each node released after the one before
        # The nodes' spans are the step from release to release; the traced step, timed on the host, is that plus
        # the staging between graph launches.
        assert 0.5 * t["ms_step"] * 1e3 < spans.sum() <= 1.05 * t["ms_step"] * 1e3, (spans.sum(), t["ms_step"])
        for r in rows:
            assert 0.0 <= r["early"] <= 1.0 and r["lead"] >= 0 and r["late"] >= 0, r
            if r["kernel"].startswith(("gemv", "qgemv", "attention_decode", "sample")):   # these stamp their ends
                assert r["end"] > 0 and r["tail"] >= 0, r
        assert any(r["kernel"].startswith("attention_decode") for r in rows)
        assert decode[B]["tok_s"] > 0
    assert "# timeline batch 1" in proc.stdout and "µs/launch" in proc.stdout
