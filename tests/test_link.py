"""Direct links (deployments/link.py) and the clients over them, without Ray: the router's of a mesh (a MeshReplica,
the class under Serve's decorator, behind a fake Serve handle) and the ingress's of the router (RouterLink)."""
import asyncio
import json
import logging
import pickle
import re
import socket
import time

import httpx
import numpy as np
import pytest

import deployments.ingress as ingress_module
import deployments.link as link_module
import deployments.mesh_client as mesh_client
import deployments.mesh_replica as mesh_replica
import deployments.router as router_module
import deployments.router_client as router_client
from deployments.aio import within
from deployments.link import Link, LinkAddress, LinkServer, connect
from deployments.mesh_client import LinkMeshClient
from deployments.ingress import build_app
from deployments.router import Router, RouterConfig, RouterDeployment
from deployments.router_client import RouterGone, RouterLink, RouterLost
from model.simulated import SimulatedBackend
from scheduler.errors import PromptTooLong
from scheduler.sampling import SamplingParams, TokenLogprobs
from scheduler.work import (DecodeRound, LeaseTaken, MeshWork, PrefillChunk, RequestFailed, StaleWork, StepResult,
                            TokenEvent, pack_events, unpack_events)
from tests.ingress_support import MODEL, COMPLETION, assert_error, make_client, tokenizer  # noqa: F401 (fixture)
from tests.local_mesh import LocalMesh
from tests.test_router import FAST, GREEDY, collect, until


async def echo_server() -> tuple[LinkServer, LinkAddress]:
    async def echo(link: Link) -> None:
        while True:
            link.send(await link.recv())
    server = LinkServer(echo)
    return server, await server.start("127.0.0.1")


def test_frames_come_back_whole_and_in_order():
    async def main():
        server, address = await echo_server()
        link = await connect(address)
        sent = [("submit", "r0", list(range(5000)), None), StepResult(3, [1, 2, -1]), b"x" * 300_000, ()]
        for obj in sent:
            link.send(obj)
        assert [await link.recv() for _ in sent] == sent
        link.close()
        server.close()
    asyncio.run(main())


def test_a_connection_without_the_secret_is_dropped_before_any_frame_is_read():
    async def main():
        server, address = await echo_server()
        link = await connect(LinkAddress(address.host, address.port, b"\0" * 16))
        link.send("hello")
        with pytest.raises(ConnectionError):
            await link.recv()
        server.close()
    asyncio.run(main())


def test_dispatch_hands_over_every_frame_in_order_then_raises_when_the_peer_leaves():
    async def main():
        got, opened = [], asyncio.Event()

        async def serve(link: Link) -> None:
            await opened.wait()  # frames arrive before dispatch starts: they are handed over first
            await link.dispatch(got.append)
        server = LinkServer(serve)
        link = await connect(await server.start("127.0.0.1"))
        for i in range(3):
            link.send(("frame", i, b"x" * (70_000 * i)))  # sizes across several socket reads
        await asyncio.sleep(0.1)
        opened.set()
        await asyncio.sleep(0.1)
        link.send(("frame", 3, b""))
        await asyncio.sleep(0.1)
        assert [f[1] for f in got] == [0, 1, 2, 3] and [len(f[2]) for f in got] == [0, 70_000, 140_000, 0]
        link.close()
        await asyncio.sleep(0.1)
        assert not server._tasks  # the handler ended with the link
        server.close()
    asyncio.run(main())


def test_a_frame_that_does_not_load_ends_the_link_with_its_error():
    async def main():
        server, address = await echo_server()
        link = await connect(address)
        link._transport.write(len(b"not a pickle").to_bytes(4, "big") + b"not a pickle")  # echoed as it came
        link.send("after")
        with pytest.raises(ConnectionError):  # the server's end dropped the link: nothing comes back
            await link.recv()
        server.close()
    asyncio.run(main())


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """The other end closed (or reset) the connection without sending anything."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        return True


def test_a_connection_that_never_presents_the_secret_is_dropped(monkeypatch):
    monkeypatch.setattr(link_module, "AUTH_TIMEOUT_S", 0.2)
    async def main():
        handled = []
        server = LinkServer(lambda link: handled.append(link) or asyncio.sleep(0))
        address = await server.start("127.0.0.1")
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(address.secret[:5])  # a prefix only
        assert await closed_by_peer(reader)
        assert not handled
        server.close()
    asyncio.run(main())


def test_closing_the_server_drops_a_link_still_presenting_its_secret():
    async def main():
        handled = []
        server = LinkServer(lambda link: handled.append(link) or asyncio.sleep(0))
        address = await server.start("127.0.0.1")
        reader, writer = await asyncio.open_connection(address.host, address.port)
        await asyncio.sleep(0.05)  # accepted, nothing sent yet
        server.close()
        writer.write(address.secret)
        assert await closed_by_peer(reader)
        assert not handled
    asyncio.run(main())


def test_a_peer_that_stops_sending_ends_the_link_at_once():
    """A half-close (EOF) is the link's end, even with our own frames still unread by the peer."""
    async def main():
        ended = asyncio.Event()

        async def serve(link: Link) -> None:
            link.send(b"x" * 5_000_000)  # more than the sockets hold: the peer reads none of it
            try:
                await link.recv()
            except ConnectionError:
                ended.set()
        server = LinkServer(serve)
        address = await server.start("127.0.0.1")
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(address.secret)
        await asyncio.sleep(0.1)
        writer.write_eof()
        await asyncio.wait_for(ended.wait(), 5)
        writer.close()
        server.close()
    asyncio.run(main())


def test_a_secret_that_arrives_in_pieces_opens_the_link():
    """TCP may cut the secret's 16 bytes across segments: the listener waits for all of them before it compares."""
    async def main():
        server, address = await echo_server()
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(address.secret[:15])
        await writer.drain()
        await asyncio.sleep(0.05)  # read by the listener alone
        writer.write(address.secret[15:])
        frame = pickle.dumps("hello")
        writer.write(len(frame).to_bytes(4, "big") + frame)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 5), "big")
        assert pickle.loads(await reader.readexactly(size)) == "hello"
        writer.close()
        server.close()
    asyncio.run(main())


def test_a_link_that_presented_its_secret_outlives_the_secrets_deadline(monkeypatch):
    """AUTH_TIMEOUT_S bounds only the wait for the secret: a link open longer than that is not dropped for it."""
    monkeypatch.setattr(link_module, "AUTH_TIMEOUT_S", 0.1)
    async def main():
        server, address = await echo_server()
        link = await connect(address)
        link.send("first")
        assert await link.recv() == "first"
        await asyncio.sleep(0.3)
        link.send("later")
        assert await link.recv() == "later"
        link.close()
        server.close()
    asyncio.run(main())


def test_frames_that_came_with_the_peers_close_are_still_received():
    """A peer that sends and then closes at once (a mesh's last result, then its exit): the frames and the end may
    reach the protocol in one pass of the loop, while a reader waits. recv hands over every frame before it raises
    the end (here the transport's two callbacks are driven by hand, in one pass)."""
    async def main():
        server, address = await echo_server()
        link = await connect(address)
        first = asyncio.create_task(link.recv())
        await asyncio.sleep(0.05)  # the reader waits
        frames = b"".join(len(f).to_bytes(4, "big") + f for f in map(pickle.dumps, ["a", "b"]))
        link.data_received(frames)
        link.eof_received()
        assert [await first, await link.recv()] == ["a", "b"]
        with pytest.raises(ConnectionError):
            await link.recv()
        link.close()
        server.close()
    asyncio.run(main())


