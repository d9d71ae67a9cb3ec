"""The whole product over real HTTP: a Serve app on a local Ray instance, torch backend, SmolLM2."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from deployments.config import AppConfig
from bench.local_serve import router_stats, serve_app

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
CONFIG = AppConfig(model="smollm2", backend="torch", num_slots=4, num_blocks=256, max_seq_len=2048,
                   prefill_chunk=512, decode_steps=4, max_waiting_requests=4, mesh_num_cpus=1)


@pytest.fixture(scope="module")
def base_url():
    with serve_app(CONFIG) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def wait_idle(timeout_s: float = 30) -> dict:
    """Until no request runs or waits and no KV block is held (prefix-cached free blocks are not held)."""
    deadline = time.monotonic() + timeout_s
    while True:
        mesh = router_stats()["meshes"][0]
        if mesh["running"] == 0 and mesh["waiting"] == 0 and mesh["blocks_used"] == 0:
            return mesh
        if time.monotonic() > deadline:
            raise AssertionError(f"mesh never went idle: {mesh}")
        time.sleep(0.2)


def test_chat_non_streaming_has_text_and_usage(client):
    out = client.chat.completions.create(model=MODEL, messages=chat("What is the capital of France?"),
                                         max_tokens=24, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 5 and 0 < out.usage.completion_tokens <= 24
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_streaming_equals_non_streaming_and_reports_usage(client):
    kwargs = dict(model=MODEL, messages=chat("Name three colors."), max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_streaming_and_not(client):
    kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == whole.choices[0].text


def test_greedy_over_http_equals_direct_torch_backend(client):
    from model.embedded import ensure_smollm2
    from model.tokenizer import load_tokenizer
    from model.torch_llama import TorchBackend

    model_dir = ensure_smollm2()
    tok = load_tokenizer(model_dir)
    prompt_ids = tok.encode_chat(chat("Write one sentence about the sea."))
    backend = TorchBackend(model_dir, num_slots=1, block_size=64, num_blocks=8, max_seq_len=512)
    blocks = list(range(8))
    ids = list(prompt_ids)
    ids.append(int(backend.prefill(ids, 0, blocks, 0).argmax()))
    import torch
    table = torch.tensor([blocks], dtype=torch.int32)
    while len(ids) - len(prompt_ids) < 32 and ids[-1] not in tok.stop_ids:
        logits = backend.decode(torch.tensor([ids[-1]]), torch.tensor([len(ids) - 1]), table,
                                torch.tensor([True]))
        ids.append(int(logits[0].argmax()))
    direct = [t for t in ids[len(prompt_ids):] if t not in tok.stop_ids]
    out = client.chat.completions.create(model=MODEL, messages=chat("Write one sentence about the sea."),
                                         max_tokens=32, temperature=0)
    assert out.choices[0].message.content == tok.decode(direct)


def test_seed_reproducible_and_stop_string(client):
    kwargs = dict(model=MODEL, messages=chat("Tell me a story."), max_tokens=16, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = greedy.choices[0].text
    stop = text.strip().split()[1]  # a string the model will certainly produce
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_models_health_metrics(base_url):
    assert httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{base_url}/health").status_code == 200
    body = httpx.get(f"{base_url}/metrics").text
    for name in ("time_to_first_token", "inter_token_latency", "e2e", "queue", "kv", "prefix", "preempt"):
        assert name in body, name
    # the ingress's own families carry its Serve replica's id: replicas behind one load balancer stay apart
    (label,) = {line.split('ingress="')[1].split('"')[0] for line in body.splitlines() if 'ingress="' in line}
    assert label not in ("", "local")


BAD = [
    (b"{not json", 400, None),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": chat("x"), "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": chat("x"), "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": chat("x"), "top_p": 2}).encode(), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": chat("x"), "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": chat("x"), "top_logprobs": 50, "logprobs": True}).encode(), 400,
     "top_logprobs"),
    (json.dumps({"model": MODEL, "messages": chat("word " * 3000)}).encode(), 400, None),
    (json.dumps({"model": "nope", "messages": chat("x")}).encode(), 404, None),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_input_gets_openai_error(base_url, body, status, param):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param and param in error["message"]


def test_queue_full_is_429_and_nothing_is_5xx(base_url):
    import concurrent.futures as cf

    def one(i: int) -> int:
        body = {"model": MODEL, "prompt": f"Count to a hundred {i}:", "max_tokens": 48, "temperature": 0,
                "ignore_eos": True}
        return httpx.post(f"{base_url}/v1/completions", json=body, timeout=300).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(16)))
    assert 429 in codes and 200 in codes and all(c in (200, 429) for c in codes), codes
    wait_idle()


def test_client_disconnect_mid_stream_frees_slot_and_blocks(base_url):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: ") for line in got)
        assert router_stats()["meshes"][0]["running"] == 1
    mesh = wait_idle()
    assert mesh["free_slots"] == CONFIG.num_slots


def test_serving_benchmark_runs_unchanged_against_meshserve(base_url, tmp_path):
    """The same bench.serving that runs against a plain OpenAI server (test_bench_serving) runs here."""
    from bench import serving
    out = tmp_path / "out.json"
    serving.main(["--url", base_url + "/v1", "--num-prompts", "6", "--random-input-len", "24",
                  "--random-output-len", "8", "--max-concurrency", "3", "--warmup", "1",
                  "--goodput", "ttft:60000", "tpot:60000", "e2el:60000", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["completed"], report["failed"]) == (6, 0)
    assert report["output_tokens"] == 6 * 8 and report["usage_reported"] == 6
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < report[metric]["p50"] <= report[metric]["p99"]
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "goodput"):
        assert report[key] > 0


def test_default_sampling_parameters_are_served(client):
    """No temperature given means OpenAI's default (1.0), sampled on the host for the torch backend."""
    out = client.chat.completions.create(model=MODEL, messages=chat("Say hello."), max_tokens=8)
    assert out.choices[0].message.content and out.usage.completion_tokens > 0


