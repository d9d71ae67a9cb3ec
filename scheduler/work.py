"""The messages between the router (scheduler) and a mesh replica (runner).

Plain picklable data: they cross the mesh's link (deployments/link.py, pickles on TCP) once per round (work)
and once per step (results).
One work = optional prefill chunks, then optional K decode steps over every live slot.
The mesh answers a work with one StepResult per prefill chunk (so each user's first token leaves as soon as
its own prefill ends) and one per decode step.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

import numpy as np

from scheduler.sampling import PromptLogprobs, SamplingParams, TokenLogprobs

NO_TOKEN = -1  # a slot that produced nothing this step (idle, retired, or mid-prefill)
# A mesh keeps the compiled matchers of its GRAMMARS_KEPT most recently used grammars (model/grammar.py
# GrammarCache). Any other grammar compiles on the mesh's worker thread when its final prefill chunk runs, up to
# ~0.1 s of CPU each (MAX_COMPILE_CPU_S) while every slot waits, so a work holds the final chunks of at most
# MAX_NEW_GRAMMARS_PER_WORK grammars the mesh has not used lately: 31 distinct ones in one work stalled it 1.3 s.
GRAMMARS_KEPT = 16
MAX_NEW_GRAMMARS_PER_WORK = 2


@dataclass
class PrefillChunk:
    """Compute positions [start, end) of one sequence into its blocks.

    token_ids holds the sequence's positions [offset, end) (prompt, plus output so far when a preempted sequence is
    recomputed): those the mesh has not had since the sequence took its slot, so each id crosses once (the whole
    sequence up to each chunk's end made a 128k prompt's 32 chunks 6.6 MB to pickle, quadratic in its length). The
    mesh joins them (PrefillHistory) into the history its backend's prefill and penalties need.
    On the final chunk (`params` set) the mesh samples the next token and the slot goes live:
    it then decodes it until the router stops including it or it retires by itself.
    """

    request_id: str
    slot: int
    token_ids: list[int]
    start: int
    block_ids: list[int]
    params: SamplingParams | None = None  # set on the final chunk only
    num_prompt_tokens: int = 0  # where the prompt ends in token_ids (the rest is recomputed output)
    stop_token_ids: tuple[int, ...] = ()  # EOS ids (unless ignore_eos) + params.stop_token_ids
    # vLLM's prompt_logprobs: the logprobs of the prompt tokens this chunk's positions predict, with this many
    # alternatives (StepResult.prompt_logprobs); None: none asked
    prompt_logprobs: int | None = None
    next_prompt_token: int = -1  # with prompt_logprobs: the prompt token after the chunk (its last position's target)
    offset: int = 0  # the position of token_ids[0]: 0 on a seat's first chunk, else the previous chunk's end

    @property
    def is_final(self) -> bool:
        return self.params is not None

    @property
    def end(self) -> int:
        return self.offset + len(self.token_ids)


class PrefillHistory:
    """A mesh's side of PrefillChunk.offset: the ids each slot's chunks carried so far, joined."""

    def __init__(self) -> None:
        self._ids: dict[int, list[int]] = {}

    def take(self, chunk: PrefillChunk) -> list[int]:
        """The sequence up to the chunk's end. Raises StaleWork for a chunk that does not follow the slot's last: one
        this mesh never ran came before it (dropped as its router gave up on the mesh), a slip the router's reset
        mends, not a device's failure."""
        ids = self._ids.pop(chunk.slot, []) if chunk.offset else []
        if len(ids) != chunk.offset:
            raise StaleWork(f"a prefill chunk of slot {chunk.slot} at {chunk.offset}, after {len(ids)} ids")
        ids += chunk.token_ids  # in place: a copy per chunk would be quadratic again
        if not chunk.is_final:
            self._ids[chunk.slot] = ids
        return ids

    def drop(self, slot: int) -> None:
        self._ids.pop(slot, None)

    def clear(self) -> None:
        self._ids.clear()


@dataclass
class DecodeRound:
    """K decode steps for `slots`. page_table rows are padded with 0 past a slot's blocks, and only as wide
    as the longest listed slot's block table (a full-width table for 128k tokens is 256 KiB to pickle per
    work; the mesh pads it back to its backend's width); the router has already reserved the blocks the
    next K tokens of every listed slot need. Rows of slots not listed are not to be read."""

    num_steps: int
    slots: list[int]
    page_table: np.ndarray  # int32 [num_slots, width], width <= max_blocks_per_seq

    def __reduce__(self):
        """Pickled as the table's raw bytes: numpy's own array pickle cost the router ~23 us per work to dump and the
        mesh ~19 us to load (a 32 x 18 int32 table, 2-core box), the raw bytes ~1.5 us each."""
        table = self.page_table
        return _decode_round, (self.num_steps, self.slots, table.dtype.str, table.shape, table.tobytes())


def _decode_round(num_steps: int, slots: list[int], dtype: str, shape: tuple[int, ...], data: bytes) -> DecodeRound:
    """DecodeRound.__reduce__'s inverse: a writable table of its own (the mesh hands it to torch.from_numpy)."""
    return DecodeRound(num_steps, slots, np.frombuffer(bytearray(data), dtype=dtype).reshape(shape))


@dataclass
class MeshWork:
    work_id: int
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode: DecodeRound | None = None
    release: list[int] = field(default_factory=list)  # slots the router freed (cancel, preempt): drop them first

    @property
    def num_messages(self) -> int:
        return len(self.prefills) + (self.decode.num_steps if self.decode else 0)


class StaleWork(RuntimeError):
    """A work the mesh refused without running any of it: planned for another incarnation of the replica (Serve
    restarted it) or before its last reset, or never sent (no link to it); or the rest of a work a replica shutting
    down stopped (ReplicaStopping), or whose prefill chunk follows one the mesh never ran (PrefillHistory.take). The
    router fails the mesh for it, but lays the failure on none of the work's requests: none of them made the mesh
    fail."""


