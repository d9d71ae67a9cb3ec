"""model.simulated's clock in a test: only the simulator's sleeps move it on, by exactly what they ask, so its timing
is checked without the wall clock (on the loaded 2-core box a late wake-up only adds time)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import model.simulated


class SleepClock:
    def __init__(self, now: float):
        self.now = now

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


def sleep_clock(monkeypatch: pytest.MonkeyPatch, now: float = 0.0) -> SleepClock:
    """A SleepClock at `now` (seconds) in place of model.simulated's `time`, for this test."""
    clock = SleepClock(now)
    monkeypatch.setattr(model.simulated, "time", SimpleNamespace(perf_counter=clock.perf_counter, sleep=clock.sleep))
    return clock
