"""One mesh's continuous-batching scheduler: which request sits in which decode slot, which KV blocks
hold its tokens, and what the mesh runs next.

The router keeps up to `max_inflight` works on the mesh, so planning runs ahead of the results. Each
sequence therefore carries two lengths: `token_ids` (confirmed by the mesh) and `num_planned` (an upper
bound once every handed-out work is answered; exact unless the mesh retires the slot early). Blocks are
reserved for the planned length before a decode round goes out, and each in-flight work remembers which
(sequence, epoch) it planned per slot, so results for a slot that was cancelled or preempted meanwhile are
dropped rather than credited to whoever sits there now.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from scheduler.blocks import BlockPool, blocks_for, extend_block_hashes
from scheduler.errors import PromptTooLong, QueueFull, RoomFilled, Unsupported
from scheduler.kv_cache import KVCache, KVGroup
from scheduler.sampling import SamplingParams
from scheduler.sequence import Sequence, Status
from scheduler.work import (GRAMMARS_KEPT, MAX_NEW_GRAMMARS_PER_WORK, NO_TOKEN, DecodeRound, MeshWork, PrefillChunk,
                            StepEvents, StepResult, TokenEvent)

log = logging.getLogger("ray.serve")  # the log of the router replica it runs in (a name: no Ray is imported)
# A prompt whose next tokens an earlier prompt of its KV group is about to compute (a shared system prompt, sent at
# once) waits for them and takes them from the prefix cache, when they are at least this many: admitted together,
# each computed the whole prefix. A mesh prefills one user at a time, so the wait costs the second only its lag behind
# the first: up to max_inflight works, a decode round among them (8 steps: ~0.11 s on a Galaxy, where 1,024 tokens
# prefill in ~0.16 s).
SHARED_PREFILL_TOKENS = 1024


@dataclass(slots=True)
class _Forecast:
    """The KV groups after the next schedule (MeshScheduler._room_after_queue): each one's [free slots, free
    blocks, available blocks], the cached blocks nobody owned that the queue will have taken by then, and
    those its allocations will have evicted, the (tokens left, blocks at full length) of each request the queue
    seats there (MeshScheduler._reservation); the group then reserved for a waiting request (none else
    enters it); and the groups whose pool the running users' lookahead runs dry (none enters them)."""

    room: list[list[int]]
    revived: list[set[int]]
    evicted: list[set[int]]
    seated: list[list[tuple[int, int]]]
    reserved: int | None = None
    dry: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _InFlight:
    """A handed-out work as it was planned; its results are read against this."""

    work_id: int
    prefills: list[tuple[Sequence, int, int, bool]]  # (sequence, epoch, chunk end, final)
    decode: list[tuple[int, Sequence, int]]  # (slot, sequence, epoch)
    messages_left: int
    next_prefill: int = 0  # index into prefills of the next result: one message per chunk
    solo: bool = False  # its decode round is one isolated sequence's step (Sequence.isolated)


