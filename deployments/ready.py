"""Says once that the served endpoint is up: `make serve` runs it beside `serve run`, whose own last line
("Submitted deploy config successfully") comes a minute before the model answers, and which prints nothing then.

    python -m deployments.ready URL PID

Polls URL (the app's /health) every POLL_S until it answers 200, then prints one line and exits; exits quietly
when process PID (the server it announces) is gone, or after WAIT_S.
"""
from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request

POLL_S = 1.0
WAIT_S = 3600.0  # a Galaxy's first start loads 70B weights and compiles: tens of minutes


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, http.client.HTTPException):  # refused, 503, a timeout, garbled: not yet
        return False


def wait_ready(url: str, pid: int, poll_s: float = POLL_S, wait_s: float = WAIT_S) -> bool:
    """True once `url` answers 200 while `pid` lives; False when `pid` ended or `wait_s` passed first."""
    deadline = time.monotonic() + wait_s
    while alive(pid) and time.monotonic() < deadline:
        if healthy(url):
            return True
        time.sleep(poll_s)
    return False


USAGE = "usage: python -m deployments.ready URL PID  (URL: the app's /health; PID: the server it announces)"


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    # a PID: ASCII digits (isdigit() takes "²", which int() refuses), not 0 (os.kill's own process group, alive while
    # the server is not) and within a C int (os.kill's OverflowError); was an IndexError or ValueError traceback
    if len(argv) != 2 or not re.fullmatch(r"[1-9][0-9]{0,8}", argv[1]):
        print(USAGE, file=sys.stderr)
        return 2
    url, pid = argv[0], int(argv[1])
    if wait_ready(url, pid):
        base = url.rsplit("/health", 1)[0]
        print(f"meshserve: ready: {base}/v1 answers (GET {url} is 200)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
