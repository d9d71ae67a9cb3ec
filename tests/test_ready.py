"""deployments.ready: `make serve`'s one line once the endpoint answers, and its quiet end with the server."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from deployments.ready import main, wait_ready


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


def test_it_says_ready_once_health_is_200_and_not_before(capsys):
    server, url = _serve([503, 503, 503])
    try:
        assert main([url, str(os.getpid())]) == 0
        out = capsys.readouterr().out
        assert out == f"meshserve: ready: http://127.0.0.1:{server.server_port}/v1 answers (GET {url} is 200)\n"
        assert _Health.answers == []  # it asked through the three 503s
    finally:
        server.shutdown()


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


@pytest.mark.parametrize("argv", [[], ["http://localhost:8000/health"], ["http://localhost:8000/health", "x"],
                                  # isdigit() takes "²" (int() does not); os.kill no PID past a C int; PID 0 is
                                  # this process's group, alive while the server is not: each a wait or a traceback
                                  ["http://localhost:8000/health", "\u00b2"], ["http://localhost:8000/health", "9" * 30],
                                  ["http://localhost:8000/health", "0"]])
def test_wrong_arguments_give_the_usage_not_a_traceback(argv, capsys, monkeypatch):
    monkeypatch.setattr("deployments.ready.wait_ready", lambda url, pid: False)  # PID 0 waited an hour
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("usage: python -m deployments.ready URL PID")
    assert main(["--help"]) == 0 and "URL PID" in capsys.readouterr().out
