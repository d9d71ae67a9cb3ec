"""The OpenAI ingress without Ray: a fake router behind it, SmolLM2's real tokenizer in front of it."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import ActorDiedError, RayTaskError, TaskCancelledError
from starlette.requests import ClientDisconnect

from deployments import ingress, openai_server, request_checks
from deployments.body_limit import BodyLimit
from deployments.ingress import build_app
from deployments.streaming import KEEPALIVE_BYTES, ChoiceText, EventStream, FirstDelta, StopStrings
from deployments.protocol import (MAX_N, MAX_SALT_CHARS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                                  CompletionRequest)
from scheduler.errors import MeshFailures, NoMeshAvailable, PromptTooLong, QueueFull, Unsupported
from scheduler.sampling import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS
from tests.ingress_support import (ANSWER, CHAT, COMPLETION, MAX_LEN, MODEL, asgi_receive, asgi_scope,  # noqa: F401
                                   assert_error, client, eos, make_client, router, sse, tokenizer)



# ---- answers ------------------------------------------------------------------------------------

def test_chat_answer_with_usage(client, router, tokenizer):
    body = client.post("/v1/chat/completions", json=CHAT).json()
    prompt_ids = tokenizer.encode_chat(CHAT["messages"])
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "tool_calls": []}  # as vLLM
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == len(router.answer)
    assert body["usage"]["total_tokens"] == len(prompt_ids) + len(router.answer)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    (sent_prompt, params, _), = router.requests.values()
    assert sent_prompt == prompt_ids
    assert params.max_tokens == MAX_LEN - len(prompt_ids)  # unset max_tokens: the rest of the context
    assert set(tokenizer.stop_ids) <= set(params.stop_token_ids)
    assert router.cancelled == []  # finished by itself: nothing to cancel


def test_completion_max_tokens_is_length(client, router, tokenizer):
    body = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 4}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == tokenizer.decode(router.answer[:4])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


def test_sampling_fields_reach_the_router(client, router):
    client.post("/v1/chat/completions", json={
        **CHAT, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 7, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.2, "min_tokens": 2, "max_completion_tokens": 9,
        "stop_token_ids": [5], "ignore_eos": True, "cache_salt": "tenant-a"})
    (_, params, salt), = router.requests.values()
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 0, 7)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (params.min_tokens, params.max_tokens, params.ignore_eos) == (2, 9, True)
    assert params.stop_token_ids == (5,)  # ignore_eos: the tokenizer's stop ids are not added
    assert salt == "tenant-a"


def test_chat_stream_format_and_usage(client, router):
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse(r)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0] for c in chunks[:-1]]
    assert "".join(ch["delta"]["content"] or "" for ch in content) == ANSWER
    assert [ch["finish_reason"] for ch in content if ch["finish_reason"]] == ["stop"]
    assert content[-1]["finish_reason"] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(router.answer)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all("\ufffd" not in (ch["delta"]["content"] or "") for ch in content)  # the emoji arrives whole


def test_completion_stream_without_usage(client, router, tokenizer):
    chunks = sse(client.post("/v1/completions", json={**COMPLETION, "stream": True, "max_tokens": 5}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == tokenizer.decode(router.answer[:5])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_inside_a_character_ends_before_it(client, router, tokenizer, stream):
    """max_tokens ending between two tokens of one emoji: the tokens the emoji's bytes are in are dropped whole (vLLM's
    detokenizer holds them back), the space in SmolLM2's " \\xf0\\x9f" too; no U+FFFD."""
    cut = next(n for n in range(1, len(router.answer)) if tokenizer.decode(router.answer[:n]).endswith("\ufffd"))
    r = client.post("/v1/completions", json={**COMPLETION, "stream": stream, "max_tokens": cut})
    choices = [c["choices"][0] for c in sse(r)] if stream else r.json()["choices"]
    assert "".join(c["text"] for c in choices) == "Hello world, the answer is 42. Emoji"
    assert choices[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_spanning_tokens(client, router, tokenizer, stream):
    stop = "answer is 4"
    assert all(stop not in tokenizer.decode([t]) for t in router.answer)  # it really spans several tokens
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream, "stop": ["nowhere", stop]})
    if stream:
        choices = [c["choices"][0] for c in sse(r)]
        text = "".join(ch["delta"]["content"] or "" for ch in choices)
        finish = choices[-1]["finish_reason"]
    else:
        text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    assert text == ANSWER[:ANSWER.index(stop)]
    assert finish == "stop"
    (rid,) = router.requests
    assert router.cancelled == [(rid, "stop")]


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_a_stop_string_ended_is_not_resubmitted_when_its_cancel_fails(client, router, stream, monkeypatch):
    """The stop string ends the answer, then the router is told to let the request go: a cancel that raises (the link
    to the router broke just then) must not be taken for a lost request and send it again, to be counted twice and
    computed for no client."""
    async def broken_cancel(request_id: str, reason: str = "abort") -> None:
        router.cancelled.append((request_id, reason))
        raise ConnectionError("link closed by the peer")
    monkeypatch.setattr(router, "cancel", broken_cancel)
    stop = "answer is 4"
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream, "stop": [stop]})
    assert r.status_code == 200, r.text
    if stream:
        choices = [c["choices"][0] for c in sse(r)]
        text, finish = "".join(ch["delta"]["content"] or "" for ch in choices), choices[-1]["finish_reason"]
    else:
        text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    assert (text, finish) == (ANSWER[:ANSWER.index(stop)], "stop")
    (rid,) = router.requests  # sent once
    assert router.cancelled == [(rid, "stop")]
    reasons = {dict(labels)["finished_reason"]: v for (name, labels), v in _samples(client).items()
               if name == "vllm:request_success_total"}
    assert reasons == {**dict.fromkeys(("length", "abort", "error", "repetition"), 0), "stop": 1}  # counted once


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_in_the_last_event_cancels_nothing(client, router, stream):
    """The router's last event of a request (one with a finish_reason) means the router let it go: a stop string
    found in it needs no cancel, which the router would only keep as one for an unknown request (a soak left them
    in its table at idle)."""
    router.merge = len(router.answer)  # the whole answer in one event, which ends it
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream, "stop": ["answer is 4"]})
    assert r.status_code == 200 and '"finish_reason":"stop"' in r.text.replace(" ", "")
    assert router.cancelled == []


def test_n_choices_are_independent_requests(client, router):
    body = client.post("/v1/completions", json={**COMPLETION, "n": 3, "seed": 10, "max_tokens": 3}).json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]
    assert len({c["text"] for c in body["choices"]}) == 1  # the fake answers alike; the seeds differ below
    assert sorted(p.seed for _, p, _ in router.requests.values()) == [10, 11, 12]
    assert len(router.requests) == 3
    assert body["usage"]["completion_tokens"] == 9


def test_n_choices_stream(client):
    """One choice a chunk, as vLLM and OpenAI send them: a client reading choices[0] alone sees every choice's
    role, text and finish."""
    chunks = sse(client.post("/v1/chat/completions", json={**CHAT, "n": 3, "stream": True}))
    assert all(len(c["choices"]) == 1 for c in chunks)
    for i in range(3):
        choices = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(ch["delta"]["content"] or "" for ch in choices) == ANSWER
        assert choices[-1]["finish_reason"] == "stop"


def test_chat_logprobs(client, router, tokenizer):
    body = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in router.answer]
    assert all(c["logprob"] == -0.25 and len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert router.requests.popitem()[1][1].logprobs == 2


@pytest.mark.parametrize("logprobs", [False, None])
def test_top_logprobs_0_without_logprobs_asks_for_nothing(client, router, logprobs):
    """vLLM takes it (0 is its own default); only a positive top_logprobs needs logprobs true."""
    body = client.post("/v1/chat/completions", json={**CHAT, "logprobs": logprobs, "top_logprobs": 0}).json()
    assert body["choices"][0]["logprobs"] is None
    assert router.requests.popitem()[1][1].logprobs is None


def test_completion_logprobs_offsets(client, router, tokenizer):
    body = client.post("/v1/completions", json={**COMPLETION, "logprobs": 1, "max_tokens": 3}).json()
    lp = body["choices"][0]["logprobs"]
    tokens = [tokenizer.decode([t]) for t in router.answer[:3]]
    assert lp["tokens"] == tokens and lp["token_logprobs"] == [-0.25] * 3
    assert lp["text_offset"] == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
    assert all(len(top) == 1 for top in lp["top_logprobs"])


def test_completion_logprobs_name_each_part_of_a_character_by_its_bytes(client, tokenizer):
    """Alone, each token of an emoji decodes to U+FFFD; completions' top_logprobs is keyed by token text, so
    the alternatives overwrote each other and the chosen token's own logprob. They are written as OpenAI's
    legacy completions write them, "bytes:\\xf0\\x9f", and the chosen token's entry is its own."""
    from scheduler.sampling import TokenLogprobs
    smile, wink, kanji = (tokenizer.encode(text) for text in ("😊", "🙂", "日本"))
    chosen, other = smile[1], kanji[1]  # b"\x98" and b"\xa5": both U+FFFD alone
    assert tokenizer.decode([chosen]) == tokenizer.decode([other]) == "\ufffd"
    lp = client.app.state.server.logprobs.completion(
        [TokenLogprobs(smile[0], -0.1, [(smile[0], -0.1)]),
         TokenLogprobs(chosen, -21.4, [(other, -0.6), (wink[1], -1.2)]),
         TokenLogprobs(kanji[2], -0.3, [(kanji[2], -0.3)])], [0, 0, 0])
    assert lp.tokens == ["bytes:\\xf0\\x9f", "bytes:\\x98", "本"]
    assert lp.top_logprobs[1] == {"bytes:\\xa5": -0.6, "bytes:\\x99\\x82": -1.2, "bytes:\\x98": -21.4}
    assert all(top[token] == logprob for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))


def test_models(client, monkeypatch):
    body = client.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == MAX_LEN
    import time
    later = time.time() + 5
    monkeypatch.setattr(time, "time", lambda: later)
    assert client.get("/v1/models").json()["data"][0]["created"] == body["data"][0]["created"]  # the model's, fixed


def test_model_cards_carry_vllms_root_parent_and_permission(router, tokenizer):
    """vLLM's ModelCard: tools that read `root` (the model as given) or `permission` found neither."""
    from deployments.config import AppConfig, model_root
    for names, root, expected in ((MODEL, None, MODEL), (["llama", "meta-llama/Llama-3.3-70B-Instruct"], None,
                                  "meta-llama/Llama-3.3-70B-Instruct"), (AppConfig().names, model_root("smollm2"),
                                  "HuggingFaceTB/SmolLM2-135M-Instruct")):
        client = TestClient(build_app(router, tokenizer, names, root=root))
        listed = client.get("/v1/models").json()["data"][0]
        for card in (listed, client.get(f"/v1/models/{listed['id']}").json()):
            assert (card["root"], card["parent"]) == (expected, None)
            (permission,) = card["permission"]
            assert permission["object"] == "model_permission" and permission["id"].startswith("modelperm-")
            assert permission["allow_sampling"] and permission["allow_logprobs"] and not permission["allow_fine_tuning"]


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty"),  # logits / 1e-40 overflow to inf: NaN logprobs
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0.content"),
])
def test_bad_chat_fields_are_400_naming_the_field(client, router, patch, param):
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, **patch}), 400)
    assert error["param"] is not None and error["param"].startswith(param) and param in error["message"]
    assert router.requests == {}


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("patch, param, says", [
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name", "required"),
    ({"tools": [TOOL], "tool_choice": {"function": {"name": "get_weather"}}}, "tool_choice.type", "required"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice", "'none', 'auto' or 'required'"),
    ({"tools": [TOOL], "tool_choice": 5}, "tool_choice", "'none', 'auto' or 'required'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text", "required"),
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages.0.content.0.type", "'type'"),
    ({"messages": [{"role": "assistant", "content": [{"type": "refusal"}]}]}, "messages.0.content.0.refusal",
     "required"),
    ({"stop": ["ok", 1]}, "stop.1", "valid string"),
])
def test_a_bad_value_in_a_field_of_several_forms_is_named_in_the_form_it_took(client, router, patch, param, says):
    """A named tool_choice missing its name is told so, not that tool_choice should be "none", "auto" or
    "required": the error is the one from the form (a string, a list, an object) the value got furthest in."""
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, **patch}), 400, param=param)
    assert error["message"].startswith(f"{param}: ") and says in error["message"], error
    assert router.requests == {}


def test_an_image_part_or_an_empty_prompt_is_told_what_is_wrong(client):
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "messages": [
        {"role": "user", "content": image}]}), 400, param="messages.0.content")
    assert "'image_url' are not supported" in error["message"]
    for empty in ("", []):
        error = assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": empty}), 400, param="prompt")
        assert "must not be empty" in error["message"]


@pytest.mark.parametrize("patch, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),  # not a token id of this vocabulary
    ({"logprobs": 30}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
])
def test_bad_completion_fields_are_400(client, patch, param):
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, **patch}), 400)
    assert error["param"].startswith(param)


def test_min_tokens_above_max_tokens_is_400(client):
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, "min_tokens": 9, "max_tokens": 3}), 400)
    assert "min_tokens" in error["message"]


