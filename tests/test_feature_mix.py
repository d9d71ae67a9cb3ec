"""Property tests of the OpenAI surface with its features combined, through the whole stack in one process (the
ingress app over a real Router and two simulated meshes, whose greedy tokens are a pure function of the sequence):
streamed and whole answers agree, usage counts what came, finish reasons fit the limits, and nothing stays behind."""
from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.embedded import ensure_smollm2
from model.grammar import ll_tokenizer
from model.simulated import SimulatedBackend
from model.tokenizer import load_tokenizer
from tests.in_process import Stack, nothing_held

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
FORMATS = [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}]


@pytest.fixture(scope="module")
def stack():
    """(run, router, client): `run` runs a coroutine on the stack's own loop."""
    tok = load_tokenizer(ensure_smollm2())
    llt = ll_tokenizer(tok, tok.vocab_size)

    def backend():
        return SimulatedBackend(time_scale=0.001, num_slots=8, kv_groups=2, num_blocks=64, max_seq_len=1024,
                                vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.stop_ids)), eos_rate=0.03)
    s = Stack(tok, backend, num_meshes=2, grammar_tokenizer=lambda: llt)
    yield s.run, s.router, s.client
    s.close()


def sampling(kind: str):
    """Sampling and output fields a chat or completion request may combine."""
    fields = {
        "n": st.sampled_from([1, 2, 3]),
        "stop": st.sampled_from(["e", [" the", "a"], "\n"]),
        "stop_token_ids": st.lists(st.integers(3, 300), min_size=1, max_size=2),
        "include_stop_str_in_output": st.booleans(),
        "min_tokens": st.sampled_from([0, 1, 3]),
        "ignore_eos": st.booleans(),
        "skip_special_tokens": st.booleans(),
        "logit_bias": st.dictionaries(st.integers(0, 2000).map(str), st.sampled_from([-100, 5, 100]), max_size=2),
        "presence_penalty": st.sampled_from([-0.5, 0.5]),
        "frequency_penalty": st.sampled_from([-0.5, 0.5]),
        "repetition_penalty": st.sampled_from([0.8, 1.2]),
        "truncate_prompt_tokens": st.sampled_from([2, 5]),
        "bad_words": st.sampled_from([["the"], ["a", " b"]]),
        "return_tokens_as_token_ids": st.booleans(),
        "logprobs": st.sampled_from([0, 2]) if kind == "comp" else st.booleans(),
        "prompt_logprobs": st.sampled_from([0, 2]),  # vLLM's; with completions' echo and logprobs, echoed too
    }
    if kind == "chat":
        fields |= {"top_logprobs": st.sampled_from([0, 2]), "parallel_tool_calls": st.booleans(),
                   "echo": st.booleans(), "response_format": st.sampled_from(FORMATS),
                   "tool_choice": st.sampled_from(["none", "auto", "required",
                                                    {"type": "function", "function": {"name": "add"}}])}
    else:
        fields |= {"echo": st.booleans(),
                   "structured_outputs": st.sampled_from([{"choice": ["yes", "no"]}, {"regex": "[a-z]{3,10}"}])}
    return st.fixed_dictionaries({"max_tokens": st.sampled_from([1, 2, 5, 17, 40])}, optional=fields)


def greedy_or_seeded():
    return st.one_of(st.just({"temperature": 0.0}),
                     st.fixed_dictionaries({"temperature": st.sampled_from([0.5, 1.0]), "seed": st.integers(0, 99)}))


