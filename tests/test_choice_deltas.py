"""A choice's deltas joined: a lagging reader's unread delta takes the later ones (ChoiceDelta.merge), and a whole
answer adds them all up (ChoiceTotal.add). What the joined one says must be what the last one said, with the text,
tokens and logprobs of all, and what only the first carried (the prompt's logprobs) kept."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from deployments.streaming import ChoiceDelta, ChoiceTotal, PromptScores, in_intervals
from scheduler.sampling import TokenLogprobs


def deltas() -> tuple[ChoiceDelta, ChoiceDelta, PromptScores]:
    """A first delta that carries the prompt's logprobs, and the last one, ended by a stop string."""
    scores = PromptScores([1, 2], 0)
    first = ChoiceDelta(0, "Hello", [TokenLogprobs(7, -0.5, [])], [0], None, 1, 0, token_ids=[7], prompt_logprobs=scores)
    last = ChoiceDelta(0, " world", [TokenLogprobs(8, -0.25, [])], [5], "stop", 2, 64, stop_reason="\n", token_ids=[8])
    return first, last, scores


def test_a_merged_delta_ends_as_the_later_one_with_all_their_text():
    """A stream whose reader lags gets one delta for both: it must still say why the answer ended (stop_reason),
    and carry the prompt's logprobs the first had (the later one has none)."""
    first, last, scores = deltas()
    first.merge(last)
    assert (first.text, first.token_ids, first.token_offsets) == ("Hello world", [7, 8], [0, 5])
    assert [lp.token_id for lp in first.logprobs] == [7, 8]
    assert (first.finish_reason, first.stop_reason, first.num_generated, first.num_cached) == ("stop", "\n", 2, 64)
    assert first.prompt_logprobs is scores


def test_a_whole_choice_is_its_deltas_added_up():
    """A non-streamed answer: the text and tokens of every delta, the last one's finish, counts and stop_reason."""
    first, last, scores = deltas()
    total = ChoiceTotal()
    total.add(first)
    total.add(last)
    assert (total.text, total.token_ids, total.token_offsets) == ("Hello world", [7, 8], [0, 5])
    assert list(total.logprobs.token_ids) == [7, 8]
    assert (total.finish_reason, total.stop_reason, total.num_generated, total.num_cached) == ("stop", "\n", 2, 64)
    assert total.prompt_logprobs is scores


def test_a_cancelled_stream_in_intervals_sends_nothing_more():
    """stream_interval's held tokens go out before a failure (the default stream sent them), not when the reader is
    cancelled (its client left): a delta yielded then went to no one, in a task asked to stop."""
    async def router_events() -> AsyncIterator[ChoiceDelta]:
        yield ChoiceDelta(0, "Hello", [], [0], None, 1, 0, token_ids=[7])  # the first token: sent at once
        yield ChoiceDelta(0, " world", [], [5], None, 2, 0, token_ids=[8])  # held for a chunk of 3
        await asyncio.Event().wait()  # the next token, which never comes

    async def read(got: list[str]) -> None:
        async for delta in in_intervals(router_events(), 3):
            got.append(delta.text)

    async def main() -> list[str]:
        got: list[str] = []
        task = asyncio.create_task(read(got))
        for _ in range(3):  # the reader sends "Hello", then waits on the router with " world" held
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    assert asyncio.run(main()) == ["Hello"]