def post(client, path: str, body: dict):
    """POST with Python's own JSON encoder, which writes what httpx's refuses (NaN, lone surrogates)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


ENDPOINTS = [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
# Request-scoped values the mesh must never see: each is a 400 naming exactly its field, on both endpoints.
OUT_OF_BOUNDS = [
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),  # not a token id of this vocabulary
    ({"stop_token_ids": [0] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
    ({"stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}, "stop"),
    ({"stop": "\ud800"}, "stop"),  # a lone surrogate: valid JSON, not encodable text
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"min_tokens": 10**12}, "min_tokens"),  # no max_tokens: bounded by the room left in the context
    ({"n": MAX_N + 1}, "n"),
    ({"seed": 2**63}, "seed"),  # int64, as vLLM and OpenAI
    ({"temperature": 101}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("inf")}, "top_p"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"),
    ({"cache_salt": "s" * (MAX_SALT_CHARS + 1)}, "cache_salt"),
    ({"cache_salt": "\ud800"}, "cache_salt"),
    ({"cache_salt": ""}, "cache_salt"),  # vLLM refuses it too; it would share the unsalted cache
]
CHAT_OUT_OF_BOUNDS = [
    ({"max_completion_tokens": 10**12}, "max_completion_tokens"),
    ({"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),  # arguments are an object (OpenAI refuses other schema types too)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "allOf": [{"type": "array", "items": {"type": "integer"}}]}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "anyOf": [{"type": "string"}, {"type": "integer"}]}}}]}, "tools.0.function.parameters"),
    *[({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", keyword: defs}}}],
        "tool_choice": "required"}, "tools.0.function.parameters")  # was a Python error naming tool_choice
      for keyword in ("$defs", "definitions") for defs in ([1], "x")],
]
COMPLETION_OUT_OF_BOUNDS = [
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": "once \ud800"}, "prompt"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
]


@pytest.mark.parametrize("path, base", ENDPOINTS)
@pytest.mark.parametrize("patch, param", OUT_OF_BOUNDS)
def test_out_of_bounds_values_are_400_before_the_router(client, router, path, base, patch, param):
    assert_error(post(client, path, {**base, **patch}), 400, param=param)
    assert router.requests == {}


@pytest.mark.parametrize("path, base, patch, param",
                         [("/v1/chat/completions", CHAT, *case) for case in CHAT_OUT_OF_BOUNDS]
                         + [("/v1/completions", COMPLETION, *case) for case in COMPLETION_OUT_OF_BOUNDS])
def test_out_of_bounds_endpoint_fields_are_400_before_the_router(client, router, path, base, patch, param):
    assert_error(post(client, path, {**base, **patch}), 400, param=param)
    assert router.requests == {}


def test_an_assistant_refusal_part_is_read_as_its_text(client, router, tokenizer):
    """OpenAI answers a refusal in `refusal` and clients paste the turn back as a content part of that type; vLLM
    reads it as text. It was a 400."""
    turns = [{"role": "user", "content": "do it"}, {"role": "assistant", "content": "I can't help with that."},
             {"role": "user", "content": "why?"}]
    parts = [{"type": "refusal", "refusal": "I can't help with that."}]
    r = post(client, "/v1/chat/completions", {**CHAT, "messages": [*turns[:1], {**turns[1], "content": parts}, turns[2]]})
    assert r.status_code == 200, r.text
    (sent_prompt, _, _), = router.requests.values()
    assert sent_prompt == tokenizer.encode_chat(turns)
    error = assert_error(post(client, "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "\udfff"}]}]}), 400)
    assert "lone surrogate" in error["message"]


@pytest.mark.parametrize("parts", [
    ["Say", "hi"],  # vLLM's content part union takes a plain string as a text part
    [{"type": "input_text", "text": "Say"}, {"type": "output_text", "text": "hi"}],  # Responses' names, as vLLM's
    ["Say", {"type": "input_text", "text": "hi"}],
])
def test_string_and_responses_text_parts_are_read_as_text(client, router, tokenizer, parts):
    """vLLM's chat_utils reads a plain string in a content list, and an `input_text` or `output_text` part (what
    a client that speaks the Responses API sends), as a text part. They were 400s."""
    for path in ("/v1/chat/completions", "/tokenize"):
        r = post(client, path, {**CHAT, "messages": [{"role": "user", "content": parts}]})
        assert r.status_code == 200, r.text
    (sent_prompt, _, _), = router.requests.values()
    assert sent_prompt == tokenizer.encode_chat([{"role": "user", "content": "Say\nhi"}])
    assert r.json()["tokens"] == sent_prompt
    error = assert_error(post(client, "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": ["hi", "\udfff"]}]}), 400)
    assert error["param"].startswith("messages.0.content") and "lone surrogate" in error["message"]


def test_lone_surrogate_in_a_text_part_is_400(client, router):
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "\udfff"}]
    body = {**CHAT, "messages": [{"role": "user", "content": parts}]}
    error = assert_error(post(client, "/v1/chat/completions", body), 400)
    assert error["param"].startswith("messages.0.content")  # a union: pydantic names its branch after the field
    assert "lone surrogate" in error["message"]  # not the union's "Input should be a valid string"
    assert router.requests == {}


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("patch, param", [
    ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"type": "object", "description": "\ud800"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"properties": {"\ud800": {}}}}}]},
     "tools.0.function.parameters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\udfff"]}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"const": ["\ud800"]}}, "guided_json"),
    ({"structured_outputs": {"json": {"const": "\ud800"}}}, "structured_outputs.json"),
    ({"chat_template_kwargs": {"x": "\ud800"}}, "chat_template_kwargs"),
])
def test_a_lone_surrogate_inside_free_form_json_is_400(client, router, patch, param):
    """Schemas and template variables are serialized again for the grammar engine and the template: a lone
    surrogate there was a 500."""
    assert_error(post(client, "/v1/chat/completions", {**CHAT, **patch}), 400, param=param)
    assert router.requests == {}


@pytest.mark.parametrize("stream", [False, True])
def test_vocabulary_bounds_are_400(client, router, tokenizer, stream):
    vocab = tokenizer.vocab_size
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "stream": stream, "stop_token_ids": [vocab]}),
                         400, param="stop_token_ids")
    assert str(vocab) in error["message"]
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": [vocab]}), 400, param="prompt")
    assert router.requests == {}


def test_a_top_k_past_the_vocabulary_samples_every_token_as_vllm_does(client, router, tokenizer):
    """vLLM takes any top_k >= 1 and samples every token when it is not below the vocabulary (its input batch sets
    such a top_k to the vocabulary's size): clients that send a large top_k to mean "off" got a 400 here."""
    vocab = tokenizer.vocab_size
    for asked in (vocab + 1, 10 * vocab, 2**63 - 1):
        r = client.post("/v1/chat/completions", json={**CHAT, "top_k": asked, "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert [params.top_k for _, params, _ in router.requests.values()] == [vocab] * 3  # the sampler's "every token"


def test_ids_the_tokenizer_has_but_the_model_does_not_embed_are_400(client, router, tokenizer):
    """A tokenizer may know more ids than the model has embedding rows (Llama 3.2 Vision's tokenizer beside a 70B):
    such an id reached the mesh, whose embedding then failed its whole batch. The meshes' vocabulary bounds ids."""
    word = " Sudden"
    (top,) = tokenizer.encode(word)
    assert top > 40_000  # above every id of SmolLM2's chat template (34519 at most)
    router.vocab_size = top  # the model embeds every id below this one's
    error = assert_error(client.post("/v1/chat/completions", json={
        **CHAT, "messages": [{"role": "user", "content": f"a{word}"}]}), 400, param="messages")
    assert word in error["message"] and str(top) in error["message"]
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": f"one{word}"}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": [top]}), 400, param="prompt")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "logit_bias": {str(top): 5}}), 400,
                 param="logit_bias")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "stop_token_ids": [top]}), 400,
                 param="stop_token_ids")
    assert router.requests == {}
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": [top - 1]}).status_code == 200


def test_min_tokens_is_bounded_by_the_context_when_max_tokens_is_unset(client, router, tokenizer):
    room = MAX_LEN - len(tokenizer.encode_chat(CHAT["messages"]))
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "min_tokens": room + 1}), 400,
                         param="min_tokens")
    assert str(room) in error["message"]
    assert router.requests == {}
    router.answer = router.answer[:1] * room  # no stop id: the answer runs to the end of the context
    assert client.post("/v1/chat/completions", json={**CHAT, "min_tokens": room}).status_code == 200
    (_, params, _), = router.requests.values()
    assert params.min_tokens == params.max_tokens == room


@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_min_tokens_within_max_tokens_is_accepted(client, router, path, base):
    r = client.post(path, json={**base, "min_tokens": 1, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 4
    (_, params, _), = router.requests.values()
    assert (params.min_tokens, params.max_tokens) == (1, 4)


def test_values_at_their_bounds_are_accepted(client, router, tokenizer):
    vocab = tokenizer.vocab_size
    stops = [f"{i:02d}" + "~" * (MAX_STOP_CHARS - 2) for i in range(MAX_STOP_STRINGS)]
    stop_ids = [vocab - 1 - i for i in range(MAX_STOP_TOKEN_IDS)]
    r = client.post("/v1/chat/completions", json={
        **CHAT, "top_k": vocab, "stop": stops, "stop_token_ids": stop_ids, "n": MAX_N, "seed": 2**63 - 1,
        "logprobs": True, "top_logprobs": MAX_LOGPROBS, "cache_salt": "s" * MAX_SALT_CHARS, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert len(router.requests) == MAX_N
    params = next(iter(router.requests.values()))[1]
    assert (params.top_k, params.stop, params.logprobs) == (vocab, tuple(stops), MAX_LOGPROBS)
    assert params.stop_token_ids[:MAX_STOP_TOKEN_IDS] == tuple(stop_ids)
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": [0, vocab - 1], "top_k": 0,
                                                "stop_token_ids": [0]}).status_code == 200


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'"text"'])
def test_malformed_body_is_400(client, raw):
    assert_error(client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 400)


def test_prompt_longer_than_context_is_400(client, router):
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": "word " * MAX_LEN}), 400,
                         param="prompt")
    assert error["code"] == "context_length_exceeded"
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": MAX_LEN}), 400,
                         param="max_tokens")
    assert router.requests == {}


def test_a_context_length_refusal_says_how_much_fits(client, tokenizer):
    """A user who sent too long a prompt, or too large a max_tokens, is told the size that would be taken, not only
    the limit (the refusal said "the prompt has 31 and max_tokens asks for 100000 more", and stopped there)."""
    prompt_len = len(tokenizer.encode(COMPLETION["prompt"]))
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": MAX_LEN}), 400,
                         param="max_tokens")
    assert error["message"].endswith(f"ask for at most {MAX_LEN - prompt_len}.")
    assert client.post("/v1/completions", json={**COMPLETION, "max_tokens": MAX_LEN - prompt_len}).status_code == 200
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": "word " * MAX_LEN}), 400,
                         param="prompt")
    assert error["message"].endswith(f"shorten it to under {MAX_LEN} tokens.")


def test_unknown_model_is_404(client):
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, param="model")
    assert error["code"] == "model_not_found"
    assert client.post("/v1/chat/completions", json={**CHAT, "model": ""}).status_code == 200  # as vLLM: the served one


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429(client, router, stream):
    router.refuse = QueueFull("waiting queue is full")
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert_error(r, 429)
    assert int(r.headers["retry-after"]) > 0  # OpenAI's clients wait this long before they retry
    batch = client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b"], "n": 3})
    assert_error(batch, 429)
    router.refuse_choice, router.queued_s = 1, 0.5  # one choice refused while the others wait for a slot
    assert_error(client.post("/v1/completions", json={**COMPLETION, "n": 3}), 429)
    router.refuse, router.queued_s = None, 0.0
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    metrics = client.get("/metrics").text  # a refused request never ran: no finish reason, no prompt tokens
    assert 'meshserve_requests_total{finish_reason="abort",ingress="local"} 0.0' in metrics
    assert 'meshserve_requests_total{finish_reason="length",ingress="local"} 1.0' in metrics


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_the_router_finds_too_long_is_400_naming_the_prompt(client, router, stream):
    """A prompt within max_model_len that a mesh's KV pool cannot hold is refused by the router: the client's
    400 names the request's prompt field, as the ingress's own length check does."""
    router.refuse = PromptTooLong("the prompt has 9 tokens; the KV pool's capacity allows at most 8")
    for path, body, field in (("/v1/chat/completions", CHAT, "messages"), ("/v1/completions", COMPLETION, "prompt")):
        error = assert_error(client.post(path, json={**body, "stream": stream}), 400)
        assert (error["param"], error["code"]) == (field, "context_length_exceeded"), error


@pytest.mark.parametrize("stream", [False, True])
def test_a_field_the_meshes_cannot_serve_is_400_naming_it(client, router, stream):
    """The router refuses a request its meshes' backend cannot do (scheduler.errors.Unsupported: prompt_logprobs on
    a backend that computes only the last position's logits); the client's 400 names that field."""
    router.refuse = Unsupported("prompt_logprobs", "this mesh's backend cannot compute them")
    body = {**COMPLETION, "prompt_logprobs": 1, "stream": stream}
    error = assert_error(client.post("/v1/completions", json=body), 400, param="prompt_logprobs")
    assert error["type"] == "invalid_request_error"


def test_refused_requests_are_counted_once_each_by_reason(client, router):
    """An operator sees 429s and 503s in /metrics, one per API request however many choices it had."""
    router.refuse = QueueFull("waiting queue is full")
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b"], "n": 3}), 429)
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "stream": True}), 429)
    router.refuse = NoMeshAvailable("no mesh has been available for 30 s")
    assert_error(client.post("/v1/chat/completions", json=CHAT), 503)
    router.refuse = PromptTooLong("too long")  # the client's fault, not the server's capacity: not counted here
    assert_error(client.post("/v1/chat/completions", json=CHAT), 400)
    metrics = client.get("/metrics").text
    assert 'meshserve_requests_rejected_total{ingress="local",reason="queue_full"} 2.0' in metrics
    assert 'meshserve_requests_rejected_total{ingress="local",reason="unavailable"} 1.0' in metrics


@pytest.mark.parametrize("refusal, status", [
    (QueueFull("full"), 429),
    (PromptTooLong("the prompt needs more KV blocks than the mesh has"), 400),
])
def test_refusals_wrapped_by_ray_are_mapped(client, router, refusal, status):
    router.refuse = RayTaskError("generate", "Traceback (most recent call last): ...", refusal)
    assert_error(client.post("/v1/completions", json=COMPLETION), status)


def test_no_live_mesh_is_503_with_retry_after(client, router):
    router.ready = False
    response = client.get("/health")
    assert_error(response, 503)
    assert response.headers["retry-after"]
    router.refuse = NoMeshAvailable("no mesh has been available for 30 s")  # the router waited, then gave up
    response = client.post("/v1/chat/completions", json=CHAT)
    assert_error(response, 503)["type"] == "service_unavailable"
    assert response.headers["retry-after"]
    router.ready, router.refuse = True, None
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_router_that_keeps_failing_is_a_503_without_internals(client, router):
    router.refuse = ConnectionError("secret internals")  # what RouterLink raises when its link breaks
    error = assert_error(client.post("/v1/chat/completions", json=CHAT), 503)
    assert "secret" not in error["message"]
    assert len(router.requests) == 3  # the first try and two resubmissions
    samples = _samples(client)  # it never ran: refused as unavailable, not a finished request that failed
    assert samples[("meshserve_requests_rejected_total", (("ingress", "local"), ("reason", "unavailable")))] == 1
    assert samples[("meshserve_requests_total", (("finish_reason", "error"), ("ingress", "local")))] == 0


def test_a_failure_that_is_not_the_router_lost_is_a_500_at_once(client, router):
    """Only a lost router is worth resubmitting; anything else (a refusal relayed from the router, a fault in
    the ingress) was retried for ~16 s and then called the router unavailable."""
    router.refuse = ValueError("secret internals")
    error = assert_error(client.post("/v1/chat/completions", json=CHAT), 500)
    assert "secret" not in error["message"]
    assert len(router.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_meshes_failed_on_is_a_500_named_and_not_resubmitted(client, router, stream):
    """Resubmitting it would crash another mesh: the router ended it after max_mesh_failures."""
    router.refuse = MeshFailures("2 model replicas in a row failed while computing it")
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "stream": stream}), 500)
    assert error["code"] == "mesh_failed" and "2 model replicas" in error["message"]
    assert len(router.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_openais_sdk_does_not_resend_a_request_the_meshes_failed_on(client, router, stream):
    """The SDKs retry every 5xx twice by default (openai-python _base_client._should_retry, openai-node
    shouldRetry) unless the answer says `x-should-retry: false`: without it, each retry took down meshes again."""
    import openai
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=2)
    router.refuse = MeshFailures("2 model replicas in a row failed while computing it")
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=CHAT["messages"], stream=stream)
    assert raised.value.code == "mesh_failed"
    assert len(router.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_router_that_dies_mid_stream_is_resubmitted_as_a_continuation(client, router, tokenizer, stream):
    router.die_after = [3, 5]  # the first stream dies before token 3, its resubmission before token 5
    body = {**COMPLETION, "max_tokens": 12, "stream": stream}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    text = ("".join(c["choices"][0]["text"] for c in sse(response) if c.get("choices")) if stream
            else response.json()["choices"][0]["text"])
    assert text == tokenizer.decode(router.answer[:12])  # no token lost or repeated
    assert [len(ids) for ids in router.continued.values()] == [0, 3, 5]
    assert {rid.rsplit("-", 1)[-1] for rid in router.continued} >= {"retry1", "retry2"}
    assert {rid.rsplit("-", 1)[-1] for rid in router.continuations} == {"retry1", "retry2"}


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_outlives_more_router_losses_than_retry_waits_while_it_goes_on(client, router, tokenizer, stream):
    """The waits are per outage, not per answer: each loss after new tokens starts them again (a long answer across
    rolling redeploys). Counted per answer, the third loss here (two waits) was a 503 mid-answer."""
    router.die_after = [2, 4, 6]  # three losses, each after two more tokens; the client has two waits (0, 0)
    response = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 10, "stream": stream})
    assert response.status_code == 200
    text = ("".join(c["choices"][0]["text"] for c in sse(response) if c.get("choices")) if stream
            else response.json()["choices"][0]["text"])
    assert text == tokenizer.decode(router.answer[:10])
    assert [len(ids) for ids in router.continued.values()] == [0, 2, 4, 6]
    assert len(set(router.continued)) == 4  # each attempt under its own id


def test_a_request_never_sent_to_a_router_is_resubmitted_as_new(client, router):
    """No link to the router (it restarts): the request never reached one, so its resubmission is no
    continuation, and queue limits may refuse it like any new request."""
    router.unreachable = 1
    router.die_after = [2]  # sent the second time; that router dies after 2 tokens: the third is a continuation
    assert client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8}).status_code == 200
    assert [len(ids) for ids in router.continued.values()] == [0, 2]
    assert {rid.rsplit("-", 1)[-1] for rid in router.continuations} == {"retry2"}


def test_a_resubmission_no_link_break_line_counted_is_logged_per_request(client, router, caplog):
    """A request resubmitted after a loss the link's break line counts ("failing N open requests": RouterLost) logs
    no line of its own without log_requests; any other loss does, RouterUnreachable (RouterLost's subclass: no link
    to send it on for CONNECT_WAIT_S, counted in no line) included. It was silenced with the broken link's losses."""
    caplog.set_level(logging.WARNING, logger="ray.serve")
    router.unreachable = 1
    router.die_after = [2]  # a stream ending early: a ConnectionError, not RouterLost
    assert client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8}).status_code == 200
    said = [m for r in caplog.records if (m := r.getMessage()).startswith("router failed during")]
    assert len(said) == 2 and "RouterUnreachable(" in said[0] and "the router died" in said[1], said


def test_a_request_no_router_ever_ran_is_a_503_and_no_finished_request(client, router):
    router.die_after = [0, 0, 0]  # the router is lost before the first token, at every attempt
    assert_error(client.post("/v1/completions", json=COMPLETION), 503)
    counts = [v for (name, _), v in _samples(client).items() if name == "meshserve_requests_total"]
    assert len(counts) == 5 and not any(counts)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_router_was_lost_for_after_it_ran_is_an_error_not_an_abort(client, router, stream):
    """Tokens came, then the router was lost at every retry: the client gets a 503 (an error event mid-stream). The
    server failed it, so it counts as finished_reason="error", which error-rate alerts read; it counted as "abort",
    as if its client had gone."""
    router.die_after = [3, 3, 3]  # the first stream dies after 3 tokens, each continuation before a new one
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8, "stream": stream})
    assert r.status_code == 200 if stream else 503
    if stream:
        assert sse(r)[-1]["error"]["type"] == "service_unavailable"
    counts = {dict(labels)["finish_reason"]: v for (name, labels), v in _samples(client).items()
              if name == "meshserve_requests_total"}
    assert (counts["error"], counts["abort"]) == (1, 0)