class MeshScheduler:
    """The scheduling state of one mesh (the router keeps one per mesh replica): plan works with
    `schedule()`, take the mesh's answers in with `process()`, end requests with `cancel()`. When the mesh
    fails, `drain()` hands every unfinished request back so the router can re-place it elsewhere.
    The mesh's KV memory is `kv_groups` independent pools (kv_cache.py); a sequence lives in one."""

    def __init__(self, *, num_blocks: int, block_size: int, kv_groups: int = 1, num_slots: int = 32,
                 max_seq_len: int = 131072,
                 prefill_chunk: int = 4096, max_prefill_tokens: int = 4096, decode_steps: int = 8,
                 prefix_align: int | None = None, watermark_blocks: int = 0,
                 max_waiting_requests: int | None = None, max_waiting_tokens: int | None = None,
                 eos_token_ids: tuple[int, ...] = (), max_inflight: int = 2, enable_prefix_caching: bool = True,
                 shared_prefill_tokens: int = SHARED_PREFILL_TOKENS, log_name: str | None = None,
                 prompt_logprobs: bool = True):
        """num_blocks: KV blocks per group. prefix_align: prefix hits and prefill chunk boundaries are
        multiples of it (128 tokens on the Galaxy model; default one block). max_prefill_tokens bounds the prefill in one work, i.e. how long
        the running users wait between two decode rounds. watermark_blocks: admission leaves this many
        blocks for the running sequences to grow into. enable_prefix_caching (vLLM's name): False computes every
        prompt from its first token (nothing is looked up, no query counted), e.g. to bring up a backend whose
        prefill after a cached prefix is not yet trusted. shared_prefill_tokens: a prompt that shares at least this many
        leading tokens with an earlier one of its KV group waits for that one's chunks (SHARED_PREFILL_TOKENS).
        log_name: the mesh's name, to log each preemption at INFO under it (AppConfig.enable_log_requests); None: none
        is logged. prompt_logprobs: the mesh's backend can score every prompt position (Capabilities.prompt_logprobs);
        False refuses requests that ask (Unsupported)."""
        align = prefix_align or block_size
        if align % block_size or prefill_chunk % align or prefill_chunk <= 0:
            raise ValueError(f"prefix_align ({align}) must be a multiple of block_size ({block_size}) "
                             f"and prefill_chunk ({prefill_chunk}) a positive multiple of prefix_align")
        if max_prefill_tokens < align or decode_steps < 1 or max_inflight < 1:
            raise ValueError("max_prefill_tokens must be >= prefix_align, decode_steps and max_inflight >= 1")
        self.kv = KVCache(num_groups=kv_groups, num_blocks=num_blocks, block_size=block_size,
                          num_slots=num_slots, max_seq_len=max_seq_len)
        self.block_size = block_size
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_steps = decode_steps
        self.prefix_align = align
        self.watermark_blocks = watermark_blocks
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_inflight = max_inflight
        self.enable_prefix_caching = enable_prefix_caching
        self.shared_prefill_tokens = shared_prefill_tokens
        self.log_name = log_name
        self.prompt_logprobs = prompt_logprobs
        # A sequence must fit its group's pool on its own, or it would preempt itself forever.
        self.max_tokens_per_seq = min(max_seq_len, num_blocks * block_size)

        self.requests: dict[str, Sequence] = {}  # every unfinished request
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}  # in admission order: the newest is preempted first
        self.inflight: deque[_InFlight] = deque()
        self.pending_release: list[int] = []
        self.next_work_id = 0
        self.waiting_tokens = 0
        self.num_preemptions = 0
        self.head_blocked = False  # the last admission stopped at a request that fit no group it may enter (a group
        # whose pool ran dry, by a preemption or a sequence waiting for blocks, admits nobody that schedule): the next
        # schedule seats nobody more until something is freed
        self.reserved: Sequence | None = None  # a waiting request that fit no KV group (_admit) ...
        self.reserved_group = -1  # ... and the group held for it
        self.grammars_sent: OrderedDict[str, None] = OrderedDict()  # the mesh's GrammarCache, as far as known
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        # What placement reads of this state (placement_key, seats), kept until it changes (_state_changed): the
        # router asks every mesh at every placement, and most meshes have only decoded since it last asked.
        self._forecast: _Forecast | None = None  # _room_after_queue's, while _forecast_valid
        self._forecast_valid = False
        self._placement_room: tuple[int, tuple[int, int, int]] | None = None  # -num_queued, the best group's room

    # ---- requests in -----------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               salt: str | None = None, output_ids: list[int] = (), *, migrated: bool = False,
               counted: bool = False, arrival_time: float | None = None, scheduled_time: float | None = None,
               block_hashes: list[bytes] | None = None, isolated: bool = False,
               num_tokens_preempted: int = -1) -> Sequence:
        """Queue a request. `output_ids` continues one that already produced those tokens elsewhere (a
        failed mesh, a restarted router): it is recomputed from prompt + output and goes on from there.
        `migrated` skips the queue limits (the request was admitted once already). One with output goes
        before every waiting request that has none, as its client is mid-stream; one without goes among those by
        `arrival_time` (served in order of arrival, a request moved off a failed mesh too). `counted`: its first
        admission was counted already (prefix_query_tokens, prefix_hit_tokens). `block_hashes`: the
        digests of leading full blocks of prompt + output, if the caller has them (hashed once per request).
        `isolated`: its next decode step runs alone (Sequence.isolated). `num_tokens_preempted`: its length at its last
        preemption on a mesh it left (Sequence.num_tokens_preempted): here too it is seated with _headroom and is no
        victim until it makes a token. `scheduled_time`: when a mesh it left was first handed a prefill chunk of it
        (its queue time ends there, not at its recompute here).
        Raises PromptTooLong (HTTP 400) or QueueFull (HTTP 429); RoomFilled for output that already has max_tokens
        tokens (after the cut to this mesh's room), or whose prompt alone fills it; ValueError for an id already here
        or an empty prompt."""
        self._state_changed()
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already queued or running")
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if params.prompt_logprobs is not None and not self.prompt_logprobs:
            raise Unsupported("prompt_logprobs", "this mesh's backend computes only the last prompt position's logits: "
                                                 "the prompt's logprobs are not available")
        if n >= self.max_tokens_per_seq:
            limit = "max_seq_len" if self.max_tokens_per_seq == self.max_seq_len else "the KV pool's capacity"
            if output_ids:  # an answer under way, its prompt alone past a shorter mesh's room (a redeploy): over
                raise RoomFilled(f"request {request_id!r}'s prompt ({n} tokens) fills {limit} here "
                                 f"({self.max_tokens_per_seq})")
            raise PromptTooLong(f"the prompt has {n} tokens; {limit} allows at most "
                                f"{self.max_tokens_per_seq - 1} (one token is left for the answer)")
        # A burst into free slots is no queue, but while the head waits for KV blocks they seat nobody (num_queued).
        queued = len(self.waiting) - (0 if self.head_blocked else self._free_slots_for_queue())
        if not migrated and self.max_waiting_requests is not None and queued >= self.max_waiting_requests:
            raise QueueFull(f"{queued} requests are waiting for a slot (limit {self.max_waiting_requests})")
        # At the limit every prompt is refused, below it every one is taken (the queue passes it by one prompt at
        # most): refused when its own tokens would pass it, a long prompt got 429 at each retry under load while
        # short ones took every room freed, and one longer than the limit could only run alone.
        if not migrated and self.max_waiting_tokens is not None and self.waiting_tokens >= self.max_waiting_tokens:
            raise QueueFull(f"{self.waiting_tokens} prompt tokens are waiting (limit {self.max_waiting_tokens})")
        budget = self.max_tokens_per_seq - n
        if params.max_tokens > budget:
            params = params.model_copy(update={"max_tokens": budget, "min_tokens": min(params.min_tokens, budget)})
        if len(output_ids) >= params.max_tokens:
            raise RoomFilled(f"request {request_id!r} already has its {params.max_tokens} tokens")
        stop_ids = (() if params.ignore_eos else self.eos_token_ids) + params.stop_token_ids
        token_ids = [*prompt_ids, *output_ids]
        seq = Sequence(request_id, token_ids, n, params, tuple(dict.fromkeys(stop_ids)), salt,
                       num_planned=len(token_ids), block_hashes=list(block_hashes or ()), counted=counted,
                       arrival_time=time.monotonic() if arrival_time is None else arrival_time,
                       scheduled_time=scheduled_time, isolated=isolated, num_tokens_preempted=num_tokens_preempted)
        self.requests[request_id] = seq
        if output_ids:  # a stream under way (moved here, or continued) goes before every one not started yet
            first_new = next((i for i, s in enumerate(self.waiting) if not s.started), len(self.waiting))
            self.waiting.insert(first_new, seq)
        else:  # by arrival among those not started: one moved off a failed mesh keeps its turn (a new one: last)
            at = len(self.waiting)
            while at and not self.waiting[at - 1].started and self.waiting[at - 1].arrival_time > seq.arrival_time:
                at -= 1
            self.waiting.insert(at, seq)
        self.waiting_tokens += len(token_ids)
        return seq

    def cancel(self, request_id: str, reason: str = "abort") -> TokenEvent | None:
        """End a request in any state, freeing all it holds. Returns its final event (None if unknown)."""
        self._state_changed()
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        if seq.status is Status.RUNNING:
            self.pending_release.append(seq.slot)
            self._release(seq)
        else:
            if seq is self.reserved:
                self.reserved = None  # its group is open to the queue again
                self.head_blocked = False
            elif seq is self._first_unreserved():
                self.head_blocked = False  # what it blocked may fit now
            self.waiting.remove(seq)
            self.waiting_tokens -= len(seq.token_ids)
        self._mark_finished(seq, reason)
        event = TokenEvent(request_id, [], finish_reason=reason)
        if not seq.started:
            self._fill_first_event(seq, event)
        return event

    def drain(self) -> list[Sequence]:
        """Take every unfinished request out (the mesh failed), oldest arrival first, freeing all it held.
        Their `token_ids` are what the mesh confirmed: prompt + output so far, to be recomputed elsewhere."""
        seqs = sorted(self.requests.values(), key=lambda s: s.arrival_time)
        for seq in seqs:
            self.cancel(seq.request_id, "abort")
        self.inflight.clear()
        self.pending_release = []
        return seqs

    def executing(self) -> tuple[list[str], bool]:
        """The requests of what the mesh owes first, i.e. was computing if it failed now (works run in order, one
        message per prefill chunk, then per decode step): that chunk's request, else every slot of that decode
        round; none while no work is out. Those cancelled or re-seated since are left out. And whether that message
        computes one request alone (one cancelled since counts: its slot is computed all the same)."""
        if not self.inflight:
            return [], False
        first = self.inflight[0]
        if first.next_prefill < len(first.prefills):
            seq, epoch, _, _ = first.prefills[first.next_prefill]
            entries = [(seq, epoch)]
        else:
            entries = [(seq, epoch) for _, seq, epoch in first.decode]
        return ([seq.request_id for seq, epoch in entries if seq.epoch == epoch and seq.status is Status.RUNNING],
                len(entries) == 1)

    def queued(self, limit: int | None = None) -> list[Sequence]:
        """The waiting requests the next schedule does not seat: the holder of the reserved group (`_admit`), then
        the queue's last num_queued others, in queue order; the first `limit` of them. They hold no slot or block:
        the router moves them to a mesh that seats them now (`seats`) and cancels them here."""
        holder, rest = self.reserved, max(self.num_queued, 0)
        start = max(len(self.waiting) - rest - (holder is not None), 0)  # the free slots' seats come first
        # Past `start` lie rest + 1 others when the holder is ahead of it (the first of them is seated), else rest.
        skip = holder is not None and any(seq is holder for seq in itertools.islice(self.waiting, start))
        take = rest if limit is None else min(rest, max(limit - (holder is not None), 0))
        others = (seq for seq in itertools.islice(self.waiting, start, None) if seq is not holder)
        # Only what it returns is walked: the router asks for a queue's head on every round (MOVE_SCAN).
        out = ([holder] if holder is not None else []) + list(itertools.islice(others, skip, skip + take))
        return out if limit is None else out[:limit]

    def seats(self, seq: Sequence) -> bool:
        """Whether the next schedule here would seat `seq` (another mesh's) after this mesh's own queue: room
        for its tokens (max_seq_len, the pool) and, once that schedule has reserved the running users' lookahead
        and seated the queue (_room_after_queue; a request moved here in the same pass is in it), a KV group
        with a free slot and the blocks for its uncached tokens (all of them for one that scores its prompt; a
        preempted one's _headroom too), other than one reserved for a waiting request."""
        n = len(seq.token_ids)
        if self.num_queued >= 0 or n >= self.max_tokens_per_seq:
            return False
        forecast = self._room_after_queue()
        hashes = [] if self.scores_prompt(seq) else seq.block_hashes  # as _seat_hashes, without hashing here
        return forecast is not None and self._choose_group(hashes, n, forecast, forecast.reserved,
                                                           self._headroom(seq.num_tokens_preempted, n),
                                                           forecast.dry) is not None

    @property
    def num_queued(self) -> int:
        """Waiting requests, the reserved group's holder aside (`queued` lists it apart), that the next schedule
        does not seat (negative: the slots left outside the reserved group once they are seated): those beyond
        those free slots, or all of them while a request fits no group it may enter (nobody overtakes it; a group
        whose pool ran dry admits nobody: _admit)."""
        others = len(self.waiting) - (self.reserved is not None)
        if self.head_blocked:
            return others
        return others - self._free_slots_for_queue()

    def _free_slots_for_queue(self) -> int:
        """The free slots a waiting request other than the reserved group's holder may take: none of that group's."""
        free = self.kv.num_free_slots
        if self.reserved is not None:
            free -= len(self.kv.groups[self.reserved_group].free_slots)
        return free

    def cached_prefix_tokens(self, block_hashes: list[bytes], num_tokens: int) -> int:
        """The longest prefix of a request (num_tokens tokens, full blocks hashing to block_hashes) that one KV
        group's prefix cache holds."""
        return max(len(self._lookup(g.pool, block_hashes, num_tokens)) for g in self.kv.groups) * self.block_size

    def placement_key(self, block_hashes: list[bytes], num_tokens: int,
                      num_tokens_preempted: int = -1) -> tuple[int, ...]:
        """How well a request fits this mesh; larger is better. A mesh that seats it now (a slot left once
        its queue is seated, in a group with the blocks it needs: a preempted one's _headroom too, as seats() and
        _admit count them, given its `num_tokens_preempted`) beats one that does not, whatever their
        prefix caches hold: a cache hit saves one prefill, a queue costs the request every step until a slot
        frees. Among meshes that seat it, the longest prefix cached in a group that seats it wins, then the
        most slots left; among the others, the shortest queue, then the longest prefix. The best group's
        room (KVGroup.room) breaks the remaining ties."""
        if self._placement_room is None:
            self._placement_room = -self.num_queued, max(g.room for g in self.kv.groups)
        free_after_queue, group = self._placement_room
        if free_after_queue > 0 and (forecast := self._room_after_queue()) is not None \
                and (choice := self._choose_group(block_hashes, num_tokens, forecast, forecast.reserved,
                                                  self._headroom(num_tokens_preempted, num_tokens),
                                                  forecast.dry)) is not None:
            return 1, len(choice[1]) * self.block_size, free_after_queue, *group
        return 0, free_after_queue, self.cached_prefix_tokens(block_hashes, num_tokens), *group

    def _state_changed(self) -> None:
        """Drop what placement kept (placement_key, _room_after_queue): slots, blocks, the queue or a queued prompt's
        prefix hit may have changed."""
        self._forecast_valid = False
        self._placement_room = None

    # ---- planning --------------------------------------------------------------------------------
    def schedule(self) -> MeshWork | None:
        """The next work for the mesh, or None when there is nothing to do or max_inflight works are
        unanswered. Order: reserve the running users' lookahead (preempting if blocks run out), admit
        from the queue, cut prefill chunks within the budget, then one decode round over live slots."""
        if len(self.inflight) >= self.max_inflight:
            return None
        self._state_changed()
        decode, dry = self._reserve_lookahead()
        self._admit(dry)
        chunks, planned_chunks = self._plan_prefills()
        for seq, _, _, final in planned_chunks:
            if final and seq.num_planned < seq.max_tokens_total:  # may join this work's decode round
                target = min(seq.num_planned + self.decode_steps, seq.max_tokens_total)
                if self._reserve(seq, target - 1):
                    decode.append((seq, target))
        solo = any(seq.isolated for seq, _ in decode) and self._isolate(decode)
        if not chunks and not decode:
            return None
        entries = []
        for seq, target in decode:
            seq.num_planned = target
            entries.append((seq.slot, seq, seq.epoch))
        round_ = None
        if entries:
            width = max(len(seq.block_table) for _, seq, _ in entries)  # the widest listed row: not max_seq_len's
            round_ = DecodeRound(1 if solo else self.decode_steps, sorted(slot for slot, _, _ in entries),
                                 self.kv.page_table[:, :width].copy())
        work = MeshWork(self.next_work_id, chunks, round_, self.pending_release)
        self.next_work_id += 1
        self.pending_release = []
        self.inflight.append(_InFlight(work.work_id, planned_chunks, entries, work.num_messages, solo=solo))
        return work

    def _isolate(self, decode: list[tuple[Sequence, int]]) -> bool:
        """Cut the decode round (in place) to one step of the first isolated sequence whose step alone is not out
        yet, and return True; else leave the isolated ones out of it (their step is out), and return False. An
        isolated sequence stays so until that step's result comes (process): a failure before it keeps it isolated."""
        out = {(plan.decode[0][1], plan.decode[0][2]) for plan in self.inflight if plan.solo}
        seq = next((seq for seq, _ in decode if seq.isolated and (seq, seq.epoch) not in out), None)
        if seq is not None:
            decode[:] = [(seq, min(seq.num_planned + 1, seq.max_tokens_total))]
            return True
        decode[:] = [(seq, target) for seq, target in decode if not seq.isolated]
        return False

    def _reserve_lookahead(self) -> tuple[list[tuple[Sequence, int]], bool]:
        """Blocks for the next decode_steps tokens of every live sequence, oldest first; when its group's
        pool runs dry, the newest running sequence of that group is preempted (possibly the one asking), or, where
        only sequences not to preempt yet are newer (_victim), the one asking sits this round out. Returns the
        decode round's (sequence, target length) and the groups whose pool ran dry (a preemption, or one sat out)."""
        decode, block_size, dry = [], self.block_size, set()
        for seq in list(self.running.values()):
            total = seq.max_tokens_total
            if seq.status is not Status.RUNNING or not seq.live or seq.num_planned >= total:
                continue
            target = min(seq.num_planned + self.decode_steps, total)
            # The last sampled token's KV is written by the step after it, hence target - 1. Most rounds need no
            # new block (one in block_size / decode_steps does): checked here, it costs no call per slot.
            while blocks_for(target - 1, block_size) > len(seq.block_table) and not self._reserve(seq, target - 1):
                dry.add(seq.slot // self.kv.slots_per_group)
                victim = self._victim(seq)
                if victim is None:
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                decode.append((seq, target))
        return decode, dry

    def _victim(self, seq: Sequence) -> Sequence | None:
        """Whom seq, out of blocks, preempts: the newest running sequence of its group (vLLM V1's FCFS policy pops
        the last of `running`: vllm/v1/core/sched/scheduler.py, schedule), seq itself when it is the newest, except
        one re-seated after a preemption that has made no token since (num_tokens_preempted); None where only such
        are newer than seq, or seq is one: seq then waits for their tokens. vLLM needs no such rule, as its engine
        takes a resumed request's first token in before the next schedule; here max_inflight works are planned
        ahead of their results, and the next round's lookahead of an older sequence preempted a re-seated one
        before its recompute (a Galaxy prefill of its prompt and output) gave a token: the same request preempted
        at the same length again and again (in process, long answers on two simulated meshes of 8 blocks: one 5
        times at 185 tokens). A sequence protected so needs no block to get its token (its seat holds its
        tokens): it waits at most for its own prefill, and every preemption of a sequence follows a token of it."""
        group, waited = self.kv.group_of(seq.slot), False
        for other in reversed(self.running.values()):  # newest first, down to seq
            if self.kv.group_of(other.slot) is not group:
                continue
            protected = len(other.token_ids) == other.num_tokens_preempted
            if other is seq:
                return None if protected or waited else seq
            if not protected:
                return other
            waited = True
        raise AssertionError("seq is not running")

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens of KV, if its group's pool can."""
        return self.kv.grow(seq.slot, seq.block_table, num_tokens)

    def _admit(self, dry: set[int]) -> None:
        """Seat waiting requests in free slots, each in the KV group that caches most of its prefix (then the
        emptiest) once that group's pool holds the uncached part of its tokens plus the watermark (and a preempted
        one's _headroom). FCFS, except that the first request that fits no group reserves one (`_reservation`) and
        lets the queue behind it go on into the other groups: the reserved group admits nobody else, so it only
        drains, and its holder, tried first at every admission, is seated at the latest once the answers running
        there when it reserved have ended (each bounded by its max_tokens; with the group empty, any prompt the pool
        holds fits). A second request that fits none of the other groups stops the queue (nobody overtakes it). With
        one KV group (torch) nothing is reserved: plain FCFS. A `dry` group (_reserve_lookahead) admits nobody: not
        into the room a preemption just made, nor into blocks a sequence waits on; the others admit as ever, and a
        request that fits none of them while a group is dry stops the queue (it may fit that group next time: it
        reserves nothing). One group's dry pool stopped every group's admission: a request that came as it ran dry
        waited with another group empty (test_scheduler), for as long as it stayed dry (each round an answer sat
        out beside a re-seated one's recompute)."""
        self.head_blocked = False
        holder = self.reserved
        if holder is not None and self.kv.num_free_slots:
            choice = self._choose_group(self._seat_hashes(holder), len(holder.token_ids),
                                        headroom=self._headroom(holder.num_tokens_preempted, len(holder.token_ids)),
                                        dry=dry)
            if choice is not None:
                self.waiting.remove(holder)
                self.reserved = None
                self._seat(holder, *choice)
        while self.kv.num_free_slots:
            index = 1 if self.waiting and self.waiting[0] is self.reserved else 0
            if index >= len(self.waiting):
                return
            seq = self.waiting[index]
            n = len(seq.token_ids)
            exclude = self.reserved_group if self.reserved is not None else None
            choice = self._choose_group(self._seat_hashes(seq), n, exclude=exclude,
                                        headroom=self._headroom(seq.num_tokens_preempted, n), dry=dry)
            if choice is None:
                if exclude is None and len(self.kv.groups) > 1 and not dry:
                    self.reserved, self.reserved_group = seq, self._reservation(seq.block_hashes, n)
                    continue
                self.head_blocked = True
                return
            del self.waiting[index]
            self._seat(seq, *choice)

    def _headroom(self, num_tokens_preempted: int, num_tokens: int) -> int:
        """The blocks a preempted sequence's seat leaves free per sequence of its group (_fit), itself counted: their
        growth over its recompute's works (num_tokens in chunks of max_prefill_tokens, one a work) and max_inflight
        decode rounds more, from its seat through its recompute's token (its works, planned ahead of their results)
        and a decode round after it. Re-seated as soon as it fit, it was preempted again by the next older sequence
        to need a block, after one token (a recompute of all its tokens for one): in process, 17 preemptions for 8
        answers on two meshes of 8 blocks, 7 with this. With one chunk's recompute counted whatever its length, the
        others grew into that room while a long one was still recomputing, then preempted it right after its token
        (test_scheduler: a recompute of 8 chunks, preempted again after 1 token). Its own cached blocks may make its
        recompute shorter: a wait to be seated longer than needed, not a stall. None for a sequence not preempted here
        (the path of every request while none is), nor in an empty group (_fit), where it fits as it always did; nor
        for one that has made a token since its preemption (a request moved, at a failover, after its re-seat there
        gave it tokens): no victim rule holds it (_victim), so it is seated as a new one would be."""
        if num_tokens_preempted != num_tokens:  # Sequence.num_tokens_preempted: -1, never preempted, or tokens since
            return 0
        works = self.max_inflight + blocks_for(num_tokens, self.max_prefill_tokens)
        return blocks_for(self.decode_steps * works, self.block_size)

    def _hashes(self, seq: Sequence) -> list[bytes]:
        """seq's full blocks' digests, hashed once (its tokens grow)."""
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, seq.salt)
        return seq.block_hashes

    @staticmethod
    def scores_prompt(seq: Sequence) -> bool:
        """seq asks for its prompt's logprobs and has not had them: every prompt position must be computed, so
        no cached block may stand in for one (vLLM V1 skips the prefix-cache lookup for such a request). Once its
        first token is out they all are: a recompute then hits the cache as any other (its blocks are cached for
        others all along)."""
        return seq.params.prompt_logprobs is not None and not seq.started

    def _seat_hashes(self, seq: Sequence) -> list[bytes]:
        """The digests a seat looks up in the prefix cache: none for a sequence that scores its prompt."""
        return [] if self.scores_prompt(seq) else self._hashes(seq)

    def _first_unreserved(self) -> Sequence | None:
        """The first waiting request that is not the reserved group's holder (the one the queue stops at)."""
        for seq in itertools.islice(self.waiting, 2):
            if seq is not self.reserved:
                return seq
        return None

    def _seat(self, seq: Sequence, group: KVGroup, hit: list[int]) -> None:
        """Take a request out of the queue's accounting into a slot of `group` (_admit has taken it off the queue)."""
        n = len(seq.token_ids)
        self.waiting_tokens -= n
        seq.slot, seq.block_table = self.kv.seat(group, hit, n)
        seq.status = Status.RUNNING
        seq.epoch += 1
        seq.num_cached_blocks = len(hit)
        seq.num_computed = seq.num_prefill_planned = len(hit) * self.block_size
        seq.num_planned = n
        self.running[seq.request_id] = seq
        # Its first event (which reports it) is still to come. Only its first seat here: a preempted prompt's recompute
        # hits the chunks it computed itself, which were not cached when it came (vLLM: its first scheduling).
        if not seq.started and seq.epoch == 1:
            seq.num_cached_tokens = seq.num_computed
        # A preempted or migrated sequence's recompute is no lookup of a new prompt (vLLM counts preempted
        # ones apart); nor is a scored prompt's seat, which looks nothing up (vLLM counts no query for it).
        if not seq.counted and self.enable_prefix_caching:
            seq.counted = True
            if not self.scores_prompt(seq):
                seq.query_epoch = seq.epoch
                self.prefix_query_tokens += n
                self.prefix_hit_tokens += seq.num_computed

    def _lookup(self, pool: BlockPool, block_hashes: list[bytes], n: int) -> list[int]:
        """The cached blocks of `pool` that a sequence of n tokens may reuse (none with prefix caching off)."""
        return pool.lookup(block_hashes, n, self.prefix_align) if self.enable_prefix_caching else []

    def _choose_group(self, block_hashes: list[bytes], n: int, forecast: _Forecast | None = None,
                      exclude: int | None = None, headroom: int = 0,
                      dry: set[int] | tuple = ()) -> tuple[KVGroup, list[int]] | None:
        """The group with a free slot and room whose prefix cache holds most of the sequence, then the one with
        most room (KVGroup.room); with its prefix hit. None if none has room. `forecast`: each group judged by
        its state after the next schedule (_room_after_queue) instead of its own. `exclude`: a group reserved
        for another request. `headroom`: _headroom's. `dry`: groups whose pool the lookahead ran dry."""
        best, best_key = None, None
        for group in self.kv.groups:
            room = group.room if forecast is None else forecast.room[group.index]
            if not room[0] or group.index == exclude or group.index in dry:
                continue
            hit, lacking = self._fit(group, block_hashes, n, forecast, headroom)
            if lacking > 0:
                continue
            key = (len(hit), *room)
            if best_key is None or key > best_key:
                best, best_key = (group, hit), key
        return best

    def _fit(self, group: KVGroup, block_hashes: list[bytes], n: int,
             forecast: _Forecast | None, headroom: int = 0) -> tuple[list[int], int]:
        """A sequence's prefix hit in `group`, and the blocks the group lacks to seat it (the watermark and `headroom`
        blocks per sequence there, its own seat counted, but none in an empty group; zero or less: it fits), as it is
        now or after the next schedule (`forecast`)."""
        if forecast is None:
            (slots, _, available), revived = group.room, ()
        else:
            (slots, _, available), revived = forecast.room[group.index], forecast.revived[group.index]
        pool = group.pool
        running = group.num_slots - slots
        watermark = self.watermark_blocks + (running + 1) * headroom if running else 0
        if not block_hashes or not pool.caches(block_hashes[0]):  # no hit: placement asks every group of every mesh
            return [], blocks_for(n, self.block_size) + watermark - available
        hit = self._lookup(pool, block_hashes, n)
        if forecast is not None and forecast.evicted[group.index]:
            hit = self._unevicted(hit, forecast.evicted[group.index])
        need = pool.blocks_needed(hit, n) - (sum(1 for b in hit if b in revived) if revived else 0)
        return hit, need + watermark - available

    def _reservation(self, block_hashes: list[bytes], n: int, forecast: _Forecast | None = None) -> int:
        """The group a request that fits none reserves: the one that seats it soonest by its running answers'
        budgets (max_tokens, the one bound known ahead; EOS may end them sooner): the fewest tokens left such that,
        once every answer there with no more left has ended, the others at their full length leave it the blocks
        it needs; then the one lacking the fewest blocks now, then the first. The guarantee (_admit) holds for any
        group; this keeps its bound, and the wait, short (a 16,000-token prompt behind short ones, simulated, 5
        runs: 0.86 s at the head, against 1.44 s reserving the group that lacked the fewest blocks, 0.81 s with
        FCFS)."""
        bs = self.block_size

        def key(group: KVGroup) -> tuple[int, int, int]:
            hit, lacking = self._fit(group, block_hashes, n, forecast)
            runners = [self._budget(s) for s in self.running.values() if self.kv.group_of(s.slot) is group]
            runners += forecast.seated[group.index] if forecast is not None else ()
            room = group.pool.num_blocks - sum(blocks for _, blocks in runners)
            need, wait = blocks_for(n, bs) - len(hit), 0
            for left, blocks in sorted(runners):
                if room >= need:
                    break
                room, wait = room + blocks, left
            return wait, lacking, group.index
        return min(self.kv.groups, key=key).index

    def _budget(self, seq: Sequence) -> tuple[int, int]:
        """A running (or just seated) request's tokens left to plan and its blocks at its full length."""
        return seq.max_tokens_total - seq.num_planned, blocks_for(seq.max_tokens_total, self.block_size)

    def _unevicted(self, hit: list[int], evicted: set[int]) -> list[int]:
        """The part of a prefix hit left once `evicted` blocks are gone: up to the first of them, rounded down
        to prefix_align. Eviction costs a hit as many blocks as it takes, except the owned blocks that the
        rounding takes with them (an owned block, then an evicted one in one 128-token unit on a Galaxy)."""
        for i, block in enumerate(hit):
            if block in evicted:
                align = self.prefix_align // self.block_size
                return hit[:i // align * align]
        return hit

    def _room_after_queue(self) -> _Forecast | None:
        """Each KV group's room as the next schedule() would leave it once it has reserved the running users'
        lookahead (_reserve_lookahead) and seated the waiting queue as _admit does (a reserved group's holder first,
        then the others in order, outside its group, and outside a group whose pool the lookahead runs dry
        (_reserve_lookahead: one sits the round out)); None when it cannot say or would seat nobody more: the
        lookahead preempts (the victim goes to the queue's head), or a queued request fits no group it may enter
        (nobody overtakes it). A forecast for placement, kept until the scheduler's state changes. Allocations past
        the free blocks evict cached ones, least recently freed first (BlockPool.allocate): a later request's hit on
        them is gone."""
        if self._forecast_valid:
            return self._forecast
        groups = self.kv.groups
        forecast: _Forecast | None = _Forecast([list(g.room) for g in groups], [set() for _ in groups],
                                               [set() for _ in groups], [[] for _ in groups])
        room = forecast.room
        lru = [g.pool.eviction_order() for g in groups]

        def take(index: int, new: int, revived: int = 0) -> None:
            r = room[index]
            from_free = min(new, r[1])
            r[1] -= from_free
            r[2] -= new + revived
            kept = forecast.revived[index]
            for _ in range(new - from_free):
                block = next((b for b in lru[index] if b not in kept), None)
                if block is not None:
                    forecast.evicted[index].add(block)

        for seq in self.running.values():
            if seq.status is Status.RUNNING and seq.live and seq.num_planned < seq.max_tokens_total:
                target = min(seq.num_planned + self.decode_steps, seq.max_tokens_total)
                missing = blocks_for(target - 1, self.block_size) - len(seq.block_table)
                if missing > 0:
                    index = seq.slot // self.kv.slots_per_group
                    if missing <= room[index][2]:
                        take(index, missing)
                    elif self._victim(seq) is not None:  # a preemption: its victim goes to the queue's head, ahead
                        self._forecast, self._forecast_valid = None, True  # of whom the forecast would seat
                        return None
                    else:  # its group's pool runs dry: it sits the round out
                        forecast.dry.add(index)
        holder = self.reserved
        reserved = self.reserved_group if holder is not None else None
        order = itertools.chain((holder,) if holder is not None else (), (s for s in self.waiting if s is not holder))
        for seq in order:  # as _admit
            if not any(r[0] for r in room):
                break
            n = len(seq.token_ids)
            choice = self._choose_group(self._seat_hashes(seq), n, forecast, None if seq is holder else reserved,
                                        self._headroom(seq.num_tokens_preempted, n), forecast.dry)
            if choice is None:
                if seq is holder:
                    continue
                if reserved is None and len(groups) > 1 and not forecast.dry:
                    reserved = self._reservation(seq.block_hashes, n, forecast)
                    continue
                forecast = None
                break
            if seq is holder:
                reserved = None
            group, hit = choice
            ref_counts, revived = group.pool.ref_counts, forecast.revived[group.index]
            woken = [b for b in hit if ref_counts[b] == 0 and b not in revived]  # its first sharer takes it
            revived.update(woken)
            room[group.index][0] -= 1
            take(group.index, blocks_for(n, self.block_size) - len(hit), len(woken))
            forecast.seated[group.index].append(self._budget(seq))
        if forecast is not None:
            forecast.reserved = reserved
        self._forecast, self._forecast_valid = forecast, True
        return forecast

    def _plan_prefills(self) -> tuple[list[PrefillChunk], list[tuple[Sequence, int, int, bool]]]:
        """Chunks of the uncomputed prefixes, oldest admission first, at most max_prefill_tokens in all.
        Chunk boundaries stay multiples of prefix_align, except where a sequence ends. A final chunk whose
        grammar the mesh has not used lately waits for a later work past MAX_NEW_GRAMMARS_PER_WORK of them."""
        chunks: list[PrefillChunk] = []
        planned: list[tuple[Sequence, int, int, bool]] = []
        budget = self.max_prefill_tokens
        new_grammars = 0
        prefilling: list[Sequence] = []  # the sequences seen so far whose prompt's KV is not all computed
        for seq in self.running.values():
            n = len(seq.token_ids)
            scores = self.scores_prompt(seq)
            if not seq.live and self.enable_prefix_caching and not scores:
                if seq.num_prefill_planned == seq.num_computed:
                    self._take_late_hit(seq)
                if self._shared_prefill_ahead(seq, prefilling):
                    prefilling.append(seq)
                    continue
            if not seq.live or seq.num_computed < seq.num_prefill_planned:
                prefilling.append(seq)
            while not seq.live:
                start = seq.num_prefill_planned
                room = min(self.prefill_chunk, budget)
                end = n if n - start <= room else start + room // self.prefix_align * self.prefix_align
                if end == start:
                    return chunks, planned
                final = end == n
                grammar = seq.params.grammar if final else None
                if grammar is not None:
                    if grammar not in self.grammars_sent:
                        if new_grammars == MAX_NEW_GRAMMARS_PER_WORK:
                            break
                        new_grammars += 1
                    self.grammars_sent[grammar] = None
                    self.grammars_sent.move_to_end(grammar)
                    if len(self.grammars_sent) > GRAMMARS_KEPT:
                        self.grammars_sent.popitem(last=False)
                chunks.append(PrefillChunk(
                    seq.request_id, seq.slot, seq.token_ids[seq.num_prefill_sent:end], start,
                    seq.block_table[:blocks_for(end, self.block_size)],
                    params=seq.params if final else None, num_prompt_tokens=seq.num_prompt_tokens,
                    stop_token_ids=seq.stop_token_ids if final else (),
                    prompt_logprobs=seq.params.prompt_logprobs if scores else None,
                    next_prompt_token=seq.token_ids[end] if scores and end < seq.num_prompt_tokens else -1,
                    offset=seq.num_prefill_sent))
                seq.num_prefill_sent = end
                planned.append((seq, seq.epoch, end, final))
                budget -= end - start
                seq.num_prefill_planned = end
                if seq.scheduled_time is None:
                    seq.scheduled_time = time.monotonic()
                if final:
                    seq.live = True
                    seq.num_planned = n + 1
        return chunks, planned

    def _take_late_hit(self, seq: Sequence) -> None:
        """Swap the blocks a seated, not yet computed part of seq's prompt holds for the cached blocks of the same
        prefix that another sequence of its group has computed since seq was seated (nothing of seq's is in flight).
        A hit of its seat here, as if the blocks had been cached then: in usage's cached tokens (_seat), and in
        prefix_hit_tokens when this seat counted its query."""
        pool, hashes, start = self.kv.group_of(seq.slot).pool, self._hashes(seq), seq.num_computed // self.block_size
        if start >= len(hashes) or not pool.caches(hashes[start]):  # O(1) when nothing new is cached
            return
        hit = self._lookup(pool, hashes, len(seq.token_ids))
        if len(hit) <= start:
            return
        self.kv.adopt(seq.slot, seq.block_table, start, hit[start:])
        gained = (len(hit) - start) * self.block_size
        seq.num_cached_blocks = len(hit)
        seq.num_computed = seq.num_prefill_planned = len(hit) * self.block_size
        if seq.query_epoch == seq.epoch:
            self.prefix_hit_tokens += gained
        if not seq.started and seq.epoch == 1:  # as _seat: its first seat here, counted here or where it came from
            seq.num_cached_tokens += gained

    def _shared_prefill_ahead(self, seq: Sequence, prefilling: list[Sequence]) -> bool:
        """Whether a sequence in `prefilling` (admitted before seq, so none waits for a later one) of seq's KV group
        shares at least shared_prefill_tokens of seq's leading tokens and has still to compute the ones seq would
        compute next, which seq can then take from the prefix cache (the same digests, within its alignment and
        cap). Such a prompt trails the other through their shared prefix: it computes none of it."""
        bs, align = self.block_size, self.prefix_align
        next_end = seq.num_prefill_planned + align
        shared_end = max(self.shared_prefill_tokens // align * align, next_end)
        if not prefilling or shared_end > (len(seq.token_ids) - 1) // align * align:  # BlockPool.lookup's cap
            return False
        hashes, group = self._hashes(seq), self.kv.group_of(seq.slot)
        last = shared_end // bs - 1  # digests chain: equal at `last`, equal at every block before it
        return any(self.kv.group_of(other.slot) is group and last < len(other.block_hashes)
                   and other.block_hashes[last] == hashes[last] and other.num_computed < next_end
                   for other in prefilling)

    # ---- results in ------------------------------------------------------------------------------
    def process(self, result: StepResult) -> StepEvents:
        """Take in one message of the oldest unanswered work (they arrive in order). Raises ValueError for a
        message of another work. A decode round's plain tokens keep what placement kept (_state_changed): it reads
        no token, only slots, blocks and the queue's prefix hits, which only a block filled while a request waits
        changes."""
        if not self.inflight or self.inflight[0].work_id != result.work_id:
            expected = self.inflight[0].work_id if self.inflight else None
            raise ValueError(f"result for work {result.work_id}, expected work {expected}")
        plan = self.inflight[0]
        now = time.monotonic()
        out = StepEvents()
        if plan.next_prefill < len(plan.prefills):
            self._state_changed()
            seq, epoch, end, final = plan.prefills[plan.next_prefill]
            plan.next_prefill += 1
            if seq.epoch == epoch and seq.status is Status.RUNNING:
                # A final chunk answered with no token may not have run: the mesh retires a slot whose grammar it cannot
                # set up before computing the chunk (MeshRunner._prefill), so its blocks are no prefix to offer others.
                if not final or result.tokens[seq.slot] != NO_TOKEN:
                    seq.num_computed = end
                    self._cache_full_blocks(seq)
                if result.prompt_logprobs and (scored := result.prompt_logprobs.get(seq.slot)) is not None:
                    out.events.append(TokenEvent(seq.request_id, [], prompt_logprobs=[scored]))  # arrays, as they came
                if final:
                    seq.num_prefill_sampled += result.tokens[seq.slot] != NO_TOKEN
                    self._take_token(seq, seq.slot, result, now, out.events)
        else:
            tokens, plain, block_size = result.tokens, out.tokens, self.block_size
            rich = bool(result.finished or result.logprobs)
            for slot, seq, epoch in plan.decode:
                if seq.epoch != epoch or seq.status is not Status.RUNNING:
                    continue
                token = tokens[slot]
                if rich or token == NO_TOKEN or len(seq.token_ids) == seq.num_prompt_tokens:
                    self._take_token(seq, slot, result, now, out.events)
                    continue
                seq.token_ids.append(token)  # the common case, inline: a token and nothing else
                seq.num_computed = computed = len(seq.token_ids) - 1
                if computed % block_size == 0:
                    self._cache_full_blocks(seq)
                    if self.waiting:  # a queued prompt may now hit it
                        self._state_changed()
                plain.append((seq.request_id, token))
            if plan.solo:
                slot, seq, epoch = plan.decode[0]
                if seq.epoch == epoch:  # its step alone is done: it decodes with the others again
                    seq.isolated = False
        plan.messages_left -= 1
        if plan.messages_left == 0:
            self.inflight.popleft()
        return out

    def _take_token(self, seq: Sequence, slot: int, result: StepResult, now: float,
                    events: list[TokenEvent]) -> None:
        token = result.tokens[slot]
        reason = result.finished.get(slot) if result.finished else None
        if token == NO_TOKEN and reason is None:
            return
        self._state_changed()
        event = TokenEvent(seq.request_id, [])
        if token != NO_TOKEN:
            seq.token_ids.append(token)
            seq.num_computed = len(seq.token_ids) - 1
            if seq.num_computed % self.block_size == 0:
                self._cache_full_blocks(seq)
            event.token_ids.append(token)
            if result.logprobs and slot in result.logprobs:
                event.logprobs.append(result.logprobs[slot])
            if len(seq.token_ids) == seq.num_prompt_tokens + 1:
                seq.first_token_time = now
                self._fill_first_event(seq, event)
        if reason is not None:  # the mesh retired the slot by itself: nothing to release there
            self._release(seq)
            self._mark_finished(seq, reason)
            event.finish_reason = reason
            if reason == "error":
                event.error = "sampling this request's next token failed on the mesh host"
            elif reason == "grammar_error":
                event.error = ("the structured-output engine (llguidance) gave up on this grammar while generating, "
                               "or it cost more CPU per token than this server allows")
            elif reason == "constraint_error":
                event.error = "the request's constraints together leave no token to sample after the answer so far"
        events.append(event)

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks the mesh has now filled to the prefix cache (none with prefix caching off: nothing
        would look them up, and freed they would count as cached, not free)."""
        full = seq.num_computed // self.block_size
        if full > seq.num_cached_blocks and self.enable_prefix_caching:
            extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, seq.salt)
            pool = self.kv.group_of(seq.slot).pool
            for i in range(seq.num_cached_blocks, full):
                pool.cache(seq.block_table[i], seq.block_hashes[i])
            seq.num_cached_blocks = full

    @staticmethod
    def _fill_first_event(seq: Sequence, event: TokenEvent) -> None:
        event.num_prompt_tokens = seq.num_prompt_tokens
        event.num_cached_tokens = seq.num_cached_tokens
        if seq.scheduled_time is not None:
            event.queue_time_s = seq.scheduled_time - seq.arrival_time

    # ---- giving back -----------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        """Free seq's slot and blocks (the blocks keep their hashes, so a recompute may hit them)."""
        del self.running[seq.request_id]
        self.kv.release(seq.slot, seq.block_table)
        self.head_blocked = False  # the blocks freed may seat the head
        seq.block_table = []
        seq.slot = -1
        seq.live = False
        seq.num_computed = seq.num_prefill_planned = seq.num_cached_blocks = seq.num_prefill_sent = 0
        seq.num_planned = len(seq.token_ids)

    def _preempt(self, seq: Sequence) -> None:
        """Send a running sequence (_victim) back to the queue."""
        group = self.kv.group_of(seq.slot)
        seq.num_tokens_preempted = len(seq.token_ids)
        self.pending_release.append(seq.slot)
        self._release(seq)
        seq.status = Status.PREEMPTED
        self.waiting.appendleft(seq)  # preempted newest first, so the oldest ends up at the head
        self.waiting_tokens += len(seq.token_ids)
        self.num_preemptions += 1
        if self.log_name is not None:
            log.info("Request %s preempted on %s: KV group %d is out of blocks; its %d tokens are recomputed when it "
                     "is admitted again.", seq.request_id, self.log_name, group.index, len(seq.token_ids))

    def _mark_finished(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        del self.requests[seq.request_id]

    def stats(self) -> dict:
        """Plain numbers for metrics, totals over the KV groups and per group (`groups`).
        blocks_used + blocks_cached + blocks_free == blocks_total."""
        return {"running": len(self.running), "waiting": len(self.waiting), "queued_tokens": self.waiting_tokens,
                "inflight_works": len(self.inflight), **self.kv.stats(),
                "prefix_query_tokens": self.prefix_query_tokens, "prefix_hit_tokens": self.prefix_hit_tokens,
                "preemptions": self.num_preemptions}
