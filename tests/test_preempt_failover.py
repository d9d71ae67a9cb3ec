"""Preemption and failover together: two meshes whose KV pools run dry all the time (two KV groups of 12 blocks, or
the torch mesh's 20, for answers of up to 190 tokens), many requests at once, while a mesh raises, hangs past its
deadline, or vanishes (alone, or with the other one, so requests are held) and comes back. A fault goes, where it
can, to a mesh holding a request preempted there (queued for its recompute, or re-seated since): requests preempted
then moved, moved then preempted on the other mesh, preempted in a hung mesh's queue, held, cancelled while preempted.

The promises (DESIGN "Preemption", "Failure handling"): every request ends, within a bound; each answer not cancelled
equals its solo run (the simulated mesh reads every token back from its KV cache; the torch one, float32, recomputes
the decode step's logits: test_seeded_recompute), streamed without a token lost or twice, with its usage; one cut
short (cancelled, or ended by max_mesh_failures) is a prefix of it; and at the end nothing is left on the router,
either scheduler or either runner.

PREEMPT_FAILOVER_TRIALS=n runs n random trials per case instead of 1 (a stress), printing what they did."""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter

import pytest
import torch

from deployments.router import Router
from model.embedded import ensure_smollm2
from model.grammar import ll_tokenizer
from model.simulated import SimulatedBackend
from model.tokenizer import load_tokenizer
from model.torch_llama import TorchBackend
from scheduler.errors import MeshFailures
from scheduler.sampling import SamplingParams
from scheduler.scheduler import MeshScheduler
from scheduler.sequence import Status
from tests.in_process import Stack, held, until

TRIALS = int(os.environ.get("PREEMPT_FAILOVER_TRIALS", "1"))
BOUND_S = 120.0  # every request of a trial ends within this (a stalled one fails the trial)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


def build(tok, kind: str, tight: bool, path=None) -> Stack:
    """Two tight meshes (or, not `tight`, one roomy quick one for the solo runs)."""
    llt = ll_tokenizer(tok, tok.vocab_size)
    if kind == "simulated":
        def backend():
            return SimulatedBackend(time_scale=0.1 if tight else 1e-3, num_slots=8, kv_groups=2, block_size=16,
                                    num_blocks=12 if tight else 96, max_seq_len=192, vocab_size=tok.vocab_size,
                                    eos_token_ids=tuple(sorted(tok.stop_ids)), eos_rate=0.01)
        chunk = 128  # the simulated prefix alignment
    else:
        def backend():
            return TorchBackend(path, num_slots=4, block_size=16, num_blocks=20 if tight else 96, max_seq_len=320,
                                dtype=torch.float32, device="cpu")
        chunk = 32
    return Stack(tok, backend, num_meshes=2 if tight else 1, grammar_tokenizer=lambda: llt, min_step_deadline_s=1.5,
                 step_deadline_factor=0, prefill_chunk=chunk, max_prefill_tokens=chunk, decode_steps=2,
                 no_mesh_wait_s=30.0)


