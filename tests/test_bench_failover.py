"""bench.failover's --json output (no server; tests/test_failover_e2e.py runs the failovers themselves)."""
import contextlib
import json

from bench import failover


def test_json_is_all_that_goes_to_stdout(monkeypatch, capsys):
    """Ray's log lines (its raylet's "(raylet) Task ServeController.graceful_shutdown failed ..." on every app
    shutdown, and more when an actor is killed) went to stdout ahead of the JSON: `--json | jq` could not parse it."""
    @contextlib.contextmanager
    def serve_app(config):
        print("(raylet) Task ServeController.graceful_shutdown failed.")  # as Ray's log monitor prints
        yield "http://unused"

    async def run(url, prompts, max_tokens, kill, config=None):
        return [{"finish": "length", "error": None, "text": "same", "chunks": [0.0, 0.1]}] * len(prompts), 0.0

    monkeypatch.setattr(failover, "serve_app", serve_app)
    monkeypatch.setattr(failover, "run", run)
    monkeypatch.setattr(failover, "router_stats", lambda: {"meshes": [{"incarnation": 0}]})
    failover.main(["--streams", "2", "--kill", "router", "--json"])
    assert json.loads(capsys.readouterr().out)["texts_identical"] == 2
