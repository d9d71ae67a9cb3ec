"""A mesh's KV memory as the router keeps it: independent KV groups, each a block pool with its own prefix
cache and its own decode slots, and the page table the mesh decodes with.

On a Galaxy the 32 slots are split over the 4 mesh columns (slot s on column s // 8) and a user's KV lives
only on its column's devices (tt-metal llama_attention.py / generator.py; tenstorrent/vllm serves the Galaxy
70B as one data-parallel rank per column, each with its own block pool). A block id therefore names a
different memory in each group: a sequence's blocks, and any cached prefix it reuses, come from the group of
its slot (docs/DESIGN.md, "KV groups"). The torch reference has one group.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from scheduler.blocks import BlockPool, blocks_for


@dataclass
class KVGroup:
    index: int
    pool: BlockPool
    free_slots: list[int]  # a heap: lowest slot first
    num_slots: int

    @property
    def num_running(self) -> int:
        return self.num_slots - len(self.free_slots)

    @property
    def room(self) -> tuple[int, int, int]:
        """The group's room as placement ranks it: free slots, then blocks holding no cached prefix (so that
        prompts taking turns keep their prefixes in different groups, not evict each other in one), then
        available blocks."""
        return len(self.free_slots), self.pool.num_free, self.pool.num_available


class KVCache:
    def __init__(self, *, num_groups: int, num_blocks: int, block_size: int, num_slots: int, max_seq_len: int):
        """num_blocks: per group. Raises ValueError when the slots do not split evenly over the groups."""
        if num_groups < 1 or num_slots % num_groups:
            raise ValueError(f"{num_slots} slots cannot be split evenly over {num_groups} KV groups")
        per_group = num_slots // num_groups
        self.block_size = block_size
        self.num_slots = num_slots
        self.slots_per_group = per_group
        self.groups = [KVGroup(g, BlockPool(num_blocks, block_size), list(range(g * per_group, (g + 1) * per_group)),
                               per_group) for g in range(num_groups)]
        # The free slots of all groups: kept by seat and release, for the router reads it of every mesh per round.
        self.num_free_slots = num_slots
        # Row s: the block ids of slot s's sequence in its group's pool, padded with 0 (fixed width for traces).
        self.page_table = np.zeros((num_slots, blocks_for(max_seq_len, block_size)), dtype=np.int32)

    @property
    def blocks_per_group(self) -> int:
        return self.groups[0].pool.num_blocks

    def group_of(self, slot: int) -> KVGroup:
        return self.groups[slot // self.slots_per_group]

    def seat(self, group: KVGroup, hit: list[int], num_tokens: int) -> tuple[int, list[int]]:
        """Take group's lowest free slot and blocks for num_tokens tokens on top of the prefix hit (blocks of
        this group's pool). The caller has checked that they fit. Returns (slot, block table)."""
        group.pool.share(hit)  # before allocating, so the allocation cannot evict the hit
        table = hit + group.pool.allocate(blocks_for(num_tokens, self.block_size) - len(hit))
        slot = heapq.heappop(group.free_slots)
        self.num_free_slots -= 1
        self.page_table[slot, :len(table)] = table
        return slot, table

    def grow(self, slot: int, table: list[int], num_tokens: int) -> bool:
        """Extend slot's block table (in place) to hold num_tokens tokens, if its group's pool can."""
        missing = blocks_for(num_tokens, self.block_size) - len(table)
        if missing <= 0:
            return True
        pool = self.group_of(slot).pool
        if missing > pool.num_available:
            return False
        blocks = pool.allocate(missing)
        self.page_table[slot, len(table):len(table) + missing] = blocks
        table += blocks
        return True

    def adopt(self, slot: int, table: list[int], start: int, cached: list[int]) -> None:
        """Put the cached blocks `cached` of slot's group in place of table[start:start + len(cached)] (in place),
        freeing the blocks they replace: a prefix another sequence computed after slot's was seated. The replaced
        blocks must hold nothing computed."""
        pool = self.group_of(slot).pool
        end = start + len(cached)
        pool.share(cached)  # before freeing, so that nothing frees a block this sequence is taking
        pool.free(table[start:end])
        table[start:end] = cached
        self.page_table[slot, start:end] = cached

    def release(self, slot: int, table: list[int]) -> None:
        """Give back the slot and its blocks (they keep their hashes, so a recompute may hit them)."""
        group = self.group_of(slot)
        group.pool.free(table)
        self.page_table[slot, :len(table)] = 0
        heapq.heappush(group.free_slots, slot)
        self.num_free_slots += 1

    def stats(self) -> dict:
        """Totals over the groups, and each group's own numbers (blocks_used + cached + free == total)."""
        groups = [{"group": g.index, "running": g.num_running, "free_slots": len(g.free_slots),
                   "blocks_used": g.pool.num_used, "blocks_cached": g.pool.num_cached,
                   "blocks_free": g.pool.num_free, "blocks_total": g.pool.num_blocks} for g in self.groups]
        totals = {key: sum(g[key] for g in groups)
                  for key in ("free_slots", "blocks_used", "blocks_cached", "blocks_free", "blocks_total")}
        return {**totals, "kv_groups": len(groups), "groups": groups}
