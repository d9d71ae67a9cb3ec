"""bench.serving and bench.client end to end against a plain OpenAI-compatible server started here.

The fake streams "tok0 tok1 ..." two tokens per chunk (so token counts must come from usage, not chunks),
stops at a fake EOS after 5 tokens unless ignore_eos, reports usage only when asked, and records how many
requests it had in flight. Model "no-usage" never reports usage; model "broken" answers HTTP 500; a chat
prompt with "stall" goes silent for a minute after its first chunk.
"""
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import client, serving

EOS_AFTER = 5
TOKENS_PER_CHUNK = 2


def fake_openai_app() -> FastAPI:
    app = FastAPI()
    app.state.in_flight = 0
    app.state.max_in_flight = 0
    app.state.bodies = []
    app.state.keys = []  # the Authorization header of each request, None when absent

    @app.middleware("http")
    async def record_key(request: Request, call_next):
        app.state.keys.append(request.headers.get("authorization"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        app.state.bodies.append(body)
        if body["model"] == "broken":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if chat:
            prompt_tokens = len(body["messages"][0]["content"].split())
        else:
            prompt = body["prompt"]
            prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        n = body["max_tokens"] if body.get("ignore_eos") else min(body["max_tokens"], EOS_AFTER)
        usage = body.get("stream_options", {}).get("include_usage") and body["model"] != "no-usage"

        def chunk(text: str | None, usage_: dict | None = None) -> str:
            if usage_:
                payload = {"choices": [], "usage": usage_}
            elif chat:
                payload = {"choices": [{"index": 0, "delta": {"content": text} if text else {"role": "assistant"}}]}
            else:
                payload = {"choices": [{"index": 0, "text": text}]}
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            app.state.in_flight += 1
            app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
            try:
                if chat:
                    yield chunk(None)
                for first in range(0, n, TOKENS_PER_CHUNK):
                    await asyncio.sleep(60 if first and chat and "stall" in body["messages"][0]["content"] else 0.002)
                    yield chunk("".join(f"tok{i} " for i in range(first, min(n, first + TOKENS_PER_CHUNK))))
                if usage:
                    yield chunk(None, {"prompt_tokens": prompt_tokens, "completion_tokens": n})
                yield "data: [DONE]\n\n"
            finally:
                app.state.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await stream(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await stream(await request.json(), chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server():
    app = fake_openai_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "fake OpenAI server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state
    server.should_exit = True
    thread.join(timeout=10)


def check_distribution(dist):
    assert set(dist) == {"mean", "p50", "p90", "p99"}
    assert 0 < dist["p50"] <= dist["p90"] <= dist["p99"]
    assert dist["mean"] > 0


def test_random_prompts_report_every_metric(fake_server, tmp_path):
    url, state = fake_server
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    serving.main([
        "--url", url + "/v1", "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "12",
        "--warmup", "1", "--goodput", "ttft:60000", "tpot:60000", "e2el:60000",
        "--json", str(out), "--chart", str(png),
    ])  # fmt: skip
    report = json.loads(out.read_text())
    assert (report["completed"], report["failed"]) == (8, 0)
    assert report["output_tokens"] == 8 * 12  # ignore_eos held the length past the fake EOS, counted from usage
    assert report["input_tokens"] == 8 * 16
    assert report["usage_reported"] == 8
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        check_distribution(report[metric])
    assert report["ttft_ms"]["mean"] < report["e2el_ms"]["mean"]
    assert report["request_throughput"] == pytest.approx(8 / report["duration_s"])
    assert report["output_throughput"] == pytest.approx(96 / report["duration_s"])
    assert report["total_token_throughput"] == pytest.approx((96 + 128) / report["duration_s"])
    assert report["goodput"] == pytest.approx(report["request_throughput"])  # every request met loose SLOs
    timeline = report["output_throughput_timeline"]
    assert sum(timeline["tokens_per_s"]) * timeline["bin_s"] == pytest.approx(96)
    assert len(report["requests"]) == 8 and all(r["error"] is None for r in report["requests"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    warm, timed = state.bodies[-9], state.bodies[-8:]
    assert warm["prompt"] not in [b["prompt"] for b in timed]  # warm-up cannot seed a prefix cache
    assert all(b["ignore_eos"] and b["stream_options"] == {"include_usage": True} for b in timed)


def test_prompt_file_on_chat_at_a_rate_with_capped_concurrency(fake_server, tmp_path, capsys):
    url, state = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "one two three"}, {"prompt": "four five"}, {"prompt": "six"}]))
    state.max_in_flight = 0
    serving.main([
        "--url", url, "--endpoint", "chat", "--prompt-json-path", str(prompts), "--num-prompts", "6",
        "--request-rate", "500", "--max-concurrency", "2", "--max-tokens", "8", "--warmup", "0",
        "--goodput", "ttft:0.001", "--json", "-",
    ])  # fmt: skip
    report = json.loads(capsys.readouterr().out)  # the table went to stderr, so stdout is pure JSON
    assert report["completed"] == 6
    assert report["output_tokens"] == 6 * EOS_AFTER  # no ignore_eos for file prompts: the fake EOS ended them
    assert report["input_tokens"] == 2 * (3 + 2 + 1)
    assert report["goodput"] == 0.0  # nobody answers within a microsecond
    assert report["config"]["request_rate"] == 500
    assert state.max_in_flight <= 2
    sent = sorted(b["messages"][0]["content"] for b in state.bodies[-6:])
    assert sent == sorted(["one two three", "four five", "six"] * 2)


def test_token_counts_fall_back_to_chunks_without_usage(fake_server, tmp_path):
    url, state = fake_server
    out = tmp_path / "out.json"
    serving.main([
        "--url", url, "--model", "no-usage", "--num-prompts", "4", "--random-prompt", "tokens",
        "--random-input-len", "20", "--random-output-len", "9", "--warmup", "0", "--json", str(out),
    ])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["usage_reported"] == 0
    assert report["output_tokens"] == 4 * 5  # 9 tokens in chunks of 2: 5 chunks each
    assert report["input_tokens"] == 4 * 20  # the benchmark's own count of the token ids it sent
    assert all(len(b["prompt"]) == 20 and all(isinstance(t, int) for t in b["prompt"]) for b in state.bodies[-4:])
    assert report["goodput"] is None


def test_failing_server_stops_at_warm_up(fake_server):
    url, _ = fake_server
    with pytest.raises(SystemExit, match="every warm-up request failed; first error: HTTP 500"):
        serving.main(["--url", url, "--model", "broken", "--num-prompts", "2", "--warmup", "1"])


def test_client_cycles_prompts_to_fill_the_batch(fake_server, tmp_path, capsys):
    url, _ = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "first question"}, {"prompt": "second question"}]))
    out = tmp_path / "client.json"
    summary = client.main([
        "--num-concurrent", "4", "--prompt-json-path", str(prompts), "--url", url, "--max-tokens", "3",
        "--json", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("tok0 tok1 tok2") == 4
    assert "4/4 requests" in printed
    answers = json.loads(out.read_text())["requests"]
    assert [a["text"] for a in answers] == ["tok0 tok1 tok2 "] * 4
    assert all(a["ttft_ms"] > 0 and a["decode_tokens_per_s"] > 0 and a["output_tokens"] == 3 for a in answers)
    assert summary["failed"] == 0 and summary["output_tokens"] == 12


def test_a_stalled_stream_fails_after_the_read_timeout_and_the_others_are_kept(fake_server, tmp_path, capsys):
    """A stream gone silent (a host lost without a FIN, a stuck server) hung bench.client for ever: no read timeout,
    and the answers already in were never printed."""
    url, _ = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "fine"}, {"prompt": "stall"}]))
    summary = client.main(["--num-concurrent", "2", "--prompt-json-path", str(prompts), "--url", url,
                           "--max-tokens", "4", "--read-timeout", "0.5"])
    printed = capsys.readouterr().out
    assert summary["failed"] == 1 and "tok0 tok1 tok2 tok3" in printed and "FAILED: ReadTimeout" in printed


