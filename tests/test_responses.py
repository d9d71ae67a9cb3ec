"""OpenAI's Responses API (/v1/responses) over the chat path: every answer and stream event is checked against
openai-python's own types, the input against the chat request it becomes."""
from __future__ import annotations

import copy
import json

import pytest
from openai.types.responses import Response
from pydantic import TypeAdapter

from scheduler.errors import QueueFull
from tests.fake_router import FakeRouter
from tests.ingress_support import (ANSWER, CHAT, MAX_LEN, assert_error, client, eos, make_client, router,  # noqa: F401
                                   tokenizer)

try:
    from openai.types.responses import ResponseStreamEvent
except ImportError:  # pragma: no cover
    ResponseStreamEvent = None

EVENTS = TypeAdapter(ResponseStreamEvent)
BASIC = {"model": "smollm2", "input": "hi"}
TOOLS = [{"type": "function", "name": "get_weather", "description": "the weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
# A reasoning model's turn as OpenAI returns it: its reasoning, then its text or its calls.
REASONING = {"type": "reasoning", "id": "rs_1", "status": "completed",
             "summary": [{"type": "summary_text", "text": "The user wants the weather."}],
             "content": [{"type": "reasoning_text", "text": "Call get_weather for Paris."}]}
CALLS = [{"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
         {"type": "function_call", "call_id": "b", "name": "get_weather", "arguments": '{"city": "Lyon"}'}]
OUTPUTS = [{"type": "function_call_output", "call_id": "a", "output": "sunny"},
           {"type": "function_call_output", "call_id": "b", "output": "rain"}]


def events(response) -> list[dict]:
    """The SSE events, each checked against the SDK's event types; `event:` names each one's type."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in response.text.split("\n\n"):
        if not block:  # the keep-alives of a slow first token (blank lines), or the body's end
            continue
        kind, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {payload['type']}"
        EVENTS.validate_python(payload)
        out.append(payload)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def test_text_input_answers_with_one_message(client, router, tokenizer, eos):
    r = client.post("/v1/responses", json={**BASIC, "instructions": "Be brief.", "max_output_tokens": 100,
                                           "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    resp = Response.model_validate(r.json())
    assert resp.output_text == ANSWER and resp.status == "completed" and resp.id.startswith("resp_")
    (message,) = resp.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert resp.metadata == {"k": "v"} and resp.instructions == "Be brief." and resp.max_output_tokens == 100
    ((prompt, params, _),) = router.requests.values()
    assert prompt == tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "hi"}])
    assert params.max_tokens == 100
    assert resp.usage.input_tokens == len(prompt) and resp.usage.output_tokens == len(tokenizer.encode(ANSWER)) + 1
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


def test_items_become_the_chat_history(client, router, tokenizer):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    items = [{"role": "developer", "content": "Use tools."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather"},
                                                              {"type": "input_text", "text": "in Paris?"}]},
             call, {**call, "call_id": "call_2"},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
             {"type": "function_call_output", "call_id": "call_2", "output": "warm"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
             {"role": "user", "content": "thanks"}]
    r = client.post("/v1/responses", json={**BASIC, "input": items})
    assert r.status_code == 200, r.text
    ((prompt, _, _),) = router.requests.values()
    text = tokenizer.decode(prompt)
    assert "Weather\nin Paris?" in text and text.count("get_weather") == 2 and "sunny" in text and "warm" in text
    assert text.index("Use tools.") < text.index("Weather") < text.index("sunny") < text.index("Sunny.")


def test_a_message_items_null_type_is_a_message(client, router, tokenizer):
    """Null is a field's default here, as OpenAI's SDKs send it; a message item's type defaults to "message", yet
    `"type": null` was a 400 saying the type must be one of the served ones."""
    r = client.post("/v1/responses", json={**BASIC, "input": [{"type": None, "role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    ((prompt, _, _),) = router.requests.values()
    assert prompt == tokenizer.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("item", [{"call_id": "a", "name": "get_weather", "arguments": "{}"},
                                  {"call_id": "a", "output": "sunny"},
                                  {"output": "sunny"}, {"name": "get_weather", "arguments": "{}"}])  # no call_id
@pytest.mark.parametrize("typed", [{"type": None}, {}])
def test_a_call_item_without_its_type_is_told_its_type(client, router, item, typed):
    """A function_call (or its output) whose type was null or left out was read as a message, and the 400 said
    "input.1.role: Field required": a field no call has. A call_id, an output or arguments are no message's: the
    type is what is missing (a call without its call_id too)."""
    body = {**BASIC, "input": [{"role": "user", "content": "Weather?"}, {**typed, **item}]}
    error = assert_error(client.post("/v1/responses", json=body), 400, param="input.1")
    assert "type must be" in error["message"] and "role" not in error["message"]
    assert router.requests == {}


def test_a_pasted_back_refusal_is_read_as_its_text(client, router, tokenizer):
    """OpenAI's Responses output may hold a `refusal` content part; a client that sends the output back as input
    got a 400."""
    refusal = {"type": "refusal", "refusal": "I can't help with that."}
    r = client.post("/v1/responses", json={**BASIC, "input": [{"role": "user", "content": "do it"},
                                                              {"role": "assistant", "content": [refusal]},
                                                              {"role": "user", "content": "why?"}]})
    assert r.status_code == 200, r.text
    ((prompt, _, _),) = router.requests.values()
    assert prompt == tokenizer.encode_chat([{"role": "user", "content": "do it"},
                                            {"role": "assistant", "content": refusal["refusal"]},
                                            {"role": "user", "content": "why?"}])


def test_sampling_fields_reach_the_mesh(client, router):
    r = client.post("/v1/responses", json={**BASIC, "temperature": 0.5, "top_p": 0.9, "seed": 7, "top_k": 4})
    assert r.status_code == 200, r.text
    ((_, params, _),) = router.requests.values()
    assert (params.temperature, params.top_p, params.seed, params.top_k) == (0.5, 0.9, 7, 4)
    assert Response.model_validate(r.json()).temperature == 0.5


def test_max_output_tokens_makes_it_incomplete(client):
    resp = Response.model_validate(client.post("/v1/responses", json={**BASIC, "max_output_tokens": 3}).json())
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3 and resp.output[0].status == "incomplete"


def test_stream_events_spell_the_same_answer(client):
    whole = Response.model_validate(client.post("/v1/responses", json=BASIC).json())
    es = events(client.post("/v1/responses", json={**BASIC, "stream": True}))
    kinds = [e["type"] for e in es]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e["delta"] for e in es if e["type"] == "response.output_text.delta") == ANSWER
    done = Response.model_validate(es[-1]["response"])
    assert done.output_text == ANSWER == whole.output_text and done.status == "completed"
    assert done.usage.output_tokens == whole.usage.output_tokens


def test_a_tool_call_is_a_function_call_item(tokenizer, eos):
    router = FakeRouter(tokenizer.encode(CALL) + [eos], max_model_len=4096)
    client = make_client(router, tokenizer)
    resp = Response.model_validate(client.post("/v1/responses", json={**BASIC, "tools": TOOLS}).json())
    (call,) = resp.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
        "city": "Paris"}
    assert call.call_id.startswith("call_") and resp.tools[0].name == "get_weather"
    assert resp.tools[0].strict is True  # TOOLS do not say: strict, as applied (and as OpenAI echoes it)
    loose = client.post("/v1/responses", json={**BASIC, "tools": [{**TOOLS[0], "strict": False}]}).json()
    assert loose["tools"][0]["strict"] is False
    es = events(client.post("/v1/responses", json={**BASIC, "tools": TOOLS, "stream": True}))
    added = [e for e in es if e["type"] == "response.output_item.added"]
    assert [a["item"]["type"] for a in added] == ["function_call"]
    args = "".join(e["delta"] for e in es if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    (done,) = [e for e in es if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == args
    final = Response.model_validate(es[-1]["response"])
    assert final.output[0].arguments == args and final.output[0].status == "completed"


def test_named_tool_choice_and_json_format_constrain_the_answer(client, router):
    r = client.post("/v1/responses", json={**BASIC, "tools": TOOLS,
                                           "tool_choice": {"type": "function", "name": "get_weather"}})
    assert r.status_code == 200, r.text
    assert list(router.requests.values())[0][1].grammar is not None
    fmt = {"type": "json_schema", "name": "answer", "schema": {"type": "object", "properties": {
        "x": {"type": "integer"}}}, "strict": True}
    r = client.post("/v1/responses", json={**BASIC, "text": {"format": fmt}})
    assert r.status_code == 200, r.text
    assert list(router.requests.values())[1][1].grammar is not None
    assert Response.model_validate(r.json()).text.format.type == "json_schema"
    r = client.post("/v1/responses", json={**BASIC, "text": {"format": {**fmt, "type": "json_object"}}})
    assert r.json()["text"] == {"format": {"type": "json_object"}}  # its schema is not applied, nor echoed


@pytest.mark.parametrize("patch, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input.0.content.0.type"),  # no tag
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input.0.output"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "5"}]}, "input.0.call_id"),  # no call
    ({"input": [{"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "b", "output": "5"}]}, "input.1.call_id"),
    ({"input": [{"type": "function_call", "call_id": "a", "name": "f", "arguments": '{"n": ' + "9" * 4400 + "}"},
                {"type": "function_call_output", "call_id": "a", "output": "5"}]}, "input.0.arguments"),  # int(): was a 500
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    # only a reasoning of nulls configures nothing (089a481): not one setting given, falsy or not, nor another type
    ({"reasoning": {"effort": None, "summary": "auto"}}, "reasoning"), ({"reasoning": {"effort": ""}}, "reasoning"),
    ({"reasoning": "low"}, "reasoning"), ({"reasoning": []}, "reasoning"), ({"reasoning": False}, "reasoning"),
    ({"tools": [{"type": "web_search", "name": "search"}]}, "tools.0.type"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"background": True}, "background"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),  # OpenAI's limits: values of 512 characters,
    ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65),  # keys of 64
    ({"truncation": "auto"}, "truncation"),
    ({"temperature": -1}, "temperature"),
    ({"max_output_tokens": 10_000}, "max_output_tokens"),  # past the context
    ({"input": "x" * (MAX_LEN * 82)}, "input"),  # past 81 characters a token (max_token_chars)
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "answer"}}}, "text.format.schema"),  # chat's may omit it
    ({"tools": [{**TOOLS[0], "parameters": {"type": "object", "properties": 5}}], "tool_choice": "required"},
     "tools.0.parameters"),  # the tools are flat here: no "function" in the name
    # an item's own field, not the whole input (the chat history's path, messages.2.tool_calls.1.function...)
    ({"instructions": "Be brief.", "input": [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "get_weather", "arguments": "not json"},
        {"type": "function_call_output", "call_id": "a", "output": "1"}]}, "input.2.arguments"),
    ({"input": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me look."},
                {"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "get_weather", "arguments": "{"}]},
     "input.3.arguments"),  # the calls join the assistant's message: one turn of the history
    ({"input": [{"role": "user", "content": "Weather?"}, {"type": "reasoning"}, CALLS[0], {"type": "reasoning"},
                {**CALLS[1], "arguments": "{"}, OUTPUTS[0]]}, "input.4.arguments"),  # reasoning between a turn's calls
    ({"input": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me look."},
                {"type": "reasoning"}, {**CALLS[0], "arguments": "{"}]}, "input.3.arguments"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "reasoning", "encrypted_content": "gAAA"}]},
     "input.1.encrypted_content"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text"}]}]}, "input.0.summary.0.text"),
    ({"input": [{"type": "reasoning"}]}, "input"),
    ({"input": [{"role": "assistant", "content": "The answer is", "status": "done"}]}, "input.0.status"),
    # vLLM's: the response would carry the prompt's and the answer's messages; it was ignored, none came
    ({"enable_response_messages": True}, "enable_response_messages"),
])
def test_bad_requests_are_400_naming_the_responses_field(client, router, patch, param):
    assert_error(client.post("/v1/responses", json={**BASIC, **patch}), 400, param=param)
    assert router.requests == {}


@pytest.mark.parametrize("patch", [{"tool_choice": "auto"}, {"tools": [], "tool_choice": "auto"}, {"tools": []}])
def test_tool_choice_auto_without_tools_is_the_default(client, patch):
    """"auto" is what a Responses request without tools has anyway (OpenAI echoes it): the answer is text."""
    plain = client.post("/v1/responses", json=BASIC).json()
    body = client.post("/v1/responses", json={**BASIC, **patch}).json()
    assert body["output"][0]["content"] == plain["output"][0]["content"] and body["tool_choice"] == "auto"


@pytest.mark.parametrize("method, path", [("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
                                          ("POST", "/v1/responses/resp_1/cancel"),
                                          ("GET", "/v1/responses/resp_1/input_items")])
def test_the_sdks_calls_on_a_stored_response_say_none_is_stored(client, method, path):
    """openai-node's responses.retrieve/delete/cancel and inputItems.list (and openai-python's): a `store: true`
    request is answered, nothing kept, and asking for it again was a bare 404 "Not Found" that read as a wrong id or
    a wrong base URL."""
    error = assert_error(client.request(method, path), 404, param="response_id")
    assert "'resp_1'" in error["message"] and "stores no responses" in error["message"]


@pytest.mark.parametrize("path", ["/v1/responses/input_tokens", "/v1/responses/compact"])
def test_the_sdks_other_responses_routes_are_not_found(client, path):
    """openai-python's responses.input_tokens.count and responses.compact (openai-node's inputTokens.count and
    compact) POST one level under /v1/responses, which the stored-response route takes for an id: they got a 405 naming
    GET and DELETE as allowed (the SDKs' bare APIStatusError, not their NotFoundError), as if the route were served."""
    r = client.post(path, json={"model": "smollm2", "input": "hi"})
    error = assert_error(r, 404)
    assert "allow" not in r.headers and path in error["message"] and "not served" in error["message"]


def test_an_unknown_model_is_404(client):
    assert_error(client.post("/v1/responses", json={**BASIC, "model": "gpt-9"}), 404, param="model")


def test_a_failure_mid_stream_is_an_error_event(tokenizer, eos):
    router = FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=4096, fail_with_error_after=3)
    es = events(make_client(router, tokenizer).post("/v1/responses", json={**BASIC, "stream": True}))
    assert es[-1]["type"] == "error" and es[-1]["code"] == "internal_error"
    assert "".join(e["delta"] for e in es if e["type"] == "response.output_text.delta") == tokenizer.decode(
        tokenizer.encode(ANSWER)[:3])


# The events whose `response` openai-node's accumulator takes whole as its snapshot (ResponseAccumulator.mjs
# accumulateResponse); it passes an `error` event over ("do not contain state represented by the Response object").
LIFECYCLE = ("response.created", "response.queued", "response.in_progress", "response.completed", "response.failed",
             "response.incomplete")


@pytest.mark.parametrize("fail_reason, code", [("error", "server_error"), ("grammar_error", "invalid_prompt")])
def test_a_failure_mid_stream_ends_the_response_failed_and_the_sdks_raise(tokenizer, eos, fail_reason, code):
    """OpenAI ends a failed response with response.failed, its `error` set: without it the last lifecycle event said
    in_progress. The `error` event after it carries an `error` object, the key on which openai-node and openai-python
    raise their APIError mid-stream (with its code and param): without it both handed the event on as an answer's,
    and openai-node's `stream.finalResponse()` rejected with the bare event, no Error at all."""
    router = FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=4096, fail_with_error_after=3,
                        fail_reason=fail_reason)
    fmt = {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}
    es = events(make_client(router, tokenizer).post("/v1/responses", json={**BASIC, "stream": True,
                                                                            "text": {"format": fmt}}))
    final = [e for e in es if e["type"] in LIFECYCLE][-1]
    assert final["type"] == "response.failed", [e["type"] for e in es]
    resp = Response.model_validate(final["response"])
    assert resp.status == "failed" and resp.error.code == code and resp.error.message == es[-1]["message"]
    assert resp.output_text == tokenizer.decode(tokenizer.encode(ANSWER)[:3])
    assert [item.status for item in resp.output] == ["incomplete"]
    error = es[-1]["error"]  # a chat stream's error object
    assert (error["message"], error["param"], error["type"]) == (es[-1]["message"], es[-1]["param"],
                                                                 "invalid_request_error" if fail_reason != "error"
                                                                 else "internal_error")


