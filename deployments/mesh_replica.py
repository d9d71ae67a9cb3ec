"""One Serve replica = one mesh: it opens the device, loads the model, holds the KV cache and executes
the router's work in order, streaming one StepResult per step for all slots.

Works run on one worker thread, strictly in work-id order: the router pipelines (sends work n+1 before
n ends) and may reuse blocks freed in n for n+1, which is only safe if n has finished writing them.

Each replica start draws an incarnation id. The router's `reset()` (at its own start, and whenever it
brings this mesh back after a failure) drops every slot and restarts work ids at 0, after the work on the
worker thread ends; works planned for an older incarnation or before the reset are refused at once, and
none waits for its turn longer than a deadline, so a replica never hangs on a work id that will not come.
A reset names a lease its router's works then carry: two routers live at once (Serve replaced the router, the
old one still runs) would otherwise interleave their works, each from work id 0, on the same slots and blocks.
And a router that started before the one holding the lease may not reset it while that one is heard from: the old
one's probe, its works refused, would take the mesh back, and each router would refuse the other's in turn.

Works and their results travel on a direct link (deployments/link.py) whose address the router asks for
(`link_address`): one message per step through a Serve stream cost the router more than the step's tokens
(docs/DESIGN.md, "Data path at scale"). Serve carries the control calls (reset, health).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from functools import partial

from ray import serve

from deployments.config import AppConfig
from deployments.gc_heap import freeze_gc_heap
from deployments.link import Link, LinkAddress, LinkServer, node_ip
from model.backend import Backend, Capabilities
from model.checkpoint import resolve_model_dir
from model.grammar import deep_stack_executor
from model.runner import MeshRunner
from scheduler.work import NO_TOKEN, LeaseTaken, MeshWork, ReplicaStopping, StaleWork, StepResult, portable_error

log = logging.getLogger("ray.serve")


def grammar_tokenizer(model_dir: str, vocab_size: int):
    """llguidance's view of the served model's tokenizer over its logits, for constrained requests."""
    from model.grammar import ll_tokenizer
    from model.tokenizer import load_tokenizer
    return ll_tokenizer(load_tokenizer(model_dir), vocab_size)


class DeviceFailed(RuntimeError):
    """The device failed in an earlier work: the replica runs nothing more until Serve restarts it."""


# A router silent this long (an idle one's heartbeat comes every heartbeat_s, 5 s) no longer holds its lease against
# a router that started before it: it is gone, or its clock ran behind the other's.
LEASE_HOLD_S = 30.0
CLOSE_TIMEOUT_S = 30.0  # shutdown waits this long for the worker thread to close the device (a step ends first)
# The most the worker thread waits for the loop to send a prefill's first token before it starts the work's next step
# (a loop held up elsewhere does not hold the device longer).
HANDOFF_WAIT_S = 0.002


def build_backend(config: AppConfig, model_dir) -> Backend:
    """Import only the backend in use: ttnn exists only on Galaxy hosts, torch models are heavy."""
    if config.backend == "torch":
        import torch

        from model.torch_llama import TorchBackend
        return TorchBackend(model_dir, num_slots=config.num_slots, block_size=config.block_size,
                            num_blocks=config.num_blocks, max_seq_len=config.max_seq_len,
                            dtype=getattr(torch, config.dtype))
    if config.backend == "simulated":
        from model.simulated import SimulatedBackend
        from model.tokenizer import load_tokenizer
        tok = load_tokenizer(model_dir)
        return SimulatedBackend(num_slots=config.num_slots, block_size=config.block_size,
                                num_blocks=config.num_blocks, max_seq_len=config.max_seq_len,
                                **({"kv_groups": config.kv_groups} if config.kv_groups else {}),
                                vocab_size=tok.vocab_size, eos_token_ids=tuple(tok.stop_ids),
                                time_scale=config.time_scale)
    from model.tt_galaxy import TTGalaxyBackend
    return TTGalaxyBackend(model_dir, mesh_shape=config.mesh_shape, num_slots=config.num_slots,
                           block_size=config.block_size, num_blocks=config.num_blocks,
                           max_seq_len=config.max_seq_len, num_layers=config.num_layers,
                           tt_config=config.override_tt_config)


# Serve force-kills a stopping replica after graceful_shutdown_timeout_s (20 s by default): time to close.
@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=CLOSE_TIMEOUT_S + 10)
class MeshReplica:
    def __init__(self, config: dict):
        # Serve marks the replica ready only once this returns: a loading mesh takes no traffic.
        app = AppConfig(**config)
        try:
            model_dir = str(resolve_model_dir(app.model))
            backend = build_backend(app, model_dir)
        except Exception:  # Serve tells only its controller why a constructor failed: the replica's log said nothing
            log.exception("the mesh did not start: its model or device failed to load")
            raise
        self.runner = MeshRunner(backend, grammar_tokenizer=partial(grammar_tokenizer, model_dir, backend.caps.vocab_size))
        try:  # now: at the first constrained request it would hold every slot (~1 s for a 128k vocabulary)
            self.runner.grammars()
        except Exception:
            log.warning("no grammar tokenizer on this mesh: its constrained requests will fail", exc_info=True)
        self.caps = self.runner.caps
        self.incarnation = uuid.uuid4().hex
        self.min_deadline_s = app.min_step_deadline_s
        self.deadline_factor = app.step_deadline_factor
        self.worker = deep_stack_executor(1, "mesh")  # it compiles each slot's grammar
        self.turn = asyncio.Condition()
        self.next_work_id = 0
        self.generation = 0  # +1 at each reset: works of an older generation are refused
        self.lease: str | None = None  # the last reset's: only its router's works run
        self.lease_started = 0.0  # when the lease's router started (its wall clock)
        self.lease_heard = 0.0  # time.monotonic() of its last reset or work
        self.taken: deque[str] = deque(maxlen=16)  # leases another router's reset took: their works get LeaseTaken
        self.running: tuple[float, float] | None = None  # (start of the current step, its deadline in s)
        self.error: BaseException | None = None
        self.closed = False
        self.link_server = LinkServer(self._serve_link)
        self.links: set[Link] = set()  # the routers' open links: shutdown tells each it stops on purpose
        freeze_gc_heap()  # the model, the backend and the modules stay: full collections need not walk them

    async def reset(self, lease: str | None = None, started: float = 0.0
                    ) -> tuple[str, Capabilities | LeaseTaken | None]:
        """Drop every slot and restart work ids at 0, once the work on the worker thread has ended.
        Works still waiting for their turn, or queued and not started, are refused, as is any work that does not
        carry `lease` (another router's, whose work ids and slots are its own: LeaseTaken once another router's reset
        took the mesh). Returns (incarnation id, capabilities); capabilities None after a device error: the mesh stays
        down until Serve restarts it; LeaseTaken, touching nothing, for a router `started` before the lease's while
        that one is heard from (LEASE_HOLD_S): a replaced router, for the little it lives on. Answered, not raised:
        Serve logs a raised error's traceback at ERROR, once per call (the old router probes every second)."""
        if self.error is not None:
            return self.incarnation, None
        if started < self.lease_started and time.monotonic() - self.lease_heard < LEASE_HOLD_S:
            return self.incarnation, LeaseTaken("a newer router holds this mesh: this one is being replaced")
        if self.lease is not None and started != self.lease_started:  # another router's reset takes the mesh
            self.taken.append(self.lease)
        self.lease_started, self.lease_heard = started, time.monotonic()
        async with self.turn:
            self.generation += 1
            self.next_work_id = 0
            self.lease = lease
            self.turn.notify_all()
            done = self.worker.submit(self.runner.reset)  # queued behind any running work
        await asyncio.wrap_future(done)
        # again: the work it waited for may have failed on the device meanwhile
        return self.incarnation, (self.caps if self.error is None else None)

    async def execute(self, work: MeshWork, incarnation: str, lease: str | None = None
                      ) -> AsyncIterator[StepResult]:
        """Run one work after every lower work id (queued in id order on the one worker thread); stream one
        StepResult per message, in order.
        Raises StaleWork for a work planned for another incarnation, generation or lease, or whose turn does not
        come within the deadline (its predecessor never arrived); the device's error when the work fails on it,
        and DeviceFailed once an earlier work has."""
        self._check_device()
        if self.closed:  # a work sent as the replica stops: its worker thread takes no more
            raise self._refused(work, lease)
        if incarnation != self.incarnation:
            raise StaleWork(f"work {work.work_id} was planned for incarnation {incarnation}, "
                            f"this replica is {self.incarnation}")
        if lease != self.lease:
            raise self._refused(work, lease, "was planned before a reset (another router's, or its own)")
        self.lease_heard = time.monotonic()
        deadline = self._deadline(work)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        async with self.turn:
            generation = self.generation
            if work.work_id != self.next_work_id:  # only then: before Python 3.12 wait_for costs a task and a timer
                try:
                    await asyncio.wait_for(self.turn.wait_for(
                        lambda: self.generation != generation or work.work_id == self.next_work_id), deadline)
                except asyncio.TimeoutError:
                    raise StaleWork(f"work {work.work_id} waited {deadline:.0f} s "
                                    f"for work {self.next_work_id}") from None
            if self.generation != generation:
                raise self._refused(work, lease)
            # Queued on the worker thread behind the work before it, not after it ends: the thread goes from one
            # work to the next without waiting for this loop (on the 2-core box that wait left the device idle
            # 0.5-0.9 ms on average between two decode works of ~117 ms: 0.5-0.7 points of steady efficiency).
            done = self.worker.submit(self._run, work, deadline, loop, results, generation, lease)
            self.next_work_id = work.work_id + 1
            self.turn.notify_all()
        answered = False
        try:
            for _ in range(work.num_messages):
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
            answered = True  # a work of no message (a heartbeat) too: its release must run before its end is sent
        finally:
            if answered or not done.cancel():  # one that has not started is dropped (the router gave up on it)
                await asyncio.wrap_future(done)

    async def link_address(self) -> LinkAddress:
        """Where the router sends works (started on first call, in the replica's event loop)."""
        return await self.link_server.start(node_ip())

    async def _serve_link(self, link: Link) -> None:
        """Frames in: (MeshWork, incarnation, lease). Frames out, per work in order: (work_id, StepResult) per
        message, then (work_id, None) at its end, or (work_id, exception) if it fails. When the router
        closes the link (it gave up on this mesh), works still waiting for their turn are dropped. One more frame out,
        at shutdown: (None, ReplicaStopping), so that a router with no work out tells a planned stop from a crash."""
        tasks: set[asyncio.Task] = set()
        self.links.add(link)
        try:
            while True:
                work, incarnation, *lease = await link.recv()  # a router of the release before sends no lease
                task = asyncio.create_task(self._send_results(link, work, incarnation, *lease))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            self.links.discard(link)
            for task in tasks:
                task.cancel()

    async def _send_results(self, link: Link, work: MeshWork, incarnation: str, lease: str | None = None) -> None:
        try:
            ended = False
            async with contextlib.aclosing(self.execute(work, incarnation, lease)) as results:  # its cleanup runs now
                async for result in results:
                    if result.last:  # the end goes with it: one wake-up of the router, not two (~1 ms apart)
                        link.send((work.work_id, result), (work.work_id, None))
                        ended = True
                    else:
                        link.send((work.work_id, result))
            if not ended:
                link.send((work.work_id, None))
        except ConnectionError:
            return
        except Exception as exc:
            with contextlib.suppress(ConnectionError):
                link.send((work.work_id, portable_error(exc)))

    def _deadline(self, work: MeshWork) -> float:
        tokens = sum(c.end - c.start for c in work.prefills)
        expected = self.caps.expected_seconds(tokens, work.decode.num_steps if work.decode else 0)
        return self.min_deadline_s + self.deadline_factor * expected

    def _refused(self, work: MeshWork, lease: str | None, why: str = "was planned before a reset") -> StaleWork:
        """Why a work of `lease` is refused unrun, after a reset or at a shutdown: ReplicaStopping while the replica
        stops, LeaseTaken when another router's reset took the mesh from it (its router is being replaced), both
        routine and reported as such; else StaleWork."""
        if self.closed:
            return ReplicaStopping(f"work {work.work_id} was refused: the replica is shutting down")
        return (LeaseTaken if lease is not None and lease in self.taken else StaleWork)(f"work {work.work_id} {why}")

    def _run(self, work: MeshWork, deadline: float, loop: asyncio.AbstractEventLoop, results: asyncio.Queue,
             generation: int, lease: str | None = None) -> None:
        if generation != self.generation:  # queued before a reset or a shutdown: the router no longer waits for it
            loop.call_soon_threadsafe(results.put_nowait, self._refused(work, lease))
            return
        if self.error is not None:  # queued before the device failed: it does not run on a failed device
            loop.call_soon_threadsafe(results.put_nowait, DeviceFailed(f"the device failed: {self.error!r}"))
            return
        try:
            self.running = (time.monotonic(), deadline)
            sent = 0
            for result in self.runner.execute(work):
                loop.call_soon_threadsafe(results.put_nowait, result)
                sent += 1
                if sent <= len(work.prefills) and not result.last and any(t != NO_TOKEN for t in result.tokens):
                    self._hand_over(loop)
                self.running = (time.monotonic(), deadline)
                if self.closed:  # shutting down: the device closes after this step, not after the whole work
                    break
            if sent < work.num_messages:  # the rest is refused: none of its requests failed this mesh
                loop.call_soon_threadsafe(results.put_nowait, ReplicaStopping(
                    f"work {work.work_id} stopped after {sent} of {work.num_messages} messages: the replica is "
                    f"shutting down"))
        except StaleWork as e:  # a chunk after one this mesh never ran: the router resets it, the device is fine
            log.warning("mesh work %d refused: %s", work.work_id, e)
            loop.call_soon_threadsafe(results.put_nowait, e)
        except BaseException as e:  # a device error: the router moves this mesh's requests, Serve restarts us
            log.exception("mesh work %d failed", work.work_id)
            self.error = e
            loop.call_soon_threadsafe(results.put_nowait, e)
        finally:
            self.running = None

    @staticmethod
    def _hand_over(loop: asyncio.AbstractEventLoop) -> None:
        """Let the loop send the first token just handed to it before this thread starts the next step. Starting a
        decode step is host work that holds the GIL (two steps' with overlapped decode: ~0.5 ms on the 2-core box),
        and the loop, woken for the token, waited for all of it: an idle request's first token left the mesh 0.6-0.7
        ms after its prefill, 0.2 ms with this wait. The set is queued behind the pass that sends the token."""
        handed = threading.Event()
        loop.call_soon_threadsafe(loop.call_soon, handed.set)
        handed.wait(HANDOFF_WAIT_S)

    def _check_device(self) -> None:
        if self.error is not None:
            raise DeviceFailed(f"the device failed ({self.error!r}): waiting for Serve to restart this replica")

    def check_health(self) -> None:
        """Unhealthy after a device error or a step past its deadline (the whole work's, min_step_deadline_s +
        step_deadline_factor x its expected time, measured from the step's start): Serve then restarts the
        replica."""
        if self.error is not None:
            raise RuntimeError(f"backend failed: {self.error!r}")
        running = self.running
        if running is not None and time.monotonic() - running[0] > running[1]:
            raise RuntimeError(f"backend hung: one step has run for {time.monotonic() - running[0]:.0f} s")

    def shutdown(self) -> None:
        """Close the device once (idempotent), on the worker thread after the work in hand: a backend is not
        thread-safe (ttnn), so the device is never closed beside a running step. Works still queued end at
        once. A worker stuck past CLOSE_TIMEOUT_S (a hung device) is left to the process's exit. Each router's link
        hears first that the stop is planned (Serve's graceful shutdown runs this on the replica's event loop, the
        links' own): else an idle mesh's router sees only its link close, as at a crash."""
        if self.closed:
            return
        self.closed = True
        stopping = ReplicaStopping("the replica is shutting down: Serve is replacing or removing it")
        for link in list(self.links):
            with contextlib.suppress(Exception):  # a link already gone, or a loop closed (tests): the device closes
                link.send((None, stopping))
        self.generation += 1  # queued works return without touching the device
        closed = self.worker.submit(self.runner.close)
        self.worker.shutdown(wait=False)
        try:
            closed.result(timeout=CLOSE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
            log.error("the mesh's worker thread is stuck: the device is not closed")
        except Exception:
            log.exception("closing the device failed")

    def __del__(self):  # Serve's replica-shutdown hook
        if hasattr(self, "closed"):
            self.shutdown()
