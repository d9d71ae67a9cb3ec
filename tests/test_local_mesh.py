"""The in-process mesh double keeps the replica's contract: a work's consumer that goes away does not free the runner
while the work's step still runs on its thread (deployments/mesh_replica.py waits for it too)."""
from __future__ import annotations

import asyncio
import threading

from model.simulated import SimulatedBackend
from scheduler.sampling import SamplingParams
from scheduler.work import MeshWork, PrefillChunk
from tests.local_mesh import LocalMesh


def test_a_reset_after_a_cancelled_work_waits_for_its_running_step():
    """Before, the cancel let go of the mesh's lock at once: the reset ran beside the step, which then put its slot
    back into the runner the reset had just emptied."""
    entered, go = threading.Event(), threading.Event()

    def backend() -> SimulatedBackend:
        made = SimulatedBackend(time_scale=0.01, num_slots=4, num_blocks=64, kv_groups=1)
        prefill = made.prefill

        def held(*args, **kwargs):
            entered.set()
            go.wait()
            return prefill(*args, **kwargs)
        made.prefill = held
        return made

    async def scenario() -> list[int]:
        mesh = LocalMesh(backend)
        await mesh.reset()
        work = MeshWork(0, [PrefillChunk("r", 0, [1, 2, 3], 0, [0], SamplingParams(max_tokens=4), 3)])

        async def consume():
            async for _ in mesh.execute(work, mesh.incarnation):
                pass
        task = asyncio.create_task(consume())
        await asyncio.to_thread(entered.wait)
        task.cancel()
        reset = asyncio.create_task(mesh.reset())
        await asyncio.sleep(0)  # the cancel and the reset both get their turn before the step ends
        await asyncio.sleep(0)
        go.set()
        await asyncio.gather(task, return_exceptions=True)
        await reset
        await asyncio.get_running_loop().shutdown_default_executor()  # the step's thread is done
        return list(mesh.runner.slots)

    assert asyncio.run(scenario()) == []
