"""The router's loop without Ray: in-process meshes (MeshRunner on the simulated backend), including meshes
that raise, hang, vanish and come back."""
import asyncio
import contextlib
import dataclasses
import logging
import pickle
from types import SimpleNamespace

import pytest
from ray.serve._private.request_router import request_router

from deployments import router as router_module
from deployments.aio import within
from deployments.router import Router, RouterConfig
from model.runner import MeshRunner
from model.simulated import SimulatedBackend
from scheduler import scheduler as scheduler_module
from scheduler.errors import MeshFailures, NoMeshAvailable, QueueFull
from scheduler.sampling import SamplingParams
from scheduler.work import RequestFailed, TokenEvent, pack_events, unpack_events
from tests.counting import counting
from tests.in_process import FAST, nothing_held, until
from tests.local_mesh import Gone, LocalMesh

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
HUNG = dict(min_step_deadline_s=1.0)  # a test whose mesh hangs waits for the deadline that fails it: a short one


def backend():
    return SimulatedBackend(num_blocks=256, time_scale=0.01, vocab_size=1000)


async def make_router(num_meshes=2, make=backend, **config) -> tuple[Router, list[LocalMesh]]:
    """`num_meshes` in-process meshes, each on a backend from `make`, and a router over them once all are up."""
    meshes = [LocalMesh(make) for _ in range(num_meshes)]
    router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**{**FAST, **config}))
    await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
    return router, meshes


async def collect(router, rid, prompt, params=GREEDY):
    tokens, reason = [], None
    async for event in router.generate(rid, prompt, params):
        tokens += event.token_ids
        reason = event.finish_reason or reason
    return tokens, reason


LASTING = SamplingParams(temperature=0.0, max_tokens=2000)  # runs until the test cancels it


def submit_lasting(router, n: int) -> None:
    """n requests r000.. with distinct 40-token prompts, on one consumer."""
    for i in range(n):
        router.submit(f"r{i:03d}", [i + 2] * 40, LASTING, None, [], "c")


async def cancel_all_and_close(router, failovers: int | dict[str, int] = 0) -> None:
    """Cancel every request; they leave nothing held (`held`: with the failovers the test caused); close."""
    for rid in list(router.requests):
        router.cancel(rid)
    await nothing_held(router, failovers)
    await router.close()


PROMPTS = [[i + 1] * (50 + 30 * i) for i in range(10)]
LONG = SamplingParams(temperature=0.0, max_tokens=60)


async def solo_outputs(prompts, params):
    router, _ = await make_router(num_meshes=1)
    out = [await collect(router, f"s{i}", p, params) for i, p in enumerate(prompts)]
    await router.close()
    return out


def test_concurrent_requests_equal_their_solo_runs():
    async def main():
        alone = await solo_outputs(PROMPTS, GREEDY)
        router, _ = await make_router(num_meshes=2)
        together = await asyncio.gather(*[collect(router, f"r{i}", p) for i, p in enumerate(PROMPTS)])
        assert together == alone and all(reason == "length" for _, reason in together)
        assert all(m["rounds"] > 0 for m in router.stats()["meshes"])  # both meshes served
        assert router.stats()["max_model_len"] == 256 * 64  # what one KV group's pool holds (< max_seq_len)
        assert router.stats()["vocab_size"] == 1000  # the ids the meshes embed: the ingress bounds requests by it
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_shared_prefix_goes_to_the_mesh_that_caches_it():
    async def main():
        router, _ = await make_router(num_meshes=2)
        prefix = list(range(1, 600))
        await collect(router, "a", prefix + [7, 7])
        before = [m["prefix_hit_tokens"] for m in router.stats()["meshes"]]
        await collect(router, "b", prefix + [9, 9, 9])
        after = [m["prefix_hit_tokens"] for m in router.stats()["meshes"]]
        gained = [a - b for a, b in zip(after, before)]
        assert sorted(gained) == [0, 512]  # 599 shared tokens, rounded down to the 128 alignment
        await router.close()
    asyncio.run(main())


async def _two_small_meshes(**config) -> Router:
    meshes = [LocalMesh(lambda: SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=256, time_scale=0.01,
                                                  vocab_size=1000)) for _ in range(2)]
    router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**{**FAST, **config}))
    await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
    return router


async def _end(router: Router, streams) -> None:
    """Close the streams; everything they held is freed; close the router."""
    for s in streams:
        await s.aclose()
    await nothing_held(router)
    await router.close()


def test_a_shared_prefix_does_not_pile_onto_a_full_mesh():
    """A cache hit saves one prefill; a queue costs every step until a slot frees. Once the mesh that caches
    a shared prefix has no slot left, the next request goes to the mesh with free slots."""
    async def main():
        router = await _two_small_meshes()
        prefix = list(range(1, 600))
        await collect(router, "warm", prefix + [7])
        cached = next(m["name"] for m in router.stats()["meshes"] if m["blocks_cached"])
        params = SamplingParams(temperature=0.0, max_tokens=3000)
        streams = [router.generate(f"r{i}", prefix + [i + 10], params) for i in range(3)]
        for stream in streams[:2]:
            await anext(stream)  # running, on the mesh that caches the prefix
        assert [router.requests[f"r{i}"].mesh.name for i in range(2)] == [cached, cached]
        await anext(streams[2])
        assert router.requests["r2"].mesh.name != cached
        await _end(router, streams)
    asyncio.run(main())


def test_with_no_mesh_seating_it_a_request_queues_where_the_queue_is_shortest_not_where_its_prefix_is():
    """Among meshes that do not seat a request now, the shortest queue wins over a cached prefix (placement_key): each
    request queued ahead costs it a whole answer's wait, a cache hit one prefill."""
    async def main():
        router = await _two_small_meshes()
        prefix = list(range(1, 600))
        await collect(router, "warm", prefix + [7])
        cached = next(m for m in router.meshes if m.scheduler.stats()["blocks_cached"])
        for rid, prompt in (("p0", prefix + [10]), ("p1", prefix + [11]), ("d0", [2] * 40), ("d1", [3] * 40),
                            ("p2", prefix + [12])):  # p2 queues on the mesh that caches the prefix: both are full
            router.submit(rid, prompt, LASTING, None, [], "c")
        assert [router.requests[r].mesh is cached for r in ("p0", "p1", "d0", "d1", "p2")] == [True, True, False,
                                                                                               False, True]
        router.submit("x", prefix + [13], LASTING, None, [], "c")
        assert router.requests["x"].mesh.name != cached.name
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_prompt_scored_goes_to_the_mesh_that_seats_it_not_to_one_that_caches_it():
    """A request that asks for its prompt's logprobs computes every position (no prefix-cache hit), so a mesh whose
    cache holds its prefix but whose pool lacks the blocks for the whole prompt does not seat it now: it was ranked
    as one that did (placement_key counted the hit), over a mesh with the room, and waited there."""
    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=16, time_scale=0.01,
                                                      vocab_size=1000)) for _ in range(2)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        prefix = list(range(1, 600))
        stream = router.generate("run", prefix + [7], SamplingParams(temperature=0.0, max_tokens=300))
        await anext(stream)  # 10 of its mesh's 16 blocks, its prompt's cached
        busy = router.requests["run"].mesh
        for rid, scored in (("hit", None), ("scored", 0)):
            router.submit(rid, prefix + [9], SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=scored),
                          None, [], "c")
            chosen = router.requests[rid].mesh
            router.cancel(rid)
            assert (chosen is busy) == (scored is None), rid  # 8 cached blocks: 2 more fit there, not 10
        router.detach("c")
        await _end(router, [stream])
    asyncio.run(main())


def test_a_full_queue_sends_a_request_to_the_next_mesh():
    """Not back to the client as a 429 while another mesh has room in its queue."""
    async def main():
        router = await _two_small_meshes(max_waiting_requests=2)
        prefix = list(range(1, 600))
        await collect(router, "warm", prefix + [7])
        streams = [router.generate(f"r{i}", prefix + [i + 10], LONG) for i in range(9)]
        firsts = [asyncio.create_task(anext(s)) for s in streams]
        await asyncio.sleep(0)  # all nine submitted before either mesh admits one: 2 seated + 2 queued on each
        assert sorted(router.requests[f"r{i}"].mesh.name for i in range(8)) == ["mesh-0"] * 4 + ["mesh-1"] * 4
        with pytest.raises(QueueFull):
            await firsts[8]
        await asyncio.gather(*firsts[:8])
        await _end(router, streams)
    asyncio.run(main())


def test_a_continuation_is_not_refused_by_queue_limits():
    """After a router restart every ingress resubmits its open streams at once: they are no new load, and a
    429 would end a stream whose text is half delivered."""
    async def main():
        router, _ = await make_router(num_meshes=1, max_waiting_requests=1)
        whole, _ = await collect(router, "a", PROMPTS[2], LONG)
        streams = [router.generate(f"c{i}", PROMPTS[2], LONG, None, whole[:5]) for i in range(6)]
        rests = await asyncio.gather(*[_drain(s) for s in streams])
        assert rests == [whole[5:]] * 6
        await router.close()
    asyncio.run(main())


def test_a_later_choice_is_not_refused_by_queue_limits_while_its_first_choice_is_here():
    """The limits refuse API requests, not choices: an n-choice request whose first choice got in near the limit must
    not get 429 for its second. A later choice whose first is not here (refused, or ended) is new load."""
    async def main():
        router = await _two_small_meshes(max_waiting_requests=1)
        for i in range(6):  # 2 slots on each mesh, then a queue of 1 on each: both full
            router.submit(f"r{i}", [i + 2] * 40, LASTING, None, [], "c")
        with pytest.raises(QueueFull):
            router.submit("new", [9] * 40, LASTING, None, [], "c")
        router.submit("r0-choice-1", [2] * 40, LASTING, None, [], "c", continuation="r0")
        with pytest.raises(QueueFull):
            router.submit("new-choice-1", [9] * 40, LASTING, None, [], "c", continuation="new")
        assert "r0-choice-1" in router.requests and "new-choice-1" not in router.requests
        await cancel_all_and_close(router)
    asyncio.run(main())


async def _drain(stream) -> list[int]:
    tokens = []
    async for event in stream:
        tokens += event.token_ids
    return tokens


def test_close_returns_when_it_lands_as_an_idle_mesh_is_woken():
    """asyncio.wait_for before Python 3.12 swallows a cancel that lands as its future completes (gh-86296):
    the idle mesh loop then went on forever and close() never returned."""
    async def main():
        router, _ = await make_router(num_meshes=1)
        await asyncio.sleep(0.05)  # the mesh loop waits for a wake-up
        router.submit("r", [1] * 50, SamplingParams(temperature=0.0, max_tokens=4), None, [], "c")  # wakes it
        closing = asyncio.create_task(router.close())  # its cancel lands with the wake-up
        done, _ = await asyncio.wait([closing], timeout=5)
        assert done, "close() hung"
    asyncio.run(main())


def test_a_mesh_whose_capabilities_the_config_cannot_schedule_says_why():
    async def main():
        mesh = LocalMesh(lambda: SimulatedBackend(block_size=48, num_blocks=256, time_scale=0.01, vocab_size=1000))
        router = Router([("mesh-0", mesh)], RouterConfig(**FAST))
        await until(lambda: "cannot be scheduled" in (router.stats()["meshes"][0]["failed"] or ""))
        assert not router.stats()["meshes"][0]["up"] and not router.stats()["ready"]
        await router.close()
    asyncio.run(main())


def test_a_mesh_the_config_cannot_schedule_does_not_narrow_the_served_limits():
    """It will never serve, so its smaller vocabulary and length must not become the ingress's limits (stats'
    vocab_size and max_model_len, from which its 400s count): they were the minimum over it too."""
    async def main():
        good = LocalMesh(lambda: SimulatedBackend(num_blocks=64, time_scale=0.01, vocab_size=1000))
        bad = LocalMesh(lambda: SimulatedBackend(block_size=48, num_blocks=8, time_scale=0.01, vocab_size=500))
        router = Router([("mesh-0", good), ("mesh-1", bad)], RouterConfig(**FAST))
        await until(lambda: router.stats()["meshes"][0]["up"]
                    and "cannot be scheduled" in (router.stats()["meshes"][1]["failed"] or ""))
        stats = router.stats()
        assert (stats["vocab_size"], stats["max_model_len"]) == (1000, 64 * 64)
        await router.close()
    asyncio.run(main())


def test_a_mesh_redeployed_with_capabilities_the_config_can_schedule_is_served():
    """A mesh that could not be scheduled was never asked again: redeployed alone with capabilities that fit (the
    router's config unchanged, so Serve keeps the router), it stayed down, its max_len 0, until the router restarted."""
    async def main():
        mesh = LocalMesh(lambda: SimulatedBackend(block_size=48, num_blocks=256, time_scale=0.01, vocab_size=1000))
        router = Router([("mesh-0", mesh)], RouterConfig(**FAST))
        await until(lambda: "cannot be scheduled" in (router.stats()["meshes"][0]["failed"] or ""))
        mesh.make_backend = lambda: SimulatedBackend(num_blocks=64, time_scale=0.01, vocab_size=1000)
        mesh.restart()  # Serve's redeploy of the mesh replica: a new incarnation
        await until(lambda: router.stats()["meshes"][0]["up"])
        assert router.stats()["max_model_len"] == 64 * 64
        got = [e async for e in router.generate("r", [5] * 10, SamplingParams(temperature=0.0, max_tokens=3))]
        assert got[-1].finish_reason == "length"
        await router.close()
    asyncio.run(main())


def test_with_no_live_mesh_a_mesh_the_config_cannot_schedule_adds_no_room_to_hold():
    """The held requests' limit (max_waiting_requests per mesh plus the slots of those that were up) counted a mesh
    that can never be scheduled, its slots too: requests no mesh would seat were held, not refused."""
    async def main():
        good = LocalMesh(lambda: SimulatedBackend(num_slots=4, kv_groups=1, num_blocks=64, time_scale=0.01,
                                                  vocab_size=1000))
        bad = LocalMesh(lambda: SimulatedBackend(num_slots=8, kv_groups=1, block_size=48, num_blocks=8,
                                                 time_scale=0.01, vocab_size=1000))
        router = Router([("mesh-0", good), ("mesh-1", bad)],
                        RouterConfig(**{**FAST, "max_waiting_requests": 1, "no_mesh_wait_s": 30}))
        await until(lambda: router.stats()["ready"]
                    and "cannot be scheduled" in (router.stats()["meshes"][1]["failed"] or ""))
        params = SamplingParams(temperature=0.0, max_tokens=4)
        good.vanish()
        router.submit("probe", [1] * 20, params, None, [], "c")  # its first work finds the replica gone
        await until(lambda: not router.stats()["ready"] and router.stats()["held"] == 1)
        for i in range(4):  # mesh-0's max_waiting_requests and its 4 slots: 5 in all
            router.submit(f"r{i}", [2] * 20, params, None, [], "c")
        with pytest.raises(QueueFull):
            router.submit("more", [3] * 20, params, None, [], "c")
        await router.close()
    asyncio.run(main())


