"""The router: the one place that owns scheduling state for every mesh, and so the one that can lose none.

One MeshScheduler per live mesh replica. A request goes to a mesh that seats it now (a free slot once its queue
is seated), among those to the one holding its longest cached prefix (the router owns every block table, so it
knows exactly), then to the least loaded (MeshScheduler.placement_key). Each live mesh has a loop
that keeps up to `pipeline_depth` works in flight, so the next round is already queued on the mesh when
the current one ends, and consumes the mesh's per-step results as they stream in.

Failure (docs/DESIGN.md, "Failure"): a work stream that raises, ends early, or sends nothing past a deadline
derived from the backend's expected step time marks its mesh down. Every request that was on it, running
or queued, is re-placed on a live mesh with the tokens it has so far and recomputed there, the path a
preempted sequence takes; its client stream goes on with no gap in the tokens. With no live mesh, requests
wait up to `no_mesh_wait_s`, then fail with NoMeshAvailable (HTTP 503). A down mesh is probed with
`reset()`; the answer carries the replica's incarnation id, and the mesh rejoins with a fresh scheduler
and work ids from 0 (a replica Serve restarted, or the same one once its stuck work ended).

Token events leave on one long-lived stream per ingress replica (`events`), one message per flush for all
of its requests (docs/DESIGN.md "Data path at scale"): the router's cost is per step and per flush, not per
token or per request. Under Serve, works, results, requests and events travel on direct links
(deployments/link.py), not Serve calls. Every request's tokens
reach its ingress at most `stream_interval_ms` after the mesh made them, however many streams run.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ray import serve

from deployments.aio import within
from deployments.gc_heap import freeze_gc_heap
from deployments.link import Link, LinkAddress, LinkServer, node_ip
from deployments.mesh_client import LinkMeshClient
from model.backend import Capabilities
from scheduler.blocks import extend_block_hashes
from scheduler.errors import MeshFailures, NoMeshAvailable, PromptTooLong, QueueFull, RoomFilled
from scheduler.sampling import SamplingParams
from scheduler.scheduler import MeshScheduler
from scheduler.work import (LeaseTaken, MeshWork, ReplicaStopping, RequestFailed, StaleWork, StepEvents, StepResult,
                            TokenEvent, pack_events, unpack_events)

log = logging.getLogger("ray.serve")

MAX_CONSUMER_BACKLOG = 256 << 20  # bytes of events an ingress has not read: past it, it is taken for gone


class MeshClient(Protocol):
    """How the router reaches one mesh replica."""

    def execute(self, work: MeshWork, incarnation: str) -> AsyncIterator[StepResult]:
        """Send the work now; its results stream back in order. Raises if the replica is not `incarnation`."""

    async def reset(self) -> tuple[str, Capabilities]:
        """Drop every slot and restart work ids at 0 (after any work still running). Returns the
        replica's incarnation id (new at each replica start) and its capabilities."""

    async def wait_closed(self) -> ReplicaStopping | None:
        """Returns once the replica reset last is known gone (its link closed), which an idle mesh has no work out
        to see: ReplicaStopping if it said it stops on purpose; never, for a client that cannot tell."""


class MeshFailed(RuntimeError):
    """A mesh stopped answering its work correctly: every request on it moves elsewhere."""


@dataclass
class RouterConfig:
    prefill_chunk: int = 4096
    max_prefill_tokens: int = 4096
    decode_steps: int = 8
    pipeline_depth: int = 2
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 4 * 131072
    stream_interval_ms: float = 10.0  # a consumer's stream sends at most one message per interval
    max_seq_len: int | None = None  # None: the backend's
    # failure handling
    step_deadline_factor: float = 20.0  # a message later than min + factor x the work's expected time: hung
    min_step_deadline_s: float = 30.0
    probe_interval_s: float = 1.0  # a down mesh is asked to reset this often
    probe_timeout_s: float = 30.0
    heartbeat_s: float = 5.0  # an idle mesh is checked this often (a replica restarted while idle rejoins)
    no_mesh_wait_s: float = 30.0  # a request waits this long for a live mesh, then 503
    # A request whose prefill chunk or decode round this many meshes in a row were computing as they failed, with no
    # decode step of it done in between, the last laid on it alone, ends (500) instead of moving again: one that
    # crashes the device would take down each mesh it reaches. Reached in a decode round beside others, its next step
    # runs alone (isolated), as do theirs: a neighbour that moved with it passes that step and goes on.
    max_mesh_failures: int = 2
    start_wait_s: float = 1.0  # at a router start, requests wait at most this long after the first mesh is up
    # for the others' first answers, so they spread over all (an ingress resubmits every stream at a restart)
    cancel_memory_s: float = 60.0  # a cancel for an unknown request is remembered this long
    enable_prefix_caching: bool = True  # False: every prompt is computed from its first token
    model_identity: str | None = None  # AppConfig.model_identity, reported in stats (RouterLink compares it)
    log_requests: bool = False  # AppConfig.enable_log_requests: a line per request preempted or moved off a failed mesh


@dataclass
class Mesh:
    name: str
    client: MeshClient
    scheduler: MeshScheduler | None = None  # None while down
    caps: Capabilities | None = None
    incarnation: str | None = None
    down_reason: str | None = "starting"
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    max_len: int | None = None  # the longest sequence its scheduler takes (max_tokens_per_seq); None: unknown; 0: never
    rounds: int = 0
    works_done: int = 0  # works it answered in full, over all its incarnations
    works_at_up: int = 0  # works_done when it last came up
    failed_unproven: int = 0  # failures in a row with work out and no work answered since it came up (a crash loop)
    failovers: int = 0
    stops: int = 0  # planned stops of its replica (ReplicaStopping: a redeploy, a scale-down): not failovers
    failed_at: tuple[float, str | None, str] | None = None  # (monotonic time, incarnation, what) of its last down
    requests_migrated: int = 0
    past_counts: dict[str, int] = field(default_factory=dict)  # COUNTERS of the schedulers before this one
    heard_at: float = 0.0  # loop time of its last result, or of a work sent while it had none out
    stall_s: float = math.inf  # silent this long with work out: stalled (STALL_S)
    heartbeat_out: bool = False  # an idle mesh's empty work is unanswered: work out too (a host frozen while idle)

    def stalled(self, now: float) -> bool:
        return (bool(self.scheduler.inflight) or self.heartbeat_out) and now - self.heard_at > self.stall_s

    @property
    def up(self) -> bool:
        return self.scheduler is not None

    @property
    def schedulable(self) -> bool:
        """False for one whose capabilities this config cannot schedule: it never serves, so its limits and slots
        are not the service's."""
        return self.max_len != 0


# A scheduler's counters: the mesh's own go on across its failures (Prometheus counters do not go back).
COUNTERS = ("prefix_query_tokens", "prefix_hit_tokens", "preemptions")
# An ingress replica's own metric families, handed in at its scrapes, are shown at the others' for this long after its
# last one: a replica that is gone then drops out (one that is only seldom scraped comes back at its next scrape).
INGRESS_REPORT_TTL_S = 900.0


