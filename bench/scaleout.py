"""Scale-out on one box: N fake Galaxy nodes with simulated meshes, saturated through HTTP.

    python -m bench.scaleout --meshes 1,2,4,8 [--time-scale-per-mesh 6] [--json]

For each N: a local Ray cluster of N fake nodes, each advertising `galaxy: 1` (so every mesh replica lands
on its own "Galaxy", as on real hosts), the app with N simulated meshes, then N*32 concurrent streaming
clients (distinct 128-token prompts, 256 output tokens, ignore_eos) through the Serve HTTP proxy. Per N it
reports the delivered output tokens/s over the steady window (every stream decoding; see bench/saturation.py),
the simulated capacity (N*32 tokens per decode step at the window's contexts), their ratio (efficiency),
TTFT p50/p99 under that load (wall, and divided by time_scale: in Galaxy time; from each request's first bytes
on the wire, bench/saturation.py's stream, since 2026-12-06: before, from when its coroutine began, which also
counted this client's own setup of the N*32 connections opened at once), the router's CPU time per
decode round (planning plus taking results in, from its stats), and the box's 1-minute load average at the
end of the run (the box is shared: a load above its 2 cores starves the stack). The cluster is shut down
between N values.

Why time_scale = N * --time-scale-per-mesh: one real-time Galaxy makes ~2,000 tokens/s at batch 32, and
every token crosses the router, the ingress, the Serve proxy and this benchmark's client, all on one shared
2-core box, at ~2.5 ms of CPU per token in all (measured here at N=1; ~5 ms at N=8, with a proxy per node).
Real-time meshes would make N times that and measure the box, not the stack. Slowing every simulated mesh
by N keeps the token rate through HTTP the same at every N (one Galaxy's rate divided by
--time-scale-per-mesh; the default 6 gives ~360 tokens/s, about one core of stack CPU), so what grows
with N is what scale-out adds: meshes, nodes, router loops, streams. Capacity is scaled by the same factor,
so efficiency compares like with like; a mesh that waits on the stack shows up as efficiency below 1.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from bench import args as arg_types
from bench.local_serve import GalaxyCluster, serve_app
from bench.saturation import capacity_tokens_per_s, distinct_prompts, drive, steady_window, ttfts
from deployments.config import AppConfig
from model.galaxy import MAX_TIME_SCALE


def measure(config: AppConfig, prompt_tokens: int, output_tokens: int) -> dict:
    n = config.num_meshes
    clients = n * config.num_slots
    cluster = GalaxyCluster(n)
    try:
        with serve_app(config, cluster_address=cluster.address) as url:
            asyncio.run(drive(url, config.name, distinct_prompts(2 * n, prompt_tokens, first_id=30000), 4))  # warm-up
            with tqdm(total=clients * output_tokens, unit="tok", desc=f"{n} mesh(es)", file=sys.stderr) as bar:
                runs, wall = asyncio.run(drive(url, config.name, distinct_prompts(clients, prompt_tokens),
                                               output_tokens, bar.update))
            load = os.getloadavg()[0]
    finally:
        cluster.shutdown()
    window = steady_window(runs)
    capacity = capacity_tokens_per_s(clients, prompt_tokens, window, config.time_scale, meshes=n)
    ttft_ms = np.percentile(np.asarray(ttfts(runs)) * 1e3, [50, 99])
    return {"meshes": n, "time_scale": config.time_scale, "clients": clients,
            "delivered_tokens_per_s": window.tokens_per_s, "capacity_tokens_per_s": capacity,
            "efficiency": window.tokens_per_s / capacity,
            "ttft_p50_ms": float(ttft_ms[0]), "ttft_p99_ms": float(ttft_ms[1]),
            "ttft_p50_galaxy_ms": float(ttft_ms[0]) / config.time_scale,
            "ttft_p99_galaxy_ms": float(ttft_ms[1]) / config.time_scale,
            "galaxy_equivalent_tokens_per_s": window.tokens_per_s * config.time_scale,
            "window_s": window.seconds, "window_tokens": window.tokens, "whole_run_s": wall,
            "chunks_per_s": sum(len(m) - 1 for m in runs) / wall, "load_avg_1min": load}


COLUMNS = [  # (header, result key, format, multiplier)
    ("meshes", "meshes", "d", 1), ("time_scale", "time_scale", "g", 1), ("clients", "clients", "d", 1),
    ("delivered tok/s", "delivered_tokens_per_s", ".0f", 1), ("capacity tok/s", "capacity_tokens_per_s", ".0f", 1),
    ("efficiency", "efficiency", ".3f", 1),
    ("TTFT p50 s", "ttft_p50_ms", ".1f", 1e-3), ("TTFT p99 s", "ttft_p99_ms", ".1f", 1e-3),
    ("p50 Galaxy ms", "ttft_p50_galaxy_ms", ".0f", 1), ("p99 Galaxy ms", "ttft_p99_galaxy_ms", ".0f", 1),
    ("chunks/s", "chunks_per_s", ".0f", 1),
    ("load", "load_avg_1min", ".1f", 1),
]


def print_table(report: dict) -> None:
    print("  ".join(header for header, *_ in COLUMNS))
    for r in report["results"]:
        print("  ".join(f"{r[key] * scale:>{len(header)}{fmt}}" for header, key, fmt, scale in COLUMNS))
    c = report["config"]
    print(f"time_scale = meshes x {c['time_scale_per_mesh']:g}: every mesh runs that much slower than a Galaxy, so "
          "the token rate through HTTP is the same at every N. TTFT under saturation (32 queued prefills per mesh) "
          "in wall seconds and in Galaxy ms (wall / time_scale); load: 1-minute load average of this 2-core box. "
          f"{c['prompt_tokens']} prompt / {c['output_tokens']} output tokens, decode_steps {c['decode_steps']}, "
          f"stream_interval_ms {c['stream_interval_ms']:g}, ingress_replicas {c['ingress_replicas']}.")


def mesh_counts(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8], read whole before any cluster starts: each count costs minutes."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated mesh counts, not {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"every mesh count must be at least 1, not {text!r}")
    return counts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", type=mesh_counts, default="1,2,4,8",
                   help="comma-separated mesh counts, one cluster each")
    p.add_argument("--time-scale-per-mesh", type=arg_types.time_scale, default=6.0,
                   help="time_scale = N x this; the HTTP token rate is one Galaxy's divided by it")
    p.add_argument("--prompt-tokens", type=arg_types.count(), default=128)
    p.add_argument("--output-tokens", type=arg_types.count(), default=256)
    p.add_argument("--decode-steps", type=arg_types.count(1, 128), default=8)
    p.add_argument("--stream-interval-ms", type=arg_types.interval_ms, default=10.0)
    p.add_argument("--ingress-replicas", type=arg_types.count(), default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if max(args.meshes) * args.time_scale_per_mesh > MAX_TIME_SCALE:  # each cluster's time_scale is N x this
        p.error(f"argument --time-scale-per-mesh: {max(args.meshes)} meshes x {args.time_scale_per_mesh:g} is past "
                f"the simulated backend's time_scale ceiling, {MAX_TIME_SCALE:g}")
    report = {"config": {"time_scale_per_mesh": args.time_scale_per_mesh, "prompt_tokens": args.prompt_tokens,
                         "output_tokens": args.output_tokens, "decode_steps": args.decode_steps,
                         "stream_interval_ms": args.stream_interval_ms, "ingress_replicas": args.ingress_replicas},
              "results": []}
    with contextlib.redirect_stdout(sys.stderr):  # Ray's cluster chatter, kept off the report
        for n in args.meshes:
            config = AppConfig(model="smollm2", backend="simulated", num_meshes=n, mesh_resources={"galaxy": 1},
                               mesh_num_cpus=0.1, ingress_num_cpus=0.1, time_scale=n * args.time_scale_per_mesh,
                               decode_steps=args.decode_steps, stream_interval_ms=args.stream_interval_ms,
                               ingress_replicas=args.ingress_replicas)
            report["results"].append(measure(config, args.prompt_tokens, args.output_tokens))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return report


if __name__ == "__main__":
    main()
