"""A request moved to another mesh mid-answer keeps every feature exactly as it is without the move: through the whole
stack in one process (the ingress app over a real Router and two torch meshes of a tiny random Llama with SmolLM2's
vocabulary, in float32, whose recompute gives the decode step's logits: test_seeded_recompute), a mesh raises, hangs
past its deadline, or vanishes and comes back, part way through answers that use structured outputs, tools, logprobs,
n > 1, seeds, stop strings, min/max_tokens, penalties, logit_bias and streamed usage (chat, completions and
Responses). Real logits (the simulated mesh's are one-hot) make penalties, bias and seeds change the tokens, so a
sampling state rebuilt wrongly shows.

The promises (DESIGN "Failure: contained, then recovered without loss"): each answer equals the unfaulted one (text,
token ids, calls, logprobs to float32's last bits, finish, usage), and is what its request asks (check_contract: the
unmoved one could be wrong the same way), a structured one JSON of its schema, or where cut short a prefix of some, and
each completion's token the one an independent sampler draws from the model's own logits (check_sampling); a
request cancelled while it is moved leaves no slot, block or slot state on either mesh."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid

import jsonschema
import pytest
import regex  # a dependency of transformers: a match, or the prefix of one (partial=True)
import torch
from llguidance import LLMatcher

from model.embedded import ensure_smollm2
from model.grammar import json_schema_grammar, ll_tokenizer
from model.tokenizer import load_tokenizer
from model.torch_llama import TorchBackend
from model.verify import META_EXPRESSIBLE_ROPE
import tests.in_process as in_process
import tests.reference_sampler as reference
from scheduler.sampling import SamplingParams
from scheduler.work import MeshWork
from tests.in_process import Stack, nothing_held, until
from tests.local_mesh import LocalMesh

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
          "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 12}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"]}}}]
HI = [{"role": "user", "content": "hi there, tell me about it"}]
SEEDED = {"temperature": 1.0, "seed": 5}
# a few tokens far likelier than the rest, so an answer repeats them and penalties change what it draws (the random
# model alone seldom repeats a token in 30)
FEW = {str(t): 12 for t in range(300, 306)}
BODIES = {
    "json-schema": (CHAT, {"messages": HI, "max_tokens": 40, **SEEDED, "logprobs": True, "top_logprobs": 2,
                           "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
    "json-object": (CHAT, {"messages": HI, "max_tokens": 40, "temperature": 0.0,
                           "response_format": {"type": "json_object"}}),
    # 64: its two calls end at its 50th token (at 40 it ended on "length", its second call's arguments cut short)
    "tool-required": (CHAT, {"messages": HI, "max_tokens": 64, **SEEDED, "tools": TOOLS, "tool_choice": "required"}),
    "tool-named": (CHAT, {"messages": HI, "max_tokens": 40, "temperature": 0.0, "tools": TOOLS,
                          "tool_choice": {"type": "function", "function": {"name": "add"}}}),
    "logprobs": (COMP, {"prompt": "Once upon a time", "max_tokens": 24, **SEEDED, "logprobs": 3, "ignore_eos": True}),
    "n3": (CHAT, {"messages": HI, "max_tokens": 20, "n": 3, **SEEDED, "logprobs": True, "top_logprobs": 1,
                  "ignore_eos": True}),
    "n2-comp": (COMP, {"prompt": ["a b", "c d e"], "max_tokens": 16, "n": 2, **SEEDED, "logprobs": 1,
                       "ignore_eos": True}),
    "penalties": (COMP, {"prompt": "the the the the", "max_tokens": 30, **SEEDED, "presence_penalty": 0.5,
                         "frequency_penalty": 1.0, "ignore_eos": True, "logprobs": 1, "logit_bias": FEW}),
    "greedy-penalties": (COMP, {"prompt": "abc abc abc", "max_tokens": 30, "temperature": 0.0,
                                "presence_penalty": 0.3, "frequency_penalty": 0.7, "ignore_eos": True,
                                "logit_bias": FEW}),
    "repetition-penalty": (COMP, {"prompt": "abc abc abc", "max_tokens": 30, **SEEDED, "repetition_penalty": 1.3,
                                  "ignore_eos": True, "logprobs": 2, "logit_bias": FEW}),
    # +4 drew neither 260 nor 300, and 1000 was never likely: at +9, 300 is drawn 8 times in 24, and 11395 (its
    # first token unbiased) never
    "logit-bias": (COMP, {"prompt": "Once upon", "max_tokens": 24, **SEEDED, "ignore_eos": True, "logprobs": 2,
                          "logit_bias": {"260": 9, "300": 9, "11395": -100}}),
    # stop ids the bias makes likeliest: masked until min_tokens, it stops just after them
    "min-tokens": (COMP, {"prompt": "Once upon", "max_tokens": 30, "min_tokens": 20, **SEEDED, "logprobs": 0,
                          "stop_token_ids": [300, 301], "logit_bias": {"300": 12, "301": 12}}),
    # EOS (2) the greedy choice now and then (its 11th and 17th tokens), no stop: at +5 it never was, and the
    # answer was the same with ignore_eos or without
    "ignore-eos": (CHAT, {"messages": HI, "max_tokens": 27, "temperature": 0.0, "ignore_eos": True,
                          "logit_bias": {"2": 8}}),
    "stop-strings": (COMP, {"prompt": "Once upon a time", "max_tokens": 40, **SEEDED, "stop": ["sch", "zzz"],
                            "logprobs": 0}),
    "seeded-top": (COMP, {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8, "top_p": 0.7,
                          "top_k": 40, "min_p": 0.02, "seed": 123, "logprobs": 1, "ignore_eos": True}),
    "n6-mixed": (CHAT, {"messages": HI, "max_tokens": 24, "n": 6, **SEEDED, "logprobs": True, "top_logprobs": 2,
                        "presence_penalty": 0.8, "logit_bias": {"300": 3},
                        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
    "echo-prompt-logprobs": (COMP, {"prompt": "Once upon a time there was a", "max_tokens": 16, **SEEDED, "echo": True,
                                    "logprobs": 2, "prompt_logprobs": 1, "ignore_eos": True}),
    "regex": (COMP, {"prompt": "Name:", "max_tokens": 30, **SEEDED, "logprobs": 1,
                     "structured_outputs": {"regex": "[a-z]{3,8}( [a-z]{2,9}){2,6}"}}),
    "bad-words-allowed": (COMP, {"prompt": "Once upon", "max_tokens": 20, **SEEDED, "ignore_eos": True,
                                 "allowed_token_ids": list(range(250, 330)), "logprobs": 1,
                                 # "ot" (320) is its 5th token unbanned, " in for" (281, 327) its 8th-9th with "ot"
                                 # banned ("ab" was no allowed token: banned or not, the answer was the same)
                                 "bad_words": ["ot", "in for"]}),
    "include-stop": (COMP, {"prompt": "Once upon a time", "max_tokens": 40, **SEEDED, "stop": ["sch"],
                            "include_stop_str_in_output": True}),
}
# where a kind's move comes (decode results before the fault), else half way: "stop-strings" stops on "sch" of
# " attorneys" + "changing", its 26th and 27th tokens (the "s" of one, "ch" of the other): the mesh fails with the
# first of them delivered
AFTER = {"stop-strings": 25, "include-stop": 25}


class DecodeFaultMesh(LocalMesh):
    """A LocalMesh whose armed fault counts decode steps only (so it fires mid-answer, whatever the prompt's chunks)
    or the final prefill chunks' results only (`moment`),
    and disarms every mesh of `family` as it fires: the answer moves once, then finishes where it went (a second
    failure before its next decode step would end it: max_mesh_failures)."""

    family: list[DecodeFaultMesh] = []
    armed = False  # a fault was armed, and the mesh was not mended since
    fired: list[str] = []  # the faults that fired, in turn
    moment = "decode"  # what results count: "decode" steps, or "first-token" (a final prefill chunk's)
    failovers_at_arm = 0

    def fault_at(self, work: MeshWork, index: int) -> str | None:
        counted = index >= len(work.prefills) if self.moment == "decode" else \
            index < len(work.prefills) and work.prefills[index].params is not None
        if not counted or self.fault is None:
            return None
        self.fault_after -= 1
        if self.fault_after >= 0:
            return None
        self.fired.append(self.fault)
        fault = self.fault
        for mesh in self.family:
            mesh.fault = None
        return fault


def tiny_model(path) -> None:
    """A random 2-layer Llama with SmolLM2's vocabulary (its tokenizer, grammars and chat template apply)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, rope_parameters=META_EXPRESSIBLE_ROPE, initializer_range=0.3,
                         eos_token_id=2, bos_token_id=1)
    torch.manual_seed(11)
    LlamaForCausalLM(config).eval().save_pretrained(path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-smol")
    tiny_model(path)
    tok = load_tokenizer(ensure_smollm2())
    llt = ll_tokenizer(tok, tok.vocab_size)

    def backend():
        return TorchBackend(path, num_slots=4, block_size=16, num_blocks=64, max_seq_len=512, dtype=torch.float32,
                            device="cpu")
    real, in_process.LocalMesh = in_process.LocalMesh, DecodeFaultMesh
    try:
        s = Stack(tok, backend, num_meshes=2, grammar_tokenizer=lambda: llt, min_step_deadline_s=2.0,
                  step_deadline_factor=0, prefill_chunk=32, max_prefill_tokens=32, decode_steps=2)
    finally:
        in_process.LocalMesh = real
    DecodeFaultMesh.family = s.meshes
    s.expected, s.llt = {}, llt
    from transformers import LlamaForCausalLM
    s.reference, s.reference_logits = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), {}
    yield s
    s.close()


