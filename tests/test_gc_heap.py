"""Every replica freezes its start-up heap: a full collection then walks only what was made since.

An ingress replica holds ~380k tracked objects once started (a mesh on the torch backend as many, the router
~110k); a full pass over them took 80-240 ms of CPU (`python -m bench.gc_pause`), a stall of every stream on the
replica, and CPython runs one whenever its thresholds say so. Each check runs in a fresh process: a freeze there
must not freeze this test session's heap, nor one role's count in another's."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD = {
    "ingress": """
from types import SimpleNamespace
from ray import serve
from deployments import ingress
serve.get_replica_context = lambda: SimpleNamespace(replica_id=SimpleNamespace(unique_id="test"))
ingress.GRAMMAR_THREADS = 1
wrapper = ingress.Ingress.func_or_class  # serve.ingress's subclass, whose __init__ is a coroutine: the class under it
cls = next(k for k in wrapper.__mro__[1:] if k.__name__ == "Ingress")
made = cls.__new__(cls)
cls.__init__(made, None, "smollm2", "smollm2")
""",
    "router": """
from deployments.router import RouterDeployment
made = RouterDeployment.func_or_class([], {})
""",
    "mesh": """
from deployments import mesh_replica
made = mesh_replica.MeshReplica.func_or_class({"backend": "simulated", "model": "smollm2", "num_blocks": 64})
""",
}

REPORT = """
import gc, json
class Cycle:
    pass
tracked = len(gc.get_objects())  # frozen objects are not listed: what a full pass walks
frozen = gc.get_freeze_count()
c = Cycle(); c.me = c; del c  # made after the freeze: still collected
print(json.dumps({"tracked": tracked, "frozen": frozen, "collected": gc.collect()}))
"""


@pytest.mark.parametrize("role", sorted(BUILD))
def test_a_replica_freezes_its_start_up_heap_and_still_collects_what_it_makes_later(role):
    out = subprocess.run([sys.executable, "-c", "import gc; gc.collect()\n" + BUILD[role] + REPORT], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["frozen"] > 20 * report["tracked"], report  # before: frozen 0, everything walked
    assert report["collected"] >= 1, report  # the cycle


def test_the_benchmark_times_a_full_collection_before_and_after_the_freeze():
    out = subprocess.run([sys.executable, "-m", "bench.gc_pause", "--roles", "router", "--repeat", "1", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (router,) = json.loads(out.stdout)
    before, after = router["before"], router["after"]
    assert before["tracked"] > 20 * after["tracked"] and after["frozen"] >= before["tracked"]
    assert before["full_collection_ms"] > after["full_collection_ms"] >= 0
