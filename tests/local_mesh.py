"""An in-process MeshClient, like the Serve mesh replica (works run off the event loop, one at a time, in
order), with faults to inject: a mesh that raises, hangs, vanishes, stops on purpose (a redeploy replaces it), and
comes back as a new incarnation."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from model.backend import Backend
from model.runner import MeshRunner
from scheduler.work import LeaseTaken, MeshWork, ReplicaStopping, StaleWork


class Gone(ConnectionError):
    """What calling a dead replica raises."""


def fault_due(mesh) -> str | None:
    """Count one result against the fault injected into `mesh` (its `fault`, after `fault_after` more results): the
    fault once that count has run out (it fires once: then disarmed), else None."""
    if mesh.fault is None:
        return None
    mesh.fault_after -= 1
    if mesh.fault_after >= 0:
        return None
    fault, mesh.fault = mesh.fault, None
    return fault


async def _next_step(steps):
    """next(steps, None) on a thread. A caller cancelled meanwhile still waits for the step to end, as the replica's
    work does (mesh_replica.execute): else it lets go of the mesh's lock at once, and a reset or the next work runs on
    the runner beside the step, which then writes into the runner the reset emptied."""
    step = asyncio.ensure_future(asyncio.to_thread(next, steps, None))
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        await asyncio.wait([step])
        raise


class LocalMesh:
    def __init__(self, make_backend: Callable[[], Backend], grammar_tokenizer: Callable[[], object] | None = None):
        """`grammar_tokenizer`: llguidance's tokenizer for constrained requests (MeshRunner's)."""
        self.make_backend = make_backend
        self.grammar_tokenizer = grammar_tokenizer
        self.alive = True
        self.fault: str | None = None  # one-shot "raise" | "hang" | "vanish" | "stop" | "taken", after `fault_after` more results
        self.fault_after = 0
        self.unhang = asyncio.Event()
        self.works = 0
        self.round_steps: list[int] = []  # each decode round's num_steps, as it came
        self.runner: MeshRunner | None = None
        self.restart()

    # ---- faults ------------------------------------------------------------------------------------
    def restart(self) -> None:
        """A fresh replica: a new incarnation with an empty KV cache (what Serve's restart gives). The old runner is
        closed, as the old replica's shutdown closes it (ending its grammar-mask thread): now if no work holds it,
        else by that work as it ends (a hung one steps it once unhung; MeshRunner.close is for when no step runs)."""
        if self.runner is not None and not self.lock.locked():
            self.runner.close()
        self.runner = MeshRunner(self.make_backend(), self.grammar_tokenizer)
        self.incarnation = uuid.uuid4().hex
        self.alive = True
        self.lock = asyncio.Lock()

    def vanish(self) -> None:
        self.alive = False

    def inject(self, fault: str, after: int) -> None:
        self.fault, self.fault_after = fault, after

    # ---- MeshClient --------------------------------------------------------------------------------
    async def reset(self):
        if not self.alive:
            raise Gone("the replica is gone")
        async with self.lock:
            self.runner.reset()
        return self.incarnation, self.runner.caps

    async def wait_closed(self):
        await asyncio.Event().wait()  # in-process: no link whose close tells it went (the heartbeat does)

    async def execute(self, work: MeshWork, incarnation: str):
        if not self.alive:
            raise Gone("the replica is gone")
        if incarnation != self.incarnation:
            raise StaleWork("work for another incarnation")
        async with self.lock:
            if incarnation != self.incarnation:  # queued behind a work the restart left (under the old lock)
                raise StaleWork("work queued before a restart")
            self.works += 1
            if work.decode is not None:
                self.round_steps.append(work.decode.num_steps)
            runner = self.runner
            steps, index = runner.execute(work), 0
            try:
                while (step := await _next_step(steps)) is not None:
                    fault = self.fault_at(work, index)
                    index += 1
                    if fault == "raise":
                        raise RuntimeError("device lost")
                    if fault == "stop":  # Serve replaces the replica: the rest of the work is refused, a new one starts
                        self.restart()
                        raise ReplicaStopping(f"work {work.work_id} stopped: the replica is shutting down")
                    if fault == "taken":  # another router's reset took the mesh (this router is being replaced)
                        raise LeaseTaken(f"work {work.work_id} was planned before a reset")
                    if fault == "vanish":
                        self.vanish()
                    elif fault == "hang":
                        await self.unhang.wait()
                    if not self.alive:
                        raise Gone("the replica died mid-work")
                    yield step
            finally:
                if runner is not self.runner:  # restarted under this work (see restart); a later one runs on the new
                    runner.close()

    def fault_at(self, work: MeshWork, index: int) -> str | None:
        """The fault due at the work's `index`-th result (prefill chunks' first, then decode steps): fault_due."""
        return fault_due(self)
