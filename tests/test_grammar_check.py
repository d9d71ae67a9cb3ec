"""A client's grammar is compiled first in a child process, which is killed past its wall-clock budget or dies
alone: no grammar holds an ingress thread for minutes or takes the ingress process down."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.grammar import GRAMMAR_STACK_BYTES, cfg_grammar, json_schema_grammar, regex_grammar
from model.grammar_check import GrammarChecker, Verdict
from tests.ingress_support import gbnf_chain, lark_chain

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
    verdict = checker.check(regex_grammar("[0-9]+"))
    assert verdict.error is None and 0 <= verdict.cpu_s < 0.5
    assert "unclosed group" in checker.check(regex_grammar("a(b")).error


def test_a_compile_past_the_wall_budget_is_cut_and_its_child_replaced(checker):
    before = checker.proc.pid
    assert checker.check(pattern_properties(400)) == Verdict(None, None)  # no verdict: it ran out of time
    assert gone(before) and checker.proc.pid != before
    assert checker.check(regex_grammar("[0-9]+")).error is None  # the new child works


def test_a_crash_in_the_compiler_kills_only_the_child():
    """A chain of 3,000 rules recurses ~10 MB deep in llguidance: on a 1 MB stack the child dies of SIGSEGV."""
    shallow = GrammarChecker(wall_s=5, stack_bytes=2**20)
    try:
        before = shallow.proc.pid
        verdict = shallow.check(cfg_grammar(lark_chain(3000)))
        assert verdict.crashed and "crashed" in verdict.error and verdict.cpu_s is None
        assert gone(before) and shallow.check(regex_grammar("x+")).error is None
    finally:
        shallow.stop()
    deep = GrammarChecker(wall_s=5)  # the default stack holds it
    try:
        assert deep.check(cfg_grammar(lark_chain(3000))).error is None
    finally:
        deep.stop()


def test_the_child_ends_by_itself_when_one_compile_outlasts_twice_the_budget():
    """Its parent gave up on it or died mid-compile: the child does not compile on for minutes."""
    child = subprocess.Popen([sys.executable, "-m", "model.grammar_check", "0.5", str(GRAMMAR_STACK_BYTES)],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT)
    child.stdin.write(json.dumps({"op": "validate", "text": pattern_properties(400)}).encode() + b"\n")
    child.stdin.flush()
    try:
        assert child.wait(timeout=15) == 3
    finally:
        child.kill()
        child.wait()


def test_a_gbnf_conversion_is_cut_at_the_budget_too(checker):
    verdict = checker.convert_gbnf(gbnf_chain(6500))
    assert verdict == Verdict(None, None)
    converted = checker.convert_gbnf('root ::= "a" | "b"')
    assert converted.error is None and 'start: "a"' in converted.grammar


def test_a_verdict_that_depends_on_the_moment_is_not_kept(monkeypatch):
    """A compile cut at the wall-clock budget (a loaded host) or a child that died (llguidance crashed, or
    something killed it) says nothing lasting about the grammar: the next request compiles it again."""
    import model.grammar as grammar
    from model.embedded import ensure_smollm2
    from model.tokenizer import load_tokenizer
    tok = load_tokenizer(ensure_smollm2())
    llt = grammar.ll_tokenizer(tok, tok.vocab_size)
    real_check = GrammarChecker.check
    answers = [Verdict(None, None), Verdict("crashed", None, crashed=True), Verdict("crashed", None, crashed=True)]
    monkeypatch.setattr(GrammarChecker, "check", lambda self, g: answers.pop(0) if answers else real_check(self, g))
    text = regex_grammar("[a-f]{3}-moment")
    assert "more than" in grammar.grammar_error(text, llt)
    assert grammar.grammar_error(text, llt) == "crashed"  # died, and died again on a fresh child
    assert grammar.grammar_error(text, llt) is None and answers == []
    answers.append(Verdict(None, None))
    assert grammar.grammar_error(text, llt) is None  # a lasting verdict is kept: not compiled again


def test_a_refusal_near_the_cpu_budget_is_kept_only_a_while(monkeypatch):
    """A compile's CPU time swings with the host's load: a 3,000-rule chain took 20-40 ms quiet and 103 ms loaded,
    against the 100 ms budget. A refusal within LASTING_REFUSAL_FACTOR of the budget was kept like any other, so a
    grammar refused once in a busy moment stayed refused for as long as it was among the last 256. It is kept
    NEAR_REFUSAL_KEPT_S now (a client resending it at once makes no checker compile it again), then compiled again;
    one far past the budget stays refused without being compiled again."""
    import model.grammar as grammar
    from model.embedded import ensure_smollm2
    from model.tokenizer import load_tokenizer
    tok = load_tokenizer(ensure_smollm2())
    llt = grammar.ll_tokenizer(tok, tok.vocab_size)
    real_check = GrammarChecker.check
    budget = grammar.MAX_COMPILE_CPU_S
    clock = [1000.0]
    monkeypatch.setattr(grammar.time, "monotonic", lambda: clock[0])
    answers = [Verdict(None, 1.5 * budget)]
    monkeypatch.setattr(GrammarChecker, "check", lambda self, g: answers.pop(0) if answers else real_check(self, g))
    near, far = regex_grammar("[a-f]{3}-near"), regex_grammar("[a-f]{3}-far")
    assert "150 ms of CPU" in grammar.grammar_error(near, llt)
    clock[0] += grammar.NEAR_REFUSAL_KEPT_S / 2
    assert "150 ms of CPU" in grammar.grammar_error(near, llt)  # kept: not compiled again
    clock[0] += grammar.NEAR_REFUSAL_KEPT_S
    assert grammar.grammar_error(near, llt) is None  # compiled again, within its budget this time
    answers.append(Verdict(None, 1.1 * grammar.LASTING_REFUSAL_FACTOR * budget))
    assert "of CPU" in grammar.grammar_error(far, llt)
    clock[0] += 100 * grammar.NEAR_REFUSAL_KEPT_S
    assert "of CPU" in grammar.grammar_error(far, llt) and answers == []  # kept: not compiled again


def test_a_grammar_whose_matcher_costs_past_the_cpu_budget_is_refused(monkeypatch):
    """The child compiles without the model's tokenizer: the matcher a mesh builds with it, and its first mask, are
    timed here too, and refused past MAX_COMPILE_CPU_S (a mesh would spend that on its worker thread, every slot
    waiting), however cheap the child's part was."""
    import time

    import model.grammar as grammar
    from model.embedded import ensure_smollm2
    from model.tokenizer import load_tokenizer
    tok = load_tokenizer(ensure_smollm2())
    llt = grammar.ll_tokenizer(tok, tok.vocab_size)
    real_compiled = grammar.compiled

    def costly(tokenizer, text):
        matcher = real_compiled(tokenizer, text)
        end = time.thread_time() + 1.5 * grammar.MAX_COMPILE_CPU_S
        while time.thread_time() < end:  # as a lexer built for a large vocabulary would
            pass
        return matcher
    monkeypatch.setattr(grammar, "compiled", costly)
    assert "ms of CPU to compile" in grammar.grammar_error(regex_grammar("[a-f]{3}-matcher"), llt)


