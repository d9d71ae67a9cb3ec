"""One generation asked of /v1/chat/completions, /v1/responses and /v1/completions (the chat template's token ids as its
prompt) is the same generation, whole and streamed: each sampling and generation field means on chat and Responses
what it means on completions (vLLM's and OpenAI's definitions), and the tokens are the ones tests/reference_sampler.py
draws from the model's own logits. Only completions were checked against the reference (test_sampling,
test_failover_features), so a chat or Responses field dropped, renamed, defaulted otherwise, clamped or applied to
other tokens passed every test. Through the whole stack in one process over a tiny random Llama with SmolLM2's
vocabulary and chat template (float32 torch: real logits, so every field here changes the tokens)."""
from __future__ import annotations

import copy
import uuid

import httpx
import pytest
import torch

import tests.reference_sampler as reference
from deployments.ingress import build_app
from model.embedded import ensure_smollm2
from model.tokenizer import load_tokenizer
from model.torch_llama import TorchBackend
from tests.in_process import InProcessRouter, Stack, nothing_held
from tests.test_failover_features import EOS, collect, reference_knobs, reference_logits, sse, tiny_model

CHAT, COMP, RESP = "/v1/chat/completions", "/v1/completions", "/v1/responses"
QUESTION = "hi there, tell me about it"
FEW = {str(t): 12 for t in range(300, 306)}  # a few tokens far likelier than the rest: they repeat, penalties bite
# Chat fields of each group, each where it decides tokens (the random model is flat: its likeliest token has 1-6% of
# the mass); the completion takes the same fields, Responses its own names of them (RESPONSES_NAMES) where it has them.
GROUPS: dict[str, dict] = {
    "defaults": {"seed": 7},  # temperature 1, top_p 1, top_k off, min_p 0, no penalty
    "greedy": {"temperature": 0.0},
    "top-k": {"temperature": 1.0, "top_k": 3, "seed": 11},
    "top-p": {"temperature": 1.0, "top_p": 0.05, "seed": 11},
    "min-p": {"temperature": 0.7, "min_p": 0.3, "seed": 11},
    "temperature": {"temperature": 0.3, "seed": 11},
    "presence": {"presence_penalty": 2.0, "seed": 5, "logit_bias": FEW},
    "frequency": {"frequency_penalty": 1.0, "seed": 5, "logit_bias": FEW},
    "repetition": {"repetition_penalty": 2.0, "seed": 5, "logit_bias": FEW},
    "logit-bias": {"seed": 5, "logit_bias": {"260": 9, "300": 9, "11395": -100}},
    "max-tokens": {"seed": 5, "max_tokens": 7},
    # vLLM's precedence (to_sampling_params: max_completion_tokens or max_tokens)
    "max-completion-tokens": {"seed": 5, "max_tokens": 9, "max_completion_tokens": 5},
    # EOS (2) the greedy choice now and then: the answer ends there, or with ignore_eos runs on past it
    "eos": {"temperature": 0.0, "logit_bias": {"2": 8}},
    "ignore-eos": {"temperature": 0.0, "logit_bias": {"2": 8}, "ignore_eos": True},
    "stop": {"seed": 5, "stop": ["e", "zzz"]},
    "stop-included": {"seed": 5, "stop": ["e"], "include_stop_str_in_output": True},
    # stop ids the bias makes likeliest: masked until min_tokens, the answer stops just after it
    "min-tokens": {"seed": 5, "min_tokens": 10, "stop_token_ids": [300, 301], "logit_bias": {"300": 12, "301": 12}},
    "logprobs": {"seed": 5, "logprobs": True, "top_logprobs": 3},
    "sampled-logprob": {"seed": 5, "logprobs": True},  # the sampled token's alone (top_logprobs 0)
    "n": {"seed": 5, "n": 3, "logprobs": True, "top_logprobs": 1},
}
MAX_TOKENS = 24  # each group's, unless it sets its own
# Responses' names of chat fields, and the chat fields it has no name for (nor has vLLM's ResponsesRequest)
RESPONSES_NAMES = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}
NOT_RESPONSES = {"min_tokens", "stop_token_ids", "n"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-smol")
    tiny_model(path)
    tok = load_tokenizer(ensure_smollm2())

    def backend():
        return TorchBackend(path, num_slots=4, block_size=16, num_blocks=64, max_seq_len=512, dtype=torch.float32,
                            device="cpu")
    s = Stack(tok, backend, prefill_chunk=32, max_prefill_tokens=32, decode_steps=2)
    from transformers import LlamaForCausalLM
    s.reference, s.reference_logits = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), {}
    response = s.post("/tokenize", {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}]})
    assert response.status_code == 200, response.text
    s.prompt = response.json()["tokens"]  # the chat template's ids: the completion's prompt
    assert s.prompt == tok.encode_chat([{"role": "user", "content": QUESTION}], True, None, None, False)
    yield s
    s.close()


