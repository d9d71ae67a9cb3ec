"""The host's speed when a benchmark ran. CPU figures (us per token) scale with it, and on a shared VM it swings
from day to day: on the 2-core box these benchmarks were written on, the reference loop took 350-470 us on one day
(2026-12-05) while the same benchmark client's CPU per token swung 67-405 us across days. Printed beside each CPU
figure, it says whether two runs' figures can be compared at all."""
from __future__ import annotations

import math
import time

N = 10_000
REFERENCE = f"sum(range({N:_}))"


def reference_loop_us(repeats: int = 50) -> float:
    """CPU microseconds of one sum(range(N)), the least of `repeats` runs (the least: the host's speed, not its
    interruptions). CPU time of this thread (CLOCK_THREAD_CPUTIME_ID), so other processes' load shows only as far as
    it slows this one's instructions (caches, a throttled or shared core)."""
    best = math.inf
    for _ in range(repeats):
        start = time.thread_time()
        sum(range(N))
        best = min(best, time.thread_time() - start)
    return round(best * 1e6, 1)
