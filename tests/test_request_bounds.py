"""Each sampling field's bounds, at the bound and just past it, on both endpoints: a value past one is a 400
naming the field (never a sampler failing on the mesh, or a silent clamp), and one at it is served."""
from __future__ import annotations

import pytest

from deployments.protocol import MAX_N, MAX_STOP_STRINGS
from scheduler.sampling import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MIN_REPETITION_PENALTY
from tests.ingress_support import (CHAT, COMPLETION, ENDPOINTS, assert_error, client, eos, post, router,  # noqa: F401
                                   tokenizer)

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
