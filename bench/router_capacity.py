"""How many real-time Galaxies one router keeps busy: the Router in-process (no Ray, no HTTP) with N simulated
meshes, every one of their slots kept full.

    python -m bench.router_capacity [--meshes 1,2,4,8,16,32] [--seconds 10] [--mesh-mode processes|threads]
                                    [--ingresses 1] [--json]

For each N: one `deployments.router.Router` on this process's event loop; N meshes, each model/simulated.py's
SimulatedBackend at time_scale 1.0 (a Galaxy's published prefill and decode times) behind model/runner.py's
MeshRunner, as a MeshClient like the Serve mesh replica (works run strictly in order, queued on the mesh as
soon as the router sends them, one result message per step); and consumers standing in for the ingress,
holding N x (slots + `--extra-per-mesh`) requests (greedy, ignore_eos, `--max-tokens`, a fresh prompt each),
each followed at once by a new one when it ends, so every slot stays busy and a few requests wait. With the
router's multiplexed API (`submit` + `events`) the consumers are `--ingresses` long-lived streams, one per
ingress replica; otherwise one Router.generate stream per request.

Meshes run in processes of their own by default (`ProcessMesh`, forked, one pipe each), as Serve runs one
replica per mesh: the router's process then holds only the router, its loop and the consumers, and pays for
unpickling every StepResult and pickling every message to a consumer, as across a process boundary. With
`--mesh-mode threads` (`ThreadMesh`) they are threads of the router's process, sharing its GIL.

After `--warmup-s` (the first prefills) it measures over `--seconds`:

  router_cpu_us_per_token  CPU of the event-loop thread (time.thread_time: the router's scheduling, result
                           intake, flushing, (un)pickling and its share of the async plumbing, plus the
                           consumers' counting, which is trivial) per token the consumers received;
  busy                     per mesh, simulated device seconds / wall seconds (the published prefill and
                           decode times of the steps the device ran; an overlapped step starts when the one
                           before it ends, or when the host starts it if later); every mesh >= 0.97 is
                           `kept_busy`;
  starved                  per mesh, the fraction of the time it waited for a work: the router was late
                           (what a slow router costs; threads: no work queued on the mesh);
  overrun                  per mesh, time inside works beyond the device time, per wall second: its own host
                           work (MeshRunner) where no step overlaps it (a step that needs host logits, a
                           work's last), waiting for a core (or the GIL), late wake-ups (what this box costs,
                           not the router);
  loop_busy, lag p99       the loop thread's CPU / wall (1.0: the router is out of CPU) and how late a 5 ms
                           timer on it fires (99th percentile); `router_cores_at_full_speed` = loop_busy /
                           mean busy: the cores the router would need to keep every mesh 100% busy;
  process_cpu, mesh_cpu    the router process's CPU / wall (threads: the GIL lets about 1.0 of Python run at
                           once), and all meshes' CPU / wall together.

Ray's transport itself (gRPC, the object store) is not modelled. `largest_kept_busy` is the largest N of the
list up to which every mesh of every run stayed >= 97% busy; `largest_kept_fed` the same for the router's
part alone (no mesh starved more than 3% of the time: what the mesh loses to its own host work and to this
box is left out); `limit` names what held a run back. A run in which requests failed (`errors`) is neither: its
meshes were not given the load.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import multiprocessing
import pickle
import queue as queue_module
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np

from bench.host import REFERENCE, reference_loop_us
from deployments.config import MAX_TIME_SCALE
from deployments.router import Router, RouterConfig
from model.runner import MeshRunner
from model.simulated import SimulatedBackend
from scheduler.sampling import SamplingParams
from scheduler.work import MeshWork, TokenEvent

BUSY_BAR = 0.97
_END = object()


class ThreadMesh:
    """A MeshClient on a thread of this process, like one Serve mesh replica: `execute` queues the work on
    the mesh at once (it runs after the works before it, strictly in order), and its results come back one
    per step through the event loop. It keeps the time its thread had no work (`starved_s`) and spent in
    works (`working_s`, of which `backend.device_seconds` is simulated device time) and its thread's CPU.
    Every mesh thread shares the GIL with the router's loop."""

    def __init__(self, name: str, time_scale: float = 1.0, serialize: bool = True, **backend_kwargs):
        self.name = name
        self.backend = SimulatedBackend(time_scale=time_scale, **backend_kwargs)
        self.runner = MeshRunner(self.backend)
        self.incarnation = uuid.uuid4().hex
        self.serialize = serialize
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._closed = False
        self._queued = 0  # works sent and not finished
        self._idle_since: float | None = time.perf_counter()
        self.starved_s = 0.0
        self.working_s = 0.0
        self.cpu_s = 0.0

    def counters(self) -> dict:
        """Cumulative seconds so far (an idle stretch still open counts up to now)."""
        with self._lock:
            starved = self.starved_s
            if self._idle_since is not None:
                starved += time.perf_counter() - self._idle_since
            return {"device_s": self.backend.device_seconds, "starved_s": starved, "working_s": self.working_s,
                    "cpu_s": self.cpu_s}

    async def reset(self):
        await asyncio.wrap_future(self.executor.submit(self.runner.reset))  # after the works already queued
        return self.incarnation, self.runner.caps

    async def wait_closed(self):
        await asyncio.Event().wait()  # it never goes

    def execute(self, work: MeshWork, incarnation: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if incarnation != self.incarnation:
            queue.put_nowait(RuntimeError("work for another incarnation"))
            return self._results(queue)
        with self._lock:  # not beside close(): a work is either queued before the executor shuts or refused
            if self._closed:
                queue.put_nowait(RuntimeError(f"{self.name} is closed"))
                return self._results(queue)
            self._queued += 1
            if self._idle_since is not None:
                self.starved_s += time.perf_counter() - self._idle_since
                self._idle_since = None
            future = self.executor.submit(self._run, work, loop, queue)
        future.add_done_callback(partial(self._dropped, loop, queue))
        return self._results(queue)

    def _dropped(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, future: Future) -> None:
        """A work close() cancelled before it ran: its stream ends with an error, or its consumer would wait on it
        for ever."""
        if not future.cancelled():
            return
        with self._lock:
            self._queued -= 1
            if self._queued == 0:
                self._idle_since = time.perf_counter()
        with contextlib.suppress(RuntimeError):  # its loop is closed already: no one waits on it
            loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"{self.name} closed before the work ran"))

    def _run(self, work: MeshWork, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """On the mesh thread: every step of the work, each handed to the loop as it is made."""
        last, cpu0 = time.perf_counter(), time.thread_time()
        try:
            for step in self.runner.execute(work):
                loop.call_soon_threadsafe(queue.put_nowait, pickle.dumps(step) if self.serialize else step)
                now = time.perf_counter()
                with self._lock:
                    self.working_s += now - last
                last = now
            loop.call_soon_threadsafe(queue.put_nowait, _END)
        except BaseException as exc:  # noqa: BLE001 - handed to the router, as a replica's error would be
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            now = time.perf_counter()
            with self._lock:
                self.working_s += now - last
                self.cpu_s += time.thread_time() - cpu0
                self._queued -= 1
                if self._queued == 0:
                    self._idle_since = now

    @staticmethod
    async def _results(queue: asyncio.Queue):
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield pickle.loads(item) if isinstance(item, bytes) else item

    def close(self) -> None:
        """The work running goes on to its end; those still queued end with an error (`_dropped`)."""
        with self._lock:
            self._closed = True
        self.executor.shutdown(wait=False, cancel_futures=True)  # outside the lock: _dropped takes it


def _mesh_process(conn, time_scale: float, backend_kwargs: dict) -> None:
    """A mesh in a process of its own: reset and work requests in order from `conn`. For a work, one
    ("step", StepResult, device_s, working_s, idle_s) per step (the device time that step took, the wall
    time since the previous message while working, the time the mesh waited for this work), then
    ("end", cpu_s, working_s)."""
    import torch
    torch.set_num_threads(1)
    backend = SimulatedBackend(time_scale=time_scale, **backend_kwargs)
    runner = MeshRunner(backend)
    idle = 0.0
    while True:
        waited = time.perf_counter()
        try:
            kind, payload = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        idle += time.perf_counter() - waited
        if kind == "close":
            return
        if kind == "reset":
            runner.reset()
            conn.send(("reset", runner.caps))
            continue
        last, cpu0 = time.perf_counter(), time.thread_time()
        try:
            for step in runner.execute(payload):
                device, backend.device_seconds = backend.device_seconds, 0.0
                now = time.perf_counter()
                conn.send(("step", step, device, now - last, idle))
                last, idle = now, 0.0
        except Exception as exc:  # noqa: BLE001 - handed to the router, as a replica's error would be
            conn.send(("error", repr(exc)))
            continue
        conn.send(("end", time.thread_time() - cpu0, time.perf_counter() - last))


class ProcessMesh:
    """A MeshClient whose mesh runs in a process of its own, as each Serve mesh replica does (no GIL shared
    with the router). Works and resets are pickled on the loop (the router pays for it, as for a Serve call)
    and written down a pipe in order by a writer thread (a 128k-context work carries a 256 KB page table:
    more than a pipe holds while the mesh is busy, and Ray's transport does not block the caller either);
    results come back one message per step, read and unpickled by the event loop.
    `starved_s` is the time the mesh process waited for a work (the router's late, or its message was on
    the way); `device_s` sums the steps' device time. A mesh process that ends under it fails the works and resets
    sent to it, and every later one, once each (`failure` says why), and `wait_closed` returns, as for a replica
    whose link closed."""

    def __init__(self, name: str, ctx, time_scale: float = 1.0, **backend_kwargs):
        self.name = name
        self.incarnation = uuid.uuid4().hex
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_mesh_process, args=(child, time_scale, backend_kwargs), name=name,
                                daemon=True)
        self.proc.start()
        child.close()
        self.pending: deque[tuple[str, asyncio.Queue]] = deque()  # works and resets sent, in order
        self.device_s = self.starved_s = self.working_s = self.cpu_s = 0.0
        self._reading = False
        self.failure: str | None = None  # set once the mesh process is found gone
        self._gone = asyncio.Event()
        self._outbox: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._writer: threading.Thread | None = None  # started on first use: after every fork

    def _write(self) -> None:
        while (blob := self._outbox.get()) is not None:
            try:
                self.conn.send_bytes(blob)
            except OSError:
                return

    def counters(self) -> dict:
        """Cumulative seconds, as of the last step or work end received."""
        return {"device_s": self.device_s, "starved_s": self.starved_s, "working_s": self.working_s,
                "cpu_s": self.cpu_s}

    def _send(self, kind: str, payload) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self.failure is not None:
            queue.put_nowait(RuntimeError(self.failure))
            return queue
        if not self._reading:
            asyncio.get_running_loop().add_reader(self.conn.fileno(), self._readable)
            self._reading = True
            self._writer = threading.Thread(target=self._write, name=f"{self.name}-writer", daemon=True)
            self._writer.start()
        self.pending.append((kind, queue))
        self._outbox.put(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL))
        return queue

    def _readable(self) -> None:
        try:
            self._read()
        except (EOFError, OSError):  # the process ended: its pipe would read EOF at every loop pass from now on
            self._died()

    def _read(self) -> None:
        while self.conn.poll():
            msg = self.conn.recv()
            kind, queue = self.pending[0]
            if msg[0] == "step":
                self.device_s += msg[2]
                self.working_s += msg[3]
                self.starved_s += msg[4]
                queue.put_nowait(msg[1])
                continue
            self.pending.popleft()
            if msg[0] == "reset":
                queue.put_nowait(msg[1])
                continue
            if msg[0] == "end":
                self.cpu_s += msg[1]
                self.working_s += msg[2]
                queue.put_nowait(_END)
            else:
                queue.put_nowait(RuntimeError(msg[1]))

    def _died(self) -> None:
        """Stop reading the dead pipe; fail what was sent, once."""
        asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.proc.join(1)  # it has closed its end: it is exiting
        self.failure = f"{self.name}: its process ended (exit code {self.proc.exitcode})"
        while self.pending:
            self.pending.popleft()[1].put_nowait(RuntimeError(self.failure))
        self._gone.set()

    async def reset(self):
        caps = await self._send("reset", None).get()
        if isinstance(caps, BaseException):
            raise caps
        return self.incarnation, caps

    async def wait_closed(self):
        await self._gone.wait()

    def execute(self, work: MeshWork, incarnation: str):
        if incarnation != self.incarnation:
            queue: asyncio.Queue = asyncio.Queue()
            queue.put_nowait(RuntimeError("work for another incarnation"))
            return ThreadMesh._results(queue)
        return ThreadMesh._results(self._send("work", work))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self._outbox.put(pickle.dumps(("close", None)))
        self._outbox.put(None)
        if self._writer is not None:
            self._writer.join(5)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


