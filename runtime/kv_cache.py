"""Paged KV cache bookkeeping: fixed-size blocks, a block pool with a free queue, per-sequence block tables.

The cache memory itself is ``num_layers`` pairs of tensors
``[num_blocks, block_size, num_kv_heads, head_dim]`` owned by the executor;
this module only decides which physical blocks each sequence owns (as vLLM's
``KVCacheManager`` / ``BlockPool``). Only block ids cross to the scheduler.

Token ``p`` of a sequence lives in slot ``block_ids[p // block_size] * block_size + p % block_size``.

Invariant (tests/runtime/test_kv_cache.py): a block is owned by at most one
sequence, and free + owned blocks always add up to ``num_blocks``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterable, Optional

from flexc.ir.spec import KVCacheSpec

logger = logging.getLogger(__name__)

__all__ = ["KVCacheSpec", "KVCacheBlocks", "FreeBlockQueue", "BlockPool", "KVCacheManager", "make_num_blocks"]


def make_num_blocks(spec: KVCacheSpec, *, num_tokens: Optional[int] = None,
                    memory_budget: Optional[int] = None) -> int:
    """Blocks that hold ``num_tokens`` tokens (rounded up) or fit in ``memory_budget`` bytes (rounded down).

    Example: smollm2-135m fp32 (30 layers, 3 KV heads, head_dim 64) needs 46,080 bytes per token, so
    ``memory_budget=1 << 30`` gives 1,456 blocks of 16 tokens.
    """
    if (num_tokens is None) == (memory_budget is None):
        raise ValueError("give exactly one of num_tokens (KV cache tokens) and memory_budget (bytes)")
    if num_tokens is not None:
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"kv cache tokens must be a positive integer, got {num_tokens!r}")
        return -(-num_tokens // spec.block_size)
    if not isinstance(memory_budget, int) or memory_budget < spec.bytes_per_block:
        raise ValueError(f"kv cache memory budget must be an integer of at least one block "
                         f"({spec.bytes_per_block} bytes), got {memory_budget!r}")
    return memory_budget // spec.bytes_per_block


class FreeBlockQueue:
    """The free physical blocks, oldest-freed first.

    Why a queue and not a set: allocation and free are O(1) and a freed block
    goes to the back, so blocks are reused least-recently-freed first (the order
    a later prefix cache needs to keep recently freed blocks' contents alive
    longest). No prefix caching yet, so nothing is ever removed from the middle
    and a deque suffices (vLLM needs a doubly linked list for that).
    """

    def __init__(self, block_ids: Iterable[int]):
        self._q = collections.deque(block_ids)

    def __len__(self) -> int:
        return len(self._q)

    def popleft_n(self, n: int) -> list[int]:
        assert n <= len(self._q), "caller checks the number of free blocks first"
        return [self._q.popleft() for _ in range(n)]

    def extend(self, block_ids: Iterable[int]) -> None:
        self._q.extend(block_ids)


class BlockPool:
    """All physical blocks of the cache: hands out free ones and takes them back."""

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks!r}")
        self.num_blocks = num_blocks
        self.free_queue = FreeBlockQueue(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_new_blocks(self, n: int) -> Optional[list[int]]:
        """``n`` free block ids, or None (nothing taken) when fewer are free."""
        if n > len(self.free_queue):
            return None
        return self.free_queue.popleft_n(n)

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        self.free_queue.extend(block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_blocks


@dataclasses.dataclass(frozen=True)
class KVCacheBlocks:
    """Block ids handed to a sequence by one allocation (the only cache object the scheduler sees)."""

    block_ids: tuple[int, ...]


class KVCacheManager:
    """Per-sequence block tables over a :class:`BlockPool`.

    ``allocate_slots(req_id, num_tokens)`` grows a sequence's table so it can
    hold ``num_tokens`` tokens in total; it returns None, taking nothing, when
    the pool cannot provide the blocks, and the scheduler decides whom to
    preempt (vLLM's contract).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[int]] = {}
        """Block table of each sequence holding cache space, by request id."""

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` tokens occupies."""
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, req_id: str, num_tokens: int) -> Optional[KVCacheBlocks]:
        """Make ``req_id``'s table hold ``num_tokens`` tokens; the new blocks, or None if they do not fit."""
        table = self.req_to_blocks.get(req_id, [])
        need = self.num_blocks_for(num_tokens) - len(table)
        if need <= 0:
            return KVCacheBlocks(())
        new = self.pool.get_new_blocks(need)
        if new is None:
            return None
        self.req_to_blocks.setdefault(req_id, table).extend(new)
        return KVCacheBlocks(tuple(new))

    def get_block_ids(self, req_id: str) -> list[int]:
        """The sequence's block table (empty if it holds no cache space)."""
        return self.req_to_blocks.get(req_id, [])

    def free(self, req_id: str) -> int:
        """Return all of ``req_id``'s blocks to the pool (no-op if it has none); the number freed."""
        blocks = self.req_to_blocks.pop(req_id, [])
        # NOTE: free the tail first so a sequence's first blocks are reused last (vLLM's order)
        self.pool.free_blocks(reversed(blocks))
        return len(blocks)
