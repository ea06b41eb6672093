"""Paged KV cache bookkeeping (no model)."""
import pytest
import torch

from flexc.ir.spec import KVCacheSpec
from flexc.runtime.kv_cache import BlockPool, KVCacheManager, make_num_blocks


def test_num_blocks_from_tokens_and_budget():
    """Token counts round up to whole blocks, byte budgets round down; smollm2 fp32 needs 46,080 bytes/token."""
    spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32, block_size=16)
    assert spec.bytes_per_token == 46080
    assert make_num_blocks(spec, num_tokens=33) == 3
    assert make_num_blocks(spec, memory_budget=1 << 30) == (1 << 30) // (46080 * 16)
    with pytest.raises(ValueError, match="exactly one"):
        make_num_blocks(spec, num_tokens=16, memory_budget=1 << 20)
    with pytest.raises(ValueError, match="at least one block"):
        make_num_blocks(spec, memory_budget=100)
    with pytest.raises(ValueError, match="positive integer"):
        make_num_blocks(spec, num_tokens=0)


def test_allocate_grows_table_and_never_shares_blocks():
    """allocate_slots extends a sequence's table to hold its tokens; no block is owned twice; free returns all."""
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate_slots("a", 5).block_ids and len(kv.get_block_ids("a")) == 2
    assert kv.allocate_slots("a", 8).block_ids == ()          # still fits in 2 blocks
    assert len(kv.allocate_slots("a", 9).block_ids) == 1
    kv.allocate_slots("b", 12)
    owned = kv.get_block_ids("a") + kv.get_block_ids("b")
    assert len(set(owned)) == len(owned) == 6 and kv.num_free_blocks == 4
    assert kv.free("a") == 3 and kv.num_free_blocks == 7 and kv.get_block_ids("a") == []
    kv.free("b")
    assert kv.num_free_blocks == 10


def test_allocate_returns_none_and_takes_nothing_when_full():
    """An allocation that does not fit returns None and leaves the pool and the table unchanged."""
    kv = KVCacheManager(num_blocks=3, block_size=4)
    kv.allocate_slots("a", 8)
    assert kv.allocate_slots("b", 8) is None
    assert kv.num_free_blocks == 1 and kv.get_block_ids("b") == []
    assert kv.allocate_slots("a", 16) is None and len(kv.get_block_ids("a")) == 2


def test_free_queue_reuses_least_recently_freed_first():
    """Freed blocks go to the back of the free queue: fresh blocks are handed out before recently freed ones."""
    pool = BlockPool(4)
    first = pool.get_new_blocks(2)
    pool.free_blocks(first)
    assert pool.get_new_blocks(2) == [2, 3]
    assert pool.get_new_blocks(2) == first
    assert pool.get_new_blocks(1) is None


def test_bad_sizes_rejected():
    """Non-positive block counts and sizes are a ValueError naming the value."""
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockPool(0)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)
