"""Structured outputs and tool calls at the ingress: request fields -> one validated grammar; answers -> calls."""
import json
import time

import pytest

from deployments.errors import APIError
from deployments.protocol import ChatCompletionRequest, CompletionRequest, Tool
from deployments.structured import closed, constraint_for
from deployments.tool_calls import ToolCallStream, answer_calls, render_messages
from model.embedded import ensure_smollm2
from model.grammar import GrammarCache, ascii_perl_classes, ll_tokenizer
from model.tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


@pytest.fixture(scope="module")
def llt(tok):
    return ll_tokenizer(tok, tok.vocab_size)


def chat(**kw):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def accepts(llt, tok, grammar, text) -> bool:
    """Whether the grammar admits `text` (tokenized as the model would)."""
    state = GrammarCache(llt).new_state(grammar, [])
    try:
        for token in tok.encode(text):
            state.accept(token)
    except ValueError:
        return False
    return state.matcher.is_accepting()


@pytest.mark.parametrize("fields, good, bad", [
    ({"response_format": {"type": "json_object"}}, '{"a": [1, 2]}', "plain text"),
    # JSON mode's answer is an object (OpenAI's, and vLLM's guidance backend), never another JSON value
    ({"response_format": {"type": "json_object"}}, '{"a": 1}', "[1, 2]"),
    ({"structured_outputs": {"json_object": True}}, '{"a": 1}', '"text"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
        "additionalProperties": False}}}}, '{"n": 3}', '{"n": "three"}'),
    ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]+"}}, "123-abc", "12-abc"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "no", "maybe"),
    ({"structured_outputs": {"regex": "[0-9]+", "json_object": False}}, "12", "ab"),  # false is not a second one
    ({"guided_choice": ["red", "green"]}, "green", "blue"),
    ({"guided_choice": ["a.b", "(x)"]}, "(x)", "axb"),  # a choice is literal text, not a regex
    ({"guided_json": {"type": "array", "items": {"type": "boolean"}}}, "[true, false]", "[1]"),
    ({"structured_outputs": {"grammar": 'start: "a" ("b")*'}}, "abbb", "ba"),
    # Lark's inlined rules (`?start`), which llguidance's own guess between Lark and GBNF took for GBNF
    ({"structured_outputs": {"grammar": '?start: x\nx: /[a-z]+/i'}}, "aBc", "a1"),
    # the EBNF of vLLM's docs (llama.cpp's GBNF), as vLLM's own example writes it
    ({"guided_grammar": 'root ::= select\nselect ::= "SELECT " column " from " table\n'
                        'column ::= "col_1" | "col_2"\ntable ::= "t1" | "t2"\n'},
     "SELECT col_2 from t1", "SELECT col_3 from t1"),
    # GBNF's \u and \U escapes, in a string and a class; an escaped quote and bracket stay literal
    ({"guided_grammar": r'root ::= "caf\u00e9 " [\u0041-\u005A]+ "\U0001F600" "\u0022" [^\u005D]'},
     'café AB😀"x', 'cafe AB😀"x'),
    ({"guided_grammar": r'root ::= "\u0022" [^\u005D] "\\u0041"'}, '"x\\u0041', '"]\\u0041'),
    # \d and \w as xgrammar (vLLM's default) reads them: ASCII, never fullwidth or other scripts' digits
    ({"guided_regex": r"\d{3}"}, "123", "\uff11\uff12\uff13"),
    ({"structured_outputs": {"regex": r"[\d.]+\w"}}, "1.5x", "1.5\u00e9"),
    ({"guided_regex": r"[^\W_]+"}, "abc1", "\uff11"),
    # a dash right after a class escape in brackets is a literal dash, as ECMAScript reads it (as llguidance reads a
    # JSON schema's pattern): \w's ranges made "_-." a range, a 400
    ({"guided_regex": r"[\w-.]+@[\w-]+"}, "a-b.c@d-e", "a,b@d"),
    ({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     '{"name": "get_weather", "parameters": {"city": "Oslo"}}', '{"name": "get_time", "parameters": {}}'),
    ({"tools": [WEATHER, TIME], "tool_choice": "required"},
     '{"name": "get_time", "parameters": {}}', "It is noon."),
    # strict (OpenAI's strict mode): every object is closed, one that lists no properties too; without strict such
    # an object is a free-form map (below)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": {
        "type": "object", "properties": {"meta": {"type": "object"}}, "required": ["meta"]}}}},
     '{"meta": {}}', '{"meta": {"k": 1}}'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"meta": {"type": "object"}}, "required": ["meta"]}}}},
     '{"meta": {"k": 1}}', '{"meta": 1}'),
    # a forced call is a whole call the parser takes: its arguments are there, and nothing beside name and them
    ({"tools": [WEATHER, TIME], "tool_choice": "required"},
     '{"name": "get_time", "parameters": {}}', '{"name": "get_time"}'),
    ({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     '{"name": "get_time", "parameters": {}}', '{"name": "get_time", "parameters": {}, "id": 1}'),
])
def test_each_source_becomes_a_grammar_that_admits_exactly_its_answers(tok, llt, fields, good, bad):
    constraint = constraint_for(chat(**fields), lambda: llt)
    assert accepts(llt, tok, constraint.grammar, good)
    assert not accepts(llt, tok, constraint.grammar, bad)


@pytest.mark.parametrize("fields, several", [
    ({"tool_choice": "required"}, True),  # OpenAI: "the model must call one or more tools"
    ({"tool_choice": "required", "parallel_tool_calls": True}, True),
    ({"tool_choice": "required", "parallel_tool_calls": False}, False),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, False),  # the named one, once
])
def test_a_required_call_may_be_several_unless_parallel_calls_are_off(tok, llt, fields, several):
    grammar = constraint_for(chat(tools=[WEATHER, TIME], **fields), lambda: llt).grammar
    one = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    two = one + '; {"name": "get_weather", "parameters": {"city": "Rome"}}'
    assert accepts(llt, tok, grammar, one)
    assert accepts(llt, tok, grammar, two) is several
    assert not accepts(llt, tok, grammar, one + "; ")
    if several:
        assert accepts(llt, tok, grammar, one + '; {"name": "get_time", "parameters": {}}')
        assert accepts(llt, tok, grammar, two + '; {"name": "get_time", "parameters": {}}')  # any number of them
        assert not accepts(llt, tok, grammar, one + '; {"name": "nope", "parameters": {}}')


