"""/metrics through the whole stack in one process (the ingress app over a real Router and simulated meshes): what
the counters and gauges read after requests that end abnormally, against what vLLM would show."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.ingress import build_app
from deployments.metrics import FINISH_REASONS
from model.embedded import ensure_smollm2
from model.simulated import SimulatedBackend
from model.tokenizer import load_tokenizer
from scheduler.errors import QueueFull
from tests.in_process import InProcessRouter, Stack, nothing_held
from tests.ingress_support import sse
from tests.test_long_prompts import text_of


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


@pytest.fixture
def stack(tok):
    """Stack: one simulated mesh of 4 slots."""
    def backend():
        return SimulatedBackend(time_scale=0.02, num_slots=4, kv_groups=1, num_blocks=256, max_seq_len=8192,
                                vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.stop_ids)))
    s = Stack(tok, backend)
    yield s
    s.close()


def scrape(run, client) -> dict:
    text = run(client.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def hold_first_token(stack) -> tuple[asyncio.Event, asyncio.Event]:
    """The first choice's (id ending "-0") first token reaches the ingress only once `gate` is set; `held` is set
    when it is being held."""
    generate = stack.router_client.generate
    held, gate = asyncio.Event(), asyncio.Event()

    async def first_token_held(request_id, *args, **kwargs):
        async for event in generate(request_id, *args, **kwargs):
            if request_id.endswith("-0") and event.token_ids:
                held.set()
                await gate.wait()
            yield event
    stack.router_client.generate = first_token_held
    return held, gate


def test_the_later_choices_of_a_long_prompt_count_their_prefix_cache_hits(tok, stack):
    """n choices of a long prompt: vLLM looks each child request up in the prefix cache, and the later ones hit the
    blocks the first computed. The later choices go to the router as continuations (after the first's first token),
    and the router took a continuation's lookup as counted already: queries showed the prompt once and hits 0, so the
    hit rate missed exactly the reuse the deferral is for."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": text_of(tok, 2000, seed=3), "max_tokens": 4, "temperature": 0, "n": 3}
    answer = run(client.post("/v1/completions", json=body))
    assert answer.status_code == 200, answer.text
    prompt = answer.json()["usage"]["prompt_tokens"]  # counted once for the n choices
    samples = scrape(run, client)
    mesh = (("mesh", "mesh-0"),)
    assert samples[("meshserve_prefix_cache_queries_tokens_total", mesh)] == 3 * prompt
    assert samples[("meshserve_prefix_cache_hits_tokens_total", mesh)] >= 2 * (prompt - 128)


def test_an_n_choice_request_reports_its_prompt_and_its_prompts_cache_hit_once(tok, stack):
    """usage counts the prompt of n choices once, and so its prefix-cache hit: the first choice's, streamed or not.
    The later choices of a long prompt reuse the first's prefill, hits for the counters (vLLM's per child) but no
    cache hit of the prompt the client is billed for once, which was computed. vLLM reports one child's hit too: the
    first to answer when streamed, the last to finish when not (so there the two differ for the same request)."""
    run, client = stack.run, stack.client

    def usage(prompt: str, n: int, stream: bool) -> dict:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 4, "temperature": 0, "n": n}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        answer = run(client.post("/v1/completions", json=body))
        assert answer.status_code == 200, answer.text
        return sse(answer)[-1]["usage"] if stream else answer.json()["usage"]

    mesh = (("mesh", "mesh-0"),)
    for seed, stream in ((11, False), (12, True)):
        prompt = text_of(tok, 2000, seed=seed)
        hits = scrape(run, client).get(("meshserve_prefix_cache_hits_tokens_total", mesh), 0)
        first = usage(prompt, 3, stream)
        assert (first["prompt_tokens"], first["prompt_tokens_details"]["cached_tokens"]) == (2000, 0)
        assert scrape(run, client)[("meshserve_prefix_cache_hits_tokens_total", mesh)] - hits >= 2 * (2000 - 128)
        again = usage(prompt, 3, stream)  # cached now: the hit of the prompt, once, as a single request's
        assert again["prompt_tokens_details"] == usage(prompt, 1, stream)["prompt_tokens_details"]
        assert 2000 - 128 <= again["prompt_tokens_details"]["cached_tokens"] < 2000