def test_openais_sdk_raises_a_responses_stream_failure(tokenizer, eos):
    """What openai-python's (and openai-node's) stream reader does with it: an APIError naming the field."""
    import asyncio

    import httpx
    import openai

    from deployments.ingress import build_app
    router = FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=4096, fail_with_error_after=3,
                        fail_reason="grammar_error")
    fmt = {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}

    async def run():
        app = build_app(router, tokenizer, "smollm2")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
            sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
            async for _ in await sdk.responses.create(model="smollm2", input="hi", stream=True,
                                                      text={"format": fmt}):
                pass
    with pytest.raises(openai.APIError) as raised:
        asyncio.run(run())
    assert raised.value.param == "text.format.schema" and raised.value.message.startswith("text.format.schema: ")


@pytest.mark.parametrize("stream", [False, True])
def test_included_logprobs_come_with_the_text(client, tokenizer, eos, stream):
    body = {**BASIC, "include": ["message.output_text.logprobs"], "top_logprobs": 2, "stream": stream}
    r = client.post("/v1/responses", json=body)
    if stream:
        es = events(r)
        deltas = [lp for e in es if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
        (done,) = [e for e in es if e["type"] == "response.output_text.done"]
        assert done["logprobs"][:len(deltas)] == deltas and len(done["logprobs"]) == len(deltas) + 1  # + the EOS
        resp = Response.model_validate(es[-1]["response"])
    else:
        resp = Response.model_validate(r.json())
    logprobs = resp.output[0].content[0].logprobs
    assert b"".join(bytes(lp.bytes) for lp in logprobs) == (ANSWER + "<|im_end|>").encode()  # its EOS too
    assert all(len(lp.top_logprobs) == 2 and lp.logprob == -0.25 for lp in logprobs)
    assert resp.top_logprobs == 2  # echoed, as the other settings are
    plain = Response.model_validate(client.post("/v1/responses", json={**BASIC, "top_logprobs": 2}).json())
    assert plain.output[0].content[0].logprobs == []  # not included: none


@pytest.mark.parametrize("stream", [False, True])
def test_a_large_answer_is_built_off_the_event_loop(client, stream, monkeypatch):
    """~20 tokens x 21 logprobs: a whole response, or a stream's last events (which carry every logprob three times
    over, and the response once more), built on the loop stalled every other stream of the replica for the whole
    build, which a chat completion's answer already made on a thread (tests/test_logprobs.py)."""
    import threading

    from deployments.responses import _Answer

    built, real = [], _Answer.response

    def recorded(self, status, output, usage=None):
        if status != "in_progress":  # the final response, built with the answer's last events
            built.append(threading.current_thread().name)
        return real(self, status, output, usage)

    monkeypatch.setattr(_Answer, "response", recorded)
    body = {**BASIC, "include": ["message.output_text.logprobs"], "top_logprobs": 20, "stream": stream}
    r = client.post("/v1/responses", json=body)
    final = events(r)[-1]["response"] if stream else r.json()
    assert len(Response.model_validate(final).output[0].content[0].logprobs) > 1
    assert built[0].startswith("meshserve-"), built
    plain = client.post("/v1/responses", json={k: v for k, v in body.items() if k != "include"})
    assert plain.status_code == 200 and not built[1].startswith("meshserve-"), built  # small: a hop costs more


def test_a_held_answers_logprobs_are_built_off_the_event_loop(tokenizer, eos, monkeypatch):
    """Text that may be a tool call is held, its tokens' logprobs with it, until the answer shows it is none: with
    `include` logprobs the output_text.delta that then sends it carried the logprobs of every token so far, built and
    dumped on the loop in one go (a whole answer's, every other stream of the replica standing still meanwhile)."""
    import threading

    from deployments.responses import _Answer
    from deployments.router_client import MERGED_TOKENS_MAX

    text = '{"note": "' + " word" * 100 + '"}'  # an object, but no call: content once whole
    client = make_client(FakeRouter(tokenizer.encode(text) + [eos], max_model_len=4096), tokenizer)
    built, real = [], _Answer.logprobs

    def recorded(self, lps):
        built.append((threading.current_thread().name, len(lps)))
        return real(self, lps)

    monkeypatch.setattr(_Answer, "logprobs", recorded)
    body = {**BASIC, "tools": TOOLS, "include": ["message.output_text.logprobs"], "top_logprobs": 20, "stream": True}
    es = events(client.post("/v1/responses", json=body))
    sent = [e for e in es if e["type"] == "response.output_text.delta"]
    (done,) = [e for e in es if e["type"] == "response.output_text.done"]
    assert "".join(e["delta"] for e in sent) == done["text"] == text
    assert [lp for e in sent for lp in e["logprobs"]] == done["logprobs"]  # its EOS too: it came with the text
    large = [thread for thread, n in built if n > MERGED_TOKENS_MAX // (1 + 20)]  # past a router event's tokens
    assert large and all(thread.startswith("meshserve-") for thread in large), built


@pytest.mark.parametrize("stream", [False, True])
def test_a_large_answers_logprobs_are_serialized_in_slices(client, stream, monkeypatch):
    """One json.dumps or model_dump over a whole answer's logprobs holds the GIL until it returns, so on a thread too
    it stood every other stream of the replica still (8,192 tokens with 20 top_logprobs: ~0.5 s and ~0.8 s on the
    2-core box, and a stream's last events dumped them four times). No one call may take more than a slice."""
    from deployments import json_slices, responses
    from deployments.protocol import ChatLogprobs

    monkeypatch.setattr(json_slices, "SLICE", 4)
    dumped, entries = [], []
    real_dumps, real_model_dump = json.dumps, ChatLogprobs.model_dump

    def dumps(value, **kwargs):
        out = real_dumps(value, **kwargs)
        dumped.append(len(out))
        return out

    def model_dump(self, **kwargs):
        entries.append(len(self.content))
        return real_model_dump(self, **kwargs)

    monkeypatch.setattr(responses.json, "dumps", dumps)
    monkeypatch.setattr(ChatLogprobs, "model_dump", model_dump)
    body = {**BASIC, "include": ["message.output_text.logprobs"], "top_logprobs": 20, "stream": stream}
    r = client.post("/v1/responses", json=body)
    final = events(r)[-1]["response"] if stream else r.json()
    logprobs = Response.model_validate(final).output[0].content[0].logprobs
    assert b"".join(bytes(lp.bytes) for lp in logprobs) == (ANSWER + "<|im_end|>").encode()
    assert all(len(lp.top_logprobs) == 20 for lp in logprobs)
    assert entries and max(entries) <= 4, entries
    slice_chars = 4 * len(real_dumps(final["output"][0]["content"][0]["logprobs"])) // len(logprobs)
    assert max(dumped) < 2 * slice_chars, (max(dumped), slice_chars)


@pytest.mark.parametrize("patch, words", [
    ({"input": ""}, "must not be empty"), ({"input": []}, "must not be empty"),
    ({"tools": [{"type": "web_search", "name": "search"}]}, "hosted tools"),
    # the client's own tools, not OpenAI's hosted ones (the 400 called them hosted)
    ({"tools": [{"type": "namespace", "name": "crm", "description": "CRM", "tools": [TOOLS[0]]}]},
     "send its tools as function tools"),
    ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "free-form input"),
    ({"include": ["reasoning.encrypted_content"]}, "only \"message.output_text.logprobs\""),
    ({"background": True}, "nothing is stored"), ({"truncation": "auto"}, "never cut"),
    ({"previous_response_id": "resp_1"}, "send the earlier turns as input items"),
    ({"conversation": "conv_1"}, "send the earlier turns as input items"),
    ({"prompt": {"id": "pmpt_1"}}, "stored prompt templates"), ({"reasoning": {"effort": "low"}}, "does not reason"),
    ({"max_tool_calls": 2}, "hosted tools"), ({"ec_transfer_params": {"x": 1}}, "disaggregated"),
    # a reasoning item is taken (test_reasoning_items_...), not one that only OpenAI can read
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}, {"role": "user", "content": "hi"}]},
     "encrypted reasoning cannot be read here"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "only reasoning items"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "names a stored item, and nothing is stored"),
    # openai-python's ItemReference may leave its type out: it was read as a message, "input.0.role: Field required"
    ({"input": [{"id": "msg_1"}]}, "names a stored item, and nothing is stored"),
    ({"input": [{"id": "msg_1", "type": None}]}, "names a stored item, and nothing is stored"),
    ({"input": [{"type": "compaction", "encrypted_content": "gAAA"}]}, "must be \"message\", \"function_call\","),
])
def test_refusals_say_why(client, patch, words):
    r = client.post("/v1/responses", json={**BASIC, **patch})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_a_tool_that_does_not_say_is_strict_as_openais_responses_take_it(client, router):
    """OpenAI's function-calling guide: Responses normalizes a tool without `strict` into strict mode (closed
    objects, every property required); `strict: false` keeps it loose, and the call's grammar with it."""
    from deployments.responses_protocol import ResponsesRequest
    loose = {**TOOLS[0], "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                         "unit": {"type": "string"}}}}

    def chat_tool(tool: dict):
        return ResponsesRequest.model_validate({**BASIC, "tools": [tool]}).chat().tools[0].function
    normalized = chat_tool(loose)
    assert normalized.strict is True and normalized.parameters == {
        **loose["parameters"], "required": ["city", "unit"], "additionalProperties": False}
    assert chat_tool({**loose, "strict": False}).parameters == loose["parameters"]
    grammars = []
    for tool in (loose, {**loose, "strict": False}):
        r = client.post("/v1/responses", json={**BASIC, "tools": [tool], "tool_choice": "required"})
        assert r.status_code == 200, r.text
        grammars.append(list(router.requests.values())[-1][1].grammar)
    assert grammars[0] != grammars[1]


def test_closed_with_require_all_requires_every_property_at_every_depth():
    from deployments.structured import closed
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}}}}
    out = closed(schema, require_all=True)
    assert out["required"] == ["a", "c"] and out["additionalProperties"] is False
    assert out["properties"]["a"]["required"] == ["b"] and out["properties"]["c"]["items"]["required"] == ["d"]
    assert "required" not in closed(schema)["properties"]["a"]


