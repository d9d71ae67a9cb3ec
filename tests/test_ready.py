"""deployments.ready: what `make serve` says at once (where it answers, a request to send), its one line once
the endpoint answers, and its quiet end with the server."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from deployments.ready import endpoint, main, serve_failure, wait_ready


class _Health(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []

    def do_GET(self):
        self.send_response(self.answers.pop(0) if self.answers else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(answers: list[int]) -> tuple[http.server.HTTPServer, str]:
    _Health.answers = answers
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/health"


def _config(tmp_path, port: int, args: str = "model: smollm2", more: str = "") -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(f"http_options:\n  host: 127.0.0.1\n  port: {port}\napplications:\n  - name: other\n"
                    f"    import_path: other.app:build\n  - name: meshserve\n{more}"
                    f"    import_path: deployments.app:build\n    args:\n      {args}\n")
    return str(path)


def test_it_says_where_it_answers_then_ready_once_health_is_200_and_not_before(tmp_path, capsys):
    server, url = _serve([503, 503, 503])
    try:
        assert main([_config(tmp_path, server.server_port), str(os.getpid())]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == f"meshserve: ready: http://127.0.0.1:{server.server_port}/v1 answers (GET {url} is 200)"
        assert f"curl http://127.0.0.1:{server.server_port}/v1/chat/completions" in out[1]
        assert _Health.answers == []  # it asked through the three 503s
    finally:
        server.shutdown()


def test_the_example_request_names_the_configs_model_port_prefix_and_key(tmp_path, monkeypatch):
    """`make serve` printed a fixed curl (SmolLM2 on port 8000): with another model or port in serve_config.yaml,
    a client that copied it got a 404 naming the served model, or no answer."""
    import json
    import shlex

    from deployments.ready import announce

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    folder = tmp_path / "models--meta-llama--Llama-3.3-70B-Instruct" / "snapshots" / ("0" * 40)
    path = _config(tmp_path, 8080, f"model: {folder}", more="    route_prefix: /llm/\n")
    base, model, key = endpoint(path)
    assert (base, model, key) == ("http://127.0.0.1:8080/llm", "Llama-3.3-70B-Instruct", "")
    words = shlex.split(announce(base, model, key).split("\n", 1)[1].replace("\\\n", " "))
    assert words[1] == "http://127.0.0.1:8080/llm/v1/chat/completions" and "Authorization" not in " ".join(words)
    assert json.loads(words[words.index("-d") + 1])["model"] == "Llama-3.3-70B-Instruct"
    monkeypatch.setenv("VLLM_API_KEY", "sk-1")
    assert endpoint(path)[2] == "$VLLM_API_KEY"
    assert endpoint(_config(tmp_path, 8080, "api_keys: [sk-2]"))[2] == "<a key of args.api_keys>"
    assert "Bearer $VLLM_API_KEY" in announce(base, model, "$VLLM_API_KEY")
    assert endpoint(_config(tmp_path, 8000, "model: smollm2"))[:2] == ("http://127.0.0.1:8000", "SmolLM2-135M-Instruct")


def test_it_ends_quietly_with_the_server_it_announces():
    """A server that dies while starting leaves no poller behind (nor, with no endpoint at all, one that waits)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not wait_ready("http://127.0.0.1:9/health", gone.pid, poll_s=0.01, wait_s=30)
    server, url = _serve([503] * 10_000)
    try:
        assert not wait_ready(url, os.getpid(), poll_s=0.01, wait_s=0.2)  # never 200: it gives up at wait_s
    finally:
        server.shutdown()


