"""The mesh replica's ordering and incarnation rules, without Ray (the class under Serve's decorator)."""
import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest

import deployments.mesh_replica as mesh_replica
from model.simulated import SimulatedBackend
from scheduler.sampling import SamplingParams
from scheduler.work import LeaseTaken, MeshWork, PrefillChunk, PrefillHistory, ReplicaStopping, StaleWork
from tests.in_process import until

Replica = mesh_replica.MeshReplica.func_or_class


@pytest.fixture
def replica(monkeypatch):
    monkeypatch.setattr(mesh_replica, "build_backend",
                        lambda config, model_dir: SimulatedBackend(num_blocks=64, time_scale=1.0, vocab_size=1000))
    made = Replica({"backend": "simulated"})
    made.min_deadline_s, made.deadline_factor = 0.5, 2  # shorter than a config allows: the deadline tests end soon
    yield made
    made.shutdown()


def prefill(work_id: int, slot: int = 0) -> MeshWork:
    params = SamplingParams(temperature=0.0, max_tokens=50)
    return MeshWork(work_id, [PrefillChunk(f"r{work_id}", slot, [7] * 300, 0, [slot * 5 + i for i in range(5)],
                                           params, 300)])


async def drain(replica, work, incarnation=None):
    return [r async for r in replica.execute(work, incarnation or replica.incarnation)]


def test_work_for_another_incarnation_is_refused(replica):
    with pytest.raises(mesh_replica.StaleWork, match="incarnation"):
        asyncio.run(drain(replica, prefill(0), "someone-else"))


def test_a_work_whose_predecessor_never_comes_is_refused_after_its_deadline(replica):
    with pytest.raises(mesh_replica.StaleWork, match="waited"):
        asyncio.run(drain(replica, prefill(3)))


def test_reset_waits_for_the_running_work_then_refuses_the_queued_ones(replica):
    async def main():
        incarnation, caps = await replica.reset()
        assert incarnation == replica.incarnation and caps.num_slots == 32
        running = asyncio.create_task(drain(replica, prefill(0, slot=0)))
        queued = asyncio.create_task(drain(replica, prefill(1, slot=1)))
        await asyncio.sleep(0.01)  # work 0 is on the worker thread, work 1 waits for its turn
        await replica.reset()
        assert len(await running) == 1  # it ran to its end before the reset went through
        assert replica.runner.slots == {}  # ... and the reset came after it: no slot survives
        with pytest.raises(mesh_replica.StaleWork, match="reset"):
            await queued
        assert len(await drain(replica, prefill(0, slot=2))) == 1  # work ids start again at 0
    asyncio.run(main())


def test_a_queued_work_runs_right_after_the_one_before_even_while_the_event_loop_is_busy(replica):
    """The worker thread goes from one work to the next by itself: the device does not wait for the
    replica's loop to take the previous work's last result first."""
    async def main():
        await replica.reset()
        works = [asyncio.create_task(drain(replica, prefill(i, slot=i))) for i in range(2)]
        await asyncio.sleep(0.01)  # both handed to the worker thread
        time.sleep(1.0)  # the loop is stuck: nothing of it runs meanwhile
        assert sorted(replica.runner.slots) == [0, 1]  # ... and both prefills ran
        assert [len(r) for r in await asyncio.gather(*works)] == [1, 1]
    asyncio.run(main())


def test_a_work_whose_turn_has_come_goes_to_the_worker_thread_in_the_loop_pass_that_takes_it(replica, monkeypatch):
    """A work that comes in order (nearly every one) has nothing to wait for: it is queued on the device thread
    at once. Waiting for its turn anyway (asyncio.wait_for, before Python 3.12: a task and a timer) cost the mesh's
    loop three more passes before every work, on an idle request's path to its first token too."""
    queued = []
    submit = replica.worker.submit
    monkeypatch.setattr(replica.worker, "submit", lambda fn, *args: queued.append(fn) or submit(fn, *args))

    async def main():
        await replica.reset()
        queued.clear()
        results = replica.execute(prefill(0), replica.incarnation)
        first = asyncio.ensure_future(anext(results))
        await asyncio.sleep(0)  # one pass of the loop: the work's own first step
        assert queued == [replica._run]
        assert (await first).tokens[0] >= 0
        await results.aclose()
    asyncio.run(main())


