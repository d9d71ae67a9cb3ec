"""bench.shared_prefix's --json output (no server)."""
import json

from bench import shared_prefix


def test_json_is_all_that_goes_to_stdout(monkeypatch, capsys):
    """Ray's log lines (its raylet's "(raylet) Task ServeController.graceful_shutdown failed ..." on every app
    shutdown) went to stdout ahead of the JSON, so `--json | jq` could not parse it."""
    def run(config, batch, max_tokens, together):
        print("(raylet) Task ServeController.graceful_shutdown failed.")  # as Ray's log monitor prints
        return ["same text"] * len(batch), {"prefix_hit_tokens": 0.0}

    monkeypatch.setattr(shared_prefix, "run", run)
    shared_prefix.main(["--requests", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["texts_identical"] == 2


def test_the_prompts_share_the_prefix_alone_and_texts_are_compared_pairwise(monkeypatch, capsys):
    """Identical prompts would agree whatever the KV groups did; a run compared with itself would too."""
    prompts = shared_prefix.prompts(3, 64)
    assert all(p[:64] == prompts[0][:64] for p in prompts) and len({tuple(p[64:]) for p in prompts}) == 3
    runs = []

    def run(config, batch, max_tokens, together):
        runs.append(together)
        texts = [f"text {i}" for i in range(len(batch))]
        return (texts[:1] + ["another"] * (len(batch) - 1) if together else texts), {"prefix_hit_tokens": 0.0}

    monkeypatch.setattr(shared_prefix, "run", run)
    assert shared_prefix.main(["--requests", "3", "--json"])["texts_identical"] == 1 and runs == [False, True]
    capsys.readouterr()


def test_completions_are_greedy_and_run_to_max_tokens():
    """Sampled or EOS-cut texts could differ between the two runs with the KV right."""
    import asyncio

    import httpx

    bodies = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "t"}]})

    async def one() -> str:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            return await shared_prefix.complete(http, "http://server", [1, 2], 5)

    assert asyncio.run(one()) == "t"
    assert (bodies[0]["temperature"], bodies[0]["ignore_eos"], bodies[0]["max_tokens"]) == (0, True, 5)
