"""The OpenAI wire format the ingress speaks (the subset vLLM's server accepts for text models).

Requests are strict: a wrong JSON type is a 400 naming the field, never a silent coercion ("10" is not
an int, "yes" is not a bool). An explicit `null` means the field's default (many SDKs send nulls), but for a
completion's max_tokens, whose null vLLM reads as the context left. Unknown
fields are ignored, as OpenAI clients send vendor extras; a known OpenAI field this server does not
implement is refused naming it, never silently ignored.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from typing_extensions import TypedDict

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, StringConstraints,
                      ValidationInfo, field_validator, model_serializer, model_validator)
from pydantic_core import PydanticCustomError

from scheduler.sampling import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MIN_REPETITION_PENALTY, SamplingParams

MAX_N = 16  # choices per request; each one is a separate router request
MAX_BATCH_CHOICES = 256  # a batch of completion prompts: prompts x n router requests at most
# Bounds on what a request carries to the router and the mesh, so no request can cost them unbounded memory
# or time. Stop strings are matched in the ingress, but each one makes every token's check longer and holds
# back that many characters of the stream; OpenAI allows 4, vLLM any number: 16 covers templated agents.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256  # the mesh checks every sampled token against them
# allowed_token_ids: more than any vocabulary served holds (Llama 3's has 128,256 ids), so a longer list only
# repeats ids; unbounded, an 8 MiB body's 2.6M were checked and sorted on the event loop (~0.3-0.5 s)
MAX_ALLOWED_TOKEN_IDS = 131_072
MAX_BAD_WORDS = 128  # the mesh host matches each against the answer's end at every step
MAX_SALT_CHARS = 256  # kept with the request in the router and hashed into its prefix blocks
MAX_TOOLS = 128  # OpenAI's limit on `tools`
MAX_LOC_CHARS = 200  # a field's name, a key or other text of the client's, as an error's param and message quote it
MAX_CHOICES = 256  # vLLM's guided `choice` strings
# repetition_detection's longest pattern: its check costs the ingress O(max_pattern_size) numpy work per token
MAX_PATTERN_SIZE = 4096
# vLLM's stream_interval: no answer is longer than the longest context (128k tokens), past which any interval is the
# same stream (its first and last chunks)
MAX_STREAM_INTERVAL = 131_072
# transformers' apply_chat_template arguments and what the request sets: not chat_template_kwargs
TEMPLATE_ARGUMENTS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt",
                                "continue_final_message", "tokenize", "chat_template", "return_dict", "padding",
                                "truncation", "max_length", "return_tensors", "tokenizer_kwargs",
                                "return_assistant_tokens_mask"})


def _check_unicode(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which Python keeps but UTF-8 cannot encode: the
    tokenizer and the prefix hash would raise on them far from the request."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_check_unicode)]

T = TypeVar("T")
# A request's list stops at its first invalid item (pydantic's fail_fast): pydantic, then FastAPI, turn every item's
# error into a Python dict on the event loop (~10 us each), so 200,000 wrong items (400 KB) stood every stream of the
# replica still for 2 s, and an 8 MiB body 40 s and GBs, for a 400 that names the first one only. Lists with a
# max_length need none: pydantic stops at the length.
Items = Annotated[list[T], Field(fail_fast=True)]


def _check_json_unicode(value: Any) -> Any:
    """_check_unicode for every string of a free-form JSON value, keys included (a schema's text is
    serialized again for the grammar engine and the chat template)."""
    if isinstance(value, str):
        _check_unicode(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_json_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_json_unicode(item)
    return value


def _check_unicode_first(value: Any) -> Any:
    """_check_unicode before a length constraint, whose own error for a lone surrogate says only "unable to
    parse raw data as a unicode string"."""
    return _check_unicode(value) if isinstance(value, str) else value


def short_text(max_length: int, min_length: int | None = None) -> Any:
    """Text of at most `max_length` characters (and at least `min_length`), a lone surrogate refused first
    (_check_unicode_first)."""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length),
                     BeforeValidator(_check_unicode_first)]


def quoted(text: str) -> str:
    """A client's text (a model's or tool's name, a type) as an error quotes it: its first MAX_LOC_CHARS characters.
    Quoted whole, an 8 MiB `model` made an 8 MiB 404."""
    return text if len(text) <= MAX_LOC_CHARS else text[:MAX_LOC_CHARS] + "..."