class Consumers:
    """Tasks standing in for the ingress, counting the tokens, events and messages they receive. Every
    request that ends is followed at once by a new one (a fresh prompt), so the router always holds `count`.

    With the router's multiplexed API (`submit` + `events`: one long-lived stream per ingress replica, one
    message per flush for all its requests) there are `ingresses` such streams sharing the requests;
    otherwise every request is one Router.generate stream of its own."""

    def __init__(self, router: Router, count: int, prompt_tokens: int, max_tokens: int, serialize: bool,
                 ingresses: int = 1, vocab: int = 100_000, seed: int = 0):
        self.router = router
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.prompt_tokens = prompt_tokens
        self.serialize = serialize
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.ids = itertools.count()
        self.tokens = 0
        self.events = 0
        self.messages = 0
        self.requests_done = 0
        self.errors: list[str] = []
        self.multiplexed = hasattr(router, "submit") and hasattr(router, "events")
        if self.multiplexed:
            shares = [count // ingresses + (i < count % ingresses) for i in range(ingresses)]
            self.tasks = [asyncio.create_task(self._ingress(f"ingress-{i}", n)) for i, n in enumerate(shares) if n]
        else:
            self.tasks = [asyncio.create_task(self._one()) for _ in range(count)]

    def _request(self) -> tuple[str, list[int]]:
        return f"req-{next(self.ids)}", self.rng.integers(1000, self.vocab, self.prompt_tokens).tolist()

    def _submit(self, consumer: str) -> None:
        rid, prompt = self._request()
        try:
            self.router.submit(rid, prompt, self.params, None, [], consumer)
        except Exception as exc:  # noqa: BLE001 - reported; the bench goes on
            self.errors.append(repr(exc))

    async def _ingress(self, name: str, requests: int) -> None:
        """One ingress replica's stream: its batches, and a new request for every one that ends."""
        for _ in range(requests):
            self._submit(name)
        batches: asyncio.Queue = asyncio.Queue()
        self.router.attach(name, batches.put_nowait)  # batches as the link carries them (packed)
        try:
            while True:
                batch = await batches.get()
                if self.serialize:
                    pickle.dumps(batch)  # what sending it to the ingress replica costs the router
                self.messages += 1
                for item in batch:
                    if type(item) is tuple:  # a request's plain tokens
                        self.tokens += len(item[1])
                        self.events += 1
                        continue
                    if isinstance(item, TokenEvent):
                        self.tokens += len(item.token_ids)
                        self.events += 1
                        if item.finish_reason is None:
                            continue
                        self.requests_done += 1
                    else:  # a request the router failed
                        self.errors.append(repr(getattr(item, "error", item)))
                    self._submit(name)
        finally:
            self.router.detach(name)

    async def _one(self) -> None:
        while True:
            rid, prompt = self._request()
            try:
                async for event in self.router.generate(rid, prompt, self.params):
                    if self.serialize:
                        pickle.dumps(event)  # what sending it to an ingress replica costs the router
                    self.tokens += len(event.token_ids)
                    self.events += 1
                    self.messages += 1
                self.requests_done += 1
            except Exception as exc:  # noqa: BLE001 - reported; the bench goes on
                self.errors.append(repr(exc))
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _lag_probe(lags: list[float], period_s: float = 0.005) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period_s)
        lags.append(time.perf_counter() - t - period_s)


