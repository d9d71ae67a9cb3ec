"""Request fields as OpenAI SDKs send them: null means the default, `echo`, `user`, and the known OpenAI
fields this server does not implement (a 400 naming each, never silently ignored)."""
from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest

from deployments import openai_server
from deployments.protocol import MAX_SALT_CHARS, MAX_STREAM_INTERVAL
from deployments.request_checks import bad_words_token_ids
from tests.ingress_support import (ANSWER, CHAT, COMPLETION, ENDPOINTS, MAX_LEN, MODEL, assert_error,  # noqa: F401
                                   client, eos, make_client, post, router, sse, tokenizer)

# Every optional request field, sent as null: each must mean that field's default.
SHARED_NULLS = ["model", "stream", "stream_options", "temperature", "top_p", "top_k", "seed", "stop",
                "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
                "ignore_eos", "n", "user", "cache_salt", "include_stop_str_in_output", "min_p", "skip_special_tokens",
                "truncate_prompt_tokens", "prompt_logprobs", "use_beam_search", "length_penalty", "allowed_token_ids",
                "bad_words", "return_tokens_as_token_ids", "spaces_between_special_tokens", "return_token_ids",
                "detokenize", "priority", "prompt_embeds", "logits_processors", "guided_whitespace_pattern",
                "vllm_xargs", "kv_transfer_params", "request_id", "truncation_side",
                "logprob_token_ids", "best_of", "structural_tag", "ec_transfer_params", "thinking_token_budget",
                "stream_interval"]
CHAT_NULLS = ["max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "service_tier", "modalities", "audio",
              "prediction", "web_search_options", "functions", "function_call", "add_generation_prompt",
              "continue_final_message", "reasoning_effort", "verbosity", "store", "chat_template", "echo",
              "chat_template_kwargs", "documents", "add_special_tokens", "metadata", "return_prompt_text"]
COMPLETION_NULLS = ["logprobs", "echo", "suffix", "add_special_tokens", "max_completion_tokens"]


@pytest.mark.parametrize("path, base, fields", [("/v1/chat/completions", CHAT, SHARED_NULLS + CHAT_NULLS),
                                                ("/v1/completions", COMPLETION, SHARED_NULLS + COMPLETION_NULLS)])
def test_null_means_the_default(client, router, path, base, fields):
    plain = client.post(path, json=base)
    nulls = client.post(path, json={**base, **dict.fromkeys(fields)})
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["choices"] == plain.json()["choices"]
    (_, params_plain, salt_plain), (_, params_nulls, salt_nulls) = router.requests.values()
    assert params_nulls == params_plain and salt_nulls == salt_plain


def test_a_developer_message_is_served_as_openai_sends_it(client, router, tokenizer):
    """OpenAI's chat API takes "developer" for the system's instructions (its SDKs send it for o-series models and
    agents pass it on), and vLLM hands any role to the template: it is a turn of the prompt, not a 400."""
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert r.status_code == 200, r.text
    ((prompt, _, _),) = router.requests.values()
    assert prompt == tokenizer.encode_chat(messages)  # the template's own rendering of the role


def test_null_inside_nested_objects_means_the_default(client, router):
    r = client.post("/v1/chat/completions", json={
        **CHAT, "stream": True, "stream_options": {"include_usage": None, "continuous_usage_stats": None},
        "messages": [{"role": "user", "content": "hi", "name": None}]})
    chunks = sse(r)
    assert all(c["usage"] is None for c in chunks)


@pytest.mark.parametrize("path, base, field", [("/v1/chat/completions", CHAT, "messages"),
                                               ("/v1/completions", COMPLETION, "prompt")])
def test_a_required_field_sent_as_null_is_400(client, path, base, field):
    assert_error(client.post(path, json={**base, field: None}), 400, param=field)


