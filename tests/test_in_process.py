"""The in-process harness's own leak guard (tests/in_process.py: strays): the leak checks of every whole-stack test
lean on it, and a guard that stopped noting would pass them all without a word."""
from __future__ import annotations

import asyncio

import pytest

from deployments.router import Router, RouterConfig
from model.simulated import SimulatedBackend
from scheduler.sampling import SamplingParams
from scheduler.work import TokenEvent, pack_events
from tests.in_process import FAST, InProcessRouter, held, nothing_held, strays, until
from tests.local_mesh import LocalMesh

LASTING = SamplingParams(temperature=0.0, max_tokens=2000)  # runs until the test ends it


async def one_mesh_router() -> Router:
    mesh = LocalMesh(lambda: SimulatedBackend(num_blocks=256, time_scale=0.01, vocab_size=1000))
    router = Router([("mesh-0", mesh)], RouterConfig(**FAST))
    await until(lambda: router.meshes[0].up)
    return router


def test_a_request_a_mesh_runs_for_the_router_that_ended_it_fails_nothing_held_while_it_runs(monkeypatch):
    """A request the router ended whose cancel never reached its mesh runs on there for no one; checked at the end
    alone, it passed once it ended by itself within nothing_held's wait. It is seen at the next step the router
    delivers (conftest's watch on Router._deliver), and nothing_held fails on it while it still runs."""
    async def main():
        router = await one_mesh_router()
        router.submit("r", [5] * 40, LASTING, None, [], "c")
        sched = router.meshes[0].scheduler
        await until(lambda: "r" in sched.requests and sched.requests["r"].output_ids)
        cancel = sched.cancel
        monkeypatch.setattr(sched, "cancel", lambda request_id, reason="abort": None)  # the cancel lost
        router.cancel("r")
        with pytest.raises(AssertionError, match="stray: mesh-0 runs r, which the router has not placed there"):
            await nothing_held(router)
        assert "r" in sched.requests  # failed on the stray, not on what it holds at the end
        cancel("r")
        await router.close()
    asyncio.run(main())


def test_a_request_whose_reader_left_is_a_stray_until_the_ingress_cancels_it():
    """InProcessRouter's generate cancels nothing when closed, as RouterLink's: the ingress's own cancel ends a request
    its client left. One the router still runs once its reader left and that cancel was due is noted; one whose cancel
    the ingress sent as it does (a task, started as the read ended) is not, even with its events already on the way."""
    async def main():
        router = await one_mesh_router()
        client = InProcessRouter(router)
        left = client.generate("left", [5] * 40, LASTING)
        await anext(left)
        await left.aclose()  # its cancel never comes
        await until(lambda: strays(router))
        assert strays(router) == ["left runs on after its reader left, never cancelled by the ingress"]
        cancelled = client.generate("cancelled", [6] * 40, LASTING)
        await anext(cancelled)
        await cancelled.aclose()
        cancel = asyncio.ensure_future(client.cancel("cancelled"))  # the ingress's finally: asyncio.shield's task
        client._take(pack_events([TokenEvent("cancelled", [7])]))  # a flush that came before that task ran
        await cancel
        await asyncio.sleep(0.05)
        assert strays(router) == ["left runs on after its reader left, never cancelled by the ingress"]
        router.cancel("left")
        await router.close()
    asyncio.run(main())


def test_held_says_when_nothing_watches_for_strays(monkeypatch):
    """conftest puts the watch on Router only where a collected module imported the router: a module that imports the
    harness inside a test ran its leak checks without it, and passed one on a request that ended by itself while
    nothing_held waited. held refuses to answer then, naming the cause."""
    async def main():
        router = await one_mesh_router()
        assert held(router) == []
        monkeypatch.setattr(Router, "_deliver", Router._deliver.__wrapped__)  # as where conftest did not watch
        with pytest.raises(RuntimeError, match="not watched for strays"):
            held(router)
        monkeypatch.undo()
        await router.close()
    asyncio.run(main())
