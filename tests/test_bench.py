"""The benchmark's workload is part of the contract of its numbers: fixed, seeded, in the stated ranges."""

import importlib.util
from pathlib import Path

import numpy as np


def _bench():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sharegpt_like_workload_is_seeded_and_in_range():
    bench = _bench()
    a, b = bench.sharegpt_like(1000, 32000), bench.sharegpt_like(1000, 32000)
    assert [(p, o) for p, o in a] == [(p, o) for p, o in b]           # same requests every run
    plen = np.array([len(p) for p, _ in a])
    olen = np.array([o for _, o in a])
    assert plen.min() >= 4 and plen.max() <= 1024 and olen.min() >= 4 and olen.max() <= 512
    assert 100 < np.median(plen) < 300 and 100 < np.median(olen) < 350   # ShareGPT-like medians
    assert all(0 <= t < 32000 for p, _ in a[:50] for t in p)
    assert bench.sharegpt_like(10, 32000, seed=1) != bench.sharegpt_like(10, 32000, seed=0)
