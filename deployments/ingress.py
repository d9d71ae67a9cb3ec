"""The OpenAI-compatible HTTP front: validation, chat template, tokenization, detokenization, stop strings, SSE.

All per-request CPU work stays here (ingress replicas scale out freely); the router only sees token ids.
`build_app` makes a plain FastAPI app over any RouterClient, so it runs in tests without Ray; `Ingress`
is the small Serve deployment that builds it inside a replica around a handle to the router.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from deployments.metrics import Metrics
from deployments.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                  ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob,
                                  CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                  DeltaMessage, ErrorInfo, ErrorResponse, ModelCard, ModelList,
                                  PromptTokensDetails, TopLogprob, Usage)
from model.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from scheduler.errors import NoMeshAvailable, PromptTooLong, QueueFull
from scheduler.sampling import SamplingParams, TokenLogprobs
from scheduler.work import TokenEvent

log = logging.getLogger("ray.serve")


class RouterClient(Protocol):
    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 salt: str | None, output_ids: list[int] = ()) -> AsyncIterator[TokenEvent]: ...

    async def cancel(self, request_id: str, reason: str = "abort") -> None: ...

    async def stats(self) -> dict: ...


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


RETRY_AFTER_S = 5  # what a 503 asks the client to wait
# Waits before each resubmission of a request whose router failed (Serve restarts it meanwhile, ~seconds).
ROUTER_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def unwrap(exc: BaseException) -> BaseException:
    """The original exception: Ray delivers one raised in another replica as a RayTaskError whose
    `cause` is the original, so the same mapping works in tests (no Ray) and under Serve."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def as_api_error(exc: BaseException, prompt_field: str) -> APIError | None:
    cause = unwrap(exc)
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, QueueFull):
        return APIError(429, f"The server is at capacity: {cause}", "rate_limit_error", code="queue_full")
    if isinstance(cause, PromptTooLong):
        return APIError(400, str(cause), param=prompt_field, code="context_length_exceeded")
    if isinstance(cause, NoMeshAvailable):
        return unavailable(f"No model replica is available: {cause}; retry.")
    return None


def _validation_error(errors: list[dict], skip_body: bool) -> APIError:
    """400 naming the first offending field, as `param` and in the message."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    if skip_body and loc[:1] == ["body"]:
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        return APIError(400, f"The body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    name = ".".join(loc) or None
    return APIError(400, f"{name}: {err['msg']}" if name else err["msg"], param=name)


def _check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids index the embedding and the logits on the mesh, where one outside the vocabulary would
    fail every request on it: refuse it here."""
    if not all(0 <= t < vocab_size for t in ids):
        raise APIError(400, f"{param}: token ids must lie in [0, {vocab_size})", param=param)


