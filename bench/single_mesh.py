"""One simulated Galaxy behind the whole Serve stack: does HTTP deliver what the mesh makes?

    python -m bench.single_mesh [--time-scale 1.0] [--clients 32] [--structured json] [--json]

1. Saturation: `--clients` concurrent streaming requests (128 prompt tokens, 128 output tokens,
   ignore_eos). The mesh's ceiling is clients / decode step time (at the contexts the window covers).
   Galaxy prefill runs one user at a time (~60 ms each), so the whole run includes 32 prefills no decode
   can overlap; the figure compared with the ceiling is therefore the delivered rate while every stream
   is decoding (bench/saturation.py: from the last stream's first token to the first stream's end). The
   whole-run rate is printed beside it.
2. Idle TTFT: requests one at a time; median time to first token against the simulated prefill time. A request's
   time counts from its first bytes on the wire (bench/saturation.py, stream); `overhead_with_client_ms` also counts
   the HTTP client's own work before that (httpx's: ~0.5 ms here), as this benchmark did before 2026-12-06.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time

import httpx
import numpy as np

from bench import args as arg_types
from bench.local_serve import serve_app
from bench.saturation import capacity_tokens_per_s, distinct_prompts, drive, steady_window, stream
from deployments.config import AppConfig
from model.galaxy import NUM_SLOTS
from model.simulated import GalaxyTiming

MODEL = "SmolLM2-135M-Instruct"


# --structured json: every saturation request constrained by this schema, vLLM's structured_outputs (an array of
# strings with no end: the simulated tokens seldom close it, so nearly every stream runs to its output tokens)
STRUCTURED = {"json": {"structured_outputs": {"json": {"type": "object", "properties": {"items": {
    "type": "array", "items": {"type": "string"}}}, "required": ["items"]}}}}


async def saturation(url: str, clients: int, prompt_len: int, output_len: int, time_scale: float,
                     extra: dict | None = None) -> dict:
    runs, wall = await drive(url, MODEL, distinct_prompts(clients, prompt_len), output_len, extra=extra)
    window = steady_window(runs)
    capacity = capacity_tokens_per_s(clients, prompt_len, window, time_scale)
    total = sum(m[-1][1] for m in runs)
    return {"clients": clients, "window_s": window.seconds, "window_tokens": window.tokens,
            "delivered_tokens_per_s": window.tokens_per_s, "mesh_capacity_tokens_per_s": capacity,
            "efficiency": window.tokens_per_s / capacity, "whole_run_tokens_per_s": total / wall, "whole_run_s": wall}


async def idle_ttft(url: str, requests: int, prompt_len: int, time_scale: float, first_id: int = 1048) -> dict:
    """`first_id`: the prompts are distinct_prompts' from it. Those from 1048 (timed) and 1024 (the warm-up) lie
    between the saturation run's first tokens (1000 + 97 x client) and each other's, so no request finds its prompt
    cached, which would time a shorter prefill than the one it is compared with."""
    ttfts, from_call = [], []
    async with httpx.AsyncClient(timeout=600) as http:
        for prompt in distinct_prompts(requests, prompt_len, first_id):
            called = time.perf_counter()
            marks = await stream(http, url, MODEL, prompt, 4)
            ttfts.append(marks[1][0] - marks[0][0])
            from_call.append(marks[1][0] - called)
    prefill = GalaxyTiming.published().prefill_seconds(0, prompt_len) * time_scale
    median = statistics.median(ttfts)
    return {"requests": requests, "median_ttft_ms": median * 1e3, "simulated_prefill_ms": prefill * 1e3,
            "overhead_ms": (median - prefill) * 1e3, "p90_ttft_ms": float(np.percentile(ttfts, 90)) * 1e3,
            "overhead_with_client_ms": (statistics.median(from_call) - prefill) * 1e3}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time-scale", type=arg_types.time_scale, default=1.0)
    p.add_argument("--clients", type=arg_types.count(1, NUM_SLOTS), default=32,
                   help=f"at most the mesh's {NUM_SLOTS} slots: past them a client waits for another to end, so "
                        "no moment has every client decoding")
    p.add_argument("--prompt-tokens", type=arg_types.count(), default=128)
    p.add_argument("--output-tokens", type=arg_types.count(), default=128)
    p.add_argument("--ttft-requests", type=arg_types.count(), default=20)
    p.add_argument("--decode-steps", type=arg_types.count(1, 128), default=8)
    p.add_argument("--stream-interval-ms", type=arg_types.interval_ms, default=10.0)
    p.add_argument("--structured", choices=["none", *STRUCTURED], default="none",
                   help="constrain every saturation request (json: a JSON schema, STRUCTURED)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    arg_types.check_context(p, args.prompt_tokens, max(args.output_tokens, 4))  # idle TTFT asks for 4
    config = AppConfig(model="smollm2", backend="simulated", time_scale=args.time_scale, mesh_num_cpus=0.5,
                       decode_steps=args.decode_steps, stream_interval_ms=args.stream_interval_ms,
                       max_seq_len=131072)
    # Ray prints its shutdown notices on stdout: keep --json clean
    with contextlib.redirect_stdout(sys.stderr), serve_app(config) as url:
        asyncio.run(idle_ttft(url, 3, args.prompt_tokens, args.time_scale, first_id=1024))  # warm-up
        report = {"config": {"time_scale": args.time_scale, "decode_steps": args.decode_steps,
                             "stream_interval_ms": args.stream_interval_ms, "structured": args.structured},
                  "saturation": asyncio.run(saturation(url, args.clients, args.prompt_tokens, args.output_tokens,
                                                       args.time_scale, STRUCTURED.get(args.structured))),
                  "idle_ttft": asyncio.run(idle_ttft(url, args.ttft_requests, args.prompt_tokens, args.time_scale))}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        s, t = report["saturation"], report["idle_ttft"]
        print(f"saturation: {s['delivered_tokens_per_s']:.0f} tok/s delivered while all {s['clients']} decode, "
              f"mesh capacity {s['mesh_capacity_tokens_per_s']:.0f} tok/s, efficiency {s['efficiency']:.3f} "
              f"(whole run incl. prefills: {s['whole_run_tokens_per_s']:.0f} tok/s)")
        print(f"idle TTFT: median {t['median_ttft_ms']:.1f} ms vs simulated prefill {t['simulated_prefill_ms']:.1f} ms "
              f"(overhead {t['overhead_ms']:.1f} ms; {t['overhead_with_client_ms']:.1f} ms with the HTTP client's own "
              "work before the request is on the wire)")
    return report


if __name__ == "__main__":
    main()
