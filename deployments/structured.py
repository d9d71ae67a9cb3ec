"""Structured outputs and forced tool calls, compiled at the ingress into the one grammar a request carries.

Sources, at most one per request: OpenAI's `response_format` (json_object, json_schema), vLLM's
`structured_outputs` (json, regex, choice, grammar, json_object) and its older `guided_*` fields, and
`tool_choice` "required" or a named function (the answer is then a Llama 3 JSON call to one of the tools; such a
call takes the place of `response_format`, which shapes a content reply, as in vLLM).
Each is checked against the served tokenizer here, so an invalid schema, regex or grammar is a 400 naming
its field before anything reaches a mesh. (llguidance builds its lexer lazily, so a grammar can pass here and
hit a lexer limit on the mesh while matching: that request alone ends, and the ingress answers 400 naming
`Constraint.param`.) A grammar too large or too costly for a mesh to compile is refused too (model/grammar.py,
grammar_error, which compiles it first in a child process it can kill); constraint_for runs on a
deep_stack_executor thread.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from deployments.errors import APIError, client_json
from deployments.protocol import MAX_LOC_CHARS, ChatCompletionRequest, CompletionRequest, Tool, quoted
from model.grammar import (MAX_GRAMMAR_BYTES, cfg_grammar, choice_grammar, grammar_error, json_schema_grammar,
                           json_sequence_grammar, regex_grammar)
from model.grammar_check import MAX_COMPILE_WALL_S, engine_error

ToolMode = Literal["none", "auto", "forced"]


@dataclass
class Constraint:
    grammar: str | None  # llguidance grammar text; None: free text
    tool_mode: ToolMode  # auto: an answer may be calls; forced: it is calls; none: never
    tools: list[Tool]  # offered to the model
    called: list[Tool]  # those an answer's calls may name: for a named tool_choice, that one (its grammar's)
    param: str | None = None  # the field the grammar comes from: named if llguidance gives up on it mid-answer


def constraint_for(req: ChatCompletionRequest | CompletionRequest, ll_tokenizer: Callable[[], object]) -> Constraint:
    """The request's constraint, validated against `ll_tokenizer()` (llguidance's view of the served model,
    asked for only when the request has a constraint). Raises APIError 400 naming the field for a
    contradictory or invalid one."""
    tools, tool_mode = _tools(req)
    called = _chosen(tools, req.tool_choice) if tool_mode == "forced" else tools
    sources = _grammar_sources(req)
    if tool_mode == "forced":
        # response_format shapes a content reply, and a forced call makes none: the tool's schema wins, as in vLLM
        # (OpenAI takes the pair too; the Agents SDK sends it for an output_type with tool_choice "required")
        sources = [s for s in sources if not s[0].startswith("response_format")]
        parallel = req.parallel_tool_calls is not False
        sources.append(("tool_choice", _tool_call_grammar(tools, req.tool_choice, parallel)))
    if len(sources) > 1:
        raise APIError(400, f"{sources[1][0]}: only one output constraint per request (also given: {sources[0][0]})",
                       param=sources[1][0])
    if not sources:
        return Constraint(None, tool_mode, tools, called)
    param, build = sources[0]
    try:
        grammar = _check(param, build, ll_tokenizer, _schema(req, param))
    except APIError:
        whitespace = _whitespace_pattern(req)
        if whitespace is not None and param != "tool_choice":  # a JSON constraint's whitespace regex, at fault?
            _check(whitespace[0], _builder("regex", whitespace[1], {}), ll_tokenizer)
        if param == "tool_choice":  # name the tool whose schema cannot constrain a call, if one alone cannot
            chosen = _chosen(tools, req.tool_choice)
            deadline = time.monotonic() + MAX_COMPILE_WALL_S  # each compile is cut at that, not all of them
            for i, tool in enumerate(tools):
                if tool in chosen and time.monotonic() < deadline:
                    parameters = _parameters(tool)
                    _check(f"tools.{i}.function.parameters", _builder("json", parameters, {}), ll_tokenizer, parameters)
        raise
    return Constraint(grammar, tool_mode, tools, called, param)


def _check(param: str, build: Callable[[], str], ll_tokenizer: Callable[[], object], schema=None) -> str:
    """The grammar `build` makes, valid for the served model. Raises APIError 400 naming `param`, and where in
    `schema` (the JSON schema it is built from, if any) a keyword llguidance lacks sits."""
    try:
        grammar = build()
    except Exception as exc:  # e.g. a schema llguidance cannot even translate
        raise APIError(400, f"{param}: {_cut(engine_error(str(exc)))}", param=param) from None
    error = grammar_error(grammar, ll_tokenizer())
    if error:
        raise APIError(400, f"{param}: {_cut(_located(_one_line(error), schema))}", param=param)
    return grammar


def _schema(req, param: str):
    """The JSON schema (data, or JSON text) that the grammar of `param` is built from; None for another kind."""
    if param == "response_format.json_schema.schema":
        return req.response_format.json_schema.schema_
    if param == "structured_outputs.json":
        return req.structured_outputs.json_
    return req.guided_json if param == "guided_json" else None


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \["([^"]+)"')
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (.+)")


def _located(error: str, schema) -> str:
    """`error` with where in `schema` the keyword or format it names first sits ("at properties.tags"), when
    llguidance refuses one it lacks without saying where: pydantic's set[...] (uniqueItems), bytes (format
    "binary") or dict[Literal[...], ...] (propertyNames) in a model of many fields. vLLM's default "auto" backend
    refuses these too (xgrammar declines them, then llguidance, run strict, refuses them: vllm/sampling_params.py
    _validate_structured_outputs, 00388f65)."""
    keyword, fmt = _UNIMPLEMENTED.match(error), _UNKNOWN_FORMAT.fullmatch(error)
    if schema is None or not (keyword or fmt):
        return error
    if isinstance(schema, str):
        try:
            schema = client_json(schema)
        except ValueError:
            return error
    # $defs are looked in where a $ref reaches them: llguidance compiles no other (a def no $ref names, holding the
    # keyword, was named in place of the property that did). Each subschema once: $refs may cycle.
    todo, seen = [("", schema)], set()
    while todo:
        path, value = todo.pop()
        if not isinstance(value, dict) or id(value) in seen:
            continue
        seen.add(id(value))
        if keyword and keyword.group(1) in value or fmt and value.get("format") == fmt.group(1):
            return f"{error} (at {path or 'the top of the schema'})"
        nested, at = [], f"{path}." if path else ""
        for key, sub in value.items():
            if key == "$ref" and isinstance(sub, str):
                nested += _pointed(schema, sub)
            elif key in _NESTED and isinstance(sub, dict):
                nested.append((f"{at}{key}", sub))
            elif key in _NESTED_LISTS and isinstance(sub, list):
                nested += ((f"{at}{key}.{i}", v) for i, v in enumerate(sub))
            elif key in _NESTED_MAPS and isinstance(sub, dict):
                nested += ((f"{at}{key}.{name}", v) for name, v in sub.items())
        todo += reversed(nested)  # depth first, in the schema's order
    return error


def _pointed(schema, ref: str) -> list[tuple[str, object]]:
    """The subschema that local `ref` ("#/$defs/Name", a JSON pointer) names in `schema`, with its place as
    `_located` says it ("$defs.Name"); none for another kind of $ref or one that names nothing."""
    if ref != "#" and not ref.startswith("#/"):
        return []
    value, names = schema, []
    for part in unquote(ref[2:]).split("/") if ref != "#" else ():  # decoded, then split (RFC 6901 6., llguidance)
        name = part.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and name in value:
            value = value[name]
        elif isinstance(value, list) and name.isdigit() and int(name) < len(value):
            value = value[int(name)]
        else:
            return []
        names.append(name)
    return [(".".join(names), value)]


def _cut(message: str) -> str:
    """A constraint's error without most of the client's text it quotes (a name, a regex, a grammar: up to
    MAX_GRAMMAR_BYTES back, as a long `model` once was): its first and last MAX_LOC_CHARS characters, where
    llguidance says where and what is wrong."""
    return message if len(message) <= 2 * MAX_LOC_CHARS else f"{message[:MAX_LOC_CHARS]}...{message[-MAX_LOC_CHARS:]}"


def _one_line(error: str) -> str:
    """llguidance's message without its source excerpt and carets: its first line, and the line that says
    what is wrong when the first ends at a colon ("regex parse error:" ... "error: unclosed group")."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    cause = next((line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0].rstrip(':')}: {cause}" if cause else lines[0]


