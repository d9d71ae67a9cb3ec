"""The router lost at chosen moments of an answer, from the ingress's side (a FakeRouter whose streams die): before
the first token, mid-stream, inside a stop string, between the last token and its finish, k times, with n choices,
with the client leaving at that moment. The client's answer equals the unfailed one (text, token ids, logprobs,
finish, usage, prompt logprobs once), /metrics counts the request once, and nothing is left open."""
from __future__ import annotations

import asyncio
import itertools

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import httpx

import tests.in_process as in_process
from deployments.ingress import build_app
from deployments.router import Router, RouterConfig
from model.simulated import SimulatedBackend
from scheduler.work import TokenEvent
from tests.in_process import InProcessRouter
from tests.local_mesh import LocalMesh
from tests.ingress_support import CHAT, COMPLETION, MODEL, asgi_call, make_client, sse
from tests.ingress_support import router, tokenizer, eos  # noqa: F401


def _counts(client) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples
            if s.name.startswith("vllm:") and not s.name.endswith(("_bucket", "_created"))}


def _families(app) -> list:
    return [s for f in text_string_to_metric_families(TestClient(app).get("/metrics").text) for s in f.samples]


def _answer(client, path, body, stream):
    r = client.post(path, json={**body, "stream": stream})
    assert r.status_code == 200, r.text
    if not stream:
        out = r.json()
        out.pop("id"), out.pop("created")
        return out
    chunks = sse(r)
    text, ids, lps, finish, usage, plp = {}, {}, {}, {}, None, {}
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
        for ch in c.get("choices", []):
            i = ch["index"]
            text[i] = text.get(i, "") + (ch.get("text") or (ch.get("delta") or {}).get("content") or "")
            ids.setdefault(i, []).extend(ch.get("token_ids") or [])
            lp = ch.get("logprobs")
            if lp:
                lps.setdefault(i, []).extend(lp.get("content") or lp.get("tokens") or [])
            if ch.get("finish_reason"):
                finish[i] = (ch["finish_reason"], ch.get("stop_reason"))
            if ch.get("prompt_logprobs") is not None:
                assert i not in plp, "prompt_logprobs sent twice"
                plp[i] = ch["prompt_logprobs"]
    return text, ids, lps, finish, usage, plp


CASES = [
    ("/v1/completions", {**COMPLETION, "max_tokens": 12, "logprobs": 2, "return_token_ids": True}),
    ("/v1/completions", {**COMPLETION, "max_tokens": 20, "stop": [" answer is"]}),
    ("/v1/completions", {**COMPLETION, "max_tokens": 20, "stop": [" answer is"], "include_stop_str_in_output": True}),
    ("/v1/completions", {**COMPLETION, "max_tokens": 12, "prompt_logprobs": 1, "n": 2, "seed": 3}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 14, "logprobs": True, "top_logprobs": 2, "n": 3}),
    ("/v1/completions", {**COMPLETION, "max_tokens": 12, "echo": True, "logprobs": 1}),
]


DEATHS = [[0], [5], [5, 5, 7], [0, 4, 4]]  # each stream in turn dies before that token (a list: k losses)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case, dies", [(c, d) for c in range(len(CASES)) for d in DEATHS
                                        if CASES[c][1].get("n", 1) == 1 or len(d) == 1])  # n: each choice dies once
def test_router_losses_change_neither_the_answer_nor_the_counts(router, tokenizer, case, dies, stream):
    """Before the first token (the prompt's logprobs sent again), mid-stream, inside a stop string, k times with and
    without tokens between: the answer equals the unfailed one, prompt_logprobs come once per choice, and the request,
    its prompt and its tokens count once in /metrics."""
    path, body = CASES[case]
    if stream:
        body = {**body, "stream_options": {"include_usage": True}}
    client = make_client(router, tokenizer)
    want = _answer(client, path, body, stream)
    once = _counts(client)
    router.die_after = list(dies) * body.get("n", 1)
    assert _answer(client, path, body, stream) == want
    twice = _counts(client)
    for key, value in once.items():
        if key[0] in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total"):
            assert twice[key] == 2 * value, key
    assert router.continuations  # the losses happened (a stop may end the answer before the later ones)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", [CASES[0], CASES[4]])