def test_a_link_that_times_out_raises_connection_error():
    """A peer gone without a FIN ends the link by keepalive or TCP_USER_TIMEOUT: the transport reports an ETIMEDOUT
    (TimeoutError, not a ConnectionError). Its reader gets a ConnectionError, what every caller catches as the peer's
    end (LinkServer's handlers, the router's mesh client), not an unexpected error."""
    async def main():
        server, address = await echo_server()
        link = await connect(address)
        link._transport.abort()
        link.connection_lost(TimeoutError(110, "Connection timed out"))
        with pytest.raises(ConnectionError, match="timed out"):
            await link.recv()
        server.close()
    asyncio.run(main())


def test_a_frame_that_does_not_load_is_the_reason_the_reader_hears():
    """The link's first reason for ending is kept: a reader that comes to it after the connection closed hears of
    the frame that did not load (LinkServer logs it), not of a peer that closed."""
    async def main():
        heard = asyncio.Future()

        async def late_reader(link: Link) -> None:
            await asyncio.sleep(0.1)  # the bad frame, then the connection's close, come before the first recv
            try:
                await link.recv()
            except BaseException as exc:
                heard.set_result(exc)
        server = LinkServer(late_reader)
        link = await connect(await server.start("127.0.0.1"))
        link._transport.write(len(b"not a pickle").to_bytes(4, "big") + b"not a pickle")
        assert isinstance(await heard, pickle.UnpicklingError)
        server.close()
    asyncio.run(main())


def test_a_handler_that_returns_closes_its_link():
    """A handler ends (it raised on a frame it could not take, or was done): the peer hears the link's end at once,
    rather than waiting on a link no one reads (a router's works until their deadline)."""
    async def main():
        async def refuse(link: Link) -> None:
            raise ValueError("not a frame this handler takes")
        server = LinkServer(refuse)
        link = await connect(await server.start("127.0.0.1"))
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(link.recv(), 5)
        server.close()
    asyncio.run(main())


class Remote:
    """`handle.method.remote(...)` awaitable, as a Serve handle's call is."""

    def __init__(self, fn):
        self.remote = fn


class FakeHandle:
    def __init__(self, replica):
        self.reset = Remote(replica.reset)
        self.link_address = Remote(replica.link_address)


@pytest.fixture
def replica(monkeypatch):
    monkeypatch.setattr(mesh_replica, "build_backend",
                        lambda config, model_dir: SimulatedBackend(num_blocks=64, time_scale=0.2, vocab_size=1000))
    made = mesh_replica.MeshReplica.func_or_class({"backend": "simulated"})
    yield made
    made.shutdown()


def prefill(work_id: int, slot: int) -> MeshWork:
    return MeshWork(work_id, [PrefillChunk(f"r{work_id}", slot, [7] * 100, 0, [slot * 4 + i for i in range(2)],
                                           SamplingParams(temperature=0.0, max_tokens=5), 100)])


def test_works_pipelined_on_the_link_answer_in_order(replica):
    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, caps = await client.reset()
        assert incarnation == replica.incarnation and caps.num_slots == 32
        streams = [client.execute(prefill(i, slot=i), incarnation) for i in range(3)]  # all sent before any result
        for i, stream in enumerate(streams):
            (result,) = [r async for r in stream]
            assert result.work_id == i and result.tokens[i] >= 0
        with pytest.raises(mesh_replica.StaleWork):  # the replica's refusal crosses the link as itself
            [r async for r in client.execute(prefill(3, slot=3), "another-incarnation")]
        client.close()
    asyncio.run(main())


def test_a_router_whose_reset_another_router_followed_has_its_works_refused(replica):
    """Two routers on one mesh (Serve replaced the router replica; the old one lives on for its graceful shutdown, or
    on a partitioned node): the new one's reset restarted work ids at 0, and the old one's next works, sent after it,
    were taken in the new one's order, on the slots and KV blocks the new one had planned (a scratch run of two
    routers: wrong tokens from position 17 on for one, a stream cut short with "length"). A work is the reset's that
    its router made: any other router's is refused, and the new one's go on."""
    async def main():
        old, new = LinkMeshClient(FakeHandle(replica)), LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await old.reset()
        assert len([r async for r in old.execute(prefill(0, slot=0), incarnation)]) == 1
        await new.reset()  # the old router's slot 0 is dropped
        assert len([r async for r in new.execute(prefill(0, slot=2), incarnation)]) == 1
        with pytest.raises(LeaseTaken, match="reset"):  # its work 1: the new router's turn now (routine: no failover)
            [r async for r in old.execute(prefill(1, slot=1), incarnation)]
        (result,) = [r async for r in new.execute(prefill(1, slot=3), incarnation)]
        assert result.tokens[3] >= 0 and result.tokens[1] < 0
        assert set(replica.runner.slots) == {2, 3}  # nothing of the old router's was seated
        old.close()
        new.close()
    asyncio.run(main())


def test_an_older_routers_reset_does_not_take_the_mesh_from_the_newer_one(replica, monkeypatch):
    """The old router, its works refused, failed the mesh over and probed it: its reset took the mesh back, which
    refused the new router's works, whose probe took it again, and so on while both lived (a scratch run of two
    routers: neither answer finished in 60 s). A reset from a router that started before the one holding the mesh is
    refused while that one is heard from; once it is silent for LEASE_HOLD_S (it is gone), any router's goes."""
    async def main():
        old = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await old.reset()
        new = LinkMeshClient(FakeHandle(replica))  # Serve's replacement: started after the old one
        await new.reset()
        assert len([r async for r in new.execute(prefill(0, slot=2), incarnation)]) == 1
        with pytest.raises(LeaseTaken, match="newer router"):  # answered by the mesh (no traceback there), raised here
            await old.reset()
        assert len([r async for r in new.execute(prefill(1, slot=3), incarnation)]) == 1  # not disturbed
        assert set(replica.runner.slots) == {2, 3}
        monkeypatch.setattr(mesh_replica, "LEASE_HOLD_S", 0.0)  # the new router went silent: gone
        await old.reset()
        assert replica.runner.slots == {}
        old.close()
        new.close()
    asyncio.run(main())


def test_a_works_last_result_and_its_end_leave_the_mesh_in_one_write(replica, monkeypatch):
    """The router wakes once for a work's last step, not again ~1 ms later for the end marker."""
    writes = []
    real_send = Link.send

    def spy(self, *objs):
        writes.append(objs)
        real_send(self, *objs)
    monkeypatch.setattr(Link, "send", spy)

    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await client.reset()
        work = MeshWork(0, prefill(0, slot=0).prefills + prefill(1, slot=1).prefills)  # two results
        assert [r.last for r in [r async for r in client.execute(work, incarnation)]] == [False, True]
        client.close()
    asyncio.run(main())
    from_mesh = [[type(item).__name__ for _, item in objs] for objs in writes if not isinstance(objs[0][0], MeshWork)]
    assert from_mesh == [["StepResult"], ["StepResult", "NoneType"]]


def break_prefills(replica, monkeypatch, error: Exception) -> None:
    """Every prefill on `replica`'s device raises `error` (the device failed)."""
    def broken(*args, **kwargs):
        raise error
    monkeypatch.setattr(replica.runner.backend, "prefill", broken)


def test_a_failed_device_is_refused_by_the_routers_probe_without_raising_in_the_replica(replica, monkeypatch):
    """Serve logs every exception a handle call raises, at ERROR with its traceback: the router's probe of a replica
    whose device failed (every second, until Serve's third failed health check replaces it) put 19-28 of them in
    that replica's log per failure under real Serve, around the one that said why. The replica answers that its
    device failed; the router's client refuses the mesh."""
    break_prefills(replica, monkeypatch, RuntimeError("device fell over"))

    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await client.reset()
        with pytest.raises(RuntimeError, match="device fell over"):
            [r async for r in client.execute(prefill(0, slot=0), incarnation)]
        assert await replica.reset() == (incarnation, None)
        with pytest.raises(mesh_client.DeviceDown, match="waits for Serve to restart it"):
            await client.reset()
        client.close()
    asyncio.run(main())


