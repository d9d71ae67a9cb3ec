"""One Serve replica = one mesh: it opens the device, loads the model, holds the KV cache and executes
the router's work in order, streaming one StepResult per step for all slots.

Works run on one worker thread, strictly in work-id order: the router pipelines (sends work n+1 before
n ends) and may reuse blocks freed in n for n+1, which is only safe if n has finished writing them.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from deployments.config import AppConfig
from model.backend import Backend, Capabilities
from model.runner import MeshRunner
from scheduler.work import MeshWork, StepResult

log = logging.getLogger("ray.serve")

HUNG_AFTER_S = 300.0  # a single step running longer than this marks the replica unhealthy


def build_backend(config: AppConfig, model_dir) -> Backend:
    """Import only the backend in use: ttnn exists only on Galaxy hosts, torch models are heavy."""
    if config.backend == "torch":
        import torch

        from model.torch_llama import TorchBackend
        return TorchBackend(model_dir, num_slots=config.num_slots, block_size=config.block_size,
                            num_blocks=config.num_blocks, max_seq_len=config.max_seq_len,
                            dtype=getattr(torch, config.dtype))
    if config.backend == "simulated":
        from model.simulated import SimulatedBackend
        from model.tokenizer import load_tokenizer
        tok = load_tokenizer(model_dir)
        return SimulatedBackend(num_slots=config.num_slots, block_size=config.block_size,
                                num_blocks=config.num_blocks, max_seq_len=config.max_seq_len,
                                vocab_size=tok.vocab_size, eos_token_ids=tuple(tok.stop_ids),
                                time_scale=config.time_scale)
    from model.tt_galaxy import TTGalaxyBackend
    return TTGalaxyBackend(model_dir, mesh_shape=config.mesh_shape, num_slots=config.num_slots,
                           block_size=config.block_size, num_blocks=config.num_blocks,
                           max_seq_len=config.max_seq_len, num_layers=config.num_layers,
                           tt_config=config.override_tt_config)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=60)
class MeshReplica:
    def __init__(self, config: dict, model_dir: str):
        # Serve marks the replica ready only once this returns: a loading mesh takes no traffic.
        self.runner = MeshRunner(build_backend(AppConfig(**config), model_dir))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh")
        self.turn = asyncio.Condition()
        self.next_work_id = 0
        self.step_started: float | None = None
        self.error: BaseException | None = None

    def capabilities(self) -> Capabilities:
        return self.runner.caps

    async def execute(self, work: MeshWork) -> AsyncIterator[StepResult]:
        async with self.turn:
            if work.work_id < self.next_work_id:  # a restarted router starts counting again
                self.next_work_id = work.work_id
                self.runner.slots.clear()
            await self.turn.wait_for(lambda: work.work_id == self.next_work_id)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        done = self.worker.submit(self._run, work, loop, results)
        try:
            for _ in range(work.num_messages):
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await asyncio.wrap_future(done)
            async with self.turn:
                self.next_work_id = work.work_id + 1
                self.turn.notify_all()

    def _run(self, work: MeshWork, loop: asyncio.AbstractEventLoop, results: asyncio.Queue) -> None:
        try:
            self.step_started = time.monotonic()
            for result in self.runner.execute(work):
                loop.call_soon_threadsafe(results.put_nowait, result)
                self.step_started = time.monotonic()
        except BaseException as e:  # surfaced to the router, which fails this mesh's requests
            log.exception("mesh work %d failed", work.work_id)
            self.error = e
            loop.call_soon_threadsafe(results.put_nowait, e)
        finally:
            self.step_started = None

    def check_health(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"backend failed: {self.error!r}")
        started = self.step_started
        if started is not None and time.monotonic() - started > HUNG_AFTER_S:
            raise RuntimeError(f"backend hung: one step has run for {time.monotonic() - started:.0f} s")

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.backend.close()
