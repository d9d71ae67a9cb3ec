"""Constrained decoding: a grammar per request, compiled at the ingress, matched per slot on the mesh host.

The engine is llguidance (guidance-ai/llguidance, one of vLLM's structured-output backends). Chosen over
xgrammar because it needs nothing beside itself (xgrammar 0.2 pulls torch and triton), validates a grammar
against a tokenizer without a model, and takes every form the API offers: JSON schema, regex, and Lark or
GBNF (vLLM's `grammar` extra; `choice` becomes a regex). A grammar travels as llguidance's grammar text (its
JSON, or Lark for a context-free grammar) in SamplingParams.grammar, so the router and the mesh see plain
strings; the mesh rebuilds the matcher from it and from the tokens generated so far, so recompute and
migration resume the same constraint.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance
import numpy as np
from llguidance import LLMatcher

from model import grammar_check

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

# A grammar's size and its cost to compile are bounded at the ingress, because a mesh compiles it again on
# its worker thread, where every slot waits. Measured on this box (llguidance 1.9): a 10,000-property object
# schema (259 KB) takes 6 s to compile and its masks 0.4 s; a{1000}{1000} 0.7 s for its first mask; a 200 KB
# literal regex 35 ms for every mask. 64 KB holds ~2,500 properties or 30 sizeable tools; 0.1 s of CPU is
# ~20 times what a 100-property schema costs.
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_COMPILE_CPU_S = 0.1
# A compile's CPU time swings with the host's load (a 3,000-rule chain: 20-40 ms quiet, 103 ms loaded), so a refusal
# within this factor of the budget is kept only NEAR_REFUSAL_KEPT_S: then the grammar is compiled again (and a client
# that resends it at once does not make a grammar checker compile it each time, up to 0.3 s of CPU).
LASTING_REFUSAL_FACTOR = 3.0
NEAR_REFUSAL_KEPT_S = 30.0
MAX_STEP_CPU_S = 0.02  # one slot's mask, or its step past a token; a 22 KB grammar of 40 tools takes < 1 ms
# A slot's masks and steps together, over its last COST_WINDOW tokens (or fewer, from its first token on), take
# at most COST_WINDOW x MAX_MEAN_STEP_CPU_S. Each constrained slot adds its cost to every decode step of the mesh:
# (a{150}){150} costs ~10 ms a token, always under MAX_STEP_CPU_S, and 31 of them made a neighbour's tokens ~100x
# slower for thousands of tokens. Per token, a 40-property JSON schema costs 0.08 ms with SmolLM2's vocabulary and
# 0.13 ms with Llama 3's; a free-text regex such as "[A-Za-z0-9 ,.!?-]{1,4000}" ~2 ms with Llama 3's (this box,
# llguidance 1.9). 5 ms leaves that room; 31 slots at the limit add ~155 ms to each step.
MAX_MEAN_STEP_CPU_S = 0.005
COST_WINDOW = 32
SPARSE_IDS = 8192  # a mask with at most this many ids allowed (or forbidden) is laid on a row by its ids
# llguidance's compiler recurses once per link of a chain (a Lark rule naming the next, a $ref to the next of
# $defs), ~3.5 KB of stack a link: 3,000 links (36 KB of Lark) overflow a thread's default 8 MB stack, which
# kills the whole process with SIGSEGV, past any except. The densest chain MAX_GRAMMAR_BYTES holds needs
# < 40 MB; grammars are compiled only on threads with this much (only the pages touched are committed).
GRAMMAR_STACK_BYTES = 256 * 2**20


def deep_stack_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool of `workers` threads, each with GRAMMAR_STACK_BYTES of stack, started now: every call into
    llguidance that compiles a client's grammar runs on one."""
    started = threading.Barrier(workers + 1)
    previous = threading.stack_size(GRAMMAR_STACK_BYTES)  # process-wide: a thread started meanwhile gets it too
    try:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        for _ in range(workers):  # each blocks until all are started, so the pool starts a thread per submit
            pool.submit(started.wait)
    finally:
        threading.stack_size(previous)
    started.wait()
    return pool


