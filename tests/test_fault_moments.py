"""A mesh's fault at a chosen moment of a request's life, through the whole stack in one process (the ingress app
over a real Router and two simulated meshes): mid-prefill of a long chunked prompt, while the prompt's logprobs are
scored, right after a prefix-cache hit, at a request's first decode step, mid-decode of a grammar-constrained answer
or of n choices sharing a prompt; then, for some, the other mesh too (the last healthy one), before the first is back.

The promises: each answer, streamed or whole, equals the unfaulted one (tokens, text, logprobs, prompt logprobs,
finish and usage), a structured answer still parses; the router and every scheduler it made hold nothing after;
/metrics counts the failovers, the tokens and the requests that came; a mesh that came back serves again."""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import tests.in_process as in_process
from deployments.ingress import build_app
from scheduler.work import MeshWork
from tests.ingress_support import asgi_call
from tests.local_mesh import LocalMesh
from tests.test_faults_and_leaving import BODIES, CHAT, FAULT_S, Watched, answer, held, watched

# a predicate on a work: the index of the result the fault takes the place of, or None (not this work)
When = Callable[[MeshWork], "int | None"]


class Schedule:
    """Faults in turn, each (kind, moment): the first mesh to run its moment takes it, the next one goes to another
    mesh. `fired` says what fired where."""

    def __init__(self, faults: list[tuple[str, Callable[[], When]]]):
        self.faults = list(faults)
        self.when = self.faults[0][1]() if self.faults else None
        self.fired: list[str] = []
        self.last: object = None
        self.first = asyncio.Event()  # the first fault fired


class TriggerMesh(LocalMesh):
    """A LocalMesh whose fault is armed by the work it is about to run (`schedule`), so a test picks the moment."""

    schedule: Schedule | None = None
    broken = False  # a fault was injected, and the mesh was not mended since

    def restart(self) -> None:
        super().restart()
        run = self.runner.execute

        def execute(work: MeshWork):  # called under the mesh's lock, before the work's first result
            s = self.schedule
            if s is not None and s.faults and s.last is not self and self.fault is None:
                at = s.when(work)
                if at is not None:
                    kind, _ = s.faults.pop(0)
                    s.fired.append(f"{kind} at result {at} of {work}")
                    s.last, s.when = self, s.faults[0][1]() if s.faults else None
                    self.unhang = asyncio.Event()
                    self.inject(kind, at)
                    self.broken = True
                    s.first.set()
            return run(work)
        self.runner.execute = execute


def mid_prefill(work: MeshWork) -> int | None:
    """A long prompt's chunk that is not its last: the fault takes its result."""
    return next((i for i, c in enumerate(work.prefills) if not c.is_final and c.start > 0), None)


def scoring_prompt(work: MeshWork) -> int | None:
    return next((i for i, c in enumerate(work.prefills) if c.prompt_logprobs is not None), None)


def first_decode(work: MeshWork) -> int | None:
    return len(work.prefills) if work.decode is not None else None


def after_prefix_hit(seen: set[str]) -> When:
    """The result after a request's first chunk that starts past 0 (a prefix-cache hit), or its first decode step."""
    def when(work: MeshWork) -> int | None:
        for i, c in enumerate(work.prefills):
            first = c.request_id not in seen
            seen.add(c.request_id)
            if first and c.start > 0 and c.is_final:
                return i + 1 if i + 1 < work.num_messages else None
        return None
    return when


def mid_decode(min_step: int) -> When:
    """A decode round's later step, once `min_step` rounds went by."""
    rounds = [0]

    def when(work: MeshWork) -> int | None:
        if work.decode is None or work.decode.num_steps < 2:
            return None
        rounds[0] += 1
        return len(work.prefills) + 1 if rounds[0] > min_step else None
    return when


def any_work(work: MeshWork) -> int | None:
    return 0 if work.num_messages else None


