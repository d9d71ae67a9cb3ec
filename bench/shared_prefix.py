"""Prefix reuse on a Galaxy's four KV groups, over HTTP: do shared prefixes give the right text?

    python -m bench.shared_prefix [--requests 32] [--prefix-tokens 512] [--json]

One simulated Galaxy (4 KV groups, one per mesh column, 2,056 blocks each by default) behind the whole Serve
stack. `--requests` greedy completions share a `--prefix-tokens` token prefix and differ in their suffix.
They run one at a time on a fresh server, then all at once on another fresh server; the simulated KV is
kept per group, so a prefix hit read from another column's memory would change the text. Reported: texts
identical, the prefix-cache hits, and the KV groups and blocks /metrics shows.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import args as arg_types
from bench.local_serve import serve_app
from deployments.config import AppConfig

MODEL = "SmolLM2-135M-Instruct"


def prompts(count: int, prefix_tokens: int, suffix_tokens: int = 40) -> list[list[int]]:
    prefix = [5000 + i for i in range(prefix_tokens)]
    return [prefix + [20000 + 131 * r + i for i in range(suffix_tokens)] for r in range(count)]


async def complete(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> str:
    r = await http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def metrics(url: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    mesh = (("mesh", "mesh-0"),)
    return {"kv_groups": samples[("meshserve_kv_groups", mesh)],
            "kv_blocks_total": samples[("meshserve_kv_blocks_total", mesh)],
            "prefix_hit_tokens": samples[("meshserve_prefix_cache_hits_tokens_total", mesh)],
            "group_blocks_total": [v for (name, labels), v in sorted(samples.items())
                                   if name == "meshserve_kv_group_blocks_total"]}


def run(config: AppConfig, batch: list[list[int]], max_tokens: int, together: bool) -> tuple[list[str], dict]:
    with serve_app(config) as url:
        async def main() -> list[str]:
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(batch) + 4)) as http:
                if together:
                    return list(await asyncio.gather(*[complete(http, url, p, max_tokens) for p in batch]))
                return [await complete(http, url, p, max_tokens) for p in batch]
        texts = asyncio.run(main())
        return texts, metrics(url)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=arg_types.count(), default=32)
    p.add_argument("--prefix-tokens", type=arg_types.count(), default=512)
    p.add_argument("--max-tokens", type=arg_types.count(), default=64)
    p.add_argument("--time-scale", type=arg_types.time_scale, default=0.2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    config = AppConfig(model="smollm2", backend="simulated", time_scale=args.time_scale, mesh_num_cpus=0.5,
                       max_seq_len=131072, decode_steps=8)
    batch = prompts(args.requests, args.prefix_tokens)
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints its shutdown notices there: keep --json clean
        alone, _ = run(config, batch, args.max_tokens, together=False)
        together, seen = run(config, batch, args.max_tokens, together=True)
    report = {"requests": args.requests, "prefix_tokens": args.prefix_tokens,
              "texts_identical": sum(a == b for a, b in zip(alone, together)), **seen}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['texts_identical']}/{args.requests} texts identical (together vs one at a time); "
              f"{seen['prefix_hit_tokens']:.0f} prompt tokens served from the prefix cache; /metrics: "
              f"{seen['kv_groups']:.0f} KV groups, {seen['kv_blocks_total']:.0f} KV blocks "
              f"({', '.join(f'{b:.0f}' for b in seen['group_blocks_total'])} per group)")
    return report


if __name__ == "__main__":
    main()
