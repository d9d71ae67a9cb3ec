"""How smooth many streams stay: the gap between two chunks of one stream, with many streams on many meshes.

    python -m bench.chunk_gap [--meshes 8] [--streams 256] [--output-tokens 384] [--time-scale 8] [--json]

Serves `--meshes` simulated Galaxies (bench.local_serve.serve_app: throughput mode, HAProxy) and runs
`--streams` concurrent streaming completions (distinct 128-token prompts, greedy, ignore_eos). Every chunk
that brings tokens is timed where the client reads it; a gap is the time between two such chunks of one
stream. The figure is taken over the steady window (every stream decoding: from the last stream's first
token to the first stream's end), since before it each mesh prefills its users one at a time and a Galaxy
decodes nobody while it prefills. A token can wait for its step and then for the router's flush, so the
bar (docs/DESIGN.md, "Data path at scale") is p99 gap <= 50 ms + the decode step, the step being the simulated
Galaxy's at the window's longest context, times the time scale.

The meshes run at 1/time_scale of a Galaxy's speed so that this 2-core box can carry every stream's
tokens through the HTTP path (8 meshes at time_scale 8 deliver what one real-time Galaxy does); the
router, the ingress and the client still handle every stream and every chunk.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

import numpy as np

from bench import args as arg_types
from bench.local_serve import serve_app
from bench.saturation import Marks, distinct_prompts, drive, steady_window, users_per_mesh
from deployments.config import AppConfig
from model.galaxy import NUM_SLOTS
from model.simulated import GalaxyTiming

SLACK_S = 0.050  # what a flush may add to a step (the bar's 50 ms)


def chunk_gaps(runs: list[Marks], start: float = float("-inf"), end: float = float("inf")) -> list[float]:
    """Seconds between consecutive token-bearing chunks of each stream, both inside [start, end]. A stream's
    first mark is the request being sent (its first gap is the TTFT): it is left out."""
    gaps = []
    for marks in runs:
        times = [t for t, _ in marks[1:] if start <= t <= end]
        gaps += [b - a for a, b in zip(times, times[1:])]
    return gaps


def measure(meshes: int, streams: int, output_tokens: int, prompt_tokens: int, time_scale: float) -> dict:
    config = AppConfig(model="smollm2", backend="simulated", time_scale=time_scale, num_meshes=meshes,
                       mesh_num_cpus=min(0.5, 2.0 / meshes), max_seq_len=131072)
    with serve_app(config) as url:
        asyncio.run(drive(url, config.name, distinct_prompts(meshes, prompt_tokens, first_id=40000), 4))  # warm-up
        runs, wall = asyncio.run(drive(url, config.name, distinct_prompts(streams, prompt_tokens), output_tokens))
    window = steady_window(runs)
    steady = np.asarray(chunk_gaps(runs, window.start, window.end)) * 1e3
    if not steady.size:
        raise ValueError("no stream has two chunks inside the steady window; ask for more output tokens")
    whole = np.asarray(chunk_gaps(runs)) * 1e3
    users = users_per_mesh(streams, meshes)  # all at about the same context
    step_s = GalaxyTiming.published().batch_step_seconds(prompt_tokens + window.last_context_tokens, users)
    step_ms = step_s * time_scale * 1e3
    bar_ms = SLACK_S * 1e3 + step_ms
    return {"config": {"meshes": meshes, "streams": streams, "output_tokens": output_tokens,
                       "prompt_tokens": prompt_tokens, "time_scale": time_scale},
            "wall_s": round(wall, 2), "steady_window_s": round(window.seconds, 2),
            "steady_tokens_per_s": round(window.tokens_per_s, 1),
            "decode_step_ms": round(step_ms, 1), "bar_ms": round(bar_ms, 1),
            "gap_ms_steady": _summary(steady), "gap_ms_whole_run": _summary(whole),
            "met": float(np.percentile(steady, 99)) <= bar_ms}


def _summary(gaps_ms: np.ndarray) -> dict:
    return {"p50": round(float(np.percentile(gaps_ms, 50)), 1), "p99": round(float(np.percentile(gaps_ms, 99)), 1),
            "max": round(float(gaps_ms.max()), 1), "count": int(gaps_ms.size)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", type=arg_types.count(), default=8)
    p.add_argument("--streams", type=arg_types.count(), default=256)
    p.add_argument("--output-tokens", type=arg_types.count(), default=384)
    p.add_argument("--prompt-tokens", type=arg_types.count(), default=128)
    p.add_argument("--time-scale", type=arg_types.time_scale, default=8.0,
                   help="simulated mesh slowdown (8: 1/8 of a Galaxy)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    arg_types.check_context(p, args.prompt_tokens, args.output_tokens)
    if args.streams > args.meshes * NUM_SLOTS:  # a stream past every slot waits for another to end
        p.error(f"argument --streams: at most {NUM_SLOTS} per mesh ({args.meshes * NUM_SLOTS} for {args.meshes}), "
                f"not {args.streams}: past the slots no moment has every stream decoding")
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints its shutdown notices there: keep --json clean
        report = measure(args.meshes, args.streams, args.output_tokens, args.prompt_tokens, args.time_scale)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        c, s = report["config"], report["gap_ms_steady"]
        print(f"{c['streams']} streams on {c['meshes']} simulated meshes at time_scale {c['time_scale']}: "
              f"steady window {report['steady_window_s']} s, {report['steady_tokens_per_s']:.0f} tok/s")
        print(f"gap between two chunks of one stream (steady): p50 {s['p50']} ms, p99 {s['p99']} ms, max {s['max']} ms "
              f"over {s['count']} gaps; bar 50 ms + decode step {report['decode_step_ms']} ms = {report['bar_ms']} ms: "
              f"{'met' if report['met'] else 'NOT met'}")
        w = report["gap_ms_whole_run"]
        print(f"whole run (prefills included): p50 {w['p50']} ms, p99 {w['p99']} ms, max {w['max']} ms")
    return report


if __name__ == "__main__":
    main()
