"""Says once that the served endpoint is up: `make serve` runs it beside `serve run`, whose own last line
("Submitted deploy config successfully") comes a minute before the model answers, and which prints nothing then.

    python -m deployments.ready SERVE_CONFIG PID

Says at once where the config's first meshserve application will answer and how to call it (its port, route
prefix and served model name: a fixed example in the Makefile named SmolLM2 and port 8000 whatever the config
said, a 404 for a client that copied it). Then polls its /health every POLL_S until it answers 200, prints one
line and exits; exits quietly when process PID (the server it announces) is gone, or after WAIT_S. When Serve gives
the application up meanwhile (DEPLOY_FAILED, e.g. a replica that failed to start three times in a row),
it says why and stops the server, which `serve run` otherwise kept running, 503 to every request, for good.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

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


class DeployFailed(Exception):
    """Serve gave the application up: its message says why."""


def serve_failure(app: str, since: float, dashboard: str | None = None) -> str | None:
    """Why Serve gave application `app` up (DEPLOY_FAILED) in a deploy at or after `since` (time.time()), from the Ray
    dashboard's Serve API as `serve status` reads it ($RAY_DASHBOARD_ADDRESS, else localhost:8265, with Ray's token
    when there is one); None while it is not failed, for an earlier deploy's failure (the application this `serve
    run` replaces), or when the dashboard does not answer."""
    dashboard = (dashboard or os.environ.get("RAY_DASHBOARD_ADDRESS") or "http://localhost:8265").rstrip("/")
    request = urllib.request.Request(f"{dashboard}/api/serve/applications/")
    if token := ray_token():
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status = json.load(response)["applications"].get(app) or {}
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, KeyError, TypeError,
            AttributeError):  # not up yet, no dashboard, another answer: nothing known
        return None
    if status.get("status") != "DEPLOY_FAILED" or not (status.get("last_deployed_time_s") or 0) >= since:
        return None
    failed = {name: d for name, d in (status.get("deployments") or {}).items() if d.get("status") == "DEPLOY_FAILED"}
    # A replica that fails a health check while its deployment is UPDATING makes it DEPLOY_FAILED too
    # (HEALTH_CHECK_FAILED), but Serve replaces that replica and the deployment turns HEALTHY once it runs: not given up.
    given_up = {name: d for name, d in failed.items() if d.get("status_trigger") != "HEALTH_CHECK_FAILED"}
    if failed and not given_up:
        return None
    # a deployment's message ends in its replica's traceback: its last line is the cause (the constructor's error)
    causes = [f"{name}: {_last_line(d.get('message'))}" for name, d in given_up.items()]
    return "; ".join(causes) or _last_line(status.get("message")) or "DEPLOY_FAILED"


def _last_line(message: object) -> str:
    lines = [line.strip() for line in str(message or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def ray_token() -> str:
    """Ray's auth token as its CLIs find it: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token
    ("": none)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):  # unreadable, or not text: no token (an uncaught one ended the poller)
        return ""


def wait_ready(url: str, pid: int, poll_s: float = POLL_S, wait_s: float = WAIT_S,
               failed: Callable[[], str | None] = lambda: None) -> bool:
    """True once `url` answers 200 while `pid` lives; False when `pid` ended or `wait_s` passed first. Raises
    DeployFailed with what `failed()` says once it says something (Serve gave the application up)."""
    deadline = time.monotonic() + wait_s
    while alive(pid) and time.monotonic() < deadline:
        if healthy(url):
            return True
        if reason := failed():
            raise DeployFailed(reason)
        time.sleep(poll_s)
    return False


USAGE = ("usage: python -m deployments.ready SERVE_CONFIG PID  (SERVE_CONFIG: what `serve run` serves; PID: the "
         "server it announces)")


def endpoint(path: str) -> tuple[str, str, str]:
    """The base URL ("http://localhost:8000", with the route prefix, no trailing slash), the model name a request
    gives and the bearer key to show ("" for none: the config's keys win over $VLLM_API_KEY, as the build reads
    them), for the first meshserve application of Serve config `path`.
    Raises OSError, ValueError (yaml's errors are ValueErrors) or pydantic's ValidationError for a config
    `python -m deployments.config` refuses."""
    from deployments.config import AppConfig, model_root

    doc, app = _meshserve_app(path)
    options = doc.get("http_options") or {}
    host = str(options.get("host") or "localhost")
    host = "localhost" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    config = AppConfig.model_validate(app.get("args") or {})
    # the build sees the app's env_vars over `ray start`'s environment: they may name the model and hold the key
    env_vars = (app.get("runtime_env") or {}).get("env_vars") or {}
    env = {**os.environ, **env_vars}
    if not config.model:
        config = config.model_copy(update={"model": model_root(config.model, env)})
    key = ("<a key of args.api_keys>" if config.api_keys else
           "<the VLLM_API_KEY of runtime_env.env_vars>" if env_vars.get("VLLM_API_KEY") else
           "$VLLM_API_KEY" if env.get("VLLM_API_KEY") else "")
    prefix = str(app.get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{int(options.get('port', 8000))}{prefix}", config.name, key


def _meshserve_app(path: str) -> tuple[dict, dict]:
    """Serve config `path` and its first meshserve application. Raises as `endpoint` says."""
    import yaml

    from deployments.config import IMPORT_PATHS

    with open(path) as f:
        doc = yaml.safe_load(f)
    app = next((a for a in doc["applications"] if a.get("import_path") in IMPORT_PATHS), None)
    if app is None:  # the config check passes one (each app "not checked"); StopIteration said nothing
        raise ValueError("no meshserve application (import_path deployments.app:build) in it")
    return doc, app


def app_name(path: str) -> str:
    """The name Serve gives the first meshserve application of Serve config `path` ("default" when it has none)."""
    return str(_meshserve_app(path)[1].get("name") or "default")


def announce(base: str, model: str, key: str) -> str:
    """What `make serve` says before Serve starts: the endpoint and a request it answers."""
    body = json.dumps({"model": model, "temperature": 0, "messages": [{"role": "user", "content": "Hello!"}]})
    auth = f" -H \"Authorization: Bearer {key}\"" if key else ""
    return (f"meshserve: starting Ray Serve; once {base}/health answers 200, the OpenAI endpoint is {base}/v1, e.g.:\n"
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"    -d {shlex.quote(body)}")


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    # a PID: ASCII digits (isdigit() takes "²", which int() refuses), not 0 (os.kill's own process group, alive while
    # the server is not) and within a C int (os.kill's OverflowError); was an IndexError or ValueError traceback
    if len(argv) != 2 or not re.fullmatch(r"[1-9][0-9]{0,8}", argv[1]):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        base, model, key = endpoint(argv[0])
    except Exception as e:  # the config check before it names what is wrong; Serve will not start either
        print(f"{USAGE}\n{argv[0]}: {e}", file=sys.stderr)
        return 2
    print(announce(base, model, key), flush=True)
    url, pid, since, app = f"{base}/health", int(argv[1]), time.time(), app_name(argv[0])
    try:
        if wait_ready(url, pid, failed=lambda: serve_failure(app, since)):
            print(f"meshserve: ready: {base}/v1 answers (GET {url} is 200)", flush=True)
    except DeployFailed as e:
        # `serve run` waits on a failed application for good, /health 503: a hang with the cause in a traceback wall
        print(f"meshserve: not serving: Serve gave application {app!r} up ({e}); stopping the server (Ray's logs: "
              "/tmp/ray/session_latest/logs/serve)", file=sys.stderr, flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