def test_a_function_output_may_be_text_parts(client, router, tokenizer):
    items = [{"role": "user", "content": "Weather?"},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1",
              "output": [{"type": "input_text", "text": "sunny"}, {"type": "input_text", "text": "warm"}]}]
    r = client.post("/v1/responses", json={**BASIC, "input": items})
    assert r.status_code == 200, r.text
    ((prompt, _, _),) = router.requests.values()
    assert "sunny\nwarm" in tokenizer.decode(prompt)


def test_each_streamed_call_ends_before_the_next_begins(tokenizer, eos):
    """OpenAI's stream closes an output item before it adds the next: a call's arguments.done and item.done
    come before the following call's output_item.added."""
    paris, oslo = (f'{{"name": "get_weather", "parameters": {{"city": "{c}"}}}}' for c in ("Paris", "Oslo"))
    router = FakeRouter(tokenizer.encode(f"{paris}; {oslo}") + [eos], max_model_len=4096)
    es = events(make_client(router, tokenizer).post("/v1/responses", json={**BASIC, "tools": TOOLS, "stream": True}))
    marks = [(e["type"], e.get("output_index")) for e in es if e["type"].startswith("response.output_item")
             or e["type"] == "response.function_call_arguments.done"]
    assert marks == [("response.output_item.added", 0), ("response.function_call_arguments.done", 0),
                     ("response.output_item.done", 0), ("response.output_item.added", 1),
                     ("response.function_call_arguments.done", 1), ("response.output_item.done", 1)]
    final = Response.model_validate(es[-1]["response"])
    assert [json.loads(c.arguments)["city"] for c in final.output] == ["Paris", "Oslo"]
    assert all(c.status == "completed" for c in final.output)