# (wall clock, loop thread CPU, process CPU, tokens, events and messages the consumers received, each mesh's counters)
Sample = tuple[float, float, float, int, int, int, list[dict]]


def figures(names: list[str], first: Sample, last: Sample, lags: list[float], errors: list[str], mesh_mode: str,
            multiplexed: bool) -> dict:
    """A run's figures from two samples, the loop's lags between them and the run's errors (the first five)."""
    (t0, loop0, proc0, tok0, ev0, msg0, c0), (t1, loop1, proc1, tok1, ev1, msg1, c1) = first, last
    wall, tokens = t1 - t0, tok1 - tok0
    per_mesh = []
    for name, a, b in zip(names, c0, c1):
        device, starved = b["device_s"] - a["device_s"], b["starved_s"] - a["starved_s"]
        working, cpu = b["working_s"] - a["working_s"], b["cpu_s"] - a["cpu_s"]
        per_mesh.append({"name": name, "busy": device / wall, "starved": starved / wall,
                         "overrun": max(working - device, 0.0) / wall, "cpu": cpu / wall})
    busy = [p["busy"] for p in per_mesh]
    window_lags = sorted(lags) or [0.0]
    return {
        "meshes": len(names), "seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "events_per_s": (ev1 - ev0) / wall, "tokens_per_event": tokens / max(ev1 - ev0, 1),
        "messages_per_s": (msg1 - msg0) / wall, "multiplexed": multiplexed,
        "router_cpu_us_per_token": (loop1 - loop0) / tokens * 1e6 if tokens else float("nan"),
        "loop_busy": (loop1 - loop0) / wall,
        "router_cores_at_full_speed": (loop1 - loop0) / wall / max(sum(busy) / len(busy), 1e-9),
        "loop_lag_p99_ms": window_lags[int(0.99 * (len(window_lags) - 1))] * 1e3,
        "process_cpu": (proc1 - proc0) / wall,
        "mesh_cpu": sum(p["cpu"] for p in per_mesh), "mesh_mode": mesh_mode,
        "busy_min": min(busy), "busy_mean": sum(busy) / len(busy),
        "starved_mean": sum(p["starved"] for p in per_mesh) / len(per_mesh),
        "starved_max": max(p["starved"] for p in per_mesh),
        "overrun_mean": sum(p["overrun"] for p in per_mesh) / len(per_mesh),
        "kept_busy": not errors and min(busy) >= BUSY_BAR,
        "kept_fed": not errors and max(p["starved"] for p in per_mesh) <= 1 - BUSY_BAR,
        "errors": errors,
        "per_mesh": per_mesh,
    }


