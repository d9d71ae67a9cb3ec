"""The ingress's side of the router: one long-lived event stream per ingress replica, unary submit/cancel.

The router's cost must be per step and per flush, not per token or per request (DESIGN.md "Data path at
scale"), so an ingress replica holds a single stream from the router carrying the events of all its
requests, and fans them out here to each request's queue. When that stream breaks (the router replica
died), every open request fails with RouterLost: OpenAIServer.choice resubmits it as a continuation to the
router Serve restarts, and this client opens a new stream.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator

from scheduler.sampling import SamplingParams
from scheduler.work import RequestFailed, TokenEvent

log = logging.getLogger("ray.serve")

RECONNECT_S = 0.5  # between two attempts to reopen the stream


class RouterLost(ConnectionError):
    """The router's event stream broke: the request's fate there is unknown."""


class RouterStream:
    """RouterClient over a Serve handle to the router deployment."""

    def __init__(self, handle):
        self._handle = handle
        self._streaming = handle.options(stream=True)
        self._name = f"ingress-{uuid.uuid4().hex}"
        self.consumer = self._name  # a new id for each stream opened: a broken one's cleanup cannot touch it
        self._queues: dict[str, asyncio.Queue] = {}
        self._pump: asyncio.Task | None = None
        self._attached = asyncio.Event()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       salt: str | None, output_ids: list[int] = ()) -> AsyncIterator[TokenEvent]:
        """Submit the request, then yield its events until one carries a finish_reason. Raises the router's
        refusal, a RequestFailed's error, or RouterLost."""
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run())
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue  # before submitting: its first events may come before the answer
        try:
            await self._attached.wait()  # the router buffers for an unknown stream, but keep it tidy
            await self._handle.submit.remote(request_id, prompt_ids, params, salt, list(output_ids), self.consumer)
            while True:
                item = await queue.get()
                if isinstance(item, RequestFailed):
                    raise item.error
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._queues.pop(request_id, None)

    async def cancel(self, request_id: str, reason: str = "abort") -> None:
        await self._handle.cancel.remote(request_id, reason)

    async def stats(self) -> dict:
        return await self._handle.stats.remote()

    async def _run(self) -> None:
        """Hold the stream open; fan its batches out; on a break, fail the open requests and reconnect."""
        for attempt in itertools.count():
            try:
                self.consumer = f"{self._name}-{attempt}"
                stream = self._streaming.events.remote(self.consumer)
                self._attached.set()
                async for batch in stream:
                    for item in batch:
                        queue = self._queues.get(item.request_id)
                        if queue is not None:
                            queue.put_nowait(item)
                error: Exception = RouterLost("the router closed its event stream")
            except Exception as exc:
                error = RouterLost(f"the router's event stream broke: {exc!r}")
            self._attached.clear()
            log.warning("%s; failing %d open requests (they are resubmitted)", error, len(self._queues))
            for queue in self._queues.values():
                queue.put_nowait(error)
            await asyncio.sleep(RECONNECT_S)
