"""Saturating a served app through HTTP and measuring what it delivers while every stream decodes.

Galaxy prefill runs one user at a time, so a saturation run begins with prefills that no decode overlaps
and ends with streams finishing one by one; the whole-run rate understates what the meshes deliver. The
figure compared with their capacity is taken over the steady window instead: from the last stream's first
token to the first stream's end, when every stream is decoding. Tokens are counted exactly from the usage
on every chunk (`stream_options.continuous_usage_stats`), so coalesced chunks count every token they carry.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from model.galaxy import NUM_SLOTS
from model.simulated import GalaxyTiming

Marks = list[tuple[float, int]]  # (arrival time, completion tokens so far); the first mark is (sent, 0)
SENT_EVENT = "send_request_headers.started"  # httpcore's trace event (http11. or http2.): the request's first write


async def stream(http: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                 on_tokens: Callable[[int], object] | None = None, extra: dict | None = None) -> Marks:
    """One streaming completion (greedy, ignore_eos, so it runs to max_tokens); a mark for every chunk
    that brought new tokens. `on_tokens(n)` hears of every n new tokens (a progress bar). A stream that ends
    in an error event raises, as an HTTP error does: its marks would end the steady window early.

    The first mark is when the request's first bytes were written (httpcore's `trace` request extension, its
    send_request_headers event), not when this was called: httpx's own work before that (the body's JSON, the
    request, the connection pool: ~0.5 ms of CPU on the 2-core box) is the client's, and it was half of what
    bench.single_mesh then called the stack's TTFT overhead. A transport that does not trace (a mock) leaves the
    call's time. `extra`: more fields of the request's body (a constraint, say)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **(extra or {})}
    sent = time.perf_counter()

    async def trace(event: str, info: dict) -> None:
        nonlocal sent
        if event.endswith(SENT_EVENT):
            sent = time.perf_counter()

    async with http.stream("POST", f"{url}/v1/completions", json=body, extensions={"trace": trace}) as r:
        marks = [(sent, 0)]
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                payload = json.loads(line[6:])
                if payload.get("error"):
                    raise RuntimeError(f"stream failed after {marks[-1][1]} tokens: {payload['error']}")
                usage = payload.get("usage")
                if usage and usage["completion_tokens"] > marks[-1][1]:
                    if on_tokens is not None:
                        on_tokens(usage["completion_tokens"] - marks[-1][1])
                    marks.append((time.perf_counter(), usage["completion_tokens"]))
    return marks


PROMPT_IDS = range(1000, 49152)  # below SmolLM2's vocabulary size, the model the benchmarks serve: past it, a 400


def distinct_prompts(count: int, length: int, first_id: int = 1000) -> list[list[int]]:
    """Token-id prompts whose first tokens differ, so no two share a cached prefix block. Ids wrap around
    within PROMPT_IDS (97 and its length are coprime: first tokens differ up to 48,152 prompts)."""
    low, span = PROMPT_IDS.start, len(PROMPT_IDS)
    return [[low + (first_id - low + 97 * c + i) % span for i in range(length)] for c in range(count)]


async def drive(url: str, model: str, prompts: list[list[int]], max_tokens: int,
                on_tokens: Callable[[int], object] | None = None, extra: dict | None = None
                ) -> tuple[list[Marks], float]:
    """All prompts at once, each on its own connection; the marks of every stream and the wall time."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as http:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[stream(http, url, model, p, max_tokens, on_tokens, extra) for p in prompts])
        return list(runs), time.perf_counter() - t0


def tokens_until(marks: Marks, t: float) -> int:
    return max((n for when, n in marks if when <= t), default=0)


@dataclass(frozen=True)
class SteadyWindow:
    start: float  # every stream has its first token
    end: float  # no stream has finished yet
    tokens: int  # delivered inside the window, over all streams
    first_context_tokens: int  # output tokens of the longest stream at the window's start ...
    last_context_tokens: int  # ... and at its end: the decode steps the window covers

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def steady_window(runs: list[Marks]) -> SteadyWindow:
    start = max(m[1][0] for m in runs)
    end = min(m[-1][0] for m in runs)
    if end <= start:
        raise ValueError("no steady window: a stream ended before the last one began; ask for more output tokens")
    return SteadyWindow(start, end, sum(tokens_until(m, end) - tokens_until(m, start) for m in runs),
                        max(tokens_until(m, start) for m in runs), max(tokens_until(m, end) for m in runs))


def ttfts(runs: list[Marks]) -> list[float]:
    return [m[1][0] - m[0][0] for m in runs]


def capacity_tokens_per_s(slots: int, prompt_tokens: int, window: SteadyWindow, time_scale: float,
                          timing: GalaxyTiming | None = None, meshes: int = 1) -> float:
    """What `slots` streams, spread evenly over `meshes`, make over the steps the window covers: one token per
    decoding stream per step (a mesh decodes at most NUM_SLOTS), each step taking the published time of a
    step of a mesh's users at that context (the simulated backend's rule), scaled. A stream holding k tokens
    makes its next one in a step at context prompt + k."""
    timing = timing or GalaxyTiming.published()
    first = prompt_tokens + window.first_context_tokens
    contexts = range(first, max(prompt_tokens + window.last_context_tokens, first + 1))
    users = users_per_mesh(slots, meshes)
    mean_step_s = sum(timing.batch_step_seconds(c, users) for c in contexts) / len(contexts)
    return min(slots, meshes * users) / (mean_step_s * time_scale)


def users_per_mesh(streams: int, meshes: int) -> int:
    """How many of `streams`, spread evenly over `meshes`, one mesh decodes at once (at most NUM_SLOTS)."""
    return min(NUM_SLOTS, -(-streams // meshes))
