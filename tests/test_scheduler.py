"""Scheduler: continuous batching, chunked prefill, max_num_seqs, preemption by recompute (pure Python).

Steps are simulated the way the engine drives them: every scheduled (seq, n) advances seq.num_computed by n,
the blocks are published with mark_computed, a sequence whose prefill is done gets a fake generated token, and
a sequence that reached its max_tokens is finished. A fake KV store checks that every token a step reads back
through the block table (cached prefix included) is the sequence's own.
"""

import random

import pytest

from mpillm.block_manager import BlockManager
from mpillm.scheduler import Scheduler, Sequence


def check_invariants(bm: BlockManager, tables):
    """ref counts == holders, free list == blocks with ref 0, shared blocks are published prefix blocks."""
    count = [0] * bm.num_blocks
    where = {}
    for t in tables:
        assert len(set(t)) == len(t), f"a table holds a block twice: {t}"
        for i, b in enumerate(t):
            count[b] += 1
            where.setdefault(b, set()).add(i)
    assert bm.ref == count, f"ref counts {bm.ref} != holders {count}"
    assert set(bm.free) == {b for b in range(bm.num_blocks) if count[b] == 0}
    assert len(bm.free) == count.count(0)
    assert len(bm.hash_of) == len(bm.block_of)
    for b, h in bm.hash_of.items():
        assert bm.block_of[h] == b
    for b, c in enumerate(count):
        if c > 1:
            assert b in bm.hash_of and len(where[b]) == 1, f"block {b} shared without a prefix hit"


def ident(tokens, p):
    return tokens[p], p, hash(tuple(tokens[: p + 1]))


def fake_token(seq):
    """Deterministic in the sequence's content (like greedy decoding), so equal prompts generate equal text."""
    return hash(tuple(seq.token_ids[-3:])) % 50