def sse(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ") and line != "data: [DONE]"]


def completion_logprobs(lp: dict | None) -> list:
    """A completion's logprobs as (token, logprob, [(alternative, logprob)]) per token."""
    if not lp:
        return []
    tops = lp["top_logprobs"] or [None] * len(lp["tokens"])
    return [(t, p, sorted((top or {}).items())) for t, p, top in zip(lp["tokens"], lp["token_logprobs"], tops)]


def collect(path: str, stream: bool, response) -> dict:
    """An answer as comparable data: per choice its text, calls, token ids, logprobs, finish; and its usage (less
    cached-token details: the recompute may hit another cache)."""
    assert response.status_code == 200, response.text
    chat = path == CHAT
    choices: dict[int, dict] = {}
    if stream:
        chunks = sse(response.text)
        assert not [c for c in chunks if "error" in c], chunks
        for chunk in chunks:
            for c in chunk["choices"]:
                s = choices.setdefault(c["index"], {"text": "", "calls": {}, "ids": [], "lps": [], "finish": None})
                s["ids"] += c.get("token_ids") or []
                if chunk.get("usage"):  # continuous_usage_stats: the choice's tokens so far
                    assert chunk["usage"]["completion_tokens"] == len(s["ids"]), (chunk, len(s["ids"]))
                s["finish"] = c.get("finish_reason") or s["finish"]
                if chat:
                    s["text"] += c["delta"].get("content") or ""
                    for call in c["delta"].get("tool_calls") or []:
                        whole = s["calls"].setdefault(call["index"], ["", ""])
                        whole[0] += call.get("function", {}).get("name") or ""
                        whole[1] += call.get("function", {}).get("arguments") or ""
                    s["lps"] += [(t["token"], t["logprob"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]])
                                 for t in (c.get("logprobs") or {}).get("content") or []]
                else:
                    s["text"] += c["text"]
                    s["lps"] += completion_logprobs(c["logprobs"])
        usage = chunks[-1]["usage"]
        indexes = sorted(choices)
    else:
        body = response.json()
        for c in body["choices"]:
            s = {"ids": c.get("token_ids") or [], "finish": c["finish_reason"], "calls": {}, "lps": []}
            if chat:
                m = c["message"]
                s["text"] = m["content"] or ""
                s["calls"] = {i: [t["function"]["name"], t["function"]["arguments"]]
                              for i, t in enumerate(m.get("tool_calls") or [])}
                s["lps"] = [(t["token"], t["logprob"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]])
                            for t in (c["logprobs"] or {}).get("content") or []]
            else:
                s["text"] = c["text"]
                s["lps"] = completion_logprobs(c["logprobs"])
            choices[c["index"]] = s
        usage = body["usage"]
        indexes = [c["index"] for c in body["choices"]]  # as they came: two of one index are one in `choices`
    usage = {k: v for k, v in usage.items() if not k.endswith("_details")}
    return {"choices": choices, "usage": usage, "indexes": indexes}