def test_a_device_error_that_does_not_pickle_still_fails_its_work(replica, monkeypatch):
    """A backend's exception may not survive pickling (a device library's own type): it reaches the router as a
    RuntimeError naming it, so the router fails the mesh now, not when the work's deadline passes."""

    class DeviceError(Exception):
        def __reduce__(self):
            raise TypeError("not picklable")
    break_prefills(replica, monkeypatch, DeviceError("device fell over"))

    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await client.reset()
        with pytest.raises(RuntimeError, match="device fell over"):
            await asyncio.wait_for(anext(client.execute(prefill(0, slot=0), incarnation)), 10)
        client.close()
    asyncio.run(main())


def test_send_writes_several_frames_at_once_and_they_arrive_in_order():
    async def main():
        server, address = await echo_server()
        link = await connect(address)
        writes = []
        write = link._transport.write
        link._transport.write = lambda data: (writes.append(len(data)), write(data))
        link.send("a", ("b", 2), b"c" * 100_000)
        assert len(writes) == 1
        assert [await link.recv() for _ in range(3)] == ["a", ("b", 2), b"c" * 100_000]
        link.close()
        server.close()
    asyncio.run(main())


def test_a_link_that_breaks_fails_every_open_work_at_once(replica):
    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await client.reset()
        streams = [client.execute(prefill(i, slot=i), incarnation) for i in range(2)]
        replica.link_server.close()  # the replica's process went away
        for stream in streams:
            with pytest.raises(ConnectionError):
                [r async for r in stream]
        with pytest.raises(StaleWork, match="not sent"):  # nothing more goes to a dead link: the router fails the
            [r async for r in client.execute(prefill(2, slot=2), incarnation)]  # mesh, blaming no request for it
        await client.reset()  # the router's probe reconnects; work ids start again at 0
        assert len([r async for r in client.execute(prefill(0, slot=5), incarnation)]) == 1
    asyncio.run(main())


def test_a_request_is_not_blamed_for_replicas_that_went_while_idle(monkeypatch):
    """Both mesh replicas went while idle (their links closed; Serve starts new ones) before the router's heartbeat
    looked: the next request's work found no link to either. That was laid on the request as two meshes failing while
    computing it alone, a 500 (MeshFailures) for a request nothing had run; it waits for a mesh back and is answered."""
    monkeypatch.setattr(mesh_replica, "build_backend",
                        lambda config, model_dir: SimulatedBackend(num_blocks=64, time_scale=0.01, vocab_size=1000))
    monkeypatch.setattr(mesh_replica, "grammar_tokenizer", lambda *_: None)  # no grammars here: nothing to load
    replicas = [mesh_replica.MeshReplica.func_or_class({"backend": "simulated"}) for _ in range(4)]

    async def main():
        handles = [FakeHandle(replica) for replica in replicas[:2]]
        router = Router([(f"mesh-{i}", LinkMeshClient(h)) for i, h in enumerate(handles)],
                        RouterConfig(**{**FAST, "heartbeat_s": 60}))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        expected = await collect(router, "a", [7] * 100, GREEDY)
        for handle, old, new in zip(handles, replicas[:2], replicas[2:]):
            old.link_server.close()  # the replica's process went away
            handle.__init__(new)  # the handle reaches the replica Serve started instead
        await asyncio.sleep(0.05)
        assert await collect(router, "b", [7] * 100, GREEDY) == expected
        await router.close()
    asyncio.run(main())
    for replica in replicas:
        replica.shutdown()


def test_a_replica_that_goes_while_idle_is_failed_over_when_its_link_closes(monkeypatch):
    """A mesh replica that dies while idle closes its link, but nothing of the router's was waiting on it: the mesh
    stayed up (in /health, in placement) until the next heartbeat, 5 s later, sent it a work. It is down at once."""
    monkeypatch.setattr(mesh_replica, "build_backend",
                        lambda config, model_dir: SimulatedBackend(num_blocks=64, time_scale=0.01, vocab_size=1000))
    monkeypatch.setattr(mesh_replica, "grammar_tokenizer", lambda *_: None)
    replicas = [mesh_replica.MeshReplica.func_or_class({"backend": "simulated"}) for _ in range(2)]

    async def main():
        handles = [FakeHandle(replica) for replica in replicas]
        router = Router([(f"mesh-{i}", LinkMeshClient(h)) for i, h in enumerate(handles)],
                        RouterConfig(**{**FAST, "heartbeat_s": 60, "probe_interval_s": 60}))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        await collect(router, "a", [7] * 100, GREEDY)
        await until(lambda: not router.meshes[0].scheduler.inflight)  # a work still out would see the close itself
        replicas[0].link_server.close()  # its process went away
        await until(lambda: not router.stats()["meshes"][0]["up"], timeout_s=2)
        gone, kept = router.stats()["meshes"]
        assert "closed while it was idle" in gone["failed"] and gone["failovers"] == 1
        assert kept["up"] and kept["failovers"] == 0
        assert (await collect(router, "b", [7] * 100, GREEDY))[1] == "length"  # on the live one, not tried on the gone
        assert router.stats()["meshes"][0]["failovers"] == 1
        await router.close()
    asyncio.run(main())
    for replica in replicas:
        replica.shutdown()


@pytest.mark.parametrize("busy", [False, True])
def test_a_replica_stopped_on_purpose_is_a_planned_stop_not_a_failover(monkeypatch, caplog, busy):
    """Serve stops mesh-0's replica on purpose (a redeploy of its options, a scale-down) by its shutdown hook, then
    ends its process. Idle, the router learnt of it only from its link closing, as at a crash: an ERROR line and a
    failover at every routine redeploy. Its shutdown tells the router's link first: the mesh is down at once, counted
    and logged (WARNING) as a stop. Busy, its requests move as at a failure and end as their undisturbed run."""
    monkeypatch.setattr(mesh_replica, "build_backend",
                        lambda config, model_dir: SimulatedBackend(num_blocks=64, time_scale=0.05, vocab_size=1000))
    monkeypatch.setattr(mesh_replica, "grammar_tokenizer", lambda *_: None)
    replicas = [mesh_replica.MeshReplica.func_or_class({"backend": "simulated"}) for _ in range(2)]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompts = [[i + 2] * 100 for i in range(4)]

    async def main():
        router = Router([(f"mesh-{i}", LinkMeshClient(FakeHandle(r))) for i, r in enumerate(replicas)],
                        RouterConfig(**{**FAST, "heartbeat_s": 60, "probe_interval_s": 60}))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        expected = await asyncio.gather(*[collect(router, f"a{i}", p, params) for i, p in enumerate(prompts)])
        await until(lambda: not router.meshes[0].scheduler.inflight)
        answers, mesh0 = [], router.meshes[0]
        if busy:  # mesh-0 decoding some of them
            answers = [asyncio.create_task(collect(router, f"b{i}", p, params)) for i, p in enumerate(prompts)]
            await until(lambda: mesh0.up and any(len(q.output_ids) > 2 for q in mesh0.scheduler.running.values()))
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            replicas[0].shutdown()  # Serve's graceful shutdown (its __del__ hook), on the replica's event loop
            await until(lambda: not router.stats()["meshes"][0]["up"], timeout_s=2)
            replicas[0].link_server.close()  # then its process goes
            assert await asyncio.gather(*answers) == (expected if busy else [])
        gone, kept = router.stats()["meshes"]
        assert (gone["failovers"], gone["stops"]) == (0, 1) and "ReplicaStopping" in gone["failed"], gone
        assert kept["up"] and (kept["failovers"], kept["stops"]) == (0, 0)
        lines = [(r.levelno, r.getMessage()) for r in caplog.records
                 if "mesh mesh-0" in r.getMessage() and r.levelno >= logging.WARNING]
        assert [level for level, _ in lines] == [logging.WARNING] and "mesh-0 stopped" in lines[0][1], lines
        assert ("moved (mesh-1: " if busy else "its 0 requests") in lines[0][1], lines
        assert (await collect(router, "c", prompts[0], params)) == expected[0]  # on the live one
        await router.close()
    asyncio.run(main())
    for replica in replicas:
        replica.shutdown()


