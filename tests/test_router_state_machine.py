"""Random interleavings of the whole router's life: submits (shared prefixes, salts, greedy, seeded and sampled,
host-side masks, continuations), cancels (queued, mid-prefill, mid-decode, after the end, twice, before the submit),
consumers that leave, meshes that raise, hang, vanish, are replaced, lose their link and come back, and time passing.
The meshes are in-process (tests/local_mesh.py), or MeshReplicas behind real links (LinkMeshClient), of one length
or of mixed lengths and KV groups.

The simulated backend reads every token back from its KV cache (model/simulated.py), so wrong block sharing,
a lost or repeated token on a move, or a recompute from the wrong place shows as a token that differs from the
request's solo run (`solo`). After every rule: each request has at most one end and nothing after it, its tokens
so far are its solo run's (a logprob each), a 429 comes only at a queue limit, a 503 only after no_mesh_wait_s, a
500 (MeshFailures) only after two faults that could have failed a mesh computing it, and the router's maps, its held
queue and every mesh's scheduler agree (no request lost between them, no slot or block leaked, streams under way
queued first), and a mesh with no work out keeps slot state only for the requests seated there (each release reached
it). At the end, with every mesh back: every request ended, the router holds none, every block is free or a cached
prefix whose KV the mesh really holds, no mesh keeps a slot's state, and nothing raised in the router's tasks or
callbacks.

ROUTER_FSM_EXAMPLES=n searches n random examples instead of CI's fixed ones; ROUTER_FSM_STATS=1 prints what each did.
"""
from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import deployments.mesh_replica as mesh_replica
import deployments.router as router_module
from deployments.mesh_client import LinkMeshClient
from deployments.router import Router, RouterConfig
from model.runner import MeshRunner
from model.simulated import SimulatedBackend
from scheduler.blocks import extend_block_hashes
from scheduler.errors import MeshFailures, NoMeshAvailable, PromptTooLong, QueueFull
from scheduler.sampling import SamplingParams
from scheduler.scheduler import MeshScheduler
from scheduler.sequence import Status
from scheduler.work import RequestFailed, unpack_events
from tests.local_mesh import LocalMesh, fault_due

VOCAB = 16
EOS = VOCAB - 1
EOS_RATE = 0.08  # answers also end on their own
BLOCK = 16  # the simulated prefix alignment is 128 tokens: 8 blocks
MAX_SEQ_LEN = 1024
_rng = random.Random(11)
PREFIXES = [[_rng.randrange(EOS) for _ in range(280)] for _ in range(3)]  # shared system prompts
CONFIG = dict(prefill_chunk=128, max_prefill_tokens=256, decode_steps=4, probe_interval_s=0.02,
              probe_timeout_s=0.3, heartbeat_s=0.1, min_step_deadline_s=0.25, step_deadline_factor=5,
              no_mesh_wait_s=1.0, start_wait_s=0.1, max_waiting_requests=6)


def simulated(num_slots: int, kv_groups: int, num_blocks: int, time_scale: float) -> SimulatedBackend:
    return SimulatedBackend(num_slots=num_slots, kv_groups=kv_groups, block_size=BLOCK, num_blocks=num_blocks,
                            max_seq_len=MAX_SEQ_LEN, vocab_size=VOCAB, eos_token_ids=(EOS,), eos_rate=EOS_RATE,
                            time_scale=time_scale)


_solo: dict = {}
_solo_backend: list[SimulatedBackend] = []