@st.composite
def requests(draw) -> tuple[str, dict]:
    kind = draw(st.sampled_from(["chat", "comp", "resp"]))
    body = {"model": "smollm2", **draw(greedy_or_seeded())}
    if kind == "resp":
        body |= {"input": draw(st.sampled_from(["hi", "tell me a story"])),
                 "max_output_tokens": draw(st.sampled_from([16, 17, 40]))}
        if draw(st.booleans()):
            body |= {"tools": [{"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}],
                     "tool_choice": draw(st.sampled_from(["none", "auto", "required"]))}
        elif draw(st.booleans()):
            body["text"] = {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}
        if draw(st.booleans()):
            body |= {"include": ["message.output_text.logprobs"], "top_logprobs": draw(st.sampled_from([0, 2]))}
        return "/v1/responses", body
    body |= draw(sampling(kind))
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": draw(st.sampled_from(["hi", "weather in Paris?"]))}]
        if "tool_choice" in body:  # tools, and no response_format beside them
            body["tools"] = [WEATHER, ADD]
            body.pop("response_format", None)
        return "/v1/chat/completions", body
    body["prompt"] = draw(st.sampled_from(["Once upon a time", [1, 2, 3, 400, 5000], ["a b", "c d e"], [[5, 6], [8]]]))
    return "/v1/completions", body


def events(response) -> list[dict]:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def streamed_choices(chunks: list[dict], chat: bool) -> dict[int, dict]:
    """Each choice's pieces put together as the whole answer has them."""
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            s = choices.setdefault(c["index"], {"text": "", "calls": {}, "logprobs": [], "finish_reason": None,
                                                "stop_reason": None, "token_ids": []})
            s["token_ids"] += c.get("token_ids") or []
            if c.get("finish_reason"):
                s["finish_reason"], s["stop_reason"] = c["finish_reason"], c.get("stop_reason")
            if not chat:
                if c.get("prompt_logprobs") is not None:  # the choice's first chunk
                    s["prompt_logprobs"] = c["prompt_logprobs"]
                s["text"] += c["text"]
                s["logprobs"] += zip(*(c["logprobs"][k] for k in ("tokens", "token_logprobs", "top_logprobs"))) \
                    if c.get("logprobs") else []
                continue
            delta = c["delta"]
            s["text"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                whole = s["calls"].setdefault(call["index"], ["", ""])
                whole[0] += call.get("function", {}).get("name") or ""
                whole[1] += call.get("function", {}).get("arguments") or ""
            s["logprobs"] += (c.get("logprobs") or {}).get("content") or []
    return choices


def whole_choices(answer: dict, chat: bool) -> dict[int, dict]:
    choices = {}
    for c in answer["choices"]:
        s = {"finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"], "token_ids": c["token_ids"]}
        if chat:
            m = c["message"]
            s |= {"text": m["content"] or "", "logprobs": (c["logprobs"] or {}).get("content") or [],
                  "calls": {i: [t["function"]["name"], t["function"]["arguments"]]
                            for i, t in enumerate(m.get("tool_calls") or [])}}
        else:
            if c.get("prompt_logprobs") is not None:
                s["prompt_logprobs"] = c["prompt_logprobs"]
            s |= {"text": c["text"], "calls": {}, "logprobs": list(zip(
                *(c["logprobs"][k] for k in ("tokens", "token_logprobs", "top_logprobs")))) if c["logprobs"] else []}
        choices[c["index"]] = s
    return choices


def without_ids(value):
    """An answer less what differs between two runs of one request (ids, times, cached tokens)."""
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items()
                if k not in ("id", "call_id", "created_at", "item_id", "input_tokens_details")}
    return [without_ids(v) for v in value] if isinstance(value, list) else value


async def whole_and_streamed(client, path: str, body: dict):
    whole = await client.post(path, json=body)
    options = {} if path == "/v1/responses" else {
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    return whole, await client.post(path, json={**body, "stream": True, **options})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_a_greedy_or_seeded_request_streams_what_it_answers_whole(stack, request):
    """Any mix of features: no 5xx; the stream carries the whole answer's choices, calls, logprobs, finish and
    usage; usage counts the tokens each choice returned; `length` means max_tokens were made; nothing stays held."""
    run, router, client = stack
    path, body = request
    if path != "/v1/responses":
        body = {**body, "return_token_ids": True}
    whole, streamed = run(whole_and_streamed(client, path, body))
    assert whole.status_code < 500, whole.text
    if whole.status_code != 200:
        error = whole.json()["error"]
        assert error["message"]
        if streamed.status_code == 200:  # refused once under way (e.g. constraints that together leave no token)
            assert [c["error"]["param"] for c in events(streamed) if "error" in c] == [error["param"]]
        else:
            assert streamed.status_code == whole.status_code
        return
    answer, chunks = whole.json(), events(streamed)
    assert not [c for c in chunks if "error" in c or c.get("type") == "error"]
    if path == "/v1/responses":
        (final,) = [c["response"] for c in chunks if c.get("type") in ("response.completed", "response.incomplete")]
        assert without_ids(final["output"]) == without_ids(answer["output"])
        assert without_ids(final["usage"]) == without_ids(answer["usage"])
    else:
        chat = path == "/v1/chat/completions"
        choices = whole_choices(answer, chat)
        assert streamed_choices(chunks, chat) == choices
        (usage,) = [c["usage"] for c in chunks if not c["choices"]]
        made: dict[int, int] = {}
        for chunk in chunks[:-1]:  # continuous_usage_stats: each chunk's usage is its choice's tokens so far
            (c,) = chunk["choices"]
            made[c["index"]] = made.get(c["index"], 0) + len(c.get("token_ids") or [])
            assert chunk["usage"]["completion_tokens"] == made[c["index"]]
            assert chunk["usage"]["prompt_tokens"] == usage["prompt_tokens"] or path == "/v1/completions"
        assert usage["completion_tokens"] == answer["usage"]["completion_tokens"]
        assert answer["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices.values())
        for c in choices.values():
            assert len(c["token_ids"]) <= body["max_tokens"]
            if c["finish_reason"] == "length":
                assert len(c["token_ids"]) == body["max_tokens"]
    run(nothing_held(router))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(requests().filter(lambda r: r[0] != "/v1/responses"), min_size=4, max_size=6),
       streamed=st.lists(st.booleans(), min_size=6, max_size=6))
def test_greedy_and_seeded_answers_are_the_same_alone_and_among_others(stack, batch, streamed):
    """Requests sharing the meshes' slots (host-side masks and penalties on some rows, device sampling on others)
    answer as each does alone."""
    run, router, client = stack

    async def answers(together: bool) -> list:
        async def one(path, body, stream):
            response = await client.post(path, json={**body, "stream": stream})
            if response.status_code != 200:
                return response.status_code
            chat = path == "/v1/chat/completions"
            if not stream:
                return whole_choices(response.json(), chat)
            chunks = events(response)
            return [c["error"]["param"] for c in chunks if "error" in c] or streamed_choices(chunks, chat)
        calls = [one(path, {**body, "return_token_ids": True}, s) for (path, body), s in zip(batch, streamed)]
        if together:
            return await asyncio.gather(*calls)
        return [await call for call in calls]
    assert run(answers(together=True)) == run(answers(together=False))
    run(nothing_held(router))
