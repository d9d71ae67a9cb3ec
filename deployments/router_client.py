"""The ingress's side of the router: one link per ingress replica carries its requests and their events.

The router's cost must be per step and per flush, not per token or per request (docs/DESIGN.md "Data path at
scale"), so an ingress replica holds a single direct link to the router (deployments/link.py; its address
from the Serve call `link_address`), sends submits and cancels on it, and fans the event batches coming back
out to each request's queue. When the link breaks (the router replica died), every open request fails with
RouterLost: OpenAIServer.choice resubmits it as a continuation to the router Serve restarts, and this
client connects again, unless Serve says the router's deployment is gone (deleted by `serve.delete` or a
shutdown, or failed to deploy): then no router will come, and requests are refused at once with RouterGone
rather than waiting CONNECT_WAIT_S and choice's retries for one. A router of another model (a redeploy that changed it, whose stopping ingress replicas
still serve their streams) is sent nothing: a continuation there would splice two models' answers.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from ray.serve.exceptions import DeploymentUnavailableError

from deployments.link import Link, connect
from scheduler.sampling import PackedLogprobs, SamplingParams
from scheduler.work import RequestFailed, TokenEvent, unpack_events

log = logging.getLogger("ray.serve")

RECONNECT_S = 0.5  # between two attempts to reach the router
CONNECT_WAIT_S = 30.0  # the link may be down this long before a request that needs it fails with RouterUnreachable
# Tokens of a request's events merged into one while its reader lags (EventQueue), for a request without logprobs;
# one with k logprobs a token takes 1/(1 + k) of them (merged_tokens_max): its reader spends ~4-5 us per token and
# per logprob on an event (2-core box), so an event is ~1 ms of the loop either way (256 tokens with 20 logprobs
# each took 22-26 ms, during which every other stream of the replica stood still).
MERGED_TOKENS_MAX = 256


def merged_tokens_max(params: SamplingParams) -> int:
    """The most tokens one merged event of this request carries."""
    return max(1, MERGED_TOKENS_MAX // (1 + (params.logprobs or 0)))


class RouterLost(ConnectionError):
    """The link to the router broke (or could not be opened): the request's fate there is unknown."""


class RouterUnreachable(RouterLost):
    """No link to the router: the request was never sent, so resubmitting it is no continuation."""


class RouterGone(RuntimeError):
    """The router's deployment is gone (deleted, or failed to deploy): no router will answer, so the request
    is refused now (HTTP 503), not retried."""


class ModelChanged(RuntimeError):
    """The ingress and the router serve different models (a redeploy changed the model mid-answer): a stream
    continued there would splice two models' answers, and a new prompt was tokenized for the other one (HTTP 503
    with Retry-After: the retry reaches the new release's ingress)."""