def assert_same(got: dict, want: dict, what) -> None:
    """Equal but for logprob values, which may move in float32's last bits (a recomputed position)."""
    assert got["usage"] == want["usage"], what
    assert sorted(got["choices"]) == sorted(want["choices"]), what
    for i, w in want["choices"].items():
        g = got["choices"][i]
        assert {k: v for k, v in g.items() if k != "lps"} == {k: v for k, v in w.items() if k != "lps"}, (what, i)
        assert [(t, [x for x, _ in top]) for t, _, top in g["lps"]] == \
            [(t, [x for x, _ in top]) for t, _, top in w["lps"]], (what, i)
        flat = lambda lps: [p for _, p, top in lps for p in [p, *(q for _, q in top)]]  # noqa: E731
        assert flat(g["lps"]) == pytest.approx(flat(w["lps"]), abs=1e-3), (what, i)


@functools.cache
def no_space() -> dict[str, int]:
    """logit_bias banning SmolLM2's whitespace-only tokens: the random model's JSON is mostly whitespace without it,
    and never ends within max_tokens, so its validity could not be checked."""
    tok = load_tokenizer(ensure_smollm2())
    return {str(t): -100 for t in range(tok.vocab_size) if not tok.decode([t]).strip()}


def json_prefix(s, schema: dict, text: str) -> bool:
    """Whether `text` begins some JSON text valid against `schema`: llguidance (the product's engine, under a grammar
    built here from the schema) takes its tokens without an error."""
    matcher = LLMatcher(s.llt, LLMatcher.grammar_from_json_schema(schema))
    return matcher.consume_tokens(s.tok.encode(text)) and not matcher.is_error()


def runs_in(word: tuple[int, ...], ids: list[int]) -> bool:
    return any(tuple(ids[i:i + len(word)]) == word for i in range(len(ids) - len(word) + 1))