@pytest.mark.parametrize("extra", [
    {"min_tokens": 1},  # masked stop ids on the prefill logits once crashed the torch mesh for good
    {"min_tokens": 2, "stop_token_ids": [1000000000]},
    {"min_tokens": 2, "stop_token_ids": [-1]},
    {"min_tokens": 3, "stop_token_ids": [2], "presence_penalty": 1.5, "logprobs": 2},
])
def test_no_request_can_take_the_mesh_down(base_url, extra):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **extra}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "stop_token_ids"
    else:
        assert r.json()["usage"]["completion_tokens"] >= extra["min_tokens"]
    ordinary = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4},
                          timeout=60)
    assert ordinary.status_code == 200, ordinary.text
    assert httpx.get(f"{base_url}/health").status_code == 200


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_a_forced_named_tool_call_is_valid_streamed_and_not(client):
    import jsonschema
    kwargs = dict(model=MODEL, messages=chat("What is the weather in Paris?"), tools=[WEATHER], max_tokens=80,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    out = client.chat.completions.create(**kwargs).choices[0]
    (call,) = out.message.tool_calls
    assert out.finish_reason == "stop" and call.function.name == "get_weather"  # named: as OpenAI and vLLM
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [tc.function.name for tc in pieces if tc.function.name] == ["get_weather"] and {tc.index for tc in pieces} == {0}
    arguments = "".join(tc.function.arguments or "" for tc in pieces)  # streamed as generated, pieced together
    assert arguments == call.function.arguments  # the same text, not only the same value


def test_responses_api_through_the_sdk(client):
    """OpenAI's SDK, as a client of /v1/responses: the same greedy answer as a chat completion, whole and
    streamed (the SDK's stream helper pieces the events together); a forced call as a function_call item."""
    chat_text = client.chat.completions.create(model=MODEL, messages=chat("Name three colors."), max_tokens=20,
                                               temperature=0).choices[0].message.content
    kwargs = dict(model=MODEL, input="Name three colors.", max_output_tokens=20, temperature=0)
    whole = client.responses.create(**kwargs)
    assert whole.output_text == chat_text and whole.usage.output_tokens > 0
    with client.responses.stream(**kwargs) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == chat_text
    tool = {"type": "function", **WEATHER["function"]}
    called = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],
                                     tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80,
                                     temperature=0)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments)


def test_json_schema_answers_validate(client):
    import jsonschema
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "likes": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                         "maxItems": 3}},
              "required": ["name", "age", "likes"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    topics = ["a pirate", "a chef", "a cat", "an astronaut", "a farmer"]  # one more than the slots: one is reused

    def ask(topic: str) -> str:
        out = client.chat.completions.create(model=MODEL, messages=chat(f"Describe {topic} as JSON."),
                                             response_format=fmt, max_tokens=120, temperature=0.7, seed=1)
        return out.choices[0].message.content

    with ThreadPoolExecutor(CONFIG.num_slots) as pool:  # side by side in the mesh's slots, each with its own grammar
        for content in pool.map(ask, topics):
            jsonschema.validate(json.loads(content), schema)


def test_a_client_that_leaves_a_non_streaming_request_frees_its_slot(base_url):
    """Through the HAProxy ingress too: with Ray's splice options, HAProxy 2.8 kept such a request running
    (and spun a core); bin/haproxy-nosplice starts it without splice."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    for _ in range(3):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{base_url}/v1/completions", json=body, timeout=1.0)
    mesh = wait_idle(timeout_s=20)
    assert mesh["free_slots"] == CONFIG.num_slots
