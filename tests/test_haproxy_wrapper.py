"""bin/haproxy-nosplice: runs the real HAProxy with splice off, and HAProxy ends with the process that started
it (Serve's HAProxyManager actor), so a killed Serve leaves no HAProxy holding the HTTP port."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

WRAPPER = Path(__file__).resolve().parent.parent / "bin" / "haproxy-nosplice"


@pytest.fixture
def fake_haproxy(tmp_path):
    """Stands in for the binary: records its arguments, then waits."""
    script = tmp_path / "haproxy"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nexec sleep 60\n')
    script.chmod(0o755)
    return script


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv sets the parent-death signal")
def test_haproxy_gets_nosplice_and_dies_with_the_process_that_started_it(fake_haproxy, tmp_path):
    starter = ("import os, subprocess, sys, time\n"
               f"p = subprocess.Popen([{str(WRAPPER)!r}, '-f', 'cfg'])\n"
               "print(p.pid, flush=True)\n"
               "time.sleep(0.5)\n"
               "os._exit(0)  # as a killed actor: no cleanup\n")
    env = {**os.environ, "MESHSERVE_HAPROXY": str(fake_haproxy)}
    out = subprocess.run([sys.executable, "-c", starter], env=env, capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "HAProxy outlived the process that started it"
    assert (tmp_path / "args").read_text().split() == ["-dS", "-f", "cfg"]
