"""Mesh faults and clients that leave, together, through the whole stack in one process (the ingress app over a real
Router and two simulated meshes). While clients come and go (some leave at random moments, some at a mesh's fault,
some stay), meshes raise in a step, hang past their step deadline, or vanish and come back as a new incarnation.

The promises checked after each schedule: no request is lost (a client that stayed gets the answer an unfaulted run
gives, token for token, streamed or not: nothing repeated or dropped across a failover), a request whose client left
is never placed on a mesh again (work for no one), the router and every scheduler it made (the failed ones too) hold
nothing, and no ERROR is logged but a mesh's own failure."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from deployments.ingress import build_app
from deployments.router import Router
from tests.in_process import HELD_KEYS, InProcessRouter, router_held, scheduler_held, simulated_stack
from tests.ingress_support import asgi_call

SLOTS = 4
MESHES = 2
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT, COMP, RESP = "/v1/chat/completions", "/v1/completions", "/v1/responses"
LONG = " ".join(f"w{i}" for i in range(100))  # ~370 tokens: 3 prefill chunks of 128
# (path, body): greedy, or seeded (the sampler draws from (seed, position): unchanged by a recompute)
BODIES = {
    "chat": (CHAT, {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 40,
                    "ignore_eos": True, "return_token_ids": True}),
    "chat-long": (CHAT, {"messages": [{"role": "user", "content": LONG}], "max_tokens": 20, "ignore_eos": True,
                         "return_token_ids": True}),
    "chat-n3": (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "n": 3,
                       "temperature": 1.0, "seed": 7, "return_token_ids": True}),
    "chat-json": (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "return_token_ids": True,
                         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
    "chat-tool": (CHAT, {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 30, "tools": [TOOL],
                         "tool_choice": "required", "return_token_ids": True}),
    "comp": (COMP, {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "return_token_ids": True}),
    "chat-stop": (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stop": ["e"],
                         "ignore_eos": True, "logprobs": True, "top_logprobs": 1, "return_token_ids": True}),
    "comp-lp": (COMP, {"prompt": "Once upon a time", "max_tokens": 30, "ignore_eos": True, "logprobs": 2,
                       "prompt_logprobs": 1, "return_token_ids": True}),
    "comp-n2": (COMP, {"prompt": ["a b", "c d e"], "max_tokens": 25, "n": 2, "temperature": 1.0, "seed": 3,
                       "return_token_ids": True}),
    "resp": (RESP, {"input": "tell me a story", "max_output_tokens": 40}),
}
FAULT_S = 0.3  # min_step_deadline_s: a hung work fails past it
# the router's own lines on a mesh's failure, and on the requests it held that no mesh came back for
ALLOWED_ERRORS = ("mesh %s failed", "%d meshes in a row failed", "%d held requests failed")


def body(kind: str, stream: bool) -> tuple[str, dict]:
    path, fields = BODIES[kind]
    return path, {"model": "smollm2", "temperature": 0.0, **fields, "stream": stream}


def sse(raw: bytes) -> list[dict | None]:
    """An SSE body's data payloads; a last [DONE] is None."""
    lines = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    done = [None] if lines and lines[-1] == "[DONE]" else []
    return [json.loads(line) for line in lines if line != "[DONE]"] + done


