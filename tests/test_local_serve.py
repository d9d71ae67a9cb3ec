"""bench.local_serve's port picking: Ray's own processes take random ports from the kernel's ephemeral range
while they start, so a port handed to HAProxy or Serve must come from outside it (and outside Ray's worker
ports), or a Ray process may bind it first (seen once in CI)."""
import contextlib
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

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


def test_a_local_ray_that_fails_to_start_says_what_its_processes_were_doing(monkeypatch):
    """Both tries of a start once failed in CI, one's GCS and the other's raylet without a line of log: the error
    names each process the failed try had started and its state then (a hung one from one that died), which
    nothing else keeps: they are stopped right after."""
    import subprocess

    import bench.local_serve as local_serve
    started = []

    def init(**kwargs):
        started.append(subprocess.Popen(["sleep", "60"]))
        raise Exception("The current node timed out during startup.")
    monkeypatch.setattr(local_serve.ray, "init", init)
    monkeypatch.setattr(local_serve.ray, "shutdown", lambda: None)
    with pytest.raises(Exception, match="timed out during startup") as failed:
        local_serve.init_local_ray(num_cpus=1)
    assert len(started) == 2 and [p.wait(timeout=5) for p in started] == [-9, -9]
    note = failed.value.__notes__[-1]
    assert re.search(rf"sleep pid {started[1].pid} \([RS], \d+ CPU ticks\)", note), note
    assert f"pid {started[0].pid} " not in note  # the first try's process is not the second's


def test_a_fake_galaxy_cluster_whose_node_does_not_register_in_time_is_started_once_more(monkeypatch):
    """Ray's fixed 30 s for a node to register once ran out on the 2-core box (CI, test_node_loss_e2e), and once the
    head's dashboard died as it started (then list_actors failed): the cluster is shut down, not left beside the next
    Ray, and one fresh cluster is tried; any other error is raised at once."""
    import ray.cluster_utils

    from bench import local_serve

    made, dashboards = [], []

    class FakeCluster:
        def __init__(self, initialize_head, head_node_args):
            self.down, self.nodes = False, 0
            self.head_node = SimpleNamespace(webui_url=dashboards.pop(0) if dashboards else "127.0.0.1:8265")
            made.append(self)

        def add_node(self, **kwargs):
            if failures:
                raise failures.pop(0)
            self.nodes += 1

        def wait_for_nodes(self):
            pass

        def shutdown(self):
            self.down = True

    monkeypatch.setattr(ray.cluster_utils, "Cluster", FakeCluster)
    late = Exception("The current node timed out during startup. This could happen because ...")
    failures = [late]
    cluster = local_serve.start_galaxy_cluster(2)
    assert cluster is made[1] and cluster.nodes == 2 and not cluster.down and made[0].down
    made.clear()
    failures = [late, late]
    with pytest.raises(Exception, match="timed out during startup"):
        local_serve.start_galaxy_cluster(2)
    assert len(made) == 2 and all(c.down for c in made)
    made.clear()
    failures = [OSError("no such port")]
    with pytest.raises(OSError):
        local_serve.start_galaxy_cluster(2)
    assert len(made) == 1 and made[0].down
    made.clear()
    dashboards = [None]  # the head's dashboard died as it started (Ray logs that and goes on): the state API is down
    cluster = local_serve.start_galaxy_cluster(2)
    assert cluster is made[1] and cluster.nodes == 2 and made[0].down and made[0].nodes == 0


