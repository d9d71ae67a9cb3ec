"""A client's grammar compiled first in a child process, which is killed past a wall-clock budget.

llguidance's compiler has no fuel limit and a thread inside it cannot be stopped. Its cost lies in building
the grammar, before any tokenizer is involved: a JSON schema of N `patternProperties` compiles in roughly
cubic time (llguidance 1.9.1 on this box: 200 take 0.4 s, 300 take 1.8 s, 400 (15 KB) 5.5 s, 500 14 s; the
~2,000 that fit MAX_GRAMMAR_BYTES would take some ten minutes), and its GBNF-to-Lark conversion in quadratic
time (a 6,500-rule chain, 64 KB, takes 2 s). Each such request held one of the ingress's grammar threads
until it ended. So the ingress compiles (LLMatcher.validate_grammar, no tokenizer) and converts in a child,
and kills it past MAX_COMPILE_WALL_S; a crash inside llguidance kills only the child too. The tokenizer's part
(the first mask) is bounded by llguidance's lexer fuel, and checked in-process after.

Run as `python -m model.grammar_check WALL_S STACK_BYTES`: the child. It writes "ready" once it has imported
llguidance, then answers one request per line on stdin, {"op": "validate" | "gbnf", "text": str}, with one line
on stdout: {"error": str | null, "cpu_s": float, "grammar": the Lark text of a "gbnf" request, or null}.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue

import llguidance

# Ten times MAX_COMPILE_CPU_S (model/grammar.py): a grammar that uses its CPU budget on a busy 2-core box
# still gets its verdict; one that would take longer is refused at this, not at its end.
MAX_COMPILE_WALL_S = 1.0
STARTUP_S = 30.0  # a child importing llguidance on a loaded host
_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class Verdict:
    error: str | None  # why llguidance refuses the text, or None
    cpu_s: float | None  # the child's CPU for it; None: no answer (killed past wall_s, or it died: `crashed`)
    crashed: bool = False
    grammar: str | None = None  # a conversion's result


class GrammarChecker:
    """One child process. Not thread-safe: take one with `checker()`, give it back with `release()`."""

    def __init__(self, wall_s: float = MAX_COMPILE_WALL_S, stack_bytes: int | None = None):
        from model.grammar import GRAMMAR_STACK_BYTES
        self.wall_s = wall_s
        self.stack_bytes = stack_bytes or GRAMMAR_STACK_BYTES
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """A fresh child, ready to compile (~0.15 s); one that is running is killed first. Raises RuntimeError
        when it cannot start (llguidance does not import)."""
        self.stop()
        # the child's own limit, past the parent's: it ends by itself if its parent died during a compile
        args = [sys.executable, "-m", "model.grammar_check", str(self.wall_s * 2), str(self.stack_bytes)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=_ROOT)  # -m finds this package there, whatever the parent's directory
        try:
            ready = self._read_line(time.monotonic() + STARTUP_S)
        except EOFError:
            ready = None
        if ready != b"ready\n":  # its import is not the request's time
            self.stop()
            raise RuntimeError("the grammar checker (python -m model.grammar_check) did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def check(self, grammar: str) -> Verdict:
        """llguidance's verdict on llguidance grammar text (its JSON, or Lark)."""
        return self._ask("validate", grammar)

    def convert_gbnf(self, text: str) -> Verdict:
        """llama.cpp's GBNF as llguidance's grammar text (`grammar`), or why not."""
        return self._ask("gbnf", text)

    def _ask(self, op: str, text: str) -> Verdict:
        """The child's answer; past wall_s, or when the child dies, none (and a fresh child)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps({"op": op, "text": text}).encode() + b"\n")
            self.proc.stdin.flush()
            reply = self._read_line(time.monotonic() + self.wall_s)
        except (OSError, EOFError):
            self.start()
            return Verdict("llguidance's compiler crashed on this constraint", None, crashed=True)
        if reply is None:
            self.start()
            return Verdict(None, None)
        return Verdict(**json.loads(reply))

    def _read_line(self, deadline: float) -> bytes | None:
        """The child's next line, or None at `deadline`. Raises EOFError when the child has gone."""
        fd, data = self.proc.stdout.fileno(), b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("the grammar checker exited")
            data += chunk
        return data


_idle: SimpleQueue[GrammarChecker] = SimpleQueue()


def checker() -> GrammarChecker:
    """An idle checker, or a new one: there are as many as callers at once (the ingress's grammar threads)."""
    try:
        return _idle.get_nowait()
    except Empty:
        return GrammarChecker()


def release(checker_: GrammarChecker) -> None:
    _idle.put(checker_)


def start(n: int) -> None:
    """Start `n` checkers now (a replica starting), not at its first constrained requests."""
    for c in [checker() for _ in range(n)]:
        release(c)


# llguidance's StopReason names (its Rust enum of that name), which a matcher gives as its error's first line
_STOPS = {"NoExtension": "the constraint admits no text", "NoExtensionBias": "the constraint admits no text",
          "LexerTooComplex": "the constraint is too complex for the grammar engine",
          "ParserTooComplex": "the constraint is too complex for the grammar engine"}


def engine_error(message: str) -> str:
    """llguidance's message for a client: a stop reason's bare name (NoExtensionBias, for the schema
    {"$ref": "#"}, which refers only to itself) said in words; its state dump after the first line dropped."""
    first = message.split("\n", 1)[0].strip()
    if first.isidentifier():
        return f"{_STOPS.get(first, 'the grammar engine cannot use the constraint')} (llguidance: {first})"
    if message.startswith(_ONE_OF):  # its hint names a compile option of llguidance's, which no request can set
        return ("oneOf whose branches may overlap cannot be enforced (one whose branches differ in a const or type "
                "can, as can anyOf)")
    return message


_ONE_OF = "oneOf constraints are not supported."


def _answer(op: str, text: str) -> dict:
    start_cpu = time.thread_time()
    grammar = error = None
    try:
        if op == "gbnf":
            grammar = llguidance.grammar_from("grammar", text)
        else:
            error = llguidance.LLMatcher.validate_grammar(text) or None
    except Exception as exc:  # malformed grammar JSON or GBNF
        error = str(exc)
    return {"error": error and engine_error(error), "cpu_s": time.thread_time() - start_cpu, "grammar": grammar}


def _serve(wall_s: float, stack_bytes: int) -> None:
    """The child: compile each request on a thread with a deep stack (model/grammar.py, GRAMMAR_STACK_BYTES);
    exit at end of input, or when one compile outlasts `wall_s` (its parent gave up on it, or died)."""
    threading.stack_size(stack_bytes)
    requests: SimpleQueue[dict] = SimpleQueue()
    answers: SimpleQueue[dict] = SimpleQueue()

    def compile_each() -> None:
        while True:
            request = requests.get()
            answers.put(_answer(request["op"], request["text"]))

    threading.Thread(target=compile_each, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin.buffer:
        requests.put(json.loads(line))
        try:
            answer = answers.get(timeout=wall_s)
        except Empty:
            os._exit(3)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(float(sys.argv[1]), int(sys.argv[2]))
