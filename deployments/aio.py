"""A timed wait that never swallows a cancel.

Before Python 3.12, asyncio.wait_for returns the awaited result when it completes in the same loop iteration
as a cancel of the waiting task, and the cancel is lost (CPython gh-86296): a loop that waits that way (the
router's idle-mesh wait) then never ends, and Router.close() hangs. asyncio.timeout does not have the fault,
but it is 3.11+, and a Galaxy host may run Python 3.10 (a tt-metal checkout's python_env is 3.10 or 3.12).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout_s: float) -> T:
    """The result of `aw`. Raises asyncio.TimeoutError after timeout_s s (aw is cancelled, not waited for);
    a cancel of the caller always propagates, and cancels aw."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()
