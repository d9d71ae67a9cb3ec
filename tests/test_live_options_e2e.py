"""A config's per-deployment options changed under load, as `serve deploy` applies them (a declarative deploy: the
application's `args` unchanged, so Serve replaces only the deployment whose options changed): the Ingress's (its
replicas replaced), its `num_replicas` up and down, the router's and a mesh's. Streams and whole answers already
running finish with the text an undisturbed run gives, and the router holds no request, slot or KV block after.
test_failover_e2e.py covers kills and a redeploy with `args` changed (every replica replaced)."""
import asyncio
import threading
import time

import httpx
import pytest
import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from bench.failover import MODEL, one_stream
from bench.local_serve import free_port, init_local_ray, ray_environment, router_stats, wait_healthy
from bench.saturation import distinct_prompts

pytestmark = pytest.mark.slow
ARGS = dict(model="smollm2", backend="simulated", time_scale=0.5, num_meshes=2, mesh_num_cpus=0.1, num_blocks=512,
            max_seq_len=4096, prefill_chunk=512, decode_steps=4, no_mesh_wait_s=120)
PROMPTS = distinct_prompts(3, 64)
MAX_TOKENS = 2000  # ~15 s of tokens: the replaced replica starts well inside it
INGRESS = {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.25}}
# Each deploy states every override: one it leaves out goes back to the code's value (a replacement of its own)
CHANGES = {
    "Ingress": [INGRESS],
    "Ingress scaled up": [{**INGRESS, "num_replicas": 2}],
    "Ingress scaled down": [{**INGRESS, "num_replicas": 1}],
    "RouterDeployment": [{**INGRESS, "num_replicas": 1},
                         {"name": "RouterDeployment", "ray_actor_options": {"num_cpus": 0.25}}],
    "mesh-0": [{**INGRESS, "num_replicas": 1}, {"name": "RouterDeployment", "ray_actor_options": {"num_cpus": 0.25}},
               {"name": "mesh-0", "ray_actor_options": {"num_cpus": 0.11}}],
}


def deploy(port: int, deployments: list[dict]) -> None:
    """What `serve deploy` of a config with these `deployments:` sends the controller."""
    app = {"name": "meshserve", "route_prefix": "/", "import_path": "deployments.app:build", "args": ARGS,
           "deployments": deployments}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(
        {"http_options": {"host": "127.0.0.1", "port": port}, "proxy_location": "HeadOnly", "applications": [app]}))


def replica_ids(deployment: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"meshserve#{deployment}#" in a["name"]}


async def whole(http: httpx.AsyncClient, url: str, prompt: list[int]) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    r = await http.post(f"{url}/v1/completions", json=body)
    if r.status_code != 200:
        return {"text": "", "finish": None, "error": r.text}
    return {"text": r.json()["choices"][0]["text"], "finish": r.json()["choices"][0]["finish_reason"], "error": None}


async def load(url: str, change=None) -> tuple[list[dict], list[dict], float | None]:
    """Streams and whole answers of PROMPTS; once every stream has tokens, `change()` (in a thread), which returns
    when its new replica is up. Returns the streams, the whole answers, and the perf_counter time it returned."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=2 * len(PROMPTS) + 4)) as http:
        started = [asyncio.Event() for _ in PROMPTS]
        streams = [asyncio.create_task(one_stream(http, url, p, MAX_TOKENS, e)) for p, e in zip(PROMPTS, started)]
        wholes = [asyncio.create_task(whole(http, url, p)) for p in PROMPTS]
        changed_at = None
        if change is not None:
            await asyncio.gather(*[e.wait() for e in started])
            await asyncio.to_thread(change)
            changed_at = time.perf_counter()
        return list(await asyncio.gather(*streams)), list(await asyncio.gather(*wholes)), changed_at


def router_idle(timeout_s: float = 30) -> list[tuple]:
    """Each mesh's (running, waiting, blocks in use) once all are 0, or as they stand at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = [(m["running"], m["waiting"], m["blocks_used"]) for m in router_stats()["meshes"]]
        if not any(map(any, held)) or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


@pytest.fixture(scope="module")
def app():
    with ray_environment():
        init_local_ray(4)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        deploy(port, [])
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        streams, _, _ = asyncio.run(load(url))
        assert all(r["finish"] == "length" and not r["error"] for r in streams)
        yield port, url, [r["text"] for r in streams]
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("changed", list(CHANGES))  # in order: each starts from the one before
def test_an_option_changed_under_load_loses_no_answer_and_leaves_nothing_held(app, changed):
    port, url, reference = app
    deployment = changed.split()[0]
    before = replica_ids(deployment)

    def change() -> None:
        deploy(port, CHANGES[changed])
        deadline = time.monotonic() + (0 if changed == "Ingress scaled down" else 120)
        while not replica_ids(deployment) - before and time.monotonic() < deadline:  # a new replica started
            time.sleep(0.2)

    streams, wholes, changed_at = asyncio.run(load(url, change))
    if changed != "Ingress scaled down":
        assert replica_ids(deployment) - before, "no new replica came"
        assert any(r["chunks"][-1] > changed_at for r in streams), "the streams ended before the new replica came"
    assert [(r["error"], r["finish"]) for r in streams + wholes] == [(None, "length")] * 2 * len(PROMPTS)
    assert [r["text"] for r in streams] == reference and [r["text"] for r in wholes] == reference
    assert router_idle() == [(0, 0, 0)] * ARGS["num_meshes"]
    if changed == "mesh-0":  # Serve's graceful stop of its replica is a planned stop: no failover, no alert
        mesh0 = router_stats()["meshes"][0]
        assert (mesh0["failovers"], mesh0["stops"]) == (0, 1), mesh0
    if changed == "Ingress scaled down":  # its stopping replica served its answers out, then went
        deadline = time.monotonic() + 60
        while len(replica_ids("Ingress")) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(replica_ids("Ingress")) == 1
