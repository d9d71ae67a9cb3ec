"""bench.router_capacity: the router in-process with simulated meshes (in processes and in threads), on tiny
runs; its figures are printed, never asserted, only their shape and sanity."""
import asyncio
import json
import multiprocessing
import threading

import pytest

from bench import router_capacity as rc
from scheduler.work import MeshWork

TINY = dict(seconds=1.0, warmup_s=1.5, prompt_tokens=16, max_tokens=12, extra_per_mesh=1, time_scale=0.2,
            max_seq_len=4096)


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_a_tiny_run_keeps_the_meshes_working_and_accounts_for_their_time(mode):
    r = asyncio.run(rc.measure(2, mesh_mode=mode, **TINY))
    assert r["meshes"] == 2 and r["mesh_mode"] == mode and len(r["per_mesh"]) == 2
    assert r["tokens"] > 0 and r["errors"] == []
    assert r["router_cpu_us_per_token"] > 0 and 0 < r["loop_busy"] < 2
    for m in r["per_mesh"]:
        assert 0 < m["busy"] <= 1.1 and 0 <= m["starved"] <= 1.1 and m["overrun"] >= 0
        assert m["busy"] + m["starved"] + m["overrun"] == pytest.approx(1.0, abs=0.15)  # up to a step at each edge
    assert r["busy_min"] <= r["busy_mean"] and isinstance(r["kept_busy"], bool)


def test_requests_that_end_are_replaced_so_the_router_always_holds_the_same_number():
    async def run():
        meshes = [rc.ThreadMesh("mesh-0", 0.05, max_seq_len=4096)]
        router = rc.Router([("mesh-0", meshes[0])], rc.RouterConfig())
        while not router.meshes[0].up:
            await asyncio.sleep(0.01)
        consumers = rc.Consumers(router, 5, prompt_tokens=8, max_tokens=4, serialize=True)
        await asyncio.sleep(1.0)
        held = len(router.requests)
        await consumers.close()
        await router.close()
        meshes[0].close()
        return consumers, held
    consumers, held = asyncio.run(run())
    assert consumers.requests_done >= 5 and consumers.errors == []
    assert held <= 5 and consumers.tokens >= 4 * consumers.requests_done


def test_largest_kept_busy_stops_at_the_first_miss():
    runs = [{"meshes": n, "kept_busy": ok} for n, ok in [(4, True), (1, True), (2, True), (8, False), (16, True)]]
    assert rc.largest_kept_busy(runs) == 4
    assert rc.largest_kept_busy([{"meshes": 1, "kept_busy": False}]) == 0
    assert rc.largest_kept_busy([{"meshes": 1, "kept_fed": True}, {"meshes": 2, "kept_fed": True}], "kept_fed") == 2


def test_command_line_prints_one_json_object(capsys):
    report = rc.main(["--meshes", "1", "--seconds", "0.5", "--warmup-s", "0.3", "--max-tokens", "16",
                      "--time-scale", "0.2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["largest_kept_busy"] == report["largest_kept_busy"] in (0, 1)
    assert out["largest_kept_fed"] in (0, 1)
    assert [r["meshes"] for r in out["runs"]] == [1]
    assert out["config"]["mesh_mode"] == "processes" and out["runs"][0]["limit"]
    assert len(out["host_reference_us"]) == 2 and all(us > 0 for us in out["host_reference_us"])


async def _drain(stream) -> list:
    return [step async for step in stream]


def test_a_mesh_process_that_dies_ends_its_works_as_failed_once_and_is_read_no_more():
    """The dead child's pipe reads EOF at every loop pass: the reader raised there each time (a spinning loop, a
    flooded log) and the work sent to the mesh never ended. Now it fails once, and the mesh counts as closed."""
    async def run():
        context_errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: context_errors.append(context))
        mesh = rc.ProcessMesh("mesh-0", multiprocessing.get_context("fork"), 0.05, max_seq_len=4096)
        try:
            await asyncio.wait_for(mesh.reset(), 10)  # up: its pipe is read by the loop
            mesh.proc.kill()
            mesh.proc.join(10)
            with pytest.raises(RuntimeError, match="mesh-0"):
                await asyncio.wait_for(_drain(mesh.execute(MeshWork(0), mesh.incarnation)), 10)
            await asyncio.wait_for(mesh.wait_closed(), 10)
            for _ in range(100):  # loop passes: a reader left on the dead pipe would run at each
                await asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="mesh-0"):  # later calls fail at once too
                await asyncio.wait_for(mesh.reset(), 10)
        finally:
            mesh.close()
        return mesh, context_errors
    mesh, context_errors = asyncio.run(run())
    assert context_errors == [] and "ended" in mesh.failure