def unconstrained(req: ChatCompletionRequest | CompletionRequest) -> bool:
    """No grammar to build or validate (constraint_for is then instant): no structured output, no tools.
    Raises APIError 400 for a malformed structured_outputs, as constraint_for does."""
    return not _grammar_sources(req) and not (isinstance(req, ChatCompletionRequest) and req.tools)


def _tools(req) -> tuple[list[Tool], ToolMode]:
    if not isinstance(req, ChatCompletionRequest):
        return [], "none"
    tools, choice = req.tools or [], req.tool_choice
    if choice is None:
        return tools, "auto" if tools else "none"
    if choice == "none":
        return tools, "none"
    if not tools:
        raise APIError(400, f"tool_choice: {choice if isinstance(choice, str) else 'a named function'} needs `tools`",
                       param="tool_choice")
    if choice == "auto":
        return tools, "auto"
    if choice != "required" and choice.function.name not in {t.function.name for t in tools}:
        raise APIError(400, f"tool_choice: no tool is named {quoted(choice.function.name)!r}", param="tool_choice")
    return tools, "forced"


def _chosen(tools: list[Tool], choice) -> list[Tool]:
    """The tools a forced answer may call: all of them ("required"), or the one named."""
    return tools if choice == "required" else [t for t in tools if t.function.name == choice.function.name]


