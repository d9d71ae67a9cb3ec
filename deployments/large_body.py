"""Large request bodies are parsed and validated on a thread, not on the event loop every stream shares.

FastAPI parses a body (json.loads) and validates it (pydantic) on the loop: one client's 5.8 MB of tools held
every other stream of its replica ~0.7 s. A thread alone frees the loop only while Python code runs in it, since
json.loads and pydantic-core hold the GIL until they return or call Python. Hence:
- validation there calls the models' Python validators often (every RequestModel's and text's), and with the heap
  frozen, as Serve freezes a replica's after startup, the loop waited <= ~15 ms per big body (bench.body_stall);
- json.loads there is given Python hooks for objects and numbers (the functions the C parser calls anyway: dict,
  int, float), so it lets go of the GIL too (a 300k-entry logit_bias: 190 ms on the loop, ~20-45 ms with them),
  at about twice its CPU. A long array of strings alone calls no hook.
Bodies up to OFF_LOOP_BYTES keep FastAPI's own path: a hop to a thread and back costs more than they do.
The route's signature, and so its OpenAPI schema, are unchanged; errors are those of FastAPI's path, word for word.
"""
from __future__ import annotations

import asyncio
import email.message
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Coroutine, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from deployments.errors import APIError, unreadable_body, validation_error

OFF_LOOP_BYTES = 65_536  # a body this size validates on the loop in a few ms at most
PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 for a body it cannot read or decode
# One thread: big bodies wait for each other rather than take the GIL from the loop's streams together.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshserve-body")
T = TypeVar("T")


def not_utf8() -> APIError:
    """The 400 for a body whose bytes are not UTF-8 (nor the UTF-16 or -32 json.loads also reads): JSON is UTF-8 (RFC
    8259 8.1), and a charset that Content-Type names is not read, as FastAPI and vLLM read none."""
    return APIError(400, "The body is not valid JSON: its bytes are not UTF-8 text (JSON is UTF-8; a charset in "
                         "Content-Type is not read).")


async def off_loop(fn: Callable[..., T], *args) -> T:
    """fn(*args) on the large bodies' thread: more work of the size of a large body (a Responses request's chat
    completion, validated again)."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


def _object(pairs: list[tuple[str, Any]]) -> dict:
    return dict(pairs)


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def parse(cls: type[BaseModel], body: bytes) -> BaseModel:
    """`body` as FastAPI reads it into `cls`: Starlette's json.loads (here with hooks that give the same values),
    then pydantic. Raises the APIError the ingress answers on FastAPI's path."""
    return validate(cls, load(body))


def load(body: bytes) -> Any:
    """`body`'s JSON as FastAPI reads it. Raises the APIError the ingress answers on FastAPI's path."""
    try:
        return json.loads(body, object_pairs_hook=_object, parse_int=_int, parse_float=_float)
    except json.JSONDecodeError as exc:  # fastapi/routing.py, get_request_handler: its RequestValidationError
        raise validation_error([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                 "ctx": {"error": exc.msg}}], skip_body=True) from None
    except UnicodeDecodeError:  # a ValueError: FastAPI's bare 400 said nothing of what to send instead
        raise not_utf8() from None
    except (ValueError, RecursionError) as exc:  # an int of more than 4,300 digits, arrays nested past the limit
        raise unreadable_body(exc) from None  # as the ingress answers FastAPI's own 400 for them


def validate(cls: type[BaseModel], data: Any) -> BaseModel:
    """A body's JSON `data` as `cls`, with FastAPI's 400 naming the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:  # FastAPI's locations start with "body"
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise validation_error(errors, skip_body=True) from None


async def read_body(request: Request) -> bytes:
    """The request's body. Raises BodyLimit's 413, or FastAPI's 400 for a client gone mid-body (ClientDisconnect), as
    FastAPI's handler answers it when it reads the body itself, logging nothing: raised on, it was a 500 with a
    logged traceback per client that left mid-upload."""
    try:
        return await request.body()
    except HTTPException:  # BodyLimit's 413
        raise
    except Exception:
        raise HTTPException(400, PARSE_ERROR) from None


def is_json(request: Request) -> bool:
    """Whether FastAPI would parse this body as JSON (fastapi/routing.py, get_request_handler)."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class OffLoopBody(APIRoute):
    """A route whose body, past OFF_LOOP_BYTES, is parsed and validated on a thread. FastAPI's handler then takes
    the model as it is: Starlette's Request.json() returns its cached `_json`, and pydantic passes an instance of
    the model through without validating it again (revalidate_instances="never"). Once the endpoint returned, the
    request's cached body and parse are dropped: Starlette keeps the request while its response is sent (its
    Deferred answer, its stream), and these are the body's size twice."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        model = self.body_field.field_info.annotation

        async def route(request: Request) -> Response:
            body = await read_body(request)
            if len(body) > OFF_LOOP_BYTES and is_json(request):
                request._json = await off_loop(parse, model, body)
            response = await handler(request)
            vars(request).pop("_body", None)
            vars(request).pop("_json", None)
            return response
        return route
