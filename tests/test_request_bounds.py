"""Each sampling field's bounds, at the bound and just past it, on both endpoints: a value past one is a 400
naming the field (never a sampler failing on the mesh, or a silent clamp), and one at it is served."""
from __future__ import annotations

import pytest

from deployments.protocol import MAX_BATCH_CHOICES, MAX_CHOICES, MAX_N, MAX_PATTERN_SIZE, MAX_STOP_STRINGS, MAX_TOOLS
from scheduler.sampling import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MIN_REPETITION_PENALTY
from tests.fake_router import FakeRouter
from tests.ingress_support import (ANSWER, CHAT, COMPLETION, ENDPOINTS, assert_error, client, eos,  # noqa: F401
                                   make_client, post, router, tokenizer)

# field: (values served, values refused)
BOUNDS = {
    "temperature": ([0.0, 100.0], [-0.01, 100.01]),
    "top_p": ([1e-6, 1.0], [0.0, 1.01]),
    "top_k": ([-1, 0, 1], [-2]),
    "min_p": ([0.0, 1.0], [-0.01, 1.01]),
    "presence_penalty": ([-2.0, 2.0], [-2.01, 2.01]),
    "frequency_penalty": ([-2.0, 2.0], [-2.01, 2.01]),
    "repetition_penalty": ([MIN_REPETITION_PENALTY, 10.0], [0.0, 10.01]),
    "seed": ([-2**63, 2**63 - 1], [-2**63 - 1, 2**63]),
    "n": ([1, MAX_N], [0, MAX_N + 1]),
    "stop": ([["x"] * MAX_STOP_STRINGS], [["x"] * (MAX_STOP_STRINGS + 1), [""]]),
}


@pytest.mark.parametrize("path, base", ENDPOINTS)
@pytest.mark.parametrize("field", BOUNDS)
def test_a_sampling_field_is_taken_up_to_its_bound_and_refused_past_it(client, path, base, field):
    served, refused = BOUNDS[field]
    for value in served:
        r = post(client, path, {**base, field: value, "max_tokens": 2})
        assert r.status_code == 200, (value, r.text)
    for value in refused:
        assert_error(post(client, path, {**base, field: value, "max_tokens": 2}), 400, param=field)


@pytest.mark.parametrize("path, base, field, extra", [
    ("/v1/completions", COMPLETION, "logprobs", {}),
    ("/v1/chat/completions", CHAT, "top_logprobs", {"logprobs": True}),
])
def test_logprobs_are_taken_up_to_their_bound(client, path, base, field, extra):
    body = {**base, **extra, "max_tokens": 2}
    assert post(client, path, {**body, field: MAX_LOGPROBS}).status_code == 200
    assert_error(post(client, path, {**body, field: MAX_LOGPROBS + 1}), 400, param=field)


@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_best_of_other_than_n_is_400(client, path, base):
    for best_of in (1, 3):
        assert_error(post(client, path, {**base, "n": 2, "best_of": best_of}), 400, param="best_of")


def test_logit_bias_is_taken_for_every_token_id_of_the_vocabulary_with_a_bias_in_100(client, router, tokenizer):
    last = tokenizer.vocab_size - 1
    assert client.post("/v1/completions", json={**COMPLETION, "logit_bias": {"0": -100, str(last): 100}}).status_code \
        == 200
    ((_, params, _),) = router.requests.values()
    assert params.logit_bias == {0: -100, last: 100}
    for bias in ({str(last + 1): 1}, {"-1": 1}, {"0": 100.5}, {"0": -100.5}, {"\u0663": 1},  # an Arabic-Indic 3
                 {str(t): 1 for t in range(MAX_LOGIT_BIAS_ENTRIES + 1)}):
        assert_error(client.post("/v1/completions", json={**COMPLETION, "logit_bias": bias}), 400, param="logit_bias")


@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_stream_options_without_stream_is_400(client, path, base):
    """vLLM's rule: usage options of a stream on a whole answer would be silently ignored."""
    assert_error(post(client, path, {**base, "stream_options": {"include_usage": True}}), 400, param="stream_options")


def _tools(k: int) -> dict:
    return {"tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
                      for i in range(k)]}


# README's Limits: (path, base, the request's fields given k, field the 400 names, k at the bound)
LIST_BOUNDS = [
    ("/v1/chat/completions", CHAT, _tools, "tools", MAX_TOOLS),
    ("/v1/chat/completions", CHAT, lambda k: {"guided_choice": [f"c{i}" for i in range(k)]}, "guided_choice",
     MAX_CHOICES),
    ("/v1/completions", COMPLETION, lambda k: {"structured_outputs": {"choice": [f"c{i}" for i in range(k)]}},
     "structured_outputs.choice", MAX_CHOICES),
    ("/v1/completions", COMPLETION, lambda k: {"repetition_detection": {"max_pattern_size": k, "min_count": 2}},
     "repetition_detection.max_pattern_size", MAX_PATTERN_SIZE),
    ("/v1/completions", COMPLETION, lambda k: {"prompt": ["a"] * (k // 2), "n": 2}, "prompt", MAX_BATCH_CHOICES),
]


@pytest.mark.parametrize("path, base, fields, param, bound", LIST_BOUNDS, ids=[b[3] for b in LIST_BOUNDS])
def test_a_documented_size_limit_is_taken_at_its_bound_and_refused_past_it(tokenizer, eos, path, base, fields, param,
                                                                           bound):
    """README's Limits promise these sizes (128 tools, 256 choice strings, a 4,096-token pattern, 256 choices in a
    batch): a bound that drifted down refuses requests users were told pass, one that drifted up lets a request cost
    the ingress or the mesh more than was sized for."""
    assert (MAX_TOOLS, MAX_CHOICES, MAX_PATTERN_SIZE, MAX_BATCH_CHOICES) == (128, 256, 4096, 256)
    over = bound + 2 if param == "prompt" else bound + 1  # a batch grows by whole prompts of n choices
    client = make_client(FakeRouter(tokenizer.encode(ANSWER) + [eos], max_model_len=8192), tokenizer)  # 128 tools' prompt
    r = post(client, path, {**base, **fields(bound), "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert_error(post(client, path, {**base, **fields(over), "max_tokens": 2}), 400, param=param)


@pytest.mark.parametrize("path, base", ENDPOINTS)
@pytest.mark.parametrize("field, value", [("max_tokens", "5"), ("n", 1.0), ("temperature", "0.5")])
def test_a_number_of_the_wrong_json_type_is_400_naming_the_field(client, router, path, base, field, value):
    """README: types are strict, as OpenAI's API is; vLLM's lax parsing takes these, and a client that sends them gets
    something other than it asked of OpenAI."""
    assert_error(post(client, path, {**base, field: value}), 400, param=field)
    assert not router.requests