def test_a_prefills_first_token_is_taken_by_the_loop_before_the_worker_goes_on_to_the_decode(replica, monkeypatch):
    """Starting a decode step holds the GIL: had the worker thread gone on to it, the loop woken for the first token
    would have waited for that host work before it could send the token on. Under uvloop, as Serve runs a replica:
    its wake-up from another thread leaves the GIL with that thread, which asyncio's (a socket write) lets go."""
    import numpy as np
    import uvloop

    from scheduler.work import DecodeRound
    monkeypatch.setattr(mesh_replica, "HANDOFF_WAIT_S", 30.0, raising=False)  # the order is tested, not the bound
    taken: list = []
    taken_when_resumed: list[int] = []  # results the loop had taken each time the worker asked the runner for more
    execute = replica.runner.execute

    def runner_execute(work):
        for result in execute(work):
            yield result
            taken_when_resumed.append(len(taken))
    monkeypatch.setattr(replica.runner, "execute", runner_execute)
    table = np.zeros((32, 16), dtype=np.int32)
    table[0] = range(16)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    work = MeshWork(0, [PrefillChunk("r0", 0, [7] * 300, 0, list(range(5)), params, 300)], DecodeRound(3, [0], table))

    async def main():
        await replica.reset()
        async for result in replica.execute(work, replica.incarnation):
            taken.append(result)
    uvloop.run(main())
    assert len(taken) == 4 and taken[0].tokens[0] >= 0
    assert taken_when_resumed[0] == 1  # the first token was taken before the runner went on to the decode


def test_a_heartbeat_drops_the_slots_it_releases_before_it_is_answered(replica):
    """A heartbeat is a work of no message that carries the slots a cancel freed on an idle mesh (Router._heartbeat).
    With no message to wait for, its loop ended at once, and the work, not started yet on the worker thread, was
    dropped as one the router gave up on: the slot kept a gone request's state (its grammar matcher, penalty counts,
    token history) until a prefill took the slot."""
    async def main():
        await replica.reset()
        assert len(await drain(replica, prefill(0, slot=3))) == 1 and 3 in replica.runner.slots
        gate = threading.Event()
        replica.worker.submit(gate.wait)  # the worker thread is still busy when the heartbeat comes
        heartbeat = asyncio.create_task(drain(replica, MeshWork(1, release=[3])))
        await asyncio.sleep(0)  # the heartbeat's execute runs up to its first wait
        gate.set()
        assert await heartbeat == []
        assert replica.runner.slots == {}  # answered: its release has been applied
    asyncio.run(main())


