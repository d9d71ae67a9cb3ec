"""The OpenAI endpoints' logic over one router client: a request validated and tokenized into token ids,
the router's token events turned back into text, choices, logprobs and usage (whole or as SSE).

It knows nothing of routes or Serve (`deployments/ingress.py` does), so it runs in tests without Ray.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fastapi.responses import Response
from pydantic import ValidationError

from deployments.errors import APIError, as_api_error, unavailable, unwrap, validation_error
from deployments.json_slices import Spliced
from deployments.logprobs import LogprobsRenderer
from deployments.metrics import Choices, Metrics
from deployments.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                  ChatCompletionRequest, ChatCompletionResponse, ChatMessage, CompletionChoice,
                                  CompletionRequest, CompletionResponse, DeltaMessage, DeltaToolCall, ErrorResponse,
                                  PromptLogprobs, PromptTokensDetails, RepetitionDetection, ResponseToolCall,
                                  TokenizeRequest, Tool, Usage, quoted)
from deployments.request_checks import (MAX_CHARS_PER_TOKEN, MIN_TOKENS_PER_MESSAGE, bad_words_token_ids, chat_chars,
                                        check_allowed, check_prompt_chars, check_token_ids, check_vocab_bounds,
                                        logit_bias)
from deployments.router_client import RouterLost, RouterUnreachable, merged_tokens_max
from deployments.streaming import (KEEPALIVE, TEXT_SLOT, ChoiceDelta, ChoiceText, ChoiceTotal,
                                   ChunkTemplate, Deferred, EventStream, FirstDelta, PromptScores, RepetitionCheck,
                                   TokenOffsets, in_intervals)
from deployments.structured import Constraint, ToolMode, constraint_for, unconstrained
from deployments.tool_calls import (CallDelta, ParsedCall, ToolCallStream, answer_calls, call_id, render_messages,
                                    tool_definitions)
from model.grammar import deep_stack_executor
from model.tokenizer import Tokenizer
from scheduler.errors import MeshFailures
from scheduler.sampling import PackedLogprobs, SamplingParams, TokenLogprobs
from scheduler.scheduler import SHARED_PREFILL_TOKENS
from scheduler.work import TokenEvent

log = logging.getLogger("ray.serve")

# A stream's headers wait this long for its first token, then go out with a keep-alive every keepalive_s
# (AppConfig's sse_keep_alive_interval, SSE_KEEPALIVE_S by default) until it comes (streaming.FirstDelta): a refusal
# is a status code in most cases (429 and too-long prompts come in milliseconds), and the bytes keep proxies' read
# timeouts (nginx, ALB: 60 s) from cutting a long prefill.
STREAM_HEADERS_WAIT_S = 5.0
SSE_KEEPALIVE_S = 15.0
# Past STREAM_HEADERS_WAIT_S, a stream's headers still wait while its request is held (no live mesh, or no router),
# so that its refusal is the 503 with Retry-After that clients retry on: held ends within ~30-46 s (no_mesh_wait_s,
# or the router link's wait and retries), under proxies' 60 s. Whether requests are held is read this often.
SERVING_CHECK_S = 1.0
HELD_HEADERS_MAX_S = 45.0  # and never longer than this in all: outages back to back, a long no_mesh_wait_s
# Waits before each resubmission of a request whose router failed (Serve restarts it meanwhile, ~seconds).
ROUTER_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
# How old the meshes' limit may be before a request refreshes it, off its own path: a mesh that comes back with
# another max_seq_len (another checkout, another KV pool) changes the limit the ingress checks requests against.
MODEL_LEN_REFRESH_S = 5.0
# Until a mesh has come up once (an ingress's start, a redeploy) the limit is unknown: a request waits for one up to
# AppConfig.no_mesh_wait_s (this default is its default), as the router holds requests while no mesh is live, polling
# every MODEL_LEN_POLL_S, then 503. Refused at once, a redeploy under load answered 40 requests 503 in the 0.6 s
# before its first mesh came up.
MODEL_LEN_WAIT_S = 30.0
MODEL_LEN_POLL_S = 0.25
# Tokenizing and chat templating run here, off the event loop, so a 2 MB prompt does not stall every other
# stream of this replica. One pool per process (an ingress replica); tokenizers release the GIL.
INLINE_CHARS = 2000  # prompts up to this many characters are tokenized on the loop (see OpenAIServer.sized)
INLINE_MESSAGES = 1000  # chats of up to this many messages are measured on the loop (OpenAIServer.chat_chars)
# The later choices (n > 1) of a prompt of SHARED_PREFILL_TOKENS or more go to the router once its first choice has its
# first token, when its blocks are in the prefix cache: sent together, each computed the whole prompt (n=3 of 32k
# tokens: 98,304 prefilled, 3 x 9.5 s of a Galaxy; a 128k prompt's is 102 s each). A mesh prefills one user at a time,
# so on one mesh they lose nothing; on an idle other mesh at most this prompt's TTFT (1,024 tokens: 0.16 s on a
# Galaxy). Not without the router's prefix cache (enable_prefix_caching false): they would wait for nothing. (The
# router's scheduler makes a prompt wait so only within one KV group; sent together, choices would be spread over a
# Galaxy's four.)
ANSWER_CHARS_PER_LOGPROB = 60  # ~JSON characters per logprob entry, to size a whole answer's build like a prompt
_TOKENIZER_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="meshserve-tokenize")
# Inputs past BULK_CHARS (up to the 8 MiB body limit: seconds each) take threads of their own, so that a few of
# them queue behind each other, not ahead of every ordinary prompt (4 prompts of 2 MiB held a 3,000-character
# one 28 s).
BULK_CHARS = 65_536
_BULK_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="meshserve-bulk")
# glibc keeps what a thread freed in that thread's arena: the tokenizer's working memory for a long text (~165-240
# bytes per byte of one tokenized whole, ~10 in pieces: Tokenizer.encode) stayed with the replica after its request
# ended (four 6 MB prompts tokenized whole: 0.56 -> 1.8 GB, for good).
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)
GRAMMAR_THREADS = 2
_GRAMMAR_POOL = deep_stack_executor(GRAMMAR_THREADS, "meshserve-grammar")  # clients' grammars compile only here
T = TypeVar("T")


def _trimmed(fn: Callable[..., T], *args) -> T:
    """fn(*args), then the C heap's free memory handed back to the OS (where glibc's malloc_trim exists): after a
    6 MB prompt up to 49 ms, against 1.5 s of tokenizing it in pieces, 6.7 s whole (100 kB: 2.7 ms, 50 ms); a C
    call, so the GIL is free meanwhile."""
    try:
        return fn(*args)
    finally:
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


class RouterClient(Protocol):
    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, salt: str | None,
                 output_ids: list[int] = (), continuation: bool | str = False) -> AsyncIterator[TokenEvent]: ...

    async def cancel(self, request_id: str, reason: str = "abort") -> None: ...

    async def stats(self, report: tuple[str, list] | None = None) -> dict: ...

    def link_down_s(self) -> float: ...


def truncated(ids: list[int], keep: int, side: str, head: int = 0) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (its first on the "right" side). The `head`
    tokens a tokenizer put before a text (its BOS) stay first, as Hugging Face's truncation, which vLLM's is, keeps
    them: a Llama prompt cut without its <|begin_of_text|> is read as if from mid-document."""
    if side == "right":
        return ids[:keep]
    return ids[:head] + ids[max(head, len(ids) - keep + head):]


def request_ids(prefix: str, client_id: str | None) -> tuple[str, str]:
    """The response's id and the router's (its choices are "<router id>-<i>" in the router and on the mesh). The
    router's begins with the response's, so that one grep of the id a client reports (the response's `id`, vLLM's
    `request_id` or X-Request-Id) finds the request in the logs of every process; a random part keeps it unique
    when clients reuse an id, and a character that could forge a log line (a newline) is "?" there. A prefix that
    ends in "_" (the Responses API's "resp_", as OpenAI's ids read) is followed by no "-"; an empty one (a Responses
    request_id, which is the response's id whole, as vLLM's) by nothing."""
    token = uuid.uuid4().hex
    prefix += "" if not prefix or prefix.endswith("_") else "-"
    if client_id is None:
        return f"{prefix}{token}", f"{prefix}{token}"
    response_id = f"{prefix}{client_id}"
    return response_id, "".join(c if c.isprintable() else "?" for c in response_id) + f"-{token[:12]}"


