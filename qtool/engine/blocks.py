"""Fixed-size KV block bookkeeping for the paged cache, with automatic prefix caching (pure Python).

Contract: `BlockManager(num_blocks, block_size, prefix_caching=True)` hands out block ids
1..num_blocks-1 (block 0 is the dummy block of padded rows and is never handed out).
`ensure(seq_id, n_tokens)` grows the sequence's block table so it covers positions 0..n_tokens-1 and
returns False (allocating nothing) when too few blocks are free; `free(seq_id)` drops all of a
sequence's blocks at once (a block shared with another sequence stays theirs). `table(seq_id)` is the
block list in position order.
Prefix caching: `register(seq_id, ids, n_computed)` records every full block whose K/V are computed
(positions < n_computed) under a key chained over the blocks before it: sha256(parent key, token ids),
so equal keys mean equal token prefixes (no collision can hand one client another's cache). A freed
registered block stays cached (LRU; blocks never registered are handed out first, then the least
recently freed cached block is evicted). `match(seq_id, ids)` gives a sequence with no blocks the
longest run of cached full blocks of `ids` (at most len(ids) - 1 tokens, so one token is always
computed) and returns the number of tokens reused.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


def _key(parent: bytes, tokens) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("a paged KV cache needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._plain: deque[int] = deque(range(1, num_blocks))      # free, nothing cached in them
        self._cached: OrderedDict[int, None] = OrderedDict()       # free, still cached; oldest first
        self._ref = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._by_key: dict[bytes, int] = {}
        self._tables: dict[object, list[int]] = {}
        self._keys: dict[object, list[bytes]] = {}                  # per sequence: keys of its full blocks
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._plain) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        return self.usable - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._by_key)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def table(self, seq_id) -> list[int]:
        return self._tables.get(seq_id, [])

    def _take(self) -> int:
        if self._plain:
            b = self._plain.popleft()
        else:
            b, _ = self._cached.popitem(last=False)                 # evict the least recently freed
            del self._by_key[self._key_of.pop(b)]
        self._ref[b] = 1
        return b

    def ensure(self, seq_id, n_tokens: int) -> bool:
        table = self._tables.setdefault(seq_id, [])
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def free(self, seq_id) -> None:
        self._keys.pop(seq_id, None)
        for b in reversed(self._tables.pop(seq_id, [])):           # a chain's tail is evicted first
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._key_of:
                    self._cached[b] = None
                else:
                    self._plain.appendleft(b)

    def match(self, seq_id, ids: list[int]) -> int:
        if not self.prefix_caching or self._tables.get(seq_id):
            return 0
        bs, table, keys = self.block_size, self._tables.setdefault(seq_id, []), self._keys.setdefault(seq_id, [])
        self.queried_tokens += len(ids)
        parent = b""
        for i in range((len(ids) - 1) // bs):
            key = _key(parent, ids[i * bs:(i + 1) * bs])
            b = self._by_key.get(key)
            if b is None:
                break
            if self._ref[b] == 0:
                del self._cached[b]
            self._ref[b] += 1
            table.append(b)
            keys.append(key)
            parent = key
        self.hit_tokens += len(table) * bs
        return len(table) * bs

    def register(self, seq_id, ids: list[int], n_computed: int) -> None:
        if not self.prefix_caching:
            return
        bs, table, keys = self.block_size, self._tables.get(seq_id, []), self._keys.setdefault(seq_id, [])
        for i in range(len(keys), min(n_computed // bs, len(table))):
            key = _key(keys[-1] if keys else b"", ids[i * bs:(i + 1) * bs])
            keys.append(key)
            b = table[i]
            if key not in self._by_key and b not in self._key_of:
                self._by_key[key], self._key_of[b] = b, key