def test_a_router_lost_between_the_last_token_and_its_finish_ends_the_answer_as_before(router, tokenizer, path, body,
                                                                                       stream):
    """Every token delivered, the finish lost with the router: the continuation carries max_tokens tokens, which the
    new router answers with the finish alone ("length"); nothing is generated again or twice."""
    router.finish_apart = True
    client = make_client(router, tokenizer)
    want = _answer(client, path, body, stream)
    router.die_after = [body["max_tokens"]] * body.get("n", 1)
    assert _answer(client, path, body, stream) == want
    assert sorted(len(ids) for rid, ids in router.continued.items() if "retry" in rid) == (
        [body["max_tokens"]] * body.get("n", 1))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_a_client_gone_as_the_router_is_lost_leaves_nothing_behind(router, tokenizer, stream, n):
    """The client leaves at the moment of the loss (a stream's disconnect; a whole answer's handler cancelled, as
    Serve's proxy does), while its choices wait to be resubmitted: the wait ends, nothing stays open in the router,
    no task of it is left, and it counts as an abort."""
    gone, handler = asyncio.Event(), []

    async def died(request_id: str) -> None:
        gone.set() if stream else handler[0].cancel()  # then the stream dies

    router.die_after = [3] * n
    router.on_death = died
    app = build_app(router, tokenizer, MODEL)
    app.state.server.retry_backoff_s = (3600.0,)  # only the client's leaving ends this wait

    async def run() -> set:
        before = asyncio.all_tasks()
        handler.append(asyncio.create_task(asgi_call(app, {**COMPLETION, "max_tokens": 8, "n": n, "stream": stream},
                                                     gone, path="/v1/completions")))
        await asyncio.wait_for(asyncio.gather(handler[0], return_exceptions=True), 60)
        for _ in range(5):
            await asyncio.sleep(0)
        return asyncio.all_tasks() - before - {asyncio.current_task()}
    assert asyncio.run(run()) == set()
    assert set(router.requests) <= {rid for rid, _ in router.cancelled}
    counts = {s.labels["finished_reason"]: s.value for s in _families(app) if s.name == "vllm:request_success_total"}
    assert counts["abort"] == n and sum(counts.values()) == n


class _LosingRouter:
    """A real Router (in_process.InProcessRouter) whose link is lost once per choice, when its answer is `short`
    tokens short of its max_tokens: the ingress resubmits prompt + those tokens as a continuation."""

    def __init__(self, router, short: int):
        self.inner, self.short, self.lost = InProcessRouter(router), short, set()

    async def generate(self, request_id, prompt_ids, params, salt=None, output_ids=(), continuation=False):
        have, base, at = len(output_ids), request_id.split("-retry")[0], params.max_tokens - self.short
        async for event in self.inner.generate(request_id, prompt_ids, params, salt, output_ids, continuation):
            if base not in self.lost and have + len(event.token_ids) >= at:
                self.lost.add(base)
                yield TokenEvent(request_id, event.token_ids[:at - have])
                raise ConnectionError("the router's link closed")
            have += len(event.token_ids)
            yield event

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_router_lost_short_of_the_context_end_changes_no_answer(tokenizer):
    """Through the ingress over a real Router of two 128-token simulated meshes, n 2, streamed and whole: a
    completion of a 40-token prompt with max_tokens 88 (to the context end) and a chat without max_tokens (the
    ingress gives it the room left); the router is lost when each choice is 1, 2 or a block short of the end. Text,
    token ids, finish ("length") and usage equal the unfaulted answer's."""
    tok = tokenizer  # the module's (loading it takes seconds)
    stack = in_process.Stack(tok, lambda: SimulatedBackend(time_scale=0.001, num_slots=2, kv_groups=1, num_blocks=16,
                                                           max_seq_len=128, vocab_size=tok.vocab_size), 2)
    try:
        cases = [("/v1/completions", {"prompt": [7] * 40, "max_tokens": 88}),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 30}]})]
        for short, (path, case) in itertools.product((1, 2, 64), cases):
            losing = build_app(_LosingRouter(stack.router, short), tok, MODEL)
            losing.state.server.retry_backoff_s = (0.0, 0.0)
            lossy = httpx.AsyncClient(transport=httpx.ASGITransport(app=losing), base_url="http://x", timeout=60)
            for stream in (False, True):
                body = {"model": MODEL, "n": 2, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
                        "stream": stream, **case, **({"stream_options": {"include_usage": True}} if stream else {})}
                answers = []
                for client in (stack.client, lossy):
                    r = stack.run(client.post(path, json=body))
                    assert r.status_code == 200, r.text
                    answers.append(_merged(r, stream))
                want, got = answers
                usage = want["usage"]
                assert want["finish"] == {0: "length", 1: "length"} and usage["total_tokens"] == 2 * 128 - usage[
                    "prompt_tokens"]
                assert got == want
            assert len(losing.state.server.router.lost) == 4 and stack.router.requests == {}
    finally:
        stack.close()


