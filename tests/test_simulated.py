import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.simulated import DEMO_MEAN_GENERATED, GalaxyTiming, SimulatedBackend, published_figures
from model.galaxy import LLAMA3_EOS
from model.sampler import PenaltyState, sample_batch
from scheduler.sampling import SamplingParams
from tests.sleep_clock import sleep_clock

GREEDY = SamplingParams(temperature=0.0)
FAST = 1e-6  # time_scale that makes every sleep negligible
ROWS = published_figures()["by_input_length"]


@pytest.fixture
def timing():
    return GalaxyTiming.published()


def generate(backend, prompt, block_ids, slot, steps, sampling=GREEDY):
    """Prefill then decode `steps` tokens in `slot` alone; returns the generated tokens."""
    caps = backend.caps
    out = [int(backend.prefill(prompt, 0, block_ids, slot, sampling))]
    table = torch.zeros(caps.num_slots, caps.max_blocks_per_seq, dtype=torch.int32)
    table[slot, :len(block_ids)] = torch.tensor(block_ids)
    active = torch.zeros(caps.num_slots, dtype=torch.bool)
    active[slot] = True
    for i in range(steps):
        tokens = torch.zeros(caps.num_slots, dtype=torch.long)
        tokens[slot] = out[-1]
        positions = torch.zeros(caps.num_slots, dtype=torch.long)
        positions[slot] = len(prompt) + i
        out.append(int(backend.decode(tokens, positions, table, active, [sampling] * caps.num_slots)[slot]))
    return out


# --- timing: pure functions of the published rows ---------------------------------------------------

@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['input_tokens']}-b{r['batch']}")
def test_timing_reproduces_every_published_row(timing, row):
    """Within 0.5%: a TTFT is the mean of its length's rows (per user, whatever the batch), and a batch-32
    step adds the fitted cost of the other users' context to the batch-1 row's."""
    assert timing.ttft(row["input_tokens"]) == pytest.approx(row["ttft_ms"] / 1000, rel=0.005)
    mean_context = row["input_tokens"] + DEMO_MEAN_GENERATED  # the rate averages the demo's 128 new tokens
    assert timing.batch_step_seconds(mean_context, row["batch"]) == pytest.approx(
        1 / row["decode_tokens_per_s_per_user"], rel=0.005)


def test_other_users_context_costs_the_same_per_token_at_1k_and_4k(timing):
    """PERF.md's pairs: 1K 16.53 -> 17.58 ms a step and 4K 18.50 -> 22.43 ms from batch 1 to 32."""
    assert timing.others_s_per_token == pytest.approx(30.6e-9, rel=0.02)
    assert timing.decode_step_seconds(1088, 31 * 1088) - timing.decode_step_seconds(1088) == pytest.approx(
        17.58e-3 - 16.53e-3, rel=0.02)


def test_timing_interpolates_log_log_between_rows_and_clamps_outside(timing):
    points = list(zip(timing.lengths, timing.ttft_s, timing.step_s))
    for (a, ttft_a, step_a), (b, ttft_b, step_b) in zip(points, points[1:]):
        mid = math.sqrt(a * b)
        assert timing.ttft(mid) == pytest.approx(math.sqrt(ttft_a * ttft_b))
        assert ttft_a < timing.ttft(mid) < ttft_b
        assert step_a < timing.decode_step_seconds(mid + DEMO_MEAN_GENERATED) < step_b
    assert timing.ttft(1) == timing.ttft(128)
    assert timing.decode_step_seconds(1) == timing.decode_step_seconds(128 + DEMO_MEAN_GENERATED)


def test_prefill_after_a_prefix_costs_the_extra_but_at_least_a_fresh_prefill(timing):
    assert timing.prefill_seconds(0, 4096) == timing.ttft(4096)
    assert timing.prefill_seconds(65536, 131072) == pytest.approx(timing.ttft(131072) - timing.ttft(65536))
    assert timing.prefill_seconds(4096, 4096 + 128) == timing.ttft(128)