@pytest.mark.parametrize("path, base, patch, param", [
    ("/v1/chat/completions", CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", CHAT, {"modalities": ["text", "audio"]}, "modalities.1"),
    ("/v1/chat/completions", CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", CHAT, {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", CHAT, {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", CHAT, {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", CHAT, {"service_tier": "flex"}, "service_tier"),
    ("/v1/completions", COMPLETION, {"suffix": "the end"}, "suffix"),
    ("/v1/completions", COMPLETION, {"best_of": 3}, "best_of"),
    ("/v1/completions", COMPLETION, {"n": 2, "best_of": 1}, "best_of"),  # fewer candidates than choices
    ("/v1/chat/completions", CHAT, {"best_of": 3}, "best_of"),  # vLLM's chat field too: it was ignored
    ("/v1/chat/completions", CHAT, {"n": 2, "best_of": 1}, "best_of"),
    ("/v1/chat/completions", CHAT, {"structural_tag": '{"type": "structural_tag"}'}, "structural_tag"),  # vLLM's
    ("/v1/completions", COMPLETION, {"structural_tag": '{"type": "structural_tag"}'}, "structural_tag"),
    ("/v1/chat/completions", CHAT, {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", COMPLETION, {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", COMPLETION, {"prompt_logprobs": -1}, "prompt_logprobs"),  # vLLM's whole vocabulary: > 20
    ("/v1/chat/completions", CHAT, {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", COMPLETION, {"use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", CHAT, {"length_penalty": 0.5}, "length_penalty"),
    ("/v1/completions", COMPLETION, {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/completions", COMPLETION, {"truncate_prompt_tokens": 10_000}, "truncate_prompt_tokens"),  # > the context
    ("/v1/chat/completions", CHAT, {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", CHAT, {"verbosity": "low"}, "verbosity"),
    ("/v1/chat/completions", CHAT, {"store": True}, "store"),
    ("/v1/chat/completions", CHAT, {"chat_template": "{{ messages }}"}, "chat_template"),
    ("/v1/chat/completions", CHAT, {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ("/v1/chat/completions", CHAT, {"priority": 1}, "priority"),  # as vLLM without its priority policy
    ("/v1/completions", COMPLETION, {"prompt_embeds": "AAAA"}, "prompt_embeds"),
    ("/v1/completions", COMPLETION, {"logprobs": 1, "logprob_token_ids": [5, 6]}, "logprob_token_ids"),
    ("/v1/chat/completions", CHAT, {"logprobs": True, "logprob_token_ids": [5]}, "logprob_token_ids"),
    ("/v1/completions", COMPLETION, {"logits_processors": ["my.module:Proc"]}, "logits_processors"),
    ("/v1/chat/completions", CHAT, {"documents": [{"title": "t", "text": "x"}]}, "documents"),
    ("/v1/completions", COMPLETION, {"vllm_xargs": {"k": 1}}, "vllm_xargs"),
    ("/v1/chat/completions", CHAT, {"kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
    # vLLM's, which were ignored: an encoder cache to transfer, a thinking budget (vLLM too refuses one for a model
    # without a reasoning config), the templated prompt's text in the answer
    ("/v1/completions", COMPLETION, {"ec_transfer_params": {"do_remote_encode": True}}, "ec_transfer_params"),
    ("/v1/chat/completions", CHAT, {"thinking_token_budget": 100}, "thinking_token_budget"),
    ("/v1/completions", COMPLETION, {"thinking_token_budget": 0}, "thinking_token_budget"),
    ("/v1/chat/completions", CHAT, {"return_prompt_text": True}, "return_prompt_text"),
    ("/v1/chat/completions", CHAT, {"structured_outputs": {"json": {}, "structural_tag": "{}"}},
     "structured_outputs.structural_tag"),
])
def test_a_known_field_the_server_does_not_implement_is_400_naming_it(client, router, path, base, patch, param):
    assert_error(client.post(path, json={**base, **patch}), 400, param=param)
    assert router.requests == {}


@pytest.mark.parametrize("path, base, patch, why", [
    ("/v1/chat/completions", CHAT, {"store": True}, "stores no answers"),
    ("/v1/completions", COMPLETION, {"best_of": 2}, "ranking several samples"),
    ("/v1/chat/completions", CHAT, {"best_of": 2}, "ranking several samples"),
    ("/v1/completions", COMPLETION, {"use_beam_search": True}, "beam search"),
    ("/v1/chat/completions", CHAT, {"priority": 1}, "order of arrival"),
])
def test_a_field_taken_at_one_value_only_says_why(client, path, base, patch, why):
    (param,) = patch
    error = assert_error(client.post(path, json={**base, **patch}), 400, param=param)
    assert why in error["message"] and "Input should be" not in error["message"]


@pytest.mark.parametrize("path, base, patch, why", [
    ("/v1/chat/completions", CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "text only"),
    ("/v1/chat/completions", CHAT, {"functions": [{"name": "f", "parameters": {}}]}, "send tools"),
    ("/v1/chat/completions", CHAT, {"function_call": "auto"}, "send tool_choice"),
    ("/v1/chat/completions", CHAT, {"reasoning_effort": "low"}, "does not reason"),
    ("/v1/chat/completions", CHAT, {"documents": [{"title": "t", "text": "x"}]}, "put them in the messages"),
    ("/v1/chat/completions", CHAT, {"kv_transfer_params": {"do_remote_prefill": True}}, "disaggregated"),
    ("/v1/completions", COMPLETION, {"suffix": "the end"}, "fill-in-the-middle"),
    ("/v1/completions", COMPLETION, {"vllm_xargs": {"k": 1}}, "logits processors"),
    ("/v1/completions", COMPLETION, {"prompt_embeds": "AAAA"}, "not embeddings"),
    ("/v1/completions", COMPLETION, {"structural_tag": '{"type": "structural_tag"}'}, "json schema, regex"),
])
def test_a_refused_field_says_why(client, path, base, patch, why):
    """A refusal that said only "this server does not support this field" left the client guessing what to send."""
    (param,) = patch
    error = assert_error(client.post(path, json={**base, **patch}), 400, param=param)
    assert why in error["message"], error


@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_best_of_equal_to_n_is_n_samples(client, path, base):
    """As vLLM V1 takes it (it refuses only a best_of that would rank): it was refused as ranking."""
    r = client.post(path, json={**base, "n": 2, "best_of": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


@pytest.mark.parametrize("patch", [
    {"service_tier": "auto"}, {"service_tier": "default"}, {"modalities": ["text"]}, {"user": "user-1234"},
    {"some_vendor_extra": {"x": 1}}, {"metadata": {"k": "v"}}, {"store": False},
    {"thinking_token_budget": -1}, {"return_prompt_text": False},  # vLLM's unset budget, its default
])
def test_harmless_and_unknown_fields_are_accepted(client, patch):
    r = client.post("/v1/chat/completions", json={**CHAT, **patch})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.parametrize("metadata, param", [
    ({"k": 5}, "metadata.k"), ("k", "metadata"), ({str(i): "v" for i in range(17)}, "metadata"),
    ({"k": "v" * 513}, "metadata.k"), ({"k" * 65: "v"}, "metadata." + "k" * 65),
])
def test_chat_metadata_is_checked_as_openai_checks_it(client, router, metadata, param):
    """OpenAI's chat `metadata` (as /v1/responses's): 16 pairs of strings, keys of 64 characters, values of 512; any
    JSON was taken."""
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "metadata": metadata}), 400, param=param)
    assert router.requests == {}


def test_an_error_names_a_clients_long_key_cut_short(client, router):
    """The key of an over-long metadata entry is a field path the error names: a 100,000-character key made a 200 KB
    error body (in param and in the message)."""
    response = client.post("/v1/chat/completions", json={**CHAT, "metadata": {"k" * 100_000: "v"}})
    error = assert_error(response, 400)
    assert len(response.content) < 1000 and error["param"] == "metadata." + "k" * 200 + "..."


@pytest.mark.parametrize("path, base", ENDPOINTS)
@pytest.mark.parametrize("field", ["model", "user", "cache_salt", "request_id"])
def test_a_lone_surrogate_in_any_text_field_is_400(client, router, path, base, field):
    error = assert_error(post(client, path, {**base, field: "x\ud800"}), 400, param=field)
    assert "lone surrogate" in error["message"]
    assert router.requests == {}


# ---- echo ---------------------------------------------------------------------------------------

def test_echo_puts_the_prompt_first(client, tokenizer):
    body = client.post("/v1/completions", json={**COMPLETION, "echo": True, "n": 2, "max_tokens": 4}).json()
    answer = tokenizer.decode(tokenizer.encode(ANSWER)[:4])
    assert [c["text"] for c in body["choices"]] == [COMPLETION["prompt"] + answer] * 2
    assert body["usage"]["completion_tokens"] == 8  # the echoed prompt is not generated


def test_echo_of_a_token_prompt_is_its_text(client, tokenizer):
    ids = tokenizer.encode("Token prompt")
    body = client.post("/v1/completions", json={**COMPLETION, "prompt": ids, "echo": True, "max_tokens": 2}).json()
    assert body["choices"][0]["text"].startswith("Token prompt")


def test_echo_streams_the_prompt_in_each_choices_first_chunk(client):
    chunks = sse(client.post("/v1/completions", json={**COMPLETION, "echo": True, "stream": True, "n": 2,
                                                      "max_tokens": 64}))
    for i in range(2):
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i]
        assert texts[0].startswith(COMPLETION["prompt"])
        assert "".join(texts) == COMPLETION["prompt"] + ANSWER


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_is_the_prompt_alone(client, router, stream):
    """OpenAI's legacy API and vLLM (echo_without_generation) answer the prompt itself, generating nothing; it
    was a 400. Without echo, 0 is still a 400 naming max_tokens."""
    body = {**COMPLETION, "prompt": [COMPLETION["prompt"], "Two"], "echo": True, "max_tokens": 0, "n": 2,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    if stream:
        chunks = sse(response)
        choices = [c for chunk in chunks for c in chunk["choices"]]
        texts = {i: "".join(c["text"] for c in choices if c["index"] == i) for i in range(4)}
        reasons = {c["index"]: c["finish_reason"] for c in choices if c["finish_reason"]}
        usage = chunks[-1]["usage"]
    else:
        answer = response.json()
        texts = {c["index"]: c["text"] for c in answer["choices"]}
        reasons = {c["index"]: c["finish_reason"] for c in answer["choices"]}
        usage = answer["usage"]
    assert texts == {0: COMPLETION["prompt"], 1: COMPLETION["prompt"], 2: "Two", 3: "Two"}
    assert reasons == dict.fromkeys(range(4), "length") and usage["completion_tokens"] == 0
    assert router.requests == {}  # nothing asked of the meshes
    assert_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 0}), 400, param="max_tokens")


def test_no_echo_by_default(client):
    body = {**COMPLETION, "max_tokens": 64}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == ANSWER


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_include_stop_str_in_output_keeps_the_stop_string(client, stream, include):
    stop = "answer is"
    body = {**COMPLETION, "stop": [stop], "include_stop_str_in_output": include, "stream": stream}
    r = client.post("/v1/completions", json=body)
    text = ("".join(c["choices"][0]["text"] for c in sse(r)) if stream else r.json()["choices"][0]["text"])
    end = ANSWER.index(stop) + (len(stop) if include else 0)
    assert text == ANSWER[:end]


def test_add_generation_prompt_false_leaves_out_the_assistant_header(client, router, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    for add in (True, False):
        assert client.post("/v1/chat/completions", json={**CHAT, "add_generation_prompt": add}).status_code == 200
    (with_header, _, _), (without, _, _) = router.requests.values()
    assert with_header == tokenizer.encode_chat(messages, True) and without == tokenizer.encode_chat(messages, False)
    assert with_header != without


def test_completion_top_logprobs_hold_the_chosen_token_even_when_it_is_not_among_the_likeliest(client, tokenizer):
    from scheduler.sampling import TokenLogprobs
    server = client.app.state.server
    chosen, likely = tokenizer.encode(" cat")[0], tokenizer.encode(" dog")[0]
    lp = server.logprobs.completion([TokenLogprobs(chosen, -7.0, [(likely, -0.1)])], [0])
    assert lp.top_logprobs == [{" cat": -7.0, " dog": -0.1}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_stop_reason_names_the_stop_string_or_token_that_ended_the_answer(client, tokenizer, eos, path, base, stream):
    ids = tokenizer.encode(ANSWER)
    i = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    cases = [({}, "stop", None),  # the tokenizer's EOS: None, as in vLLM
             ({"ignore_eos": True, "stop_token_ids": [eos]}, "stop", eos),  # the EOS as a stop id: vLLM names it
             ({"stop": ["answer is", "world"]}, "stop", "world"),  # the one found first in the text
             ({"stop_token_ids": [ids[i]]}, "stop", ids[i]),
             ({"max_tokens": 2}, "length", None)]
    for patch, finish, stop_reason in cases:
        r = client.post(path, json={**base, "max_tokens": 64, **patch, "stream": stream})
        choices = r.json()["choices"] if not stream else [
            c["choices"][0] for c in sse(r) if c["choices"] and c["choices"][0]["finish_reason"]]
        assert [(c["finish_reason"], c["stop_reason"]) for c in choices] == [(finish, stop_reason)], patch


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_token_ends_the_answer_without_its_text_unless_asked(client, tokenizer, stream):
    """vLLM (v1 detokenizer): the stop token counts as a generated token, its text is left out unless
    include_stop_str_in_output."""
    ids = tokenizer.encode(ANSWER)
    i = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    for include in (False, True):
        body = {**COMPLETION, "max_tokens": 64, "stop_token_ids": [ids[i]], "include_stop_str_in_output": include,
                "stream": stream, "stream_options": {"include_usage": True} if stream else None}
        r = client.post("/v1/completions", json=body)
        chunks = sse(r) if stream else [r.json()]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == tokenizer.decode(ids[:i + include]), include
        assert chunks[-1]["usage"]["completion_tokens"] == i + 1


def test_a_completion_without_max_tokens_gets_16_and_a_chat_the_context_left(client, router):
    """OpenAI's completions default (and vLLM's) is 16 tokens; chat has no such default."""
    router.answer = list(range(100, 140))
    for path, base, expected in [("/v1/completions", COMPLETION, 16), ("/v1/chat/completions", CHAT, 40),
                                 ("/v1/chat/completions", {**CHAT, "max_tokens": None}, 40)]:
        usage = client.post(path, json=base).json()["usage"]
        assert usage["completion_tokens"] == expected, (path, base)


@pytest.mark.parametrize("stream", [False, True])
def test_a_completions_explicit_null_max_tokens_is_the_context_left_as_in_vllm(client, router, stream):
    """vLLM's CompletionRequest defaults max_tokens to 16, but its null reaches get_max_tokens as no limit: the room
    the prompt leaves in the context (vllm/entrypoints/openai/completion/serving.py). It was 16 here, as if left
    out. A max_completion_tokens beside the null still sets the limit (the null says nothing)."""
    router.answer = list(range(100, 140))
    for extra, expected in [({}, 40), ({"max_completion_tokens": 5}, 5)]:
        router.requests.clear()
        body = {**COMPLETION, "max_tokens": None, "stream": stream, **extra,
                "stream_options": {"include_usage": True} if stream else None}
        r = client.post("/v1/completions", json=body)
        usage = sse(r)[-1]["usage"] if stream else r.json()["usage"]
        assert usage["completion_tokens"] == expected, (body, r.text[-300:])
        ((_, params, _),) = router.requests.values()
        assert params.max_tokens == (MAX_LEN - usage["prompt_tokens"] if not extra else 5)


def test_a_completions_max_completion_tokens_is_taken_only_where_it_agrees_with_max_tokens(client, router):
    """Load generators send chat's max_completion_tokens to /v1/completions too: alone or equal to max_tokens it is the
    limit; a different one is a 400 naming it, not one of the two picked silently."""
    for extra, expected in [({"max_completion_tokens": 5}, 5), ({"max_tokens": 7, "max_completion_tokens": 7}, 7)]:
        router.requests.clear()
        assert client.post("/v1/completions", json={**COMPLETION, **extra}).status_code == 200
        ((_, params, _),) = router.requests.values()
        assert params.max_tokens == expected
    router.requests.clear()
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 7, "max_completion_tokens": 5})
    assert_error(r, 400, param="max_completion_tokens")
    assert not router.requests


@pytest.mark.parametrize("logprobs, prompt_logprobs", [(1, 3), (3, 1)])
def test_echo_logprobs_beside_prompt_logprobs_score_the_prompt_with_the_larger_count(client, router, logprobs,
                                                                                      prompt_logprobs):
    """Completions' echo with logprobs lists the prompt's tokens with `logprobs` alternatives, vLLM's prompt_logprobs
    with its own count: the mesh scores the prompt once, so with the larger of the two, and each field gets its own."""
    body = {**COMPLETION, "echo": True, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    ((_, params, _),) = router.requests.values()
    assert params.prompt_logprobs == 3
    choice = r.json()["choices"][0]
    ranks = {entry["rank"] for entry in choice["prompt_logprobs"][1].values()}
    assert set(range(1, prompt_logprobs + 1)) <= ranks
    assert len(choice["logprobs"]["top_logprobs"][1]) >= logprobs


def test_nan_or_infinite_numbers_are_refused_as_such(client):
    r = client.post("/v1/completions", content='{"model": "%s", "prompt": "x", "temperature": NaN}' % COMPLETION["model"],
                    headers={"content-type": "application/json"})
    error = assert_error(r, 400, param="temperature")
    assert "finite" in error["message"]


@pytest.mark.parametrize("content, headers", [(b"", {}), (b"", {"content-type": "application/json"}),
                                              (b'"a string"', {"content-type": "application/json"}),
                                              (b"[1, 2]", {"content-type": "application/json"}),
                                              (b'{"model": "x", "prompt": "hi"}', {"content-type": "text/plain"})])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_that_is_no_json_object_is_told_so(client, path, content, headers):
    error = assert_error(client.post(path, content=content, headers=headers), 400)
    assert "JSON object" in error["message"] or "not valid JSON" in error["message"], error


@pytest.mark.parametrize("content", [b'{"model": "smollm2", "prompt": "hi",}', b'{"prompt": "hi"'])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/invocations"])
def test_a_body_that_is_not_json_is_400_as_openai_and_vllm_answer(client, router, path, content):
    """A trailing comma or a cut body is the client's malformed request: OpenAI answers 400 ("We could not parse
    the JSON body of your request") and vLLM turns FastAPI's 422 into a 400 (a 422 says a field failed validation)."""
    error = assert_error(client.post(path, content=content, headers={"content-type": "application/json"}), 400)
    assert error["message"].startswith("The body is not valid JSON") and error["param"] is None
    assert router.requests == {}


@pytest.mark.parametrize("pad", [0, 70_000])  # FastAPI's parse, and large_body's past OFF_LOOP_BYTES
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/invocations",
                                  "/tokenize"])
def test_a_body_that_is_not_utf8_is_told_so(client, router, path, pad):
    """JSON is UTF-8 (RFC 8259 8.1: no charset parameter is defined for it, and none is read here, as none is in
    FastAPI or vLLM). A body in Latin-1, as a client that names `charset=iso-8859-1` sends it, was FastAPI's bare
    "There was an error parsing the body", which says nothing of what to send instead."""
    latin1 = {"content-type": "application/json; charset=iso-8859-1"}
    body = b'{"model": "smollm2", "prompt": "caf\xe9", "user": "' + b"u" * pad + b'"}'
    error = assert_error(client.post(path, content=body, headers=latin1), 400)
    assert "UTF-8" in error["message"], error
    assert router.requests == {}
    assert client.post("/v1/completions", content=json.dumps(COMPLETION).encode(), headers=latin1).status_code == 200


def test_vllm_sampling_extras_reach_the_sampler(client, router):
    client.post("/v1/completions", json={**COMPLETION, "min_p": 0.25, "skip_special_tokens": False})
    client.post("/v1/completions", json={**COMPLETION, "min_p": 0.25, "temperature": 0})
    (_, sampled, _), (_, greedy, _) = router.requests.values()
    assert (sampled.min_p, sampled.skip_special_tokens) == (0.25, False)
    assert greedy.min_p == 0.0  # argmax ignores it: the request stays sampleable on a Galaxy's device


@pytest.mark.parametrize("path, base, field", [("/v1/completions", COMPLETION, "prompt"),
                                               ("/v1/chat/completions", CHAT, "messages")])
def test_truncate_prompt_tokens_takes_a_text_far_longer_than_the_context(client, router, path, base, field):
    """Without it such text is refused untokenized; with it only its end counts (vLLM tokenizes, then cuts)."""
    text = "word " * 20_000
    body = {**base, "prompt": text} if field == "prompt" else {**base, "messages": [{"role": "user", "content": text}]}
    assert_error(client.post(path, json=body), 400, param=field)
    r = client.post(path, json={**body, "truncate_prompt_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize("path, base, max_tokens", [("/v1/completions", COMPLETION, 5),
                                                    ("/v1/completions", COMPLETION, None),
                                                    ("/v1/chat/completions", CHAT, 5)])
def test_truncate_prompt_tokens_minus_one_leaves_room_for_max_tokens(client, router, path, base, max_tokens):
    """vLLM's -1 keeps the context less max_tokens (a completion's default 16): a prompt longer than the context
    is answered. Cut to the whole context, it left no room for any answer, a 400 whatever max_tokens was."""
    text = "word " * 2_000
    body = {**base, "prompt": text} if "prompt" in base else {**base, "messages": [{"role": "user", "content": text}]}
    sized = {} if max_tokens is None else {"max_tokens": max_tokens}  # left out: the default (null sets no limit)
    r = client.post(path, json={**body, "truncate_prompt_tokens": -1, **sized})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == MAX_LEN - (max_tokens or 16)


def test_chat_template_kwargs_reach_the_template(client, router, tokenizer):
    """Variables the template does not use change nothing (as in vLLM); see test_tokenizer for one it uses."""
    for kwargs in (None, {"enable_thinking": False}):
        assert client.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": kwargs}).status_code == 200
    plain, with_kwargs = (ids for ids, _, _ in router.requests.values())
    assert plain == with_kwargs


@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, router, tokenizer, path, base):
    """vLLM's truncate_prompt_tokens: the prompt's last k token ids (left truncation); -1 cuts nothing that fits."""
    full = client.post(path, json=base).json()["usage"]["prompt_tokens"]
    cut = client.post(path, json={**base, "truncate_prompt_tokens": 3}).json()["usage"]["prompt_tokens"]
    first, second = router.requests.values()
    assert (cut, second[0]) == (3, first[0][-3:]) and full > 3
    assert client.post(path, json={**base, "truncate_prompt_tokens": -1}).json()["usage"]["prompt_tokens"] == full


def test_truncate_prompt_tokens_keeps_the_bos_before_a_text_prompt(client, router, tokenizer, monkeypatch):
    """Left truncation of a text keeps the BOS the tokenizer puts before it (Llama 3's <|begin_of_text|>), as Hugging
    Face's truncation, vLLM's, does: cut off, the model read the text's end as if mid-document. Ids are cut as given."""
    monkeypatch.setattr(tokenizer, "bos_id", 1)  # a tokenizer that prepends a BOS (SmolLM2's does not)
    text = "one two three four five six"
    client.post("/v1/completions", json={**COMPLETION, "prompt": text})
    client.post("/v1/completions", json={**COMPLETION, "prompt": text, "truncate_prompt_tokens": 3})
    client.post("/v1/completions", json={**COMPLETION, "prompt": [1, 5, 6, 7, 8], "truncate_prompt_tokens": 3})
    client.post("/v1/completions", json={**COMPLETION, "prompt": text, "truncate_prompt_tokens": 50})  # all fit
    full, cut, ids, whole = (ids for ids, _, _ in router.requests.values())
    assert full[0] == 1 and len(full) > 3 and cut == [1, *full[-2:]]
    assert ids == [6, 7, 8]
    assert whole == full  # one BOS: a cut past the prompt's start left two


@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_truncation_side_right_keeps_the_prompts_first_tokens(client, router, path, base):
    """vLLM's truncation_side: "right" cuts the prompt's end, keeping its first k tokens; "left" is the default."""
    for side in ("right", "left"):
        assert client.post(path, json={**base, "truncate_prompt_tokens": 3, "truncation_side": side}).status_code == 200
    client.post(path, json=base)
    right, left, full = (ids for ids, _, _ in router.requests.values())
    assert (right, left) == (full[:3], full[-3:]) and right != left


def test_truncation_side_takes_left_or_right_only(client, router):
    assert_error(client.post("/v1/completions", json={**COMPLETION, "truncate_prompt_tokens": 3,
                                                      "truncation_side": "middle"}), 400, param="truncation_side")
    assert router.requests == {}


@pytest.mark.parametrize("stream", [False, True])
def test_skip_special_tokens_false_keeps_their_text(client, router, tokenizer, eos, stream):
    """vLLM's skip_special_tokens (default true): false puts a special token's text (<|im_end|>) in the answer."""
    end = eos
    router.answer = tokenizer.encode("Hi") + [end] + tokenizer.encode(" there")
    for skip, expected in ((True, "Hi there"), (False, f"Hi{tokenizer.decode([end])} there")):
        r = client.post("/v1/completions", json={**COMPLETION, "ignore_eos": True, "skip_special_tokens": skip,
                                                 "stream": stream, "logprobs": 0})
        chunks = sse(r) if stream else [r.json()]
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert "".join(c["text"] for c in choices) == expected
        offsets = [o for c in choices if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        assert offsets[-1] == len(expected) - len(" there")  # the offsets count the special token's text too


def test_continuous_usage_stats_needs_include_usage_as_in_vllm(client):
    for options, usage in (({"continuous_usage_stats": True}, False),
                           ({"continuous_usage_stats": True, "include_usage": True}, True)):
        chunks = sse(client.post("/v1/completions", json={**COMPLETION, "stream": True, "stream_options": options}))
        token_chunks = [c for c in chunks if c["choices"]]
        assert all((c.get("usage") is not None) == usage for c in token_chunks), options


def _choice_chunks(chunks: list, index: int) -> list[dict]:
    """Choice `index`'s chunks that carry its tokens (a chat's role chunk carries none), in order."""
    return [c for chunk in chunks for c in chunk.get("choices", ())  # an error event has none
            if c["index"] == index and c.get("token_ids") is not None]


def _text(c: dict) -> str:
    return c["delta"].get("content") or "" if "delta" in c else c["text"]


def _logprobs(c: dict) -> list:
    if "delta" in c:
        return c["logprobs"]["content"]
    lps = c["logprobs"]
    return list(zip(lps["tokens"], lps["token_logprobs"], lps["top_logprobs"], lps["text_offset"]))


@pytest.mark.parametrize("interval", [2, 3])  # 2: the least that changes a stream
@pytest.mark.parametrize("stop", [None, "answer is"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_stream_interval_sends_a_choices_tokens_that_many_at_a_time_as_vllm(client, path, base, n, stop, interval):
    """vLLM's stream_interval (its output processor's rule): each choice's first token goes at once, then a chunk per
    `interval` tokens (a lagging reader's join whole intervals), the rest with the finish; text, tokens, logprobs
    (with their tokens) and usage are the default stream's. It was taken and ignored: a chunk per router event."""
    logprobs = {"logprobs": True} if path == "/v1/chat/completions" else {"logprobs": 1}
    body = {**base, "stream": True, "n": n, "stop": stop, "return_token_ids": True,
            "stream_options": {"include_usage": True}, **logprobs}
    plain = sse(client.post(path, json=body))
    chunks = sse(client.post(path, json={**body, "stream_interval": interval}))
    assert chunks[-1]["usage"] == plain[-1]["usage"] and chunks[-1]["choices"] == []
    for i in range(n):
        ours, theirs = _choice_chunks(chunks, i), _choice_chunks(plain, i)
        sizes = [len(c["token_ids"]) for c in ours]
        rest = (sum(sizes) - 1) % interval
        assert sizes[0] == 1 and all(s % interval == 0 for s in sizes[1:-1]) and sizes[-1] == (rest or interval), sizes
        assert [c["finish_reason"] for c in ours] == [None] * (len(ours) - 1) + [theirs[-1]["finish_reason"]]
        assert [t for c in ours for t in c["token_ids"]] == [t for c in theirs for t in c["token_ids"]]
        assert "".join(map(_text, ours)) == "".join(map(_text, theirs))
        assert [lp for c in ours for lp in _logprobs(c)] == [lp for c in theirs for lp in _logprobs(c)]
        assert all(len(_logprobs(c)) == len(c["token_ids"]) for c in ours)  # each token's logprob comes with it
    if stop:
        assert "".join(map(_text, _choice_chunks(chunks, 0))) == ANSWER[:ANSWER.index(stop)]


def test_a_stream_interval_sends_the_tokens_it_held_before_an_error(client, router):
    """The tokens a chunk waited for are sent before the error event, as the default stream sent them."""
    router.fail_with_error_after = 5  # the first token, a chunk of 3, then one held when the mesh fails the request
    body = {**COMPLETION, "stream": True, "return_token_ids": True}
    plain, chunks = sse(client.post("/v1/completions", json=body)), sse(client.post("/v1/completions", json={
        **body, "stream_interval": 3}))
    assert [len(c["token_ids"]) for c in _choice_chunks(chunks, 0)] == [1, 3, 1]
    assert "".join(map(_text, _choice_chunks(chunks, 0))) == "".join(map(_text, _choice_chunks(plain, 0)))
    assert chunks[-1]["error"] == plain[-1]["error"] and "failed on this request" in chunks[-1]["error"]["message"]


def test_the_longest_stream_interval_sends_the_first_token_then_the_rest_with_the_finish(client):
    """MAX_STREAM_INTERVAL, the bound itself, is taken: longer than any answer, its stream is two chunks."""
    body = {**COMPLETION, "stream": True, "return_token_ids": True}
    plain = _choice_chunks(sse(client.post("/v1/completions", json=body)), 0)
    chunks = _choice_chunks(sse(client.post("/v1/completions", json={**body, "stream_interval": MAX_STREAM_INTERVAL})),
                            0)
    assert [len(c["token_ids"]) for c in chunks] == [1, sum(len(c["token_ids"]) for c in plain) - 1]
    assert "".join(map(_text, chunks)) == "".join(map(_text, plain))
    assert chunks[-1]["finish_reason"] == plain[-1]["finish_reason"] is not None


@pytest.mark.parametrize("value", [0, -1, MAX_STREAM_INTERVAL + 1, 2.0])
@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_a_stream_interval_below_1_or_past_any_answer_is_400(client, router, path, base, value):
    assert_error(client.post(path, json={**base, "stream": True, "stream_interval": value}), 400,
                 param="stream_interval")
    assert router.requests == {}


def test_a_model_is_retrieved_by_its_id_and_the_version_is_served(client):
    """OpenAI's GET /v1/models/{model} (the SDK's models.retrieve), and vLLM's GET /version."""
    name = COMPLETION["model"]
    card = client.get(f"/v1/models/{name}").json()
    listed = client.get("/v1/models").json()["data"][0]
    assert (card["id"], card["object"], card["max_model_len"]) == (name, "model", listed["max_model_len"])
    for other in ("gpt-4o", ""):  # a request body's "" is the served model, but no model has the id ""
        error = assert_error(client.get(f"/v1/models/{other}"), 404, param="model")
        assert error["code"] == "model_not_found"
    assert client.get("/version").json()["version"]


def test_every_served_name_is_accepted_and_the_first_answered(router, tokenizer):
    """As vLLM's served_model_name: a client may give the hub id where the server lists the short name."""
    from fastapi.testclient import TestClient

    from deployments.ingress import build_app
    client = TestClient(build_app(router, tokenizer, ["llama", "meta-llama/Llama-3.3-70B-Instruct"]))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["llama"]
    for name in ("llama", "meta-llama/Llama-3.3-70B-Instruct"):
        out = client.post("/v1/chat/completions", json={**CHAT, "model": name})
        assert (out.status_code, out.json()["model"]) == (200, "llama")
        assert client.get(f"/v1/models/{name}").json()["id"] == name
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "Llama-3.3-70B-Instruct"}), 404,
                 param="model")


@pytest.mark.parametrize("path, base, prefix", [("/v1/chat/completions", CHAT, "chatcmpl"),
                                                 ("/v1/completions", COMPLETION, "cmpl")])
def test_request_id_names_the_response_and_two_clients_may_share_one(client, router, path, base, prefix):
    """vLLM's request_id: the response's id; the router's ids stay unique, so a reused one is no conflict."""
    for stream in (False, True):
        body = {**base, "request_id": "job-7", "n": 2, "stream": stream}
        r = client.post(path, json=body)
        ids = {c["id"] for c in sse(r)} if stream else {r.json()["id"]}
        assert ids == {f"{prefix}-job-7"}
    assert len(router.requests) == 4 and all(rid.startswith(f"{prefix}-job-7-") for rid in router.requests)


@pytest.mark.parametrize("path, base, prefix", [("/v1/chat/completions", CHAT, "chatcmpl"),
                                                 ("/v1/completions", COMPLETION, "cmpl")])
def test_the_routers_ids_begin_with_the_id_the_client_sees(client, router, path, base, prefix):
    """One grep of the id a client reports (X-Request-Id, request_id, the response's id) finds its request in the
    router's and the mesh's logs too; a newline in it cannot forge a log line there."""
    assert client.post(path, json=base, headers={"X-Request-Id": "trace-42"}).status_code == 200
    assert client.post(path, json={**base, "request_id": "a\nERROR forged", "n": 2}).status_code == 200
    unnamed = client.post(path, json=base).json()["id"]
    named, *forged, last = router.requests
    assert named.startswith(f"{prefix}-trace-42-") and last.startswith(f"{unnamed}-")
    assert len(forged) == 2 and all(rid.startswith(f"{prefix}-a?ERROR forged-") for rid in forged)


@pytest.mark.parametrize("path, base, prefix", [("/v1/chat/completions", CHAT, "chatcmpl"),
                                                 ("/v1/completions", COMPLETION, "cmpl")])
def test_an_x_request_id_header_names_the_response_unless_the_body_does(client, path, base, prefix):
    """vLLM's header; the body's request_id first, as Serve's proxies give every request such a header."""
    for stream in (False, True):
        r = client.post(path, json={**base, "stream": stream}, headers={"X-Request-Id": "trace-42"})
        assert ({c["id"] for c in sse(r)} if stream else {r.json()["id"]}) == {f"{prefix}-trace-42"}
    r = client.post(path, json={**base, "request_id": "job-7"}, headers={"X-Request-Id": "trace-42"})
    assert r.json()["id"] == f"{prefix}-job-7"


def test_an_x_request_id_longer_than_a_request_id_may_be_does_not_name_the_response(client):
    """The header stands in for the body's request_id, which holds at most MAX_SALT_CHARS: a longer one names no
    response (as the body's would be refused), and the response gets an id of its own."""
    for length in (MAX_SALT_CHARS, MAX_SALT_CHARS + 1):
        header = "r" * length
        r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 2}, headers={"X-Request-Id": header})
        assert r.status_code == 200, r.text
        assert (r.json()["id"] == f"cmpl-{header}") == (length == MAX_SALT_CHARS)


def test_text_parts_of_a_message_are_joined_by_newlines_as_vllm_does(client, router, tokenizer):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]
    body = {**CHAT, "messages": [{"role": "user", "content": parts}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    (prompt, _, _), = router.requests.values()
    assert prompt == tokenizer.encode_chat([{"role": "user", "content": "Hello\nWorld"}])


def test_an_assistant_turns_refusal_pasted_back_is_its_text(client, router, tokenizer):
    """OpenAI answers a refusal with null content and `refusal` set; a client pasting the turn back keeps it, and
    the model must read what it said as the turn's text, not an empty turn."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "refusal": "I can't."},
                {"role": "user", "content": "why?"}]
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": messages}).status_code == 200
    (prompt, _, _), = router.requests.values()
    assert prompt == tokenizer.encode_chat([*messages[:1], {"role": "assistant", "content": "I can't."}, messages[2]])


def test_a_wrong_method_is_405_with_the_allowed_ones(client):
    r = client.get("/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = client.delete("/tokenize")  # served by two routes, GET and POST: the 405 names both
    assert_error(r, 405)
    assert r.headers["allow"] == "GET, POST"


@pytest.mark.parametrize("path, allowed", [("/health", "GET, HEAD"), ("/ping", "GET, HEAD, POST")])
def test_a_probes_wrong_method_is_405_naming_head_too(client, path, allowed):
    """RFC 9110 15.5.6: Allow lists every method the path serves, and the probes serve HEAD besides GET."""
    r = client.put(path)
    assert_error(r, 405)
    assert r.headers["allow"] == allowed


def test_stream_deltas_carry_only_what_they_hold(client):
    """As OpenAI's and vLLM's chunks: {"role": "assistant", "content": ""} first, then {"content": ...}; no nulls."""
    deltas = [c["choices"][0]["delta"] for c in sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
              if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) == {"content"} for d in deltas[1:-1]) and "".join(d["content"] for d in deltas[1:-1]) == ANSWER


def test_any_int64_seed_is_taken_and_minus_one_is_none(client, router):
    """vLLM and OpenAI take int64 seeds: a negative one is a seed like any other, the same each time, except -1,
    which vLLM's SamplingParams.__post_init__ turns into no seed (random sampling)."""
    seeds = [-5, -5, 5, -2**63, 0, 2**63 - 1, -1]
    for seed in seeds:
        assert client.post("/v1/completions", json={**COMPLETION, "seed": seed}).status_code == 200
    got = [params.seed for _, params, _ in router.requests.values()]
    assert got[0] == got[1] and len(set(got[:-1])) == 5  # -2**63 and 0 no longer alike
    assert got[-1] is None


def test_a_validators_message_comes_without_pydantics_prefix(client):
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": ""}), 400, param="prompt")
    assert error["message"] == "prompt: must not be empty"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**COMPLETION, "prompt": ["Hi", "One two three four five"], "n": 2}),
    ("/v1/chat/completions", {**CHAT, "n": 2}),
])
def test_continuous_usage_counts_each_chunks_own_choice_and_prompt_as_vllm(client, tokenizer, path, body):
    """vLLM: prompt_tokens of the chunk's prompt, completion_tokens of its choice so far; the last usage
    chunk has the whole request's. Chat's role chunk says 0 completion tokens."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = sse(client.post(path, json={**body, "stream": True, "stream_options": options}))
    final = chunks[-1]["usage"]
    seen: dict[int, int] = {}
    prompt_lengths = set()
    for c in chunks[:-1]:
        usage = c["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        if len(c["choices"]) != 1:  # chat's role chunk, one for every choice
            assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == final["prompt_tokens"]
            continue
        index = c["choices"][0]["index"]
        assert usage["completion_tokens"] >= seen.get(index, 0)
        seen[index] = usage["completion_tokens"]
        prompt_lengths.add((index // 2, usage["prompt_tokens"]))
    assert sum(seen.values()) == final["completion_tokens"] and len(seen) == len(body.get("prompt", [0])) * 2
    by_prompt = dict(prompt_lengths)
    assert len(by_prompt) == len(prompt_lengths)  # one prompt length per prompt
    assert sum(by_prompt.values()) == final["prompt_tokens"]


# ---- continue_final_message ---------------------------------------------------------------------

PREFILL = [{"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": "The answer is"}]


def test_continue_final_message_prompts_inside_the_final_message(client, router, tokenizer):
    body = client.post("/v1/chat/completions", json={**CHAT, "messages": PREFILL, "add_generation_prompt": False,
                                                     "continue_final_message": True}).json()
    assert body["choices"][0]["message"]["content"] == ANSWER  # the continuation alone, as vLLM answers
    ((prompt, _, _),) = router.requests.values()
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\nThe answer is")
    assert prompt == tokenizer.encode_chat(PREFILL, False, continue_final_message=True)
    tokenized = client.post("/tokenize", json={"messages": PREFILL, "add_generation_prompt": False,
                                               "continue_final_message": True}).json()
    assert tokenized["tokens"] == prompt


def test_continue_final_message_keeps_special_text_in_it_as_text(client, router, tokenizer):
    messages = [PREFILL[0], {"role": "assistant", "content": "Say <|im_end|> and"}]
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages, "add_generation_prompt": False,
                                                  "continue_final_message": True})
    assert r.status_code == 200, r.text
    ((prompt, _, _),) = router.requests.values()
    assert tokenizer.decode(prompt).endswith("assistant\nSay <|im_end|> and")
    im_end = tokenizer.special_ids["<|im_end|>"]
    assert prompt.count(im_end) == 2  # the system and user turns' ends; the message's own text is no token


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_continue_final_message_with_a_generation_prompt_is_400(client, router, path):
    body = {"messages": PREFILL, "continue_final_message": True}  # add_generation_prompt defaults to true
    assert_error(client.post(path, json={**CHAT, **body} if path != "/tokenize" else body), 400,
                 param="continue_final_message")
    assert router.requests == {}



# ---- allowed_token_ids ---------------------------------------------------------------------------

def test_allowed_token_ids_reach_the_mesh_as_a_sorted_set(client, router):
    r = client.post("/v1/completions", json={**COMPLETION, "allowed_token_ids": [9, 3, 9, 4]})
    assert r.status_code == 200, r.text
    ((_, params, _),) = router.requests.values()
    assert params.allowed_token_ids == (3, 4, 9)


@pytest.mark.parametrize("ids", [[], [1, -1], [1, 10**9]])
def test_allowed_token_ids_outside_the_vocabulary_or_none_are_400(client, router, ids):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "allowed_token_ids": ids}), 400,
                 param="allowed_token_ids")
    assert router.requests == {}


# ---- chat echo -------------------------------------------------------------------------------------

def test_chat_echo_puts_a_final_assistant_message_first(client, router):
    body = {**CHAT, "messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True, "echo": True,
            "n": 2}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in whole["choices"]] == ["The answer is" + ANSWER] * 2
    assert whole["usage"]["completion_tokens"] == 2 * len(router.answer)  # the echo is not generated
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    echoed = [{**chunks[4]["choices"][0], "index": i, "delta": {"content": "The answer is"}, "finish_reason": None}
              for i in range(2)]
    assert [c["choices"] for c in chunks[2:4]] == [[e] for e in echoed]  # in chunks of their own, after the roles
    for i in range(2):
        text = "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"] if c["index"] == i)
        assert text == "The answer is" + ANSWER


def test_chat_echo_after_a_user_message_adds_nothing(client):
    plain = client.post("/v1/chat/completions", json=CHAT).json()
    echoed = client.post("/v1/chat/completions", json={**CHAT, "echo": True}).json()
    assert echoed["choices"][0]["message"] == plain["choices"][0]["message"]


# ---- bad_words -------------------------------------------------------------------------------------

def test_bad_words_reach_the_mesh_as_token_sequences(client, router, tokenizer):
    r = client.post("/v1/completions", json={**COMPLETION, "bad_words": [" answer is", "42"]})
    assert r.status_code == 200, r.text
    ((_, params, _),) = router.requests.values()
    alone, spaced = tuple(tokenizer.encode("answer is")), tuple(tokenizer.encode(" answer is"))
    assert len(alone) == len(spaced) and alone[0] != spaced[0]  # so both forms are banned, as vLLM bans them
    assert params.bad_words_token_ids == (alone, spaced, tuple(tokenizer.encode("42")))


@pytest.mark.parametrize("words", [["  "], [""], ["x"] * 129, ["x" * 257], ["a" + " " * 300]])
def test_blank_or_too_many_bad_words_are_400(client, router, words):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "bad_words": words}), 400, param="bad_words")
    assert router.requests == {}


# ---- detokenize, spaces_between_special_tokens -------------------------------------------------------

def test_detokenize_false_answers_with_token_ids_alone(client, tokenizer, eos):
    body = {**CHAT, "detokenize": False, "return_token_ids": True}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["message"]["content"] == "" and whole["token_ids"] == tokenizer.encode(ANSWER) + [eos]
    assert whole["finish_reason"] == "stop"
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert all(not c["delta"].get("content") for chunk in chunks for c in chunk["choices"])
    assert [t for chunk in chunks for c in chunk["choices"] for t in c.get("token_ids", [])] == whole["token_ids"]
    text = client.post("/v1/completions", json={**COMPLETION, "detokenize": False, "max_tokens": 5}).json()
    assert text["choices"][0]["text"] == "" and text["usage"]["completion_tokens"] == 5


def test_detokenize_false_with_stop_strings_is_400(client, router):
    assert_error(client.post("/v1/completions", json={**COMPLETION, "detokenize": False, "stop": ["x"]}), 400,
                 param="detokenize")
    assert router.requests == {}


def test_spaces_between_special_tokens_changes_nothing_for_byte_level_bpe(client, router, tokenizer):
    im_end = tokenizer.special_ids["<|im_end|>"]
    router.answer = [im_end, im_end, *tokenizer.encode("ok"), im_end]
    texts = {spaces: client.post("/v1/completions", json={
        **COMPLETION, "skip_special_tokens": False, "ignore_eos": True, "spaces_between_special_tokens": spaces,
        "max_tokens": 4}).json()["choices"][0]["text"] for spaces in (True, False)}
    assert texts[True] == texts[False] == "<|im_end|><|im_end|>ok<|im_end|>"


def test_allowed_token_ids_that_all_end_the_answer_cannot_meet_min_tokens(client, router, eos):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "allowed_token_ids": [eos], "min_tokens": 2}), 400,
                 param="allowed_token_ids")
    assert router.requests == {}
    r = client.post("/v1/chat/completions", json={**CHAT, "allowed_token_ids": [eos, 5], "min_tokens": 2})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={**CHAT, "allowed_token_ids": [eos]})  # no min_tokens: EOS at once
    assert r.status_code == 200, r.text


def test_detokenize_false_cannot_read_tool_calls(client, router):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {**CHAT, "detokenize": False, "tools": tools}
    assert_error(client.post("/v1/chat/completions", json=body), 400, param="detokenize")
    assert router.requests == {}
    r = client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})  # offered, never read
    assert r.status_code == 200, r.text


def test_chat_echo_without_a_generation_prompt_continues_the_final_message(client):
    body = client.post("/v1/chat/completions", json={**CHAT, "echo": True, "add_generation_prompt": False}).json()
    assert body["choices"][0]["message"]["content"] == "hi" + ANSWER  # vLLM: the answer has the final message's role


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_without_a_generation_prompt_has_the_final_messages_role(client, stream):
    """vLLM's get_chat_request_role: without the assistant's header the answer continues the final message, so it
    is that message's role, whatever it is (a system turn's text continued is the system's); every answer was
    "assistant"."""
    messages = [*CHAT["messages"], {"role": "system", "content": "Answer tersely."}]
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages, "add_generation_prompt": False, "n": 2,
                                                  "stream": stream})
    if stream:
        roles = [c["choices"][0]["delta"]["role"] for c in sse(r) if "role" in c["choices"][0]["delta"]]
    else:
        roles = [c["message"]["role"] for c in r.json()["choices"]]
    assert roles == ["system", "system"]
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": stream})  # with the header: assistant
    roles = ([c["choices"][0]["delta"]["role"] for c in sse(r) if "role" in c["choices"][0]["delta"]] if stream
             else [c["message"]["role"] for c in r.json()["choices"]])
    assert roles == ["assistant", "assistant"]


def test_chat_echo_stays_when_the_answer_is_a_tool_call(tokenizer, eos):
    from tests.fake_router import FakeRouter
    from tests.ingress_support import make_client
    router = FakeRouter(tokenizer.encode('{"name": "f", "parameters": {}}') + [eos], max_model_len=4096)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = make_client(router, tokenizer).post("/v1/chat/completions", json={
        **CHAT, "messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True, "echo": True,
        "tools": tools}).json()
    message = body["choices"][0]["message"]
    assert message["content"] == "The answer is" and message["tool_calls"][0]["function"]["name"] == "f"


def test_allowed_token_ids_that_bad_words_all_ban_are_400(client, router, tokenizer):
    (word,), (spaced,) = tokenizer.encode("Hello"), tokenizer.encode(" Hello")  # both banned, all that is allowed
    error = assert_error(client.post("/v1/completions", json={**COMPLETION, "allowed_token_ids": [word, spaced],
                                                              "bad_words": ["Hello"]}), 400, param="allowed_token_ids")
    assert "(they are bad words)" in error["message"], error  # not min_tokens, which the request does not set
    assert router.requests == {}


def test_allowed_token_ids_that_start_a_longer_bad_word_are_sampled(client, router, tokenizer):
    """A bad word of two tokens bans its second after its first only: its first token alone is allowed."""
    first, _ = tokenizer.encode("answer is")
    r = client.post("/v1/completions", json={**COMPLETION, "allowed_token_ids": [first], "bad_words": ["answer is"]})
    assert r.status_code == 200, r.text


def test_a_bad_word_after_a_space_is_banned_again_only_when_it_starts_with_another_token():
    """vLLM's rule (update_from_tokenizer): the spaced form is banned too when its first token differs and its
    length is the same; a tokenizer that reads " ab" with the same first token as "ab" bans "ab" once."""
    class Stub:
        encode = {"ab": [1, 2], " ab": [1, 3], "cd": [4, 5], " cd": [6, 7], "ef": [8], " ef": [9, 10]}.__getitem__
    assert bad_words_token_ids(Stub(), ["ab", " cd", "ef"]) == ((1, 2), (4, 5), (6, 7), (8,))


GENERATION_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}


@pytest.mark.parametrize("path, base", [*ENDPOINTS, ("/v1/responses", {"model": MODEL, "input": "hi"})])
def test_fields_left_out_or_null_take_the_models_generation_config_defaults(router, tokenizer, monkeypatch, caplog,
                                                                            path, base):
    """vLLM serves a model with its generation_config.json's sampling values as defaults (Llama 3.3 Instruct's:
    temperature 0.6, top_p 0.9): what the request sends wins, then the model's, then OpenAI's."""
    monkeypatch.setattr(tokenizer, "sampling_defaults", GENERATION_DEFAULTS, raising=False)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        client = make_client(router, tokenizer)
    assert "generation_config.json" in caplog.text and "temperature=0.6" in caplog.text  # the operator is told
    sent = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
    for body in (base, {**base, **dict.fromkeys(sent)}, {**base, **sent}, {**base, "temperature": 0}):
        assert client.post(path, json=body).status_code == 200
    left_out, nulls, given, greedy = (params for _, params, _ in router.requests.values())
    for params in (left_out, nulls):
        assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
            0.6, 0.9, 40, 0.05, 1.1)
    assert (given.temperature, given.top_p, given.top_k, given.min_p, given.repetition_penalty) == (
        1.0, 1.0, 0, 0.0, 1.0)
    assert greedy.greedy and (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)  # as vLLM resets them
    assert greedy.repetition_penalty == 1.1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, base", [*ENDPOINTS, ("/v1/responses", {"model": MODEL, "input": "hi"})])
def test_created_is_when_the_request_came_however_long_its_answer_takes(client, router, monkeypatch, path, base,
                                                                       stream):
    """OpenAI's `created` (Responses: `created_at`) is when the request was made, in Unix seconds, as vLLM stamps
    it: a stream's said when its first token came, a whole answer's when its last did (minutes after a 128k
    prefill), so the same request gave different times streamed or not. The wall clock here moves on once the
    request reaches the router."""
    clock = [1_700_000_000.75]
    wall = SimpleNamespace(time=lambda: clock[0], perf_counter=time.perf_counter, monotonic=time.monotonic)
    monkeypatch.setattr(openai_server, "time", wall)
    generate = router.generate

    async def slow(*args, **kwargs):
        clock[0] += 90.0  # its prefill and answer take a minute and a half
        async for event in generate(*args, **kwargs):
            yield event
    monkeypatch.setattr(router, "generate", slow)
    r = client.post(path, json={**base, "stream": stream})
    assert r.status_code == 200, r.text
    if not stream:
        bodies = [r.json()]
    elif path == "/v1/responses":
        events = [json.loads(block.split("\n")[1].removeprefix("data: "))
                  for block in r.text.split("\n\n") if block.startswith("event: ")]
        bodies = [e["response"] for e in events if "response" in e]  # created, in_progress, completed
    else:
        bodies = sse(r)
    assert bodies and clock[0] > 1_700_000_000.75  # the answer came later
    key = "created_at" if path == "/v1/responses" else "created"
    assert {body[key] for body in bodies} == {1_700_000_000}