Salt = short_text(MAX_SALT_CHARS, min_length=1)  # vLLM refuses an empty salt too
Json = Annotated[JsonValue, AfterValidator(_check_json_unicode)]
JsonObject = Annotated[dict[str, JsonValue], AfterValidator(_check_json_unicode)]


def _not_an_object(schema: Any) -> bool:
    """Whether a JSON schema surely admits no object: a `type` other than "object", a constant, an array's
    keywords, an allOf with such a branch, or an anyOf / oneOf of only such branches. A `$ref` (pydantic's
    root for a recursive model) may point to an object and passes."""
    if not isinstance(schema, dict):
        return False
    if "type" in schema:
        return schema["type"] != "object"
    if {"const", "enum", "items", "prefixItems"} & set(schema):
        return True
    if any(_not_an_object(branch) for branch in schema.get("allOf") or ()):
        return True
    return any(branches and all(_not_an_object(b) for b in branches)
               for branches in (schema.get("anyOf"), schema.get("oneOf")) if isinstance(branches, list))


def _template_variables_only(cls, v: dict | None) -> dict | None:
    reserved = sorted(set(v or ()) & TEMPLATE_ARGUMENTS)
    if reserved:
        raise ValueError(f"{reserved[0]!r} is set by the request itself, not a template variable")
    return v


def _continue_alone(cls, v: bool, info: ValidationInfo) -> bool:
    """vLLM's (and transformers') rule: the final message is continued, or an assistant header is added, not both."""
    if v and info.data.get("add_generation_prompt", True):
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true: set "
                         "add_generation_prompt to false to continue the final message")
    return v


def refused(why: str) -> Any:
    """A known field this endpoint does not take: any value but null is a 400 naming it, saying `why`."""
    def refuse(value: Any) -> Any:
        raise PydanticCustomError("unsupported", why)
    return Annotated[JsonValue, AfterValidator(refuse)]


# Known fields the server does not implement, refused in more than one request: any value but null is a 400
# naming the field and saying why.
NoCustomCode = refused("it carries arguments for custom logits processors, which are not loaded here")
NotDisaggregated = refused("disaggregated serving (prefill or encoder caches handed between servers) is not "
                           "implemented here")
NoStructuralTag = refused("structural tags are not implemented here: use a json schema, regex, choice or grammar")
NotReasoning = refused("this model does not reason: there is no reasoning to configure")
NoDocuments = refused("documents are not handed to the chat template here: put them in the messages")
# OpenAI's `moderation` (chat and Responses): a moderation model's scores, or its block of the input or answer
NoModeration = refused("this server runs no moderation model: nothing would be scored or blocked")
# vLLM's request chat template, which it too refuses unless started with --trust-request-chat-template
RequestTemplate = refused("a request's own chat template is not taken (vLLM takes one only with "
                          "--trust-request-chat-template): the model's template renders the messages")


def only(value: bool | int, why: str) -> Any:
    """A field this server takes at one value (`value`, its default) only: any other is a 400 saying `why`."""
    def check(v):
        if v != value:
            raise PydanticCustomError("unsupported", f"only {str(value).lower()} is taken: {why}")
        return v
    return Annotated[type(value), AfterValidator(check)]


def _nullable_schema(schema: dict[str, Any], _cls: type) -> None:
    """The OpenAPI schema says what the validator does: every optional field also takes null."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or prop.get("type") == "null" or {"type": "null"} in prop.get("anyOf", ()):
            continue
        meta = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **meta}


class RequestModel(BaseModel):
    """A request body, or part of one: strict types (as OpenAI's API checks them), unknown fields ignored (as
    vLLM ignores them), null as the field's default."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, json_schema_extra=_nullable_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`"temperature": null` means the default temperature, as OpenAI's API and SDKs treat it."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk (benchmarks count tokens with it)