@pytest.mark.parametrize("fields, param", [
    ({"guided_whitespace_pattern": "(", "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object"}}}}, "guided_whitespace_pattern"),
    ({"guided_whitespace_pattern": "(", "response_format": {"type": "json_object"}}, "guided_whitespace_pattern"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": "("}},
     "structured_outputs.whitespace_pattern"),
])
def test_a_bad_whitespace_pattern_is_named_not_the_schema(llt, fields, param):
    with pytest.raises(APIError) as caught:
        constraint_for(chat(**fields), lambda: llt)
    assert caught.value.status == 400 and caught.value.info.param == param


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "structured_outputs": {"json_object": True}}, "tool_choice"),
    *[({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}],
        "tool_choice": choice}, "tools.1.function.parameters")  # a forced call: the tool at fault is named
      for choice in ("required", {"type": "function", "function": {"name": "f"}})],
    # a named call: the chosen tool is named, not another one at fault that it does not call
    ({"tools": [{"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}, {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools.1.function.parameters"),
    # a JSON whitespace pattern shapes a content reply, not a forced call: the tool at fault is named, not it
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}], "tool_choice": "required",
      "guided_whitespace_pattern": "("}, "tools.0.function.parameters"),
])
def test_an_invalid_or_contradictory_constraint_is_a_400_naming_its_field(llt, fields, param):
    with pytest.raises(APIError) as caught:
        constraint_for(chat(**fields), lambda: llt)
    assert caught.value.status == 400 and caught.value.info.param == param


def test_a_grammar_seen_before_is_not_compiled_again(llt, monkeypatch):
    """An agent sends the same tools at every turn: the ingress keeps its verdict on each recent grammar."""
    from model.grammar_check import GrammarChecker
    compiled, real_check = [], GrammarChecker.check

    def counting_check(self, grammar):
        compiled.append(grammar)
        return real_check(self, grammar)
    monkeypatch.setattr(GrammarChecker, "check", counting_check)
    tool = {"type": "function", "function": {"name": "seen_before", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}
    first, again = (constraint_for(chat(tools=[tool], tool_choice="required"), lambda: llt) for _ in range(2))
    assert first.grammar == again.grammar and compiled == [first.grammar]
    bad = {"structured_outputs": {"regex": "(seen_before"}}
    for _ in range(2):
        with pytest.raises(APIError, match="unclosed group"):
            constraint_for(chat(**bad), lambda: llt)
    assert len(compiled) == 2  # a refusal is remembered too


def test_the_verdicts_kept_are_the_most_recently_used(llt, monkeypatch):
    """Past VERDICTS_KEPT the least recently used verdict goes, not the one just made: else, once full, no new
    grammar's verdict would be kept and an agent's tools would be compiled again at every turn."""
    import model.grammar as grammar
    from model.grammar import regex_grammar
    from model.grammar_check import GrammarChecker
    compiled, real_check = [], GrammarChecker.check

    def counting_check(self, text):
        compiled.append(text)
        return real_check(self, text)
    monkeypatch.setattr(GrammarChecker, "check", counting_check)
    monkeypatch.setattr(grammar, "VERDICTS_KEPT", 2)
    monkeypatch.setattr(grammar, "_VERDICTS", type(grammar._VERDICTS)())
    first, second, third = (regex_grammar(f"[a-f]{{3}}-kept-{i}") for i in range(3))
    for text in (first, second, first, third, first, third):
        assert grammar.grammar_error(text, llt) is None
    assert compiled == [first, second, third]  # `second`, the least recently used, went for `third`
    assert grammar.grammar_error(second, llt) is None and compiled[-1] == second


def test_a_token_the_grammar_forbids_is_refused_not_taken(tok, llt):
    """A slot resumed after tokens its grammar refuses (a recompute, a continuation) fails as grammar_error rather
    than go on from a matcher that took them: the mesh retires it on this ValueError."""
    from model.grammar import regex_grammar
    grammar = regex_grammar("[0-9]+")
    with pytest.raises(ValueError, match="breaks the grammar"):
        GrammarCache(llt).new_state(grammar, tok.encode("12x"))
    state = GrammarCache(llt).new_state(grammar, tok.encode("12"))
    with pytest.raises(ValueError, match="breaks the grammar"):
        state.accept(tok.encode("x")[0])


def _nested_tool(name: str, city_type: str = "string") -> dict:
    """What openai.pydantic_function_tool makes of a model with a nested one: "#/$defs/..." pointers."""
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"home": {"$ref": "#/$defs/Addr"}}, "required": ["home"],
        "$defs": {"Addr": {"type": "object", "properties": {"city": {"type": city_type}}, "required": ["city"]}}}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_a_forced_call_resolves_a_tools_defs(tok, llt, tool_choice):
    grammar = constraint_for(chat(tools=[_nested_tool("f"), TIME], tool_choice=tool_choice), lambda: llt).grammar
    assert accepts(llt, tok, grammar, '{"name": "f", "parameters": {"home": {"city": "Oslo"}}}')
    assert not accepts(llt, tok, grammar, '{"name": "f", "parameters": {"home": {"city": 5}}}')


@pytest.mark.parametrize("strict", [False, True])
def test_a_forced_calls_arguments_are_an_object_when_the_schema_names_no_type(tok, llt, strict):
    """OpenAI's `parameters` is an object schema and clients parse `arguments` as one; a schema giving only
    `properties` let a forced call's arguments be null or a number."""
    tool = {"type": "function", "function": {"name": "a", "strict": strict,
                                             "parameters": {"properties": {"x": {"type": "integer"}}}}}
    grammar = constraint_for(chat(tools=[tool], tool_choice="required"), lambda: llt).grammar
    assert accepts(llt, tok, grammar, '{"name": "a", "parameters": {"x": 3}}')
    for arguments in ("null", "77777777", '"x"', "[]"):
        assert not accepts(llt, tok, grammar, '{"name": "a", "parameters": %s}' % arguments)
    assert not accepts(llt, tok, grammar, '{"name": "a", "parameters": {"x": 3, "y": 1}}')  # closed either way


