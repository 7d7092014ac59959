"""BlockManager: paged KV bookkeeping, reference counts and prefix caching (pure Python, no model)."""

import random

from mpillm.block_manager import BlockManager, block_hash

BS = 16


def check_invariants(bm: BlockManager, tables):
    """The bookkeeping must agree with the block tables the sequences hold.

    * every block's reference count == the number of tables holding it, and no table holds a block twice;
    * the free list is exactly the blocks with reference count 0 (no duplicates);
    * hash_of / block_of are inverse maps;
    * a block is held by two tables only when it is a published prefix block, at the same index in both.
    """
    tables = [list(t) for t in tables]
    count = [0] * bm.num_blocks
    where = {}
    for t in tables:
        assert len(set(t)) == len(t), f"a table holds a block twice: {t}"
        for i, b in enumerate(t):
            assert 0 <= b < bm.num_blocks
            count[b] += 1
            where.setdefault(b, set()).add(i)
    assert bm.ref == count, f"ref counts {bm.ref} != holders {count}"
    assert len(bm.free) == bm.num_free
    assert set(bm.free) == {b for b in range(bm.num_blocks) if count[b] == 0}
    assert bm.num_free == sum(1 for c in count if c == 0)
    assert len(bm.hash_of) == len(bm.block_of)
    for b, h in bm.hash_of.items():
        assert bm.block_of[h] == b
    for b, c in enumerate(count):
        if c > 1:
            assert b in bm.hash_of, f"block {b} is shared by {c} tables but was never published"
            assert len(where[b]) == 1, f"shared block {b} sits at different indices {where[b]}"


def toks(n, start=0):
    return list(range(start, start + n))


# ------------------------------------------------------------------------------------------------ accounting

def test_allocate_free_accounting():
    bm = BlockManager(10, BS)
    assert bm.num_free == 10 and bm.blocks_needed(0) == 0
    assert [bm.blocks_needed(n) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]
    t1, h1, c1 = bm.allocate_prompt(toks(40), budget=1000)
    assert len(t1) == 3 and h1 == [] and c1 == 0
    assert bm.num_free == 7
    check_invariants(bm, [t1])
    # the first chunk only: budget 20 of a 100-token prompt needs 2 blocks
    t2, _, _ = bm.allocate_prompt(toks(100, 500), budget=20)
    assert len(t2) == 2 and bm.num_free == 5
    check_invariants(bm, [t1, t2])
    assert not set(t1) & set(t2)
    bm.free_table(t1)
    assert t1 == [] and bm.num_free == 8
    check_invariants(bm, [t2])
    bm.free_table(t2)
    assert bm.num_free == 10 and bm.ref == [0] * 10
    check_invariants(bm, [])


def test_allocate_fails_without_side_effects():
    bm = BlockManager(4, BS)
    t, _, _ = bm.allocate_prompt(toks(40), budget=1000)          # 3 blocks
    before = (list(bm.ref), list(bm.free), dict(bm.hash_of))
    assert bm.allocate_prompt(toks(40, 100), budget=1000) is None  # needs 3, 1 free
    assert (list(bm.ref), list(bm.free), dict(bm.hash_of)) == before
    got = bm.allocate_prompt(toks(40, 100), budget=16)              # one chunk of 16 fits
    assert got is not None and len(got[0]) == 1 and bm.num_free == 0
    check_invariants(bm, [t, got[0]])


def test_grow():
    bm = BlockManager(5, BS)
    t, _, _ = bm.allocate_prompt(toks(10), budget=10)
    assert len(t) == 1
    assert bm.grow(t, 16) and len(t) == 1          # still fits in the first block
    assert bm.grow(t, 17) and len(t) == 2
    assert bm.grow(t, 5) and len(t) == 2           # never shrinks
    assert bm.grow(t, 80) and len(t) == 5 and bm.num_free == 0
    check_invariants(bm, [t])
    snapshot = list(t)
    assert bm.grow(t, 81) is False
    assert t == snapshot and bm.num_free == 0      # unchanged on failure
    check_invariants(bm, [t])
    bm.free_table(t)
    check_invariants(bm, [])
    assert bm.num_free == 5


def test_grow_partial_failure_takes_nothing():
    bm = BlockManager(4, BS)
    t, _, _ = bm.allocate_prompt(toks(16), budget=16)
    assert not bm.grow(t, 16 * 6)                  # needs 5 more, 3 free: nothing taken
    assert len(t) == 1 and bm.num_free == 3
    check_invariants(bm, [t])


# ------------------------------------------------------------------------------------------------ prefix caching

def publish(bm, table, hashes, tokens, n):
    bm.mark_computed(table, hashes, tokens, n)