def test_the_clients_send_an_api_key_from_the_flag_or_openai_api_key(fake_server, tmp_path, monkeypatch):
    """A server with api_keys answers 401 without one: both clients send it as a bearer token."""
    url, state = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "q"}]))
    state.keys.clear()
    client.main(["--num-concurrent", "1", "--prompt-json-path", str(prompts), "--url", url, "--max-tokens", "2",
                 "--api-key", "sk-flag"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    serving.main(["--url", url, "--num-prompts", "1", "--warmup", "0", "--random-input-len", "4",
                  "--random-output-len", "2"])
    assert state.keys == ["Bearer sk-flag"] * 2 + ["Bearer sk-env"] * 2  # /v1/models, then the request
    monkeypatch.delenv("OPENAI_API_KEY")
    state.keys.clear()
    client.main(["--num-concurrent", "1", "--prompt-json-path", str(prompts), "--url", url, "--max-tokens", "2"])
    assert state.keys == [None, None]


def test_a_401_from_the_model_list_names_the_api_key_not_a_server_down():
    """Without --api-key against a server with api_keys, the exit said "(is the server up?)" after the 401."""
    refuse = httpx.MockTransport(lambda request: httpx.Response(401, json={"error": {"message": "wrong key"}}))

    async def list_models():
        async with httpx.AsyncClient(transport=refuse) as http:
            await client.first_model(http, "http://server:8000/v1")

    with pytest.raises(SystemExit) as exit_:
        asyncio.run(list_models())
    assert "--api-key" in str(exit_.value) and "OPENAI_API_KEY" in str(exit_.value)
    assert "is the server up" not in str(exit_.value)


def test_the_client_exits_non_zero_when_a_request_failed(fake_server):
    url, _ = fake_server
    run = subprocess.run([sys.executable, "-m", "bench.client", "--url", url, "--model", "broken",
                          "--num-concurrent", "2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "=== 0/32 requests" in run.stdout  # the default file: 32 prompts


@pytest.mark.parametrize("module, flags, named", [
    ("serving", ["--max-concurrency", "0"], "--max-concurrency"),  # hung, printing nothing
    ("serving", ["--max-concurrency", "-2"], "--max-concurrency"),
    ("serving", ["--num-prompts", "0"], "--num-prompts"),  # timed 100
    ("serving", ["--num-prompts", "-3"], "--num-prompts"),  # timed none, and exited 0
    ("serving", ["--warmup", "-1"], "--warmup"),  # ate a timed request
    ("serving", ["--request-rate", "0"], "--request-rate"),  # ZeroDivisionError after the warm-up
    ("serving", ["--request-rate", "-1"], "--request-rate"),
    ("serving", ["--random-range-ratio", "1.5"], "--random-range-ratio"),
    ("serving", ["--goodput", "ttft:-500"], "ttft:-500"),  # goodput 0, as if no request met it
    ("serving", ["--goodput", "tpot:nan"], "tpot:nan"),
    ("client", ["--num-concurrent", "0"], "--num-concurrent"),  # hung
    ("client", ["--num-concurrent", "-1"], "--num-concurrent"),
    ("client", ["--read-timeout", "0"], "--read-timeout"),
    ("client", ["--url", "http://127.0.0.1:99999"], "--url"),  # OverflowError traceback from the socket
    ("client", ["--url", "http://[::1"], "--url"),  # httpx.InvalidURL traceback
    ("serving", ["--url", "localhost:8000"], "--url"),  # "missing an 'http://' protocol (is the server up?)"
])
def test_bad_numbers_are_usage_errors_before_any_request(module, flags, named, capsys):
    cli = serving if module == "serving" else client
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--url", "http://127.0.0.1:9", *flags])  # nothing listens there: no request may be sent first
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_the_json_report_keeps_no_api_key(fake_server, tmp_path):
    """Its config held the bearer key from --api-key or $OPENAI_API_KEY, in a file made to be shared."""
    url, _ = fake_server
    out = tmp_path / "out.json"
    serving.main(["--url", url, "--num-prompts", "1", "--warmup", "0", "--random-input-len", "4",
                  "--random-output-len", "2", "--api-key", "sk-secret", "--json", str(out)])
    assert "sk-secret" not in out.read_text()


@pytest.mark.parametrize("module, flag", [("serving", "--json"), ("serving", "--chart"), ("client", "--json")])
def test_an_output_file_in_a_missing_folder_is_a_usage_error_before_any_request(module, flag, tmp_path, capsys):
    """The whole run went first, then a FileNotFoundError traceback, and its figures were lost with it."""
    cli = serving if module == "serving" else client
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--url", "http://127.0.0.1:9", flag, str(tmp_path / "missing" / "out")])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_an_answer_of_one_token_without_text_is_no_failure(endpoint):
    """A model that ends its answer at once (EOS first: no text, finish_reason stop, 1 token in usage) counted as
    a failed request ("the stream ended without any text"), and bench.client exited 1; vLLM's benchmark counts
    it as a success with its TTFT at that chunk."""
    if endpoint == "chat":
        choices = [[{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                   [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]]
    else:
        choices = [[{"index": 0, "text": "", "finish_reason": "stop"}]]
    usage = {"prompt_tokens": 3, "completion_tokens": 1}
    events = [{"choices": c} for c in choices] + [{"choices": [], "usage": usage}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    answer = httpx.MockTransport(lambda request: httpx.Response(200, text=body))

    async def one():
        async with httpx.AsyncClient(transport=answer) as http:
            return await client.stream_request(http, "http://server", endpoint, {})

    result = asyncio.run(one())
    assert result.ok, result.error
    assert (result.output_tokens, result.text, len(result.chunk_times)) == (1, "", 1)
    assert 0 <= result.ttft <= result.e2el and result.tpot is None


def streamed(body: str, endpoint: str = "chat"):
    """stream_request's result for a 200 answer of `body`."""
    answer = httpx.MockTransport(lambda request: httpx.Response(200, text=body))

    async def one():
        async with httpx.AsyncClient(transport=answer) as http:
            return await client.stream_request(http, "http://server", endpoint, {})

    return asyncio.run(one())


TEXT_CHUNK = 'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'


@pytest.mark.parametrize("bad", ["[1, 2]", '{"choices": ["x"]}', '{"choices": [], "usage": 5}',
                                 '{"choices": [{"index": 0, "delta": "hi"}]}'])
def test_a_malformed_chunk_fails_its_request_only(bad):
    """A chunk of valid JSON in another shape raised AttributeError out of stream_request ("never raises"), and
    asyncio.gather lost every other answer of bench.client's batch with a traceback."""
    result = streamed(f"{TEXT_CHUNK}data: {bad}\n\ndata: [DONE]\n\n")
    assert not result.ok and "malformed chunk" in result.error


def test_a_stream_cut_before_done_is_a_failed_request():
    """A stream that ended cleanly but early (no finish_reason, no [DONE]: a proxy or server that gave up) counted as
    a complete answer, its few tokens in the mean tokens/s; the ingress always ends with [DONE], even after an error."""
    result = streamed(TEXT_CHUNK * 2)
    assert not result.ok and "[DONE]" in result.error and result.text == "hihi"
    assert streamed(TEXT_CHUNK * 2 + "data: [DONE]\n\n").ok


@pytest.mark.parametrize("models", [{"data": "m"}, {"data": [None]}, ["m"]])
def test_a_malformed_model_list_is_a_clear_exit(models):
    """A /v1/models answer of another shape raised TypeError out of first_model: a traceback, not the exit saying
    what failed."""
    answer = httpx.MockTransport(lambda request: httpx.Response(200, json=models))

    async def list_models():
        async with httpx.AsyncClient(transport=answer) as http:
            await client.first_model(http, "http://server:8000")

    with pytest.raises(SystemExit, match="cannot list the models"):
        asyncio.run(list_models())


def test_an_error_event_fails_its_request_though_the_stream_ends_with_done():
    """The ingress ends a stream with [DONE] even after an error event: the answer is cut short, not complete."""
    error = 'data: {"error": {"message": "mesh lost", "type": "server_error"}}\n\n'
    result = streamed(TEXT_CHUNK + error + "data: [DONE]\n\n")
    assert not result.ok and "mesh lost" in result.error and result.text == "hi"


def test_a_refusal_or_an_empty_answer_is_a_failed_request_that_says_why():
    refused = httpx.MockTransport(lambda request: httpx.Response(429, json={"error": {"message": "queue full"}}))

    async def one():
        async with httpx.AsyncClient(transport=refused) as http:
            return await client.stream_request(http, "http://server", "chat", {})

    result = asyncio.run(one())
    assert not result.ok and result.error.startswith("HTTP 429") and "queue full" in result.error
    empty = streamed("data: [DONE]\n\n")
    assert not empty.ok and "without any text" in empty.error


def test_the_clients_summary_is_over_the_answers_that_came_back(fake_server, tmp_path, capsys):
    """A failed request's TTFT, rate and tokens stay out of the means and totals the client prints."""
    url, state = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "fine"}, {"prompt": "stall"}, {"prompt": "also fine"}]))
    out = tmp_path / "client.json"
    summary = client.main(["--num-concurrent", "3", "--prompt-json-path", str(prompts), "--url", url,
                           "--max-tokens", "6", "--read-timeout", "0.5", "--json", str(out)])
    answers = [a for a in json.loads(out.read_text())["requests"] if a["ok"]]
    assert (summary["failed"], len(answers), summary["output_tokens"]) == (1, 2, 2 * EOS_AFTER)
    assert summary["mean_ttft_ms"] == pytest.approx(sum(a["ttft_ms"] for a in answers) / 2)
    assert summary["mean_decode_tokens_per_s_per_user"] == pytest.approx(
        sum(a["decode_tokens_per_s"] for a in answers) / 2)
    capsys.readouterr()


def test_the_client_asks_for_the_demos_run_by_default(fake_server, tmp_path):
    """Greedy, 128 tokens, usage in the stream; --ignore-eos holds every answer to its length, as the demo does."""
    url, state = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "q"}]))
    client.main(["--num-concurrent", "1", "--prompt-json-path", str(prompts), "--url", url])
    body = state.bodies[-1]
    assert (body["max_tokens"], body["temperature"], body["stream_options"]) == (128, 0.0, {"include_usage": True})
    assert "ignore_eos" not in body
    client.main(["--num-concurrent", "1", "--prompt-json-path", str(prompts), "--url", url, "--ignore-eos",
                 "--max-tokens", "2"])
    assert state.bodies[-1]["ignore_eos"] is True


