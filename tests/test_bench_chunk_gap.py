"""bench.chunk_gap's arithmetic (the served run itself is a benchmark, not a test)."""
import pytest

from bench.chunk_gap import chunk_gaps


def test_gaps_are_between_chunks_of_one_stream_and_leave_out_the_ttft():
    runs = [[(0.0, 0), (1.0, 1), (1.1, 3), (1.4, 4)],  # sent at 0: the TTFT (1.0) is no gap
            [(0.5, 0), (2.0, 2), (2.05, 5)]]
    assert chunk_gaps(runs) == pytest.approx([0.1, 0.3, 0.05])


def test_only_gaps_with_both_chunks_inside_the_window_count():
    runs = [[(0.0, 0), (1.0, 1), (1.1, 2), (1.4, 3), (2.0, 4)]]
    assert chunk_gaps(runs, start=1.05, end=1.5) == pytest.approx([0.3])
    assert chunk_gaps(runs, start=3.0, end=4.0) == []


def test_a_steady_window_too_short_for_any_gap_says_so(monkeypatch):
    """Every stream decoding for less than a chunk apart: the run ended in numpy's IndexError (a percentile of no
    gaps), after the whole served run."""
    import contextlib

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