def test_a_work_sent_as_the_meshs_link_ends_is_stale_work(replica):
    """The replica's end of the link closed, and the router sends a work before the link's reader has heard of it:
    the work never reached the mesh, so it is refused as StaleWork (no request blamed), not lost in the closed socket
    and then failed as if the mesh had broken while computing it."""
    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await client.reset()
        client._link.eof_received()  # the replica's close reaches this end, in this pass of the loop
        with pytest.raises(StaleWork, match="not sent"):
            [r async for r in client.execute(prefill(0, slot=0), incarnation)]
        client.close()
    asyncio.run(main())


def test_a_work_of_the_link_before_a_reset_closed_late_leaves_the_new_link_alone(replica):
    """The router's streams of works sent before a reset may be closed after it (a failover's tasks torn down late):
    work ids start again at 0 on the new link, and closing an old stream must not take the new link, or its works,
    down with it."""
    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await client.reset()
        old = [client.execute(prefill(i, slot=i), incarnation) for i in range(2)]
        for stream in old:
            await anext(stream)  # read, but not to its end: its cleanup runs at its close
        incarnation, _ = await client.reset()
        new = client.execute(prefill(0, slot=3), incarnation)
        for stream in old:
            await stream.aclose()
        assert len([r async for r in new]) == 1
        assert not client._closed.is_set()
        client.close()
    asyncio.run(main())


def test_a_work_the_router_gave_up_on_closes_the_link_and_the_mesh_drops_the_rest(replica):
    """The router stops reading a work (its deadline passed: the mesh is failing over): the link closes, so the
    replica drops what it still holds of that router's works, and the router's idle wait on the link ends."""
    async def main():
        client = LinkMeshClient(FakeHandle(replica))
        incarnation, _ = await client.reset()
        two = prefill(0, slot=0).prefills + prefill(1, slot=1).prefills
        stream = client.execute(MeshWork(0, two), incarnation)
        await anext(stream)
        await stream.aclose()
        await asyncio.wait_for(client.wait_closed(), 5)
        await until(lambda: all(link.closed for link in replica.link_server._links))
        client.close()
    asyncio.run(main())


def test_listeners_started_at_once_share_one_address_and_secret():
    async def main():
        server = LinkServer(lambda link: asyncio.sleep(0))
        first, second = await asyncio.gather(server.start("127.0.0.1"), server.start("127.0.0.1"))
        assert first == second
        server.close()
    asyncio.run(main())


def test_a_refusal_whose_error_does_not_pickle_still_reaches_the_ingress():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")
    batch = [TokenEvent("a", [5]), RequestFailed("b", Unpicklable("boom")), RequestFailed("c", ValueError("x"))]
    a, b, c = unpack_events(pickle.loads(pickle.dumps(pack_events(batch))))
    assert a.token_ids == [5] and isinstance(b.error, RuntimeError) and "boom" in str(b.error)
    assert isinstance(c.error, ValueError) and str(c.error) == "x"


def test_a_decode_rounds_table_crosses_as_raw_bytes_and_comes_back_whole():
    """A work per round crosses the mesh's link: numpy's own array pickle cost the router ~28 us per work to dump, the
    table's raw bytes ~11 (2-core box). The mesh gets the same table, writable (it goes to torch.from_numpy)."""
    table = np.arange(6 * 4, dtype=np.int32).reshape(4, 6).T  # not C-contiguous: rows come back as they were
    work = MeshWork(3, decode=DecodeRound(8, [0, 2], table), release=[5])
    blob = pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"_reconstruct" not in blob and b"_frombuffer" not in blob  # not numpy's array pickle
    work = pickle.loads(blob)
    assert (work.work_id, work.decode.num_steps, work.decode.slots, work.release) == (3, 8, [0, 2], [5])
    got = work.decode.page_table
    assert got.dtype == np.int32 and got.shape == (6, 4) and (got == table).all() and got.flags.writeable


def test_a_step_result_crosses_as_its_fields():
    """One StepResult per mesh step crosses the link: as its fields, not a dataclass's object and __dict__ (whose keys
    crossed each time), it costs the router ~5 us to load instead of ~7 (2-core box), and loses nothing."""
    lp = TokenLogprobs(7, -0.5, [(7, -0.5), (9, -1.0)])
    step = StepResult(4, [7, -1, 8], {2: "stop"}, {0: lp}, True)
    blob = pickle.dumps((4, step), protocol=pickle.HIGHEST_PROTOCOL)
    assert b"finished" not in blob and b"tokens" not in blob
    _, got = pickle.loads(blob)
    assert got == step and pickle.loads(pickle.dumps(StepResult(1, [3]))) == StepResult(1, [3])


# ---- the ingress's link to the router (deployments/router_client.py) ----------------------------------------
class LinkWaits:
    """router_client's asyncio, recording each wait a request makes for the link: its timeout, and whether it ran
    out. What a request waited for is then checked without the wall clock, which a loaded box stretches."""

    def __init__(self):
        self.timeouts: list[float] = []
        self.ran_out = 0

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    async def wait(self, aws, *, timeout: float | None = None, return_when: str = asyncio.ALL_COMPLETED):
        self.timeouts.append(timeout)
        done, pending = await asyncio.wait(aws, timeout=timeout, return_when=return_when)
        self.ran_out += not done
        return done, pending


class GoneRouter:
    """A Serve handle to a router replica that is down and not coming back: no link address to be had."""

    def __init__(self):
        async def refused():
            raise ConnectionRefusedError("no router replica")
        self.link_address = Remote(refused)
        self.stats = Remote(refused)


def test_a_request_to_an_unreachable_router_gets_its_503_once_the_link_wait_is_spent(monkeypatch, tokenizer):
    """The link wait (CONNECT_WAIT_S) counts from when the router went away, not from each attempt: every one of
    choice's retries waited it afresh, so a request got its 503 after 7 x 30 s instead of ~30 s + the backoffs."""
    monkeypatch.setattr(router_client, "CONNECT_WAIT_S", 0.5)
    monkeypatch.setattr(router_client, "RECONNECT_S", 0.05)
    waits = LinkWaits()
    monkeypatch.setattr(router_client, "asyncio", waits)
    client = make_client(RouterLink(GoneRouter()), tokenizer)
    server = client.app.state.server
    server.retry_backoff_s = (0.01,) * 6
    server.max_model_len, server._model_len_at = 2048, time.monotonic()  # known from before the router went away
    response = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5})
    assert_error(response, 503)
    assert response.headers["retry-after"]
    assert waits.timeouts and sum(waits.timeouts) <= 0.5, waits.timeouts  # the 7 attempts waited 7 x 0.5 s


