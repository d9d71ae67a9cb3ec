"""Serving metrics on inputs whose results are worked out by hand."""
import pytest

from bench.metrics import (
    Distribution,
    RequestResult,
    meets_slos,
    output_throughput_timeline,
    parse_slos,
    summarize,
)


def result(start, chunk_times, end, output_tokens, prompt_tokens=10, error=None):
    return RequestResult(
        start=start, end=end, chunk_times=list(chunk_times), output_tokens=output_tokens,
        prompt_tokens=prompt_tokens, error=error,
    )


def test_per_request_latencies():
    r = result(10.0, [10.1, 10.3, 10.6], 10.6, output_tokens=3)
    assert r.ttft == pytest.approx(0.1)
    assert r.e2el == pytest.approx(0.6)
    assert r.tpot == pytest.approx(0.25)  # (0.6 - 0.1) / (3 - 1)
    assert r.itls == pytest.approx([0.2, 0.3])
    assert r.decode_tokens_per_s == pytest.approx(4.0)


def test_tpot_uses_token_count_not_chunk_count():
    r = result(0.0, [0.1, 0.5], 0.5, output_tokens=5)  # a server that sent 5 tokens in 2 chunks
    assert r.tpot == pytest.approx(0.1)  # (0.5 - 0.1) / 4


def test_one_token_answer_has_no_tpot():
    assert result(0.0, [0.2], 0.2, output_tokens=1).tpot is None


def test_distribution_in_milliseconds_with_linear_percentiles():
    d = Distribution.of_seconds([0.1, 0.4, 0.2, 0.3])
    assert d.mean == pytest.approx(250.0)
    assert d.p50 == pytest.approx(250.0)
    assert d.p90 == pytest.approx(370.0)  # rank 0.9 * 3 = 2.7: 300 + 0.7 * 100
    assert d.p99 == pytest.approx(397.0)  # rank 2.97: 300 + 0.97 * 100
    assert Distribution.of_seconds([]) is None


def test_parse_slos_takes_milliseconds():
    assert parse_slos(["ttft:500", "tpot:50", "e2el:2000"]) == {"ttft": 0.5, "tpot": 0.05, "e2el": 2.0}
    with pytest.raises(ValueError, match="NAME one of ttft, tpot, e2el"):
        parse_slos(["latency:5"])
    with pytest.raises(ValueError, match="not a number"):
        parse_slos(["ttft:fast"])


def test_meets_slos_needs_every_target():
    r = result(0.0, [0.1, 0.3, 0.6], 0.6, output_tokens=3)  # ttft 100 ms, tpot 250 ms, e2el 600 ms
    assert meets_slos(r, {"ttft": 0.1, "tpot": 0.25, "e2el": 0.6})
    assert not meets_slos(r, {"ttft": 0.2, "tpot": 0.2})
    assert meets_slos(result(0.0, [0.1], 0.1, output_tokens=1), {"tpot": 0.001})


def test_summary_over_a_run():
    results = [
        result(0.0, [0.1, 0.3, 0.6], 0.6, output_tokens=3, prompt_tokens=10),  # ttft 100, tpot 250, e2el 600
        # ttft 300, tpot (1000 - 300) / 4 = 175, e2el 1000
        result(0.5, [0.8, 1.0, 1.2, 1.4], 1.5, output_tokens=5, prompt_tokens=20),
        result(1.0, [], 1.1, output_tokens=0, error="HTTP 500: boom"),
    ]
    s = summarize(results, duration_s=2.0, slos={"ttft": 0.2})
    assert (s.completed, s.failed) == (2, 1)
    assert (s.input_tokens, s.output_tokens) == (30, 8)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(4.0)
    assert s.total_token_throughput == pytest.approx(19.0)
    assert s.goodput == pytest.approx(0.5)  # only the first request met ttft <= 200 ms
    assert s.ttft_ms.mean == pytest.approx(200.0)
    assert s.tpot_ms.mean == pytest.approx(212.5)
    assert s.e2el_ms.p50 == pytest.approx(800.0)
    assert s.itl_ms.mean == pytest.approx(1100.0 / 5)  # gaps 200, 300 and 200, 200, 200
    assert summarize(results, 2.0, slos={}).goodput is None


def test_throughput_timeline_spreads_tokens_over_chunks():
    results = [
        result(0.0, [0.2, 0.7], 0.7, output_tokens=4),  # 2 tokens per chunk
        result(0.0, [0.4, 1.1, 1.6], 1.6, output_tokens=3),
        result(0.0, [], 0.1, output_tokens=0, error="failed"),
    ]
    # bins of 0.5 s: [0, 0.5): 2 + 1, [0.5, 1.0): 2, [1.0, 1.5): 1, [1.5, 2.0): 1 -> tokens / 0.5 s
    assert output_throughput_timeline(results, t0=0.0, bin_s=0.5) == pytest.approx([6.0, 4.0, 2.0, 2.0])
    assert output_throughput_timeline([], t0=0.0) == []
