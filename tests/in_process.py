"""The whole stack in one process, without Ray: the ingress app over a real Router and in-process meshes, on an event
loop of its own, with an httpx client, so a test sends what a client sends and can look at the router meanwhile."""
from __future__ import annotations

import asyncio
import functools
import uuid
import weakref
from collections.abc import AsyncIterator, Callable

import httpx

from deployments.ingress import build_app
from deployments.router import Router, RouterConfig
from model.backend import Backend
from model.embedded import ensure_smollm2
from model.grammar import ll_tokenizer
from model.simulated import SimulatedBackend
from model.tokenizer import load_tokenizer
from scheduler.work import RequestFailed, StepEvents, TokenEvent, unpack_events
from tests.local_mesh import LocalMesh

# RouterConfig fields for in-process tests: small chunks, quick probes and heartbeats. The step deadline is generous: on
# a busy box a step can miss a short one, and the failover that follows gives the mesh a new scheduler, which hides
# what the old one held (a leak). A test of a hung mesh sets its own short deadline.
FAST = dict(prefill_chunk=256, max_prefill_tokens=256, stream_interval_ms=0, probe_interval_s=0.02,
            probe_timeout_s=0.5, heartbeat_s=0.2, min_step_deadline_s=30.0, step_deadline_factor=5)


async def until(condition, timeout_s=10.0):
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


HELD_KEYS = ("running", "waiting", "blocks_used", "queued_tokens")  # a scheduler's stats that are 0 once all left


_STRAYS: weakref.WeakKeyDictionary[Router, list[str]] = weakref.WeakKeyDictionary()


def strays(router: Router) -> list[str]:
    """The requests `router` was seen running for no one (`watch_deliveries`, InProcessRouter), by name. A check at the
    end alone misses such a leak once the request ended by itself (its EOS, its max_tokens) while the check waited."""
    return _STRAYS.setdefault(router, [])


def _note(router: Router, found: list[str]) -> None:
    noted = strays(router)
    noted += [s for s in found if s not in noted][:10 - len(noted)]  # the first few say enough


def unplaced(router: Router) -> list[str]:
    """The requests a live mesh's scheduler holds that the router has not placed there: ended or moved in the router,
    never cancelled on that mesh (Router._end's scheduler.cancel). Never so once a step's events are delivered."""
    return [f"{mesh.name} runs {rid}, which the router has not placed there" for mesh in router.meshes if mesh.up
            for rid in mesh.scheduler.requests if (req := router.requests.get(rid)) is None or req.mesh is not mesh]


def watch_deliveries(deliver: Callable[[Router, StepEvents], None]) -> Callable[[Router, StepEvents], None]:
    """Router._deliver, noting `unplaced` requests after each mesh step (conftest puts it on every Router)."""
    @functools.wraps(deliver)
    def watched(router: Router, out: StepEvents) -> None:
        deliver(router, out)
        if found := unplaced(router):
            _note(router, found)
    return watched


def router_held(router: Router) -> list[str]:
    """What the router itself still holds for requests, by name: its requests, those held, sinks' ids, and the
    requests it was seen running for no one (`strays`), even if they have ended since. Raises where nothing watches
    for strays: conftest watches only where a collected module imported the router, and without it a leak check passed
    on a request that ended by itself while it waited."""
    if not hasattr(type(router)._deliver, "__wrapped__"):
        raise RuntimeError("Router._deliver is not watched for strays (conftest's stray_requests_watched): import "
                           "tests.in_process at the top of the test module")
    out = [f"request {rid}" for rid in router.requests] + [f"held {rid}" for rid in router.held]
    out += [f"sink {name} {sorted(sink.request_ids)}" for name, sink in router.sinks.items() if sink.request_ids]
    return out + [f"stray: {s}" for s in strays(router)]


def scheduler_held(name: str, scheduler, keys: tuple[str, ...] = HELD_KEYS) -> list[str]:
    """What one mesh scheduler still holds, by name: its `keys` stats that are not 0, and slots not free."""
    s = scheduler.stats()
    out = [f"{name} {key} {s[key]}" for key in keys if s[key]]
    if s["free_slots"] != scheduler.num_slots:
        out.append(f"{name} free_slots {s['free_slots']} of {scheduler.num_slots}")
    return out


def held(router: Router, failovers: int | dict[str, int] = 0) -> list[str]:
    """What `router` still holds for requests, by name: empty once every request has left and freed its slot and KV
    blocks (the prefix cache may keep them). Also each mesh that is down, or failed over (or stopped: a planned stop)
    other than `failovers` times in all (one count for every mesh, or by mesh name; others 0): either gives the mesh a
    new scheduler, and what the old one held (a leak) is out of sight, so a check that passed through one would pass
    for the wrong reason."""
    expected = failovers if isinstance(failovers, dict) else {m.name: failovers for m in router.meshes}
    out = router_held(router)
    for mesh in router.meshes:
        if mesh.failovers + mesh.stops != expected.get(mesh.name, 0):
            out.append(f"{mesh.name} failed over {mesh.failovers} times and stopped {mesh.stops}, not "
                       f"{expected.get(mesh.name, 0)} in all: its new scheduler hides what the old one held (a step "
                       f"past min_step_deadline_s?)")
        if not mesh.up:  # down since its failover, with no scheduler to look into; else never up
            if not mesh.failovers + mesh.stops:
                out.append(f"{mesh.name} down: {mesh.down_reason}")
            continue
        out += scheduler_held(mesh.name, mesh.scheduler)
        out += [f"{mesh.name} scheduler request {rid}" for rid in mesh.scheduler.requests]
    return out