def test_a_request_the_mesh_failed_is_a_500_for_it_alone(client, router):
    router.fail_with_error_after = 2
    error = assert_error(client.post("/v1/completions", json=COMPLETION), 500)
    assert "failed on this request" in error["message"]
    assert 'meshserve_requests_total{finish_reason="error",ingress="local"} 1.0' in client.get("/metrics").text  # not "abort"
    router.fail_with_error_after = None
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_the_engine_gives_up_on_mid_answer_is_a_400_naming_its_field(client, router, stream):
    router.fail_with_error_after, router.fail_reason = 2, "grammar_error"  # the mesh's verdict, faked
    r = client.post("/v1/completions", json={**COMPLETION, "guided_regex": "a+(b{100}){100}", "stream": stream})
    if stream:  # the 200 is sent: the error is the stream's last event
        (error,) = [e["error"] for e in sse(r) if "error" in e]
    else:
        error = assert_error(r, 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", "guided_regex")
    assert error["message"].startswith("guided_regex: ")
    router.fail_with_error_after = None
    assert client.post("/v1/completions", json={**COMPLETION, "stream": stream}).status_code == 200


@pytest.mark.parametrize("extra, param", [
    ({"allowed_token_ids": [5, 6], "bad_words": ["a"]}, "allowed_token_ids"),
    ({"bad_words": ["a"], "logit_bias": {"5": 1}}, "bad_words"),
    ({"guided_regex": "[a-z]+", "logit_bias": {"5": 1}}, "guided_regex"),  # a bias is finite: never the cause
    ({"min_tokens": 3}, "min_tokens"),
])
def test_constraints_that_leave_no_token_are_a_400_naming_a_field(client, router, extra, param):
    """The mesh retired the request: its constraints together left nothing to sample (e.g. a whitelist whose
    every token a bad word bans after the answer so far). The client's request, not the server, failed."""
    router.fail_with_error_after, router.fail_reason = 1, "constraint_error"  # the mesh's verdict, faked
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, **extra}), 400, param)
    assert error["message"].startswith(f"{param}: ") and error["type"] == "invalid_request_error"
    router.fail_with_error_after = None


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/v1/nothing"), 404)


def test_an_unknown_route_names_the_path_and_where_the_api_is(client):
    """A user's typo (a singular "completion", a base URL without /v1) got a bare "Not Found", which named neither
    the path that was wrong nor the ones served."""
    error = assert_error(client.post("/v1/chat/completion", json=CHAT), 404)
    assert error["message"].startswith("POST /v1/chat/completion is not served here: the API's paths are /v1/chat/")
    assert "/v1/chat/completions" in error["message"]
    error = assert_error(client.post("/v1/embeddings", json={"input": "hi"}), 404)  # not "the API is under /v1"
    assert error["message"].startswith("POST /v1/embeddings is not served here: the API's paths are /v1/chat/")
    error = assert_error(client.get("/v1"), 404)  # a base URL probed: it is /v1, told "the API is under /v1"
    assert error["message"].startswith("GET /v1 is not served here: the API's paths are /v1/chat/")
    error = assert_error(client.post("/chat/completions", json=CHAT), 404)
    assert error["message"].startswith("POST /chat/completions is not served here: the API is under /v1")
    error = assert_error(client.get("/models"), 404)  # the method the client used, whichever it was
    assert error["message"].startswith("GET /models is not served here: the API is under /v1")


def test_api_keys(router, tokenizer):
    client = make_client(router, tokenizer, api_keys=["k1", "k2"])
    assert_error(client.post("/v1/chat/completions", json=CHAT), 401)
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key
    # The key is checked before the body is read: no key is a 401 whatever the body, as OpenAI and vLLM answer.
    bad_json = client.post("/v1/completions", content=b"{bad", headers={"Content-Type": "application/json"})
    assert_error(bad_json, 401)
    assert_error(client.post("/v1/completions", json={"prompt": 5}), 401)
    assert_error(client.get("/no/such/path"), 401)  # nothing about the routes leaks either
    assert client.get("/version").status_code == 200


def test_allowed_origins_answer_a_browsers_preflight_before_the_key_check(router, tokenizer):
    client = make_client(router, tokenizer, api_keys=["k1"], allowed_origins=["https://app.example"])
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = client.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example",
                                                              "Authorization": "Bearer k1"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in make_client(router, tokenizer).post(
        "/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"}).headers  # off by default


# What openai-node in a browser (dangerouslyAllowBrowser) sends: its own headers besides the body's (client.mjs
# buildHeaders), so the browser asks first (Fetch: a CORS-preflight request).
BROWSER_SDK = {"Origin": "https://app.example", "Accept": "application/json", "Authorization": "Bearer k1",
               "X-Stainless-Retry-Count": "0", "X-Stainless-Lang": "js", "X-Stainless-Runtime": "browser:chrome"}


def browser_sees(response, name: str) -> str | None:
    """A response header as a page's script reads it: the Fetch standard's CORS-filtered response holds the
    CORS-safelisted response-header names and those in Access-Control-Expose-Headers, nothing else; and a
    response without Access-Control-Allow-Origin is a network error altogether (None for every header)."""
    if "access-control-allow-origin" not in response.headers:
        return None
    exposed = {h.strip().lower() for h in response.headers.get("access-control-expose-headers", "").split(",")}
    safelisted = {"cache-control", "content-language", "content-length", "content-type", "expires", "last-modified",
                  "pragma"}
    return response.headers.get(name) if name.lower() in safelisted | exposed else None


@pytest.mark.parametrize("stream", [False, True])
def test_a_browsers_sdk_reads_the_headers_that_steer_its_retries(router, tokenizer, stream):
    """openai-node reads `x-should-retry` (shouldRetry) and `retry-after` (retryRequest) from a refusal, and
    `x-request-id` (its request_id): hidden from a page's script, a 500 the meshes failed on was sent twice more
    (each taking meshes down again) and a 429 came back after its own backoff, not the server's."""
    client = make_client(router, tokenizer, api_keys=["k1"], allowed_origins=["https://app.example"])
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": ", ".join(sorted({*BROWSER_SDK, "content-type"} - {"Origin"})).lower()})
    assert preflight.status_code == 200
    router.refuse = MeshFailures("2 model replicas in a row failed while computing it")
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=BROWSER_SDK)
    assert r.status_code == 500 and browser_sees(r, "x-should-retry") == "false"
    router.refuse = QueueFull("waiting queue is full")
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=BROWSER_SDK)
    assert r.status_code == 429 and browser_sees(r, "retry-after") == r.headers["retry-after"]
    assert "x-request-id" in {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}


def test_a_failure_no_handler_took_is_a_500_a_browser_can_read(router, tokenizer):
    """Starlette answers an exception no handler took from ServerErrorMiddleware, outside every middleware the app
    adds (starlette/applications.py build_middleware_stack), CORS's too: without Access-Control-Allow-Origin the
    browser made the 500 a network error, which openai-node retries twice as a connection failure (client.mjs
    makeRequest) and then reports as "Connection error."."""
    client = make_client(router, tokenizer, api_keys=["k1"], allowed_origins=["https://app.example"])
    router.refuse = ValueError("secret internals")
    r = client.post("/v1/chat/completions", json=CHAT, headers=BROWSER_SDK)
    assert r.status_code == 500 and browser_sees(r, "content-type") == "application/json"
    assert r.json()["error"]["type"] == "internal_error" and "secret" not in r.text
    assert len(router.requests) == 1


