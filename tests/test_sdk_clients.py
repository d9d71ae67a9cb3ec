"""What openai-python itself sends and reads, driven against the in-process app (httpx's ASGITransport under
openai.AsyncOpenAI): its parse helpers (`parsed`, `parsed_arguments`, `output_parsed`) and the request fields of
its current types that change an answer, each served or refused with a 400 naming it."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from deployments.ingress import build_app
from tests.ingress_support import MODEL, eos, router, tokenizer  # noqa: F401

MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]


class Weather(BaseModel):
    city: str
    celsius: int


class GetWeather(BaseModel):
    """Look up the weather in a city."""
    city: str


def sdk_call(router, tokenizer, call):
    """`call(sdk)`'s result, the SDK over the app without a server or a thread."""
    async def run():
        app = build_app(router, tokenizer, MODEL)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
            sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
            return await call(sdk)
    return asyncio.run(run())


def answer(router, tokenizer, eos, text: str) -> None:
    router.answer = tokenizer.encode(text) + [eos]


def test_chat_parse_fills_parsed_with_the_pydantic_model(router, tokenizer, eos):
    answer(router, tokenizer, eos, '{"city": "Oslo", "celsius": 21}')
    completion = sdk_call(router, tokenizer, lambda sdk: sdk.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Weather))
    assert completion.choices[0].message.parsed == Weather(city="Oslo", celsius=21)
    ((_, params, _),) = router.requests.values()
    assert params.grammar is not None  # the schema reached the mesh as a constraint


def test_chat_stream_helper_parses_the_streamed_answer(router, tokenizer, eos):
    answer(router, tokenizer, eos, '{"city": "Oslo", "celsius": 21}')

    async def streamed(sdk):
        async with sdk.chat.completions.stream(model=MODEL, messages=MESSAGES, response_format=Weather) as stream:
            return await stream.get_final_completion()
    completion = sdk_call(router, tokenizer, streamed)
    assert completion.choices[0].message.parsed == Weather(city="Oslo", celsius=21)


@pytest.mark.parametrize("tool_choice", [openai.NOT_GIVEN, "required", {"type": "function",
                                                                          "function": {"name": "GetWeather"}}])
def test_chat_parse_fills_a_strict_tools_parsed_arguments(router, tokenizer, eos, tool_choice):
    answer(router, tokenizer, eos, '{"name": "GetWeather", "parameters": {"city": "Oslo"}}')
    completion = sdk_call(router, tokenizer, lambda sdk: sdk.chat.completions.parse(
        model=MODEL, messages=MESSAGES, tools=[openai.pydantic_function_tool(GetWeather)], tool_choice=tool_choice))
    choice = completion.choices[0]
    # a named tool_choice finishes "stop", as OpenAI's and vLLM's do
    assert choice.finish_reason == ("stop" if isinstance(tool_choice, dict) else "tool_calls")
    (call,) = choice.message.tool_calls
    assert call.function.name == "GetWeather" and call.function.parsed_arguments == GetWeather(city="Oslo")


def test_chat_stream_helper_parses_a_streamed_calls_arguments(router, tokenizer, eos):
    answer(router, tokenizer, eos, '{"name": "GetWeather", "parameters": {"city": "Oslo"}}')

    async def streamed(sdk):
        async with sdk.chat.completions.stream(model=MODEL, messages=MESSAGES,
                                               tools=[openai.pydantic_function_tool(GetWeather)]) as stream:
            return await stream.get_final_completion()
    (call,) = sdk_call(router, tokenizer, streamed).choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetWeather(city="Oslo")


class GetTime(BaseModel):
    """The time in a zone."""
    zone: str


def test_chat_stream_helper_says_each_streamed_call_is_done(router, tokenizer, eos):
    """openai-python's `tool_calls.function.arguments.done` fires for a call when the next begins or, for the last,
    at a finish chunk after its deltas, as OpenAI's is: a call that came in the finish chunk (a second call, or
    the whole answer merged in one event) had no done event, and an app that acts on it never ran it."""
    answer(router, tokenizer, eos, '{"name": "GetWeather", "parameters": {"city": "Oslo"}}; '
                                   '{"name": "GetTime", "parameters": {"zone": "CET"}}')
    router.merge, router.max_model_len = 100, 2048  # the whole answer in one event (the router merges them)

    async def streamed(sdk):
        async with sdk.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=[
                openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]) as stream:
            done = [e.parsed_arguments async for e in stream if e.type == "tool_calls.function.arguments.done"]
            return done, await stream.get_final_completion()
    done, completion = sdk_call(router, tokenizer, streamed)
    assert done == [GetWeather(city="Oslo"), GetTime(zone="CET")]
    assert completion.choices[0].finish_reason == "tool_calls"


def test_responses_stream_helper_parses_the_streamed_answer(router, tokenizer, eos):
    answer(router, tokenizer, eos, '{"city": "Oslo", "celsius": 21}')

    async def streamed(sdk):
        async with sdk.responses.stream(model=MODEL, input="Weather in Oslo?", text_format=Weather) as stream:
            return await stream.get_final_response()
    assert sdk_call(router, tokenizer, streamed).output_parsed == Weather(city="Oslo", celsius=21)


