"""The saturation measurement's arithmetic on known inputs (no cluster; tests/test_cluster_e2e.py runs one)."""
import asyncio
import json

import httpx
import pytest

from bench.saturation import (SteadyWindow, capacity_tokens_per_s, distinct_prompts, steady_window, stream,
                              tokens_until, ttfts, users_per_mesh)

# Two streams sent at t=0: (arrival time, completion tokens so far).
EARLY = [(0.0, 0), (1.0, 1), (2.0, 3), (3.0, 5), (4.0, 6)]
LATE = [(0.0, 0), (1.5, 1), (2.5, 2), (3.5, 4), (5.0, 6)]


class LinearTiming:
    """A decode step of 32 users takes 1e-4 s per token of context, in proportion to its users."""

    @staticmethod
    def batch_step_seconds(context: int, users: int) -> float:
        return 1e-4 * context * users / 32


TIMING = LinearTiming()


def test_tokens_until_counts_what_arrived_by_then():
    assert [tokens_until(EARLY, t) for t in (0.5, 1.0, 2.9, 9.0)] == [0, 1, 3, 6]


def test_steady_window_runs_from_last_first_token_to_first_end():
    w = steady_window([EARLY, LATE])
    assert (w.start, w.end) == (1.5, 4.0)
    assert w.tokens == (6 - 1) + (4 - 1)  # EARLY: 1 -> 6 tokens; LATE: 1 -> 4 tokens
    assert w.tokens_per_s == pytest.approx(8 / 2.5)
    assert (w.first_context_tokens, w.last_context_tokens) == (1, 6)  # the longest stream at each edge


def test_no_steady_window_when_a_stream_ends_before_another_starts():
    with pytest.raises(ValueError, match="no steady window"):
        steady_window([[(0.0, 0), (1.0, 1), (2.0, 2)], [(0.0, 0), (3.0, 1), (4.0, 2)]])


def test_a_window_of_no_length_is_no_steady_window():
    """The last first token and the first end at one instant: a rate over 0 s (a ZeroDivisionError in tokens_per_s)."""
    with pytest.raises(ValueError, match="no steady window"):
        steady_window([[(0.0, 0), (1.0, 1), (2.0, 2)], [(0.0, 0), (2.0, 1), (3.0, 2)]])


def test_the_window_covers_steps_from_the_longest_streams_context_at_its_start():
    """The first context the capacity averages over is the longest stream's at the window's start, as the last is at
    its end: the shortest's would average in steps at contexts no stream was at by then."""
    ahead = [(0.0, 0), (1.0, 1), (2.0, 3), (3.0, 5), (4.0, 6)]
    behind = [(0.0, 0), (2.0, 1), (3.0, 2), (5.0, 4)]
    w = steady_window([ahead, behind])
    assert (w.start, w.end) == (2.0, 4.0)
    assert (w.first_context_tokens, w.last_context_tokens) == (3, 6)


@pytest.mark.parametrize("streams, meshes, users", [(33, 2, 17), (256, 8, 32), (300, 8, 32), (5, 8, 1)])
def test_users_per_mesh_rounds_up_and_stops_at_the_slots(streams, meshes, users):
    """33 streams on 2 meshes put 17 on one: its steps, the slower, pace the run (bench.chunk_gap's bar)."""
    assert users_per_mesh(streams, meshes) == users


def test_ttfts_are_first_token_minus_send():
    assert ttfts([EARLY, LATE]) == [1.0, 1.5]


def test_capacity_averages_the_step_time_over_the_contexts_the_window_covers():
    w = SteadyWindow(start=1.0, end=2.0, tokens=200, first_context_tokens=0, last_context_tokens=100)
    mean_step = 1e-4 * sum(range(100, 200)) / 100  # contexts prompt + 0 .. prompt + 99
    got = capacity_tokens_per_s(32, 100, w, time_scale=2.0, timing=TIMING)
    assert got == pytest.approx(32 / (mean_step * 2.0))
    slower = capacity_tokens_per_s(32, 500, w, time_scale=2.0, timing=TIMING)  # longer prompts: slower steps
    assert slower < got


def test_capacity_of_a_window_without_new_tokens_uses_its_one_context():
    w = SteadyWindow(start=1.0, end=2.0, tokens=0, first_context_tokens=5, last_context_tokens=5)
    assert capacity_tokens_per_s(64, 195, w, 1.0, TIMING, meshes=2) == pytest.approx(64 / (1e-4 * 200))  # 32 each
    assert capacity_tokens_per_s(64, 195, w, 1.0, TIMING) == pytest.approx(32 / (1e-4 * 200))  # one mesh seats 32
    assert capacity_tokens_per_s(8, 195, w, 1.0, TIMING) == pytest.approx(8 / (1e-4 * 200 * 8 / 32))


def test_distinct_prompts_share_no_first_token():
    prompts = distinct_prompts(256, 128)
    assert all(len(p) == 128 for p in prompts)
    assert len({p[0] for p in prompts}) == 256


@pytest.mark.parametrize("count, length, first_id", [(512, 128, 1000), (2, 50_000, 1000), (100, 128, 40000)])
def test_distinct_prompts_stay_in_the_served_vocabulary(count, length, first_id):
    """Ids ran on past SmolLM2's 49,152 (1000 + 97 x 511 + 127 for 512 prompts; a 50,000-token prompt; chunk_gap's
    warm-up of 100 meshes), and the server answers such a prompt with a 400: bench.cpu --streams 497, chunk_gap
    --meshes 16 --streams 512, --prompt-tokens 50000 ended in an HTTPStatusError traceback once Ray had started."""
    prompts = distinct_prompts(count, length, first_id)
    assert all(0 <= t < 49152 for p in prompts for t in p)
    assert len({p[0] for p in prompts}) == count and all(len(p) == length for p in prompts)