async def nothing_held(router: Router, failovers: int | dict[str, int] = 0, timeout_s: float = 10.0) -> None:
    """Wait for `router` to hold nothing (`held`, with the failovers the test expects), else fail saying what it holds:
    a request's cancel or end reaches the scheduler a moment after its client has its answer. A stray fails it at once:
    it never leaves `held`."""
    for _ in range(int(timeout_s / 0.01)):
        if not held(router, failovers):
            return
        if strays(router):
            break
        await asyncio.sleep(0.01)
    raise AssertionError(f"the router still holds: {held(router, failovers)}")


class InProcessRouter:
    """The Router behind the RouterClient interface the ingress uses, as RouterLink puts it there: one consumer for all
    the ingress's requests, and a generate whose close cancels nothing, so the ingress's own cancel is what ends a
    request its client left (Router.generate's close would cancel it, and hide that cancel's loss). A request the router
    still runs once its reader is gone and the ingress's cancel was due is noted as a stray (`strays`)."""

    def __init__(self, router: Router):
        self.router = router
        self.consumer = f"ingress-{uuid.uuid4().hex}"
        self.queues: dict[str, asyncio.Queue] = {}  # the requests being read, as RouterLink's
        self.attached = False

    async def generate(self, request_id: str, prompt_ids: list[int], params, salt: str | None = None,
                       output_ids: list[int] = (), continuation: bool | str = False) -> AsyncIterator[TokenEvent]:
        if not self.attached:  # on the loop, where the router makes its sinks
            self.router.attach(self.consumer, self._take)
            self.attached = True
        self.router.submit(request_id, prompt_ids, params, salt, list(output_ids), self.consumer, continuation)
        queue = self.queues[request_id] = asyncio.Queue()  # before any flush: events come from a timer
        try:
            while True:
                item = await queue.get()
                if isinstance(item, RequestFailed):
                    raise item.error
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if self.queues.get(request_id) is queue:
                del self.queues[request_id]

    def _take(self, packed: list) -> None:
        for item in unpack_events(packed):
            queue = self.queues.get(item.request_id)
            if queue is not None:
                queue.put_nowait(item)
            elif isinstance(item, TokenEvent) and item.finish_reason is None:  # read by no one
                # The ingress calls cancel (a task, by asyncio.shield) before or as its read ends: due before this.
                asyncio.get_running_loop().call_soon(self._check_cancelled, item.request_id)

    def _check_cancelled(self, request_id: str) -> None:
        if request_id in self.router.requests and request_id not in self.queues:
            _note(self.router, [f"{request_id} runs on after its reader left, never cancelled by the ingress"])

    async def cancel(self, request_id: str, reason: str = "abort") -> None:
        self.router.cancel(request_id, reason)

    async def stats(self, report: tuple[str, list] | None = None) -> dict:
        return self.router.stats(report)

    def link_down_s(self) -> float:
        return 0.0


class Stack:
    """The ingress over a Router of `num_meshes` LocalMeshes ("mesh-0", ...) of `make_backend`, once every mesh is up.
    `config`: RouterConfig fields over the tests' FAST ones; `grammar_tokenizer`: the meshes' (LocalMesh's)."""

    def __init__(self, tok, make_backend: Callable[[], Backend], num_meshes: int = 1,
                 grammar_tokenizer: Callable[[], object] | None = None, **config):
        self.tok = tok
        self.loop = asyncio.new_event_loop()
        self.meshes = [LocalMesh(make_backend, grammar_tokenizer) for _ in range(num_meshes)]

        async def start() -> Router:
            router = Router([(f"mesh-{i}", m) for i, m in enumerate(self.meshes)], RouterConfig(**{**FAST, **config}))
            await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
            return router
        self.router = self.run(start())
        self.router_client = InProcessRouter(self.router)  # `client`'s, whose generate a test may wrap
        self.client = self.ingress(self.router_client)

    def ingress(self, router_client: InProcessRouter | None = None, **app_kwargs) -> httpx.AsyncClient:
        """A client of a new ingress app (replica) over the same router, through `router_client` (else a new
        InProcessRouter); `app_kwargs` go to build_app."""
        app = build_app(router_client or InProcessRouter(self.router), self.tok, "smollm2", **app_kwargs)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.run(self.client.post(path, json=body))

    def posts(self, path: str, bodies: list[dict]) -> list[httpx.Response]:
        async def together():
            return await asyncio.gather(*(self.client.post(path, json=b) for b in bodies))
        return self.run(together())

    def stats(self) -> dict:
        async def read():
            return self.router.stats()
        return self.run(read())

    def close(self) -> None:
        """Close the router, then each mesh's runner, as the replicas' shutdown does (ending its grammar-mask thread):
        the router's close cancelled every work, and a work's cancel waits for its step to end (local_mesh)."""
        self.run(self.router.close())
        for mesh in self.meshes:
            mesh.runner.close()
        self.loop.close()


def simulated_stack(num_slots: int, num_blocks: int, num_meshes: int = 1, **config) -> Stack:
    """A Stack of `num_meshes` fast simulated meshes (time_scale 0.05, an EOS now and then) with SmolLM2's tokenizer
    and llguidance's view of it (structured outputs), prefilled 128 tokens a chunk; `config`: RouterConfig fields."""
    tok = load_tokenizer(ensure_smollm2())
    llt = ll_tokenizer(tok, tok.vocab_size)

    def backend() -> SimulatedBackend:
        return SimulatedBackend(time_scale=0.05, num_slots=num_slots, kv_groups=1, num_blocks=num_blocks,
                                max_seq_len=2048, vocab_size=tok.vocab_size,
                                eos_token_ids=tuple(sorted(tok.stop_ids)), eos_rate=0.02)
    return Stack(tok, backend, num_meshes, grammar_tokenizer=lambda: llt,
                 **{"prefill_chunk": 128, "max_prefill_tokens": 128, **config})
