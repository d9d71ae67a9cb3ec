"""OpenAI's Responses API (POST /v1/responses) over the chat path: the request (responses_protocol.py) runs as
the chat completion it describes, and its answer comes back as output items, whole or as the Responses stream's
events.

Stateless, as vLLM's is without its store: `store` is taken and nothing is kept, so previous_response_id and
conversations are refused. Shapes: OpenAI's API reference for /v1/responses, as openai-python 3.x types them
(Response, ResponseStreamEvent); tests/test_responses.py validates every answer against those types.
"""
from __future__ import annotations

import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import Response

from deployments import json_slices
from deployments.errors import APIError, as_api_error
from deployments.json_slices import Spliced
from deployments.large_body import OFF_LOOP_BYTES, off_loop
from deployments.openai_server import ANSWER_CHARS_PER_LOGPROB, OpenAIServer, Prepared
from deployments.responses_protocol import ResponsesRequest, TextFormat, renamed
from deployments.router_client import merged_tokens_max
from deployments.streaming import ChoiceDelta, ChoiceTotal, Deferred, EventStream, FirstDelta
from deployments.tool_calls import ParsedCall, ToolCallStream, answer_calls
from scheduler.sampling import PackedLogprobs, TokenLogprobs

log = logging.getLogger("ray.serve")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message(text: str, status: str, logprobs: list[dict] | str) -> dict:
    return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
            "content": [_text_part(text, logprobs)]}


def _text_part(text: str, logprobs: list[dict] | str | None = None) -> dict:
    """`logprobs`: the list, or a Spliced mark standing for it."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _call(call: ParsedCall, status: str) -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": call.name,
            "arguments": call.arguments, "status": status}


class _Answer:
    """What a response says besides its output: the request's settings, echoed as OpenAI echoes them. Made once the
    request is prepared, it holds these, not the request (its input is the body's size, for the answer's length)."""

    def __init__(self, server: OpenAIServer, req: ResponsesRequest, prep: Prepared):
        self.server, self.prep = server, prep
        self.include_logprobs, self.parallel_tool_calls = req.logprobs, req.parallel_tool_calls
        fmt = req.text.format if req.text and req.text.format else TextFormat(type="text")
        choice = req.tool_choice or "auto"
        self._response = {
            "id": prep.id, "object": "response",
            "created_at": prep.created,
            "status": None, "error": None, "incomplete_details": None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.server.model,
            "output": [], "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            # what it is sampled with (the model's defaults for what it left out), as vLLM says (its
            # vllm/entrypoints/openai/responses/protocol.py, ResponsesResponse.from_request)
            "temperature": self.prep.params.temperature,
            # a name or schema beside "text" / "json_object" is not applied, so not echoed as if it were
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True,
                                              include=None if fmt.type == "json_schema" else {"type"})},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            # a tool that did not say is strict (FunctionTool.as_chat_tool), and echoed so, as OpenAI echoes it
            "tools": [{**t.model_dump(exclude={"defer_loading", "async_"}, exclude_none=True),
                       "strict": t.strict is not False} for t in req.tools or ()],
            "top_p": self.prep.params.top_p, "truncation": "disabled", "usage": None,
            "top_logprobs": req.top_logprobs or 0,  # 0 by default, as OpenAI's and vLLM's ResponsesRequest have it
            "user": req.user, "metadata": req.metadata or {}}

    def logprobs_chars(self, tokens: int) -> int:
        """About the JSON characters of `tokens` tokens' logprobs in the answer (0 when not included): what sizes its
        build on the loop or on a thread (OpenAIServer.sized), as a chat completion's is sized."""
        return tokens * (1 + self._response["top_logprobs"]) * ANSWER_CHARS_PER_LOGPROB if self.include_logprobs else 0

    def response(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        return {**self._response, "status": status, "output": output, "usage": usage,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}

    def logprobs(self, lps: list[TokenLogprobs]) -> list[dict]:
        """Logprobs as output_text carries them (chat's shape: token, logprob, bytes, top_logprobs), when the
        request included them."""
        if not self.include_logprobs:
            return []
        size = json_slices.SLICE  # model_dump holds the GIL as a JSON dump does
        return [entry for at in range(0, len(lps), size)
                for entry in self.server.logprobs.chat(lps[at:at + size]).model_dump()["content"]]

    def usage(self, generated: int, cached: int) -> dict:
        prompt = len(self.prep.prompt_ids)
        # cache_write_tokens: what the prefix cache kept of this prompt is the router's, not counted here
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + generated}


async def respond(server: OpenAIServer, req: ResponsesRequest, salt: str | None, body_bytes: int = 0) -> Deferred:
    """POST /v1/responses: the whole response, or its events as SSE, awaited as it is sent (the request is let go
    meanwhile). Raises APIError as the chat path does, naming this request's fields. The chat completion of a body
    of more than OFF_LOOP_BYTES is made off the loop (50,000 input items: ~0.2 s of validation)."""
    chat = req.chat() if body_bytes <= OFF_LOOP_BYTES else await off_loop(req.chat)
    try:
        # the router's id begins with the response's: a client's request_id is that id whole
        prep = await server.prepare(chat, "" if req.request_id is not None else "resp_")
    except APIError as exc:
        raise req.renamed(exc) from None
    return Deferred(_answer(_Answer(server, req, prep), salt, req.stream))