class RepetitionDetection(RequestModel):
    """vLLM's `repetition_detection` (vllm/sampling_params.py, RepetitionDetectionParams): the answer ends, with
    finish_reason "repetition", once its last tokens are one pattern of min_pattern_size..max_pattern_size tokens
    (0: 1) repeated min_count times back to back. max_pattern_size 0 turns it off."""

    max_pattern_size: int = Field(0, ge=0, le=MAX_PATTERN_SIZE)
    min_pattern_size: int = Field(0, ge=0)
    min_count: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _vllms_rules(self):
        if self.min_pattern_size > self.max_pattern_size:
            raise PydanticCustomError("value_error", "min_pattern_size must be at most max_pattern_size (set both to "
                                                     "0 to turn repetition detection off)")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise PydanticCustomError("value_error", "min_count must be at least 2 to detect a repeated pattern")
        return self


class _GenerationRequest(RequestModel):
    """Fields /v1/chat/completions and /v1/completions share."""

    model: Text | None = None  # None: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's: a stream's chunk of a choice waits for this many new tokens (its first and last go at once)
    stream_interval: int = Field(1, ge=1, le=MAX_STREAM_INTERVAL)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's: drop tokens less likely than min_p x the likeliest
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # int64, as vLLM and OpenAI take
    stop: str | Items[str] | None = None
    include_stop_str_in_output: bool = False  # vLLM's
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)  # the ingress checks the range
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # vLLM's: false keeps special tokens' text (e.g. <|im_end|>) in the answer
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's: keep k of the prompt's tokens (-1: to fit)
    truncation_side: Literal["left", "right"] = "left"  # vLLM's: "left" keeps the last k tokens, "right" the first
    # vLLM's: each prompt token's logprob, rank and this many likeliest tokens (a prefill of every position)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    logprob_token_ids: refused("the meshes compute no log-probs of chosen ids: ask for logprobs or top_logprobs"
                               ) | None = None
    repetition_detection: RepetitionDetection | None = None  # vLLM's: end an answer that loops (the ingress sees it)
    # vLLM's: only these may be sampled
    allowed_token_ids: Items[int] | None = Field(None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)
    bad_words: list[Text] | None = Field(None, max_length=MAX_BAD_WORDS)  # vLLM's: words the answer never ends with
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>" (any token is JSON then)
    # vLLM's, for tokenizers that put spaces between special tokens: byte-level BPE (Llama 3's, SmolLM2's) puts
    # none either way, as vLLM's fast detokenizer gives it
    spaces_between_special_tokens: bool = True
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids come with the text
    detokenize: bool = True  # vLLM's: false answers with token ids alone (return_token_ids), text left empty
    priority: only(0, "requests are served in order of arrival (no priority scheduling)") = 0  # vLLM's
    prompt_embeds: refused("this server takes text and token ids, not embeddings") | None = None
    logits_processors: refused("custom logits processors are not loaded here") | None = None
    guided_whitespace_pattern: Text | None = None  # vLLM's: the whitespace a JSON constraint allows (a regex)
    vllm_xargs: NoCustomCode | None = None
    kv_transfer_params: NotDisaggregated | None = None
    ec_transfer_params: NotDisaggregated | None = None
    # vLLM's cap on a reasoning model's thinking; vLLM too refuses it without a reasoning config (-1: unset)
    thinking_token_budget: only(-1, "this model does not reason: it has no thinking to budget") = -1
    # vLLM's: the response's id is "<chatcmpl|cmpl>-<request_id>" (the router's own id stays unique)
    request_id: Salt | None = None
    use_beam_search: only(False, "beam search is not implemented") = False  # vLLM's
    length_penalty: float = 1.0  # vLLM's, for beam search only
    n: int = Field(1, ge=1, le=MAX_N)
    # OpenAI's completions' and vLLM's chat's too (the chat one was ignored: best_of 3 got one sample)
    best_of: int | None = None  # n only (vLLM V1 takes no other): n samples are n choices
    user: Text | None = None  # accepted; the end user's id is not used
    # vLLM's: requests reuse cached prefixes only with the same salt (with API keys, within one key's tenant)
    cache_salt: Salt | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)  # token id -> [-100, 100]
    # Structured outputs (deployments/structured.py compiles them into one grammar): OpenAI's response_format,
    # vLLM's structured_outputs, and vLLM's older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Json | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_grammar: Text | None = None
    structural_tag: NoStructuralTag | None = None  # vLLM's older chat field, as structured_outputs.structural_tag

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, v):
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        for stop in stops:
            if not 0 < len(stop) <= MAX_STOP_CHARS:
                raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
            _check_unicode(stop)
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_at_least_n(cls, v, info: ValidationInfo):
        """OpenAI's and vLLM's rule (vllm/sampling_params.py, _verify_args): best_of counts the candidates n are
        returned from, so fewer than n is a 400, not n choices anyway; more than n would rank them, which vLLM V1
        does not either (best_of equal to n is n samples, as there)."""
        n = info.data.get("n", 1)
        if v is not None and v < n:
            raise ValueError(f"best_of must be greater than or equal to n ({n})")
        if v is not None and v > n:
            raise ValueError(f"ranking several samples on the server is not implemented: best_of must equal n ({n})")
        return v

    @field_validator("bad_words")
    @classmethod
    def _bounded_bad_words(cls, v):
        if any(not word.strip() or len(word) > MAX_STOP_CHARS for word in v or ()):
            raise ValueError(f"bad words must have 1 to {MAX_STOP_CHARS} characters, not only spaces")
        return v

    @field_validator("detokenize")
    @classmethod
    def _stop_strings_need_text(cls, v, info: ValidationInfo):
        if not v and info.data.get("stop"):  # vLLM's rule (SamplingParams._verify_args)
            raise ValueError("stop strings need the answer's text: they cannot be used with detokenize false")
        return v

    @field_validator("length_penalty")
    @classmethod
    def _beam_search_only(cls, v):
        if v != 1.0:
            raise ValueError("length_penalty applies to beam search, which is not implemented")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _positive_or_context(cls, v):
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be at least 1 (or -1: as many as fit with max_tokens)")
        return v

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options can only be given with stream: true")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk: vLLM's continuous_usage_stats, which (as in vLLM) needs include_usage."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field `requested_max_tokens` came from, for errors about it."""
        return "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives to return per token; None: no logprobs at all."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> int | None:
        """How many alternatives the mesh scores each prompt token with; None: the prompt is not scored."""
        return self.prompt_logprobs

    @property
    def prompt_logprobs_param(self) -> str:
        """The field that asks for the prompt's logprobs, for errors about it."""
        return "prompt_logprobs"

    def sampling_params(self, max_tokens: int, stop_token_ids: tuple[int, ...] = (),
                        defaults: Mapping[str, float] | None = None) -> SamplingParams:
        """The scheduler's view. `max_tokens` is resolved by the caller (it knows the prompt length);
        `stop_token_ids` adds the tokenizer's end-of-turn ids unless ignore_eos; `defaults` (the model's
        generation_config, Tokenizer.sampling_defaults) stand in for the sampling fields the request left out or
        sent as null, as vLLM's to_sampling_params takes them (user, then server default, then OpenAI's)."""
        extra = () if self.ignore_eos else stop_token_ids
        unset = {name: value for name, value in (defaults or {}).items() if name not in self.model_fields_set}
        temperature, top_p, top_k, min_p, repetition_penalty = (unset.get(name, getattr(self, name)) for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty"))
        return SamplingParams(
            temperature=temperature, top_p=top_p, top_k=max(top_k, 0), min_p=min_p,
            # -1 is no seed, as in vLLM (vllm/sampling_params.py, __post_init__); others: the int64 as its bits
            seed=None if self.seed in (None, -1) else self.seed % 2**64,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop_strings,
            include_stop_str_in_output=self.include_stop_str_in_output,
            stop_token_ids=tuple(dict.fromkeys([*(self.stop_token_ids or ()), *extra])),
            ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=repetition_penalty,
            logprobs=self.num_logprobs, skip_special_tokens=self.skip_special_tokens, detokenize=self.detokenize,
            allowed_token_ids=self.allowed_token_ids, prompt_logprobs=self.num_prompt_logprobs)


class JsonSchemaFormat(RequestModel):
    name: Text  # any text, as vLLM takes it: libraries send a model's title or class name (`Page[User]`)
    description: Text | None = None
    schema_: JsonObject | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _only_with_its_type(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("type") != "json_schema":
            raise ValueError("json_schema is only for type json_schema")
        return v

    @model_validator(mode="after")
    def _schema_for_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing", "type json_schema needs a `json_schema` object")
        return self


class StructuredOutputs(RequestModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: Json | None = Field(None, alias="json")  # a JSON schema (object, or its text)
    regex: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: Text | None = None  # Lark (`start: ...`), or the EBNF / GBNF of vLLM's docs (`root ::= ...`): cfg_grammar
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens
    whitespace_pattern: Text | None = None  # the whitespace a JSON constraint allows (a regex)
    disable_additional_properties: bool = False  # always so here: every JSON schema is closed (structured.closed)
    disable_fallback: bool = False  # no other grammar engine to fall back on: an error is always an error
    structural_tag: NoStructuralTag | None = None


class FunctionDefinition(RequestModel):
    name: Text  # any text, as vLLM takes it (OpenAI's pattern refuses a generic model's `Page[User]`)
    description: Text | None = None
    parameters: JsonObject | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, v):
        """Arguments are a JSON object (Llama 3's call format; OpenAI refuses any other top-level schema). A
        schema without `type` describes an object only when nothing at its top says otherwise."""
        if _not_an_object(v):
            raise ValueError('must be a JSON Schema of type "object"' +
                             (f', not {v["type"]!r}' if "type" in v else ""))
        for keyword in ("$defs", "definitions"):  # a forced call moves them to its own root, as maps
            if v is not None and not isinstance(v.get(keyword, {}), dict):
                raise ValueError(f"{keyword} must be an object mapping names to schemas")
        return v


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: Text


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(RequestModel):
    name: Text
    arguments: Text  # JSON text of the arguments


class ToolCall(RequestModel):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(RequestModel):
    # "input_text" and "output_text": the Responses API's names, which vLLM's chat reads as text too
    type: Literal["text", "input_text", "output_text"]
    text: Text


class RefusalPart(RequestModel):
    """An assistant turn's refusal, as OpenAI returns it and clients paste back; vLLM reads it as text."""
    type: Literal["refusal"]
    refusal: Text

    @property
    def text(self) -> str:
        return self.refusal


# the content parts served, each with the field holding its text
_PART_TEXT = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


class ChatMessage(RequestModel):
    # "function": the legacy function-calling result turn (OpenAI's ChatCompletionFunctionMessageParam), which vLLM
    # hands to the chat template as it is, as here; "ipython": Llama 3.1+'s tool-result turn (Meta's prompt docs), which
    # Llama 3.3's template reads as a tool turn and vLLM takes (any role)
    role: Literal["system", "developer", "user", "assistant", "tool", "function", "ipython"]
    content: Text | Items[Annotated[TextPart | RefusalPart, Field(discriminator="type")]] | None = None
    name: Text | None = None
    tool_calls: Items[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: Text | None = None  # a tool turn: the call it answers
    # an assistant turn's refusal as OpenAI answers it (null content), pasted back: the turn's text
    refusal: Text | None = None
    # the legacy call of an assistant turn (its result: a `function` turn): it was dropped from the prompt
    function_call: refused("legacy function calling is not served: send the call as tool_calls") | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        """Say so for an image or audio part (the union's own error would be "Input should be a valid string").
        A plain string in the list is a text part, as vLLM's chat_utils reads it."""
        if isinstance(v, list):
            v = [{"type": "text", "text": part} if isinstance(part, str) else part for part in v]
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind not in _PART_TEXT:
                    raise ValueError(f"content parts of type {quoted(kind)!r} are not supported (text and refusal "
                                     "parts only)")
                if isinstance(kind, str) and isinstance(part.get(_PART_TEXT[kind]), str):  # else the union's error
                    _check_unicode(part[_PART_TEXT[kind]])
        return v

    @property
    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins a message's text parts


class ChatCompletionRequest(_GenerationRequest):
    messages: Items[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    service_tier: Literal["auto", "default"] | None = None  # one tier here; "flex", "priority" etc. are refused
    modalities: Items[Literal["text"]] | None = None  # text out only
    audio: refused("this model writes text only") | None = None
    prediction: refused("predicted outputs are not implemented here") | None = None
    web_search_options: refused("no web search runs here") | None = None
    functions: refused("legacy function calling is not taken: send tools") | None = None
    function_call: refused("legacy function calling is not taken: send tool_choice") | None = None
    reasoning_effort: NotReasoning | None = None  # OpenAI refuses it for other models too
    verbosity: refused("this model has one verbosity (leave it out)") | None = None
    moderation: NoModeration | None = None
    store: only(False, "this server stores no answers") = False
    # OpenAI's (for stored answers; none are): its limits, as /v1/responses checks them
    metadata: dict[short_text(64), short_text(512)] | None = Field(None, max_length=16)
    chat_template: RequestTemplate | None = None
    echo: bool = False  # vLLM's: the final message's text first in each answer, when the answer continues it
    # vLLM's: the templated prompt's text in the answer (`prompt_text`); prompt_token_ids come with return_token_ids
    return_prompt_text: only(False, "the answer carries no prompt_text here: return_token_ids gives the prompt's "
                                    "token ids, /tokenize the same for the messages") = False
    chat_template_kwargs: JsonObject | None = None  # vLLM's: more variables for the model's template
    documents: NoDocuments | None = None  # vLLM's RAG documents for templates that take them
    add_special_tokens: bool = False  # vLLM's: true puts a BOS before the template's own tokens
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)  # [] refused, as OpenAI and vLLM do
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True  # vLLM's: false renders the messages without the assistant's header
    continue_final_message: bool = False  # vLLM's: the answer continues the final message's text (a prefill)

    _template_variables = field_validator("chat_template_kwargs")(_template_variables_only)
    _continue_alone = field_validator("continue_final_message")(_continue_alone)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):  # 0 asks for nothing: vLLM takes it (its own default)
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    # One prompt (text or token ids), or a batch of them (a list of texts or of token-id lists), as OpenAI's and
    # vLLM's /v1/completions take; the ingress checks the ids. A batch's choices are numbered prompt by prompt.
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(min_length=1)
    # OpenAI's default for completions, and vLLM's (chat: the context left); 0 only with echo: the prompt alone;
    # an explicit null: the context left, as in vLLM (_null_is_default)
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt's text comes first in each choice
    suffix: refused("insertion needs a fill-in-the-middle model, which this one is not") | None = None
    # chat's name for max_tokens, which load generators send to both endpoints (guidellm: with max_tokens, equal):
    # taken when max_tokens is not given or agrees (vLLM ignores it: a completion was cut at the default 16 tokens)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_special_tokens: bool = True  # vLLM's: the model's BOS before a text prompt (false: the text alone)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """RequestModel's, but for max_tokens: vLLM's null is no limit but the context (get_max_tokens gives it
        the room the prompt leaves), where leaving it out is OpenAI's and vLLM's 16."""
        room = isinstance(data, dict) and "max_tokens" in data and data["max_tokens"] is None
        data = super()._null_is_default(data)
        return {**data, "max_tokens": None} if room else data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """One message for every wrong shape (a union's own error names only its first branch, "a valid string")."""
        def ids(x) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)
        if v == "" or v == []:
            raise ValueError("must not be empty")
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            for text in v:  # here, or the union's error would again be its first branch's
                _check_unicode(text)
            return v
        if isinstance(v, str) or ids(v) or (isinstance(v, list) and all(ids(p) for p in v)):
            return v
        raise ValueError("must be a string, a list of token ids, or a batch: a list of strings or a list of "
                         "token-id lists")

    @field_validator("prompt")
    @classmethod
    def _bounded_batch(cls, v, info: ValidationInfo):
        if isinstance(v, list) and v and not isinstance(v[0], int):
            if len(v) * info.data.get("n", 1) > MAX_BATCH_CHOICES:
                raise ValueError(f"a batch of prompts may ask for at most {MAX_BATCH_CHOICES} choices "
                                 f"(prompts x n)")
            if any(len(p) == 0 for p in v):
                raise ValueError("every prompt of a batch must be non-empty")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: one item for a single prompt."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens_param == "max_tokens" else self.max_completion_tokens

    @property
    def max_tokens_param(self) -> str:
        given = self.max_tokens is not None and "max_tokens" in self.model_fields_set  # a null sets no limit
        return "max_tokens" if given or self.max_completion_tokens is None else "max_completion_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def echo_logprobs(self) -> bool:
        """echo with logprobs: each choice's logprobs cover the prompt's tokens first, as vLLM's completions do."""
        return self.echo and self.logprobs is not None

    @property
    def num_prompt_logprobs(self) -> int | None:
        if not self.echo_logprobs:
            return self.prompt_logprobs
        return max(self.logprobs, self.prompt_logprobs or 0)

    @property
    def prompt_logprobs_param(self) -> str:
        return "prompt_logprobs" if self.prompt_logprobs is not None else "echo"


class TokenizeRequest(RequestModel):
    """vLLM's /tokenize, both forms in one: a `prompt` (TokenizeCompletionRequest) or `messages`
    (TokenizeChatRequest, rendered with the chat template exactly as /v1/chat/completions renders them)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: Items[ChatMessage] | None = Field(None, min_length=1, validate_default=True)
    add_generation_prompt: bool = True  # chat form only
    continue_final_message: bool = False  # chat form only
    add_special_tokens: bool | None = None  # None: BOS for a prompt (vLLM's True), none beyond the template for a chat
    return_token_strs: bool = False
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)  # chat form: offered to the model, as in a chat
    chat_template_kwargs: JsonObject | None = None  # chat form
    # refused as a chat refuses them (ignored, the ids counted were not those of the prompt asked for)
    chat_template: RequestTemplate | None = None
    documents: NoDocuments | None = None

    _template_variables = field_validator("chat_template_kwargs")(_template_variables_only)

    @field_validator("continue_final_message")
    @classmethod
    def _continue_alone_in_chat(cls, v: bool, info: ValidationInfo) -> bool:
        """The chat form's rule; a `prompt` ignores it, as vLLM's TokenizeCompletionRequest does."""
        return _continue_alone(cls, v, info) if info.data.get("messages") is not None else v

    @field_validator("messages")
    @classmethod
    def _prompt_or_messages(cls, v, info: ValidationInfo):
        if (v is None) == ("prompt" not in info.data or info.data["prompt"] is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return v


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: Items[int]  # the ingress checks them against the vocabulary and the model's length


# ---- responses ------------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # echo: null for the prompt's first token (nothing before it)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(TypedDict):
    """vLLM's Logprob, in its prompt_logprobs: [None, {token id: this, ...} per later prompt token]."""

    logprob: float
    rank: int  # how many tokens are at least as likely (1: the likeliest)
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


FinishReason = Literal["stop", "length", "tool_calls", "abort", "error", "repetition"]  # vLLM's "repetition"


def _now() -> int:
    return int(time.time())


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ..., "arguments": JSON text}