def test_closing_a_stream_frees_everything():
    """Closing a request's stream cancels it on its mesh's scheduler at once: nothing_held alone waits up to 10 s, in
    which the 500 tokens of a request whose cancel never reached the scheduler were made anyway."""
    async def main():
        router, _ = await make_router(num_meshes=1)
        stream = router.generate("x", [5] * 100, SamplingParams(temperature=0.0, max_tokens=500))
        got = 0
        async for event in stream:
            got += len(event.token_ids)
            if got >= 3:
                break
        await stream.aclose()
        assert "x" not in router.requests and "x" not in router.meshes[0].scheduler.requests
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_a_request_cancelled_on_an_idle_mesh_leaves_nothing_on_the_mesh():
    """A cancel frees the slot in the router's scheduler at once, and the mesh learns it from the next work's release
    list: on a mesh left idle, none came (not even its heartbeat), and the runner kept the slot's state (its grammar
    matcher, penalty counts and token history) for a request long gone. It goes at once, in a work of its own, not
    with the next heartbeat (heartbeat_s: 5 s by default, here longer than the test waits)."""
    async def main():
        router, (mesh,) = await make_router(num_meshes=1, heartbeat_s=60.0)
        stream = router.generate("x", [5] * 100, SamplingParams(temperature=0.0, max_tokens=500, presence_penalty=1.0))
        async for event in stream:
            if event.token_ids:
                break
        await stream.aclose()
        await nothing_held(router)
        await until(lambda: not mesh.runner.slots, timeout_s=5.0)
        await router.close()
    asyncio.run(main())


def test_a_final_chunk_the_mesh_retired_unrun_leaves_no_prefix_in_the_cache():
    """A mesh that cannot set up a request's grammar (here: it has no grammar tokenizer; elsewhere: llguidance refuses
    it, or a recompute's tokens) retires the slot before its final prefill chunk runs. The router took that chunk as
    computed and cached its full blocks, so the next prompt with the same prefix reused KV nobody had written and
    answered wrong."""
    async def main():
        prompt = [(i * 7) % 900 + 1 for i in range(250)]  # one chunk: the final one
        (alone,) = await solo_outputs([prompt], GREEDY)
        router, _ = await make_router(num_meshes=1)
        constrained = GREEDY.model_copy(update={"grammar": '{"grammars": []}'})
        assert (await collect(router, "g", prompt, constrained)) == ([], "error")
        assert await collect(router, "b", prompt) == alone
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


@pytest.mark.parametrize("fault", ["raise", "hang", "vanish"])
def test_a_failed_mesh_loses_no_request_and_rejoins(fault):
    """Mid-stream, mesh-0 raises / stops answering / dies: every request finishes on mesh-1 with exactly
    the tokens of its unfaulted run, and mesh-0 serves again once it is back."""
    async def main():
        alone = await solo_outputs(PROMPTS, LONG)
        router, (m0, _) = await make_router(num_meshes=2, **(HUNG if fault == "hang" else {}))
        m0.inject(fault, after=12)  # prefills done, decoding
        assert await asyncio.gather(*[collect(router, f"r{i}", p, LONG) for i, p in enumerate(PROMPTS)]) == alone
        mesh0 = router.stats()["meshes"][0]
        assert mesh0["failovers"] == 1 and mesh0["requests_migrated"] == 5
        queried = mesh0["prefix_query_tokens"]
        assert queried > 0  # its prompts: counted by the scheduler that failed, and kept (counters do not go back)
        # each prompt looked up once: a request moved to mesh-1 is no new lookup there (prompt + output)
        assert sum(m["prefix_query_tokens"] for m in router.stats()["meshes"]) == sum(map(len, PROMPTS))
        if fault == "vanish":
            assert not mesh0["up"] and router.stats()["ready"]
            old = m0.incarnation
            m0.restart()
            await until(lambda: router.stats()["meshes"][0]["incarnation"] == m0.incarnation != old)
        await until(lambda: router.stats()["meshes"][0]["up"])
        await nothing_held(router, {"mesh-0": 1})
        works = m0.works
        assert router.stats()["meshes"][0]["prefix_query_tokens"] == queried  # the fresh scheduler's 0 added
        again = await asyncio.gather(*[collect(router, f"again{i}", p, LONG) for i, p in enumerate(PROMPTS)])
        assert again == alone and m0.works > works  # mesh-0 is placed on again
        assert router.stats()["meshes"][0]["prefix_query_tokens"] > queried
        await nothing_held(router, {"mesh-0": 1})
        await router.close()
    asyncio.run(main())


# fault -> (stops counted, the WARNING's words, the "up again" line's end)
ROUTINE = {"stop": (1, "stopped: its replica is being replaced", "after its replica's planned stop 1"),
           "taken": (0, "taken by another router", "after another router took it")}


@pytest.mark.parametrize("fault", list(ROUTINE))
def test_a_routine_mesh_loss_moves_every_request_and_is_no_failover(caplog, fault):
    """Fault "stop": Serve stops mesh-0's replica on purpose mid-stream (a redeploy of its options, a scale-down); "taken":
    at a redeploy of the router's options the new router, started beside this one, takes the mesh's lease and this
    router's works are refused (LeaseTaken). The requests move as at a failure and finish with the tokens of their
    unfaulted run, but neither is a failover: an operator's alert on failovers (or on ERROR lines) fired at every
    routine redeploy. A stop is counted as one; each is logged at WARNING, and the line when the mesh is back says
    after what (here a taken lease comes back: the other router went silent)."""
    stops, said, back = ROUTINE[fault]

    async def main():
        alone = await solo_outputs(PROMPTS, LONG)
        router, (m0, _) = await make_router(num_meshes=2)
        m0.inject(fault, after=12)  # prefills done, decoding
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            assert await asyncio.gather(*[collect(router, f"r{i}", p, LONG) for i, p in enumerate(PROMPTS)]) == alone
            await until(lambda: router.stats()["meshes"][0]["up"])
        mesh0 = router.stats()["meshes"][0]
        assert (mesh0["failovers"], mesh0["stops"], mesh0["requests_migrated"]) == (0, stops, 5)
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if "mesh-0" in r.getMessage()]
        assert not [m for level, m in lines if level >= logging.ERROR], lines
        (lost,) = [(level, m) for level, m in lines if said in m]
        assert lost[0] == logging.WARNING and "its 5 requests: 5 moved (mesh-1: 5)" in lost[1], lost
        assert any("up again" in m and m.endswith(back) for _, m in lines), lines
        await nothing_held(router, {"mesh-0": stops})  # a stop's new scheduler counts, as after a failover
        await router.close()
    asyncio.run(main())


def test_with_no_live_mesh_requests_wait_for_one_to_come_back():
    async def main():
        alone = await solo_outputs(PROMPTS[:4], LONG)
        router, (m0,) = await make_router(num_meshes=1)
        m0.inject("vanish", after=8)
        tasks = [asyncio.create_task(collect(router, f"r{i}", p, LONG)) for i, p in enumerate(PROMPTS[:4])]
        await until(lambda: not router.stats()["ready"])
        late = asyncio.create_task(collect(router, "late", PROMPTS[0], LONG))  # arrives with no mesh up
        await asyncio.sleep(0.2)
        assert router.stats()["held"] == 5
        m0.restart()
        assert await asyncio.gather(*tasks) == alone
        assert await late == alone[0]
        await router.close()
    asyncio.run(main())


def test_a_request_that_ran_longer_than_no_mesh_wait_s_still_waits_that_long_once_held():
    """no_mesh_wait_s counts from when a request began to wait for a mesh, not from its arrival: a stream that had run
    past it when its mesh failed was failed (503) at the next tick of the held check, with no wait at all."""
    async def main():
        slow = lambda: SimulatedBackend(num_blocks=256, time_scale=1.0, vocab_size=1000)  # noqa: E731
        router, (mesh,) = await make_router(num_meshes=1, make=slow, no_mesh_wait_s=2.0)
        stream = router.generate("a", [5] * 10, LASTING)
        await anext(stream)
        await asyncio.sleep(2.2)  # it has run past no_mesh_wait_s
        mesh.vanish()
        await until(lambda: "a" in router.held)
        await asyncio.sleep(1.0)  # two ticks of the held check (every no_mesh_wait_s / 4), 1 s inside the wait
        assert "a" in router.held
        mesh.restart()
        await until(lambda: "a" not in router.held)
        assert router.requests["a"].mesh is router.meshes[0]
        await stream.aclose()
        await nothing_held(router, failovers=1)
        await router.close()
    asyncio.run(main())


def test_with_no_mesh_for_too_long_requests_get_no_mesh_available():
    async def main():
        router, (m0,) = await make_router(num_meshes=1, no_mesh_wait_s=0.3)
        m0.vanish()
        task = asyncio.create_task(collect(router, "x", [3] * 40, LONG))
        await asyncio.sleep(0.05)
        with pytest.raises(NoMeshAvailable, match="available for 0.3 s"):  # not "0 s"
            await task
        assert router.stats()["held"] == 0
        await router.close()
    asyncio.run(main())


def test_a_failed_meshs_requests_each_move_once_among_the_meshes_left():
    """With two live meshes left, each request of the failed one is placed again on one of them, once: placed on both,
    its tokens came twice (or a refused second placement failed it) and the first copy held its slot and blocks."""
    async def main():
        alone = await solo_outputs(PROMPTS, LONG)
        router, (m0, _, _) = await make_router(num_meshes=3)
        m0.inject("raise", after=12)  # prefills done, decoding
        assert await asyncio.gather(*[collect(router, f"r{i}", p, LONG) for i, p in enumerate(PROMPTS)]) == alone
        mesh0 = router.stats()["meshes"][0]
        assert mesh0["failovers"] == 1 and mesh0["requests_migrated"] > 0
        await until(lambda: router.stats()["meshes"][0]["up"])
        await nothing_held(router, {"mesh-0": 1})
        await router.close()
    asyncio.run(main())

def test_a_request_held_off_a_failed_mesh_until_it_ends_is_not_counted_as_migrated(caplog):
    """meshserve_requests_migrated_total counts requests moved off a failed mesh. It counted each request the failure
    drained, so one held for a live mesh until no_mesh_wait_s ran out (503), never moved, counted too. The log says it
    failed: the mesh's failure line said it was held, and a streamed answer's access line says 200."""
    caplog.set_level(logging.INFO, logger="ray.serve")
    async def main():
        router, (m0,) = await make_router(num_meshes=1, no_mesh_wait_s=0.3)
        m0.vanish()  # its first work fails: the request is held, and no mesh comes back
        with pytest.raises(NoMeshAvailable):
            await collect(router, "x", [3] * 40, LONG)
        (mesh0,) = router.stats()["meshes"]
        assert mesh0["failovers"] == 1 and mesh0["requests_migrated"] == 0
        await router.close()
    asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "ray.serve"]
    assert [m for m in said if m.startswith("mesh mesh-0 failed")][0].endswith(": 1 held for a live mesh; probing it "
                                                                               "until its replica answers again")
    assert said[-1] == ("1 held requests failed (503): no mesh that takes them came within no_mesh_wait_s (0.3 s); 1 "
                        "of them had been on a failed mesh")


def test_a_request_held_off_a_failed_mesh_counts_as_migrated_once_placed_again():
    """The other side of the case above: held while its only mesh is down, then placed on it once it is back, it moved
    (recomputed there with its tokens so far), and counts once."""
    async def main():
        alone = await solo_outputs([PROMPTS[0]], LONG)
        router, (m0,) = await make_router(num_meshes=1)
        m0.inject("raise", after=6)  # mid-decode; the replica answers its probe, and the mesh rejoins
        assert [await collect(router, "x", PROMPTS[0], LONG)] == alone
        (mesh0,) = router.stats()["meshes"]
        assert mesh0["failovers"] == 1 and mesh0["requests_migrated"] == 1
        await router.close()
    asyncio.run(main())


def test_a_request_that_crashes_each_mesh_in_decode_ends_after_max_mesh_failures():
    """A move's recompute samples one token in its prefill: counted as progress, it cleared a request whose decode
    crashed each mesh it reached, which then went on crashing meshes, one per token."""
    async def main():
        router, meshes = await poison_router()
        with pytest.raises(MeshFailures):
            await within(collect(router, "poison", [5] * 40, LONG), 10)
        assert sum(m.deaths for m in meshes) == 2
        await router.close()
    asyncio.run(main())


def test_streams_that_make_tokens_between_two_failures_are_not_blamed_for_them():
    """Each mesh fails once mid-decode, for reasons of its own: every stream in those decode rounds is laid with
    the failure, but a stream that made tokens since its last one is cleared of it. Two unrelated failures in a
    stream's life ended it with a 500."""
    async def main():
        prompts = PROMPTS[:4]
        alone = await solo_outputs(prompts, LONG)
        router, (m0, m1) = await make_router(num_meshes=2)
        # Counted in messages (one per prefill chunk or decode step), not waited for: at this time_scale the whole
        # answer takes ~20 ms, and a fault injected once a poll saw the streams running came after they ended.
        m0.inject("raise", after=6)  # mid-decode: its two streams move to mesh-1
        m1.inject("raise", after=30)  # the moved streams made tokens there before this (~60 messages in all)
        tasks = [asyncio.create_task(collect(router, f"r{i}", p, LONG)) for i, p in enumerate(prompts)]
        assert await within(asyncio.gather(*tasks), 20) == alone
        await nothing_held(router, 1)
        assert 1 not in m0.round_steps + m1.round_steps  # none was suspected twice: no step run alone to clear it
        await router.close()
    asyncio.run(main())


