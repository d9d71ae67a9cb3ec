"""OpenAI's Responses API (POST /v1/responses) over the chat path: a request becomes a chat completion
(instructions and input items as messages, function tools as chat tools, `text.format` as response_format), and
its answer comes back as output items, whole or as the Responses stream's events.

Stateless, as vLLM's is without its store: `store` is taken and nothing is kept, so previous_response_id and
conversations are refused. Shapes: OpenAI's API reference for /v1/responses, as openai-python 3.x types them
(Response, ResponseStreamEvent); tests/test_responses.py validates every answer against those types.
"""
from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator

from deployments.errors import APIError, as_api_error, validation_error
from deployments.openai_server import OpenAIServer, Prepared
from deployments.protocol import MAX_TOOLS, ChatCompletionRequest, JsonObject, RequestModel, Text, Unsupported
from deployments.streaming import ChoiceDelta, ChoiceTotal, EventStream
from deployments.structured import closed
from deployments.tool_calls import ParsedCall, ToolCallStream, answer_calls
from scheduler.sampling import MAX_LOGPROBS, TokenLogprobs

# The chat request's fields as a Responses client knows them, for the errors that name one.
_CHAT_TO_RESPONSES = (("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
                      ("response_format.json_schema", "text.format"), ("response_format", "text.format"))


# ---- the request ----------------------------------------------------------------------------------

class InputText(RequestModel):
    type: Literal["input_text", "output_text"]  # an assistant turn's own text comes back as output_text
    text: Text


class InputMessage(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[InputText]


class FunctionCallItem(RequestModel):
    """A call the model made earlier, sent back with its output (the next item)."""
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text


class FunctionCallOutput(RequestModel):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text | list[InputText]  # text, or text parts (joined by newlines, as a message's are)

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(part.text for part in self.output)


def _item_type(value: Any) -> str | None:
    """An item's `type`; a message may leave it out (OpenAI's EasyInputMessage)."""
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutput, Tag("function_call_output")], Discriminator(_item_type)]


class FunctionTool(RequestModel):
    type: Text
    name: Text = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Text | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None  # None: strict, as OpenAI's Responses API takes it (Chat Completions: not strict)

    @field_validator("type")
    @classmethod
    def _functions_only(cls, v):
        if v != "function":
            raise ValueError(f"only function tools are served here; {v!r} is one of OpenAI's hosted tools")
        return v

    def as_chat_tool(self) -> dict:
        """The chat completion's tool. A tool that does not say whether it is strict is, as in OpenAI's Responses
        API (its function-calling guide): objects take only the properties they list, and all of them."""
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        if self.strict is None:
            function["strict"] = True
            function["parameters"] = closed(self.parameters or {"type": "object", "properties": {}},
                                            require_all=True)
        return {"type": "function", "function": function}


class FunctionChoice(RequestModel):
    type: Literal["function"]
    name: Text


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = None  # json_schema's
    schema_: JsonObject | None = Field(None, alias="schema")
    description: Text | None = None
    strict: bool | None = None


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: Text | None = None

    @field_validator("verbosity")
    @classmethod
    def _one_verbosity(cls, v):
        if v != "medium":
            raise ValueError("this model has one verbosity: medium (or leave it out)")
        return v