def solo(prompt: list[int], params: SamplingParams, room: int) -> tuple[list[int], str]:
    """The request run alone, start to end, on one fresh scheduler and runner (no chunking, cache or move), in a
    sequence of at most `room` tokens (what the meshes' KV groups hold)."""
    key = (tuple(prompt), params.model_dump_json(), room)
    if key not in _solo:
        if not _solo_backend:
            _solo_backend.append(simulated(1, 1, MAX_SEQ_LEN // BLOCK, 1e-9))
        runner = MeshRunner(_solo_backend[0])
        sched = MeshScheduler(num_blocks=MAX_SEQ_LEN // BLOCK, block_size=BLOCK, num_slots=1, max_seq_len=room,
                              prefill_chunk=MAX_SEQ_LEN, max_prefill_tokens=MAX_SEQ_LEN, prefix_align=128,
                              eos_token_ids=(EOS,), max_inflight=1, enable_prefix_caching=False)
        sched.submit("solo", prompt, params)
        tokens, reason = [], None
        while reason is None:
            for result in runner.execute(sched.schedule()):
                out = sched.process(result)
                tokens += [t for _, t in out.tokens]
                for event in out.events:
                    tokens += event.token_ids
                    reason = event.finish_reason or reason
        _solo[key] = tokens, reason
    return _solo[key]


REQUEST = st.fixed_dictionaries(dict(
    consumer=st.sampled_from(["c0", "c1"]), prefix=st.integers(0, len(PREFIXES) - 1),
    prefix_len=st.sampled_from([0, 60, 130, 200, 280]), tail=st.lists(st.integers(0, EOS), min_size=1, max_size=30),
    max_tokens=st.one_of(st.integers(1, 40), st.integers(41, 160)), min_tokens=st.integers(0, 4),
    stop=st.lists(st.integers(0, EOS - 1), max_size=2),
    ignore_eos=st.booleans(), salt=st.sampled_from([None, "tenant"]),
    mode=st.sampled_from(["greedy", "seeded", "sampled"]), logprobs=st.booleans(), continued=st.integers(0, 8),
    masks=st.sampled_from([None, "penalties", "bad_words", "allowed"])))
# Host-side sampling state a recompute must rebuild from the tokens so far (model/runner.py): penalties count the
# answer's tokens (they tip a step whose stop ids min_tokens masks), a bad word depends on the answer's last token.
MASKS = {None: {}, "penalties": dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3),
         "bad_words": dict(bad_words_token_ids=((3, 4), (7,))), "allowed": dict(allowed_token_ids=(1, 2, 5, 8, EOS))}


class _Call:
    """`handle.method.remote(...)`, as a Serve handle's call is."""

    def __init__(self, fn):
        self.remote = fn


class ReplicaMesh:
    """A mesh replica as Serve runs it (deployments/mesh_replica.py), reached as the router reaches one: control calls
    through a handle, works and results on a real link (LinkMeshClient). Faults as LocalMesh's: its device raises
    (the replica then refuses everything until it is restarted), a step hangs on the worker thread, the process
    goes (its links close, calls fail), and `restart` is Serve's new replica."""

    def __init__(self, make_backend):
        self.make_backend = make_backend
        self.replica: mesh_replica.MeshReplica | None = None
        self.fault: str | None = None  # one-shot "raise" | "hang" | "vanish", after `fault_after` more results
        self.fault_after = 0
        self.hung = threading.Event()
        self.reset = _Call(self._reset)
        self.link_address = _Call(self._link_address)
        self.client = LinkMeshClient(self)
        self.restart()

    @property
    def incarnation(self) -> str:
        return self.replica.incarnation

    @property
    def runner(self) -> MeshRunner:
        return self.replica.runner

    def restart(self) -> None:
        old, self.fault = self.replica, None
        self.release()
        if old is not None:
            old.link_server.close()
            old.shutdown()
        backend = self.make_backend()
        real = mesh_replica.build_backend, mesh_replica.grammar_tokenizer
        mesh_replica.build_backend = lambda config, model_dir: backend
        mesh_replica.grammar_tokenizer = lambda *_: None  # no constrained requests here: nothing to load
        try:
            self.replica = mesh_replica.MeshReplica.func_or_class({"backend": "simulated"})
        finally:
            mesh_replica.build_backend, mesh_replica.grammar_tokenizer = real
        self.alive = True
        execute = self.replica.runner.execute

        def faulty(work):  # on the replica's worker thread
            for result in execute(work):
                fault = fault_due(self)
                if fault == "raise":
                    raise RuntimeError("device lost")
                if fault == "hang":
                    self.hung.wait()
                elif fault == "vanish":
                    self.alive = False
                    asyncio.run_coroutine_threadsafe(self._vanish(), self.loop)
                yield result
        self.replica.runner.execute = faulty

    async def _vanish(self) -> None:
        self.replica.link_server.close()

    def vanish(self) -> None:
        self.alive = False
        self.replica.link_server.close()

    def inject(self, fault: str, after: int) -> None:
        self.fault_after, self.fault = after, fault

    def release(self) -> None:
        """A hung step goes on."""
        self.hung.set()
        self.hung = threading.Event()

    async def _reset(self, *lease):
        self.loop = asyncio.get_running_loop()
        if not self.alive:
            raise ConnectionError("the replica is gone")
        return await self.replica.reset(*lease)

    async def _link_address(self):
        if not self.alive:
            raise ConnectionError("the replica is gone")
        return await self.replica.link_address()

    def close(self) -> None:
        self.release()
        self.client.close()
        self.replica.link_server.close()
        self.replica.shutdown()


def release(mesh: LocalMesh | ReplicaMesh) -> None:
    """Its hung work goes on."""
    if isinstance(mesh, ReplicaMesh):
        mesh.release()
    else:
        mesh.unhang.set()
        mesh.unhang = asyncio.Event()


class _Tracked:
    def __init__(self, consumer: str, prompt: list[int], params: SamplingParams, expected, delivered: list[int]):
        self.consumer, self.prompt, self.params, self.expected = consumer, prompt, params, expected
        self.tokens = list(delivered)  # what the client has: its continuation's tokens, then what came
        self.continued = len(delivered)
        self.since = time.monotonic()
        self.faults_before = 0  # RouterMachine.faults when it came, less those that had yet to fire
        self.ends: list = []  # finish reasons or errors
        self.after_end = 0  # items that came after its end
        self.logprobs = 0  # token logprobs that came


class RouterMachine(RuleBasedStateMachine):
    @initialize(num_meshes=st.integers(2, 3), kv_groups=st.sampled_from([1, 2]), slots_per_group=st.integers(1, 2),
                num_blocks=st.sampled_from([20, 24, 40]), time_scale=st.sampled_from([0.01, 0.05]),
                pipeline_depth=st.integers(1, 4), interval_ms=st.sampled_from([0, 5]), started=st.booleans(),
                mixed=st.booleans(), link=st.booleans(), token_limit=st.sampled_from([4 * 131072, 600]),
                first=st.lists(REQUEST, min_size=3, max_size=10))
    def setup(self, num_meshes, kv_groups, slots_per_group, num_blocks, time_scale, pipeline_depth, interval_ms=0,
              started=True, mixed=False, link=False, token_limit=4 * 131072, first=()):
        """`started`: the meshes have answered before the first rule (else requests come during the router's start).
        `mixed`: mesh-0's KV groups hold twice the others' tokens (meshes of mixed lengths), and it has the other
        number of KV groups (1 or 2). `link`: the meshes are replicas behind real links (ReplicaMesh), else LocalMesh.
        `first`: every example starts with load, so the rules meet running, queued and held requests."""
        sizes = [num_blocks * (2 if mixed and i == 0 else 1) for i in range(num_meshes)]
        self.rooms = sorted({min(MAX_SEQ_LEN, n * BLOCK) for n in sizes})  # the longest sequence a KV group holds
        self.room = self.rooms[-1]
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        kind = ReplicaMesh if link else LocalMesh
        groups = [3 - kv_groups if mixed and i == 0 else kv_groups for i in range(num_meshes)]  # mixed: 1 and 2
        self.meshes = [kind(lambda n=n, g=g: simulated(g * slots_per_group, g, n, time_scale))
                       for n, g in zip(sizes, groups)]

        async def start() -> Router:
            return Router([(f"mesh-{i}", getattr(m, "client", m)) for i, m in enumerate(self.meshes)],
                          RouterConfig(**CONFIG, pipeline_depth=pipeline_depth, stream_interval_ms=interval_ms,
                                       max_waiting_tokens=token_limit))
        self.router = self.loop.run_until_complete(start())
        self.tracked: dict[str, _Tracked] = {}
        self.strays: list = []  # items for requests this machine never submitted
        self.cancels: dict[str, set[str]] = {}  # the reasons each request was cancelled with
        self.consumers = ["c0", "c1"]
        for consumer in self.consumers:
            self._attach(consumer)
        self.count = 0
        self.faults = 0  # faults that may fail a mesh as it computes (a replica restarted while idle is none)
        if started:
            self.run_for(0.05)
        for spec in first:
            self._submit(**spec)

    def _attach(self, consumer: str) -> None:
        def send(batch: list) -> None:
            for item in unpack_events(batch):
                req = self.tracked.get(item.request_id)
                if req is None or req.consumer != consumer:
                    self.strays.append((consumer, item))
                    continue
                if req.ends:
                    req.after_end += 1
                    continue
                if isinstance(item, RequestFailed):
                    req.ends.append(item.error)
                    req.ended_at = time.monotonic()
                    continue
                req.tokens += item.token_ids
                req.logprobs += len(item.logprobs)
                if item.finish_reason is not None:
                    req.ends.append(item.finish_reason)
        self.on_loop(self.router.attach, consumer, send)

    def on_loop(self, call, *args):
        """The router is called on its loop, as from a link's callback."""
        async def run():
            return call(*args)
        return self.loop.run_until_complete(run())

    def run_for(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def teardown(self) -> None:
        if not hasattr(self, "loop"):
            return
        try:
            self._settle()
            if os.environ.get("ROUTER_FSM_STATS"):
                ends = Counter(type(r.ends[0]).__name__ if not isinstance(r.ends[0], str) else r.ends[0]
                               for r in self.tracked.values())
                meshes = self.router.stats()["meshes"]
                print(f"{len(meshes)} meshes, {dict(ends)}", *(f"{key} {[m[key] for m in meshes]}" for key in (
                    "failovers", "preemptions", "prefix_hit_tokens", "requests_migrated")), sep=", ")
        finally:
            for m in self.meshes:
                release(m)
            self.loop.run_until_complete(self.router.close())
            for m in self.meshes:
                if isinstance(m, ReplicaMesh):
                    self.on_loop(m.close)
            self.loop.close()

    # ---- rules -----------------------------------------------------------------------------------
    @rule(spec=REQUEST)
    def submit(self, spec):
        self._submit(**spec)

    @rule(specs=st.lists(REQUEST, min_size=2, max_size=6))
    def burst(self, specs):
        for spec in specs:
            self._submit(**spec)

    def _submit(self, consumer, prefix, prefix_len, tail, max_tokens, min_tokens, stop, ignore_eos, salt, mode,
                logprobs, continued, masks=None):
        prompt = PREFIXES[prefix][:prefix_len] + tail
        if mode == "sampled" and (min_tokens or masks):  # unseeded host sampling of a masked step: not reproducible
            mode = "seeded"
        sampling = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.8, seed=prefix_len + len(tail)),
                    "sampled": dict(temperature=1.0)}[mode]
        params = SamplingParams(max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens), stop_token_ids=stop,
                                ignore_eos=ignore_eos, logprobs=0 if logprobs else None, **sampling, **MASKS[masks])
        rid = f"r{self.count}"
        self.count += 1
        expected = solo(prompt, params, self.room)  # every prompt fits (< 320 tokens)
        # continued > 0: an ingress resubmitting a stream to a restarted router, with continued - 1 tokens delivered
        delivered = expected[0][:min(continued - 1, len(expected[0]) - 1)] if continued else []
        req = self.tracked[rid] = _Tracked(consumer, prompt, params, expected, delivered)
        req.faults_before = self.faults - sum(m.fault is not None for m in self.meshes)  # those armed may fire on it

        def submit() -> None:
            try:
                self.router.submit(rid, prompt, params, salt, list(delivered), consumer, continued > 0)
            except QueueFull as exc:
                assert not continued, "a continuation was refused by a queue limit"
                self._check_full(len(prompt) + params.max_tokens)
                req.ends.append(exc)
        self.on_loop(submit)

    def _check_full(self, need: int) -> None:
        """A 429 only when every mesh that could take the request has its queue at a limit, or, with none up, the
        held requests are at the meshes' limits together."""
        router = self.router
        limit, tokens = router.config.max_waiting_requests, router.config.max_waiting_tokens
        need = min(need, router.longest)
        live = [m for m in router.meshes if m.up and m.max_len >= need]
        if router.starting or not live:
            n, slots = len(router.meshes), sum(m.caps.num_slots for m in router.meshes if m.caps)
            assert len(router.held) >= limit * n + slots or router.held_tokens >= tokens * n, \
                f"429 with {len(router.held)} held ({router.held_tokens} tokens)"
            return
        for m in live:
            sched = m.scheduler
            # free slots seat nobody while the queue's head waits for KV blocks (MeshScheduler.submit, 1a919b7)
            queued = len(sched.waiting) - (0 if sched.head_blocked else sched._free_slots_for_queue())
            assert queued >= limit or sched.waiting_tokens >= tokens, \
                f"429 while {m.name} queues {queued} requests, {sched.waiting_tokens} tokens"

    @rule(pick=st.integers(0, 63))
    def submit_again(self, pick):
        """An id still running is refused and the running request goes on."""
        def again() -> None:  # on the loop: nothing ends it between the look and the submit
            running = sorted(rid for rid in self.router.requests if rid in self.tracked)
            if running:
                req = self.tracked[rid := running[pick % len(running)]]
                with pytest.raises(ValueError, match="already running"):
                    self.router.submit(rid, req.prompt, req.params, None, [], req.consumer)
        self.on_loop(again)

    @rule(pick=st.integers(0, 63), reason=st.sampled_from(["abort", "stop"]))
    def cancel(self, pick, reason):
        """Any request: queued, prefilling, decoding, held, ended, cancelled already. Mostly a recent one."""
        if not self.tracked:
            return
        rid = f"r{max(self.count - 1 - pick % 8 if pick < 48 else pick % self.count, 0)}"
        self.cancels.setdefault(rid, set()).add(reason)

        def cancel() -> None:
            self.router.cancel(rid, reason)
            assert rid not in self.router.requests
        self.on_loop(cancel)

    @rule()
    def cancel_before_submit(self):
        """A cancel that overtakes its submit ends it at once."""
        rid = f"r{self.count}"
        self.on_loop(self.router.cancel, rid)
        self.cancels.setdefault(rid, set()).add("abort")

    @rule(consumer=st.sampled_from(["c0", "c1"]))
    def consumer_leaves(self, consumer):
        """The ingress replica's link closed: its requests are cancelled. It reconnects at once."""
        def leave() -> None:
            mine = [rid for rid, r in self.tracked.items() if r.consumer == consumer and not r.ends]
            self.router.detach(consumer)
            for rid in mine:
                assert rid not in self.router.requests
                self.tracked[rid].ends.append("detached")  # its stream is gone: nothing more may come for it
        self.on_loop(leave)
        self._attach(consumer)

    @rule(mesh=st.integers(0, 2), fault=st.sampled_from(["raise", "hang", "vanish"]), after=st.integers(0, 6))
    def fail(self, mesh, fault, after):
        if mesh < len(self.meshes):
            self.meshes[mesh].inject(fault, after)
            self.faults += 1

    @rule(mesh=st.integers(0, 2))
    def link_drops(self, mesh):
        """The network between router and replica blips: its links close, the replica lives on."""
        if mesh < len(self.meshes) and isinstance(m := self.meshes[mesh], ReplicaMesh):
            self.on_loop(m.replica.link_server.close)
            self.faults += 1

    @rule(mesh=st.integers(0, 2))
    def restart(self, mesh):
        """Serve restarted the replica (a new incarnation, an empty KV cache), whether it was gone or not."""
        if mesh < len(self.meshes):
            m = self.meshes[mesh]
            release(m)
            m.fault = None
            m.restart()
            self.faults += isinstance(m, ReplicaMesh)  # a replica's links close under its works out (a LocalMesh's
            # old works run on): one idle is no fault, its next work is refused unrun

    @rule(mesh=st.integers(0, 2))
    def unhang(self, mesh):
        if mesh < len(self.meshes):
            release(self.meshes[mesh])

    @rule(seconds=st.sampled_from([0.0, 0.002, 0.01, 0.03, 0.1]))
    def wait(self, seconds):
        self.run_for(seconds)

    # ---- invariants ------------------------------------------------------------------------------
    @invariant()
    def streams_are_their_solo_runs(self):
        if not hasattr(self, "tracked"):
            return
        for rid, req in self.tracked.items():
            assert len(req.ends) <= 1, f"{rid} ended {len(req.ends)} times: {req.ends}"
            assert req.after_end == 0, f"{rid} got {req.after_end} items after its end {req.ends}"
            tokens, reason = req.expected
            assert req.tokens == tokens[:len(req.tokens)], f"{rid}: {req.tokens} is not a prefix of {tokens}"
            came = len(req.tokens) - req.continued
            assert req.logprobs == (came if req.params.logprobs is not None else 0), \
                f"{rid}: {req.logprobs} logprobs for {came} tokens"
            if req.ends and isinstance(req.ends[0], str):
                end = req.ends[0]
                if end == reason and req.tokens == tokens:
                    continue  # finished as alone
                if end == "length" and len(req.prompt) + len(req.tokens) >= self.rooms[0]:
                    continue  # cut to a shorter mesh's room (no longer one was live for no_mesh_wait_s)
                cancelled = self.cancels.get(rid, set()) | {"detached"}
                assert end in cancelled, \
                    f"{rid} ended {end!r} with {req.tokens}, alone {reason!r} with {tokens} (cancelled: {cancelled})"
            if req.ends and isinstance(req.ends[0], NoMeshAvailable):
                waited = req.ended_at - req.since
                assert waited >= CONFIG["no_mesh_wait_s"], f"{rid}: 503 after {waited:.2f} s"
            if req.ends and isinstance(req.ends[0], MeshFailures):  # meshes failed computing it, max_mesh_failures
                assert self.faults - req.faults_before >= 2, \
                    f"{rid}: {req.ends[0]} with {self.faults - req.faults_before} faults since it came"
            if req.ends and isinstance(req.ends[0], BaseException):
                assert isinstance(req.ends[0], (QueueFull, PromptTooLong, MeshFailures, NoMeshAvailable)), \
                    f"{rid} failed with {req.ends[0]!r}"
        assert not self.strays, f"items for requests never submitted (or on another consumer): {self.strays[:3]}"

    @invariant()
    def router_and_meshes_agree(self):
        if not hasattr(self, "router"):
            return
        router = self.router
        for rid, req in router.requests.items():
            if rid in self.tracked:
                assert not self.tracked[rid].ends, f"{rid} ended ({self.tracked[rid].ends}) but the router still has it"
            if req.mesh is None:
                assert rid in router.held, f"{rid} is on no mesh and not held"
            else:
                assert req.mesh.up, f"{rid} is on {req.mesh.name}, which is down"
                assert rid in req.mesh.scheduler.requests, f"{rid} is on {req.mesh.name}, whose scheduler lacks it"
                assert rid not in router.held
        assert set(router.held) <= set(router.requests)
        assert router.held_tokens == sum(len(r.prompt_ids) + len(r.held_output) for r in router.held.values())
        for mesh, local in zip(router.meshes, self.meshes):
            if not mesh.up:
                continue
            sched = mesh.scheduler
            for rid in sched.requests:
                req = router.requests.get(rid)
                assert req is not None and req.mesh is mesh, f"{mesh.name} schedules {rid}, the router does not"
            _check_pools(sched)
            if mesh.incarnation == local.incarnation and not (sched.inflight or sched.pending_release
                                                              or mesh.heartbeat_out):
                _check_mesh_slots(mesh.name, sched, local.runner)
        for rid, req in self.tracked.items():  # one the router let go has its end, or has it on the way
            if not req.ends and rid not in router.requests:
                sink = router.sinks.get(req.consumer)
                pending = sink is not None and (rid in sink.pending or any(f.request_id == rid for f in sink.failed))
                assert pending, f"{rid} left the router with no end sent"

    # ---- the end ---------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Every mesh back; every request ends; then nothing is held anywhere."""
        for m in self.meshes:
            m.fault = None
            release(m)
            if not m.alive or isinstance(m, ReplicaMesh) and m.replica.error is not None:  # Serve restarts it
                m.restart()
        router = self.router
        for _ in range(1500):
            if all(r.ends for r in self.tracked.values()) and not router.requests and all(
                    m.up and not m.scheduler.inflight and m.incarnation == local.incarnation  # a replaced idle one seen
                    and not local.runner.slots and not local.runner._prefilled._ids  # the last releases reached it
                    for m, local in zip(router.meshes, self.meshes)):
                break
            self.run_for(0.01)
        self.streams_are_their_solo_runs()
        self.router_and_meshes_agree()
        open_ = {rid: (r.tokens, r.expected) for rid, r in self.tracked.items() if not r.ends}
        assert not open_, f"requests that never ended: {open_}"
        assert not router.requests and not router.held and router.held_tokens == 0
        assert all(m.up for m in router.meshes), [m.down_reason for m in router.meshes]
        for mesh, local in zip(router.meshes, self.meshes):
            sched = mesh.scheduler
            assert not sched.requests and not sched.running and not sched.waiting and sched.waiting_tokens == 0
            assert sched.kv.num_free_slots == sched.num_slots
            for group in sched.kv.groups:
                assert group.pool.num_used == 0, f"{mesh.name} group {group.index} leaks blocks"
            assert not local.runner.slots and not local.runner._prefilled._ids, f"{mesh.name} keeps slot state"
            self._check_cached_kv(sched, local.runner.backend)
        for task in router.tasks:
            assert not task.done(), f"a router task ended: {task}"
        assert not self.loop_errors, self.loop_errors

    def _check_cached_kv(self, sched: MeshScheduler, backend: SimulatedBackend) -> None:
        """A cached prefix block holds in the mesh's KV the tokens its digest names."""
        blocks: dict[bytes, list[int]] = {}
        for req in self.tracked.values():
            for salt in (None, "tenant"):
                hashes: list[bytes] = []
                seq = req.prompt + req.expected[0]
                extend_block_hashes(hashes, seq, BLOCK, salt)
                for i, h in enumerate(hashes):
                    blocks[h] = seq[i * BLOCK:(i + 1) * BLOCK]
        for group in sched.kv.groups:
            pool = group.pool
            for block in pool.eviction_order():
                h = pool.block_hash[block]
                assert h in blocks, f"cached block {block} is named by a digest of no request's tokens"
                assert backend.kv[group.index, block].tolist() == blocks[h], f"cached block {block} holds other KV"