def answer(path: str, stream: bool, status: int | None, raw: bytes) -> dict:
    """What a client got, as a comparable dict: per choice index its tokens, text, logprobs, prompt_logprobs and
    finish_reason; or the error."""
    if status != 200:
        return {"error": status, "body": raw.decode(errors="replace")}
    if path == RESP:
        return _response(stream, raw)
    if not stream:
        choices = json.loads(raw)["choices"]
        return {c["index"]: {"token_ids": c["token_ids"], "finish_reason": c["finish_reason"],
                             "text": _text(c["message"]) if path == CHAT else c["text"],
                             "logprobs": _logprobs(c), "prompt_logprobs": c.get("prompt_logprobs")} for c in choices}
    chunks = sse(raw)
    if chunks[-1] is not None:  # no [DONE]: the stream broke
        return {"error": "no [DONE]", "body": raw.decode(errors="replace")}
    out: dict = {}
    for chunk in chunks[:-1]:
        if "error" in chunk:
            return {"error": "in stream", "body": json.dumps(chunk)}
        for c in chunk["choices"]:
            s = out.setdefault(c["index"], {"token_ids": [], "finish_reason": None, "text": "", "logprobs": [],
                                            "prompt_logprobs": c.get("prompt_logprobs")})  # its first chunk's
            assert s["finish_reason"] is None, f"choice {c['index']} went on after its finish: {chunk}"
            s["token_ids"] += c.get("token_ids") or []
            s["text"] += _text(c["delta"]) if path == CHAT else c["text"]
            s["logprobs"] += _logprobs(c)
            s["finish_reason"] = c.get("finish_reason")
    return out


def _logprobs(choice: dict) -> list:
    """A chat or completion choice's (token, logprob) pairs."""
    lps = choice.get("logprobs") or {}
    if "content" in lps:
        return [(e["token"], e["logprob"]) for e in lps["content"] or []]
    return list(zip(lps.get("tokens", []), lps.get("token_logprobs", [])))


def _text(message: dict) -> str:
    calls = message.get("tool_calls") or []
    return (message.get("content") or "") + "".join(
        (c.get("function", {}).get("name") or "") + (c.get("function", {}).get("arguments") or "") for c in calls)


def _response(stream: bool, raw: bytes) -> dict:
    if not stream:
        response = json.loads(raw)
    else:
        events = sse(raw)
        if events[-1] is None:  # a Responses stream has no [DONE]
            return {"error": "[DONE] in a Responses stream", "body": raw.decode(errors="replace")}
        if events[-1]["type"] not in ("response.completed", "response.incomplete"):
            return {"error": "in stream", "body": json.dumps(events[-1])}
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        response = events[-1]["response"]
        text = "".join(part["text"] for item in response["output"] for part in item.get("content", []))
        assert deltas == text, f"the deltas {deltas!r} are not the final text {text!r}"
    items = [(item["type"], item.get("name"), item.get("arguments"),
              "".join(part["text"] for part in item.get("content", []))) for item in response["output"]]
    return {0: {"status": response["status"], "output": items, "tokens": response["usage"]["output_tokens"]}}


class Watched(InProcessRouter):
    """The router as the ingress reaches it, noting each request the ingress let go of: its client left, it failed,
    or a stop string ended it here."""

    def __init__(self, router: Router, let_go: set[str]):
        super().__init__(router)
        self.let_go = let_go

    async def cancel(self, request_id: str, reason: str = "abort") -> None:
        self.let_go.add(request_id)
        await super().cancel(request_id, reason)


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith(ALLOWED_ERRORS):
            self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def stack():
    s = simulated_stack(SLOTS, 64, MESHES, min_step_deadline_s=FAULT_S, probe_timeout_s=0.5, no_mesh_wait_s=10.0)
    s.let_go, s.placed_for_no_one, s.schedulers = set(), [], []
    s.app = build_app(Watched(s.router, s.let_go), s.tok, "smollm2")
    router = s.router
    submit_to_best, hold, scheduler_for = router._submit_to_best, router._hold, router._scheduler_for

    def placed(meshes, digests, request_id, *args, **kwargs):
        if request_id in s.let_go:
            s.placed_for_no_one.append(request_id)
        return submit_to_best(meshes, digests, request_id, *args, **kwargs)

    def holding(request_id, *args):
        if request_id in s.let_go:
            s.placed_for_no_one.append(f"{request_id} (held)")
        return hold(request_id, *args)

    def made(name, caps):  # every scheduler, the failed ones too: a drain must leave them empty
        sched = scheduler_for(name, caps)
        s.schedulers.append(sched)
        return sched
    router._submit_to_best, router._hold, router._scheduler_for = placed, holding, made
    s.schedulers += [m.scheduler for m in router.meshes]

    async def unfaulted() -> dict:
        out = {}
        for kind in BODIES:
            for stream in (False, True):
                path, request = body(kind, stream)
                out[kind, stream] = answer(path, stream, *await asgi_call(s.app, request, asyncio.Event(), "2.3", path))
                assert "error" not in out[kind, stream], out[kind, stream]
        return out
    s.expected = s.run(unfaulted())
    yield s
    s.close()


