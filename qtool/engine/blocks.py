"""Fixed-size KV block bookkeeping for the paged cache (pure Python, no torch).

Contract: `BlockManager(num_blocks, block_size)` hands out block ids 1..num_blocks-1 (block 0 is the
dummy block of padded rows and is never handed out) from a free list. `ensure(seq_id, n_tokens)`
grows the sequence's block table so it covers positions 0..n_tokens-1 and returns False (allocating
nothing) when the free list is too short; `free(seq_id)` returns all of a sequence's blocks at once.
`table(seq_id)` is the sequence's block list in position order.
"""
from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("a paged KV cache needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._tables: dict[object, list[int]] = {}

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.usable - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def table(self, seq_id) -> list[int]:
        return self._tables.get(seq_id, [])

    def ensure(self, seq_id, n_tokens: int) -> bool:
        table = self._tables.setdefault(seq_id, [])
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        table.extend(self._free.popleft() for _ in range(need))
        return True

    def free(self, seq_id) -> None:
        for b in reversed(self._tables.pop(seq_id, [])):
            self._free.appendleft(b)