@pytest.mark.parametrize("late", ["head", "worker"])
def test_a_fake_galaxy_node_that_timed_out_leaves_no_process(monkeypatch, late):
    """A Node() that timed out had started its processes (GCS, raylet) and is in no list of the cluster's, so
    Cluster.shutdown does not reach them: they are stopped, as init_local_ray stops a failed start's, with the
    processes they started (a raylet's agents outlived it killed). A child this process had before the attempt
    (another fixture's server in the same pytest worker) is not Ray's: it runs on."""
    import subprocess

    import ray.cluster_utils

    from bench import local_serve

    started, below = [], []

    def start_then_time_out():  # a process with one of its own, as a raylet and its agent
        started.append(subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True))
        below.append(int(started[-1].stdout.readline()))
        raise Exception("The current node timed out during startup. This could happen because ...")

    class FakeCluster:
        def __init__(self, initialize_head, head_node_args):
            self.head_node = SimpleNamespace(webui_url="127.0.0.1:8265")
            if late == "head" and not started:
                start_then_time_out()

        def add_node(self, **kwargs):
            if late == "worker" and not started:
                start_then_time_out()

        def wait_for_nodes(self):
            pass

        def shutdown(self):
            pass

    monkeypatch.setattr(ray.cluster_utils, "Cluster", FakeCluster)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        assert isinstance(local_serve.start_galaxy_cluster(2), FakeCluster)  # the fresh one
        assert started[0].wait(timeout=5) == -9
        assert _gone(below[0])
        assert bystander.poll() is None
    finally:
        for process in started + [bystander]:
            process.kill()
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _holder_that_never_answers(conn, *args) -> None:
    """A cluster's process stuck in its start (a Ray call that never returns)."""
    time.sleep(600)


def _holder_that_dies(conn, *args) -> None:
    os._exit(3)


def _holder_that_answers_the_start_only(conn, *args) -> None:
    """A cluster's process that started (a child of its own, as a raylet, whose pid is its "address"), then is stuck
    in every command, shutdown too."""
    import subprocess
    conn.send((True, str(subprocess.Popen(["sleep", "600"], start_new_session=True).pid)))
    with contextlib.suppress(EOFError):
        while True:
            conn.recv()


def _outcome_within(seconds: float, call) -> BaseException | None:
    """What call() raised (None if nothing), on a thread; fails if it has not returned in `seconds`."""
    outcome = []

    def run():
        try:
            call()
        except BaseException as e:
            outcome.append(e)
        else:
            outcome.append(None)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"no return in {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("holder, at, error", [
    (_holder_that_never_answers, "start", "TimeoutError: .* no answer to the start in 1 s"),
    (_holder_that_dies, "start", r"RuntimeError: .* ended \(exit code 3\) without answering the start"),
    (_holder_that_answers_the_start_only, "add_node", "TimeoutError: .* no answer to add_node in 1 s"),
    (_holder_that_answers_the_start_only, "shutdown", None)], ids=["start", "died", "add_node", "shutdown"])
def test_a_cluster_process_that_does_not_answer_fails_the_call_in_time_and_is_gone(monkeypatch, holder, at, error):
    """Each read of GalaxyCluster's pipe waited for ever: a process stuck in a Ray call (or in its cluster's shutdown)
    hung the test, and one that died gave a bare EOFError. Now the call fails, saying which, and the process is gone."""
    from bench import local_serve

    monkeypatch.setattr(local_serve, "_hold_cluster", holder)  # a spawned process takes its target by name
    # the process imports this module first (seconds on the busy box): only a start that never answers is given 1 s
    monkeypatch.setattr(local_serve.GalaxyCluster, "START_S", 1 if holder is _holder_that_never_answers else 60)
    monkeypatch.setattr(local_serve.GalaxyCluster, "COMMAND_S", 1)
    monkeypatch.setattr(local_serve.GalaxyCluster, "SHUTDOWN_S", 1)
    clusters = []

    def steps():
        clusters.append(local_serve.GalaxyCluster(2, 2, 1, None))
        if at == "add_node":
            clusters[0].add_node(num_cpus=0)
        clusters[0].shutdown()
    raised = _outcome_within(90, steps)
    assert (raised is None if error is None else re.fullmatch(error, f"{type(raised).__name__}: {raised}")), raised
    if clusters:
        clusters[0].shutdown()
        # the process's child too (a raylet's agents outlived the raylet killed by the process's end)
        assert _gone(int(clusters[0].address))
    assert not [p for p in multiprocessing.active_children() if p.name == "fake-galaxy-cluster"]