@dataclass
class _Request:
    """What the router must keep to re-place a request anywhere: the scheduler's sequence holds the rest."""

    prompt_ids: list[int]
    params: SamplingParams
    salt: str | None
    arrival_time: float
    sink: _Sink  # where its events go
    scheduled_time: float | None = None  # a prefill chunk of it first handed out, on a mesh it left (queue time)
    mesh: Mesh | None = None  # None: waiting for a live mesh
    held_output: list[int] = field(default_factory=list)  # tokens so far, while waiting for a live mesh
    held_since: float | None = None
    counted: bool = False  # a mesh counted its admission (prefix-cache counters): no other mesh counts it again
    mesh_failures: int = 0  # meshes in a row that failed computing its prefill chunk or a decode round it was in
    decoded_at_failure: int = -1  # its tokens of decode steps at the last of them
    prefill_sampled: int = 0  # Sequence.num_prefill_sampled of the meshes it left
    isolated: bool = False  # its next decode step runs alone (Sequence.isolated), wherever it goes
    num_tokens_preempted: int = -1  # Sequence.num_tokens_preempted of the mesh it left: while the request is that
    # long, its recompute's token is still due (the scheduler protects it, and its seat needs _headroom's room)
    failed_alone: tuple[Mesh, int] | None = None  # the last mesh that failed computing it alone, and its works_done
    # the failed mesh it left, until it is placed on a mesh again: that mesh's requests_migrated counts it then, not
    # when it left (one held until no_mesh_wait_s ran out, or whose client left meanwhile, or no mesh took, never moved)
    moved_from: Mesh | None = None

    def shuns(self, mesh: Mesh) -> bool:
        """Whether queue moves (`_rebalance`) keep it off `mesh`: the last mesh that failed computing it alone, until
        that mesh answers a work. A mesh that fails its first work at each rejoin (a crash loop) drew the same queued
        request back each time, and the second failure ended it (500) as if it crashed two meshes."""
        failed = self.failed_alone
        return failed is not None and failed[0] is mesh and failed[1] == mesh.works_done


class _Sink:
    """One consumer's event stream (an ingress replica's link, or an in-process generate's queue): events
    wait here until the next flush, one message for all the requests it carries, one entry per request. A
    quiet stream flushes at once (the first token is not held back); a busy one at most every interval,
    however many requests it carries. The flush is a timer callback on the loop, not a task: a mesh step's
    events leave in the same wake-up that brought them, when the interval allows.

    A request's entry is the list of its plain tokens since the last flush (an append per token, and the
    list is what the wire carries: pack_events), or a TokenEvent once something else came (first token,
    logprobs, finish), which takes the tokens before it."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.pending: dict[str, list[int] | TokenEvent] = {}  # request id -> its tokens or event since the last flush
        self.failed: list[RequestFailed] = []  # last of a request's items: sent after its tokens
        self.request_ids: set[str] = set()
        self.send: Callable[[list], None] | None = None  # None: held until attached
        self._last_flush = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()  # made on the loop; asking for it again costs a getpid() per call

    def put_token(self, request_id: str, token: int) -> None:
        """A plain decode token: what nearly every token is."""
        pending = self.pending.get(request_id)
        if pending is None:
            self.pending[request_id] = [token]
            self._schedule()
        elif type(pending) is list:
            pending.append(token)
        else:
            pending.token_ids.append(token)

    def put(self, item: TokenEvent | RequestFailed) -> None:
        if isinstance(item, RequestFailed):
            self.failed.append(item)
        elif (pending := self.pending.get(item.request_id)) is None:
            self.pending[item.request_id] = item
        elif type(pending) is list:
            item.token_ids[:0] = pending  # the plain tokens came first
            self.pending[item.request_id] = item
        else:
            pending.merge(item)
        self._schedule()

    def attach(self, send: Callable[[list], None]) -> None:
        self.send = send
        if self.pending or self.failed:
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and self.send is not None:
            loop = self._loop
            self._timer = loop.call_at(max(loop.time(), self._last_flush + self.interval_s), self._flush)

    def _flush(self) -> None:
        self._timer = None
        pending, failed = self.pending, self.failed
        self.pending, self.failed = {}, []
        self._last_flush = self._loop.time()
        if (pending or failed) and self.send is not None:
            self.send(pack_events([(rid, p) if type(p) is list else p for rid, p in pending.items()] + failed))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.send = None


MOVE_SCAN = 8  # a round looks this far into a queue for a request another mesh seats (behind a head none does)
GRACE_S = 0.5  # a silent work's last look at its socket, in case the router's own loop stood still
# A mesh with work out that has sent nothing for STALL_S + 3 x the longest expected message (a prefill of
# max_prefill_tokens) is stalled: new and moved requests go to the others first. Its deadline (minutes on a
# Galaxy) decides whether it has failed; until then, each request placed there would wait for that verdict.
STALL_S = 1.0
# A mesh that fails computing before it answered a work since it came up waits twice as long as the time before for
# its next probe, up to 2 ** PROBE_DOUBLINGS x probe_interval_s: each rejoin of a crash loop drew the new requests (it
# looks empty: placement_key) and the others' queues (_rebalance), and moved them all again at its failure.
PROBE_DOUBLINGS = 6


# Serve's request router logs "Failed to get queue length from Replica(...) within 1.0s. If this happens repeatedly
# ..." (WARNING, ray/serve/_private/request_router/request_router.py, _probe_queue_lens) at each probe of a replica
# that does not answer: a mesh replica whose host froze (SIGSTOP in a local Serve run) made one every 1.5 s in the
# router's log, 17 while it was frozen 28 s, for as long as it stays frozen. One a replica passes this often.
QUEUE_PROBE_LOG_S = 60.0
QUEUE_PROBE_FORGET_S = 3600.0


class QueueProbeWarnings(logging.Filter):
    """On the "ray.serve" logger: Serve's queue-length probe warning once per replica per QUEUE_PROBE_LOG_S, the
    next one saying how many were left out meanwhile."""

    PREFIX = "Failed to get queue length from "

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, tuple[float, int]] = {}  # replica -> (monotonic time of the line passed, lines left out)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        replica = message[len(self.PREFIX):].split(" within ")[0]
        now = time.monotonic()
        at, left_out = self.last.get(replica, (-math.inf, 0))
        if now - at < QUEUE_PROBE_LOG_S:
            self.last[replica] = at, left_out + 1
            return False
        self.last[replica] = now, 0
        # A replica Serve replaced is never probed again: its entry goes once it could pass a line with nothing to
        # add, or after QUEUE_PROBE_FORGET_S with its count, which then says little (a restarted replica left ~211 B).
        self.last = {r: (t, n) for r, (t, n) in self.last.items()
                     if now - t < (QUEUE_PROBE_FORGET_S if n else QUEUE_PROBE_LOG_S) or r == replica}
        if left_out:
            record.msg, record.args = f"{message} ({left_out} more such lines in the last {now - at:.0f} s)", None
        return True


class _Silence:
    """Cancels the current task once `heard()` has not been called for `seconds`. One timer for a whole
    work, moved on only when it fires: an `asyncio.timeout` per message costs the router ~60 us of CPU per
    mesh step under uvloop (timer armed and cancelled each time; measured on the 2-core box), a third of
    its CPU per step at one mesh. After the CancelledError, `expired()` says whether this cancelled it. A
    silence the router's own stall made is not the mesh's: a stalled router failed every healthy mesh."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._graced = False  # the deadline passed once already: the grace is spent

    def __enter__(self) -> _Silence:
        self._timer = self._loop.call_at(self._last + self.seconds, self._check)
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def heard(self) -> float:
        self._last = now = self._loop.time()
        return now

    def _check(self) -> None:
        now, due = self._loop.time(), self._last + self.seconds
        if now < due:
            self._graced = False
            self._timer = self._loop.call_at(due, self._check)
        elif not self._graced:  # once, a look at what waits unread: a router that stood still (its loop
            self._graced = True  # runs timers before it polls the sockets) hears the mesh before blaming it
            self._timer = self._loop.call_at(now + GRACE_S, self._check)
        else:
            self._expired = True
            self._task.cancel()

    def expired(self) -> bool:
        """True (once the task's cancellation is taken back) when the silence cancelled the task and nothing
        else asked for it to be cancelled."""
        if not self._expired:
            return False
        # Task.uncancel is 3.11+; a Galaxy host may run 3.10, where a cancel from outside in the same instant (the
        # router closing) is taken for the silence's: a failover during shutdown, where it raised AttributeError
        uncancel = getattr(self._task, "uncancel", None)
        return uncancel() == 0 if uncancel is not None else True