class Trial:
    """One random trial's requests, faults and counts on a tight Stack."""

    def __init__(self, s: Stack, rng: random.Random, counts: Counter):
        self.s, self.rng, self.counts = s, rng, counts
        self.preempted: set[str] = set()  # request ids preempted (on any mesh)
        self.moved: dict[str, float] = {}  # request id -> when a mesh it was on failed
        self.bad: list[str] = []

    def spec(self, i: int) -> dict:
        rng = self.rng
        return dict(prompt=[rng.randrange(300, 20000) for _ in range(rng.randrange(8, 40))],
                    max_tokens=rng.randrange(40, 150), greedy=rng.random() < 0.5, seed=rng.randrange(1000),
                    ignore_eos=rng.random() < 0.8, logprobs=rng.random() < 0.4, penalties=rng.random() < 0.3,
                    http=i % 2 == 0, cancel=rng.choice([None, None, None, "tokens", "preempted"]),
                    cancel_at=rng.randrange(1, 40))

    # ---- one request, through the ingress (streamed) or the router ---------------------------------------------
    async def http(self, sp: dict) -> dict:
        body = {"model": "smollm2", "prompt": sp["prompt"], "max_tokens": sp["max_tokens"],
                "temperature": 0.0 if sp["greedy"] else 1.0, "ignore_eos": sp["ignore_eos"], "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "return_token_ids": True,
                "cache_salt": uuid.uuid4().hex, **({} if sp["greedy"] else {"seed": sp["seed"]}),
                **({"logprobs": 1} if sp["logprobs"] else {}),
                **({"presence_penalty": 0.5, "frequency_penalty": 0.5} if sp["penalties"] else {})}
        r = await self.s.client.post("/v1/completions", json=body)
        out = {"ids": [], "finish": None, "usage": None, "errors": [], "bad": []}
        if r.status_code != 200:
            out["errors"].append(r.text)
            return out
        for line in r.text.split("\n"):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["errors"].append(chunk["error"])
                continue
            for c in chunk["choices"]:
                out["ids"] += c.get("token_ids") or []
                if sp["logprobs"] and len((c["logprobs"] or {}).get("tokens") or []) != len(c.get("token_ids") or []):
                    out["bad"].append(f"logprobs for {c.get('token_ids')}: {c['logprobs']}")
                out["finish"] = c.get("finish_reason") or out["finish"]
                if chunk.get("usage") and chunk["usage"]["completion_tokens"] != len(out["ids"]):
                    out["bad"].append(f"usage {chunk['usage']} after {len(out['ids'])} tokens")
            if chunk.get("usage") and not chunk["choices"]:  # less cached-token details: a move may hit another cache
                out["usage"] = {k: v for k, v in chunk["usage"].items() if not k.endswith("_details")}
        return out

    async def direct(self, sp: dict, rid: str) -> dict:
        params = SamplingParams(temperature=0.0 if sp["greedy"] else 1.0, seed=None if sp["greedy"] else sp["seed"],
                                max_tokens=sp["max_tokens"], ignore_eos=sp["ignore_eos"],
                                logprobs=1 if sp["logprobs"] else None,
                                **(dict(presence_penalty=0.5, frequency_penalty=0.5) if sp["penalties"] else {}))
        out = {"ids": [], "finish": None, "errors": [], "bad": [], "logprobs": 0, "cut": False}
        try:
            async for event in self.s.router.generate(rid, sp["prompt"], params, None, [], continuation=False):
                out["ids"] += event.token_ids
                out["logprobs"] += len(event.logprobs or [])
                out["finish"] = event.finish_reason or out["finish"]
                if sp["cancel"] == "tokens" and len(out["ids"]) >= sp["cancel_at"] and out["finish"] is None:
                    out["cut"] = True  # the client leaves: closing the stream cancels it
                    break
        except MeshFailures as e:
            out["errors"].append(repr(e))
        if sp["logprobs"] and out["logprobs"] != len(out["ids"]):
            out["bad"].append(f"{out['logprobs']} logprobs for {len(out['ids'])} tokens")
        return out

    async def cancel_when_preempted(self, rid: str, task: asyncio.Task) -> bool:
        while not task.done():
            for mesh in self.s.router.meshes:
                seq = mesh.scheduler.requests.get(rid) if mesh.scheduler is not None else None
                if seq is not None and seq.status == Status.PREEMPTED:
                    self.counts["cancelled while preempted"] += 1
                    self.s.router.cancel(rid)
                    return True
            await asyncio.sleep(0.005)
        return False

    # ---- faults ---------------------------------------------------------------------------------------------
    def preempted_on(self, mesh) -> list[str]:
        """Requests on `mesh` preempted there and queued for their recompute, or re-seated since."""
        if mesh.scheduler is None:
            return []
        return [rid for rid, seq in mesh.scheduler.requests.items() if seq.num_tokens_preempted >= 0]

    async def faults(self, stop: asyncio.Event) -> None:
        s, rng = self.s, self.rng
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            await until(lambda: all(m.up for m in s.router.meshes) or stop.is_set(), 30)
            for _ in range(100):  # a mesh holding a preempted request, if one comes within 1 s
                targets = [i for i, m in enumerate(s.router.meshes) if self.preempted_on(m)]
                if targets or stop.is_set():
                    break
                await asyncio.sleep(0.01)
            if stop.is_set():
                return
            i = rng.choice(targets) if targets else rng.randrange(2)
            local, mesh, other = s.meshes[i], s.router.meshes[i], s.meshes[1 - i]
            fault = rng.choice(["raise", "hang", "vanish", "both"])
            before = mesh.failovers
            local.unhang = asyncio.Event()
            local.inject("vanish" if fault == "both" else fault, rng.randrange(0, 6))
            t0 = time.monotonic()
            while local.fault is not None and time.monotonic() - t0 < 3:
                await asyncio.sleep(0.002)
            if local.fault is not None:  # idle: never fired
                local.fault = None
                continue
            self.counts[f"faults {fault}"] += 1
            if fault == "hang":
                try:  # past its deadline
                    await until(lambda: mesh.failovers > before, 20)
                except AssertionError:
                    self.bad.append("a hung mesh never failed over")
                local.unhang.set()
            elif fault in ("vanish", "both"):
                if fault == "both":  # the other goes too: what both had is held until one comes back
                    other.vanish()
                    await asyncio.sleep(rng.uniform(0.1, 0.5))
                    self.counts["held while both were down"] += len(s.router.held)
                    other.restart()
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                local.restart()

    # ---- the trial ------------------------------------------------------------------------------------------
    def specs(self) -> list[dict]:
        return [self.spec(i) for i in range(self.rng.randrange(12, 20))]

    async def run(self, specs: list[dict], wants: list[dict]) -> list[str]:
        s = self.s
        failovers = sum(m.failovers for m in s.router.meshes)
        real_preempt = MeshScheduler._preempt

        def preempt(sched, seq):
            self.counts["preemptions"] += 1
            self.preempted.add(seq.request_id)
            if seq.request_id in self.moved:
                self.counts["preempted after a move"] += 1
            return real_preempt(sched, seq)
        real_fail = Router._fail

        def fail(router, mesh, error):  # what the failed mesh had: each of them moves, or is held
            for rid, seq in mesh.scheduler.requests.items():
                self.moved.setdefault(rid, time.monotonic())
                if seq.status == Status.PREEMPTED:
                    self.counts["queued preempted on a mesh that failed"] += 1
                elif seq.num_tokens_preempted >= 0:
                    self.counts["re-seated after a preemption on a mesh that failed"] += 1
            return real_fail(router, mesh, error)
        MeshScheduler._preempt, Router._fail = preempt, fail
        stop = asyncio.Event()
        faults = asyncio.ensure_future(self.faults(stop))
        tasks, rids, cancels = [], [], []
        try:
            for sp in specs:
                await asyncio.sleep(self.rng.uniform(0, 0.03))
                rid = f"r-{uuid.uuid4().hex}"
                task = asyncio.ensure_future(self.http(sp) if sp["http"] else self.direct(sp, rid))
                tasks.append(task)
                rids.append(rid)
                cancels.append(asyncio.ensure_future(self.cancel_when_preempted(rid, task))
                               if sp["cancel"] == "preempted" and not sp["http"] else None)
            done, pending = await asyncio.wait(tasks, timeout=BOUND_S)
            if pending:
                self.bad.append(f"{len(pending)} requests not ended within {BOUND_S} s")
                for t in pending:
                    t.cancel()
        finally:
            stop.set()
            await faults
            MeshScheduler._preempt, Router._fail = real_preempt, real_fail
        for sp, want, task, rid, cancel in zip(specs, wants, tasks, rids, cancels):
            if not task.done() or task.cancelled():
                continue
            got = task.result()
            cut = got.get("cut") or (cancel is not None and cancel.done() and cancel.result())
            if cancel is not None:
                cancel.cancel()
            what = f"{rid} (http {sp['http']}, greedy {sp['greedy']}, preempted {rid in self.preempted}, " \
                   f"on a failed mesh {rid in self.moved})"
            self.bad += [f"{what}: {b}" for b in got["bad"]]
            if got["errors"]:
                self.counts["ended by max_mesh_failures"] += 1
                if not all("failed while computing it" in str(e) for e in got["errors"]):
                    self.bad.append(f"{what}: {got['errors']}")
            if cut or got["errors"]:
                if got["ids"] != want["ids"][:len(got["ids"])]:
                    self.bad.append(f"{what}: cut short, not a prefix of its solo run")
                continue
            self.counts["preempted and on a failed mesh"] += rid in self.preempted and rid in self.moved
            if (got["ids"], got["finish"]) != (want["ids"], want["finish"]):
                first = next((j for j, (a, b) in enumerate(zip(got["ids"], want["ids"])) if a != b), None)
                self.bad.append(f"{what}: {len(got['ids'])} tokens, {got['finish']}; solo {len(want['ids'])}, "
                                f"{want['finish']}; first difference at {first}")
            if sp["http"] and got["usage"] != want["usage"]:
                self.bad.append(f"{what}: usage {got['usage']}, solo {want['usage']}")
        await self.nothing_left()
        self.counts["trials"] += 1
        self.counts["requests"] += len(specs)
        self.counts["failovers"] += sum(m.failovers for m in s.router.meshes) - failovers
        return self.bad

    async def nothing_left(self) -> None:
        s = self.s
        try:
            await until(lambda: all(m.up for m in s.router.meshes), 30)
        except AssertionError:
            self.bad.append("the meshes never came back")
            return
        left: list[str] = []
        for _ in range(500):
            left = held(s.router, {m.name: m.failovers for m in s.router.meshes})
            left += [f"mesh-{i} runner slots {sorted(local.runner.slots)}" for i, local in enumerate(s.meshes)
                     if local.runner.slots]
            left += [f"mesh-{i} runner prefill history" for i, local in enumerate(s.meshes)
                     if local.runner._prefilled._ids]
            if not left:
                return
            await asyncio.sleep(0.02)
        self.bad.append(f"left behind: {left}")