def held(router: Router, schedulers) -> list[str]:
    """What the router, and each scheduler it made, still hold for requests."""
    out = router_held(router) + [f"{mesh.name} down: {mesh.down_reason}" for mesh in router.meshes if not mesh.up]
    current = {id(m.scheduler) for m in router.meshes}
    for i, sched in enumerate(schedulers):
        name = f"scheduler {i}" + ("" if id(sched) in current else " (failed over)")
        out += scheduler_held(name, sched, (*HELD_KEYS, "inflight_works"))
    return out


# a mesh's fault: (kind, results it sends first, seconds until it is back); vanish-idle: killed at that time
fault = st.tuples(st.sampled_from(["raise", "hang", "vanish", "vanish-idle"]), st.integers(0, 24),
                  st.sampled_from([0.0, 0.05, 0.3]))
# a client: body, stream, how it leaves, when it comes (s), when it leaves: seconds after it came, "fault" (at the
# first fault), or None (it stays)
client = st.tuples(st.sampled_from(sorted(BODIES)), st.booleans(),
                   st.sampled_from(["disconnect 2.3", "disconnect 2.4", "cancel"]),
                   st.sampled_from([0.0, 0.0, 0.02, 0.1]),
                   st.sampled_from([None, None, None, 0.0, 0.005, 0.03, 0.1, "fault"]))


async def break_mesh(mesh, faults: list[tuple[str, int, float]], fired: asyncio.Event) -> None:
    """Arm `faults` on `mesh` one after the other; once one fires, bring the mesh back after its back_s (a hang lasts
    until then)."""
    for kind, after, back_s in faults:
        if kind == "vanish-idle":
            await asyncio.sleep(after / 200)
            mesh.vanish()
        else:
            mesh.unhang = asyncio.Event()
            mesh.inject(kind, after)
            while mesh.fault is not None:
                await asyncio.sleep(0.002)
        fired.set()
        await asyncio.sleep(back_s)
        mesh.unhang.set()
        if not mesh.alive:
            mesh.restart()


def mend(stack) -> None:
    """Every fault not fired is disarmed; every mesh is back."""
    for mesh in stack.meshes:
        mesh.fault = None
        mesh.unhang.set()
        if not mesh.alive:
            mesh.restart()


def watched(stack, clients: Awaitable[list]) -> tuple[list, list[str]]:
    """Run `clients` (30 s at most: a hang fails here), then mend every mesh and wait for the router to let go of
    everything. Returns what the clients got and what is left anywhere: what the router or a scheduler holds, a
    request placed after its client left, an ERROR that is not a mesh's failure, an exception no task retrieved."""
    router, errors, loop_errors = stack.router, Errors(), []
    stack.placed_for_no_one.clear()

    async def run() -> list:
        try:
            return await asyncio.wait_for(clients, 30)
        finally:
            mend(stack)
            for _ in range(2000):  # every mesh back up, its works in flight ended, the cancels in
                if not held(router, stack.schedulers):
                    break
                await asyncio.sleep(0.005)

    loggers = [logging.getLogger(), logging.getLogger("ray.serve")]  # the product's logger does not propagate
    for logger in loggers:
        logger.addHandler(errors)
    stack.loop.set_exception_handler(lambda _, context: loop_errors.append(str(context.get("message"))))
    try:
        got = stack.run(run())
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
        stack.loop.set_exception_handler(None)
    left = held(router, stack.schedulers) + [f"placed for no one: {rid}" for rid in stack.placed_for_no_one]
    return got, left + errors.records + loop_errors + [f"task died: {t!r}" for t in router.tasks if t.done()]