def _gone(pid: int) -> bool:
    """The process ended (or is a zombie that its new parent has not reaped yet), within 5 s."""
    from bench.local_serve import read_proc
    for _ in range(50):
        stat = read_proc(f"/proc/{pid}/stat")
        if stat is None or stat[stat.rindex(")") + 2] == "Z":
            return True
        time.sleep(0.1)
    return False


def _holder_that_tells_how_it_was_asked_to_end(conn, *args) -> None:
    """Writes to the file $SAID "shutdown" when asked to, "SIGTERM" on that signal (Ray's own handler of it
    deadlocked when it came during the cluster's shutdown)."""
    said = Path(os.environ["SAID"])
    signal.signal(signal.SIGTERM, lambda *_: (said.write_text("SIGTERM"), os._exit(1)))
    conn.send((True, "127.0.0.1:6379"))
    with contextlib.suppress(EOFError):
        while conn.recv() != ("shutdown",):
            pass
        said.write_text("shutdown")


def test_a_cluster_not_shut_down_is_shut_down_at_the_test_process_exit(tmp_path):
    """multiprocessing's exit hook SIGTERMs a daemonic process, and a cluster left running (no shutdown() called) got
    it while shutting down at its pipe's end: Ray's SIGTERM handler re-entered the node's kill (Popen.wait's lock) and
    hung, and so did the exit of the process that held the cluster."""
    import subprocess
    import sys

    script = ("import bench.local_serve as ls, tests.test_local_serve as t\n"
              "ls._hold_cluster = t._holder_that_tells_how_it_was_asked_to_end\n"
              "cluster = ls.GalaxyCluster(2, 2, 1, None)\n")
    said = tmp_path / "said"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=Path(__file__).parents[1],
                   env={**os.environ, "SAID": str(said)})
    assert said.read_text() == "shutdown"


def test_the_cluster_process_reports_a_failed_command_and_shuts_its_cluster_down_however_it_ends(monkeypatch):
    """A node id the cluster has no worker for was answered "StopIteration: "; the test process gone before the
    start's answer raised BrokenPipeError past the cluster's shutdown (its node processes then died with the process,
    not through Cluster.shutdown)."""
    from bench import local_serve

    class FakeCluster:
        address = "127.0.0.1:6379"

        def __init__(self):
            self.worker_nodes = [SimpleNamespace(node_id="abc")]
            self.removed, self.down = [], False

        def remove_node(self, node):
            self.removed.append(node.node_id)

        def add_node(self, **node_args):
            raise RuntimeError("The current node timed out during startup.")

        def shutdown(self):
            self.down = True

    made = []
    monkeypatch.setattr(local_serve, "start_galaxy_cluster", lambda *args: made.append(FakeCluster()) or made[-1])
    ours, theirs = multiprocessing.Pipe()
    for command in [("remove_node", "xyz"), ("remove_node", "abc"), ("add_node", {"num_cpus": 0}), ("shutdown",)]:
        ours.send(command)
    local_serve._hold_cluster(theirs, 2, 2, 1, None)
    answers = [ours.recv() for _ in range(4)]
    assert answers[0] == (True, FakeCluster.address)
    assert not answers[1][0] and "no worker node xyz" in answers[1][1]
    assert answers[2:] == [(True, None), (False, "RuntimeError: The current node timed out during startup.")]
    assert made[0].removed == ["abc"] and made[0].down
    for gone_at in (0, 1):  # the test process gone: before the start's answer, or with a command unanswered
        ours, theirs = multiprocessing.Pipe()
        if gone_at:
            ours.send(("remove_node", "abc"))
        ours.close()
        local_serve._hold_cluster(theirs, 2, 2, 1, None)
        assert made[-1].down
