"""json_slices: a long list written a slice per call and spliced into its answer is byte for byte the JSON one dump
of the whole answer writes, for json.dumps (Responses, /tokenize) and for the chat and completion choices' pydantic
dumps (whose floats json.dumps writes otherwise)."""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments import json_slices
from deployments.json_slices import Spliced
from deployments.protocol import AssistantMessage, ChatChoice, CompletionChoice
from deployments.streaming import PromptScores
from scheduler.sampling import PromptLogprobs, TokenLogprobs
from tests.fake_router import FakeRouter
from tests.ingress_support import make_client, tokenizer  # noqa: F401

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
ITEMS = st.lists(SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(st.text(), SCALARS, max_size=3),
                 max_size=40)
# json.dumps as Responses writes a whole answer, and as it writes a stream's events
DUMPS = [{"separators": (",", ":")}, {}]


@settings(max_examples=200, deadline=None)
@given(first=ITEMS, second=ITEMS, size=st.integers(1, 7), dumps=st.sampled_from(DUMPS), as_bytes=st.booleans(),
       text=st.text())
def test_spliced_lists_are_what_one_json_dumps_writes(first, second, size, dumps, as_bytes, text):
    def dump(value):
        out = json.dumps(value, ensure_ascii=False, **dumps)
        return out.encode() if as_bytes else out

    between = dump([0, 0])[2:-2]  # the dump's separator
    lists = Spliced()
    one, two = lists.mark(first, dump, between, size), lists.mark(second, dump, between, size)
    answer = {"text": text, "first": one, "again": [one, {"second": two}]}
    whole = {"text": text, "first": first, "again": [first, {"second": second}]}
    assert lists.fill(dump(answer)) == dump(whole)


@pytest.fixture(scope="module")
def server(tokenizer):  # noqa: F811
    return make_client(FakeRouter([]), tokenizer).app.state.server


LOGPROB = st.floats() | st.integers(-5, 0)
TOKEN_LOGPROBS = st.lists(st.builds(TokenLogprobs, st.integers(0, 49_151), LOGPROB,
                                    st.lists(st.tuples(st.integers(0, 49_151), LOGPROB), max_size=5)), max_size=30)


@settings(max_examples=100, deadline=None)
@given(lps=TOKEN_LOGPROBS, as_ids=st.booleans(), size=st.integers(1, 7))
def test_a_whole_answers_logprobs_are_what_one_pydantic_dump_writes(server, lps, as_ids, size):
    """Each choice as one model_dump_json of it writes it, its logprobs whole (floats, NaN and infinities included:
    pydantic writes 1e-05 as 0.00001 and inf as null)."""
    offsets = list(range(len(lps)))
    with mock.patch.object(json_slices, "SLICE", size):
        lists = Spliced()
        chat = ChatChoice(index=0, message=AssistantMessage(content="hi"), finish_reason="stop",
                          logprobs=server.logprobs.spliced_chat(lps, as_ids, lists))
        completion = CompletionChoice(index=0, text="hi",
                                      logprobs=server.logprobs.spliced_completion(lps, offsets, as_ids, lists))
        sliced = [lists.fill(c.model_dump_json(warnings=False).encode()) for c in (chat, completion)]
    chat.logprobs = server.logprobs.chat(lps, as_ids)
    completion.logprobs = server.logprobs.completion(lps, offsets, as_ids)
    assert sliced == [c.model_dump_json().encode() for c in (chat, completion)]


PROMPT_LOGPROB = st.floats(width=32) | st.integers(-5, 0)  # the mesh sends float32


@st.composite
def prompt_scores(draw) -> PromptScores:
    """A prompt's scores as the meshes send them: its positions after the first, each with k alternatives."""
    n, k = draw(st.integers(1, 20)), draw(st.integers(0, 4))
    scores = PromptScores(draw(st.lists(st.integers(0, 49_151), min_size=n, max_size=n)), k)
    if n > 1:
        row = st.lists(PROMPT_LOGPROB, min_size=k, max_size=k)
        def rows(of):  # a value per scored position (all but the first)
            return draw(st.lists(of, min_size=n - 1, max_size=n - 1))
        ids = st.lists(st.integers(0, 49_151), min_size=k, max_size=k)
        scores.add(PromptLogprobs(1, np.array(rows(PROMPT_LOGPROB), np.float32),
                                  np.array(rows(st.integers(1, 49_152)), np.int32),
                                  np.array(rows(ids), np.int32).reshape(n - 1, k),
                                  np.array(rows(row), np.float32).reshape(n - 1, k)))
    return scores


@settings(max_examples=100, deadline=None)
@given(scores=prompt_scores(), data=st.data(), size=st.integers(1, 7))
def test_a_whole_answers_prompt_logprobs_are_what_one_pydantic_dump_writes(server, scores, data, size):
    """A whole answer's prompt_logprobs, written a slice of positions at a time, are byte for byte those of one
    dump (position 0's None once, at the start, whatever slice a position falls in)."""
    k = data.draw(st.integers(0, scores.top_ids.shape[1]))
    with mock.patch.object(json_slices, "SLICE", size):
        lists = Spliced()
        choice = CompletionChoice(index=0, text="hi", finish_reason="stop")
        choice.prompt_logprobs = server.logprobs.spliced_prompt(scores, k, lists)
        sliced = lists.fill(choice.model_dump_json(warnings=False).encode())
    choice.prompt_logprobs = server.logprobs.prompt(scores, k)
    assert sliced == choice.model_dump_json().encode()
