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
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from deployments.errors import APIError, client_json
from deployments.protocol import ChatMessage, Tool

PYTHON_TAG = "<|python_tag|>"
# What reading JSON text can raise: Python's json recurses per bracket, so arrays or objects nested deeper than
# the interpreter's recursion limit (a model repeating "[" writes them) raise RecursionError, not a decode error,
# and an integer of more digits than int() takes (sys.get_int_max_str_digits(), 4,300) a plain ValueError.
NOT_JSON = (ValueError, RecursionError)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def tool_definitions(tools: list[Tool]) -> list[dict]:
    """OpenAI's tool definitions as chat templates take them: as vLLM hands them over (serving_chat's
    `tool.model_dump()`), a missing description or parameters is null, and `strict` is there only when given."""
    return [{"type": "function", "function": t.function.model_dump(exclude={"strict"} if t.function.strict is None
                                                                   else None)} for t in tools]


def tools_system_message(tools: list[Tool]) -> dict:
    """The tools, described for a model whose template cannot render them."""
    functions = "\n\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
    return {"role": "system", "content": (
        "You have access to the following functions. To call one, answer with only a JSON object of the form "
        '{"name": function name, "parameters": an object of argument names and values}, and nothing else. '
        "Answer normally when no function is needed.\n\n" + functions)}


def render_messages(messages: list[ChatMessage], tools: list[Tool] | None, template_takes_tools: bool) -> list[dict]:
    """Chat messages as the tokenizer's template takes them: tool calls in the history as Llama 3 JSON text
    (or as structured `tool_calls` for a template that renders them), tool results as `tool` turns. A message's
    `name`, a tool turn's `tool_call_id` and an assistant turn's calls' ids go through, as vLLM passes them: Llama
    3's templates read none, but others (Mistral's, Qwen's) pair a result with its call by them. Calls on another
    turn, and the id on another turn, are ignored, as vLLM ignores them (a user turn's text was replaced by them)."""
    out = []
    for i, m in enumerate(messages):
        message: dict = {"role": m.role, "content": m.text}
        tool_call_id = m.tool_call_id if m.role == "tool" else None
        message.update((k, v) for k, v in (("name", m.name), ("tool_call_id", tool_call_id)) if v is not None)
        if m.tool_calls and m.role == "assistant":
            calls = [{"name": c.function.name,
                      "parameters": _arguments(c.function.arguments, f"messages.{i}.tool_calls.{j}.function.arguments")}
                     for j, c in enumerate(m.tool_calls)]
            if template_takes_tools:
                message["tool_calls"] = [{"id": t.id, "type": "function",
                                          "function": {"name": c["name"], "arguments": c["parameters"]}}
                                         for t, c in zip(m.tool_calls, calls)]
            else:
                message["content"] = "; ".join(json.dumps(c) for c in calls)
        out.append(message)
    if tools and not template_takes_tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": tools_system_message(tools)["content"] + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, tools_system_message(tools))
    return out


def _arguments(text: str, where: str):
    """A call's arguments as the template takes them: empty is {} and other text must be JSON, as vLLM's
    chat_utils._postprocess_messages takes them (json.loads, whose error is a 400). Raises APIError 400."""
    if not text:
        return {}
    try:
        return client_json(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"{where}: not JSON ({e})", param=where) from None
    except ValueError as e:  # nested too deeply, or an integer too long for int()
        raise APIError(400, f"{where}: {e}", param=where) from None


def _parse(text: str, names: Collection[str]) -> tuple[list[ParsedCall], ParsedCall | None]:
    """The whole calls, and the call the answer was still writing when it ended (max_tokens or a stop string
    cut it), or whose arguments are no JSON: a known tool's head in the usual form, name first, whose object
    does not parse. A stream sends that one's name and arguments as they come, so a whole answer must report
    it too; nothing after it is read, on either path."""
    body = text.lstrip().removeprefix(PYTHON_TAG).lstrip()  # not rstrip: a cut call's arguments end as streamed
    if not body.startswith("{"):
        return [], None
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        try:
            obj, end = decoder.raw_decode(body, position)
        except NOT_JSON:
            head = _CALL_HEAD.match(body, position)
            if _head_name(head) not in names:
                return calls, None
            # its arguments as far as their brackets go, as a stream sends them: whole with only the object's
            # "}" missing, no JSON (e.g. {"city": Oslo}), or cut off
            end, _ = _Brackets().scan(body, head.end())
            return calls, ParsedCall(_head_name(head), body[head.end():end])
        call = _call(body, position, obj, names)
        if call is None:
            break
        calls.append(call)
        position = _next_call(body, end)
    return calls, None


def _head_name(head: re.Match | None) -> str | None:
    """The tool a call's head names (its JSON string decoded), or None."""
    return _json_string(head[1]) if head else None