def json_schema_grammar(schema: dict | bool, whitespace: dict | None = None) -> str:
    """The grammar of JSON text valid against `schema` (`True`: any JSON object, OpenAI's json_object).
    `whitespace`: llguidance's JsonCompileOptions for it (`whitespace_flexible`, `whitespace_pattern`)."""
    if schema is True:
        schema = {"type": "object"}
    return LLMatcher.grammar_from_json_schema(schema, overrides=whitespace or None)


def json_sequence_grammar(schema: dict, separator: str) -> str:
    """One or more JSON texts valid against `schema`, `separator` between them (Llama 3's parallel tool calls
    are "; "-separated), as llguidance's Lark with an embedded %json rule."""
    lark = f"start: item ({json.dumps(separator)} item)*\nitem: %json {json.dumps(schema)}"
    return llguidance.grammar_from("lark", lark)


# Perl classes as ECMAScript reads them (ASCII), which is what vLLM's default backend, xgrammar, applies to a
# guided regex (its regex_converter follows JavaScript's syntax); llguidance's Rust regex reads them as
# Unicode classes, so "\d{3}" could come out as fullwidth digits. Inside a class, the ranges alone, or for a
# complement a nested class (Rust's regex syntax has them).
_ASCII_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_"}


def ascii_perl_classes(pattern: str) -> str:
    """`pattern` with \\d, \\w, \\D and \\W ASCII-only, in or out of brackets; escapes stay as they are."""
    out, depth, i = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            i += 2
            if e.lower() in _ASCII_CLASSES:
                ranges = _ASCII_CLASSES[e.lower()]
                out.append(ranges if depth and e.islower() else f"[{'^' if e.isupper() else ''}{ranges}]")
                if depth and pattern.startswith("-", i) and not pattern.startswith("-]", i):
                    out.append("\\-")  # a dash after a class is literal ("[\\w-.]"), not a range from its last end
                    i += 1
            else:
                out.append(c + e)
            continue
        if c == "[":
            depth += 1
            out.append(c)
            i += 1
            if pattern.startswith("^", i):  # a ] right after [ or [^ is a literal
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("]")
                i += 1
            continue
        if c == "]" and depth:
            depth -= 1
        out.append(c)
        i += 1
    return "".join(out)


def regex_grammar(pattern: str) -> str:
    return LLMatcher.grammar_from_regex(ascii_perl_classes(pattern))


def choice_grammar(choices: list[str]) -> str:
    """Exactly one of `choices` (vLLM's guided choice)."""
    return LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in choices))


# A GBNF escape: \uXXXX, \UXXXXXXXX, or any other backslash pair (kept, so "\\u0041" stays two characters).
_GBNF_ESCAPE = re.compile(r"\\(u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", re.DOTALL)


def _gbnf_code_point(m: re.Match) -> str:
    r"""llama.cpp's GBNF takes \uXXXX and \UXXXXXXXX; llguidance 1.x's converter writes them into Lark with their
    leading zeros dropped ("\u00e9" as "\ue9"), which Lark then rejects. ASCII becomes \xHH, which it carries
    over intact (a quote or bracket stays escaped); any other character is written as itself."""
    escape = m.group(1)
    if len(escape) == 1:
        return m.group(0)
    code = int(escape[1:], 16)
    if code < 0x80:
        return f"\\x{code:02x}"
    return m.group(0) if 0xD800 <= code < 0xE000 or code > 0x10FFFF else chr(code)


def cfg_grammar(text: str) -> str:
    """A context-free grammar in Lark syntax (`start: ...`) or in the EBNF of vLLM's docs and llama.cpp's GBNF
    (`root ::= ...`), converted by llguidance as vLLM's guidance backend does. Raises ValueError for GBNF it cannot
    convert; Lark goes on unchecked, its errors found when it is compiled (grammar_error)."""
    if "::=" in text:
        return _gbnf_to_lark(_GBNF_ESCAPE.sub(_gbnf_code_point, text))
    # Lark, passed on as it is; named so, since llguidance's own guess ("grammar") takes `?start:` for GBNF
    return llguidance.grammar_from("lark", text)