def _tool_call_grammar(tools: list[Tool], choice, parallel: bool):
    chosen = _chosen(tools, choice)
    several = choice == "required" and parallel  # OpenAI: "required" calls one or more tools; a named one, one

    def build() -> str:
        """A Llama 3 JSON call to one of the chosen tools; for "required" with parallel calls, one or more,
        "; " between them (vLLM's forced-call schema is likewise an array of at least one). A tool's `$defs` /
        `definitions` (pydantic puts nested models there, referenced as "#/$defs/Name") move to the root of
        the call's schema, where such pointers resolve, as vLLM's forced-call schema does; its other pointers
        into itself ("#", "#/properties/...") are rebased to where it sits in the call's schema. Raises
        ValueError when two tools define one name differently."""
        _check_size([tool.function.parameters for tool in chosen])
        calls, defs = [], {}
        for i, tool in enumerate(chosen):
            at = "#/properties/parameters" if len(chosen) == 1 else f"#/anyOf/{i}/properties/parameters"
            parameters = _rebased(_parameters(tool), at)
            for keyword in ("$defs", "definitions"):
                for name, sub in (parameters.get(keyword) or {}).items():
                    if defs.setdefault(keyword, {}).setdefault(name, sub) != sub:
                        raise ValueError(f"two tools define {keyword}/{name} differently; rename one")
            calls.append({"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                          "properties": {"name": {"const": tool.function.name}, "parameters": parameters}})
        call = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), **defs}
        return json_sequence_grammar(call, "; ") if several else json_schema_grammar(call)
    return build


def _rebased(schema, at: str):
    """`schema` with each `$ref` to its root or into it (other than into `$defs` / `definitions`, which move to the
    root of the call's schema) pointing at `at`, the pointer to where it sits in the call's schema. Data (`const`,
    `enum`, `default`, `examples`) is left alone."""
    if isinstance(schema, list):
        return [_rebased(v, at) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rebased(sub, at) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA else _rebased(value, at)
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) \
            and not ref.startswith(("#/$defs/", "#/definitions/")):
        out["$ref"] = at + ref[1:]
    return out


def _parameters(tool: Tool) -> dict:
    """The JSON schema a call's arguments follow: always an object (a schema without `type`, which the
    protocol takes when nothing at its top says otherwise, admitted any JSON value, so a forced call could
    come out with arguments "null"); closed (`closed`, strictly when the tool is strict); none given: any
    object."""
    parameters = tool.function.parameters
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    elif "type" not in parameters:
        parameters = {**parameters, "type": "object"}
    return closed(parameters, strict=bool(tool.function.strict))


def _grammar_sources(req) -> list[tuple[str, object]]:
    """(param, builder) for every grammar-making field the request sets."""
    sources: list[tuple[str, object]] = []
    so = req.structured_outputs
    whitespace = _json_whitespace(req)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        sources.append(("response_format", _builder("json_object", True, whitespace)))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_  # built (and closed) only when asked for
        sources.append(("response_format.json_schema.schema",
                        _builder("json_object", True, whitespace) if schema is None else
                        _builder("json", schema, whitespace, bool(fmt.json_schema.strict))))
    if so is not None:
        given = [(name, value) for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                                   ("grammar", so.grammar), ("json_object", so.json_object or None))
                 if value is not None]
        if len(given) != 1:
            raise APIError(400, "structured_outputs: give exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs")
        name, value = given[0]
        build = _builder(name, value, whitespace)  # closed: disable_additional_properties always holds
        sources.append((f"structured_outputs.{name}", build))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{name}")
        if value is not None:
            sources.append((f"guided_{name}", _builder(name, value, whitespace)))
    return sources


