"""OpenAI-shaped errors: every refusal the ingress makes, and the mapping of the router's refusals to them.

A client sees `{"error": {message, type, param, code}}` with the right 4xx/5xx and `param` naming the
field at fault, never a stack trace.
"""
from __future__ import annotations

import json
import re

from fastapi.responses import JSONResponse

from deployments.protocol import ErrorInfo, ErrorResponse, quoted
from deployments.router_client import ModelChanged, RouterGone
from scheduler.errors import MeshFailures, NoMeshAvailable, PromptTooLong, QueueFull, Unsupported

RETRY_AFTER_S = 5  # what a 503 asks the client to wait


class APIError(Exception):
    """An answer to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info).model_dump(), status_code=self.status,
                            headers=self.headers)


def client_json(text: str):
    """json.loads of JSON text a client sent inside a request. Raises json.JSONDecodeError, or ValueError: "JSON
    nested too deeply" past the interpreter's recursion limit (json's own RecursionError names the interpreter, not
    the text), or an integer of more digits than int() takes (sys.get_int_max_str_digits(), 4,300), without int()'s
    advice for the server's Python that follows ";"."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as e:
        raise ValueError(json_limit(e)) from None


def json_limit(exc: RecursionError | ValueError) -> str:
    """What json.loads's RecursionError (nesting) or ValueError (int()'s digit limit) says of the text."""
    return "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]


def unreadable_body(exc: RecursionError | ValueError) -> APIError:
    """400 for a body of JSON that Python's json cannot read: FastAPI's own answer, "There was an error parsing the
    body", said nothing of what was wrong."""
    return APIError(400, f"The body cannot be read: {json_limit(exc)}.")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def unwrap(exc: BaseException) -> BaseException:
    """The original exception: Ray delivers one raised in another replica as a RayTaskError whose
    `cause` is the original, so the same mapping works in tests (no Ray) and under Serve."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def as_api_error(exc: BaseException, prompt_field: str) -> APIError | None:
    """The client's answer for a refusal from the router; None for a failure that is not the client's."""
    cause = unwrap(exc)
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, QueueFull):
        return APIError(429, f"The server is at capacity: {cause}", "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(cause, Unsupported):
        return APIError(400, str(cause), param=cause.param)
    if isinstance(cause, PromptTooLong):
        return APIError(400, str(cause), param=prompt_field, code="context_length_exceeded")
    if isinstance(cause, NoMeshAvailable):
        return unavailable(f"No model replica is available: {cause}; retry.")
    if isinstance(cause, RouterGone):
        return unavailable(f"The server is unavailable: {cause}; retry.")
    if isinstance(cause, ModelChanged):
        return unavailable(f"{cause}; retry.")
    if isinstance(cause, MeshFailures):  # sent again, it would fail meshes again: OpenAI's SDKs resend a 5xx twice
        # unless told not to (openai-python _base_client._should_retry, openai-node shouldRetry)
        return APIError(500, f"The request failed: {cause}.", "internal_error", code="mesh_failed",
                        headers={"x-should-retry": "false"})
    return None


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _is_union_branch(part: object) -> bool:
    """Pydantic names the branch of a union in an error's location ("str", "list[TextPart]",
    "function-after[...]"); the client's `param` is the path of fields and indexes only."""
    return isinstance(part, str) and (part in _TYPE_LABELS or "[" in part)


def _deepest_branch(errors: list[dict]) -> dict:
    """The first error; or when it lies in a union, the error of that union's branch that got furthest into
    the input: {"function": {}} for `tool_choice` ("none" | "auto" | "required" | a named function) is
    `tool_choice.function.name: Field required`, not that it should be "none", "auto" or "required". Every
    error under a union's field names its branch next (a type or, for a model, the model's name); "branch"
    in the result is that index."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    at = next((i for i, part in enumerate(loc) if _is_union_branch(part)), None)
    if at is None:
        return first
    branches = [e for e in errors if len(e.get("loc", ())) > at and tuple(e["loc"][:at]) == loc[:at]]
    return {**max(branches, key=lambda e: len(e["loc"])), "branch": at}  # max: the first of the longest


def _tags(loc: tuple) -> set[int]:
    """Where a discriminated union names the branch it took by its tag ("message" in `input.0.message.content`):
    right after its label, or after the index that follows it for a list of them."""
    return {i + (2 if part.startswith(("list[", "dict[")) else 1) for i, part in enumerate(loc)
            if isinstance(part, str) and "tagged-union[" in part}


def validation_error(errors: list[dict], skip_body: bool) -> APIError:
    """400 naming the first offending field, as `param` and in the message (without FastAPI's "body" or
    "query" in front when `skip_body`)."""
    err = _deepest_branch(errors)
    loc = tuple(err.get("loc", ()))
    too_deep = err.get("type") == "recursion_depth_exceeded"
    if too_deep:  # a client's JSON value nested past pydantic's depth: its path inside the value alone was 1.7 KB
        # cut at JsonValue's first branch ("dict", "list"), not a union's before the value (`input`'s list of items)
        loc = loc[:next((i for i, part in enumerate(loc) if part in _TYPE_LABELS), len(loc))]
    hidden = _tags(loc) | {err.get("branch")}
    loc = [str(p) for i, p in enumerate(loc) if not _is_union_branch(p) and i not in hidden]
    tag = re.fullmatch(r"'(\w+)'", str(err.get("ctx", {}).get("discriminator", "")))  # a field's name, quoted
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found") and tag:  # that field is at fault
        loc.append(tag[1])
    if skip_body and loc[:1] in (["body"], ["query"]):
        loc = loc[1:]
    # a client's own dict key may be any length: a 100,000-character one made a 200 KB error, twice over
    loc = [quoted(p) for p in loc]
    if err.get("type") == "json_invalid":
        return APIError(400, f"The body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    name = ".".join(loc) or None
    no_object = ("missing", "model_attributes_type", "dict_type", "model_type")  # model_validate's: large_body
    if name is None and err.get("type") in no_object:  # no JSON object at all
        return APIError(400, "The body must be a JSON object (Content-Type: application/json).")
    message = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    if too_deep:
        message = "JSON nested too deeply"  # as client_json says of such text
    if err.get("type") == "union_tag_invalid":  # pydantic's message quotes the client's tag whole
        found = str(err.get("ctx", {}).get("tag", ""))
        message = message.replace(found, quoted(found), 1) if found else message
    return APIError(400, f"{name}: {message}" if name else message, param=name)
