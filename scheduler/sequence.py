"""One request's state, as the router keeps it: enough to rebuild the sequence on any mesh."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from scheduler.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"  # holds a slot and blocks: prefilling, or live on the mesh
    PREEMPTED = "preempted"  # back in the queue; will recompute prompt + output so far
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + output confirmed by the mesh
    num_prompt_tokens: int
    params: SamplingParams  # max_tokens already clamped to the sequence length limit
    stop_token_ids: tuple[int, ...]  # what the mesh stops on: EOS (unless ignore_eos) + params.stop_token_ids
    salt: str | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | "grammar_error" | "constraint_error"
    slot: int = -1
    epoch: int = 0  # +1 each time the sequence is placed in a slot: tells stale results apart
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # digests of the full blocks of token_ids
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_computed: int = 0  # tokens whose KV the mesh has confirmed written
    num_cached_tokens: int = 0  # prefix-cache hit of its first seat on this mesh (usage reports it)
    counted: bool = False  # its first admission is in the prefix-cache counters (here, or on a mesh that failed)
    query_epoch: int = 0  # the seat (epoch) here whose lookup those counters count: its later hits count too
    # A mesh failure is laid on every request of the decode round it was computing: an isolated one decodes its next
    # step in a round of its own, so that the failure of that round is its own alone.
    isolated: bool = False
    # len(token_ids) at its last preemption here: until it has made a token since (its recompute's final chunk
    # samples one), it is no victim (MeshScheduler._victim), so each preemption follows progress.
    num_tokens_preempted: int = -1
    num_prefill_sampled: int = 0  # output tokens its final prefill chunks sampled here (one per recompute): no decode
    # Planning, ahead of the mesh by up to max_inflight works:
    num_prefill_planned: int = 0  # prefill handed out up to here
    num_prefill_sent: int = 0  # token ids its chunks carried to the mesh since it took its slot (PrefillChunk.offset)
    num_planned: int = 0  # upper bound on len(token_ids) once every handed-out work is answered
    live: bool = False  # final prefill chunk handed out: the mesh decodes the slot from then on
    # Timestamps (time.monotonic) for metrics:
    arrival_time: float = 0.0
    scheduled_time: float | None = None  # first prefill chunk handed out
    first_token_time: float | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def started(self) -> bool:
        """It has made a token (its first event has gone out)."""
        return len(self.token_ids) > self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def max_tokens_total(self) -> int:
        """Prompt + the output budget: the mesh retires the slot when the sequence reaches it."""
        return self.num_prompt_tokens + self.params.max_tokens
