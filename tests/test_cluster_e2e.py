"""Scale-out on one box: a Ray cluster of fake Galaxy nodes (each advertising `galaxy: 1`) with simulated
meshes, and `serve deploy` against a `ray start --head` cluster."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.config import AppConfig
from bench.local_serve import GalaxyCluster, free_port, router_stats, serve_app, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.galaxy_cluster]
ROOT = Path(__file__).resolve().parents[1]
SIM = dict(model="smollm2", backend="simulated", time_scale=0.05, num_meshes=2, mesh_resources={"galaxy": 1},
           mesh_num_cpus=0.1, num_blocks=512, max_seq_len=8192, prefill_chunk=512, decode_steps=4)


@pytest.fixture(scope="module")
def two_galaxies():
    cluster = GalaxyCluster(2)
    try:
        with serve_app(AppConfig(**SIM), cluster_address=cluster.address) as url:
            yield url
    finally:
        cluster.shutdown()


def complete(url: str, prompt: str, max_tokens: int = 8) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": prompt,
                                                   "max_tokens": max_tokens, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_meshes_on_different_galaxy_nodes_and_both_used(two_galaxies):
    from ray.util.state import list_actors
    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if ":mesh-" in (a.class_name or "")]
    assert len(actors) == 2 and len({a.node_id for a in actors}) == 2
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: complete(two_galaxies, f"request number {i} " * (i + 1)), range(8)))
    assert all(m["rounds"] > 0 for m in router_stats()["meshes"])


def test_shared_long_prefix_lands_on_the_same_mesh(two_galaxies):
    prefix = "The lighthouse keeper wrote in the logbook every night. " * 60  # ~700 tokens
    complete(two_galaxies, prefix + "First question?")
    before = [m["prefix_hit_tokens"] for m in router_stats()["meshes"]]
    complete(two_galaxies, prefix + "Second, different question?")
    after = [m["prefix_hit_tokens"] for m in router_stats()["meshes"]]
    gained = sorted(a - b for a, b in zip(after, before))
    assert gained[0] == 0 and gained[1] >= 512, gained


def test_serve_deploy_to_running_cluster_then_status_healthy(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}  # a local test cluster: no token
    bin_dir = Path(sys.executable).parent
    gcs_port, dash_port, http_port = free_port(), free_port(), free_port()
    config = yaml.safe_load((ROOT / "serve_config.simulated.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    config["applications"][0]["args"].update(time_scale=0.05, mesh_num_cpus=0.1, num_blocks=256,
                                              max_seq_len=16384)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([bin_dir / "ray", "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
                    '--resources={"galaxy": 2}', f"--dashboard-port={dash_port}", "--include-dashboard=true",
                    f"--temp-dir={tempfile.mkdtemp(prefix='ray', dir='/tmp')}"],  # short: unix socket paths
                   check=True, env=env, cwd=ROOT, capture_output=True)
    try:
        dash = f"http://127.0.0.1:{dash_port}"
        subprocess.run([bin_dir / "serve", "deploy", str(path), "--address", dash], check=True, env=env,
                       cwd=ROOT, capture_output=True)
        wait_healthy(f"http://127.0.0.1:{http_port}")
        deadline = time.monotonic() + 120
        while True:
            status = yaml.safe_load(subprocess.run([bin_dir / "serve", "status", "--address", dash], env=env,
                                                   capture_output=True, text=True, check=True).stdout)
            app = status["applications"]["meshserve"]
            if app["status"] == "RUNNING" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert app["status"] == "RUNNING"
        assert all(d["status"] == "HEALTHY" for d in app["deployments"].values())
        assert set(app["deployments"]) >= {"mesh-0", "mesh-1", "RouterDeployment", "Ingress"}
    finally:
        subprocess.run([bin_dir / "ray", "stop", "--force"], env=env, capture_output=True)
