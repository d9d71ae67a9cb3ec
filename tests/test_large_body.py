"""Large request bodies are parsed and validated off the event loop (deployments/large_body.py), with the answers
and errors FastAPI's own path gives."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest

from deployments import protocol
from tests.ingress_support import MODEL, client, eos, on_event_loop, router, tokenizer  # noqa: F401

HI = {"role": "user", "content": "hi"}
PAD = "x" * 70_000  # an ignored field that makes a body larger than large_body.OFF_LOOP_BYTES


def test_a_large_body_is_parsed_and_validated_off_the_event_loop(client, monkeypatch):
    """FastAPI parsed and validated it on the loop, which every stream of the replica shares: 5.8 MB of tools
    held them all ~0.7 s."""
    loads, seen = json.loads, []

    def spy_loads(*args, **kwargs):
        seen.append(("json.loads", on_event_loop()))
        return loads(*args, **kwargs)

    def profile(frame, event, _arg):  # a validator of every message's text: pydantic runs it where it validates
        if event == "call" and frame.f_code is protocol._check_unicode.__code__:
            seen.append(("validate", on_event_loop()))

    monkeypatch.setattr(json, "loads", spy_loads)
    threading.setprofile(profile)  # every thread started from now: TestClient's loop, the body thread
    try:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1,
                                                               "messages": [HI] * 4000})
    finally:
        threading.setprofile(None)
    assert response.status_code in (200, 400), response.text  # 4,000 messages may not fit the test's context
    assert {step for step, _ in seen} >= {"json.loads"}
    assert not [step for step, on_loop in seen if on_loop], seen[:5]


def _small_and_large(body: dict | bytes) -> list[bytes]:
    if isinstance(body, bytes):
        return [body, body[:-1] + b', "pad": "' + PAD.encode() + b'"}']
    return [json.dumps(body).encode(), json.dumps({**body, "pad": PAD}).encode()]


@pytest.mark.parametrize("path, body, content_type", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [HI], "max_tokens": 1}, "application/json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [HI, {"role": "user", "content": 5}]}, "application/json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [HI], "logit_bias": {str(i): 1 for i in range(2000)}},
     "application/json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [HI], "temperature": float("nan")}, "application/json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
     "application/json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "application/json"),
    ("/v1/chat/completions", b'{"model": "smollm2", "messages": [}', "application/json"),
    ("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff"}]}',
     "application/json"),
    ("/v1/chat/completions", b'{"model": "smollm2", "n": ' + b"1" * 5000 + b'}', "application/json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [HI]}, "text/plain"),
    ("/v1/completions", b"not JSON at all", "text/plain"),  # not parsed, large or small: no JSON error
    ("/v1/chat/completions", {"model": MODEL, "messages": [HI], "max_tokens": 1}, "application/vnd.api+json"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, "application/json"),
    ("/v1/responses", {"model": MODEL, "input": [{"type": "reasoning"}]}, "application/json"),
    ("/v1/responses", {"model": MODEL, "input": "hi", "temperature": 5}, "application/json"),
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 1}, "application/json"),
    ("/tokenize", {"model": MODEL, "prompt": "hi", "messages": [HI]}, "application/json"),
    ("/detokenize", {"model": MODEL, "tokens": [1, 2.5]}, "application/json"),
])
def test_a_large_body_gets_the_answer_a_small_one_does(client, path, body, content_type):
    small, large = (client.post(path, content=b, headers={"content-type": content_type})
                    for b in _small_and_large(body))
    assert large.status_code == small.status_code, (small.text, large.text)
    if small.status_code >= 400:
        assert large.json() == small.json()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/invocations", "/tokenize"])
@pytest.mark.parametrize(("body", "reason"), [
    (lambda n: b"[" * n + b"]" * n, "JSON nested too deeply"),  # json.loads's RecursionError, no ValueError
    (lambda n: b'{"model": "smollm2", "prompt": "hi", "seed": ' + b"9" * n + b"}", "Exceeds the limit (4300 digits)")])
def test_json_python_cannot_read_is_a_400_that_says_why(client, path, body, reason):
    """Past the recursion limit, or an integer longer than int() takes, is a 400 whatever the body's size: the thread's
    parse of a large body let the RecursionError through as a 500 with a logged traceback, and both parses answered
    FastAPI's "There was an error parsing the body", which says nothing of what was wrong."""
    for n in (5_000, 70_000):
        response = client.post(path, content=body(n), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith(f"The body cannot be read: {reason}") and ";" not in error["message"], error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize", "/invocations", "/v1/responses"])
def test_a_client_gone_mid_body_gets_fastapis_400_not_an_error(client, path):
    """A body is read before FastAPI's handler now, outside the try that turns a ClientDisconnect into its 400: every
    client that left mid-upload was a 500, its traceback logged (and raised on to Serve's replica). /invocations reads
    its body itself, and was that 500 still."""
    messages = [{"type": "http.request", "body": b'{"model": "smollm2", "mess', "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("x", 80)}
    asyncio.run(client.app(scope, receive, send))  # raised ClientDisconnect
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [400]