def test_two_tools_defining_one_name_differently_is_a_400(llt):
    with pytest.raises(APIError) as caught:
        constraint_for(chat(tools=[_nested_tool("f"), _nested_tool("g", "integer")], tool_choice="required"),
                       lambda: llt)
    assert caught.value.status == 400 and "$defs/Addr" in caught.value.info.message


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields, admitted", [
    ({"structured_outputs": {"json": SCHEMA}}, [True, True, True, False]),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}, [False, True, False, False]),
    ({"guided_json": SCHEMA, "guided_whitespace_pattern": " "}, [True, True, False, False]),
    ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": " "}}, [True, True, False, False]),
    ({"structured_outputs": {"json": {**SCHEMA, "additionalProperties": True}}}, [True, True, True, True]),
    ({"response_format": {"type": "json_object"}, "guided_whitespace_pattern": " "}, [True, True, False, True]),
])
def test_vllm_json_options_shape_the_grammar(tok, llt, fields, admitted):
    texts = ['{"a": 1}', '{"a":1}', '{\n"a": 1}', '{"a": 1, "b": 2}']
    grammar = constraint_for(chat(**fields), lambda: llt).grammar
    assert [accepts(llt, tok, grammar, text) for text in texts] == admitted


@pytest.mark.parametrize("fields", [{"structured_outputs": {"json": True}}, {"guided_json": True},
                                    {"guided_json": "true"}])
def test_the_schema_true_admits_any_json_value_not_only_objects(tok, llt, fields):
    grammar = constraint_for(chat(**fields), lambda: llt).grammar
    assert [accepts(llt, tok, grammar, text) for text in ['{"a": 1}', "1", '"x"', "[null]", "x"]] \
        == [True, True, True, True, False]


@pytest.mark.parametrize("fields", [
    {"structured_outputs": {"disable_any_whitespace": True}},
    {"structured_outputs": {"json": SCHEMA, "regex": "a"}},
    # vLLM's StructuredOutputsParams refuses options without a constraint of its own: they do not shape
    # response_format's JSON (use guided_whitespace_pattern for that)
    {"response_format": {"type": "json_object"}, "structured_outputs": {"disable_any_whitespace": True}},
    {"guided_json": SCHEMA, "structured_outputs": {"disable_additional_properties": True}},
])
def test_structured_outputs_options_without_one_constraint_are_a_400(llt, fields):
    with pytest.raises(APIError) as caught:
        constraint_for(chat(**fields), lambda: llt)
    assert caught.value.status == 400 and caught.value.info.param == "structured_outputs"


@pytest.mark.parametrize("fields, message", [
    ({"guided_regex": "(("}, 'guided_regex: at 1(8): invalid regex "((" (in regex): regex parse error: unclosed group'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(("}}}}, "response_format.json_schema.schema: regex parse error: unclosed group"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
     "response_format.json_schema.schema: the constraint admits no text (llguidance: NoExtensionBias)"),
    # llguidance's hint names a compile option of its own, which no request can set
    ({"guided_json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}},
     "guided_json: oneOf whose branches may overlap cannot be enforced (one whose branches differ in a const or "
     "type can, as can anyOf)"),
])
def test_a_grammar_error_says_what_is_wrong(llt, fields, message):
    with pytest.raises(APIError) as caught:
        constraint_for(chat(**fields), lambda: llt)
    assert caught.value.info.message == message


# Fields of pydantic models (model_json_schema) that llguidance lacks a keyword or format for: set[str] (uniqueItems),
# bytes (format "binary"), dict[Literal["x", "y"], int] (propertyNames); a property named like the keyword is not one.
_UNIQUE = {"type": "array", "uniqueItems": True}
_PYDANTIC_REFUSED = {"type": "object", "required": ["uniqueItems", "tags"], "properties": {
    "uniqueItems": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    "$defs": {"Scores": {"type": "object", "additionalProperties": {"type": "integer"},
                         "propertyNames": {"enum": ["x", "y"]}}}}


@pytest.mark.parametrize("fields, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _PYDANTIC_REFUSED}}},
     'response_format.json_schema.schema: Unimplemented keys: ["uniqueItems"] (at properties.tags)'),
    ({"structured_outputs": {"json": json.dumps({**_PYDANTIC_REFUSED, "properties": {
        "b": {"anyOf": [{"type": "null"}, {"type": "string", "format": "binary"}]}}})}},
     "structured_outputs.json: Unknown format: binary (at properties.b.anyOf.1)"),
    ({"guided_json": {"type": "object", "properties": {"s": {"$ref": "#/$defs/Scores"}},
                      "$defs": _PYDANTIC_REFUSED["$defs"]}},
     'guided_json: Unimplemented keys: ["propertyNames"] (at $defs.Scores)'),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": _PYDANTIC_REFUSED}}],
      "tool_choice": "required"},
     'tools.1.function.parameters: Unimplemented keys: ["uniqueItems"] (at properties.tags)'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}},
     'response_format.json_schema.schema: Unimplemented keys: ["uniqueItems"] (at the top of the schema)'),
    # llguidance compiles a $def only where a $ref reaches it: an unused one, first, was named in place of `x`
    ({"guided_json": {"$defs": {"Unused": _UNIQUE, "Used": {"$ref": "#/$defs/Tags"}, "Tags": _UNIQUE},
                      "type": "object", "properties": {"s": {"type": "string"}, "x": {"$ref": "#/$defs/Used"}}}},
     'guided_json: Unimplemented keys: ["uniqueItems"] (at $defs.Tags)'),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "string"}, "x": _UNIQUE},
                      "$defs": {"U": _UNIQUE}}},
     'guided_json: Unimplemented keys: ["uniqueItems"] (at properties.x)'),
    ({"guided_json": {"$defs": {"a/b": _UNIQUE, "c d": _UNIQUE}, "type": "object", "properties": {
        "x": {"$ref": "#/%24defs/c%20d"}}}},  # a $ref is a JSON pointer in a URI fragment
     'guided_json: Unimplemented keys: ["uniqueItems"] (at $defs.c d)'),
    # the fragment is decoded before it is split (RFC 6901 6., as llguidance reads it): %2F is a `/` between names
    ({"guided_json": {"$defs": {"a/b": _UNIQUE, "a": {"b": _UNIQUE}}, "type": "object", "properties": {
        "x": {"$ref": "#/$defs/a%2Fb"}}}},
     'guided_json: Unimplemented keys: ["uniqueItems"] (at $defs.a.b)'),
    ({"guided_json": {"$defs": {"T": {"anyOf": [{"type": "string"}, _UNIQUE]}}, "type": "object",
                      "properties": {"x": {"$ref": "#/$defs/T/anyOf/1"}}}},
     'guided_json: Unimplemented keys: ["uniqueItems"] (at $defs.T.anyOf.1)'),
    # the first place in the schema's order, in an allOf's branch and a draft-07 tuple's `items` too
    ({"guided_json": {"type": "object", "properties": {"a": _UNIQUE, "b": _UNIQUE}}},
     'guided_json: Unimplemented keys: ["uniqueItems"] (at properties.a)'),
    ({"guided_json": {"allOf": [{"type": "object"}, {"properties": {"t": _UNIQUE}}]}},
     'guided_json: Unimplemented keys: ["uniqueItems"] (at allOf.1.properties.t)'),
    ({"guided_json": {"type": "array", "items": [{"type": "string"}, _UNIQUE]}},
     'guided_json: Unimplemented keys: ["uniqueItems"] (at items.1)'),
    # the format refused, not the first format given
    ({"guided_json": {"type": "object", "properties": {"d": {"type": "string", "format": "date-time"},
                                                       "b": {"type": "string", "format": "binary"}}}},
     "guided_json: Unknown format: binary (at properties.b)"),
])
def test_a_keyword_the_engine_lacks_is_refused_where_it_sits(llt, fields, message):
    """vLLM's default backend refuses these too (xgrammar declines them, then llguidance, strict, refuses them;
    vllm/sampling_params.py _validate_structured_outputs), but llguidance's message names no place: in a model of
    many fields, the 400 says which one to change."""
    with pytest.raises(APIError) as caught:
        constraint_for(chat(**fields), lambda: llt)
    assert caught.value.info.message == message


