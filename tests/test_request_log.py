"""vLLM's enable_log_requests: a request's notable events at INFO under its router id, which begins with the id its
client sees, in the ingress (received, finished, aborted, failed) and in the router (preempted, moved off a failed
mesh); nothing of the kind by default, and never the prompt."""
import asyncio
import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.local_serve import ray_env
from deployments.protocol import ChatCompletionRequest
from deployments.router import Router, RouterConfig
from model.simulated import SimulatedBackend
from scheduler.errors import QueueFull
from scheduler.sampling import SamplingParams
from tests.ingress_support import CHAT, make_client, router, tokenizer, eos  # noqa: F401 (fixtures)
from tests.local_mesh import LocalMesh
from tests.test_router import FAST, collect, until

PROMPT = "my private question about zebras"


@pytest.fixture
def serve_log(caplog):
    """caplog at INFO for the "ray.serve" logger, which every deployment logs to."""
    caplog.set_level(logging.INFO, logger="ray.serve")
    return caplog


def lines(caplog) -> list[str]:
    """The lines logged of requests (the ingress also logs the model's sampling defaults as it starts)."""
    return [m for r in caplog.records if r.name == "ray.serve" and (m := r.getMessage()).startswith(
        ("Received request ", "Finished request ", "Aborted request ", "Request "))]


def test_the_ingress_logs_a_requests_life_under_the_id_its_client_sees(router, tokenizer, serve_log):
    client = make_client(router, tokenizer, enable_log_requests=True)
    body = {**CHAT, "messages": [{"role": "user", "content": PROMPT}]}
    answer = client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "ops-1"}).json()
    usage = answer["usage"]
    received, finished = lines(serve_log)
    (rid,) = router.requests
    assert rid.startswith(f"{answer['id']}-")
    assert received == f"Received request {rid}: prompt_tokens {usage['prompt_tokens']}, max_tokens " \
                       f"{router.requests[rid][1].max_tokens}."
    assert finished.startswith(f"Finished request {rid}: finish_reason stop, prompt_tokens {usage['prompt_tokens']}, "
                               f"completion_tokens {usage['completion_tokens']}, cached_tokens 3, ")
    router.refuse = QueueFull("2 requests are waiting for a slot (limit 2)")
    assert client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "ops-2"}).status_code == 429
    assert lines(serve_log)[-1].startswith("Request chatcmpl-ops-2-")
    assert lines(serve_log)[-1].endswith("failed: 429 The server is at capacity: 2 requests are waiting for a slot "
                                         "(limit 2)")
    assert not any(PROMPT in line for line in lines(serve_log))


def test_an_answer_its_client_leaves_is_logged_as_aborted(router, tokenizer, serve_log):
    server = make_client(router, tokenizer, enable_log_requests=True).app.state.server

    async def leave() -> None:
        req = ChatCompletionRequest.model_validate({**CHAT, "request_id": "ops-3"})
        stream = server.deltas([await server.prepare(req, "chatcmpl")], 1, None)
        await anext(stream)
        await stream.aclose()  # what a client's disconnect does to its answer
    asyncio.run(leave())
    (rid,) = router.requests
    assert rid.startswith("chatcmpl-ops-3-") and lines(serve_log)[-1] == f"Aborted request {rid} after 1 tokens."


def test_nothing_is_logged_per_request_by_default(router, tokenizer, serve_log):
    client = make_client(router, tokenizer)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    router.refuse = QueueFull("full")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 429
    assert lines(serve_log) == []


def _router_events(log_requests: bool) -> list[dict]:
    """Four long answers on two meshes of 8 KV blocks (preemptions); mesh-0 fails mid-answer (moves). Returns the
    meshes' stats at the end."""
    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_slots=4, kv_groups=1, num_blocks=8, time_scale=0.01,
                                                     vocab_size=1000)) for _ in range(2)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)],
                        RouterConfig(**FAST, log_requests=log_requests))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        meshes[0].inject("raise", after=6)
        params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        await asyncio.gather(*[collect(router, f"chatcmpl-ops-{i}-0", [i + 1] * 100, params) for i in range(6)])
        assert router.stats()["meshes"][0]["failovers"] == 1
        assert sum(m["preemptions"] for m in router.stats()["meshes"]) > 0
        stats = router.stats()["meshes"]
        await router.close()
        return stats
    return asyncio.run(main())


def test_the_router_logs_a_preemption_and_a_move_under_the_requests_id(serve_log):
    _router_events(log_requests=True)
    moved = [line for line in lines(serve_log) if " moved off failed mesh mesh-0 " in line]
    preempted = [line for line in lines(serve_log) if " preempted on mesh-" in line]
    assert moved and all(line.startswith("Request chatcmpl-ops-") and line.endswith(": to mesh-1.") for line in moved)
    assert preempted and all(line.startswith("Request chatcmpl-ops-") for line in preempted)