def test_after_a_device_error_the_replica_runs_nothing_and_stays_down(replica, monkeypatch):
    """A failed device takes no more work, not even a reset, until Serve restarts the replica (the router
    keeps the mesh down meanwhile): it would only fail the requests moved onto it."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("device fell over")

    monkeypatch.setattr(replica.runner.backend, "prefill", broken)

    async def main():
        await replica.reset()
        with pytest.raises(RuntimeError, match="device fell over"):
            await drain(replica, prefill(0))
        with pytest.raises(mesh_replica.DeviceFailed, match="device fell over"):
            await drain(replica, prefill(1))
        assert await replica.reset() == (replica.incarnation, None)  # down, answered: Serve logs what is raised
    asyncio.run(main())
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="backend failed"):
        replica.check_health()


def test_a_reset_waiting_for_a_work_that_fails_on_the_device_reports_the_failure(replica, monkeypatch):
    """The router's probe after it gave up on a hung work: the work then fails on the device. The reset
    must not answer "up", capabilities (the router would move requests onto a failed device)."""
    def broken(*args, **kwargs):
        time.sleep(0.2)
        raise RuntimeError("device lost")

    monkeypatch.setattr(replica.runner.backend, "prefill", broken)

    async def main():
        await replica.reset()
        running = asyncio.create_task(drain(replica, prefill(0)))
        await asyncio.sleep(0.05)  # work 0 is on the worker thread
        assert await replica.reset() == (replica.incarnation, None)
        with pytest.raises(RuntimeError, match="device lost"):
            await running
    asyncio.run(main())


def test_shutdown_closes_the_device_on_the_worker_thread_after_the_running_step(replica, monkeypatch):
    """ttnn is not thread-safe: the device is closed by the thread that steps it, once its step ends."""
    import threading
    events = []
    backend = replica.runner.backend
    step = backend.prefill

    def slow_prefill(*args, **kwargs):
        events.append("step starts")
        time.sleep(0.3)
        events.append("step ends")
        return step(*args, **kwargs)

    monkeypatch.setattr(backend, "prefill", slow_prefill)
    monkeypatch.setattr(backend, "close", lambda: events.append(("close", threading.current_thread().name)))

    async def main():
        await replica.reset()
        running = asyncio.create_task(drain(replica, prefill(0, slot=0)))
        await asyncio.sleep(0.05)
        replica.shutdown()  # the replica's loop waits here, as in Serve's shutdown hook
        await running
    asyncio.run(main())
    assert events[:2] == ["step starts", "step ends"]
    assert events[2][0] == "close" and events[2][1].startswith("mesh") and len(events) == 3


async def seated_for_a_long_decode(replica) -> MeshWork:
    """Request r0 prefilled in slot 0, and a work of 400 decode steps for it (~6 s): one a shutdown stops."""
    import numpy as np

    from scheduler.work import DecodeRound
    await replica.reset()
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    first = MeshWork(0, [PrefillChunk("r0", 0, [7] * 300, 0, list(range(5)), params, 300)])
    assert len(await drain(replica, first)) == 1
    table = np.zeros((32, 16), dtype=np.int32)
    table[0] = range(16)
    return MeshWork(1, decode=DecodeRound(400, [0], table))


def test_shutdown_closes_after_the_running_step_not_the_whole_work(replica, monkeypatch):
    """A long work (here 400 decode steps, ~6 s) stops at its next step: Serve kills a replica that takes
    longer than its graceful shutdown timeout, and then the device is never closed. Counted in steps, not seconds:
    once shutdown has begun, the runner makes at most the step under way (the whole work made ~390 more)."""
    closed, steps, after = [], [], []
    monkeypatch.setattr(replica.runner.backend, "close", lambda: closed.append(len(after)))
    execute = replica.runner.execute

    def counted(work: MeshWork):
        for result in execute(work):
            (after if replica.closed else steps).append(result)
            yield result
    monkeypatch.setattr(replica.runner, "execute", counted)

    async def main():
        work = await seated_for_a_long_decode(replica)
        steps.clear()
        running = asyncio.create_task(drain(replica, work))
        await until(lambda: len(steps) >= 3)  # the long work is under way
        replica.shutdown()
        running.cancel()
    asyncio.run(main())
    assert closed == [len(after)] and len(after) <= 1, (closed, len(after))


def test_a_work_that_shutdown_stops_ends_with_replica_stopping_for_the_rest(replica):
    """Shutdown stops a work at its next step; the messages it will not send are refused as ReplicaStopping (a
    StaleWork), so the router lays the mesh's failure on none of its requests, and reports a planned stop. Its stream
    used to wait for them for good, and the router, seeing the link close, blamed the request being computed: two
    such shutdowns in a row ended it with a 500."""
    async def main():
        long = await seated_for_a_long_decode(replica)
        results = []

        async def consume():
            async for result in replica.execute(long, replica.incarnation):
                results.append(result)
        running = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        replica.shutdown()
        with pytest.raises(ReplicaStopping, match="shutting down"):
            await asyncio.wait_for(running, 5)
        with pytest.raises(ReplicaStopping):  # a work that comes later: the worker thread takes no more
            await drain(replica, MeshWork(long.work_id + 1))
        assert 0 < len(results) < 400
    asyncio.run(main())


def test_a_long_rule_chain_compiles_on_the_worker_thread(monkeypatch):
    """The mesh compiles each grammar again, on its worker thread: a rule chain the ingress took (~30 MB of
    recursion in llguidance) must not overflow that thread's stack, which would kill the mesh process."""
    from model.embedded import ensure_smollm2
    from model.grammar import cfg_grammar, ll_tokenizer
    from model.tokenizer import load_tokenizer
    from tests.ingress_support import lark_chain
    tok = load_tokenizer(ensure_smollm2())
    monkeypatch.setattr(mesh_replica, "build_backend", lambda config, model_dir: SimulatedBackend(
        num_blocks=64, time_scale=0.01, vocab_size=tok.vocab_size))
    built = []
    monkeypatch.setattr(mesh_replica, "grammar_tokenizer",
                        lambda model_dir, vocab_size: built.append(vocab_size) or ll_tokenizer(tok, vocab_size))
    made = Replica({"backend": "simulated"})
    assert built == [tok.vocab_size]  # as the replica starts: at the first request it would hold every slot
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, grammar=cfg_grammar(lark_chain(8000)))
        work = MeshWork(0, [PrefillChunk("chain", 0, [7] * 10, 0, [0], params, 10)])
        (result,) = asyncio.run(drain(made, work))
    finally:
        made.shutdown()
    assert result.finished.get(0) not in ("error", "grammar_error")
    assert tok.decode([result.tokens[0]]) == "x"  # the only text the grammar admits
    assert len(built) == 1


