"""Tool calls in Llama 3's JSON format: tools into the prompt, calls out of the answer.

Llama 3.1+ calls a tool by answering with one JSON object `{"name": ..., "parameters": {...}}`, optionally
after `<|python_tag|>`; several calls are separated by ";" (Meta's llama-models prompt format docs; vLLM's
`llama3_json` tool parser reads the same, and accepts "arguments" for "parameters"). A model whose chat
template renders `tools` (Llama 3.3's does) gets them there; otherwise (SmolLM2, Meta's checkpoint format)
they are described in a system message of the same format. Calls in the history are rendered back as that
JSON, so the model sees its own convention.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from deployments.protocol import ChatMessage, Tool

PYTHON_TAG = "<|python_tag|>"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def tool_definitions(tools: list[Tool]) -> list[dict]:
    """OpenAI's tool definitions as chat templates take them."""
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def tools_system_message(tools: list[Tool]) -> dict:
    """The tools, described for a model whose template cannot render them."""
    functions = "\n\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
    return {"role": "system", "content": (
        "You have access to the following functions. To call one, answer with only a JSON object of the form "
        '{"name": function name, "parameters": an object of argument names and values}, and nothing else. '
        "Answer normally when no function is needed.\n\n" + functions)}


def render_messages(messages: list[ChatMessage], tools: list[Tool] | None, template_takes_tools: bool) -> list[dict]:
    """Chat messages as the tokenizer's template takes them: tool calls in the history as Llama 3 JSON text
    (or as structured `tool_calls` for a template that renders them), tool results as `tool` turns."""
    out = []
    for m in messages:
        message: dict = {"role": m.role, "content": m.text}
        if m.tool_calls:
            calls = [{"name": c.function.name, "parameters": _arguments(c.function.arguments)} for c in m.tool_calls]
            if template_takes_tools:
                message["tool_calls"] = [{"type": "function", "function": {"name": c["name"],
                                                                           "arguments": c["parameters"]}}
                                         for c in calls]
            else:
                message["content"] = "; ".join(json.dumps(c) for c in calls)
        out.append(message)
    if tools and not template_takes_tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": tools_system_message(tools)["content"] + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, tools_system_message(tools))
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_tool_calls(text: str, tools: list[Tool]) -> list[ParsedCall] | None:
    """The calls an answer makes, or None when it is plain content. A call must name one of `tools`."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return None
    names = {t.function.name for t in tools}
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        try:
            obj, end = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        arguments = obj.get("parameters", obj.get("arguments", {}))
        calls.append(ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False)))
        position = end
        while position < len(body) and body[position] in " \n\t;":
            position += 1
    return calls or None


def cut_call(text: str, tools: list[Tool]) -> ParsedCall:
    """A forced call the answer could not finish (max_tokens): its name, and its arguments as far as they go
    (vLLM's llama3_json does likewise), so a client reading tool_calls[0] finds what there is."""
    name = re.search(r'"name"\s*:\s*"([^"]*)"', text)
    arguments = re.search(r'"(?:parameters|arguments)"\s*:\s*', text)
    return ParsedCall(name[1] if name else tools[0].function.name, text[arguments.end():] if arguments else "")


def answer_calls(text: str, tools: list[Tool], forced: bool, parallel: bool = True) -> list[ParsedCall] | None:
    """The calls a whole answer makes, or None when it is content. A forced answer is calls even when
    max_tokens cut it off. `parallel` False (OpenAI's parallel_tool_calls) keeps the first call only, as vLLM
    does (vllm-project/vllm#26233): the model is not stopped after it."""
    calls = parse_tool_calls(text, tools)
    if not calls and forced:
        calls = [cut_call(text, tools)]
    return calls[:1] if calls and not parallel else calls


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCallStream:
    """Streams one choice's text as content or as tool calls. `forced`: the whole answer is calls, sent
    when it ends. `auto`: text is held back while it may still be a call (nothing but a JSON object so far),
    and sent as content as soon as it cannot be; at the end, held text that parses as calls becomes calls."""

    def __init__(self, tools: list[Tool], forced: bool, parallel: bool = True):
        self.tools = tools
        self.holding = True
        self.forced = forced
        self.parallel = parallel
        self.held = ""

    def feed(self, text: str, final: bool) -> tuple[str, list[ParsedCall] | None]:
        """(content to send now, the calls once the answer has ended as calls)."""
        if not self.holding:
            return text, None
        self.held += text
        head = self.held.lstrip()
        if not self.forced and head and not head.startswith(("{", PYTHON_TAG)):
            self.holding = False
            return self.held, None
        if not final:
            return "", None
        calls = answer_calls(self.held, self.tools, self.forced, self.parallel)
        return ("", calls) if calls else (self.held, None)