def test_new_requests_go_around_a_mesh_that_stopped_answering_before_its_deadline():
    """A hung mesh is failed only at its deadline (minutes on a Galaxy); until then it looked free, and about
    half of the new requests were placed there to wait for that verdict. Now it counts as stalled after
    STALL_S of silence with work out, and they go to the mesh that answers."""
    async def main():
        prompts = PROMPTS[:8]
        alone = await solo_outputs(prompts, LONG)
        router, (m0, m1) = await make_router(num_meshes=2, min_step_deadline_s=60)
        submit_lasting(router, 2)  # one on each mesh
        await until(lambda: all(m["running"] == 1 for m in router.stats()["meshes"]))
        m0.inject("hang", after=0)
        await asyncio.sleep(1.5)  # STALL_S + a little: m0 has sent nothing since
        assert [(m["up"], m["stalled"]) for m in router.stats()["meshes"]] == [(True, True), (True, False)]
        works = m1.works
        assert await within(asyncio.gather(*[collect(router, f"n{i}", p, LONG) for i, p in enumerate(prompts)]),
                            10) == alone
        assert m1.works > works
        m0.unhang.set()
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_mesh_idle_for_long_is_not_stalled_by_the_work_it_was_just_sent():
    """A mesh's silence counts from the work it was sent when it had none out, not from its last answer: one idle past
    STALL_S (no heartbeat since it came up, heartbeat_s being long) was stalled as soon as its next work went out, and
    placement went around it until that work's first result."""
    async def main():
        router, (mesh,) = await make_router(num_meshes=1, heartbeat_s=60.0)
        await asyncio.sleep(router.meshes[0].stall_s + 0.2)  # idle, unheard, past its stall time
        mesh.inject("hang", after=0)  # the work's first result waits
        router.submit("a", [5] * 10, GREEDY, None, [], "c")
        await until(lambda: router.meshes[0].scheduler.inflight)
        assert not router.stats()["meshes"][0]["stalled"]
        mesh.unhang.set()
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_replica_that_dies_right_after_its_last_answer_is_failed_over_at_once():
    """A replica that goes just after its last work's final frame: the close's wake came while that work was still
    being taken in, the loop cleared it on its next round, found no work to send and waited idle a whole heartbeat
    (heartbeat_s, 5 s) before it looked at the closed link."""
    async def main():
        mesh, closed = LocalMesh(backend), asyncio.Event()
        mesh.wait_closed = closed.wait
        real = mesh.execute

        async def execute(work, incarnation):
            async for step in real(work, incarnation):
                yield step
                if step.finished:  # its answer is in: the process goes, its link closes
                    closed.set()
        mesh.execute = execute
        router = Router([("mesh-0", mesh)], RouterConfig(**{**FAST, "heartbeat_s": 60, "probe_interval_s": 60}))
        await until(lambda: router.stats()["ready"])
        assert (await collect(router, "a", [7] * 100))[1] == "length"  # answered in full before it went
        await until(lambda: not router.stats()["meshes"][0]["up"], timeout_s=2)
        assert "closed while it was idle" in router.stats()["meshes"][0]["failed"]
        await router.close()
    asyncio.run(main())


def test_new_requests_go_around_an_idle_mesh_whose_host_froze():
    """A Galaxy host that freezes or is cut off while its mesh is idle sends no FIN: only the idle mesh's heartbeat
    (an empty work) is out, and it went unanswered until min_step_deadline_s. That heartbeat was no work out for
    the stall check, and the mesh's loop waited on it sending nothing else: the silent mesh looked free and every
    other new request was placed there to wait for that deadline (30 s by default)."""
    async def main():
        prompts = PROMPTS[:8]
        alone = await solo_outputs(prompts, LONG)
        router, (m0, m1) = await make_router(num_meshes=2, min_step_deadline_s=60)
        frozen = asyncio.Event()

        async def silent(work, incarnation):  # the host froze: nothing comes back, the link stays open
            await frozen.wait()
            yield  # pragma: no cover
        m0.execute = silent
        await asyncio.sleep(1.5)  # a heartbeat (every 0.2 s) went out and STALL_S passed without an answer
        # not failed (its deadline is a minute away), but shown as going around
        assert [(m["up"], m["stalled"]) for m in router.stats()["meshes"]] == [(True, True), (True, False)]
        assert await within(asyncio.gather(*[collect(router, f"n{i}", p, LONG) for i, p in enumerate(prompts)]),
                            10) == alone
        frozen.set()
        await router.close()
    asyncio.run(main())


def test_an_idle_mesh_that_leaves_its_heartbeat_unanswered_is_failed_saying_for_how_long():
    """Its reason read "went unanswered for 0 s" for a min_step_deadline_s under a second."""
    async def main():
        router, (m0,) = await make_router(num_meshes=1, min_step_deadline_s=0.3, probe_interval_s=60)

        async def silent(work, incarnation):  # the host froze while the mesh was idle
            await asyncio.Event().wait()
            yield  # pragma: no cover
        m0.execute = silent
        await until(lambda: not router.stats()["meshes"][0]["up"], timeout_s=5)
        assert "went unanswered for 0.3 s" in router.stats()["meshes"][0]["failed"]
        await router.close()
    asyncio.run(main())


def test_a_queue_is_not_offered_to_a_stalled_mesh_round_after_round():
    """_movable counted a stalled mesh's free slots as room that _rebalance then would not use: nearly every
    round of the busy mesh ran a rebalance that moved nothing, for as long as the stall lasted (minutes)."""
    async def main():
        router, (m0, m1) = await make_router(num_meshes=2, min_step_deadline_s=60)
        router.submit("first", [2] * 40, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)
        m0.inject("hang", after=0)
        await asyncio.sleep(1.5)
        for i in range(40):
            router.submit(f"r{i:03d}", [i + 3] * 40, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][1]["running"] == 32)
        calls, rebalance = [], router._rebalance
        router._rebalance = lambda: (calls.append(1), rebalance())
        rounds = m1.works
        await asyncio.sleep(0.5)
        assert m1.works - rounds > 10 and len(calls) <= 1
        assert router.stats()["meshes"][0]["running"] == 1 and router.stats()["meshes"][1]["waiting"] == 8
        m0.unhang.set()
        await cancel_all_and_close(router)
    asyncio.run(main())


class DeviceFault(RuntimeError):
    pass


class PoisonedRunner(MeshRunner):
    """Raises DeviceFault computing a request of `mesh.poison` (a device fault at that request's shape): its prefill
    chunks (mesh.at == "prefill"), or any decode step that holds its slot ("decode")."""

    def __init__(self, backend, mesh: "PoisonMesh"):
        super().__init__(backend)
        self.mesh = mesh

    def _prefill(self, work_id, chunk, last):
        if self.mesh.at == "prefill" and chunk.request_id in self.mesh.poison:
            raise DeviceFault(chunk.request_id)
        return super()._prefill(work_id, chunk, last)

    def _decode_step(self, live, args, result):
        self._fault(live)
        super()._decode_step(live, args, result)

    def _start(self, live, *args):  # a step the simulated backend overlaps with the host's work
        self._fault(live)
        return super()._start(live, *args)

    def _fault(self, live):
        flaky = self.mesh.flaky > 0  # a fault of its own, whoever is in the round
        if flaky or self.mesh.at == "decode" and any(self.slots[s].request_id in self.mesh.poison for s in live):
            self.mesh.flaky -= flaky
            raise DeviceFault([self.slots[s].request_id for s in live])


class PoisonMesh(LocalMesh):
    """A mesh that fails computing the poison requests (PoisonedRunner): it dies, as the replica does after a device
    error, and Serve brings it back 0.1 s later as a new incarnation (or once the test sets `back`); or it hangs
    (how="hang") until the router gives up on the work."""

    def __init__(self, make_backend, poison=("poison",), at="decode", how="raise", flaky=0,
                 back: asyncio.Event | None = None):
        self.poison, self.at, self.how, self.back = set(poison), at, how, back
        self.flaky = flaky  # its next `flaky` decode steps fail, whatever they compute
        self.deaths = 0
        self.faults: list = []  # what each fault was computing
        super().__init__(make_backend)

    def restart(self) -> None:
        super().restart()
        self.runner = PoisonedRunner(self.runner.backend, self)

    async def execute(self, work, incarnation):
        try:
            async for step in super().execute(work, incarnation):
                yield step
        except DeviceFault as fault:
            self.deaths += 1
            self.faults.append(fault.args[0])
            if self.how == "hang":
                await asyncio.Event().wait()  # until the router's deadline closes this stream
            self.vanish()
            self.coming_back = asyncio.ensure_future(self._come_back())
            raise Gone("device error") from None

    async def _come_back(self) -> None:
        if self.back is None:
            await asyncio.sleep(0.1)
        else:
            await self.back.wait()
            self.back.clear()
        self.restart()


async def poison_router(num_meshes=2, **kwargs) -> tuple[Router, list[PoisonMesh]]:
    meshes = [PoisonMesh(backend, **kwargs) for _ in range(num_meshes)]
    config = {**FAST, "no_mesh_wait_s": 5, **(HUNG if kwargs.get("how") == "hang" else {})}
    router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**config))
    await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
    return router, meshes


@pytest.mark.parametrize("num_meshes", [1, 2])
def test_a_request_that_crashes_each_mesh_it_reaches_ends_after_max_mesh_failures(num_meshes):
    """It was moved from mesh to mesh (and back to the one restarted) forever, every other request recomputed at
    each move and none finishing. Now it fails (500) on its second crash; the requests beside it are not blamed
    (the meshes died computing its prefill) and finish with their unfaulted tokens."""
    async def main():
        prompts = PROMPTS[:6]
        alone = await solo_outputs(prompts, LONG)
        router, meshes = await poison_router(num_meshes, at="prefill")
        others = [asyncio.create_task(collect(router, f"r{i}", p, LONG)) for i, p in enumerate(prompts)]
        await asyncio.sleep(0.05)
        with pytest.raises(MeshFailures):
            await within(collect(router, "poison", [5] * 350, LONG), 10)
        assert sum(m.deaths for m in meshes) == 2
        assert await within(asyncio.gather(*others), 20) == alone
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        await nothing_held(router, {f"mesh-{i}": m.deaths for i, m in enumerate(meshes)})
        await router.close()
    asyncio.run(main())


@pytest.mark.parametrize("num_meshes, poison, how", [
    (1, ["poison"], "raise"), (2, ["poison"], "raise"), (2, ["poison"], "hang"),
    (2, ["poison-0", "poison-1"], "raise"),  # two at once, as the choices of one request with n=2 are
])
def test_a_request_that_crashes_its_decode_rounds_fails_alone(num_meshes, poison, how):
    """A failure is laid on every request of the decode round the mesh was computing: the streams beside a request
    whose decode crashes each mesh moved with it, were in its round again on the next mesh, and ended with it
    (a 500 each). Now the requests of a round that failed twice decode their next step alone: the poison fails
    there, alone, at its second or third crash, and its neighbours finish with their unfaulted tokens."""
    async def main():
        prompts = [[i + 1] * 20 for i in range(4)]  # short: moved together, they recompute in one work
        params = SamplingParams(temperature=0.0, max_tokens=300)
        alone = await solo_outputs(prompts, params)
        router, meshes = await poison_router(num_meshes, poison=poison, how=how)
        others = [asyncio.create_task(collect(router, f"r{i}", p, params)) for i, p in enumerate(prompts)]
        await until(lambda: sum(m["running"] for m in router.stats()["meshes"]) == 4)
        for result in await within(asyncio.gather(*[collect(router, rid, [5] * 20, LONG) for rid in poison],
                                                  return_exceptions=True), 20):
            assert isinstance(result, MeshFailures)
        assert await within(asyncio.gather(*others), 20) == alone
        faults = [fault for m in meshes for fault in m.faults]
        for rid in poison:  # the crash that ends it, it caused alone
            assert sum(rid in fault for fault in faults) <= 3 and [rid] in faults
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        await nothing_held(router, {f"mesh-{i}": m.deaths for i, m in enumerate(meshes)})
        await router.close()
    asyncio.run(main())


def test_a_poison_request_preempted_after_its_recompute_and_moved_still_ends_after_max_mesh_failures():
    """A request whose decode crashes each mesh it reaches, moved (_rebalance) off the queue of a mesh that preempted
    it after its recompute's prefill sampled a token, before any decode step: were that token left out of the tokens
    prefills sampled (_Request.prefill_sampled; checked by dropping the line in _rebalance), it read at the next crash
    as a decode step made since the first, the count of failures in a row went back to 1, and the request crashed a
    third mesh. It ends at its second crash (max_mesh_failures 2).
    Two meshes of 2 slots and 8 blocks of 64 tokens. On A a stream (prompt 321, 63 tokens) holds 6 blocks, never a
    7th; the poison (prompt 124) crashes B in its first decode step and moves to A with 125 tokens: the 2 blocks left
    seat it, not the 3rd its first decode round needs, so once its recompute's token is in it is preempted (_victim:
    the newest), and A lacks the room its re-seat needs (_headroom) while the stream runs. B comes back, answers a
    work (until then the poison shuns it: _Request.shuns), and the poison moves off A's queue to B and crashes it."""
    async def main():
        small = lambda: SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=8, time_scale=1.0, vocab_size=1000)
        meshes = [PoisonMesh(small, back=asyncio.Event()) for _ in range(2)]  # each back when the test says
        # one work out at a time: the next plan (whose lookahead preempts it) sees its recompute's token
        config = RouterConfig(**{**FAST, "no_mesh_wait_s": 5, "pipeline_depth": 1})
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], config)
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        stream = asyncio.create_task(collect(router, "s", [7] * 321, SamplingParams(temperature=0.0, max_tokens=63)))
        await until(lambda: "s" in router.requests)
        a = router.requests["s"].mesh
        b = next(m for m in router.meshes if m is not a)
        poison = asyncio.create_task(collect(router, "poison", [5] * 124, LONG))
        await until(lambda: "poison" in router.requests)
        assert router.requests["poison"].mesh is b
        await until(lambda: router.requests["poison"].mesh is a and a.scheduler.num_preemptions == 1)
        seq = a.scheduler.requests["poison"]
        assert seq.num_prefill_sampled == 1 and len(seq.output_ids) == 2  # its prefill's token on B, its recompute's
        assert not stream.done()  # s still holds its 2 blocks: the poison waits in A's queue
        b.client.back.set()  # B comes back; the poison shuns it (Request.shuns) until it answers a work: w's
        await until(lambda: b.up)
        assert router.requests["poison"].mesh.name == a.name  # not moved at B's rejoin (_rebalance): B failed computing it alone
        await within(collect(router, "w", [9] * 10, SamplingParams(temperature=0.0, max_tokens=1)), 10)
        with pytest.raises(MeshFailures):  # the poison moved off A's queue to B (_rebalance), and crashed it
            await within(poison, 10)
        assert b.client.deaths == 2 and a.client.deaths == 0  # it ended at its second crash, not at a third on A
        await within(stream, 10)
        b.client.back.set()
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        await nothing_held(router, {b.name: 2})
        await router.close()
    asyncio.run(main())


