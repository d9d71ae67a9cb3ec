"""bench.single_mesh's figures on known first-token times, and its --json output (no server)."""
import asyncio
import contextlib
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from bench import single_mesh
from model.simulated import GalaxyTiming

TTFTS = [0.010 * (i + 1) for i in range(20)]  # 10, 20, ..., 200 ms


def test_idle_ttft_percentiles_are_numpys(monkeypatch):
    """p90 was sorted(ttfts)[int(0.9 * n)]: with 20 requests the 19th value (190 ms), not numpy's (and vLLM's)
    linear p90 of 181 ms that every other figure here uses."""
    sent = iter(TTFTS)

    async def stream(http, url, model, prompt, max_tokens):
        return [(0.0, 0), (next(sent), 1)]

    monkeypatch.setattr(single_mesh, "stream", stream)
    report = asyncio.run(single_mesh.idle_ttft("http://unused", len(TTFTS), 128, 1.0))
    assert report["median_ttft_ms"] == pytest.approx(105.0)
    assert report["p90_ttft_ms"] == pytest.approx(float(np.percentile(TTFTS, 90)) * 1e3)  # 181 ms


def test_idle_ttft_overhead_is_the_median_less_the_scaled_simulated_prefill(monkeypatch):
    """The mesh runs `time_scale` times slower, its prefill too: the overhead (the <= 5 ms bar) is what the stack adds
    to that. `overhead_with_client_ms` counts from the call, 1 ms before the request was on the wire here."""
    prefill_s = GalaxyTiming.published().prefill_seconds(0, 128) * 2.0
    clock = SimpleNamespace(perf_counter=lambda: 10.0)

    async def stream(http, url, model, prompt, max_tokens):
        return [(10.001, 0), (10.001 + prefill_s + 0.004, 1)]

    monkeypatch.setattr(single_mesh, "stream", stream)
    monkeypatch.setattr(single_mesh, "time", clock)
    report = asyncio.run(single_mesh.idle_ttft("http://unused", 3, 128, 2.0))
    assert report["simulated_prefill_ms"] == pytest.approx(prefill_s * 1e3)
    assert report["overhead_ms"] == pytest.approx(4.0)
    assert report["overhead_with_client_ms"] == pytest.approx(5.0)


def test_saturation_efficiency_is_the_steady_rate_over_the_capacity_at_the_time_scale(monkeypatch):
    """Efficiency (the >= 0.97 bar) is the steady window's delivered rate over what the mesh can make at that time
    scale (half as much at 2.0); the whole-run rate counts every token over the whole run, prefills included."""
    runs = [[(0.0, 0), (1.0, 1), (2.0, 3), (3.0, 5), (4.0, 6)], [(0.0, 0), (1.5, 1), (2.5, 2), (3.5, 4), (5.0, 6)]]

    async def drive(url, model, prompts, max_tokens, extra=None):
        return runs, 6.0

    monkeypatch.setattr(single_mesh, "drive", drive)
    real, slow = (asyncio.run(single_mesh.saturation("http://unused", 2, 128, 6, scale)) for scale in (1.0, 2.0))
    assert real["window_tokens"] == 8 and real["window_s"] == 2.5 and real["delivered_tokens_per_s"] == 3.2
    assert real["efficiency"] == pytest.approx(3.2 / real["mesh_capacity_tokens_per_s"])
    assert slow["mesh_capacity_tokens_per_s"] == pytest.approx(real["mesh_capacity_tokens_per_s"] / 2)
    assert slow["efficiency"] == pytest.approx(2 * real["efficiency"])
    assert real["whole_run_tokens_per_s"] == 2.0 and real["whole_run_s"] == 6.0