def test_a_failure_after_the_answer_started_is_raised_not_answered_again():
    """Once the response has started, a second start would be a protocol error in the server: the failure goes to
    Starlette's own handling, as before InternalErrors."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("mid-answer")

    async def send(message):
        sent.append(message)

    with pytest.raises(ValueError, match="mid-answer"):
        asyncio.run(ingress.InternalErrors(app)(asgi_scope(), asgi_receive(CHAT, asyncio.Event()), send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200]


def test_gateway_probes_answer_head_and_vllms_ping(router, tokenizer, monkeypatch):
    """Load balancers probe with HEAD (Azure Front Door's default; RFC 9110 9.1: a server supports GET and HEAD) and
    SageMaker with GET /ping; vLLM serves /ping (GET and POST) as /health. Both stay open without a key, and say
    503 as /health does."""
    client = make_client(router, tokenizer, api_keys=["k1"])
    for method, path in [("HEAD", "/health"), ("GET", "/ping"), ("POST", "/ping"), ("HEAD", "/ping")]:
        r = client.request(method, path)
        assert r.status_code == 200 and r.content == b"", (method, path, r.status_code)

    async def not_ready() -> dict:
        return {"ready": False}
    monkeypatch.setattr(router, "stats", not_ready)
    monkeypatch.setattr(ingress, "HEALTH_READ_REUSE_S", 0.0)  # the ready read above is not reused
    for method in ("GET", "HEAD"):
        assert client.request(method, "/ping").status_code == 503
        assert client.request(method, "/health").status_code == 503


def test_sagemakers_invocations_route_a_chat_or_a_completion_by_the_body_as_vllm(client, router, tokenizer):
    """SageMaker sends every inference to POST /invocations (its probe is /ping); vLLM answers a body with
    `messages` as a chat completion and any other as a completion, each with its own errors."""
    chat = client.post("/invocations", json=CHAT).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == ANSWER
    assert router.requests.popitem()[1][0] == tokenizer.encode_chat(CHAT["messages"])
    completion = client.post("/invocations", json={**COMPLETION, "max_tokens": 4}).json()
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == tokenizer.decode(router.answer[:4])
    stream = client.post("/invocations", json={**CHAT, "stream": True})
    assert stream.headers["content-type"].startswith("text/event-stream") and "[DONE]" in stream.text
    assert_error(client.post("/invocations", json={**CHAT, "temperature": -1}), 400, param="temperature")
    assert_error(client.post("/invocations", json={**COMPLETION, "prompt": None}), 400, param="prompt")
    assert_error(client.post("/invocations", json={"model": MODEL}), 400, param="prompt")
    assert_error(client.post("/invocations", content=b"{"), 400)
    assert client.post("/invocations", json=CHAT, headers={"x-request-id": "sm-1"}).json()["id"].endswith("sm-1")
    big = client.post("/invocations", json={**CHAT, "user": "u" * 70_000})  # parsed on the large bodies' thread
    assert big.json()["object"] == "chat.completion"


def test_invocations_takes_a_body_as_the_v1_routes_do(client):
    """A body not sent as JSON, or JSON that is no object, is the /v1 routes' 400 on /invocations too (vLLM's
    /invocations refuses another Content-Type as its /v1 routes do); it was read as JSON whatever its type."""
    text = json.dumps(CHAT).encode()
    for headers in ({"content-type": "text/plain"}, {"content-type": "text/json"}, {}):
        v1 = client.post("/v1/chat/completions", content=text, headers=headers)
        assert_error(v1, 400)
        assert client.post("/invocations", content=text, headers=headers).json() == v1.json()
    plus_json = {"content-type": "application/vnd.api+json"}  # application/*+json is JSON to FastAPI (RFC 6839)
    assert client.post("/invocations", content=text, headers=plus_json).status_code == 200
    not_object = client.post("/v1/completions", json=[CHAT]).json()
    assert client.post("/invocations", json=[CHAT]).json() == not_object
    big = [{**CHAT, "user": "u" * 70_000}]  # parsed on the large bodies' thread, by the same model_validate
    assert client.post("/invocations", json=big).json() == client.post("/v1/completions", json=big).json() == not_object


def test_invocations_needs_the_key_as_every_inference_route(router, tokenizer):
    client = make_client(router, tokenizer, api_keys=["k1"])
    assert_error(client.post("/invocations", json=CHAT), 401)
    assert client.post("/invocations", json=CHAT, headers={"Authorization": "Bearer k1"}).status_code == 200


@pytest.mark.parametrize("path,body", [*ENDPOINTS, ("/v1/responses", {"model": MODEL, "input": "hi"})])
def test_streams_tell_proxies_and_caches_to_pass_them_on_at_once(client, path, body):
    """nginx buffers a proxied answer unless it says `X-Accel-Buffering: no` (its SSE chunks then came all at once,
    at the end); an SSE stream is not to be cached or replayed (Cache-Control: no-cache)."""
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"


def test_health_answers_within_its_timeout_while_the_router_does_not(client, router, monkeypatch):
    """During a router restart the stats call waits for the new replica; probes time out after 1-5 s."""
    async def stuck() -> dict:
        await asyncio.sleep(60)
    monkeypatch.setattr(router, "stats", stuck)
    monkeypatch.setattr(ingress, "HEALTH_TIMEOUT_S", 0.2)
    monkeypatch.setattr(ingress, "METRICS_TIMEOUT_S", 0.2)
    began = time.monotonic()
    response = client.get("/health")
    assert_error(response, 503)
    assert time.monotonic() - began < 5 and response.headers["retry-after"]
    began = time.monotonic()
    scraped = client.get("/metrics")  # the ingress's own families, without the meshes'
    assert time.monotonic() - began < 5 and scraped.status_code == 200
    assert "meshserve_time_to_first_token_seconds" in scraped.text
    assert "meshserve_num_requests_running{" not in scraped.text
    assert "meshserve_router_up 0.0" in scraped.text


def test_metrics_answer_while_no_router_can_be_reached(client, router, monkeypatch):
    async def gone() -> dict:
        raise ConnectionError("no router replica")
    monkeypatch.setattr(router, "stats", gone)
    scraped = client.get("/metrics")
    assert scraped.status_code == 200 and "meshserve_router_up 0.0" in scraped.text
    assert 'meshserve_num_requests_waiting{mesh=""}' not in scraped.text  # the router's backlog is unknown, not 0


# ---- disconnects --------------------------------------------------------------------------------

async def _call_asgi(app, body: dict, spec_version: str, on_body, path: str = "/v1/chat/completions") -> None:
    """Drive the app as an ASGI server would; `on_body(chunk)` reacts to each body message sent."""
    disconnected = asyncio.Event()

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            on_body(message["body"], disconnected)

    await app(asgi_scope(spec_version, path), asgi_receive(body, disconnected), send)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_disconnect_mid_stream_cancels(router, tokenizer, spec_version):
    router.pause_after = 3  # the answer stalls after 3 tokens; the client leaves during the stall
    app = build_app(router, tokenizer, MODEL)

    def on_body(chunk: bytes, disconnected: asyncio.Event):
        if b'"content":"Hello"' in chunk or b"world" in chunk:
            disconnected.set()  # 2.3: the server reports http.disconnect
            if spec_version == "2.4":
                raise OSError("connection reset")  # 2.4: sending to a gone client fails

    async def run():
        try:
            await asyncio.wait_for(_call_asgi(app, {**CHAT, "stream": True}, spec_version, on_body), timeout=30)
        except ClientDisconnect:  # how Starlette reports the failed send to the server
            pass
        (rid,) = router.requests
        assert router.cancelled == [(rid, "abort")]  # by the time the app returns, not at some later GC

    asyncio.run(run())


@pytest.mark.parametrize("error", [TaskCancelledError, ActorDiedError])
def test_a_disconnect_serve_reports_by_cancelling_the_read_is_a_disconnect(router, tokenizer, caplog, error):
    """Serve's plain proxy cancels the replica's read of a request whose client went away (TaskCancelledError from
    receive): each cut stream logged an ERROR with a traceback. It is the ASGI disconnect it stands for. So is the
    proxy's death (ActorDiedError: Ctrl-C of `make serve MESHSERVE_PLAIN_PROXY=1` kills it with its clients' streams
    open), which logged "POST /v1/responses failed" and "Request failed." with a traceback per stream."""
    router.pause_after = 3
    app = build_app(router, tokenizer, MODEL)
    raw = json.dumps({**CHAT, "stream": True}).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    cut = asyncio.Event()

    raised = []

    async def receive():
        if messages:
            return messages.pop()
        await cut.wait()
        if raised:  # as Serve's: once the read raised, nothing more comes
            await asyncio.Event().wait()
        raised.append(True)
        raise error()

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            cut.set()

    asyncio.run(asyncio.wait_for(app(asgi_scope(), receive, send), timeout=30))
    (rid,) = router.requests
    assert router.cancelled == [(rid, "abort")]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]

    async def reads_twice(scope, receive, send):  # Serve fetches nothing more once the read raised: asked again,
        reads.extend([await receive(), await receive()])  # the disconnect is said again, not waited for forever

    reads, raised[:] = [], []
    asyncio.run(asyncio.wait_for(BodyLimit(reads_twice, 1024)(asgi_scope(), receive, send), timeout=5))
    assert [m["type"] for m in reads] == ["http.disconnect"] * 2


def test_cancelled_non_streaming_request_cancels(router, tokenizer):
    """Serve cancels the handler when its HTTP client goes away; the router request must go with it."""
    router.pause_after = 2
    app = build_app(router, tokenizer, MODEL)

    async def run():
        task = asyncio.create_task(_call_asgi(app, CHAT, "2.4", lambda *_: None))
        while not router.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    (rid,) = router.requests
    assert router.cancelled == [(rid, "abort")]


# ---- metrics ------------------------------------------------------------------------------------

def test_metrics_exposition(client, router, tokenizer):
    router.held = 3  # accepted while no live mesh could take them (a failover, a router's start)
    router.stalled = ("mesh-1",)
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/completions", json={**COMPLETION, "max_tokens": 4})
    r = client.get("/metrics")
    assert r.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    def own(name, **labels):  # a family this replica measures itself: labelled with its name
        return value(name, ingress="local", **labels)

    prompt = len(tokenizer.encode_chat(CHAT["messages"])) + len(tokenizer.encode(COMPLETION["prompt"], add_bos=True))
    assert own("meshserve_prompt_tokens_total") == prompt
    assert own("meshserve_generation_tokens_total") == len(router.answer) + 4
    assert own("meshserve_requests_total", finish_reason="stop") == 1
    assert own("meshserve_requests_total", finish_reason="length") == 1
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert own(f"meshserve_{histogram}_count") == 2
    assert own("meshserve_inter_token_latency_seconds_count") == len(router.answer) - 1 + 3
    for mesh in ("mesh-0", "mesh-1"):
        assert value("meshserve_num_requests_running", mesh=mesh) == 1
        assert value("meshserve_num_requests_waiting", mesh=mesh) == 2
        assert value("meshserve_kv_blocks_used", mesh=mesh) == 30
        assert value("meshserve_kv_cache_usage_ratio", mesh=mesh) == 0.25
        assert value("meshserve_prefix_cache_hit_rate", mesh=mesh) == 0.25
        assert value("meshserve_prefix_cache_hits_tokens_total", mesh=mesh) == 100
        assert value("meshserve_num_preemptions_total", mesh=mesh) == 5
        assert value("meshserve_kv_groups", mesh=mesh) == 2
        assert value("meshserve_mesh_up", mesh=mesh) == 1
        assert value("meshserve_mesh_stalled", mesh=mesh) == (mesh == "mesh-1")
        for group in ("0", "1"):
            assert value("meshserve_kv_group_blocks_used", mesh=mesh, group=group) == 15
            assert value("meshserve_kv_group_blocks_total", mesh=mesh, group=group) == 60
            assert value("meshserve_kv_group_num_requests_running", mesh=mesh, group=group) == int(group)
    assert value("meshserve_num_requests_waiting", mesh="") == 3  # vLLM's waiting counts every one not running
    assert value("meshserve_router_up") == 1


def _samples(client) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}


def test_metrics_count_as_vllm_does(client, router, tokenizer):
    """Every finish reason's series from the start, at 0 (alerts on the error rate read 0, not "no data"); a
    request the meshes failed on is an error, not uncounted; the echo of a prompt alone is a request too."""
    reasons = {dict(labels)["finished_reason"]: v for (name, labels), v in _samples(client).items()
               if name == "vllm:request_success_total"}
    assert reasons == dict.fromkeys(("stop", "length", "abort", "error", "repetition"), 0)
    router.refuse = MeshFailures("2 model replicas in a row failed while computing it")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 500
    router.refuse = None
    body = {**COMPLETION, "echo": True, "max_tokens": 0}
    assert client.post("/v1/completions", json=body).status_code == 200
    samples = _samples(client)
    count = lambda reason: samples[("meshserve_requests_total", (("finish_reason", reason), ("ingress", "local")))]
    assert (count("error"), count("length")) == (1, 1)
    assert samples[("meshserve_prompt_tokens_total", (("ingress", "local"),))] == \
        len(tokenizer.encode_chat(CHAT["messages"])) + len(tokenizer.encode(COMPLETION["prompt"], add_bos=True))


def test_prompt_tokens_count_at_the_first_token_and_long_latencies_have_buckets():
    """vLLM adds a prompt's tokens once it is prefilled: a 128k prefill showed on the counter only when its
    answer ended, and a request aborted in the queue added its prompt. A Galaxy's first token of a 128k prompt
    takes ~100 s, past the 80 s the buckets stopped at."""
    from deployments.metrics import Metrics
    from scheduler.work import TokenEvent
    metrics = Metrics()
    prompt = lambda: metrics.prompt_tokens._value.get()
    queued = metrics.start(500, time.perf_counter())
    queued.finish("abort")
    assert prompt() == 0
    slow = metrics.start(131000, time.perf_counter() - 100.0)
    slow.on_event(TokenEvent("r", [1]), 1)
    assert prompt() == 131000
    slow.finish("stop")
    assert prompt() == 131000
    buckets = {s.labels["le"]: s.value for family in metrics.registry.collect() for s in family.samples
               if s.name == "meshserve_time_to_first_token_seconds_bucket"}
    assert (buckets["80.0"], buckets["160.0"]) == (0, 1)


def test_another_replicas_deferred_choices_count_as_waiting_only_while_its_report_is_recent():
    """Other replicas' own families come as of their last scrape, kept 15 minutes. Counts and histograms are right
    however old; the deferred gauge is added to num_requests_waiting, which autoscalers read: a replica gone (or not
    scraped lately) with choices deferred at its last scrape would show a backlog long over."""
    from deployments.metrics import DEFERRED_REPORT_TTL_S, Metrics
    other, this = Metrics("other"), Metrics("this")
    for _ in range(3):
        other.deferred.inc()
    this.deferred.inc()

    def waiting(age_s: float) -> dict[str, float]:
        text = this.render({"meshes": [], "held": 0, "ingress_families": dict([other.report()]),
                            "ingress_report_age_s": {"other": age_s}}).decode()
        return {s.labels["ingress"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "vllm:num_requests_waiting" and "ingress" in s.labels}

    assert waiting(DEFERRED_REPORT_TTL_S / 2) == {"this": 1, "other": 3}
    assert waiting(DEFERRED_REPORT_TTL_S * 2) == {"this": 1}


def test_metrics_fill_vllms_dashboard_request_panels(client, router, tokenizer):
    """vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) reads per-request
    histograms: prompt and generation lengths, TPOT, prefill and decode time, the most tokens of a request's n
    choices. They were absent: five of its panels stayed empty. Their values are what the API's usage says."""
    chat = client.post("/v1/chat/completions", json=CHAT).json()["usage"]
    batch = client.post("/v1/completions", json={**COMPLETION, "prompt": ["a b", "c d e"], "n": 2, "max_tokens": 4})
    samples = _samples(client)

    def value(name, **labels):
        return samples[(name, tuple(sorted({"ingress": "local", "model_name": MODEL, **labels}.items())))]

    batch_prompts = [len(tokenizer.encode(p, add_bos=True)) for p in ("a b", "c d e")]
    assert value("vllm:request_prompt_tokens_count") == 1 + 4  # per router request, as vLLM counts n > 1
    assert value("vllm:request_prompt_tokens_sum") == chat["prompt_tokens"] + 2 * sum(batch_prompts)
    assert value("vllm:request_generation_tokens_sum") == chat["completion_tokens"] + batch.json()["usage"][
        "completion_tokens"] == len(router.answer) + 4 * 4
    assert (value("vllm:request_generation_tokens_bucket", le="20.0"),
            value("vllm:request_generation_tokens_bucket", le="5.0")) == (5, 4)
    # once per prompt of the batch, when its n choices have all finished: the most any of them generated
    assert value("vllm:request_max_num_generation_tokens_count") == 1 + 2
    assert value("vllm:request_max_num_generation_tokens_sum") == len(router.answer) + 4 + 4
    for phase in ("prefill", "decode", "inference"):
        assert value(f"vllm:request_{phase}_time_seconds_count") == 5
    assert value("vllm:request_time_per_output_token_seconds_count") == 5


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("end", [{"stop": [" the"]}, {"repetition_detection": {"max_pattern_size": 1, "min_count": 2}}])
def test_generation_token_metrics_count_what_usage_counts_when_the_ingress_ends_an_answer(router, tokenizer, stream,
                                                                                            end):
    """An answer a stop string or repetition_detection ends here drops the tokens of its event after the one that
    ended it (the router merges a request's tokens until its next flush): they were counted as generated all the
    same, so the token counters and per-request histograms disagreed with usage (8 against 4 or 5)."""
    router.answer = tokenizer.encode("Hello world, the the answer is 42, as said.")  # " the" twice: a repetition
    router.merge = 8
    client = make_client(router, tokenizer)
    body = {**COMPLETION, "max_tokens": 16, "stream": stream, **end}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = client.post("/v1/completions", json=body)
    usage = sse(r)[-1]["usage"] if stream else r.json()["usage"]
    assert usage["completion_tokens"] < router.merge  # its first event carried tokens past the end
    samples = _samples(client)

    def value(name: str) -> float:
        return samples[(name, (("ingress", "local"), ("model_name", MODEL)))]
    for name in ("vllm:generation_tokens_total", "vllm:request_generation_tokens_sum",
                 "vllm:request_max_num_generation_tokens_sum"):
        assert value(name) == usage["completion_tokens"], name
    buckets = [dict(labels)["le"] for name, labels in samples if name == "vllm:request_prompt_tokens_bucket"]
    assert buckets == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0", "1000.0", "2000.0",
                       "5000.0", "10000.0", "20000.0", "50000.0", "100000.0", "+Inf"]  # vLLM's 1-2-5 to the context


def test_request_phases_are_measured_as_vllm_does(monkeypatch):
    """prefill: scheduled -> first token (TTFT less the router's queue time); decode: first -> last token;
    TPOT: decode over the tokens after the first, 0 for a one-token answer."""
    from deployments import metrics as metrics_module
    from deployments.metrics import Metrics
    from scheduler.work import TokenEvent
    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    metrics = Metrics()

    def observed(histogram):
        (family,) = histogram.collect()
        values = {s.name.rsplit("_", 1)[1]: s.value for s in family.samples}
        return values["sum"], values["count"]

    timer = metrics.start(7, arrival=99.0)
    clock[0] = 100.0
    timer.on_event(TokenEvent("r", [1], queue_time_s=0.25), 1)  # first token 1 s after arrival, 0.25 s of it queued
    clock[0] = 102.0
    timer.on_event(TokenEvent("r", [2, 3, 4, 5]), 4)
    timer.finish("length")
    assert observed(metrics.prefill) == (0.75, 1)
    assert observed(metrics.decode) == (2.0, 1)
    assert observed(metrics.inference) == (2.75, 1)
    assert observed(metrics.tpot) == (0.5, 1)
    assert observed(metrics.request_generation) == (5, 1)
    one = metrics.start(7, arrival=clock[0])
    one.on_event(TokenEvent("s", [1], queue_time_s=0.0), 1)
    one.finish("length")
    assert observed(metrics.tpot) == (0.5, 2)  # a one-token answer adds 0
    metrics.start(7, arrival=clock[0]).finish("abort")  # never ran: no phases, but a finished request's lengths
    assert observed(metrics.prefill)[1] == 2 and observed(metrics.request_prompt) == (21, 3)


def test_token_latencies_are_timed_as_vllm_times_them():
    """TTFT runs from the arrival to the first token, the router's queue time in it, as vLLM's runs from its
    frontend's arrival. A coalesced event of n tokens is n inter-token samples of its gap over n (vLLM: one per token
    step); the tokens that came with the first add none (vLLM records no gap for a prefill's output), nor does an
    event whose tokens the answer did not take (a prompt's logprobs alone)."""
    from deployments.metrics import Metrics
    from scheduler.work import TokenEvent
    metrics = Metrics()

    def observed(histogram) -> tuple[float, float]:
        (family,) = histogram.collect()
        values = {s.name.rsplit("_", 1)[1]: s.value for s in family.samples}
        return values["sum"], values["count"]

    timer = metrics.start(7, arrival=10.0)
    timer.on_event(TokenEvent("r", [], received=10.5), 0)
    timer.on_event(TokenEvent("r", [1, 2, 3], queue_time_s=0.5, received=11.0), 3)  # 0.5 s queued, 0.5 s prefill
    timer.on_event(TokenEvent("r", [4, 5, 6, 7], received=13.0), 4)
    timer.finish("length", 13.0)
    assert observed(metrics.ttft) == (1.0, 1)
    assert observed(metrics.inter_token) == (2.0, 4)
    assert observed(metrics.e2e) == (3.0, 1)


def test_a_requests_tpot_and_its_choices_most_tokens_are_vllms():
    """vLLM's request_time_per_output_token is the decode time over the tokens after the first, from two tokens on;
    request_max_num_generation_tokens is the most any of a prompt's n choices generated, whichever finished last."""
    from deployments.metrics import Choices, Metrics
    from scheduler.work import TokenEvent
    metrics = Metrics()

    def observed(histogram) -> tuple[float, float]:
        (family,) = histogram.collect()
        values = {s.name.rsplit("_", 1)[1]: s.value for s in family.samples}
        return values["sum"], values["count"]

    choices = Choices(2)
    longer, shorter = metrics.start(7, 10.0, choices), metrics.start(7, 10.0, choices)
    longer.on_event(TokenEvent("r-0", [1], queue_time_s=0.0, received=11.0), 1)
    longer.on_event(TokenEvent("r-0", [2], received=11.5), 1)
    longer.finish("length", 11.5)
    shorter.on_event(TokenEvent("r-1", [1], queue_time_s=0.0, received=11.0), 1)
    shorter.finish("stop", 11.0)
    assert observed(metrics.tpot) == (0.5, 2)  # two tokens: 0.5 s of decode over one; one token: 0
    assert observed(metrics.max_generation) == (2, 1)


def test_every_bucket_bound_of_vllms_histograms_is_exposed():
    """Dashboards and SLO alerts written for vLLM read its bucket bounds (le="0.075", le="7680.0"): meshserve's
    buckets are finer in places, but each of vLLM's (vllm/v1/metrics/loggers.py) must be one of them."""
    from deployments.metrics import Metrics
    request_latency = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                       240.0, 480.0, 960.0, 1920.0, 7680.0)
    token_gap = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
    vllm = {"time_to_first_token_seconds": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                            2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
            "inter_token_latency_seconds": token_gap, "request_time_per_output_token_seconds": token_gap,
            **{name: request_latency for name in ("e2e_request_latency_seconds", "request_queue_time_seconds",
                                                  "request_prefill_time_seconds", "request_decode_time_seconds",
                                                  "request_inference_time_seconds")}}
    text = Metrics().render({"meshes": [], "held": 0}).decode()
    bounds: dict[str, set[float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm:") and s.name.endswith("_bucket"):
                name = s.name.removeprefix("vllm:").removesuffix("_bucket")
                bounds.setdefault(name, set()).add(float(s.labels["le"]))
    for name, theirs in vllm.items():
        assert set(theirs) <= bounds[name], (name, sorted(set(theirs) - bounds[name]))


def test_a_down_meshs_state_and_its_failover_counts_are_shown():
    """A down mesh shows mesh_up 0 (its alert's only signal) and nothing running or held, and its failovers and the
    requests moved off it go on counting (they are the mesh's, not its incarnation's)."""
    from deployments.metrics import Metrics
    down = {"name": "mesh-1", "up": False, "stalled": False, "failovers": 2, "requests_migrated": 5, "running": 0,
            "waiting": 0, "blocks_used": 0, "blocks_total": 120, "prefix_query_tokens": 400, "prefix_hit_tokens": 100,
            "preemptions": 3, "kv_groups": 2, "groups": []}
    text = Metrics().render({"meshes": [down], "held": 0}).decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.labels.get("mesh") == "mesh-1" and "model_name" not in s.labels}
    assert samples["meshserve_mesh_up"] == 0
    assert (samples["meshserve_mesh_failovers_total"], samples["meshserve_requests_migrated_total"]) == (2, 5)
    assert (samples["meshserve_num_requests_running"], samples["meshserve_kv_cache_usage_ratio"]) == (0, 0)


def test_metrics_also_go_out_under_vllms_names(client, router):
    """vLLM's names and model_name label (vllm/v1/metrics/loggers.py), with the values of meshserve's own."""
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/completions", json={**COMPLETION, "max_tokens": 4})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}
    named = [key for key in samples if key[0].startswith("vllm:")]
    assert named and all(dict(labels)["model_name"] == MODEL for _, labels in named)

    def same(ours: str, theirs: str, **labels) -> None:
        vllm_labels = {"finished_reason" if k == "finish_reason" else k: v for k, v in labels.items()}
        mine = samples[(ours, tuple(sorted(labels.items())))]
        assert samples[(theirs, tuple(sorted({**vllm_labels, "model_name": MODEL}.items())))] == mine

    same("meshserve_prompt_tokens_total", "vllm:prompt_tokens_total", ingress="local")
    same("meshserve_generation_tokens_total", "vllm:generation_tokens_total", ingress="local")
    for reason in ("stop", "length"):
        same("meshserve_requests_total", "vllm:request_success_total", ingress="local", finish_reason=reason)
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds"):
        same(f"meshserve_{histogram}_count", f"vllm:{histogram}_count", ingress="local")
        same(f"meshserve_{histogram}_bucket", f"vllm:{histogram}_bucket", ingress="local", le="0.5")
    for mesh in ("mesh-0", "mesh-1"):
        same("meshserve_num_requests_running", "vllm:num_requests_running", mesh=mesh)
        same("meshserve_num_requests_waiting", "vllm:num_requests_waiting", mesh=mesh)
        same("meshserve_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", mesh=mesh)
        same("meshserve_prefix_cache_queries_tokens_total", "vllm:prefix_cache_queries_total", mesh=mesh)
        same("meshserve_prefix_cache_hits_tokens_total", "vllm:prefix_cache_hits_total", mesh=mesh)
        same("meshserve_num_preemptions_total", "vllm:num_preemptions_total", mesh=mesh)
    same("meshserve_num_requests_waiting", "vllm:num_requests_waiting", mesh="")


# ---- stop strings -------------------------------------------------------------------------------

@given(text=st.text(alphabet="abc ", max_size=40), stop_list=st.lists(st.text(alphabet="abc", min_size=1, max_size=4),
                                                                      min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8), include_stop=st.booleans())
def test_stop_strings_stream_exactly_the_text_before_the_first_stop(text, stop_list, cuts, include_stop):
    pieces = [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)])]
    stops = StopStrings(tuple(stop_list), include_stop)
    sent, stopped = "", False
    for i, piece in enumerate(pieces):
        out, stopped = stops.feed(piece, final=i == len(pieces) - 1)
        sent += out
        assert len(stops.text) <= stops.keep  # only the tail a stop may start in is kept, however long the text
        if stopped:
            break
    expected, first = _first_stop(pieces, stop_list, include_stop)
    assert sent == expected and stopped == (first is not None) and stops.matched == first