class LinklessRouter:
    """A Serve handle to a router that answers Serve's calls, with a live mesh, but whose link port cannot be reached
    from the ingress (a firewall between nodes that lets only Ray's ports through)."""

    def __init__(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        address = LinkAddress("127.0.0.1", sock.getsockname()[1], b"\0" * 16)
        sock.close()  # nothing listens there

        async def link_address():
            return address

        async def stats():
            return {"ready": True, "max_model_len": 2048, "vocab_size": None, "held": 0, "meshes": []}
        self.link_address, self.stats = Remote(link_address), Remote(stats)


def test_health_is_503_while_the_link_to_the_router_cannot_be_opened(monkeypatch, tokenizer):
    """/health read only the router's stats, which Serve carries: with the link port unreachable it said 200 while
    every request waited CONNECT_WAIT_S for the link, then got a 503."""
    monkeypatch.setattr(ingress_module, "LINK_DOWN_UNHEALTHY_S", 0.3)
    monkeypatch.setattr(router_client, "RECONNECT_S", 0.05)
    with make_client(RouterLink(LinklessRouter()), tokenizer) as client:
        client.get("/health")  # opens the link: no request has yet
        time.sleep(0.5)
        response = client.get("/health")
        assert response.status_code == 503 and "link to the router" in response.json()["error"]["message"]


class RouterReplicas:
    """A Serve handle to the router deployment, in this process: `restart()` is Serve replacing a router replica
    that died (its links drop; until the new one is up, nothing answers)."""

    def __init__(self, meshes: list[LocalMesh], config: dict):
        self.meshes, self.config = meshes, config
        self.replica = self._start()
        self.link_address = Remote(lambda: self._up().link_address())
        self.stats = Remote(lambda: self._up().stats())

    def _start(self):
        replica = RouterDeployment.func_or_class([], self.config)
        replica._clients = self.meshes
        return replica

    def _up(self):
        if self.replica is None:
            raise ConnectionRefusedError("no router replica")
        return self.replica

    @property
    def router(self):
        return self.replica._ready()

    async def kill(self) -> None:
        replica, self.replica = self.replica, None
        replica._link_server.close()
        await replica._ready().close()

    async def restart(self) -> None:
        await self.kill()
        self.replica = self._start()


def test_a_router_replica_deployed_with_no_traffic_brings_its_meshes_up_at_its_first_health_check():
    """Serve health-checks a replica from its start; nothing else calls a router no client has reached. Started by
    its first call alone, a router deployed with no traffic probed no mesh until a request or an ingress's /health
    came, and that one waited for (or was refused while) the meshes came up."""
    async def main():
        replica = RouterDeployment.func_or_class([], FAST)
        replica._clients = [LocalMesh(lambda: SimulatedBackend(time_scale=0.01, vocab_size=1000))]
        await replica.check_health()
        assert replica._router is not None
        await until(lambda: replica._router.stats()["ready"])
        await replica._router.close()
    asyncio.run(main())


def test_a_router_restart_mid_answer_loses_no_request_and_leaves_nothing_behind(tokenizer, caplog):
    """Two ingress replicas on one router, which dies mid-answer: every answer (n=2 too) comes whole and as it
    would undisturbed, and neither router nor links keep anything of a request once it ended. Each ingress logs the
    break (how many requests it resubmits) and the link's return, the outage between them; no line per request."""
    caplog.set_level(logging.INFO, logger="ray.serve")
    fast = dict(prefill_chunk=256, max_prefill_tokens=256, stream_interval_ms=2, probe_interval_s=0.02,
                probe_timeout_s=0.5, heartbeat_s=0.2, min_step_deadline_s=0.5, step_deadline_factor=5,
                start_wait_s=0.05)

    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_blocks=256, time_scale=0.2,
                                                     vocab_size=tokenizer.vocab_size))  # it embeds every prompt id
                  for _ in range(2)]
        routers = RouterReplicas(meshes, fast)
        links = [RouterLink(routers), RouterLink(routers)]
        clients = []
        for link in links:
            app = build_app(link, tokenizer, MODEL)
            app.state.server.retry_backoff_s = (0.02, 0.05, 0.1)
            clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress"))
        while (await clients[0].get("/health")).status_code != 200:
            await asyncio.sleep(0.02)

        async def texts(i: int) -> list[str]:
            body = {**COMPLETION, "prompt": f"story {i} " * 8, "max_tokens": 40, "temperature": 0.8, "seed": i,
                    "n": 1 + i % 2}
            response = await clients[i % 2].post("/v1/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text
            return [c["text"] for c in response.json()["choices"]]
        undisturbed = await asyncio.gather(*map(texts, range(6)))
        answers = [asyncio.create_task(texts(i)) for i in range(6)]
        def made(at_least: int) -> int:  # router requests with at least this many tokens (sent on within 2 ms)
            return sum(len(seq.output_ids) >= at_least for m in routers.router.meshes if m.up
                       for seq in m.scheduler.requests.values())
        await until(lambda: made(10) == 9)  # the six requests' nine answers
        assert not any(a.done() for a in answers)
        await routers.restart()
        assert await asyncio.gather(*answers) == undisturbed
        router = routers.router
        assert router.requests == {} and [len(s.request_ids) for s in router.sinks.values()] == [0, 0]
        assert [link._queues for link in links] == [{}, {}]
        for link in links:
            link._pump.cancel()
        await routers.kill()
    asyncio.run(main())
    said = [m for r in caplog.records if (m := r.getMessage()).startswith("the router's link")]
    assert len(said) == 4 and [m.split(":")[0] for m in said].count("the router's link broke") == 2
    assert sum(re.fullmatch(r"the router's link is up again, \d+\.\d s after it broke", m) is not None
               for m in said) == 2, said
    assert not [r for r in caplog.records if r.getMessage().startswith("router failed during")]


def test_a_redeploy_that_changes_the_model_mid_answer_refuses_the_continuation(tokenizer):
    """A redeploy with another model (here a simulated vocabulary of another size: other tokens) replaces router
    and meshes while the old ingress replica serves its open answers on: their continuations went to the new model
    and came back 200 with two models' tokens spliced. They are a 503 now, as is a new request to that replica; an
    ingress of the new release is served."""
    fast = dict(prefill_chunk=256, max_prefill_tokens=256, stream_interval_ms=2, probe_interval_s=0.02,
                probe_timeout_s=0.5, heartbeat_s=0.2, min_step_deadline_s=0.5, step_deadline_factor=5,
                start_wait_s=0.05)
    vocab = [tokenizer.vocab_size]

    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_blocks=256, time_scale=0.2, vocab_size=vocab[0]))]
        routers = RouterReplicas(meshes, {**fast, "model_identity": "A"})
        old = make_async_client(RouterLink(routers, "A"), tokenizer)
        while (await old.get("/health")).status_code != 200:
            await asyncio.sleep(0.02)
        body = {**COMPLETION, "prompt": "story " * 8, "max_tokens": 40, "temperature": 0}
        answer = asyncio.create_task(old.post("/v1/completions", json=body, timeout=30))
        await until(lambda: sum(len(s.output_ids) >= 10 for s in routers.router.meshes[0].scheduler.requests.values()))
        await routers.kill()  # the redeploy: a router and meshes of the other model
        vocab[0] += 64
        meshes[0].restart()
        routers.config = {**fast, "model_identity": "B"}
        routers.replica = routers._start()
        response = await answer
        assert_error(response, 503)
        assert "the model was redeployed" in response.json()["error"]["message"]
        assert_error(await old.post("/v1/completions", json=body, timeout=30), 503)
        assert routers.router.requests == {}
        new = make_async_client(RouterLink(routers, "B"), tokenizer)
        assert (await new.post("/v1/completions", json=body, timeout=30)).status_code == 200
        await routers.kill()
    asyncio.run(main())


def make_async_client(link: RouterLink, tokenizer) -> httpx.AsyncClient:
    app = build_app(link, tokenizer, MODEL)
    app.state.server.retry_backoff_s = (0.02, 0.05, 0.1)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


