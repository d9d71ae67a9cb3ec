"""Start a real Serve app on a local Ray instance (or a cluster of fake nodes) for tests and benchmarks."""
from __future__ import annotations

import contextlib
import socket
import time

import httpx
import ray
from ray import serve

from deployments.app import build
from deployments.config import AppConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} never became healthy")


@contextlib.contextmanager
def serve_app(config: AppConfig, num_cpus: int = 4, cluster_address: str | None = None):
    """Yields the base URL (http://127.0.0.1:PORT). Shuts Serve and Ray down afterwards."""
    if cluster_address is None:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
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


def fake_galaxy_cluster(num_galaxies: int, head_cpus: int = 2, cpus_per_node: float = 1):
    """A Ray cluster on this box whose worker nodes each advertise one `galaxy`, like Galaxy hosts do."""
    from ray.cluster_utils import Cluster
    # A port of its own for the dashboard (the state API goes through it): another Ray on this box may hold 8265.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "dashboard_port": free_port()})
    for _ in range(num_galaxies):
        cluster.add_node(num_cpus=cpus_per_node, resources={"galaxy": 1})
    cluster.wait_for_nodes()
    return cluster


def router_stats(base_url: str = "") -> dict:
    """The router's live stats, through the app's handle (the same numbers /metrics exports)."""
    return serve.get_deployment_handle("RouterDeployment", app_name="meshserve").stats.remote().result()