def test_json_is_all_that_goes_to_stdout(monkeypatch, capsys):
    """Ray's log lines (its raylet's "(raylet) Task ServeController.graceful_shutdown failed ..." on every app
    shutdown) went to stdout ahead of the JSON, so `--json | jq` could not parse it."""
    @contextlib.contextmanager
    def serve_app(config):
        print("(raylet) Task ServeController.graceful_shutdown failed.")  # as Ray's log monitor prints
        yield "http://unused"

    async def figures(*args, **kwargs):
        return {"figure": 1.0}

    monkeypatch.setattr(single_mesh, "serve_app", serve_app)
    monkeypatch.setattr(single_mesh, "saturation", figures)
    monkeypatch.setattr(single_mesh, "idle_ttft", figures)
    single_mesh.main(["--json"])
    assert json.loads(capsys.readouterr().out)["idle_ttft"] == {"figure": 1.0}


def test_idle_ttft_prompts_stay_in_the_served_vocabulary(monkeypatch):
    """Its prompts were 2000 + 13 x request + position: past SmolLM2's 49,152 ids from --prompt-tokens ~47,000 on,
    a 400 and an HTTPStatusError traceback in the warm-up, once Ray had started."""
    sent = []

    async def stream(http, url, model, prompt, max_tokens):
        sent.append(prompt)
        return [(0.0, 0), (0.1, 1)]

    monkeypatch.setattr(single_mesh, "stream", stream)
    asyncio.run(single_mesh.idle_ttft("http://unused", 2, 50_000, 1.0))
    assert all(0 <= t < 49152 for p in sent for t in p) and len({p[0] for p in sent}) == 2


def test_timed_ttft_prompts_share_no_prefix_with_the_warm_up_or_the_saturation_run(monkeypatch, capsys):
    """The warm-up's 3 prompts were the timed requests' first 3, and timed request 35 was saturation client 15's
    prompt (2000 + 13 x 35 = 1000 + 97 x 15): prefix-cache hits, whose prefill at --prompt-tokens 1024 is the 128
    new tokens' (59.6 ms against 161.3), timed as if fresh."""
    streamed, driven = [], []

    @contextlib.contextmanager
    def serve_app(config):
        yield "http://unused"

    async def stream(http, url, model, prompt, max_tokens):
        streamed.append(prompt)
        return [(0.0, 0), (0.1, 1)]

    async def drive(url, model, prompts, max_tokens, extra=None):
        driven.extend(prompts)
        return [[(0.0, 0), (1.0, 1), (2.0, 10)] for _ in prompts], 2.0

    monkeypatch.setattr(single_mesh, "serve_app", serve_app)
    monkeypatch.setattr(single_mesh, "stream", stream)
    monkeypatch.setattr(single_mesh, "drive", drive)
    single_mesh.main(["--ttft-requests", "40", "--prompt-tokens", "1024", "--json"])
    warm_up, timed = streamed[:3], streamed[3:]
    assert len(timed) == 40 and len(driven) == 32
    earlier = {p[0] for p in warm_up + driven}
    assert not [p[0] for p in timed if p[0] in earlier]


def test_structured_json_constrains_every_saturation_request_and_no_ttft_one(monkeypatch, capsys):
    """--structured json: the saturation run's requests carry the JSON schema (structured_outputs), so its
    efficiency is a constrained batch's; the idle TTFT requests stay plain."""
    bodies = []

    @contextlib.contextmanager
    def serve_app(config):
        yield "http://unused"

    class Client:
        def __init__(self, *args, **kwargs):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def stream(self, method, url, json=None, extensions=None):
            bodies.append(json)
            return Response()

    class Response:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def raise_for_status(self):
            pass

        async def aiter_lines(self):
            for n in (1, 2):
                await asyncio.sleep(0.01)  # every stream has begun before one ends: a steady window
                yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": n}})

    monkeypatch.setattr(single_mesh, "serve_app", serve_app)
    monkeypatch.setattr(httpx, "AsyncClient", Client)
    single_mesh.main(["--structured", "json", "--clients", "4", "--ttft-requests", "2", "--json"])
    constrained = [b for b in bodies if "structured_outputs" in b]
    assert len(constrained) == 4 and all(b["structured_outputs"] == single_mesh.STRUCTURED["json"]["structured_outputs"]
                                         for b in constrained)
    assert len(bodies) == 4 + 3 + 2  # the warm-up's 3 and the timed 2, plain
    assert json.loads(capsys.readouterr().out)["config"]["structured"] == "json"