def test_a_prefill_costs_its_padded_length_as_on_the_device(timing):
    """The generator pads new prefill tokens to 128, 1024, then a power of two (get_padded_prefill_len)."""
    assert timing.prefill_seconds(0, 3850) == timing.ttft(4096) > timing.ttft(3850)
    assert timing.prefill_seconds(0, 100) == timing.prefill_seconds(0, 128) == timing.ttft(128)
    assert timing.prefill_seconds(0, 129) == timing.ttft(1024)
    assert timing.prefill_seconds(4096, 4096 + 200) == max(timing.ttft(4096 + 1024) - timing.ttft(4096),
                                                           timing.ttft(1024))



def test_a_prefill_after_a_cached_prefix_is_charged_for_its_new_tokens(timing):
    """The backend times positions [start, end), as the device computes them: 904 tokens after a 4,096-token prefix
    cost their padded 1,024 over the prefix, not the 8,192-token prefill the whole prompt pads to."""
    backend = SimulatedBackend(time_scale=FAST)
    prompt, blocks = list(range(5000)), list(range(79))
    backend.prefill(prompt[:4096], 0, blocks, 0, None)
    before = backend.device_seconds
    backend.prefill(prompt, 4096, blocks, 0, GREEDY)
    assert backend.device_seconds - before == pytest.approx(timing.prefill_seconds(4096, 5000) * FAST)
    assert timing.prefill_seconds(4096, 5000) < timing.prefill_seconds(0, 5000) / 2


def test_time_scale_multiplies_every_sleep(timing):
    backend = SimulatedBackend(time_scale=0.001)
    prompt = list(range(1000))
    generate(backend, prompt, list(range(16)), slot=3, steps=2)
    expected = timing.ttft(1024) + timing.decode_step_seconds(1001) + timing.decode_step_seconds(1002)  # alone
    assert backend.device_seconds == pytest.approx(expected * 0.001)


def test_decode_step_time_follows_the_longest_live_context_and_the_others(timing):
    backend = SimulatedBackend(time_scale=FAST)
    caps = backend.caps
    table = torch.arange(caps.num_slots * 64, dtype=torch.int32).reshape(caps.num_slots, 64)
    table = torch.nn.functional.pad(table, (0, caps.max_blocks_per_seq - 64))
    positions = torch.full((caps.num_slots,), 100)
    positions[5] = 4000
    active = torch.ones(caps.num_slots, dtype=torch.bool)
    backend.decode(torch.zeros(caps.num_slots, dtype=torch.long), positions, table, active, [GREEDY] * 32)
    assert backend.device_seconds == pytest.approx(timing.decode_step_seconds(4001, 31 * 101) * FAST)
    active[6:] = False  # fewer users: a faster step at the same longest context
    backend.decode(torch.zeros(caps.num_slots, dtype=torch.long), positions, table, active, [GREEDY] * 32)
    assert backend.device_seconds == pytest.approx((timing.decode_step_seconds(4001, 31 * 101)
                                                    + timing.decode_step_seconds(4001, 5 * 101)) * FAST)


# --- tokens: a pure function of the sequence, read through the page table ---------------------------

def test_capabilities_match_the_galaxy():
    caps = SimulatedBackend().caps
    assert (caps.num_slots, caps.block_size, caps.num_blocks, caps.max_seq_len, caps.prefix_align, caps.kv_groups) == \
        (32, 64, 2056, 131072, 128, 4)  # per mesh column: 2056 = ceil((131072 + 64 * 8) / 64)
    assert SimulatedBackend(num_blocks=100).caps.num_blocks == 100
    small = SimulatedBackend(num_slots=4, block_size=16, max_seq_len=1024).caps
    assert (small.num_slots, small.block_size, small.num_blocks, small.max_seq_len) == (4, 16, 65, 1024)  # 1024/16 + 1