def test_looking_for_where_a_keyword_sits_ends_on_ref_cycles():
    """$refs may name the schema they sit in: each subschema is looked in once, and a keyword found nowhere (where
    the look does not go: `dependencies`) leaves the message as llguidance gave it."""
    from deployments.structured import _located

    error = 'Unimplemented keys: ["uniqueItems"]'
    schema = {"$ref": "#", "properties": {"a": {"$ref": "#/properties/a"}, "b": {"$ref": "#/$defs/B"}},
              "$defs": {"B": {"items": {"$ref": "#/$defs/B"}}}, "dependencies": {"a": _UNIQUE}}
    assert _located(error, schema) == error


def test_where_a_keyword_sits_is_cut_as_the_rest_of_the_message(llt):
    """A place is the client's property names: a long one is cut to its ends as any text of theirs quoted back."""
    name = "p" * 5000
    with pytest.raises(APIError) as caught:
        constraint_for(chat(guided_json={"type": "object", "properties": {name: _UNIQUE}}), lambda: llt)
    message = caught.value.info.message
    assert message.startswith('guided_json: Unimplemented keys: ["uniqueItems"] (at properties.ppp')
    assert message.endswith("ppp)") and len(message) < 500, len(message)


@pytest.mark.parametrize("tool_choice", [None, "auto", "none"])
def test_a_tool_schema_that_constrains_nothing_is_not_compiled(llt, tool_choice):
    """Without a forced call, schemas only go into the prompt (as vLLM): keywords llguidance lacks (pydantic's
    uniqueItems for a set) or even a bad type do not refuse the request."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}},
             {"type": "function", "function": {"name": "g", "parameters": {
                 "type": "object", "properties": {"x": {"type": "nope"}}}}}]
    assert constraint_for(chat(tools=tools, tool_choice=tool_choice), lambda: llt).grammar is None


def test_tool_modes(llt):
    assert constraint_for(chat(), lambda: llt).tool_mode == "none"
    auto = constraint_for(chat(tools=[WEATHER]), lambda: llt)
    assert (auto.tool_mode, auto.grammar) == ("auto", None)
    assert constraint_for(chat(tools=[WEATHER], tool_choice="none"), lambda: llt).tool_mode == "none"
    assert constraint_for(CompletionRequest.model_validate({"prompt": "x", "guided_regex": "a"}), lambda: llt).grammar


def test_llama3_json_calls_are_parsed_and_anything_else_is_content():
    names = ["get_weather", "get_time"]

    def calls_in(answer: str):  # the server's path for a whole answer
        return answer_calls(answer, names, forced=False)[0]

    (call,) = calls_in(' {"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    two = calls_in('<|python_tag|>{"name": "get_time", "arguments": {}}; '
                   '{"name": "get_weather", "parameters": {"city": "Rome", "days": 2}}')
    assert [c.name for c in two] == ["get_time", "get_weather"]
    assert calls_in("The weather is fine.") is None
    assert calls_in('{"name": "unknown_tool", "parameters": {}}') is None
    assert calls_in('{"answer": 42}') is None
    assert calls_in('{"name": "get_time", "description": "the time"}') is None  # names, calls not
    # an answer that begins with calls is calls: what follows the last one that parses is dropped, as a stream must
    (first,) = calls_in('{"name": "get_time", "parameters": {}} and then text')
    assert first.name == "get_time"
    assert [c.name for c in calls_in('{"name": "get_time", "parameters": {}}; <|python_tag|>'
                                     '{"name": "get_time", "parameters": {}}; {"name": "nope"}')] == [
        "get_time", "get_time"]


def test_tools_and_tool_history_reach_a_template_that_cannot_render_them(tok):
    messages = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}).messages
    rendered = render_messages(messages, [Tool.model_validate(WEATHER)], tok.template_takes_tools)
    assert not tok.template_takes_tools and rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert json.loads(rendered[2]["content"]) == {"name": "get_weather", "parameters": {"city": "Oslo"}}
    assert rendered[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert "sunny" in tok.render_chat(rendered)


def test_tools_join_the_clients_own_system_message_for_a_template_that_cannot_render_them():
    """One system turn, the tools' description first and the client's instructions last, so a template that writes a
    system turn of its own where the first message is none (SmolLM2's) keeps one; each tool is described by the fields
    it gives only, no `"description": null`."""
    messages = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What time is it?"}]}).messages
    rendered = render_messages(messages, [Tool.model_validate(TIME)], template_takes_tools=False)
    assert [m["role"] for m in rendered] == ["system", "user"]
    described, own = rendered[0]["content"].rsplit("\n\n", 1)
    assert own == "Be brief."
    assert described.endswith("\n\n" + json.dumps(TIME["function"]))


def test_a_template_that_renders_tools_gets_the_ids_that_pair_results_with_calls():
    """vLLM hands the template each message's name, tool_call_id and its calls' ids: Llama 3's templates read none,
    but Mistral's and Qwen's pair a result with its call by them. They were dropped."""
    messages = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Oslo?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}).messages
    rendered = render_messages(messages, [Tool.model_validate(WEATHER)], True)
    assert rendered[0] == {"role": "user", "content": "Weather in Oslo?", "name": "ann"}
    assert rendered[1]["tool_calls"] == [{"id": "c1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert rendered[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


@pytest.mark.parametrize("takes_tools", [False, True])
def test_only_an_assistant_turn_calls_and_only_a_tool_turn_answers_a_call(takes_tools):
    """A user turn carrying `tool_calls` had its text replaced by the calls' JSON (or, for a template that renders
    tools, became a turn of calls: Llama 3's templates write any message with tool_calls as the assistant's), and
    `tool_call_id` went through on any turn. vLLM takes calls from an assistant turn only, and the id from a tool
    turn only (chat_utils._parse_chat_message_content); elsewhere both are ignored."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Oslo?", "tool_calls": [call], "tool_call_id": "c0"},
        {"role": "system", "content": "Be brief.", "tool_calls": [call]}]}).messages
    assert render_messages(messages, None, takes_tools) == [{"role": "user", "content": "Weather in Oslo?"},
                                                             {"role": "system", "content": "Be brief."}]


