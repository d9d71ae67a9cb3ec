"""Clients that leave at any moment, through the whole stack in one process (the ingress app over a real Router and a
simulated mesh): queued behind full slots, in a chunked prefill, at a grammar's compile, after some tokens, at the
last one, with n > 1. However they leave (the ASGI disconnect, or the handler cancelled as Serve does), the router
must be left with nothing: every slot free, no KV block in use (the prefix cache may keep them), no request, and a
greedy answer after them the same as before."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from deployments.ingress import build_app
from tests.in_process import InProcessRouter, held, simulated_stack
from tests.ingress_support import asgi_call, asgi_scope

SLOTS = 4
LONG = " ".join(f"w{i}" for i in range(300))  # ~1,100 tokens: 9 prefill chunks of 128
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BODIES = {
    "plain": {"max_tokens": 40, "ignore_eos": True},
    "long": {"max_tokens": 20, "ignore_eos": True},
    "json": {"max_tokens": 30, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
    "tool": {"max_tokens": 30, "tools": [TOOL], "tool_choice": "required"},
    "n3": {"max_tokens": 30, "n": 3, "temperature": 1.0, "seed": 7},
    "stop": {"max_tokens": 40, "stop": ["e"]},
}


@pytest.fixture(scope="module")
def stack():
    s = simulated_stack(SLOTS, 48, max_waiting_requests=4, heartbeat_s=5.0)
    s.app = build_app(InProcessRouter(s.router), s.tok, "smollm2")
    yield s
    s.close()


def chat(kind: str, **fields) -> dict:
    text = LONG if kind == "long" else "tell me a story"
    return {"model": "smollm2", "messages": [{"role": "user", "content": text}], "temperature": 0.0,
            **BODIES[kind], **fields}


async def greedy(app) -> list[int]:
    """A greedy answer's token ids, through the app."""
    sent: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": json.dumps(chat("plain", return_token_ids=True)).encode()}

    async def send(message):
        sent.append(message.get("body", b""))

    await app(asgi_scope(), receive, send)
    return json.loads(b"".join(sent))["choices"][0]["token_ids"]


async def settled(router) -> None:
    for _ in range(1000):  # the mesh's works in flight end, and the cancels reach the scheduler
        if not router.requests and all(not m.scheduler.inflight for m in router.meshes):
            return
        await asyncio.sleep(0.005)


leaver = st.tuples(st.sampled_from(sorted(BODIES)), st.booleans(),  # body, stream
                   st.sampled_from(["disconnect 2.3", "disconnect 2.4", "cancel"]),
                   st.sampled_from([0.0, 0.001, 0.005, 0.02, 0.06, None]))  # when it leaves; None: it stays


# no shrinking: a leak stays in the module's stack, where each shrunk example would wait for the slots it holds
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clients=st.lists(leaver, min_size=1, max_size=8))
def test_clients_that_leave_at_any_moment_leave_the_router_empty(stack, clients, caplog):
    """More clients than slots and queue (some wait, some are refused), leaving at random moments of their requests.
    A client that leaves is no failure of the server: nothing is logged as an ERROR for it."""
    caplog.clear()
    router, app = stack.router, stack.app

    async def one(kind: str, stream: bool, how: str, after: float | None) -> None:
        gone = asyncio.Event()
        spec_version = "2.4" if how == "disconnect 2.4" else "2.3"  # a cancel comes from the server, whatever its spec
        task = asyncio.create_task(asgi_call(app, chat(kind, stream=stream), gone, spec_version))
        if after is not None:
            await asyncio.sleep(after)
            gone.set() if how != "cancel" else task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def run() -> tuple[list[int], list[str]]:
        before = await greedy(app)
        await asyncio.gather(*(one(*c) for c in clients))
        await settled(router)
        return before, held(router)
    before, left = stack.run(asyncio.wait_for(run(), 60))  # bounded: leaked slots would keep requests waiting
    assert left == []
    assert stack.run(asyncio.wait_for(greedy(app), 60)) == before
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
