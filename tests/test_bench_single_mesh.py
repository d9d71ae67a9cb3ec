"""bench.single_mesh's idle TTFT figures on known first-token times (no server)."""
import asyncio

import numpy as np
import pytest

from bench import single_mesh

TTFTS = [0.010 * (i + 1) for i in range(20)]  # 10, 20, ..., 200 ms


def test_idle_ttft_percentiles_are_numpys(monkeypatch):
    """p90 was sorted(ttfts)[int(0.9 * n)]: with 20 requests the 19th value (190 ms), not numpy's (and vLLM's)
    linear p90 of 181 ms that every other figure here uses."""
    sent = iter(TTFTS)

    async def stream(http, url, model, prompt, max_tokens):
        return [(0.0, 0), (next(sent), 1)]

    monkeypatch.setattr(single_mesh, "stream", stream)
    report = asyncio.run(single_mesh.idle_ttft("http://unused", len(TTFTS), 128, 1.0))
    assert report["median_ttft_ms"] == pytest.approx(105.0)
    assert report["p90_ttft_ms"] == pytest.approx(float(np.percentile(TTFTS, 90)) * 1e3)  # 181 ms
