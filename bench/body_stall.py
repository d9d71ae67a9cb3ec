"""How long one large request body holds an ingress replica's event loop, and so every other stream of it.

    python -m bench.body_stall [--repeat 3] [--json]

Builds the ingress app in-process (deployments.ingress.build_app over tests' FakeRouter, SmolLM2's tokenizer)
and posts each body below through httpx's ASGI transport on the app's own loop, while a ticker task sleeps 1 ms
at a time: its longest lateness is the longest the loop could not run anything else (another stream's chunk).
Bodies are encoded before the clock starts; the heap is frozen first, as Serve freezes a replica's. `small` is
the ordinary request, for the cost per request.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from pathlib import Path

import httpx

from bench import args as arg_types
from deployments.ingress import build_app
from model.embedded import ensure_smollm2
from model.tokenizer import load_tokenizer
from tests.fake_router import FakeRouter

MODEL = "smollm2"
PROMPTS = Path(__file__).parent / "prompts"
TICK_S = 0.001


def _tool(i: int, properties: int) -> dict:
    props = {f"p{j}": {"type": "string", "description": f"field {j}"} for j in range(properties)}
    return {"type": "function",
            "function": {"name": f"tool_{i}", "parameters": {"type": "object", "properties": props}}}


def bodies() -> dict[str, tuple[str, bytes]]:
    """name -> (path, body): the sizes measured when this was written (2026-12-02)."""
    hi = {"role": "user", "content": "hi"}
    chat = {"model": MODEL, "max_tokens": 1}
    raw = {
        "small": ("/v1/chat/completions", {**chat, "messages": [hi]}),
        "tools_60x2400": ("/v1/chat/completions", {**chat, "messages": [hi], "tools": [_tool(i, 2400)
                                                                                        for i in range(60)]}),
        "messages_40k": ("/v1/chat/completions", {**chat, "messages": [hi] * 40_000}),
        "responses_input_50k": ("/v1/responses", {"model": MODEL, "max_output_tokens": 1, "input": [hi] * 50_000}),
        "logit_bias_300k": ("/v1/chat/completions", {**chat, "messages": [hi],
                                                     "logit_bias": {str(i): 1.0 for i in range(300_000)}}),
        "prompt_ids_1m": ("/v1/completions", {"model": MODEL, "max_tokens": 1, "prompt": [1] * 1_000_000}),
        "detokenize_1m": ("/detokenize", {"model": MODEL, "tokens": [1] * 1_000_000}),
        "prompt_text_60k": ("/v1/completions", {"model": MODEL, "max_tokens": 1,
                                                "prompt": (PROMPTS / "logbook.txt").read_text()[:60_000]}),
        "prompt_text_4m": ("/v1/completions", {"model": MODEL, "max_tokens": 1, "truncate_prompt_tokens": 16,
                                               "prompt": (PROMPTS / "logbook.txt").read_text() * 7}),
    }
    return {name: (path, json.dumps(body).encode()) for name, (path, body) in raw.items()}


async def _post(client: httpx.AsyncClient, path: str, body: bytes) -> tuple[float, float, int]:
    """(longest loop lag in s, wall s, status) of one POST."""
    lag, done = 0.0, False

    async def ticker():
        nonlocal lag
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lag = max(lag, time.perf_counter() - start - TICK_S)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    wall = time.perf_counter() - start
    done = True
    await task
    return lag, wall, response.status_code


async def measure(repeat: int) -> dict[str, dict]:
    tokenizer = load_tokenizer(ensure_smollm2())
    router = FakeRouter(tokenizer.encode("ok") + list(tokenizer.stop_ids), max_model_len=131072)
    app = build_app(router, tokenizer, MODEL)
    gc.collect()  # as Serve does once a replica has started (RAY_SERVE_FREEZE_GC_ON_STARTUP): collections walk
    gc.freeze()  # only what requests allocate
    results = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress") as client:
        for name, (path, body) in bodies().items():
            runs = [await _post(client, path, body) for _ in range(repeat)]
            results[name] = {"bytes": len(body), "status": runs[0][2],
                             "lag_ms": statistics.median(r[0] for r in runs) * 1e3,
                             "lag_max_ms": max(r[0] for r in runs) * 1e3,
                             "wall_ms": statistics.median(r[1] for r in runs) * 1e3}
        small = bodies()["small"]
        for _ in range(50):  # warm
            await client.post(small[0], content=small[1], headers={"content-type": "application/json"})
        start, n = time.process_time(), 500
        for _ in range(n):
            await client.post(small[0], content=small[1], headers={"content-type": "application/json"})
        results["small"]["cpu_us_per_request"] = (time.process_time() - start) / n * 1e6
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=arg_types.count(), default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args.repeat))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'body':22} {'bytes':>9} {'status':>6} {'lag ms':>8} {'max':>8} {'wall ms':>8}")
    for name, r in results.items():
        print(f"{name:22} {r['bytes']:9d} {r['status']:6d} {r['lag_ms']:8.1f} {r['lag_max_ms']:8.1f} "
              f"{r['wall_ms']:8.1f}")
    print(f"small request: {results['small']['cpu_us_per_request']:.0f} us of CPU each (client and app)")


if __name__ == "__main__":
    main()