LONG_LP = " ".join(f"v{i}" for i in range(90))  # ~300 tokens: 3 chunks of 128, each scored
HUGE = " ".join(f"h{i}" for i in range(330))  # ~1,150 tokens: past SHARED_PREFILL_TOKENS, a later choice waits
SHARED = " ".join(f"s{i}" for i in range(80))  # a prefix of ~2 chunks two requests share
MORE = {
    "comp-long-lp": ("/v1/completions", {"prompt": LONG_LP, "max_tokens": 12, "ignore_eos": True, "logprobs": 1,
                                         "prompt_logprobs": 2, "return_token_ids": True}),
    "chat-long-lp-n2": (CHAT, {"messages": [{"role": "user", "content": LONG_LP}], "max_tokens": 10, "n": 2,
                               "prompt_logprobs": 1, "logprobs": True, "temperature": 1.0, "seed": 5,
                               "return_token_ids": True}),
    "comp-shared-a": ("/v1/completions", {"prompt": SHARED + " a", "max_tokens": 20, "ignore_eos": True,
                                          "return_token_ids": True}),
    "comp-shared-b": ("/v1/completions", {"prompt": SHARED + " b c", "max_tokens": 20, "ignore_eos": True,
                                          "logprobs": 1, "return_token_ids": True}),
}
MORE["chat-huge-n2"] = (CHAT, {"messages": [{"role": "user", "content": HUGE}], "max_tokens": 12, "n": 2,
                                "temperature": 1.0, "seed": 9, "logprobs": True, "return_token_ids": True})
MORE |= {
    "chat-penalties": (CHAT, {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 30,
                              "min_tokens": 12, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                              "repetition_penalty": 1.2, "bad_words": ["the"], "logit_bias": {"300": 5},
                              "temperature": 0.8, "top_p": 0.9, "seed": 11, "logprobs": True, "top_logprobs": 2,
                              "return_token_ids": True}),
    "comp-echo": ("/v1/completions", {"prompt": "Once upon a time there", "max_tokens": 16, "echo": True,
                                      "logprobs": 1, "min_tokens": 4, "stop_token_ids": [13, 28],
                                      "return_token_ids": True}),
    "comp-repeat": ("/v1/completions", {"prompt": "hi", "max_tokens": 30, "structured_outputs": {"regex": "(ab ){20}"},
                                        "repetition_detection": {"max_pattern_size": 2, "min_count": 6},
                                        "logprobs": 0, "return_token_ids": True}),
}
MORE |= {  # a long shared prefix sent together: the later ones wait for the first's chunks (a shared prefill)
    "comp-huge-a": ("/v1/completions", {"prompt": HUGE + " a", "max_tokens": 12, "ignore_eos": True, "logprobs": 1,
                                        "return_token_ids": True}),
    "comp-huge-b": ("/v1/completions", {"prompt": HUGE + " b c", "max_tokens": 12, "ignore_eos": True,
                                        "return_token_ids": True}),
    "comp-huge-plp": ("/v1/completions", {"prompt": HUGE + " d", "max_tokens": 6, "ignore_eos": True,
                                          "prompt_logprobs": 1, "n": 2, "return_token_ids": True}),
}
ALL = {**BODIES, **MORE}


def request(kind: str, stream: bool, salt: str) -> tuple[str, dict]:
    """`salt`: the prefix cache's, so that a test hits only what it cached itself."""
    path, fields = ALL[kind]
    request = {"model": "smollm2", "temperature": 0.0, **fields, "stream": stream, "cache_salt": salt}
    if stream and path != "/v1/responses":
        request["stream_options"] = {"include_usage": True}
    return path, request


def usage(path: str, stream: bool, status: int, raw: bytes) -> dict | None:
    """The answer's usage less its cached-token details (a recompute may hit another mesh's cache)."""
    if status != 200:
        return None
    if not stream:
        got = json.loads(raw)["usage"]
    else:
        events = [json.loads(line[6:]) for line in raw.decode().split("\n")
                  if line.startswith("data: ") and line != "data: [DONE]"]
        got = events[-1]["response"]["usage"] if path == "/v1/responses" else events[-1]["usage"]
    return {k: v for k, v in got.items() if not k.endswith("_details")}