def test_a_scrape_of_one_ingress_replica_shows_the_others_families(stack):
    """A scrape through the load balancer reaches one ingress replica. Each showed only its own token and request
    counts, so Prometheus marked the others' series stale at every scrape that missed them, and rate() over a
    window that held fewer than two scrapes of a replica dropped it (4 replicas, Grafana's 4-scrape
    $__rate_interval: each replica is in ~1 of 4 scrapes, and the token-throughput panel read ~nothing). Every
    replica's families now come with every scrape, each replica's as of its own last scrape."""
    run, client = stack.run, stack.client
    other = stack.ingress(replica_name="ingress-b")
    body = {"model": "smollm2", "prompt": "hello there", "max_tokens": 5, "ignore_eos": True}
    assert run(other.post("/v1/completions", json=body)).status_code == 200
    scrape(run, other)  # replica b scraped once: its counts as of now go with the next scrape of any replica
    samples = scrape(run, client)
    b = (("ingress", "ingress-b"),)
    assert samples[("meshserve_generation_tokens_total", b)] == 5
    assert samples[("vllm:generation_tokens_total", (*b, ("model_name", "smollm2")))] == 5
    assert samples[("meshserve_generation_tokens_total", (("ingress", "local"),))] == 0
    assert samples[("meshserve_requests_total", (("finish_reason", "length"), *b))] == 1


def test_later_choices_held_in_the_ingress_count_as_waiting(tok, stack):
    """vLLM counts all n children of a request in vllm:num_requests_waiting at once. The later choices of a long prompt
    wait in the ingress for the first's first token (its prefill cached), in no router queue: the gauge missed them,
    and an autoscaler on it (KEDA) saw n times less backlog. They count while they wait there, not once submitted, and
    not after their client left."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": text_of(tok, 2000, seed=5), "max_tokens": 4, "temperature": 0, "n": 3}
    held, gate = hold_first_token(stack)

    def waiting() -> float:
        return sum(v for (name, _), v in scrape(run, client).items() if name == "vllm:num_requests_waiting")

    post = stack.loop.create_task(client.post("/v1/completions", json=body))
    run(held.wait())
    assert waiting() == 2  # choices 1 and 2; choice 0 runs in the router
    gate.set()
    assert run(post).status_code == 200
    assert waiting() == 0
    held.clear(), gate.clear()
    post = stack.loop.create_task(client.post("/v1/completions", json={**body, "seed": 1}))
    run(held.wait())
    assert waiting() == 2
    post.cancel()  # the client leaves while they wait
    with pytest.raises(asyncio.CancelledError):
        run(post)
    assert waiting() == 0
    gate.set()


def test_another_replicas_counters_never_go_back_between_scrapes_of_two_replicas(stack):
    """A replica's scrape handed the router its families, then waited for the router's stats, and showed them live:
    tokens that came meanwhile were in what it showed but not in what the router kept. The next scrape, reaching
    another replica through the load balancer, showed that replica's counters lower than the one before:
    Prometheus takes any decrease for a restart, so rate() and increase() read the whole count again (a spike of
    every token served so far on vLLM's throughput panel). A scrape shows its own families as it reported them."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": "hello there", "max_tokens": 5, "ignore_eos": True}
    finished_meanwhile = []

    class StatsAfterARequest(InProcessRouter):  # a request of this replica ends while its scrape waits on the router
        async def stats(self, report=None):
            if report is not None and not finished_meanwhile:
                finished_meanwhile.append((await other.post("/v1/completions", json=body)).status_code)
            return self.router.stats(report)

    app = build_app(StatsAfterARequest(stack.router), stack.tok, "smollm2", replica_name="ingress-b")
    other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60)
    b = (("ingress", "ingress-b"),)
    shown_by_b = scrape(run, other)
    assert finished_meanwhile == [200]
    shown_by_a = scrape(run, client)  # the next scrape reaches the other replica
    for name in ("meshserve_generation_tokens_total", "meshserve_prompt_tokens_total",
                 "meshserve_e2e_request_latency_seconds_count"):
        assert shown_by_a[(name, b)] >= shown_by_b[(name, b)], name
    assert shown_by_a[("meshserve_requests_total", (("finish_reason", "length"), *b))] >= \
        shown_by_b[("meshserve_requests_total", (("finish_reason", "length"), *b))]
    assert scrape(run, other)[("meshserve_generation_tokens_total", b)] == 5  # its next scrape: the request's tokens