def test_responses_parse_fills_output_parsed(router, tokenizer, eos):
    answer(router, tokenizer, eos, '{"city": "Oslo", "celsius": 21}')
    response = sdk_call(router, tokenizer, lambda sdk: sdk.responses.parse(
        model=MODEL, input="Weather in Oslo?", instructions="Answer in JSON.", text_format=Weather))
    assert response.output_parsed == Weather(city="Oslo", celsius=21)
    ((prompt, params, _),) = router.requests.values()
    assert params.grammar is not None
    assert "Answer in JSON." in tokenizer.decode(prompt)


def test_responses_parse_fills_a_function_calls_parsed_arguments(router, tokenizer, eos):
    answer(router, tokenizer, eos, '{"name": "GetWeather", "parameters": {"city": "Oslo"}}')
    response = sdk_call(router, tokenizer, lambda sdk: sdk.responses.parse(
        model=MODEL, input="Weather in Oslo?", tools=[openai.pydantic_responses_function_tool(GetWeather)]))
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "GetWeather" and call.parsed_arguments == GetWeather(city="Oslo")
    assert json.loads(call.arguments) == {"city": "Oslo"}


MODERATION = {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}, "output": {"mode": "block"}}}


def chat(**fields):
    return lambda sdk: sdk.chat.completions.create(model=MODEL, messages=MESSAGES, **fields)


def responses(**fields):
    return lambda sdk: sdk.responses.create(model=MODEL, input="Weather in Oslo?", **fields)


@pytest.mark.parametrize("call, param", [
    # a moderation model's verdicts (a blocked answer, scores) that no mesh computes: it was silently ignored
    (chat(moderation=MODERATION), "moderation"),
    (responses(moderation=MODERATION), "moderation"),
    # compaction rewrites the input past a token threshold: it was silently ignored
    (responses(context_management=[{"type": "compaction", "compact_threshold": 1000}]), "context_management"),
    # prewarm asks for no output at all: an answer was generated anyway
    (responses(prompt_cache_options={"prewarm": True}), "prompt_cache_options.prewarm"),
    # a deferred tool stays out of the prompt until hosted tool search loads it: it was offered at once
    (responses(tools=[openai.pydantic_responses_function_tool(GetWeather, defer_loading=True)]),
     "tools.0.defer_loading"),
    # a tool only a hosted Programmatic Tool Calling program may call: it was offered to the model directly
    (responses(tools=[{**openai.pydantic_responses_function_tool(GetWeather), "allowed_callers": ["programmatic"]}]),
     "tools.0.allowed_callers"),
    # a call that runs asynchronously (openai-python 3.x's FunctionToolParam `async`): it was offered as an ordinary
    # call, which ends the response to wait for its output
    (responses(tools=[{**openai.pydantic_responses_function_tool(GetWeather), "async": True}]), "tools.0.async"),
])
def test_an_sdk_field_that_changes_the_answer_is_refused_naming_it(router, tokenizer, call, param):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk_call(router, tokenizer, call)
    assert refused.value.param == param and param in refused.value.message
    assert router.requests == {}


@pytest.mark.parametrize("call", [
    chat(prompt_cache_key="k", safety_identifier="u-1", prompt_cache_retention="24h",
         prompt_cache_options={"mode": "explicit", "ttl": "30m"}),
    responses(prompt_cache_key="k", safety_identifier="u-1", prompt_cache_retention="24h",
              prompt_cache_options={"mode": "implicit", "ttl": "12h", "prewarm": False}),
])
def test_cache_and_safety_hints_leave_the_answer_as_it_is(router, tokenizer, eos, call):
    """Hints for OpenAI's own cache and abuse checks: the answer is the one without them."""
    answer(router, tokenizer, eos, "Sunny.")
    result = sdk_call(router, tokenizer, call)
    text = result.output_text if hasattr(result, "output_text") else result.choices[0].message.content
    assert text == "Sunny."


def test_a_tool_the_model_may_call_directly_is_offered(router, tokenizer, eos):
    answer(router, tokenizer, eos, '{"name": "GetWeather", "parameters": {"city": "Oslo"}}')
    tool = {**openai.pydantic_responses_function_tool(GetWeather), "allowed_callers": ["direct", "programmatic"]}
    response = sdk_call(router, tokenizer, responses(tools=[tool]))
    assert [item.name for item in response.output] == ["GetWeather"]


def test_a_pasted_back_refusal_is_the_assistant_turns_text(router, tokenizer, eos):
    """OpenAI answers a refusal as `refusal` with null content, and clients send that message back as it is: the
    turn was rendered empty, as if the assistant had said nothing."""
    answer(router, tokenizer, eos, "Sunny.")
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "refusal": "I cannot help."},
             {"role": "user", "content": "b"}]
    sdk_call(router, tokenizer, lambda sdk: sdk.chat.completions.create(model=MODEL, messages=turns))
    ((prompt, _, _),) = router.requests.values()
    assert "I cannot help." in tokenizer.decode(prompt)


def test_a_legacy_function_call_in_the_history_is_refused_naming_it(router, tokenizer):
    """The call was dropped from the prompt, leaving an empty assistant turn before its `function` result."""
    turns = [{"role": "user", "content": "a"},
             {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
             {"role": "function", "name": "f", "content": "1"}]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk_call(router, tokenizer, lambda sdk: sdk.chat.completions.create(model=MODEL, messages=turns))
    assert refused.value.param == "messages.1.function_call" and "tool_calls" in refused.value.message
    assert router.requests == {}
