"""The router's side of one mesh replica: control calls through Serve, works and results on a direct link.

One link per mesh incarnation, opened at `reset` (the router's probe, which every (re)join goes through) and
closed when the router gives up on a work (the mesh is being failed over) or the replica goes away, which
every open work then sees as a ConnectionError: the router's failure path, at once rather than at a deadline.
A replica that stops on purpose says so first (a ReplicaStopping frame): the link closes with that error instead.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from deployments.link import Link, connect
from model.backend import Capabilities
from scheduler.work import LeaseTaken, MeshWork, ReplicaStopping, StaleWork, StepResult


class DeviceDown(RuntimeError):
    """The replica's device failed (its reset said so): the mesh stays down until Serve replaces the replica."""


class LinkMeshClient:
    """MeshClient (deployments/router.py) over a Serve handle to one single-replica `mesh-i` deployment."""

    def __init__(self, handle):
        self._handle = handle
        self._link: Link | None = None
        self._reader: asyncio.Task | None = None
        self._works: dict[int, asyncio.Queue] = {}
        self._closed = asyncio.Event()  # set when the current link closes (a fresh one per link)
        self._stopping: ReplicaStopping | None = None  # the current link's replica said it stops on purpose
        self._lease: str | None = None  # drawn at each reset; the mesh runs only the works that carry its last
        self._started = time.time()  # the router's start: a mesh refuses the reset of one older than its lease's

    async def reset(self) -> tuple[str, Capabilities]:
        self._close(ConnectionError("the mesh was reset"))  # first: no frame of the old link runs after the reset
        # a fresh lease: another router's later reset (two alive at a router replacement) makes ours refused, never
        # interleaved with its works on the same slots and blocks
        self._lease = uuid.uuid4().hex
        incarnation, caps = await self._handle.reset.remote(self._lease, self._started)
        if caps is None:
            raise DeviceDown(f"the device of mesh replica {incarnation} failed: it waits for Serve to restart it")
        if isinstance(caps, LeaseTaken):  # another router holds the mesh: this one is being replaced
            raise caps
        address = await self._handle.link_address.remote()
        self._link, self._closed, self._stopping = await connect(address), asyncio.Event(), None
        self._reader = asyncio.create_task(self._read(self._link))
        return incarnation, caps

    async def wait_closed(self) -> ReplicaStopping | None:
        await self._closed.wait()
        return self._stopping

    def execute(self, work: MeshWork, incarnation: str) -> AsyncIterator[StepResult]:
        queue: asyncio.Queue = asyncio.Queue()
        self._works[work.work_id] = queue
        try:
            if self._link is None:
                raise ConnectionError("no link to the mesh")
            # sent now: queued on the mesh before the results are awaited
            self._link.send((work, incarnation, self._lease))
        except ConnectionError as exc:  # the replica went (its link closed) while the router had no work out
            queue.put_nowait(StaleWork(f"work {work.work_id} was not sent: {exc}"))
        return self._results(work.work_id, queue)

    async def _results(self, work_id: int, queue: asyncio.Queue) -> AsyncIterator[StepResult]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self._works.get(work_id) is queue:  # still on the current link
                del self._works[work_id]
                if not finished:  # the router gave up on this work: the mesh is failing over
                    self._close(ConnectionError("the router dropped the link"))

    async def _read(self, link: Link) -> None:
        error: BaseException = ConnectionError("the mesh closed its link")
        try:
            await link.dispatch(self._dispatch)
        except Exception as exc:
            error = exc if isinstance(exc, ConnectionError) else ConnectionError(f"mesh link broke: {exc!r}")
        finally:
            if link is self._link:
                self._close(error)

    def _dispatch(self, frame: tuple[int, StepResult | BaseException | None]) -> None:
        """In the link's read callback: a result to the queue of its work, or the replica's planned stop (work id None),
        which ends the link now: its works will not be answered, and its requests move at once."""
        work_id, item = frame
        if work_id is None:
            if isinstance(item, ReplicaStopping):
                self._stopping = item
                self._close(item)
            return
        queue = self._works.get(work_id)
        if queue is not None:
            queue.put_nowait(item)

    def _close(self, error: BaseException) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()
        self._closed.set()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        for queue in self._works.values():
            queue.put_nowait(error)
        self._works.clear()

    def close(self) -> None:
        self._close(ConnectionError("closed"))
