"""The benchmark's workload is part of the contract of its numbers: fixed, seeded, in the stated ranges."""

import numpy as np


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