@pytest.mark.parametrize("stream", [False, True])
def test_only_the_call_max_output_tokens_cut_is_incomplete(tokenizer, eos, stream):
    """Two calls, the second cut by max_output_tokens: the first is whole, so its item is completed, as the stream
    closes it (output_item.done) before the next begins; the whole answer said so too, not incomplete for both."""
    paris, oslo = (f'{{"name": "get_weather", "parameters": {{"city": "{c}"}}}}' for c in ("Paris", "Oslo"))
    ids = tokenizer.encode(f"{paris}; {oslo}")
    client = make_client(FakeRouter(ids + [eos], max_model_len=4096), tokenizer)
    body = {**BASIC, "tools": TOOLS, "max_output_tokens": len(ids) - 1, "stream": stream}
    r = client.post("/v1/responses", json=body)
    resp = Response.model_validate(events(r)[-1]["response"] if stream else r.json())
    assert resp.status == "incomplete"
    assert [(c.name, c.status) for c in resp.output] == [("get_weather", "completed"), ("get_weather", "incomplete")]


@pytest.mark.parametrize("stream", [False, True])
def test_a_whole_call_kept_without_parallel_calls_is_completed(tokenizer, eos, stream):
    """parallel_tool_calls false keeps the first call (as vLLM does); max_output_tokens cut the second, which is
    dropped: the kept call is whole, yet its item said incomplete, as if its arguments were cut."""
    paris, oslo = (f'{{"name": "get_weather", "parameters": {{"city": "{c}"}}}}' for c in ("Paris", "Oslo"))
    ids = tokenizer.encode(f"{paris}; {oslo}")
    client = make_client(FakeRouter(ids + [eos], max_model_len=4096), tokenizer)
    body = {**BASIC, "tools": TOOLS, "parallel_tool_calls": False, "max_output_tokens": len(ids) - 2,
            "stream": stream}
    r = client.post("/v1/responses", json=body)
    resp = Response.model_validate(events(r)[-1]["response"] if stream else r.json())
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    (call,) = resp.output
    assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"