def test_stop_strings_count_from_the_check_on_with_the_held_tail_as_vllm_does():
    """Before min_tokens (check=False) no stop ends the answer; the first checked piece is searched with the
    held tail before it, so a stop it completes counts, and one wholly before it does not (vLLM's v1
    detokenizer searches the new characters and the stop's length - 1 before them)."""
    stops = StopStrings(("ab",))
    assert stops.feed("xa", False, check=False) == ("x", False)
    assert stops.feed("b", False, check=True) == ("", True) and stops.matched == "ab"
    stops = StopStrings(("ab",))
    assert stops.feed("ab", False, check=False) == ("a", False)
    assert stops.feed("c", True, check=True) == ("bc", False) and stops.matched is None


def test_a_short_stop_held_for_a_longer_one_before_min_tokens_does_not_count():
    """The tail held back is as long as the longest stop - 1: a shorter stop may lie wholly in it, written
    before the check was on. vLLM searches each stop from its own length - 1 before the new text, so it does
    not end the answer (it once did, with the answer cut before it)."""
    stops = StopStrings(("ab", "xyzw"))
    assert stops.feed("ab", False, check=False) == ("", False)
    assert stops.feed("c", True, check=True) == ("abc", False) and stops.matched is None
    stops = StopStrings(("ab", "xyzw"))  # one that the new text completes still counts
    assert stops.feed("xa", False, check=False) == ("", False)
    assert stops.feed("b", True, check=True) == ("x", True) and stops.matched == "ab"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include_stop", [False, True])
def test_of_two_stops_one_token_completes_the_first_listed_ends_the_answer(client, router, tokenizer, stream,
                                                                           include_stop):
    """vLLM's check_stop_strings tries the stops in the request's order and takes the first it finds in the new
    text, wherever another starts: " the" (one token) completes both "he" and " t"."""
    router.answer = tokenizer.encode("Say the word")
    assert tokenizer.decode([router.answer[1]]) == " the"
    body = {**COMPLETION, "stream": stream, "stop": ["he", " t"], "include_stop_str_in_output": include_stop}
    r = client.post("/v1/completions", json=body)
    choices = [c["choices"][0] for c in sse(r)] if stream else r.json()["choices"]
    assert "".join(c["text"] for c in choices) == ("Say the" if include_stop else "Say t")
    assert choices[-1]["stop_reason"] == "he"


def test_with_include_stop_str_in_output_no_text_is_held_back(tokenizer):
    """A stop string that is sent with the answer needs no text held back for it: the text before it is sent either
    way, and the stop ends in the new text, so all text before that is the answer's. vLLM holds back nothing then
    (its detokenizer's stop_buffer_length is 0 with include_stop_str_in_output); a stream here held back the longest
    stop's length - 1 characters at every token, up to 255 of them, for nothing."""
    stops = StopStrings(("a long stop",), include_stop=True)
    assert stops.feed("Say", False) == ("Say", False) and stops.feed(" a long", False) == (" a long", False)
    assert stops.feed(" stop!", False) == (" stop", True)
    answer = ChoiceText(tokenizer, [], ("x" * 200,), 0, None, include_stop=True)
    assert [answer.feed([t], False)[0] for t in tokenizer.encode("Say the word")] == ["Say", " the", " word"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_short_stop_within_min_tokens_does_not_end_the_answer(client, router, tokenizer, stream):
    words = [tokenizer.encode(w) for w in ["a", " b", " c", " d"]]
    assert all(len(w) == 1 for w in words)
    router.answer = [w[0] for w in words]
    body = {**COMPLETION, "stream": stream, "stop": [" b", "a long stop"], "min_tokens": 2, "max_tokens": 4}
    r = client.post("/v1/completions", json=body)
    text = "".join(c["choices"][0]["text"] for c in sse(r)) if stream else r.json()["choices"][0]["text"]
    assert text == "a b c d"  # " b" is the second token: within min_tokens


def _first_stop(pieces: list[str], stops: list[str], include_stop: bool) -> tuple[str, str | None]:
    """The answer's text and the stop that ends it: the first piece after which the whole text holds a stop
    that was not there before; among the stops it completes, the first listed (vLLM's check_stop_strings)."""
    text = ""
    for piece in pieces:
        before, text = text, text + piece
        for stop in stops:
            if stop in text and stop not in before:
                start = text.find(stop)
                return text[:start + len(stop) if include_stop else start], stop
    return text, None


def test_max_model_len_comes_from_the_meshes_and_is_503_until_one_is_up(router, tokenizer):
    router.max_model_len = None  # no mesh has come up yet
    client = make_client(router, tokenizer, no_mesh_wait_s=0.0)  # no wait for one: 503 at once
    assert_error(client.post("/v1/completions", json=COMPLETION), 503)
    assert_error(client.get("/v1/models"), 503)
    router.max_model_len = 100
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 100
    assert_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 100}), 400, "max_tokens")


def test_a_request_before_any_mesh_is_up_waits_for_one(router, tokenizer):
    """A fresh ingress (a start, a redeploy) knows no mesh's limit until one is up: its requests wait for one, as the
    router holds requests while no mesh is live. A redeploy under load answered 40 requests 503 in the 0.6 s before
    the new router's first mesh came up. It waits up to AppConfig.no_mesh_wait_s, as the router does."""
    router.max_model_len = None
    client = make_client(router, tokenizer, no_mesh_wait_s=5.0)
    threading.Timer(0.5, setattr, (router, "max_model_len", 100)).start()
    response = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


def test_the_wait_for_the_first_mesh_stays_within_the_headers_cap_whatever_no_mesh_wait_s(router, tokenizer,
                                                                                            monkeypatch):
    """A stream's headers wait for it, and a proxy in front cuts a silent stream at its read timeout (60 s): a long
    no_mesh_wait_s held them past HELD_HEADERS_MAX_S, the cap on every such wait, so the client saw a cut stream where
    a 503 with Retry-After was due. (Here the cap is 0.3 s, no_mesh_wait_s 5 s and the mesh comes at 2 s.)"""
    monkeypatch.setattr(openai_server, "HELD_HEADERS_MAX_S", 0.3)
    router.max_model_len = None
    client = make_client(router, tokenizer, no_mesh_wait_s=5.0)
    threading.Timer(2.0, setattr, (router, "max_model_len", 100)).start()
    assert_error(client.post("/v1/completions", json={**COMPLETION, "stream": True}), 503)


def test_a_wait_for_the_first_mesh_its_requests_left_ends_quietly_when_the_router_is_lost(router, tokenizer, caplog):
    """The wait all requests share runs on after they leave (a client's timeout); a router lost then is a 503 for
    whoever asks next. Ended by that error with no one to read it, the wait logged "Task exception was never
    retrieved" with a traceback at ERROR, in the start or outage when clients give up."""
    import gc
    import logging

    router.max_model_len = None
    server = make_client(router, tokenizer, no_mesh_wait_s=5.0).app.state.server

    async def lost() -> dict:
        raise ConnectionError("the router is gone")

    async def run() -> None:
        waiting = asyncio.create_task(server.model_len())
        await asyncio.sleep(0.1)
        waiting.cancel()  # its client left
        router.stats = lost
        await asyncio.sleep(0.5)  # the wait's next poll finds no router
        with pytest.raises(openai_server.APIError) as refused:
            await server.model_len()
        assert refused.value.status == 503
        gc.collect()  # the first wait, ended and let go
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(run())
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_mesh_back_with_another_length_changes_the_limit(router, tokenizer, monkeypatch):
    """The limit is read again once older than MODEL_LEN_REFRESH_S, off the request's path: a request after a
    mesh came back shorter is a 400 (not quietly cut to the new room), and one after it came back longer fits."""
    monkeypatch.setattr(openai_server, "MODEL_LEN_REFRESH_S", 0.0)
    with make_client(router, tokenizer) as client:
        body = {**COMPLETION, "max_tokens": 150}
        assert client.post("/v1/completions", json=body).status_code == 200
        router.max_model_len = 100
        codes = [client.post("/v1/completions", json=body).status_code for _ in range(20)]
        assert codes[-1] == 400 and assert_error(client.post("/v1/completions", json=body), 400, "max_tokens")
        router.max_model_len = 2048
        assert [client.post("/v1/completions", json=body).status_code for _ in range(20)][-1] == 200
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 2048


# ---- tool calls, structured outputs, logit_bias ---------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'


@pytest.mark.parametrize("tool_choice", [None, "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_an_answer_that_calls_a_tool_comes_back_as_tool_calls(client, router, tokenizer, eos, tool_choice):
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "tool_choice": tool_choice}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    finish = "stop" if isinstance(tool_choice, dict) else "tool_calls"  # a named call was asked for: OpenAI, vLLM
    assert choice["finish_reason"] == finish and choice["message"]["content"] is None
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    (_, params, _), = list(router.requests.values())[-1:]
    assert (params.grammar is not None) == (tool_choice is not None)  # forced calls are constrained
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    (streamed,) = streamed_calls(chunks)
    assert streamed["name"] == "get_weather" and deltas[-1]["finish_reason"] == finish
    assert json.loads(streamed["arguments"]) == {"city": "Oslo"} and streamed["id"]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == ""
    pieces = [d for d in deltas if d["delta"].get("tool_calls")]
    assert len(pieces) > 2  # the arguments stream as they come, as vLLM's tool parsers stream them
    assert all(d["delta"] != {"content": ""} or d["finish_reason"] for d in deltas)  # none that carries nothing


def test_a_streamed_calls_deltas_carry_what_openai_sends_and_no_more(client, router, tokenizer, eos):
    """OpenAI's call deltas: the first with index, id, type and the name, later ones with index and more arguments
    alone, and no content beside them (the held text is the call's, not an empty message a client would append)."""
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    chunks = sse(client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER_TOOL], "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    first, *later = [d["tool_calls"] for d in deltas]
    assert set(first[0]) == {"index", "id", "type", "function"} and first[0]["function"]["name"] == "get_weather"
    assert later and all(set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                         for (call,) in later)
    assert all(set(d) == {"tool_calls"} for d in deltas)


@pytest.mark.parametrize("tool_choice", [None, "required"])
def test_openai_sdks_stream_helper_pieces_streamed_calls_together(client, router, tokenizer, eos, tool_choice):
    """The official SDK's ChatCompletionStreamState (behind `client.chat.completions.stream`) accumulates the
    chunks and checks each piece: a later piece with `"type": null` failed it."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk
    router.answer = tokenizer.encode(CALL_TEXT + "; " + CALL_TEXT.replace("Oslo", "Rome")) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "tool_choice": tool_choice, "stream": True}
    state = ChatCompletionStreamState()
    for chunk in sse(client.post("/v1/chat/completions", json=body)):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("function", "get_weather", {"city": "Oslo"}), ("function", "get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("answer", [CALL_TEXT + "; " + CALL_TEXT.replace("Oslo", "Rome"),
                                    # "parameters" first: not streamed, both calls come at the end
                                    '{"parameters": {"city": "Oslo"}, "name": "get_weather"}; '
                                    '{"parameters": {"city": "Rome"}, "name": "get_weather"}'])
def test_a_chunk_carries_one_call_as_openai_and_vllm_stream_them(client, router, tokenizer, eos, answer):
    """Two calls whose pieces came in one router event (merged to its flush) went out in one chunk's `tool_calls`:
    LlamaIndex's OpenAI and OpenAILike read a delta's first call only ("openai provides chunks consisting of
    tool_call deltas one tool at a time", llama_index.llms.openai.utils.update_tool_calls), so its agents lost
    the second call's id and name."""
    router.answer = tokenizer.encode(answer) + [eos]
    router.merge = len(router.answer)  # the whole answer in one event
    chunks = sse(client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER_TOOL], "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert all(len(d.get("tool_calls") or ()) <= 1 for d in deltas), deltas
    firsts = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]  # what LlamaIndex reads
    assert [(tc["index"], tc["function"]["name"], json.loads(tc["function"]["arguments"])) for tc in firsts] == [
        (0, "get_weather", {"city": "Oslo"}), (1, "get_weather", {"city": "Rome"})]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_a_stop_string_does_not_finish_as_tool_calls(client, router, tokenizer, eos, stream):
    """Its arguments are no JSON to run: the finish stays "stop" (with the stop string), as a max_tokens cut
    stays "length"."""
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "tool_choice": "required", "stop": ["Oslo"], "stream": stream}
    r = client.post("/v1/chat/completions", json=body)
    choice = [c for c in sse(r) if c["choices"]][-1]["choices"][0] if stream else r.json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "Oslo")


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_without_tools_is_a_400_saying_so(client, router, tool_choice):
    """vLLM's rule ("When using `tool_choice`, `tools` must be set.") and OpenAI's: a choice among no tools is the
    client's mistake, not a plain answer ("auto") or a grammar of no calls that cannot compile ("required")."""
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "tool_choice": tool_choice}), 400,
                         param="tool_choice")
    assert "`tools`" in error["message"]
    assert router.requests == {}