def _merged(r, stream: bool) -> dict:
    """A completion's or chat's choices (text, token ids, finish) and usage, from a whole answer or a stream."""
    chunks = sse(r) if stream else [r.json()]
    out = {"text": {}, "ids": {}, "finish": {}, "usage": None}
    for c in chunks:
        out["usage"] = c.get("usage") or out["usage"]
        for ch in c.get("choices", []):
            i = ch["index"]
            text = ch.get("text") or (ch.get("delta") or ch.get("message") or {}).get("content") or ""
            out["text"][i] = out["text"].get(i, "") + text
            out["ids"].setdefault(i, []).extend(ch.get("token_ids") or [])
            if ch.get("finish_reason"):
                out["finish"][i] = ch["finish_reason"]
    return out


class _Redeployed(_LosingRouter):
    """As _LosingRouter, but the continuation goes to `later`: a redeploy's router, whose meshes are shorter."""

    def __init__(self, router, later, short: int):
        super().__init__(router, short)
        self.later = InProcessRouter(later)

    async def generate(self, request_id, prompt_ids, params, salt=None, output_ids=(), continuation=False):
        if continuation is True:  # a resubmission (a later choice names its first: Router.submit)
            async for event in self.later.generate(request_id, prompt_ids, params, salt, output_ids, continuation):
                yield event
            return
        async for event in super().generate(request_id, prompt_ids, params, salt, output_ids, continuation):
            yield event


def test_a_redeploy_shorter_than_an_answers_prompt_ends_it_with_length(tokenizer):
    """128-token meshes, then (the router lost mid-answer) a redeploy of 64-token ones: a 80-token prompt no
    longer fits. Streamed, whole, n 2 and as a Response, the answer ends with the tokens made so far and "length"
    (Responses: incomplete); it was a 400 context_length_exceeded (in a stream: an error event after the tokens)."""
    def backend(n):
        return lambda: SimulatedBackend(time_scale=0.001, num_slots=2, kv_groups=1, num_blocks=n // 16,
                                        max_seq_len=n, vocab_size=tokenizer.vocab_size)
    stack = in_process.Stack(tokenizer, backend(128), 1)
    try:
        async def start():
            later = Router([("short", LocalMesh(backend(64)))], RouterConfig(**in_process.FAST))
            await in_process.until(lambda: later.stats()["meshes"][0]["up"])
            return later
        later = stack.run(start())
        app = build_app(_Redeployed(stack.router, later, 40), tokenizer, MODEL)  # lost after 8 tokens
        app.state.server.retry_backoff_s = (0.0, 0.0)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60)
        body = {"model": MODEL, "prompt": [7] * 80, "max_tokens": 48, "n": 2, "ignore_eos": True}
        for stream in (False, True):
            extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
            r = stack.run(client.post("/v1/completions", json={**body, **extra}))
            assert r.status_code == 200, r.text
            got = _merged(r, stream)
            assert got["finish"] == {0: "length", 1: "length"} and got["usage"]["completion_tokens"] == 16, got
        r = stack.run(client.post("/v1/responses", json={"model": MODEL, "input": "hi " * 40,
                                                         "max_output_tokens": 48}))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "incomplete" and r.json()["usage"]["output_tokens"] > 0
        stack.run(later.close())
    finally:
        stack.close()