@pytest.mark.parametrize("strict", [None, False, True])
def test_a_json_schema_takes_no_property_it_does_not_list_strict_or_not(tok, llt, strict):
    """As vLLM's default backend compiles it (xgrammar's strict_mode, on by default): Instructor's and
    LangChain's plain models come without `strict` or `additionalProperties`, and a small model filled the answer
    with invented keys up to max_tokens. An object that says `additionalProperties` keeps it."""
    person = {"type": "object", "properties": {"name": {"type": "string"},
                                               "pet": {"type": "object", "properties": {"kind": {"type": "string"}}}}}
    fmt = {"name": "p", "schema": person, **({} if strict is None else {"strict": strict})}
    grammar = constraint_for(chat(response_format={"type": "json_schema", "json_schema": fmt}), lambda: llt).grammar
    extra = '{"name": "a", "pet": {"kind": "cat", "age": 3}}'
    assert not accepts(llt, tok, grammar, extra)
    assert accepts(llt, tok, grammar, '{"name": "a", "pet": {"kind": "cat"}}')
    open_pet = {**person, "properties": {**person["properties"], "pet": {**person["properties"]["pet"],
                                                                          "additionalProperties": True}}}
    fmt = {"name": "p", "schema": open_pet, **({} if strict is None else {"strict": strict})}
    grammar = constraint_for(chat(response_format={"type": "json_schema", "json_schema": fmt}), lambda: llt).grammar
    assert accepts(llt, tok, grammar, extra) and not accepts(llt, tok, grammar, '{"name": "a", "x": 1}')
    tool = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    forced = constraint_for(chat(tools=[tool], tool_choice="required"), lambda: llt).grammar
    assert not accepts(llt, tok, forced, '{"name": "get_weather", "parameters": {"city": "Oslo", "x": 1}}')


@pytest.mark.timeout(60)
def test_closing_a_deep_strict_schema_is_linear(tok, llt):
    """Each level was closed twice (its `properties` map as a schema, then each property): 2**depth visits, so
    a strict json_schema 25 deep held an ingress thread at 100% CPU for good, and four of them starved the
    pool that tokenizes every long prompt."""
    schema = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    grammar = constraint_for(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "deep", "schema": schema, "strict": True}}), lambda: llt).grammar
    assert accepts(llt, tok, grammar, '{"a": ' * 40 + '"x"' + '}' * 40)
    assert not accepts(llt, tok, grammar, '{"a": ' * 39 + '{"a": "x", "b": 1}' + '}' * 39)
    level = closed(schema)
    for _ in range(40):
        assert level["additionalProperties"] is False
        level = level["properties"]["a"]
    assert level == {"type": "string"}


def test_closing_a_schema_leaves_its_data_alone():
    """`default`, `const`, `enum` and `examples` are values, not schemas: nothing is added inside them."""
    value = {"type": "object", "properties": {"k": 1}}
    schema = {"type": "object", "properties": {"p": {"type": "object", "default": value, "const": value,
                                                     "examples": [value], "enum": [value]}},
              "items": {"type": ["object", "null"]}, "anyOf": [{"properties": {}}, True]}
    out = closed(schema)
    p = out["properties"]["p"]
    assert p["default"] == p["const"] == p["examples"][0] == p["enum"][0] == value
    assert p["additionalProperties"] is False and out["additionalProperties"] is False
    assert out["items"]["additionalProperties"] is False and out["anyOf"] == [{"properties": {},
                                                                             "additionalProperties": False}, True]


def test_closing_leaves_combined_and_negated_schemas_open(tok, llt):
    """Closed alone, each branch of an allOf refused the properties the others list ({a} and {b} made {a, b}
    impossible: a strict tool's call could never be made), and a closed `not` forbade less than it said."""
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                      {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}],
            "not": {"type": "object", "properties": {"c": {}}, "required": ["c"]}}
    out = closed(both)
    assert out["allOf"] == both["allOf"] and out["not"] == both["not"]
    both.pop("not")  # llguidance implements no `not`
    grammar = constraint_for(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "both", "schema": both, "strict": True}}), lambda: llt).grammar
    assert accepts(llt, tok, grammar, '{"a": "x", "b": 1}')


def test_a_forced_call_cut_off_by_max_tokens_is_still_a_call():
    from deployments.tool_calls import ToolCallStream, cut_call
    names = ["get_weather"]
    call = cut_call('{"name": "get_weather", "parameters": {"city": "Os', names)
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Os')
    stream = ToolCallStream(names, forced=True)
    assert stream.feed('{"name": "get_weather", "param', final=False) == ("", [], False)
    content, pieces, whole = stream.feed('eters": {"ci', final=True)
    assert content == "" and not whole and pieces[0].name == "get_weather"  # a call, cut: no "tool_calls" finish
    assert "".join(p.arguments for p in pieces) == '{"ci'
    # cut inside its name: the tool whose name it began, not simply the first tool
    names = ["get_time", "get_weather"]
    assert cut_call('{"name": "get_wea', names).name == "get_weather"
    # cut before any name was written (tool_choice "required"): the first tool, as the stream names it too
    assert cut_call('{"na', names).name == "get_time"


