"""What the ingress holds while a request's answer is awaited: what the answer needs (its prompt ids, params, the names
of the tools its calls may name, its echo), not the body it came in, whose size the queues and limits never see."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import pickle
import tracemalloc

import pytest

from deployments.ingress import build_app
from deployments.router_client import EventQueue, merged_tokens_max
from model.tokenizer import text_pieces
from scheduler.sampling import SamplingParams, TokenLogprobs
from scheduler.work import TokenEvent
from tests.fake_router import FakeRouter
from tests.ingress_support import COMPLETION, MAX_LEN, MODEL, eos, make_client, tokenizer  # noqa: F401
from tests.test_link import stalled_client

BIG = 1_000_000  # characters of text the answer does not need
TEXT = ("lorem ipsum dolor sit amet " * (BIG // 27 + 1))[:BIG]
CUT = {"truncate_prompt_tokens": 16}  # vLLM's: the prompt's last 16 tokens are all that is computed
HI = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "description": TEXT[:BIG // 20],
                                           "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
         for i in range(20)]

CASES = {
    "chat, a long prompt cut to 16 tokens": ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}],
                                                                      **CUT}),
    "chat, a long history cut to 16 tokens": ("/v1/chat/completions", {"messages": [
        {"role": ("user", "assistant")[i % 2], "content": TEXT[:1000]} for i in range(BIG // 1000 - 1)], **CUT}),
    "chat, 20 tools of 50 kB": ("/v1/chat/completions", {"messages": HI, "tools": TOOLS, **CUT}),
    "chat, an ignored field": ("/v1/chat/completions", {"messages": HI, "pad": TEXT}),
    "completion, a long prompt cut to 16 tokens": ("/v1/completions", {"prompt": TEXT, **CUT}),
    "completion, 4 long prompts cut to 16 tokens": ("/v1/completions", {"prompt": [TEXT[:BIG // 4]] * 4, **CUT}),
    "completion, an ignored field": ("/v1/completions", {"prompt": "hi", "pad": TEXT}),
    "responses, an ignored field": ("/v1/responses", {"input": "hi", "pad": TEXT}),
}


async def _held(app, router: FakeRouter, path: str, body: dict) -> tuple[int, int]:
    """Bytes traced while the request waits on its router (a stream once it has sent a chunk); and what was traced
    before it came."""
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    raw = [json.dumps({"model": MODEL, **body}).encode()]  # the only reference to the body is the ASGI message's
    sent: list[dict] = []
    chunk = asyncio.Event()

    async def receive() -> dict:
        if raw:
            return {"type": "http.request", "body": raw.pop(), "more_body": False}
        await asyncio.Event().wait()  # the client stays

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            chunk.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("x", 80)}
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    task = asyncio.create_task(app(scope, receive, send))
    while len(router.requests) < prompts or (body.get("stream") and not chunk.is_set()):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the router's first tokens are in
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    router.resume.set()
    await asyncio.wait_for(task, 10)
    assert sent[0]["status"] == 200
    for record in (router.requests, router.continued, router.cancelled):
        record.clear()
    return held, base


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("case", CASES)
def test_an_open_request_holds_what_its_answer_needs_not_its_body(tokenizer, eos, case, stream):
    """The ingress held every request's body for as long as its answer took, twice (Starlette's bytes and the
    parsed JSON or model): a 7.86 MB prompt with truncate_prompt_tokens 16 held 16 MB for a 16-token request, so a
    few clients could drive a replica out of memory at the queue limits the router counts in tokens."""
    path, body = CASES[case]
    body = {**body, "stream": stream}
    router = FakeRouter(tokenizer.encode("Hello world, the answer") + [eos], max_model_len=256, pause_after=2)
    app = build_app(router, tokenizer, MODEL)
    app.state.server.headers_wait_s = 0.05

    async def run() -> tuple[int, int]:
        router.resume.set()
        await _held(app, router, path, body)  # once before: what the first such request leaves (caches, threads)
        router.resume = asyncio.Event()
        held, base = await _held(app, router, path, body)
        gc.collect()
        return held, tracemalloc.get_traced_memory()[0] - base

    gc.collect()
    gc.freeze()  # what was alive before is not this request's: kept out of the collections that time it (~1 s each)
    tracemalloc.start()
    try:
        held, after = asyncio.run(run())
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    assert held < BIG // 10, f"{held:,} bytes held for a body of {BIG:,} characters"
    assert after < BIG // 100, f"{after:,} bytes left once the request ended"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's RSS from /proc")
def test_a_replica_gives_back_what_tokenizing_a_long_prompt_took(tokenizer, eos):
    """The Hugging Face tokenizer's working memory for a long text tokenized whole (~165-240 bytes per byte of text)
    stayed in glibc's per-thread arenas after the request ended: four 6 MB prompts cut by truncate_prompt_tokens
    left an ingress replica at 1.8 GB, where it had started at 0.56 GB, for good."""
    client = make_client(FakeRouter([eos], max_model_len=MAX_LEN), tokenizer)
    text = "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002" * (1_000_000 // 7)  # 3 MB, one line
    assert text_pieces(text) == [text]  # no place to cut it into pieces: tokenized whole
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": "hi"}).status_code == 200
    before = _rss_mb()
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": text, **CUT})
    assert r.status_code == 200, r.text
    assert _rss_mb() - before < 100


class _LinkedRouter(FakeRouter):
    """A FakeRouter whose events come as the router's link delivers them: each one unpickled, its own objects."""

    async def generate(self, *args, **kwargs):
        async for event in super().generate(*args, **kwargs):
            yield pickle.loads(pickle.dumps(event))