async def _answer(answer: _Answer, salt: str | None, stream: bool) -> Response:
    server, prep = answer.server, answer.prep
    try:
        deltas = server.deltas([prep], 1, salt)
        if stream:
            first = await server.first_delta(deltas, prep)
            return EventStream(_events(answer, first, deltas), first, server.keepalive_s)
        total = ChoiceTotal()
        try:
            async for d in deltas:
                total.add(d)
        except Exception as exc:
            raise as_api_error(exc, prep.prompt_field) or exc
    except APIError as exc:
        raise renamed(exc) from None
    # Built on a thread when large, as a chat completion's is (OpenAIServer._answer): every other stream of the replica
    # would stand still for the whole build (2,000 tokens with 20 top_logprobs: 42,000 entries)
    body = await server.sized(answer.logprobs_chars(len(total.logprobs)), _whole, answer, total, bulk=False)
    return Response(body, media_type="application/json")


def _whole(answer: _Answer, total: ChoiceTotal) -> bytes:
    """The whole response's JSON, as FastAPI's JSONResponse writes it."""
    prep = answer.prep
    status = "incomplete" if total.finish_reason == "length" else "completed"
    calls, whole = None, False
    if prep.tool_mode != "none":
        calls, whole = answer_calls(total.text, prep.tool_names, prep.tool_mode == "forced",
                                    answer.parallel_tool_calls)
    lists = Spliced()

    def dumps(value) -> bytes:  # each slice encoded apart: the whole is joined once, as bytes
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    # the logprobs built a slice at a time too: freeing all of them at once holds the GIL (8,192 tokens: ~30 ms)
    # a call before the last is whole (the stream closes it as completed when the next begins): only the last one
    # can be cut, and is incomplete when not whole, whatever cut it (max_output_tokens, a stop string, an EOS), as
    # chat keeps such a call without finish_reason "tool_calls"; a whole one is completed (a call after it cut, and
    # dropped without parallel_tool_calls)
    last = "completed" if whole else "incomplete"
    output = ([_call(c, "completed" if i < len(calls) - 1 else last) for i, c in enumerate(calls)] if calls else
              [_message(total.text, status, lists.mark(total.logprobs, lambda part: dumps(answer.logprobs(part)),
                                                       b","))])
    response = answer.response(status, output, answer.usage(total.num_generated, total.num_cached))
    return lists.fill(dumps(response))