class CrashLoopMesh(LocalMesh):
    """A replica that resets fine but fails every work with something to compute, at its first result (a device
    that comes up broken, or a crash loop); the empty works of the router's heartbeat pass."""

    def __init__(self, make_backend):
        self.crashes = 0
        super().__init__(make_backend)

    async def execute(self, work, incarnation):
        if work.prefills or work.decode:
            self.crashes += 1
            raise RuntimeError("device lost")
        async for step in super().execute(work, incarnation):
            yield step


def test_a_mesh_that_fails_its_first_work_at_every_rejoin_ends_no_request():
    """Beside a healthy mesh, one that rejoins after each reset and fails its first work: a request it failed on was
    moved back to it from the healthy mesh's queue at its next rejoin, and the second failure ended it with a 500
    (2 of 4 requests), as if it had crashed two meshes. It waits for the healthy mesh now, and finishes. (8 requests:
    with the probe backoff, 4 left the healthy mesh's queue empty by the crash loop's rejoin.)"""
    async def main():
        prompts = [[i + 2] * 30 for i in range(8)]
        alone = await solo_outputs(prompts, LONG)
        small = lambda: SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=256, time_scale=0.01, vocab_size=1000)
        meshes = [CrashLoopMesh(small), LocalMesh(small)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        assert await within(asyncio.gather(*[collect(router, f"r{i}", p, LONG) for i, p in enumerate(prompts)]),
                            20) == alone
        assert meshes[0].crashes > 0
        await router.close()
    asyncio.run(main())


def test_a_mesh_that_fails_its_first_work_at_every_rejoin_is_probed_less_and_less_often(monkeypatch):
    """A crash loop rejoined at every probe (each probe_interval_s, 0.02 s here), drew the requests that came and
    moved them at its next failure: 40 failures in a second of traffic. Its wait before each probe doubles now:
    checked in the waits the router asks for, not in failures per second, which a loaded box's slower traffic
    raises (a heartbeat that passes between a rejoin and its first work starts the doubling over)."""
    probe = FAST["probe_interval_s"]
    backoffs = {probe * 2 ** k for k in range(1, router_module.PROBE_DOUBLINGS + 1)}
    slept = []

    class Recorded:  # the router's asyncio, recording its sleeps
        def __getattr__(self, name: str):
            return getattr(asyncio, name)

        async def sleep(self, seconds: float) -> None:
            slept.append(seconds)
            await asyncio.sleep(seconds)
    monkeypatch.setattr(router_module, "asyncio", Recorded())

    async def main():
        meshes = [CrashLoopMesh(backend), LocalMesh(backend)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        streams = []
        for i in range(100):  # a second of traffic
            streams.append(asyncio.create_task(collect(router, f"r{i}", [i + 2, i + 3] * 20)))
            await asyncio.sleep(0.01)
        await within(asyncio.gather(*streams), 20)
        assert meshes[0].crashes > 0
        await router.close()
    asyncio.run(main())
    waits = [s for s in slept if s in backoffs]  # before a crash loop's probes (each probe_interval_s: none)
    cap = probe * 2 ** router_module.PROBE_DOUBLINGS
    assert waits and waits[0] == 2 * probe, slept
    assert all(b in (min(2 * a, cap), 2 * probe) for a, b in zip(waits, waits[1:])), waits


def test_a_mesh_that_fails_decode_rounds_for_no_requests_reason_ends_none_of_them():
    """The one mesh fails its first decode round twice, whoever is in it: the requests of that round were laid with
    two failures in a row and all ended (500). They decode a step alone each now, and finish."""
    async def main():
        prompts = [[i + 1] * 20 for i in range(4)]
        params = SamplingParams(temperature=0.0, max_tokens=40)
        alone = await solo_outputs(prompts, params)
        router, (mesh,) = await poison_router(1, poison=(), flaky=2)
        assert await within(asyncio.gather(*[collect(router, f"r{i}", p, params) for i, p in enumerate(prompts)]),
                            20) == alone
        assert mesh.deaths == 2 and all(len(fault) == 4 for fault in mesh.faults)
        await until(lambda: router.stats()["meshes"][0]["up"])
        await nothing_held(router, {"mesh-0": mesh.deaths})
        await router.close()
    asyncio.run(main())


def test_a_replica_restarted_while_idle_rejoins_as_its_new_incarnation():
    async def main():
        router, (m0,) = await make_router(num_meshes=1)
        first = await collect(router, "a", PROMPTS[1], GREEDY)
        old = m0.incarnation
        m0.restart()  # between requests: no work in flight sees it
        await until(lambda: router.stats()["meshes"][0]["incarnation"] == m0.incarnation != old)
        assert await collect(router, "b", PROMPTS[1], GREEDY) == first
        await router.close()
    asyncio.run(main())


def test_a_request_no_mesh_ran_is_not_blamed_for_the_replicas_that_refused_it():
    """Both replicas were restarted while idle (Serve replaced them; the router's heartbeat has not looked yet): the
    next request's prefill went to each in turn planned for the incarnation that is gone, and each refused it without
    running it. That was laid on the request as two meshes failing while computing it alone, and it ended with a 500
    (MeshFailures) though nothing had run it; it is moved on, and answered, instead."""
    async def main():
        (expected,) = await solo_outputs(PROMPTS[:1], LONG)
        router, meshes = await make_router(num_meshes=2, heartbeat_s=60)
        for mesh in meshes:
            mesh.restart()
        assert await within(collect(router, "r", PROMPTS[0], LONG), 10) == expected
        await nothing_held(router, 1)
        await router.close()
    asyncio.run(main())


def test_a_cancel_that_overtakes_its_request_is_not_lost():
    async def main():
        router, _ = await make_router(num_meshes=1)
        router.cancel("early")
        tokens, reason = await collect(router, "early", [4] * 30, LONG)
        assert tokens == [] and reason == "abort"
        await nothing_held(router)
        assert await collect(router, "other", [4] * 30, GREEDY) != ([], "abort")
        await router.close()
    asyncio.run(main())


def test_a_continuation_yields_only_the_tokens_after_those_delivered():
    async def main():
        router, _ = await make_router(num_meshes=1)
        whole, _ = await collect(router, "a", PROMPTS[2], LONG)
        rest = []
        async for event in router.generate("b", PROMPTS[2], LONG, None, whole[:17]):
            rest += event.token_ids
        assert rest == whole[17:]
        await router.close()
    asyncio.run(main())


def test_a_continuation_with_every_token_delivered_ends_at_once_with_no_mesh_up():
    """A stream resubmitted (a router restart) with its max_tokens all delivered lost only its finish: it ends
    ("length") at once, not held for a mesh to come up, then failed (NoMeshAvailable) if none did in no_mesh_wait_s."""
    async def main():
        router, (mesh,) = await make_router(num_meshes=1)
        mesh.vanish()
        await until(lambda: not router.stats()["ready"])
        params = SamplingParams(temperature=0.0, max_tokens=3)
        assert await within(_events(router, "c", [5] * 10, params, [7, 8, 9]), 2) == ([], "length")
        assert not router.requests and not router.held
        await router.close()
    asyncio.run(main())


def test_a_burst_is_split_evenly_across_meshes():
    """Queued requests count as load: a mesh that already admitted some must not get the whole rest."""
    async def main():
        router, _ = await make_router(num_meshes=2)
        streams = [router.generate(f"r{i}", [i + 1] * 40, GREEDY) for i in range(8)]
        first = await anext(streams[0])  # mesh of r0 admits it (slot taken) before the others arrive
        assert first.token_ids
        rest = [asyncio.create_task(anext(s)) for s in streams[1:]]
        await asyncio.sleep(0)
        placed = [router.requests[f"r{i}"].mesh.name for i in range(8)]
        assert sorted(placed.count(name) for name in ("mesh-0", "mesh-1")) == [4, 4], placed
        await asyncio.gather(*rest)
        for s in streams:
            await s.aclose()
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_one_stream_carries_every_request_of_its_consumer():
    """The router sends an ingress one message per flush for all its requests, not one per request."""
    async def main():
        alone = await solo_outputs(PROMPTS[:6], LONG)
        router, _ = await make_router(num_meshes=2, stream_interval_ms=20)
        for i, p in enumerate(PROMPTS[:6]):
            router.submit(f"r{i}", p, LONG, None, [], "ingress-a")
        outputs = {f"r{i}": [] for i in range(6)}
        finished, batches, shared = set(), 0, 0
        async with contextlib.aclosing(router.events("ingress-a")) as stream:
            async for batch in stream:
                batches += 1
                shared += len({e.request_id for e in batch}) > 1
                assert len({e.request_id for e in batch}) == len(batch)  # one event per request per flush
                wire = unpack_events(pickle.loads(pickle.dumps(pack_events(batch))))  # as the link sends it
                assert [vars(e) for e in wire] == [vars(e) for e in batch]
                for event in wire:
                    outputs[event.request_id] += event.token_ids
                    if event.finish_reason:
                        finished.add(event.request_id)
                if len(finished) == 6:
                    break
        assert [(outputs[f"r{i}"], "length") for i in range(6)] == alone
        assert shared > 0 and batches < sum(len(t) for t, _ in alone) / 4  # tokens ride together
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_closing_a_consumers_stream_cancels_its_requests():
    async def main():
        router, _ = await make_router(num_meshes=1)
        for i in range(3):
            router.submit(f"r{i}", PROMPTS[i], SamplingParams(temperature=0.0, max_tokens=500), None, [], "gone")
        stream = router.events("gone")
        await anext(stream)
        await stream.aclose()  # the ingress replica went away
        assert not router.requests  # ended now, not once their answers had run out
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_silence_is_seen_on_python_3_10_too():
    """Task.uncancel is 3.11+: on a Galaxy host's 3.10, expired() raised AttributeError inside the router's
    except-CancelledError, so a silent mesh failed with that error instead of MeshFailed."""
    import types

    from deployments.router import _Silence

    async def silent():
        with _Silence(0.1) as silence:
            silence._task = types.SimpleNamespace(cancel=silence._task.cancel)  # a task as 3.10 has it
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                return silence.expired()

    assert asyncio.run(silent()) is True


def test_silence_cancels_only_a_task_that_heard_nothing_for_its_whole_window():
    """The per-work deadline: messages keep it alive however long the work runs; a gap longer than the
    window cancels the task (expired() True); a cancel from outside stays a plain cancel; a stall of the loop
    itself gets one look at what came meanwhile."""
    from deployments.router import _Silence

    async def talker(gaps):
        with _Silence(0.5) as silence:
            try:
                for gap in gaps:
                    await asyncio.sleep(gap)
                    silence.heard()
                return "done"
            except asyncio.CancelledError:
                if silence.expired():
                    return "silent"
                raise

    async def stalled(then_heard: bool):
        """The loop stands still past the window, then the task hears something (or never does)."""
        import time
        with _Silence(0.2) as silence:
            try:
                time.sleep(1.0)
                await asyncio.sleep(0)
                if then_heard:
                    silence.heard()
                    return "done"
                await asyncio.sleep(3)
                return "slept"
            except asyncio.CancelledError:
                if silence.expired():
                    return "silent"
                raise

    async def main():
        assert await talker([0.1] * 8) == "done"  # 0.8 s in all, never 0.5 s quiet
        assert await talker([0.05, 1.5]) == "silent"
        assert await stalled(then_heard=True) == "done"  # the stall was the loop's: it reads first
        assert await stalled(then_heard=False) == "silent"  # one grace only: silence after it is the mesh's
        task = asyncio.create_task(talker([1.5]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())


def test_a_refused_duplicate_generate_leaves_the_running_one_alone():
    async def main():
        router, _ = await make_router(num_meshes=1)
        params = SamplingParams(temperature=0.0, max_tokens=200)
        first = router.generate("x", [3] * 50, params)
        await anext(first)
        with pytest.raises(ValueError, match="already running"):
            await anext(router.generate("x", [3] * 50, params))
        reasons = await asyncio.wait_for(_finish_reasons(first), 30)
        assert reasons[-1] == "length"
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


async def _finish_reasons(stream) -> list:
    return [event.finish_reason async for event in stream]


def test_with_no_live_mesh_the_queue_limits_hold_for_the_meshes_together():
    """Held requests are placed past the limits once a mesh is up, so new ones are refused (429) while
    max_waiting_requests x meshes are held, not held without bound."""
    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_slots=4, kv_groups=1, num_blocks=256, time_scale=0.01,
                                                     vocab_size=1000)) for _ in range(2)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)],
                        RouterConfig(**{**FAST, "max_waiting_requests": 2, "no_mesh_wait_s": 30}))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        params = SamplingParams(temperature=0.0, max_tokens=40)
        for i, mesh in enumerate(meshes):
            mesh.vanish()
            router.submit(f"probe{i}", [1] * 40, params, None, [], "c")  # its first work finds the replica gone
        await until(lambda: not router.stats()["ready"])
        refused = 0
        for i in range(20):
            try:
                router.submit(f"r{i}", [i + 2] * 40, params, None, [], "c")
            except QueueFull:
                refused += 1
        assert router.stats()["held"] == 2 * (2 + 4) and refused == 10  # 2 meshes x (limit 2 + their 4 slots)
        router.submit("more", [9] * 40, params, None, [5, 6], "c")  # a continuation is no new load: held
        router.submit("again", [8] * 40, params, None, [], "c", continuation=True)  # ... before its first token too
        assert router.stats()["held"] == 14
        for mesh in meshes:
            mesh.restart()
        await nothing_held(router, 1)  # each failed on its first work
        await router.close()
    asyncio.run(main())


def test_requests_held_up_to_the_limits_all_run_on_the_first_mesh_back_past_its_queue_limit():
    """The held requests were admitted: placed when a mesh comes back, its queue limit does not refuse them (migrated,
    as requests moved off a failed mesh), though two meshes' room is held and one is back. Refused there, those past
    it ended with a 429 after waiting for the mesh."""
    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=256, time_scale=0.01,
                                                     vocab_size=1000)) for _ in range(2)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)],
                        RouterConfig(**{**FAST, "max_waiting_requests": 1, "no_mesh_wait_s": 30}))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        events = []
        router.attach("c", lambda batch: events.extend(unpack_events(batch)))
        params = SamplingParams(temperature=0.0, max_tokens=4)
        for i, mesh in enumerate(meshes):
            mesh.vanish()
            router.submit(f"probe{i}", [1] * 40, params, None, [], "c")  # its first work finds the replica gone
        await until(lambda: not router.stats()["ready"])
        for i in range(4):  # with the probes: the room to hold, 2 meshes x (1 waiting + 2 slots)
            router.submit(f"r{i}", [i + 2] * 40, params, None, [], "c")
        assert router.stats()["held"] == 6
        meshes[0].restart()
        await until(lambda: not router.requests)
        meshes[1].restart()
        await nothing_held(router, 1)
        ended = sorted(e.request_id for e in events if isinstance(e, TokenEvent) and e.finish_reason == "length")
        assert ended == ["probe0", "probe1", "r0", "r1", "r2", "r3"], [e for e in events if isinstance(e, RequestFailed)]
        await router.close()
    asyncio.run(main())