def test_a_garbled_answer_is_not_yet_ready():
    """A proxy that is starting may close or garble an answer (no HTTP status line): that is "not yet", as a refused
    connection is, not a traceback in `make serve`'s output and no line at all."""
    import socketserver

    answers = [b"garbage\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"]

    class Raw(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(answers.pop(0) if len(answers) > 1 else answers[0])

    server = socketserver.TCPServer(("127.0.0.1", 0), Raw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert wait_ready(f"http://127.0.0.1:{server.server_address[1]}/health", os.getpid(), poll_s=0.01, wait_s=30)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("argv", [[], ["serve_config.yaml"], ["serve_config.yaml", "x"],
                                  # isdigit() takes "²" (int() does not); os.kill no PID past a C int; PID 0 is
                                  # this process's group, alive while the server is not: each a wait or a traceback
                                  ["serve_config.yaml", "\u00b2"], ["serve_config.yaml", "9" * 30],
                                  ["serve_config.yaml", "0"], ["no-such.yaml", "1"], ["README.md", "1"]])
def test_wrong_arguments_give_the_usage_not_a_traceback(argv, capsys, monkeypatch):
    monkeypatch.setattr("deployments.ready.wait_ready", lambda url, pid, **_: False)  # PID 0 waited an hour
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("usage: python -m deployments.ready SERVE_CONFIG PID")
    assert main(["--help"]) == 0 and "SERVE_CONFIG PID" in capsys.readouterr().out


def test_the_example_request_names_the_model_and_key_the_apps_env_vars_give(tmp_path, monkeypatch):
    """Serve builds the app with its runtime_env.env_vars: `model: ""` with HF_MODEL there serves that folder's name,
    and a VLLM_API_KEY there is the key. The example named the model "" and sent no key (401), reading only the
    shell's environment."""
    for name in ("HF_MODEL", "LLAMA_DIR", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    env = "    runtime_env:\n      env_vars: {HF_MODEL: /models/Llama-3.3-70B-Instruct, VLLM_API_KEY: sk-1}\n"
    _, model, key = endpoint(_config(tmp_path, 8000, 'model: ""', more=env))
    assert model == "Llama-3.3-70B-Instruct" and key and "sk-1" not in key
    monkeypatch.setenv("HF_MODEL", "/elsewhere/Other")  # the app's env_vars win, as in the build
    assert endpoint(_config(tmp_path, 8000, 'model: ""', more=env))[1] == "Llama-3.3-70B-Instruct"


def test_a_config_without_meshserves_app_is_said_so(tmp_path, capsys):
    """The config check passes a config whose apps are all others' (noting each as not checked): the announcement
    then said the usage and the file's name followed by nothing (StopIteration's empty message)."""
    path = tmp_path / "serve.yaml"
    path.write_text("applications:\n  - name: other\n    import_path: other.app:build\n")
    assert main([str(path), "1"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(f"{path}: no meshserve application (import_path "
                                                     "deployments.app:build) in it")


_CAUSE = ("ImportError: the TT Galaxy backend needs the ttnn built from the tt-metal checkout it runs: pip install -e "
          "'.[tt]' (meshserve) into that checkout's python_env (Python 3.10 or 3.12) and start Ray from it")


class _Dashboard(http.server.BaseHTTPRequestHandler):
    """/health 503 for good (an application Serve gave up), and Ray's dashboard Serve API behind Ray's token."""
    status, deployed_at = "DEPLOY_FAILED", 0.0  # 0: now, at each answer (a deploy newer than the poller)
    trigger, message = "REPLICA_STARTUP_FAILED", ("The deployment failed to start 3 times in a row. Error:\n"
                                                  "Traceback (most recent call last):\n  File \"model/tt_galaxy.py\", "
                                                  f"line 448\nModuleNotFoundError: No module named 'ttnn'\n\n{_CAUSE}\n")

    def do_GET(self):
        if self.path != "/api/serve/applications/" or self.headers.get("Authorization") != "Bearer tok-1":
            self.send_response(503 if self.path == "/health" else 401)
            self.end_headers()
            return
        failed = {"status": "DEPLOY_FAILED", "status_trigger": self.trigger, "message": self.message}
        apps = {"meshserve": {"status": self.status, "message": "Failed to update the deployments ['mesh-0'].",
                              "last_deployed_time_s": self.deployed_at or time.time(),
                              "deployments": {"mesh-0": failed, "Ingress": {"status": "HEALTHY", "message": ""}}},
                "other": {"status": "DEPLOY_FAILED", "message": "its own", "last_deployed_time_s": time.time()}}
        body = json.dumps({"applications": apps}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_application_serve_gave_up_is_said_so_and_the_server_stopped(tmp_path, capsys, monkeypatch):
    """A mesh that fails to load (tt_galaxy without ttnn, weights missing on its node) passes the config check; Serve
    then marks the application DEPLOY_FAILED after three tries and `serve run` went on for good: /health 503, no line
    from make serve, the cause in a traceback wall in the log. Now the cause is said and the server stopped."""
    _Dashboard.status, _Dashboard.deployed_at = "DEPLOY_FAILED", 0.0
    server = http.server.HTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-1")
    serve_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
    monkeypatch.setattr("deployments.ready.alive", lambda pid: serve_run.poll() is None)  # reaped: no zombie lives on
    try:
        assert main([_config(tmp_path, server.server_port), str(serve_run.pid)]) == 1
        assert serve_run.wait(timeout=10) == -signal.SIGTERM
    finally:
        serve_run.kill()
        server.shutdown()
    err = capsys.readouterr().err
    assert "meshserve: not serving: Serve gave application 'meshserve' up (mesh-0: " + _CAUSE + ")" in err


def test_only_a_failure_of_this_deploy_counts(monkeypatch):
    """A joined Ray may still hold the application's earlier deploy, failed: `serve run` is about to replace it. Nor
    does a deploy under way, a healthy one or another application's failure say anything."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dashboard, now = f"http://127.0.0.1:{server.server_port}", time.time()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-1")
    try:
        _Dashboard.status, _Dashboard.deployed_at = "DEPLOY_FAILED", now - 60
        assert serve_failure("meshserve", now, dashboard) is None
        _Dashboard.deployed_at = 0.0
        assert serve_failure("meshserve", now, dashboard) == f"mesh-0: {_CAUSE}"
        for status in ("DEPLOYING", "RUNNING"):
            _Dashboard.status = status
            assert serve_failure("meshserve", now, dashboard) is None
        assert serve_failure("no-such-app", now, dashboard) is None
        assert serve_failure("meshserve", now, "http://127.0.0.1:9") is None  # no dashboard: nothing known
    finally:
        server.shutdown()


@pytest.mark.skipif(not os.path.isdir("/proc/self") or not shutil.which("make"), reason="needs make and Linux's /proc")
def test_make_serve_leaves_no_zombie_beside_the_server(tmp_path):
    """`make serve` started deployments.ready in the shell that then execs `serve run`, so the announcer was the
    server's child; `serve run` never waits for it, so once it had said ready it stayed a zombie (`[python]
    <defunct>` in ps) for as long as the server ran. Here the recipe runs with a stand-in venv: its python says
    nothing (as the announcer, it ends a moment after the exec), and its serve counts its own zombie children."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than pyproject.toml: the venv is not set up again
    python = venv / "bin" / "python"
    python.write_text('#!/bin/sh\ncase "$*" in *deployments.ready*) sleep 0.3;; esac\n')  # ready outlives the exec
    serve = venv / "bin" / "serve"
    serve.write_text(f"#!{sys.executable}\n" + (
        "import os, time\n"
        "time.sleep(1.0)\n"
        "zombies = 0\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        state, ppid = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[:2]\n"
        "    except OSError:\n"
        "        continue\n"
        "    zombies += state == 'Z' and int(ppid) == os.getpid()\n"
        "print('zombies', zombies)\n"))
    python.chmod(0o755)
    serve.chmod(0o755)
    done = subprocess.run(["make", "-s", "-C", root, "serve", f"VENV={venv}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "zombies 0"


def test_a_token_file_that_is_not_text_is_no_token_not_the_pollers_end(tmp_path, capsys, monkeypatch):
    """A token file it cannot decode (binary, another encoding) raised UnicodeDecodeError out of the poll: the
    announcer died with a traceback, and make serve never said ready. It is no token, as an unreadable file is."""
    token = tmp_path / "auth_token"
    token.write_bytes(b"\xff\xfetok\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:9")
    server, url = _serve([503])
    try:
        assert main([_config(tmp_path, server.server_port), str(os.getpid())]) == 0
    finally:
        server.shutdown()
    assert capsys.readouterr().out.splitlines()[-1].startswith("meshserve: ready: ")


def test_a_replica_that_failed_a_health_check_while_deploying_is_not_given_up(monkeypatch):
    """Serve marks a deployment DEPLOY_FAILED when a replica fails a health check while it is UPDATING (Ray Serve
    2.60's DeploymentStatusInfo.handle_transition), then replaces the replica and turns it HEALTHY once that one
    runs: a start it recovers from. It was taken as given up, and the healthy start was stopped."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dashboard, now = f"http://127.0.0.1:{server.server_port}", time.time()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-1")
    _Dashboard.status, _Dashboard.deployed_at = "DEPLOY_FAILED", 0.0
    monkeypatch.setattr(_Dashboard, "trigger", "HEALTH_CHECK_FAILED")
    monkeypatch.setattr(_Dashboard, "message", "A replica's health check failed. This deployment will be UNHEALTHY "
                                               "until the replica recovers or a new deploy happens.")
    try:
        assert serve_failure("meshserve", now, dashboard) is None
        _Dashboard.trigger = "REPLICA_STARTUP_FAILED"  # its replacement failed to start three times: given up
        assert serve_failure("meshserve", now, dashboard) == "mesh-0: " + _Dashboard.message
    finally:
        server.shutdown()
