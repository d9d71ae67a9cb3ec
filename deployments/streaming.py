"""Streaming helpers: stop strings over streamed text, per-choice deltas, the SSE response, and responses made as
they are sent."""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field

import numpy as np
from fastapi.responses import Response, StreamingResponse

from model.tokenizer import IncrementalDetokenizer, Tokenizer
from scheduler.sampling import MIN_LOGPROB, PackedLogprobs, PromptLogprobs, TokenLogprobs


class StopStrings:
    """Finds stop strings in streamed text. Until the answer ends, the last (longest stop - 1)
    characters are held back: they might be the start of a stop string that the next token completes. Not with
    include_stop: the stop is then sent with the text before it, so nothing sent could be taken back (vLLM's
    stop_buffer_length is 0 then). Only the tail a stop may start in is kept (`text`, at most `keep` characters
    between feeds), so a token's work does not grow with the answer: appending to the whole text copied it at
    every token, quadratic in its length."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop
        self.keep = max(map(len, stops), default=1) - 1
        self.hold = 0 if include_stop else self.keep  # characters not sent until the next feed
        self.text = ""  # the answer's last characters: those held back, and those a stop may start in
        self.emitted = 0  # of `text`, the leading characters already sent
        self.matched: str | None = None  # the stop string that ended the answer

    def feed(self, delta: str, final: bool, check: bool = True) -> tuple[str, bool]:
        """Text that is safe to send now, and whether a stop string ended the answer (the text before
        it is all that remains, or up to its end with include_stop). `check` is False while min_tokens are
        not yet generated. A stop counts only where it ends in `delta`: each is searched from its own length - 1
        before it (vLLM's check_stop_strings), so a short stop wholly in the text held for a longer one, written
        before the check was on, does not end the answer. Of two stops that the same text completes, the one listed
        first ends the answer, as in vLLM (not the one that starts first)."""
        if not self.stops:  # nothing held back, nothing to find: what every answer without stop strings takes
            return delta, False
        old = len(self.text)
        self.text += delta
        if check:
            for stop in self.stops:  # the first listed that the text now holds, wherever another starts (as vLLM)
                if (start := self.text.find(stop, max(0, old - len(stop) + 1))) != -1:
                    self.matched = stop
                    self.text = self.text[:start + len(stop) if self.include_stop else start]
                    return self._take(len(self.text)), True
        return self._take(len(self.text) if final else len(self.text) - self.hold), False

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        cut = min(end, max(0, len(self.text) - self.keep))  # sent, and too far back for a stop to start in
        self.text, self.emitted = self.text[cut:], end - cut
        return out


class TokenOffsets:
    """Where each token's text starts in a choice's whole text: the characters that the bytes of the tokens
    before it complete. Counted from the tokens' own bytes, not from the text sent, so the offsets stay right
    while a stop string holds text back; the tokens of one emoji all start where it does. Special tokens
    add no text (the answer's text skips them)."""

    def __init__(self, tokenizer: Tokenizer, special_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_ids: Sequence[int]) -> list[int]:
        offsets = []
        for token_id in token_ids:
            if token_id in self.special_ids:
                offsets.append(self.chars)
                continue
            try:
                data = self.tokenizer.token_bytes(token_id)
            except ValueError:  # an id past the tokenizer's vocabulary (a padded logits row) adds no text
                data = b""
            pending = self._utf8.getstate()[0]  # a character's first bytes, not yet written
            # a token that does not go on with them starts after the U+FFFD they become (written with its text)
            offsets.append(self.chars + (len(pending.decode("utf-8", "replace"))
                                         if pending and data and not _continues(pending, data[0]) else 0))
            self.chars += len(self._utf8.decode(data))
        return offsets


def _continues(pending: bytes, byte: int) -> bool:
    """Whether `byte` can follow `pending`, the first bytes of a UTF-8 character."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + bytes([byte]))
    except UnicodeDecodeError:
        return False
    return True


class PromptScores:
    """One choice's prompt logprobs, as the meshes send them a prefill chunk at a time (PromptLogprobs), in arrays
    of the prompt's length: each position is kept once, however often a recompute sends it again (a preemption, a
    mesh failing mid-prefill, a router restart), and `complete` says no position is missing."""

    def __init__(self, prompt_ids: list[int], num_logprobs: int):
        n = len(prompt_ids)
        self.prompt_ids = prompt_ids
        self.logprobs = np.full(n, np.nan, np.float32)  # position 0: none (nothing comes before it)
        self.ranks = np.zeros(n, np.int32)
        self.top_ids = np.zeros((n, num_logprobs), np.int32)
        self.top_logprobs = np.zeros((n, num_logprobs), np.float32)
        self.scored = 1  # positions [0, scored) are in

    def add(self, part: PromptLogprobs) -> None:
        """Raises RuntimeError for a part that would leave a gap (a recompute that skipped positions)."""
        start, end = part.start, part.end
        if start > self.scored:
            raise RuntimeError(f"prompt logprobs from position {start} came before those of {self.scored}")
        self.logprobs[start:end] = part.logprobs
        self.ranks[start:end] = part.ranks
        self.top_ids[start:end] = part.top_ids
        self.top_logprobs[start:end] = part.top_logprobs
        self.scored = max(self.scored, end)

    @property
    def complete(self) -> bool:
        return self.scored >= len(self.prompt_ids)

    def packed(self, num_logprobs: int) -> PackedLogprobs:
        """The prompt's tokens as completions' echo lists them, each with its num_logprobs likeliest: position 0's
        logprob is NaN (written as null, with null top_logprobs)."""
        n, k = len(self.prompt_ids), num_logprobs
        out = PackedLogprobs()
        out.token_ids.frombytes(np.asarray(self.prompt_ids, np.int64).tobytes())
        out.logprobs.frombytes(np.maximum(self.logprobs, MIN_LOGPROB).astype(np.float64).tobytes())  # NaN stays
        out.logprobs[0] = float("nan")
        out.top_ids.frombytes(self.top_ids[1:, :k].astype(np.int64).tobytes())
        out.top_logprobs.frombytes(np.maximum(self.top_logprobs[1:, :k], MIN_LOGPROB).astype(np.float64).tobytes())
        out.top_ends.frombytes((np.arange(n, dtype=np.int64) * k).tobytes())  # position 0 has none
        return out


class RepetitionCheck:
    """vLLM's repetition_detection over an answer's tokens, one token at a time. A pattern of L tokens repeated
    c times ends the answer exactly when each of its last L x (c - 1) tokens equals the token L before it, so
    one run length per L is kept (numpy over all L at once: O(max_pattern_size) per token, none of it Python)
    instead of vLLM's scan of the tail for every L. Same verdicts as vllm/v1/core/sched/utils.py
    check_sequence_repetition (tests/test_repetition_detection.py compares them)."""

    def __init__(self, max_pattern_size: int, min_pattern_size: int, min_count: int):
        self.sizes = np.arange(max(min_pattern_size, 1), max_pattern_size + 1)
        # a run is never longer than the answer: past 2^31 every min_count gives the same verdicts (never), and
        # int64 neither wraps nor overflows
        self.need = self.sizes * min(min_count - 1, 2**31)
        self.runs = np.zeros(len(self.sizes), dtype=np.int64)
        self.last = np.full(max_pattern_size + 1, -1, dtype=np.int64)  # the last tokens, a ring; -1: none yet
        self.count = 0

    def add(self, token: int) -> bool:
        """Take the answer's next token; whether the answer now ends in a repeated pattern."""
        before = self.last[(self.count - self.sizes) % len(self.last)]  # the token L back, for each L
        self.runs = np.where(before == token, self.runs + 1, 0)
        self.last[self.count % len(self.last)] = token
        self.count += 1
        return bool((self.runs >= self.need).any())


class ChoiceText:
    """One choice's tokens as text for the client: detokenized, stop strings found once more than min_tokens
    are generated, token by token even when an event carries several (the router merges a request's tokens
    until its next flush); nothing after a stop is kept. `output` holds the tokens taken so far. Without
    `detokenize` the text stays empty (vLLM's detokenize false; no stop strings then)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...], min_tokens: int,
                 offsets: TokenOffsets | None, include_stop: bool = False, stop_token_ids: tuple[int, ...] = (),
                 skip_special: bool = True, detokenize: bool = True, repetition: RepetitionCheck | None = None):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special) if detokenize else None
        if offsets is not None and self.detokenizer is not None:  # the prompt's tokens whose text is the answer's
            offsets.add(self.detokenizer.carried)
        self.stops = StopStrings(stop, include_stop)
        self.min_tokens = min_tokens
        self.offsets = offsets
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_token: int | None = None  # the stop token id that ended the answer
        self.repetition = repetition
        self.output: list[int] = []

    def feed(self, token_ids: list[int], final: bool, stop_finish: bool = False
             ) -> tuple[str, list[int], int, str | None]:
        """Take an event's tokens (`final`: the answer ends with them; `stop_finish`: the mesh ended it with
        finish_reason "stop"). Returns the text safe to send, where each taken token's text starts (with
        offsets), how many tokens were taken, and "stop" when a stop string ended the answer or "repetition"
        when repetition_detection did (the tokens after the one that ended it are dropped), else None. A stop
        token that ended the answer counts as a token but adds no text unless include_stop_str_in_output (vLLM's
        v1 detokenizer leaves it out the same way). As in vLLM, the mesh's own end (a stop token, the length)
        comes before a repetition on the same token, and a stop string before both."""
        texts: list[str] = []
        starts: list[int] = []
        ended: str | None = None
        taken = 0
        last = len(token_ids) - 1
        for i, token in enumerate(token_ids):
            taken += 1
            self.output.append(token)
            if self.offsets is not None:
                starts += self.offsets.add([token])
            repeated = (self.repetition is not None and self.repetition.add(token)
                        and len(self.output) >= self.min_tokens and not (final and i == last))
            if stop_finish and i == last and token in self.stop_token_ids:
                self.stop_token = token
                if not self.stops.include_stop:
                    break
            if self.detokenizer is not None:
                text, stopped = self.stops.feed(self.detokenizer.step([token]), False, self._check())
                texts.append(text)
                if stopped:
                    ended = "stop"
                    break
            if repeated:  # vLLM's check_stop: once min_tokens are generated
                ended = "repetition"
                break
        if (final or ended == "repetition") and ended != "stop" and self.detokenizer is not None:
            text, stopped = self.stops.feed(self.detokenizer.flush(), True, self._check())  # what was held back
            texts.append(text)
            ended = "stop" if stopped else ended
        return "".join(texts), starts, taken, ended

    def stop_reason(self, eos_id: int | None) -> str | int | None:
        """vLLM's `stop_reason` of an answer that ended with finish_reason "stop": the stop string that
        ended it, else the stop token id it ended on, except `eos_id` (None; vLLM's v1 engine/detokenizer
        and SamplingParams.stop_token_ids, which also takes generation_config's extra EOS ids, so Llama 3's
        <|eot_id|> comes back as 128009). The caller passes eos_id None under ignore_eos: the EOS then ends
        an answer only as a stop_token_ids entry, and vLLM reports it."""
        if self.stops.matched is not None:
            return self.stops.matched
        return self.stop_token if self.stop_token != eos_id else None

    def _check(self) -> bool:
        """Stop strings count from the token after the first min_tokens, as stop ids do (the runner masks
        them until then) and as vLLM does (v1 detokenizer: `len(output_token_ids) > min_tokens`)."""
        return len(self.output) > self.min_tokens


@dataclass
class ChoiceDelta:
    """What one choice gained: text ready for the client, with the logprobs of its new tokens."""

    index: int
    text: str
    logprobs: list[TokenLogprobs] | PackedLogprobs  # packed while it waits for its reader (OpenAIServer.deltas)
    token_offsets: list[int]  # with logprobs: where each new token's text starts in the choice's whole text
    finish_reason: str | None
    num_generated: int  # tokens so far
    num_cached: int  # prompt tokens the prefix cache served
    stop_reason: str | int | None = None  # with finish_reason "stop": the stop string or token id (vLLM)
    token_ids: list[int] = field(default_factory=list)  # the tokens taken (`text` came from them; a stop's included)
    prompt_logprobs: PromptScores | None = None  # the choice's first delta, when the prompt was scored: all of it

    def merge(self, later: ChoiceDelta) -> None:
        """Append a later delta of the same choice (one its reader has not taken yet)."""
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.text += later.text
        self.logprobs += later.logprobs
        self.token_offsets += later.token_offsets  # offsets in the whole text: they stay as they are
        self.token_ids += later.token_ids
        self.finish_reason, self.num_generated, self.num_cached = (later.finish_reason, later.num_generated,
                                                                   later.num_cached)
        self.stop_reason = later.stop_reason


async def in_intervals(deltas: AsyncIterator[ChoiceDelta], interval: int) -> AsyncIterator[ChoiceDelta]:
    """One choice's deltas as vLLM's stream_interval sends them (its output processor's rule): a delta goes out when
    nothing has gone yet, when it finishes, or once `interval` tokens came since the last went, with all of them (more,
    where one router event brought several, as a vLLM step that makes several tokens); until then they merge. A
    failure sends what was held first, so that the text before it is the default stream's."""
    held: ChoiceDelta | None = None
    sent = 0  # the tokens gone out
    async with contextlib.aclosing(deltas):
        try:
            async for d in deltas:
                if held is not None:
                    held.merge(d)
                    d, held = held, None
                if sent == 0 or d.finish_reason is not None or d.num_generated - sent >= interval:
                    sent = d.num_generated
                    if isinstance(d.logprobs, PackedLogprobs):
                        d.logprobs = d.logprobs[:]
                    yield d
                else:
                    if d.logprobs and not isinstance(d.logprobs, PackedLogprobs):  # held as a lagging reader's are
                        d.logprobs = PackedLogprobs(d.logprobs)
                    held = d
        except Exception:
            if held is not None:
                if isinstance(held.logprobs, PackedLogprobs):
                    held.logprobs = held.logprobs[:]
                yield held
            raise


@dataclass
class ChoiceTotal:
    """A whole choice, for a non-streaming answer. Its text is kept as the deltas' pieces, joined when read
    (`text`, at the end): appending each to the whole copied it at every token."""

    pieces: list[str] = field(default_factory=list)
    logprobs: PackedLogprobs = field(default_factory=PackedLogprobs)
    token_offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated: int = 0
    num_cached: int = 0
    stop_reason: str | int | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: PromptScores | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, d: ChoiceDelta) -> None:
        self.prompt_logprobs = self.prompt_logprobs or d.prompt_logprobs
        self.pieces.append(d.text)
        self.token_ids += d.token_ids
        self.logprobs.extend(d.logprobs)
        self.token_offsets += d.token_offsets
        self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
        self.num_generated = d.num_generated
        self.num_cached = d.num_cached