@pytest.mark.parametrize("limit", [30, 60])
def test_with_no_live_mesh_the_token_limit_refuses_every_prompt_at_it_and_none_below_it(limit):
    """As a mesh's queue: a prompt that passes max_waiting_tokens is held while fewer tokens wait, whatever its length
    (a long one refused where short ones are taken gets 429 for good under load); at the limit, any is refused. The
    limit is reached, not only passed, when the held prompts' tokens equal it (MeshScheduler.submit): 60 of 60."""
    async def main():
        mesh = LocalMesh(lambda: SimulatedBackend(num_slots=4, kv_groups=1, num_blocks=256, time_scale=0.01,
                                                  vocab_size=1000))
        router = Router([("mesh-0", mesh)], RouterConfig(**{**FAST, "max_waiting_tokens": limit, "no_mesh_wait_s": 30}))
        await until(lambda: router.stats()["ready"])
        params = SamplingParams(temperature=0.0, max_tokens=4)
        mesh.vanish()
        router.submit("probe", [1] * 20, params, None, [], "c")  # its first work finds the replica gone
        await until(lambda: not router.stats()["ready"] and router.stats()["held"] == 1)
        router.submit("long", [2] * 40, params, None, [], "c")  # 20 tokens wait: below the limit, held
        assert router.stats()["held"] == 2
        with pytest.raises(QueueFull, match="60 prompt tokens"):
            router.submit("behind", [3], params, None, [], "c")
        mesh.restart()
        await nothing_held(router, 1)
        await router.close()
    asyncio.run(main())


def test_a_submit_while_no_mesh_is_live_costs_the_same_however_many_requests_are_held():
    """The held-queue limits are checked at each submit: counted over every request the router had, a submit cost
    O(held), so a burst into an outage (or a router's start) was quadratic: ~0.8 ms of the loop per submit with
    5,000 held, and the limit for 32 meshes is ~33,000. Counted: the requests 100 submits read with 2,000 held."""
    Walked = counting(dict)  # the router's requests and its held ones, one count

    async def main():
        mesh = LocalMesh(backend)
        mesh.vanish()
        router = Router([("mesh-0", mesh)], RouterConfig(**{**FAST, "max_waiting_requests": 100_000,
                                                                 "max_waiting_tokens": 10**9, "no_mesh_wait_s": 600}))
        params = SamplingParams(temperature=0.0, max_tokens=4)
        for i in range(2_000):
            router.submit(f"held{i}", [i + 2] * 40, params, None, [], "c")
        assert router.stats()["held"] == 2_000
        router.requests, router.held = Walked(router.requests), Walked(router.held)
        for i in range(100):
            router.submit(f"late{i}", [i + 2] * 40, params, None, [], "c")
        assert Walked.reads < 100, f"100 submits read {Walked.reads} requests"  # was 2,000 and more each
        assert router.stats()["held"] == 2_100
        for rid in list(router.requests):
            router.cancel(rid)
        assert router.stats()["held"] == 0
        await router.close()
    asyncio.run(main())


def test_requests_held_at_router_start_spread_over_the_meshes_that_come_up():
    """At a router start (or restart, with every ingress resubmitting) every request is held until a mesh
    is up; the first one up takes them all, and the next one up takes what the first cannot seat."""
    async def main():
        meshes = [LocalMesh(backend) for _ in range(2)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        submit_lasting(router, 64)
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        placed = [sum(r.mesh is m for r in router.requests.values()) for m in router.meshes]
        assert placed == [32, 32]
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_mesh_that_comes_back_takes_the_queue_its_failure_left_on_the_others():
    async def main():
        router, (m0, m1) = await make_router(num_meshes=2)
        submit_lasting(router, 64)
        await until(lambda: all(m["running"] == 32 for m in router.stats()["meshes"]))
        m0.vanish()
        await until(lambda: router.stats()["meshes"][1]["waiting"] == 32)  # mesh-0's requests queue on mesh-1
        m0.restart()
        await until(lambda: router.stats()["meshes"][0]["running"] == 32)
        assert router.stats()["meshes"][1]["waiting"] == 0
        await cancel_all_and_close(router, {"mesh-0": 1})
    asyncio.run(main())


def test_a_resubmission_before_the_first_token_reports_its_cache_hit():
    """The new router's first event is the only place a continuation's cached tokens come from."""
    async def main():
        router, _ = await make_router(num_meshes=1)
        prompt = list(range(1, 600))
        assert (await collect(router, "warm", prompt))[1] == "length"
        first = {}
        for rid, continuation in (("fresh", False), ("continued", True)):
            async with contextlib.aclosing(router.generate(rid, prompt, GREEDY, continuation=continuation)) as s:
                first[rid] = (await anext(s)).num_cached_tokens
        assert first["fresh"] > 0 and first["continued"] == first["fresh"]
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_a_continuation_with_tokens_is_not_counted_as_a_prefix_lookup_again():
    """A stream resubmitted with tokens delivered is a recompute: its lookup was counted on the router where it began
    (vLLM counts a preempted one's apart). Counted again, every router restart inflated the prefix-cache queries."""
    async def main():
        router, _ = await make_router(num_meshes=1)
        whole, _ = await collect(router, "a", PROMPTS[2], LONG)
        queried = router.stats()["meshes"][0]["prefix_query_tokens"]
        assert await _drain(router.generate("b", PROMPTS[2], LONG, None, whole[:5])) == whole[5:]
        assert router.stats()["meshes"][0]["prefix_query_tokens"] == queried
        await router.close()
    asyncio.run(main())


def test_a_mesh_that_comes_up_seats_the_oldest_waiting_requests_first():
    async def main():
        router, (_, _, m2) = await make_router(num_meshes=3)
        m2.vanish()
        await until(lambda: not router.stats()["meshes"][2]["up"])
        submit_lasting(router, 104)  # 64 seated on mesh-0 and mesh-1, 40 queued on them in turn
        await until(lambda: sum(m["waiting"] for m in router.stats()["meshes"]) == 40)
        m2.restart()
        await until(lambda: router.stats()["meshes"][2]["running"] == 32)
        waiting = sorted(seq.request_id for m in router.meshes for seq in m.scheduler.waiting)
        assert waiting == [f"r{i:03d}" for i in range(96, 104)]
        await cancel_all_and_close(router, {"mesh-2": 1})
    asyncio.run(main())


async def _three_full_small_meshes(n: int) -> Router:
    """Three meshes of 2 slots, their 6 slots taken by r000..r005, then r006.. submitted: queued, spread by load."""
    meshes = [LocalMesh(lambda: SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=256, time_scale=0.01,
                                                  vocab_size=1000)) for _ in range(3)]
    router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
    await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
    submit_lasting(router, n)
    return router


def _on(router: Router, mesh) -> list[str]:
    return [rid for rid, r in router.requests.items() if r.mesh is mesh]


def test_a_queued_request_moves_to_the_best_of_the_meshes_with_room():
    """A queue moves to the mesh placement ranks best (placement_key), not to any mesh with room: with one slot free
    on one mesh and two on another, the request goes where more are left."""
    async def main():
        router = await _three_full_small_meshes(7)
        queue = router.requests["r006"].mesh
        one, two = [m for m in router.meshes if m is not queue]
        router.cancel(_on(router, one)[0])
        for rid in _on(router, two):
            router.cancel(rid)
        await until(lambda: router.requests["r006"].mesh is not queue)
        assert router.requests["r006"].mesh.name == two.name
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_stream_under_way_moves_before_an_older_request_that_has_not_started():
    """A queue move takes streams under way first (their clients are mid-answer), then the oldest: with room for one,
    a resubmitted stream queued on one mesh goes before a new request that came earlier to another."""
    async def main():
        router = await _three_full_small_meshes(6)
        await until(lambda: sum(m["running"] for m in router.stats()["meshes"]) == 6)
        router.submit("new", [50] * 40, LASTING, None, [], "c")
        router.submit("cont", [51] * 40, LASTING, None, [3] * 5, "c")  # tokens delivered: a stream under way
        queues = {router.requests["new"].mesh.name, router.requests["cont"].mesh.name}
        (room,) = [m for m in router.meshes if m.name not in queues]
        router.cancel(_on(router, room)[0])
        await until(lambda: len(_on(router, room)) == 2)
        assert router.requests["cont"].mesh.name == room.name and router.requests["new"].mesh.name != room.name
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_request_preempted_on_a_busy_mesh_moves_to_an_idle_one_at_once():
    """A queue that forms on a mesh with no room (a preemption) is offered to the others by that mesh's own round
    (_movable, the queue's side): an idle mesh plans nothing, and would take it only at its next heartbeat."""
    async def main():
        small = lambda: SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=8, time_scale=0.01, vocab_size=1000)
        meshes = [LocalMesh(small) for _ in range(2)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**{**FAST, "heartbeat_s": 60}))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        router.submit("r0", [2] * 100, LASTING, None, [], "c")
        router.submit("b", [3] * 300, LASTING, None, [], "c")  # on the other mesh, fewer blocks left there
        router.submit("r1", [4] * 100, LASTING, None, [], "c")  # with r0: 8 blocks hold both to 256 tokens
        busy, idle = router.requests["r0"].mesh, router.requests["b"].mesh
        assert busy is not idle and router.requests["r1"].mesh is busy
        await until(lambda: "b" in idle.scheduler.running)
        router.cancel("b")
        await until(lambda: getattr(router.requests.get("r1"), "mesh", None) is idle)  # preempted there, then moved
        assert busy.scheduler.num_preemptions >= 1
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_mesh_with_free_slots_takes_the_queue_of_another():
    async def main():
        router, _ = await make_router(num_meshes=2)
        submit_lasting(router, 74)  # 32 running on each, 5 queued on each
        await until(lambda: [m["waiting"] for m in router.stats()["meshes"]] == [5, 5])
        on_mesh0 = [rid for rid, r in router.requests.items() if r.mesh is router.meshes[0]]
        for rid in on_mesh0[:12]:  # some finish on mesh-0: its own 5, then 5 of mesh-1's, are seated there
            router.cancel(rid)
        await until(lambda: [(m["running"], m["waiting"]) for m in router.stats()["meshes"]] == [(30, 0), (32, 0)])
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_requests_waiting_for_kv_blocks_move_to_a_mesh_with_room():
    """A queue is also what waits for KV blocks behind a head that fits no group (or was preempted), with
    slots free: a mesh that comes up, or has room, takes it. Before, only requests beyond the free slots
    moved, and a mesh back from a failure sat idle while the other preempted."""
    async def main():
        def small():  # 8 blocks of 64 tokens: four 100-token prompts fill a mesh
            return SimulatedBackend(num_blocks=8, time_scale=0.01, vocab_size=1000)
        router, meshes = await make_router(make=small)
        meshes[1].vanish()
        await until(lambda: not router.stats()["meshes"][1]["up"])
        for i in range(8):
            router.submit(f"r{i}", [i + 2] * 100, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][0]["waiting"] >= 4)  # slots free, blocks not
        meshes[1].restart()
        await until(lambda: router.stats()["meshes"][1]["running"] >= 3)
        await cancel_all_and_close(router, {"mesh-1": 1})
    asyncio.run(main())


def test_a_router_that_stood_still_does_not_fail_the_meshes_that_answered():
    """A stalled router (its loop blocked past a work's deadline) finds the meshes' results waiting when it
    resumes: the silence was its own. Before, every healthy mesh was failed and its requests recomputed."""
    import time

    async def main():
        router, _ = await make_router(num_meshes=2, **HUNG)
        tasks = [asyncio.create_task(collect(router, f"r{i}", [i + 2] * 40, LONG)) for i in range(4)]
        await until(lambda: sum(m["running"] for m in router.stats()["meshes"]) == 4)
        time.sleep(3 * HUNG["min_step_deadline_s"] + 1)  # the loop stands still past every work's deadline
        outs = await asyncio.gather(*tasks)
        assert [reason for _, reason in outs] == ["length"] * 4
        await nothing_held(router)  # and no failover
        await router.close()
    asyncio.run(main())


def test_a_router_start_spreads_what_it_holds_over_the_meshes_that_answer():
    """An ingress resubmits every stream to a restarted router: they wait for every mesh's first answer, then
    spread, instead of all going to the first mesh up (which preempted while the other idled). A mesh that
    does not answer delays them at most start_wait_s after the first one is up."""
    async def main():
        meshes = [LocalMesh(backend) for _ in range(3)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        submit_lasting(router, 18)
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        assert [sum(r.mesh is m for r in router.requests.values()) for m in router.meshes] == [6, 6, 6]
        await cancel_all_and_close(router)

        await meshes[2].lock.acquire()  # its reset hangs (a work it is still in): the others take everything
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST, start_wait_s=0.2))
        submit_lasting(router, 18)
        await until(lambda: not router.starting, timeout_s=FAST["probe_timeout_s"] - 0.1)  # before it times out
        assert [sum(r.mesh is m for r in router.requests.values()) for m in router.meshes] == [9, 9, 0]
        meshes[2].lock.release()
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_request_no_mesh_has_room_for_keeps_its_place():
    """A queue's head that fits no mesh's KV blocks stays in line where it is: moved to a mesh with free slots
    but no blocks, it came back as soon as the first one freed any, on and on (37 moves in 2 s)."""
    async def main():
        def small():  # 8 blocks of 64 tokens: one running request and a 400-token prompt (7 blocks) do not fit
            return SimulatedBackend(num_slots=4, kv_groups=1, num_blocks=8, time_scale=1.0, vocab_size=1000)
        router, _ = await make_router(make=small)
        for i in range(2):
            router.submit(f"long{i}", [i + 2] * 100, LASTING, None, [], "c")
        await until(lambda: [m["running"] for m in router.stats()["meshes"]] == [1, 1])
        router.submit("x", [9] * 400, GREEDY, None, [], "c")
        places = [router.requests["x"].mesh]
        for _ in range(150):
            await asyncio.sleep(0.01)
            if router.requests["x"].mesh is not places[-1]:
                places.append(router.requests["x"].mesh)
        assert len(places) == 1
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_requests_held_for_the_start_spread_do_not_expire_while_a_mesh_is_up():
    """no_mesh_wait_s bounds the wait for a live mesh; a router start's short hold for the others' first
    answers is not that (with no_mesh_wait_s 0, every stream resubmitted to a restarted router got 503)."""
    async def main():
        meshes = [LocalMesh(backend) for _ in range(2)]
        await meshes[1].lock.acquire()  # its first reset waits
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)],
                        RouterConfig(**{**FAST, "no_mesh_wait_s": 0.0, "start_wait_s": 0.3}))
        await until(lambda: router.stats()["meshes"][0]["up"])
        outs = await asyncio.gather(*(collect(router, f"r{i}", [i + 2] * 40) for i in range(4)))
        assert [reason for _, reason in outs] == ["length"] * 4
        meshes[1].lock.release()
        await router.close()
    asyncio.run(main())


