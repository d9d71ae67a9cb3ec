"""Tenants: with API keys, each key has its own prefix cache (the salt is a keyed hash of the key and the
client's cache_salt), so cached_tokens reveal only a tenant's own prefixes; /metrics needs a key too."""
from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from deployments.config import AppConfig
from deployments.ingress import build_app
from tests import in_process
from tests.fake_router import FakeRouter
from tests.ingress_support import CHAT, MODEL, assert_error, client, eos, make_client, router, tokenizer  # noqa: F401

KEYS = ["sk-tenant-a", "sk-tenant-b"]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class SaltedCacheRouter(FakeRouter):
    """A router whose prefix cache is keyed on the salt, as the real one is: a prompt is cached once a
    request with the same salt has run it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached: set[tuple[str | None, tuple[int, ...]]] = set()

    async def generate(self, request_id, prompt_ids, params, salt, output_ids=(), continuation=False):
        key = (salt, tuple(prompt_ids))
        hit = len(prompt_ids) - 1 if key in self.cached else 0
        self.cached.add(key)
        async for event in super().generate(request_id, prompt_ids, params, salt, output_ids):
            yield dataclasses.replace(event, num_cached_tokens=hit if event.num_cached_tokens else 0)


def cached_tokens(client, key: str, cache_salt: str | None = None) -> int:
    body = {**CHAT, "max_tokens": 2, **({"cache_salt": cache_salt} if cache_salt else {})}
    r = client.post("/v1/chat/completions", json=body, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_tenant_sees_only_its_own_cache_hits(tokenizer, eos):
    client = make_client(SaltedCacheRouter(tokenizer.encode("Hi there") + [eos]), tokenizer, api_keys=KEYS)
    assert cached_tokens(client, KEYS[0]) == 0
    assert cached_tokens(client, KEYS[1]) == 0  # the same prompt, cached for A only: B sees no hit
    assert cached_tokens(client, KEYS[0]) > 0
    assert cached_tokens(client, KEYS[0], cache_salt="project-x") == 0  # a client salt splits a tenant further
    assert cached_tokens(client, KEYS[1], cache_salt="project-x") == 0  # and never joins two tenants


def test_the_salt_is_a_keyed_hash_the_same_on_every_replica(router, tokenizer):
    replicas = [make_client(router, tokenizer, api_keys=KEYS) for _ in range(2)]
    for client in replicas:
        for key in KEYS:
            for cache_salt in (None, "s"):
                body = {**CHAT, **({"cache_salt": cache_salt} if cache_salt else {})}
                assert client.post("/v1/chat/completions", json=body, headers=auth(key)).status_code == 200
    salts = [salt for _, _, salt in router.requests.values()]
    assert salts[:4] == salts[4:]  # both replicas derive the same salts
    assert len(set(salts[:4])) == 4  # per key, and per client salt within a key
    assert all(len(s) == 64 and "tenant" not in s and s != "s" for s in salts)  # neither key nor salt shows


def test_without_keys_the_client_salt_is_passed_as_is(client, router):
    client.post("/v1/chat/completions", json={**CHAT, "cache_salt": "mine"})
    client.post("/v1/chat/completions", json=CHAT)
    assert [salt for _, _, salt in router.requests.values()] == ["mine", None]


@pytest.mark.parametrize("metrics_open", [False, True])
def test_metrics_need_a_key_unless_configured_open(router, tokenizer, metrics_open):
    client = make_client(router, tokenizer, api_keys=KEYS, metrics_open=metrics_open)
    if metrics_open:
        assert client.get("/metrics").status_code == 200
    else:
        assert_error(client.get("/metrics"), 401)
        assert_error(client.get("/metrics", headers=auth("sk-wrong")), 401)
    assert client.get("/metrics", headers=auth(KEYS[1])).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key


def test_every_other_route_needs_a_key(router, tokenizer):
    client = make_client(router, tokenizer, api_keys=KEYS)
    for method, path, body in [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None),
                               ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/tokenize?prompt=hi", None), ("GET", "/detokenize?tokens=1", None)]:
        assert_error(client.request(method, path, json=body), 401)
        assert client.request(method, path, json=body, headers=auth(KEYS[0])).status_code == 200, path
    assert router.requests and all(salt is not None for _, _, salt in router.requests.values())


def test_metrics_are_behind_keys_by_default():
    assert AppConfig().metrics_open is False and AppConfig(metrics_open=True).metrics_open


def test_open_routes_stay_open_under_a_route_prefix(router, tokenizer):
    """Serve mounts an app with a route_prefix at that root_path: the path is "/llm/health", the route /health."""
    client = TestClient(build_app(router, tokenizer, MODEL, KEYS), root_path="/llm", raise_server_exceptions=False)
    assert client.get("/llm/health").status_code == 200
    assert client.get("/llm/version").status_code == 200
    assert_error(client.get("/llm/v1/models"), 401)
    assert client.get("/llm/v1/models", headers=auth(KEYS[0])).status_code == 200


def test_a_missing_or_wrong_key_gets_openais_401(router, tokenizer):
    """OpenAI answers a bad key with type "invalid_request_error" and code "invalid_api_key" (an "authentication_error"
    type was no OpenAI type), and never echoes the key."""
    client = make_client(router, tokenizer, api_keys=KEYS)
    for headers in [{}, auth("sk-wrong-key"), {"Authorization": "Basic sk-tenant-a"}]:
        response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
        error = assert_error(response, 401)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        assert "sk-" not in response.text


def test_the_bearer_scheme_is_any_case_and_may_be_followed_by_several_spaces(router, tokenizer):
    """RFC 6750 2.1: `credentials = "Bearer" 1*SP b64token`, the scheme case-insensitive (RFC 9110 11.1)."""
    client = make_client(router, tokenizer, api_keys=KEYS)
    for header in ["bearer sk-tenant-a", "BEARER sk-tenant-a", "Bearer  sk-tenant-a", "Bearer    sk-tenant-b"]:
        assert client.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
    for header in ["Bearer", "Bearer ", "Bearer  ", "Bearer\tsk-tenant-a", "Bearersk-tenant-a"]:
        assert_error(client.get("/v1/models", headers={"Authorization": header}), 401)


def test_two_authorization_headers_are_401_whichever_holds_the_key(router, tokenizer):
    """Authorization is not a list (RFC 9110 11.6.2): with two, which one a proxy checked and which one names the
    tenant would be up to each reader (Starlette's headers.get reads the first, a dict of them the last)."""
    client = make_client(router, tokenizer, api_keys=KEYS)
    for pair in [("Bearer sk-wrong", "Bearer sk-tenant-a"), ("Bearer sk-tenant-a", "Bearer sk-tenant-b")]:
        headers = [("authorization", value) for value in pair]
        error = assert_error(client.get("/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"


class SaltLog(FakeRouter):
    """A router that notes the salt of every submission, continuations too (`requests` keeps only the last)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.salts: list[tuple[str, str | None, bool]] = []

    async def generate(self, request_id, prompt_ids, params, salt, output_ids=(), continuation=False):
        self.salts.append((request_id, salt, continuation))
        async for event in super().generate(request_id, prompt_ids, params, salt, output_ids, continuation):
            yield event


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_a_resubmission_after_a_router_loss_keeps_its_tenants_salt(tokenizer, eos, path):
    """Every choice of an n>1 request, and each continuation sent after the router died mid-answer, carries the
    salt of the key that sent it: the resubmitted prompt reuses only that tenant's cache."""
    router = SaltLog(tokenizer.encode("Hi there, how are you") + [eos])
    client = make_client(router, tokenizer, api_keys=KEYS)
    body = {"model": MODEL, "input": "Hello"} if path == "/v1/responses" else {
        **(CHAT if path.endswith("chat/completions") else {"model": MODEL, "prompt": "Once upon a time"}), "n": 2}
    for key in KEYS:
        router.salts.clear()
        router.die_after = [2, 3]
        assert client.post(path, json=body, headers=auth(key)).status_code == 200
        assert any(continuation is True for _, _, continuation in router.salts)  # the router died mid-answer
        assert len({salt for _, salt, _ in router.salts}) == 1
        if key == KEYS[0]:
            first = router.salts[0][1]
    assert router.salts[0][1] != first


LONG = " ".join(f"line {i} of a long shared system prompt." for i in range(120))  # ~1,200 tokens: 9 blocks


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}),
                                        ("/v1/completions", {"prompt": LONG}), ("/v1/responses", {"input": LONG})])
