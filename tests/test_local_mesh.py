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


def mask_threads() -> set[threading.Thread]:
    """The runners' grammar-mask threads (model/runner.py) alive now."""
    return {t for t in threading.enumerate() if t.name.startswith("grammar-masks")}


def ended(threads: set[threading.Thread]) -> bool:
    """Whether each of `threads` ends within 5 s of the last."""
    for thread in threads:
        thread.join(timeout=5)
    return not any(thread.is_alive() for thread in threads)


def test_a_restart_closes_the_old_runner_once_no_work_steps_it():
    """Serve's restart ends the old replica, whose shutdown closes its runner (and so its grammar-mask thread):
    LocalMesh.restart dropped the old runner unclosed, and each restart of a mesh that had run a grammar left a mask
    thread running while anything still held that runner (here the test; in test_fault_moments TriggerMesh's wrapped
    execute, a reference cycle, until the collector came by). A work hung mid-way may still step the old runner after
    the restart (the runner's close is for when no step runs): the restart does not wait for it, and the runner is
    closed when that work ends."""
    import numpy as np

    from model.embedded import ensure_smollm2
    from model.grammar import choice_grammar, ll_tokenizer
    from model.tokenizer import load_tokenizer
    from scheduler.work import DecodeRound

    tok = load_tokenizer(ensure_smollm2())
    llt = ll_tokenizer(tok, tok.vocab_size)

    def backend() -> SimulatedBackend:
        return SimulatedBackend(time_scale=0.001, num_slots=2, kv_groups=1, num_blocks=16, max_seq_len=1024,
                                vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.stop_ids)))

    constrained = SamplingParams(temperature=0.0, max_tokens=8,
                                 grammar=choice_grammar([" a long answer of several tokens"]))
    table = np.zeros((2, 16), dtype=np.int32)
    table[1, 0] = 1
    work = MeshWork(0, [PrefillChunk("c", 0, [7] * 10, 0, [0], constrained, 10),
                        PrefillChunk("f", 1, [7] * 10, 0, [1], SamplingParams(max_tokens=8, ignore_eos=True), 10)],
                    DecodeRound(3, [0, 1], table))

    async def scenario() -> None:
        before = mask_threads()
        mesh = LocalMesh(backend, lambda: llt)

        async def run(incarnation: str) -> int:
            await mesh.reset()
            return len([step async for step in mesh.execute(work, incarnation)])
        assert await run(mesh.incarnation) == work.num_messages
        first = mask_threads() - before
        assert len(first) == 1
        held = [mesh.runner]  # the old runners, kept from the collector (whose ThreadPoolExecutor ends its thread)
        mesh.restart()  # no work holds the runner: closed now
        assert ended(first)

        await mesh.reset()
        mesh.inject("hang", after=2)  # the first decode step's result hangs: two more steps need the grammar's masks
        hung = asyncio.create_task(run(mesh.incarnation))
        while mesh.fault is not None:
            await asyncio.sleep(0.01)
        second = mask_threads() - before - first
        assert len(second) == 1
        held.append(mesh.runner)
        mesh.restart()
        mesh.unhang.set()
        assert await hung == work.num_messages  # its last step ran on the old runner, with its masks
        assert ended(second)

    asyncio.run(scenario())


def test_a_work_queued_before_a_restart_is_stale_once_its_turn_comes():
    """A work planned for the old incarnation and queued behind a hung one (the router's pipeline) took its turn after
    the restart on the new replica's runner: it wrote its slot into the new incarnation's state, past that
    incarnation's reset, and could run beside the new incarnation's works (their lock is another). The replica refuses
    it (StaleWork: planned before a reset); so does the double now."""
    from scheduler.work import StaleWork

    def backend() -> SimulatedBackend:
        return SimulatedBackend(time_scale=0.001, num_slots=2, num_blocks=16, kv_groups=1)

    def prefill(work_id: int, slot: int) -> MeshWork:
        return MeshWork(work_id, [PrefillChunk(f"r{slot}", slot, [7] * 10, 0, [slot], SamplingParams(max_tokens=4),
                                               10)])

    async def scenario() -> tuple[list, list[int]]:
        mesh = LocalMesh(backend)
        await mesh.reset()
        old = mesh.incarnation

        async def run(work: MeshWork) -> list:
            return [step async for step in mesh.execute(work, old)]
        mesh.inject("hang", after=0)
        hung = asyncio.create_task(run(prefill(0, 0)))
        while mesh.fault is not None:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(run(prefill(1, 1)))
        await asyncio.sleep(0.01)  # waiting for the mesh's lock
        mesh.restart()
        await mesh.reset()
        mesh.unhang.set()
        await hung
        results = await asyncio.gather(queued, return_exceptions=True)
        return results, list(mesh.runner.slots)

    results, slots = asyncio.run(scenario())
    assert isinstance(results[0], StaleWork)
    assert slots == []


def test_a_closed_stack_leaves_no_grammar_mask_thread():
    """A Stack's close ends what its replicas' shutdown ends: each runner's grammar-mask thread (started by a
    constrained request). Before, every closed in-process stack left one per mesh running until the process ended."""
    from tests.in_process import simulated_stack

    before = mask_threads()
    stack = simulated_stack(num_slots=4, num_blocks=64, num_meshes=2)
    bodies = [{"model": "smollm2", "prompt": "hi", "max_tokens": 8, "response_format": {"type": "json_object"}}] * 4
    assert all(r.status_code == 200 for r in stack.posts("/v1/completions", bodies))
    started = mask_threads() - before
    assert started
    stack.close()
    assert ended(started)