def _check_mesh_slots(name: str, sched: MeshScheduler, runner: MeshRunner) -> None:
    """With no work out and no release pending, the mesh keeps a slot's state (its sampling, grammar and penalty state,
    its prefill's history) only for the request the scheduler seats there: every cancel's release reached it."""
    seated = {seq.slot: seq for seq in sched.running.values()}
    for slot, state in runner.slots.items():
        seq = seated.get(slot)
        assert seq is not None and seq.request_id == state.request_id, \
            f"{name} keeps slot {slot}'s state for {state.request_id}; the router seats {seq and seq.request_id} there"
    for slot in runner._prefilled._ids:
        assert slot in seated and not seated[slot].live, f"{name} keeps slot {slot}'s prefill history"


def _check_pools(sched: MeshScheduler) -> None:
    """Every owned block is owned by a running sequence of its group, as often as its reference count says."""
    for group in sched.kv.groups:
        owners = Counter(b for s in sched.running.values() if sched.kv.group_of(s.slot) is group for b in s.block_table)
        pool = group.pool
        assert all(pool.ref_counts[b] == owners.get(b, 0) for b in range(pool.num_blocks)), \
            f"group {group.index}: reference counts {pool.ref_counts} but owners {dict(owners)}"
        seated = sorted(s.slot for s in sched.running.values() if sched.kv.group_of(s.slot) is group)
        assert len(seated) + len(group.free_slots) == group.num_slots and not set(seated) & set(group.free_slots)
    for seq in sched.running.values():
        assert seq.status is Status.RUNNING and sched.requests.get(seq.request_id) is seq
    assert all(seq.status is not Status.RUNNING for seq in sched.waiting)
    # a stream under way (moved, continued) waits ahead of every request not started yet (a preempted one is put back
    # at the head)
    fresh = [i for i, seq in enumerate(sched.waiting) if not seq.started and seq.status is Status.WAITING]
    under_way = [i for i, seq in enumerate(sched.waiting) if seq.started]
    assert not fresh or not under_way or max(under_way) < min(fresh), \
        f"queue {[(s.request_id, s.status.name, s.started) for s in sched.waiting]}"


def test_router_state_machine(monkeypatch):
    # a hung mesh is failed (and seen stalled) in a fraction of a second, not in seconds: more of it per example
    monkeypatch.setattr(router_module, "GRACE_S", 0.05)
    monkeypatch.setattr(router_module, "STALL_S", 0.1)
    explore = int(os.environ.get("ROUTER_FSM_EXAMPLES", 0))
    run_state_machine_as_test(RouterMachine, settings=settings(
        max_examples=explore or 15, stateful_step_count=100, deadline=None, derandomize=not explore, database=None,
        suppress_health_check=list(HealthCheck)))