@pytest.mark.parametrize("stream", [False, True])
def test_whole_calls_that_reach_max_tokens_finish_as_length(client, router, tokenizer, eos, stream):
    """OpenAI's finish_reason is "length" when the request's max_tokens was reached: the answer stopped for the
    budget, not because the model ended its turn (another parallel call may have followed). Calls that parse at
    the cut are returned, but the finish stays the cut's, as "stop" stays for a stop string."""
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "max_tokens": len(tokenizer.encode(CALL_TEXT)), "stream": stream}
    r = client.post("/v1/chat/completions", json=body)
    if stream:
        chunks = sse(r)
        calls, finish = streamed_calls(chunks), [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    else:
        choice = r.json()["choices"][0]
        calls, finish = [c["function"] for c in choice["message"]["tool_calls"]], choice["finish_reason"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert finish == "length"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("max_tokens", [1, 3])
def test_a_named_call_cut_before_its_name_names_the_chosen_tool(client, router, tokenizer, eos, stream, max_tokens):
    """Cut by max_tokens before its name was written (or while "get" could begin either tool's), a forced call
    names the tool that tool_choice names, the one its grammar admits: it named the first tool offered."""
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    time_tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = {**CHAT, "tools": [time_tool, WEATHER_TOOL], "max_tokens": max_tokens, "stream": stream,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    r = client.post("/v1/chat/completions", json=body)
    whole = None if stream else r.json()["choices"][0]["message"]["tool_calls"]
    calls = streamed_calls(sse(r)) if stream else [c["function"] for c in whole]
    assert [c["name"] for c in calls] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("arguments", ['{"city": ' + "[" * 3000 + "]" * 3000 + "}", '{"n": ' + "9" * 4400 + "}"],
                         ids=["nested", "long_int"])
def test_a_call_nested_deeper_than_pythons_json_reads_is_no_500(tokenizer, eos, stream, arguments):
    """Arguments nested past the interpreter's recursion limit (a model repeating "[") made json raise
    RecursionError, and an integer of more than int()'s 4,300 digits (a model repeating "9") ValueError: the
    whole answer was a 500, the stream an error event. It is a call whose arguments do not
    parse (finish "stop"), on both paths, with its text as generated."""
    from tests.fake_router import FakeRouter
    from tests.ingress_support import make_client
    router = FakeRouter(tokenizer.encode(f'{{"name": "get_weather", "parameters": {arguments}}}') + [eos],
                        max_model_len=16384)
    r = make_client(router, tokenizer).post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER_TOOL],
                                                                          "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        chunks = sse(r)
        assert all("error" not in c for c in chunks)
        calls, finish = streamed_calls(chunks), [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    else:
        choice = r.json()["choices"][0]
        calls, finish = [c["function"] for c in choice["message"]["tool_calls"]], choice["finish_reason"]
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", arguments)] and finish == "stop"


TWO_CALLS = CALL_TEXT + "; " + CALL_TEXT.replace("Oslo", "Rome")


@pytest.mark.parametrize("tool_choice", [None, "required"])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("cut", [{"stop": ["Rome"]}, {"stop": ['"}}']}, {"stop": ['"}}; ']}, {"max_tokens": 5},
                                 {"max_tokens": 20}, {"max_tokens": 100}, {"answer": CALL_TEXT[:-1] + " and so on"},
                                 {"answer": CALL_TEXT.replace('"Oslo"', "Oslo") + "; " + CALL_TEXT},
                                 # a key again later in a call's object (json keeps the last; a stream sent the first)
                                 {"answer": CALL_TEXT[:-1] + ', "parameters": {"city": "Rome"}}; ' + CALL_TEXT},
                                 {"answer": CALL_TEXT[:-1] + ', "name": "nope"}'},
                                 {"answer": CALL_TEXT.replace("parameters", "arguments")[:-1]
                                  + ', "parameters": {"city": "Rome"}}'},
                                 # whitespace JSON does not take (U+00A0) in a call's object: no JSON, so it ends
                                 # the calls (the stream took it as JSON's whitespace and went on)
                                 {"answer": CALL_TEXT.replace('{"name"', '{\u00a0"name"', 1) + "; " + CALL_TEXT},
                                 {"answer": CALL_TEXT[:-1] + '\u00a0}; ' + CALL_TEXT}])
def test_a_stream_and_a_whole_answer_report_the_same_calls_and_finish(client, router, tokenizer, eos, tool_choice,
                                                                     parallel, cut):
    """A second call cut by a stop string was streamed (its name and the arguments so far) and then finished
    as "tool_calls", while the whole answer dropped it and kept "tool_calls": a cut call is a call in both,
    and the finish is the cut's ("stop", "length") unless every call the answer keeps is whole. A call whose
    object had a key again (a second "parameters", or a "name" of no tool) was the stream's first name and
    arguments but the whole answer's last (or content). A call whose object held whitespace JSON does not take
    ended the whole answer's calls but not the stream's."""
    cut = dict(cut)  # (one dict serves every combination of the other parameters)
    router.answer = tokenizer.encode(cut.pop("answer", TWO_CALLS)) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "tool_choice": tool_choice, "parallel_tool_calls": parallel, **cut}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"].get("tool_calls") or []]
    assert [(c["name"], c["arguments"]) for c in streamed_calls(chunks)] == calls
    assert finish == whole["finish_reason"]
    if cut == {"stop": ["Rome"]}:  # the second call is cut: the stop's finish, unless only the first is kept
        assert len(calls) == 1 + parallel and finish == ("stop" if parallel else "tool_calls")


def streamed_calls(chunks: list[dict]) -> list[dict]:
    """The calls a stream's tool_call deltas make, pieced together by index as OpenAI's SDKs do."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            assert (call["name"] is None) == ("name" in tc["function"])  # the name comes once, first
            call["id"] = call["id"] or tc.get("id")
            call["name"] = call["name"] or tc["function"].get("name")
            call["arguments"] += tc["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


def test_a_held_back_tool_call_still_streams_every_tokens_logprobs(client, router, tokenizer, eos):
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}
    chunks = sse(client.post("/v1/chat/completions", json=body))
    entries = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
               for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == chunks[-1]["usage"]["completion_tokens"] == len(router.answer)


@pytest.mark.parametrize("stream", [False, True])
def test_with_tool_choice_none_an_answer_like_a_call_is_content(client, router, tokenizer, eos, stream):
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "tool_choice": "none", "stream": stream}
    r = client.post("/v1/chat/completions", json=body)
    if stream:
        deltas = [c["choices"][0] for c in sse(r) if c["choices"]]
        content, finish = "".join(d["delta"].get("content") or "" for d in deltas), deltas[-1]["finish_reason"]
    else:
        message, finish = r.json()["choices"][0]["message"], r.json()["choices"][0]["finish_reason"]
        content = message["content"]
        assert not message.get("tool_calls")
    assert (content, finish) == (CALL_TEXT, "stop")


def test_tool_choice_none_still_offers_the_tools_in_the_prompt(client, router):
    """OpenAI and vLLM (by default) keep the tools in the prompt with tool_choice "none"; only the answer is
    never read as calls."""
    for choice in ("auto", "none"):
        client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER_TOOL], "tool_choice": choice})
    plain = client.post("/v1/chat/completions", json=CHAT).json()["usage"]["prompt_tokens"]
    (auto, _, _), (none, _, _), _ = router.requests.values()
    assert auto == none and len(none) > plain


@pytest.mark.parametrize("parallel", [None, True, False])
def test_parallel_tool_calls_false_keeps_the_first_call_only(client, router, tokenizer, eos, parallel):
    router.answer = tokenizer.encode(CALL_TEXT + "; " + CALL_TEXT.replace("Oslo", "Rome")) + [eos]
    body = {**CHAT, "tools": [WEATHER_TOOL], "parallel_tool_calls": parallel}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    calls = choice["message"]["tool_calls"]
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    streamed = [{"function": call} for call in streamed_calls(chunks)]
    for got in (calls, streamed):
        cities = [json.loads(c["function"]["arguments"])["city"] for c in got]
        assert cities == (["Oslo"] if parallel is False else ["Oslo", "Rome"])  # OpenAI's default is true
    # the call kept is whole, so the answer ended as calls either way
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert (choice["finish_reason"], reasons) == ("tool_calls", ["tool_calls"])


def test_with_tools_a_plain_answer_stays_content(client, router):
    r = client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER_TOOL], "stream": True})
    deltas = [c["choices"][0] for c in sse(r) if c["choices"]]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == ANSWER
    assert deltas[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("name", ["Page[User]", "person info", "a" * 65, "server:read_file"])
def test_a_tool_or_schema_name_vllm_takes_is_served(client, router, tokenizer, eos, name):
    """vLLM takes any name; libraries name tools and schemas after a model's title or class: langchain's
    with_structured_output and instructor send a generic pydantic model as `Page[User]`, a JSON schema's title may
    have spaces."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    formatted = client.post("/v1/chat/completions", json={**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": name, "schema": schema}}})
    assert formatted.status_code == 200, formatted.text
    router.answer = tokenizer.encode(json.dumps({"name": name, "parameters": {"city": "Oslo"}})) + [eos]
    tool = {"type": "function", "function": {"name": name, "parameters": schema}}
    r = client.post("/v1/chat/completions", json={**CHAT, "tools": [tool], "tool_choice": "required"})
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == name
    responses = client.post("/v1/responses", json={"model": MODEL, "input": "hi", "tool_choice": "required", "tools": [
        {"type": "function", "name": name, "parameters": schema}]})
    assert responses.status_code == 200, responses.text
    assert responses.json()["output"][0]["name"] == name


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "Report", "schema": {
        "type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}}}])
def test_a_forced_call_is_constrained_to_its_tool_whatever_the_response_format(client, router, tokenizer, eos,
                                                                               response_format):
    """response_format shapes a content reply, and a forced call makes none: vLLM lets the tool's schema win, as
    OpenAI takes the pair. The Agents SDK sends both for an agent with an output_type and tool_choice "required",
    instructor's RESPONSES_TOOLS mode a Responses request with `text.format` and a named tool_choice."""
    router.answer = tokenizer.encode(CALL_TEXT) + [eos]
    alone = client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER_TOOL], "tool_choice": "required"})
    r = client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER_TOOL], "tool_choice": "required",
                                                  "response_format": response_format})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["tool_calls"] == [
        {**call, "id": r.json()["choices"][0]["message"]["tool_calls"][0]["id"]}
        for call in alone.json()["choices"][0]["message"]["tool_calls"]]
    (_, forced, _), (_, both, _) = list(router.requests.values())[-2:]
    assert both.grammar == forced.grammar
    text_format = {"type": "json_schema", "name": "Report", "schema": response_format.get("json_schema", {}).get(
        "schema", {"type": "object"})} if response_format["type"] == "json_schema" else response_format
    responses = client.post("/v1/responses", json={
        "model": MODEL, "input": "hi", "text": {"format": text_format},
        "tool_choice": {"type": "function", "name": "get_weather"},
        "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}]})
    assert responses.status_code == 200, responses.text
    assert responses.json()["output"][0]["type"] == "function_call"


def test_structured_outputs_and_logit_bias_reach_the_sampler(client, router):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
            "logit_bias": {"42": 100, "0" * 30 + "7": -100}}  # int() takes the leading zeros
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    (_, params, _), = list(router.requests.values())
    assert params.grammar and "json_schema" in params.grammar and params.logit_bias == {42: 100.0, 7: -100.0}


def test_a_logit_bias_key_with_thousands_of_leading_zeros_is_its_token_id(client, router):
    """int() counts leading zeros against its 4,300 digits: "0" * 5000 + "7" was a 500, not token 7."""
    body = {**CHAT, "logit_bias": {"0" * 5000 + "7": -100}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    (_, params, _), = list(router.requests.values())
    assert params.logit_bias == {7: -100.0}


@given(zeros=st.integers(0, 6000), digits=st.text(alphabet="0123456789", min_size=1, max_size=30))
def test_a_logit_bias_key_of_digits_is_the_id_they_spell_or_a_400(zeros, digits):
    vocab = 49152
    req = CompletionRequest(prompt="x", logit_bias={"0" * zeros + digits: 1.5})
    if int(digits) < vocab:
        assert request_checks.logit_bias(req, vocab) == {int(digits): 1.5}
    else:
        with pytest.raises(request_checks.APIError) as refused:
            request_checks.logit_bias(req, vocab)
        assert refused.value.status == 400 and refused.value.info.param == "logit_bias"


def test_a_logit_bias_refusal_quotes_a_key_of_up_to_40_characters_whole():
    """A longer key is cut to its first 40 characters: a client's 100 KB key is not echoed whole."""
    for key, shown in (("k" * 40, "k" * 40), ("k" * 41, "k" * 40 + "...")):
        with pytest.raises(request_checks.APIError) as refused:
            request_checks.logit_bias(CompletionRequest(prompt="x", logit_bias={key: 1.0}), 49152)
        assert f"got {shown!r}: 1.0" in refused.value.info.message, refused.value.info.message


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"logit_bias": {"abc": 5}}, "logit_bias"),
    ({"logit_bias": {"²": 5}}, "logit_bias"),  # str.isdigit() takes it; int() does not
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    # each entry costs every sampled token of the host sampler: a bound, not the whole vocabulary's worth
    ({"logit_bias": dict.fromkeys(map(str, range(MAX_LOGIT_BIAS_ENTRIES + 1)), 1)}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    # a schema under another type would be dropped without a word: the answer any JSON object, or free text
    ({"response_format": {"type": "json_object", "json_schema": {"name": "s", "schema": {"type": "object"}}}},
     "response_format.json_schema"),
    ({"logit_bias": {"9" * 5000: 5}}, "logit_bias"),  # past int()'s 4300 digits
    ({"tools": []}, "tools"),  # OpenAI and vLLM refuse an empty array: omit it
    ({"tools": [], "tool_choice": "none"}, "tools"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
])
def test_bad_constraints_are_400s_naming_the_field(client, router, extra, param):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param)
    assert not router.requests


@pytest.mark.parametrize("field", ["guided_json", "structured_outputs", "messages"])
def test_json_text_a_client_sends_nested_too_deeply_is_named_so(client, router, field):
    """A schema, or a tool call's arguments pasted back, in JSON text nested past the interpreter's recursion limit is
    a 400 naming the field that says what is wrong with the text, not Python's "maximum recursion depth exceeded"."""
    deep = "[" * 3000 + "]" * 3000
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
    extra = {"guided_json": {"guided_json": deep}, "structured_outputs": {"structured_outputs": {"json": deep}},
             "messages": {"messages": [*CHAT["messages"], {"role": "assistant", "tool_calls": [call]},
                                       {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}}[field]
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400)
    assert error["param"].startswith(field) and "JSON nested too deeply" in error["message"], error
    assert "recursion" not in error["message"]
    assert not router.requests


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(("path", "extra", "field"), [
    ("/v1/chat/completions", {"guided_json": None}, "guided_json"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": None}}},
     "response_format.json_schema.schema.properties"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": None}}]},
     "tools.0.function.parameters.properties"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": None}}},
     "text.format.schema.properties"),
    # under a union (text or a list of tagged items): the path goes on past the union's label to the value
    ("/v1/responses", {"input": [{"type": "reasoning", "summary": [], "encrypted_content": None}]},
     "input.0.encrypted_content")])
def test_a_json_value_a_client_sends_nested_too_deeply_is_named_so(client, router, path, extra, field):
    """A schema object nested past pydantic's validation depth is a short 400 saying so, at the value's path: the error
    named every level (`guided_json.properties.a.properties.a...`, 1.7 KB as `param` and again in the message) and
    said "Recursion error - maximum validation depth exceeded"."""
    body = json.loads(json.dumps(extra).replace("null", json.dumps(_nested_schema(300))))
    base = CHAT if path == "/v1/chat/completions" else {"model": MODEL, "input": "hi"}
    error = assert_error(post(client, path, {**base, **body}), 400, field)
    assert error["message"] == f"{field}: JSON nested too deeply", error
    assert not router.requests


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": None}}]}),
    ("/v1/responses", {"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": None}],
                       "tool_choice": "none"})])
def test_a_tool_nested_as_deeply_as_validation_takes_is_answered(tokenizer, eos, path, body):
    """pydantic serializes a JSON value one level less deep than it validates: the tools' size, measured as
    model_dump_json before templating, raised "Maximum serialization depth exceeded", a 500, for a schema 127
    levels deep without a grammar (tool_choice "auto" or "none")."""
    from tests.fake_router import FakeRouter
    from tests.ingress_support import make_client
    client = make_client(FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=16384), tokenizer)
    deepest = json.loads(json.dumps(body).replace("null", json.dumps(_nested_schema(127))))
    assert post(client, path, deepest).status_code == 200
    too_deep = json.loads(json.dumps(body).replace("null", json.dumps(_nested_schema(128))))
    assert_error(post(client, path, too_deep), 400)


def test_a_chat_too_big_for_the_context_is_refused_before_templating(client, router):
    """100k empty messages, or huge tool definitions, cannot fit: refused without running the template."""
    many = {**CHAT, "messages": [{"role": "user", "content": ""}] * 100_000}
    assert_error(client.post("/v1/chat/completions", json=many), 400, "messages")
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "x" * 60_000}} for i in range(5)]
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "tools": tools}), 400, "tools")
    assert "the messages and tools take" in error["message"]  # the tools are most of it: named, not the messages
    tokenize = {"model": MODEL, "messages": CHAT["messages"], "tools": tools}
    assert_error(client.post("/tokenize", json=tokenize), 400, "tools")
    # 2,000 calls with empty arguments (22k tokens once templated) count a token each of the template's text; one
    # call's arguments count whole: each counted, not templated
    empty = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}] * 2_000
    long = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps({"a": "x " * 40_000})}}]
    for calls in (empty, long):
        history = {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "tool_calls": calls}]}
        error = assert_error(client.post("/v1/chat/completions", json=history), 400, "messages")
        assert "take at least" in error["message"], error
    assert not router.requests


