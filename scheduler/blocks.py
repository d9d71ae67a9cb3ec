"""The paged KV block pool with prefix caching.

Every operation is O(1) per block whatever the pool size: never-hashed free blocks sit on a stack,
free blocks that still hold a cached prefix sit in an LRU-ordered dict, from which a prefix hit revives
one in the middle and an allocation evicts the oldest. A full block is named by a chained digest of its
parent's digest and its own token ids, so equal names mean equal prefixes (a real digest, not hash():
a collision would silently serve another prompt's KV).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from itertools import islice


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        salt: str | None = None) -> None:
    """Append the chained digests of the full blocks of `token_ids` that `hashes` does not cover yet.

    A salt seeds the chain, so tenants with different salts never share blocks. Its seed is a digest of
    another domain (BLAKE2 personalisation) than the blocks': with a plain digest, a salt whose bytes equal an
    unsalted prompt's first block seeded a chain equal to that prompt's, one block on, and shared its KV.
    """
    num_full = len(token_ids) // block_size
    if len(hashes) >= num_full:
        return
    start = len(hashes) * block_size
    data = array("i", token_ids[start:num_full * block_size]).tobytes()
    step = 4 * block_size
    if hashes:
        parent = hashes[-1]
    else:
        parent = hashlib.blake2b(salt.encode(), digest_size=16, person=b"meshserve salt").digest() if salt else b""
    for offset in range(0, len(data), step):
        parent = hashlib.blake2b(parent + data[offset:offset + step], digest_size=16).digest()
        hashes.append(parent)


class BlockPool:
    """KV blocks with reference counts. Used + cached + free == num_blocks, where `cached` counts the
    unowned blocks that still hold a reusable prefix and `free` the unowned ones that hold none."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._block_of_hash: dict[bytes, int] = {}
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self._cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take (free + cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def allocate(self, n: int) -> list[int]:
        """n blocks with one owner each; evicts cached prefixes (least recently freed first) only when
        no empty block is left."""
        if n > self.num_available:
            raise MemoryError(f"{n} blocks wanted, {self.num_available} available")
        free = self._free
        take = min(n, len(free))
        blocks = free[len(free) - take:]
        del free[len(free) - take:]
        for _ in range(n - take):
            block, _ = self._cached.popitem(last=False)
            del self._block_of_hash[self.block_hash[block]]
            self.block_hash[block] = None
            blocks.append(block)
        ref_counts = self.ref_counts
        for block in blocks:
            ref_counts[block] = 1
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        """Add an owner to each block (a prefix hit); an unowned cached block leaves the LRU."""
        ref_counts = self.ref_counts
        for block in blocks:
            if ref_counts[block] == 0:
                del self._cached[block]
            ref_counts[block] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one owner from each block. Unowned blocks are released tail first, so under pressure a
        sequence loses its tail before its head (the head is the part other prompts share)."""
        ref_counts = self.ref_counts
        for block in reversed(blocks):
            ref_counts[block] -= 1
            if ref_counts[block] == 0:
                if self.block_hash[block] is None:
                    self._free.append(block)
                else:
                    self._cached[block] = None

    def eviction_order(self) -> Iterator[int]:
        """The cached blocks nobody owns, in the order allocations evict them (least recently freed first)."""
        return iter(self._cached)

    def cache(self, block: int, block_hash: bytes) -> None:
        """Offer a full, computed block to the prefix cache. A block holding the same prefix as one
        already cached stays anonymous: the cached one serves future hits."""
        if self.block_hash[block] is None and block_hash not in self._block_of_hash:
            self.block_hash[block] = block_hash
            self._block_of_hash[block_hash] = block

    def caches(self, block_hash: bytes) -> bool:
        """Whether a block holding this digest's prefix is in the cache (owned or not)."""
        return block_hash in self._block_of_hash

    def lookup(self, block_hashes: Sequence[bytes], num_tokens: int, align: int) -> list[int]:
        """The longest run of cached blocks heading a sequence of `num_tokens` tokens whose full-block
        digests are `block_hashes`. Capped so the last token is recomputed (its logits give the next
        token) and rounded down to `align` tokens (the model's prefill alignment)."""
        if align % self.block_size:
            raise ValueError(f"align {align} is not a multiple of block_size {self.block_size}")
        max_blocks = (num_tokens - 1) // align * align // self.block_size
        block_of_hash = self._block_of_hash
        hit: list[int] = []
        for block_hash in islice(block_hashes, max(max_blocks, 0)):  # no copy: a miss costs O(1), not O(prompt)
            block = block_of_hash.get(block_hash)
            if block is None:
                break
            hit.append(block)
        del hit[len(hit) * self.block_size // align * align // self.block_size:]
        return hit

    def blocks_needed(self, hit: Sequence[int], num_tokens: int) -> int:
        """Available blocks that holding `num_tokens` tokens on top of a prefix `hit` consumes: the new
        blocks plus the hit blocks that nobody owns (reviving them takes them off the LRU)."""
        ref_counts = self.ref_counts
        return blocks_for(num_tokens, self.block_size) - len(hit) + sum(1 for b in hit if ref_counts[b] == 0)