# Blank lines: an empty event, which SSE parsers dispatch as nothing (WHATWG HTML, "Server-sent events", 9.2.6),
# and which line readers skip as blank. Not an SSE comment (": keep-alive"): `vllm bench serve`'s completions
# reader (and llmperf's) takes every non-blank line for "data: " + JSON, and failed the request.
KEEPALIVE = "\n\n"
KEEPALIVE_BYTES = KEEPALIVE.encode()


class FirstDelta:
    """A stream's first delta, awaited apart from the stream's response. A stream's headers wait for it, so that a
    refusal is still a status code (429, 503), but only for a while: a long prompt's first token comes after a
    long prefill (a Galaxy's, of 128k tokens, after ~90-100 s), past a proxy's read timeout (nginx: 60 s). Then
    the headers go out, and EventStream's keep-alives every `keepalive_s` until the delta comes; a refusal after
    that is an error event, as in vLLM's streams (whose headers go out at once)."""

    def __init__(self, stream: AsyncIterator):
        self.stream = stream
        self.task = asyncio.ensure_future(anext(stream))
        # retrieved however the response ends (one never started would log "exception was never retrieved")
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def came(self, wait_s: float) -> bool:
        """Whether the first delta (or the stream's failure) came within `wait_s`."""
        try:
            await asyncio.wait({self.task}, timeout=wait_s)
        except asyncio.CancelledError:  # the client went away: the task must not outlive its request
            await self.aclose()
            raise
        return self.task.done()

    def result(self):
        """The first delta; raises what the stream raised."""
        return self.task.result()

    async def delta(self):
        """The first delta, once it comes; raises what the stream raised."""
        if not self.task.done():
            await asyncio.wait({self.task})
        return self.task.result()

    async def aclose(self) -> None:
        """Cancel the wait for the first delta (the stream's own cleanup runs), then close the stream."""
        if not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.stream.aclose()