class Sim:
    def __init__(self, num_blocks, block_size, max_num_seqs, budget, prefix_caching=True):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget)
        self.kv = {}
        self.finished = []
        self.all = []
        self.steps = 0

    def add(self, seq_id, prompt, max_tokens):
        seq = Sequence(seq_id, list(prompt), len(prompt), max_tokens)
        self.sched.add(seq)
        self.all.append(seq)
        return seq

    def live_tables(self):
        return [s.block_table for s in self.sched.running]

    def step(self, plan=None):
        plan = self.sched.schedule() if plan is None else plan
        self.steps += 1
        bm, bs = self.bm, self.bm.block_size
        assert sum(n for _, n in plan) <= self.sched.budget
        assert len(plan) <= self.sched.max_num_seqs and len(self.sched.running) <= self.sched.max_num_seqs
        assert len({s.seq_id for s, _ in plan}) == len(plan)
        for seq, n in plan:
            assert seq in self.sched.running and n >= 1
            assert seq.num_computed + n <= len(seq.token_ids)
            assert len(seq.block_table) * bs >= seq.num_computed + n, "no blocks for the step's tokens"
            for p in range(seq.num_computed):              # what attention reads back must be ours
                assert self.kv[(seq.block_table[p // bs], p % bs)] == ident(seq.token_ids, p), \
                    f"seq {seq.seq_id} reads foreign KV at position {p}"
            for p in range(seq.num_computed, seq.num_computed + n):
                b = seq.block_table[p // bs]
                assert bm.ref[b] == 1 and b not in bm.hash_of, f"seq {seq.seq_id} writes into shared block {b}"
                self.kv[(b, p % bs)] = ident(seq.token_ids, p)
        done = []
        for seq, n in plan:
            seq.num_computed += n
            bm.mark_computed(seq.block_table, seq.block_hashes, seq.token_ids, seq.num_computed)
            if seq.num_computed == len(seq.token_ids):
                seq.token_ids.append(fake_token(seq))
                if seq.num_generated >= seq.max_tokens:
                    self.sched.finish(seq)
                    done.append(seq)
        self.finished += done
        check_invariants(bm, self.live_tables())
        return plan, done

    def run(self, max_steps=10_000):
        while self.sched.has_work():
            self.step()
            assert self.steps < max_steps, "no progress"


# ------------------------------------------------------------------------------------------------ chunked prefill

def test_chunked_prefill_100_tokens_budget_32_takes_4_steps():
    sim = Sim(num_blocks=64, block_size=16, max_num_seqs=8, budget=32)
    seq = sim.add(0, list(range(100)), max_tokens=3)
    sizes = []
    while seq.num_generated == 0:
        plan, _ = sim.step()
        assert [s for s, _ in plan] == [seq]
        sizes.append(plan[0][1])
    assert sizes == [32, 32, 32, 4]
    assert seq.num_computed == 100 and seq.num_generated == 1
    sim.run()
    assert seq.num_generated == 3 and sim.steps == 6          # then one decode token per step
    assert sim.bm.num_free == 64


def test_decode_tokens_come_first_in_the_budget():
    sim = Sim(num_blocks=64, block_size=16, max_num_seqs=8, budget=32)
    a = sim.add(0, list(range(10)), max_tokens=50)
    b = sim.add(1, list(range(100, 112)), max_tokens=50)
    plan, _ = sim.step()
    assert plan == [(a, 10), (b, 12)]
    assert a.num_generated == 1 and b.num_generated == 1
    c = sim.add(2, list(range(200, 300)), max_tokens=5)       # a long prompt arrives while a, b decode
    chunks = []
    while c.num_generated == 0:
        plan, _ = sim.step()
        d = dict((s.seq_id, n) for s, n in plan)
        assert d[0] == 1 and d[1] == 1, f"decode tokens starved: {plan}"
        assert plan[0][0] is a and plan[1][0] is b            # running sequences come first
        chunks.append(d[2])
    assert chunks == [30, 30, 30, 10]
    plan, _ = sim.step()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1), (1, 1), (2, 1)]


def test_continuous_batching_admits_mid_decode():
    """A new request starts as soon as blocks free up, while the others are still decoding."""
    sim = Sim(num_blocks=6, block_size=4, max_num_seqs=8, budget=64)
    a = sim.add(0, list(range(7)), max_tokens=2)        # 2 blocks
    b = sim.add(1, list(range(20, 27)), max_tokens=6)   # 2 blocks, a third one later
    c = sim.add(2, list(range(40, 49)), max_tokens=3)   # 3 blocks: does not fit at first
    plan, _ = sim.step()
    assert [s.seq_id for s, _ in plan] == [0, 1] and c in sim.sched.waiting
    plan, done = sim.step()
    assert done == [a]                               # a finishes, b is mid-decode
    admitted_at = None
    while sim.sched.has_work():
        plan, _ = sim.step()
        ids = [s.seq_id for s, _ in plan]
        if 2 in ids and admitted_at is None:
            admitted_at = sim.steps
            assert b in sim.sched.running and 0 < b.num_generated < b.max_tokens
            assert dict((s.seq_id, n) for s, n in plan)[1] == 1
    assert admitted_at == 3
    assert sim.sched.num_preemptions == 0
    assert [s.num_generated for s in (a, b, c)] == [2, 6, 3]


def test_max_num_seqs_honoured():
    sim = Sim(num_blocks=200, block_size=4, max_num_seqs=3, budget=1000)
    seqs = [sim.add(i, [i] * 5, max_tokens=4 + i) for i in range(7)]
    peak = 0
    while sim.sched.has_work():
        plan, _ = sim.step()
        assert len(plan) <= 3 and len(sim.sched.running) <= 3
        peak = max(peak, len(sim.sched.running))
    assert peak == 3
    assert all(s.num_generated == s.max_tokens for s in seqs)
    # admission in arrival order as slots free up
    assert [s.seq_id for s in sim.finished][:3] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ preemption

def test_preemption_by_recompute_of_the_most_recent():
    # 8 blocks of 4 tokens = 32 slots; three sequences of 8-token prompts that each grow to 16 tokens
    sim = Sim(num_blocks=8, block_size=4, max_num_seqs=8, budget=64, prefix_caching=False)
    a = sim.add(0, list(range(8)), max_tokens=8)
    b = sim.add(1, list(range(10, 18)), max_tokens=8)
    c = sim.add(2, list(range(20, 28)), max_tokens=8)
    sim.step()
    assert sim.sched.running == [a, b, c] and sim.bm.num_free == 2
    victim_seen = False
    while sim.sched.has_work():
        before = {s.seq_id: (s.num_computed, s.num_generated) for s in (a, b, c)}
        n_pre = sim.sched.num_preemptions
        plan = sim.sched.schedule()
        if sim.sched.num_preemptions > n_pre and not victim_seen:
            victim_seen = True
            # the most recently admitted goes: its blocks freed, its KV forgotten, back at the waiting head
            assert c.preemptions == 1 and a.preemptions == 0 and b.preemptions == 0
            assert c not in sim.sched.running and sim.sched.waiting[0] is c
            assert c.num_computed == 0 and c.block_table == [] and c.block_hashes == []
            assert c.num_generated == before[2][1] > 0            # keeps what it generated
        sim.step(plan)
        assert sim.steps < 200
    assert victim_seen and c.preemptions >= 1
    # re-admitted later: the recomputed sequence ends with all its tokens
    assert [s.num_generated for s in (a, b, c)] == [8, 8, 8]
    assert len(c.token_ids) == 16
    assert sim.bm.num_free == 8


def test_preempted_sequence_outputs_unchanged():
    """Preemption must not change what is generated: compare with a run on an ample cache."""
    def run(num_blocks):
        sim = Sim(num_blocks=num_blocks, block_size=4, max_num_seqs=16, budget=24)
        rng = random.Random(7)
        for i in range(10):
            sim.add(i, [rng.randrange(40) for _ in range(rng.randrange(1, 20))], rng.randrange(1, 20))
        sim.run()
        return {s.seq_id: s.token_ids for s in sim.all}, sim.sched.num_preemptions
    small, npre = run(12)
    big, npre_big = run(1000)
    assert npre > 0 and npre_big == 0
    assert small == big


def test_running_seq_preempted_for_earlier_one_is_skipped_this_step():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=64, prefix_caching=False)
    a = sim.add(0, list(range(8)), max_tokens=8)          # 2 blocks, 9th token needs a 3rd
    b = sim.add(1, list(range(10, 18)), max_tokens=8)     # 2 blocks
    plan, _ = sim.step()
    assert sim.bm.num_free == 0
    plan, _ = sim.step()                                  # a needs a block: b is preempted, only a runs
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1)]
    assert b.preemptions == 1 and list(sim.sched.waiting) == [b]
    sim.run()
    assert a.num_generated == 8 and b.num_generated == 8


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prompt_larger_than_cache_raises(prefix_caching):
    sim = Sim(num_blocks=4, block_size=16, max_num_seqs=4, budget=32, prefix_caching=prefix_caching)
    sim.add(0, list(range(100)), max_tokens=1)            # 100 tokens > 64 slots
    with pytest.raises(RuntimeError, match="KV cache too small"):
        for _ in range(50):
            sim.step()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_generation_outgrowing_cache_raises(prefix_caching):
    sim = Sim(num_blocks=4, block_size=16, max_num_seqs=4, budget=32, prefix_caching=prefix_caching)
    sim.add(0, list(range(50)), max_tokens=40)            # fits at first, 90 tokens never do
    with pytest.raises(RuntimeError, match="KV cache too small"):
        for _ in range(200):
            sim.step()