@dataclass
class Prepared:
    """A validated request, ready for the router."""

    id: str  # the response's
    router_id: str  # unique per request: its choices are "<router_id>-<i>" in the router
    prompt_ids: list[int]
    params: SamplingParams
    prompt_field: str
    arrival: float  # perf_counter() when the request reached the ingress
    created: int  # time.time() then, in whole seconds: the answer's `created` (vLLM's), however long it takes
    echo: str = ""  # `echo`: the prompt's text (chat: the final message's, when continued), first in each choice
    tool_mode: ToolMode = "none"  # whether answers are read as tool calls (auto) or must be calls (forced)
    tool_names: tuple[str, ...] = ()  # the tools its answers' calls may name (Constraint.called)
    constraint_param: str | None = None  # the field the request's grammar comes from
    repetition: RepetitionDetection | None = None  # vLLM's repetition_detection, checked here (ChoiceText)
    echo_only: bool = False  # completions' echo with max_tokens 0: the prompt alone, nothing generated
    echo_bos: bool = False  # prompt_ids start with the BOS the tokenizer put before a text: `echo` does not hold it


@dataclass(frozen=True)
class Reply:
    """What writing a request's answer needs of the request, beside its Prepared: an answer being awaited holds this,
    not the request, whose prompt text, messages, tools' definitions and ignored fields are the body's size."""

    chat: bool
    stream: bool
    n: int
    num_logprobs: int | None  # alternatives per token; None: no logprobs
    return_token_ids: bool
    return_tokens_as_token_ids: bool
    include_usage: bool
    continuous_usage: bool
    parallel_tool_calls: bool = True
    named_tool: bool = False  # tool_choice names a function
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field: alternatives per prompt token
    echo_logprobs: bool = False  # completions' echo with logprobs: the logprobs cover the prompt's tokens first
    # a chat answer's role: without add_generation_prompt it continues the final message, and is that message's
    # role, as vLLM's (serving_chat.py, get_chat_request_role)
    role: str = "assistant"
    stream_interval: int = 1  # vLLM's: a stream's chunk of a choice carries this many new tokens (in_intervals)

    @classmethod
    def of(cls, req: ChatCompletionRequest | CompletionRequest) -> Reply:
        chat = isinstance(req, ChatCompletionRequest)
        return cls(chat, req.stream, req.n, req.num_logprobs, req.return_token_ids, req.return_tokens_as_token_ids,
                   req.include_usage, req.continuous_usage, req.parallel_tool_calls if chat else True,
                   chat and req.tool_choice is not None and not isinstance(req.tool_choice, str),
                   req.prompt_logprobs, not chat and req.echo_logprobs,
                   req.messages[-1].role if chat and not req.add_generation_prompt else "assistant",
                   req.stream_interval)


_CHOICES_DONE = object()


@dataclass
class _Refusal:
    """Shared by the choices of one API request: once one is refused before it ran, the others that had not
    started either are not counted as finished requests (the request was refused, not aborted)."""
    refused: bool = False


