import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.blocks import BlockPool, blocks_for, extend_block_hashes
from tests.counting import counting

BS = 4


def hashes_of(tokens, salt=None, block_size=BS):
    out: list[bytes] = []
    extend_block_hashes(out, tokens, block_size, salt)
    return out


def cached_pool(tokens, num_blocks=16, salt=None):
    """A pool whose first blocks hold `tokens` (full blocks only), cached and owned once."""
    pool = BlockPool(num_blocks, BS)
    hashes = hashes_of(tokens, salt)
    blocks = pool.allocate(len(hashes))
    for block, block_hash in zip(blocks, hashes):
        pool.cache(block, block_hash)
    return pool, blocks


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free_track_counts():
    pool = BlockPool(8, BS)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert (pool.num_used, pool.num_free, pool.num_cached, pool.num_available) == (8, 0, 0, 0)
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free(a)
    assert (pool.num_used, pool.num_free) == (5, 3)
    assert all(pool.ref_counts[x] == 0 for x in a) and all(pool.ref_counts[x] == 1 for x in b)


def test_shared_block_is_free_only_after_its_last_owner():
    pool, blocks = cached_pool(list(range(8)))
    pool.share(blocks)
    assert [pool.ref_counts[b] for b in blocks] == [2, 2]
    pool.free(blocks)
    assert pool.num_used == 2
    pool.free(blocks)
    assert pool.num_used == 0 and pool.num_cached == 2


def test_extend_block_hashes_is_incremental_and_chained():
    tokens = list(range(13))
    grown: list[bytes] = []
    for n in range(len(tokens) + 1):
        extend_block_hashes(grown, tokens[:n], BS)
    assert grown == hashes_of(tokens) and len(grown) == 3
    # the same block content after a different parent gets a different digest
    other = hashes_of([99] + tokens[1:])
    assert other[1] != grown[1] and other[2] != grown[2]
    assert hashes_of(tokens, salt="tenant-a")[0] != grown[0] != hashes_of(tokens, salt="tenant-b")[0]


def test_lookup_finds_longest_cached_run():
    tokens = list(range(16))
    pool, blocks = cached_pool(tokens[:12])
    query = tokens[:12] + [50, 51, 52, 53, 54]
    assert pool.lookup(hashes_of(query), len(query), BS) == blocks
    diverging = tokens[:4] + [77] + tokens[5:12] + [1]
    assert pool.lookup(hashes_of(diverging), len(diverging), BS) == blocks[:1]


def test_lookup_leaves_the_last_token_to_compute():
    tokens = list(range(12))
    pool, blocks = cached_pool(tokens)
    assert pool.lookup(hashes_of(tokens), 12, BS) == blocks[:2]  # 12 tokens cached, 8 may be reused
    assert pool.lookup(hashes_of(tokens + [5]), 13, BS) == blocks


def test_lookup_rounds_down_to_alignment():
    tokens = list(range(24))
    pool, blocks = cached_pool(tokens)
    query = tokens[:12] + [9] * 8
    assert pool.lookup(hashes_of(query), len(query), 2 * BS) == blocks[:2]  # 12 cached, 8 aligned
    assert pool.lookup(hashes_of(tokens + [1]), 25, 2 * BS) == blocks[:6]
    with pytest.raises(ValueError):
        pool.lookup(hashes_of(tokens), 24, BS + 1)


def test_salt_separates_tenants():
    tokens = list(range(9))
    pool, blocks = cached_pool(tokens[:8], salt="a")
    assert pool.lookup(hashes_of(tokens, "a"), 9, BS) == blocks
    assert pool.lookup(hashes_of(tokens, "b"), 9, BS) == []
    assert pool.lookup(hashes_of(tokens), 9, BS) == []


def test_freed_blocks_stay_cached_until_evicted():
    tokens = list(range(9))
    pool, blocks = cached_pool(tokens[:8], num_blocks=4)
    pool.free(blocks)
    assert pool.lookup(hashes_of(tokens), 9, BS) == blocks
    pool.allocate(2)  # takes the two never-hashed blocks first
    assert pool.lookup(hashes_of(tokens), 9, BS) == blocks
    pool.allocate(1)  # now a cached block must go
    assert pool.num_cached == 1


def test_eviction_is_lru_and_takes_a_sequence_tail_first():
    pool = BlockPool(6, BS)
    old, new = pool.allocate(3), pool.allocate(3)
    for i, block in enumerate(old + new):
        pool.cache(block, bytes([i]) * 16)
    pool.free(old)
    pool.free(new)
    evicted = pool.allocate(6)
    assert evicted == [old[2], old[1], old[0], new[2], new[1], new[0]]
    assert pool.num_cached == 0 and all(pool.block_hash[b] is None for b in evicted)


def test_reviving_a_cached_block_takes_it_out_of_the_middle_of_the_lru():
    pool = BlockPool(3, BS)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache(block, bytes([i]) * 16)
    pool.free(blocks)
    pool.share([blocks[1]])
    assert pool.ref_counts[blocks[1]] == 1 and pool.num_cached == 2
    assert sorted(pool.allocate(2)) == sorted([blocks[0], blocks[2]])
    assert pool.block_hash[blocks[1]] == bytes([1]) * 16  # still cached while in use