def _check_vocab_bounds(req: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> None:
    """The rules that need the model's vocabulary (the protocol checks the rest)."""
    _check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    if req.top_k > vocab_size:  # a device top-k larger than the logits fails the whole batch
        raise APIError(400, f"top_k: must be -1, 0 or in [1, {vocab_size}]", param="top_k")


class StopStrings:
    """Finds stop strings in streamed text. Until the answer ends, the last (longest stop - 1)
    characters are held back: they might be the start of a stop string that the next token completes."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str, final: bool, check: bool = True) -> tuple[str, bool]:
        """Text that is safe to send now, and whether a stop string ended the answer (the text before
        it is all that remains). `check` is False while min_tokens are not yet generated."""
        search_from = max(0, len(self.text) - self.hold)
        self.text += delta
        if check and self.stops:
            hits = [i for s in self.stops if (i := self.text.find(s, search_from)) != -1]
            if hits:
                self.text = self.text[:min(hits)]
                return self._take(len(self.text)), True
        return self._take(len(self.text) if final else len(self.text) - self.hold), False

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out


@dataclass
class ChoiceDelta:
    """What one choice gained: text ready for the client, with the logprobs of its new tokens."""

    index: int
    text: str
    text_offset: int  # characters of this choice sent before `text`
    logprobs: list[TokenLogprobs]
    finish_reason: str | None
    num_generated: int  # tokens so far
    num_cached: int  # prompt tokens the prefix cache served


@dataclass
class ChoiceTotal:
    """A whole choice, for a non-streaming answer."""

    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated: int = 0
    num_cached: int = 0

    def add(self, d: ChoiceDelta) -> None:
        self.text += d.text
        self.logprobs += d.logprobs
        self.finish_reason = d.finish_reason
        self.num_generated = d.num_generated
        self.num_cached = d.num_cached


@dataclass
class Prepared:
    """A validated request, ready for the router."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_field: str
    arrival: float  # perf_counter() when the request reached the ingress


_CHOICES_DONE = object()


class EventStream(StreamingResponse):
    """SSE that closes its source however the response ends. Starlette leaves the body iterator open
    when the client goes away; closing the source at once cancels the router requests behind it."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], source):
        super().__init__(content)
        self.source = source

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.source.aclose()


class OpenAIServer:
    """The endpoints' logic over one router client; `build_app` routes HTTP to it."""

    def __init__(self, router: RouterClient, tokenizer: Tokenizer, served_model_name: str):
        self.router = router
        self.tokenizer = tokenizer
        self.model = served_model_name
        self.max_model_len: int | None = None  # the meshes' limit, from the router once one has come up
        self.metrics = Metrics()
        self.retry_backoff_s = ROUTER_RETRY_BACKOFF_S

    # ---- readiness ------------------------------------------------------------------------------
    async def stats(self) -> dict:
        """The router's stats; 503 while the router cannot be reached (it is starting or restarting)."""
        try:
            return await self.router.stats()
        except Exception as exc:
            log.warning("router stats failed: %r", unwrap(exc))
            raise unavailable("The model is not ready yet.") from None

    async def model_len(self) -> int:
        """The longest prompt + answer the meshes take (their capabilities and KV pools, as the router
        reports them); 503 until a mesh has come up once."""
        if self.max_model_len is None:
            self.max_model_len = (await self.stats()).get("max_model_len")
            if self.max_model_len is None:
                raise unavailable("The model is not ready yet.")
        return self.max_model_len

    # ---- requests -> router ---------------------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest | CompletionRequest, prefix: str) -> Prepared:
        if req.model is not None and req.model != self.model:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.model}`.",
                           param="model", code="model_not_found")
        arrival = time.perf_counter()
        vocab_size = self.tokenizer.vocab_size
        _check_vocab_bounds(req, vocab_size)
        if isinstance(req, ChatCompletionRequest):
            prompt_field = "messages"
            try:
                prompt_ids = self.tokenizer.encode_chat([{"role": m.role, "content": m.text} for m in req.messages])
            except Exception as exc:  # the model's template refuses these messages (e.g. roles out of order)
                raise APIError(400, f"messages: {exc}", param="messages") from None
        else:
            prompt_field = "prompt"
            if isinstance(req.prompt, str):
                prompt_ids = self.tokenizer.encode(req.prompt, add_bos=True)
            else:
                prompt_ids = req.prompt
                _check_token_ids(prompt_ids, vocab_size, "prompt")
        n, limit = len(prompt_ids), self.max_model_len
        if n >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {n}, "
                                f"leaving no room for an answer.", param=prompt_field, code="context_length_exceeded")
        max_tokens, param = req.requested_max_tokens, req.max_tokens_param
        if max_tokens is None:
            max_tokens = limit - n
        elif n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {n} and "
                                f"{param} asks for {max_tokens} more.", param=param, code="context_length_exceeded")
        if req.min_tokens > max_tokens:  # also when max_tokens is not given but the room left in the context
            room = (f"{param} ({max_tokens})" if req.requested_max_tokens is not None
                    else f"the {max_tokens} tokens the prompt leaves in the context")
            raise APIError(400, f"min_tokens ({req.min_tokens}) exceeds {room}.", param="min_tokens")
        try:
            params = req.sampling_params(max_tokens, tuple(sorted(self.tokenizer.stop_ids)))
        except ValidationError as exc:  # a rule the checks above missed: still the client's 400, never a 500
            raise _validation_error(exc.errors(), skip_body=False) from None
        return Prepared(f"{prefix}-{uuid.uuid4().hex}", prompt_ids, params, prompt_field, arrival)

    async def choice(self, index: int, request_id: str, prep: Prepared, params: SamplingParams,
                     salt: str | None) -> AsyncIterator[ChoiceDelta]:
        """One router request, as text. Cancels it in the router unless it finished.

        When the router fails mid-request (its replica died), the request is resubmitted, to the router
        Serve restarts, as a continuation: the same prompt and params with the tokens received so far. The
        client sees a pause, then the rest; greedy and seeded output is unchanged (the sampler is keyed on
        (seed, position)). Once every wait of retry_backoff_s is spent, it is a 503."""
        prompt_ids = prep.prompt_ids
        timer = self.metrics.start(len(prompt_ids), prep.arrival)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        stops = StopStrings(params.stop)
        output: list[int] = []
        cached = 0
        reason: str | None = None
        rid, attempt = request_id, 0
        try:
            while True:
                try:
                    async for event in self.router.generate(rid, prompt_ids, params, salt, list(output)):
                        timer.on_event(event)
                        if event.finish_reason == "error":
                            raise APIError(500, f"The model failed on this request: {event.error}", "internal_error")
                        output += event.token_ids
                        cached = event.num_cached_tokens or cached
                        offset = stops.emitted
                        final = event.finish_reason is not None
                        new_text = detokenizer.step(event.token_ids) + (detokenizer.flush() if final else "")
                        text, stopped = stops.feed(new_text, final, check=len(output) >= params.min_tokens)
                        if stopped:
                            reason = "stop"
                            await asyncio.shield(self.router.cancel(rid, "stop"))
                        else:
                            reason = event.finish_reason
                        if reason is not None:
                            timer.finish(reason)
                        yield ChoiceDelta(index, text, offset, event.logprobs, reason, len(output), cached)
                        if reason is not None:
                            return
                    raise RuntimeError("the router's stream ended before the request finished")
                except Exception as exc:
                    if isinstance(exc, APIError) or as_api_error(exc, prep.prompt_field) is not None:
                        raise
                    if attempt == len(self.retry_backoff_s):
                        raise unavailable("The router is unavailable; retry.") from exc
                    log.warning("router failed during %s (%r); resubmitting with %d tokens", rid, unwrap(exc),
                                len(output))
                    with contextlib.suppress(Exception):  # in case it still runs there
                        await asyncio.shield(self.router.cancel(rid, "abort"))
                    await asyncio.sleep(self.retry_backoff_s[attempt])
                    attempt += 1
                    rid = f"{request_id}-retry{attempt}"
        finally:
            if reason is None:  # the client went away, or the request failed: free the slot now
                timer.finish("abort")
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.router.cancel(rid, "abort"))

    async def deltas(self, prep: Prepared, n: int, salt: str | None) -> AsyncIterator[ChoiceDelta]:
        """The n choices (n independent router requests) merged in arrival order. A seeded request
        gives choice i the seed + i, so the choices differ and each is reproducible."""
        if n == 1:  # the common case: no merging task and queue per token event
            async with contextlib.aclosing(self.choice(0, f"{prep.id}-0", prep, prep.params, salt)) as only:
                async for delta in only:
                    yield delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            params = prep.params
            if i and params.seed is not None:
                params = params.model_copy(update={"seed": (params.seed + i) % 2**63})
            try:
                async for delta in self.choice(i, f"{prep.id}-{i}", prep, params, salt):
                    queue.put_nowait(delta)
            except Exception as exc:
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(_CHOICES_DONE)

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        try:
            running = n
            while running:
                item = await queue.get()
                if item is _CHOICES_DONE:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- router -> responses --------------------------------------------------------------------
    async def complete(self, req: ChatCompletionRequest | CompletionRequest, prep: Prepared,
                       salt: str | None) -> Response:
        chat = isinstance(req, ChatCompletionRequest)
        stream = self.deltas(prep, req.n, salt)
        if req.stream:
            first = await self._first(stream, prep)
            return EventStream(self._sse(req, prep, first, stream), source=stream)
        totals = [ChoiceTotal() for _ in range(req.n)]
        try:
            async for d in stream:
                totals[d.index].add(d)
        except Exception as exc:
            raise as_api_error(exc, prep.prompt_field) or exc
        usage = self._usage(len(prep.prompt_ids), sum(t.num_generated for t in totals), totals[0].num_cached)
        if chat:
            choices = [ChatChoice(index=i, message=AssistantMessage(content=t.text), finish_reason=t.finish_reason,
                                  logprobs=self._chat_logprobs(t.logprobs) if req.logprobs else None)
                       for i, t in enumerate(totals)]
            return JSONResponse(ChatCompletionResponse(id=prep.id, model=self.model, choices=choices,
                                                       usage=usage).model_dump())
        choices = [CompletionChoice(index=i, text=t.text, finish_reason=t.finish_reason,
                                    logprobs=self._completion_logprobs(t.logprobs, 0)
                                    if req.logprobs is not None else None)
                   for i, t in enumerate(totals)]
        return JSONResponse(CompletionResponse(id=prep.id, model=self.model, choices=choices,
                                               usage=usage).model_dump())

    async def _first(self, stream: AsyncIterator[ChoiceDelta], prep: Prepared) -> ChoiceDelta:
        """Wait for the first delta before sending headers, so a refusal is still a proper status code."""
        try:
            return await anext(stream)
        except Exception as exc:
            raise as_api_error(exc, prep.prompt_field) or exc

    async def _sse(self, req, prep: Prepared, first: ChoiceDelta,
                   stream: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        chat = isinstance(req, ChatCompletionRequest)
        created = int(time.time())
        generated = [0] * req.n
        cached = 0

        def event(chunk) -> str:
            return f"data: {chunk.model_dump_json()}\n\n"

        def chunk(choices, usage: Usage | None = None):
            cls = ChatCompletionChunk if chat else CompletionResponse
            return event(cls(id=prep.id, created=created, model=self.model, choices=choices, usage=usage))

        def choice(d: ChoiceDelta):
            if chat:
                return ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text), finish_reason=d.finish_reason,
                                       logprobs=self._chat_logprobs(d.logprobs) if req.logprobs else None)
            return CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason,
                                    logprobs=self._completion_logprobs(d.logprobs, d.text_offset)
                                    if req.logprobs is not None else None)

        try:
            if chat:
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                             for i in range(req.n)])
            d = first
            while d is not None:
                generated[d.index], cached = d.num_generated, d.num_cached or cached
                if d.text or d.finish_reason or d.logprobs:
                    yield chunk([choice(d)], self._usage(len(prep.prompt_ids), sum(generated), cached)
                                if req.continuous_usage else None)
                d = await anext(stream, None)
            if req.include_usage:
                yield chunk([], self._usage(len(prep.prompt_ids), sum(generated), cached))
        except Exception as exc:
            error = as_api_error(exc, prep.prompt_field)
            if error is None:
                log.exception("stream %s failed", prep.id)
                error = APIError(500, "Internal server error.", "internal_error")
            yield event(ErrorResponse(error=error.info))
        yield "data: [DONE]\n\n"

    @staticmethod
    def _usage(prompt: int, completion: int, cached: int) -> Usage:
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self._token(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def _chat_logprobs(self, lps: list[TokenLogprobs]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(**self._top(lp.token_id, lp.logprob).model_dump(),
                             top_logprobs=[self._top(t, p) for t, p in lp.top])
            for lp in lps])

    def _completion_logprobs(self, lps: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            token = self._token(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token(t): p for t, p in lp.top})
            out.text_offset.append(offset)
            offset += len(token)
        return out


def build_app(router: RouterClient, tokenizer: Tokenizer, served_model_name: str,
              api_keys: list[str] | None = None) -> FastAPI:
    server = OpenAIServer(router, tokenizer, served_model_name)
    app = FastAPI(title="meshserve", docs_url=None, redoc_url=None)
    app.state.server = server

    async def check_api_key(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and any(secrets.compare_digest(key, k) for k in api_keys)):
            raise APIError(401, "Missing or wrong API key (send `Authorization: Bearer <key>`).",
                           "authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)] if api_keys else [])

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        await server.model_len()
        return await server.complete(req, server.prepare(req, "chatcmpl"), req.cache_salt)

    @v1.post("/completions")
    async def completions(req: CompletionRequest):
        await server.model_len()
        return await server.complete(req, server.prepare(req, "cmpl"), req.cache_salt)

    @v1.get("/models")
    async def models():
        return ModelList(data=[ModelCard(id=served_model_name, max_model_len=await server.model_len())]).model_dump()

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if not (await server.stats())["ready"]:
            raise unavailable("No mesh is live.")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(await server.stats()), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError):
        return _validation_error(exc.errors(), skip_body=True).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return APIError(500, "Internal server error.", "internal_error").response()

    return app


class RouterHandle:
    """RouterClient over a Serve handle to the router deployment."""

    def __init__(self, handle):
        self._handle = handle
        self._streaming = handle.options(stream=True)

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 salt: str | None, output_ids: list[int] = ()) -> AsyncIterator[TokenEvent]:
        return self._streaming.generate.remote(request_id, prompt_ids, params, salt, output_ids)

    async def cancel(self, request_id: str, reason: str = "abort") -> None:
        await self._handle.cancel.remote(request_id, reason)

    async def stats(self) -> dict:
        return await self._handle.stats.remote()


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    """Stateless and freely replicated: builds the app in the replica, around the router's handle."""

    def __init__(self, router_handle, model_dir: str, served_model_name: str, api_keys: list[str] | None = None):
        self._app = build_app(RouterHandle(router_handle), load_tokenizer(model_dir), served_model_name, api_keys)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