class ReplicaStopping(StaleWork):
    """The replica stops on purpose (Serve replaces or removes it: a redeploy, a scale-down, an app delete): its
    works end as StaleWork does, and the router reports a planned stop, not a failover (an operator's alert on
    failovers must not fire at each routine redeploy)."""


class LeaseTaken(StaleWork):
    """Another router took the mesh (its reset drew a new lease): a newer router, this one being replaced (a redeploy
    of the router's options), or an older one once this one was silent past the lease hold. This router's works there
    are refused, and its resets answered so, until it is gone: routine at a router's redeploy, not a mesh failure."""


@dataclass
class StepResult:
    """One step's outcome for all slots of a mesh (never one message per token)."""

    work_id: int
    tokens: list[int]  # per slot, NO_TOKEN where nothing was produced
    # slot -> "stop" | "length" | "error" | "grammar_error" | "constraint_error"
    finished: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # slot -> logprobs, when asked
    last: bool = False  # the final message of this work
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # slot -> its prefill chunk's, when asked

    def __reduce__(self):
        """Pickled as its fields, loaded by a call: one per mesh step crosses the link, and a dataclass's default pickle
        (an object, then its __dict__ set) cost the router ~7 us to load, this ~2.5 (2-core box)."""
        return StepResult, (self.work_id, self.tokens, self.finished, self.logprobs, self.last, self.prompt_logprobs)


@dataclass
class TokenEvent:
    """What a request gained since its last event: router -> ingress, coalesced per request."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token when asked
    # "stop" | "length" | "abort" | "error" | "grammar_error" | "constraint_error"; None while running
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    queue_time_s: float | None = None  # first event only: router arrival -> first prefill chunk scheduled
    # vLLM's prompt_logprobs, a prefill chunk's arrays each, passed on as they came (a recompute may send again
    # positions sent before: the ingress keeps each position once)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # the ingress's perf_counter() when its last tokens reached the replica (RouterLink; None: when read), so that a
    # client that reads late does not count as the server's latency (RequestTimer); the router never sets it
    received: float | None = None

    @property
    def arrived(self) -> float:
        """When its last tokens reached the ingress replica (`received`), or now where none was stamped."""
        return time.perf_counter() if self.received is None else self.received

    def merge(self, later: TokenEvent) -> None:
        """Append a later event of the same request (coalescing until the next flush)."""
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.prompt_logprobs += later.prompt_logprobs
        self.finish_reason, self.error, self.received = later.finish_reason, later.error, later.received
        if not self.num_prompt_tokens:  # the first event's fields come with whichever event is first
            self.num_prompt_tokens, self.num_cached_tokens = later.num_prompt_tokens, later.num_cached_tokens
            self.queue_time_s = later.queue_time_s

    def split(self, n: int) -> tuple[TokenEvent, TokenEvent]:
        """Its first n tokens (with their logprobs and the first event's fields), and the rest (with the finish)."""
        head = TokenEvent(self.request_id, self.token_ids[:n], self.logprobs[:n], None, self.num_prompt_tokens,
                          self.num_cached_tokens, None, self.queue_time_s, self.prompt_logprobs, self.received)
        return head, TokenEvent(self.request_id, self.token_ids[n:], self.logprobs[n:], self.finish_reason,
                                error=self.error, received=self.received)

    @property
    def plain(self) -> bool:
        """Only tokens: what nearly every event of a stream is."""
        return not (self.logprobs or self.finish_reason or self.num_prompt_tokens or self.error
                    or self.queue_time_s is not None or self.prompt_logprobs)


@dataclass(slots=True)
class StepEvents:
    """What one mesh message gave the requests (MeshScheduler.process). A request appears at most once.

    `tokens` holds the plain decode tokens, (request_id, token_id) each: nearly every token there is, so
    none of them is a TokenEvent of its own: the router's per-token work is a tuple and an append (under
    cProfile on the 2-core box, building and merging a TokenEvent per token was a third of the router loop's
    CPU per mesh step). `events` holds the rest: first tokens, logprobs, finishes. Iterating gives all of it
    as TokenEvents."""

    tokens: list[tuple[str, int]] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)

    def __iter__(self):
        yield from (TokenEvent(request_id, [token]) for request_id, token in self.tokens)
        yield from self.events


@dataclass
class RequestFailed:
    """A request the router accepted and then had to refuse (router -> ingress, beside its TokenEvents): no
    mesh came back in time (NoMeshAvailable), or the mesh it moved to cannot take it (PromptTooLong)."""

    request_id: str
    error: BaseException


def pack_events(batch: list[TokenEvent | RequestFailed | tuple[str, list[int]]]) -> list:
    """A batch for the wire: a plain event as (request_id, token_ids) (such tuples pass as they are), the
    rest as they are. Pickling 32 TokenEvent objects costs ~20 us and unpickling ~24 us; 32 tuples ~2 and ~4
    (measured on the 2-core box).
    A RequestFailed's error crosses as itself when it survives pickling, else as a RuntimeError saying it."""
    return [(item.request_id, item.token_ids) if type(item) is TokenEvent and item.plain
            else RequestFailed(item.request_id, portable_error(item.error)) if isinstance(item, RequestFailed)
            else item for item in batch]


def portable_error(error: BaseException) -> BaseException:
    """`error` if it survives pickling (it must cross a process), else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(repr(error))


def unpack_events(packed: list) -> list[TokenEvent | RequestFailed]:
    """The inverse of pack_events."""
    return [TokenEvent(*item) if type(item) is tuple else item for item in packed]
