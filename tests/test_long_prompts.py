"""Prompts up to the 128k-token context through the whole stack in one process: the ingress app over a real Router
and a simulated Galaxy mesh (max_seq_len 131072), as a client sends them."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from model.embedded import ensure_smollm2
from model.simulated import SimulatedBackend
from model.tokenizer import load_tokenizer
from tests.in_process import Stack
from tests.test_router import until

CONTEXT = 131072
WORDS = "alpha beta gamma delta river stone cloud north table garden paper window silver orange music".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


def text_of(tok, n: int, seed: int) -> str:
    """Text that is exactly n tokens."""
    rng = random.Random(seed)
    text = tok.decode(tok.encode(" ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n)))[:n])
    assert len(tok.encode(text)) == n
    return text


@pytest.fixture
def stack(tok):
    """(run, client, prefilled): one mesh whose KV pool holds three 128k sequences; `prefilled` lists the (start, end)
    of every prefill the mesh computed."""
    prefilled: list[tuple[int, int]] = []

    def backend():
        sim = SimulatedBackend(time_scale=0.02, num_slots=8, kv_groups=1, num_blocks=3 * 2048 + 64,
                               max_seq_len=CONTEXT, vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.stop_ids)))
        prefill = sim.prefill

        def counted(token_ids, start, *args, **kwargs):
            prefilled.append((start, len(token_ids)))
            return prefill(token_ids, start, *args, **kwargs)
        sim.prefill = counted
        return sim
    s = Stack(tok, backend, prefill_chunk=4096, max_prefill_tokens=4096, min_step_deadline_s=5)
    yield s.run, s.client, prefilled
    s.close()


def test_a_128k_prompt_runs_to_the_context_and_its_prefix_is_cached(tok, stack):
    """Prompt + max_tokens up to the context is answered, one token more is a 400 naming max_tokens; a second request
    with the same 128k prefix reports it cached and the mesh computes only the rest."""
    run, client, prefilled = stack
    text = text_of(tok, CONTEXT - 100, seed=1)
    body = {"model": "smollm2", "prompt": text, "temperature": 0}
    refused = run(client.post("/v1/completions", json={**body, "max_tokens": 101}))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    first = run(client.post("/v1/completions", json={**body, "max_tokens": 100}))
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == CONTEXT
    assert sum(end - start for start, end in prefilled) == CONTEXT - 100
    prefilled.clear()
    again = run(client.post("/v1/completions", json={**body, "prompt": text + " and more", "max_tokens": 8}))
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= CONTEXT - 100 - 128
    assert sum(end - start for start, end in prefilled) == again.json()["usage"]["prompt_tokens"] - cached


def test_the_choices_of_a_long_prompt_prefill_it_once(tok, stack):
    """n choices of one long prompt: the mesh computes the prompt once, the later choices reuse its cached blocks
    (they went in together and each computed all of it: n x ~100 s of a Galaxy for a 128k prompt)."""
    run, client, prefilled = stack
    n = 32768
    body = {"model": "smollm2", "prompt": text_of(tok, n, seed=2), "max_tokens": 8, "temperature": 0, "n": 3}
    answer = run(client.post("/v1/completions", json=body))
    assert answer.status_code == 200, answer.text
    texts = [c["text"] for c in answer.json()["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: the same answer, computed once
    assert sum(end - start for start, end in prefilled) < n + 3 * 128


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_the_later_choices_wait_for_the_first_only_where_the_router_caches_prefixes(tok, prefix_caching):
    """Without the router's prefix cache (enable_prefix_caching false) the later choices would wait for the first's
    prefill for nothing: they go in together, as for a short prompt."""
    from tests.fake_router import FakeRouter
    from tests.ingress_support import make_client

    router = FakeRouter([5] * 8, max_model_len=4096, queued_s=0.05)
    order: list[tuple[str, str]] = []
    generate, stats = router.generate, router.stats

    async def logged(request_id, *args, **kwargs):
        order.append(("submit", request_id[-1]))
        async for event in generate(request_id, *args, **kwargs):
            order.append(("token", request_id[-1]))
            yield event

    async def with_flag():
        return {**await stats(), "enable_prefix_caching": prefix_caching}
    router.generate, router.stats = logged, with_flag
    body = {"model": "smollm2", "prompt": [7] * 2000, "max_tokens": 2, "n": 2}
    assert make_client(router, tok).post("/v1/completions", json=body).status_code == 200
    second = order.index(("submit", "1"))
    assert (second > order.index(("token", "0"))) == prefix_caching, order


def test_the_later_choices_of_an_admitted_long_prompt_are_not_refused_by_the_queue_later(tok):
    """The later choices go to the router at the first's first token, when the queue may have filled meanwhile: they
    belong to a request it admitted, so they pass its limits as a continuation does. Refused there, the stream had
    its 200 and one choice's text, then a queue_full error event (the newcomer that filled the queue got its 200)."""
    def backend():
        return SimulatedBackend(time_scale=0.2, num_slots=1, kv_groups=1, num_blocks=2048, max_seq_len=8192,
                                vocab_size=tok.vocab_size, eos_token_ids=())
    s = Stack(tok, backend, max_waiting_requests=2)
    router, client = s.router, s.client

    async def main():
        short = {"model": "smollm2", "prompt": "hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        waiting = lambda: router.stats()["meshes"][0]["waiting"]  # noqa: E731
        busy = asyncio.create_task(client.post("/v1/completions", json={**short, "max_tokens": 200}))
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)  # it holds the one slot

        async def long():
            body = {**short, "prompt": [7] * 6000, "n": 2, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                return r.status_code, [line async for line in r.aiter_lines() if line.startswith("data")]
        answer = asyncio.create_task(long())
        await asyncio.sleep(0.2)
        queued = asyncio.create_task(client.post("/v1/completions", json=short))
        await until(lambda: waiting() == 2)
        await until(lambda: waiting() < 2, 60)  # the first choice took the slot: a place in the queue frees
        newcomer = asyncio.create_task(client.post("/v1/completions", json=short))  # and a newcomer takes it
        status, lines = await answer
        others = [(await t).status_code for t in (busy, queued, newcomer)]
        return status, lines, others
    try:
        status, lines, others = s.run(main())
    finally:
        s.close()
    assert status == 200 and not [line for line in lines if '"error"' in line], lines
    finished = [c for line in lines[:-1] for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finished) == [0, 1]
    assert others[:2] == [200, 200] and others[2] in (200, 429)


def test_the_later_choices_of_an_admitted_request_pass_the_queue_limits_whatever_its_prompt(tok):
    """The limits refuse requests, not choices: a short prompt's n choices go to the router at once, and the later
    ones were refused where the first was taken, so near the limit an n > 1 request got 429 at each retry while single
    ones took every place freed (and a batch of more choices than the limits let through never got in). They pass
    them as a long prompt's do once the first was admitted; refused, the first still refuses them all."""
    def backend():
        return SimulatedBackend(time_scale=0.2, num_slots=1, kv_groups=1, num_blocks=256, max_seq_len=4096,
                                vocab_size=tok.vocab_size, eos_token_ids=())
    s = Stack(tok, backend, max_waiting_requests=2)
    router, client = s.router, s.client

    async def main():
        short = {"model": "smollm2", "prompt": "hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        waiting = lambda: router.stats()["meshes"][0]["waiting"]  # noqa: E731
        busy = asyncio.create_task(client.post("/v1/completions", json={**short, "max_tokens": 100}))
        await until(lambda: router.stats()["meshes"][0]["running"] == 1)  # it holds the one slot
        queued = asyncio.create_task(client.post("/v1/completions", json=short))
        await until(lambda: waiting() == 1)  # one place left in the queue
        batch = asyncio.create_task(client.post("/v1/completions", json={**short, "prompt": ["a", "b"], "n": 2}))
        await until(lambda: waiting() == 5)
        late = await client.post("/v1/completions", json={**short, "n": 2})  # the queue is full: refused, whole
        assert late.status_code == 429 and late.json()["error"]["code"] == "queue_full", late.text
        assert waiting() == 5
        answer = await batch
        assert answer.status_code == 200, answer.text
        assert sorted(c["index"] for c in answer.json()["choices"]) == [0, 1, 2, 3]
        assert [(await t).status_code for t in (busy, queued)] == [200, 200]
    try:
        s.run(main())
    finally:
        s.close()
