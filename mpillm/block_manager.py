"""Paged KV-cache bookkeeping in plain Python: block allocation, reference counts and prefix caching.

A sequence owns a block table (list of block ids). A full block's content is identified by a hash chained
over every token up to its end; once its KV has been computed, another sequence with the same prefix maps
the same block (reference count + 1) instead of recomputing it. Freed blocks keep their hash until they are
reused, so a later request can still hit them (LRU order of the free list).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict


def block_hash(prev: bytes, tokens) -> bytes:
    """blake2b-128 of the previous block's hash and these token ids (4 bytes each, little-endian)."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.hits = 0          # tokens served from the prefix cache (for reports)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        b, _ = self.free.popitem(last=False)
        if b in self.hash_of:                  # recycling a cached block: forget what it held
            del self.block_of[self.hash_of.pop(b)]
        self.ref[b] = 1
        return b

    def _release(self, b: int):
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free[b] = None

    def cached_prefix(self, tokens) -> tuple[list[int], list[bytes]]:
        """Blocks (and their hashes) already holding the KV of a prefix of `tokens`. Never the whole prompt:
        its last token must be computed to get logits."""
        blocks, hashes = [], []
        if not self.prefix_caching:
            return blocks, hashes
        prev = b""
        for i in range((len(tokens) - 1) // self.block_size):
            prev = block_hash(prev, tokens[i * self.block_size:(i + 1) * self.block_size])
            b = self.block_of.get(prev)
            if b is None:
                break
            blocks.append(b)
            hashes.append(prev)
        return blocks, hashes

    def allocate_prompt(self, tokens, budget: int):
        """(block table covering the cached prefix plus the first chunk of at most `budget` tokens, hashes of
        the cached blocks, number of cached tokens); None, with nothing changed, when blocks do not suffice."""
        hit, hashes = self.cached_prefix(tokens)
        cached = len(hit) * self.block_size
        need = self.blocks_needed(cached + min(len(tokens) - cached, budget)) - len(hit)
        reusable_free = sum(1 for b in hit if self.ref[b] == 0)
        if need > self.num_free - reusable_free:
            return None
        for b in hit:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        table = hit + [self._take_free() for _ in range(need)]
        self.hits += cached
        return table, hashes, cached

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` in place to hold num_tokens; False (unchanged) if blocks ran out."""
        if num_tokens <= len(table) * self.block_size:       # most decode steps: the last block has room
            return True
        need = self.blocks_needed(num_tokens) - len(table)
        if need > self.num_free:
            return False
        table.extend(self._take_free() for _ in range(max(need, 0)))
        return True

    def mark_computed(self, table: list[int], hashes: list[bytes], tokens, num_computed: int):
        """Publish the blocks whose KV is now fully computed (appending their hashes to the sequence's
        `hashes`). Only then may other sequences share them."""
        if not self.prefix_caching:
            return
        for i in range(len(hashes), num_computed // self.block_size):
            h = block_hash(hashes[-1] if hashes else b"", tokens[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(h)
            b = table[i]
            if h not in self.block_of and b not in self.hash_of:
                self.block_of[h] = b
                self.hash_of[b] = h

    def free_table(self, table: list[int]):
        for b in reversed(table):              # tail blocks first: they are the least likely to be shared
            self._release(b)
        table.clear()