def test_closing_a_thread_mesh_ends_the_streams_of_the_works_it_drops():
    """close() cancels the works still queued on the mesh thread: their result streams end with an error (a
    consumer waited on one forever), as does a work sent after it."""
    async def run():
        mesh = rc.ThreadMesh("mesh-0", 0.05, max_seq_len=4096)
        await mesh.reset()
        busy, gate = threading.Event(), threading.Event()
        mesh.executor.submit(lambda: (busy.set(), gate.wait()))
        assert busy.wait(10)  # the mesh thread is busy: the works below wait in its queue (not yet taken, under load,
        # its first item was cancelled by close() while the thread took and ran a work)
        queued = [mesh.execute(MeshWork(i), mesh.incarnation) for i in range(2)]
        mesh.close()
        gate.set()
        for stream in queued:
            with pytest.raises(RuntimeError, match="closed"):
                await asyncio.wait_for(_drain(stream), 10)
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(_drain(mesh.execute(MeshWork(2), mesh.incarnation)), 10)
    asyncio.run(run())


@pytest.mark.parametrize("flag, value", [("--meshes", "0"), ("--ingresses", "0"), ("--seconds", "0"),
                                         ("--time-scale", "0"), ("--max-tokens", "0"), ("--extra-per-mesh", "-1")])
def test_command_line_refuses_a_value_no_run_can_take_naming_the_flag(flag, value, capsys):
    """Such a value failed deep in a run (a ZeroDivisionError, an IndexError) or, for a mesh process that could not
    start, waited a minute for meshes that never came up."""
    with pytest.raises(SystemExit):
        rc.main(["--meshes", "1", "--seconds", "0.5", "--warmup-s", "0.1", flag, value])  # the last one given counts
    assert flag in capsys.readouterr().err


def test_a_mesh_process_that_cannot_start_ends_the_run_at_once_naming_it():
    """Its backend refused the arguments (3 slots over 4 KV groups): the run waited 60 s for it, then said only
    that the meshes never came up."""
    with pytest.raises(RuntimeError, match="mesh-0"):
        asyncio.run(asyncio.wait_for(rc.measure(1, mesh_mode="processes", **{**TINY, "num_slots": 3}), 30))


@pytest.mark.parametrize("meshes", ["abc", "1,,2", ""])
def test_a_mesh_list_that_is_not_numbers_is_a_usage_error(meshes, capsys):
    """It was int()'s ValueError traceback."""
    with pytest.raises(SystemExit) as exit_:
        rc.main(["--meshes", meshes])
    assert exit_.value.code == 2 and "--meshes" in capsys.readouterr().err


def test_a_run_whose_requests_failed_is_neither_busy_nor_fed_and_says_why():
    """Every request refused (a prompt past max_seq_len): a mesh process given no work reports no starved time, so
    the run counted as kept fed (`largest_kept_fed` 1) and its limit read "router: late (needs 28742217.21 cores
    ...)"; the errors were only in --json."""
    r = asyncio.run(rc.measure(1, **{**TINY, "seconds": 0.3, "warmup_s": 0.2, "prompt_tokens": 5000}))
    assert "PromptTooLong" in r["errors"][0]
    assert not r["kept_busy"] and not r["kept_fed"]
    r["limit"] = rc.limit(r)
    assert r["limit"].startswith("requests failed") and "PromptTooLong" in r["limit"]
    assert rc.largest_kept_busy([r], "kept_fed") == 0


def _counters(device_s: float = 0.0, starved_s: float = 0.0, working_s: float = 0.0, cpu_s: float = 0.0) -> dict:
    return {"device_s": device_s, "starved_s": starved_s, "working_s": working_s, "cpu_s": cpu_s}


