"""A deterministic stand-in for a mesh replica, for the scheduler tests.

It behaves like a real mesh: per-slot state (history, params, budget) kept across works, releases honoured
first, a slot retired by itself on a stop id or an exhausted budget. Its "KV cache" stores token ids at the
positions the page tables and block ids point to, and every next token is computed from what it reads
back from that cache, not from its own history. So a block that was shared wrongly, overwritten or
mis-addressed shows up as a wrong token, and it also checks the read-back directly. Like a Galaxy, it keeps
one cache per KV group: slot s reads and writes only its group's blocks, so a block id used from another
group's slot reads memory that group never wrote.
"""
from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass

import numpy as np

from scheduler.sampling import SamplingParams, TokenLogprobs
from scheduler.work import NO_TOKEN, MeshWork, PrefillHistory, StepResult

VOCAB = 16  # small, so stop ids end answers at random-looking points
# A grammar the mesh cannot set up: like MeshRunner, it retires the slot at the final chunk ("grammar_error") before
# computing that chunk, so the chunk's blocks hold nothing the prefix cache may offer.
REFUSED_GRAMMAR = "refused"


def next_token(token_ids: list[int]) -> int:
    """The fake model: the next token is a pure function of the whole sequence so far."""
    return zlib.crc32(array("i", token_ids).tobytes()) % VOCAB


def finish_reason(token: int, num_generated: int, params: SamplingParams, stop_ids) -> str | None:
    if token in stop_ids and num_generated >= params.min_tokens:
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None


def reference_output(prompt: list[int], params: SamplingParams, stop_ids) -> tuple[list[int], str]:
    """What a request yields run alone from start to end: no chunks, no cache, no preemption."""
    if params.grammar == REFUSED_GRAMMAR:
        return [], "grammar_error"
    tokens = list(prompt)
    while True:
        tokens.append(next_token(tokens))
        reason = finish_reason(tokens[-1], len(tokens) - len(prompt), params, stop_ids)
        if reason:
            return tokens[len(prompt):], reason


@dataclass
class _Slot:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    stop_ids: tuple[int, ...]


class KVCorruption(AssertionError):
    pass


class FakeMesh:
    def __init__(self, num_slots: int, num_blocks: int, block_size: int, kv_groups: int = 1):
        """num_blocks: per KV group."""
        self.num_slots = num_slots
        self.block_size = block_size
        self.slots_per_group = num_slots // kv_groups
        self.kv = np.full((kv_groups, num_blocks, block_size), -1, dtype=np.int64)
        self.slots: dict[int, _Slot] = {}
        self.prefilled = PrefillHistory()
        self.works: list[MeshWork] = []  # everything executed, in order

    def execute(self, work: MeshWork) -> list[StepResult]:
        self.works.append(work)
        for slot in work.release:
            self.slots.pop(slot, None)
            self.prefilled.drop(slot)
        results = []
        for chunk in work.prefills:  # one result per chunk
            result = StepResult(work.work_id, [NO_TOKEN] * self.num_slots)
            self.slots.pop(chunk.slot, None)
            token_ids = self.prefilled.take(chunk)
            if chunk.is_final and chunk.params.grammar == REFUSED_GRAMMAR:  # as MeshRunner: retired before computing
                result.finished[chunk.slot] = "grammar_error"
                results.append(result)
                continue
            for pos in range(chunk.start, len(token_ids)):
                self._write(chunk.slot, chunk.block_ids, pos, token_ids[pos])
            if chunk.is_final:
                state = _Slot(token_ids, chunk.num_prompt_tokens, chunk.params, chunk.stop_token_ids)
                self._sample(chunk.slot, state, chunk.block_ids, result)
            results.append(result)
        if work.decode:
            listed = work.decode.slots
            for _ in range(work.decode.num_steps):
                result = StepResult(work.work_id, [NO_TOKEN] * self.num_slots)
                for slot in listed:
                    state = self.slots.get(slot)
                    if state is None:
                        continue
                    row = work.decode.page_table[slot]
                    self._write(slot, row, len(state.token_ids) - 1, state.token_ids[-1])
                    self._sample(slot, state, row, result)
                results.append(result)
        results[-1].last = True
        return results

    def _write(self, slot: int, block_ids, pos: int, token: int) -> None:
        self.kv[slot // self.slots_per_group, block_ids[pos // self.block_size], pos % self.block_size] = token

    def _read(self, slot: int, block_ids, num_tokens: int) -> list[int]:
        used = np.asarray(block_ids[:-(-num_tokens // self.block_size)], dtype=np.int64)
        return self.kv[slot // self.slots_per_group, used].reshape(-1)[:num_tokens].tolist()

    def _sample(self, slot: int, state: _Slot, block_ids, result: StepResult) -> None:
        history = self._read(slot, block_ids, len(state.token_ids))
        if history != state.token_ids:
            raise KVCorruption(f"slot {slot}: KV holds {history}, the sequence is {state.token_ids}")
        token = next_token(history)
        state.token_ids.append(token)
        result.tokens[slot] = token
        if state.params.logprobs is not None:
            result.logprobs[slot] = TokenLogprobs(token, -1.0, [])
        reason = finish_reason(token, len(state.token_ids) - state.num_prompt_tokens, state.params, state.stop_ids)
        if reason:
            result.finished[slot] = reason
            self.slots.pop(slot, None)
        else:
            self.slots[slot] = state