async def measure(num_meshes: int, seconds: float = 10.0, warmup_s: float = 3.0, prompt_tokens: int = 128,
                  max_tokens: int = 1024, extra_per_mesh: int = 2, time_scale: float = 1.0, serialize: bool = True,
                  router_config: RouterConfig | None = None, ingresses: int = 1, mesh_mode: str = "processes",
                  **backend_kwargs) -> dict:
    if mesh_mode == "processes":
        ctx = multiprocessing.get_context("fork")  # before any thread starts here: children share the imports
        meshes = [ProcessMesh(f"mesh-{i}", ctx, time_scale, **backend_kwargs) for i in range(num_meshes)]
    elif mesh_mode == "threads":
        meshes = [ThreadMesh(f"mesh-{i}", time_scale, serialize, **backend_kwargs) for i in range(num_meshes)]
    else:
        raise ValueError(f"mesh_mode: {mesh_mode!r} (processes | threads)")
    router = Router([(m.name, m) for m in meshes], router_config or RouterConfig())
    consumers = None
    lags: list[float] = []
    probe = asyncio.create_task(_lag_probe(lags))
    try:
        deadline = time.monotonic() + 60
        while not all(m.up for m in router.meshes):
            if failed := [m.failure for m in meshes if isinstance(m, ProcessMesh) and m.failure]:
                raise RuntimeError(f"a mesh did not start: {failed[0]}")  # it will not come: no need to wait
            if time.monotonic() > deadline:
                raise TimeoutError("the meshes never came up")
            await asyncio.sleep(0.01)
        # As Serve does once a replica has started (gc.collect + gc.freeze; RAY_SERVE_FREEZE_GC_ON_STARTUP, on by
        # default): the collector then walks only what the run allocates, not every object the imports (torch)
        # made. Unfrozen, collections of that heap were half of the router's CPU at 32 meshes (perf).
        gc.collect()
        gc.freeze()
        slots = router.meshes[0].caps.num_slots
        consumers = Consumers(router, num_meshes * (slots + extra_per_mesh), prompt_tokens, max_tokens, serialize,
                              ingresses)
        await asyncio.sleep(warmup_s)

        def sample() -> Sample:
            return (time.perf_counter(), time.thread_time(), time.process_time(), consumers.tokens, consumers.events,
                    consumers.messages, [m.counters() for m in meshes])
        first, lag0 = sample(), len(lags)
        await asyncio.sleep(seconds)
        last = sample()
    finally:
        probe.cancel()
        if consumers is not None:
            await consumers.close()
        await router.close()
        for m in meshes:
            m.close()
        gc.unfreeze()
    # a failed request is no load: a mesh process given no work never reports the time it waited for one
    errors = ([m.failure for m in meshes if isinstance(m, ProcessMesh) and m.failure] + consumers.errors)[:5]
    return figures([m.name for m in meshes], first, last, lags[lag0:], errors, mesh_mode, consumers.multiplexed)