def test_a_token_the_model_cannot_embed_is_named_in_the_messages_beside_longer_tools(router, tokenizer):
    """Only a length refusal names `tools` (where most of the characters are): the text of a message whose token
    has no embedding is the messages' (the tools, longer than the message, were named)."""
    router.vocab_size = 40_000
    client = make_client(router, tokenizer)
    word = next(w for w in ("Zwischenzeitlich", "曖昧", "ꙮ") if max(tokenizer.encode(w)) >= 40_000)
    tools = [{"type": "function", "function": {"name": "f", "description": "a " * 40, "parameters": {"type": "object"}}}]
    body = {**CHAT, "messages": [{"role": "user", "content": word}], "tools": tools}
    assert_error(client.post("/v1/chat/completions", json=body), 400, "messages")
    assert not router.requests


MERGED_CASES = [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12}),
    ("/v1/completions", {"prompt": "Once upon a time", "stop": [" fox", "jumps"], "max_tokens": 30}),
    ("/v1/completions", {"prompt": "Once upon a time", "stop": [" "], "min_tokens": 5, "max_tokens": 30}),
    ("/v1/completions", {"prompt": "Once upon a time", "stop": [" "], "logprobs": 2, "max_tokens": 30}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["o"], "min_tokens": 3,
                              "logprobs": True, "top_logprobs": 1, "max_tokens": 30}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 1, "max_tokens": 9}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", MERGED_CASES)
def test_events_merged_by_the_router_give_the_same_answer_as_one_token_events(router, tokenizer, path, body, stream):
    """Stop strings, min_tokens, logprobs and usage are per token, however many tokens an event carries."""
    def answer(merge: int):
        router.merge = merge
        response = make_client(router, tokenizer).post(path, json={"model": MODEL, **body, "stream": stream,
                                                               **({"stream_options": {"include_usage": True}} if stream else {})})
        assert response.status_code == 200, response.text
        if not stream:
            out = response.json()
            return out["choices"], out["usage"]
        chunks = sse(response)
        text = {}
        for c in chunks:
            for ch in c["choices"]:
                piece = ch.get("text") if "text" in ch else (ch["delta"].get("content") or "")
                text[ch["index"]] = text.get(ch["index"], "") + piece
                if ch.get("finish_reason"):
                    text[(ch["index"], "reason")] = ch["finish_reason"]
        return sorted(text.items(), key=str), chunks[-1]["usage"]
    assert answer(4) == answer(1)


def test_the_deltas_a_lagging_reader_of_n_choices_gets_hold_at_most_the_merge_bound(router, tokenizer, monkeypatch):
    """With n choices each choice's unread delta takes the next one while under the bound: it reached the bound + one
    delta's tokens - 1. A delta that would pass the bound now waits as the next one."""
    from deployments import router_client
    from deployments.protocol import CompletionRequest

    monkeypatch.setattr(router_client, "MERGED_TOKENS_MAX", 12)
    router.answer, router.merge = list(range(1000, 1060)), 5
    server = make_client(router, tokenizer).app.state.server

    async def run() -> list:
        prep = await server.prepare(CompletionRequest(model=MODEL, prompt="hi", max_tokens=60, n=2), "cmpl")
        stream = server.deltas([prep], 2, None)
        first = await anext(stream)
        await asyncio.sleep(0.3)  # the reader lags while both choices run to their end
        return [first, *[d async for d in stream]]

    deltas = asyncio.run(run())
    assert max(len(d.token_ids) for d in deltas) <= 12, [len(d.token_ids) for d in deltas]
    for index in (0, 1):
        assert [t for d in deltas if d.index == index for t in d.token_ids] == router.answer


def test_a_lagging_reader_of_a_stream_interval_gets_whole_intervals_merged_to_the_bound(router, tokenizer,
                                                                                       monkeypatch):
    """With stream_interval the unread deltas of a reader that lags still merge, in whole intervals, up to the bound:
    kept apart, a stalled client's choices held a delta (~9 tracked objects) per N tokens, not per bound."""
    from deployments import router_client
    from deployments.protocol import CompletionRequest

    monkeypatch.setattr(router_client, "MERGED_TOKENS_MAX", 12)
    router.answer = list(range(1000, 1060))
    server = make_client(router, tokenizer).app.state.server

    async def run() -> list:
        prep = await server.prepare(CompletionRequest(model=MODEL, prompt="hi", max_tokens=60, n=2), "cmpl")
        stream = server.deltas([prep], 2, None, 2)
        first = await anext(stream)
        await asyncio.sleep(0.3)  # the reader lags while both choices run to their end
        return [first, *[d async for d in stream]]

    deltas = asyncio.run(run())
    for index in (0, 1):
        sizes = [len(d.token_ids) for d in deltas if d.index == index]
        assert [t for d in deltas if d.index == index for t in d.token_ids] == router.answer
        assert sizes[0] == 1 and all(s % 2 == 0 and s <= 12 for s in sizes[1:-1]) and sizes[-1] == 1, sizes
        assert len(sizes) <= 2 + 60 // 12 + 1, sizes  # kept apart: 31, a delta per 2 tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_counts_only_after_min_tokens(client, router, tokenizer, stream):
    """min_tokens tokens come first whatever they hold; a stop string completed by token min_tokens + 1
    ends the answer (vLLM's rule, and the one stop ids follow)."""
    words = [tokenizer.encode(w) for w in ["a", " b", " c", " d", " e", " f"]]
    assert all(len(w) == 1 for w in words)
    router.answer = [w[0] for w in words]

    def text(min_tokens: int) -> str:
        r = client.post("/v1/completions", json={**COMPLETION, "stream": stream, "stop": [" c", " e"],
                                                 "min_tokens": min_tokens, "max_tokens": 6})
        if stream:
            return "".join(c["choices"][0]["text"] for c in sse(r))
        return r.json()["choices"][0]["text"]
    assert text(0) == "a b"
    assert text(2) == "a b"  # " c" is the third token: past min_tokens
    assert text(3) == "a b c d"  # " c" is the third token: within min_tokens, so " e" stops it


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_answers_each_prompt_with_its_own_choices(client, router, tokenizer, stream):
    """`prompt` as a list of texts or of token-id lists (OpenAI's and vLLM's batch form): n choices per
    prompt, choice i of prompt p at index p * n + i, each with its own prompt's echo; usage sums the batch."""
    prompts = ["Once upon", "a time there was"]
    ids = [tokenizer.encode(p) for p in prompts]
    body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 3, "echo": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    three = tokenizer.decode(router.answer[:3])
    if stream:
        chunks = sse(r)
        texts: dict[int, str] = {}
        for c in chunks:
            for ch in c["choices"]:
                texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
        usage = chunks[-1]["usage"]
    else:
        texts = {c["index"]: c["text"] for c in r.json()["choices"]}
        usage = r.json()["usage"]
    assert texts == {0: prompts[0] + three, 1: prompts[0] + three, 2: prompts[1] + three, 3: prompts[1] + three}
    assert sorted(map(tuple, (p for p, _, _ in router.requests.values()))) == sorted([tuple(ids[0])] * 2 + [tuple(ids[1])] * 2)
    assert usage["prompt_tokens"] == len(ids[0]) + len(ids[1]) and usage["completion_tokens"] == 12


@pytest.mark.parametrize("stream", [False, True])
def test_cached_tokens_count_each_prompts_cache_hit_once_from_its_first_choice(client, router, stream):
    """n choices of one prompt are n requests; a later choice may find the prompt in the cache its sibling just filled.
    The response's cached_tokens is what the cache held for each prompt when it came: its first choice's, once per
    prompt (here 4 + 4 over two prompts, not 9 from the later choices, nor one per choice)."""
    router.cached_by_choice = (4, 9)
    body = {**COMPLETION, "prompt": ["Once upon", "a time there was"], "n": 2, "max_tokens": 3, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    usage = sse(r)[-1]["usage"] if stream else r.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 8


@pytest.mark.parametrize("batch", [["Once upon a time"], [[5, 6, 7]]])
def test_a_batch_of_one_prompt_is_that_prompt(client, router, tokenizer, batch):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": batch, "max_tokens": 2, "echo": True})
    assert r.status_code == 200, r.text
    (prompt,) = batch
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    assert [p for p, _, _ in router.requests.values()] == [ids]
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    assert r.json()["choices"][0]["text"] == text + tokenizer.decode(router.answer[:2])


def test_a_batch_of_token_id_prompts_reaches_the_router_as_given(client, router):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": [[5, 6, 7], [8]], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert sorted(p for p, _, _ in router.requests.values()) == [[5, 6, 7], [8]]
    assert r.json()["usage"]["prompt_tokens"] == 4


def test_a_batch_without_max_tokens_gives_each_prompt_the_context_it_leaves(client, router):
    """A batch's prompts share their sampling params but for max_tokens: with a null max_tokens each gets the room its
    own prompt leaves, as if it came alone (the first prompt's room would let a longer one's answer overrun the
    context)."""
    body = {**COMPLETION, "prompt": [[5] * 10, [6] * 200], "max_tokens": None}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    limits = {len(prompt): params.max_tokens for prompt, params, _ in router.requests.values()}
    assert limits == {10: MAX_LEN - 10, 200: MAX_LEN - 200}


@pytest.mark.parametrize("stream", [False, True])
def test_a_batchs_choices_carry_their_own_prompts_token_ids(client, router, stream):
    """return_token_ids with a batch: each choice's prompt_token_ids are its own prompt's (streamed: in its first
    chunk), as vLLM gives each prompt's choices theirs."""
    body = {**COMPLETION, "prompt": [[5, 6, 7], [8]], "n": 2, "max_tokens": 2, "return_token_ids": True,
            "stream": stream}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = [ch for c in sse(r) for ch in c["choices"]] if stream else r.json()["choices"]
    prompts = {ch["index"]: ch["prompt_token_ids"] for ch in choices if ch.get("prompt_token_ids") is not None}
    assert prompts == {0: [5, 6, 7], 1: [5, 6, 7], 2: [8], 3: [8]}


@pytest.mark.parametrize("prompt", [[], [""], [[]], ["a", [1, 2]], [["a"]], ["a"] * 129, [[1, 2], [10**9]]])
def test_a_bad_batch_of_prompts_is_400_naming_prompt(client, router, prompt):
    body = {**COMPLETION, "prompt": prompt, "max_tokens": 2, "n": 2}
    assert_error(client.post("/v1/completions", json=body), 400, param="prompt")
    assert not router.requests


def test_a_batch_checks_its_shared_fields_once_not_per_prompt(client, router, monkeypatch):
    """allowed_token_ids, logit_bias and bad_words are the same for every prompt of a batch: checked, tokenized and
    sorted again for each of 256 prompts, 49,152 allowed ids (a 335 KB body) held the event loop ~1.5 s. Each prompt
    still gets them."""
    calls = {"check_vocab_bounds": 0, "bad_words_token_ids": 0}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(openai_server, name)):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(openai_server, name, counted)
    body = {**COMPLETION, "prompt": [[5], [5, 6, 7], [8, 9]], "allowed_token_ids": [9, 3, 4], "logit_bias": {"3": 5},
            "bad_words": ["Hello"], "min_tokens": 1, "max_tokens": 4}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert calls == {"check_vocab_bounds": 1, "bad_words_token_ids": 1}
    assert sorted(p for p, _, _ in router.requests.values()) == [[5], [5, 6, 7], [8, 9]]
    for _, params, _ in router.requests.values():
        assert (params.allowed_token_ids, params.logit_bias, params.max_tokens, params.min_tokens) == ((3, 4, 9),
                                                                                                     {3: 5.0}, 4, 1)
        assert params.bad_words_token_ids


def test_a_bad_token_in_a_batch_names_its_prompt_once(client, router):
    body = {**COMPLETION, "prompt": [[1, 2], [10**9]], "max_tokens": 2}
    error = assert_error(client.post("/v1/completions", json=body), 400, param="prompt")
    assert error["message"].startswith("prompt[1]: token ids must lie in [0, ")


def test_one_prompt_of_a_batch_too_long_for_the_context_refuses_the_batch(client, router):
    body = {**COMPLETION, "prompt": [[1, 2], [1] * MAX_LEN], "max_tokens": 2}
    error = assert_error(client.post("/v1/completions", json=body), 400, param="prompt")
    assert error["code"] == "context_length_exceeded" and error["message"].startswith("prompt[1]: ")
    body = {**COMPLETION, "prompt": [[1, 2], [1] * (MAX_LEN - 3)], "max_tokens": 5}  # fits, but not with its answer
    error = assert_error(client.post("/v1/completions", json=body), 400, param="max_tokens")
    assert error["code"] == "context_length_exceeded" and error["message"].startswith("prompt[1]: ")
    assert not router.requests



def test_scoring_a_prompt_that_fills_the_context_is_400_saying_how_long_one_may_be(client, router):
    """lm-eval's loglikelihood (max_tokens 0, echo, logprobs) of a prompt of max_model_len tokens: vLLM refuses it too
    (v1 input_processor._validate_prompt_len: a generate model's prompt needs one token of room, even for max_tokens
    0, as its echo makes one token internally). The 400 said "no room for an answer" to a client that asked for none;
    it now says the longest prompt that can be scored. One token shorter is scored."""
    body = {**COMPLETION, "prompt": [1] * MAX_LEN, "max_tokens": 0, "echo": True, "logprobs": 1}
    error = assert_error(client.post("/v1/completions", json=body), 400, param="prompt")
    assert error["code"] == "context_length_exceeded"
    assert f"at most {MAX_LEN - 1} tokens can be scored" in error["message"], error["message"]
    assert not router.requests
    r = client.post("/v1/completions", json={**body, "prompt": [1] * (MAX_LEN - 1)})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (MAX_LEN - 1, 0)

@pytest.mark.parametrize("prompt", [["a", [1]], [[1, 2], "hi"], [1, "a"], [["a"]], 5, [1.5], [True], {"a": 1},
                                    ["ok", "x\ud800"]])
def test_a_prompt_of_the_wrong_shape_gets_a_message_that_says_what_it_may_be(client, router, prompt):
    error = assert_error(post(client, "/v1/completions", {**COMPLETION, "prompt": prompt}), 400, param="prompt")
    assert "Input should be a valid string" not in error["message"]
    assert not router.requests


# ---- a slow first token -------------------------------------------------------------------------

def _keepalives(text: str) -> list[int]:
    """Where an SSE body's keep-alives are among its blocks (split at blank lines): each is a block of its own,
    empty (blank lines: an empty event), but for the body's end."""
    return [i for i, b in enumerate(text.split("\n\n")[:-1]) if not b]


def _slow_first_token(client, router, wait_s: float = 0.05, keepalive_s: float = 0.1, queued_s: float = 0.35):
    """The first token comes after `queued_s` (a long prefill); headers wait `wait_s` for it."""
    client.app.state.server.headers_wait_s, client.app.state.server.keepalive_s = wait_s, keepalive_s
    router.queued_s = queued_s


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION),
                                        ("/v1/responses", {"model": MODEL, "input": "hi"})])
def test_a_slow_first_token_sends_headers_then_keepalives_then_the_same_answer(client, router, path, body):
    """Headers and SSE comments go out while a long prefill runs, so a proxy's read timeout does not cut it."""
    whole = client.post(path, json={**body, "stream": True}).text
    assert not _keepalives(whole)  # a first token within the wait: nothing changes
    _slow_first_token(client, router, queued_s=0.8)
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200
    comments = _keepalives(r.text)
    assert len(comments) >= 3  # one each keepalive_s of the 0.75 s after the headers (~7; 3 leaves a loaded box room)
    assert comments == list(range(comments[0], comments[-1] + 1))  # together, before the first token
    assert _same_answer(whole, r.text)


@pytest.mark.parametrize("path, body, opening", [
    ("/v1/chat/completions", CHAT, ""),  # a keep-alive: its role chunk comes with its first token, as vLLM's
    ("/v1/completions", COMPLETION, ""),  # nothing else to send at once: a keep-alive
    ("/v1/responses", {"model": MODEL, "input": "hi"}, "event: response.created")])
def test_a_slow_first_tokens_stream_opens_with_bytes_at_once_and_no_comment_beside_them(client, router, path, body,
                                                                                          opening):
    """Once its headers go out, a stream must send bytes at once (a proxy or client waits for them): the Responses
    stream's opening events are bytes already, and a keep-alive after them was redundant. A completion's or a chat's
    stream has no such event before its first token: a keep-alive is its first bytes."""
    _slow_first_token(client, router, keepalive_s=30.0)  # no keep-alive falls due within the test
    r = client.post(path, json={**body, "stream": True})
    blocks = r.text.split("\n\n")
    assert r.status_code == 200 and blocks[0].startswith(opening), r.text
    assert _keepalives(r.text) == ([] if opening else [0]), r.text


STREAMS = [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION), ("/v1/responses", {"model": MODEL,
                                                                                          "input": "hi"})]