def test_later_choices_whose_client_left_while_they_waited_in_the_ingress_count_as_aborted(tok, stack):
    """The later choices of a long prompt wait in the ingress for the first's first token, counted in
    num_requests_waiting as vLLM counts its n children. When the client left then, the first choice counted as
    finished 'abort' but they did not count at all: vLLM's finish-reason panel showed one request where the waiting
    gauge had shown three, and e2e latency's count missed them too. Each choice counts once, as the first does."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": text_of(tok, 2000, seed=6), "max_tokens": 4, "temperature": 0, "n": 3}
    generate = stack.router_client.generate
    held = asyncio.Event()

    async def first_token_never_comes(request_id, *args, **kwargs):
        async for event in generate(request_id, *args, **kwargs):
            if request_id.endswith("-0") and event.token_ids:
                held.set()
                await asyncio.Event().wait()
            yield event
    stack.router_client.generate = first_token_never_comes
    before = scrape(run, client)
    post = stack.loop.create_task(client.post("/v1/completions", json=body))
    run(held.wait())
    post.cancel()  # the client leaves while choices 1 and 2 wait for choice 0's first token
    with pytest.raises(asyncio.CancelledError):
        run(post)
    after = scrape(run, client)
    local = (("ingress", "local"),)
    for name in ("meshserve_requests_total", "meshserve_e2e_request_latency_seconds_count"):
        labels = (("finish_reason", "abort"), *local) if name == "meshserve_requests_total" else local
        assert after[(name, labels)] - before[(name, labels)] == 3, name
    assert after[("meshserve_request_max_num_generation_tokens_count", local)] - \
        before[("meshserve_request_max_num_generation_tokens_count", local)] == 1  # the prompt's n choices, once
    assert after[("meshserve_prompt_tokens_total", local)] == before[("meshserve_prompt_tokens_total", local)]


def test_later_choices_of_a_long_prompt_refused_with_their_first_count_as_no_finished_request(tok, stack):
    """A request refused before it ran (429 here) is no finished request, as in vLLM, however many choices it has:
    the later choices waiting in the ingress for the first's first token are cut when the first is refused, and count
    as rejected once (the API request), not as aborted."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": text_of(tok, 2000, seed=7), "max_tokens": 4, "temperature": 0, "n": 3}

    async def queue_full(request_id, *args, **kwargs):
        raise QueueFull("waiting queue is full")
        yield
    stack.router_client.generate = queue_full
    before = scrape(run, client)
    assert run(client.post("/v1/completions", json=body)).status_code == 429
    after = scrape(run, client)
    local = (("ingress", "local"),)
    rejected = ("meshserve_requests_rejected_total", (*local, ("reason", "queue_full")))
    assert after[rejected] - before[rejected] == 1
    for reason in FINISH_REASONS:
        key = ("meshserve_requests_total", (("finish_reason", reason), *local))
        assert after[key] == before[key], reason
    assert after[("meshserve_e2e_request_latency_seconds_count", local)] == \
        before[("meshserve_e2e_request_latency_seconds_count", local)]