def check_contract(s, kind: str, answer: dict) -> None:
    """What the request asks of its answer, whatever the unmoved run gave (the two could be wrong alike): one choice
    an index (n per prompt), seeded choices distinct, usage the sum of its tokens; per choice max_tokens, ignore_eos,
    min_tokens before a stop id, stop strings out of the text (or ending it), allowed_token_ids only, no bad word,
    no token biased -100 and one biased +8 or more drawn, one logprob a token, an echoed prompt, the regex matched
    (a prefix of a match where cut short), JSON of the schema or the named tool's parameters (a prefix of some where
    cut short: the random model's JSON seldom ends)."""
    fields = BODIES[kind][1]
    tok, choices = s.tok, answer["choices"]
    prompts = fields.get("prompt", [])
    prompts = [prompts] if isinstance(prompts, str) else prompts
    n = fields.get("n", 1)
    assert answer["indexes"] == list(range(n * max(1, len(prompts)))), answer["indexes"]
    assert len({tuple(c["ids"]) for c in choices.values()}) == len(choices), "seeded choices alike"
    usage = answer["usage"]
    assert usage["completion_tokens"] == sum(len(c["ids"]) for c in choices.values()), usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    if prompts:
        assert usage["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts), usage
    bias = {int(t): b for t, b in request(kind, False)[1].get("logit_bias", {}).items()}
    stops = fields.get("stop", [])
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in fields.get("tools", [])}
    for c in choices.values():
        ids, text, finish = c["ids"], c["text"], c["finish"]
        assert len(ids) <= fields["max_tokens"] and (finish != "length" or len(ids) == fields["max_tokens"]), c
        if fields.get("ignore_eos"):
            assert finish == "length", c
        if kind == "ignore-eos":
            assert 2 in ids, c  # its bias had an effect, ignore_eos too
        if "min_tokens" in fields:
            stop_ids = set(fields["stop_token_ids"])
            assert finish == "stop" and ids[-1] in stop_ids and len(ids) > fields["min_tokens"], c
            assert not stop_ids & set(ids[:-1]), c
        if stops:
            assert finish == "stop", c
            if fields.get("include_stop_str_in_output"):
                ending = [x for x in stops if text.endswith(x)]
                assert ending, c
                text = text[:-len(ending[0])]
            else:
                assert any(tok.decode(ids)[len(text):].startswith(x) for x in stops), c  # cut right before one
            assert not any(x in text for x in stops), c
        if "allowed_token_ids" in fields:
            assert set(ids) <= set(fields["allowed_token_ids"]), c
        for word in fields.get("bad_words", []):
            for variant in (word, " " + word):
                assert not runs_in(tuple(tok.encode(variant)), ids), (word, c)
        assert not {t for t, b in bias.items() if b == -100} & set(ids), c
        if favoured := {t for t, b in bias.items() if b >= 8}:
            assert favoured & set(ids), c
        if fields.get("logprobs") is not None and fields.get("logprobs") is not False:
            echoed = len(tok.encode(prompts[0])) if fields.get("echo") else 0  # the prompt's own come first
            assert len(c["lps"]) == echoed + len(ids), c
            if "top_logprobs" in fields:
                assert all(len(top) == fields["top_logprobs"] for _, _, top in c["lps"]), c
        if fields.get("echo"):
            assert text.startswith(prompts[0]), c
        if "structured_outputs" in fields:
            pattern = fields["structured_outputs"]["regex"]
            assert regex.fullmatch(pattern, text, partial=finish != "stop"), c
        if "response_format" in fields:
            fmt = fields["response_format"]
            schema = SCHEMA if fmt["type"] == "json_schema" else {"type": "object"}
            if finish == "stop":
                jsonschema.validate(json.loads(text), schema)
            else:
                assert json_prefix(s, schema, text), c
        if tools:
            assert c["calls"], c
            named = fields["tool_choice"]["function"]["name"] if isinstance(fields["tool_choice"], dict) else None
            for i, (name, arguments) in sorted(c["calls"].items()):
                assert name in tools and name == (named or name), c
                if finish in ("stop", "tool_calls") or i < len(c["calls"]) - 1:
                    jsonschema.validate(json.loads(arguments), tools[name])
                else:
                    assert json_prefix(s, tools[name], arguments), c


EOS = 2  # the tiny model's eos_token_id: min_tokens masks it with the stop ids, as vLLM's MinTokensLogitsProcessor


def reference_logits(s, ids: list[int]) -> torch.Tensor:
    """The model's logits [len(ids), vocab] at each of `ids`' positions, by transformers' LlamaForCausalLM over the
    same weights (not the product's backend), float64."""
    key = tuple(ids)
    if key not in s.reference_logits:
        with torch.no_grad():
            s.reference_logits[key] = s.reference(torch.tensor([ids])).logits[0].double()
    return s.reference_logits[key]


def reference_knobs(fields: dict) -> dict:
    """reference.check_draw's sampling fields of a request's: temperature 1 unless given, top_k 0 when off (-1)."""
    knobs = {name: fields[name] for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                             "frequency_penalty") if name in fields}
    return {"temperature": 1.0, **knobs, "top_k": max(fields.get("top_k", 0), 0)}