async def _events(answer: _Answer, first: FirstDelta, stream: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
    """The Responses stream: created, in_progress; per output item, its opening, its deltas and its end (a call
    ends when the next one starts, as OpenAI's stream closes one item before it adds the next); then completed
    (or incomplete, at max_output_tokens). A delta carries the logprobs of the tokens taken since the one
    before; tokens after the last text (an EOS) are in output_text.done only. A stream whose answer failed on
    the way ends with response.failed, then an `error` event (its param too) that the SDKs raise."""
    numbers = itertools.count()
    prep = answer.prep

    def event(kind: str, **data) -> str:
        payload = {"type": kind, "sequence_number": next(numbers), **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    output: list[dict] = []
    message: dict | None = None  # the message item, once text came
    texts: list[str] = []
    logprobs = PackedLogprobs()  # the message's, when included: written as dicts only at the end (each a GC-tracked
    # container, ~16 per token with 20 top_logprobs, that every full collection walked while the answer lasted)
    pending: list[TokenLogprobs] | PackedLogprobs = []  # of the tokens since the last delta
    calls: dict[int, dict] = {}  # a streamed call's index -> its item
    # a call's item id -> its arguments' pieces, joined as it closes: item["arguments"] += piece copied all of them
    # at each delta, quadratic in their length
    arguments: dict[str, list[str]] = {}
    tools = (ToolCallStream(prep.tool_names, prep.tool_mode == "forced", answer.parallel_tool_calls)
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

    def close(item: dict, status: str, all_logprobs: str = "") -> list[str]:
        """`all_logprobs`: the message's, as a Spliced mark."""
        index = output.index(item)
        if item is message:
            text = "".join(texts)
            item["content"] = [_text_part(text, all_logprobs)]
            done = [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                          text=text, logprobs=all_logprobs),
                    event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                          part=item["content"][0])]
        else:
            item["arguments"] = "".join(arguments.pop(item["id"]))
            done = [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          name=item["name"], arguments=item["arguments"])]
        item["status"] = status
        return [*done, event("response.output_item.done", output_index=index, item=item)]

    def failed(error: APIError) -> str:
        """response.failed, the event OpenAI ends a failed response with: the output so far, its open items
        incomplete, and the error as Response.error, whose code is one of OpenAI's (openai-python's ResponseError).
        A reader of lifecycle events (openai-node's accumulateResponse) saw the response in_progress without it."""
        def ended(item: dict) -> dict:
            if item["status"] != "in_progress":
                return item
            return {**item, "status": "incomplete", **({"content": [_text_part("".join(texts))]} if item is message
                                                       else {"arguments": "".join(arguments[item["id"]])})}
        response = answer.response("failed", [ended(item) for item in output], answer.usage(generated, cached))
        code = ("rate_limit_exceeded" if error.status == 429 else "invalid_prompt" if error.status < 500 else
                "server_error")
        return event("response.failed", response={**response, "error": {"code": code, "message": error.info.message}})

    most = merged_tokens_max(prep.params)  # the tokens of a router event, whose logprobs a delta is built with

    def logprobs_json(part: PackedLogprobs | list[TokenLogprobs]) -> str:  # a slice's, as event() writes them
        return json.dumps(answer.logprobs(part), ensure_ascii=False)

    def text_delta(content: str, lps: object) -> str:
        return event("response.output_text.delta", item_id=message["id"], output_index=output.index(message),
                     content_index=0, delta=content, logprobs=lps)

    def held_delta(content: str, lps: PackedLogprobs | list[TokenLogprobs]) -> str:
        """The output_text.delta of text held while it could be a tool call, with its logprobs: those of every token
        held (the whole answer's, for one that opened as a call would), written a slice per call."""
        lists = Spliced()
        return lists.fill(text_delta(content, lists.mark(lps, logprobs_json, ", ")))

    finish, generated, cached = None, 0, 0
    whole = False  # the answer's calls are whole (ToolCallStream.feed's, at the end)
    try:  # the opening events went out with the headers: EventStream keeps the stream alive until the first delta
        d = await first.delta()
        while d is not None:
            content, pieces, whole = (tools.feed(d.text, d.finish_reason is not None) if tools else
                                      (d.text, [], False))
            pending += d.logprobs
            if not content and pending and type(pending) is list:  # held: text that may be a tool call, for as long
                pending = PackedLogprobs(pending)  # as the answer may last (its logprobs packed, as `logprobs`)
            if content:
                if message is None:
                    for e in open_message():
                        yield e
                texts.append(content)
                if answer.include_logprobs:
                    logprobs.extend(pending)
                taken, pending = pending, []
                if answer.include_logprobs and len(taken) > most:  # held text (a tool call's start?) sent at last
                    yield await answer.server.sized(answer.logprobs_chars(len(taken)), held_delta, content, taken,
                                                    bulk=False)
                else:
                    yield text_delta(content, answer.logprobs(taken))
            for piece in pieces:
                if piece.name is not None:
                    if calls:  # the call before it is whole
                        for e in close(output[-1], "completed"):
                            yield e
                    item = _call(ParsedCall(piece.name, ""), "in_progress")
                    calls[piece.index], arguments[item["id"]] = item, []
                    output.append(item)
                    yield event("response.output_item.added", output_index=len(output) - 1, item=item)
                item = calls[piece.index]
                arguments[item["id"]].append(piece.arguments)
                if piece.arguments:
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=output.index(item), delta=piece.arguments)
            finish, generated, cached = d.finish_reason or finish, d.num_generated, d.num_cached or cached
            d = await anext(stream, None)
    except Exception as exc:
        error = as_api_error(exc, prep.prompt_field)
        if error is None:
            log.exception("stream %s failed", prep.router_id)  # as a chat stream's
            error = APIError(500, "Internal server error.", "internal_error")
        renamed(error)
        yield failed(error)
        # `error` beside OpenAI's fields: both SDKs raise their APIError on a stream's data with an `error` key
        # (openai-node core/streaming.ts, openai-python _streaming.py), as on a chat stream's error; without it they
        # handed this event on as an answer's, and openai-node's stream helper rejected with the bare event object
        yield event("error", code=error.info.code or error.info.type, message=error.info.message,
                    param=error.info.param, error=error.info.model_dump())
        return

    def ending() -> list[str]:
        status = "incomplete" if finish == "length" else "completed"
        out = open_message() if message is None and not calls else []  # an empty answer is still a message
        if message is not None and answer.include_logprobs:
            logprobs.extend(pending)
        lists = Spliced()
        # the last item (those before it are closed): a call is completed when whole, else incomplete, as the
        # whole answer's (_whole)
        last = ("completed" if whole else "incomplete") if calls else status
        out += close(output[-1], last, lists.mark(logprobs, logprobs_json, ", "))
        final = answer.response(status, output, answer.usage(generated, cached))
        out.append(event("response.completed" if status == "completed" else "response.incomplete", response=final))
        return [lists.fill(e) for e in out]

    # The last events carry the whole text and its logprobs (three times, and the response once more): written on a
    # thread when large, as a whole answer is
    for e in await answer.server.sized(answer.logprobs_chars(len(logprobs) + len(pending)), ending, bulk=False):
        yield e
