"""What the ingress tests share: SmolLM2's real tokenizer, a FakeRouter answering ANSWER, the app without Ray,
and checks for OpenAI's error JSON and SSE. Test modules import the fixtures they use from here."""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from deployments.ingress import build_app
from model.embedded import ensure_smollm2
from model.tokenizer import load_tokenizer
from tests.fake_router import FakeRouter

MODEL = "smollm2"
MAX_LEN = 256
ANSWER = "Hello world, the answer is 42. Emoji 🚀 done."
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "Once upon a time"}
ENDPOINTS = [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ensure_smollm2())


@pytest.fixture
def eos(tokenizer) -> int:
    (eos,) = tokenizer.stop_ids
    return eos


@pytest.fixture
def router(tokenizer, eos) -> FakeRouter:
    return FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=MAX_LEN)


def make_client(router, tokenizer, api_keys=None, **options) -> TestClient:
    app = build_app(router, tokenizer, MODEL, api_keys, **options)
    app.state.server.retry_backoff_s = (0.0, 0.0)  # a failing router is retried twice, at once
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(router, tokenizer) -> TestClient:
    return make_client(router, tokenizer)


def sse(response) -> list:
    """The data payloads of an SSE body (comments and the keep-alives' blank lines skipped); the last must be [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = [line[len("data: "):] for line in response.text.split("\n\n") if line and not line.startswith(":")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(response, status: int, param: str | None = None) -> dict:
    """OpenAI's error JSON with this status; `param` names the field, in the message too."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"], error
    return error


def post(client, path: str, body: dict):
    """POST with Python's own JSON encoder, which writes what httpx's refuses (NaN, lone surrogates)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def gbnf_chain(n: int) -> str:
    """n GBNF rules, each naming the next, as densely as text allows: llguidance's conversion to Lark takes
    quadratic time (6,500 rules, in 64 KB, take 2 s)."""
    letters = "abcdefghijklmnopqrstuvwxyz"

    def name(i: int) -> str:
        return letters[i // 676 % 26] + letters[i // 26 % 26] + letters[i % 26]
    return "root::=aaa\n" + "".join(f"{name(i)}::={name(i + 1)}\n" for i in range(n)) + f'{name(n)}::="a"\n'


def lark_chain(n: int) -> str:
    """A Lark grammar of n rules, each naming the next, the last "x": with the shortest names, as dense as
    text allows (8,000 rules are 64 KB), so llguidance's compiler recurses n deep."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    names = list(letters) + [a + b for a in letters for b in letters]
    names = (names + [a + b for a in names[26:] for b in letters])[:n + 1]
    return f"start: {names[0]}\n" + "".join(f"{a}:{b}\n" for a, b in zip(names, names[1:])) + f'{names[-1]}:"x"\n'


def on_event_loop() -> bool:
    """Whether the caller runs on an event loop's thread (the app's, under TestClient), not a worker thread."""
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def asgi_scope(spec_version: str = "2.3", path: str = "/v1/chat/completions") -> dict:
    """An HTTP POST of JSON to the app, as an ASGI server hands it over."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
            "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [(b"content-type", b"application/json")], "scheme": "http", "server": ("test", 80),
            "client": ("test", 1234), "root_path": ""}


def asgi_receive(body: dict, gone: asyncio.Event):
    """An ASGI server's receive for a POST of `body`: the body, then nothing until `gone` is set (the client left),
    then the disconnect."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}
    return receive


async def asgi_call(app, body: dict, gone: asyncio.Event, spec_version: str = "2.3",
                    path: str = "/v1/chat/completions") -> tuple[int | None, bytes]:
    """Drive the app as an ASGI server does, whose client goes once `gone` is set: receive says so then, and under
    spec 2.4 (nothing listens for it there) a send after it raises OSError, as a write to a closed socket. Returns
    the status and the body sent."""
    status, sent = None, []

    async def send(message):
        nonlocal status
        if gone.is_set() and spec_version == "2.4":
            raise OSError("the client is gone")
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            sent.append(message.get("body", b""))

    await app(asgi_scope(spec_version, path), asgi_receive(body, gone), send)
    return status, b"".join(sent)