def test_prompt_larger_than_cache_raises_at_once_when_first_chunk_does_not_fit():
    sim = Sim(num_blocks=2, block_size=16, max_num_seqs=4, budget=64)
    sim.add(0, list(range(40)), max_tokens=1)
    with pytest.raises(RuntimeError, match=r"2 blocks of 16 tokens .* 40-token"):
        sim.sched.schedule()


def test_drop_all_frees_everything():
    sim = Sim(num_blocks=10, block_size=4, max_num_seqs=2, budget=64)
    seqs = [sim.add(i, list(range(i, i + 9)), max_tokens=20) for i in range(4)]
    sim.step()
    sim.step()
    assert len(sim.sched.running) == 2 and len(sim.sched.waiting) == 2
    left = sim.sched.drop_all()
    assert sorted(s.seq_id for s in left) == [0, 1, 2, 3]
    assert not sim.sched.has_work()
    assert sim.bm.num_free == 10 and sim.bm.ref == [0] * 10
    check_invariants(sim.bm, [])
    assert seqs[0].block_table == []


# ------------------------------------------------------------------------------------------------ prefix caching

def test_prefix_hits_across_requests_and_only_after_compute():
    sim = Sim(num_blocks=64, block_size=16, max_num_seqs=8, budget=64)
    prefix = list(range(1000, 1040))                      # 40 shared tokens
    a = sim.add(0, prefix + [1, 2, 3], max_tokens=5)
    b = sim.add(1, prefix + [4, 5], max_tokens=2)         # same step as a: a's KV not computed yet
    plan, _ = sim.step()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 43), (1, 21)]
    assert b.num_computed == 21 and not set(a.block_table) & set(b.block_table)
    c = sim.add(2, prefix + [6, 7, 8], max_tokens=2)
    plan, _ = sim.step()
    d = dict((s.seq_id, n) for s, n in plan)
    assert d[2] == 43 - 32 and c.block_table[:2] == a.block_table[:2]   # 2 full prefix blocks mapped
    assert sim.bm.hits >= 32
    sim.run()