# no shrinking: each shrunk example would wait out what a failed one left in the module's stack
@settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(faults=st.lists(st.lists(fault, max_size=2), min_size=MESHES, max_size=MESHES).filter(any),  # per mesh
       clients=st.lists(client, min_size=2, max_size=10))
def test_clients_that_stay_get_their_whole_answer_and_those_that_leave_leave_nothing(stack, faults, clients):
    router = stack.router
    fired = asyncio.Event()
    failovers = sum(m.failovers for m in router.meshes)

    async def one(kind: str, stream: bool, how: str, arrives: float, leaves) -> tuple | None:
        await asyncio.sleep(arrives)
        gone = asyncio.Event()
        path, request = body(kind, stream)
        task = asyncio.create_task(asgi_call(stack.app, request, gone, how.split()[-1] if how != "cancel" else "2.3", path))
        if leaves is None:
            return kind, stream, answer(path, stream, *await task)
        waited = asyncio.create_task(fired.wait() if leaves == "fault" else asyncio.sleep(leaves))
        await asyncio.wait([task, waited], return_when=asyncio.FIRST_COMPLETED)
        waited.cancel()
        gone.set() if how != "cancel" else task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def run() -> list:
        breakers = [asyncio.create_task(break_mesh(mesh, f, fired)) for mesh, f in zip(stack.meshes, faults)]
        try:
            return await asyncio.gather(*(one(*c) for c in clients))
        finally:
            for task in breakers:
                task.cancel()
            await asyncio.gather(*breakers, return_exceptions=True)

    got, left = watched(stack, run())
    assert left == []
    for kind, stream, got_answer in filter(None, got):
        if "error" in got_answer:  # only a request that was in the failures of two meshes in a row may fail
            failed = sum(m.failovers for m in router.meshes) - failovers  # a deadline missed on a busy box counts
            assert failed >= router.config.max_mesh_failures and "in a row" in got_answer["body"], got_answer
        else:
            assert got_answer == stack.expected[kind, stream], (kind, stream)


def test_with_every_mesh_gone_past_no_mesh_wait_s_clients_that_stay_get_503_and_those_that_leave_leave_nothing(stack):
    """Both meshes die mid-answer and stay gone past no_mesh_wait_s, while some clients leave: a client that stayed
    gets OpenAI's 503 error JSON (its headers not sent yet) or its stream's error event, never a 500 or a stream cut
    without one; the router is left with nothing once the meshes are back; an answer after that is whole."""
    router = stack.router
    wait_s, router.config.no_mesh_wait_s = router.config.no_mesh_wait_s, 0.3
    kinds = [(kind, stream) for kind in ("chat", "comp-n2", "resp") for stream in (False, True)]

    async def one(kind: str, stream: bool, leaves: float | None) -> dict | None:
        path, request = body(kind, stream)
        task = asyncio.create_task(asgi_call(stack.app, request, asyncio.Event(), "2.3", path))
        if leaves is None:
            return answer(path, stream, *await task)
        await asyncio.sleep(leaves)
        task.cancel()  # as Serve does (before its headers, nothing in the app reads an ASGI disconnect)
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def run() -> list:  # those that leave go while their requests are held (not yet past no_mesh_wait_s)
        return await asyncio.gather(*(one(k, s, None) for k, s in kinds), *(one(k, s, 0.15) for k, s in kinds))

    for mesh in stack.meshes:
        mesh.inject("vanish", after=12)  # mid-answer: some streams have sent their headers
    try:
        got, left = watched(stack, run())
    finally:
        router.config.no_mesh_wait_s = wait_s
    assert left == []
    for (kind, stream), got_answer in zip(kinds, got):
        assert got_answer["error"] in (503, "in stream"), (kind, stream, got_answer)
        error = json.loads(got_answer["body"])
        error = error.get("error", error)  # a chunk's {"error": {...}}, a Responses stream's event, or the JSON body
        assert error["code"] == "service_unavailable" or error.get("type") == "service_unavailable", error
    path, request = body("chat", False)
    assert answer(path, False, *stack.run(asgi_call(stack.app, request, asyncio.Event(), "2.3", path))) == \
        stack.expected["chat", False]