async def _tracked_while_open(app, router: FakeRouter, path: str, body: dict) -> int:
    """GC-tracked objects alive (outside the frozen ones) while the request waits on its router, paused mid-answer."""
    raw = [json.dumps({"model": MODEL, **body}).encode()]
    status = []  # the body is read and let go, as a client reads it

    async def receive() -> dict:
        if raw:
            return {"type": "http.request", "body": raw.pop(), "more_body": False}
        await asyncio.Event().wait()  # the client stays

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("x", 80)}
    router.resume, router.paused = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(app(scope, receive, send))
    # every token before the pause was taken from the router (one event a loop turn: a fixed 0.2 s was too short for
    # 1,100 on a loaded box, and the events still on their way counted as held), then handled on the loop's turns
    await asyncio.wait_for(router.paused.wait(), 30)
    await asyncio.sleep(0.05)
    gc.collect()
    tracked = len(gc.get_objects())
    router.resume.set()
    await asyncio.wait_for(task, 30)
    assert status == [200]
    router.requests.clear()
    return tracked


LOGPROBS_CASES = {  # each: the path, the body, and how the answer opens
    "chat": ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 20}, ""),
    "completion": ("/v1/completions", {"prompt": "hi", "logprobs": 20}, ""),
    "responses": ("/v1/responses", {"input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 20},
                  ""),
    # text that may be a tool call is held, its logprobs with it, until the answer ends
    "responses, held as a call's": ("/v1/responses", {"input": "hi", "include": ["message.output_text.logprobs"],
                                                      "top_logprobs": 20, "tools": [
                                        {"type": "function", "name": "get", "parameters": {"type": "object"}}]},
                                    '{"note": "'),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("case", LOGPROBS_CASES)
def test_an_open_answer_holds_no_tracked_objects_per_token(tokenizer, eos, case, stream):
    """A whole answer's logprobs were held as TokenLogprobs (with the link's pickles: an object, its dict and a list
    per token; a Responses stream's as dicts, ~43 per token), all tracked by the cyclic GC, whose full collections
    walk every tracked object the replica holds: 8,192 tokens with 20 top_logprobs, served, made collections of up to
    50 ms that stalled every stream of the replica. Now the ingress holds a bounded number, however long the answer."""
    path, body, opening = LOGPROBS_CASES[case]
    word = tokenizer.encode(" word")[-1]
    counts = []
    gc.collect()
    gc.freeze()  # what was alive before is not this request's
    try:
        router = _LinkedRouter(tokenizer.encode(opening) + [word] * 2000 + [eos], max_model_len=4096)
        app = build_app(router, tokenizer, MODEL)
        app.state.server.headers_wait_s = 0.05
        for tokens in (100, 100, 1100):  # the first once before: what the first such request leaves (caches)
            router.pause_after = tokens
            counts.append(asyncio.run(_tracked_while_open(app, router, path, {**body, "stream": stream,
                                                                               "max_tokens": 2000})))
    finally:
        gc.unfreeze()
    per_token = (counts[2] - counts[1]) / 1000
    assert per_token < 0.05, f"{counts[2] - counts[1]:,} more tracked objects for 1,000 more tokens"


def test_the_tokens_named_in_logprobs_are_kept_untracked(tokenizer, eos):
    """The ingress keeps each token's text and bytes once logprobs name it (up to the whole vocabulary: 128,256 tokens
    with Llama 3's), for good: kept as a tuple holding a list, two objects per token that every full collection of
    the replica walked. Their number is bounded; the collector's work on them need not be."""
    router = FakeRouter([eos], max_model_len=4096)
    client = make_client(router, tokenizer)
    tracked = []
    gc.collect()
    gc.freeze()  # what was alive before is not these requests'
    try:
        for first in (1000, 3000):  # the first once before: what the first such request leaves
            router.answer = list(range(first, first + 2000)) + [eos]  # 2,000 tokens no answer named before
            r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "logprobs": True,
                                                          "max_tokens": 2000})
            assert r.status_code == 200, r.text
            gc.collect()
            tracked.append(len(gc.get_objects()))
    finally:
        gc.unfreeze()
    assert (tracked[1] - tracked[0]) / 2000 < 0.05, f"{tracked[1] - tracked[0]:,} more tracked objects kept"