def _same_but_ids(response: dict) -> dict:
    """A response less what is drawn anew per answer (ids, created_at)."""
    return {**response, "id": None, "created_at": None,
            "output": [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]}


# What cut a call mid-arguments: a stop string, an EOS (a stop token), max_output_tokens; and what the response's
# status then is (only max_output_tokens makes the response incomplete, as chat's finish_reason stays "stop" else)
CUTS = [("stop string", "completed"), ("eos", "completed"), ("max_output_tokens", "incomplete")]


@pytest.mark.parametrize("cut,response_status", CUTS)
def test_a_cut_call_is_an_incomplete_item_whatever_cut_it(tokenizer, eos, cut, response_status):
    """A call the answer did not finish (its arguments no JSON to run) is an incomplete function_call item, as
    chat keeps it a tool call with finish_reason "stop" / "length", not "tool_calls". A stop string or an EOS cut
    it into a completed item with non-JSON arguments; the whole answer and the stream's final response agree."""
    head = '{"name": "get_weather", "parameters": {"city": "Par'
    ids = tokenizer.encode(head)
    answer = {"stop string": tokenizer.encode(CALL) + [eos], "eos": ids + [eos],
              "max_output_tokens": tokenizer.encode(CALL) + [eos]}[cut]
    body = {**BASIC, "tools": TOOLS, **({"stop": ["is\"}"]} if cut == "stop string" else {}),
            **({"max_output_tokens": len(ids)} if cut == "max_output_tokens" else {})}
    client = make_client(FakeRouter(answer, max_model_len=4096), tokenizer)
    whole = client.post("/v1/responses", json=body).json()
    final = events(client.post("/v1/responses", json={**body, "stream": True}))[-1]["response"]
    assert _same_but_ids(whole) == _same_but_ids(final)
    resp = Response.model_validate(whole)
    (call,) = resp.output
    assert call.type == "function_call" and call.status == "incomplete" and resp.status == response_status
    with pytest.raises(ValueError):
        json.loads(call.arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_the_response_says_the_temperature_and_top_p_it_was_sampled_with(router, tokenizer, monkeypatch, stream):
    """A request that leaves them out is sampled with the model's generation_config values (Llama 3.3's 0.6 and
    0.9), and vLLM's response says those (vllm/entrypoints/openai/responses/protocol.py, ResponsesResponse.
    from_request: sampling_params.temperature, .top_p); it said OpenAI's 1.0 and 1.0."""
    monkeypatch.setattr(tokenizer, "sampling_defaults", {"temperature": 0.6, "top_p": 0.9})
    client = make_client(router, tokenizer)
    for body, said in [(BASIC, (0.6, 0.9)), ({**BASIC, "top_p": 0.5}, (0.6, 0.5)),
                       ({**BASIC, "temperature": 0, "top_p": 0.5}, (0.0, 1.0))]:  # greedy: top_p reset, as in vLLM
        r = client.post("/v1/responses", json={**body, "stream": stream})
        response = events(r)[-1]["response"] if stream else r.json()
        assert (response["temperature"], response["top_p"]) == said, body


def test_a_streamed_calls_arguments_are_written_once(tokenizer, eos, monkeypatch):
    """A call's item took each delta by item["arguments"] += delta: a copy of all its arguments so far per delta,
    quadratic in their length. The characters written into the item's arguments are now the arguments', once."""
    from deployments import responses

    written = []

    class Item(dict):
        def __setitem__(self, key, value):
            if key == "arguments":
                written.append(len(value))
            super().__setitem__(key, value)

    real = responses._call
    monkeypatch.setattr(responses, "_call", lambda call, status: Item(real(call, status)))
    city = "Paris " * 200
    call = json.dumps({"name": "get_weather", "parameters": {"city": city}})
    router = FakeRouter(tokenizer.encode(call) + [eos], max_model_len=4096)
    es = events(make_client(router, tokenizer).post("/v1/responses", json={**BASIC, "tools": TOOLS, "stream": True}))
    deltas = [e["delta"] for e in es if e["type"] == "response.function_call_arguments.delta"]
    (done,) = [e for e in es if e["type"] == "response.function_call_arguments.done"]
    (item,) = Response.model_validate(es[-1]["response"]).output
    assert json.loads(item.arguments) == {"city": city} and len(deltas) > 100
    assert "".join(deltas) == done["arguments"] == item.arguments
    assert sum(written) <= len(item.arguments), (len(written), sum(written))


def test_vllms_sampling_extras_reach_the_mesh(client, router, tokenizer):
    """vLLM's Responses request takes stop, ignore_eos, logit_bias, include_stop_str_in_output,
    skip_special_tokens and structured_outputs, as its chat does; they were ignored here (the whole answer came)."""
    r = client.post("/v1/responses", json={**BASIC, "stop": ["answer is"], "include_stop_str_in_output": True,
                                           "ignore_eos": True, "skip_special_tokens": False, "logit_bias": {"5": 10},
                                           "structured_outputs": {"regex": "[A-Za-z0-9 ,.🚀]+"}})
    assert r.status_code == 200, r.text
    assert Response.model_validate(r.json()).output_text == ANSWER[:ANSWER.index("answer is") + len("answer is")]
    ((_, params, _),) = router.requests.values()
    assert params.stop == ("answer is",) and params.include_stop_str_in_output and params.ignore_eos
    assert not params.skip_special_tokens and params.logit_bias == {5: 10} and params.grammar is not None


def test_chat_template_kwargs_reach_the_template(router, tokenizer):
    """vLLM's Responses request takes chat_template_kwargs, as its chat does: the prompt is the chat completion's with
    the same variables. They were ignored here (the template rendered its defaults)."""
    templated = copy.deepcopy(tokenizer)
    templated._hf.chat_template = templated.chat_template = (
        "{% for m in messages %}{{ greeting | default('hello') }} {{ m['content'] }}{% endfor %}")
    client = make_client(router, templated)
    kwargs = {"greeting": "good evening"}
    for path, body in (("/v1/chat/completions", {**CHAT, "chat_template_kwargs": kwargs}),
                       ("/v1/responses", {**BASIC, "chat_template_kwargs": kwargs}), ("/v1/responses", BASIC)):
        assert client.post(path, json=body).status_code == 200
    chat, responses, plain = (prompt for prompt, _, _ in router.requests.values())
    assert responses == chat == templated.encode("good evening hi", add_bos=False) and plain != chat


def test_a_request_id_names_the_response(client):
    assert client.post("/v1/responses", json={**BASIC, "request_id": "resp_mine"}).json()["id"] == "resp_mine"


@pytest.mark.parametrize("patch, param", [
    ({"stop": [""]}, "stop"), ({"logit_bias": {"x": 1}}, "logit_bias"), ({"priority": 1}, "priority"),
    ({"vllm_xargs": {"k": 1}}, "vllm_xargs"), ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "text": {"format": {"type": "json_object"}}},
     "structured_outputs.regex"),  # one constraint per request
])
def test_vllms_extras_are_checked_as_chats_are(client, router, patch, param):
    assert_error(client.post("/v1/responses", json={**BASIC, **patch}), 400, param=param)
    assert router.requests == {}


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_the_mesh_gives_up_on_names_text_format(tokenizer, eos, stream):
    """llguidance giving up mid-answer is the client's 400 (or a stream's error event) naming the Responses field
    of the grammar, not the chat's response_format."""
    router = FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=4096, fail_with_error_after=2,
                        fail_reason="grammar_error")
    fmt = {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}
    r = make_client(router, tokenizer).post("/v1/responses", json={**BASIC, "text": {"format": fmt}, "stream": stream})
    error = events(r)[-1] if stream else assert_error(r, 400)
    assert error["param"] == "text.format.schema" and error["message"].startswith("text.format.schema: ")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("with_reasoning", [
    # a reasoning item before a turn, between its text and its calls, between two calls, between a call and its output
    [{"role": "user", "content": "Weather?"}, REASONING, {"role": "assistant", "content": "Let me look."}, REASONING,
     CALLS[0], REASONING, CALLS[1], REASONING, *OUTPUTS, {**REASONING, "content": None}],
    # the bare minimum (no id, no summary), and one with its summary alone
    [{"type": "reasoning"}, {"role": "user", "content": "Weather?"}, {**REASONING, "content": []}, *CALLS, *OUTPUTS],
])
def test_reasoning_items_are_taken_and_left_out_of_the_prompt(client, router, with_reasoning, stream):
    """A history handed over from a reasoning model (the Agents SDK's handoffs, a pasted-back response.output, a
    replay from another provider) holds its reasoning items: they were a 400, "not served here". They are left out:
    the prompt, the response and its stream are those of the same history without them."""
    answers = []
    for items in (with_reasoning, [item for item in with_reasoning if item.get("type") != "reasoning"]):
        r = client.post("/v1/responses", json={**BASIC, "input": items, "tools": TOOLS, "stream": stream})
        final = events(r)[-1]["response"] if stream else r.json()
        answers.append((list(router.requests.values())[-1][0], Response.model_validate(final).output_text,
                        [(e["type"], e.get("delta")) for e in events(r)] if stream else None))
    assert answers[0] == answers[1] and answers[0][1] == ANSWER


