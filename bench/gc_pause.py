"""How long one full garbage collection stalls a replica, before and after its start-up heap is frozen.

    python -m bench.gc_pause [--roles ingress router mesh] [--repeat 5] [--json]

Each role is built in a fresh process the way its deployment's __init__ builds it (Ray and Serve imported; the
ingress: the embedded model's tokenizer, warmed, its app and its grammar tokenizer; the router: its module; the
mesh: the torch backend of the embedded model under its runner), then timed: the median of `--repeat` calls
of `gc.collect()` (a full pass, as CPython runs on whichever thread allocates when its thresholds say so), over
the objects the collector tracks, then again after `deployments.gc_heap.freeze_gc_heap()`, which every replica
calls at the end of its start-up. Process CPU time, not wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

ROLES = ("ingress", "router", "mesh")


def build(role: str) -> object:
    """What the role's replica holds once started (kept alive by the caller)."""
    import importlib
    importlib.import_module("ray.serve")  # a replica has Ray and Serve loaded

    from model.checkpoint import resolve_model_dir
    model_dir = resolve_model_dir("smollm2")
    if role == "ingress":
        from deployments.config import model_root
        from deployments.ingress import build_app
        from model.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(model_dir)
        tokenizer.warm()
        app = build_app(None, tokenizer, "smollm2", root=model_root("smollm2"))
        app.state.server.grammar_tokenizer()
        return app
    if role == "router":
        import deployments.router
        return deployments.router
    if role == "mesh":
        from deployments.config import AppConfig
        from deployments.mesh_replica import build_backend
        from model.runner import MeshRunner
        return MeshRunner(build_backend(AppConfig(backend="torch", model="smollm2", num_slots=4), model_dir))
    raise ValueError(f"role: one of {ROLES}, not {role!r}")


def measure(role: str, repeat: int) -> dict:
    """In this process: build `role`, time full collections before and after the freeze (ms of CPU each)."""
    import gc
    import statistics
    import time

    from deployments.gc_heap import freeze_gc_heap

    def full_pass_ms() -> float:
        times = []
        for _ in range(repeat):
            start = time.process_time()
            gc.collect()
            times.append((time.process_time() - start) * 1e3)
        return statistics.median(times)

    held = build(role)
    # A collection untracks a tuple whose items are all untracked only when it examines it (CPython gcmodule.c
    # untrack_tuples), so a tuple of such tuples (a function's constants) goes one level a pass: counted after a single
    # collection, an object that the freeze's own collection then untracked counted before and was not frozen.
    tracked = -1
    for _ in range(10):  # collected until the count settles
        gc.collect()
        tracked, last = len(gc.get_objects()), tracked
        if tracked == last:
            break
    before = {"tracked": tracked, "full_collection_ms": full_pass_ms()}
    frozen = freeze_gc_heap()
    after = {"tracked": len(gc.get_objects()), "full_collection_ms": full_pass_ms(), "frozen": frozen}
    del held
    return {"role": role, "before": before, "after": after}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
    p.add_argument("--repeat", type=int, default=5, help="full collections timed, each side (median)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)  # one role, in this process
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.child:
        print(json.dumps(measure(args.child, args.repeat)))
        return []
    results = []
    for role in args.roles:  # a fresh process each: one role's heap must not count in another's
        out = subprocess.run([sys.executable, "-m", "bench.gc_pause", "--child", role, "--repeat", str(args.repeat)],
                             capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            b, a = r["before"], r["after"]
            print(f"{r['role']:8s} full collection {b['full_collection_ms']:7.1f} ms over {b['tracked']:,} objects; "
                  f"frozen: {a['full_collection_ms']:5.2f} ms over {a['tracked']:,} ({a['frozen']:,} frozen)")
    return results


if __name__ == "__main__":
    main()