class AssistantMessage(BaseModel):
    role: str = "assistant"  # the final message's without add_generation_prompt, as vLLM's (Reply.role)
    content: str | None
    tool_calls: list[ResponseToolCall] = []


class _TokenIds(BaseModel):
    """A response part that carries vLLM's `token_ids` / `prompt_token_ids` only when the request asked for them
    (`return_token_ids`): unasked, the fields are left out, not sent as null with every chunk."""

    @model_serializer(mode="wrap")
    def _without_unasked_ids(self, handler):
        data = handler(self)
        for name in ("token_ids", "prompt_token_ids", "prompt_logprobs"):
            if name in data and data[name] is None:
                del data[name]
        return data


class ChatChoice(_TokenIds):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the answer's tokens, its stop token included


class ChatCompletionResponse(_TokenIds):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids: the templated prompt's tokens
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked


class _Sparse(BaseModel):
    """Serialized with only the fields it carries, as OpenAI's and vLLM's stream chunks are (`{"content": "x"}`,
    not `"role": null`). A tool call's later piece must be {"index", "function": {"arguments"}} alone: OpenAI's
    SDK stream helper takes a `"type": null` for a change of type and fails."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str]  # the first delta of a call: name and arguments; later ones: more arguments


class DeltaMessage(_Sparse):
    role: str | None = None  # AssistantMessage's
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_TokenIds):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the tokens this chunk's text came from


class ChatCompletionChunk(_TokenIds):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids: in each choice's first (role) chunk only
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked: once, with the first content chunk


class CompletionChoice(_TokenIds):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids: this choice's prompt (streamed: first chunk)
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the answer's tokens (streamed: this chunk's)
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked (streamed: in the choice's first chunk)


class CompletionResponse(BaseModel):
    """Both the whole answer and a stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelPermission(BaseModel):
    """vLLM's (vllm/entrypoints/openai/protocol.py), a relic of OpenAI's old model object that vLLM still sends."""

    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=_now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    """OpenAI's model object, with vLLM's additions: `root` (the model as given), `parent`, `permission` and
    `max_model_len`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "meshserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