def test_a_replica_finds_the_model_on_its_own_node(monkeypatch, tmp_path):
    """The deploying node's path is not handed on: a replica on another node resolves `model` (here the demo's
    variable) where it runs."""
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path))
    monkeypatch.delenv("HF_MODEL", raising=False)
    seen = []
    monkeypatch.setattr(mesh_replica, "build_backend", lambda config, model_dir: seen.append(model_dir) or
                        SimulatedBackend(num_blocks=64, time_scale=1.0, vocab_size=1000))
    monkeypatch.setattr(mesh_replica, "grammar_tokenizer", lambda model_dir, vocab_size: seen.append(model_dir))
    Replica({"backend": "simulated", "model": ""}).shutdown()
    assert seen == [str(tmp_path), str(tmp_path)]


def test_a_device_that_fails_to_open_is_named_in_the_replicas_own_log(monkeypatch, caplog):
    """Serve hands a constructor's error to its controller only (its log, `serve status`): under Ray, a mesh
    replica whose backend raised at start logged "Started initializing replica." and then its shutdown, no
    reason, in every one of its restarts."""
    def broken(config, model_dir):
        raise RuntimeError("no device at /dev/tenstorrent/0")

    monkeypatch.setattr(mesh_replica, "build_backend", broken)
    caplog.set_level(logging.ERROR, logger="ray.serve")
    with pytest.raises(RuntimeError, match="no device"):
        Replica({"backend": "simulated"})
    [record] = [r for r in caplog.records if r.name == "ray.serve" and r.levelno >= logging.ERROR]
    assert "did not start" in record.getMessage() and "no device" in str(record.exc_info[1])


def test_a_chunk_after_one_the_router_gave_up_on_is_stale_work_and_the_device_stays_up(replica, monkeypatch):
    """A closed link (the router gave up on the mesh) drops its works still queued on the worker one task at a time
    (_serve_link cancels them), so the worker may start a later one between two drops. Its prefill chunk then follows
    one this mesh never ran (PrefillChunk.offset): that is StaleWork, which the router's reset mends. It was the
    device's error, which kept the mesh down until Serve restarted the replica."""
    gate = threading.Event()
    prefill_ = replica.runner.backend.prefill

    def gated(*args, **kwargs):
        gate.wait(5)
        return prefill_(*args, **kwargs)

    monkeypatch.setattr(replica.runner.backend, "prefill", gated)
    params = SamplingParams(temperature=0.0, max_tokens=50)
    first = MeshWork(1, [PrefillChunk("long", 1, [7] * 128, 0, [5, 6])])
    rest = MeshWork(2, [PrefillChunk("long", 1, [7] * 172, 128, [5, 6, 7, 8, 9], params, 300, offset=128)])

    async def main():
        await replica.reset()
        running = asyncio.create_task(drain(replica, prefill(0)))
        dropped = asyncio.create_task(drain(replica, first))
        later = asyncio.create_task(drain(replica, rest))
        await asyncio.sleep(0.05)  # work 0 holds the worker thread; works 1 and 2 are queued behind it
        dropped.cancel()
        await asyncio.wait([dropped])
        gate.set()
        assert len(await running) == 1
        with pytest.raises(mesh_replica.StaleWork, match="slot 1 at 128"):
            await later
        assert replica.error is None
        incarnation, caps = await replica.reset()
        assert caps is not None  # up again: the router moves its requests back onto it
        assert len(await drain(replica, prefill(0, slot=1))) == 1
    asyncio.run(main())


@pytest.mark.parametrize("offset", [64, 192])
def test_a_chunk_that_does_not_start_where_the_slots_last_ended_is_stale_work(offset):
    """A slot's chunks must follow each other exactly (PrefillChunk.offset): one that starts before the last one's end
    would join its tokens onto the history twice, one after it would leave a gap; either is StaleWork."""
    history = PrefillHistory()
    assert history.take(PrefillChunk("a", 1, [7] * 128, 0, [5, 6])) == [7] * 128
    with pytest.raises(StaleWork, match=f"slot 1 at {offset}, after 128 ids"):
        history.take(PrefillChunk("a", 1, [8] * 64, 0, [5, 6, 7], offset=offset))


