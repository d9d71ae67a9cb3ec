"""Kill a mesh replica (or the router) mid-load and count what the clients lose.

    python -m bench.failover [--meshes 2] [--streams 32] [--kill mesh|router|redeploy] [--json]

A local Serve app with simulated Galaxies runs `--streams` greedy streaming completions (distinct prompts,
ignore_eos) twice: once undisturbed, for the reference texts, and once with `ray.kill` of the `mesh-0`
replica's actor (or the router's) once every stream has its first tokens; or with a redeploy of the application
with one argument changed (`stream_interval_ms`), which Serve answers by replacing every replica, ingress, router
and meshes, as `serve deploy` of an edited config does. Reported: streams lost (an
error, a non-200, or no finish), streams finished, streams whose text equals the reference, the longest
pause any stream saw between two chunks, and, for a mesh kill, the time from the kill until the router
has the restarted replica live again and until a request is served on it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time

import httpx
import ray
from ray import serve

from bench import args as arg_types
from bench.local_serve import router_stats, serve_app
from bench.saturation import distinct_prompts
from deployments.app import build
from deployments.config import AppConfig

MODEL = "SmolLM2-135M-Instruct"


async def one_stream(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                     first_tokens: asyncio.Event | None = None) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, finish, error, chunks = "", None, None, []
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"text": "", "finish": None, "error": f"HTTP {r.status_code}", "chunks": []}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    error = data["error"]["message"]
                    continue
                for choice in data["choices"]:
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
                chunks.append(time.perf_counter())
                if first_tokens is not None and len(chunks) == 3:
                    first_tokens.set()
    except httpx.HTTPError as exc:
        error = repr(exc)
    return {"text": text, "finish": finish, "error": error, "chunks": chunks}


def kill_actor(deployment: str) -> None:
    """ray.kill of the deployment's replica actor (Serve's replicas are named actors in namespace "serve")."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]]
    if not names:
        raise RuntimeError(f"no live actor of {deployment}")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def redeploy(config: AppConfig) -> None:
    """`config` again with `stream_interval_ms` changed: Serve replaces every replica of the application (its
    arguments changed). Returns once the new application is running."""
    changed = config.model_copy(update={"stream_interval_ms": config.stream_interval_ms + 1})
    serve.run(build(changed), name="meshserve", route_prefix="/")


async def run(url: str, prompts: list[list[int]], max_tokens: int, kill: str | None,
              config: AppConfig | None = None) -> tuple[list[dict], float | None]:
    """Streams of `prompts`; once all have tokens, `kill` "mesh" or "router" (ray.kill) or "redeploy" (`config`
    with a changed argument)."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as http:
        started = [asyncio.Event() for _ in prompts]
        tasks = [asyncio.create_task(one_stream(http, url, p, max_tokens, e)) for p, e in zip(prompts, started)]
        killed_at = None
        if kill is not None:
            await asyncio.gather(*[e.wait() for e in started])
            killed_at = time.monotonic()
            if kill == "redeploy":
                await asyncio.to_thread(redeploy, config)
            else:
                await asyncio.to_thread(kill_actor, "mesh-0" if kill == "mesh" else "RouterDeployment")
        return list(await asyncio.gather(*tasks)), killed_at


def mesh_back(url: str, killed_at: float, old_incarnation: str, timeout_s: float = 300) -> dict:
    """Seconds from the kill until mesh-0 is live as a new incarnation, and until it has served a request."""
    deadline = time.monotonic() + timeout_s
    while True:
        mesh = router_stats()["meshes"][0]
        if mesh["up"] and mesh["incarnation"] != old_incarnation:
            up_s = time.monotonic() - killed_at
            break
        if time.monotonic() > deadline:
            return {"mesh_up_again_s": None, "mesh_served_again_s": None}
        time.sleep(0.2)
    rounds = mesh["rounds"]
    while router_stats()["meshes"][0]["rounds"] == rounds and time.monotonic() < deadline:
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "ping", "max_tokens": 4},
                   timeout=120).raise_for_status()  # idle meshes are preferred: this lands on mesh-0
    return {"mesh_up_again_s": up_s, "mesh_served_again_s": time.monotonic() - killed_at}


def longest_pause(results: list[dict]) -> float:
    return max((b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])), default=0.0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", type=arg_types.count(), default=2)
    p.add_argument("--streams", type=arg_types.count(), default=32)
    p.add_argument("--max-tokens", type=arg_types.count(), default=256)
    p.add_argument("--prompt-tokens", type=arg_types.count(), default=128)
    p.add_argument("--time-scale", type=arg_types.time_scale, default=1.0,
                   help="simulated Galaxy speed (1.0: real time)")
    p.add_argument("--kill", choices=["mesh", "router", "redeploy"], default="mesh")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    config = AppConfig(model="smollm2", backend="simulated", time_scale=args.time_scale, num_meshes=args.meshes,
                       mesh_num_cpus=0.1, num_blocks=1024, max_seq_len=8192, prefill_chunk=512, decode_steps=8)
    prompts = distinct_prompts(args.streams, args.prompt_tokens)
    # Ray prints its shutdown and actor-death notices on stdout: keep --json clean
    with contextlib.redirect_stdout(sys.stderr), serve_app(config) as url:
        reference, _ = asyncio.run(run(url, prompts, args.max_tokens, None))
        incarnation = router_stats()["meshes"][0]["incarnation"]
        faulted, killed_at = asyncio.run(run(url, prompts, args.max_tokens, args.kill, config))
        lost = [r for r in faulted if r["error"] or r["finish"] is None]
        report = {
            "config": {"meshes": args.meshes, "streams": args.streams, "max_tokens": args.max_tokens,
                       "time_scale": args.time_scale, "kill": args.kill},
            "reference_ok": all(r["finish"] == "length" and not r["error"] for r in reference),
            "streams_lost": len(lost), "streams_finished": len(faulted) - len(lost),
            "texts_identical": sum(f["text"] == r["text"] for f, r in zip(faulted, reference)),
            "longest_pause_s": longest_pause(faulted),
            "errors": sorted({r["error"] for r in lost if r["error"]})[:3],
        }
        if args.kill == "mesh":
            report.update(mesh_back(url, killed_at, incarnation))
            report["failovers"] = router_stats()["meshes"][0]["failovers"]
            report["requests_migrated"] = router_stats()["meshes"][0]["requests_migrated"]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        fault = "app redeployed" if args.kill == "redeploy" else f"{args.kill} killed"
        print(f"{fault} under {args.streams} streams on {args.meshes} meshes: "
              f"{report['streams_lost']} lost, {report['streams_finished']} finished, "
              f"{report['texts_identical']}/{args.streams} texts identical, "
              f"longest pause {report['longest_pause_s']:.2f} s")
        if args.kill == "mesh":
            def after(seconds: float | None) -> str:
                return "not within the wait" if seconds is None else f"{seconds:.1f} s after the kill"
            print(f"mesh-0 live again {after(report['mesh_up_again_s'])}, serving again "
                  f"{after(report['mesh_served_again_s'])} ({report['requests_migrated']} requests migrated)")
    return report


if __name__ == "__main__":
    main()