class EventQueue:
    """A request's events not yet read. While its reader lags (a client that stopped reading: uvicorn's flow
    control holds the SSE writer), each token event merges into the last one not taken, as vLLM's
    RequestOutputCollector merges a request's outputs: a stalled stream holds its tokens, not an event per token
    (~450 B each, 12x the tokens), and a reader that catches up takes them in a few events, a few SSE chunks. An
    event takes at most `max_tokens` (merged_tokens_max), and a reader back after a long answer lets the loop run
    between two events: it detokenizes ~1 ms of tokens at a time (~4 us a token on the 2-core box), not the whole answer
    (20,000 tokens: ~100-240 ms) with every other stream of the replica waiting. The answer runs on meanwhile, to
    its finish (vLLM's servers keep generating for a slow reader too); one the ingress ends itself (a stop string,
    repetition_detection) is read on by OpenAIServer.deltas, which merges its deltas instead. What waits behind
    another event holds its logprobs as PackedLogprobs: as TokenLogprobs they were 3 objects per token that every full
    collection of the replica walked, for as long as the reader lagged (a client that stopped reading: the answer)."""

    def __init__(self, max_tokens: int = MERGED_TOKENS_MAX):
        self._items: deque = deque()
        # the reader's wait, while it waits: a future of its own per wait costs ~1 us less a token than an Event's
        # (whose wait makes one anyway, and keeps it in a deque of waiters)
        self._waiter: asyncio.Future | None = None
        self._max_tokens = max_tokens

    def put_nowait(self, item: TokenEvent | RequestFailed | BaseException) -> None:
        """Tokens past the bound start the next event (split off: slices), so that no event holds more."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # woken now, it runs after this call: the item is in by then
            waiter.set_result(None)
        if type(item) is not TokenEvent:
            self._items.append(item)
            return
        most, last = self._max_tokens, self._items[-1] if self._items else None
        if type(last) is TokenEvent and last.finish_reason is None and len(last.token_ids) < most:
            if item.logprobs and not isinstance(last.logprobs, PackedLogprobs):
                last.logprobs = PackedLogprobs(last.logprobs)
            room = most - len(last.token_ids)
            if len(item.token_ids) <= room:
                last.merge(item)
                return
            head, item = item.split(room)
            last.merge(head)
        while len(item.token_ids) > most:
            head, item = item.split(most)
            self._append(head)
        self._append(item)

    def _append(self, event: TokenEvent) -> None:
        if self._items and event.logprobs:  # it waits behind another
            event.logprobs = PackedLogprobs(event.logprobs)
        self._items.append(event)

    async def get(self) -> TokenEvent | RequestFailed | BaseException:
        if self._items:  # a reader catching up: the replica's other streams run between two of its events
            await asyncio.sleep(0)
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class RouterLink:
    """RouterClient over a Serve handle to the router deployment."""

    def __init__(self, handle, model_identity: str | None = None):
        self._handle = handle
        self._model = model_identity  # AppConfig.model_identity of this ingress (None: not compared)
        self._router_model: str | None = None  # the connected router's (None: a router that does not say)
        self._link: Link | None = None
        self._connected = asyncio.Event()
        self._gone: RouterGone | None = None  # Serve said the router's deployment is gone (the last try)
        self._gone_event = asyncio.Event()  # set while _gone is
        self._down_since = 0.0  # loop time the link went down (or the first try to open it began)
        self._broke = False  # a link broke since the last one opened: the next one's opening is logged
        self._queues: dict[str, EventQueue] = {}
        self._pump: asyncio.Task | None = None

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, salt: str | None,
                       output_ids: list[int] = (), continuation: bool | str = False) -> AsyncIterator[TokenEvent]:
        """Submit the request, then yield its events until one carries a finish_reason. `continuation`: it was
        sent to a router that died, or (a str) the first choice of the API request it is a later choice of
        (Router.submit). Raises the router's refusal, a RequestFailed's error,
        RouterUnreachable (not sent), RouterLost, RouterGone (not sent: Serve says the router's deployment is gone),
        or ModelChanged (not sent: the router serves another model)."""
        self._open()
        queue = EventQueue(merged_tokens_max(params))
        try:
            try:
                if not self._connected.is_set():  # the wait counts from the link's loss: OpenAIServer.choice's
                    # retries would each wait CONNECT_WAIT_S afresh (7 x 30 s before a 503)
                    left = self._down_since + CONNECT_WAIT_S - asyncio.get_running_loop().time()
                    if left > 0 and self._gone is None:
                        waits = [asyncio.ensure_future(e.wait()) for e in (self._connected, self._gone_event)]
                        try:
                            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            for wait in waits:
                                wait.cancel()
                    if self._gone is not None:
                        raise self._gone
                    if not self._connected.is_set():
                        raise asyncio.TimeoutError
                link = self._link
                if link is None:
                    raise ConnectionError("the link closed")
                if None not in (self._model, self._router_model) and self._model != self._router_model:
                    # the identities name the server's folders: they go to the log, not to the client
                    log.warning("refusing %s: the router serves %s, this ingress replica %s", request_id,
                                self._router_model, self._model)
                    began = continuation is True  # a resubmission (a str names a later choice's first: Router.submit)
                    raise ModelChanged("the model was redeployed, and this "
                                       f"{'answer began' if began else 'replica serves'} on the one before")
                self._queues[request_id] = queue  # on this link: its break fails the request
                link.send(("submit", request_id, prompt_ids, params, salt, list(output_ids), continuation))
            except (asyncio.TimeoutError, ConnectionError) as exc:
                raise RouterUnreachable(f"the router cannot be reached: {exc!r}") from None
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
        """End a request. On a broken link there is nothing to cancel: the router that had it is gone."""
        link = self._link
        if link is not None and not link.closed:
            link.send(("cancel", request_id, reason))

    async def stats(self, report: tuple[str, list] | None = None) -> dict:
        """The router's stats; `report`: this replica's own metric families, at a scrape (Router.stats)."""
        return await (self._handle.stats.remote(report) if report is not None else self._handle.stats.remote())

    def link_down_s(self) -> float:
        """Seconds the link has been down, 0.0 while it is up. Opens it if no request has yet: a link that cannot be
        opened (the router's link port unreachable from this node, while Serve's calls pass) then shows in /health
        rather than as every request's 503 after CONNECT_WAIT_S."""
        self._open()
        return 0.0 if self._connected.is_set() else asyncio.get_running_loop().time() - self._down_since

    def _open(self) -> None:
        if self._pump is None or self._pump.done():
            self._down_since = asyncio.get_running_loop().time()
            # in an empty context: Serve names a log line's request by its context, that of the call opening the link
            # (create_task's context= is Python 3.11+; a task copies the context it is created in)
            self._pump = contextvars.Context().run(asyncio.create_task, self._run())

    async def _run(self) -> None:
        """Hold the link open; fan its batches out; on a break, fail the open requests and reconnect."""
        while True:
            try:
                address = await self._handle.link_address.remote()
                if self._model is not None:  # once per router replica: a redeploy may have changed its model
                    self._router_model = (await self._handle.stats.remote()).get("model_identity")
                self._link = await connect(address)
                if self._broke:  # the other end of the break's warning: the operator reads the outage from the two
                    self._broke = False
                    log.info("the router's link is up again, %.1f s after it broke",
                             asyncio.get_running_loop().time() - self._down_since)
                self._gone = None
                self._gone_event.clear()
                self._connected.set()
                await self._link.dispatch(self._fan_out)
            except DeploymentUnavailableError as exc:  # a handle call: Serve deleted the router, or it never deployed
                self._gone = RouterGone(f"Serve reports the router's deployment unavailable (deleted, as by a "
                                        f"shutdown, or failed to deploy): {exc!r}")
                self._gone_event.set()
                error = RouterLost(f"the router's link broke: {exc!r}")
            except Exception as exc:
                error = RouterLost(f"the router's link broke: {exc!r}")
            link, self._link = self._link, None
            if link is not None:
                self._connected.clear()
                self._down_since = asyncio.get_running_loop().time()
                link.close()
                self._broke = True
                log.warning("%s; failing %d open requests (they are resubmitted)", error, len(self._queues))
                for queue in self._queues.values():  # one error each: a shared one would pile up tracebacks
                    queue.put_nowait(RouterLost(*error.args))
            await asyncio.sleep(RECONNECT_S)

    def _fan_out(self, batch: list) -> None:
        """In the link's read callback: each event of a batch to its request's queue, stamped with its arrival."""
        now = time.perf_counter()
        for item in unpack_events(batch):
            queue = self._queues.get(item.request_id)
            if queue is not None:
                if type(item) is TokenEvent:
                    item.received = now
                queue.put_nowait(item)