def _whitespace_pattern(req) -> tuple[str, str] | None:
    """(field, regex) of the request's JSON whitespace pattern, if it sets one."""
    if req.guided_whitespace_pattern is not None:
        return "guided_whitespace_pattern", req.guided_whitespace_pattern
    so = req.structured_outputs
    if so is not None and so.whitespace_pattern is not None:
        return "structured_outputs.whitespace_pattern", so.whitespace_pattern
    return None


def _json_whitespace(req) -> dict:
    """llguidance's JSON whitespace options from vLLM's fields: `disable_any_whitespace` (no whitespace
    between tokens) and `whitespace_pattern` / `guided_whitespace_pattern` (a regex for it). They shape JSON
    constraints only, as in vLLM."""
    so = req.structured_outputs
    pattern = (_whitespace_pattern(req) or (None, None))[1]
    options = {}
    if so is not None and so.disable_any_whitespace:
        options["whitespace_flexible"] = False
    if pattern is not None:
        options["whitespace_pattern"] = pattern
    return options


# JSON Schema's keywords whose values are schemas a value itself must match: one, a list of alternatives, or a
# map of names to them; `closed` descends into these only. Not into data (`default`, `const`, `examples`), nor
# into schemas that are combined or negated (`allOf`, `not`, `if`/`then`/`else`, `dependentSchemas`): closed
# alone, each branch of an allOf would refuse the properties the others list, and a closed `not` says less.
_SUBSCHEMA = frozenset({"items", "additionalItems", "additionalProperties", "contains", "propertyNames",
                        "unevaluatedItems", "unevaluatedProperties"})
_SUBSCHEMA_LISTS = frozenset({"anyOf", "oneOf", "prefixItems", "items"})
_SUBSCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
_DATA = frozenset({"const", "enum", "default", "examples"})  # values, not schemas
_DEFS = ("$defs", "definitions")
# All of a schema's subschemas, combined and negated too (`_located` looks for a keyword in them; in $defs, where
# a $ref leads).
_NESTED = _SUBSCHEMA | {"not", "if", "then", "else"}
_NESTED_LISTS = _SUBSCHEMA_LISTS | {"allOf"}
_NESTED_MAPS = _SUBSCHEMA_MAPS - set(_DEFS) | {"dependentSchemas"}  # $defs: only where a $ref leads
# What leaves a non-strict object open: properties that other subschemas name (a `properties` level's anyOf /
# allOf mixins, a $ref's target, if/then), or keys only patterns describe (vLLM sends those to its guidance
# backend, which leaves them open).
_OPEN_BESIDE = frozenset({"allOf", "anyOf", "oneOf", "$ref", "not", "if", "then", "else", "dependentSchemas",
                          "patternProperties", "propertyNames", "unevaluatedProperties"})
# Where a strict object that lists no properties takes them from: closed beside these, it takes none at all.
_PROPERTIES_FROM = frozenset({"$ref", "allOf", "anyOf", "oneOf"})