def full(path: str, stream: bool, status: int, raw: bytes) -> dict:
    out = answer(path, stream, status, raw)
    if "error" not in out:
        out["usage"] = usage(path, stream, status, raw)
    return out


def metric(text: str, name: str) -> float:
    """The sum of a /metrics family's samples (it must have some)."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"no {name} in /metrics"
    return sum(values)


@pytest.fixture(scope="module")
def stack():
    real, in_process.LocalMesh = in_process.LocalMesh, TriggerMesh
    try:
        s = in_process.simulated_stack(4, 64, 2, min_step_deadline_s=FAULT_S, probe_timeout_s=0.5,
                                       no_mesh_wait_s=10.0)
    finally:
        in_process.LocalMesh = real
    s.let_go, s.placed_for_no_one, s.schedulers = set(), [], []
    s.app = build_app(Watched(s.router, s.let_go), s.tok, "smollm2")
    scheduler_for = s.router._scheduler_for

    def made(name, caps):
        sched = scheduler_for(name, caps)
        s.schedulers.append(sched)
        return sched
    s.router._scheduler_for = made
    s.schedulers += [m.scheduler for m in s.router.meshes]
    s.expected = {}
    yield s
    s.close()


def call(stack, kind: str, stream: bool, salt: str):
    path, req = request(kind, stream, salt)
    return path, asgi_call(stack.app, req, asyncio.Event(), "2.3", path)


def expected(stack, kind: str, stream: bool) -> dict:
    if (kind, stream) not in stack.expected:
        path, coro = call(stack, kind, stream, uuid.uuid4().hex)
        stack.expected[kind, stream] = full(path, stream, *stack.run(coro))
        assert "error" not in stack.expected[kind, stream], stack.expected[kind, stream]
        stack.run(in_process.until(lambda: not held(stack.router, stack.schedulers)))
    return stack.expected[kind, stream]


def disarm(stack) -> None:
    """No fault left to fire: what is not fired yet never will."""
    for mesh in stack.meshes:
        mesh.schedule = None


def scrape(stack) -> str:
    async def get():
        from httpx import ASGITransport, AsyncClient
        async with AsyncClient(transport=ASGITransport(app=stack.app), base_url="http://x") as client:
            return (await client.get("/metrics")).text
    return stack.run(get())


CASES = {
    # name: (requests, [(fault, moment)] in turn: each on the mesh that runs the moment first, the next one armed on
    # every mesh once the one before fired)
    "mid-prefill": (["chat-long", "comp-long-lp"], [("raise", lambda: mid_prefill)]),
    "mid-prefill-hang": (["chat-long", "comp-long-lp"], [("hang", lambda: mid_prefill)]),
    "prompt-logprobs": (["comp-long-lp", "chat-long-lp-n2", "comp-lp"], [("vanish", lambda: scoring_prompt)]),
    "first-decode": (["chat", "chat-json", "chat-tool", "comp-n2"], [("raise", lambda: first_decode)]),
    "grammar-mid-decode": (["chat-json", "chat-tool", "chat-json", "resp"], [("vanish", lambda: mid_decode(1))]),
    "n-choices": (["chat-n3", "comp-n2", "chat-long-lp-n2"], [("raise", lambda: mid_decode(0))]),
    "after-prefix-hit": (["comp-shared-a", "comp-shared-b", "comp-shared-b"],
                         [("raise", lambda: after_prefix_hit(set()))]),
    "waiting-for-a-slot": (["chat", "comp", "chat-stop", "chat-n3", "comp-n2", "chat-json"],
                           [("hang", lambda: mid_decode(1))]),
    "huge-n2-mid-prefill": (["chat-huge-n2", "chat"], [("raise", lambda: mid_prefill)]),
    "huge-n2-first-decode": (["chat-huge-n2"], [("vanish", lambda: first_decode), ("raise", lambda: first_decode)]),
    "sampling-state-first-decode": (["chat-penalties", "comp-echo", "comp-repeat", "chat-stop"],
                                    [("raise", lambda: first_decode)]),
    "sampling-state-mid-decode": (["chat-penalties", "comp-echo", "comp-repeat", "chat-stop"],
                                  [("vanish", lambda: mid_decode(1)), ("hang", lambda: mid_decode(0))]),
    "shared-prefill-mid-prefill": (["comp-huge-a", "comp-huge-b", "comp-huge-plp"], [("raise", lambda: mid_prefill)]),
    "shared-prefill-hang": (["comp-huge-a", "comp-huge-b", "comp-huge-plp"], [("hang", lambda: mid_prefill)]),
    "shared-prefill-twice": (["comp-huge-a", "comp-huge-b", "comp-huge-plp"],
                             [("vanish", lambda: mid_prefill), ("raise", lambda: mid_prefill)]),
    "one-then-the-other": (["chat", "chat-long", "chat-json", "comp-n2", "comp-lp"],
                           [("raise", lambda: first_decode), ("vanish", lambda: mid_decode(0))]),
    "last-healthy-mid-prefill": (["chat-long", "comp-long-lp", "chat-tool"],
                                 [("vanish", lambda: mid_prefill), ("raise", lambda: any_work)]),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fault_at_a_chosen_moment_loses_nothing_and_changes_no_answer(stack, case, stream):
    kinds, faults = CASES[case]
    want = [expected(stack, kind, stream) for kind in kinds]
    router = stack.router
    before = scrape(stack)
    failovers = sum(m.failovers for m in router.meshes)

    salt = uuid.uuid4().hex
    schedule = Schedule(faults)
    for mesh in stack.meshes:
        mesh.schedule = schedule

    async def clients():
        calls = [call(stack, kind, stream, salt) for kind in kinds]
        got = await asyncio.gather(*(coro for _, coro in calls))
        disarm(stack)  # before `watched` mends the meshes
        return [full(path, stream, *g) for (path, _), g in zip(calls, got)], list(schedule.fired)

    try:
        (got, fired), left = watched(stack, clients())
    finally:
        disarm(stack)
    assert len(fired) == len(faults), f"not every fault fired: {case}: {fired}"
    assert left == []
    stack.run(in_process.until(lambda: not any(m.runner.slots for m in stack.meshes)))  # no slot state on a mesh
    for kind, got_answer, want_answer in zip(kinds, got, want):
        if "error" in got_answer and len(faults) >= router.config.max_mesh_failures:  # laid on it at each fault
            assert "in a row" in got_answer["body"], got_answer
            continue
        assert got_answer == want_answer, (kind, fired)
        if kind == "chat-json":
            for choice in got_answer.values():
                if isinstance(choice, dict) and choice.get("finish_reason") == "stop":
                    assert isinstance(json.loads(choice["text"]).get("a"), int)
    after = scrape(stack)
    failed = sum(m.failovers for m in router.meshes) - failovers
    assert failed >= len(fired)
    assert metric(after, "meshserve_mesh_failovers_total") - metric(before, "meshserve_mesh_failovers_total") == failed
    tokens = sum(a["usage"].get("completion_tokens", a["usage"].get("output_tokens")) for a in got if "usage" in a)
    assert any("usage" not in a for a in got) or metric(after, "meshserve_generation_tokens_total") - metric(before, "meshserve_generation_tokens_total") \
        == tokens  # (one that failed counts the tokens it streamed before)
    for name in ("meshserve_num_requests_running", "meshserve_num_requests_waiting", "meshserve_kv_blocks_used",
                 "meshserve_mesh_stalled"):  # nothing left, nowhere (held, deferred in the ingress, on a mesh)
        assert metric(after, name) == 0, name
    for name in ("meshserve_prefix_cache_queries_tokens_total", "meshserve_prefix_cache_hits_tokens_total",
                 "meshserve_requests_migrated_total", "meshserve_num_preemptions_total"):  # go on across failovers
        assert metric(after, name) >= metric(before, name), name
    finished = sum(isinstance(k, int) for a in got for k in a)  # each choice is a router request
    assert any("usage" not in a for a in got) or \
        metric(after, "meshserve_requests_total") - metric(before, "meshserve_requests_total") == finished
    # every mesh serves again
    stack.run(in_process.until(lambda: all(m.up for m in router.meshes)))
    rounds = [len(m.round_steps) for m in stack.meshes]  # each mesh serves again: a burst spreads over both

    async def burst():
        return await asyncio.gather(*(coro for _, coro in (call(stack, "chat", stream, salt) for _ in range(4))))
    assert [full(CHAT, stream, *g) for g in stack.run(burst())] == [expected(stack, "chat", stream)] * 4
    assert all(len(m.round_steps) > n for m, n in zip(stack.meshes, rounds))


MOMENTS = {"mid-prefill": lambda: mid_prefill, "scoring-prompt": lambda: scoring_prompt,
           "first-decode": lambda: first_decode, "mid-decode": lambda: mid_decode(1),
           "after-prefix-hit": lambda: after_prefix_hit(set()), "any": lambda: any_work}


async def mend_when_stuck(stack, schedule: Schedule) -> None:
    """Bring a mesh back from its fault once no fault is left to fire, or every mesh is down (else what waits for a
    mesh would wait out no_mesh_wait_s)."""
    while True:
        await asyncio.sleep(0.01)
        router_down = not any(m.up for m in stack.router.meshes)
        for mesh in stack.meshes:
            if mesh.broken and mesh.fault is None and (not schedule.faults or router_down):
                mesh.broken = False
                mesh.unhang.set()
                if not mesh.alive:
                    mesh.restart()


# no shrinking: a failed example leaves what it held in the module's stack
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(faults=st.lists(st.tuples(st.sampled_from(["raise", "hang", "vanish"]), st.sampled_from(sorted(MOMENTS))),
                       min_size=1, max_size=2),
       clients=st.lists(st.tuples(st.sampled_from(sorted(ALL)), st.booleans(),
                                  st.sampled_from([None, None, "disconnect", "cancel"])), min_size=2, max_size=6))
def test_random_faults_at_chosen_moments_while_clients_leave(stack, faults, clients):
    """Faults in turn at the moments drawn, while some clients leave as the first fires (an ASGI disconnect, or
    the task cancelled as Serve does): those that stay get the unfaulted answer (or, past max_mesh_failures faults
    laid on them, the 500 saying so); nothing is held after."""
    want = {(kind, stream): expected(stack, kind, stream) for kind, stream, _ in clients}
    router = stack.router
    salt = uuid.uuid4().hex
    schedule = Schedule([(kind, MOMENTS[moment]) for kind, moment in faults])
    for mesh in stack.meshes:
        mesh.schedule = schedule

    async def one(kind: str, stream: bool, leaves: str | None):
        path, req = request(kind, stream, salt)
        gone = asyncio.Event()
        task = asyncio.create_task(asgi_call(stack.app, req, gone, "2.3", path))
        if leaves is None:
            return full(path, stream, *await task)
        fired = asyncio.create_task(schedule.first.wait())
        await asyncio.wait([task, fired], return_when=asyncio.FIRST_COMPLETED)
        fired.cancel()
        gone.set() if leaves == "disconnect" else task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def run():
        mender = asyncio.create_task(mend_when_stuck(stack, schedule))
        try:
            return await asyncio.gather(*(one(*c) for c in clients))
        finally:
            disarm(stack)  # before `watched` mends the meshes
            mender.cancel()

    try:
        got, left = watched(stack, run())
    finally:
        disarm(stack)
        for mesh in stack.meshes:
            mesh.broken = False
    assert left == []
    stack.run(in_process.until(lambda: not any(m.runner.slots for m in stack.meshes)))  # no slot state on a mesh
    for (kind, stream, _), got_answer in zip(clients, got):
        if got_answer is None:
            continue
        if "error" in got_answer and len(schedule.fired) >= router.config.max_mesh_failures:
            assert "in a row" in got_answer["body"], got_answer
            continue
        assert got_answer == want[kind, stream], (kind, stream, schedule.fired)
