"""OpenAI's Responses API request (POST /v1/responses), and the chat completion it asks for: instructions and
input items become messages, flat function tools chat tools, `text.format` a response_format. Errors name the
Responses fields. Shapes: OpenAI's API reference for /v1/responses, as openai-python 3.x types them
(ResponseCreateParams); omitted `strict` on a tool: OpenAI's function-calling guide.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator

from deployments.errors import APIError, validation_error
from deployments.protocol import (MAX_TOOLS, ChatCompletionRequest, Items, JsonObject, NoCustomCode, NoModeration,
                                  NotDisaggregated, NotReasoning, RefusalPart, RequestModel, Text, only, quoted,
                                  refused, short_text)
from deployments.structured import closed
from scheduler.sampling import MAX_LOGPROBS

# The chat request's fields as a Responses client knows them, for the errors that name one.
# a message of the chat history, or one of its calls: (message, call, ".function" or ".id")
_HISTORY_PATH = re.compile(r"messages\.(\d+)(?:\.tool_calls\.(\d+)(\.function|\.id)?)?")
_CHAT_TO_RESPONSES = (("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
                      ("response_format.json_schema", "text.format"), ("response_format", "text.format"))


class InputText(RequestModel):
    type: Literal["input_text", "output_text"]  # an assistant turn's own text comes back as output_text
    text: Text


class InputMessage(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | Items[Annotated[InputText | RefusalPart, Field(discriminator="type")]]  # a pasted-back refusal too
    # a pasted-back item's: "in_progress" or "incomplete" on the input's last item asks for its text to be continued
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(RequestModel):
    """A call the model made earlier, sent back with its output (the next item)."""
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text


class FunctionCallOutput(RequestModel):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text | Items[InputText]  # text, or text parts (joined by newlines, as a message's are)

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(part.text for part in self.output)


class ReasoningText(RequestModel):
    type: Literal["summary_text", "reasoning_text"]  # a summary's part, or the content's
    text: Text


class ReasoningItem(RequestModel):
    """A reasoning model's reasoning, in a history a client hands over (the Agents SDK's handoffs, a pasted-back
    `response.output`, a history replayed from another provider). It is taken and left out of the prompt: this
    model never produced it, Llama 3.3's chat template has no place for it (vLLM's assistant message holding only
    `reasoning` renders there as an empty assistant turn at best), and the history reads as it would without it.
    Its encrypted content is OpenAI's, which nothing here can read: a 400, as in vLLM (and OpenAI's own
    non-reasoning models, which refuse reasoning items altogether)."""
    type: Literal["reasoning"]
    id: Text | None = None
    summary: Items[ReasoningText] = []
    content: Items[ReasoningText] | None = None
    encrypted_content: refused("another model's encrypted reasoning cannot be read here: send the item without "
                               "it (or leave the item out)") | None = None


_CALL_FIELDS = {"call_id", "arguments", "output"}  # a function_call's or function_call_output's, no message's


def _item_type(value: Any) -> str | None:
    """An item's `type`; a message may leave it out (OpenAI's EasyInputMessage), or send it null (the default). An
    item with a call's or an output's own field is no message: without its type, the type is what it lacks, not
    the message's role the 400 named. Nor is an id alone: openai-python's ItemReference, whose type may be left out
    too."""
    if isinstance(value, dict):
        if value.get("type") is None:
            return None if _CALL_FIELDS & value.keys() or value.keys() - {"type"} == {"id"} else "message"
        return value["type"]
    return getattr(value, "type", None)


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutput, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")],
                      Discriminator(_item_type, custom_error_type="input_item_type",
                                    custom_error_message="an input item's type must be \"message\", \"function_call\", "
                                                         "\"function_call_output\" or \"reasoning\" (other items are "
                                                         "not served here: an \"item_reference\" names a stored item, "
                                                         "and nothing is stored)")]


# tools of the client's own that are not function tools: what their 400 says instead of "hosted"
_OWN_TOOLS = {"namespace": "a namespace groups tools: send its tools as function tools",
              "custom": "a custom tool's free-form input (text or a grammar) is not served"}


class FunctionTool(RequestModel):
    type: Text
    name: Text  # any text, as the chat tool's
    description: Text | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None  # None: strict, as OpenAI's Responses API takes it (Chat Completions: not strict)
    # a deferred tool stays out of the prompt until OpenAI's hosted tool search loads it: it was offered at once
    defer_loading: only(False, "a deferred tool is loaded by tool search, a hosted tool not served here") = False
    # OpenAI's asynchronous call: it was offered as an ordinary one, whose output the response ends to wait for
    async_: only(False, "asynchronous calls are not served here: a call ends the response, and its output comes "
                        "back as a function_call_output item of the next request") = Field(False, alias="async")
    # who may call it: the model ("direct"), or OpenAI's hosted Programmatic Tool Calling program
    allowed_callers: Items[Literal["direct", "programmatic"]] | None = None

    @field_validator("type")
    @classmethod
    def _functions_only(cls, v):
        if v != "function":
            why = _OWN_TOOLS.get(v, f"{quoted(v)!r} is one of OpenAI's hosted tools")
            raise ValueError(f"only function tools are served here; {why}")
        return v

    @field_validator("allowed_callers")
    @classmethod
    def _called_directly(cls, v):
        """Every tool here is offered to the model: one the model may not call would be called anyway."""
        if "direct" not in v:
            raise ValueError("must include \"direct\": the model calls every tool here; Programmatic Tool Calling "
                             "is a hosted tool not served here")
        return v

    def as_chat_tool(self) -> dict:
        """The chat completion's tool. A tool that does not say whether it is strict is, as in OpenAI's Responses
        API (its function-calling guide): objects take only the properties they list, and all of them."""
        function = self.model_dump(exclude={"type", "defer_loading", "async_", "allowed_callers"}, exclude_none=True)
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


class PromptCacheOptions(RequestModel):
    """OpenAI's prompt cache options: mode and ttl are hints (prefixes are cached here anyway); `prewarm` asks for
    no output at all, which this server never answers with."""
    prewarm: only(False, "every request is answered here; a request with max_output_tokens 1 warms the cache") = False


class ResponsesRequest(RequestModel):
    model: Text | None = None
    input: Text | Items[InputItem]
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
    # returned with the response; OpenAI's limits: 16 pairs, keys of 64 characters at most, values of 512
    metadata: dict[short_text(64), short_text(512)] | None = Field(None, max_length=16)
    user: Text | None = None
    service_tier: Literal["auto", "default"] | None = None
    truncation: Text | None = None  # "disabled" only: "auto" would drop input the client sent
    background: bool = False
    include: Items[Text] | None = None  # the one extra output data here: message.output_text.logprobs
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with the logprobs included: alternatives
    previous_response_id: refused("responses are not stored here: send the earlier turns as input items") | None = None
    conversation: refused("conversations are not stored here: send the earlier turns as input items") | None = None
    prompt: refused("OpenAI's stored prompt templates are not kept here: send instructions and input") | None = None
    reasoning: NotReasoning | None = None
    max_tool_calls: refused("it caps calls of hosted tools, and none is served here (function calls are the "
                            "client's to run)") | None = None
    moderation: NoModeration | None = None
    # compaction: the input rewritten once it passes a token threshold
    context_management: refused("the input is never compacted here (a prompt too long is a 400)") | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    # vLLM's sampling extras, as its chat completions take them
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    cache_salt: Text | None = None
    # vLLM's Responses extras (its ResponsesRequest), checked and applied as the chat completion's
    stop: str | Items[str] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    logit_bias: dict[str, float] | None = None
    structured_outputs: JsonObject | None = None
    priority: int | None = None
    request_id: Text | None = None  # the response's id, as vLLM answers it
    chat_template_kwargs: JsonObject | None = None  # more variables for the model's template, as the chat's
    vllm_xargs: NoCustomCode | None = None
    kv_transfer_params: NotDisaggregated | None = None
    ec_transfer_params: NotDisaggregated | None = None
    # vLLM's gpt-oss (Harmony) messages of an earlier turn
    previous_input_messages: refused("Harmony messages are not read here: send the history as input "
                                     "items") | None = None
    # vLLM's: the response would also carry the prompt's and the answer's messages (input_messages, output_messages)
    enable_response_messages: only(False, "the response carries no input_messages or output_messages here") = False
    # per message of the chat history, the input item it starts at (-1: the instructions), and per call of it the
    # function_call item, for the errors that name one (_input_path); filled by chat()
    _sources: list[int] = PrivateAttr(default_factory=list)
    _call_items: dict[int, list[int]] = PrivateAttr(default_factory=dict)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("reasoning", mode="before")
    @classmethod
    def _nothing_configured(cls, v):
        """Reasoning whose every setting is null (or none given) configures nothing, as `"reasoning": null`: it is
        what a Response says here, and a client that carries a Response's settings over sends it back."""
        return None if isinstance(v, dict) and all(setting is None for setting in v.values()) else v

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
                raise ValueError(f"{quoted(item)!r} cannot be included; only \"message.output_text.logprobs\" can")
        return v

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())

    @property
    def continues(self) -> bool:
        """Whether the answer continues the input's last item, as vLLM's (should_continue_final_message): a message
        left unfinished, its status "in_progress" or "incomplete" (a response cut at max_output_tokens, pasted
        back). Its text then ends the prompt, as chat's continue_final_message, and the answer is what follows it.
        A finished message (no status, or "completed") is an earlier turn, as OpenAI's API reads an assistant's:
        a new turn answers it. Reasoning, left out of the prompt (ReasoningItem), leaves nothing to continue."""
        last = None if isinstance(self.input, str) else self.input[-1]
        return isinstance(last, InputMessage) and last.status in ("in_progress", "incomplete")

    def chat(self) -> ChatCompletionRequest:
        """The chat completion this request asks for. Raises APIError (400) naming this request's field."""
        continues = self.continues
        body: dict[str, Any] = {"model": self.model, "messages": self._messages(), "stream": self.stream,
                                "max_completion_tokens": self.max_output_tokens,
                                "parallel_tool_calls": self.parallel_tool_calls, "user": self.user,
                                "add_generation_prompt": not continues, "continue_final_message": continues}
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "cache_salt", "stop", "include_stop_str_in_output", "ignore_eos",
                     "skip_special_tokens", "logit_bias", "structured_outputs", "priority", "request_id",
                     "chat_template_kwargs"):
            body[name] = getattr(self, name)
        if self.logprobs:
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs or 0
        if self.tools:
            body["tools"] = [t.as_chat_tool() for t in self.tools]
        if isinstance(self.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tools or self.tool_choice != "auto":  # "auto" is the Responses API's default, tools or none
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema" and fmt.schema_ is None:
            # required here, unlike chat's json_schema.schema: OpenAI's API reference (and openai-python's
            # ResponseFormatTextJSONSchemaConfig, which vLLM's request takes) has it, and the echoed text.format
            # without it is no valid Response
            raise APIError(400, "text.format.schema: Field required", param="text.format.schema")
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise self.renamed(validation_error(exc.errors(), skip_body=False)) from None

    def renamed(self, error: APIError) -> APIError:
        """A chat completion's error, naming the field of this request it came from (the input item, once chat()
        made the history)."""
        return renamed(error, self._input_path)

    def _input_path(self, param: str) -> str | None:
        """The field of this request that a path in its chat history names; None when it names no one message."""
        m = _HISTORY_PATH.match(param)
        rest = param[m.end():] if m else ""
        if m is None or int(m[1]) >= len(self._sources) or rest and not rest.startswith("."):
            return None
        source = self._sources[int(m[1])]
        if source < 0 or isinstance(self.input, str):
            return "instructions" if source < 0 else "input"
        item = self.input[source]
        if m[2] is not None:  # a call: its function_call item (reasoning items may come between a turn's items)
            calls = self._call_items.get(int(m[1]), [])
            if int(m[2]) >= len(calls):
                return None
            return f"input.{calls[int(m[2])]}" + (".call_id" if m[3] == ".id" else rest)
        if isinstance(item, FunctionCallOutput):
            rest = {".content": ".output", ".tool_call_id": ".call_id"}.get(rest, rest)
        return f"input.{source}{rest}"

    def _messages(self) -> list[dict]:
        messages: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        self._sources = sources = [-1] * len(messages)
        self._call_items = call_items = {}
        if isinstance(self.input, str):
            sources.append(0)
            return [*messages, {"role": "user", "content": self.input}]
        if all(isinstance(item, ReasoningItem) for item in self.input):  # nothing left for the model to answer
            raise APIError(400, "input: holds only reasoning items, which are left out of the prompt here: send a "
                                "message", param="input")
        calls: set[str] = set()
        for i, item in enumerate(self.input):
            if isinstance(item, InputMessage):
                content = item.content if isinstance(item.content, str) else [
                    {"type": "text", "text": part.text} for part in item.content]
                messages.append({"role": item.role, "content": content})
                sources.append(i)
            elif isinstance(item, FunctionCallItem):  # calls after the assistant's text or calls: the same turn
                calls.add(item.call_id)
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if not (messages and messages[-1]["role"] == "assistant"):
                    messages.append({"role": "assistant", "content": None})
                    sources.append(i)
                messages[-1].setdefault("tool_calls", []).append(call)
                call_items.setdefault(len(messages) - 1, []).append(i)
            elif isinstance(item, ReasoningItem):  # left out: see ReasoningItem
                continue
            elif item.call_id not in calls:  # a result answering no call: OpenAI's 400 (a history cut wrong)
                raise APIError(400, f"input.{i}.call_id: No tool call found for function call output with call_id "
                                    f"{quoted(item.call_id)}.", param=f"input.{i}.call_id")
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
                sources.append(i)
        return messages


def renamed(error: APIError, input_path: Callable[[str], str | None] | None = None) -> APIError:
    """A chat completion's error, naming the Responses field it came from: `input_path` (ResponsesRequest's) names
    the input item of a path in the chat history; other paths there name the input as a whole."""
    param = error.info.param
    if param is not None and input_path is not None and (named := input_path(param)) is not None:
        error.info.param = named
        error.info.message = error.info.message.replace(param, named, 1)
        return error
    if param is not None and (tool := re.match(r"tools\.\d+\.function(?=\.|$)", param)):  # tools are flat here
        error.info.param = param[:tool.end() - len(".function")] + param[tool.end():]
        error.info.message = error.info.message.replace(param, error.info.param, 1)
        return error
    for chat, responses in _CHAT_TO_RESPONSES:
        if param is not None and (param == chat or param.startswith(chat + ".")):
            error.info.param = responses + param[len(chat):] if chat != "messages" else responses
            error.info.message = error.info.message.replace(param, error.info.param, 1)
            break
    return error
