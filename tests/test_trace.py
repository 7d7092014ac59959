"""mpillm/cuda/trace.py's reading of the kernels' stamps (bench.py --timeline), on records made by hand: steps
found wherever the kept launches begin, each node's numbers exactly those put in, launches that do not match the
graph refused by name."""

import numpy as np
import pytest

from mpillm.cuda import trace

SEQ = [("embed", 2), ("proj", 3), ("attn", 1)]


def launch(gridid, entered, released, ends=()):
    """Records of one launch: block b entered its wait at entered[b] and left it at released[b] (ns)."""
    rows = [(gridid, b | 7 << 32, e, r) for b, (e, r) in enumerate(zip(entered, released))]
    rows += [(gridid, trace.KIND_END | b, t, t) for b, t in enumerate(ends)]
    return rows


def step_records(first_gridid, t0):
    """One step of SEQ from t0 (ns): embed released at t0, proj at t0 + 1000 (two of its blocks placed 300 ns
    early, one 200 ns late; block ends 1500, 1600, 2400 after its release), attn at t0 + 3000, the next step at
    t0 + 4000."""
    g = first_gridid
    rows = launch(g, [t0 - 50, t0], [t0, t0 + 20])
    rows += launch(g + 1, [t0 + 700, t0 + 800, t0 + 1200], [t0 + 1000, t0 + 1000, t0 + 1200],
                   ends=[t0 + 2500, t0 + 2600, t0 + 3400])
    rows += launch(g + 2, [t0 + 2900], [t0 + 3000])
    return rows


def records(n_steps, t0=10**9, period=40_000):
    """n_steps replays of the graph, `period` ns apart: %gridid names the node, the same at every replay."""
    rows = [r for s in range(n_steps) for r in step_records(100, t0 + period * s)]
    return np.array(rows, np.uint64)


def test_steps_and_each_nodes_numbers():
    steps = trace.timeline(records(4), SEQ)
    assert len(steps) == 4 and [g.blocks for g in steps[0]] == [2, 3, 1]
    rows = {r["kernel"]: r for r in trace.summarize(steps, SEQ)}
    p = rows["proj"]
    assert p["span"] == pytest.approx(2.0) and p["lead"] == pytest.approx(0.3)
    assert p["early"] == pytest.approx(2 / 3) and p["late"] == pytest.approx(0.2)
    assert p["end"] == pytest.approx(2.4) and p["tail"] == pytest.approx(0.8) and p["gap"] == pytest.approx(-0.4)
    assert rows["embed"]["span"] == pytest.approx(1.0) and rows["embed"]["lead"] == pytest.approx(0.05)
    assert rows["attn"]["span"] == pytest.approx(37.0)   # to the next step's first release (3 of 4 steps have one)
    assert np.isnan(rows["attn"]["end"]) and np.isnan(rows["attn"]["gap"])   # attn stamps no ends
    table = trace.by_kernel(trace.summarize(steps, SEQ))
    assert [o["kernel"] for o in table] == ["attn", "proj", "embed"]             # largest span first
    text = trace.report(trace.summarize(steps, SEQ), "test")
    assert "40.0 µs" in text and text.count("\n") == 4 and "attn" in text.splitlines()[2]


def test_records_in_any_order_and_a_buffer_full_mid_step():
    """The counter hands out slots as blocks arrive, so records come in no particular order; the buffer may fill up
    in the middle of a step. Steps are told apart by the graph's first node, ends go to their own step, and only
    whole steps are laid out."""
    rows = records(4)[:-5]                        # the last step's proj ends and attn missing
    rows = rows[np.random.default_rng(0).permutation(len(rows))]
    steps = trace.timeline(rows, SEQ)
    assert len(steps) == 3 and all(len(s[1].ends) == 3 for s in steps)
    assert [int(s[1].ends.max()) - int(s[1].released.min()) for s in steps] == [2400] * 3


def test_two_captures_of_the_graph_taking_turns():
    """Decode graphs alternate between two captures (one per metadata turn): the second one's nodes have other ids,
    and every step of either is laid out with the numbers put in."""
    rows = np.array([r for s in range(6) for r in step_records(100 if s % 2 == 0 else 200, 10**9 + 40_000 * s)],
                    np.uint64)
    steps = trace.timeline(rows[np.random.default_rng(1).permutation(len(rows))], SEQ)
    assert len(steps) == 6 and [s[0].gridid for s in steps] == [100, 200] * 3
    rows = {r["kernel"]: r for r in trace.summarize(steps, SEQ)}
    assert rows["proj"]["span"] == pytest.approx(2.0) and rows["proj"]["end"] == pytest.approx(2.4)
    assert rows["attn"]["span"] == pytest.approx(37.0)


def test_launches_that_do_not_match_the_graph_are_refused():
    with pytest.raises(trace.TimelineError, match="launch 2 has 1 blocks where attn has 2"):
        trace.timeline(records(3), [("embed", 2), ("proj", 3), ("attn", 2)])
    with pytest.raises(trace.TimelineError, match="no whole step"):
        trace.timeline(records(1)[:5], SEQ)          # embed and proj only
    with pytest.raises(trace.TimelineError, match="no kernel of ours"):
        trace.timeline(records(1), [])


def test_trace_setting():
    assert trace.trace_setting({}) is False and trace.trace_setting({"MPILLM_TRACE": "1"}) is True
    with pytest.raises(ValueError, match="MPILLM_TRACE='yes'"):
        trace.trace_setting({"MPILLM_TRACE": "yes"})