def test_same_content_in_a_second_block_stays_anonymous():
    tokens = list(range(4))
    pool, (first,) = cached_pool(tokens)
    (second,) = pool.allocate(1)
    pool.cache(second, hashes_of(tokens)[0])
    assert pool.block_hash[second] is None
    pool.free([second])
    assert pool.num_free == 15 and pool.num_cached == 0  # an anonymous block is plainly free
    assert pool.lookup(hashes_of(tokens + [1]), 5, BS) == [first]


def test_blocks_needed_counts_revived_hits():
    tokens = list(range(9))
    pool, blocks = cached_pool(tokens[:8])
    assert pool.blocks_needed(blocks, 9) == 1  # hits in use cost nothing
    pool.free(blocks)
    assert pool.blocks_needed(blocks, 9) == 3  # unowned hits leave the available set
    assert pool.blocks_needed([], 9) == 3


def test_a_salt_cannot_be_crafted_to_continue_an_unsalted_chain():
    """A salt whose bytes are an unsalted prompt's first block (int32 token ids: small ids are ASCII and NULs,
    a 64-token block is 256 characters, the longest salt) must not seed that prompt's chain one block on."""
    from array import array
    first = list(range(1, 65))
    rest = list(range(100, 300))
    salt = array("i", first).tobytes().decode()
    unsalted, salted = [], []
    extend_block_hashes(unsalted, first + rest, 64)
    extend_block_hashes(salted, rest, 64, salt=salt)
    assert not set(unsalted) & set(salted)


def test_a_lookup_that_misses_costs_the_same_for_a_long_prompt():
    """Placement looks a prompt up in every KV group of every mesh (4 x 32 on 32 Galaxies), and the router asks
    whether another mesh seats a waiting request on every round: a lookup that copied the prompt's whole list of
    digests before its first miss cost a 128k-token prompt ~3.4 us per group (~0.3 us for a short one). Counted:
    the digests a miss reads, of a 2,048-block prompt."""
    import os

    Digests = counting(list)
    pool, _ = cached_pool(list(range(8)))
    digests = Digests(os.urandom(16) for _ in range(2_048))  # none cached
    assert pool.lookup(digests, 2_048 * BS, BS) == []
    assert Digests.reads == 1


class PoolMachine(RuleBasedStateMachine):
    """BlockPool against a plain model: owners per block, the name each block holds, and the unowned named blocks in
    the order they were freed. An allocation takes never-named blocks first, then evicts the least recently freed;
    it never takes an owned block, and a lookup finds exactly the named blocks."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(8, BS)
        self.owners = [0] * 8
        self.names: dict[int, bytes] = {}
        self.lru: list[int] = []  # unowned named blocks, least recently freed first
        self.tables: list[list[int]] = []

    @rule(n=st.integers(1, 8))
    def allocate(self, n):
        if n > len([b for b in range(8) if not self.owners[b]]):
            with pytest.raises(MemoryError):
                self.pool.allocate(n)
            return
        fresh = len([b for b in range(8) if not self.owners[b] and b not in self.names])
        blocks = self.pool.allocate(n)
        evicted = blocks[fresh:] if n > fresh else []
        assert not any(self.owners[b] for b in blocks), "an owned block was allocated"
        assert all(b not in self.names for b in blocks[:min(n, fresh)]), "a named block went before an empty one"
        assert evicted == self.lru[:len(evicted)], "eviction is not least recently freed first"
        del self.lru[:len(evicted)]
        for b in evicted:
            del self.names[b]
        for b in blocks:
            self.owners[b] = 1
        self.tables.append(blocks)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free(self, data):
        table = self.tables.pop(data.draw(st.integers(0, len(self.tables) - 1)))
        self.pool.free(table)
        for b in reversed(table):  # tail first
            self.owners[b] -= 1
            if not self.owners[b] and b in self.names:
                self.lru.append(b)

    @precondition(lambda self: any(self.tables))
    @rule(data=st.data(), name=st.integers(0, 5))
    def cache(self, data, name):
        block = data.draw(st.sampled_from(sorted({b for t in self.tables for b in t})))
        digest = bytes([name]) * 16
        self.pool.cache(block, digest)
        if block not in self.names and digest not in self.names.values():
            self.names[block] = digest

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def share(self, data):
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.names)), min_size=1, max_size=3, unique=True))
        self.pool.share(blocks)
        for b in blocks:
            if not self.owners[b]:
                self.lru.remove(b)
            self.owners[b] += 1
        self.tables.append(blocks)

    @invariant()
    def the_pool_is_the_model(self):
        pool = self.pool
        assert pool.ref_counts == self.owners
        assert {b: h for b, h in enumerate(pool.block_hash) if h is not None} == self.names
        assert list(pool.eviction_order()) == self.lru
        assert pool.num_used == sum(1 for o in self.owners if o) and pool.num_cached == len(self.lru)
        assert pool.num_free == 8 - pool.num_used - pool.num_cached
        for b, h in self.names.items():
            assert pool.caches(h) and pool.lookup([h], BS + 1, BS) == [b]

    def teardown(self):
        """Everyone gone, then the whole pool allocated: every cached prefix evicted, the pool empty of names."""
        for table in self.tables:
            self.pool.free(table)
        assert self.pool.num_used == 0
        self.pool.free(self.pool.allocate(8))
        assert self.pool.num_free == 8 and not any(self.pool.block_hash)
        assert all(not self.pool.caches(h) for h in self.names.values())


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=300, deadline=None, stateful_step_count=30)