def test_random_lengths_spread_both_ways_by_the_range_ratio():
    """vLLM's random dataset: lengths uniform in [len * (1 - ratio), len * (1 + ratio)], not only upwards."""
    requests = serving.random_requests(200, 100, 20, 0.5, "tokens", seed=3)
    prompt_lens = [len(r.prompt) for r in requests]
    assert min(prompt_lens) < 100 < max(prompt_lens) and 50 <= min(prompt_lens) and max(prompt_lens) <= 150
    assert all(r.prompt_tokens == len(r.prompt) for r in requests)
    assert min(r.max_tokens for r in requests) < 20 < max(r.max_tokens for r in requests)


def test_the_client_keeps_at_most_num_concurrent_requests_in_flight(fake_server, tmp_path):
    url, state = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": f"question {i}"} for i in range(6)]))
    state.max_in_flight = 0
    summary = client.main(["--num-concurrent", "2", "--prompt-json-path", str(prompts), "--url", url,
                           "--max-tokens", "8"])
    assert summary["requests"] == 6 and summary["failed"] == 0 and state.max_in_flight <= 2


def test_serving_options_reach_the_requests_and_the_report(fake_server, tmp_path, capsys):
    """File prompts: 128 tokens by default, warm-up requests sent first from the file; --no-ignore-eos drops
    ignore_eos from random prompts; per-request TTFTs in the JSON are the milliseconds the summary averages."""
    url, state = fake_server
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}]))
    sent = len(state.bodies)
    report = serving.main(["--url", url, "--prompt-json-path", str(prompts), "--warmup", "1", "--json", "-"])
    assert [b["max_tokens"] for b in state.bodies[sent:]] == [128] * 3 and report["completed"] == 2
    assert report["ttft_ms"]["mean"] == pytest.approx(sum(r["ttft_ms"] for r in report["requests"]) / 2)
    serving.main(["--url", url, "--num-prompts", "1", "--warmup", "0", "--random-input-len", "4",
                  "--random-output-len", "2", "--no-ignore-eos"])
    assert "ignore_eos" not in state.bodies[-1]
    capsys.readouterr()
    serving.main(["--url", url, "--model", "broken", "--num-prompts", "2", "--warmup", "0"])
    assert ["Failed", "requests", "2"] in [line.split() for line in capsys.readouterr().out.splitlines()]