def chat_body(fields: dict, stream: bool) -> dict:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
            **fields, "return_token_ids": True, "stream": stream, "cache_salt": uuid.uuid4().hex}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def completion_body(s, fields: dict, stream: bool) -> dict:
    """The chat's request as a completion of its templated prompt: the same fields, in completions' names."""
    body = {**chat_body(fields, stream), "prompt": s.prompt}
    del body["messages"]
    body["max_tokens"] = body.pop("max_completion_tokens", body["max_tokens"])
    if body.pop("logprobs", False):
        body["logprobs"] = body.pop("top_logprobs", 0)
    return body


def responses_body(fields: dict, stream: bool) -> dict | None:
    """The chat's request as Responses asks it (logprobs: included), or None where it has no name for a field."""
    if NOT_RESPONSES & fields.keys():
        return None
    body = {"model": "smollm2", "input": QUESTION, "max_output_tokens": MAX_TOKENS, "stream": stream,
            "cache_salt": uuid.uuid4().hex}
    for name, value in fields.items():
        if name == "logprobs":
            body["include"] = ["message.output_text.logprobs"]
        elif name != "max_tokens" or "max_completion_tokens" not in fields:  # chat's precedence
            body[RESPONSES_NAMES.get(name, name)] = value
    return body


def response_answer(stream: bool, response: httpx.Response) -> dict:
    """A Responses answer's message text, its logprobs as the chat's (token, logprob, alternatives), status and
    output tokens; streamed, its deltas spell the text."""
    assert response.status_code == 200, response.text
    if stream:
        events = sse(response.text)
        assert not [e for e in events if e["type"] in ("error", "response.failed")], events
        (final,) = [e["response"] for e in events if e["type"] in ("response.completed", "response.incomplete")]
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    else:
        final = response.json()
    (message,) = final["output"]
    (content,) = message["content"]
    if stream:
        assert deltas == content["text"]
    lps = [(t["token"], t["logprob"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]])
           for t in content["logprobs"]]
    return {"text": content["text"], "lps": lps, "status": final["status"],
            "output_tokens": final["usage"]["output_tokens"], "temperature": final["temperature"]}


def values(lps: list, top_n: int) -> list[list[float]]:
    """Logprobs as numbers: per token its own, then its top_n likeliest alternatives' (a completion's also lists the
    sampled token beside them when it is not one, as vLLM's do)."""
    return [[lp, *sorted((v for _, v in top), reverse=True)[:top_n]] for _, lp, top in lps]


def same_values(got: list, want: list, top_n: int, tolerance: float = 1e-4) -> None:
    g, w = values(got, top_n), values(want, top_n)
    assert [len(x) for x in g] == [len(x) for x in w], (g, w)
    assert sum(g, []) == pytest.approx(sum(w, []), abs=tolerance)


def check_draws(s, fields: dict, answer: dict) -> None:
    """Each choice's tokens are the reference sampler's draws from the model's own logits after the templated prompt
    (tests.test_failover_features.check_sampling's rules, in vLLM v1's order: min_tokens and logit_bias, then
    penalties, temperature, min_p, top-k, top-p; seeded: choice i keyed on seed + i and its position), its logprobs
    the raw distribution's; it ends at its first stop id (EOS unless ignore_eos, stop_token_ids) or at max_tokens."""
    prompt, n = s.prompt, fields.get("n", 1)
    max_tokens = fields.get("max_completion_tokens") or fields.get("max_tokens", MAX_TOKENS)
    bias = {int(t): b for t, b in fields.get("logit_bias", {}).items()}
    stop_ids = {*([] if fields.get("ignore_eos") else [EOS]), *fields.get("stop_token_ids", [])}
    knobs = reference_knobs(fields)
    top_n = fields.get("top_logprobs", 0)
    assert sorted(answer["choices"]) == list(range(n)), answer
    for index, c in answer["choices"].items():
        ids = c["ids"]
        assert 0 < len(ids) <= max_tokens and not stop_ids & set(ids[:-1]), (index, c)
        if c["finish"] == "length":
            assert len(ids) == max_tokens, (index, c)
        elif "stop" not in fields:
            assert c["finish"] == "stop" and ids[-1] in stop_ids, (index, c)
        seed = None if fields.get("seed") is None else (fields["seed"] + index) % 2**64
        logits = reference_logits(s, prompt + ids)
        if fields.get("logprobs"):
            raw = logits[len(prompt) - 1:-1].log_softmax(-1)
            want = [(0, float(r[t]), [(0, float(v)) for v in r.topk(top_n).values]) for r, t in zip(raw, ids)]
            same_values(c["lps"], want, top_n, tolerance=1e-3)
        for i, token in enumerate(ids):
            row = logits[len(prompt) - 1 + i].clone()
            if i < fields.get("min_tokens", 0):
                row[sorted({EOS, *stop_ids})] = float("-inf")
            row[list(bias)] += torch.tensor(list(bias.values()), dtype=row.dtype)
            reference.check_draw(token, row, prompt, ids[:i], **knobs, seed=seed, what=(index, i))


