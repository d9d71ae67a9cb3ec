"""vLLM's repetition_detection: an answer that ends in one pattern repeated min_count times stops there, with
finish_reason "repetition" (vllm/v1/core/sched/utils.py check_stop, vllm/sampling_params.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.streaming import ChoiceText, RepetitionCheck
from tests.fake_router import FakeRouter
from tests.ingress_support import (CHAT, COMPLETION, ENDPOINTS, assert_error, client, eos, make_client,  # noqa: F401
                                   router, sse, tokenizer)


def vllm_repeats(tokens: list[int], max_size: int, min_size: int, count: int) -> bool:
    """check_sequence_repetition as vLLM writes it (the "naive" algorithm): for each pattern length in turn,
    compare the answer's last L tokens with the (count - 1) stretches of L before them."""
    min_size = max(min_size, 1)
    for size in range(min_size, max_size + 1):
        if size * count > len(tokens):
            return False
        if all(tokens[-(size * m + n)] == tokens[-n] for n in range(1, size + 1) for m in range(1, count)):
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), max_size=60), max_size=st.integers(1, 8), min_size=st.integers(0, 8),
       count=st.integers(2, 5))
def test_the_check_gives_vllms_verdict_after_every_token(tokens, max_size, min_size, count):
    min_size = min(min_size, max_size)
    check = RepetitionCheck(max_size, min_size, count)
    for i, token in enumerate(tokens):
        assert check.add(token) == vllm_repeats(tokens[:i + 1], max_size, min_size, count), i


def test_a_pattern_longer_than_the_ring_is_not_seen():
    """Patterns up to max_pattern_size only: a 3-token loop with max 2 never ends the answer."""
    check = RepetitionCheck(2, 0, 2)
    assert not any(check.add(t) for t in [1, 2, 3] * 10)
    check = RepetitionCheck(3, 3, 2)
    assert [check.add(t) for t in [1, 2, 3, 1, 2, 3]] == [False] * 5 + [True]


@pytest.mark.parametrize("count", [2**62, 10**16, 10**20])
def test_a_huge_min_count_never_fires(count):
    """vLLM's early exit (pattern length x min_count longer than the answer) says no; int64 must not wrap."""
    check = RepetitionCheck(4096, 0, count)
    assert not any(check.add(5) for _ in range(100))


@pytest.mark.parametrize("stop", [(), ("never",)])
def test_choice_text_cuts_the_answer_at_the_token_that_completes_the_pattern(tokenizer, stop):
    """The text up to the cut is all sent, that held back for a stop string that might have begun in it too."""
    word, other = tokenizer.encode(" echo"), tokenizer.encode(" x")
    answer = ChoiceText(tokenizer, [], stop, 0, None, repetition=RepetitionCheck(4, 0, 3))
    text, _, taken, ended = answer.feed(other + word * 5, final=False)
    assert (ended, taken, answer.output) == ("repetition", len(other) + 3 * len(word), other + word * 3)
    assert text == " x echo echo echo"


def test_min_tokens_come_first(tokenizer):
    (a,) = tokenizer.encode("a")
    answer = ChoiceText(tokenizer, [], (), 5, None, repetition=RepetitionCheck(1, 0, 2))
    assert answer.feed([a] * 8, final=False)[2:] == (5, "repetition")  # vLLM checks once min_tokens are out


def test_the_meshs_own_end_wins_on_the_same_token(tokenizer):
    """vLLM's check_stop looks at stop tokens and the length before repetition."""
    (a,) = tokenizer.encode("a")
    answer = ChoiceText(tokenizer, [], (), 0, None, repetition=RepetitionCheck(1, 0, 3))
    assert answer.feed([a, a, a], final=True)[2:] == (3, None)


def test_a_stop_string_wins_on_the_same_token(tokenizer):
    (a,) = tokenizer.encode("a")
    answer = ChoiceText(tokenizer, [], ("aaa",), 0, None, repetition=RepetitionCheck(1, 0, 3))
    assert answer.feed([a] * 5, final=False)[2:] == (3, "stop")


@pytest.fixture
def looping(tokenizer, eos):
    return FakeRouter(tokenizer.encode("Sure:") + tokenizer.encode(" la") * 40 + [eos])


RULE = {"max_pattern_size": 3, "min_count": 4}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_a_looping_answer_ends_with_finish_reason_repetition(looping, tokenizer, path, base, stream):
    client = make_client(looping, tokenizer)
    r = client.post(path, json={**base, "max_tokens": 60, "repetition_detection": RULE, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        chunks = sse(r)
        text = "".join(c["choices"][0]["delta"].get("content", "") if "delta" in c["choices"][0]
                       else c["choices"][0]["text"] for c in chunks if c["choices"])
        last = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    else:
        last = r.json()["choices"][0]
        text = last["message"]["content"] if "message" in last else last["text"]
    assert (last["finish_reason"], last["stop_reason"]) == ("repetition", "repetition_detected")
    assert text == "Sure:" + " la" * 4
    assert [reason for _, reason in looping.cancelled] == ["stop"]  # the router stops generating it
    if not stream:
        assert r.json()["usage"]["completion_tokens"] == len(tokenizer.encode("Sure:")) + 4


def test_without_it_or_turned_off_the_loop_runs_to_max_tokens(looping, tokenizer):
    client = make_client(looping, tokenizer)
    for rule in (None, {"max_pattern_size": 0}, {"max_pattern_size": 3, "min_count": 10**20}):
        choice = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 30,
                                                      "repetition_detection": rule}).json()["choices"][0]
        assert choice["finish_reason"] == "length" and choice["text"].count(" la") > 4


@pytest.mark.parametrize("rule, param", [
    ({"max_pattern_size": 3, "min_count": 1}, "repetition_detection"),
    ({"max_pattern_size": 2, "min_pattern_size": 3, "min_count": 2}, "repetition_detection"),
    ({"max_pattern_size": -1, "min_count": 2}, "repetition_detection.max_pattern_size"),
    ({"max_pattern_size": 10**6, "min_count": 2}, "repetition_detection.max_pattern_size"),
])
def test_a_bad_rule_is_400_naming_it(client, router, rule, param):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "repetition_detection": rule}), 400, param=param)
    assert router.requests == {}