def test_a_forced_call_cut_before_its_arguments_has_none_on_both_paths():
    """Cut before its arguments' key, a call has no arguments written: "" (no JSON to run, as the "length" finish
    says), not an empty object the client would take for a whole call's, whole or streamed."""
    from deployments.tool_calls import cut_call
    text = '{"name": "get_weather", '
    assert cut_call(text, ["get_weather"]).arguments == ""
    _, pieces, whole = ToolCallStream(["get_weather"], forced=True).feed(text, final=True)
    assert [(p.name, p.arguments) for p in pieces] == [("get_weather", "")] and not whole


def test_a_call_cut_in_its_head_names_the_tool_it_wrote():
    """The name was read as raw text up to its first quote: a name written whole that begins another tool's name,
    or one holding a JSON escape (a quote, a backslash: a name is any text), was reported as another tool."""
    from deployments.tool_calls import cut_call
    names = ["get_time_zone", "get_time", 'say "hi"', "a\\b"]
    assert cut_call('{"name": "get_time", "par', names).name == "get_time"
    assert cut_call('{"name": "say \\"h', names).name == 'say "hi"'
    assert cut_call('{"name": "a\\\\', names).name == "a\\b"
    assert cut_call('{"name": "get_ti', names).name == "get_time_zone"  # begun only: the first it may be


@pytest.mark.parametrize("forced", [False, True])
def test_a_call_cut_after_whitespace_keeps_it_on_both_paths(forced):
    """max_tokens cut a call's arguments just after a space or newline: the stream had sent it, and the whole
    answer (and so /v1/responses' function_call item) left it out, so the two differed for one greedy request."""
    from deployments.tool_calls import ToolCallStream, answer_calls
    names = ["get_weather"]
    text = '{"name": "get_weather", "parameters": {"city": "Oslo", \n'
    (whole,), _ = answer_calls(text, names, forced)
    _, pieces, _ = ToolCallStream(names, forced).feed(text, final=True)
    assert whole.arguments == "".join(p.arguments for p in pieces) == '{"city": "Oslo", \n'


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
@pytest.mark.parametrize("forced", [False, True])
def test_streamed_calls_piece_together_to_the_answers_calls(step, forced):
    """However the text arrives, the pieces make the calls that the whole answer makes (names once, first;
    arguments as generated, with brackets and quotes inside strings, escapes, and the python tag)."""
    from deployments.tool_calls import ToolCallStream, answer_calls
    names = ["get_weather", "get_time"]
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "O\\"s{l}o[", "days": 2}}; '
            '{"name":"get_time","arguments":{ }}')
    stream = ToolCallStream(names, forced=forced)
    calls: dict[int, list] = {}
    for i in range(0, len(text), step):
        content, pieces, called = stream.feed(text[i:i + step], final=i + step >= len(text))
        assert content == "" and called == bool(calls or pieces)
        for p in pieces:
            assert (p.index in calls) == (p.name is None)
            calls.setdefault(p.index, [p.name, ""])[1] += p.arguments
    expected, _ = answer_calls(text, names, forced)
    assert [tuple(c) for c in calls.values()] == [(c.name, c.arguments) for c in expected]  # the same text
    assert [a for _, a in calls.values()] == ['{"city": "O\\"s{l}o[", "days": 2}', "{ }"]  # as generated



@pytest.mark.parametrize("piece", ["abc ", "{ "])
def test_a_streamed_answer_that_may_still_become_a_call_costs_linear_time(piece):
    """An answer that begins as a call's head and goes on (`{"name": "` and a long string, with brackets or not)
    is held while it may still be a call: each token searched the whole held text for a call's head again, so
    8,000 tokens took ~9 s of the event loop's CPU (with no tools, 0.1 s). 8x the text must cost about 8x the
    time, not 64x."""
    from deployments.tool_calls import ToolCallStream
    names = ["get_weather"]

    def cost(pieces: int) -> float:
        stream = ToolCallStream(names, forced=False)
        start = time.process_time()
        for text in ['{"name": "', *[piece] * pieces]:
            assert stream.feed(text, final=False) == ("", [], False)
        return time.process_time() - start

    cost(100)  # warm
    small, large = cost(1500), cost(12000)
    assert large < 24 * small, (small, large)


@pytest.mark.parametrize("names, head", [
    (["x" * 100_000], lambda n: '{"name": "'),  # a long name (any text is one) left the head undecided
    (["get_weather"], lambda n: "{" + " " * (20 * n)),  # whitespace in the head, before its name
    (["get_weather"], lambda n: '{"name": "get_weather"' + " " * (20 * n)),  # ... and after it
])
def test_a_head_that_stays_undecided_costs_linear_time(names, head):
    """While a call's head was neither whole nor impossible, each token bringing a "{" matched it again from its
    start: 2,000 tokens of "{" after 100,000 spaces (a regex constraint beside tool_choice "auto" writes them) took
    2.2 s of the event loop, and 20,000 after `{"name": "` beside a tool named with 400,000 characters (a name is any
    text now) 20 s. Each character is read once: 8x the text costs about 8x the time, not 64x."""
    from deployments.tool_calls import ToolCallStream

    def cost(n: int) -> float:
        stream = ToolCallStream(names, forced=False)
        start = time.process_time()
        for text in [head(n), *["{"] * n]:
            assert stream.feed(text, final=False) == ("", [], False)
        return time.process_time() - start

    cost(100)  # warm
    small, large = cost(500), cost(4000)
    assert large < 24 * small, (small, large)

C = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'


