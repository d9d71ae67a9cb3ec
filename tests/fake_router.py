"""A RouterClient double for ingress tests: a scripted answer, one token per event (or `merge` of them), and a
record of calls;
it can refuse, pause, or die mid-stream (a router replica that crashed)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from deployments.router_client import RouterUnreachable
from scheduler.sampling import PromptLogprobs, SamplingParams, TokenLogprobs
from scheduler.work import TokenEvent


@dataclass
class FakeRouter:
    answer: list[int]  # every request gets these tokens (cut at a stop id or max_tokens)
    ready: bool = True
    max_model_len: int | None = 2048  # what the meshes take (None: no mesh has come up yet)
    vocab_size: int | None = None  # the ids the meshes' model embeds (None: not reported)
    held: int = 0  # requests accepted while no live mesh could take them
    stalled: tuple[str, ...] = ()  # meshes silent past their stall time with work out
    refuse: Exception | None = None  # raised when a generate stream is first iterated
    refuse_choice: int | None = None  # refuse only choice i of each prompt (request ids ending "-i")
    refuse_after_s: float = 0.01  # when the refusal comes
    queued_s: float = 0.0  # how long an accepted request waits for a slot before its first event
    pause_after: int | None = None  # block after this many tokens until `resume` is set
    die_after: list[int] = field(default_factory=list)  # each entry: one stream dies after that many tokens
    unreachable: int = 0  # the first this many generates find no link: RouterUnreachable, nothing sent
    fail_with_error_after: int | None = None  # the mesh retires the request with `fail_reason` after this many tokens
    fail_reason: str = "error"  # or "grammar_error": llguidance gave up on the request's grammar
    queue_time_s: float = 0.002
    down_s: float = 0.0  # how long the ingress's link to the router has been down
    on_death: Callable[[str], Awaitable[None]] | None = None  # awaited as a stream dies, in its place
    finish_apart: bool = False  # the finish in an event of its own, after the last token's (a death may part them)
    merge: int = 1  # tokens per event: the router merges a request's events until its next flush
    cached_by_choice: tuple[int, ...] = ()  # choice i's cached prompt tokens (request ids ending "-i"); else 3
    requests: dict[str, tuple[list[int], SamplingParams, str | None]] = field(default_factory=dict)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    continued: dict[str, list[int]] = field(default_factory=dict)  # request id -> output_ids it came with
    continuations: set[str] = field(default_factory=set)  # request ids submitted as continuations
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    paused: asyncio.Event = field(default_factory=asyncio.Event)  # set once a stream waits at pause_after

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, salt: str | None,
                       output_ids: list[int] = (), continuation: bool | str = False) -> AsyncIterator[TokenEvent]:
        pending: TokenEvent | None = None
        if self.unreachable:
            self.unreachable -= 1
            raise RouterUnreachable("the router cannot be reached")
        if continuation is True:  # not a later choice, which names its first (Router.submit)
            self.continuations.add(request_id)
        async for event in self._events(request_id, prompt_ids, params, salt, output_ids):
            if pending is None:
                pending = event
            else:
                pending.merge(event)
            if len(pending.token_ids) >= self.merge or pending.finish_reason is not None:
                yield pending
                pending = None
        if pending is not None:
            yield pending

    def _cached(self, request_id: str) -> int:
        if not self.cached_by_choice:
            return 3
        return self.cached_by_choice[int(request_id.rsplit("-", 1)[1])]

    async def _events(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      salt: str | None, output_ids: list[int] = ()) -> AsyncIterator[TokenEvent]:
        self.requests[request_id] = (prompt_ids, params, salt)
        self.continued[request_id] = list(output_ids)
        if self.refuse is not None and (self.refuse_choice is None or request_id.endswith(f"-{self.refuse_choice}")):
            await asyncio.sleep(self.refuse_after_s)  # as the router's reply comes: the other choices are in flight
            raise self.refuse
        await asyncio.sleep(self.queued_s)
        if params.prompt_logprobs is not None and not output_ids and len(prompt_ids) > 1:  # as a mesh that scores
            n, k = len(prompt_ids) - 1, params.prompt_logprobs  # prompt tokens 1.. (0 has nothing before it)
            yield TokenEvent(request_id, [], prompt_logprobs=[PromptLogprobs(
                1, np.full(n, -1.0, np.float32), np.ones(n, np.int32), np.tile(np.arange(k, dtype=np.int32), (n, 1)),
                np.full((n, k), -1.0, np.float32))])
        die_at = self.die_after.pop(0) if self.die_after else None
        if len(output_ids) >= params.max_tokens:  # as Router.submit: every token was delivered, only the finish lost
            yield TokenEvent(request_id, [], finish_reason="length")
            return
        for i, token in enumerate(self.answer[:params.max_tokens]):
            if i < len(output_ids):
                assert token == output_ids[i], "a continuation must carry the tokens already sent"
                continue
            if i == die_at:
                if self.on_death is not None:
                    await self.on_death(request_id)
                raise ConnectionError("the router died")
            if i == self.fail_with_error_after:
                yield TokenEvent(request_id, [], finish_reason=self.fail_reason, error="it failed")
                return
            if i == self.pause_after:
                self.paused.set()
                await self.resume.wait()
            # Like a real router, every stream ends with a finish: at the end of the script ("length") at the latest.
            finish = ("stop" if token in params.stop_token_ids and i >= params.min_tokens  # as the runner masks
                      else "length" if i + 1 == min(params.max_tokens, len(self.answer)) else None)
            alternatives = [(token, -0.25), *((t, -3.0) for t in range(1, params.logprobs or 0))]
            logprobs = [] if params.logprobs is None else [
                TokenLogprobs(token, -0.25, alternatives[:params.logprobs])]
            yield TokenEvent(request_id, [token], logprobs, None if self.finish_apart else finish,
                             num_prompt_tokens=len(prompt_ids),
                             num_cached_tokens=self._cached(request_id) if i == 0 else 0,
                             queue_time_s=self.queue_time_s if i == 0 else None)
            await asyncio.sleep(0)
            if finish:
                if self.finish_apart:
                    if i + 1 == die_at:
                        raise ConnectionError("the router died")
                    yield TokenEvent(request_id, [], finish_reason=finish)
                return

    async def cancel(self, request_id: str, reason: str = "abort") -> None:
        self.cancelled.append((request_id, reason))

    def link_down_s(self) -> float:
        return self.down_s

    async def stats(self, report: tuple[str, list] | None = None) -> dict:
        groups = [{"group": g, "running": g, "free_slots": 1, "blocks_used": 15, "blocks_cached": 0,
                   "blocks_free": 45, "blocks_total": 60} for g in range(2)]
        mesh = {"running": 1, "waiting": 2, "blocks_used": 30, "blocks_total": 120, "prefix_query_tokens": 400,
                "prefix_hit_tokens": 100, "preemptions": 5, "up": True, "kv_groups": 2, "groups": groups}
        return {"ready": self.ready, "max_model_len": self.max_model_len, "vocab_size": self.vocab_size,
                "held": self.held,
                "meshes": [{"name": name, **mesh, "stalled": name in self.stalled} for name in ("mesh-0", "mesh-1")]}