class Router:
    def __init__(self, meshes: list[tuple[str, MeshClient]], config: RouterConfig):
        self.config = config
        self.meshes = [Mesh(name, client) for name, client in meshes]
        self.requests: dict[str, _Request] = {}
        self.sinks: dict[str, _Sink] = {}  # consumer id (an ingress replica) -> its stream
        self.cancelled: OrderedDict[str, float] = OrderedDict()  # cancels that came before (or after) their request
        # Requests waiting for a live mesh (_hold), and their tokens: each submit checks the limits on them, so
        # they are kept apart, not counted over every request at each submit (a burst into an outage was quadratic).
        self.held: dict[str, _Request] = {}
        self.held_tokens = 0
        self.ingress_reports: dict[str, tuple[float, list]] = {}  # ingress replica -> (when, its own metric families)
        self.mesh_up = asyncio.Event()
        self.starting = True  # until every mesh has answered its first reset (or failed it), or start_wait_s
        self._unprobed = len(self.meshes)  # meshes not asked once yet
        self.longest = math.inf  # the longest sequence a mesh takes (Mesh.max_len); inf while one is not known
        self._start_timer: asyncio.TimerHandle | None = None
        self._closing = False  # close() cancels the loops below: then their end is no bug (check)
        self.tasks = [asyncio.create_task(self._supervise(m), name=f"supervisor of {m.name}") for m in self.meshes]
        self.tasks.append(asyncio.create_task(self._expire_held(), name="held-request expiry"))

    def _scheduler_for(self, name: str, caps: Capabilities) -> MeshScheduler:
        c = self.config
        max_seq_len = min(c.max_seq_len or caps.max_seq_len, caps.max_seq_len)  # the scheduler adds the pool's cap
        return MeshScheduler(
            num_slots=caps.num_slots, num_blocks=caps.num_blocks, block_size=caps.block_size,
            kv_groups=caps.kv_groups,
            max_seq_len=max_seq_len, prefill_chunk=c.prefill_chunk, max_prefill_tokens=c.max_prefill_tokens,
            decode_steps=c.decode_steps, prefix_align=caps.prefix_align, log_name=name if c.log_requests else None,
            max_waiting_requests=c.max_waiting_requests, max_waiting_tokens=c.max_waiting_tokens,
            eos_token_ids=caps.eos_token_ids, max_inflight=c.pipeline_depth,
            enable_prefix_caching=c.enable_prefix_caching, prompt_logprobs=caps.prompt_logprobs)

    # ---- requests -------------------------------------------------------------------------------
    def place(self, token_ids: list[int], salt: str | None, need: int, scores: bool = False,
              num_tokens_preempted: int = -1) -> tuple[list[Mesh], dict[int, list[bytes]]] | None:
        """The live meshes that take `need` tokens (`_need`), best first by MeshScheduler.placement_key (a mesh
        that seats the request now, then the longest prefix it caches), and the digests of token_ids' full blocks
        by block size (`_digests`: hashed once per request, the mesh's scheduler reuses them); None when no such
        mesh is live. `scores`: the request computes its whole prompt (MeshScheduler.scores_prompt), so no cached
        prefix counts for it. `num_tokens_preempted`: a preempted request's (_Request's), whose seat needs more room
        (MeshScheduler._headroom): a mesh that seats only a new request of its length does not seat it now."""
        live = [m for m in self.meshes if m.up and m.max_len >= need]
        if not live:
            return None
        digests = _digests(token_ids, salt, live)
        num_tokens = len(token_ids)
        now = asyncio.get_running_loop().time()
        return sorted(live, key=lambda m: (not m.stalled(now), m.scheduler.placement_key(
            [] if scores else digests[m.caps.block_size], num_tokens, num_tokens_preempted)), reverse=True), digests

    def _need(self, req: _Request) -> int:
        """The sequence length a mesh must take for the request's whole answer (prompt + max_tokens), or the
        longest any mesh takes when none takes that. A mesh with a shorter max_seq_len would cut the answer short
        (MeshScheduler.submit lowers max_tokens to its room), or refuse a stream whose tokens so far fill it:
        with meshes of mixed lengths, a request waits for one that holds it, as it waits for any mesh, for
        no_mesh_wait_s; then it goes on where it can, cut to the room there (`_expire_held`)."""
        return min(len(req.prompt_ids) + req.params.max_tokens, self.longest)

    def _submit_to_best(self, meshes: list[Mesh], digests: dict[int, list[bytes]], request_id: str, req: _Request,
                        output_ids: list[int], migrated: bool) -> Mesh:
        """Submit to the first mesh that takes the request (a full queue or a shorter max_seq_len there, even one
        its tokens so far fill, sends it to the next). Raises the best mesh's refusal when none takes it, but
        RoomFilled if any mesh said that: the answer is then over ("length"), whatever the others said."""
        refusal: Exception | None = None
        for mesh in meshes:
            try:
                mesh.scheduler.submit(request_id, req.prompt_ids, req.params, req.salt, list(output_ids),
                                      migrated=migrated, counted=req.counted, arrival_time=req.arrival_time,
                                      scheduled_time=req.scheduled_time, block_hashes=digests.get(mesh.caps.block_size),
                                      isolated=req.isolated, num_tokens_preempted=req.num_tokens_preempted)
            except (PromptTooLong, QueueFull, ValueError) as exc:
                refusal = exc if refusal is None or isinstance(exc, RoomFilled) else refusal
                continue
            mesh.wake.set()
            return mesh
        raise refusal

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, salt: str | None,
               output_ids: list[int], consumer: str, continuation: bool | str = False) -> None:
        """Accept a request; its events go to `consumer`'s stream (see `events`).

        `continuation`: it was sent to a router that died (the ingress resubmits its streams this way when the
        router restarted), with `output_ids` already delivered; only the tokens after them come. It is no new
        load: the queue limits do not refuse it, as they do not refuse a request moved off a failed mesh.
        A str names the first choice of the API request this one is a later choice of (n > 1, a batch): while
        that one is here (admitted), the limits do not refuse this one either; they refuse API requests, not
        choices (else an n-choice request got 429 near the limit where single ones got in).
        A mesh failure does not end a request: it moves to another mesh and its events go on. Raises
        PromptTooLong / QueueFull when refused now, ValueError for an id already running (or an empty prompt); a
        later refusal (no mesh came back within no_mesh_wait_s: NoMeshAvailable) comes on the stream as a
        RequestFailed. A request cancelled before it
        arrived ends at once ("abort")."""
        sink = self._sink(consumer)
        if self._forget_cancel(request_id):
            sink.put(TokenEvent(request_id, [], finish_reason="abort"))
            return
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already running")
        if len(output_ids) >= params.max_tokens:  # every token was delivered; only the finish was lost
            sink.put(TokenEvent(request_id, [], finish_reason="length"))
            return
        if isinstance(continuation, str):  # a later choice: its request was admitted if its first choice is here
            continuation = continuation in self.requests
        continuation = continuation or bool(output_ids)
        # A continuation with tokens is a recompute, whose lookup was counted where it began (vLLM counts a preempted
        # one's apart); one without is seated for the first time (a later choice of a long prompt) and counted here.
        req = _Request(list(prompt_ids), params, salt, time.monotonic(), sink, counted=bool(output_ids))
        placed = None if self.starting else self.place([*prompt_ids, *output_ids], salt, self._need(req),
                                                       _scores(req, output_ids))
        if placed is not None:  # refusals (too long, queue full) raise here, before anything is held
            try:
                req.mesh = self._submit_to_best(*placed, request_id, req, output_ids, migrated=continuation)
            except RoomFilled:  # a continuation whose tokens fill the room of the longest mesh up
                sink.put(TokenEvent(request_id, [], finish_reason="length"))
                return
        else:
            if not continuation:
                self._check_held_room()
            self._hold(request_id, req, list(output_ids))
        self.requests[request_id] = req
        sink.request_ids.add(request_id)

    def _check_held_room(self) -> None:
        """With no live mesh, the queue limits hold for the meshes together: max_waiting_requests each plus
        the slots of those that were up before (a burst free slots seat is no queue), and max_waiting_tokens
        each. A request that comes while they are reached is refused now (QueueFull, 429), not held, whatever its
        length, as by a mesh's queue (MeshScheduler.submit). Held requests are placed past
        the limits once a mesh comes up, as moved requests are."""
        held, tokens = len(self.held), self.held_tokens
        # none schedulable: held as before, a 503 once no_mesh_wait_s is out
        meshes = [m for m in self.meshes if m.schedulable] or self.meshes
        n = len(meshes)
        max_requests = self.config.max_waiting_requests * n + sum(m.caps.num_slots for m in meshes if m.caps)
        max_tokens = self.config.max_waiting_tokens * n
        if held >= max_requests:
            raise QueueFull(f"requests waiting for a mesh to come up: {held} (limit {max_requests})")
        if tokens >= max_tokens:  # as a mesh's queue: whatever the prompt's length (MeshScheduler.submit)
            raise QueueFull(f"{tokens} prompt tokens are waiting for a mesh to come up (limit {max_tokens})")

    def attach(self, consumer: str, send: Callable[[list], None]) -> None:
        """Send `consumer`'s events to `send`: one list per flush (every stream_interval_ms at most) holding
        the new events of all its requests, one per request with its tokens since the last one, packed as
        the wire carries them (scheduler.work.pack_events; unpack_events makes them TokenEvents again).
        Called on the loop; it must not block (a link queues the frame)."""
        self._sink(consumer).attach(send)

    def detach(self, consumer: str) -> None:
        """The consumer went away (its ingress replica, or link): every request it still has is cancelled."""
        sink = self.sinks.pop(consumer, None)
        if sink is None:
            return
        sink.close()
        for request_id in list(sink.request_ids):
            self.cancel(request_id, "abort")

    async def events(self, consumer: str) -> AsyncIterator[list[TokenEvent | RequestFailed]]:
        """`attach` as an async iterator of unpacked batches (in-process consumers); closing it detaches the
        consumer."""
        batches: asyncio.Queue = asyncio.Queue()
        self.attach(consumer, batches.put_nowait)
        try:
            while True:
                yield unpack_events(await batches.get())
        finally:
            self.detach(consumer)

    def _sink(self, consumer: str) -> _Sink:
        sink = self.sinks.get(consumer)
        if sink is None:
            sink = self.sinks[consumer] = _Sink(self.config.stream_interval_ms / 1000)
        return sink

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       salt: str | None = None, output_ids: list[int] = (),
                       continuation: bool | str = False) -> AsyncIterator[TokenEvent]:
        """One request in this process (tests, benchmarks): its events until one carries a finish_reason.
        Raises what `submit` raises, and a RequestFailed's error. Closing it early cancels the request."""
        consumer = f"local-{uuid.uuid4().hex}"  # its own: a refused duplicate id must not detach the running one
        try:
            self.submit(request_id, prompt_ids, params, salt, list(output_ids), consumer, continuation)
        except Exception:
            self.detach(consumer)
            raise
        async with contextlib.aclosing(self.events(consumer)) as batches:
            async for batch in batches:
                for item in batch:
                    if isinstance(item, RequestFailed):
                        raise item.error
                    yield item
                    if item.finish_reason is not None:
                        return

    def refuse(self, request_id: str, consumer: str, error: BaseException) -> None:
        """Tell `consumer` that a request it submitted was refused (what submit raised), on its stream."""
        self._sink(consumer).put(RequestFailed(request_id, error))

    def cancel(self, request_id: str, reason: str = "abort") -> None:
        """End a request now. One the router does not know (yet) is remembered for cancel_memory_s, so a
        cancel that overtakes its submit still ends it."""
        req = self.requests.get(request_id)
        if req is None:
            self._remember_cancel(request_id)
            return
        event = self._end(request_id, req, reason)
        self._finish(request_id, event or TokenEvent(request_id, [], finish_reason=reason))

    def _finish(self, request_id: str, item: TokenEvent | RequestFailed) -> None:
        """The request's last item: it leaves the router."""
        req = self.requests.pop(request_id)
        req.sink.request_ids.discard(request_id)
        req.sink.put(item)

    def _end(self, request_id: str, req: _Request, reason: str) -> TokenEvent | None:
        mesh, req.mesh = req.mesh, None
        self._unhold(request_id, req)
        if mesh is None or not mesh.up:
            return None
        event = mesh.scheduler.cancel(request_id, reason)
        mesh.wake.set()
        return event

    def _remember_cancel(self, request_id: str) -> None:
        now = time.monotonic()
        self.cancelled[request_id] = now
        self._forget_old_cancels(now)

    def _forget_old_cancels(self, now: float) -> None:
        """Drop cancels older than cancel_memory_s (oldest first; at most 100,000 kept). Called at each new one and
        each tick of `_expire_held`: most are for requests that had already ended, which no submit will take."""
        while self.cancelled:
            oldest, at = next(iter(self.cancelled.items()))
            if now - at <= self.config.cancel_memory_s and len(self.cancelled) <= 100_000:
                break
            del self.cancelled[oldest]

    def _forget_cancel(self, request_id: str) -> bool:
        at = self.cancelled.pop(request_id, None)
        return at is not None and time.monotonic() - at <= self.config.cancel_memory_s

    def _hold(self, request_id: str, req: _Request, output_ids: list[int]) -> None:
        """No live mesh that holds it (`_need`): keep the request (with its tokens so far) until one comes up."""
        if req.held_since is None:
            req.held_since = time.monotonic()
        else:  # still held: its wait goes on
            self.held_tokens -= len(req.prompt_ids) + len(req.held_output)
        req.mesh, req.held_output = None, output_ids
        self.held[request_id] = req
        self.held_tokens += len(req.prompt_ids) + len(output_ids)

    def _unhold(self, request_id: str, req: _Request) -> None:
        """The request waits for a mesh no more (placed, or ended)."""
        if req.held_since is not None:
            req.held_since = None
            del self.held[request_id]
            self.held_tokens -= len(req.prompt_ids) + len(req.held_output)

    def _place_held(self) -> None:
        for rid, req in sorted(self.held.items(), key=lambda item: item[1].arrival_time):  # oldest first
            self._replace(rid, req, req.held_output)

    def _rebalance(self) -> None:
        """Move what waits in the live meshes' queues (MeshScheduler.queued: beyond their free slots, behind
        a request waiting for KV blocks, or holding a reserved KV group) to meshes that seat it now, streams
        under way first, then the oldest, each to the best such mesh (placement_key): when a mesh comes up
        (after a failover the others' queues hold the failed mesh's requests) and when one has room while
        another has a queue. What no other mesh seats stays in line where it is: moved, it would only wait
        there instead, or come back."""
        queued = [(seq, mesh) for mesh in self.meshes if mesh.up for seq in mesh.scheduler.queued()]
        now = asyncio.get_running_loop().time()
        for seq, origin in sorted(queued, key=lambda t: (not t[0].started, t[0].arrival_time)):
            rooms = [m for m in self.meshes if m.up and m.scheduler.num_queued < 0 and not m.stalled(now)]
            if not rooms:
                return
            req = self.requests.get(seq.request_id)
            if req is None or req.mesh is not origin:
                continue
            need = self._need(req)
            targets = [m for m in rooms if m is not origin and m.max_len >= need and m.scheduler.seats(seq)
                       and not req.shuns(m)]
            if not targets:
                continue
            n = len(seq.token_ids)
            digests = _digests(seq.token_ids, req.salt, targets, {origin.caps.block_size: seq.block_hashes})
            scores = MeshScheduler.scores_prompt(seq)
            target = max(targets, key=lambda m: m.scheduler.placement_key(
                [] if scores else digests[m.caps.block_size], n, seq.num_tokens_preempted))
            counted = req.counted
            req.counted, req.isolated = counted or seq.counted, seq.isolated
            req.num_tokens_preempted = seq.num_tokens_preempted
            req.scheduled_time = seq.scheduled_time  # the first mesh's, carried to each next one (submit)
            try:  # submitted there first: taken from here only once it is
                self._submit_to_best([target], digests, seq.request_id, req, seq.output_ids, migrated=True)
            except (PromptTooLong, QueueFull, ValueError):
                req.counted = counted
                continue
            origin.scheduler.cancel(seq.request_id, "abort")  # its event is dropped: the request goes on there
            req.mesh = target
            req.prefill_sampled += seq.num_prefill_sampled

    def _movable(self, mesh: Mesh) -> bool:
        """Whether a mesh with room would seat a request of another's queue, `mesh` being one side or the other,
        or both: one whose reserved KV group's holder waits (MeshScheduler._admit) may have room in its other
        groups (checked on every round, so cheap while there is none: MeshScheduler.num_queued is O(1))."""
        def waits(m: Mesh) -> bool:
            return m.scheduler.num_queued > 0 or m.scheduler.reserved is not None

        room_here, queue_here = mesh.scheduler.num_queued < 0, waits(mesh)
        if not room_here and not queue_here:
            return False
        now = asyncio.get_running_loop().time()  # as _rebalance: nothing moves to a stalled mesh
        others = [m for m in self.meshes if m.up and m is not mesh]
        pairs = [(mesh, q) for q in others if waits(q)] if room_here and not mesh.stalled(now) else []
        if queue_here:
            pairs += [(r, mesh) for r in others if r.scheduler.num_queued < 0 and not r.stalled(now)]
        return any(room.max_len >= self._need(req) and room.scheduler.seats(seq) and not req.shuns(room)
                   for room, q in pairs for seq in q.scheduler.queued(MOVE_SCAN)
                   if (req := self.requests.get(seq.request_id)) is not None)

    def _replace(self, request_id: str, req: _Request, output_ids: list[int]) -> None:
        """Submit a request that already ran elsewhere to the best live mesh (or hold it)."""
        placed = self.place(req.prompt_ids + output_ids, req.salt, self._need(req), _scores(req, output_ids),
                            req.num_tokens_preempted)
        if placed is None:
            self._hold(request_id, req, output_ids)
            return
        try:
            mesh = self._submit_to_best(*placed, request_id, req, output_ids, migrated=True)
        except (PromptTooLong, QueueFull, ValueError) as exc:  # e.g. every live mesh has a shorter max_seq_len
            req.mesh = None
            self._unhold(request_id, req)
            ended = TokenEvent(request_id, [], finish_reason="length") if isinstance(exc, RoomFilled) else None
            self._finish(request_id, ended or RequestFailed(request_id, exc))
            return
        req.mesh = mesh
        self._unhold(request_id, req)
        _count_move(req)

    async def _expire_held(self) -> None:
        """Held requests past no_mesh_wait_s fail with NoMeshAvailable (HTTP 503, Retry-After), but one held for
        a longer mesh than those live goes on on the best of them, cut to the room there (a Galaxy's restart
        takes minutes); one whose tokens so far fill that room ends there ("length")."""
        while True:
            await asyncio.sleep(min(1.0, max(self.config.no_mesh_wait_s / 4, 0.01)))  # 0 s: no spinning loop
            now = time.monotonic()
            self._forget_old_cancels(now)  # an idle router hears no new cancel to drop them
            if self.starting and self.mesh_up.is_set():  # held for the start's spread, not for want of a mesh
                continue
            failed = moved = 0  # those ended here, and of them those a failed mesh's line said were held
            for rid, req in list(self.held.items()):
                if now - req.held_since > self.config.no_mesh_wait_s:
                    placed = self.place(req.prompt_ids + req.held_output, req.salt, 0,
                                        _scores(req, req.held_output), req.num_tokens_preempted)
                    ending: TokenEvent | RequestFailed | None = RequestFailed(rid, NoMeshAvailable(
                        f"no mesh that can take it has been available for {self.config.no_mesh_wait_s:g} s"))
                    if placed is not None:
                        try:
                            req.mesh = self._submit_to_best(*placed, rid, req, req.held_output, migrated=True)
                            ending = None
                            _count_move(req)
                        except RoomFilled:  # cut to the room there, it has its tokens already
                            ending = TokenEvent(rid, [], finish_reason="length")
                        except (PromptTooLong, QueueFull, ValueError):
                            pass
                    self._unhold(rid, req)
                    if ending is not None:
                        if isinstance(ending, RequestFailed):
                            failed, moved = failed + 1, moved + (req.moved_from is not None)
                        self._finish(rid, ending)
            if failed:  # the end of what a failure line called held: a streamed answer's 200 is in the access log
                log.error("%d held requests failed (503): no mesh that takes them came within no_mesh_wait_s (%g s); "
                          "%d of them had been on a failed mesh", failed, self.config.no_mesh_wait_s, moved)

    def stats(self, report: tuple[str, list] | None = None) -> dict:
        """`ready` while at least one mesh is live; per mesh its state and its scheduler's numbers. `stalled`: a live
        mesh silent past its stall time with work out, which placement goes around until it answers or its deadline
        fails it (a frozen host: up to min_step_deadline_s). `report`: a scraped ingress replica's name and own
        metric families (Metrics.report), kept; then `ingress_families` holds every replica's last ones, and
        `ingress_report_age_s` how old each is (seconds)."""
        meshes, now = [], asyncio.get_running_loop().time()
        for m in self.meshes:
            sched = m.scheduler.stats() if m.up else _down_stats(m.caps)
            sched.update({k: sched[k] + m.past_counts.get(k, 0) for k in COUNTERS})
            meshes.append({"name": m.name, "up": m.up, "stalled": m.up and m.stalled(now), "failed": m.down_reason,
                           "incarnation": m.incarnation,
                           "failovers": m.failovers, "stops": m.stops, "requests_migrated": m.requests_migrated,
                           "rounds": m.rounds, **sched})
        caps = [m.caps for m in self.meshes if m.caps is not None and m.schedulable]
        stats = {"ready": any(m.up for m in self.meshes),
                 "max_model_len": min(map(self._max_model_len, caps)) if caps else None,
                 "vocab_size": min(c.vocab_size for c in caps) if caps else None,  # the ids a mesh can embed
                 # every mesh scores a whole prompt (vLLM's prompt_logprobs); None while none is known
                 "prompt_logprobs": all(c.prompt_logprobs for c in caps) if caps else None,
                 "held": len(self.held), "meshes": meshes,
                 "model_identity": self.config.model_identity,
                 "enable_prefix_caching": self.config.enable_prefix_caching}
        if report is not None:
            at = time.monotonic()
            self.ingress_reports[report[0]] = at, report[1]
            self.ingress_reports = {name: kept for name, kept in self.ingress_reports.items()
                                    if at - kept[0] <= INGRESS_REPORT_TTL_S}
            stats["ingress_families"] = {name: families for name, (_, families) in self.ingress_reports.items()}
            stats["ingress_report_age_s"] = {name: at - when for name, (when, _) in self.ingress_reports.items()}
        return stats

    def _max_model_len(self, caps: Capabilities) -> int:
        """The longest sequence a mesh takes: its max_seq_len (capped by the config), and what one KV group holds."""
        return min(self.config.max_seq_len or caps.max_seq_len, caps.max_seq_len, caps.num_blocks * caps.block_size)

    def check(self) -> None:
        """Raises RuntimeError (from the loop's error, if any) when one of the router's own loops ended before close():
        a mesh's supervisor (that mesh never fed again) or the held-request expiry (held requests never ended). They
        never end by themselves and catch what a mesh or a request may cause (Exception: a CancelledError from elsewhere
        still ends one); one that ended is a router bug, which the replica's health check turns into Serve restarting
        the router, whose requests the ingress resubmits (DESIGN: "Router restart")."""
        if self._closing:
            return
        for task in self.tasks:
            if not task.done():
                continue
            if task.cancelled():
                raise RuntimeError(f"the router's {task.get_name()} ended: cancelled")
            error = task.exception()
            raise RuntimeError(f"the router's {task.get_name()} ended: {error!r}") from error

    async def close(self) -> None:
        self._closing = True
        if self._start_timer is not None:
            self._start_timer.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # ---- mesh lifecycle -------------------------------------------------------------------------
    async def _supervise(self, mesh: Mesh) -> None:
        """Bring the mesh up (reset), run it until it fails, move its requests, and start over."""
        first = True
        while True:
            try:
                mesh.incarnation, mesh.caps = await within(mesh.client.reset(), self.config.probe_timeout_s)
            except Exception as exc:  # still restarting, or stuck in a work: try again later
                log.debug("mesh %s not back yet: %r", mesh.name, exc)
                if first:
                    first = False
                    self._probed()
                await asyncio.sleep(self.config.probe_interval_s)
                continue
            try:
                mesh.scheduler = self._scheduler_for(mesh.name, mesh.caps)
            except ValueError as exc:  # the mesh's capabilities do not fit this config: a redeploy, not a retry
                mesh.down_reason, mesh.max_len = f"cannot be scheduled with this config: {exc}", 0
                unfit = mesh.incarnation
                self._measure()  # it will not come back as it is: requests do not wait for it
                log.error("mesh %s is not served: %s", mesh.name, mesh.down_reason)
                if first:
                    first = False
                    self._probed()
                # A redeploy of the mesh alone (new capabilities, the router's config unchanged: Serve keeps the
                # router) is a new incarnation, asked seldom: the same one answers the same capabilities
                while mesh.incarnation == unfit:
                    await asyncio.sleep(self.config.probe_interval_s * 2 ** PROBE_DOUBLINGS)
                    with contextlib.suppress(Exception):
                        mesh.incarnation, mesh.caps = await within(mesh.client.reset(), self.config.probe_timeout_s)
                continue
            mesh.down_reason, mesh.max_len = None, mesh.scheduler.max_tokens_per_seq
            mesh.works_at_up = mesh.works_done
            mesh.stall_s = STALL_S + 3 * mesh.caps.expected_seconds(self.config.max_prefill_tokens, 1)
            self._measure()
            if mesh.failed_at is None:
                log.info("mesh %s is up (incarnation %s)", mesh.name, mesh.incarnation)
            else:  # the outage's end: how long, and whether Serve restarted the replica or its device came back
                at, before, what = mesh.failed_at
                log.info("mesh %s is up again (incarnation %s: %s), %.1f s after %s", mesh.name,
                         mesh.incarnation, "the same replica" if mesh.incarnation == before else "a new replica",
                         time.monotonic() - at, what)
            self.mesh_up.set()
            if first:
                first = False
                self._probed()
            if not self.starting:
                self._place_held()
                self._rebalance()
            elif self._start_timer is None:
                self._start_timer = asyncio.get_running_loop().call_later(self.config.start_wait_s, self._started)
            try:
                await self._run(mesh)
            except Exception as exc:
                self._fail(mesh, exc)
            await asyncio.sleep(self.config.probe_interval_s * 2 ** min(mesh.failed_unproven, PROBE_DOUBLINGS))

    def _measure(self) -> None:
        """`longest` anew; requests held for a length no mesh takes any more go where they can now."""
        lengths = [m.max_len for m in self.meshes]
        longest = math.inf if None in lengths else max(lengths)
        shrank, self.longest = longest < self.longest, longest
        if shrank and not self.starting and self.mesh_up.is_set():
            self._place_held()

    def _probed(self) -> None:
        self._unprobed -= 1
        if not self._unprobed:
            self._started()

    def _started(self) -> None:
        """The router's start is over: what it held goes out, spread over every mesh up (placement_key), not
        all to the first one to answer."""
        if self.starting:
            self.starting = False
            if self._start_timer is not None:
                self._start_timer.cancel()
            if self.mesh_up.is_set():  # else they stay held as they are, until one comes up
                self._place_held()
                self._rebalance()

    def _fail(self, mesh: Mesh, error: BaseException) -> None:
        """Mark the mesh down and re-place every request it had, with its tokens so far. A planned stop of its replica
        (ReplicaStopping) moves them the same way, but is counted and logged as a stop, not a failover; the mesh taken
        by another router (LeaseTaken: this one is being replaced) is neither, and logged as such."""
        planned, taken = isinstance(error, ReplicaStopping), isinstance(error, LeaseTaken)
        sched, mesh.scheduler, mesh.incarnation, before = mesh.scheduler, None, None, mesh.incarnation
        counts = sched.stats()
        mesh.past_counts = {k: mesh.past_counts.get(k, 0) + counts[k] for k in COUNTERS}
        mesh.down_reason = repr(error)
        if planned:
            mesh.stops += 1
        elif not taken:
            mesh.failovers += 1
        what = (f"its replica's planned stop {mesh.stops}" if planned else "another router took it" if taken
                else f"failover {mesh.failovers}")
        mesh.failed_at = time.monotonic(), before, what
        unproven = not (planned or taken) and bool(sched.inflight) and mesh.works_done == mesh.works_at_up
        mesh.failed_unproven = mesh.failed_unproven + 1 if unproven else 0
        if not any(m.up for m in self.meshes):
            self.mesh_up.clear()
        # the prefill chunk or decode round it was computing: the possible cause (none, for a work it did not run)
        suspects, alone = ([], False) if isinstance(error, StaleWork) else sched.executing()
        limit = self.config.max_mesh_failures
        had = len(sched.requests)
        outcomes: Counter[str] = Counter()  # where each of its requests went: a mesh's name, "held", "ended", "left"
        for seq in sched.drain():
            req = self.requests.get(seq.request_id)
            if req is None or req.mesh is not mesh:
                outcomes["left"] += 1
                continue
            req.prefill_sampled += seq.num_prefill_sampled
            req.isolated = seq.isolated  # its step alone is still to come
            req.num_tokens_preempted = seq.num_tokens_preempted
            req.scheduled_time = seq.scheduled_time  # its queue time ended there (or on a mesh before)
            if seq.request_id in suspects:  # in a row: a decode step done since its last one clears it of that one
                decoded = len(seq.output_ids) - req.prefill_sampled  # (a recompute samples a token: no decode step)
                req.mesh_failures = req.mesh_failures + 1 if decoded <= req.decoded_at_failure else 1
                req.decoded_at_failure = decoded
                if alone:
                    req.failed_alone = mesh, mesh.works_done
                if req.mesh_failures >= limit and alone:  # beside others, it may have done nothing
                    log.error("%d meshes in a row failed computing request %s: ending it, not moving it again",
                              req.mesh_failures, seq.request_id)
                    req.mesh = None
                    self._finish(seq.request_id, RequestFailed(seq.request_id, MeshFailures(
                        f"{req.mesh_failures} model replicas in a row failed while computing it")))
                    outcomes["ended"] += 1
                    continue
                # A repeated failure of a decode round: the requests in it were together each time, so none can be told
                # from the others. Each decodes its next step alone: the cause fails there, alone; the others go on.
                req.isolated = req.mesh_failures >= limit
            req.moved_from = mesh
            req.counted = req.counted or seq.counted
            self._replace(seq.request_id, req, seq.output_ids)
            went = req.mesh.name if req.mesh else "held" if req.held_since is not None else "ended"
            outcomes[went] += 1
            if self.config.log_requests:
                log.info("Request %s moved off %s mesh %s with %d tokens: %s.", seq.request_id,
                         "stopped" if planned else "taken" if taken else "failed", mesh.name,
                         len(seq.output_ids), f"to {went}" if req.mesh else
                         "held for a live mesh" if went == "held" else "ended (no mesh takes it)")
        # one line says what became of them all (per request only with log_requests): the operator's count of moves
        if planned:  # routine (every redeploy of a mesh): a WARNING, so that alerts on failures stay quiet
            log.warning("mesh %s stopped: its replica is being replaced or removed (%r); its %d requests: %s; probing "
                        "it until a replica answers again", mesh.name, error, had, _outcomes(outcomes))
            return
        if taken:  # routine (every redeploy of the router): this router is on its way out
            log.warning("mesh %s was taken by another router (%r): this router is being replaced, or was silent past "
                        "the lease hold; its %d requests: %s", mesh.name, error, had, _outcomes(outcomes))
            return
        log.error("mesh %s failed (failover %d): %r; its %d requests: %s; probing it until its replica answers again",
                  mesh.name, mesh.failovers, error, had, _outcomes(outcomes))

    async def _run(self, mesh: Mesh) -> None:
        """Keep up to pipeline_depth works on the mesh. Returns never; raises MeshFailed (or the stream's
        error) when the mesh fails."""
        sched = mesh.scheduler
        inflight: deque[asyncio.Task] = deque()
        # a replica that dies while idle closes its link: the mesh fails over now, not at the next heartbeat (/health,
        # placement and the restart's probe all see it at once)
        closed = asyncio.create_task(mesh.client.wait_closed())
        closed.add_done_callback(lambda _: mesh.wake.set())
        try:
            while True:
                if self._movable(mesh):
                    self._rebalance()  # room here and a queue there that it seats, or the other way round
                while len(inflight) < self.config.pipeline_depth:
                    work = sched.schedule()
                    if work is None:
                        break
                    if not inflight:  # its silence counts from now
                        mesh.heard_at = asyncio.get_running_loop().time()
                    mesh.rounds += work.decode is not None
                    deadline = self._deadline(mesh.caps, work)
                    stream = mesh.client.execute(work, mesh.incarnation)  # sent now: queued on the mesh
                    inflight.append(asyncio.create_task(self._consume(
                        mesh, sched, work, stream, deadline, inflight[-1] if inflight else None)))
                mesh.wake.clear()
                if not inflight:
                    if sched.pending_release:  # slots freed with no work to carry it (a cancel on an idle mesh)
                        await self._heartbeat(mesh)
                        continue
                    if not closed.done():  # a close seen while works were out woke the loop: that wake is cleared
                        with contextlib.suppress(asyncio.TimeoutError):
                            await within(mesh.wake.wait(), self.config.heartbeat_s)
                    if closed.done():
                        stopping = closed.result()
                        if isinstance(stopping, ReplicaStopping):  # it said so first: a planned stop, not a crash
                            raise stopping
                        raise MeshFailed("its replica's link closed while it was idle")
                    if not mesh.wake.is_set():
                        await self._heartbeat(mesh)
                    continue
                if not inflight[0].done():  # an ending work sets the wake too (_consume): one future per wait, no task
                    await mesh.wake.wait()
                while inflight and inflight[0].done():
                    inflight.popleft().result()  # re-raises the stream's failure
        finally:
            closed.cancel()
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _heartbeat(self, mesh: Mesh) -> None:
        """An idle mesh sends no results, so nothing else would notice its replica was replaced: an empty
        work checks that the incarnation we plan for is still the one running. It carries the slots freed since the
        last work: else the mesh keeps a gone request's state (its grammar matcher, penalty counts, token history)
        until the next real work comes."""
        sched = mesh.scheduler
        work = MeshWork(sched.next_work_id, release=sched.pending_release)
        sched.next_work_id += 1
        sched.pending_release = []

        async def answered() -> None:
            async for _ in mesh.client.execute(work, mesh.incarnation):
                pass
        mesh.heard_at, mesh.heartbeat_out = asyncio.get_running_loop().time(), True
        try:
            await within(answered(), self.config.min_step_deadline_s)
        except asyncio.TimeoutError:
            raise MeshFailed(f"an empty work went unanswered for {self.config.min_step_deadline_s:g} s") from None
        finally:
            mesh.heartbeat_out = False

    def _deadline(self, caps: Capabilities, work: MeshWork) -> float:
        tokens = sum(c.end - c.start for c in work.prefills)
        expected = caps.expected_seconds(tokens, work.decode.num_steps if work.decode else 0)
        return self.config.min_step_deadline_s + self.config.step_deadline_factor * expected

    async def _consume(self, mesh: Mesh, sched: MeshScheduler, work: MeshWork, stream: AsyncIterator[StepResult],
                       deadline_s: float, previous: asyncio.Task | None) -> None:
        """Take one work's results in, after the previous work's (they are answered in work order)."""
        try:
            if previous is not None:
                await asyncio.wait([previous])
                if previous.cancelled() or previous.exception() is not None:
                    return  # the mesh failed already; _run is tearing down
            received = 0
            with _Silence(deadline_s) as silence:
                try:
                    async for step in stream:
                        mesh.heard_at = silence.heard()
                        received += 1
                        self._deliver(sched.process(step))
                        if step.finished:
                            mesh.wake.set()  # freed slots: more work may fit now
                except asyncio.CancelledError:
                    if silence.expired():
                        raise MeshFailed(f"work {work.work_id} sent nothing for {deadline_s:.1f} s") from None
                    raise
            if received != work.num_messages:
                raise MeshFailed(f"work {work.work_id} ended after {received} of {work.num_messages} results")
            mesh.works_done += 1
        finally:
            try:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            finally:
                mesh.wake.set()  # _run waits on the wake alone: this work's end, or its failure, is one

    def _deliver(self, out: StepEvents) -> None:
        requests = self.requests
        for request_id, token in out.tokens:
            req = requests.get(request_id)
            if req is not None:
                req.sink.put_token(request_id, token)
        for event in out.events:
            req = requests.get(event.request_id)
            if req is None:
                continue
            if event.finish_reason is not None:
                req.mesh = None
                self._finish(event.request_id, event)
            else:
                req.sink.put(event)


