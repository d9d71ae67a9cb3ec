"""MeshRunner over a backend whose decode overlaps the host (caps.async_decode): step k + 1 starts before step k's
tokens are read, and the answers, finish reasons, logprobs and KV are those of one step at a time."""
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.backend import Backend, Capabilities, DecodeOutput
from model.runner import MeshRunner
from model.simulated import SimulatedBackend, _SimulatedOutput
from scheduler.sampling import SamplingParams
from scheduler.work import NO_TOKEN, DecodeRound, MeshWork, PrefillChunk

SLOTS, GROUPS, BLOCK, BLOCKS, VOCAB, EOS = 8, 2, 4, 24, 64, 1


def device_logprob(tokens: torch.Tensor) -> torch.Tensor:
    """The logprob the device gives with each token: one of 13 values in [-1.625, -0.125], by token. The simulated
    device's own is 0.0 for every row, so a row given another row's value, or another step's, showed nothing."""
    return -(1 + tokens % 13).float() / 8


class LogprobsOutput(_SimulatedOutput):
    def logprobs(self) -> torch.Tensor:
        return device_logprob(self.tokens())


class LogprobsSimulated(SimulatedBackend):
    """The simulated Galaxy, its device's logprobs device_logprob of each row's token, on both paths."""

    def decode_logprobs(self, tokens, positions, page_table, active, sampling):
        next_tokens = self.decode(tokens, positions, page_table, active, sampling)
        return next_tokens, device_logprob(next_tokens)

    def decode_async(self, tokens, positions, page_table, active, sampling):
        out = super().decode_async(tokens, positions, page_table, active, sampling)
        return LogprobsOutput(out.on_device, out.ready_at)


def simulated(async_decode: bool) -> SimulatedBackend:
    backend = LogprobsSimulated(time_scale=1e-6, num_slots=SLOTS, kv_groups=GROUPS, block_size=BLOCK,
                                num_blocks=BLOCKS, max_seq_len=48, vocab_size=VOCAB, eos_token_ids=(EOS,),
                                eos_rate=0.12)
    backend.caps = dataclasses.replace(backend.caps, async_decode=async_decode)
    return backend


requests = st.lists(st.fixed_dictionaries({
    "prompt": st.lists(st.integers(2, VOCAB - 1), min_size=1, max_size=9),
    "max_tokens": st.integers(1, 14),
    "min_tokens": st.sampled_from([0, 0, 0, 2]),
    # 0: the device's own logprob (a chained step's, beside rows asking none); 1: sampled on the host, so that step
    # cannot be chained
    "logprobs": st.sampled_from([None, None, None, 0, 0, 1]),
}), min_size=1, max_size=SLOTS)


