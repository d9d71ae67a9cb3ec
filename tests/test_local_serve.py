"""bench.local_serve's port picking: Ray's own processes take random ports from the kernel's ephemeral range
while they start, so a port handed to HAProxy or Serve must come from outside it (and outside Ray's worker
ports), or a Ray process may bind it first (seen once in CI)."""
import socket
from pathlib import Path

from bench.local_serve import free_port


def test_free_ports_are_distinct_bindable_and_outside_ray_and_ephemeral_ranges():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert not low <= port <= high and not 10002 <= port <= 19999
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))


def test_a_local_ray_that_fails_to_start_is_started_once_more_and_its_processes_stopped(monkeypatch):
    import subprocess

    import bench.local_serve as local_serve
    calls, started = [], []

    def init(**kwargs):
        calls.append("init")
        if calls.count("init") == 1:  # as a Node() that started its GCS, then timed out on the raylet
            started.append(subprocess.Popen(["sleep", "60"]))
            raise Exception("The current node timed out during startup.")
    monkeypatch.setattr(local_serve.ray, "init", init)
    monkeypatch.setattr(local_serve.ray, "shutdown", lambda: calls.append("shutdown"))
    local_serve.init_local_ray(num_cpus=1)
    assert calls == ["init", "shutdown", "init"]
    assert started[0].wait(timeout=5) == -9  # the failed start's process was stopped
    calls.clear()
    monkeypatch.setattr(local_serve.ray, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("down")))
    import pytest
    with pytest.raises(RuntimeError):
        local_serve.init_local_ray(num_cpus=1)