def closed(schema: dict | None, require_all: bool = False, strict: bool = True) -> dict:
    """A schema whose objects take no properties they do not list: one that leaves out `additionalProperties`
    gets false, not JSON Schema's true; one that says it keeps it. Linear in the schema's size: each subschema is
    visited once.
    `strict`: as OpenAI's strict mode reads a schema (every object closed: it refuses combined schemas anyway),
    except one that lists no properties beside a $ref or branches (_PROPERTIES_FROM), which would then take none:
    the $ref's target and anyOf / oneOf branches close themselves (an allOf stays open, as without strict).
    Otherwise as vLLM's default backend (xgrammar, strict_mode on) compiles a plain one, without turning a valid
    schema into an impossible one: only objects that list `properties` close, not beside the keywords of
    _OPEN_BESIDE, and the anyOf / oneOf branches of an object that lists properties are mixins of it (closed
    alone, each would refuse them). In both, a $defs / definitions entry that a mixin names (_mixin_refs: an allOf's
    branch, OpenAPI's inheritance) is not closed at its top, where it is merged.
    `require_all`: every object also requires all its properties, as OpenAI's Responses API normalizes a tool
    that does not say whether it is strict."""
    if not isinstance(schema, dict):
        return {"type": "object", "properties": {}, "additionalProperties": False} if schema is None else schema
    out = dict(schema)
    mixins = not strict and "properties" in schema
    for key, value in schema.items():
        if key in _SUBSCHEMA and isinstance(value, dict):
            out[key] = closed(value, require_all, strict)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list) and not (mixins and key in ("anyOf", "oneOf")):
            out[key] = [closed(v, require_all, strict) if isinstance(v, dict) else v for v in value]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed(sub, require_all, strict) if isinstance(sub, dict) else sub
                        for name, sub in value.items()}
    kind = schema.get("type")
    if strict:
        close = "properties" in schema or (kind == "object" or isinstance(kind, list) and "object" in kind) \
            and not _PROPERTIES_FROM.intersection(schema)
    else:  # an object that lists no properties is a free-form map (pydantic's dict), not an empty object
        close = "properties" in schema and not _OPEN_BESIDE.intersection(schema)
    if close and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if any(isinstance(schema.get(k), dict) for k in _DEFS):
        for ref in _mixin_refs(schema):  # closed alone, each would refuse what it is merged with
            keyword, _, name = ref.removeprefix("#/").partition("/")
            defs = schema.get(keyword) if ref.startswith("#/") and keyword in _DEFS else None
            target = defs.get(name) if isinstance(defs, dict) else None
            if isinstance(target, dict) and "additionalProperties" not in target:
                out[keyword][name] = {k: v for k, v in out[keyword][name].items() if k != "additionalProperties"}
    if require_all and isinstance(schema.get("properties"), dict):
        out["required"] = list(schema["properties"])
    return out


def _mixin_refs(schema: dict) -> set[str]:
    """The `$ref`s that merge their target into an object rather than stand for one: an allOf's branches (OpenAPI's
    inheritance), a $ref beside `properties`, and the anyOf / oneOf branches of an object that lists properties."""
    refs, todo = set(), [schema]
    while todo:
        value = todo.pop()
        if isinstance(value, list):
            todo += value
        elif isinstance(value, dict):
            merged = [value] if "properties" in value else []
            for key in ("allOf", *(("anyOf", "oneOf") if "properties" in value else ())):
                merged += value.get(key) if isinstance(value.get(key), list) else []
            refs.update(m["$ref"] for m in merged if isinstance(m, dict) and isinstance(m.get("$ref"), str))
            todo += (sub for key, sub in value.items() if key not in _DATA)
    return refs


def _check_size(source) -> None:
    """Raises ValueError when `source` (text, or JSON data) is longer than MAX_GRAMMAR_BYTES as JSON, before
    anything converts it: llguidance's GBNF-to-Lark conversion is quadratic (16,000 rules, 266 KB, took 12 s),
    and building the grammar of an 8 MB schema held the GIL for 0.3 s. Stops counting once past the limit."""
    size, todo = 0, [source]
    while todo and size <= MAX_GRAMMAR_BYTES:
        value = todo.pop()
        if isinstance(value, str):
            size += len(value) + 2
        elif isinstance(value, dict):
            size += 2 + 2 * len(value)
            todo += value.keys()
            todo += value.values()
        elif isinstance(value, list):
            size += 2 + len(value)
            todo += value
        else:
            size += 4
    if size > MAX_GRAMMAR_BYTES:
        raise ValueError(f"the constraint is over {MAX_GRAMMAR_BYTES} bytes, the most this server takes")


def _builder(kind: str, value, whitespace: dict, strict: bool = False) -> Callable[[], str]:
    """The grammar's maker (run by _check, off the event loop), its source's size checked first. A JSON schema is
    closed (`closed`, strictly when `strict`)."""
    def build() -> str:
        _check_size(value)
        if kind == "json":
            schema = client_json(value) if isinstance(value, str) else value
            if schema is True:  # JSON Schema's `true` admits any value; json_schema_grammar's True is an object
                schema = {}
            return json_schema_grammar(closed(schema, strict=strict), whitespace)
        if kind == "json_object":
            return json_schema_grammar(True, whitespace)
        if kind == "regex":
            return regex_grammar(value)
        if kind == "choice":
            return choice_grammar(value)
        return cfg_grammar(value)
    return build