def serve(backend: SimulatedBackend, reqs: list[dict], rounds: list[int]) -> tuple[list[tuple], np.ndarray]:
    """Prefill every request in its own slot, then decode `rounds` (steps each): (each message's tokens, finish
    reasons and logprobs by slot; the KV). Each logprob is its row's token's, the device's (device_logprob) or the
    host's (from the one-hot logits: 0.0, or far below where min_tokens masked the chosen stop id), and only rows
    asking logprobs have one. Each slot's blocks are its own, and its page-table row is padded with block 0 of its
    group, which the group's first slot holds: a step written past a slot's blocks would land in a live neighbour's
    KV."""
    runner = MeshRunner(backend)
    per_slot = BLOCKS // (SLOTS // GROUPS)
    table = np.zeros((SLOTS, per_slot), dtype=np.int32)
    prefills = []
    for slot, r in enumerate(reqs):
        needed = -(-(len(r["prompt"]) + r["max_tokens"]) // BLOCK)
        blocks = [(slot % (SLOTS // GROUPS)) * per_slot + b for b in range(needed)]
        table[slot, :needed] = blocks
        params = SamplingParams(temperature=0.0, max_tokens=r["max_tokens"],
                                min_tokens=min(r["min_tokens"], r["max_tokens"]), logprobs=r["logprobs"])
        prefills.append(PrefillChunk(f"r{slot}", slot, r["prompt"], 0, blocks, params, len(r["prompt"]),
                                     stop_token_ids=(EOS,)))
    messages = []
    for work_id, steps in enumerate(rounds):
        live = sorted(runner.slots) if work_id else list(range(len(reqs)))
        work = MeshWork(work_id, prefills if work_id == 0 else [], DecodeRound(steps, live, table.copy()))
        for result in runner.execute(work):
            for slot, lp in result.logprobs.items():
                assert reqs[slot]["logprobs"] is not None and lp.token_id == result.tokens[slot]
                host = lp.logprob == 0.0 or lp.logprob < -1000  # the one-hot row's chosen token, or another
                assert host or lp.logprob == float(device_logprob(torch.tensor(lp.token_id)))
            messages.append((list(result.tokens), dict(result.finished), sorted(result.logprobs.items())))
    return messages, backend.kv.copy()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=requests, rounds=st.lists(st.integers(1, 9), min_size=1, max_size=3))
def test_overlapped_steps_give_the_answers_and_kv_of_one_step_at_a_time(reqs, rounds):
    expected, expected_kv = serve(simulated(False), reqs, rounds)
    got, kv = serve(simulated(True), reqs, rounds)
    assert got == expected
    # The KV differs only where a slot that ended with a stop id ran once more: its last token, at its own position
    ends = {}
    for tokens, finished, _ in expected:
        for slot, reason in finished.items():
            if reason == "stop":
                ends[slot] = tokens[slot]
    answers = {slot: [m[0][slot] for m in expected if m[0][slot] != NO_TOKEN] for slot in ends}
    allowed = set()
    for slot, last in ends.items():
        position = len(reqs[slot]["prompt"]) + len(answers[slot]) - 1
        block = (slot % (SLOTS // GROUPS)) * (BLOCKS // (SLOTS // GROUPS)) + position // BLOCK
        allowed.add((slot // (SLOTS // GROUPS), block, position % BLOCK, last))
    for group, block, offset in zip(*np.nonzero(kv != expected_kv)):
        assert (group, block, offset, kv[group, block, offset]) in allowed


class Output(DecodeOutput):
    def __init__(self, log: list, step: int, made: torch.Tensor):
        self.log, self.step, self.made = log, step, made

    def tokens(self) -> torch.Tensor:
        self.log.append(("read", self.step))
        return self.made


class OverlappingBackend(Backend):
    """Tokens count up from the input; every start and read is logged, with the rows a start decodes."""

    def __init__(self):
        self.caps = Capabilities(num_slots=4, block_size=4, num_blocks=16, max_seq_len=64, prefix_align=4,
                                 vocab_size=VOCAB, eos_token_ids=(EOS,), device_sampling=frozenset({"temperature"}),
                                 async_decode=True)
        self.log: list = []
        self.steps = 0

    def prefill(self, token_ids, start, block_ids, slot, sampling=None):
        if sampling is None:
            row = torch.zeros(VOCAB)
            row[2] = 1.0
            return row
        return torch.tensor(2)

    def decode(self, tokens, positions, page_table, active, sampling=None):
        self.log.append(("decode", active.nonzero().flatten().tolist()))
        if sampling is None:
            return torch.nn.functional.one_hot((tokens + 1) % VOCAB, VOCAB).float()
        return (tokens + 1) % VOCAB

    def decode_async(self, tokens, positions, page_table, active, sampling):
        made = ((tokens.made if isinstance(tokens, Output) else tokens) + 1) % VOCAB
        self.log.append(("start", self.steps, active.nonzero().flatten().tolist(), positions.tolist()))
        self.steps += 1
        return Output(self.log, self.steps - 1, made)


def start(runner: MeshRunner, slot: int, prompt: list[int], **params):
    work = MeshWork(0, [PrefillChunk(f"r{slot}", slot, prompt, 0, [slot], SamplingParams(**params), len(prompt))])
    list(runner.execute(work))


def test_each_step_starts_before_the_one_before_is_read_and_a_spent_budget_runs_no_further():
    backend = OverlappingBackend()
    runner = MeshRunner(backend)
    start(runner, 0, [5, 6], temperature=0.0, max_tokens=4)  # 1 token from its prefill, 3 more in the round
    start(runner, 1, [7], temperature=0.0, max_tokens=100)
    results = list(runner.execute(MeshWork(1, [], DecodeRound(4, [0, 1], np.arange(4, dtype=np.int32)[:, None]))))
    assert [r.tokens[:2] for r in results] == [[3, 3], [4, 4], [5, 5], [NO_TOKEN, 6]]
    assert results[2].finished == {0: "length"}
    assert backend.log == [
        ("start", 0, [0, 1], [2, 1, 0, 0]),
        ("start", 1, [0, 1], [3, 2, 0, 0]),  # before step 0 is read: positions one ahead
        ("read", 0),
        ("start", 2, [0, 1], [4, 3, 0, 0]),
        ("read", 1),
        ("start", 3, [1], [0, 4, 0, 0]),  # slot 0's step 2 is its budget's last: it is not in step 3
        ("read", 2),
        ("read", 3),  # the round's last step starts nothing
    ]


def test_a_slot_sampled_on_the_host_takes_its_steps_one_at_a_time():
    backend = OverlappingBackend()
    runner = MeshRunner(backend)
    start(runner, 0, [5], temperature=0.0, max_tokens=100)
    start(runner, 1, [7], temperature=0.0, max_tokens=100, logprobs=0)  # needs the step's logits on the host
    results = list(runner.execute(MeshWork(1, [], DecodeRound(2, [0, 1], np.zeros((4, 1), dtype=np.int32)))))
    assert [r.tokens[:2] for r in results] == [[3, 3], [4, 4]]
    assert backend.log == [("decode", [0, 1]), ("decode", [0, 1])]


def test_a_work_let_go_of_mid_round_reads_every_step_it_started():
    """The replica's shutdown stops a work at its next result (mesh_replica._run) and then closes the device, which
    must not happen beside a running step (ttnn is not thread-safe): the steps started ahead of that result were left
    running. Each is now read (waited for) before the work's results end."""
    backend = OverlappingBackend()
    runner = MeshRunner(backend)
    start(runner, 0, [5], temperature=0.0, max_tokens=100)
    results = runner.execute(MeshWork(1, [], DecodeRound(6, [0], np.zeros((4, 1), dtype=np.int32))))
    assert [next(results).tokens[0], next(results).tokens[0]] == [3, 4]
    results.close()  # as `break` does in mesh_replica._run
    started = [entry[1] for entry in backend.log if entry[0] == "start"]
    assert started[:3] == [0, 1, 2]  # step 2 was running when the second result left
    assert sorted(entry[1] for entry in backend.log if entry[0] == "read") == started


def test_a_fault_starting_a_step_comes_after_every_result_already_read():
    """A device fault starting step k + 1 ends the work (the router recomputes its requests); the results read before
    it still reach the router first, as one step at a time delivers them: the progress it counts for each request."""
    backend = OverlappingBackend()
    runner = MeshRunner(backend)
    start(runner, 0, [5], temperature=0.0, max_tokens=100)
    decode_async = backend.decode_async

    def faulty(*args, **kwargs):
        if backend.steps == 2:
            raise RuntimeError("device fault")
        return decode_async(*args, **kwargs)

    backend.decode_async = faulty
    delivered = []
    with pytest.raises(RuntimeError, match="device fault"):
        for result in runner.execute(MeshWork(1, [], DecodeRound(6, [0], np.zeros((4, 1), dtype=np.int32)))):
            delivered.append(result.tokens[0])
    assert delivered == [3]  # step 0's, read before step 2 was started