def test_a_work_waiting_for_its_turn_at_a_reset_is_refused_at_once_and_the_resets_works_run(replica):
    """A work whose predecessor had not come when the router reset the mesh: it is refused at the reset, not at its
    deadline, and leaves the work ids to the reset's works (from 0)."""
    async def main():
        await replica.reset()
        waiting = asyncio.create_task(drain(replica, prefill(5)))  # works 0-4 never come
        await asyncio.sleep(0.05)
        await replica.reset()
        with pytest.raises(mesh_replica.StaleWork, match="planned before a reset"):
            await waiting
        assert len(await drain(replica, prefill(0, slot=1))) == 1
    asyncio.run(main())


def test_a_router_whose_works_go_on_holds_its_lease_against_an_older_routers_reset(replica, monkeypatch):
    """LEASE_HOLD_S counts from the lease holder's last word, its works as much as its reset: a router busy with
    works for longer than that still holds the mesh against the old router's probe."""
    now = [0.0]  # the replica's clock, moved by hand: a loaded box's pauses do not stretch a gap past the hold
    monkeypatch.setattr(mesh_replica, "time", SimpleNamespace(monotonic=lambda: now[0]))
    async def main():
        await replica.reset("new", started=2.0)
        for work_id in range(4):  # its works go on past LEASE_HOLD_S, each within it of the last word
            now[0] += 0.4 * mesh_replica.LEASE_HOLD_S
            results = [r async for r in replica.execute(prefill(work_id, slot=work_id), replica.incarnation, "new")]
            assert len(results) == 1
        now[0] += 0.4 * mesh_replica.LEASE_HOLD_S
        incarnation, refused = await replica.reset("old", started=1.0)
        assert isinstance(refused, LeaseTaken) and "newer router" in str(refused)
    asyncio.run(main())


def test_a_router_silent_for_lease_hold_s_no_longer_holds_its_lease(replica, monkeypatch):
    """The other side of the hold: once the lease's router has not been heard from for LEASE_HOLD_S (gone, or its
    clock ahead of the other's), a router that started before it takes the mesh; refused for ever, a router whose
    clock runs behind could not use the mesh once the other was gone. The silent one's works are then refused."""
    now = [0.0]
    monkeypatch.setattr(mesh_replica, "time", SimpleNamespace(monotonic=lambda: now[0]))

    async def main():
        await replica.reset("new", started=2.0)
        now[0] += 0.5 * mesh_replica.LEASE_HOLD_S
        _, refused = await replica.reset("old", started=1.0)
        assert isinstance(refused, LeaseTaken)  # answered, not raised: Serve logged each probe's traceback at ERROR
        now[0] += mesh_replica.LEASE_HOLD_S
        incarnation, caps = await replica.reset("old", started=1.0)
        assert isinstance(caps, mesh_replica.Capabilities)
        assert len([r async for r in replica.execute(prefill(0), incarnation, "old")]) == 1
        with pytest.raises(LeaseTaken, match="before a reset"):  # another router took it: routine, not a failure
            [r async for r in replica.execute(prefill(1, slot=1), incarnation, "new")]
    asyncio.run(main())


def test_a_routers_own_reset_refuses_its_old_works_as_stale_another_routers_as_lease_taken(replica, monkeypatch):
    """A work queued behind a running one when a reset comes is refused either way; it is LeaseTaken (its router is
    being replaced: the router logs a WARNING and counts no failover) only when another router's reset took the mesh,
    and StaleWork when its own router reset it (its own failover's probe)."""
    slow_prefills(replica, monkeypatch)

    async def refused_at(lease: str, new_lease: str, started: float) -> BaseException:
        works = [asyncio.ensure_future(collect(replica.execute(prefill(i, slot=i), replica.incarnation, lease)))
                 for i in range(2)]
        await asyncio.sleep(0.05)  # work 0 runs on the worker thread, work 1 is queued behind it
        await replica.reset(new_lease, started=started)
        first, second = await asyncio.gather(*works, return_exceptions=True)
        assert len(first) == 1, first  # it ran to its end before the reset went through
        return second

    async def main():
        await replica.reset("a1", started=1.0)
        assert type(await refused_at("a1", "a2", 1.0)) is StaleWork  # its own router's reset
        taken = await refused_at("a2", "b1", 2.0)  # a newer router's
        assert isinstance(taken, LeaseTaken) and "before a reset" in str(taken), taken
        with pytest.raises(LeaseTaken):  # and any work the old router sends after
            await collect(replica.execute(prefill(0), replica.incarnation, "a2"))
        with pytest.raises(StaleWork) as unknown:  # a lease no reset took from anyone: stale, as before
            await collect(replica.execute(prefill(0), replica.incarnation, "zz"))
        assert type(unknown.value) is StaleWork
    asyncio.run(main())