@pytest.mark.parametrize("text", [
    C + " Hope that helps!",  # text after a call: dropped on both paths
    C + '; {"parameters": {}, "name": "get_time"}',  # a second call in another key order: whole, at the end
    '{"name": "get_weather", "parameters": {"city": "Oslo"}, "id": 1}; {"name": "get_time", "parameters": {}}',
    C + '; {"name": "nope", "parameters": {}}',  # an unknown tool after a call: dropped
    C + "; <|python_tag|>" + C,
    "\n <|python_tag|>" + C,  # whitespace before the python tag: a call (vLLM's llama3_json), whole as streamed
    ' {"answer": 42}\n',  # held as it might have been a call, then content: its whitespace too, as generated
    C + "}}}" + C,  # stray braces: the calls stop there, on both paths
    '{"name": "get_weather", "parameters": null}; ' + C,  # arguments that are no object: whole, at the end
    '{"name": "get\\_weather", "parameters": {}}',  # an invalid escape in the name: content, not a 500
    # a call cut by max_tokens after one in another key order (held, not streamed): reported on both paths
    C + '; {"parameters": {}, "name": "get_time"}; {"name": "get_weather", "parameters": {"city": "Os',
    # a call whose object's "}" never came before the next: the calls end at it (no JSON), on both paths
    C[:-1] + "; " + C,
])
def test_a_stream_makes_the_calls_the_whole_answer_makes(text):
    """Split anywhere, the pieces assemble to what the non-streamed answer returns (names and argument values)."""
    from deployments.tool_calls import ToolCallStream, answer_calls
    names = ["get_weather", "get_time"]
    expected, whole = answer_calls(text, names, forced=False)
    for step in (1, 2, 5, len(text)):
        stream = ToolCallStream(names, forced=False)
        content, calls = "", {}
        for i in range(0, len(text), step):
            sent, pieces, called = stream.feed(text[i:i + step], final=i + step >= len(text))
            content += sent
            for p in pieces:
                calls.setdefault(p.index, [p.name, ""])[1] += p.arguments
        if expected is None:
            assert (content, calls) == (text, {}), step
        else:
            assert content == "" and called == whole, step  # whole: every call the answer makes is
            assert [tuple(c) for c in calls.values()] == [(c.name, c.arguments) for c in expected], step


def test_a_json_answer_that_is_no_call_stays_content_in_auto_mode():
    from deployments.tool_calls import ToolCallStream
    stream = ToolCallStream(["get_weather"], forced=False)
    assert stream.feed('{"answer": ', final=False) == ("", [], False)
    assert stream.feed('42}', final=True) == ('{"answer": 42}', [], False)


@pytest.mark.parametrize("pattern, ascii_only", [
    (r"\d{3}", "[0-9]{3}"), (r"[\d.]+", "[0-9.]+"), (r"[^\d]", "[^0-9]"), (r"\D\W", "[^0-9][^0-9A-Za-z_]"),
    (r"\\d", r"\\d"), (r"[]\w]", "[]0-9A-Za-z_]"), (r"a\.b\s", r"a\.b\s"), (r"[^\W_]", "[^[^0-9A-Za-z_]_]"),
    (r"[\w-.]", r"[0-9A-Za-z_\-.]"),
])
def test_perl_classes_become_ascii_and_escapes_stay(pattern, ascii_only):
    assert ascii_perl_classes(pattern) == ascii_only