def test_a_deleted_router_deployment_ends_open_answers_at_once(monkeypatch, tokenizer):
    """serve.delete (or the shutdown at Ctrl-C of `make serve`) with answers open: the router and meshes stop in ~2 s,
    while the ingress serves its open answers on (INGRESS_GRACEFUL_SHUTDOWN_S). Each waited CONNECT_WAIT_S (30 s) for a
    router that will not come, with no byte sent, and the delete with them (6 streams: a 503 and the delete's return
    after 49 s). Serve's handle says the deployment is gone (DeploymentUnavailableError): the 503 comes at once."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    monkeypatch.setattr(router_client, "CONNECT_WAIT_S", 5.0)
    monkeypatch.setattr(router_client, "RECONNECT_S", 0.05)
    waits = LinkWaits()
    monkeypatch.setattr(router_client, "asyncio", waits)
    fast = dict(prefill_chunk=256, max_prefill_tokens=256, stream_interval_ms=2, probe_interval_s=0.02,
                probe_timeout_s=0.5, heartbeat_s=0.2, min_step_deadline_s=0.5, step_deadline_factor=5,
                start_wait_s=0.05)

    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_blocks=256, time_scale=0.2, vocab_size=tokenizer.vocab_size))]
        routers = RouterReplicas(meshes, fast)
        client = make_async_client(RouterLink(routers), tokenizer)
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.02)
        body = {**COMPLETION, "prompt": "story " * 8, "max_tokens": 200, "temperature": 0}
        answer = asyncio.create_task(client.post("/v1/completions", json=body, timeout=30))
        await until(lambda: sum(len(s.output_ids) >= 10 for s in routers.router.meshes[0].scheduler.requests.values()))

        async def deleted():
            raise DeploymentUnavailableError(DeploymentID(name="RouterDeployment", app_name="meshserve"))
        await routers.kill()
        routers.link_address = routers.stats = Remote(deleted)
        response = await answer
        assert_error(response, 503)
        assert "router's deployment unavailable" in response.json()["error"]["message"]
        assert waits.ran_out == 0  # Serve's word ended its wait for the link: it waited CONNECT_WAIT_S, and more
        waited = len(waits.timeouts)
        assert_error(await client.post("/v1/completions", json=body, timeout=30), 503)
        assert len(waits.timeouts) == waited  # a request after it does not wait for the link at all
    asyncio.run(main())


class ScriptedRouter:
    """A Serve handle to a router whose link answers each submit with `tokens` events, one a batch (as a router
    flushes each step), then a final one. Submits are answered one after another."""

    def __init__(self, tokens: int, first: int = 0, step_s: float = 0.0, logprobs: int | None = None):
        self.tokens, self.first, self.step_s = tokens, first, step_s  # step_s: between two steps' events
        self.logprobs = logprobs  # each token's alternatives, when set
        self.sent, self.answered = asyncio.Event(), 0
        self.server = LinkServer(self._serve)
        self.link_address = Remote(self._address)
        self.stats = Remote(self._stats)
        self._started: LinkAddress | None = None

    async def _address(self) -> LinkAddress:
        self._started = self._started or await self.server.start("127.0.0.1")
        return self._started

    async def _stats(self) -> dict:
        return {"ready": True, "max_model_len": 8192}

    async def _serve(self, link: Link) -> None:
        while True:
            kind, rid, *_ = await link.recv()
            if kind == "submit":
                for i in range(self.tokens):
                    token = self.first + i
                    lps = [] if self.logprobs is None else [TokenLogprobs(token, -0.5, [(token, -0.5)] * self.logprobs)]
                    link.send(pack_events([TokenEvent(rid, [token], lps)]))
                    if self.step_s:
                        await asyncio.sleep(self.step_s)
                link.send(pack_events([TokenEvent(rid, [self.first + self.tokens], finish_reason="length")]))
                self.answered += 1
                self.sent.set()


def test_a_reader_that_lags_gets_the_tokens_made_meanwhile_in_one_event():
    """A client that stops reading its stream (its TCP window full: the server's writes wait) leaves its request's
    events undelivered while the answer goes on. Each was kept as an event of its own: ~450 B per token in the
    ingress, 12x the tokens themselves, and as many SSE chunks once the client read again. They merge now, as vLLM's
    RequestOutputCollector merges a request's outputs while its reader lags, a bounded number a time, and its reader
    catching up lets the replica's other streams run between two of them."""
    async def main():
        router = ScriptedRouter(2000)
        link = RouterLink(router)
        events = link.generate("r", [1, 2], SamplingParams(max_tokens=2001), None)
        first = await anext(events)  # submitted; the reader now lags while the router sends the rest
        await router.sent.wait()
        await asyncio.sleep(0.3)  # the frames cross the loopback
        ticks = 0

        async def other_streams():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)
        other = asyncio.create_task(other_streams())
        await asyncio.sleep(0)
        rest, seen = [], []
        async for event in events:
            rest.append(event)
            seen.append(ticks)
        other.cancel()
        assert len(set(seen)) == len(seen)  # the loop ran between two events: catching up stalls nobody else
        assert [t for e in [first, *rest] for t in e.token_ids] == list(range(2001))
        assert rest[-1].finish_reason == "length"
        assert len(rest) < 20  # was 2000
        assert max(len(e.token_ids) for e in [first, *rest]) <= router_client.MERGED_TOKENS_MAX
        link._pump.cancel()
        router.server.close()
    asyncio.run(main())


def test_a_lagging_reader_of_logprobs_takes_them_a_bounded_work_an_event():
    """A token with k logprobs is ~1 + k tokens' work for its reader (~4-5 us each): merged 256 tokens an event, as
    plain tokens are, a reader catching up after a stall held the loop 22-26 ms an event with 20 logprobs, and every
    other stream of the replica with it. An event now takes 256 / (1 + k) of them."""
    async def main():
        router = ScriptedRouter(600, logprobs=20)
        link = RouterLink(router)
        params = SamplingParams(max_tokens=601, logprobs=20)
        events = link.generate("r", [1, 2], params, None)
        first = await anext(events)
        await router.sent.wait()
        await asyncio.sleep(0.3)  # the frames cross the loopback; the reader lagged all along
        rest = [e async for e in events]
        tokens = [len(e.token_ids) for e in [first, *rest]]
        assert sum(tokens) == 601 and sum(len(e.logprobs) for e in [first, *rest]) == 600
        assert max(tokens) == router_client.MERGED_TOKENS_MAX // 21, tokens  # merged still, to a bound
        link._pump.cancel()
        router.server.close()
    asyncio.run(main())


def test_a_lagging_readers_merged_events_hold_at_most_the_bound():
    """An event merged into the last one not taken while that one was under the bound: a merged event reached the
    bound + one event's tokens - 1 (with 20 logprobs, 12 + 7 of an 8-step round). The tokens past the bound now
    start the next event, so every event holds at most the bound, and all but the last are full."""
    async def main():
        bound, queue = 12, router_client.EventQueue(max_tokens=12)
        for start in range(0, 60, 5):  # a decode round's 5 tokens at a time, then one event past the bound alone
            queue.put_nowait(TokenEvent("r", list(range(start, start + 5)),
                                        [TokenLogprobs(t, -0.5, []) for t in range(start, start + 5)],
                                        num_prompt_tokens=7 if start == 0 else 0))
        queue.put_nowait(TokenEvent("r", list(range(60, 90)), [TokenLogprobs(t, -0.5, []) for t in range(60, 90)],
                                    finish_reason="length"))
        events = [await queue.get()]
        while events[-1].finish_reason is None:
            events.append(await queue.get())
        sizes = [len(e.token_ids) for e in events]
        assert max(sizes) <= bound and set(sizes[:-1]) == {bound}, sizes
        assert [t for e in events for t in e.token_ids] == list(range(90))
        assert all([lp.token_id for lp in e.logprobs] == e.token_ids for e in events)
        assert events[0].num_prompt_tokens == 7 and [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    asyncio.run(main())


def stalled_client(app, body: bytes) -> tuple[asyncio.Task, asyncio.Event, list[bytes]]:
    """POST /v1/completions to the ASGI app from a client that reads nothing until `reading` is set: each write of
    the response waits for it, as uvicorn's flow control holds a write while the client's window is full. Returns
    the app's call, the event, and the bodies written."""
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    reading = asyncio.Event()
    sent: list[bytes] = []

    async def receive():
        return requests.pop() if requests else await asyncio.Event().wait()

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            await reading.wait()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "scheme": "http", "server": ("test", 80),
             "client": ("test", 1234), "root_path": ""}
    return asyncio.create_task(app(scope, receive, send)), reading, sent