async def solo_run(solo: Stack, sp: dict, solos: dict) -> dict:
    """`sp` answered alone on the roomy mesh (no preemption, no fault), uncancelled, through the same path."""
    key = json.dumps({k: v for k, v in sp.items() if k not in ("cancel", "cancel_at")})
    if key not in solos:
        alone, quiet = Trial(solo, random.Random(0), Counter()), {**sp, "cancel": None}
        solos[key] = await (alone.http(quiet) if sp["http"] else alone.direct(quiet, uuid.uuid4().hex))
        assert not solos[key]["errors"] and not solos[key]["bad"], solos[key]
    return solos[key]


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    from tests.test_failover_features import tiny_model
    path = tmp_path_factory.mktemp("tiny-smol")
    tiny_model(path)
    return path


@pytest.mark.parametrize("kind, seed", [("simulated", 1), ("simulated", 2), ("torch", 3)])
def test_requests_preempted_and_moved_end_as_their_solo_runs_and_leave_nothing(tok, torch_model, kind, seed):
    path = torch_model if kind == "torch" else None
    s, solo = build(tok, kind, True, path), build(tok, kind, False, path)
    errors: list = []
    s.loop.set_exception_handler(lambda loop, context: errors.append(context))
    counts: Counter = Counter()
    solos: dict = {}

    def together() -> bool:  # a mesh failed with a request preempted on it
        return bool(counts["queued preempted on a mesh that failed"] +
                    counts["re-seated after a preemption on a mesh that failed"])
    try:
        n = 0
        while n < TRIALS or not together() and n < TRIALS + 2:  # timing decides where faults land: a few more
            trial = Trial(s, random.Random(seed * 10_000 + n), counts)
            specs = trial.specs()
            bad = s.run(trial.run(specs, [solo.run(solo_run(solo, sp, solos)) for sp in specs]))
            assert not bad, (n, bad)
            assert not errors, errors
            n += 1
    finally:
        s.close()
        solo.close()
    if os.environ.get("PREEMPT_FAILOVER_TRIALS"):
        print(kind, seed, dict(counts))
    assert counts["preemptions"] and counts["failovers"] and together(), counts  # the two together
