"""A Galaxy host lost mid-stream, on a Ray cluster of fake Galaxy nodes: the node of a mesh is removed (its raylet
and workers end, as when a host dies), then a new node advertising `galaxy: 1` joins (a host back after a reboot).
The ingress and router run on the head, as README "Running on a cluster" advises."""
import asyncio
import time

import httpx
import pytest
from ray.util.state import list_actors

from bench.failover import one_stream
from bench.local_serve import GalaxyCluster, router_stats, serve_app
from bench.saturation import distinct_prompts
from deployments.config import AppConfig

pytestmark = [pytest.mark.slow, pytest.mark.galaxy_cluster]
SIM = AppConfig(model="smollm2", backend="simulated", time_scale=0.5, num_meshes=2, mesh_resources={"galaxy": 1},
                mesh_num_cpus=0, num_blocks=512, max_seq_len=4096, prefill_chunk=512, decode_steps=4)
PROMPTS = distinct_prompts(6, 64)
MAX_TOKENS = 96


async def streams(url: str, on_started=None) -> list[dict]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(PROMPTS) + 2)) as http:
        started = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(one_stream(http, url, p, MAX_TOKENS, e)) for p, e in zip(PROMPTS, started)]
        if on_started is not None:
            await asyncio.gather(*[e.wait() for e in started])
            await asyncio.to_thread(on_started)
        return list(await asyncio.gather(*tasks))


def test_a_lost_galaxy_host_loses_no_stream_and_its_mesh_returns_on_a_new_host():
    cluster = GalaxyCluster(2, cpus_per_node=0)  # no CPU there: the ingress and router stay on the head
    try:
        with serve_app(SIM, cluster_address=cluster.address) as url:
            reference = [r["text"] for r in asyncio.run(streams(url))]
            node = next(a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if ":mesh-0" in a.class_name)
            results = asyncio.run(streams(url, lambda: cluster.remove_node(node)))
            assert [r["error"] for r in results] == [None] * len(PROMPTS)
            assert [r["text"] for r in results] == reference
            mesh0 = router_stats()["meshes"][0]
            assert not mesh0["up"] and mesh0["requests_migrated"] >= 1
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            cluster.add_node(num_cpus=0, resources={"galaxy": 1})  # in Serve's mode, as every node's `ray start`
            deadline = time.monotonic() + 60
            while not router_stats()["meshes"][0]["up"]:
                assert time.monotonic() < deadline, "mesh-0 never came back on the new node"
                time.sleep(0.2)
            rounds = router_stats()["meshes"][0]["rounds"]
            assert [r["error"] for r in asyncio.run(streams(url))] == [None] * len(PROMPTS)
            assert router_stats()["meshes"][0]["rounds"] > rounds  # in service again: requests land on it
    finally:
        cluster.shutdown()