@functools.lru_cache(maxsize=64)
def _gbnf_to_lark(text: str) -> str:
    """llguidance's GBNF conversion, in a grammar checker's child (it takes quadratic time: 2 s for 64 KB of
    rule chain), cut at its wall-clock budget. Conversions are kept, not refusals (a refusal past the budget
    depends on the load). Raises ValueError."""
    verdict = _in_child(lambda c: c.convert_gbnf(text))
    if verdict.grammar is None:
        wall = f"{grammar_check.MAX_COMPILE_WALL_S:g} s"
        raise ValueError(verdict.error or f"the grammar takes more than {wall} to convert from GBNF; this server "
                                          f"takes at most {wall}")
    return verdict.grammar


def _in_child(ask) -> grammar_check.Verdict:
    """`ask(checker)` on an idle grammar checker; once more, on a fresh child, if its child died meanwhile
    (llguidance crashed, or something killed it)."""
    checker = grammar_check.checker()
    try:
        verdict = ask(checker)
        return ask(checker) if verdict.crashed else verdict
    finally:
        grammar_check.release(checker)


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer, over `vocab_size` logits (None: the tokenizer's own
    vocabulary). About 1 s to build for a 128k vocabulary: build it once."""
    eos = sorted(tokenizer.stop_ids)
    if tokenizer.tiktoken_encoding is not None:
        from llguidance.tiktoken import lltokenizer_from_encoding
        return lltokenizer_from_encoding(tokenizer.tiktoken_encoding, n_vocab=vocab_size, eos_token=eos)
    from llguidance.hf import from_tokenizer
    return from_tokenizer(tokenizer.hf_tokenizer, n_vocab=vocab_size, eos_token=eos)


# Keyed by the grammar's digest, not its text: a refused grammar is kept too, and a 64 KB source can make one of
# ~380 KB (a schema of control characters, escaped 6 to 1), so 256 texts held ~100 MB per ingress replica.
# Each verdict with the time.monotonic() it is kept until (inf: as long as it is among the last VERDICTS_KEPT).
_VERDICTS: OrderedDict[tuple[bytes, llguidance.LLTokenizer], tuple[str | None, float]] = OrderedDict()
_VERDICTS_LOCK = threading.Lock()
VERDICTS_KEPT = 256


def grammar_error(grammar: str, tokenizer: llguidance.LLTokenizer) -> str | None:
    """Why `grammar` cannot constrain this model, or None: an invalid schema, regex or Lark text, more than
    MAX_GRAMMAR_BYTES, or more than MAX_COMPILE_CPU_S of CPU to compile (first in a grammar checker's child,
    cut at grammar_check.MAX_COMPILE_WALL_S; then here, the matcher a mesh builds and its first mask, which
    llguidance's lexer fuel bounds). Call it on a deep_stack_executor thread. The verdicts on the last
    VERDICTS_KEPT grammars are kept (a client with tools sends the same ones at every turn), except those that
    depend on the moment: a compile cut at the wall-clock budget or a child that died twice, not kept; a refusal
    within LASTING_REFUSAL_FACTOR of the CPU budget, kept NEAR_REFUSAL_KEPT_S."""
    key = (hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).digest(), tokenizer)
    now = time.monotonic()
    with _VERDICTS_LOCK:
        kept = _VERDICTS.get(key)
        if kept is not None and now < kept[1]:
            _VERDICTS.move_to_end(key)
            return kept[0]
    error, kept_s = _grammar_error(grammar, tokenizer)
    if kept_s:
        with _VERDICTS_LOCK:
            _VERDICTS[key] = error, now + kept_s
            _VERDICTS.move_to_end(key)
            while len(_VERDICTS) > VERDICTS_KEPT:
                _VERDICTS.popitem(last=False)
    return error


def _grammar_error(grammar: str, tokenizer: llguidance.LLTokenizer) -> tuple[str | None, float]:
    """grammar_error's verdict, and how long to keep it (seconds): inf for one that would be the same at another
    moment, NEAR_REFUSAL_KEPT_S for a refusal within LASTING_REFUSAL_FACTOR of the CPU budget, 0 for one of the
    moment."""
    if len(grammar) > MAX_GRAMMAR_BYTES:
        return f"the constraint compiles to {len(grammar)} bytes of grammar; this server takes at most " \
               f"{MAX_GRAMMAR_BYTES}", math.inf
    verdict = _in_child(lambda c: c.check(grammar))  # where a compile that would take minutes is cut
    if verdict.error:
        return verdict.error, 0.0 if verdict.crashed else math.inf
    cpu_s = verdict.cpu_s
    if cpu_s is not None and cpu_s <= MAX_COMPILE_CPU_S:
        start = time.thread_time()
        try:
            compiled(tokenizer, grammar)
        except ValueError as exc:
            return str(exc), math.inf
        cpu_s = time.thread_time() - start
        if cpu_s <= MAX_COMPILE_CPU_S:
            return None, math.inf
    spent = f"more than {grammar_check.MAX_COMPILE_WALL_S:g} s" if cpu_s is None else f"{cpu_s * 1000:.0f} ms of CPU"
    kept_s = 0.0 if cpu_s is None else math.inf if cpu_s > LASTING_REFUSAL_FACTOR * MAX_COMPILE_CPU_S \
        else NEAR_REFUSAL_KEPT_S
    return f"the constraint takes {spent} to compile; this server takes at most {MAX_COMPILE_CPU_S * 1000:.0f} " \
           f"ms of CPU (fewer properties, alternatives or repetitions make it cheaper)", kept_s


def compiled(tokenizer: llguidance.LLTokenizer, grammar: str) -> LLMatcher:
    """A matcher at the grammar's start, its first mask computed (what a mesh does before a slot's first token;
    the lexer states it builds are shared by the matcher's copies). Its default parser limits bound each
    mask's work. Raises ValueError when llguidance refuses the grammar."""
    try:
        matcher = LLMatcher(tokenizer, grammar)
    except Exception as exc:  # malformed grammar JSON
        raise ValueError(grammar_check.engine_error(str(exc))) from None
    if not matcher.is_error():
        matcher.compute_bitmask()
    if matcher.is_error():
        raise ValueError(grammar_check.engine_error(matcher.get_error()))
    return matcher


class GrammarCache:
    """A mesh's compiled matchers by grammar text, the `size` most recently used. Compiling takes up to
    MAX_COMPILE_CPU_S on the mesh's worker thread, where every slot waits; a slot's matcher is a copy of its
    grammar's (~20 us), so a request's n choices, a batch's prompts and a recompute compile it once."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, size: int = 16):
        self.tokenizer = tokenizer
        self.size = size
        self._matchers: dict[str, LLMatcher] = {}  # in order of last use

    def new_state(self, grammar: str, generated: list[int]) -> GrammarState:
        """A slot's matcher for `grammar`, advanced past `generated` (the tokens its answer already has).
        Raises ValueError when the grammar is invalid or the tokens do not match it."""
        matcher = self._matchers.pop(grammar, None) or compiled(self.tokenizer, grammar)
        self._matchers[grammar] = matcher
        if len(self._matchers) > self.size:
            del self._matchers[next(iter(self._matchers))]
        return GrammarState(matcher.deep_copy(), self.tokenizer.vocab_size, generated)


class GrammarState:
    """One slot's matcher: which tokens may come next, and the tokens taken so far. A mask or a step that takes
    more than MAX_STEP_CPU_S fails the grammar, and so do masks and steps that take more than COST_WINDOW x
    MAX_MEAN_STEP_CPU_S over the last COST_WINDOW tokens: masks are computed one slot after another on the mesh's
    worker thread, and an ambiguous grammar (`s: s s | "a"`), cheap to compile, costs more at every token (7 ms a
    step over its first 120 tokens, 26 ms over 200, before llguidance's own item limit stops it at ~480)."""

    def __init__(self, matcher: LLMatcher, vocab_size: int, generated: list[int]):
        """`matcher`: at the grammar's start (GrammarCache makes them). Raises ValueError when the tokens in
        `generated` do not match the grammar."""
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.too_costly: str | None = None  # why the grammar was given up on, past its CPU budget
        self._costs = collections.deque(maxlen=COST_WINDOW)  # CPU seconds of each of the last tokens (mask + step)
        self._cost = 0.0  # this token's so far
        self._ahead: tuple[np.ndarray | None, np.ndarray] | Exception | None = None  # the next mask or its error
        for token in generated:
            self.accept(token)

    def prefetch(self) -> None:
        """Compute the next mask now, for disallowed() to return (or raise) later: the mesh computes it on another
        thread while the device runs the step whose logits it masks."""
        try:
            self._ahead = self._mask()
        except Exception as exc:
            self._ahead = exc

    def disallowed(self) -> tuple[np.ndarray | None, np.ndarray]:
        """The tokens the grammar forbids next (only stop ids once it is complete), prefetched or computed now, as
        (allowed, forbidden): the allowed ids when at most SPARSE_IDS are (the rest forbidden); else None and the
        forbidden ids when at most SPARSE_IDS are; else None and bool [vocab_size], True where forbidden. Ids when
        few: laying a mask on a row is memory-bound, and a 128k bool mask cost 70-500 us a row on the 2-core box
        (masked_fill_, by how its pattern defeats the branches), a few thousand ids a fill or copy of the row
        (~11 us) and a scatter. Raises ValueError when it took more than MAX_STEP_CPU_S."""
        ahead, self._ahead = self._ahead, None
        if isinstance(ahead, Exception):
            raise ahead
        return self._mask() if ahead is None else ahead

    def _mask(self) -> tuple[np.ndarray | None, np.ndarray]:
        start = time.thread_time()  # of the thread it runs on: prefetch's is busy with it alone meanwhile
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._check_cost("mask", start)
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].view(bool)
        num_allowed = int(np.count_nonzero(allowed))
        if num_allowed <= SPARSE_IDS:
            return np.flatnonzero(allowed), np.empty(0, np.intp)
        forbidden = ~allowed
        return None, np.flatnonzero(forbidden) if self.vocab_size - num_allowed <= SPARSE_IDS else forbidden

    def failed(self) -> bool:
        """llguidance gave up on the grammar (a lexer or parser limit hit while matching, e.g. a regex with
        huge repetition counts: the lexer is built lazily), or a token it refused, or its CPU budget ran out."""
        return self.too_costly is not None or self.matcher.is_error()

    def accept(self, token: int) -> None:
        """Advance past `token`. Raises ValueError if the grammar does not allow it, when that took more than
        MAX_STEP_CPU_S, or when the masks and steps of the last COST_WINDOW tokens took more than COST_WINDOW x
        MAX_MEAN_STEP_CPU_S."""
        self._ahead = None  # a mask prefetched before the token is no longer the next one
        start = time.thread_time()
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        self._check_cost("step", start)
        self._costs.append(self._cost)
        self._cost = 0.0
        if (spent := sum(self._costs)) > COST_WINDOW * MAX_MEAN_STEP_CPU_S:  # from the first token on
            self.too_costly = f"the grammar took {spent * 1000:.0f} ms of CPU over its last {len(self._costs)} " \
                              f"tokens; this server allows {COST_WINDOW * MAX_MEAN_STEP_CPU_S * 1000:g} ms over " \
                              f"{COST_WINDOW} (every constrained answer adds its cost to every step of the mesh)"
            raise ValueError(self.too_costly)

    def _check_cost(self, what: str, start: float) -> None:
        cpu_s = time.thread_time() - start
        self._cost += cpu_s
        if cpu_s > MAX_STEP_CPU_S:
            self.too_costly = f"the grammar took {cpu_s * 1000:.1f} ms of CPU for one token's {what}; this " \
                              f"server allows {MAX_STEP_CPU_S * 1000:.0f} ms (an ambiguous grammar costs more " \
                              f"at every token)"
            raise ValueError(self.too_costly)
