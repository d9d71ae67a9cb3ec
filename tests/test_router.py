"""The router's loop without Ray: in-process meshes (MeshRunner on the simulated backend)."""
import asyncio

import pytest

from deployments.router import Router, RouterConfig
from model.runner import MeshRunner
from model.simulated import SimulatedBackend
from scheduler.sampling import SamplingParams
from scheduler.work import MeshWork

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def local_mesh(backend):
    """An execute function like the Serve mesh replica's: work runs off the event loop, in order."""
    runner = MeshRunner(backend)
    lock = asyncio.Lock()

    async def execute(work: MeshWork):
        async with lock:
            steps = runner.execute(work)
            while (step := await asyncio.to_thread(next, steps, None)) is not None:
                yield step
    return execute, runner.caps


def make_router(num_meshes=2, fail_mesh=None, **config) -> Router:
    meshes = []
    for i in range(num_meshes):
        execute, caps = local_mesh(SimulatedBackend(num_blocks=256, time_scale=0.01, vocab_size=1000))
        if i == fail_mesh:
            async def execute(work, _inner=execute):
                async for _ in _inner(work):
                    raise RuntimeError("device lost")
                    yield  # pragma: no cover
        meshes.append((f"mesh-{i}", execute, caps))
    return Router(meshes, RouterConfig(**{"prefill_chunk": 256, "max_prefill_tokens": 256,
                                          "stream_interval_ms": 0, **config}))


async def collect(router, rid, prompt, params=GREEDY):
    tokens, reason = [], None
    async for event in router.generate(rid, prompt, params):
        tokens += event.token_ids
        reason = event.finish_reason or reason
    return tokens, reason


def test_concurrent_requests_equal_their_solo_runs():
    async def main():
        prompts = [[i + 1] * (50 + 30 * i) for i in range(10)]
        solo = make_router(num_meshes=1)
        alone = [await collect(solo, f"s{i}", p) for i, p in enumerate(prompts)]
        router = make_router(num_meshes=2)
        together = await asyncio.gather(*[collect(router, f"r{i}", p) for i, p in enumerate(prompts)])
        assert together == alone and all(reason == "length" for _, reason in together)
        stats = router.stats()
        assert all(m["rounds"] > 0 for m in stats["meshes"])  # both meshes served
        assert all(m["blocks_used"] == 0 and m["running"] == 0 for m in stats["meshes"])
    asyncio.run(main())


def test_shared_prefix_goes_to_the_mesh_that_caches_it():
    async def main():
        router = make_router(num_meshes=2)
        prefix = list(range(1, 600))
        await collect(router, "a", prefix + [7, 7])
        before = [m["prefix_hit_tokens"] for m in router.stats()["meshes"]]
        await collect(router, "b", prefix + [9, 9, 9])
        after = [m["prefix_hit_tokens"] for m in router.stats()["meshes"]]
        gained = [a - b for a, b in zip(after, before)]
        assert sorted(gained) == [0, 512]  # 599 shared tokens, rounded down to the 128 alignment
    asyncio.run(main())


def test_closing_a_stream_frees_everything():
    async def main():
        router = make_router(num_meshes=1)
        stream = router.generate("x", [5] * 100, SamplingParams(temperature=0.0, max_tokens=500))
        got = 0
        async for event in stream:
            got += len(event.token_ids)
            if got >= 3:
                break
        await stream.aclose()
        for _ in range(100):
            mesh = router.stats()["meshes"][0]
            if mesh["running"] == 0 and mesh["blocks_used"] == 0:
                break
            await asyncio.sleep(0.02)
        assert mesh["running"] == 0 and mesh["blocks_used"] == 0
    asyncio.run(main())


def test_failed_mesh_fails_its_requests_and_health():
    async def main():
        router = make_router(num_meshes=1, fail_mesh=0)
        tokens, reason = await collect(router, "x", [3] * 20)
        assert reason == "error"
        assert router.stats()["ready"] is False
        with pytest.raises(RuntimeError, match="no mesh"):
            await collect(router, "y", [3] * 20)
    asyncio.run(main())


def test_a_burst_is_split_evenly_across_meshes():
    """Queued requests count as load: a mesh that already admitted some must not get the whole rest."""
    async def main():
        router = make_router(num_meshes=2)
        streams = [router.generate(f"r{i}", [i + 1] * 40, GREEDY) for i in range(8)]
        first = await anext(streams[0])  # mesh of r0 admits it (slot taken) before the others arrive
        assert first.token_ids
        rest = [asyncio.create_task(anext(s)) for s in streams[1:]]
        await asyncio.sleep(0)
        placed = [router.placement[f"r{i}"].name for i in range(8)]
        assert sorted(placed.count(name) for name in ("mesh-0", "mesh-1")) == [4, 4], placed
        await asyncio.gather(*rest)
        for s in streams:
            await s.aclose()
    asyncio.run(main())
