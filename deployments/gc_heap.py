"""Freeze a replica's start-up heap, so that the collector's full passes skip it.

What a replica holds once started is there for good: modules (Ray, Serve, FastAPI, pydantic, torch), the
tokenizer, the app. CPython's full collection walks every tracked object, and a full pass runs on whichever of
the replica's threads allocates at the time: over an ingress replica's ~380k start-up objects it takes ~200 ms
on the 2-core box (`python -m bench.gc_pause`), a stall of every stream the replica serves. `gc.freeze()` moves
them to a generation that no collection visits, as vLLM does after its server's start-up
(`freeze_gc_heap` in vllm/utils/gc_utils.py). Objects made afterwards are collected as before.
"""
from __future__ import annotations

import gc


def freeze_gc_heap() -> int:
    """Collect, then freeze every object left; returns how many are frozen in all. Call at the end of a replica's
    start-up: frozen garbage is never collected, so the collection first is not optional."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