def test_a_child_killed_from_outside_is_replaced_and_the_grammar_compiled_again():
    import model.grammar as grammar
    calls = []

    def ask(checker):
        calls.append(checker.proc.pid)
        if len(calls) == 1:
            checker.proc.kill()  # as if llguidance had crashed in it (found dead at the write, or at the read)
        return checker.check(regex_grammar("[0-9]{2}-killed"))
    verdict = grammar._in_child(ask)
    assert verdict.error is None and verdict.cpu_s is not None and gone(calls[0])


def test_kept_verdicts_hold_no_grammar_text():
    """A refused grammar's verdict is kept too, and a source within the 64 KB limit can make a grammar six times
    larger (control characters, escaped): 256 kept texts held ~100 MB. Kept by digest, each holds 32 bytes."""
    import model.grammar as grammar
    tokenizer = object()  # the size check comes first: nothing is compiled
    texts = [json_schema_grammar({"description": chr(1 + i) * 64_000}) for i in range(4)]
    assert all(len(t) > 6 * 60_000 for t in texts)
    for text in texts:
        assert "at most" in grammar.grammar_error(text, tokenizer)
    held = [key for key in grammar._VERDICTS if key[1] is tokenizer]
    assert len(held) == 4 and sum(len(digest) for digest, _ in held) == 4 * 32