def test_a_stream_another_mesh_cannot_hold_stays_where_it_can():
    """Meshes with different max_seq_len: a stream under way whose tokens fill the shorter one's is placed on,
    and left on, the longer one. Moved to the free shorter mesh, it was refused after being taken from its
    queue, and lost."""
    async def main():
        def sized(max_seq_len):
            return lambda: SimulatedBackend(num_slots=1, kv_groups=1, max_seq_len=max_seq_len, time_scale=1.0,
                                            vocab_size=1000)
        meshes = [LocalMesh(sized(4096)), LocalMesh(sized(1024))]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        router.submit("a", [5] * 40, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)
        params = SamplingParams(temperature=0.0, max_tokens=520)
        router.submit("x", [7] * 600, params, None, [3] * 500, "c", continuation=True)  # 1,100 tokens so far
        await asyncio.sleep(0.5)  # mesh-1 has a free slot all along
        assert router.requests["x"].mesh is router.meshes[0]
        router.cancel("a")
        await until(lambda: "x" not in router.requests)  # its last 20 tokens came on mesh-0
        await cancel_all_and_close(router)
    asyncio.run(main())


def sized_meshes(*max_seq_lens: int, time_scale: float = 0.3) -> list[LocalMesh]:
    """One-slot simulated meshes of these max_seq_len."""
    return [LocalMesh(lambda n=n: SimulatedBackend(num_slots=1, kv_groups=1, max_seq_len=n, time_scale=time_scale,
                                                   vocab_size=1000)) for n in max_seq_lens]


@pytest.mark.parametrize("fault_after", [2, 12])
def test_a_request_only_a_longer_mesh_holds_waits_for_it_through_its_failure(fault_after):
    """Meshes of 4096 and 1024 tokens: a 600-token prompt asking for 520 runs on the longer one, which fails
    mid-answer. Moved to the shorter (free) mesh, it was cut to 424 tokens ("length"), or failed once its
    tokens filled that mesh; it waits for the longer one instead and ends with its undisturbed tokens."""
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=520)
        alone = Router([("alone", *sized_meshes(4096))], RouterConfig(**FAST))
        expected = await collect(alone, "x", [7] * 600, params)
        await alone.close()
        long, _ = meshes = sized_meshes(4096, 1024)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        long.inject("raise", after=fault_after)  # results; decode works carry 8 tokens each
        assert await collect(router, "x", [7] * 600, params) == expected
        await nothing_held(router, {"mesh-0": 1})
        assert router.stats()["meshes"][1]["rounds"] == 0  # no decode there (works alone: its heartbeats too)
        await router.close()
    asyncio.run(main())


def test_a_new_request_queues_on_the_mesh_that_holds_it_rather_than_be_cut_on_a_free_shorter_one():
    async def main():
        meshes = sized_meshes(4096, 1024)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        router.submit("a", [5] * 40, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)  # the longer mesh is busy
        # its whole answer is one token longer than the shorter mesh holds (600 + 425 = 1025)
        router.submit("x", [7] * 600, SamplingParams(temperature=0.0, max_tokens=425), None, [], "c")
        await asyncio.sleep(0.3)
        assert router.requests["x"].mesh is router.meshes[0] and router.stats()["meshes"][1]["rounds"] == 0
        router.submit("y", [7] * 600, SamplingParams(temperature=0.0, max_tokens=8), None, [], "c")
        await until(lambda: "y" not in router.requests)  # one the shorter mesh holds goes there
        assert router.stats()["meshes"][1]["rounds"] > 0
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_shorter_mesh_that_rejoins_does_not_take_a_queued_request_it_would_cut():
    """A mesh that comes up takes the others' queues (_rebalance), but only what it holds whole: a request queued on
    the longer mesh whose answer passes the shorter one's max_seq_len stays in line there, not cut to the room."""
    async def main():
        long, short = meshes = sized_meshes(4096, 1024)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        router.submit("a", [5] * 40, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)  # the longer mesh is busy
        router.submit("x", [7] * 600, SamplingParams(temperature=0.0, max_tokens=425), None, [], "c")  # 1,025 tokens
        assert router.requests["x"].mesh is router.meshes[0]
        short.vanish()
        await until(lambda: not router.stats()["meshes"][1]["up"])
        short.restart()
        await until(lambda: router.stats()["meshes"][1]["up"])
        assert router.requests["x"].mesh.name == "mesh-0" and router.stats()["meshes"][0]["waiting"] == 1
        await cancel_all_and_close(router, {"mesh-1": 1})
    asyncio.run(main())


def test_a_request_waits_for_the_longer_mesh_no_longer_than_no_mesh_wait_s():
    """The longer mesh is gone for good (a Galaxy's restart takes minutes): after no_mesh_wait_s a request only
    it holds goes on on the shorter one, cut to the room there, rather than fail with a 503."""
    async def main():
        long, _ = meshes = sized_meshes(4096, 1024)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST, no_mesh_wait_s=0.5))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        long.vanish()
        await until(lambda: not router.stats()["meshes"][0]["up"])
        tokens, reason = await collect(router, "x", [7] * 100, SamplingParams(temperature=0.0, max_tokens=3000))
        assert (len(tokens), reason) == (1024 - 100, "length")
        await router.close()
    asyncio.run(main())


def test_a_request_moved_to_a_shorter_mesh_after_no_mesh_wait_s_counts_as_migrated_once():
    """Its longer mesh fails mid-answer and is gone for good: held for it, then placed on the shorter mesh once
    no_mesh_wait_s ran out (Router._expire_held), it was moved, once."""
    async def main():
        long, _ = meshes = sized_meshes(4096, 1024)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST, no_mesh_wait_s=0.5))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        task = asyncio.create_task(collect(router, "x", [7] * 600, SamplingParams(temperature=0.0, max_tokens=520)))
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)
        long.vanish()
        tokens, reason = await task
        assert (len(tokens), reason) == (1024 - 600, "length")
        assert [m["requests_migrated"] for m in router.stats()["meshes"]] == [1, 0]
        await nothing_held(router, {"mesh-0": 1})
        await router.close()
    asyncio.run(main())


async def _events(router, rid, prompt, params, output_ids) -> tuple[list[int], str | None]:
    tokens, reason = [], None
    async for event in router.generate(rid, prompt, params, output_ids=output_ids, continuation=True):
        tokens, reason = tokens + event.token_ids, event.finish_reason or reason
    return tokens, reason


def test_meshes_of_mixed_lengths_report_the_shortest_as_max_model_len():
    """The ingress counts its 400s from max_model_len (DESIGN, "Failure"): the longest mesh's would let in a request
    that only it holds, cut short or held whenever it is down."""
    async def main():
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(sized_meshes(4096, 1024))], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        assert router.stats()["max_model_len"] == 1024
        await router.close()
    asyncio.run(main())


def test_a_stream_whose_tokens_fill_every_mesh_up_ends_with_length():
    """A stream under way (a continuation after a router restart, or held while the longer mesh is gone) whose
    tokens so far fill the room of the mesh that can take it ends there with "length", as vLLM's at
    max_model_len. It was a bare ValueError at once (HTTP 500), or a 503 after no_mesh_wait_s."""
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=1000)
        router = Router([("short", *sized_meshes(1024))], RouterConfig(**FAST))
        await until(lambda: router.stats()["meshes"][0]["up"])
        assert await _events(router, "x", [7] * 900, params, [5] * 124) == ([], "length")
        await router.close()
        long, _ = meshes = sized_meshes(4096, 1024)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST, no_mesh_wait_s=0.3))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        long.vanish()
        await until(lambda: not router.stats()["meshes"][0]["up"])
        params = SamplingParams(temperature=0.0, max_tokens=520)
        assert await _events(router, "y", [7] * 600, params, [3] * 500) == ([], "length")
        await nothing_held(router, {"mesh-0": 1})
        await router.close()
    asyncio.run(main())


@pytest.mark.parametrize("short", [1, 2, 64])
def test_an_answer_to_the_context_end_is_unchanged_by_a_failover_or_a_router_restart_short_of_it(short):
    """Prompt 100, max_tokens 156 (what the ingress gives a request without max_tokens on 256-token meshes): the
    mesh fails, or the router is lost (a continuation to a new router), when the answer is 1, 2 or a block short of
    the end. The recompute fills the context to 256 - short; the answer ends "length" with the unfaulted tokens."""
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=156, ignore_eos=True)
        config = RouterConfig(**{**FAST, "decode_steps": 1})  # a result per token: the fault's moment is exact
        alone = Router([("alone", *sized_meshes(256, time_scale=0.02))], config)
        expected = await collect(alone, "x", [7] * 100, params)
        await alone.close()
        assert expected[1] == "length" and len(expected[0]) == 156
        done = 156 - short
        meshes = sized_meshes(256, 256, time_scale=0.02)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], config)
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        task = asyncio.create_task(collect(router, "x", [7] * 100, params))
        await asyncio.sleep(0)  # submitted (placed), no work sent yet
        first = router.meshes.index(router.requests["x"].mesh)
        meshes[first].inject("raise", after=done)
        assert await task == expected
        assert [m["failovers"] for m in router.stats()["meshes"]] == [int(i == first) for i in range(2)]
        await router.close()
        again = Router([(f"mesh-{i}", m) for i, m in enumerate(sized_meshes(256, 256, time_scale=0.02))], config)
        assert await _events(again, "y", [7] * 100, params, expected[0][:done]) == (expected[0][done:], "length")
        await again.close()
    asyncio.run(main())


def test_an_answer_whose_prompt_only_the_failed_longer_mesh_holds_ends_with_length_after_no_mesh_wait_s():
    """Meshes of 4096 and 1024 tokens (a rolling upgrade): a 1,100-token prompt's answer runs on the longer one,
    which is gone for good. It waits no_mesh_wait_s for it, then ends with its tokens so far and "length", as one
    whose tokens fill the shorter mesh does; it was a 503 (NoMeshAvailable) mid-answer."""
    async def main():
        long, _ = meshes = sized_meshes(4096, 1024, time_scale=0.05)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST, no_mesh_wait_s=0.3))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        got = []

        async def run():
            async for event in router.generate("x", [7] * 1100, SamplingParams(temperature=0.0, max_tokens=2000)):
                got.append(event)
        task = asyncio.create_task(run())
        await until(lambda: sum(len(e.token_ids) for e in got) >= 8)
        long.vanish()
        await task
        assert got[-1].finish_reason == "length" and sum(len(e.token_ids) for e in got) >= 8
        await nothing_held(router, {"mesh-0": 1})
        await router.close()
    asyncio.run(main())


@pytest.mark.parametrize("held", [False, True])
def test_a_stream_whose_prompt_alone_no_longer_fits_ends_with_length_and_an_unstarted_one_is_refused(held):
    """A redeploy (or a restarted router) whose meshes are shorter than a running answer's prompt: the ingress
    resubmits prompt + the tokens it sent. The answer ends there ("length"), as one whose tokens fill the room
    does and as vLLM's at max_model_len; it was a 400 context_length_exceeded, an error event mid-stream that
    the client cannot act on. One with no token sent yet is refused as a new request would be (PromptTooLong,
    400). `held`: sent before the mesh is up (held through the router's start, then Router._replace), or after."""
    from scheduler.errors import PromptTooLong

    async def main():
        router = Router([("short", *sized_meshes(1024))], RouterConfig(**FAST))
        if not held:
            await until(lambda: router.stats()["meshes"][0]["up"])
        params = SamplingParams(temperature=0.0, max_tokens=1000)
        assert await _events(router, "x", [7] * 1100, params, [5] * 3) == ([], "length")
        with pytest.raises(PromptTooLong):
            await _events(router, "y", [7] * 1100, params, [])
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_mesh_the_stream_fills_says_it_is_over_whatever_the_others_say(order):
    """A stream goes to the first live mesh that takes it: a shorter one refuses its prompt (PromptTooLong), the
    longest up says its tokens fill it (RoomFilled). In either order the answer is over ("length"), not a 503."""
    from deployments.router import _Request
    from scheduler.errors import RoomFilled

    async def main():
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(sized_meshes(1024, 2048))], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        req = _Request([7] * 1500, SamplingParams(temperature=0.0, max_tokens=3000), None, 0.0, router._sink("c"))
        with pytest.raises(RoomFilled):
            router._submit_to_best([router.meshes[i] for i in order], {}, "y", req, [3] * 548, migrated=True)
        await router.close()
    asyncio.run(main())


def test_at_a_router_start_a_stream_waits_for_the_longer_meshs_first_answer():
    """The router restarted; the ingress resubmits a stream that ran on the longer mesh, whose first reset is
    slow (a work still running there): it waits for it rather than be cut short (or fail) on the shorter."""
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=520)
        alone = Router([("alone", *sized_meshes(4096))], RouterConfig(**FAST))
        expected, _ = await collect(alone, "x", [7] * 600, params)
        await alone.close()
        long, _ = meshes = sized_meshes(4096, 1024)
        await long.lock.acquire()
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST, start_wait_s=0.2))
        asyncio.get_running_loop().call_later(1.0, long.lock.release)
        got = []
        async for event in router.generate("x", [7] * 600, params, output_ids=expected[:500], continuation=True):
            got += event.token_ids
        assert got == expected[500:]
        await router.close()
    asyncio.run(main())


def test_a_small_request_behind_a_head_no_mesh_seats_moves_to_the_room():
    """A round looks past a queue's head (MOVE_SCAN deep): `y` waits behind `x`, which no mesh has the blocks
    for, while another mesh has a slot and a block for `y`."""
    async def main():
        def small():  # 2 slots, 8 blocks of 64 tokens
            return SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=8, time_scale=1.0, vocab_size=1000)
        router, _ = await make_router(make=small)
        for rid in ("a0", "a1", "b0", "b1"):  # two 100-token streams on each mesh: every slot taken
            router.submit(rid, [len(rid) + ord(rid[0]) + int(rid[1])] * 100, LASTING, None, [], "c")
        await until(lambda: [m["running"] for m in router.stats()["meshes"]] == [2, 2])
        on = {rid: router.requests[rid].mesh for rid in ("a0", "a1", "b0", "b1")}
        m0, m1 = router.meshes
        router.submit("x", [7] * 400, LASTING, None, [], "c")  # 7 blocks: queued on one mesh
        router.submit("z", [8] * 400, LASTING, None, [], "c")  # and its twin on the other
        router.submit("y", [9] * 40, LASTING, None, [], "c")  # 1 block, behind x or z
        first = router.requests["y"].mesh
        other = m1 if first is m0 else m0
        assert [s.request_id for s in first.scheduler.waiting][-1] == "y"
        for rid, mesh in on.items():  # the other mesh's streams end: its big one takes 7 blocks, 1 is left
            if mesh is other:
                router.cancel(rid)
        await until(lambda: router.requests["y"].mesh is other, timeout_s=1.0)
        await cancel_all_and_close(router)
    asyncio.run(main())