class ResponsesRequest(RequestModel):
    model: Text | None = None
    input: Text | list[InputItem]
    instructions: Text | None = None  # a system message before the input
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None  # checked as the chat completion's
    top_p: float | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True  # taken; nothing is stored
    metadata: dict[str, Text] | None = Field(None, max_length=16)  # returned with the response
    user: Text | None = None
    service_tier: Literal["auto", "default"] | None = None
    truncation: Text | None = None  # "disabled" only: "auto" would drop input the client sent
    background: bool = False
    include: list[Text] | None = None  # the one extra output data here: message.output_text.logprobs
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with the logprobs included: alternatives
    previous_response_id: Unsupported | None = None  # needs the store
    conversation: Unsupported | None = None
    prompt: Unsupported | None = None  # OpenAI's stored prompt templates
    reasoning: Unsupported | None = None  # not a reasoning model
    max_tool_calls: Unsupported | None = None
    # vLLM's sampling extras, as its chat completions take them
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    cache_salt: Text | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, v):
        if v != "disabled":
            raise ValueError("only \"disabled\": the input is never cut here (a prompt too long is a 400)")
        return v

    @field_validator("background")
    @classmethod
    def _no_background(cls, v):
        if v:
            raise ValueError("background responses are not supported: nothing is stored to fetch them from")
        return v

    @field_validator("include")
    @classmethod
    def _only_logprobs(cls, v):
        for item in v or ():
            if item != "message.output_text.logprobs":
                raise ValueError(f"{item!r} cannot be included; only \"message.output_text.logprobs\" can")
        return v

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())

    def chat(self) -> ChatCompletionRequest:
        """The chat completion this request asks for. Raises APIError (400) naming this request's field."""
        body: dict[str, Any] = {"model": self.model, "messages": self._messages(), "stream": self.stream,
                                "max_completion_tokens": self.max_output_tokens,
                                "parallel_tool_calls": self.parallel_tool_calls, "user": self.user}
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "cache_salt"):
            body[name] = getattr(self, name)
        if self.logprobs:
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs or 0
        if self.tools:
            body["tools"] = [t.as_chat_tool() for t in self.tools]
        if isinstance(self.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        else:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise renamed(validation_error(exc.errors(), skip_body=False)) from None

    def _messages(self) -> list[dict]:
        messages: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, InputMessage):
                content = item.content if isinstance(item.content, str) else [
                    {"type": "text", "text": part.text} for part in item.content]
                messages.append({"role": item.role, "content": content})
            elif isinstance(item, FunctionCallItem):  # calls in a row are one assistant turn
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
        return messages


def renamed(error: APIError) -> APIError:
    """A chat completion's error, naming the Responses field it came from."""
    param = error.info.param
    if param is not None and (tool := re.match(r"tools\.\d+\.function(?=\.|$)", param)):  # tools are flat here
        error.info.param = param[:tool.end() - len(".function")] + param[tool.end():]
        error.info.message = error.info.message.replace(param, error.info.param, 1)
        return error
    for chat, responses in _CHAT_TO_RESPONSES:
        if param is not None and (param == chat or param.startswith(chat + ".")):
            error.info.param = responses + param[len(chat):] if chat != "messages" else responses
            error.info.message = error.info.message.replace(param, error.info.param, 1).replace(
                chat, responses, 1)
            break
    return error


# ---- the answer -------------------------------------------------------------------------------------

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message(text: str, status: str, logprobs: list[dict]) -> dict:
    return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
            "content": [_text_part(text, logprobs)]}


def _text_part(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _call(call: ParsedCall, status: str) -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": call.name,
            "arguments": call.arguments, "status": status}


class _Answer:
    """What a response says besides its output: the request's settings, echoed as OpenAI echoes them."""

    def __init__(self, server: OpenAIServer, req: ResponsesRequest, prep: Prepared):
        self.req, self.prep = req, prep
        self.id = "resp_" + prep.router_id.rsplit("-", 1)[-1]
        self.created = int(time.time())
        self.model = server.model

    def response(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        req = self.req
        fmt = req.text.format if req.text and req.text.format else TextFormat(type="text")
        choice = req.tool_choice or "auto"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": usage,
            "user": req.user, "metadata": req.metadata or {}}

    def logprobs(self, server: OpenAIServer, lps: list[TokenLogprobs]) -> list[dict]:
        """Logprobs as output_text carries them (chat's shape: token, logprob, bytes, top_logprobs), when the
        request included them."""
        return server.chat_logprobs(lps).model_dump()["content"] if self.req.logprobs and lps else []

    def usage(self, generated: int, cached: int) -> dict:
        prompt = len(self.prep.prompt_ids)
        # cache_write_tokens: what the prefix cache kept of this prompt is the router's, not counted here
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + generated}


