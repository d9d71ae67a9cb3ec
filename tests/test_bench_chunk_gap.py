"""bench.chunk_gap's arithmetic (the served run itself is a benchmark, not a test)."""
import contextlib

import pytest

from bench.chunk_gap import chunk_gaps
from bench.saturation import steady_window
from model.simulated import GalaxyTiming


def test_gaps_are_between_chunks_of_one_stream_and_leave_out_the_ttft():
    runs = [[(0.0, 0), (1.0, 1), (1.1, 3), (1.4, 4)],  # sent at 0: the TTFT (1.0) is no gap
            [(0.5, 0), (2.0, 2), (2.05, 5)]]
    assert chunk_gaps(runs) == pytest.approx([0.1, 0.3, 0.05])


def test_only_gaps_with_both_chunks_inside_the_window_count():
    runs = [[(0.0, 0), (1.0, 1), (1.1, 2), (1.4, 3), (2.0, 4)]]
    assert chunk_gaps(runs, start=1.05, end=1.5) == pytest.approx([0.3])
    assert chunk_gaps(runs, start=3.0, end=4.0) == []


def test_the_chunks_at_the_steady_windows_edges_are_inside_it():
    """The window opens at the last stream's first chunk and closes at the first stream's last: a window open at
    either edge drops those streams' gaps there."""
    runs = [[(0.0, 0), (1.0, 1), (1.5, 2), (2.0, 3)], [(0.0, 0), (1.2, 1), (1.6, 2), (2.2, 3)]]
    window = steady_window(runs)
    assert chunk_gaps(runs, window.start, window.end) == pytest.approx([0.5, 0.4])


def test_the_bar_is_the_step_at_the_longest_context_of_that_many_users_scaled_and_the_figures_are_the_windows(
        monkeypatch):
    """The bar (50 ms + a step) takes the step of `streams / meshes` users at the window's longest context, times the
    time scale; p50, p99 and met read the steady window's gaps, the whole run's only their own summary."""
    from bench import chunk_gap

    runs = [[(0.0, 0), (0.2, 1), (1.1, 1000), (1.2, 2000), (1.3, 3000)],  # 900 ms before the window
            [(0.0, 0), (1.05, 1), (1.07, 1000), (1.25, 2000), (1.32, 2500), (1.5, 3000)]]

    @contextlib.contextmanager
    def serve_app(config):
        yield "http://unused"

    async def drive(url, model, prompts, max_tokens):
        return (runs, 2.0) if len(prompts) == 2 else ([], 0.1)

    monkeypatch.setattr(chunk_gap, "serve_app", serve_app)
    monkeypatch.setattr(chunk_gap, "drive", drive)
    r = chunk_gap.measure(1, 2, 3000, 128, 8.0)
    step_ms = GalaxyTiming.published().batch_step_seconds(128 + 3000, 2) * 8.0 * 1e3
    assert r["decode_step_ms"] == round(step_ms, 1) and r["bar_ms"] == round(50 + step_ms, 1)
    assert r["gap_ms_steady"] == {"p50": 100.0, "p99": 177.6, "max": 180.0, "count": 4}  # 100, 100, 20, 180
    assert r["gap_ms_whole_run"]["max"] == 900.0 and r["gap_ms_whole_run"]["count"] == 7
    assert r["met"] is True  # p99 177.6 ms against a bar of 195.2 (the whole run's p99, 857 ms, would miss it)


def test_a_steady_window_too_short_for_any_gap_says_so(monkeypatch):
    """Every stream decoding for less than a chunk apart: the run ended in numpy's IndexError (a percentile of no
    gaps), after the whole served run."""
    from bench import chunk_gap

    @contextlib.contextmanager
    def serve_app(config):
        yield "http://unused"

    async def drive(url, model, prompts, max_tokens):
        return [[(0.0, 0), (1.0, 1), (3.0, 5)], [(0.0, 0), (2.5, 1), (4.0, 5)]][:len(prompts)], 4.0

    monkeypatch.setattr(chunk_gap, "serve_app", serve_app)
    monkeypatch.setattr(chunk_gap, "drive", drive)
    with pytest.raises(ValueError, match="output tokens"):
        chunk_gap.measure(1, 2, 5, 16, 1.0)