@pytest.mark.parametrize("moved_by", ["a rebalance", "a failover"])
def test_a_preempted_request_moved_to_another_mesh_is_not_preempted_there_before_a_token(moved_by):
    """A preempted request that its mesh cannot re-seat (Sequence.num_tokens_preempted: its _headroom) moves to a mesh
    that empties (_rebalance), or off its mesh when that one fails, as a new Sequence there: it carries its last
    preemption, so that mesh too re-seats it with room and preempts it again only after a token. In process (8
    answers on two meshes of 8 blocks) one was preempted at 249 tokens on mesh-1, moved, and preempted at 249 on
    mesh-0; forgotten at a failover, it was a new request there."""
    async def main():
        def small():  # 2 slots, 8 blocks of 64 tokens
            return SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=8, time_scale=1.0, vocab_size=1000)
        router, meshes = await make_router(make=small)
        router.submit("p", [5] * 300, LASTING, None, [], "c")  # 5 blocks
        for rid in ("s1", "s2", "s3"):  # 2 blocks each: every slot taken
            router.submit(rid, [ord(rid[1])] * 100, LASTING, None, [], "c")
        await until(lambda: [m["running"] for m in router.stats()["meshes"]] == [2, 2])
        home = router.requests["p"].mesh
        other = next(m for m in router.meshes if m is not home)
        seq = home.scheduler.running["p"]
        await until(lambda: seq.live)
        home.scheduler._preempt(seq)  # as its neighbour's growth would: 5 blocks and room for 2 to grow lack
        home.wake.set()
        preempted_at = len(seq.token_ids)
        if moved_by == "a rebalance":
            for rid in list(other.scheduler.running):  # the other mesh empties: p moves there
                router.cancel(rid)
        else:
            meshes[router.meshes.index(home)].vanish()
        await until(lambda: router.requests["p"].mesh is other, timeout_s=1.0 if moved_by == "a rebalance" else 10.0)
        assert other.scheduler.requests["p"].num_tokens_preempted == preempted_at
        await cancel_all_and_close(router, {home.name: 1} if moved_by == "a failover" else 0)
    asyncio.run(main())


def test_prefix_caching_off_reaches_every_meshs_scheduler():
    """The app's `enable_prefix_caching: false` (RouterConfig): a repeated prompt reuses nothing, on every mesh."""
    async def main():
        router, _ = await make_router(num_meshes=2, enable_prefix_caching=False)
        prompt = list(range(1, 600))
        assert (await collect(router, "warm", prompt))[1] == "length"
        async with contextlib.aclosing(router.generate("again", prompt, GREEDY)) as s:
            assert (await anext(s)).num_cached_tokens == 0
        assert all(m.scheduler.enable_prefix_caching is False for m in router.meshes)
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_a_mesh_whose_long_prompt_holds_a_kv_group_takes_other_queues_and_lets_it_move():
    """A prompt that fits no KV group of its mesh reserves one (MeshScheduler._admit); the mesh's other groups
    still have room: a request queued on another mesh moves into them, and the long prompt itself moves to a
    mesh that empties (it is listed as queued though the mesh has room)."""
    async def main():
        def small():  # 2 KV groups of 2 slots, 8 blocks of 64 tokens each
            return SimulatedBackend(num_slots=4, kv_groups=2, num_blocks=8, time_scale=1.0, vocab_size=1000)
        router, _ = await make_router(make=small)
        for i in range(8):  # 100-token streams (2 blocks): every slot of both meshes
            router.submit(f"s{i}", [i + 2] * 100, LASTING, None, [], "c")
        await until(lambda: [m["running"] for m in router.stats()["meshes"]] == [4, 4])
        router.submit("x", [50] * 400, LASTING, None, [], "c")  # 7 blocks: no group has them beside a stream
        router.submit("y", [51] * 40, LASTING, None, [], "c")
        home, other = router.requests["x"].mesh, router.requests["y"].mesh
        assert home is not other
        streams = {rid: home.scheduler.running[rid].slot // 2 for rid in home.scheduler.running}
        for group in (0, 1):  # a slot frees in each group of x's mesh; x still fits neither
            router.cancel(next(rid for rid, g in streams.items() if g == group))
        await until(lambda: "y" in home.scheduler.running, timeout_s=1.0)
        assert home.scheduler.reserved is home.scheduler.requests["x"]
        for rid in list(other.scheduler.running):
            router.cancel(rid)
        await until(lambda: router.requests["x"].mesh is other, timeout_s=1.0)
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_queue_time_ends_where_the_request_was_first_scheduled_not_where_it_moved(monkeypatch):
    """Queue time (meshserve_request_queue_time_seconds, and the prefill time the ingress takes it from) is router
    arrival to the first prefill chunk handed out, as vLLM's. A request whose mesh failed while prefilling it counted
    as queued all the time it computed there and waited to move: its prefill time then read 0. The router's clock
    stands still here but for the failed mesh's long prefill."""
    async def main():
        clock = [1000.0]
        fake = SimpleNamespace(monotonic=lambda: clock[0])
        monkeypatch.setattr(router_module, "time", fake)
        monkeypatch.setattr(scheduler_module, "time", fake)
        router, meshes = await make_router(num_meshes=2)
        for mesh in meshes:
            def failing_late(work, incarnation, execute=mesh.execute):
                async def results():
                    try:
                        async for step in execute(work, incarnation):
                            yield step
                    except RuntimeError:  # the injected device error
                        clock[0] += 100.0  # after a long prefill
                        raise
                return results()
            mesh.execute = failing_late
        router.submit("r", PROMPTS[0], GREEDY, None, [], "c")
        failed = router.requests["r"].mesh
        failed.client.inject("raise", after=0)  # before its first work runs: its prefill fails
        events = []
        async with contextlib.aclosing(router.events("c")) as stream:
            async for batch in stream:
                events += batch
                if any(e.finish_reason for e in batch):
                    break
        assert events[-1].finish_reason == "length" and clock[0] == 1100.0
        assert sum(m["requests_migrated"] for m in router.stats()["meshes"]) == 1
        (first,) = [e for e in events if e.queue_time_s is not None]
        assert first.queue_time_s == 0.0  # scheduled at once on the mesh that failed, 100 s before the one after
        await nothing_held(router, {failed.name: 1})
        await router.close()
    asyncio.run(main())


def test_cancels_of_ended_requests_are_forgotten_while_idle():
    """A cancel that comes after its request ended (the ingress's, for a stop string found in the last event or a
    client gone just after it) is remembered for cancel_memory_s; an idle router must then let it go, not keep it
    until the next such cancel (a soak left them in the table at idle)."""
    async def main():
        router, _ = await make_router(num_meshes=1, cancel_memory_s=0.5)
        short = SamplingParams(temperature=0.0, max_tokens=2)
        await asyncio.gather(*(collect(router, f"r{i}", [i + 2] * 30, short) for i in range(50)))
        for i in range(50):
            router.cancel(f"r{i}", "stop")
        assert len(router.cancelled) == 50 and not router.requests
        await until(lambda: not router.cancelled, timeout_s=3)
        await router.close()
    asyncio.run(main())


def test_meshes_of_different_block_sizes_reuse_only_blocks_of_the_same_prefix():
    """A redeploy that changes block_size restarts the meshes one by one under the same router (its own arguments have
    no block_size), so for a while its meshes have different block sizes. A prompt's digests must name blocks of the
    size of the mesh that caches them: named by the other size's digests, a 32-token block holding tokens 64..127 was
    found by a prompt sharing only the first 64 tokens, which then decoded on another prompt's KV."""
    def mesh(block_size: int, num_slots: int) -> LocalMesh:
        return LocalMesh(lambda: SimulatedBackend(num_slots=num_slots, kv_groups=1, block_size=block_size,
                                                  num_blocks=64, max_seq_len=1024, time_scale=0.01, vocab_size=1000))
    shared = [7 + i % 50 for i in range(64)]
    first, second = shared + [3] * 136, shared + [5] * 136  # they differ from token 64 on
    params = SamplingParams(temperature=0.0, max_tokens=8)

    async def main():
        alone = Router([("mesh-0", mesh(32, 8))], RouterConfig(**FAST))
        await until(lambda: alone.stats()["meshes"][0]["up"])
        expected = await collect(alone, "alone", second, params)
        await alone.close()
        # mesh-1 (more free slots) seats both; mesh-0, the first live one, has the other block size
        router = Router([("mesh-0", mesh(16, 2)), ("mesh-1", mesh(32, 8))], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        await collect(router, "first", first, params)
        assert await collect(router, "second", second, params) == expected
        stats = router.stats()["meshes"]
        await router.close()
        assert stats[0]["prefix_query_tokens"] == 0 and stats[1]["prefix_query_tokens"] == len(first) + len(second)

    asyncio.run(main())


def test_serves_queue_probe_warning_for_an_unanswering_mesh_replica_is_logged_once_a_minute(caplog, monkeypatch):
    """Serve's request router warns at each queue-length probe a replica leaves unanswered: while a mesh's host was
    frozen, the router's probes of it logged one every 1.5 s. The router's replica lets one through per replica per
    QUEUE_PROBE_LOG_S, the next saying how many it left out."""
    serve_log = logging.getLogger("ray.serve")
    before = list(serve_log.filters)
    try:
        router_module.RouterDeployment.func_or_class([], FAST)
        router_module.RouterDeployment.func_or_class([], FAST)  # a second replica in this process adds no second filter
        clock = [1000.0]
        monkeypatch.setattr(router_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
        caplog.set_level(logging.INFO, logger="ray.serve")

        def probe(replica: str) -> None:  # as request_router.py words it, on its own logger: the filter is on
            # "ray.serve" and a logger's filters never see a child logger's records (Python's logging docs, Filter)
            request_router.logger.warning(f"Failed to get queue length from Replica(id='{replica}', "
                                          f"deployment='mesh-0', app='meshserve') within 1.0s. If this happens "
                                          f"repeatedly it's likely caused by high network latency in the cluster.")
        for _ in range(17):  # 28 s frozen
            probe("a1")
            clock[0] += 1.5
        probe("b2")  # another replica's own
        serve_log.info("mesh mesh-0 failed ...")  # the router's own lines pass
        clock[0] += 60
        probe("a1")
        said = [r.getMessage() for r in caplog.records]
        a1, b2 = "Failed to get queue length from Replica(id='a1'", "Failed to get queue length from Replica(id='b2'"
        assert len(said) == 4 and said[2] == "mesh mesh-0 failed ..."
        assert said[0].startswith(a1) and said[0].endswith("in the cluster.")
        assert said[1].startswith(b2) and said[1].endswith("in the cluster.")
        assert said[3].startswith(a1) and said[3].endswith("in the cluster. (16 more such lines in the last 86 s)")
    finally:
        serve_log.filters[:] = before


def test_queue_probe_warnings_forget_replicas_serve_replaced(monkeypatch):
    """A mesh replica Serve restarts comes back under a new id and the old one is never probed again: its entry in
    the filter's table goes, and an old replica's left-out count goes after QUEUE_PROBE_FORGET_S. Before, the table
    kept every replica that was ever slow to answer a probe."""
    clock = [0.0]
    monkeypatch.setattr(router_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    warnings = router_module.QueueProbeWarnings()

    def probe(replica: str) -> bool:
        record = logging.LogRecord("ray.serve", logging.WARNING, __file__, 0,
                                   f"Failed to get queue length from {replica} within 1.0s.", None, None)
        return warnings.filter(record)

    assert probe("frozen") and not probe("frozen")  # one line left out: kept with its count
    for restart in range(100):  # each restarted replica missed one probe, then was replaced
        assert probe(f"replica-{restart}")
        clock[0] += 10.0
    assert len(warnings.last) <= 1 + router_module.QUEUE_PROBE_LOG_S / 10.0 + 1
    assert "frozen" in warnings.last  # 1,000 s: its count is still worth saying
    clock[0] += router_module.QUEUE_PROBE_FORGET_S
    assert probe("another")
    assert set(warnings.last) == {"another"}


def test_a_failure_reaches_the_ingress_after_the_tokens_made_before_it():
    """A request's RequestFailed is its last item: tokens it made since the last flush go out ahead of it in the
    same message (generate, like the ingress, stops reading the request at its failure, so tokens after it are lost)."""
    async def main():
        router, _ = await make_router(num_meshes=1, stream_interval_ms=50)
        sent: list[list] = []
        router.attach("c", sent.append)
        sink = router.sinks["c"]
        sink.put_token("a", 5)  # a flush goes out at once (the stream was quiet), then none for 50 ms
        await until(lambda: sent)
        sink.put_token("a", 6)
        sink.put(TokenEvent("a", [7], logprobs=[]))
        sink.put_token("a", 8)
        sink.put(RequestFailed("a", NoMeshAvailable("no mesh")))
        await until(lambda: len(sent) == 2)
        first, second = (unpack_events(batch) for batch in sent)
        assert [e.token_ids for e in first] == [[5]]
        assert [type(e).__name__ for e in second] == ["TokenEvent", "RequestFailed"]
        assert second[0].token_ids == [6, 7, 8]
        await router.close()
    asyncio.run(main())


class SlowDecodeMesh(LocalMesh):
    """A mesh whose every decode step takes `step_s`, and whose capabilities say one takes a quarter of that."""

    def __init__(self, make_backend, step_s: float):
        super().__init__(make_backend)
        self.step_s = step_s

    async def reset(self):
        incarnation, caps = await super().reset()
        return incarnation, dataclasses.replace(caps, decode_step_s=self.step_s / 4)

    async def execute(self, work, incarnation):
        index = 0
        async for step in super().execute(work, incarnation):
            if index >= len(work.prefills):  # a decode step's message
                await asyncio.sleep(self.step_s)
            index += 1
            yield step


@pytest.mark.parametrize("step_s, decode_steps, factor", [(0.8, 1, 20), (0.3, 8, 1)])
def test_a_work_may_take_its_expected_time_times_step_deadline_factor(step_s, decode_steps, factor):
    """A work's results may each come up to min_step_deadline_s + step_deadline_factor x the work's expected time
    (Capabilities.expected_seconds of its prefill tokens and decode steps) after the one before: a mesh whose decode
    steps take 4x what it expects is slow, not failed, under a factor of 20 and a floor (0.05 s, + GRACE_S 0.5 s) the
    step alone outlasts; and a round of 8 steps whose whole takes longer than its deadline is not failed either, each
    step being within it."""
    async def main():
        mesh = SlowDecodeMesh(backend, step_s)
        router = Router([("mesh-0", mesh)], RouterConfig(**{**FAST, "min_step_deadline_s": 0.05,
                                                             "step_deadline_factor": factor,
                                                             "decode_steps": decode_steps}))
        await until(lambda: router.stats()["meshes"][0]["up"])
        params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1)  # one round
        tokens, reason = await collect(router, "a", [5] * 10, params)
        assert (len(tokens), reason) == (params.max_tokens, "length")
        assert router.meshes[0].failovers == 0, router.meshes[0].down_reason
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_a_router_whose_own_loop_was_cancelled_fails_its_health_check():
    """The router's loops catch Exception, not a CancelledError that reaches one from elsewhere: a supervisor ended so
    never feeds its mesh again. Before close() that is a router bug like an error (Router.check); after it, no bug."""
    async def main():
        router, _ = await make_router(num_meshes=2)
        deployment = router_module.RouterDeployment.func_or_class([], FAST)
        deployment._router = router
        await deployment.check_health()  # healthy
        router.tasks[1].cancel()
        await until(lambda: router.tasks[1].done())
        with pytest.raises(RuntimeError, match="supervisor of mesh-1 ended: cancelled"):
            await deployment.check_health()
        await router.close()
        await deployment.check_health()  # a closed router's loops ended as they should
    asyncio.run(main())


def test_a_router_whose_own_loop_ended_with_an_error_fails_its_health_check(monkeypatch):
    """The router's own loops (a mesh's supervisor, the held-request expiry) catch what a mesh or a request may cause;
    one that ended with an error anyway (a router bug) ended silently: here held requests were never ended or placed
    again while the replica answered its health checks. Now the health check fails (Serve restarts the router, and
    the ingress resubmits its requests)."""
    async def main():
        router, (mesh,) = await make_router(num_meshes=1, no_mesh_wait_s=0.2)
        deployment = router_module.RouterDeployment.func_or_class([], FAST)
        deployment._router = router
        await deployment.check_health()  # healthy
        mesh.vanish()
        await until(lambda: not router.stats()["ready"])

        def bug(*args):
            raise KeyError("a router bug")
        monkeypatch.setattr(router, "_unhold", bug)  # called as a held request's wait ends, no mesh being up
        stream = asyncio.create_task(collect(router, "a", [5] * 10))
        await until(lambda: router.tasks[-1].done())
        with pytest.raises(RuntimeError, match="held-request expiry ended: KeyError"):
            await deployment.check_health()
        stream.cancel()
        await router.close()
    asyncio.run(main())


def test_an_ingress_replicas_metric_report_is_kept_until_it_is_older_than_the_ttl(monkeypatch):
    """Every ingress replica serves the router's copy of the others' metric families on /metrics, so a scrape of any
    replica sees them all. A replica that is gone (scaled down, restarted under a new name) stops reporting: its last
    families are served, with their age, until INGRESS_REPORT_TTL_S, then dropped, not summed in forever."""
    async def main():
        router, _ = await make_router(num_meshes=1)
        clock = [1000.0]
        monkeypatch.setattr(router_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
        ttl = router_module.INGRESS_REPORT_TTL_S
        router.stats(("ingress-a", ["families of a"]))
        clock[0] += ttl - 1
        stats = router.stats(("ingress-b", ["families of b"]))
        assert stats["ingress_families"] == {"ingress-a": ["families of a"], "ingress-b": ["families of b"]}
        assert stats["ingress_report_age_s"] == {"ingress-a": ttl - 1, "ingress-b": 0.0}
        clock[0] += 2  # a is ttl + 1 s old, b 2 s
        stats = router.stats(("ingress-b", ["b again"]))
        assert stats["ingress_families"] == {"ingress-b": ["b again"]}
        assert stats["ingress_report_age_s"] == {"ingress-b": 0.0}
        assert "ingress_families" not in router.stats()  # a stats call with no report (the ingress's own) gets none
        await router.close()
    asyncio.run(main())


def test_a_failed_meshs_streams_queue_on_a_full_mesh_oldest_first():
    """A failed mesh's streams that another mesh cannot seat yet wait there in the order they arrived: the one that
    has waited longest resumes at the first free slot, not the newest."""
    async def main():
        router, (m0, m1) = await make_router(num_meshes=2)
        submit_lasting(router, 64)
        await until(lambda: all(m.up and len(m.scheduler.running) == 32 and all(
            s.output_ids for s in m.scheduler.requests.values()) for m in router.meshes))
        moved = sorted(rid for rid, r in router.requests.items() if r.mesh is router.meshes[0])
        m0.vanish()
        await until(lambda: router.stats()["meshes"][1]["waiting"] == 32)
        assert [seq.request_id for seq in router.meshes[1].scheduler.waiting] == moved
        await cancel_all_and_close(router, {"mesh-0": 1})
    asyncio.run(main())


def test_a_mesh_that_comes_back_resumes_the_streams_held_longest_first():
    """Streams held while no mesh was up resume oldest first on the one that comes back: with more of them than it
    seats, the newest wait in its queue."""
    async def main():
        router, meshes = await make_router(num_meshes=2)
        submit_lasting(router, 64)
        await until(lambda: all(m.up and len(m.scheduler.running) == 32 and all(
            s.output_ids for s in m.scheduler.requests.values()) for m in router.meshes))
        for mesh in meshes:
            mesh.vanish()
        await until(lambda: router.stats()["held"] == 64)
        meshes[0].restart()
        await until(lambda: router.stats()["meshes"][0]["running"] == 32)
        assert [seq.request_id for seq in router.meshes[0].scheduler.waiting] == [f"r{i:03d}" for i in range(32, 64)]
        await cancel_all_and_close(router, {"mesh-0": 1, "mesh-1": 1})
    asyncio.run(main())


def test_a_queue_moved_when_a_mesh_comes_up_goes_around_a_stalled_mesh():
    """The queues a mesh that comes up takes go to it, not to a mesh silent with work out: moved there, they would
    wait for that mesh's deadline to fail it."""
    async def main():
        router, (m0, m1, m2) = await make_router(num_meshes=3, min_step_deadline_s=60)
        m2.vanish()
        await until(lambda: not router.stats()["meshes"][2]["up"])
        router.submit("first", [2] * 40, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)
        m0.inject("hang", after=0)
        await until(lambda: router.stats()["meshes"][0]["stalled"])
        for i in range(40):  # around the stalled mesh-0: 32 seated on mesh-1, 8 queued there
            router.submit(f"r{i:03d}", [i + 3] * 40, LASTING, None, [], "c")
        await until(lambda: router.stats()["meshes"][1]["waiting"] == 8)
        m2.restart()
        await until(lambda: router.stats()["meshes"][1]["waiting"] == 0)
        on = {m.name: sum(r.mesh is m for r in router.requests.values()) for m in router.meshes}
        assert on == {"mesh-0": 1, "mesh-1": 32, "mesh-2": 8}
        m0.unhang.set()
        await cancel_all_and_close(router, {"mesh-2": 1})
    asyncio.run(main())


def test_a_probe_the_replica_never_answers_is_given_up_and_tried_again():
    """A reset that never returns (a call to a replica that went without a word) is dropped after probe_timeout_s
    and the probe goes on: else the mesh stayed down for good once its replica came back."""
    async def main():
        router, (mesh,) = await make_router(num_meshes=1)
        real, lost = mesh.reset, []

        async def reset():
            if not lost:  # the first probe after the failure is lost on the way
                lost.append(True)
                await asyncio.Event().wait()
            return await real()
        mesh.reset = reset
        mesh.vanish()
        await until(lambda: not router.stats()["ready"])
        mesh.restart()
        await until(lambda: router.stats()["ready"])
        assert lost and (await collect(router, "a", [5] * 10))[1] == "length"
        await nothing_held(router, failovers=1)
        await router.close()
    asyncio.run(main())


def test_a_work_whose_results_end_early_fails_its_mesh_and_loses_no_token():
    """A mesh that ends a work's stream short of its results, with no error, has failed: its requests move on with
    their tokens so far. Taken for done, the missing steps were never made and the stream waited for good."""
    async def main():
        alone = await solo_outputs(PROMPTS[:1], LONG)
        # one work out at a time: no next work's results to be taken for the missing ones
        router, (m0, _) = await make_router(num_meshes=2, pipeline_depth=1)
        real, cut = m0.execute, []

        async def execute(work, incarnation):
            async with contextlib.aclosing(real(work, incarnation)) as steps:
                async for step in steps:
                    yield step
                    if work.decode is not None and not cut:  # the first decode round ends after its first step
                        cut.append(work.work_id)
                        return
        m0.execute = execute
        assert await within(collect(router, "a", PROMPTS[0], LONG), 10) == alone[0]
        assert cut and router.stats()["meshes"][0]["failovers"] == 1
        await nothing_held(router, {"mesh-0": 1})
        await router.close()
    asyncio.run(main())


def test_requests_held_for_the_start_spread_go_to_every_mesh_that_answers_in_it():
    """Held past no_mesh_wait_s while a router start waits for its meshes' first answers, requests stay held for
    them, then spread over every mesh up: not sent to the first mesh up at the expiry's next tick."""
    async def main():
        meshes = [LocalMesh(backend) for _ in range(2)]
        await meshes[1].lock.acquire()  # its first reset waits
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)],
                        RouterConfig(**{**FAST, "no_mesh_wait_s": 0.0, "start_wait_s": 5.0}))
        await until(lambda: router.stats()["meshes"][0]["up"])
        submit_lasting(router, 4)
        await asyncio.sleep(0.1)  # a few ticks of the held-request expiry (every 0.01 s)
        meshes[1].lock.release()
        await until(lambda: not router.held)
        assert sorted(sum(r.mesh is m for r in router.requests.values()) for m in router.meshes) == [2, 2]
        await cancel_all_and_close(router)
    asyncio.run(main())


def test_a_request_held_again_at_a_meshs_rejoin_counts_its_tokens_once():
    """A held request no mesh up can take stays held when another mesh rejoins (_place_held holds it again): its
    tokens count once against the room to hold, else each rejoin added them again and refused new requests (429)
    with nothing more held."""
    async def main():
        long, short = meshes = sized_meshes(4096, 1024)
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)],
                        RouterConfig(**{**FAST, "max_waiting_tokens": 600}))  # 1,200 held tokens for the two
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        long.vanish()
        await until(lambda: not router.stats()["meshes"][0]["up"])
        params = SamplingParams(temperature=0.0, max_tokens=520)  # only mesh-0 holds it: held
        router.submit("x", [7] * 600, params, None, [], "c")
        short.vanish()
        await until(lambda: not router.stats()["meshes"][1]["up"])
        short.restart()
        await until(lambda: router.stats()["meshes"][1]["up"])  # it rejoined: x is held again
        router.submit("y", [8] * 510, params, None, [], "c")  # 1,110 tokens held: within the room
        assert sorted(router.held) == ["x", "y"]
        long.restart()
        await cancel_all_and_close(router, 1)
    asyncio.run(main())