def test_the_step_deadlines_assume_the_slowest_scaled_step_and_prefill(timing):
    """The router's deadlines (caps.decode_step_s, prefill_token_s) are the simulated times at time_scale: the
    slowest step is one user at max_seq_len and the others holding the rest of the four groups' caches (at most
    max_seq_len each), the prefill a max_seq_len prompt's per token."""
    caps = SimulatedBackend(time_scale=0.5).caps
    assert caps.decode_step_s == pytest.approx(timing.decode_step_seconds(131_072, 4 * 2056 * 64 - 131_072) * 0.5)
    assert caps.prefill_token_s == pytest.approx(timing.ttft(131_072) / 131_072 * 0.5)
    small = SimulatedBackend(time_scale=0.5, num_slots=4, kv_groups=1, num_blocks=1000, max_seq_len=1024).caps
    assert small.decode_step_s == pytest.approx(timing.decode_step_seconds(1024, 3 * 1024) * 0.5)  # 3 full users



def test_a_context_that_ends_mid_block_still_gets_its_last_block_in_the_pool():
    """Unset, a group's pool is one max_seq_len user in whole blocks and a block for each slot of the group:
    1,000 tokens take 16 blocks of 64, and 8 slots 8 more (1,512 / 64 rounded down, 23, is one short)."""
    assert SimulatedBackend(time_scale=FAST, max_seq_len=1000).caps.num_blocks == 24


@pytest.mark.parametrize("block_size", [64, 16])
def test_tokens_identical_through_different_blocks_and_slots(block_size):
    prompt = [7, 1, 9] * 70  # 210 tokens; decode crosses into another block
    needed = -(-(210 + 60) // block_size)
    shuffled = np.random.default_rng(1).permutation(60)[:needed].tolist()
    first = generate(SimulatedBackend(time_scale=FAST, block_size=block_size), prompt, list(range(needed)),
                     slot=0, steps=60)
    other = generate(SimulatedBackend(time_scale=FAST, block_size=block_size), prompt, shuffled, slot=17, steps=60)
    assert first == other
    assert len(set(first)) > 50  # not a constant or short cycle


def test_recompute_after_preemption_continues_identically():
    prompt = list(range(300, 500))
    backend = SimulatedBackend(time_scale=FAST)
    out = generate(backend, prompt, [0, 1, 2, 3], slot=0, steps=40)
    # Recompute prompt + the first 20 outputs elsewhere (new blocks, another slot), then continue.
    again = generate(backend, prompt + out[:20], [10, 11, 12, 13], slot=9, steps=20)
    assert again == out[20:]


def test_prefix_continuation_equals_a_full_prefill():
    prompt = list(range(1000, 1300))
    backend = SimulatedBackend(time_scale=FAST)
    full = int(backend.prefill(prompt, 0, [0, 1, 2, 3, 4], 0, GREEDY))
    backend.prefill(prompt[:256], 0, [5, 6, 7, 8], 1, None)  # an earlier chunk / cached prefix
    continued = int(backend.prefill(prompt, 256, [5, 6, 7, 8, 9], 1, GREEDY))
    assert continued == full


def test_wrong_page_table_gives_different_tokens():
    prompt = list(range(130))
    backend = SimulatedBackend(time_scale=FAST)
    backend.prefill(prompt, 0, [4, 5, 6], 0, GREEDY)
    backend.prefill([x + 1 for x in prompt], 0, [7, 8, 9], 1, GREEDY)
    caps = backend.caps
    tokens = torch.full((caps.num_slots,), 5, dtype=torch.long)
    positions = torch.full((caps.num_slots,), 130)
    active = torch.zeros(caps.num_slots, dtype=torch.bool)
    active[0] = True
    right = torch.zeros(caps.num_slots, caps.max_blocks_per_seq, dtype=torch.int32)
    right[0, :3] = torch.tensor([4, 5, 6])
    wrong = right.clone()
    wrong[0, 1] = 8  # a middle block of another sequence, still inside the read window
    kv_before = backend.kv.copy()
    expected = int(backend.decode(tokens, positions, right, active, [GREEDY] * 32)[0])
    backend.kv[:] = kv_before
    assert int(backend.decode(tokens, positions, wrong, active, [GREEDY] * 32)[0]) != expected


def test_decode_writes_only_active_rows_at_their_positions():
    backend = SimulatedBackend(time_scale=FAST, num_blocks=8)
    caps = backend.caps
    table = torch.zeros(caps.num_slots, caps.max_blocks_per_seq, dtype=torch.int32)
    table[2, :2] = torch.tensor([5, 3])
    active = torch.zeros(caps.num_slots, dtype=torch.bool)
    active[2] = True
    tokens = torch.arange(caps.num_slots, dtype=torch.long) + 100
    positions = torch.full((caps.num_slots,), 70)
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    written = np.argwhere(backend.kv != -1)
    assert written.tolist() == [[0, 3, 6]] and backend.kv[0, 3, 6] == 102  # slot 2 is in KV group 0
    active[2], active[10] = False, True
    table[10, :2] = torch.tensor([5, 3])
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    assert np.argwhere(backend.kv != -1).tolist() == [[0, 3, 6], [1, 3, 6]]  # slot 10 writes group 1's block 3


def test_a_prefix_reused_from_another_kv_group_gives_wrong_tokens():
    """A Galaxy's column keeps its own KV: blocks slot 0 wrote are not there for slot 9 (column 1)."""
    backend = SimulatedBackend(time_scale=FAST)
    prompt = list(range(1000, 1300))
    blocks = list(range(5))
    whole = int(backend.prefill(prompt, 0, blocks, 0, GREEDY))  # slot 0, group 0: all 300 positions
    assert int(backend.prefill(prompt, 256, blocks, 1, GREEDY)) == whole  # group 0 again: a true prefix hit
    assert int(backend.prefill(prompt, 256, blocks, 9, GREEDY)) != whole  # group 1 never wrote [0, 256)


def test_prefill_refuses_too_few_blocks():
    with pytest.raises(ValueError):
        SimulatedBackend(time_scale=FAST).prefill(list(range(200)), 0, [0, 1, 2], 0, GREEDY)


def test_logits_path_agrees_with_device_sampling_whatever_the_params():
    prompt = list(range(50))
    sampled = generate(SimulatedBackend(time_scale=FAST), prompt, [0], slot=0, steps=1)
    backend = SimulatedBackend(time_scale=FAST)
    logits = backend.prefill(prompt, 0, [0], 0, None)
    assert logits.shape == (backend.caps.vocab_size,) and int(logits.argmax()) == sampled[0]
    hot = SamplingParams(temperature=100.0, top_p=0.5, seed=3, repetition_penalty=10.0, logprobs=2)
    penalties = PenaltyState(backend.caps.vocab_size, prompt, [sampled[0]] * 100)
    tokens, logprobs = sample_batch(logits[None], [hot], [50], [penalties])
    assert tokens == [sampled[0]] and logprobs[0].token_id == sampled[0]


def test_logprobs_need_host_logits_everything_else_samples_on_device():
    backend = SimulatedBackend()
    assert backend.can_sample(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1,
                                             presence_penalty=1.0, repetition_penalty=1.2))
    assert not backend.can_sample(SamplingParams(logprobs=1))
    assert not backend.can_sample(SamplingParams(allowed_token_ids=[5, 6]))  # the device sampler cannot mask


