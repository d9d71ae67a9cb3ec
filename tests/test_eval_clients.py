"""Evaluation and load-generation clients' request shapes and reading habits, against the in-process app over a
FakeRouter: guidellm (sends max_tokens and max_completion_tokens to both endpoints) and `vllm bench serve` (reads
a stream line by line, json.loads every non-blank line but [DONE] after removing "data: ", and takes the first
chunk with choices as the first token). Each reader below is written from that client's documented behaviour."""
from __future__ import annotations

import asyncio
import json

import pytest

from deployments.ingress import build_app
from tests.ingress_support import (CHAT, COMPLETION, MODEL, assert_error, client, eos, router,  # noqa: F401
                                   tokenizer)
from tests.test_ingress import _call_asgi


def guidellm_body(base: dict, max_output_tokens: int) -> dict:
    """guidellm's OpenAI backend body with a request-level output length (same for both endpoints)."""
    return {**base, "max_tokens": max_output_tokens, "max_completion_tokens": max_output_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def vllm_bench_read(body: str) -> list[dict]:
    """`vllm bench serve`'s openai (completions) backend reading a stream: each line stripped, blank ones skipped,
    "data: " removed, every other line but [DONE] parsed as JSON (it skips no SSE comment; llmperf reads alike)."""
    return [json.loads(chunk) for line in body.split("\n") if (chunk := line.strip().removeprefix("data: "))
            and chunk != "[DONE]"]


@pytest.mark.parametrize("base", [CHAT, COMPLETION])
def test_guidellms_body_is_served_with_its_output_length(client, router, base):
    """guidellm sends max_tokens and max_completion_tokens, equal, to /v1/completions too (its default request
    type): it was a 400 there."""
    r = client.post("/v1/completions" if "prompt" in base else "/v1/chat/completions", json=guidellm_body(base, 3))
    assert r.status_code == 200, r.text
    chunks = vllm_bench_read(r.text)
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    ((_, params, _),) = router.requests.values()
    assert params.max_tokens == 3 and params.ignore_eos


def test_completions_max_completion_tokens_alone_is_the_length_and_a_different_max_tokens_is_400(client, router):
    r = client.post("/v1/completions", json={**COMPLETION, "max_completion_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5, "max_completion_tokens": 2}),
                 400, param="max_completion_tokens")
    too_long = {**COMPLETION, "max_completion_tokens": 300}  # the context is 256 tokens
    assert_error(client.post("/v1/completions", json=too_long), 400, param="max_completion_tokens")


@pytest.mark.parametrize("path, base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_vllm_bench_reads_a_stream_whose_first_token_is_slow(client, router, path, base):
    """A first token past the headers' wait (5 s: a benchmark's queue) and keep-alives after it: vllm bench's
    completions reader json.loads every non-blank line, so an SSE comment failed the request."""
    client.app.state.server.headers_wait_s, client.app.state.server.keepalive_s = 0.05, 0.1
    router.queued_s = 0.5
    r = client.post(path, json={**base, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3})
    assert r.status_code == 200
    chunks = vllm_bench_read(r.text)
    assert chunks[0]["choices"] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_a_chat_streams_first_chunk_with_choices_waits_for_its_first_token(router, tokenizer):
    """vllm bench serve's openai-chat backend takes its first chunk with choices (the role chunk) for the first
    token. vLLM sends the role chunk with the first token; here it went out with the headers, at the headers' wait
    (5 s), so a benchmark's queued requests had their time to first token cut to ~5 s."""
    router.pause_after = 0  # the first token waits for `resume`, set once the stream's headers are out
    app = build_app(router, tokenizer, MODEL)
    app.state.server.headers_wait_s, app.state.server.keepalive_s = 0.0, 30.0
    before_first_token: list[bytes] = []

    def on_body(chunk: bytes, disconnected: asyncio.Event):
        if not router.resume.is_set():
            before_first_token.append(chunk)
            asyncio.get_running_loop().call_later(0.1, router.resume.set)

    async def run():
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        await asyncio.wait_for(_call_asgi(app, body, "2.4", on_body), timeout=10)

    asyncio.run(run())
    assert before_first_token and all(b'"choices"' not in b for b in before_first_token), before_first_token
