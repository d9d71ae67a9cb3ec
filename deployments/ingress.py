"""The OpenAI-compatible HTTP front as a Serve deployment: routes, auth, error handlers.

All per-request CPU work stays in the ingress (its replicas scale out freely); the router only sees token
ids. `build_app` makes a plain FastAPI app over any RouterClient, so it runs in tests without Ray; `Ingress`
is the small Serve deployment that builds it inside a replica around a handle to the router. The endpoints'
logic is in `deployments/openai_server.py`, streaming helpers in `streaming.py`, errors in `errors.py`.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
import uuid
from typing import Annotated, TypeVar
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import tokenization
from deployments.aio import within
from deployments.auth import ApiKeys, KeyCheck, tenant_salt
from deployments.body_limit import BodyLimit, BodyTooLarge, too_large
from deployments.client_gone import ClientGone
from deployments.config import DEFAULT_MAX_REQUEST_BYTES, model_root
from deployments.errors import APIError, unavailable, unreadable_body, validation_error
from deployments.gc_heap import freeze_gc_heap
from deployments.large_body import (OFF_LOOP_BYTES, OffLoopBody, is_json, load, not_utf8, off_loop, read_body,
                                   validate)
from deployments.openai_server import GRAMMAR_THREADS, MODEL_LEN_WAIT_S, SSE_KEEPALIVE_S, OpenAIServer, RouterClient
from deployments.protocol import (MAX_SALT_CHARS, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                  DetokenizeResponse, ModelCard, ModelList, ModelPermission, TokenizeRequest,
                                  TokenizeResponse, quoted)
from deployments.responses import respond
from deployments.responses_protocol import ResponsesRequest
from deployments.router_client import RouterLink
from model import grammar_check
from model.checkpoint import resolve_model_dir
from model.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("ray.serve")
M = TypeVar("M", bound=BaseModel)


HEALTH_TIMEOUT_S = 1.0
# The link (deployments/router_client.py) reconnects within a second or two of a router restart; down longer, this
# replica's requests wait, then fail with 503, while Serve's calls to the router may still pass.
LINK_DOWN_UNHEALTHY_S = 5.0
METRICS_TIMEOUT_S = 5.0  # half of Prometheus's default scrape timeout
# /health reads the router's whole stats (every mesh's and KV group's numbers: ~0.7 ms of the one router's CPU at 32
# meshes x 4 groups, 2-core box, its Serve call besides) and needs no key: probes share the read that is out, and one
# that said ready for this long, so a flood of them costs the router a few reads a second per replica, not one each.
HEALTH_READ_REUSE_S = 0.25


def named(req: ChatCompletionRequest | CompletionRequest, request: Request):
    """The request with vLLM's `X-Request-Id` header as its `request_id` (the response's id) when the body
    names none. vLLM prefers the header; here the body's comes first, as Serve's proxies (HAProxy's
    unique-id, Serve's own request id) put the header on every request that comes without one."""
    header = request.headers.get("x-request-id")
    if req.request_id is not None or not header or len(header) > MAX_SALT_CHARS:
        return req
    return req.model_copy(update={"request_id": header})


# The response headers openai-node reads besides the body (client.mjs: shouldRetry's `x-should-retry`, retryRequest's
# `retry-after`; `x-request-id`, which Serve's proxies put on every answer, as its request_id). A page's script sees
# only the CORS-safelisted ones unless the answer names the rest (Fetch standard, CORS-filtered response): hidden,
# a 500 the meshes failed on was sent twice more from a browser, and a 429 retried after the SDK's own backoff.
EXPOSED_HEADERS = ["x-should-retry", "retry-after", "x-request-id"]


def internal(method: str, path: str, exc: BaseException) -> APIError:
    """The 500 for a failure no handler took, logged with its traceback; the client learns nothing of it."""
    log.exception("%s %s failed", method, path, exc_info=exc)
    return APIError(500, "Internal server error.", "internal_error")


class InternalErrors:
    """ASGI middleware: a failure no handler took, before the answer started, is `internal`'s 500 sent from here.
    Starlette sends that 500 from ServerErrorMiddleware, outside every middleware the app adds (applications.py
    build_middleware_stack), so it passed CORS by: a browser made it a network error, which openai-node retries
    twice as a connection failure (client.mjs makeRequest) and then reports as "Connection error."."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:  # too late for another answer: Starlette's own handling, as before
                raise
            await internal(scope["method"], scope["path"], exc).response()(scope, receive, send)


def build_app(router: RouterClient, tokenizer: Tokenizer, served_model_name: str | list[str],
              api_keys: list[str] | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              metrics_open: bool = False, allowed_origins: list[str] | None = None,
              replica_name: str = "local", root: str | None = None, enable_log_requests: bool = False,
              sse_keep_alive_interval: float = SSE_KEEPALIVE_S, no_mesh_wait_s: float = MODEL_LEN_WAIT_S) -> FastAPI:
    """The OpenAI app over `router`. With `api_keys`, every route but /health, /ping and /version needs one of them
    (/metrics too, unless `metrics_open`), and each key is a tenant with its own prefix cache. `replica_name` labels
    this replica's own metrics (`ingress`). A request may name the model by any of `served_model_name`'s names; the
    first is the one listed and answered. `root`: the model as given (config.model_root), which /v1/models reports
    as vLLM does (default: the last name). `enable_log_requests`, `sse_keep_alive_interval`: AppConfig's;
    `no_mesh_wait_s` too: before any mesh is up a request waits this long for one, as the router holds its own."""
    server = OpenAIServer(router, tokenizer, served_model_name, replica_name, enable_log_requests)
    server.keepalive_s = sse_keep_alive_interval
    server.model_len_wait_s = no_mesh_wait_s
    if tokenizer.sampling_defaults:  # as vLLM warns: a request without a temperature is not sampled at 1.0
        log.info("Sampling defaults from the model's generation_config.json, for requests that leave them out: %s",
                 ", ".join(f"{k}={v}" for k, v in sorted(tokenizer.sampling_defaults.items())))
    root = root or server.model_names[-1]
    app = FastAPI(title="meshserve", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if api_keys:  # added last, so it runs first: a request without a key is refused before its body is read
        open_paths = frozenset({"/health", "/ping", "/version", *(["/metrics"] if metrics_open else [])})
        app.add_middleware(KeyCheck, keys=ApiKeys(api_keys), open_paths=open_paths)
    if allowed_origins:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(InternalErrors)  # inside CORS: its 500 carries Access-Control-Allow-Origin
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=EXPOSED_HEADERS)
    app.add_middleware(ClientGone)  # outermost: any response's send may find its client gone

    def salt(request: Request, cache_salt: str | None) -> str | None:
        return tenant_salt(request.state.api_key, cache_salt) if api_keys else cache_salt

    v1 = APIRouter(prefix="/v1", route_class=OffLoopBody)
    created = int(time.time())  # the served model's `created`: when this server started, the same on every call

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        req = named(req, request)
        return server.complete(req, [await server.prepare(req, "chatcmpl")], salt(request, req.cache_salt))

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        req = named(req, request)
        return server.complete(req, await server.prepare_all(req, "cmpl"), salt(request, req.cache_salt))

    @v1.post("/responses")
    async def responses(req: ResponsesRequest, request: Request):
        return await respond(server, req, salt(request, req.cache_salt), len(await request.body()))

    # openai-node's and openai-python's responses.retrieve, .delete, .cancel and .inputItems.list: without these routes
    # a bare 404 "Not Found", which read as a wrong id or base URL
    @v1.get("/responses/{response_id}")
    @v1.delete("/responses/{response_id}")  # a route of its own: its own operationId
    @v1.post("/responses/{response_id}/cancel")
    @v1.get("/responses/{response_id}/input_items")
    async def stored_response(response_id: str):
        raise APIError(404, f"response_id: no response {quoted(response_id)!r} here: this server stores no responses "
                            "(`store` is taken, nothing is kept)", param="response_id")

    # The SDKs' responses.input_tokens.count and .compact (openai-python resources/responses): OpenAI routes one level
    # under /v1/responses, which the route above would take for an id and answer with a 405 allowing GET and DELETE
    @v1.post("/responses/input_tokens", include_in_schema=False)
    @v1.post("/responses/compact", include_in_schema=False)
    async def unserved_response_route(request: Request):
        raise APIError(404, f"{request.url.path} is not served here")

    async def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=created, root=root, max_model_len=await server.model_len(),
                         permission=[ModelPermission(id=f"modelperm-{uuid.uuid4().hex}", created=created)])

    @v1.get("/models")
    async def models():
        return ModelList(data=[await card(server.model)]).model_dump()

    @v1.get("/models/{model:path}")
    async def model(model: str):
        if not model:  # a request body's "" is the served model, but no model's id is ""
            raise APIError(404, "GET /v1/models/{model} needs a model id.", param="model", code="model_not_found")
        server.check_model(model)
        return (await card(model)).model_dump()

    app.include_router(v1)

    @app.post("/invocations")
    async def invocations(request: Request):
        """SageMaker's inference route, as vLLM serves it: a body with `messages` is a chat completion, any other
        a completion (vLLM's api_server: ChatCompletionRequest tried first); a bad one is that route's 400."""
        body = await read_body(request)  # a client gone mid-body: the /v1 routes' 400, not a logged 500
        if not is_json(request):  # FastAPI reads no other body as JSON: the /v1 routes' 400 (vLLM's: a 415)
            raise validation_error([{"type": "missing", "loc": ("body",)}], skip_body=True)
        req = await off_loop(invocation, body) if len(body) > OFF_LOOP_BYTES else invocation(body)
        if isinstance(req, ChatCompletionRequest):
            return await chat_completions(req, request)
        return await completions(req, request)
    # vLLM's tokenizer endpoints (outside /v1, as vLLM serves them); GET takes the same fields as a query
    tok = APIRouter(route_class=OffLoopBody)

    @tok.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize_post(req: TokenizeRequest) -> Response:
        return await tokenization.tokenize(server, req)

    @tok.get("/tokenize", response_model=TokenizeResponse)
    async def tokenize_get(request: Request, prompt: str, add_special_tokens: bool | None = None,
                           return_token_strs: bool = False, model: str | None = None) -> Response:
        _check_query_utf8(request)
        req = _validated(TokenizeRequest, prompt=prompt, add_special_tokens=add_special_tokens,
                         return_token_strs=return_token_strs, model=model)
        return await tokenization.tokenize(server, req)

    @tok.post("/detokenize")
    async def detokenize_post(req: DetokenizeRequest) -> DetokenizeResponse:
        return await tokenization.detokenize(server, req)

    @tok.get("/detokenize")
    async def detokenize_get(tokens: Annotated[list[int], Query()], model: str | None = None) -> DetokenizeResponse:
        return await tokenization.detokenize(server, _validated(DetokenizeRequest, tokens=tokens, model=model))

    app.include_router(tok)

    @app.get("/version")  # vLLM's
    async def version():
        return {"version": importlib.metadata.version("meshserve")}

    health_read: asyncio.Future | None = None  # the probes' shared read of the router's stats (HEALTH_READ_REUSE_S)
    health_read_at = 0.0

    async def read_health() -> dict:
        """The router's stats within HEALTH_TIMEOUT_S. Its own task, shared: a read Ray cancelled under the probe that
        began it (its client left) is a timeout for the probes sharing it, not their cancellation."""
        read = asyncio.ensure_future(server.stats())
        await asyncio.wait((read,), timeout=HEALTH_TIMEOUT_S)
        if not read.done() or read.cancelled():
            read.cancel()
            raise asyncio.TimeoutError
        return read.result()

    async def health_stats() -> dict:
        nonlocal health_read, health_read_at
        last = health_read
        if last is None or last.done() and (last.cancelled() or last.exception() is not None
                                            or not last.result()["ready"]  # a mesh coming up is seen at once
                                            or time.monotonic() - health_read_at > HEALTH_READ_REUSE_S):
            health_read, health_read_at = asyncio.ensure_future(read_health()), time.monotonic()
        if health_read.done():
            return health_read.result()
        return await asyncio.shield(health_read)

    # HEAD too: load balancers probe with it (Azure Front Door's default; RFC 9110 9.1), and FastAPI's GET route
    # alone answered it 405. /ping is vLLM's (SageMaker's probe), GET and POST, as /health.
    @app.get("/health")
    @app.head("/health")
    async def health():
        """200 while a mesh is live and this replica's link to the router is up (or down less than
        LINK_DOWN_UNHEALTHY_S); 503 otherwise, within HEALTH_TIMEOUT_S even while the router restarts (its stats
        call would wait for the new replica, and probes time out after 1-5 s)."""
        try:
            stats = await within(health_stats(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise unavailable(f"The router did not answer within {HEALTH_TIMEOUT_S:.0f} s.") from None
        if not stats["ready"]:
            raise unavailable("No mesh is live.")
        down = server.router.link_down_s()
        if down > LINK_DOWN_UNHEALTHY_S:
            raise unavailable(f"This replica's link to the router has been down for {down:.0f} s.")
        return Response(status_code=200)

    @app.get("/ping")
    @app.post("/ping")
    @app.head("/ping")
    async def ping():
        return await health()

    @app.get("/metrics")
    async def metrics():
        """The ingress's own families always; the meshes' when the router answers within METRICS_TIMEOUT_S, and
        meshserve_router_up says which (while the router restarts, a scrape waited ~7 s, near Prometheus's
        default 10 s scrape timeout)."""
        report = server.metrics.report()  # shown as handed over: what other replicas' scrapes show of this one
        try:
            stats = await within(server.stats(report), METRICS_TIMEOUT_S)
        except (asyncio.TimeoutError, APIError):  # no answer yet, or no router to answer
            stats = None
        return Response(server.metrics.render(stats, report), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError):
        return validation_error(exc.errors(), skip_body=True).response()

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_: Request, exc: BodyTooLarge):
        return too_large(max_request_bytes).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's parse of a body that is not UTF-8: its bare 400
            return not_utf8().response()
        if isinstance(exc.__cause__, (RecursionError, ValueError)):  # its parse of JSON that Python cannot read
            return unreadable_body(exc.__cause__).response()
        headers, message = exc.headers, str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no route: a mistyped path got a bare "Not Found"
            # a path under /v1 (/v1/embeddings), or /v1 itself, was told "the API is under /v1", which it is
            paths = "/v1/chat/completions, /v1/completions, /v1/responses, /v1/models"
            v1 = request.url.path == "/v1" or request.url.path.startswith("/v1/")
            where = f"the API's paths are {paths}" if v1 else f"the API is under /v1 ({paths})"
            message = f"{request.method} {quoted(request.url.path)} is not served here: {where}"
        if exc.status_code == 405:  # Starlette's Allow names the first route at the path only (GET+POST /tokenize)
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request.scope))}
        return APIError(exc.status_code, message, "invalid_request_error", headers=headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return internal(request.method, request.url.path, exc).response()

    return app


def _allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route at the request's path serves (RFC 9110 15.5.6: a 405 lists them all)."""
    return [method for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)]