def largest_kept_busy(results: list[dict], key: str = "kept_busy") -> int:
    """The largest N of the list up to which every run (in ascending N) had `key`; 0: none."""
    best = 0
    for r in sorted(results, key=lambda r: r["meshes"]):
        if not r[key]:
            break
        best = r["meshes"]
    return best


def limit(r: dict) -> str:
    """What held the meshes back in one run, in words."""
    if r["errors"]:
        return f"requests failed: {r['errors'][0]}"
    if r["kept_busy"]:
        return "-"
    if r["starved_mean"] >= r["overrun_mean"]:
        return (f"router: late (needs {r['router_cores_at_full_speed']:.2f} cores, got {r['loop_busy']:.2f}, "
                f"loop lag p99 {r['loop_lag_p99_ms']:.0f} ms)")
    if r["mesh_mode"] == "threads":
        return "mesh threads: GIL" if r["process_cpu"] > 0.9 else "mesh threads"
    return "meshes: CPU (box)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", default="1,2,4,8,16,32", help="comma-separated N values")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per N")
    p.add_argument("--warmup-s", type=float, default=3.0, help="before the window: the first prefills")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=1024, help="per request; a new one follows at once")
    p.add_argument("--extra-per-mesh", type=int, default=2, help="requests waiting per mesh, beyond its slots")
    p.add_argument("--time-scale", type=float, default=1.0, help="1.0: a Galaxy's published speed")
    p.add_argument("--decode-steps", type=int, default=RouterConfig.decode_steps)
    p.add_argument("--ingresses", type=int, default=1, help="consumer streams (ingress replicas), multiplexed API")
    p.add_argument("--mesh-mode", choices=("processes", "threads"), default="processes")
    p.add_argument("--no-serialize", action="store_true",
                   help="threads: do not pickle StepResults; either: do not pickle messages to consumers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        ns = sorted({int(n) for n in args.meshes.split(",")})
    except ValueError:
        p.error(f"--meshes: comma-separated whole numbers, not {args.meshes!r}")
    # a value out of these failed deep in a run (division by zero, an empty mesh list, a mesh that cannot start)
    for flag, ok, rule in [("--meshes", ns[0] >= 1, "each at least 1"),
                           ("--seconds", 0 < args.seconds < math.inf, "more than 0"),
                           ("--warmup-s", 0 <= args.warmup_s < math.inf, "at least 0"),
                           ("--prompt-tokens", args.prompt_tokens >= 1, "at least 1"),
                           ("--max-tokens", args.max_tokens >= 1, "at least 1"),
                           ("--extra-per-mesh", args.extra_per_mesh >= 0, "at least 0"),
                           ("--time-scale", 0 < args.time_scale <= MAX_TIME_SCALE, f"in (0, {MAX_TIME_SCALE:g}]"),
                           ("--decode-steps", args.decode_steps >= 1, "at least 1"),
                           ("--ingresses", args.ingresses >= 1, "at least 1")]:
        if not ok:
            p.error(f"{flag}: {rule}")
    host_before = reference_loop_us()
    results = []
    for n in ns:
        r = asyncio.run(measure(n, args.seconds, args.warmup_s, args.prompt_tokens, args.max_tokens,
                                args.extra_per_mesh, args.time_scale, not args.no_serialize,
                                RouterConfig(decode_steps=args.decode_steps), args.ingresses, args.mesh_mode))
        r["limit"] = limit(r)
        results.append(r)
        if not args.json:
            print(f"  N={n}: busy min {r['busy_min']:.3f}, router {r['router_cpu_us_per_token']:.1f} us/token",
                  file=sys.stderr, flush=True)
    report = {"config": {"time_scale": args.time_scale, "seconds": args.seconds, "prompt_tokens": args.prompt_tokens,
                         "max_tokens": args.max_tokens, "decode_steps": args.decode_steps,
                         "mesh_mode": args.mesh_mode, "ingresses": args.ingresses, "serialize": not args.no_serialize, "busy_bar": BUSY_BAR},
              "runs": results, "largest_kept_busy": largest_kept_busy(results),
              "largest_kept_fed": largest_kept_busy(results, "kept_fed"),
              "host_reference_us": [host_before, reference_loop_us()]}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'meshes':>6} {'tok/s':>8} {'router us/tok':>13} {'loop busy':>9} {'lag p99 ms':>10} {'mesh cpu':>8} "
              f"{'busy min':>8} {'busy mean':>9} {'starved':>7} {'overrun':>7} {'msg/s':>6}  limit")
        for r in results:
            print(f"{r['meshes']:>6} {r['tokens_per_s']:>8.0f} {r['router_cpu_us_per_token']:>13.1f} "
                  f"{r['loop_busy']:>9.2f} {r['loop_lag_p99_ms']:>10.1f} {r['mesh_cpu']:>8.2f} "
                  f"{r['busy_min']:>8.3f} {r['busy_mean']:>9.3f} {r['starved_mean']:>7.3f} {r['overrun_mean']:>7.3f} "
                  f"{r['messages_per_s']:>6.0f}  {r['limit']}")
        print(f"largest N with every mesh >= {BUSY_BAR:.0%} busy: {report['largest_kept_busy']}; "
              f"with no mesh starved by the router more than {1 - BUSY_BAR:.0%} of the time: {report['largest_kept_fed']}")
        print(f"host: {REFERENCE} took {report['host_reference_us'][0]:.0f} us of CPU before the runs, "
              f"{report['host_reference_us'][1]:.0f} after (lower is faster; bench/host.py)")
    return report


if __name__ == "__main__":
    main()