def same(chat: dict, completion: dict, top_n: int) -> None:
    """A chat answer is its completion's: per choice the token ids, text, finish and logprob values (top_n alternatives
    a token: a completion's also lists the sampled one); and usage."""
    assert chat["usage"] == completion["usage"]
    assert all(len(top) == top_n for c in chat["choices"].values() for _, _, top in c["lps"]), chat
    assert sorted(chat["choices"]) == sorted(completion["choices"])
    for i, c in completion["choices"].items():
        got = chat["choices"][i]
        assert (got["ids"], got["text"], got["finish"]) == (c["ids"], c["text"], c["finish"]), i
        same_values(got["lps"], c["lps"], top_n)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_chat_and_responses_sample_as_the_completion_of_their_prompt(stack, group, stream):
    """Each field group asked of chat, of Responses (where it has the fields) and of completions with the chat
    template's ids as the prompt: one answer, the reference sampler's (check_draws)."""
    fields, top_n = GROUPS[group], GROUPS[group].get("top_logprobs", 0)
    completion = collect(COMP, stream, stack.post(COMP, completion_body(stack, fields, stream)))
    check_draws(stack, fields, completion)
    chat = collect(CHAT, stream, stack.post(CHAT, chat_body(fields, stream)))
    same(chat, completion, top_n)
    if "stop" in fields:  # the stop string bound: the answer ends right before it (or with it, included)
        assert all(c["finish"] == "stop" for c in chat["choices"].values()), chat
    if (body := responses_body(fields, stream)) is not None:
        got, want = response_answer(stream, stack.post(RESP, body)), chat["choices"][0]
        assert (got["text"], got["output_tokens"]) == (want["text"], len(want["ids"])), (got, want)
        assert got["status"] == ("incomplete" if want["finish"] == "length" else "completed"), (got, want)
        assert [(t, [x for x, _ in top]) for t, _, top in got["lps"]] == \
            [(t, [x for x, _ in top]) for t, _, top in want["lps"]]
        same_values(got["lps"], want["lps"], top_n)
    stack.run(nothing_held(stack.router))


def test_the_models_defaults_stand_in_for_what_any_endpoint_leaves_out(stack):
    """A model's generation_config defaults (Tokenizer.sampling_defaults, vLLM's default_sampling_params) stand in for
    a sampling field a request leaves out, on each endpoint alike (vLLM's to_sampling_params for each: the request's
    value, else the server's default, else OpenAI's); a value the request gives wins. Responses' fields are null when
    left out, not OpenAI's 1.0, or the default would never apply."""
    tok = copy.copy(stack.tok)
    tok.sampling_defaults = {"temperature": 0.5, "top_k": 3, "min_p": 0.1}
    app = build_app(InProcessRouter(stack.router), tok, "smollm2")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60)

    def answers(fields: dict) -> tuple[dict, dict, dict]:
        completion = collect(COMP, False, stack.run(client.post(COMP, json=completion_body(stack, fields, False))))
        chat = collect(CHAT, False, stack.run(client.post(CHAT, json=chat_body(fields, False))))
        response = response_answer(False, stack.run(client.post(RESP, json=responses_body(fields, False))))
        return completion, chat, response

    completion, chat, response = answers({"seed": 5})
    check_draws(stack, {"seed": 5, "temperature": 0.5, "top_k": 3, "min_p": 0.1}, completion)
    same(chat, completion, 0)
    assert (response["text"], response["temperature"]) == (chat["choices"][0]["text"], 0.5)
    given = {"seed": 5, "temperature": 1.0, "top_k": -1, "min_p": 0.0}  # the defaults' opposites, given
    completion, chat, response = answers(given)
    check_draws(stack, given, completion)
    same(chat, completion, 0)
    assert (response["text"], response["temperature"]) == (chat["choices"][0]["text"], 1.0)
    stack.run(client.aclose())
    stack.run(nothing_held(stack.router))