def _check_query_utf8(request: Request) -> None:
    """Starlette decodes a query's %-escapes with errors="replace", so "prompt=%FF%FE" would be tokenized as
    two U+FFFD. Raises APIError 400 naming the parameter whose bytes are not UTF-8 (the body's text is
    checked as strictly)."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True, encoding="latin-1"):  # latin-1: bytes as they are
        try:
            value.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, f"{name}: must be valid UTF-8 text once %-decoded", param=name) from None


def invocation(body: bytes) -> ChatCompletionRequest | CompletionRequest:
    """/invocations' body as the request it is: a chat completion where it has `messages`, else a completion."""
    data = load(body)
    return validate(ChatCompletionRequest if isinstance(data, dict) and "messages" in data else CompletionRequest, data)


def _validated(cls: type[M], **fields) -> M:
    """A request model from query parameters, with the body's rules and errors."""
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors(), skip_body=False) from None


# A stopping ingress replica (a redeploy, a scale-down) serves its open requests for up to
# graceful_shutdown_timeout_s before Serve kills it and cuts them. Serve's 20 s cut a stream paused by a redeploy
# that restarts the router and the meshes too (its continuation waits for them: ~25-35 s for CPU meshes here), and
# any stream of more than ~20 s of tokens left on a replica that scales down (60 s, any of more than a minute). 3 h
# outlast the longest answer (131,072 tokens at a Galaxy's published decode rates: ~2.5 h), as the HAProxy process
# reloaded out at that change is kept (bench/local_serve.py HAPROXY_HARD_STOP). An idle replica stops at once.
INGRESS_GRACEFUL_SHUTDOWN_S = 3 * 3600
INGRESS_MAX_ONGOING_REQUESTS = 1024  # at least; deployments/app.py raises it to the router's share (its 429s must come)
# A rolling update (a redeploy, a changed Ingress option) starts each new replica before it stops an old one. With
# Serve's 0 it stopped the old first, and meanwhile HAProxy sent every request, /health too, to Serve's fallback
# proxy, which held it until a new replica was up: 10-20 s without an answer. Where the cluster lacks the room for the
# extra replica (ingress_num_cpus), the old ones serve on while the new ones wait (Serve's max_surge_percent).
INGRESS_MAX_SURGE_PERCENT = 100


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
                  graceful_shutdown_timeout_s=INGRESS_GRACEFUL_SHUTDOWN_S, max_surge_percent=INGRESS_MAX_SURGE_PERCENT)
