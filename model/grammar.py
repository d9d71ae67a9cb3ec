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

import json
import re
from typing import TYPE_CHECKING

import llguidance
import numpy as np
from llguidance import LLMatcher

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

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
    (`root ::= ...`), converted by llguidance as vLLM's guidance backend does. Raises ValueError."""
    if "::=" in text:
        text = _GBNF_ESCAPE.sub(_gbnf_code_point, text)
    return llguidance.grammar_from("grammar", text)


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer, over `vocab_size` logits (None: the tokenizer's own
    vocabulary). About 1 s to build for a 128k vocabulary: build it once."""
    eos = sorted(tokenizer.stop_ids)
    if tokenizer.tiktoken_encoding is not None:
        from llguidance.tiktoken import lltokenizer_from_encoding
        return lltokenizer_from_encoding(tokenizer.tiktoken_encoding, n_vocab=vocab_size, eos_token=eos)
    from llguidance.hf import from_tokenizer
    return from_tokenizer(tokenizer.hf_tokenizer, n_vocab=vocab_size, eos_token=eos)


def grammar_error(grammar: str, tokenizer: llguidance.LLTokenizer) -> str | None:
    """Why `grammar` cannot constrain this model (an invalid schema, regex or Lark text), or None."""
    try:
        error = LLMatcher.validate_grammar(grammar, tokenizer)
    except Exception as exc:  # malformed grammar JSON
        return str(exc)
    return error or None


class GrammarState:
    """One slot's matcher: which tokens may come next, and the tokens taken so far."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, generated: list[int]):
        """`generated`: the tokens this answer already has (a recompute resumes the constraint after them).
        Raises ValueError when the grammar is invalid or the tokens do not match it."""
        self.matcher = LLMatcher(tokenizer, grammar)  # its default parser limits bound each mask's work
        self.vocab_size = tokenizer.vocab_size
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        for token in generated:
            self.accept(token)

    def disallowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens the grammar forbids next (only stop ids once it is complete)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:self.vocab_size] == 0

    def failed(self) -> bool:
        """llguidance gave up on the grammar: a lexer or parser limit hit while matching (e.g. a regex with huge
        repetition counts, which validate_grammar accepts: the lexer is built lazily), or a token it refused."""
        return self.matcher.is_error()

    def accept(self, token: int) -> None:
        """Advance past `token`. Raises ValueError if the grammar does not allow it."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