def test_prefix_shared_only_after_mark_computed():
    bm = BlockManager(16, BS)
    prefix = toks(40, 1000)
    a_tok, b_tok, c_tok = prefix + [1, 2, 3], prefix + [4, 5], prefix + [6, 7, 8, 9]
    ta, ha, ca = bm.allocate_prompt(a_tok, budget=1000)
    assert ca == 0 and len(ta) == 3
    # A's KV is not computed yet: B must not map A's blocks
    tb, hb, cb = bm.allocate_prompt(b_tok, budget=1000)
    assert cb == 0 and not set(ta) & set(tb) and bm.hits == 0
    check_invariants(bm, [ta, tb])
    # A computed only its first 20 tokens: one block is published, not two
    publish(bm, ta, ha, a_tok, 20)
    assert len(ha) == 1 and bm.hash_of == {ta[0]: ha[0]}
    tc, hc, cc = bm.allocate_prompt(c_tok, budget=1000)
    assert cc == 16 and tc[0] == ta[0] and hc == ha[:1]
    assert bm.ref[ta[0]] == 2
    check_invariants(bm, [ta, tb, tc])
    # the rest of A computed: a new sequence maps both full prefix blocks (the third holds A's own tail)
    publish(bm, ta, ha, a_tok, len(a_tok))
    assert len(ha) == 2
    td, hd, cd = bm.allocate_prompt(prefix + [42], budget=1000)
    assert cd == 32 and td[:2] == ta[:2] and td[2] not in ta and hd == ha[:2]
    assert bm.ref[ta[0]] == 3 and bm.ref[ta[1]] == 2
    assert bm.hits == 16 + 32
    check_invariants(bm, [ta, tb, tc, td])
    # hashes are chained over every token up to the block's end
    assert ha[0] == block_hash(b"", prefix[:16]) and ha[1] == block_hash(ha[0], prefix[16:32])


def test_same_block_content_at_other_position_is_not_a_hit():
    bm = BlockManager(16, BS)
    x = toks(16, 7)
    ta, ha, _ = bm.allocate_prompt(toks(16, 500) + x + [1], budget=1000)
    publish(bm, ta, ha, toks(16, 500) + x + [1], 33)
    _, _, cached = bm.allocate_prompt(x + [1, 2], budget=1000)
    assert cached == 0


def test_last_prompt_token_never_from_cache():
    bm = BlockManager(16, BS)
    p = toks(48, 3)
    ta, ha, _ = bm.allocate_prompt(p, budget=1000)
    publish(bm, ta, ha, p, 48)
    assert len(ha) == 3
    # identical 48-token prompt: 3 full blocks are published but only 2 may be used
    tb, _, cb = bm.allocate_prompt(p, budget=1000)
    assert cb == 32 and len(tb) == 3 and tb[:2] == ta[:2] and tb[2] != ta[2]
    # a 33-token prefix: 2 blocks cached, the 33rd token computed
    _, _, c33 = bm.allocate_prompt(p[:33], budget=1000)
    assert c33 == 32
    # a 32-token prefix: only 1 block, tokens 17..32 are recomputed
    _, _, c32 = bm.allocate_prompt(p[:32], budget=1000)
    assert c32 == 16
    # a one-block prompt is never served from the cache at all
    _, _, c16 = bm.allocate_prompt(p[:16], budget=1000)
    assert c16 == 0
    assert bm.cached_prefix(p[:1]) == ([], [])


def test_freed_blocks_stay_hittable_lru_and_recycled_block_loses_hash():
    bm = BlockManager(8, 4)
    p = toks(12, 100)                                    # 3 blocks of 4
    ta, ha, _ = bm.allocate_prompt(p, budget=1000)
    publish(bm, ta, ha, p, 12)
    assert len(bm.hash_of) == 3
    a_blocks = list(ta)
    bm.free_table(ta)
    assert bm.num_free == 8 and len(bm.hash_of) == 3     # freed, still cached
    check_invariants(bm, [])
    # the free list is LRU: never-used blocks go first, then A's tail block, then its head
    other = toks(16, 900)
    tx, _, _ = bm.allocate_prompt(other, budget=1000)   # 4 never-used blocks
    assert not set(tx) & set(a_blocks)
    # A's prefix is still a hit, even though its blocks are free
    tb, hb, cb = bm.allocate_prompt(p + [1], budget=1000)
    assert cb == 12 and tb[:3] == a_blocks and hb == ha
    check_invariants(bm, [tx, tb])
    bm.free_table(tb)
    bm.free_table(tx)
    check_invariants(bm, [])
    # Eviction order: take 5 untouched + freed blocks until A's tail block is recycled; head ones stay hittable
    order = list(bm.free)
    assert order.index(a_blocks[2]) < order.index(a_blocks[0])  # tail freed first -> evicted first
    held = []
    while a_blocks[2] not in held:
        t, _, _ = bm.allocate_prompt([10_000 + len(held)], budget=1)
        held.append(t[0])
    assert a_blocks[2] not in bm.hash_of and ha[2] not in bm.block_of   # recycled: hash forgotten
    assert a_blocks[0] in bm.hash_of and a_blocks[1] in bm.hash_of
    tl, _, cached = bm.allocate_prompt(p + [1], budget=1000)
    assert cached == 8 and tl[:2] == a_blocks[:2]        # only the first two blocks left
    check_invariants(bm, [[b] for b in held] + [tl])


