"""deployments/aio.py's `within`: a timed wait that never leaves the awaited work running behind it."""
from __future__ import annotations

import asyncio

import pytest

from deployments.aio import within


async def _forever(started: asyncio.Event, ended: list[str]) -> None:
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        ended.append("cancelled")
        raise


def test_a_cancel_of_the_caller_cancels_the_awaited_work():
    """The caller's cancel propagates and takes the awaited work with it: left running, a cancelled /health would
    leave its stats read, and a stopping router its mesh's reset, going on behind it."""
    async def main() -> list[str]:
        started, ended = asyncio.Event(), []
        caller = asyncio.ensure_future(within(_forever(started, ended), 60))
        await started.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)  # the awaited task runs its cancellation
        return list(ended)  # asyncio.run cancels what is left after this
    assert asyncio.run(main()) == ["cancelled"]


def test_a_timeout_cancels_the_awaited_work():
    async def main() -> list[str]:
        started, ended = asyncio.Event(), []
        with pytest.raises(asyncio.TimeoutError):
            await within(_forever(started, ended), 0.01)
        await asyncio.sleep(0)
        return list(ended)  # asyncio.run cancels what is left after this
    assert asyncio.run(main()) == ["cancelled"]
