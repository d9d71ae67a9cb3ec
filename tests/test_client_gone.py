"""A client that leaves is no failure of the ingress: under ASGI spec 2.4 a send to it raises OSError, and whatever
the answer was (a stream's chunk, a whole answer, a 429, a 401), the app ends quietly, logging no ERROR, and its
router request is cancelled. An OSError that no send raised is still the app's own failure."""
from __future__ import annotations

import asyncio
import logging

import pytest

from deployments.client_gone import ClientGone
from deployments.ingress import build_app
from scheduler.errors import MeshFailures, QueueFull
from tests.fake_router import FakeRouter
from tests.ingress_support import (CHAT, COMPLETION, MODEL, asgi_receive, asgi_scope, eos, router,  # noqa: F401
                                     tokenizer)


def drive(app, body: dict, path: str = "/v1/chat/completions", headers: list | None = None) -> list[dict]:
    """Call the app as a 2.4 server whose client left before the response: every send raises OSError."""
    tried: list[dict] = []

    async def send(message):
        tried.append(message)
        raise OSError("the client is gone")

    scope = asgi_scope("2.4", path)
    if headers:
        scope["headers"] = scope["headers"] + headers
    asyncio.run(asyncio.wait_for(app(scope, asgi_receive(body, asyncio.Event()), send), timeout=30))
    return tried


def errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {**CHAT, "stream": True}),
                                        ("/v1/chat/completions", CHAT),
                                        ("/v1/completions", {**COMPLETION, "stream": True}),
                                        ("/v1/responses", {"model": CHAT["model"], "input": "hi", "stream": True}),
                                        ("/v1/responses", {"model": CHAT["model"], "input": "hi"})])
def test_an_answer_to_a_client_gone_ends_quietly_and_a_stream_cancels_its_request(router, tokenizer, caplog, path, body):
    app = build_app(router, tokenizer, CHAT["model"])
    tried = drive(app, body, path)
    assert tried and tried[0]["type"] == "http.response.start" and tried[0]["status"] == 200
    assert errors_logged(caplog) == []
    # a stream's request is cut at its first chunk; a whole answer was done before its send
    assert [reason for _, reason in router.cancelled] == ["abort"] * len(router.requests) * body.get("stream", False)


def test_a_stalled_stream_of_several_choices_ends_when_its_client_goes_not_after_its_backlog(tokenizer, eos):
    """With n > 1 each choice is read on while the client stalls, its deltas waiting for it. Under spec 2.3 (uvicorn)
    a send to a client gone returns at once, so the response took every waiting delta without the loop ever turning:
    the whole backlog was rendered for nobody (40 such streams with logprobs, 150 s stalled, then closed together,
    held the replica's /health 27 s; held longer, Serve killed the replica, every other stream on it with it)."""
    word = tokenizer.encode(" word")[-1]
    finished = []

    class Router(FakeRouter):
        async def generate(self, *args, **kwargs):
            async for event in super().generate(*args, **kwargs):
                finished.append(event.finish_reason is not None)
                yield event

    app = build_app(Router([word] * 600 + [eos], max_model_len=2048), tokenizer, MODEL)
    body = {**COMPLETION, "prompt": "hi", "max_tokens": 600, "n": 2, "logprobs": 20, "stream": True}
    gone = asyncio.Event()
    after: list[bytes] = []  # what went out once the client had gone

    async def send(message):
        if message["type"] != "http.response.body" or not message.get("body"):
            return
        if gone.is_set():
            after.append(message["body"])  # uvicorn: dropped at once
        else:
            await gone.wait()  # flow control holds the write while the client reads nothing

    async def main():
        task = asyncio.create_task(app(asgi_scope("2.3", "/v1/completions"), asgi_receive(body, gone), send))
        while sum(finished) < 2:  # both answers are whole, waiting for the client
            await asyncio.sleep(0.01)
        gone.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    assert len(after) <= 1, f"{len(after)} chunks rendered after the client left"  # was 100, every waiting delta


@pytest.mark.parametrize("refusal, status", [(QueueFull("4 requests are waiting for a slot (limit 4)"), 429),
                                             (MeshFailures("2 model replicas in a row failed computing it"), 500)])
def test_a_refusal_to_a_client_gone_ends_quietly(router, tokenizer, caplog, refusal, status):
    router.refuse = refusal
    tried = drive(build_app(router, tokenizer, CHAT["model"]), CHAT)
    assert [m.get("status") for m in tried] == [status]
    assert errors_logged(caplog) == []


def test_a_key_refusal_to_a_client_gone_ends_quietly(router, tokenizer, caplog):
    tried = drive(build_app(router, tokenizer, CHAT["model"], api_keys=["k"]), CHAT)
    assert [m.get("status") for m in tried] == [401]
    assert errors_logged(caplog) == []


def test_an_oserror_no_send_raised_is_still_the_apps_failure():
    async def app(scope, receive, send):
        raise OSError("a file the app could not read")

    with pytest.raises(OSError):
        asyncio.run(ClientGone(app)(asgi_scope("2.4"), asgi_receive(CHAT, asyncio.Event()), _ignore))


def test_an_oserror_of_the_apps_own_after_the_client_left_is_still_its_failure():
    """A timeout is an OSError too (TimeoutError): one raised after a send failed is not the client's going."""
    async def app(scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except OSError:
            pass
        raise TimeoutError("the router did not answer")

    async def send(message):
        raise OSError("the client is gone")

    with pytest.raises(TimeoutError):
        asyncio.run(ClientGone(app)(asgi_scope("2.4"), asgi_receive(CHAT, asyncio.Event()), send))


@pytest.mark.parametrize("spec_version", ["2.3", "2.0"])
def test_before_spec_2_4_the_app_gets_the_servers_own_send(spec_version):
    """Nothing is added to a chunk's send where servers drop sends to a client gone (uvicorn, Serve: 2.3)."""
    seen = []

    async def app(scope, receive, send):
        seen.append(send)

    asyncio.run(ClientGone(app)(asgi_scope(spec_version), asgi_receive(CHAT, asyncio.Event()), _ignore))
    assert seen == [_ignore]



@pytest.mark.parametrize("asgi", [{"version": "3.0"}, {"version": "3.0", "spec_version": "2.x"}])
def test_a_scope_without_a_numeric_spec_version_is_read_as_2_0(asgi):
    """ASGI's spec_version defaults to "2.0" where a server names none, and one that is not numbers is read as that
    too: such a server's own send goes to the app, nothing added."""
    seen = []

    async def app(scope, receive, send):
        seen.append(send)

    asyncio.run(ClientGone(app)({**asgi_scope(), "asgi": asgi}, asgi_receive(CHAT, asyncio.Event()), _ignore))
    assert seen == [_ignore]


async def _ignore(message) -> None:
    pass