def _digests(token_ids: list[int], salt: str | None, meshes: list[Mesh],
             known: dict[int, list[bytes]] | None = None) -> dict[int, list[bytes]]:
    """The digests of token_ids' full blocks at each block size of `meshes` (`known`: some already hashed). One size
    unless a redeploy that changes block_size is under way: it restarts the meshes one by one under this router (whose
    own arguments have no block_size), and a mesh's prefix cache must be named by digests of its own blocks (another
    size's name a block by fewer tokens than it holds, or more)."""
    digests = dict(known or {})
    for mesh in meshes:
        if (size := mesh.caps.block_size) not in digests:
            digests[size] = []
            extend_block_hashes(digests[size], token_ids, size, salt)
    return digests


def _scores(req: _Request, output_ids: list[int]) -> bool:
    """Whether the request, with output_ids so far, computes its whole prompt (MeshScheduler.scores_prompt)."""
    return req.params.prompt_logprobs is not None and not output_ids


def _outcomes(outcomes: Counter[str]) -> str:
    """What a failed mesh's requests became, for its log line: "5 moved (mesh-1: 3, mesh-2: 2), 1 held for a live
    mesh, 1 ended, 1 already left"."""
    special = {"held": "held for a live mesh", "ended": "ended", "left": "already left"}
    moved = {name: n for name, n in sorted(outcomes.items()) if name not in special}
    parts = [f"{sum(moved.values())} moved ({', '.join(f'{name}: {n}' for name, n in moved.items())})"] if moved else []
    parts += [f"{outcomes[key]} {text}" for key, text in special.items() if outcomes[key]]
    return ", ".join(parts) or "none"