def test_a_reasoning_models_output_as_the_sdk_dumps_it_is_taken(client, router, tokenizer):
    """Clients send a reasoning model's output back as openai-python dumps it (model_dump of a ParsedResponse's
    items: ids, status, a reasoning item's summary and content parts, null encrypted_content)."""
    from openai.types.responses import ParsedResponse
    output = [{**REASONING, "encrypted_content": None},
              {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]},
              {**CALLS[0], "id": "fc_1", "status": "completed"}]
    previous = ParsedResponse[None].model_validate({
        "id": "resp_1", "object": "response", "created_at": 0, "model": "o4-mini", "output": output,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": []})
    items = [{"role": "user", "content": "Weather?"}, *(item.model_dump() for item in previous.output), OUTPUTS[0]]
    for history in (items, [item for item in items if item.get("type") != "reasoning"]):
        r = client.post("/v1/responses", json={**BASIC, "input": history, "tools": TOOLS})
        assert r.status_code == 200, r.text
    first, second = (prompt for prompt, _, _ in router.requests.values())
    assert first == second and "sunny" in tokenizer.decode(first)  # the history, all of it but the reasoning
    assert "user wants" not in tokenizer.decode(first) and "Call get_weather" not in tokenizer.decode(first)


UNFINISHED = [{"role": "user", "content": "What is 6 x 7?"},
              {"type": "message", "id": "msg_1", "role": "assistant", "status": "incomplete",
               "content": [{"type": "output_text", "text": "The answer is", "annotations": [], "logprobs": []}]}]
PREFILL = [UNFINISHED[0], {"role": "assistant", "content": "The answer is"}]  # its chat messages


def chat_prompt(client, router, messages: list[dict], continued: bool) -> list[int]:
    """The prompt the chat endpoint sends the router for `messages`, continuing the final one or after it."""
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages, "add_generation_prompt": not continued,
                                                  "continue_final_message": continued})
    assert r.status_code == 200, r.text
    return list(router.requests.values())[-1][0]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("role, status", [("assistant", "incomplete"), ("assistant", "in_progress"),
                                          ("user", "incomplete")])
def test_an_unfinished_last_message_is_continued(client, router, stream, role, status):
    """An input whose last message is unfinished (a response cut at max_output_tokens, pasted back) asks for the
    rest of it, as vLLM reads such an input (any message's status "in_progress" or "incomplete"): it got a new
    assistant turn after it. The prompt is chat's continue_final_message one; the answer, the continuation alone."""
    items = [UNFINISHED[0], {**UNFINISHED[1], "role": role, "status": status}]
    r = client.post("/v1/responses", json={**BASIC, "input": items, "stream": stream})
    final = events(r)[-1]["response"] if stream else r.json()
    prompt = list(router.requests.values())[-1][0]
    assert prompt == chat_prompt(client, router, [PREFILL[0], {**PREFILL[1], "role": role}], continued=True)
    assert Response.model_validate(final).output_text == ANSWER