def test_a_stalled_stream_of_several_choices_keeps_their_tokens_merged(tokenizer):
    """With n > 1 (or a batch of prompts) each choice's task took its deltas from the link as they came and queued
    them for the response, whether or not the client read: a stalled stream kept a delta per token per choice in
    the ingress (10 stalled n=2 streams: 50 MB for ~6,000 tokens each), the link's merging undone, and sent them as
    a chunk each once the client read again. A choice's deltas now merge while the response has not taken them."""
    async def main():
        router = ScriptedRouter(300, first=1000, step_s=0.002)  # ordinary tokens, each with text
        app = build_app(RouterLink(router), tokenizer, MODEL)
        body = json.dumps({**COMPLETION, "max_tokens": 301, "n": 2, "stream": True}).encode()
        call, reading, sent = stalled_client(app, body)
        await until(lambda: router.answered == 2)
        await asyncio.sleep(0.3)  # the frames cross the loopback
        reading.set()
        await asyncio.wait_for(call, 10)
        chunks = [json.loads(line[6:]) for b in sent for line in b.decode().split("\n")
                  if line.startswith("data: {")]
        texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)]
        assert texts[0] == texts[1] == tokenizer.decode(list(range(1000, 1301)))
        assert len(chunks) < 20  # was a chunk per token: 602
        router.server.close()
    asyncio.run(main())


def test_a_stalled_readers_wait_is_not_the_servers_latency(tokenizer, monkeypatch):
    """A stream read only as its client reads (n = 1, no stop string) fed the latency histograms as its reader took
    the events: a client that read 1,000 s after the answer was made put those 1,000 s in e2e, decode, TPOT and
    inter-token latency, and an operator's latency alerts fired for one slow client. vLLM measures them as its
    engine makes the tokens (the output processor's stats, before the request's collector), whoever reads; so
    does the ingress now: an event's time is when its tokens reached the replica, not when they were read."""
    real, late = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + late[0])

    async def main():
        router = ScriptedRouter(50, first=1000)
        link = RouterLink(router)
        app = build_app(link, tokenizer, MODEL)
        body = json.dumps({**COMPLETION, "max_tokens": 51, "stream": True}).encode()
        call, reading, sent = stalled_client(app, body)
        await until(lambda: any(type(e) is TokenEvent and e.finish_reason
                                for q in link._queues.values() for e in q._items))  # all here, none read
        late[0] = 1000.0  # the client reads again 1,000 s later
        reading.set()
        await asyncio.wait_for(call, 10)
        samples = {name: value for _, data in app.state.server.metrics.report()[1] for name, _, value in data}
        for histogram in ("e2e_request_latency", "request_decode_time", "request_time_per_output_token",
                          "inter_token_latency"):
            total = samples[f"meshserve_{histogram}_seconds_sum"]
            assert 0 <= total < 100, (histogram, total)  # was 1,000 or more
        link._pump.cancel()
        router.server.close()
    asyncio.run(main())


class StoppableRouter(ScriptedRouter):
    """A ScriptedRouter whose answers run on until cancelled (a step every `step_s`), as a mesh's do: it records
    each cancel's reason, and how many tokens each request had made by then."""

    def __init__(self, tokens: int, first: int = 0, step_s: float = 0.002):
        super().__init__(tokens, first, step_s)
        self.cancelled: dict[str, tuple[str, int]] = {}

    async def _serve(self, link: Link) -> None:
        made: dict[str, int] = {}

        async def answer(rid: str) -> None:
            for i in range(self.tokens):
                if rid in self.cancelled:
                    return
                made[rid] = i + 1
                link.send(pack_events([TokenEvent(rid, [self.first + i])]))
                await asyncio.sleep(self.step_s)
            link.send(pack_events([TokenEvent(rid, [], finish_reason="length")]))

        while True:
            kind, rid, *rest = await link.recv()
            if kind == "submit":
                asyncio.ensure_future(answer(rid))
            else:
                self.cancelled[rid] = (rest[0], made.get(rid, 0))


@pytest.mark.parametrize("n", [1, 2])
def test_a_stalled_stream_still_ends_each_choice_at_its_stop_string(tokenizer, n):
    """A stop string is found by the ingress, which then cancels the answer in the router. A choice read only as its
    client took its deltas (n > 1: each choice's task waited for that; n = 1: the response read the choice itself):
    a client that stopped reading left every choice running past its stop string to max_tokens, a slot and its KV
    blocks held per choice for as long (vLLM stops it at the string whatever the client reads). The choices are read
    on, their deltas merged while the client lags."""
    async def main():
        router = StoppableRouter(2000, first=1000)
        app = build_app(RouterLink(router), tokenizer, MODEL)
        stop = tokenizer.decode([1010]).strip()
        body = json.dumps({**COMPLETION, "max_tokens": 2000, "n": n, "stream": True, "stop": [stop]}).encode()
        call, reading, sent = stalled_client(app, body)
        await until(lambda: len(router.cancelled) == n, timeout_s=3)  # while the client does not read
        assert [reason for reason, _ in router.cancelled.values()] == ["stop"] * n
        assert max(made for _, made in router.cancelled.values()) < 100  # at the string (11 tokens), not 2,000
        reading.set()
        await asyncio.wait_for(call, 10)
        chunks = [json.loads(line[6:]) for b in sent for line in b.decode().split("\n")
                  if line.startswith("data: {")]
        texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(n)]
        assert texts == [tokenizer.decode(list(range(1000, 1011))).split(stop)[0]] * n
        assert {c["choices"][0]["finish_reason"] for c in chunks} == {None, "stop"}
        router.server.close()
    asyncio.run(main())


class HeldRouter:
    """A Serve handle to a router whose link the test drives (`link`: the last one opened to it). `down`: its Serve
    calls raise that (the replica gone: refused; the deployment deleted: DeploymentUnavailableError)."""

    def __init__(self):
        self.link: Link | None = None
        self.down: BaseException | None = None
        self.server = LinkServer(self._serve)
        self.link_address = Remote(self._address)

    async def _address(self) -> LinkAddress:
        if self.down is not None:
            raise self.down
        return await self.server.start("127.0.0.1")

    async def _serve(self, link: Link) -> None:
        self.link = link
        await asyncio.Event().wait()  # open until the server closes

    async def submitted(self, link: RouterLink, request_id: str) -> asyncio.Future:
        """Submit a request on `link` once this router's link is open; return the future of its first event."""
        first = asyncio.ensure_future(anext(link.generate(request_id, [1, 2], SamplingParams(max_tokens=5), None)))
        await until(lambda: self.link is not None)
        return first

    async def answer(self, link: RouterLink, request_id: str) -> list[int]:
        """Submit a request on `link`, answer it with one token, and return the tokens the ingress got."""
        events = link.generate(request_id, [1, 2], SamplingParams(max_tokens=1), None)
        first = asyncio.ensure_future(anext(events))
        await until(lambda: first.done() or (self.link is not None and not self.link.closed))
        if first.done():
            return first.result()  # raises the refusal
        assert (await self.link.recv())[:2] == ("submit", request_id)
        self.link.send(pack_events([TokenEvent(request_id, [5], finish_reason="length")]))
        return (await first).token_ids


def test_a_router_deployed_again_after_a_delete_is_waited_for_at_its_next_restart(monkeypatch):
    """Serve said the router's deployment was gone (requests refused at once), then it was deployed again: once its
    link is up, a later break of it is a router restart again, which a request waits for, not refused as gone."""
    monkeypatch.setattr(router_client, "RECONNECT_S", 0.01)
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    async def main():
        router = HeldRouter()
        router.down = DeploymentUnavailableError(DeploymentID(name="RouterDeployment", app_name="meshserve"))
        link = RouterLink(router)
        with pytest.raises(RouterGone):
            await router.answer(link, "a")
        router.down = None  # deployed again
        await until(lambda: link.link_down_s() == 0)
        assert await router.answer(link, "b") == [5]
        await answers_after_a_restart(router, link, "c")
    asyncio.run(main())