def test_the_real_routers_prefix_cache_is_split_by_tenant(path, body):
    """Over the real router and meshes: another key's long prompt, n=2 included (the second choice reuses the first's
    prompt), gives no hit, in usage or in the meshes' prefix counters; the same key (and cache_salt) does."""
    stack = in_process.simulated_stack(4, 256, 2)
    try:
        client = stack.ingress(api_keys=KEYS)

        def cached(key: str, **extra) -> int:
            request = {"model": "smollm2", "max_tokens": 2, **body, **extra}
            r = stack.run(client.post(path, json=request, headers=auth(key)))
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            return (usage.get("prompt_tokens_details") or usage["input_tokens_details"])["cached_tokens"]

        def hits() -> int:
            return sum(mesh["prefix_hit_tokens"] for mesh in stack.stats()["meshes"])

        assert cached(KEYS[0]) == 0
        before = hits()
        assert cached(KEYS[1], **({} if path == "/v1/responses" else {"n": 2})) == 0
        assert hits() - before < 1300  # at most the second choice's reuse of its first's prompt (~1,240 tokens)
        before = hits()
        assert cached(KEYS[1], cache_salt="x") == 0
        assert cached(KEYS[0], cache_salt="x") == 0
        assert hits() == before
        assert cached(KEYS[0]) > 1000 and cached(KEYS[1], cache_salt="x") > 1000
    finally:
        stack.close()