def test_distinct_prompts_are_those_of_earlier_runs_where_they_fit():
    assert distinct_prompts(2, 3) == [[1000, 1001, 1002], [1097, 1098, 1099]]
    assert distinct_prompts(1, 2, first_id=30000) == [[30000, 30001]]


def test_a_stream_that_ends_in_an_error_fails_the_run():
    """Its marks came back as a short stream: the steady window ended at the failure and every figure (tok/s,
    efficiency, gaps, CPU per token) was taken over it with no word of a failed request."""
    events = [{"choices": [{"index": 0, "text": "a"}], "usage": {"completion_tokens": 1}},
              {"error": {"message": "mesh lost", "type": "internal_error", "code": 500}}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    answer = httpx.MockTransport(lambda request: httpx.Response(200, text=body))

    async def one():
        async with httpx.AsyncClient(transport=answer) as http:
            return await stream(http, "http://server", "m", [1, 2], max_tokens=4)

    with pytest.raises(RuntimeError, match="mesh lost"):
        asyncio.run(one())


@pytest.mark.parametrize("meshes", ["1,x", "2,0", "1,,4", "-1"])
def test_a_bad_mesh_list_is_a_usage_error_before_any_cluster(meshes, monkeypatch, capsys):
    """The list was read lazily: `1,x` served one mesh for minutes, then died on `x` with a ValueError, its
    figures lost; `2,0` built an app with no mesh."""
    from bench import scaleout

    measured = []
    monkeypatch.setattr(scaleout, "measure", lambda config, *a: measured.append(config.num_meshes) or {})
    with pytest.raises(SystemExit) as exit_:
        scaleout.main(["--meshes", meshes])
    assert exit_.value.code == 2 and "--meshes" in capsys.readouterr().err
    assert measured == []


def test_each_mesh_counts_figures_come_from_its_own_saturated_run(monkeypatch, capsys):
    """measure's arithmetic without a cluster: N*32 streams, time_scale N x per-mesh, capacity for N meshes,
    TTFT percentiles in wall and Galaxy ms, chunks/s; the cluster is shut down after its run."""
    import contextlib

    from bench import scaleout

    calls, shut = [], []

    class FakeCluster:
        def __init__(self, n: int):
            self.address = f"cluster-{n}"

        def shutdown(self):
            shut.append(self.address)

    @contextlib.contextmanager
    def fake_serve_app(config, cluster_address=None):
        yield f"http://{cluster_address}"

    async def fake_drive(url, model, prompts, max_tokens, on_tokens=None):
        calls.append((url, len(prompts), {len(p) for p in prompts}, max_tokens))
        # stream c: its first token at 1 + c/100 s, then 4 more tokens by 3 s and 4 more by 5 s
        return [[(0.0, 0), (1.0 + c / 100, 1), (3.0, 5), (5.0, 9)] for c in range(len(prompts))], 8.0

    monkeypatch.setattr(scaleout, "GalaxyCluster", FakeCluster)
    monkeypatch.setattr(scaleout, "serve_app", fake_serve_app)
    monkeypatch.setattr(scaleout, "drive", fake_drive)
    (r,) = scaleout.main(["--meshes", "2", "--time-scale-per-mesh", "6", "--json"])["results"]
    assert calls == [("http://cluster-2", 4, {128}, 4), ("http://cluster-2", 64, {128}, 256)] and shut == ["cluster-2"]
    assert (r["meshes"], r["time_scale"], r["clients"]) == (2, 12.0, 64)
    window = steady_window([[(0.0, 0), (1.0 + c / 100, 1), (3.0, 5), (5.0, 9)] for c in range(64)])
    assert r["delivered_tokens_per_s"] == pytest.approx(64 * 8 / (5.0 - 1.63))
    assert r["capacity_tokens_per_s"] == pytest.approx(capacity_tokens_per_s(64, 128, window, 12.0, meshes=2))
    assert r["efficiency"] == pytest.approx(r["delivered_tokens_per_s"] / r["capacity_tokens_per_s"])
    assert (r["ttft_p50_ms"], r["ttft_p99_ms"]) == (pytest.approx(1315.0), pytest.approx(1623.7))
    assert r["ttft_p99_galaxy_ms"] == pytest.approx(1623.7 / 12)
    assert r["ttft_p50_galaxy_ms"] == pytest.approx(1315.0 / 12)
    assert r["galaxy_equivalent_tokens_per_s"] == pytest.approx(r["delivered_tokens_per_s"] * 12)
    assert r["chunks_per_s"] == pytest.approx(64 * 3 / 8.0)
    capsys.readouterr()


def test_the_time_scale_ceiling_is_checked_at_the_largest_mesh_count(monkeypatch, capsys):
    """Each cluster's time_scale is N x --time-scale-per-mesh: `1,8` at 200 is 1,600 at N = 8, past the ceiling."""
    from bench import scaleout

    measured = []
    monkeypatch.setattr(scaleout, "measure", lambda config, *a: measured.append(config.num_meshes) or {})
    with pytest.raises(SystemExit) as exit_:
        scaleout.main(["--meshes", "1,8", "--time-scale-per-mesh", "200"])
    assert exit_.value.code == 2 and "8 meshes x 200" in capsys.readouterr().err and measured == []