def test_a_consumer_that_left_is_sent_nothing_more():
    """Its requests end as it leaves (detach cancels them), but their ends go nowhere: the ingress replica is gone, and
    a flush to its link would only fail in the flush's timer."""
    async def main():
        router, _ = await make_router(num_meshes=1)
        sent: list[list] = []
        router.attach("c", sent.append)
        router.submit("a", [3] * 40, LASTING, None, [], "c")
        await until(lambda: sent)
        router.detach("c")
        before = len(sent)
        for _ in range(10):  # the passes of the loop in which a flush of the abort would have gone
            await asyncio.sleep(0)
        assert len(sent) == before and "a" not in router.requests
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_a_down_mesh_reports_no_load_its_whole_kv_capacity_and_the_requests_held_for_it():
    """What /metrics shows through an outage: the down mesh runs nothing, its blocks_total counts every KV group (a
    Galaxy's four), and the requests waiting for a mesh are counted as held."""
    async def main():
        router, (mesh,) = await make_router(num_meshes=1)
        caps = mesh.runner.caps
        mesh.vanish()
        await until(lambda: not router.stats()["ready"])
        router.submit("a", [3] * 40, GREEDY, None, [], "c")
        stats = router.stats()
        (down,) = stats["meshes"]
        assert caps.kv_groups > 1 and down["blocks_total"] == caps.kv_groups * caps.num_blocks
        assert (down["running"], down["waiting"], down["blocks_used"], stats["held"]) == (0, 0, 0, 1)
        mesh.restart()
        await cancel_all_and_close(router, 1)
    asyncio.run(main())


def test_a_cancel_older_than_cancel_memory_s_does_not_end_the_request_it_names(monkeypatch):
    """A cancel that came before its request is kept cancel_memory_s; a submit of that id after it is a request of its
    own, run, even before the idle loop's next tick has forgotten the old cancel."""
    async def main():
        router, _ = await make_router(num_meshes=1, cancel_memory_s=60.0)
        clock = [1000.0]
        monkeypatch.setattr(router_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
        router.cancel("x")
        clock[0] += 61.0  # no await between this and the submit: the idle loop has not looked
        tokens, reason = await collect(router, "x", [4] * 30, GREEDY)
        assert reason == "length" and len(tokens) == GREEDY.max_tokens
        await nothing_held(router)
        await router.close()
    asyncio.run(main())


def test_a_cancel_on_an_idle_mesh_sends_its_release_once():
    """The freed slot goes to the mesh in one work of its own; then the mesh is idle again until its heartbeat (here
    longer than the test), not sent the same release over and over."""
    async def main():
        router, (mesh,) = await make_router(num_meshes=1, heartbeat_s=60.0)
        stream = router.generate("x", [5] * 100, SamplingParams(temperature=0.0, max_tokens=500))
        async for event in stream:
            if event.token_ids:
                break
        await stream.aclose()
        await until(lambda: not mesh.runner.slots and not router.meshes[0].scheduler.inflight)
        works = mesh.works
        for _ in range(50):  # passes of the loop in which a release sent again would reach the mesh
            await asyncio.sleep(0)
        assert mesh.works == works and not router.meshes[0].scheduler.pending_release
        await nothing_held(router)
        await router.close()
    asyncio.run(main())