async def collect(results):
    return [r async for r in results]


def test_a_chunks_deadline_counts_the_positions_it_computes_not_the_ids_it_carries(replica):
    """A chunk after a slot's first carries only its own ids (PrefillChunk.offset): its deadline is that of the same
    chunk carrying the whole sequence, not one for len(token_ids) - start (here negative) tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=50)
    blocks = list(range(40))
    whole = PrefillChunk("long", 1, [7] * 2560, 2048, blocks, params, 2560)
    tail = PrefillChunk("long", 1, [7] * 512, 2048, blocks, params, 2560, offset=2048)
    assert replica._deadline(MeshWork(0, [tail])) == replica._deadline(MeshWork(0, [whole])) > replica.min_deadline_s


def test_shutdown_closes_the_runner_on_the_worker_thread(replica, monkeypatch):
    """The runner, not the backend alone: MeshRunner.close also ends its grammar-mask thread, which outlived a
    replica's shutdown when the backend alone was closed."""
    closed = []
    monkeypatch.setattr(replica.runner, "close", lambda: closed.append(threading.current_thread().name))
    replica.shutdown()
    assert len(closed) == 1 and closed[0].startswith("mesh")


def slow_prefills(replica, monkeypatch, seconds: float = 0.3) -> list[str]:
    """Each prefill takes `seconds` on the worker thread; returns a list growing by one entry per prefill run."""
    ran: list[str] = []
    backend = replica.runner.backend
    step = backend.prefill

    def slow(*args, **kwargs):
        ran.append(threading.current_thread().name)
        time.sleep(seconds)
        return step(*args, **kwargs)
    monkeypatch.setattr(backend, "prefill", slow)
    return ran


def test_shutdown_refuses_the_works_queued_behind_the_running_one_without_the_device(replica, monkeypatch):
    """A work already handed to the worker thread, behind the running one, when the replica shuts down: it ends as
    ReplicaStopping without touching the device, which closes right after the running step (a Galaxy's work is
    seconds)."""
    ran = slow_prefills(replica, monkeypatch)

    async def main():
        await replica.reset()
        running = asyncio.create_task(drain(replica, prefill(0, slot=0)))
        queued = asyncio.create_task(drain(replica, prefill(1, slot=1)))
        await until(lambda: ran)  # work 0 on the device, work 1 queued on the worker behind it
        replica.shutdown()
        assert len(await running) == 1
        with pytest.raises(ReplicaStopping):
            await queued
    asyncio.run(main())
    assert len(ran) == 1


class ClosingLink:
    """A router's link that brings `works` and then closes (the router gave up on this mesh) once `closes()`."""

    def __init__(self, works: list, closes) -> None:
        self.works = works
        self.closes = closes
        self.sent: list = []

    async def recv(self):
        if self.works:
            return self.works.pop(0)
        await until(self.closes)
        raise ConnectionError("link closed by the peer")

    def send(self, *frames) -> None:
        self.sent.extend(frames)


def test_a_closed_routers_works_still_queued_do_not_run_on_the_device(replica, monkeypatch):
    """When the router's link closes, its works not yet started are dropped: a gone router waits for none of them,
    and each would hold the device (a Galaxy's prefill is seconds) before the next router's reset refused the rest."""
    ran = slow_prefills(replica, monkeypatch)

    async def main():
        await replica.reset()
        link = ClosingLink([(prefill(0, slot=0), replica.incarnation, None),
                            (prefill(1, slot=1), replica.incarnation, None)], closes=lambda: ran)  # work 0 running
        with pytest.raises(ConnectionError):
            await replica._serve_link(link)
        await asyncio.wrap_future(replica.worker.submit(lambda: None))  # after work 0, and work 1 had it stayed
    asyncio.run(main())
    assert len(ran) == 1