class Deferred(Response):
    """A response made as it is sent. An endpoint that returns one at once, holding only what its answer needs, lets
    go of its request while the answer is awaited (streamed or not: seconds, or minutes in a queue): FastAPI keeps the
    body's bytes, its parse and the request model until the endpoint returns, its whole size for a request the router
    counts in tokens. An error raised before the answer's response starts reaches the app's exception handlers as
    the endpoint's own would (fastapi/routing.py's request_response, like Starlette's, handles both)."""

    def __init__(self, answer: Awaitable[Response]):
        super().__init__()
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        response = await self.answer
        await response(scope, receive, send)


class EventStream(StreamingResponse):
    """SSE that closes its source however the response ends (Starlette leaves the body iterator open when the
    client goes away; closing the source at once cancels the router requests behind it), and that sends a
    keep-alive whenever it has sent nothing for `keepalive_s`: a long prefill before the first token (a Galaxy's 128k
    prompt: ~90-100 s), or a pause mid-answer (its mesh failed: the answer is prefilled again on another; its router
    restarted: ~41-46 s), is longer than a proxy's read timeout (nginx, ALB: 60 s), which would cut the stream. One
    timer per stream, re-armed per `keepalive_s`: a chunk costs a store, not a timer."""

    media_type = "text/event-stream"
    # For what stands in front: nginx buffers a proxied answer unless told not to (the chunks then came all at once,
    # at the end), and an event stream is not to be cached.
    HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    def __init__(self, content: AsyncIterator[str], source: AsyncIterator | FirstDelta, keepalive_s: float):
        super().__init__(content, headers=self.HEADERS)
        self.source, self.keepalive_s = source, keepalive_s
        self._sent_at = 0.0  # loop time the last bytes were sent (or began to be)
        self._sending = False  # a chunk's send is under way (a slow reader: flow control holds it)
        self._comment: asyncio.Task | None = None  # a keep-alive's send, awaited before the next chunk's
        self._timer: asyncio.TimerHandle | None = None
        self._streamer: asyncio.Task | None = None  # the task in stream_response, while it is there

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.source.aclose()

    async def stream_response(self, send) -> None:
        """Starlette's, with the keep-alive: it goes out from a timer, so a chunk waits for it to be sent (two sends
        never overlap). A keep-alive's send that raises ends the stream at once, with its error."""
        loop = asyncio.get_running_loop()
        self._streamer = asyncio.current_task()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self._sent_at = loop.time()
        self._timer = loop.call_at(self._sent_at + self.keepalive_s, self._tick, loop, send)
        try:
            async for chunk in self.body_iterator:
                if self._comment is not None:
                    await self._comment
                    self._comment = None
                self._sending = True
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                self._sending, self._sent_at = False, loop.time()
            if self._comment is not None:
                await self._comment
            self._sending = True  # the last send may wait for the reader too: no comment beside it, or after it
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            refused = self._refusal()
            if refused is not None and self._cancelled_here():
                raise refused from None
            raise
        finally:
            self._streamer = None
            self._timer.cancel()
            comment = self._comment
            if comment is not None and not comment.done():
                comment.cancel()
            elif comment is not None and not comment.cancelled():
                comment.exception()  # retrieved: the stream's own error says why it ended

    def _tick(self, loop: asyncio.AbstractEventLoop, send) -> None:
        """Send a keep-alive if nothing went out for keepalive_s (bytes on their way count as sent), and come back when
        the next one is due."""
        now, due = loop.time(), self._sent_at + self.keepalive_s
        if now >= due:
            if not self._sending and self._comment is None:
                self._comment = loop.create_task(send({"type": "http.response.body", "body": KEEPALIVE_BYTES,
                                                       "more_body": True}))
                self._comment.add_done_callback(self._sent_comment)
                self._sent_at = now
            due = now + self.keepalive_s
        self._timer = loop.call_at(due, self._tick, loop, send)

    def _refusal(self) -> BaseException | None:
        """What a keep-alive's failed send raised (a failed one stays in _comment, and no other follows it)."""
        comment = self._comment
        return comment.exception() if comment is not None and comment.done() and not comment.cancelled() else None

    def _cancelled_here(self) -> bool:
        """Whether _sent_comment alone cancelled the stream (its cancel taken back). Task.uncancel is 3.11+; a Galaxy
        host may run 3.10, where a cancel from outside in the same instant is taken for ours: the stream ends with
        the keep-alive's error rather than a cancel, ended either way."""
        uncancel = getattr(self._streamer, "uncancel", None)
        return uncancel() == 0 if uncancel is not None else True

    def _sent_comment(self, task: asyncio.Task) -> None:
        """A send that failed stays, to raise in the stream, and ends it now: the stream may wait long for its next
        chunk (a re-prefill: ~100 s), and under ASGI spec 2.4, where nothing listens for the client's going, a send's
        OSError is how that is seen (under 2.3 Starlette's listen_for_disconnect sees it first)."""
        if task.cancelled() or task is not self._comment:
            return
        if task.exception() is None:
            self._comment = None
        elif self._streamer is not None:
            self._streamer.cancel()


