"""How one tensor-parallel rank's share of a model is cut. Pure arithmetic, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass

from mpillm.config import ModelConfig


class ShardingError(ValueError):
    pass


def split_even(n: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """[start, stop) of part `index` when n (a multiple of unit) is cut into `parts` contiguous runs of units
    whose sizes differ by at most one unit."""
    units = n // unit
    base, extra = divmod(units, parts)
    start = index * base + min(index, extra)
    return start * unit, (start + base + (index < extra)) * unit


def _unit(n: int, parts: int) -> int:
    # Cut on quantization-group boundaries where possible so quantized rows never straddle two ranks.
    for unit in (128, 32, 1):
        if n % unit == 0 and n // unit >= parts:
            return unit
    return 1


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: its query heads [q_lo, q_hi), the kv heads they read [kv_lo, kv_hi) (replicated on
    several ranks when there are fewer kv heads than ranks), its slice of the MLP and of the vocabulary."""
    rank: int
    size: int
    q_lo: int
    q_hi: int
    kv_lo: int
    kv_hi: int
    ffn_lo: int
    ffn_hi: int
    vocab_lo: int
    vocab_hi: int
    group: int          # query heads per kv head

    @property
    def n_heads(self) -> int:
        return self.q_hi - self.q_lo

    @property
    def n_kv_heads(self) -> int:
        return self.kv_hi - self.kv_lo

    @property
    def head_offset(self) -> int:
        """Position of this shard's first query head inside its kv group (see ops.attention)."""
        return self.q_lo - self.kv_lo * self.group


def make_shard(cfg: ModelConfig, rank: int, size: int) -> Shard:
    if size > cfg.num_heads:
        raise ShardingError(f"--tp {size} exceeds the model's {cfg.num_heads} attention heads; "
                            f"use --tp {cfg.num_heads} or less")
    if size > cfg.intermediate_size:
        raise ShardingError(f"--tp {size} exceeds intermediate_size {cfg.intermediate_size}")
    group = cfg.num_heads // cfg.num_kv_heads
    q_lo, q_hi = split_even(cfg.num_heads, size, rank)
    kv_lo, kv_hi = q_lo // group, (q_hi - 1) // group + 1
    ffn_lo, ffn_hi = split_even(cfg.intermediate_size, size, rank, _unit(cfg.intermediate_size, size))
    v_lo, v_hi = split_even(cfg.vocab_size, size, rank)
    return Shard(rank, size, q_lo, q_hi, kv_lo, kv_hi, ffn_lo, ffn_hi, v_lo, v_hi, group)
