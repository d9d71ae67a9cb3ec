"""The router: the one place that owns scheduling state for every mesh.

One MeshScheduler per mesh replica. A request goes to the mesh holding its longest cached prefix (the
router owns every block table, so it knows exactly), then to the least loaded. Each mesh has a loop that
keeps up to `pipeline_depth` works in flight, so the next round is already queued on the mesh when the
current one ends, and consumes the mesh's per-step results as they stream in. Token events are coalesced
per request: the first token goes out at once, later ones at most every `stream_interval_ms`, and less
often when many streams run, so that all of them together send at most `max_stream_chunks_per_s` chunks
(every chunk costs CPU in the router, the ingress and the HTTP proxy, whatever tokens it carries).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ray import serve

from scheduler.blocks import BlockPool
from scheduler.sampling import SamplingParams
from scheduler.scheduler import MeshScheduler
from scheduler.work import MeshWork, StepResult, TokenEvent

log = logging.getLogger("ray.serve")

ExecuteFn = Callable[[MeshWork], AsyncIterator[StepResult]]


@dataclass
class RouterConfig:
    prefill_chunk: int = 4096
    max_prefill_tokens: int = 4096
    decode_steps: int = 8
    pipeline_depth: int = 2
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 4 * 131072
    stream_interval_ms: float = 10.0
    max_stream_chunks_per_s: float = 500.0  # all streams together; beyond it, each stream coalesces more
    max_seq_len: int | None = None  # None: the backend's


@dataclass
class Mesh:
    name: str
    execute: ExecuteFn
    scheduler: MeshScheduler
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    rounds: int = 0
    plan_cpu_s: float = 0.0  # router CPU spent planning and taking results in (for the scale-out report)
    failed: str | None = None


def merge(events: list[TokenEvent]) -> TokenEvent:
    first, last = events[0], events[-1]
    return TokenEvent(first.request_id, [t for e in events for t in e.token_ids],
                      [lp for e in events for lp in e.logprobs], last.finish_reason,
                      first.num_prompt_tokens or last.num_prompt_tokens,
                      first.num_cached_tokens or last.num_cached_tokens, last.error,
                      queue_time_s=first.queue_time_s)


class Router:
    def __init__(self, meshes: list[tuple[str, ExecuteFn, "Capabilities"]], config: RouterConfig):
        self.config = config
        self.meshes = [Mesh(name, execute, self._scheduler_for(caps)) for name, execute, caps in meshes]
        self.queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self.placement: dict[str, Mesh] = {}
        self.tasks = [asyncio.create_task(self._run(m)) for m in self.meshes]

    def _scheduler_for(self, caps) -> MeshScheduler:
        c = self.config
        max_seq_len = min(c.max_seq_len or caps.max_seq_len, caps.max_seq_len)
        return MeshScheduler(
            num_slots=caps.num_slots, pool=BlockPool(caps.num_blocks, caps.block_size),
            max_seq_len=max_seq_len, prefill_chunk=c.prefill_chunk, max_prefill_tokens=c.max_prefill_tokens,
            decode_steps=c.decode_steps, prefix_align=caps.prefix_align,
            max_waiting_requests=c.max_waiting_requests, max_waiting_tokens=c.max_waiting_tokens,
            eos_token_ids=caps.eos_token_ids, max_inflight=c.pipeline_depth)

    # ---- requests -------------------------------------------------------------------------------
    def place(self, prompt_ids: list[int], salt: str | None) -> Mesh:
        """Longest cached prefix first, then the most slots left once its queue is seated, then free blocks."""
        live = [m for m in self.meshes if m.failed is None]
        if not live:
            raise RuntimeError("no mesh is available")

        def key(m: Mesh):
            s = m.scheduler.stats()
            return (m.scheduler.cached_prefix_tokens(prompt_ids, salt),
                    s["free_slots"] - s["waiting"], s["blocks_free"] + s["blocks_cached"])
        return max(live, key=key)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       salt: str | None = None) -> AsyncIterator[TokenEvent]:
        mesh = self.place(prompt_ids, salt)
        mesh.scheduler.submit(request_id, prompt_ids, params, salt)  # raises PromptTooLong / QueueFull
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.queues[request_id] = queue
        self.placement[request_id] = mesh
        mesh.wake.set()
        finished = False
        min_interval = self.config.stream_interval_ms / 1000
        try:
            while not finished:
                events = [await queue.get()]
                interval = max(min_interval, len(self.queues) / self.config.max_stream_chunks_per_s)
                if events[0].token_ids and events[0].num_prompt_tokens == 0:
                    await asyncio.sleep(interval)  # not the first token: let a few more arrive
                while not queue.empty():
                    events.append(queue.get_nowait())
                event = merge(events)
                finished = event.finish_reason is not None
                yield event
        finally:
            self.queues.pop(request_id, None)
            self.placement.pop(request_id, None)
            if not finished:  # the client went away: free its slot and blocks now
                mesh.scheduler.cancel(request_id, "abort")
                mesh.wake.set()

    def cancel(self, request_id: str, reason: str = "abort") -> None:
        mesh = self.placement.get(request_id)
        if mesh is None:
            return
        event = mesh.scheduler.cancel(request_id, reason)
        if event is not None:
            self._deliver([event])
        mesh.wake.set()

    def stats(self) -> dict:
        return {"ready": all(m.failed is None for m in self.meshes),
                "meshes": [{"name": m.name, "failed": m.failed, "rounds": m.rounds,
                            "plan_cpu_s": m.plan_cpu_s, **m.scheduler.stats()} for m in self.meshes]}

    # ---- mesh loops -----------------------------------------------------------------------------
    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            queue = self.queues.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)

    async def _run(self, mesh: Mesh) -> None:
        inflight: deque[asyncio.Task] = deque()
        while True:
            while len(inflight) < self.config.pipeline_depth:
                t0 = time.thread_time()
                work = mesh.scheduler.schedule()
                mesh.plan_cpu_s += time.thread_time() - t0
                if work is None:
                    break
                mesh.rounds += work.decode is not None
                stream = mesh.execute(work)  # sent now, so the mesh has it queued when the previous ends
                inflight.append(asyncio.create_task(self._consume(mesh, stream, inflight[-1] if inflight else None)))
            mesh.wake.clear()
            if not inflight:
                await mesh.wake.wait()
                continue
            waker = asyncio.create_task(mesh.wake.wait())
            await asyncio.wait([inflight[0], waker], return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
            while inflight and inflight[0].done():
                error = inflight.popleft().exception()
                if error is not None:
                    self._fail(mesh, error)
                    return

    async def _consume(self, mesh: Mesh, stream: AsyncIterator[StepResult], previous: asyncio.Task | None) -> None:
        if previous is not None:  # results are taken in work order, whichever stream delivers first
            await asyncio.wait([previous])
        async for step in stream:
            t0 = time.thread_time()
            events = mesh.scheduler.process(step)
            mesh.plan_cpu_s += time.thread_time() - t0
            self._deliver(events)
            if step.finished:
                mesh.wake.set()  # freed slots: more work may fit now

    def _fail(self, mesh: Mesh, error: BaseException) -> None:
        log.error("mesh %s failed: %r", mesh.name, error)
        mesh.failed = repr(error)
        for rid, placed in list(self.placement.items()):
            if placed is mesh:
                event = mesh.scheduler.cancel(rid, "error") or TokenEvent(rid, [], finish_reason="error")
                event.error = f"mesh {mesh.name} failed"
                self._deliver([event])


@serve.deployment(max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0.2})
class RouterDeployment:
    """Serve wrapper: one replica (it owns all scheduling state); meshes are single-replica deployments
    `mesh-0..N-1`, so a handle to one of them reaches exactly that mesh and its KV cache."""

    def __init__(self, mesh_handles: list, config: dict):
        self._handles = mesh_handles
        self._config = RouterConfig(**config)
        self._router: Router | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> Router:
        async with self._lock:
            if self._router is None:
                caps = await asyncio.gather(*[h.capabilities.remote() for h in self._handles])
                meshes = [(f"mesh-{i}", self._executor(h), c) for i, (h, c) in enumerate(zip(self._handles, caps))]
                self._router = Router(meshes, self._config)
        return self._router

    @staticmethod
    def _executor(handle) -> ExecuteFn:
        streaming = handle.options(stream=True)

        def execute(work: MeshWork) -> AsyncIterator[StepResult]:
            return streaming.execute.remote(work)
        return execute

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       salt: str | None = None) -> AsyncIterator[TokenEvent]:
        router = await self._ready()
        async with contextlib.aclosing(router.generate(request_id, prompt_ids, params, salt)) as events:
            async for event in events:  # closing this stream closes the request's: its slot is freed at once
                yield event

    async def cancel(self, request_id: str, reason: str = "abort") -> None:
        (await self._ready()).cancel(request_id, reason)

    async def stats(self) -> dict:
        return (await self._ready()).stats()
