"""Fuzzing the OpenAPI surface: schemathesis generates requests from the app's own OpenAPI schema, valid and
invalid, for every route (the ASGI app with a FakeRouter behind it; no Ray). No request may get a 5xx, and
every 4xx must be OpenAI's error JSON. The number of examples is bounded so this fits the suite's time."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation import GenerationMode

from deployments.ingress import build_app
from model.embedded import ensure_smollm2
from model.tokenizer import load_tokenizer
from tests.fake_router import FakeRouter

MAX_EXAMPLES = 100  # per route and generation mode
RUNS: list[tuple[str, int]] = []  # (route, status) of every request made


def _schema():
    """Built at import: schemathesis parametrizes the test by route when the module is collected (its
    fixture-based loader does not run on this pytest)."""
    tokenizer = load_tokenizer(ensure_smollm2())
    (eos,) = tokenizer.stop_ids
    app = build_app(FakeRouter(tokenizer.encode("Fuzzed, 🚀 fine.") + [eos], max_model_len=512), tokenizer, "smollm2",
                    max_request_bytes=64 * 1024)
    app.state.server.retry_backoff_s = ()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES)
    return schema


schema = _schema()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    statuses = sorted({s for _, s in RUNS})
    print(f"\nschemathesis: {len(RUNS)} requests over {len({r for r, _ in RUNS})} routes, statuses {statuses}")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_error_and_openai_errors(case):
    response = case.call()
    RUNS.append((f"{case.method} {case.path}", response.status_code))
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]


def test_the_schema_documents_every_route_and_nullable_fields():
    paths = schema.raw_schema["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/tokenize", "/detokenize",
            "/health", "/metrics"} <= set(paths)
    chat = schema.raw_schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"type": "null"} in chat["temperature"]["anyOf"]  # null means the default, and the schema says so


def test_every_operation_has_its_own_id():
    """OpenAPI: an operationId is unique among all operations (its generators name a client's methods by it). One
    route for GET and DELETE /v1/responses/{response_id} gave both the GET's id, and FastAPI warned at each build."""
    ids = [op["operationId"] for item in schema.raw_schema["paths"].values() for op in item.values()
           if isinstance(op, dict) and "operationId" in op]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