@pytest.mark.parametrize("schema, admitted, refused", [
    # properties plus an allOf mixin: the mixin's properties stay allowed
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
      "allOf": [{"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, '{"a": 1, "b": 2}', None),
    # properties plus anyOf variants: each variant is a mixin of them, not an object of its own
    ({"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"],
      "anyOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]},
                {"properties": {"y": {"type": "integer"}}, "required": ["y"]}]}, '{"kind": "k", "x": 1}', None),
    # an object that lists no properties is a free-form map (pydantic's dict), its owner still closed
    ({"type": "object", "properties": {"meta": {"type": "object"}}}, '{"meta": {"k": 1}}', '{"meta": {}, "z": 1}'),
    # keys described by patterns only stay as the patterns say
    ({"type": "object", "patternProperties": {"^x_": {"type": "integer"}}}, '{"x_a": 1}', None),
    # a nested model behind $ref closes in $defs
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
      "$defs": {"P": {"type": "object", "properties": {"n": {"type": "string"}}}}},
     '{"p": {"n": "a"}}', '{"p": {"n": "a", "m": 1}}'),
    # OpenAPI's inheritance: a named schema an allOf extends stays open to the extension
    ({"type": "object", "allOf": [{"$ref": "#/$defs/Pet"}, {"properties": {"bark": {"type": "boolean"}},
                                                            "required": ["bark"]}],
      "$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
     '{"name": "rex", "bark": true}', None),
    # a $ref beside properties, and one as an anyOf mixin of them: their targets' properties join those listed
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "$ref": "#/$defs/B",
      "$defs": {"B": {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}}},
     '{"a": "x", "b": 1}', None),
    ({"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"],
      "anyOf": [{"$ref": "#/definitions/X"}], "definitions": {"X": {"properties": {"x": {"type": "integer"}},
                                                                  "required": ["x"]}}},
     '{"kind": "k", "x": 1}', None),
])
def test_closing_a_plain_schema_never_makes_a_valid_answer_impossible(tok, llt, schema, admitted, refused,
                                                                       monkeypatch):
    """Closed alone, an allOf or anyOf branch refused what the object beside it lists: such schemas became 400s
    ("required property is unsatisfiable"), and a tool of them every forced call. (The CPU budget is not what is
    tested here: a forced call's grammar took 117 ms of its 100 once, on a loaded box; test_hostile_input tests it.)"""
    monkeypatch.setattr("model.grammar.MAX_COMPILE_CPU_S", 1.0)
    grammar = constraint_for(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": schema}}), lambda: llt).grammar
    assert accepts(llt, tok, grammar, admitted)
    assert refused is None or not accepts(llt, tok, grammar, refused)
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    forced = constraint_for(chat(tools=[tool], tool_choice="required"), lambda: llt).grammar
    assert accepts(llt, tok, forced, '{"name": "f", "parameters": %s}' % admitted)


# openai.pydantic_function_tool's and pydantic's output for a recursive model: the object is the $ref's target
_NODE = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "required": ["v"], "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}}}


@pytest.mark.parametrize("schema, admitted, refused", [
    ({**_NODE, "type": "object"}, '{"v": 1, "kids": [{"v": 2}]}', '{"v": 1, "w": 2}'),
    ({"type": "object", "anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                  {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     '{"a": 1}', '{"a": 1, "c": 2}'),
])
def test_a_strict_object_that_takes_its_properties_from_a_ref_or_branches_is_closed_there(tok, llt, schema,
                                                                                          admitted, refused):
    """Closed beside its $ref or anyOf, the object took no property at all: a strict tool of a recursive pydantic
    model (a forced call's `parameters` gets "type": "object" beside its $ref; the Responses API's tools are
    strict) was a 400 ("required property 'v' is unsatisfiable"), and one with no required property could only
    ever be called with {}."""
    grammar = constraint_for(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": schema, "strict": True}}), lambda: llt).grammar
    assert accepts(llt, tok, grammar, admitted) and not accepts(llt, tok, grammar, refused)
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": schema}}
    forced = constraint_for(chat(tools=[tool], tool_choice="required"), lambda: llt).grammar
    assert accepts(llt, tok, forced, '{"name": "f", "parameters": %s}' % admitted)
    assert not accepts(llt, tok, forced, '{"name": "f", "parameters": %s}' % refused)


# zod-to-json-schema's pointers (its default $refStrategy "root"): to the schema's root for a recursive one, into
# its properties for one used twice
_LIST = {"type": "object", "required": ["v", "next"], "properties": {
    "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}
_TWICE = {"type": "object", "required": ["from", "to"], "properties": {
    "from": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "to": {"$ref": "#/properties/from"}}}


@pytest.mark.parametrize("schema, admitted, refused", [
    (_LIST, '{"v": 1, "next": {"v": 2, "next": null}}',
     '{"v": 1, "next": {"name": "f", "parameters": {"v": 2, "next": null}}}'),
    (_TWICE, '{"from": {"city": "a"}, "to": {"city": "b"}}', '{"from": {"city": "a"}, "to": {"city": 5}}'),
    # a value that looks like a pointer is data, left as it is
    ({"type": "object", "properties": {"p": {"const": {"$ref": "#"}}}, "required": ["p"]},
     '{"p": {"$ref": "#"}}', '{"p": {"$ref": "#/properties/parameters"}}'),
])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_a_tools_pointers_into_its_own_schema_resolve_in_a_forced_call(tok, llt, schema, admitted, refused,
                                                                       tool_choice):
    """A tool's parameters sit inside the call's schema, where "#" is the call: a recursive tool's arguments had
    to nest calls ({"name": "f", "parameters": ...}) instead of itself, and "#/properties/..." was a 400
    ("Pointer '/properties/from' does not exist"), though the same schema works as a response_format."""
    grammar = constraint_for(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": schema}}), lambda: llt).grammar
    assert accepts(llt, tok, grammar, admitted) and not accepts(llt, tok, grammar, refused)
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    forced = constraint_for(chat(tools=[tool, TIME], tool_choice=tool_choice), lambda: llt).grammar
    assert accepts(llt, tok, forced, '{"name": "f", "parameters": %s}' % admitted)
    assert not accepts(llt, tok, forced, '{"name": "f", "parameters": %s}' % refused)


def test_the_grammar_tokenizer_is_built_once_when_two_threads_ask_at_once(monkeypatch):
    """Outside Serve nothing builds it before the first constrained requests, whose grammar threads may ask together:
    each built one (~0.2-1 s of CPU with the GIL held, a copy of the vocabulary each)."""
    import threading
    from types import SimpleNamespace

    import model.grammar
    from deployments.openai_server import OpenAIServer

    built, entered, second = [], threading.Event(), threading.Event()

    def build(tokenizer):
        built.append(object())
        if len(built) == 1:
            entered.set()
            second.wait(0.5)  # a second build would start meanwhile: it does not wait for the first
        else:
            second.set()
        return built[-1]

    monkeypatch.setattr(model.grammar, "ll_tokenizer", build)
    server = OpenAIServer(None, SimpleNamespace(vocab_size=8), "m")
    got = []
    first = threading.Thread(target=lambda: got.append(server.grammar_tokenizer()))
    first.start()
    entered.wait(10)
    other = threading.Thread(target=lambda: got.append(server.grammar_tokenizer()))
    other.start()
    first.join(10)
    other.join(10)
    assert len(built) == 1 and got == [built[0]] * 2
    assert server.grammar_tokenizer() is built[0]


def test_a_call_that_names_its_tool_after_its_arguments_key_is_a_call():
    """A call whose keys come in another order (arguments first) is read by json whole, and "arguments" is taken
    for "parameters" there too, as vLLM's llama3_json takes either key: whole and streamed, it is a call."""
    text = '{"arguments": {"city": "Oslo"}, "name": "get_weather"}'
    (call,), whole = answer_calls(text, ["get_weather"], forced=False)
    assert (call.name, json.loads(call.arguments), whole) == ("get_weather", {"city": "Oslo"}, True)
    stream = ToolCallStream(["get_weather"], forced=False)
    content, pieces, whole = stream.feed(text, final=True)
    assert content == "" and whole and [(p.name, json.loads(p.arguments)) for p in pieces] == [
        ("get_weather", {"city": "Oslo"})]


def test_a_call_in_another_key_order_keeps_its_non_ascii_arguments_as_text():
    """Re-serialized, its arguments keep "Zürich" as written (vLLM's llama3_json dumps with ensure_ascii=False), not
    as \\u escapes that a client comparing or showing the text sees."""
    (call,), _ = answer_calls('{"parameters": {"city": "Zürich"}, "name": "get_weather"}', ["get_weather"], False)
    assert call.arguments == '{"city": "Zürich"}'


def test_a_call_with_an_arguments_key_streams_as_it_is_written():
    """vLLM's llama3_json takes "arguments" for "parameters"; a call written so streams its name and arguments as
    they come too, not held back to be sent whole at the end of the answer."""
    stream = ToolCallStream(["get_weather"], forced=False)
    content, pieces, _ = stream.feed('{"name": "get_weather", "arguments": {"city": "Os', final=False)
    assert content == "" and [(p.name, p.arguments) for p in pieces] == [("get_weather", '{"city": "Os')]


@pytest.mark.parametrize("name, written", [('say "hi"', 'say \\"hi\\"'), ("get", "\\u0067\\u0065\\u0074")])
def test_a_call_whose_name_holds_json_escapes_streams_as_it_is_written(name, written):
    """A name is any text, and JSON may escape any of it: such a call streams its name and arguments token by token
    too, not held back to be sent whole at the end of the answer."""
    stream = ToolCallStream([name], forced=False)
    pieces = [p for c in '{"name": "' + written + '", "parameters": {"city": "Os'
              for p in stream.feed(c, final=False)[1]]
    assert [(p.index, p.name) for p in pieces[:1]] == [(0, name)]
    assert "".join(p.arguments for p in pieces) == '{"city": "Os'


def test_calls_in_the_history_are_rendered_back_as_the_model_writes_them(tok):
    """A template that cannot render tool_calls gets an assistant turn's calls as the Llama 3 JSON the model itself
    writes: "; " between calls, and empty arguments as {} (an object, as vLLM reads them), so it sees its own
    convention."""
    messages = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]}]}).messages
    rendered = render_messages(messages, None, template_takes_tools=False)
    assert rendered[1]["content"] == ('{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                                      '{"name": "get_time", "parameters": {}}')