def test_the_wait_of_later_choices_held_in_the_ingress_is_queue_time_not_prefill_time(tok, stack):
    """The later choices of a long prompt wait in the ingress for the first's first token, counted as waiting in
    num_requests_waiting, as vLLM counts its n children queued at once. Their queue time was only the router's, from
    when they reached it: the wait in the ingress (the first choice's own queue and prefill) went into their prefill
    time, so vLLM's prefill panel showed the queue under load. It is queue time now, as the waiting gauge says."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": text_of(tok, 2000, seed=8), "max_tokens": 4, "temperature": 0, "n": 3}
    held, gate = hold_first_token(stack)
    local = (("ingress", "local"),)
    before = scrape(run, client)
    post = stack.loop.create_task(client.post("/v1/completions", json=body))
    run(held.wait())
    run(asyncio.sleep(0.2))  # choices 1 and 2 wait in the ingress at least this long
    gate.set()
    assert run(post).status_code == 200
    after = scrape(run, client)
    name = "meshserve_request_queue_time_seconds"
    assert after[(f"{name}_count", local)] - before[(f"{name}_count", local)] == 3
    assert after[(f"{name}_sum", local)] - before[(f"{name}_sum", local)] >= 2 * 0.2


def test_kv_cache_usage_is_0_once_every_request_ended_though_the_prefix_cache_holds_their_blocks(tok, stack):
    """vLLM's kv_cache_usage_perc counts the blocks requests hold: blocks kept only for the prefix cache are free to
    take (its free queue holds them). Counted as used, a server idle after a burst would read as full."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": text_of(tok, 1000, seed=9), "max_tokens": 4, "temperature": 0}
    assert run(client.post("/v1/completions", json=body)).status_code == 200
    run(nothing_held(stack.router))
    assert stack.stats()["meshes"][0]["blocks_cached"] > 0  # the prompt's blocks, kept for a later hit
    samples = scrape(run, client)
    mesh = (("mesh", "mesh-0"),)
    assert samples[("meshserve_kv_blocks_used", mesh)] == 0
    assert samples[("vllm:kv_cache_usage_perc", (*mesh, ("model_name", "smollm2")))] == 0


def test_a_scrape_shows_each_series_once(stack):
    """The router hands a scraped replica every replica's last families, its own among them, which it shows as it
    reported them: shown again, each of its series would come twice, and Prometheus drops a scrape's duplicate
    samples."""
    run, client = stack.run, stack.client
    body = {"model": "smollm2", "prompt": "hello there", "max_tokens": 5, "ignore_eos": True}
    assert run(client.post("/v1/completions", json=body)).status_code == 200
    run(client.get("/metrics"))  # this replica's families, kept by the router, come back with the next scrape
    text = run(client.get("/metrics")).text
    series = [(s.name, tuple(sorted(s.labels.items())))
              for family in text_string_to_metric_families(text) for s in family.samples]
    assert series and len(series) == len(set(series))


def test_every_family_the_readme_names_is_exported(stack):
    """Dashboards and alerts are written from README's names (meshserve's own, and vLLM's for dashboards written for
    vLLM): a family renamed or dropped in the code leaves them reading nothing, silently. The two deprecated vLLM names
    README says are not served stay out."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    deprecated = {"vllm:time_per_output_token_seconds", "vllm:gpu_cache_usage_perc"}
    documented = set(re.findall(r"`(meshserve_\w+|vllm:\w+)", readme))
    assert deprecated < documented and len(documented - deprecated) > 20  # the README's list was read
    run, client = stack.run, stack.client
    assert run(client.post("/v1/completions", json={"model": "smollm2", "prompt": "hi", "max_tokens": 2})
               ).status_code == 200
    text = run(client.get("/metrics")).text
    exported = {name for family in text_string_to_metric_families(text)
                for name in (family.name, *(s.name for s in family.samples))}
    assert documented - deprecated <= exported, sorted(documented - deprecated - exported)
    assert not deprecated & exported