def _count_move(req: _Request) -> None:
    """A request moved off a failed mesh is on another now: requests_migrated counts moves, not requests that left."""
    if req.moved_from is not None:
        req.moved_from.requests_migrated += 1
        req.moved_from = None


def _down_stats(caps: Capabilities | None) -> dict:
    """A down mesh's numbers: nothing running, nothing held."""
    groups = caps.kv_groups if caps else 0
    total = caps.num_blocks if caps else 0
    return {"running": 0, "waiting": 0, "free_slots": 0, "queued_tokens": 0, "inflight_works": 0,
            "blocks_used": 0, "blocks_cached": 0, "blocks_free": 0, "blocks_total": groups * total,
            "kv_groups": groups, "groups": [], "prefix_query_tokens": 0, "prefix_hit_tokens": 0, "preemptions": 0}


# Serve replaces a replica after 3 health checks in a row fail (ray/serve/_private/constants.py,
# REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD): with its defaults (every 10 s, 30 s timeout) a
# hung router froze every stream for over 70 s; its loop answers in milliseconds, so 10 s is a hang. Streams
# resume once the old replica's links close, when Serve kills it: it has nothing to drain (its Serve calls are
# short; streams go over links, and the ingress resubmits them), so after 2 s, not Serve's default 20 s.
@serve.deployment(max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0.2}, health_check_period_s=5,
                  health_check_timeout_s=10, graceful_shutdown_timeout_s=2)
