"""A client's grammar is compiled first in a child process, which is killed past its wall-clock budget or dies
alone: no grammar holds an ingress thread for minutes or takes the ingress process down."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.grammar import GRAMMAR_STACK_BYTES, cfg_grammar, json_schema_grammar, regex_grammar
from model.grammar_check import GrammarChecker
from tests.ingress_support import lark_chain

ROOT = Path(__file__).resolve().parents[1]


def pattern_properties(n: int) -> str:
    """llguidance 1.9 compiles n patternProperties in roughly cubic time: 400 take 5.5 s on the development box."""
    return json_schema_grammar({"type": "object", "patternProperties": {
        f"^p{i}[a-z]*x{i}$": {"type": "integer"} for i in range(n)}})


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def checker():
    c = GrammarChecker(wall_s=0.5)
    yield c
    c.stop()


def test_a_grammar_is_checked_in_the_child(checker):
    error, cpu_s = checker.check(regex_grammar("[0-9]+"))
    assert error is None and 0 <= cpu_s < 0.5
    error, cpu_s = checker.check(regex_grammar("a(b"))
    assert "unclosed group" in error


def test_a_compile_past_the_wall_budget_is_cut_and_its_child_replaced(checker):
    before = checker.proc.pid
    assert checker.check(pattern_properties(400)) == (None, None)  # no verdict: it ran out of time
    assert gone(before) and checker.proc.pid != before
    assert checker.check(regex_grammar("[0-9]+"))[0] is None  # the new child works


def test_a_crash_in_the_compiler_kills_only_the_child():
    """A chain of 3,000 rules recurses ~10 MB deep in llguidance: on a 1 MB stack the child dies of SIGSEGV."""
    shallow = GrammarChecker(wall_s=5, stack_bytes=2**20)
    try:
        before = shallow.proc.pid
        error, cpu_s = shallow.check(cfg_grammar(lark_chain(3000)))
        assert "crashed" in error and cpu_s is None
        assert gone(before) and shallow.check(regex_grammar("x+"))[0] is None
    finally:
        shallow.stop()
    deep = GrammarChecker(wall_s=5)  # the default stack holds it
    try:
        assert deep.check(cfg_grammar(lark_chain(3000)))[0] is None
    finally:
        deep.stop()


def test_the_child_ends_by_itself_when_one_compile_outlasts_twice_the_budget():
    """Its parent gave up on it or died mid-compile: the child does not compile on for minutes."""
    child = subprocess.Popen([sys.executable, "-m", "model.grammar_check", "0.5", str(GRAMMAR_STACK_BYTES)],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT)
    child.stdin.write(json.dumps(pattern_properties(400)).encode() + b"\n")
    child.stdin.flush()
    try:
        assert child.wait(timeout=15) == 3
    finally:
        child.kill()
        child.wait()