@pytest.mark.parametrize("async_decode", [True, False])
def test_a_logprobs_0_request_stays_on_the_device_with_the_value_the_host_gives(async_decode):
    """The sampled token's own logprob (logprobs 0: tt-metal's batch-32-log-probs preset) is the device's, as on a
    Galaxy (TTGalaxyBackend.decode_logprobs): 0.0, what the host computes from the step's one-hot row. Before, each
    decode step of its batch came back as every row's 128k logits and was sampled on the host (~30 ms a step).
    Overlapped steps give it (DecodeOutput.logprobs), and so do steps one at a time (decode_logprobs)."""
    import dataclasses

    from model.runner import MeshRunner
    from model.sampler import finite_logprobs
    from scheduler.work import DecodeRound, MeshWork, PrefillChunk

    class Watching(SimulatedBackend):
        logits_rows = 0

        def _one_hot(self, tokens):
            Watching.logits_rows += len(np.atleast_1d(tokens))
            return super()._one_hot(tokens)

    backend = Watching(time_scale=FAST, num_slots=2, kv_groups=1, num_blocks=16, max_seq_len=1024)
    backend.caps = dataclasses.replace(backend.caps, async_decode=async_decode)
    assert backend.can_sample(SamplingParams(logprobs=0)) and not backend.can_sample(SamplingParams(logprobs=1))
    params = [SamplingParams(temperature=0.7, seed=1, max_tokens=6, logprobs=0, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    table = np.zeros((2, 16), dtype=np.int32)
    table[1, 0] = 1
    runner = MeshRunner(backend)
    chunks = [PrefillChunk(f"r{slot}", slot, [7] * 10, 0, [slot], params[slot], 10) for slot in (0, 1)]
    results = list(runner.execute(MeshWork(0, chunks, DecodeRound(5, [0, 1], table))))
    first = Watching.logits_rows  # the prefill's row: a prefill gives a token alone, so the first logprob is the host's
    decoded = [r.logprobs[0] for r in results[1:] if 0 in r.logprobs]
    assert len(decoded) == 5 and Watching.logits_rows == first <= 2
    rows = backend._one_hot(np.array([lp.token_id for lp in decoded]))
    assert [lp.logprob for lp in decoded] == [float(finite_logprobs(row)[lp.token_id]) for row, lp in zip(rows, decoded)]
    assert all(lp.top == [] for lp in decoded)


def test_an_overlapped_step_holds_the_device_for_the_steps_and_calls_after_it(monkeypatch):
    """decode_async starts a step when the one before it ends, and a call that waits (a prefill, a decode) starts
    once the device ends the steps already started: the simulated device runs one thing at a time, as a Galaxy does,
    so a prefill after overlapped steps is not timed as if it ran beside them. On a clock moved by the sleeps alone."""
    clock = sleep_clock(monkeypatch, now=100.0)
    backend = SimulatedBackend(time_scale=1.0, num_slots=2, kv_groups=1, num_blocks=16, max_seq_len=1024)
    caps = backend.caps
    token = int(backend.prefill([7] * 10, 0, [0], 0, GREEDY))
    table = torch.zeros(caps.num_slots, caps.max_blocks_per_seq, dtype=torch.int32)
    active = torch.tensor([True, False])
    started, before = clock.now, backend.device_seconds
    first = backend.decode_async(torch.tensor([token, 0]), torch.tensor([10, 0]), table, active, [GREEDY, None])
    second = backend.decode_async(first, torch.tensor([11, 0]), table, active, [GREEDY, None])
    busy = backend.device_seconds
    assert clock.now == started < first.ready_at  # the host went on
    assert second.ready_at == pytest.approx(started + busy - before)  # the second step began as the first ended
    backend.prefill([8] * 10, 0, [1], 1, GREEDY)
    assert clock.now == pytest.approx(second.ready_at + backend.device_seconds - busy)



def test_time_scale_multiplies_an_overlapped_step_as_it_does_a_step_taken_alone(monkeypatch):
    """decode_async's step is on the device's timeline at time_scale too: at 0.01 a step taken alone and an
    overlapped one both hold the device for a hundredth of the published step. On a clock moved by the sleeps alone."""
    clock = sleep_clock(monkeypatch, now=100.0)
    step = GalaxyTiming.published().decode_step_seconds(11) * 0.01
    table = torch.zeros(2, 16, dtype=torch.int32)
    args = (torch.tensor([10, 0]), table, torch.tensor([True, False]), [GREEDY, None])
    alone = SimulatedBackend(time_scale=0.01, num_slots=2, kv_groups=1, num_blocks=16, max_seq_len=1024)
    started = clock.now
    alone.decode(torch.tensor([5, 0]), *args)
    assert (clock.now - started, alone.device_seconds) == pytest.approx((step, step))
    overlapped = SimulatedBackend(time_scale=0.01, num_slots=2, kv_groups=1, num_blocks=16, max_seq_len=1024)
    started = clock.now
    out = overlapped.decode_async(torch.tensor([5, 0]), *args)
    out.tokens()
    assert (clock.now - started, overlapped.device_seconds) == pytest.approx((step, step))


def test_a_late_wake_up_is_repaid_on_the_next_call_but_at_most_10_ms(monkeypatch):
    """A loaded host wakes late: the next call sleeps that much less, so the published rate holds over calls, but
    at most 10 ms less, so one long stall does not make the calls after it faster than a Galaxy."""
    import model.simulated

    clock = sleep_clock(monkeypatch)
    late = [0.004, 0.050]  # the first two sleeps wake this late; the rest on time
    sleep = clock.sleep
    monkeypatch.setattr(model.simulated.time, "sleep", lambda s: sleep(s + (late.pop(0) if late else 0.0)))
    backend = SimulatedBackend(num_slots=2, kv_groups=1, num_blocks=16, max_seq_len=1024)
    prefill = backend.timing.prefill_seconds(0, 10)
    took = []
    for block in range(4):
        before = clock.now
        backend.prefill([7] * 10, 0, [block], 0, GREEDY)
        took.append(clock.now - before)
    assert took == pytest.approx([prefill + 0.004, prefill - 0.004 + 0.050, prefill - 0.010, prefill])



def test_a_mixed_step_gives_each_host_row_the_logits_of_its_own_token():
    """decode_mixed's logits come in host_rows' order, and the host samples each row from its own: another row's
    logits would give it that row's token."""
    backend = SimulatedBackend(time_scale=FAST, num_slots=4, kv_groups=1, num_blocks=16, max_seq_len=1024)
    table = torch.zeros(4, backend.caps.max_blocks_per_seq, dtype=torch.int32)
    table[:, 0] = torch.arange(4)
    args = (torch.tensor([5, 6, 7, 8]), torch.tensor([3, 9, 20, 40]), table, torch.ones(4, dtype=torch.bool))
    tokens = backend.decode(*args, [GREEDY] * 4).tolist()
    assert len(set(tokens)) == 4
    mixed, logits = backend.decode_mixed(*args, [GREEDY, None, GREEDY, None], host_rows=[3, 1])
    assert mixed.tolist() == tokens and logits.argmax(dim=1).tolist() == [tokens[3], tokens[1]]


def test_no_eos_unless_configured():
    prompt = list(range(20))
    plain = generate(SimulatedBackend(time_scale=FAST), prompt, [0, 1], slot=0, steps=100)
    assert not set(plain) & set(LLAMA3_EOS)
    always = generate(SimulatedBackend(time_scale=FAST, eos_rate=1.0), prompt, [0, 1], slot=0, steps=3)
    assert set(always) == {LLAMA3_EOS[0]}


def test_small_vocab_stays_in_range_and_avoids_its_eos():
    backend = SimulatedBackend(time_scale=FAST, vocab_size=50, eos_token_ids=(0, 2))
    out = generate(backend, list(range(10)), [0, 1], slot=0, steps=100)
    assert set(out) <= set(range(50)) - {0, 2} and len(set(out)) > 30


@pytest.mark.parametrize("kwargs, field", [
    ({"time_scale": 1e9}, "time_scale"),  # built directly (bench/demo.py): the sleep overflowed inside a step
    ({"time_scale": math.nan}, "time_scale"),  # NaN passed `time_scale <= 0`
    ({"time_scale": math.inf}, "time_scale"),
    ({"max_seq_len": 2**40}, "max_seq_len"),  # its default pool alone: 2^34 blocks a group
    ({"max_seq_len": 2**20 + 1, "num_blocks": 64}, "max_seq_len"),
    ({"num_blocks": 2**40}, "num_blocks"),
    ({"num_blocks": 2**18 + 1}, "num_blocks"),  # 4 groups: past 2^20 blocks, the router's pools' ~56 B a block
    ({"num_blocks": 2**17 + 1, "block_size": 128}, "num_blocks"),  # past 2^26 tokens of the mesh's cache (4 B each)
    ({"max_seq_len": 2**20, "block_size": 1}, "num_blocks"),  # unset: sized from max_seq_len
    ({"num_slots": 1024, "num_blocks": 64}, "num_slots"),  # accepted: logits [1024, vocab] a step, 512 MiB
])
def test_sizes_and_a_time_scale_that_would_exhaust_memory_or_overflow_are_refused_naming_the_field(kwargs, field):
    """No ceiling was checked: a mistyped num_blocks or max_seq_len filled the mesh's memory (its cache is 4 B a
    token, the router's pool ~56 B a block) or failed as a MemoryError naming nothing, and a time_scale given to the
    backend directly (bench/demo.py) was not bounded as the config bounds it."""
    with pytest.raises(ValueError, match=f"^{field}: "):
        SimulatedBackend(**kwargs)


def test_the_simulated_ceilings_hold_what_the_config_checks_and_the_tests_need():
    """Refused in the config too, at deploy, by the same rule; a 256k context over a larger pool still fits."""
    from pydantic import ValidationError

    from deployments.config import AppConfig
    from model.galaxy import MAX_SIMULATED_SEQ_LEN, simulated_sizes

    assert simulated_sizes(32, 4, 262_144, 4200, 64) == (262_144, 4200)
    assert simulated_sizes(32, 4, None, None, 64) == (131_072, 2056)  # a Galaxy's
    assert SimulatedBackend(time_scale=FAST, max_seq_len=262_144, num_blocks=4200).caps.max_seq_len == 262_144
    for args, field in (({"max_seq_len": MAX_SIMULATED_SEQ_LEN + 1}, "max_seq_len"),
                        ({"num_blocks": 2**40}, "num_blocks"),
                        ({"max_seq_len": MAX_SIMULATED_SEQ_LEN, "block_size": 1}, "num_blocks")):
        with pytest.raises(ValidationError, match=f"{field}: "):
            AppConfig(backend="simulated", **args)
    AppConfig(backend="simulated", max_seq_len=MAX_SIMULATED_SEQ_LEN)


# --- the token rule, against a plain reading of it ------------------------------------------------------------------

# The module docstring's rule, read position by position through the page table, in Python integers. Only the mixers
# are the module's own constants (no reading of the rule gives them); the distances and splitmix64's finaliser
# (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014) are written out here.
DISTANCES = [2**k for k in range(16, 3, -1)] + list(range(7, -1, -1))  # 65536 ... 16, then the last 8, oldest first
MASK64 = 2**64 - 1


def reference_token(kv: np.ndarray, group: int, blocks, position: int, ordinary: list[int], eos_rate: float,
                    eos: tuple[int, ...]) -> int:
    from model.simulated import _MIXERS
    bs = kv.shape[2]
    h = 0
    for distance, mixer in zip(DISTANCES, _MIXERS[:-1].tolist()):
        p = position - distance
        h += (int(kv[group, blocks[p // bs], p % bs]) if p >= 0 else -1) * mixer
    h = (h + position * int(_MIXERS[-1])) & MASK64
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & MASK64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & MASK64
    h ^= h >> 31
    if eos_rate and eos and (h >> 11) / 2.0**53 < eos_rate:
        return eos[0]
    return ordinary[h % len(ordinary)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(1, 1), (4, 2), (8, 1), (32, 4)]), block_size=st.sampled_from([1, 3, 16, 64]),
       max_seq_len=st.sampled_from([40, 700, 70_000]), num_blocks=st.integers(3, 12),
       vocab=st.sampled_from([6, 300, 128_256]), eos_rate=st.sampled_from([0.0, 0.0, 0.2, 1.0]),
       calls=st.lists(st.sampled_from(["decode", "async", "chained", "prefill", "scored"]), min_size=1, max_size=5),
       seed=st.integers(0, 2**32 - 1))
def test_tokens_and_kv_are_the_documented_rule_read_through_the_page_table(shape, block_size, max_seq_len, num_blocks,
                                                                           vocab, eos_rate, calls, seed):
    """Every token decode, decode_async (chained or not), prefill and the prompt scores' made tokens give is the
    module docstring's hash of the window read through the page table in the slot's KV group, and every write lands
    at its position: over random caches, page tables (any block anywhere, repeats), positions (before the longest
    distances too), active rows and EOS rates. The backend's vectorised indexing is where a paging bug would hide."""
    num_slots, groups = shape
    rng = np.random.default_rng(seed)
    eos = (1,)
    backend = SimulatedBackend(time_scale=FAST, num_slots=num_slots, kv_groups=groups, block_size=block_size,
                               num_blocks=num_blocks, max_seq_len=max_seq_len, vocab_size=vocab, eos_token_ids=eos,
                               eos_rate=eos_rate)
    caps = backend.caps
    per_group = num_slots // groups
    ordinary = [t for t in range(vocab) if t not in eos]
    kv = rng.integers(-1, vocab, size=backend.kv.shape).astype(np.int32)  # written before: every read means something
    backend.kv[:] = kv

    def near() -> int:  # positions that cross the distances' edges as often as not
        return int(min(max_seq_len - 1, rng.choice([rng.integers(0, 20), rng.integers(0, max_seq_len),
                                                    2 ** rng.integers(3, 17) + rng.integers(-2, 3)])))

    previous = None
    for call in calls:
        if call in ("prefill", "scored"):
            slot = int(rng.integers(num_slots))
            group = slot // per_group
            blocks = rng.permutation(num_blocks)[:caps.max_blocks_per_seq].tolist()  # distinct: no write collides
            end = int(rng.integers(1, min(len(blocks) * block_size, max_seq_len) + 1))
            start = int(rng.integers(0, end))
            ids = rng.integers(0, vocab, size=end).tolist()
            for p in range(start, end):
                kv[group, blocks[p // block_size], p % block_size] = ids[p]
            if call == "prefill":
                assert int(backend.prefill(ids, start, blocks, slot, GREEDY)) == reference_token(
                    kv, group, blocks, end - 1, ordinary, eos_rate, eos)
            else:
                scores, _ = backend.prefill_prompt_logprobs(ids, start, blocks, slot, 1, [0] * (end - start))
                assert scores.top_ids[:, 0].tolist() == [reference_token(kv, group, blocks, p, ordinary, eos_rate, eos)
                                                         for p in range(start, end)]
            previous = None
            continue
        table = rng.integers(0, num_blocks, size=(num_slots, caps.max_blocks_per_seq)).astype(np.int32)
        positions = np.array([near() for _ in range(num_slots)], dtype=np.int64)
        active = rng.random(num_slots) < 0.8
        tokens = rng.integers(0, vocab, size=num_slots)
        written = set()
        for s in np.flatnonzero(active):  # two rows writing one place would leave either token: numpy's order
            where = (s // per_group, table[s, positions[s] // block_size], positions[s] % block_size)
            active[s] = where not in written
            written.add(where)
        args = (torch.from_numpy(positions), torch.from_numpy(table), torch.from_numpy(active))
        chained = call == "chained" and previous is not None
        if chained:
            tokens = previous.tokens().numpy()
        for s in np.flatnonzero(active):
            kv[s // per_group, table[s, positions[s] // block_size], positions[s] % block_size] = tokens[s]
        if call == "decode":
            got = backend.decode(torch.from_numpy(tokens), *args, [GREEDY] * num_slots)
        else:
            previous = backend.decode_async(previous if chained else torch.from_numpy(tokens), *args,
                                            [GREEDY] * num_slots)
            got = previous.tokens()
        want = [reference_token(kv, s // per_group, table[s], int(positions[s]), ordinary, eos_rate, eos)
                if active[s] else 0 for s in range(num_slots)]
        assert got.tolist() == want
    np.testing.assert_array_equal(backend.kv, kv)


@pytest.mark.parametrize("num_slots", [0, 257])
def test_a_mesh_of_no_slots_or_past_the_ceiling_is_refused_naming_num_slots(num_slots):
    """Built directly, not through the config (bench/demo.py sizes a torch mesh by its --batch-size): a mesh of no
    slots decodes nothing, and past 256 the per-step buffers are memory, not a batch. 256 itself is taken."""
    with pytest.raises(ValueError, match=f"num_slots: 1 to 256 decode slots a mesh .*, not {num_slots}"):
        SimulatedBackend(num_slots=num_slots, kv_groups=1)
    assert SimulatedBackend(num_slots=256, kv_groups=1).caps.num_slots == 256