def check_sampling(s, path: str, fields: dict, answer: dict) -> None:
    """Each token of a completion is what an independent sampler draws from the model's own logits (reference_logits)
    under the request's parameters, in vLLM v1's order (its Sampler: allowed_token_ids, bad words, min_tokens and
    logit_bias, then penalties, then temperature, min_p, top-k and top-p): greedy the argmax; seeded the product's
    promised draw (README: keyed on seed and position, so a recompute on any mesh draws alike), the exponential race
    over Philox noise keyed on (seed + choice, position); and every drawn token one the filters keep. Logprobs are
    the raw distribution's (vLLM's raw_logprobs: before bias, penalties and temperature), an echoed prompt's too.
    Completions without a grammar: their prompt ids are the tokenizer's, and nothing else masks the row."""
    if path != COMP or "structured_outputs" in fields:
        return
    prompts = fields["prompt"]
    prompts = [prompts] if isinstance(prompts, str) else prompts
    n = fields.get("n", 1)
    bias = {int(t): b for t, b in fields.get("logit_bias", {}).items()}
    stop_ids = {EOS, *fields.get("stop_token_ids", [])}
    bad_words = [tuple(s.tok.encode(v)) for w in fields.get("bad_words", []) for v in (w, " " + w)]
    top_n = fields.get("logprobs")
    knobs = reference_knobs(fields)
    not_allowed = torch.ones(s.tok.vocab_size, dtype=torch.bool)
    not_allowed[fields.get("allowed_token_ids", list(range(s.tok.vocab_size)))] = False
    for index, c in answer["choices"].items():
        prompt, ids = s.tok.encode(prompts[index // n]), c["ids"]
        seed = None if fields.get("seed") is None else (fields["seed"] + index % n) % 2**64
        logits = reference_logits(s, prompt + ids)
        raw = logits.log_softmax(-1)
        if top_n is not None:
            echoed = raw[:len(prompt) - 1] if fields.get("echo") else raw[:0]
            lps = c["lps"][1:] if fields.get("echo") else c["lps"]  # an echoed prompt's first token has none
            want = []  # the token's, and the top_n likeliest with the token's beside them if it is not one (vLLM's)
            for r, t in zip([*echoed, *raw[len(prompt) - 1:-1]], [*prompt[1:len(echoed) + 1], *ids]):
                top = r.topk(top_n)
                want.append((float(r[t]), sorted(top.values.tolist() + ([] if t in top.indices else [float(r[t])]),
                                                 reverse=True)))
            assert [(lp, sorted((v for _, v in top), reverse=True)) for _, lp, top in lps] == \
                [(pytest.approx(lp, abs=1e-3), pytest.approx(top, abs=1e-3)) for lp, top in want], index
        for i, token in enumerate(ids):
            row, output = logits[len(prompt) - 1 + i].clone(), ids[:i]
            row[not_allowed] = float("-inf")
            for word in bad_words:  # vLLM's: a word's last token, where the output ends with the rest of it
                if tuple(output[len(output) - len(word) + 1:]) == word[:-1] and len(word) - 1 <= len(output):
                    row[word[-1]] = float("-inf")
            if i < fields.get("min_tokens", 0):
                row[sorted(stop_ids)] = float("-inf")
            row[list(bias)] += torch.tensor(list(bias.values()), dtype=row.dtype)
            reference.check_draw(token, row, prompt, output, **knobs, seed=seed, what=(index, i))


# Each sampling parameter where it decides draws, checked against the reference sampler (check_sampling) unmoved. In
# BODIES few do: the random model is flat (its likeliest token has 1-6% of the mass), so "seeded-top"'s top_p 0.7 and
# min_p leave 8-21 of top_k 40's tokens (its 41st is never in play), and the penalised answers draw the +12-biased few.
# Here top_k 3, and top_p 0.05 (3-7 tokens), bind at every token; min_p 0.3 at temperature 0.7 keeps 1-21; the
# penalised answers may draw only the prompt's ids and 16 others (about half of their logits negative, which the
# repetition penalty multiplies), so their tokens repeat and the prompt's are among them (a penalty's reach shows)
PARAMETER_PROMPT = "Once upon a time there was a"
PARAMETER_BODIES = {
    "top-k": {"temperature": 1.0, "top_k": 3},
    "top-k-unseeded": {"temperature": 1.5, "top_k": 3, "seed": None},  # the batched top-k rows' path
    "top-p": {"temperature": 1.0, "top_p": 0.05},
    "top-k-top-p": {"temperature": 1.0, "top_k": 10, "top_p": 0.4},
    "min-p": {"temperature": 0.7, "min_p": 0.3},
    "repetition": {"temperature": 1.0, "repetition_penalty": 2.0, "allowed": True},
    "greedy-repetition": {"temperature": 0.0, "repetition_penalty": 1.5, "allowed": True},
    "presence": {"temperature": 1.0, "presence_penalty": 2.0, "allowed": True},
    "frequency": {"temperature": 1.0, "frequency_penalty": 1.0, "allowed": True},
    "all-penalties": {"temperature": 0.8, "repetition_penalty": 1.3, "presence_penalty": -0.5,
                      "frequency_penalty": 0.7, "top_k": 12, "min_p": 0.05, "allowed": True},
}


def parameter_body(s, name: str) -> dict:
    fields = {"prompt": PARAMETER_PROMPT, "max_tokens": 24, "ignore_eos": True, "seed": 11, **PARAMETER_BODIES[name]}
    if fields.pop("allowed", False):
        fields["allowed_token_ids"] = sorted({*s.tok.encode(PARAMETER_PROMPT), *range(300, 316)})
    return {k: v for k, v in fields.items() if v is not None}


@pytest.mark.parametrize("name", sorted(PARAMETER_BODIES))
def test_each_sampling_parameter_draws_as_its_definition(stack, name):
    """top_k, top_p, min_p and the three penalties, each where it decides draws, served: every token is the one the
    reference sampler draws (check_sampling), whatever the answer is compared with elsewhere."""
    fields = parameter_body(stack, name)
    body = {"model": "smollm2", **fields, "return_token_ids": True, "cache_salt": uuid.uuid4().hex}
    answer = collect(COMP, False, post(stack, COMP, body))
    assert [(len(c["ids"]), c["finish"]) for c in answer["choices"].values()] == [(24, "length")], answer
    check_sampling(stack, COMP, fields, answer)


def request(kind: str, stream: bool) -> tuple[str, dict]:
    path, fields = BODIES[kind]
    if {"response_format", "tools", "structured_outputs"} & fields.keys():
        fields = {**fields, "logit_bias": {**no_space(), **fields.get("logit_bias", {})}}
    body = {"model": "smollm2", **fields, "return_token_ids": True, "stream": stream,
            "cache_salt": uuid.uuid4().hex}
    if stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return path, body


def post(s, path: str, body: dict):
    return s.run(s.client.post(path, json=body))


def expected(s, kind: str, stream: bool) -> dict:
    if (kind, stream) not in s.expected:
        path, body = request(kind, stream)
        s.expected[kind, stream] = collect(path, stream, post(s, path, body))
        s.run(nothing_held(s.router, failovers=failovers(s)))
        check_contract(s, kind, s.expected[kind, stream])
        check_sampling(s, *BODIES[kind], s.expected[kind, stream])
    return s.expected[kind, stream]


def failovers(s) -> dict[str, int]:
    return {m.name: m.failovers for m in s.router.meshes}


async def mend(s, fault: str) -> None:
    """Bring a mesh back once its fault fired (a hang ends once the router has failed it over), as Serve would."""
    while True:
        await asyncio.sleep(0.02)
        for mesh, local in zip(s.router.meshes, s.meshes):
            if local.fault is None and local.armed:
                if fault == "hang" and mesh.up and mesh.failovers == local.failovers_at_arm:
                    continue
                local.armed = False
                local.unhang.set()
                if not local.alive:
                    await asyncio.sleep(0.1)
                    local.restart()


# A hang is noticed at min_step_deadline_s past the mesh's last result, plus Router's GRACE_S (0.5 s): at the
# stack's 2 s each hang case waited 2.5 s, a third of the file's time. The stack keeps 2 s (a healthy step missing
# it on the busy box would fail a mesh: an extra failover, which nothing_held counts); while a hanging answer runs,
# its works and the other mesh's are given this (1 s of silence with the grace), where a whole answer of 24 tokens
# moved once takes ~0.2 s here
HANG_DEADLINE_S = 0.5


@contextlib.contextmanager
def deadline(s, fault: str):
    """The router's min_step_deadline_s HANG_DEADLINE_S meanwhile if `fault` is a hang (read as each work is sent:
    Router._deadline)."""
    config, kept = s.router.config, s.router.config.min_step_deadline_s
    if fault == "hang":
        config.min_step_deadline_s = HANG_DEADLINE_S
    try:
        yield
    finally:
        config.min_step_deadline_s = kept


def with_fault(s, path: str, body: dict, fault: str, after: int):
    """`body` answered while both meshes are armed with `fault` after `after` results: the one the answer is on fires
    mid-answer (the other, if it runs as many results later, too)."""
    before = sum(failovers(s).values())
    for mesh, local in zip(s.router.meshes, s.meshes):
        local.unhang = asyncio.Event()
        local.inject(fault, after)
        local.armed, local.failovers_at_arm = True, mesh.failovers

    async def go():
        mender = asyncio.ensure_future(mend(s, fault))
        try:
            return await s.client.post(path, json=body)
        finally:
            for local in s.meshes:
                local.fault = None
                local.unhang.set()
                if not local.alive:
                    local.restart()
            mender.cancel()
    with deadline(s, fault):
        response = s.run(go())
    moved = sum(failovers(s).values()) - before
    s.run(until(lambda: all(m.up for m in s.router.meshes), 20))
    s.run(nothing_held(s.router, failovers=failovers(s)))
    s.run(until(lambda: not any(local.runner.slots for local in s.meshes)))
    return response, moved


# A hang differs from a raise only in how the router learns of it (HANG_DEADLINE_S, then _fail as for
# a raise; the hung mesh's late results go nowhere): what the move rebuilds is the same for every kind, so a hang
# runs with one kind of each state a move rebuilds (a grammar, penalty counts, n choices with everything, the
# ingress's stop-string buffer), not with all 20 (each waits out the deadline: 40 of them were 104 s of the
# file's 161)
HANG_KINDS = ("json-schema", "n6-mixed", "penalties", "stop-strings")


@pytest.mark.parametrize("kind,stream,fault", [
    (kind, stream, fault) for kind in sorted(BODIES) for stream in (False, True)
    for fault in ("raise", "vanish", *(("hang",) if kind in HANG_KINDS else ()))])
def test_an_answer_moved_mid_way_is_the_answer_unmoved(stack, kind, stream, fault):
    want = expected(stack, kind, stream)
    path, body = request(kind, stream)
    shortest = min(len(c["ids"]) for c in want["choices"].values())
    assert shortest >= 4, want  # room for a move mid-answer
    if kind == "stop-strings":
        assert [(c["text"][-9:], c["finish"]) for c in want["choices"].values()] == [(" attorney", "stop")], want
    response, moved = with_fault(stack, path, body, fault, after=AFTER.get(kind, shortest // 2 - 1))
    assert moved >= 1, "no mesh failed under the answer"
    got = collect(path, stream, response)
    assert_same(got, want, (kind, stream, fault))
    check_contract(stack, kind, got)


@pytest.mark.parametrize("after", [0, 1, 2])
@pytest.mark.parametrize("kind", sorted(BODIES))
def test_an_answer_moved_at_its_first_decode_steps_is_the_answer_unmoved(stack, kind, after):
    """The move right at the first decode results (the first token came from the prefill; a decode round of
    decode_steps 2 pipelined behind it), streamed: the boundaries where a token is counted twice or not at all."""
    want = expected(stack, kind, True)
    path, body = request(kind, True)
    response, moved = with_fault(stack, path, body, "raise", after=after)
    assert moved >= 1, "no mesh failed under the answer"
    assert_same(collect(path, True, response), want, (kind, after))


def slow(local: LocalMesh) -> None:
    """Each prefill chunk of `local` takes 30 ms more (until `del local.runner.backend.prefill`)."""
    prefill = local.runner.backend.prefill

    def slowed(*args, **kwargs):
        time.sleep(0.03)
        return prefill(*args, **kwargs)
    local.runner.backend.prefill = slowed


@pytest.mark.parametrize("moment", ["hung", "moved", "recomputing", "held"])
def test_a_request_cancelled_while_it_is_moved_leaves_nothing_on_either_mesh(stack, moment):
    """A constrained, penalised answer with logprobs (slot state on the mesh: a grammar matcher, penalty counts) is
    cancelled while its mesh hangs and before the router fails it over ("hung"), once it is re-placed on the other
    mesh before its recompute ran there ("moved"), part way through that recompute's chunks ("recomputing"), or
    while no mesh is up to take it ("held"): no request, slot, KV block or slot state (a prefill's history
    included) is left on the router, either mesh's scheduler or either runner."""
    s = stack
    tok = s.tok
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, grammar=json_schema_grammar(SCHEMA), logprobs=2,
                            presence_penalty=0.5, repetition_penalty=1.2)
    prompt = tok.encode("Give me some JSON please, " * 40)  # ~280 tokens: 9 chunks of 32
    router = s.router
    rid = f"cancel-{moment}-{uuid.uuid4().hex}"

    async def main():
        answer = router.generate(rid, prompt, params, None, [], continuation=False)
        tokens = []
        async for event in answer:
            tokens += event.token_ids
            if len(tokens) >= 3:
                break
        (home,) = [m for m in router.meshes if router.requests[rid].mesh is m]
        other = next(m for m in router.meshes if m is not home)
        local_home = s.meshes[router.meshes.index(home)]
        local_other = s.meshes[router.meshes.index(other)]
        if moment == "held":
            local_other.vanish()
            await until(lambda: not other.up, 5)
        fired, failed = len(DecodeFaultMesh.fired), home.failovers
        local_home.unhang = asyncio.Event()
        local_home.inject("hang" if moment == "hung" else "raise", 0)
        if moment == "recomputing":  # its chunks go one a work there, behind a slowed mesh, so a test sees between
            slow(local_other)
        await until(lambda: len(DecodeFaultMesh.fired) > fired)
        if moment == "moved":
            await until(lambda: router.requests[rid].mesh is other, 5)
        elif moment == "recomputing":  # a chunk of its recompute done there, its final chunk not yet
            def recomputing() -> bool:
                seq = other.scheduler.requests.get(rid) if other.up else None
                return seq is not None and 0 < seq.num_computed < len(seq.token_ids) - 40
            await until(recomputing, 5)
        elif moment == "held":
            await until(lambda: rid in router.held, 5)
        else:
            assert home.up and router.requests[rid].mesh is home
        await answer.aclose()  # the client leaves: the request is cancelled
        if moment == "recomputing":
            del local_other.runner.backend.prefill
        # gone at once, from the held too: one left there was placed again once a mesh came up and computed its
        # whole answer for no client (nothing_held below saw it only if it was still running)
        assert rid not in router.requests and rid not in router.held
        # the hang fails over past its deadline (failovers count from the stack's start: "or home.failovers" held
        # at once after any earlier failover, and the hang was mended before its deadline)
        await until(lambda: home.failovers > failed, 20)
        local_home.unhang.set()
        if not local_other.alive:
            local_other.restart()
        await until(lambda: all(m.up for m in router.meshes), 20)
        await nothing_held(router, failovers=failovers(s))
        await until(lambda: not any(local.runner.slots or local.runner._prefilled._ids for local in s.meshes))
    with deadline(s, "hang" if moment == "hung" else "raise"):
        s.run(main())


@pytest.mark.parametrize("after", [3, 11, 25])
@pytest.mark.parametrize("fault", ["raise", "hang", "vanish"])
def test_answers_sent_together_through_a_move_are_each_the_answer_alone(stack, fault, after):
    """Every kind at once, streamed, on two meshes of 4 slots (queues, rebalancing, constrained and penalised rows
    beside free ones and device-sampled ones on the mesh they move to): one mesh fails after `after` decode results."""
    s = stack
    kinds = sorted(BODIES)
    want = [expected(s, kind, True) for kind in kinds]
    requests = [request(kind, True) for kind in kinds]
    for mesh, local in zip(s.router.meshes, s.meshes):
        local.unhang = asyncio.Event()
        local.inject(fault, after)
        local.armed, local.failovers_at_arm = True, mesh.failovers
    before = sum(failovers(s).values())

    async def go():
        mender = asyncio.ensure_future(mend(s, fault))
        try:
            return await asyncio.gather(*(s.client.post(path, json=body) for path, body in requests))
        finally:
            mender.cancel()
            for local in s.meshes:
                local.fault = None
                local.unhang.set()
                if not local.alive:
                    local.restart()
    with deadline(s, fault):
        responses = s.run(go())
    assert sum(failovers(s).values()) - before >= 1, "no mesh failed"
    s.run(until(lambda: all(m.up for m in s.router.meshes), 20))
    s.run(nothing_held(s.router, failovers=failovers(s)))
    s.run(until(lambda: not any(local.runner.slots for local in s.meshes)))
    for kind, (path, _), response, w in zip(kinds, requests, responses, want):
        assert_same(collect(path, True, response), w, kind)


@pytest.mark.parametrize("kind", ["json-schema", "tool-required", "penalties", "n3", "n6-mixed", "stop-strings",
                                  "min-tokens", "echo-prompt-logprobs"])
def test_an_answer_held_while_no_mesh_is_up_goes_on_as_it_would_have(stack, kind):
    """Both meshes gone mid-answer (mesh-1 before it came, mesh-0 half way through it): the request is held with its
    tokens so far, and goes on where it was once the meshes come back."""
    s = stack
    want = expected(s, kind, True)
    path, body = request(kind, True)
    router = s.router

    async def go():
        s.meshes[1].vanish()
        await until(lambda: not router.meshes[1].up)
        s.meshes[0].inject("vanish", min(len(c["ids"]) for c in want["choices"].values()) // 2)
        post = asyncio.ensure_future(s.client.post(path, json=body))
        try:
            await until(lambda: not any(m.up for m in router.meshes))
            assert router.held
            await asyncio.sleep(0.3)
        finally:
            for local in s.meshes:
                local.fault = None
                local.restart()
        return await post
    before = sum(failovers(s).values())
    response = s.run(go())
    assert sum(failovers(s).values()) - before == 2
    s.run(until(lambda: all(m.up for m in s.router.meshes), 20))
    s.run(nothing_held(s.router, failovers=failovers(s)))
    assert_same(collect(path, True, response), want, kind)


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_an_answer_that_loses_its_last_token_or_its_first_is_the_answer_unmoved(stack, kind):
    """The mesh fails on the answer's last decode result (its last token computed, never delivered: the recompute's
    prefill samples it), then, on another run, on the final prefill chunk's result (the first token: a later choice
    of n, or the recompute of the whole prompt)."""
    want = expected(stack, kind, True)
    shortest = min(len(c["ids"]) for c in want["choices"].values())
    for moment, after in (("decode", shortest - 2), ("first-token", 0)):
        DecodeFaultMesh.moment = moment
        try:
            path, body = request(kind, True)
            response, moved = with_fault(stack, path, body, "raise", after=after)
        finally:
            DecodeFaultMesh.moment = "decode"
        assert moved >= 1, ("no mesh failed under the answer", moment)
        got = collect(path, True, response)
        assert_same(got, want, (kind, moment))
        check_contract(stack, kind, got)


RESPONSES = {
    "resp-json": {"input": "hi there", "max_output_tokens": 40, **SEEDED, "include": ["message.output_text.logprobs"],
                  "top_logprobs": 2, "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}},
    "resp-tool": {"input": "weather?", "max_output_tokens": 40, "temperature": 0.0, "tool_choice": "required",
                  "tools": [{"type": "function", "name": "add",
                             "parameters": TOOLS[1]["function"]["parameters"]}]},
    "resp-penalties": {"input": "tell me a story", "max_output_tokens": 30, **SEEDED, "logit_bias": FEW,
                       "presence_penalty": 0.5, "frequency_penalty": 1.0},
}


def without_ids(value):
    """An answer less what differs between two runs of one request (ids, times, cached-token details)."""
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items()
                if k not in ("id", "call_id", "created_at", "item_id", "input_tokens_details")}
    return [without_ids(v) for v in value] if isinstance(value, list) else value


def split_logprobs(value, values: list[float]):
    """`value` with each "logprob" number taken out into `values`, in order."""
    if isinstance(value, dict):
        out = {}
        for k, v in sorted(value.items()):
            if k == "logprob":
                values.append(v)
            else:
                out[k] = split_logprobs(v, values)
        return out
    return [split_logprobs(v, values) for v in value] if isinstance(value, list) else value


def response_answer(stream: bool, response) -> dict:
    """A Responses answer less what differs between runs (ids, times, cached-token details)."""
    assert response.status_code == 200, response.text
    if stream:
        events = sse(response.text)
        assert not [e for e in events if e.get("type") in ("error", "response.failed")], events
        (final,) = [e["response"] for e in events if e.get("type") in ("response.completed", "response.incomplete")]
    else:
        final = response.json()
    return without_ids({"output": final["output"], "usage": final["usage"], "status": final["status"]})


def check_response_contract(s, kind: str, answer: dict) -> None:
    """What a Responses request asks of its answer, whatever the unmoved run gave: usage its sum, max_output_tokens
    (and "incomplete" only there), top_logprobs per token, JSON of SCHEMA, a call of the required tool with JSON of
    its parameters (a prefix of some where cut short)."""
    fields, usage = RESPONSES[kind], answer["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], usage
    assert usage["output_tokens"] <= fields["max_output_tokens"], usage
    assert answer["status"] == "completed" or usage["output_tokens"] == fields["max_output_tokens"], answer
    tools = {t["name"]: t["parameters"] for t in fields.get("tools", [])}
    if tools:
        assert answer["output"] and all(item["type"] == "function_call" for item in answer["output"]), answer
    for item in answer["output"]:
        if item["type"] == "function_call":
            assert item["name"] in tools, item
            if item["status"] == "completed":
                jsonschema.validate(json.loads(item["arguments"]), tools[item["name"]])
            else:
                assert json_prefix(s, tools[item["name"]], item["arguments"]), item
            continue
        (content,) = item["content"]
        if "top_logprobs" in fields:
            assert content["logprobs"] and all(len(lp["top_logprobs"]) == fields["top_logprobs"]
                                               for lp in content["logprobs"]), content
        if "text" in fields:
            if item["status"] == "completed":
                jsonschema.validate(json.loads(content["text"]), SCHEMA)
            else:
                assert json_prefix(s, SCHEMA, content["text"]), item


@pytest.mark.parametrize("fault", ["raise", "vanish"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", sorted(RESPONSES))
def test_a_responses_answer_moved_mid_way_is_the_answer_unmoved(stack, kind, stream, fault):
    """/v1/responses (its own writer of text, calls, logprobs and usage): output, usage and status as unmoved."""
    body = {"model": "smollm2", **RESPONSES[kind], "stream": stream}
    if "text" in body or "tools" in body:
        body["logit_bias"] = no_space()
    want = response_answer(stream, post(stack, "/v1/responses", {**body, "cache_salt": uuid.uuid4().hex}))
    check_response_contract(stack, kind, want)
    stack.run(nothing_held(stack.router, failovers=failovers(stack)))
    response, moved = with_fault(stack, "/v1/responses", {**body, "cache_salt": uuid.uuid4().hex}, fault, after=5)
    assert moved >= 1, "no mesh failed under the answer"
    got = response_answer(stream, response)
    got_values, want_values = [], []
    assert split_logprobs(got, got_values) == split_logprobs(want, want_values), (kind, stream, fault)
    assert got_values == pytest.approx(want_values, abs=1e-3)