def _paused_stream(router, tokenizer, path: str, body: dict, keepalives: int, send_wait_s: float = 0.0,
                   stamps: list | None = None, **app_args) -> tuple:
    """The stream's body when its answer stalls after 3 tokens until the client has had `keepalives` comments (0:
    it never stalls; keepalive_s 0.05, unless `app_args` set it), and the most sends under way at once; a send of a
    token's chunk takes `send_wait_s` (a reader's flow control). `stamps` gets each body's (loop time, bytes) as it
    was sent. The stall ends on what the client got, not after seconds: on a loaded box the answer's first tokens
    could come after a timed stall's end, and then no comment at all."""
    router.pause_after, router.resume = 3, asyncio.Event()
    if not keepalives:
        router.resume.set()
    app = build_app(router, tokenizer, MODEL, **app_args)
    if not app_args:
        app.state.server.keepalive_s = 0.05
    sent, sending, most = [], [0], [0]
    messages = [{"type": "http.request", "body": json.dumps({**body, "stream": True}).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.Event().wait()

    async def send(message):
        sending[0] += 1
        most[0] = max(most[0], sending[0])
        if message.get("body", b"").startswith(b"data:"):
            await asyncio.sleep(send_wait_s)
        sending[0] -= 1
        sent.append(message.get("body", b""))
        if stamps is not None:
            stamps.append((asyncio.get_running_loop().time(), sent[-1]))
        if sent.count(KEEPALIVE_BYTES) >= keepalives:
            router.resume.set()

    async def run():
        await asyncio.wait_for(app(asgi_scope("2.4", path), receive, send), timeout=30)

    asyncio.run(run())
    return b"".join(sent).decode(), most[0]


@pytest.mark.parametrize("path, body", STREAMS)
def test_a_pause_mid_answer_sends_keepalives_then_the_same_answer(client, router, tokenizer, path, body):
    """A stream that stalls mid-answer (its mesh failed and the answer is prefilled again on another: ~100 s for a
    Galaxy's 128k prompt; its router restarted: ~45 s) sent nothing until its next token, and a proxy's read timeout
    (nginx, ALB: 60 s) cut it. Now a comment goes out each keepalive_s that nothing else did."""
    whole = client.post(path, json={**body, "stream": True}).text
    text, _ = _paused_stream(router, tokenizer, path, body, keepalives=3)
    blocks = text.split("\n\n")
    comments = _keepalives(text)
    assert len(comments) >= 3, text
    assert comments == list(range(comments[0], comments[-1] + 1))  # together, in the pause
    assert any(b.startswith(("data:", "event:")) for b in blocks[:comments[0]])  # after tokens, not before them
    assert _same_answer(whole, text)


@pytest.mark.parametrize("path, body", STREAMS)
def test_a_pause_longer_than_the_configured_keepalive_interval_gets_comments_at_that_interval(router, tokenizer,
                                                                                             path, body):
    """The interval was a constant (15 s): a proxy in front with a shorter read timeout still cut a paused stream. It
    is AppConfig's sse_keep_alive_interval (vLLM's name), which each ingress replica's app is built with."""
    interval, stamps = 0.1, []
    text, _ = _paused_stream(router, tokenizer, path, body, keepalives=3, stamps=stamps,
                             sse_keep_alive_interval=interval)
    times = [t for t, b in stamps if b == KEEPALIVE_BYTES]  # 3 (with the constant, the stream's 30 s ran out first)
    assert len(times) >= 3, text
    last_data = max(t for t, b in stamps if b and b != KEEPALIVE_BYTES and t < times[0])
    # At that interval, not more often: counted over the pause, as a loaded box delays single comments (one sent
    # late makes the gap after it short, though the timer keeps the interval)
    assert (times[-1] - last_data) / len(times) >= 0.8 * interval, (last_data, times)


class _Pause:
    """A FakeRouter.resume that lets the answer go on after `seconds` (on whatever loop serves the app)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    async def wait(self) -> None:
        await asyncio.sleep(self.seconds)


def test_openais_sdk_reads_a_paused_stream_as_the_same_answer(client, router):
    """The keep-alives a pause mid-answer gets are skipped by openai-python's SSE decoder, for the three streams."""
    import openai
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)

    def answers() -> tuple:
        chat = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model=MODEL, messages=CHAT["messages"], stream=True) if c.choices)
        text = "".join(c.choices[0].text for c in sdk.completions.create(
            model=MODEL, prompt=COMPLETION["prompt"], stream=True) if c.choices)
        events = list(sdk.responses.create(model=MODEL, input="hi", stream=True))
        return chat, text, [e.type for e in events], events[-1].response.output_text

    whole = answers()
    client.app.state.server.keepalive_s = 0.05
    router.pause_after, router.resume = 3, _Pause(0.2)
    assert _keepalives(client.post("/v1/completions", json={**COMPLETION, "stream": True}).text)
    assert answers() == whole and whole[0] and whole[1]


def test_a_keepalive_never_goes_out_beside_a_chunk_a_slow_reader_holds(router, tokenizer):
    """A chunk's send waits while the reader's window is full; a keep-alive sent then would be a second send under
    way at once, which an ASGI server does not allow. A held send is bytes on the way: no comment is due."""
    text, most = _paused_stream(router, tokenizer, "/v1/chat/completions", CHAT, keepalives=0, send_wait_s=0.15)
    assert most == 1
    assert not _keepalives(text)  # each held send counts as sent; the answer never paused


class _Source:
    """An EventStream's source: when it was closed (the router requests behind it cancelled)."""

    closed = False

    async def aclose(self) -> None:
        self.closed = True


async def _never() -> dict:
    await asyncio.Event().wait()


def test_no_keepalive_goes_out_beside_or_after_a_streams_last_send():
    """The last send (more_body False) waits too while the reader's window is full (uvicorn drains before any
    send). Keep-alives were due then: each was a second send under way at once, and a body sent after the
    response was complete, which an ASGI server refuses (uvicorn: RuntimeError)."""
    sent, sending, most = [], [0], [0]

    async def body():
        yield "data: 1\n\n"

    async def send(message):
        sending[0] += 1
        most[0] = max(most[0], sending[0])
        sent.append(message)
        if message.get("more_body") is False:
            await asyncio.sleep(0.3)  # the reader's window stays full for 6 keepalive_s
        sending[0] -= 1

    async def run():
        await EventStream(body(), _Source(), 0.05)(asgi_scope("2.4"), _never, send)
        await asyncio.sleep(0.2)  # a comment due meanwhile would be sent now

    asyncio.run(run())
    assert most[0] == 1
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}, sent


def test_a_keepalive_the_client_refused_ends_a_paused_stream_at_once():
    """Under ASGI spec 2.4 nothing listens for the client's going: a send raises OSError instead. A comment's send
    that raised was kept until the stream's next chunk, so a stream paused for a re-prefill (a Galaxy's 128k prompt:
    ~100 s) held its router request, and the mesh's prefill, for a client long gone. It now ends the stream at once,
    as a chunk's send that raised does (ClientDisconnect)."""
    source = _Source()

    async def body():
        yield "data: 1\n\n"
        await asyncio.Event().wait()  # paused: no next chunk comes

    async def send(message):
        if message.get("body", b"") == KEEPALIVE_BYTES:
            raise OSError("the client went away")

    async def run():
        stream = EventStream(body(), source, 0.05)
        await asyncio.wait_for(stream(asgi_scope("2.4"), _never, send), timeout=10)

    with pytest.raises(ClientDisconnect):
        asyncio.run(run())
    assert source.closed


def _same_answer(a: str, b: str) -> bool:
    """Two SSE bodies spell the same events, but for their ids and times."""
    def strip(text: str) -> list:
        out = []
        for block in text.split("\n\n"):
            if block and not block.startswith(":"):
                data = block.split("data: ", 1)[1]
                out.append(data if data == "[DONE]" else _without_ids(json.loads(data)))
        return out
    return strip(a) == strip(b)


def _without_ids(value):
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("id", "created", "created_at",
                                                                             "item_id")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_a_refusal_after_the_headers_is_an_error_event(client, router, path, body):
    """Once the headers are out (vLLM sends them at once), a refusal can only be an error event, then [DONE]."""
    _slow_first_token(client, router, wait_s=0.0)
    router.refuse = QueueFull("waiting queue is full")
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200
    (error,) = [e["error"] for e in sse(r) if "error" in e]
    assert error["code"] == "queue_full" and "queue is full" in error["message"], error


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/responses", {"model": MODEL,
                                                                                            "input": "hi"})])
@pytest.mark.parametrize("down", ["no live mesh", "no router"])
def test_a_stream_held_for_want_of_a_mesh_still_gets_its_503(client, router, monkeypatch, path, body, down):
    """Held requests (no live mesh, no router) end in a 503 with Retry-After, which clients retry on: their headers
    wait past headers_wait_s for it (30-46 s at most), where a request being computed gets its keep-alives."""
    assert client.post(path, json=body).status_code == 200  # the meshes' limits known: stats are not read again
    _slow_first_token(client, router, wait_s=0.05)
    monkeypatch.setattr(openai_server, "SERVING_CHECK_S", 0.05)
    if down == "no live mesh":
        router.ready = False
    else:
        async def unreachable():
            raise ConnectionError("no router replica")
        router.stats = unreachable
    router.refuse, router.refuse_after_s = NoMeshAvailable("no live mesh for 0.3 s"), 0.3
    r = client.post(path, json={**body, "stream": True})
    assert_error(r, 503)
    assert int(r.headers["retry-after"]) > 0


def test_held_headers_go_out_at_their_cap_however_long_the_hold(client, router, monkeypatch):
    """Outages back to back (a router restart, then no live mesh) or a long no_mesh_wait_s would hold headers past a
    proxy's 60 s read timeout; at HELD_HEADERS_MAX_S they go out, and the refusal is an error event."""
    _slow_first_token(client, router, wait_s=0.05)
    monkeypatch.setattr(openai_server, "SERVING_CHECK_S", 0.05)
    monkeypatch.setattr(openai_server, "HELD_HEADERS_MAX_S", 0.2)
    router.ready = False
    router.refuse, router.refuse_after_s = NoMeshAvailable("no live mesh for 0.6 s"), 0.6
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and _keepalives(r.text)
    (error,) = [e["error"] for e in sse(r) if "error" in e]
    assert "no live mesh" in error["message"]


def test_held_headers_go_out_at_their_cap_not_at_the_next_serving_check(router, tokenizer, monkeypatch):
    """HELD_HEADERS_MAX_S caps a held stream's wait for its headers (README: never more than 45 s in all, under a
    proxy's 60 s read timeout); the wait between two serving checks (SERVING_CHECK_S, 1 s) ran on past the cap."""
    monkeypatch.setattr(openai_server, "HELD_HEADERS_MAX_S", 0.2)
    monkeypatch.setattr(openai_server, "SERVING_CHECK_S", 5.0)  # the next check far past the cap, whatever the load
    router.ready, router.queued_s = False, 10.0  # held: no live mesh, and no first token before the cap
    app = build_app(router, tokenizer, MODEL)
    app.state.server.headers_wait_s = 0.05
    started, waits = [], []  # the waits for the first delta, checked rather than the seconds a loaded box stretches
    came = FirstDelta.came

    async def recorded(self, wait_s: float) -> bool:
        waits.append(wait_s)
        return await came(self, wait_s)
    monkeypatch.setattr(FirstDelta, "came", recorded)

    async def run():
        gone = asyncio.Event()
        receive = asgi_receive({**CHAT, "stream": True}, gone)

        async def send(message):
            if message["type"] == "http.response.start":
                started.append(message["status"])
                gone.set()  # the client leaves once it has its headers

        try:
            await asyncio.wait_for(app(asgi_scope(), receive, send), timeout=10)
        except ClientDisconnect:
            pass

    asyncio.run(run())
    assert started == [200] and waits and max(waits) <= 0.2, (started, waits)  # waited to the next check: 5 s


def test_a_client_gone_before_a_slow_first_token_cancels_its_request(router, tokenizer):
    router.queued_s = 30.0
    app = build_app(router, tokenizer, MODEL)
    app.state.server.headers_wait_s, app.state.server.keepalive_s = 0.0, 0.05
    bodies = []

    def on_body(chunk: bytes, disconnected: asyncio.Event):
        bodies.append(chunk)
        if chunk == KEEPALIVE_BYTES:
            disconnected.set()
            raise OSError("connection reset")

    async def run():
        try:
            await asyncio.wait_for(_call_asgi(app, {**CHAT, "stream": True}, "2.4", on_body), timeout=10)
        except ClientDisconnect:
            pass
        (rid,) = router.requests
        assert router.cancelled == [(rid, "abort")]
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # nothing left waiting

    asyncio.run(run())
    assert bodies[-1] == KEEPALIVE_BYTES


@pytest.mark.parametrize("path, body", STREAMS)
def test_a_client_gone_in_a_pause_mid_answer_cancels_its_request_at_its_keepalive(router, tokenizer, path, body):
    """Under ASGI spec 2.4 a gone client shows only as a send that fails. Mid-answer the keep-alive is sent from a
    timer, and its failure waited for the stream's next chunk: through a re-prefill's pause (~100 s for a Galaxy's
    128k prompt), the answer was computed on for no one. The failed keep-alive now ends the stream at once."""
    router.pause_after = 3  # never resumed
    app = build_app(router, tokenizer, MODEL)
    app.state.server.keepalive_s = 0.05

    def on_body(chunk: bytes, disconnected: asyncio.Event):
        if chunk == KEEPALIVE_BYTES:
            disconnected.set()
            raise OSError("connection reset")

    async def run():  # the app returns: the client that left is no error of its (ClientGone ends it quietly)
        await asyncio.wait_for(_call_asgi(app, {**body, "stream": True}, "2.4", on_body, path), timeout=10)
        (rid,) = router.requests
        assert router.cancelled == [(rid, "abort")]
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # nothing left waiting

    asyncio.run(run())


def test_a_cancelled_serving_read_does_not_cancel_the_streams_waiting_on_it(router, tokenizer, monkeypatch):
    """A Serve handle call that Ray cancelled raises asyncio.CancelledError in its caller (ray.serve's
    replica_result turns TaskCancelledError into it), and Ray cancels a request's child calls with it
    (recursive ray.cancel: how 422beec's read came to raise): the shared serving() read is a child of the
    request that began it. A cancelled read is a router that did not answer, not the cancel of every stream of
    the replica that waits on it."""
    router.queued_s = 0.4  # the first token comes after the header wait, while serving() is read
    app = build_app(router, tokenizer, MODEL)
    server = app.state.server
    server.headers_wait_s = 0.05
    monkeypatch.setattr(openai_server, "SERVING_CHECK_S", 0.05)

    async def cancelled_call():
        raise asyncio.CancelledError()  # as `await handle.stats.remote()` raises for a cancelled call

    async def call(body: dict) -> tuple[int | None, bytes]:
        status, chunks = None, []
        messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.Event().wait()

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message.get("body"):
                chunks.append(message["body"])

        await app(asgi_scope("2.4"), receive, send)
        return status, b"".join(chunks)

    async def run():
        await server.model_len()  # the meshes' limit known: requests do not read stats themselves
        router.stats = cancelled_call
        return await asyncio.wait_for(asyncio.gather(*(call({**CHAT, "stream": True}) for _ in range(3)),
                                                     return_exceptions=True), timeout=10)

    results = asyncio.run(run())
    assert not [r for r in results if isinstance(r, BaseException)], results
    for status, body in results:
        assert status == 200 and body.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in body, body


def test_health_probes_share_one_read_of_the_routers_stats(router, tokenizer, monkeypatch):
    """Each /health read the router's whole stats (every mesh's and KV group's numbers: ~0.7 ms of the one router's
    CPU at 32 meshes x 4 groups, its Serve call besides), and /health needs no key: probes on every ingress replica,
    or a client's flood of them, came to the router one for one. Probes now share a read that is out, or one that
    said ready within HEALTH_READ_REUSE_S; one that said not ready is not reused (a mesh coming up is seen at once)."""
    calls = 0
    stats = router.stats

    async def counted(report=None):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return await stats(report)
    monkeypatch.setattr(router, "stats", counted)
    monkeypatch.setattr(ingress, "HEALTH_READ_REUSE_S", 60.0)
    app = build_app(router, tokenizer, MODEL)

    async def probes(n_together: int, n_after: int) -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
            together = await asyncio.gather(*(c.get("/health") for _ in range(n_together)))
            after = [await c.get("/health") for _ in range(n_after)]
        return [r.status_code for r in together + after]
    assert asyncio.run(probes(20, 5)) == [200] * 25
    assert calls == 1
    router.ready = False  # no mesh: each probe reads again, and the first one that says ready is shared again
    monkeypatch.setattr(ingress, "HEALTH_READ_REUSE_S", 0.0)
    assert asyncio.run(probes(1, 0)) == [503]
    monkeypatch.setattr(ingress, "HEALTH_READ_REUSE_S", 60.0)
    assert asyncio.run(probes(1, 1)) == [503, 503] and calls == 4
    router.ready = True
    assert asyncio.run(probes(3, 3)) == [200] * 6 and calls == 5