class OpenAIServer:
    """The endpoints' logic over one router client; `build_app` routes HTTP to it."""

    def __init__(self, router: RouterClient, tokenizer: Tokenizer, served_model_name: str | list[str],
                 replica_name: str = "local", log_requests: bool = False):
        """`log_requests`: vLLM's enable_log_requests, a line at INFO when a request is received and when it
        finishes, is aborted or fails (never its prompt or its text)."""
        self.router = router
        self.log_requests = log_requests
        self.tokenizer = tokenizer
        self.model_names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.model = self.model_names[0]  # the name answered
        self.max_model_len: int | None = None  # the meshes' limit, from the router once one has come up
        # The token ids a request may hold: the tokenizer's, cut to the model's embedding once a mesh reported it. A
        # tokenizer may know more ids than the model has rows (Llama 3.2 Vision's <|image|> is 128256 beside a 70B's
        # 128256 rows): such an id in a prompt would fail the mesh's embedding, and with it every request on it.
        self.vocab_size = tokenizer.vocab_size
        self._model_len_at = 0.0  # when max_model_len was last read (time.monotonic)
        self._model_len_refresh: asyncio.Task | None = None
        self.model_len_wait_s = MODEL_LEN_WAIT_S
        self.prefix_caching = True  # the router's enable_prefix_caching, read with its stats
        self.prompt_logprobs: bool | None = None  # every mesh scores whole prompts (router stats); None: not known
        self._model_len_wait: asyncio.Future | None = None  # the one poll all requests waiting for a mesh share
        self.logprobs = LogprobsRenderer(tokenizer)
        self.metrics = Metrics(replica_name, self.model)
        self.retry_backoff_s = ROUTER_RETRY_BACKOFF_S
        self.headers_wait_s, self.keepalive_s = STREAM_HEADERS_WAIT_S, SSE_KEEPALIVE_S
        self._serving: asyncio.Future[bool] | None = None  # the last check of serving(), or the one under way
        self._serving_at = 0.0
        self._grammar_tokenizer = None
        self._grammar_tokenizer_lock = threading.Lock()

    def grammar_tokenizer(self):
        """llguidance's view of the served tokenizer, built once (~0.2-1 s): by the Serve replica as it starts,
        else at the first constrained request. Locked: the grammar threads of the first constrained requests ask at
        once, and each would build its own."""
        if self._grammar_tokenizer is None:
            with self._grammar_tokenizer_lock:
                if self._grammar_tokenizer is None:
                    from model.grammar import ll_tokenizer
                    self._grammar_tokenizer = ll_tokenizer(self.tokenizer)
        return self._grammar_tokenizer

    # ---- readiness ------------------------------------------------------------------------------
    async def stats(self, report: tuple[str, list] | None = None) -> dict:
        """The router's stats; 503 while the router cannot be reached (it is starting or restarting). `report`: this
        replica's own metric families, at a scrape (Router.stats)."""
        try:
            stats = await (self.router.stats(report) if report is not None else self.router.stats())
        except Exception as exc:
            log.warning("router stats failed: %r", unwrap(exc))
            raise unavailable("The model is not ready yet.") from None
        if stats.get("max_model_len") is not None:
            self.max_model_len, self._model_len_at = stats["max_model_len"], time.monotonic()
        if stats.get("vocab_size") is not None:
            self.vocab_size = min(self.tokenizer.vocab_size, stats["vocab_size"])
        self.prefix_caching = stats.get("enable_prefix_caching", True)
        if stats.get("prompt_logprobs") is not None:
            self.prompt_logprobs = stats["prompt_logprobs"]
        return stats

    async def model_len(self) -> int:
        """The longest prompt + answer the meshes take (their capabilities and KV pools, as the router
        reports them); until a mesh has come up once, it waits up to model_len_wait_s for one while the router
        answers, then 503. Older than MODEL_LEN_REFRESH_S, it is read again in the background (this request goes on
        with the last value; a router that does not answer keeps it)."""
        if self.max_model_len is None:
            if self._model_len_wait is None or self._model_len_wait.done():
                self._model_len_wait = asyncio.ensure_future(self._wait_model_len())
            await asyncio.shield(self._model_len_wait)
            if self.max_model_len is None:
                raise unavailable("The model is not ready yet.")
        elif time.monotonic() - self._model_len_at > MODEL_LEN_REFRESH_S and self._model_len_refresh is None:
            self._model_len_refresh = asyncio.ensure_future(self._refresh_model_len())
        return self.max_model_len

    async def _wait_model_len(self) -> None:
        """Reads the router's stats until a mesh has reported its limit, or model_len_wait_s has passed; a router
        that cannot be reached is a 503 at once, as before (its link has its own wait, see router_client). Never past
        HELD_HEADERS_MAX_S, whatever no_mesh_wait_s: a stream's headers wait for it, and a proxy's read timeout (60 s)
        would cut the stream before its 503. Ends without an error (model_len raises it): its requests may all have
        left, and then no one would read it."""
        deadline = time.monotonic() + min(self.model_len_wait_s, HELD_HEADERS_MAX_S)
        while True:
            try:
                await self.stats()
            except APIError:  # unreachable: logged by stats
                return
            if self.max_model_len is not None or time.monotonic() >= deadline:
                return
            await asyncio.sleep(MODEL_LEN_POLL_S)

    async def _refresh_model_len(self) -> None:
        try:
            with contextlib.suppress(APIError):
                await self.stats()
        finally:
            self._model_len_refresh = None

    # ---- requests -> token ids -----------------------------------------------------------------
    @staticmethod
    async def off_loop(fn: Callable[..., T], *args, chars: int = 0) -> T:
        """CPU-heavy work (tokenizing, templating, decoding a long list) on the tokenizer threads; on the bulk
        threads when its input has more than BULK_CHARS characters."""
        if chars > BULK_CHARS:
            return await asyncio.get_running_loop().run_in_executor(_BULK_POOL, _trimmed, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_POOL, fn, *args)

    async def sized(self, chars: int, fn: Callable[..., T], *args, bulk: bool = True) -> T:
        """fn(*args) on the loop when its input is small (tokenizing 2,000 characters takes ~0.1-0.3 ms,
        a hop to a thread and back ~1 ms of TTFT on this box), else off_loop (never on the bulk threads
        without `bulk`: work that must not queue behind huge prompts)."""
        return fn(*args) if chars <= INLINE_CHARS else await self.off_loop(fn, *args, chars=chars if bulk else 0)

    async def chat_chars(self, req: ChatCompletionRequest | TokenizeRequest) -> tuple[int, str]:
        """chat_chars(req), off the loop for a chat of many messages: 200,000 empty ones (6.6 MB) take ~120 ms to
        count, which stood every stream of the replica still."""
        if len(req.messages) <= INLINE_MESSAGES:
            return chat_chars(req)
        least = len(req.messages) * MIN_TOKENS_PER_MESSAGE * MAX_CHARS_PER_TOKEN  # what chat_chars counts at least
        return await self.off_loop(chat_chars, req, chars=least)

    def check_model(self, model: str | None) -> None:
        """404 for another model's name; none or "" means the served one (as vLLM takes it)."""
        if model and model not in self.model_names:
            raise APIError(404, f"The model `{quoted(model)}` does not exist; this server serves `{self.model}`.",
                           param="model", code="model_not_found")

    def encode_messages(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                        tools: list[Tool] | None = None, template_kwargs: dict | None = None,
                        add_special_tokens: bool = False, continue_final_message: bool = False) -> list[int]:
        """A chat's prompt ids, by the model's template, with `tools` offered to the model;
        `add_special_tokens` puts the model's BOS before the template's own tokens (vLLM's field);
        `continue_final_message` ends them inside the final message, for the answer to continue it."""
        tokenizer = self.tokenizer
        takes_tools = tokenizer.template_takes_tools
        rendered = render_messages(messages, tools, takes_tools)
        definitions = tool_definitions(tools) if tools and takes_tools else None
        if tokenizer.chat_template is not None:
            self._no_special_text_beside_content(messages, rendered if takes_tools else [], definitions,
                                                 template_kwargs)
        try:
            ids = tokenizer.encode_chat(rendered, add_generation_prompt, definitions, template_kwargs,
                                        continue_final_message)
        except Exception as exc:  # the model's template refuses these messages (e.g. roles out of order)
            raise APIError(400, f"messages: {exc}", param="messages") from None
        return [tokenizer.bos_id, *ids] if add_special_tokens and tokenizer.bos_id is not None else ids

    def _no_special_text_beside_content(self, messages: list[ChatMessage], rendered: list[dict],
                                        definitions: list[dict] | None, template_kwargs: dict | None) -> None:
        """A message's content keeps special-token text as text (Tokenizer.encode_template), but what a template
        writes of a message's name or a tool result's call id, of a call in the history (`rendered`: the messages
        as rendered for a template that renders calls, arguments parsed, so JSON escapes such as \\u003c are undone
        as the template's tojson undoes them), a tool definition or a template variable would be read as control
        tokens: "x<|eot_id|><|start_header_id|>system..." there forges a turn. Such text is a 400 naming the field."""
        fields = [(f"messages.{i}.{key}", text) for i, m in enumerate(messages)  # as render_messages passes them
                  for key, text in (("name", m.name), ("tool_call_id", m.tool_call_id if m.role == "tool" else None))
                  if text is not None]
        fields += [(f"messages.{i}.tool_calls.{j}.function.{key}", json.dumps(c["function"][key], ensure_ascii=False))
                   for i, m in enumerate(rendered) for j, c in enumerate(m.get("tool_calls") or ())
                   for key in ("name", "arguments")]
        fields += [(f"tools.{i}.function", json.dumps(d["function"], ensure_ascii=False))
                   for i, d in enumerate(definitions or ())]
        if template_kwargs:
            fields.append(("chat_template_kwargs", json.dumps(template_kwargs, ensure_ascii=False)))
        for name, text in fields:
            if (special := self.tokenizer.special_text(text)) is not None:
                raise APIError(400, f"{name}: special-token text ({special}) is only kept as text in a message's "
                                    "content; here the chat template would read it as a control token",
                               param=name)

    async def prompt_ids(self, req: ChatCompletionRequest | CompletionRequest, limit: int,
                         constraint: Constraint) -> tuple[list[int], str]:
        """The prompt's token ids, and the field it came from. Text far too long for `limit` tokens is
        refused without tokenizing it, unless truncate_prompt_tokens asks for part of it only (the body limit
        still bounds the work)."""
        truncated = req.truncate_prompt_tokens is not None
        if isinstance(req, ChatCompletionRequest):
            chars, field = await self.chat_chars(req)
            if not truncated:
                check_prompt_chars(chars, limit, field, self.tokenizer.max_token_chars, len(req.messages))
            tools = constraint.tools or None  # offered with tool_choice "none" too, as OpenAI and vLLM do
            args = (self.encode_messages, req.messages, req.add_generation_prompt, tools, req.chat_template_kwargs,
                    req.add_special_tokens, req.continue_final_message)
            # a tool list is always templated off the loop, as are template variables: `chars` leaves them out (a
            # template may ignore them), yet one may write them whole (Llama 3.x's date_string: 2 MB took ~6 s)
            plain = tools is None and not req.chat_template_kwargs
            ids = await (self.sized(chars, *args) if plain else self.off_loop(*args, chars=chars))
            return ids, "messages"  # the text a later error (a token without embedding) may be in
        if isinstance(req.prompt, str):
            if not truncated:
                check_prompt_chars(len(req.prompt), limit, "prompt", self.tokenizer.max_token_chars)
            ids = await self.sized(len(req.prompt), self.tokenizer.encode, req.prompt, req.add_special_tokens)
            return ids, "prompt"
        return req.prompt, "prompt"  # token ids: the length is checked first, then the vocabulary

    # ---- requests -> router ---------------------------------------------------------------------
    async def constraint(self, req: ChatCompletionRequest | CompletionRequest) -> Constraint:
        """The request's tools and structured-output grammar, compiled off the loop when there is any."""
        if unconstrained(req):  # nothing to compile
            return constraint_for(req, self.grammar_tokenizer)
        return await asyncio.get_running_loop().run_in_executor(_GRAMMAR_POOL, constraint_for, req,
                                                                self.grammar_tokenizer)

    async def prepare(self, req: ChatCompletionRequest | CompletionRequest, prefix: str,
                      constraint: Constraint | None = None, like: Prepared | None = None) -> Prepared:
        """`constraint`: already compiled for this request (a batch's prompts share one). `like`: a prompt of the same
        batch, prepared: its sampling params are this one's but for max_tokens, so they are not checked, tokenized
        and sorted again for each prompt (256 prompts with 49,152 allowed_token_ids held the loop ~1.5 s)."""
        self.check_model(req.model)
        arrival, created = time.perf_counter(), int(time.time())
        limit = await self.model_len()
        if req.num_prompt_logprobs is not None and self.prompt_logprobs is False:
            param = req.prompt_logprobs_param
            raise APIError(400, f"{param}: the prompt's logprobs are not available on this deployment (its backend's "
                                f"prefill gives only the last position's logits)", param=param)
        if like is None:
            check_vocab_bounds(req, self.vocab_size)
            bias = logit_bias(req, self.vocab_size)
        if constraint is None:
            constraint = await self.constraint(req)
        if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens > limit:  # as vLLM refuses it
            raise APIError(400, f"truncate_prompt_tokens ({req.truncate_prompt_tokens}) is greater than the model's "
                                f"maximum context length ({limit}).", param="truncate_prompt_tokens")
        prompt_ids, prompt_field = await self.prompt_ids(req, limit, constraint)
        text_bos = (isinstance(req, CompletionRequest) and isinstance(req.prompt, str) and bool(req.add_special_tokens)
                    and self.tokenizer.bos_id is not None)  # the tokenizer's, before a text
        whole = len(prompt_ids)
        if req.truncate_prompt_tokens is not None:  # vLLM's: the prompt's last k tokens, or its first ("right")
            # -1: what leaves room for max_tokens (vLLM's max_input_tokens); the whole context left room for none
            keep = (max(1, limit - (req.requested_max_tokens or 0)) if req.truncate_prompt_tokens == -1
                    else req.truncate_prompt_tokens)
            prompt_ids = truncated(prompt_ids, keep, req.truncation_side, int(text_bos))
        n = len(prompt_ids)
        if n >= limit:  # also to score it (max_tokens 0, echo): vLLM's v1 _validate_prompt_len refuses it as well
            room = (f"at most {limit - 1} tokens can be scored (max_tokens 0 with echo), as in vLLM"
                    if req.requested_max_tokens == 0
                    else f"leaving no room for an answer: shorten it to under {limit} tokens")
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {n}, "
                                f"{room}.", param=prompt_field, code="context_length_exceeded")
        if isinstance(req, CompletionRequest) and not isinstance(req.prompt, str):
            check_token_ids(prompt_ids, self.vocab_size, "prompt")
        elif prompt_ids and max(prompt_ids) >= self.vocab_size:  # text the tokenizer knows and the model does not
            top = next(t for t in prompt_ids if t >= self.vocab_size)
            raise APIError(400, f"{prompt_field}: the text holds {self.tokenizer.decode([top])!r} (token {top}), "
                                f"which this model has no embedding for (its vocabulary is {self.vocab_size} tokens)",
                           param=prompt_field)
        max_tokens, param = req.requested_max_tokens, req.max_tokens_param
        if isinstance(req, CompletionRequest) and req.max_completion_tokens not in (None, max_tokens):
            raise APIError(400, f"max_completion_tokens ({req.max_completion_tokens}) differs from max_tokens "
                                f"({max_tokens}): /v1/completions takes max_tokens", param="max_completion_tokens")
        echo_only = max_tokens == 0
        if echo_only and not req.echo:  # OpenAI's legacy API and vLLM (echo_without_generation) take 0 with echo only
            raise APIError(400, "max_tokens: must be at least 1 (0 only with echo: the prompt alone)", param=param)
        if max_tokens is None:
            max_tokens = limit - n
        elif n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {n} and "
                                f"{param} asks for {max_tokens} more: ask for at most {limit - n}.", param=param,
                           code="context_length_exceeded")
        if req.min_tokens > max_tokens:  # also when max_tokens is not given but the room left in the context
            room = (f"{param} ({max_tokens})" if req.requested_max_tokens is not None
                    else f"the {max_tokens} tokens the prompt leaves in the context")
            raise APIError(400, f"min_tokens ({req.min_tokens}) exceeds {room}.", param="min_tokens")
        if like is not None:
            params = like.params.model_copy(update={"max_tokens": max(max_tokens, 1)})
        else:
            params = await self.sampling_params(req, max(max_tokens, 1), bias, constraint)
        echo = ""
        echo_bos = text_bos and prompt_ids[:1] == [self.tokenizer.bos_id]
        if isinstance(req, CompletionRequest) and req.echo:
            # ids, or a text truncate_prompt_tokens cut: the tokens the model read, decoded as /detokenize decodes
            # them (the answer continues them and logprobs list them; vLLM echoes the whole text, where they are not)
            read = prompt_ids[int(echo_bos):]
            echo = (req.prompt if isinstance(req.prompt, str) and len(prompt_ids) == whole
                    else await self.sized(len(read) * 4, self.tokenizer.decode, read))
        elif isinstance(req, ChatCompletionRequest) and req.echo and (
                req.messages[-1].role == "assistant" or not req.add_generation_prompt):
            echo = req.messages[-1].text  # vLLM's: the final message, when the answer continues it (same role)
        response_id, router_id = request_ids(prefix, req.request_id)
        repetition = req.repetition_detection
        repetition = repetition if repetition and repetition.max_pattern_size else None  # 0: off
        # a call is read by its tool's name alone (tool_calls.py): a definition, up to the body's size, is not kept
        called = tuple(t.function.name for t in constraint.called)
        return Prepared(response_id, router_id, prompt_ids, params,
                        prompt_field, arrival, created, echo, constraint.tool_mode, called, constraint.param,
                        repetition, echo_only, echo_bos)

    async def sampling_params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int,
                              bias: dict[int, float], constraint: Constraint) -> SamplingParams:
        """The request's sampling params, with its logit_bias, grammar and bad words (as token ids)."""
        words = req.bad_words or []
        bad_words = await self.sized(sum(map(len, words)), bad_words_token_ids, self.tokenizer, words)
        if not req.detokenize and constraint.tool_mode != "none":
            raise APIError(400, "detokenize: tool calls are read from the answer's text; set tool_choice to "
                                "\"none\" or detokenize to true", param="detokenize")
        try:
            params = req.sampling_params(max_tokens, tuple(sorted(self.tokenizer.stop_ids)),
                                         self.tokenizer.sampling_defaults)
            if params.top_k > self.vocab_size:  # every token, as vLLM takes it (a device's top-k never sees it)
                params = params.model_copy(update={"top_k": self.vocab_size})
            if params.allowed_token_ids:
                check_allowed(params.allowed_token_ids, bad_words, params.stop_token_ids if req.min_tokens else ())
            if bias or constraint.grammar is not None or bad_words:
                params = params.model_copy(update={"logit_bias": bias, "grammar": constraint.grammar,
                                                   "bad_words_token_ids": bad_words})
        except ValidationError as exc:  # a rule the checks above missed: still the client's 400, never a 500
            raise validation_error(exc.errors(), skip_body=False) from None
        return params

    async def prepare_all(self, req: CompletionRequest, prefix: str) -> list[Prepared]:
        """One Prepared per prompt of a completion's batch (one for a single prompt), each checked and
        sized on its own, as if it came alone."""
        if (prompts := req.prompts) == [req.prompt]:  # a single prompt, not a batch of one
            return [await self.prepare(req, prefix)]
        constraint = await self.constraint(req)  # the grammar does not depend on the prompt: compiled once
        preps = []
        for i, p in enumerate(prompts):
            try:
                preps.append(await self.prepare(req.model_copy(update={"prompt": p}), prefix, constraint,
                                                preps[0] if preps else None))
            except APIError as exc:
                if exc.info.param == "prompt" or exc.info.code == "context_length_exceeded":  # say which one
                    message = exc.info.message.removeprefix("prompt: ")
                    exc.info.message = f"prompt[{i}]: {message}"
                raise
        return preps

    async def choice(self, index: int, request_id: str, prep: Prepared, params: SamplingParams,
                     salt: str | None, refusal: _Refusal | None = None,
                     choices: Choices | None = None, sibling: bool | str = False,
                     held_s: float = 0.0) -> AsyncIterator[ChoiceDelta]:
        """One router request, as text. Cancels it in the router unless it finished.

        When the router fails mid-request (its replica died), the request is resubmitted, to the router
        Serve restarts, as a continuation: the same prompt and params with the tokens received so far. The
        client sees a pause, then the rest; greedy and seeded output is unchanged (the sampler is keyed on
        (seed, position)). Once every wait of retry_backoff_s is spent with no token between two losses, it is a
        503: a loss after new tokens starts the waits again (a long answer outlives any number of router restarts,
        rolling redeploys included; each needs a token, so it ends)."""
        if prep.echo_only and params.prompt_logprobs is None:  # nothing to generate: the router is not asked (vLLM's
            # echo_without_generation); with the prompt's logprobs it is, for one token, which the answer leaves out
            self.metrics.start(len(prep.prompt_ids), prep.arrival, choices).finish("length")
            yield ChoiceDelta(index, "", [], [], "length", 0, 0)
            return
        prompt_ids = prep.prompt_ids
        timer = self.metrics.start(len(prompt_ids), prep.arrival, choices, held_s)
        skipped = self.tokenizer.special_id_set if params.skip_special_tokens else frozenset()
        offsets = TokenOffsets(self.tokenizer, skipped) if params.logprobs is not None else None
        if offsets is not None:
            offsets.chars = len(prep.echo)  # completions' echo: the answer's text follows the prompt's
        # the prompt's logprobs, kept across recomputes and router restarts until the first delta carries them
        scores = PromptScores(prompt_ids, params.prompt_logprobs) if params.prompt_logprobs is not None else None
        rep = prep.repetition
        answer = ChoiceText(self.tokenizer, prompt_ids, params.stop, params.min_tokens, offsets,
                            params.include_stop_str_in_output, params.stop_token_ids, params.skip_special_tokens,
                            params.detokenize,
                            rep and RepetitionCheck(rep.max_pattern_size, rep.min_pattern_size, rep.min_count))
        cached = 0
        reason: str | None = None
        ended = "abort"  # how a request that does not finish is counted: "abort" when its client left, "error" when it
        # failed here (the mesh failed it, the router was lost for good); not at all when it was refused before it ran
        # (queue full, too long, no mesh or router), as vLLM counts
        refusal = refusal or _Refusal()
        started = False
        # sent to a router once: a resubmission is a continuation, which no queue limit refuses; so is a later choice
        # sent once its first had a token (`sibling`, OpenAIServer.deltas): its request was admitted then; one sent
        # with it names it (a str), and passes the limits if the router admitted it
        submitted = sibling
        rid, attempt, retries = request_id, 0, 0  # attempt: the next wait of retry_backoff_s
        if self.log_requests:  # vLLM's "Received request" line (vllm/entrypoints/logger.py), without the prompt
            log.info("Received request %s: prompt_tokens %d, max_tokens %d.", rid, len(prompt_ids), params.max_tokens)
        try:
            while True:
                at_submit = len(answer.output)
                try:
                    async for event in self.router.generate(rid, prompt_ids, params, salt, list(answer.output),
                                                            continuation=submitted):
                        started = True
                        if event.prompt_logprobs and scores is not None:
                            for part in event.prompt_logprobs:
                                scores.add(part)
                            if not event.token_ids and event.finish_reason is None:  # a prefill chunk's, alone
                                continue
                        cached = event.num_cached_tokens or cached
                        failed = event.finish_reason in ("error", "grammar_error", "constraint_error")
                        if failed:
                            ended = "error"
                        if prep.echo_only and not failed:  # its one token was made for the prompt's logprobs only
                            text, starts, taken, cut = "", [], 0, "length"
                        else:
                            text, starts, taken, cut = answer.feed(event.token_ids, event.finish_reason is not None
                                                                   and not failed, event.finish_reason == "stop")
                        timer.on_event(event, taken)  # not those after an end found here (usage has none)
                        stopped = cut is not None  # here, not by the mesh: the router still runs it
                        reason = cut or (None if failed else event.finish_reason)
                        if reason is not None:
                            at = event.arrived  # when it reached the replica, not when a slow client read it
                            timer.finish(reason, at)  # before any await: a client gone meanwhile is still counted
                            if self.log_requests:
                                log.info("Finished request %s: finish_reason %s, prompt_tokens %d, completion_tokens "
                                         "%d, cached_tokens %d, %.3f s.", rid, reason, len(prompt_ids),
                                         len(answer.output), cached, at - prep.arrival)
                        if stopped and event.finish_reason is None:  # the router lets go of it with its last event
                            await self._cancel(rid, "stop")  # never raises: the answer has ended, not to be resent
                        if not failed or text:
                            eos = None if params.ignore_eos else self.tokenizer.eos_id
                            stop_reason = (answer.stop_reason(eos) if reason == "stop" else
                                           "repetition_detected" if reason == "repetition" else None)  # vLLM's
                            scored = None
                            if scores is not None and not failed:  # the first delta: every prompt position is in
                                if not scores.complete:
                                    raise APIError(500, f"The prompt's logprobs came up to position {scores.scored} "
                                                        f"of {len(prompt_ids)}.", "internal_error")
                                scored, scores = scores, None
                            yield ChoiceDelta(index, text, event.logprobs[:taken], starts, reason, len(answer.output),
                                              cached, stop_reason, event.token_ids[:taken], scored)
                        if failed and not stopped:
                            if event.finish_reason == "grammar_error":  # llguidance gave up on the client's grammar
                                param = prep.constraint_param
                                raise APIError(400, f"{param}: {event.error}; a simpler one may work", param=param)
                            if event.finish_reason == "constraint_error":  # e.g. allowed_token_ids all bad words
                                param = _constraint_field(params, prep.constraint_param)
                                raise APIError(400, f"{param}: {event.error} (with the request's other "
                                                    f"constraints)", param=param)
                            raise APIError(500, f"The model failed on this request: {event.error}", "internal_error")
                        if reason is not None:
                            return
                    raise ConnectionError("the router's stream ended before the request finished")
                except Exception as exc:
                    if isinstance(unwrap(exc), MeshFailures):  # it ran, and failed: not refused
                        ended = "error"
                        raise
                    refused = isinstance(exc, APIError) or as_api_error(exc, prep.prompt_field) is not None
                    lost = not refused and isinstance(unwrap(exc), ConnectionError)  # else this request's own fault
                    if lost and not isinstance(unwrap(exc), RouterUnreachable):
                        submitted = True
                    if lost and len(answer.output) > at_submit:  # it went on before this loss: a new outage
                        attempt = 0
                    if not lost or attempt == len(self.retry_backoff_s):
                        if not started and (refused or lost) and not refusal.refused:  # once per API request
                            refusal.refused = True
                            self._count_rejected(exc, lost, prep.prompt_field)
                        if lost:
                            raise unavailable("The router is unavailable; retry.") from exc
                        raise
                    # a broken link's one line says how many it fails and resubmits (RouterLink._run): a line each
                    # here as well, at every router restart, only with log_requests (a router of 32 meshes holds
                    # ~1,000); its subclass RouterUnreachable (no link to send on) is in no such line: logged here
                    if self.log_requests or type(unwrap(exc)) is not RouterLost:
                        log.warning("router failed during %s (%r); resubmitting with %d tokens", rid, unwrap(exc),
                                    len(answer.output))
                    await self._cancel(rid, "abort")  # in case it still runs there
                    await asyncio.sleep(self.retry_backoff_s[attempt])
                    attempt, retries = attempt + 1, retries + 1
                    rid = f"{request_id}-retry{retries}"
        except (asyncio.CancelledError, GeneratorExit):  # its client left (or another choice of its request failed)
            if self.log_requests and reason is None:
                log.info("Aborted request %s after %d tokens.", rid, len(answer.output))
            raise
        except Exception as exc:
            ended = "error"  # not its client's doing: error-rate alerts must see it
            if self.log_requests:
                error = exc if isinstance(exc, APIError) else as_api_error(exc, prep.prompt_field)
                log.info("Request %s failed: %s", rid,
                         f"{error.status} {error.info.message}" if error else repr(unwrap(exc)))
            raise
        finally:
            if reason is None:  # the client went away, or the request failed: free the slot now
                if started or not refusal.refused:
                    timer.finish(ended)
                await self._cancel(rid, "abort")

    async def _cancel(self, request_id: str, reason: str) -> None:
        """Cancel `request_id` in the router, even if the caller is cancelled meanwhile. A cancel that fails is dropped:
        the router's link broke, and the router that had the request is gone with it."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self.router.cancel(request_id, reason))

    def _count_rejected(self, exc: BaseException, lost: bool, prompt_field: str) -> None:
        """A refusal for want of capacity (queue full, no live mesh or router) counts in /metrics; a request
        refused for its own content (too long) is the client's error, not the server's load."""
        error = exc if isinstance(exc, APIError) else as_api_error(exc, prompt_field)
        reason = ("unavailable" if lost or (error is not None and error.status == 503) else
                  "queue_full" if error is not None and error.info.code == "queue_full" else None)
        if reason is not None:
            self.metrics.rejected.labels(self.metrics.ingress, reason).inc()

    async def deltas(self, preps: list[Prepared], n: int, salt: str | None,
                     interval: int = 1) -> AsyncIterator[ChoiceDelta]:
        """The n choices of each prompt (independent router requests) merged in arrival order; choice i of
        prompt p has index p * n + i. A seeded request gives choice i the seed + i, so the choices differ
        and each is reproducible. `interval`: vLLM's stream_interval, each choice's deltas `interval` tokens at a
        time (in_intervals), which the merging below for a lagging reader joins in whole intervals only."""
        prep = preps[0]

        def choice_deltas(index: int, i: int, prep: Prepared, params: SamplingParams,
                          *args) -> AsyncIterator[ChoiceDelta]:
            deltas = self.choice(index, f"{prep.router_id}-{i}", prep, params, salt, *args)
            return in_intervals(deltas, interval) if interval > 1 else deltas

        # The common case: no merging task and queue per token event. An answer the ingress itself ends (a stop string,
        # repetition_detection) takes the task: read only as its client reads, it would run on past its end.
        if len(preps) == n == 1 and not (prep.params.stop or prep.repetition):
            async with contextlib.aclosing(choice_deltas(0, 0, prep, prep.params)) as only:
                async for delta in only:
                    yield delta
            return
        queue: asyncio.Queue = asyncio.Queue()
        refusal = _Refusal()
        # Each choice's delta not yet taken, which its next merges into: while the client does not read, a choice
        # holds its text in a few deltas, not one per token, and is still read on, so that a stop string still
        # cancels it in the router (a choice that waited for the reader ran on past it to max_tokens). A delta that
        # waits holds its logprobs as PackedLogprobs, as a lagging reader's events do (EventQueue).
        unread: dict[int, ChoiceDelta] = {}

        async def pump(prep: Prepared, index: int, i: int, choices: Choices, first_token: asyncio.Future) -> None:
            params = prep.params
            most = merged_tokens_max(params)
            if i and params.seed is not None:
                params = params.model_copy(update={"seed": (params.seed + i) % 2**64})
            sibling: bool | str = first_id if index else False  # passes the limits where the first choice did
            held_s = 0.0  # its wait here for the first choice's first token: queue time, as it counts as waiting
            try:
                if i and len(prep.prompt_ids) >= SHARED_PREFILL_TOKENS and self.prefix_caching \
                        and params.prompt_logprobs is None:  # a scored prompt reuses nothing: each computes it all
                    # its first choice's first token: the prompt is cached, and the request admitted, whose queue
                    # limits do not refuse the rest of it (shielded: a waiter cancelled must not cancel it for all).
                    # Waiting here it is in no router queue: num_requests_waiting counts it (Metrics), as vLLM would.
                    self.metrics.deferred.inc()
                    held_since = time.perf_counter()
                    try:
                        sibling = await asyncio.shield(first_token)
                    except asyncio.CancelledError:  # its client left (or another choice failed): aborted, as vLLM
                        if not refusal.refused:  # counts each child; not when the request was refused (choice())
                            self.metrics.start(len(prep.prompt_ids), prep.arrival, choices).finish("abort")
                        raise
                    finally:
                        self.metrics.deferred.dec()
                        held_s = time.perf_counter() - held_since
                async for delta in choice_deltas(index, i, prep, params, refusal, choices, sibling, held_s):
                    if not first_token.done():
                        first_token.set_result(True)
                    last = unread.get(index)
                    # within the bound; with a stream_interval, whole intervals alone (not into the choice's first
                    # token, nor the finish's rest), so that a lagging reader's chunks are still N tokens at a time
                    if last is not None and len(last.token_ids) + len(delta.token_ids) <= most and (interval == 1 or (
                            last.num_generated > len(last.token_ids) and delta.finish_reason is None)):
                        if delta.logprobs and not isinstance(last.logprobs, PackedLogprobs):
                            last.logprobs = PackedLogprobs(last.logprobs)
                        last.merge(delta)
                    else:
                        if delta.logprobs and not queue.empty():  # it waits behind another
                            delta.logprobs = PackedLogprobs(delta.logprobs)
                        unread[index] = delta
                        queue.put_nowait(delta)
            except Exception as exc:
                queue.put_nowait(exc)
            finally:
                if not first_token.done():  # it ended without a token (refused, failed, cancelled)
                    first_token.set_result(False)
                queue.put_nowait(_CHOICES_DONE)

        first_id = f"{preps[0].router_id}-0"  # the request's first choice, sent first: the others follow its lead
        groups = [Choices(n) for _ in preps]  # per prompt, as vLLM takes each prompt of a batch as a request
        # per prompt: whether its first choice had a token, once it has or ended (SHARED_PREFILL_TOKENS)
        first_tokens = [asyncio.get_running_loop().create_future() for _ in preps]
        tasks = [asyncio.create_task(pump(prep, p * n + i, i, groups[p], first_tokens[p]))
                 for p, prep in enumerate(preps) for i in range(n)]
        try:
            running = len(tasks)
            while running:
                if not queue.empty():  # a reader catching up, or a client gone (its sends return at once under
                    # spec 2.3): the loop runs between two deltas, as EventQueue.get lets it, so the replica's
                    # other streams go on and the client's going ends this one, not the whole backlog rendered first
                    await asyncio.sleep(0)
                item = await queue.get()
                if item is _CHOICES_DONE:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    if unread.get(item.index) is item:
                        del unread[item.index]
                    if isinstance(item.logprobs, PackedLogprobs):  # taken: a list again, as every reader takes it
                        item.logprobs = item.logprobs[:]
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- router -> responses --------------------------------------------------------------------
    def complete(self, req: ChatCompletionRequest | CompletionRequest, preps: list[Prepared],
                 salt: str | None) -> Deferred:
        """The answer to a request of one prompt, or (completions) a batch: `preps` holds one per prompt. Awaited as
        it is sent, from the request's Reply: the request and its body are let go meanwhile."""
        return Deferred(self._answer(Reply.of(req), preps, salt))

    async def _answer(self, reply: Reply, preps: list[Prepared], salt: str | None) -> Response:
        chat = reply.chat
        prep = preps[0]  # the response's id, and the field errors name
        stream = self.deltas(preps, reply.n, salt, reply.stream_interval if reply.stream else 1)
        if reply.stream:
            first = await self.first_delta(stream, prep)
            return EventStream(self._sse(reply, preps, first, stream), first, self.keepalive_s)
        totals = [ChoiceTotal() for _ in range(len(preps) * reply.n)]
        try:
            async for d in stream:
                totals[d.index].add(d)
        except Exception as exc:
            raise as_api_error(exc, prep.prompt_field) or exc
        usage = self._usage(sum(len(p.prompt_ids) for p in preps), sum(t.num_generated for t in totals),
                            sum(totals[p * reply.n].num_cached for p in range(len(preps))))
        # Built on a thread when large: n = 16 answers of 2,000 tokens with 20 top_logprobs each are 670,000
        # entries, seconds of CPU during which every other stream of this replica would stand still.
        entries = sum(len(t.logprobs) for t in totals) * (1 + (reply.num_logprobs or 0))
        if reply.echo_logprobs or reply.prompt_logprobs is not None:
            entries += sum(len(p.prompt_ids) for p in preps) * reply.n * (
                2 + (reply.num_logprobs or 0) + (reply.prompt_logprobs or 0))
        build = self._chat_answer if chat else self._completion_answer
        body = await self.sized(entries * ANSWER_CHARS_PER_LOGPROB, build, reply, preps, totals, usage, bulk=False)
        return Response(body, media_type="application/json")

    def _chat_answer(self, reply: Reply, preps: list[Prepared], totals: list[ChoiceTotal], usage: Usage) -> bytes:
        """The chat completion's JSON, from every choice's totals; each choice's logprobs written a slice per call."""
        prep = preps[0]
        ids, as_ids = reply.return_token_ids, reply.return_tokens_as_token_ids
        lists = Spliced()
        choices = []
        for i, t in enumerate(totals):
            calls, whole = (answer_calls(t.text, prep.tool_names, prep.tool_mode == "forced", reply.parallel_tool_calls)
                            if prep.tool_mode != "none" else (None, False))
            message = (AssistantMessage(role=reply.role, content=prep.echo or None,
                                        tool_calls=[_tool_call(c) for c in calls])
                       if calls else AssistantMessage(role=reply.role, content=prep.echo + t.text))
            reason = _finish_reason(t.finish_reason, whole, reply)
            choices.append(ChatChoice(index=i, message=message, finish_reason=reason, stop_reason=t.stop_reason,
                                      logprobs=self.logprobs.spliced_chat(t.logprobs, as_ids, lists)
                                      if reply.num_logprobs is not None else None,
                                      token_ids=t.token_ids if ids else None))
        envelope = ChatCompletionResponse(id=prep.id, created=prep.created, model=self.model, choices=[], usage=usage,
                                          prompt_token_ids=prep.prompt_ids if ids else None)
        if reply.prompt_logprobs is not None and totals and totals[0].prompt_logprobs is not None:
            envelope.prompt_logprobs = self.logprobs.spliced_prompt(totals[0].prompt_logprobs,
                                                                    reply.prompt_logprobs, lists)
        return lists.fill(_with_choices(envelope.model_dump_json(warnings=False).encode(),
                                        [c.model_dump_json(warnings=False).encode() for c in choices]))

    def _completion_answer(self, reply: Reply, preps: list[Prepared], totals: list[ChoiceTotal],
                           usage: Usage) -> bytes:
        """The completion's JSON (one choice per prompt and n), from every choice's totals; each choice's logprobs
        written a slice per call."""
        ids, as_ids = reply.return_token_ids, reply.return_tokens_as_token_ids
        lists = Spliced()
        choices = []
        for i, t in enumerate(totals):
            prep = preps[i // reply.n]
            lps, offsets = self._echoed(reply, prep, t.prompt_logprobs, t.logprobs, t.token_offsets)
            choice = CompletionChoice(index=i, text=prep.echo + t.text, finish_reason=t.finish_reason,
                                      stop_reason=t.stop_reason,
                                      logprobs=self.logprobs.spliced_completion(lps, offsets, as_ids, lists)
                                      if reply.num_logprobs is not None else None,
                                      prompt_token_ids=prep.prompt_ids if ids else None,
                                      token_ids=t.token_ids if ids else None)
            if reply.prompt_logprobs is not None and t.prompt_logprobs is not None:  # set, not validated: ours
                choice.prompt_logprobs = self.logprobs.spliced_prompt(t.prompt_logprobs, reply.prompt_logprobs,
                                                                      lists)
            choices.append(choice)
        envelope = CompletionResponse(id=preps[0].id, created=preps[0].created, model=self.model, choices=[],
                                      usage=usage)
        return lists.fill(_with_choices(envelope.model_dump_json().encode(),
                                        [c.model_dump_json(warnings=False).encode() for c in choices]))

    async def first_delta(self, stream: AsyncIterator[ChoiceDelta], prep: Prepared) -> FirstDelta:
        """Wait up to headers_wait_s for the first delta before sending headers, so a refusal is still a proper
        status code (FirstDelta says why not longer), and on while requests are held (SERVING_CHECK_S says why).
        Raises APIError when the stream failed by then."""
        first = FirstDelta(stream)
        deadline = time.monotonic() + HELD_HEADERS_MAX_S - (time.perf_counter() - prep.arrival)  # from its arrival

        def left() -> float:  # the cap: no wait for a held request runs past it
            return max(0.0, deadline - time.monotonic())

        try:
            came = await first.came(self.headers_wait_s)
            while not came and left() > 0 and not await self.serving_within(left()):
                came = await first.came(min(SERVING_CHECK_S, left()))
        except asyncio.CancelledError:
            await first.aclose()
            raise
        if came:
            try:
                first.result()
            except Exception as exc:
                raise as_api_error(exc, prep.prompt_field) or exc
        return first

    async def serving_within(self, wait_s: float) -> bool:
        """serving(), or False when it has not answered within `wait_s` (a held stream's cap is near)."""
        try:
            return await asyncio.wait_for(self.serving(), wait_s)  # serving() shields the shared read
        except asyncio.TimeoutError:
            return False

    async def serving(self) -> bool:
        """Whether the router answers and has a live mesh, i.e. requests are computed rather than held; read at most
        once per SERVING_CHECK_S for all requests of this replica."""
        if self._serving is None or (self._serving.done() and time.monotonic() - self._serving_at > SERVING_CHECK_S):
            self._serving_at = time.monotonic()
            self._serving = asyncio.ensure_future(self._read_serving())
        return await asyncio.shield(self._serving)

    async def _read_serving(self) -> bool:
        """False when the router does not answer: unavailable, a timeout, or a read cancelled under it. Serve raises
        asyncio.CancelledError from a handle call Ray cancelled, and Ray cancels a request's child calls with it
        (recursively: this shared read is a child of the request that began it, whose client may leave); ended
        cancelled, this read cancelled every stream of the replica waiting on it, as if each client had left."""
        read = asyncio.ensure_future(self.stats())
        try:
            await asyncio.wait((read,), timeout=SERVING_CHECK_S)  # raises only when this task itself is cancelled
        except BaseException:
            read.cancel()
            raise
        if not read.done():
            read.cancel()
            return False
        if read.cancelled() or read.exception() is not None:
            return False
        return bool(read.result().get("ready"))

    async def _sse(self, reply: Reply, preps: list[Prepared], first: FirstDelta,
                   stream: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        chat = reply.chat
        prep = preps[0]
        created = prep.created  # not now: after the first delta, a long prefill later
        generated = [0] * (len(preps) * reply.n)
        prompt_tokens = sum(len(p.prompt_ids) for p in preps)
        cached = [0] * len(preps)  # per prompt
        # completions' echo goes with each choice's first chunk; a chat's comes in a chunk of its own
        echo = [p.echo for p in preps for _ in range(reply.n)] if not chat else [""] * reply.n
        ids, as_ids = reply.return_token_ids, reply.return_tokens_as_token_ids
        logprobs = reply.num_logprobs is not None
        prompt_ids = [p.prompt_ids if ids else None for p in preps for _ in range(reply.n)]  # completions: likewise
        tool_streams = ([ToolCallStream(prep.tool_names, prep.tool_mode == "forced", reply.parallel_tool_calls)
                         for _ in range(reply.n)]
                        if chat and prep.tool_mode != "none" else None)

        def event(chunk) -> str:
            return f"data: {chunk.model_dump_json()}\n\n"

        def chunk(choices, usage: Usage | None = None, prompt: list[int] | None = None,
                  prompt_logprobs: PromptLogprobs | None = None):
            if chat:
                out = ChatCompletionChunk(id=prep.id, created=created, model=self.model, choices=choices,
                                          usage=usage, prompt_token_ids=prompt)
                out.prompt_logprobs = prompt_logprobs  # set, not validated: ours
                return event(out)
            return event(CompletionResponse(id=prep.id, created=created, model=self.model, choices=choices,
                                            usage=usage))

        def choice(d: ChoiceDelta):
            if chat:
                content, reason, calls = d.text, d.finish_reason, None
                if tool_streams is not None:
                    content, pieces, called = tool_streams[d.index].feed(d.text, d.finish_reason is not None)
                    calls = [_call_delta(p) for p in pieces] or None
                    reason = _finish_reason(reason, called, reply)
                return ChatChunkChoice(index=d.index, delta=DeltaMessage(content=content or None if calls else content,
                                                                         tool_calls=calls),
                                       finish_reason=reason, stop_reason=d.stop_reason,
                                       logprobs=self.logprobs.chat(d.logprobs, as_ids) if logprobs else None,
                                       token_ids=d.token_ids if ids else None)
            text, echo[d.index] = echo[d.index] + d.text, ""
            prompt, prompt_ids[d.index] = prompt_ids[d.index], None
            lps, offsets = self._echoed(reply, preps[d.index // reply.n], d.prompt_logprobs, d.logprobs,
                                        d.token_offsets)
            out = CompletionChoice(index=d.index, text=text, finish_reason=d.finish_reason, stop_reason=d.stop_reason,
                                   logprobs=self.logprobs.completion(lps[:], offsets, as_ids) if logprobs else None,
                                   prompt_token_ids=prompt, token_ids=d.token_ids if ids else None)
            if reply.prompt_logprobs is not None and d.prompt_logprobs is not None:  # the choice's first chunk
                out.prompt_logprobs = self.logprobs.prompt(d.prompt_logprobs, reply.prompt_logprobs)
            return out

        # Most chunks carry text alone: they come from a template per choice (see ChunkTemplate).
        templated = tool_streams is None and not logprobs and not ids and reply.prompt_logprobs is None
        templates: dict[int, ChunkTemplate] = {}
        scored_sent = False  # chat: the prompt's logprobs went out (with the first content chunk to carry them)

        def text_chunk(d: ChoiceDelta) -> str:
            template = templates.get(d.index)
            if template is None:
                template = templates[d.index] = ChunkTemplate(chunk([choice(
                    ChoiceDelta(d.index, TEXT_SLOT, [], [], None, 0, 0))]))
            return template.render(d.text, running(d) if reply.continuous_usage else None)

        def running(d: ChoiceDelta) -> tuple[int, int, int]:
            """vLLM's continuous usage: the chunk's own choice and its prompt, not the whole request's."""
            return len(preps[d.index // reply.n].prompt_ids), d.num_generated, d.num_cached

        try:
            if not first.task.done():  # the headers go out with bytes; EventStream keeps the stream alive until
                yield KEEPALIVE  # the first delta
            d = await first.delta()
            # A chat's role chunks come with its first token, as vLLM's do: `vllm bench serve` (as most benchmarks)
            # takes the first chunk with choices for the first token, and sent at the headers' wait (5 s) they cut
            # its time to first token there.
            if chat:  # one choice a chunk, as vLLM and OpenAI send them (a client may read choices[0] alone)
                opening = self._usage(prompt_tokens, 0, 0) if reply.continuous_usage else None
                for i in range(reply.n):
                    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role=reply.role, content=""))], opening,
                                prep.prompt_ids if ids else None)
                for i in range(reply.n if prep.echo else 0):  # in chunks of their own, as vLLM sends it
                    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=prep.echo))], opening)
            while d is not None:
                generated[d.index] = d.num_generated
                if chat and scored_sent and d.prompt_logprobs is not None:  # the response's, not a choice's: once,
                    d.prompt_logprobs = None  # as a whole answer has them (each choice scored the prompt)
                if d.num_cached and d.index % reply.n == 0:  # a prompt's cache hit, counted once
                    cached[d.index // reply.n] = d.num_cached
                if templated and d.text and d.finish_reason is None and not echo[d.index]:
                    yield text_chunk(d)
                elif (d.text or d.finish_reason or d.logprobs or echo[d.index] or (ids and d.token_ids)
                      or d.prompt_logprobs is not None):
                    scored = None
                    if d.prompt_logprobs is None:
                        c = choice(d)
                    else:  # the prompt's logprobs: a 128k-token prompt's are millions of entries, made off the loop
                        size = len(d.prompt_logprobs.prompt_ids) * ANSWER_CHARS_PER_LOGPROB * (
                            2 + (reply.num_logprobs or 0) + (reply.prompt_logprobs or 0))
                        c = await self.sized(size, choice, d, bulk=False)
                        if chat and reply.prompt_logprobs is not None:
                            scored = await self.sized(size, self.logprobs.prompt, d.prompt_logprobs,
                                                      reply.prompt_logprobs, bulk=False)
                            scored_sent = True
                    if not (chat and c.delta.content == "" and not c.delta.tool_calls and c.finish_reason is None
                            and c.logprobs is None and c.token_ids is None and scored is None):  # a tool call's text
                        # is held back: no empty chunk per token, unless it carries the tokens asked for
                        usage = self._usage(*running(d)) if reply.continuous_usage else None
                        if chat and c.delta.tool_calls and len(c.delta.tool_calls) > 1:
                            # one call a chunk, as OpenAI and vLLM stream them: LlamaIndex reads a delta's first
                            # call only, and lost the others' ids and names (calls that came in one router event)
                            *before, last = c.delta.tool_calls
                            for call in before:
                                yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(tool_calls=[call]))],
                                            usage)
                            c.delta.tool_calls = [last]
                        if chat and c.finish_reason is not None and c.delta.tool_calls:
                            # the finish in a chunk of its own, as OpenAI's: openai-python's stream helper says a
                            # call is done at the finish only if its deltas came before (a call in the finish chunk
                            # had no `tool_calls.function.arguments.done`)
                            finish = ChatChunkChoice(index=c.index, delta=DeltaMessage(content=""),
                                                     finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                            c.finish_reason = c.stop_reason = None
                            yield chunk([c], usage, prompt_logprobs=scored)
                            c, scored = finish, None
                        yield chunk([c], usage, prompt_logprobs=scored)
                d = await anext(stream, None)
            if reply.include_usage:
                yield chunk([], self._usage(prompt_tokens, sum(generated), sum(cached)))
        except Exception as exc:
            error = as_api_error(exc, prep.prompt_field)
            if error is None:
                log.exception("stream %s failed", prep.router_id)  # printable, as every line of its id
                error = APIError(500, "Internal server error.", "internal_error")
            yield event(ErrorResponse(error=error.info))
        yield "data: [DONE]\n\n"

    @staticmethod
    def _usage(prompt: int, completion: int, cached: int) -> Usage:
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def _echoed(self, reply: Reply, prep: Prepared, scores: PromptScores | None, lps: Sequence[TokenLogprobs],
                offsets: list[int]) -> tuple[Sequence[TokenLogprobs], list[int]]:
        """A choice's logprobs and text offsets, the prompt's first with completions' echo and logprobs (as vLLM's):
        the prompt's tokens, each with its logprob and the `logprobs` likeliest (the first with none), at offsets in
        the echoed text; then the answer's, whose offsets already follow it."""
        if not reply.echo_logprobs or scores is None:
            return lps, offsets
        packed = scores.packed(reply.num_logprobs)
        packed.extend(lps)
        # the echoed prompt keeps its special tokens' text (as given, or decoded with them): skip_special_tokens
        # shapes the answer's text alone; a BOS the tokenizer added before a text holds none of it
        bos = [0] if prep.echo_bos else []
        return packed, bos + TokenOffsets(self.tokenizer, frozenset()).add(prep.prompt_ids[len(bos):]) + offsets


def _with_choices(envelope: bytes, choices: list[bytes]) -> bytes:
    """A response's JSON, its empty `choices` filled with each choice's own JSON. One pydantic call holds the GIL
    for all it serializes, so on a worker thread too it stalls the event loop: n = 16 answers of 500 tokens with
    20 top_logprobs, serialized whole, held every other stream of the replica ~400 ms; by choice, 1/n of that.
    (No string value can hold the marker: JSON escapes each quote in one.)"""
    head, marker, tail = envelope.partition(b'"choices":[]')
    assert marker, "the response has no empty choices list"
    return b"".join((head, b'"choices":[', b",".join(choices), b"]", tail))


def _constraint_field(params: SamplingParams, grammar_param: str | None) -> str:
    """The field a constraint_error names: the first of the request's token masks, else its grammar's, else
    min_tokens (its stop ids masked)."""
    for field, used in (("allowed_token_ids", params.allowed_token_ids), ("bad_words", params.bad_words_token_ids)):
        if used:  # logit_bias never is the cause: its biases are finite
            return field
    return grammar_param or "min_tokens"


def _tool_call(call: ParsedCall) -> ResponseToolCall:
    return ResponseToolCall(id=call_id(), function={"name": call.name, "arguments": call.arguments})


def _call_delta(piece: CallDelta) -> DeltaToolCall:
    """A call's first piece with its id, type and name; later ones with more arguments only."""
    if piece.name is None:
        return DeltaToolCall(index=piece.index, function={"arguments": piece.arguments})
    return DeltaToolCall(index=piece.index, id=call_id(), type="function",
                         function={"name": piece.name, "arguments": piece.arguments})


def _finish_reason(reason: str | None, called: bool, reply: Reply) -> str | None:
    """"tool_calls" when the answer ended as whole calls (`called`; a call cut by a stop string keeps "stop",
    as one cut by max_tokens keeps "length": its arguments are no JSON to run), except for a named tool_choice:
    OpenAI and vLLM say "stop" there (the call was asked for, not chosen; vllm-project/vllm#49496)."""
    return "tool_calls" if called and reason == "stop" and not reply.named_tool else reason