def test_the_router_logs_no_request_by_default(serve_log):
    """Without request lines, the mesh's failure line alone says where its requests went (/metrics'
    requests_migrated counts the same moves), and which failover of the mesh it was."""
    stats = _router_events(log_requests=False)
    assert lines(serve_log) == []
    (failed,) = [m for r in serve_log.records if (m := r.getMessage()).startswith("mesh mesh-0 failed")]
    moved = stats[0]["requests_migrated"]
    assert moved > 0 and failed == (f"mesh mesh-0 failed (failover 1): RuntimeError('device lost'); its {moved} "
                                    f"requests: {moved} moved (mesh-1: {moved}); probing it until its replica answers "
                                    f"again")


def test_a_lone_meshs_failure_line_says_its_requests_are_held(serve_log):
    """With no other mesh up, the failure line says they wait (held), not that they moved; its return says how
    long it was out, and that the same replica came back (its device reset), not one Serve restarted."""
    async def main():
        mesh = LocalMesh(lambda: SimulatedBackend(num_slots=4, kv_groups=1, num_blocks=64, time_scale=0.01,
                                                  vocab_size=1000))
        router = Router([("mesh-0", mesh)], RouterConfig(**FAST))
        await until(lambda: router.stats()["meshes"][0]["up"])
        mesh.inject("raise", after=2)
        params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
        answers = await asyncio.gather(*[collect(router, f"r{i}", [i + 1] * 20, params) for i in range(3)])
        await router.close()
        return answers
    assert [reason for _, reason in asyncio.run(main())] == ["length"] * 3
    (failed,) = [m for r in serve_log.records if (m := r.getMessage()).startswith("mesh mesh-0 failed")]
    assert failed.startswith("mesh mesh-0 failed (failover 1): RuntimeError('device lost'); its 3 requests: 3 held "
                             "for a live mesh; ")
    up = [m for r in serve_log.records if (m := r.getMessage()).startswith("mesh mesh-0 is up")]
    assert len(up) == 2 and re.fullmatch(r"mesh mesh-0 is up \(incarnation (\w+)\)", up[0])
    incarnation = up[0].split()[-1][:-1]
    assert re.fullmatch(rf"mesh mesh-0 is up again \(incarnation {incarnation}: the same replica\), \d+\.\d s after "
                        rf"failover 1", up[1]), up


def test_a_mesh_back_as_a_new_replica_is_logged_as_one(serve_log):
    async def main():
        meshes = [LocalMesh(lambda: SimulatedBackend(num_slots=4, kv_groups=1, num_blocks=64, time_scale=0.01,
                                                     vocab_size=1000)) for _ in range(2)]
        router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**FAST))
        await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
        meshes[0].inject("vanish", after=2)
        params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
        await asyncio.gather(*[collect(router, f"r{i}", [i + 1] * 20, params) for i in range(4)])
        meshes[0].restart()  # Serve's new replica
        await until(lambda: router.stats()["meshes"][0]["up"])
        await router.close()
    asyncio.run(main())
    up = [m for r in serve_log.records if (m := r.getMessage()).startswith("mesh mesh-0 is up again")]
    assert len(up) == 1 and re.fullmatch(r"mesh mesh-0 is up again \(incarnation \w+: a new replica\), \d+\.\d s "
                                         r"after failover 1", up[0]), up


def test_the_config_turns_it_on_in_the_ingress_and_the_router():
    from deployments.app import build
    from deployments.config import AppConfig
    for on in (False, True):
        ingress = build(AppConfig(backend="simulated", enable_log_requests=on))._bound_deployment
        router_args = ingress.init_args[0]._bound_deployment.init_args[1]
        assert ingress.init_kwargs["enable_log_requests"] is router_args["log_requests"] is on


@pytest.mark.parametrize("plain_proxy", [False, True])
def test_serve_as_started_here_writes_each_log_record_at_once(plain_proxy):
    """Serve's throughput mode keeps a replica's log records in memory until 1,000 have come or one is an ERROR, so
    a router's INFO and WARNING lines stayed out of its file for hours (and were lost with it). The Ray that the
    tests, the benchmarks and `make serve` start writes each at once."""
    code = "from ray.serve._private import constants; print(constants.RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE)"
    read = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ray_env(plain_proxy)},
                          capture_output=True, text=True, check=True)
    assert read.stdout.strip() == "1"
    make = subprocess.run(["make", "-n", "serve", f"MESHSERVE_PLAIN_PROXY={int(plain_proxy)}"],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, check=True)
    (command,) = [line for line in make.stdout.splitlines() if "/serve run " in line]
    assert "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1" in command.split()


