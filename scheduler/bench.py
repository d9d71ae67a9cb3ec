"""Speed of the engine core, with no model: `python -m scheduler.bench [--json]`.

- block_alloc_free_ns: one allocate + free of one block in a half-used pool whose free ids are shuffled
  (so large pools pay their cache misses), at 2,080 (one pool of a 128k user plus a block for each of 32
  slots) and 1,048,576 blocks, best of several interleaved runs;
- decode_step_us: the scheduler's share of one decode step (planning + taking the results in) with 32 busy
  slots, four of them 126k-token sequences, two works in flight as the router keeps them;
- prefix_lookup_us_128k: hashing a 131,072-token prompt and finding its cached prefix in the 4 KV groups
  of a Galaxy mesh (what placing it costs the router).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time

from scheduler.blocks import BlockPool, extend_block_hashes
from scheduler.sampling import SamplingParams
from scheduler.scheduler import MeshScheduler
from scheduler.work import NO_TOKEN, MeshWork, StepResult

BLOCK_SIZE = 64
SMALL_POOL, LARGE_POOL = 2080, 1_048_576
GALAXY_KV_GROUPS, BLOCKS_PER_GROUP = 4, 2056  # model/galaxy.py (the core imports nothing from model/)


def _half_used_pool(num_blocks: int) -> BlockPool:
    pool = BlockPool(num_blocks, BLOCK_SIZE)
    ids = pool.allocate(num_blocks)
    random.Random(0).shuffle(ids)
    pool.free(ids[: num_blocks // 2])  # half used, free ids in random order
    return pool


def _alloc_free_ns(pool: BlockPool, batch: int, rounds: int) -> float:
    held: list[list[int]] = []
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        for _ in range(batch):
            held.append(pool.allocate(1))
        for blocks in held:
            pool.free(blocks)
        held.clear()
    return (time.perf_counter_ns() - t0) / (rounds * batch)


def block_alloc_free_ns(sizes=(SMALL_POOL, LARGE_POOL), batch: int = 1024, rounds: int = 40,
                        repeats: int = 7) -> dict[int, list[float]]:
    """Per size, the mean of each of `repeats` runs; the sizes interleave, so load skews neither."""
    pools = {n: _half_used_pool(n) for n in sizes}
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    gc.disable()  # as timeit does: time the operation, not a collector walking every list in the process
    try:
        for _ in range(repeats):
            for n, pool in pools.items():
                runs[n].append(_alloc_free_ns(pool, batch, rounds))
    finally:
        gc.enable()
    return runs


def _mesh_results(work: MeshWork, num_slots: int, token: int) -> list[StepResult]:
    """What a mesh would answer: the first token of final chunks, then a token per live slot per step."""
    results = []
    for chunk in work.prefills:  # one result per chunk
        tokens = [NO_TOKEN] * num_slots
        if chunk.is_final:
            tokens[chunk.slot] = token
        results.append(StepResult(work.work_id, tokens))
    if work.decode:
        tokens = [NO_TOKEN] * num_slots
        for slot in work.decode.slots:
            tokens[slot] = token
        results += [StepResult(work.work_id, list(tokens)) for _ in range(work.decode.num_steps)]
    results[-1].last = True
    return results


def decode_step_us(num_slots: int = 32, long_users: int = 4, long_prompt: int = 126_000,
                   short_prompt: int = 1_000, rounds: int = 100, repeats: int = 3) -> list[float]:
    """The mean per decode step of each of `repeats` runs of `rounds` rounds, all slots busy."""
    sched = MeshScheduler(num_blocks=4096, block_size=BLOCK_SIZE, kv_groups=GALAXY_KV_GROUPS, num_slots=num_slots,
                          prefix_align=128)
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    rng = random.Random(0)
    for i in range(num_slots):
        n = long_prompt if i < long_users else short_prompt
        sched.submit(f"r{i}", [rng.randrange(128_000) for _ in range(n)], params)
    while sched.waiting or not all(s.live for s in sched.running.values()):  # fill the slots, untimed
        for result in _mesh_results(sched.schedule(), num_slots, rng.randrange(128_000)):
            sched.process(result)
    inflight: list[list[StepResult]] = []
    runs = []
    for _ in range(repeats):
        elapsed = steps = 0
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            work = sched.schedule()
            elapsed += time.perf_counter_ns() - t0
            steps += work.decode.num_steps
            inflight.append(_mesh_results(work, num_slots, rng.randrange(128_000)))
            if len(inflight) == sched.max_inflight:  # answer the oldest work, as the mesh streams it back
                for result in inflight.pop(0):
                    t0 = time.perf_counter_ns()
                    sched.process(result)
                    elapsed += time.perf_counter_ns() - t0
        runs.append(elapsed / steps / 1000)
    assert len(sched.running) == num_slots and all(len(s.decode.slots) == num_slots for s in [work]), \
        "the benchmark lost a user"
    return runs


def prefix_lookup_us_128k(num_tokens: int = 131_072, repeats: int = 10) -> list[float]:
    """Each of `repeats` placements of a fully cached prompt, as the router does them: hashing it once,
    then looking it up in every KV group of a Galaxy mesh (cached in the last group)."""
    sched = MeshScheduler(num_blocks=BLOCKS_PER_GROUP, block_size=BLOCK_SIZE, kv_groups=GALAXY_KV_GROUPS,
                          prefix_align=128)
    rng = random.Random(0)
    prompt = [rng.randrange(128_000) for _ in range(num_tokens)]
    hashes: list[bytes] = []
    extend_block_hashes(hashes, prompt, BLOCK_SIZE)
    pool = sched.kv.groups[-1].pool
    for block, block_hash in zip(pool.allocate(len(hashes)), hashes):
        pool.cache(block, block_hash)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        hashes = []
        extend_block_hashes(hashes, prompt, BLOCK_SIZE)
        hit_tokens = sched.cached_prefix_tokens(hashes, num_tokens)
        runs.append((time.perf_counter_ns() - t0) / 1000)
        assert hit_tokens == num_tokens - 128, "the cached prompt was not found"
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    alloc, decode, lookup = block_alloc_free_ns(), decode_step_us(), prefix_lookup_us_128k()
    small, large = min(alloc[SMALL_POOL]), min(alloc[LARGE_POOL])
    figures = {
        "block_alloc_free_ns": {str(SMALL_POOL): round(small, 1), str(LARGE_POOL): round(large, 1)},
        "block_pool_size_ratio": round(large / small, 3),
        "decode_step_us": round(min(decode), 2),
        "prefix_lookup_us_128k": round(min(lookup), 1),
        "raw": {"block_alloc_free_ns_runs": {str(n): [round(x, 1) for x in runs] for n, runs in alloc.items()},
                "decode_step_us_runs": [round(x, 2) for x in decode],
                "prefix_lookup_us_128k_runs": [round(x, 1) for x in lookup]},
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:24s} {value}")


if __name__ == "__main__":
    main()