async def answers_after_a_restart(router, link, request_id: str) -> None:
    """The router restarts (no replica for a while): a request sent meanwhile waits for it and is answered."""
    router.down = ConnectionRefusedError("no router replica")
    router.server.close()
    await until(lambda: link.link_down_s() > 0)
    later = asyncio.ensure_future(router.answer(link, request_id))
    await asyncio.sleep(0.1)
    router.down = None
    assert await later == [5]
    link._pump.cancel()
    router.server.close()


def test_a_router_link_that_broke_after_the_connect_wait_is_waited_for(monkeypatch):
    """CONNECT_WAIT_S counts from the link's break, not from when it was first opened: a request sent while a
    router that served for longer restarts waits for it."""
    monkeypatch.setattr(router_client, "RECONNECT_S", 0.01)
    monkeypatch.setattr(router_client, "CONNECT_WAIT_S", 0.5)

    async def main():
        router = HeldRouter()
        link = RouterLink(router)
        assert await router.answer(link, "a") == [5]
        await asyncio.sleep(0.6)  # up longer than the wait
        await answers_after_a_restart(router, link, "b")
    asyncio.run(main())


def test_a_cancel_as_the_router_link_breaks_does_not_raise():
    """A client that leaves as the router's link breaks: its cancel finds the link closing, before the link's reader
    has heard of it. There is nothing to cancel (the router that had the request is gone): it must not raise."""
    async def main():
        router = HeldRouter()
        link = RouterLink(router)
        first = await router.submitted(link, "a")
        link._link.abort()  # the break, in this pass of the loop
        await link.cancel("a")
        with pytest.raises(RouterLost):
            await first
        link._pump.cancel()
        router.server.close()
    asyncio.run(main())


def test_a_request_the_router_refused_raises_the_routers_error():
    """A submit the router refuses (too long, its queue full) comes back on the link as a RequestFailed: the request
    raises the router's error itself, which the ingress turns into its status (a 400, a 503), not a 500."""
    async def main():
        router = HeldRouter()
        link = RouterLink(router)
        first = await router.submitted(link, "a")
        assert (await router.link.recv())[:2] == ("submit", "a")
        router.link.send(pack_events([RequestFailed("a", ValueError("prompt too long"))]))
        with pytest.raises(ValueError, match="prompt too long"):
            await first
        link._pump.cancel()
        router.server.close()
    asyncio.run(main())


def test_a_submit_the_router_replica_refuses_ends_its_request_over_the_link_with_the_refusal():
    """A submit the router refuses (here a prompt longer than any mesh holds) must come back on the ingress's link: the
    request raises it (the ingress's 400), rather than wait on a link that carries nothing more for it; the router
    keeps nothing of it."""
    async def main():
        routers = RouterReplicas([LocalMesh(lambda: SimulatedBackend(num_blocks=64, time_scale=0.01,
                                                                     vocab_size=1000))], FAST)
        link = RouterLink(routers)
        await until(lambda: not routers.router.starting and routers.router.stats()["ready"])

        async def answer() -> None:
            async for _ in link.generate("long", [3] * 5000, SamplingParams(max_tokens=5), None):
                pass
        with pytest.raises(PromptTooLong):
            await within(answer(), 10)
        assert not routers.router.requests and link._queues == {}
        link._pump.cancel()
        await routers.kill()
    asyncio.run(main())


def test_a_continuation_sent_over_the_link_is_not_refused_by_a_full_queue():
    """A stream the ingress resubmits at a router restart says so on the link: it is no new load, so a queue the
    restart's other streams filled does not refuse it (Router.submit), as it would a new request (429)."""
    async def main():
        routers = RouterReplicas([LocalMesh(lambda: SimulatedBackend(num_slots=4, num_blocks=64, time_scale=0.01,
                                                                     vocab_size=1000))],
                                 {**FAST, "max_waiting_requests": 1})
        link = RouterLink(routers)
        await until(lambda: not routers.router.starting and routers.router.stats()["ready"])
        lasting = SamplingParams(temperature=0.0, max_tokens=2000)
        for i in range(5):  # four slots and a queue of one: full
            routers.router.submit(f"r{i}", [i + 2] * 40, lasting, None, [], "other")
        events = link.generate("c", [9] * 40, SamplingParams(temperature=0.0, max_tokens=3), None, continuation=True)
        assert (await within(anext(events), 10)).request_id == "c"
        await events.aclose()
        for rid in list(routers.router.requests):
            routers.router.cancel(rid)
        link._pump.cancel()
        await routers.kill()
    asyncio.run(main())


def test_an_event_for_an_ingress_whose_link_just_closed_is_dropped_without_an_error():
    """An ingress replica gone (or dropped for its backlog) closes its link a pass of the loop before the router's reader
    hears of it and detaches its stream; an event flushed in between has nowhere to go and is dropped. Sent, it raised
    ConnectionError in the flush's timer callback: a traceback in the router's log at each ingress that left."""
    async def main():
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        routers = RouterReplicas([LocalMesh(lambda: SimulatedBackend(num_blocks=64, time_scale=0.01,
                                                                     vocab_size=1000))], FAST)
        link = RouterLink(routers)
        await until(lambda: not routers.router.starting and routers.router.stats()["ready"])
        events = link.generate("a", [5] * 40, SamplingParams(temperature=0.0, max_tokens=2000), None)
        await within(anext(events), 10)
        (served,) = routers.replica._link_server._links
        served.abort()  # the ingress's end, in this pass of the loop
        routers.router.cancel("a")  # its last event, flushed before the reader has heard of the end
        await until(lambda: not routers.router.sinks)
        assert errors == [] and not routers.router.requests
        with pytest.raises(RouterLost):
            await within(anext(events), 10)
        link._pump.cancel()
        await routers.kill()
    asyncio.run(main())


def test_an_ingress_that_stopped_reading_is_dropped_past_the_backlog_limit_and_its_requests_end(monkeypatch):
    """An ingress replica whose loop hangs (or whose host froze) reads no more events; the router's buffer for its link
    would grow with every token of its requests, which run on for nobody. Past MAX_CONSUMER_BACKLOG (here 16 KiB) the
    router drops the link, and the link's end cancels each request it carried."""
    monkeypatch.setattr(router_module, "MAX_CONSUMER_BACKLOG", 16 << 10)

    async def main():
        routers = RouterReplicas([LocalMesh(lambda: SimulatedBackend(num_blocks=256, time_scale=0.01,
                                                                     vocab_size=1000))], FAST)
        await until(lambda: not routers.router.starting and routers.router.stats()["ready"])
        ingress = await link_module.connect(await routers.link_address.remote())
        await until(lambda: len(routers.replica._link_server._links) == 1)
        (served,) = routers.replica._link_server._links
        for side, size in ((ingress, socket.SO_RCVBUF), (served, socket.SO_SNDBUF)):  # small: a backlog soon
            side._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, size, 4096)
        # the kernel's own end of a peer that takes nothing for 15 s (link._no_delay) off: the limit alone ends it
        served._transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)
        ingress._transport.pause_reading()  # it reads nothing more
        lasting = SamplingParams(temperature=0.0, max_tokens=8000)
        for i in range(8):
            ingress.send(("submit", f"r{i}", [i + 2] * 40, lasting, None, [], False))
        await until(lambda: routers.router.requests)
        await until(lambda: not routers.router.sinks)  # the link dropped
        assert not routers.router.requests  # and its requests with it, far from their max_tokens
        ingress.abort()
        await routers.kill()
    asyncio.run(main())
