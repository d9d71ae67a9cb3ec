"""HAProxy reloads whenever its targets change (an ingress replica added, removed or restarted; Serve's controller
restarted), and Ray stops the process it reloaded out `hard-stop-after` later, cutting the streams still open
through it. The Ray that the tests, the benchmarks and `make serve` start lets the longest answer finish first."""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.local_serve import ray_env
from deployments.ingress import Ingress

ROOT = Path(__file__).resolve().parent.parent


def longest_answer_s() -> float:
    """Seconds one user takes to decode a whole 131,072-token context at the published Galaxy decode rates
    (model/galaxy_perf.json), each stretch of context at the slowest rate of its two ends."""
    rows = json.loads((ROOT / "model" / "galaxy_perf.json").read_text())["by_input_length"]
    rate: dict[int, float] = {}
    for row in rows:
        length = row["input_tokens"]
        rate[length] = min(rate.get(length, float("inf")), row["decode_tokens_per_s_per_user"])
    lengths = sorted(rate)
    seconds = lengths[0] / rate[lengths[0]]
    for a, b in zip(lengths, lengths[1:]):
        seconds += (b - a) / min(rate[a], rate[b])
    return seconds


def test_a_reloaded_out_haproxy_outlasts_the_longest_answer():
    code = "from ray.serve._private import constants; print(constants.RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S)"
    read = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ray_env(plain_proxy=False)},
                          capture_output=True, text=True, check=True)
    assert int(read.stdout) >= longest_answer_s()
    make = subprocess.run(["make", "-n", "serve", "MESHSERVE_PLAIN_PROXY=0"], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    (command,) = [line for line in make.stdout.splitlines() if "/serve run " in line]
    (setting,) = [w for w in command.split() if w.startswith("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=")]
    assert int(setting.split("=")[1]) >= longest_answer_s()


def test_an_ingress_replica_scaled_down_or_replaced_serves_the_longest_answer_out():
    """Serve cuts a stopping replica's open requests graceful_shutdown_timeout_s after it begins to stop: 60 s cut
    every stream of more than a minute left on an ingress replica removed by `num_replicas` or a redeploy."""
    assert Ingress._deployment_config.graceful_shutdown_timeout_s >= longest_answer_s()
