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