def test_a_lagging_readers_events_hold_no_tracked_objects_per_token():
    """A request's events wait in its EventQueue while its reader lags (a client that stopped reading: for the rest of
    the answer, which runs on); with logprobs they held 3 tracked objects per token (TokenLogprobs as unpickled from
    the link), walked by every full collection of the replica. Now none per token, and the reader still gets every
    token's logprobs as they came."""
    params = SamplingParams(logprobs=20)
    sent = [TokenLogprobs(i, -0.5 - i, [(t, -1.0 - t / 7) for t in range(20)]) for i in range(3000)]
    # events of 3 tokens, as a flush brings them, each unpickled as the link delivers it
    frames = [pickle.dumps(TokenEvent("r", list(range(i, i + 3)), sent[i:i + 3])) for i in range(0, len(sent), 3)]

    def queued(tokens: int) -> tuple[EventQueue, int]:
        queue = EventQueue(merged_tokens_max(params))
        for frame in frames[:tokens // 3]:
            queue.put_nowait(pickle.loads(frame))
        gc.collect()
        return queue, len(gc.get_objects())

    gc.collect()
    gc.freeze()  # what was alive before is not these events'
    try:
        _, few = queued(300)
        queue, many = queued(3000)
    finally:
        gc.unfreeze()
    # what is left is the events' own: one merged event per 12 tokens (merged_tokens_max), ~9 objects each
    assert (many - few) / 2700 < 1, f"{many - few:,} more tracked objects for 2,700 more tokens"

    async def read() -> list[TokenLogprobs]:
        got = []
        while len(got) < len(sent):
            got += (await queue.get()).logprobs[:]
        return got

    assert asyncio.run(read()) == sent


class _WholeRouter(_LinkedRouter):
    """A _LinkedRouter that counts the answers it has given whole."""

    whole = 0

    async def generate(self, *args, **kwargs):
        async for event in super().generate(*args, **kwargs):
            self.whole += event.finish_reason is not None
            yield event


async def _tracked_while_stalled(app, router: _WholeRouter, body: dict, answers: int) -> int:
    """GC-tracked objects alive (outside the frozen ones) once `answers` answers ran to their end while the client
    of the stream read nothing (uvicorn's flow control holds each write)."""
    task, reading, _ = stalled_client(app, json.dumps({"model": MODEL, **body}).encode())
    router.whole = 0
    while router.whole < answers:
        await asyncio.sleep(0.01)
    gc.collect()
    tracked = len(gc.get_objects())
    reading.set()
    await asyncio.wait_for(task, 30)
    return tracked


@pytest.mark.parametrize("choices", [{"n": 2}, {"stop": ["never in the answer"]}], ids=["n=2", "stop string"])
def test_a_stalled_stream_read_on_by_its_choices_holds_no_tracked_objects_per_token(tokenizer, eos, choices):
    """With n > 1 or a stop string each choice is read on while the client stalls (OpenAIServer.deltas), its deltas
    waiting for the client: their logprobs were TokenLogprobs again (~3.6 tracked objects a token, each choice), all
    walked by every full collection of the replica for as long as the client stalled."""
    word = tokenizer.encode(" word")[-1]
    body = {"prompt": "hi", "logprobs": 20, "max_tokens": 3000, "stream": True, **choices}
    answers = choices.get("n", 1)
    counts = []
    gc.collect()
    gc.freeze()  # what was alive before is not this request's
    try:
        for tokens in (200, 200, 2200):  # the first once before: what the first such request leaves (caches)
            router = _WholeRouter([word] * tokens + [eos], max_model_len=4096)
            app = build_app(router, tokenizer, MODEL)
            app.state.server.headers_wait_s = 0.05
            counts.append(asyncio.run(_tracked_while_stalled(app, router, body, answers)))
    finally:
        gc.unfreeze()
    # what is left is the deltas' own: one a choice per 12 tokens (merged_tokens_max), ~9 objects each
    per_token = (counts[2] - counts[1]) / 2000 / answers
    assert per_token < 2, f"{counts[2] - counts[1]:,} more tracked objects for 2,000 more tokens a choice"