def _json_string(text: str) -> str | None:
    """A JSON string's text, decoded; None when it is none."""
    try:
        return json.loads(f'"{text}"')
    except json.JSONDecodeError:  # e.g. "get\_weather": not a call's head
        return None


def _call(body: str, position: int, obj, names: Collection[str]) -> ParsedCall | None:
    """The call the JSON value `obj` (read from body[position:]) makes, or None. In the usual form (name first)
    it is the name and the arguments as the model wrote them first, which is what a stream sends piece by piece,
    so a streamed and a whole answer carry the same call even when a key comes again later in the object (json
    keeps the last). Else its name and arguments re-serialized (a stream sends such a call whole, from this same
    function). An object that only names a tool (e.g. a tool's description) is no call, as in vLLM's
    llama3_json."""
    head = _CALL_HEAD.match(body, position)
    if head and _head_name(head) in names:
        _, end = json.JSONDecoder().raw_decode(body, head.end())  # (a part of the object just read)
        return ParsedCall(_head_name(head), body[head.end():end])
    if not isinstance(obj, dict) or obj.get("name") not in names or not {"parameters", "arguments"} & obj.keys():
        return None
    return ParsedCall(obj["name"], json.dumps(obj.get("parameters", obj.get("arguments")), ensure_ascii=False))


_SEPARATORS = re.compile(r"[ \n\t;]*")  # what may separate two calls before a python tag
_SPACES = re.compile(r"\s*")  # str.isspace's characters
_JSON_SPACES = re.compile(r"[ \t\n\r]*")  # JSON's, inside a call's object


def _next_call(text: str, position: int) -> int:
    """Past what may separate two calls: whitespace, ";", the python tag."""
    position = _SEPARATORS.match(text, position).end()
    if text.startswith(PYTHON_TAG, position):
        position += len(PYTHON_TAG)
    return _next_space(text, position)


def cut_call(text: str, names: Sequence[str]) -> ParsedCall:
    """A forced call the answer could not finish (max_tokens): its name, and its arguments as far as they go
    (vLLM's llama3_json does likewise), so a client reading tool_calls[0] finds what there is."""
    written = _written_name(text)
    fits = [n for n in names if written and (n == written[0] if written[1] else n.startswith(written[0]))]
    name = fits[0] if fits else names[0]
    arguments = re.search(r'"(?:parameters|arguments)"\s*:\s*', text)
    return ParsedCall(name, text[arguments.end():] if arguments else "")


