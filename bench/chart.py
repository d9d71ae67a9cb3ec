"""One PNG of a serving run: the four latency distributions and output throughput over time."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; benchmarks run on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from bench.metrics import RequestResult  # noqa: E402


def save_chart(results: Sequence[RequestResult], timeline: Sequence[float], bin_s: float, path: str) -> None:
    done = [r for r in results if r.ok]
    latencies = {
        "Time to first token (ms)": [1000 * r.ttft for r in done],
        "Time per output token (ms)": [1000 * r.tpot for r in done if r.tpot is not None],
        "Inter-token latency (ms)": [1000 * gap for r in done for gap in r.itls],
        "End-to-end latency (ms)": [1000 * r.e2el for r in done],
    }
    fig, axes = plt.subplot_mosaic([[0, 1, 2, 3], ["throughput"] * 4], figsize=(18, 8))
    for i, (title, values) in enumerate(latencies.items()):
        axes[i].hist(values, bins=40, color="tab:blue")
        axes[i].set_title(title)
        axes[i].set_ylabel("requests" if i != 2 else "gaps")
    throughput = axes["throughput"]
    throughput.plot([i * bin_s for i in range(len(timeline))], timeline, color="tab:green")
    throughput.set_title("Output throughput over time")
    throughput.set_xlabel("seconds since the first request")
    throughput.set_ylabel("tokens/s")
    throughput.set_ylim(bottom=0)
    fig.suptitle(f"{len(done)} requests, {len(results) - len(done)} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
