"""meshserve runs on Python 3.10 (pyproject's requires-python): ttnn has wheels for 3.10 and 3.12 only, and tt-metal's
own environment on a Galaxy host is 3.10, while the suite may run on 3.11 only, where a 3.11 API passes unseen."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_code_needs_no_python_newer_than_3_10():
    # --exclude long: torch.long (a dtype), read as Python 2's long
    args = ["--target=3.10-", "--violations", "--eval-annotations", "--no-tips", "--exclude", "long",
            "scheduler", "model", "deployments", "bench", "tests"]
    run = subprocess.run([sys.executable, "-c", "from vermin import main; main()", *args],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
