"""Serving metrics from streamed requests, with the definitions vLLM's benchmark uses so numbers compare.

TTFT: request sent -> first chunk carrying text, or the answer's end (an answer of EOS alone has no text).
E2E latency: sent -> stream closed.
TPOT: (E2E - TTFT) / (output tokens - 1), the mean time per token after the first, per request.
ITL: gaps between consecutive such chunks; a server that coalesces tokens shows fewer, longer gaps.
Goodput: completed requests per second that met every given SLO (DistServe's definition).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """One streamed request as the client saw it; times are time.perf_counter() seconds."""

    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text or a finish_reason
    text: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0  # from the server's usage when reported, else one per text chunk
    usage_reported: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return np.diff(self.chunk_times).tolist()

    @property
    def decode_tokens_per_s(self) -> float | None:
        """1 / TPOT: tokens after the first over the time after the first, in tokens/s. Lower than the Galaxy
        demo's tokens/s/user for a batch's early users (bench/client.py says why)."""
        tpot = self.tpot
        return 1.0 / tpot if tpot else None


@dataclass(frozen=True)
class Distribution:
    """Milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution | None:
        if len(values) == 0:
            return None
        ms = np.asarray(values, dtype=float) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(mean=float(ms.mean()), p50=float(p50), p90=float(p90), p99=float(p99))


@dataclass(frozen=True)
class Summary:
    duration_s: float
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    usage_reported: int  # requests whose token counts came from the server's usage, not from chunks
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    goodput: float | None  # requests / s that met every SLO; None when no SLO was given
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2el_ms: Distribution | None


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (milliseconds in, seconds out)."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected NAME:MILLISECONDS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms >= 0:  # a negative or NaN target is met by no request: goodput 0 that reads as a measurement
            raise ValueError(f"bad SLO {item!r}: the target must be a non-negative number of milliseconds")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """A one-token answer has no TPOT; it cannot miss a TPOT target."""
    observed = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.e2el}
    return all(observed[name] <= limit for name, limit in slos.items())


def summarize(results: Sequence[RequestResult], duration_s: float, slos: dict[str, float]) -> Summary:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    return Summary(
        duration_s=duration_s,
        completed=len(done),
        failed=len(results) - len(done),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        usage_reported=sum(r.usage_reported for r in done),
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        goodput=sum(meets_slos(r, slos) for r in done) / duration_s if slos else None,
        ttft_ms=Distribution.of_seconds([r.ttft for r in done]),
        tpot_ms=Distribution.of_seconds([r.tpot for r in done if r.tpot is not None]),
        itl_ms=Distribution.of_seconds([gap for r in done for gap in r.itls]),
        e2el_ms=Distribution.of_seconds([r.e2el for r in done]),
    )


def output_throughput_timeline(results: Sequence[RequestResult], t0: float, bin_s: float = 1.0) -> list[float]:
    """Output tokens/s in consecutive bins of bin_s seconds from t0. A request's tokens are spread evenly
    over its chunks, since a server that coalesces tokens reports more tokens (in usage) than chunks."""
    done = [r for r in results if r.ok]
    if not done:
        return []
    times = np.concatenate([np.asarray(r.chunk_times) - t0 for r in done])
    weights = np.concatenate([np.full(len(r.chunk_times), r.output_tokens / len(r.chunk_times)) for r in done])
    bins = int(times.max() // bin_s) + 1
    tokens = np.bincount((times // bin_s).astype(int), weights=weights, minlength=bins)
    return (tokens / bin_s).tolist()