@serve.ingress()
class Ingress:
    """Stateless and freely replicated: builds the app in the replica, around the router's handle."""

    def __init__(self, router_handle, model: str | None, served_model_name: str | list[str],
                 api_keys: list[str] | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 metrics_open: bool = False, allowed_origins: list[str] | None = None,
                 model_identity: str | None = None, enable_log_requests: bool = False,
                 sse_keep_alive_interval: float = SSE_KEEPALIVE_S, no_mesh_wait_s: float = MODEL_LEN_WAIT_S):
        tokenizer = load_tokenizer(resolve_model_dir(model))  # this node's copy of the model's folder
        tokenizer.warm()
        self._app = build_app(RouterLink(router_handle, model_identity), tokenizer, served_model_name, api_keys,
                              max_request_bytes, metrics_open, allowed_origins,
                              serve.get_replica_context().replica_id.unique_id, model_root(model), enable_log_requests,
                              sse_keep_alive_interval, no_mesh_wait_s)
        try:  # now: at the first constrained request it would hold a grammar thread and the GIL (~0.2-1 s)
            self._app.state.server.grammar_tokenizer()
            grammar_check.start(GRAMMAR_THREADS)  # a child process per grammar thread (model/grammar_check.py)
        except Exception:
            log.warning("llguidance cannot read this tokenizer: constrained requests will fail", exc_info=True)
        freeze_gc_heap()  # the tokenizer, the app and the modules stay: full collections need not walk them

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