class RouterDeployment:
    """Serve wrapper: one replica (it owns all scheduling state); meshes are single-replica deployments
    `mesh-0..N-1`, so a handle to one of them reaches exactly that mesh and its KV cache.

    Each ingress replica holds one link to it (deployments/link.py; address from `link_address`): frames in
    are ("submit", request_id, prompt_ids, params, salt, output_ids, continuation) and ("cancel",
    request_id, reason); frames out are the event batches of `Router.events` for that link. A refused
    submit comes back as a RequestFailed on the same link. A link that closes cancels every request it
    carried."""

    def __init__(self, mesh_handles: list, config: dict):
        self._clients = [LinkMeshClient(h) for h in mesh_handles]
        self._config = RouterConfig(**config)
        self._router: Router | None = None
        self._link_server = LinkServer(self._serve_consumer)
        if not any(isinstance(f, QueueProbeWarnings) for f in log.filters):  # its calls to a frozen mesh's replica
            log.addFilter(QueueProbeWarnings())
        freeze_gc_heap()  # the modules stay: the router's full collections need not walk them

    def _ready(self) -> Router:
        if self._router is None:  # built in the replica's event loop: it starts the mesh tasks, in an empty context
            # (Serve names a log line's request by its context: every line of the router's, that of the first call)
            self._router = contextvars.Context().run(
                Router, [(f"mesh-{i}", c) for i, c in enumerate(self._clients)], self._config)
        return self._router

    async def check_health(self) -> None:
        """Answered on the loop the router runs on (Serve's own loop without its throughput mode has another
        thread answer health checks): a hung router fails it. Serve calls it every health_check_period_s from the
        replica's start, so it also starts the router there: started by its first call alone, a router deployed
        with no traffic probed no mesh until a request or an ingress's /health came, which then waited for them.
        A router whose own loop ended fails it too (Router.check)."""
        self._ready().check()

    async def link_address(self) -> LinkAddress:
        self._ready()
        return await self._link_server.start(node_ip())

    async def _serve_consumer(self, link: Link) -> None:
        router, consumer = self._ready(), f"link-{uuid.uuid4().hex}"

        def send(batch: list) -> None:
            if link.closed:
                return
            link.send(batch)
            if link.backlog_bytes > MAX_CONSUMER_BACKLOG:  # the ingress stopped reading: drop it (its requests end)
                log.error("ingress link %s is %d bytes behind; dropping it", consumer, link.backlog_bytes)
                link.abort()

        def take(message: tuple) -> None:
            if message[0] == "submit":
                # an ingress of the release before (a rolling update) sends no `continuation`
                _, request_id, prompt_ids, params, salt, output_ids, *continuation = message
                try:
                    router.submit(request_id, prompt_ids, params, salt, output_ids, consumer,
                                  continuation[0] if continuation else False)
                except Exception as exc:  # refused now (too long, queue full): the ingress raises it
                    router.refuse(request_id, consumer, exc)
            else:
                _, request_id, reason = message
                router.cancel(request_id, reason)
        router.attach(consumer, send)
        try:
            await link.dispatch(take)
        finally:
            router.detach(consumer)

    async def stats(self, report: tuple[str, list] | None = None) -> dict:
        return self._ready().stats(report)