def test_recycled_hashed_block_does_not_serve_stale_prefix():
    bm = BlockManager(3, 4)
    p = toks(8, 50)
    ta, ha, _ = bm.allocate_prompt(p, budget=100)
    publish(bm, ta, ha, p, 8)
    bm.free_table(ta)
    # use every block for something else: both of A's cached blocks are overwritten
    tx, hx, _ = bm.allocate_prompt(toks(12, 700), budget=100)
    assert bm.num_free == 0 and bm.hash_of == {} and bm.block_of == {}
    bm.free_table(tx)
    _, _, cached = bm.allocate_prompt(p + [9], budget=100)
    assert cached == 0


def test_hit_on_free_blocks_counts_them_against_free_space():
    """A cached prefix sitting in the free list cannot be used both as the hit and as fresh blocks."""
    bm = BlockManager(4, 4)
    p = toks(12, 10)
    ta, ha, _ = bm.allocate_prompt(p, budget=100)
    publish(bm, ta, ha, p, 12)
    ta_blocks = list(ta)
    bm.free_table(ta)
    # prompt of 17 tokens with a 12-token cached prefix (3 free-listed blocks): needs 2 more blocks, 1 left
    assert bm.allocate_prompt(p + toks(5, 90), budget=100) is None
    check_invariants(bm, [])
    assert len(bm.hash_of) == 3
    got = bm.allocate_prompt(p + toks(4, 90), budget=100)   # 16 tokens: 3 cached blocks + 1 fresh: fits
    assert got is not None and got[2] == 12 and got[0][:3] == ta_blocks
    check_invariants(bm, [got[0]])


def test_duplicate_content_is_published_once():
    bm = BlockManager(8, 4)
    p = toks(9, 30)
    ta, ha, _ = bm.allocate_prompt(p, budget=100)
    tb, hb, _ = bm.allocate_prompt(p, budget=100)          # before A is computed: separate blocks
    publish(bm, ta, ha, p, 9)
    publish(bm, tb, hb, p, 9)
    assert ha == hb and len(ha) == 2
    assert all(bm.block_of[h] in ta for h in ha)           # the first publisher wins
    assert not any(b in bm.hash_of for b in tb)
    check_invariants(bm, [ta, tb])
    bm.free_table(ta)
    _, _, cached = bm.allocate_prompt(p, budget=100)
    assert cached == 8
    bm.free_table(tb)


def test_prefix_caching_off():
    bm = BlockManager(8, 4, prefix_caching=False)
    p = toks(12, 1)
    ta, ha, _ = bm.allocate_prompt(p, budget=100)
    bm.mark_computed(ta, ha, p, 12)
    assert ha == [] and bm.hash_of == {}
    _, _, cached = bm.allocate_prompt(p, budget=100)
    assert cached == 0 and bm.hits == 0


# ------------------------------------------------------------------------------------------------ randomized

def test_randomized_invariants():
    """Random allocate / grow / compute / free with a few shared prefixes; invariants after every operation and
    a fake KV store proving that every block a sequence maps (including prefix hits) holds that sequence's
    tokens: kv[block][offset] = (token, position, hash of the whole prefix)."""
    rng = random.Random(1234)
    bs = 4
    bm = BlockManager(24, bs)
    kv = {}
    bases = [[rng.randrange(30) for _ in range(20)] for _ in range(3)]
    live = []                                            # [tokens, table, hashes, computed]
    hits = 0
    for it in range(3000):
        op = rng.random()
        if op < 0.3 or not live:
            base = rng.choice(bases)
            tokens = base[: rng.randrange(1, 21)] + [rng.randrange(30) for _ in range(rng.randrange(0, 8))]
            if not tokens:
                continue
            got = bm.allocate_prompt(tokens, budget=rng.randrange(1, 12))
            if got is None:
                continue
            table, hashes, cached = got
            hits += cached
            assert cached % bs == 0 and cached < len(tokens)
            for p in range(cached):                      # the cached prefix holds exactly our KV
                assert kv[(table[p // bs], p % bs)] == ident(tokens, p)
            live.append([tokens, table, hashes, cached])
        elif op < 0.75:
            s = rng.choice(live)
            tokens, table, hashes, computed = s
            if computed == len(tokens):
                tokens.append(rng.randrange(30))         # a generated token
            n = rng.randrange(1, 6)
            target = min(len(tokens), computed + n)
            if not bm.grow(table, target):
                continue
            for p in range(computed, target):
                b = table[p // bs]
                assert bm.ref[b] == 1, "writing into a shared block"
                assert b not in bm.hash_of, "writing into a published block"
                kv[(b, p % bs)] = ident(tokens, p)
            s[3] = target
            bm.mark_computed(table, hashes, tokens, target)
            assert len(hashes) == target // bs
        else:
            s = live.pop(rng.randrange(len(live)))
            bm.free_table(s[1])
        check_invariants(bm, [s[1] for s in live])
    assert hits > 0 and bm.hits == hits


def ident(tokens, p):
    return tokens[p], p, hash(tuple(tokens[: p + 1]))

