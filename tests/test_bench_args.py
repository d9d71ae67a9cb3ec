"""The benchmarks' CLIs: a number out of range is argparse's usage error naming the flag (exit 2),
before anything starts; it was a pydantic traceback from AppConfig, an IndexError after the run, or a run begun."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("body_stall", ["--repeat", "0"], "--repeat"),  # IndexError after the measurement
    ("chunk_gap", ["--meshes", "0"], "--meshes"),
    ("chunk_gap", ["--time-scale", "0"], "--time-scale"),
    ("cpu", ["--streams", "0"], "--streams"),
    ("cpu", ["--idle-s", "0"], "--idle-s"),
    ("cpu", ["--stream-interval-ms", "5000"], "--stream-interval-ms"),
    ("failover", ["--meshes", "0"], "--meshes"),  # AppConfig's ValidationError
    ("failover", ["--time-scale", "2000"], "--time-scale"),
    ("failover", ["--streams", "0"], "--streams"),
    ("shared_prefix", ["--time-scale", "-1"], "--time-scale"),
    ("shared_prefix", ["--requests", "0"], "--requests"),
    ("single_mesh", ["--time-scale", "0"], "--time-scale"),
    ("single_mesh", ["--decode-steps", "500"], "--decode-steps"),
    ("single_mesh", ["--clients", "0"], "--clients"),
    # past a mesh's 32 slots no moment has every stream decoding: "no steady window ... ask for more output tokens"
    # (a traceback after the whole run, and more output tokens never help)
    ("single_mesh", ["--clients", "33"], "--clients"),
    ("chunk_gap", ["--meshes", "2", "--streams", "65"], "--streams"),
    # past the served max_seq_len (131072) every request is a 400: an HTTPStatusError traceback once Ray had started
    ("cpu", ["--output-tokens", "131000"], "--output-tokens"),
    ("single_mesh", ["--prompt-tokens", "131070"], "--output-tokens"),
    ("chunk_gap", ["--prompt-tokens", "100000", "--output-tokens", "40000"], "--output-tokens"),
    ("scaleout", ["--time-scale-per-mesh", "0"], "--time-scale-per-mesh"),
    ("scaleout", ["--meshes", "8", "--time-scale-per-mesh", "200"], "--time-scale-per-mesh"),  # 8 x 200 > 1000
    ("scaleout", ["--ingress-replicas", "0"], "--ingress-replicas"),
    ("serving", ["--temperature", "nan"], "--temperature"),  # each request's JSON encoding raised ValueError
    ("client", ["--temperature", "inf"], "--temperature"),
]


@pytest.mark.parametrize("name, argv, flag", CASES)
def test_a_number_out_of_range_is_a_usage_error_naming_its_flag(name, argv, flag, monkeypatch, capsys):
    module = importlib.import_module(f"bench.{name}")

    def started(*args, **kwargs):
        raise AssertionError(f"bench.{name} {' '.join(argv)} started a run")
    for attr in ("measure", "serve_app", "run"):  # whatever would start Ray or a Serve app
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, started)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["bench.demo", "model.bench", "model.verify", "scheduler.bench"])
def test_the_help_shows_with_docstrings_stripped(module):
    """python -OO (or PYTHONOPTIMIZE=2) sets every __doc__ to None (Python's command-line docs, -OO): these CLIs cut
    their description out of the module's docstring and raised AttributeError before reading an argument."""
    run = subprocess.run([sys.executable, "-OO", "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage:")