# A call's name as far as it was written, and its closing quote if that was written too
_WRITTEN_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)("?)')


def _written_name(text: str) -> tuple[str, bool] | None:
    """The name a call began, as far as it was written, with its JSON escapes undone (a name is any text: `"`, `\\`),
    and whether it was written whole (a name that begins another tool's is that tool only when it is not); None
    when no name was begun."""
    written = _WRITTEN_NAME.search(text)
    if written is None:
        return None
    # less a \u escape the cut left unfinished
    raw = written[1] if written[2] else re.sub(r"\\u[0-9a-fA-F]{0,3}$", "", written[1])
    name = _json_string(raw)
    return raw if name is None else name, bool(written[2])


def answer_calls(text: str, names: Sequence[str], forced: bool, parallel: bool = True
                 ) -> tuple[list[ParsedCall] | None, bool]:
    """The calls a whole answer makes (None when it is content), and whether they are whole. A call must name a
    tool of `names`. An answer that begins with a call is calls: what follows the last call that parses (text, a
    malformed or unknown call) is dropped, as a stream that sent the calls already must (vLLM's llama3_json drops
    it too). A call that max_tokens or a stop string cut off is still a call (not whole: its arguments are no JSON
    to run), as is a forced answer cut anywhere. `parallel` False (OpenAI's parallel_tool_calls) keeps the first
    call only, as vLLM does (vllm-project/vllm#26233): the model is not stopped after it."""
    calls, cut = _parse(text, names)
    kept = len(calls) if parallel else min(len(calls), 1)
    if cut is not None:
        calls.append(cut)
    elif not calls and forced:
        calls = [cut_call(text, names)]
    calls = calls if parallel else calls[:1]
    return calls or None, bool(calls) and kept == len(calls)


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class CallDelta:
    """A piece of a streamed call: its first one carries the name (the caller gives it an id), later ones more
    of its arguments' JSON text."""

    index: int
    name: str | None
    arguments: str


# A call in the usual form, name first, its arguments an object: their JSON text starts where this ends. (_Head
# reads the same piece by piece.)
# Its "_" is JSON's whitespace (_JSON_SPACES): a head json cannot read (U+00A0 in it) is no call's, on either path.
_CALL_HEAD = re.compile(r'\{_"name"_:_"((?:[^"\\]|\\.)*)"_,_"(?:parameters|arguments)"_:_(?=\{)'
                        .replace("_", _JSON_SPACES.pattern))


class ToolCallStream:
    """Streams one choice's text as content or as tool calls. `forced`: the whole answer is calls. `auto`: text
    is held back while it may still be a call (nothing but a JSON object so far), and sent as content as soon as
    it cannot be. A call in the usual form (`{"name": ..., "parameters": ...}`, name first) streams as it is
    generated, as vLLM's tool parsers stream: its name once known, then its arguments' JSON text as it comes.
    Held text that was not streamed so becomes calls at the end if it parses as calls, else content."""

    def __init__(self, names: Sequence[str], forced: bool, parallel: bool = True):
        self.tool_names = names  # in order: a forced call cut before its name is written names the first
        self.names = frozenset(names)
        self.holding = True
        self.forced = forced
        self.parallel = parallel
        self.held = ""
        self.call_like = False  # the text so far starts as a call does: no need to look at its start again
        self.calls = 0  # calls whose name was sent
        self.pos = 0  # where the scan of `held` stands
        self.call_start = 0  # where the last streamed call's object starts
        self.in_arguments = False
        self.arguments_start = 0  # where the current call's arguments start in `held`
        self.need_close = False  # a call's arguments ended: its object's "}" comes next
        self.brackets = _Brackets()  # the current call's arguments, scanned so far
        self.broken = False  # a call's arguments closed but are no JSON: the calls end there, as _parse's do
        # The next call's head as read so far, and where it starts once no text to come can move that (_next_call
        # from `pos`), so that a token reads only its own text: matching the head again at each token took ~9 s for
        # 8,000 tokens of `{"name": "abc abc ...`, and 2.2 s for 2,000 "{" after 100,000 spaces.
        self.head: _Head | None = None
        self.head_start: tuple[int, int] | None = None  # (pos, start)
        self.longest_name = 6 * max(map(len, self.names), default=0)  # a name written all in \uXXXX escapes

    def feed(self, text: str, final: bool) -> tuple[str, list[CallDelta], bool]:
        """(content to send now, call pieces to send now, whether the answer is calls: at the end, whether
        its calls are whole, not cut by max_tokens or a stop string)."""
        if not self.holding:
            return text, [], False
        held, self.held = self.held, ""  # the one reference: += then grows the string in place, not a copy a token
        held += text
        self.held = held
        if not (self.forced or self.calls or self.call_like):
            head = held.lstrip()
            self.call_like = head.startswith(("{", PYTHON_TAG))  # then so it stays, however the text grows
            if head and not self.call_like and not PYTHON_TAG.startswith(head):  # (the tag may be split)
                self.holding = False
                return held, [], False
        deltas: list[CallDelta] = []
        self._scan(deltas)
        if not final:
            return "", deltas, self.calls > 0
        if self.calls:  # the rest, in a form not streamed (e.g. "parameters" first), comes whole
            more = [] if self.in_arguments or not self.parallel else self._rest()
            deltas += [CallDelta(self.calls + i, c.name, c.arguments) for i, c in enumerate(more)]
            return "", deltas, answer_calls(self.held, self.tool_names, self.forced, self.parallel)[1]
        calls, whole = answer_calls(self.held, self.tool_names, self.forced, self.parallel)
        if not calls:
            return self.held, [], False
        return "", [CallDelta(i, c.name, c.arguments) for i, c in enumerate(calls)], whole

    def _rest(self) -> list[ParsedCall]:
        """The calls after the last streamed one (parsed from that one's start: it may have had more keys), a call
        cut off at the end included, as the whole answer reports it (_parse)."""
        calls, cut = _parse(self.held[self.call_start:], self.names)
        return (calls + [cut] if cut else calls)[1:]

    def _scan(self, deltas: list[CallDelta]) -> None:
        held = self.held
        while True:
            if not self.in_arguments:
                if self.calls and not self.parallel or self.broken:
                    return  # parallel_tool_calls false: the first call only; none after arguments that are no JSON
                if self.need_close:  # the call object's own "}" after its arguments
                    self.pos = _JSON_SPACES.match(held, self.pos).end()
                    if not held.startswith("}", self.pos):
                        return
                    self.pos += 1
                    self.need_close = False
                start = self._head_start()
                if self.head is None or self.head.start != start:
                    self.head = _Head(start, self.names, self.longest_name)
                end = self.head.scan(held)
                if end is None:
                    return  # not (yet) a call's head in the usual form: held
                deltas.append(CallDelta(self.calls, self.head.name, ""))
                self.calls += 1
                self.call_start, self.pos, self.head = start, end, None
                self.arguments_start, self.brackets = end, _Brackets()
                self.in_arguments = True
            start = self.pos
            i, closed = self.brackets.scan(held, start)
            if i > start:
                if deltas and deltas[-1].index == self.calls - 1:
                    deltas[-1].arguments += held[start:i]
                else:
                    deltas.append(CallDelta(self.calls - 1, None, held[start:i]))
            self.pos = i
            if not closed:
                return
            self.in_arguments, self.need_close = False, True
            try:
                json.loads(held[self.arguments_start:i])
            except NOT_JSON:
                self.broken = True

    def _head_start(self) -> int:
        """Where the next call's head starts: past what may separate it from the last call (_next_call), found once
        text has come that no text to come moves it past (not whitespace, a separator or a python tag's start)."""
        if self.head_start is not None and self.head_start[0] == self.pos:
            return self.head_start[1]
        held = self.held
        skipped = _SEPARATORS.match(held, self.pos).end()
        if skipped == len(held):  # separators only so far: _next_call reads what comes from there alike
            self.pos = skipped
        start = _next_call(held, self.pos)
        if start < len(held) and not (len(held) - start < len(PYTHON_TAG) and PYTHON_TAG.startswith(held[start:])):
            self.head_start = (self.pos, start)
        return start


_WS, _NAME, _KEY = "whitespace", "name", "key"  # the steps of _HEAD that are no literal text
# _CALL_HEAD as steps: literal text, whitespace, the name's JSON string to its closing quote, the arguments' key
# (one of _KEYS); then comes the arguments' "{"
_HEAD = ("{", _WS, '"name"', _WS, ":", _WS, '"', _NAME, _WS, ",", _WS, _KEY, _WS, ":", _WS)
_KEYS = ('"parameters"', '"arguments"')
_NAME_TEXT = re.compile(r'[^"\\]*')


class _Head:
    """A call's head in the usual form (_CALL_HEAD) at `start`, read piece by piece (a stream's), each character
    once: matching _CALL_HEAD again from `start` at each token read the whole head each time, so a head that stayed
    undecided (a long name, or long whitespace in it) made a stream cost quadratic time."""

    def __init__(self, start: int, names: frozenset[str], longest_name: int):
        self.start, self.names, self.longest_name = start, names, longest_name
        self.i = start  # the next character to read
        self.step = 0  # in _HEAD
        self.done = 0  # characters read of the step's literal text
        self.keys = _KEYS  # the keys the arguments' key read so far may still be
        self.name_start = 0
        self.escaped = False  # the last character read is the name's backslash of an escape
        self.name: str | None = None
        self.dead = False  # no text to come makes it a call's head: a name no tool's, or longer than any

    def scan(self, text: str) -> int | None:
        """Where the call's arguments start in `text` (held so far) once the head is whole, `name` naming its tool;
        None until then."""
        i = self.i
        while i < len(text) and not self.dead:
            if self.step == len(_HEAD):  # the arguments' "{"
                self.dead = text[i] != "{"
                break
            step = _HEAD[self.step]
            if step == _WS:
                i = _JSON_SPACES.match(text, i).end()
                if i < len(text):
                    self.step += 1
            elif step == _NAME:
                i = self._name(text, i)
            else:
                literals = tuple(k for k in (self.keys if step == _KEY else (step,)) if k[self.done] == text[i])
                if not literals:
                    self.dead = True
                    break
                if step == _KEY:
                    self.keys = literals
                i, self.done = i + 1, self.done + 1
                if self.done == len(literals[0]):
                    self.step, self.done, self.name_start = self.step + 1, 0, i  # (the name follows a quote)
        self.i = i
        return i if self.step == len(_HEAD) and not self.dead and i < len(text) else None

    def _name(self, text: str, i: int) -> int:
        """Past the name's characters in text[i:], and its closing quote if that came."""
        if self.escaped:
            self.escaped, i = False, i + 1
        i = _NAME_TEXT.match(text, i).end()
        if i < len(text) and text[i] == "\\":
            self.escaped, i = True, i + 1
        elif i < len(text):  # its closing quote
            self.name = _json_string(text[self.name_start:i])
            self.dead = self.name not in self.names
            self.step += 1
            return i + 1
        self.dead = i - self.name_start > self.longest_name
        return i


class _Brackets:
    """Where a JSON value that opens with a bracket closes, its text read piece by piece (a stream's) or at
    once: brackets inside strings, and escaped quotes, do not count. The value need not be valid JSON."""

    def __init__(self):
        self.depth = 0  # open brackets
        self.in_string = self.escaped = False

    def scan(self, text: str, i: int) -> tuple[int, bool]:
        """Past text[i:] as far as the bracket that closes the value, that included: (where the scan stopped,
        whether the value closed)."""
        while i < len(text):
            c = text[i]
            i += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i, True
        return i, False


def _next_space(text: str, position: int) -> int:
    """Past whitespace."""
    return _SPACES.match(text, position).end()