@contextlib.contextmanager
def serve_tagged_lines():
    """(message, Serve request id) of each "ray.serve" line logged meanwhile, tagged as Serve tags a replica's lines
    (its ServeContextFilter reads the request context)."""
    from ray.serve._private.logging_utils import ServeContextFilter

    tagged: list[tuple[str, str | None]] = []
    handler = logging.Handler(logging.INFO)
    handler.addFilter(ServeContextFilter())
    handler.emit = lambda record: tagged.append((record.getMessage(), getattr(record, "request_id", None)))
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield tagged
    finally:
        logger.removeHandler(handler)


def test_the_routers_lines_carry_no_serve_request_id_of_the_call_that_started_it():
    """Serve tags a replica's log lines with the request id of the call they run in (its contextvar). The router and
    its link server start inside the first call that reaches them (an ingress's first /health probe), so every line
    of the router's loops and of each link, for good, named that probe's id: a grep of it found them all."""
    from ray.serve.context import _set_request_context
    from deployments.link import LinkServer, connect
    from deployments.router import RouterDeployment


    async def main():
        _set_request_context(request_id="first-probe")
        replica = RouterDeployment.func_or_class([], FAST)
        replica._clients = [LocalMesh(lambda: SimulatedBackend(time_scale=0.01, vocab_size=1000))]
        router = replica._ready()
        await until(lambda: router.stats()["ready"])

        async def serve_link(link) -> None:
            logging.getLogger("ray.serve").info("a link's line")
        server = LinkServer(serve_link)
        link = await connect(await server.start("127.0.0.1"))
        await until(lambda: any(message == "a link's line" for message, _ in tagged))
        link.close()
        server.close()
        await router.close()
    with serve_tagged_lines() as tagged:
        asyncio.run(main())
    assert ("mesh mesh-0 is up", None) in [(m.split(" (")[0], rid) for m, rid in tagged]
    assert ("a link's line", None) in tagged


def test_the_ingress_links_lines_carry_no_serve_request_id_of_the_call_that_opened_it():
    """The ingress's link to the router opens inside the first call that needs it (a /health probe, or the first
    request): its loop, and so its warning that the link broke, named that call's request id for good."""
    from ray.serve.context import _set_request_context
    from deployments.link import LinkServer
    from deployments.router_client import RouterLink
    from tests.test_link import Remote


    async def main():
        async def hang_up(link) -> None:  # a router whose link closes at once (as when its replica dies)
            link.close()
        server = LinkServer(hang_up)
        address = await server.start("127.0.0.1")

        class Handle:
            link_address = Remote(lambda: asyncio.sleep(0, address))
        _set_request_context(request_id="first-probe")
        client = RouterLink(Handle())
        client.link_down_s()  # as /health opens it
        await until(lambda: any("link broke" in message for message, _ in tagged))
        client._pump.cancel()
        server.close()
    with serve_tagged_lines() as tagged:
        asyncio.run(main())
    broke = [rid for message, rid in tagged if "link broke" in message]
    assert broke and set(broke) == {None}, broke


@pytest.fixture
def failing(router):
    """The router double, with every answer failing unexpectedly (a bug) after its first token."""
    answer = router._events

    async def fails(request_id, *args, **kwargs):
        async for event in answer(request_id, *args, **kwargs):
            yield event
            raise RuntimeError("a bug")
    router._events = fails
    return router


def _failed_stream(client, path: str, body: dict, serve_log) -> logging.LogRecord:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200 and "Internal server error." in response.read().decode()
    (record,) = [r for r in serve_log.records if r.getMessage().startswith("stream ")]
    assert record.exc_info and "a bug" in str(record.exc_info[1])
    return record


def test_a_stream_that_fails_unexpectedly_is_logged_without_a_newline_its_client_sent(failing, tokenizer,
                                                                                      serve_log):
    """A client's request_id is the response's id; with a newline in it, the failure's line forged a second one."""
    body = {**CHAT, "request_id": "x\nFinished request forged"}
    record = _failed_stream(make_client(failing, tokenizer), "/v1/chat/completions", body, serve_log)
    message = record.getMessage()
    assert "\n" not in message and message.startswith("stream chatcmpl-x?Finished request")


def test_a_responses_stream_that_fails_unexpectedly_is_logged(failing, tokenizer, serve_log):
    """Its client got an `error` event, but nothing was logged: a bug in a Responses stream left no trace for its
    operator, as the same one in a chat stream does."""
    body = {"model": CHAT["model"], "input": "hi"}
    record = _failed_stream(make_client(failing, tokenizer), "/v1/responses", body, serve_log)
    assert record.getMessage().startswith("stream resp_")