def test_figures_take_each_mesh_over_the_window_and_the_bars_from_the_worst_mesh():
    """Every mesh must be >= 97% busy (the mean of 0.99 and 0.96 passes, the worst does not), and none starved more
    than 3% of the time; the router's CPU per token is the loop thread's, not the whole process's."""
    first = (100.0, 5.0, 6.0, 1000, 100, 50, [_counters(1.0, 1.0, 1.0, 1.0), _counters()])
    last = (110.0, 7.0, 9.0, 21000, 1100, 550,
            [_counters(10.9, 1.05, 10.95, 2.0), _counters(9.6, 0.5, 9.9, 2.0)])
    r = rc.figures(["mesh-0", "mesh-1"], first, last, [i / 1000 for i in range(101)], [], "processes", True)
    assert r["meshes"] == 2 and r["seconds"] == 10.0 and r["tokens"] == 20000 and r["tokens_per_s"] == 2000.0
    assert r["router_cpu_us_per_token"] == pytest.approx(100.0) and r["loop_busy"] == pytest.approx(0.2)
    assert r["process_cpu"] == pytest.approx(0.3) and r["mesh_cpu"] == pytest.approx(0.3)
    assert [m["busy"] for m in r["per_mesh"]] == pytest.approx([0.99, 0.96])
    assert [m["starved"] for m in r["per_mesh"]] == pytest.approx([0.005, 0.05])
    assert [m["overrun"] for m in r["per_mesh"]] == pytest.approx([0.005, 0.03])
    assert (r["busy_min"], r["busy_mean"], r["starved_max"]) == pytest.approx((0.96, 0.975, 0.05))
    assert r["router_cores_at_full_speed"] == pytest.approx(0.2 / 0.975)
    assert r["loop_lag_p99_ms"] == pytest.approx(99.0)
    assert r["kept_busy"] is False and r["kept_fed"] is False


def test_figures_of_a_run_with_errors_keep_no_bar_however_busy():
    first = (0.0, 0.0, 0.0, 0, 0, 0, [_counters()])
    last = (1.0, 0.1, 0.1, 100, 10, 10, [_counters(1.0, 0.0, 1.0, 0.1)])
    assert rc.figures(["mesh-0"], first, last, [], [], "threads", False)["kept_busy"] is True
    r = rc.figures(["mesh-0"], first, last, [], ["PromptTooLong"], "threads", False)
    assert not r["kept_busy"] and not r["kept_fed"] and r["loop_lag_p99_ms"] == 0.0


RUN = {"errors": [], "kept_busy": False, "starved_mean": 0.01, "overrun_mean": 0.05, "mesh_mode": "processes",
       "process_cpu": 0.5, "router_cores_at_full_speed": 1.2, "loop_busy": 0.9, "loop_lag_p99_ms": 12.0}


@pytest.mark.parametrize("changes, said", [
    ({"kept_busy": True}, "-"),
    ({"starved_mean": 0.06}, "router: late (needs 1.20 cores, got 0.90, loop lag p99 12 ms)"),
    ({}, "meshes: CPU (box)"),
    ({"mesh_mode": "threads", "process_cpu": 0.95}, "mesh threads: GIL"),
    ({"mesh_mode": "threads"}, "mesh threads"),
])
def test_limit_names_the_side_that_lost_the_most_time(changes, said):
    """A mesh starved waited for the router; one overrunning its device time lost it to its own host work or the
    box. A run that kept every mesh busy has no limit."""
    assert rc.limit({**RUN, **changes}) == said


def test_command_line_reports_each_bars_largest_n_from_its_own_verdicts(monkeypatch, capsys):
    """largest_kept_fed reads kept_fed, not kept_busy: 2 meshes fed by the router yet not kept busy (the box's CPU)."""
    async def measure(n, *args):
        return {**RUN, "meshes": n, "kept_busy": n == 1, "kept_fed": True}

    monkeypatch.setattr(rc, "measure", measure)
    rc.main(["--meshes", "1,2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["largest_kept_busy"], out["largest_kept_fed"]) == (1, 2)
    assert [r["limit"] for r in out["runs"]] == ["-", "meshes: CPU (box)"]