CHAT_CALL = {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("items, messages", [
    # a finished message is an earlier turn, as OpenAI's API reads an assistant's
    ([UNFINISHED[0], {**UNFINISHED[1], "status": "completed"}], PREFILL),
    ([UNFINISHED[0], {**UNFINISHED[1], "status": None}], PREFILL),
    ([*UNFINISHED, CALLS[0]], [PREFILL[0], {**PREFILL[1], "tool_calls": [CHAT_CALL]}]),  # the last item is a call
    # reasoning is left out of the prompt: nothing of it to continue
    ([*UNFINISHED, {**REASONING, "status": "in_progress"}], PREFILL),
])
def test_only_an_unfinished_last_message_is_continued(client, router, items, messages):
    """The last item's being an unfinished message is what continues the input (vLLM's rule): the same message
    finished, or followed by a call or by reasoning, is answered with a new turn, as chat's messages are."""
    for history, continued in ((UNFINISHED, True), (items, False)):
        r = client.post("/v1/responses", json={**BASIC, "input": history})
        assert r.status_code == 200, r.text
        prompt = list(router.requests.values())[-1][0]
        assert prompt == chat_prompt(client, router, messages if not continued else PREFILL, continued)


@pytest.mark.parametrize("stream", [False, True])
def test_the_routers_id_begins_with_the_responses_id(client, router, stream):
    """One grep of the id a client reports finds its request in every process's log (README, enable_log_requests):
    the router's id, which those lines name, began resp-<hex> while the response's id was resp_<hex>, so a grep of
    the response's id found none of them."""
    r = client.post("/v1/responses", json={**BASIC, "stream": stream})
    resp = Response.model_validate(events(r)[-1]["response"] if stream else r.json())
    (router_id,) = router.requests
    assert resp.id.startswith("resp_") and router_id.startswith(resp.id + "-"), (resp.id, router_id)
    assert resp.id.removeprefix("resp_").isalnum(), resp.id  # resp_<hex>, as OpenAI's: no "-" after the "_"


@pytest.mark.parametrize("stream", [False, True])
def test_usage_says_the_prompt_tokens_the_prefix_cache_held(client, stream):
    """input_tokens_details.cached_tokens is what the prefix cache saved (the router's first event says it: 3 here,
    later ones 0), as chat's prompt_tokens_details says it; a stream's final response must not take a later 0."""
    r = client.post("/v1/responses", json={**BASIC, "stream": stream})
    resp = Response.model_validate(events(r)[-1]["response"] if stream else r.json())
    assert resp.usage.input_tokens_details.cached_tokens == 3


def test_the_streamed_text_is_the_one_part_of_the_message(client):
    """Every text event names the message's only content part (content_index 0) and item, as OpenAI's stream does;
    output_text.done and content_part.done carry the whole text the deltas spelled, which a client that reads only
    the done events (openai-python's stream helper keeps the part it is given) takes as the answer."""
    es = events(client.post("/v1/responses", json={**BASIC, "stream": True}))
    (added,) = [e for e in es if e["type"] == "response.output_item.added"]
    texts = [e for e in es if e["type"].startswith(("response.content_part", "response.output_text"))]
    assert {(e["item_id"], e["output_index"], e["content_index"]) for e in texts} == {(added["item"]["id"], 0, 0)}
    (done,) = [e for e in es if e["type"] == "response.output_text.done"]
    (part,) = [e for e in es if e["type"] == "response.content_part.done"]
    assert done["text"] == part["part"]["text"] == ANSWER
    assert "".join(e["delta"] for e in es if e["type"] == "response.output_text.delta") == ANSWER


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_answer_is_an_empty_message(tokenizer, eos, stream):
    """An answer of only an EOS is still one message item with empty text, completed, whole or streamed (vLLM's
    Responses answer has its message however short); the stream has no item to close otherwise."""
    client = make_client(FakeRouter([eos], max_model_len=4096), tokenizer)
    r = client.post("/v1/responses", json={**BASIC, "stream": stream})
    resp = Response.model_validate(events(r)[-1]["response"] if stream else r.json())
    (message,) = resp.output
    assert message.type == "message" and message.status == "completed" and resp.status == "completed"
    assert resp.output_text == ""


def test_a_stream_max_output_tokens_cut_ends_with_response_incomplete(client):
    """OpenAI ends a response that max_output_tokens cut with a response.incomplete event, not response.completed:
    a client that waits for the event its status names (openai-node's stream helper, the Agents SDK) sees the end."""
    es = events(client.post("/v1/responses", json={**BASIC, "max_output_tokens": 3, "stream": True}))
    assert es[-1]["type"] == "response.incomplete"
    assert es[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_stream_refused_for_capacity_after_its_headers_fails_as_a_rate_limit(client, router):
    """A refusal for capacity (the router's queue full: a 429 before the headers) that comes after the headers went
    out (a slow first token) ends the stream response.failed with OpenAI's code for it, rate_limit_exceeded, which
    tells a client to retry later, not server_error."""
    client.app.state.server.headers_wait_s, client.app.state.server.keepalive_s = 0.05, 0.1
    router.refuse, router.refuse_after_s = QueueFull("waiting queue is full"), 0.35
    es = events(client.post("/v1/responses", json={**BASIC, "stream": True}))
    (failed,) = [e for e in es if e["type"] == "response.failed"]
    assert Response.model_validate(failed["response"]).error.code == "rate_limit_exceeded"
    assert es[-1]["type"] == "error" and es[-1]["error"]["code"] == "queue_full"


def test_top_logprobs_left_out_is_echoed_as_0(client):
    """A request without top_logprobs is answered with top_logprobs 0, as OpenAI's and vLLM's responses say it."""
    assert client.post("/v1/responses", json=BASIC).json()["top_logprobs"] == 0


# the request fields a Response says back (openai-python's Response and ResponseCreateParams share them)
ECHOED = ("model", "instructions", "max_output_tokens", "parallel_tool_calls", "previous_response_id", "reasoning",
          "store", "temperature", "text", "tool_choice", "tools", "top_logprobs", "top_p", "truncation", "user",
          "metadata")


def test_a_responses_own_settings_sent_back_are_taken(client, router):
    """A client that carries a conversation's settings over from the last Response to the next request (the
    Response says the settings it was answered with, as OpenAI's does) sends back `"reasoning": {"effort": null,
    "summary": null}`, this server's own answer for a model without reasoning: it was a 400, "this model does not
    reason". Nothing is configured there, as in `"reasoning": null` or `{}`."""
    first = client.post("/v1/responses", json=BASIC).json()
    again = {**{k: first[k] for k in ECHOED}, "input": [{"role": "user", "content": "hi"}, *first["output"],
                                                         {"role": "user", "content": "more"}]}
    assert again["reasoning"] == {"effort": None, "summary": None}
    for reasoning in (again["reasoning"], {}):
        r = client.post("/v1/responses", json={**again, "reasoning": reasoning})
        assert r.status_code == 200, r.text
        assert Response.model_validate(r.json()).output_text == ANSWER


def test_parallel_tool_calls_false_is_echoed(client):
    """The response says the parallel_tool_calls it was answered with, as OpenAI's does: false when the request
    said false (one call is kept), not the default true."""
    r = client.post("/v1/responses", json={**BASIC, "tools": TOOLS, "parallel_tool_calls": False})
    assert Response.model_validate(r.json()).parallel_tool_calls is False


# A second tool, and a schema that strict mode changes: strict, an object that lists no properties takes none
CLOCK = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string"}}}, "strict": False}
LOOSE = [{**TOOLS[0], "strict": False}, CLOCK]
OPEN = {"type": "object", "properties": {"x": {"type": "object"}}}


def _chat_tool(tool: dict) -> dict:
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


@pytest.mark.parametrize("patch, chat", [
    ({"tools": LOOSE, "tool_choice": "required"}, {"tools": [_chat_tool(t) for t in LOOSE], "tool_choice": "required"}),
    ({"tools": LOOSE, "tool_choice": "required", "parallel_tool_calls": False},
     {"tools": [_chat_tool(t) for t in LOOSE], "tool_choice": "required", "parallel_tool_calls": False}),
    *(({"text": {"format": {"type": "json_schema", "name": "a", "schema": OPEN, "strict": strict}}},
       {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": OPEN, "strict": strict}}})
      for strict in (True, False)),
])
def test_the_constraint_is_the_chat_completions_it_describes(client, router, patch, chat):
    """Every tool, tool_choice "required" with parallel_tool_calls and a json_schema's `strict` shape the answer's
    grammar, as in the chat completion with the same fields (OpenAI and vLLM honour each of them)."""
    for path, body in (("/v1/chat/completions", {**CHAT, **chat}), ("/v1/responses", {**BASIC, **patch})):
        assert client.post(path, json=body).status_code == 200
    chat_params, responses_params = (params for _, params, _ in router.requests.values())
    assert responses_params.grammar is not None and responses_params.grammar == chat_params.grammar


def test_a_call_to_any_offered_tool_is_a_function_call_item(tokenizer, eos):
    """Every tool is offered, not the first alone: a call to the second is its function_call item."""
    router = FakeRouter(tokenizer.encode('{"name": "get_time", "parameters": {"zone": "UTC"}}') + [eos],
                        max_model_len=4096)
    resp = Response.model_validate(make_client(router, tokenizer).post(
        "/v1/responses", json={**BASIC, "tools": LOOSE}).json())
    (call,) = resp.output
    assert call.type == "function_call" and call.name == "get_time" and json.loads(call.arguments) == {"zone": "UTC"}


def test_a_turns_calls_are_one_assistant_message(client, router, tokenizer):
    """The function_call items after an assistant's text are that turn's calls, as chat's one message with its
    tool_calls, not one assistant turn per call."""
    items = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me look."}, *CALLS,
             *OUTPUTS]
    calls = [{"id": c["call_id"], "type": "function",
              "function": {"name": c["name"], "arguments": c["arguments"]}} for c in CALLS]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
                *({"role": "tool", "tool_call_id": o["call_id"], "content": o["output"]} for o in OUTPUTS)]
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": messages}).status_code == 200
    assert client.post("/v1/responses", json={**BASIC, "input": items}).status_code == 200
    chat, responses = (prompt for prompt, _, _ in router.requests.values())
    assert responses == chat


@pytest.mark.parametrize("patch, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call: OpenAI's 400, as chat's
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),  # OpenAI's limit: 16 pairs
    ({"tools": [{**TOOLS[0], "allowed_callers": ["programmatic"]}]}, "tools.0.allowed_callers"),
    # vLLM's Responses extras, which were ignored: disaggregated serving's, a gpt-oss history
    ({"kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
    ({"ec_transfer_params": {"do_remote_encode": True}}, "ec_transfer_params"),
    ({"previous_input_messages": [{"role": "user", "content": "hi"}]}, "previous_input_messages"),
])
def test_what_cannot_be_honoured_is_a_400(client, router, patch, param):
    assert_error(client.post("/v1/responses", json={**BASIC, **patch}), 400, param=param)
    assert router.requests == {}


def test_a_request_id_is_in_the_routers_id_too(client, router):
    """The router's id, which the logs name, begins with a client's request_id, as it begins with the response's own
    id: one grep of the id the client has finds its request in every process's log (README, enable_log_requests). It
    began "resp_resp_mine-"."""
    assert client.post("/v1/responses", json={**BASIC, "request_id": "resp_mine"}).json()["id"] == "resp_mine"
    (router_id,) = router.requests
    assert router_id.startswith("resp_mine-"), router_id


@pytest.mark.parametrize("choice", ["required", "none", {"type": "function", "name": "get_weather"}])
def test_the_response_says_its_tool_choice(client, choice):
    """The response echoes the tool_choice it was answered with, as OpenAI's does, not the default "auto"."""
    r = client.post("/v1/responses", json={**BASIC, "tools": TOOLS, "tool_choice": choice})
    assert r.status_code == 200, r.text
    assert r.json()["tool_choice"] == choice
    Response.model_validate(r.json())  # as the SDK reads it


def test_the_response_says_it_was_not_stored(client):
    """`store: true` is taken and nothing is kept: the response says store false, so no client counts on fetching it
    back (retrieve is a 404 here)."""
    assert client.post("/v1/responses", json={**BASIC, "store": True}).json()["store"] is False


def test_the_response_names_its_model_and_user(client):
    """The response says the model that answered, as a chat completion does, and echoes `user`, as OpenAI's does."""
    chat = client.post("/v1/chat/completions", json=CHAT).json()
    resp = Response.model_validate(client.post("/v1/responses", json={**BASIC, "user": "u-1"}).json())
    assert resp.model == chat["model"] and resp.user == "u-1"


def test_a_forced_call_cut_before_its_arguments_is_still_a_call(tokenizer, eos):
    """tool_choice "required" makes the answer a call however early max_output_tokens cut it (its name not yet
    whole): an incomplete function_call item, whole or streamed, not a message of the call's first characters."""
    client = make_client(FakeRouter(tokenizer.encode(CALL) + [eos], max_model_len=4096), tokenizer)
    body = {**BASIC, "tools": TOOLS, "tool_choice": "required", "max_output_tokens": 2}
    whole = client.post("/v1/responses", json=body).json()
    final = events(client.post("/v1/responses", json={**body, "stream": True}))[-1]["response"]
    assert _same_but_ids(whole) == _same_but_ids(final)
    (call,) = Response.model_validate(whole).output
    assert call.type == "function_call" and call.status == "incomplete"


def test_a_streamed_message_max_output_tokens_cut_is_incomplete(client):
    """The message item that max_output_tokens cut is incomplete in the stream (its output_item.done and the final
    response), as in the whole answer: only its response's status said so."""
    es = events(client.post("/v1/responses", json={**BASIC, "max_output_tokens": 3, "stream": True}))
    (done,) = [e for e in es if e["type"] == "response.output_item.done"]
    (message,) = Response.model_validate(es[-1]["response"]).output
    assert done["item"]["status"] == message.status == "incomplete"


def test_a_failed_stream_counts_the_tokens_it_took(tokenizer, eos):
    """A stream that failed after 3 tokens says so in response.failed's usage, as a finished one says its own: the
    prompt and the tokens generated were spent."""
    router = FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=4096, fail_with_error_after=3)
    es = events(make_client(router, tokenizer).post("/v1/responses", json={**BASIC, "stream": True}))
    (failed,) = [e for e in es if e["type"] == "response.failed"]
    usage = Response.model_validate(failed["response"]).usage
    assert usage.output_tokens == 3 and usage.input_tokens > 0


@pytest.mark.parametrize("answer", [ANSWER, CALL])
def test_a_streamed_item_is_added_in_progress_and_done_completed(tokenizer, eos, answer):
    """A message or call is in_progress as output_item.added opens it, and completed as output_item.done closes it,
    as OpenAI's stream says them: one added completed read as closed before any of its deltas."""
    client = make_client(FakeRouter(tokenizer.encode(answer) + [eos], max_model_len=4096), tokenizer)
    es = events(client.post("/v1/responses", json={**BASIC, "tools": TOOLS, "stream": True}))
    (added,) = [e["item"] for e in es if e["type"] == "response.output_item.added"]
    (done,) = [e["item"] for e in es if e["type"] == "response.output_item.done"]
    assert (added["id"], added["status"], done["status"]) == (done["id"], "in_progress", "completed")


def test_a_stream_failed_mid_call_keeps_the_arguments_it_sent(tokenizer, eos):
    """response.failed holds the call the answer was making, incomplete, with the arguments its deltas sent, as it
    holds a cut message's text."""
    head = tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Pa')
    router = FakeRouter(tokenizer.encode(CALL) + [eos], max_model_len=4096, fail_with_error_after=len(head))
    es = events(make_client(router, tokenizer).post("/v1/responses", json={**BASIC, "tools": TOOLS, "stream": True}))
    (failed,) = [e for e in es if e["type"] == "response.failed"]
    (call,) = Response.model_validate(failed["response"]).output
    sent = "".join(e["delta"] for e in es if e["type"] == "response.function_call_arguments.delta")
    assert call.status == "incomplete" and call.arguments == sent and sent.startswith('{"city"')