async def respond(server: OpenAIServer, req: ResponsesRequest, salt: str | None) -> Response:
    """POST /v1/responses: the whole response, or its events as SSE. Raises APIError as the chat path does,
    naming this request's fields."""
    chat = req.chat()
    try:
        prep = await server.prepare(chat, "resp")
        answer = _Answer(server, req, prep)
        stream = server.deltas([prep], 1, salt)
        if req.stream:
            first = await server.first_delta(stream, prep)
            return EventStream(_events(server, answer, first, stream), source=stream)
        total = ChoiceTotal()
        try:
            async for d in stream:
                total.add(d)
        except Exception as exc:
            raise as_api_error(exc, prep.prompt_field) or exc
    except APIError as exc:
        raise renamed(exc) from None
    status = "incomplete" if total.finish_reason == "length" else "completed"
    calls = None
    if prep.tool_mode != "none":
        calls, _ = answer_calls(total.text, prep.tools, prep.tool_mode == "forced", req.parallel_tool_calls)
    output = ([_call(c, status) for c in calls] if calls
              else [_message(total.text, status, answer.logprobs(server, total.logprobs))])
    return JSONResponse(answer.response(status, output, answer.usage(total.num_generated, total.num_cached)))


async def _events(server: OpenAIServer, answer: _Answer, first: ChoiceDelta,
                  stream: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
    """The Responses stream: created, in_progress, each output item opened, its deltas, each item done, and
    completed (or incomplete, at max_output_tokens); an `error` event if the answer fails on the way."""
    numbers = itertools.count()
    prep, req = answer.prep, answer.req

    def event(kind: str, **data) -> str:
        payload = {"type": kind, "sequence_number": next(numbers), **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    output: list[dict] = []
    message: dict | None = None  # the open message item
    texts: list[str] = []
    logprobs: list[dict] = []  # the message's, when included
    pending: list[TokenLogprobs] = []  # of tokens whose text a tool-call check still holds back
    calls: dict[int, dict] = {}  # a streamed call's index -> its item
    tools = (ToolCallStream(prep.tools, prep.tool_mode == "forced", req.parallel_tool_calls)
             if prep.tool_mode != "none" else None)
    yield event("response.created", response=answer.response("in_progress", []))
    yield event("response.in_progress", response=answer.response("in_progress", []))

    def open_message() -> list[str]:
        nonlocal message
        message = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}
        output.append(message)
        index = len(output) - 1
        return [event("response.output_item.added", output_index=index, item=message),
                event("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                      part=_text_part(""))]

    d, finish, generated, cached = first, None, 0, 0
    try:
        while d is not None:
            content, pieces, _ = tools.feed(d.text, d.finish_reason is not None) if tools else (d.text, [], False)
            pending += d.logprobs
            if content:
                if message is None:
                    for e in open_message():
                        yield e
                texts.append(content)
                lps, pending = answer.logprobs(server, pending), []
                logprobs += lps
                yield event("response.output_text.delta", item_id=message["id"], output_index=output.index(message),
                            content_index=0, delta=content, logprobs=lps)
            for piece in pieces:
                if piece.name is not None:
                    item = {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": piece.name,
                            "arguments": "", "status": "in_progress"}
                    calls[piece.index] = item
                    output.append(item)
                    yield event("response.output_item.added", output_index=len(output) - 1, item=item)
                item = calls[piece.index]
                item["arguments"] += piece.arguments
                if piece.arguments:
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=output.index(item), delta=piece.arguments)
            finish, generated, cached = d.finish_reason or finish, d.num_generated, d.num_cached or cached
            d = await anext(stream, None)
    except Exception as exc:
        error = as_api_error(exc, prep.prompt_field) or APIError(500, "Internal server error.", "internal_error")
        renamed(error)
        yield event("error", code=error.info.code or error.info.type, message=error.info.message,
                    param=error.info.param)
        return
    status = "incomplete" if finish == "length" else "completed"
    logprobs += answer.logprobs(server, pending)  # tokens that brought no text (an EOS): in the done event only
    if message is None and not calls:  # an empty answer is still a message
        for e in open_message():
            yield e
    for index, item in enumerate(output):
        if item is message:
            text = "".join(texts)
            yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=text, logprobs=logprobs)
            yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=_text_part(text, logprobs))
            item["content"] = [_text_part(text, logprobs)]
        else:
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=item["arguments"])
        item["status"] = status
        yield event("response.output_item.done", output_index=index, item=item)
    final = answer.response(status, output, answer.usage(generated, cached))
    yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