TEXT_SLOT = "\u2063meshserve-text\u2063"  # stands for the text in a template chunk (never a model's output)
_NULL_USAGE_END = ',"usage":null}\n\n'
# json.dumps(text, ensure_ascii=False), made once: json.dumps builds a JSONEncoder at every call with a non-default
# argument, which was most of a chunk's render
_json_text = json.JSONEncoder(ensure_ascii=False).encode


class ChunkTemplate:
    """The SSE event of a text-only chunk of one choice, made once from a chunk the response models rendered
    with TEXT_SLOT as its text and no usage; `render` fills in the text (and usage so far). Building and
    serializing the pydantic models costs ~5.5 us per chunk, this ~1 us (2-core box), and every streamed
    token is a chunk. tests/test_chunk_template.py checks it against the models for any text and numbers."""

    def __init__(self, sample: str):
        head, tail = sample.split(json.dumps(TEXT_SLOT, ensure_ascii=False), 1)
        if not tail.endswith(_NULL_USAGE_END):
            raise ValueError("a template chunk ends with its usage, null")
        self.head, self.tail = head, tail[:-len(_NULL_USAGE_END)]

    def render(self, text: str, usage: tuple[int, int, int] | None = None) -> str:
        """usage: (prompt tokens, completion tokens, cached prompt tokens), or None for `"usage":null`."""
        if usage is None:
            return f"{self.head}{_json_text(text)}{self.tail}{_NULL_USAGE_END}"
        prompt, completion, cached = usage
        return (f'{self.head}{_json_text(text)}{self.tail},"usage":{{"prompt_tokens":{prompt},'
                f'"completion_tokens":{completion},"total_tokens":{prompt + completion},'
                f'"prompt_tokens_details":{{"cached_tokens":{cached}}}}}}}\n\n')