def test_same_step_admissions_do_not_share_uncomputed_blocks():
    sim = Sim(num_blocks=64, block_size=16, max_num_seqs=8, budget=200)
    prefix = list(range(500, 540))
    a = sim.add(0, prefix + [1], max_tokens=3)
    b = sim.add(1, prefix + [2], max_tokens=3)
    plan, _ = sim.step()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 41), (1, 41)]
    assert not set(a.block_table) & set(b.block_table) and sim.bm.hits == 0
    sim.run()


# ------------------------------------------------------------------------------------------------ randomized

@pytest.mark.parametrize("prefix_caching", [True, False])
def test_randomized_simulation(prefix_caching):
    rng = random.Random(2024 + prefix_caching)
    bs = 4
    sim = Sim(num_blocks=40, block_size=bs, max_num_seqs=6, budget=24, prefix_caching=prefix_caching)
    bases = [[rng.randrange(50) for _ in range(60)] for _ in range(4)]
    want = {}
    pending = []
    for i in range(200):
        prompt = rng.choice(bases)[: rng.randrange(0, 60)] + [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
        max_tokens = rng.randrange(1, 40)
        prompt = prompt[: 40 * bs - max_tokens]               # every request fits the whole cache alone
        pending.append((i, prompt, max_tokens))
        want[i] = max_tokens
    mid_decode_admissions = 0
    while pending or sim.sched.has_work():
        for _ in range(rng.randrange(0, 4)):                  # requests keep arriving while others run
            if pending:
                sim.add(*pending.pop(0))
        decoding_before = any(s.num_generated > 0 for s in sim.sched.running)
        running_before = {s.seq_id for s in sim.sched.running}
        plan, _ = sim.step()
        if decoding_before and any(s.seq_id not in running_before and s.preemptions == 0 for s, _ in plan):
            mid_decode_admissions += 1
        assert sim.steps < 20_000
    assert len(sim.finished) == 200
    assert {s.seq_id: s.num_generated for s in sim.finished} == want
    assert all(len(s.token_ids) == s.num_prompt + want[s.seq_id] for s in sim.finished)
    assert sim.sched.num_preemptions > 0 and mid_decode_admissions > 0
    assert sim.bm.num_free == 40 and sim.bm.ref == [0] * 40
    if prefix_caching:
        assert sim.bm.hits > 0
    else:
        assert sim.bm.hits == 0 and sim.bm.hash_of == {}
