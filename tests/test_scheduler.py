import pickle
import time
from collections import defaultdict, deque

import numpy as np
import pytest

from scheduler.blocks import blocks_for, extend_block_hashes
from scheduler.errors import PromptTooLong, QueueFull, RoomFilled
from scheduler.sampling import SamplingParams
from scheduler.scheduler import MeshScheduler
from scheduler.sequence import Status
from scheduler.work import NO_TOKEN, StepResult
from tests.counting import counting
from tests.fake_mesh import REFUSED_GRAMMAR, FakeMesh, reference_output

BS = 4
EOS = 15


def make(num_blocks=64, **kw):
    kw = {"num_slots": 4, "max_seq_len": 64, "prefill_chunk": 8, "max_prefill_tokens": 8, "decode_steps": 3,
          "eos_token_ids": (EOS,), **kw}
    sched = MeshScheduler(num_blocks=num_blocks, block_size=BS, **kw)
    return sched, FakeMesh(sched.num_slots, num_blocks, BS)


def params(max_tokens=10, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def run(sched, mesh, work, events):
    """Run a planned work on the mesh and take all its results in."""
    for result in mesh.execute(work):
        for event in sched.process(result):
            events[event.request_id].append(event)


def step(sched, mesh, events):
    """Plan one work and run it. Returns the work (None when idle)."""
    work = sched.schedule()
    if work is not None:
        run(sched, mesh, work, events)
    return work


def drain(sched, mesh, events=None, max_works=500):
    events = defaultdict(list) if events is None else events
    for _ in range(max_works):
        if step(sched, mesh, events) is None and not sched.inflight:
            break
    return events


def output_of(events):
    return [t for e in events for t in e.token_ids]


def expected(prompt, p, eos=(EOS,)):
    return reference_output(prompt, p, (() if p.ignore_eos else eos) + p.stop_token_ids)


def test_output_that_already_has_its_max_tokens_is_refused():
    """A stream continued elsewhere (failover) with all max_tokens of its answer has nothing left to generate: one
    more step would send a token past max_tokens."""
    sched, _ = make()
    with pytest.raises(RoomFilled):
        sched.submit("done", [1, 2, 3], params(max_tokens=2), output_ids=[4, 5])
    assert sched.submit("one-left", [1, 2, 3], params(max_tokens=3), output_ids=[4, 5]).request_id == "one-left"
    assert "done" not in sched.requests


def test_submit_validates_and_clamps():
    # one slot: one request seated, one queued
    sched, _ = make(max_seq_len=32, max_waiting_requests=1, max_waiting_tokens=20, num_slots=1)
    with pytest.raises(PromptTooLong, match="max_seq_len"):
        sched.submit("long", [1] * 32, params())
    with pytest.raises(ValueError, match="empty"):
        sched.submit("empty", [], params())
    seq = sched.submit("a", [1] * 10, params(max_tokens=1000, min_tokens=500))
    assert (seq.params.max_tokens, seq.params.min_tokens) == (22, 22)
    assert seq.stop_token_ids == (EOS,)
    with pytest.raises(ValueError, match="already"):
        sched.submit("a", [1], params())
    sched.submit("b", [1] * 2, params(ignore_eos=True, stop_token_ids=[3, 3, 4]))
    assert sched.requests["b"].stop_token_ids == (3, 4)
    with pytest.raises(QueueFull, match="requests"):
        sched.submit("c", [1], params())


def test_a_prompt_longer_than_max_waiting_tokens_runs_alone_not_429_forever():
    sched, _ = make(max_seq_len=64, max_waiting_tokens=20, num_slots=2)
    sched.submit("long", [1] * 30, params())  # nothing waits: the limit would refuse it whatever the load
    with pytest.raises(QueueFull, match="tokens"):
        sched.submit("next", [1] * 30, params())  # behind it, the limit holds


def test_max_waiting_tokens_refuses_a_long_prompt_only_when_it_refuses_a_short_one():
    """Under sustained overload the waiting tokens hover at the limit. Refused when its own tokens would pass the
    limit, a long prompt got 429 at every retry while short ones took each room freed (a 4,000-token prompt retried
    every 0.5 s for 12 s: never taken, beside 1,107 128-token ones). Now every request is refused while the waiting
    tokens are at the limit, and taken below it: the queue passes the limit by one prompt at most."""
    sched, _ = make(max_seq_len=64, max_waiting_tokens=20, num_slots=1)
    sched.submit("a", [1] * 15, params())
    sched.submit("long", [2] * 10, params())  # 15 tokens wait: below the limit, so it is taken
    assert sched.waiting_tokens == 25
    with pytest.raises(QueueFull, match="tokens"):
        sched.submit("short", [3], params())  # at the limit: as refused as the long one would be
    sched.cancel("long")
    sched.submit("short", [3], params())


def test_prompt_larger_than_the_pool_is_refused():
    sched, _ = make(num_blocks=4, max_seq_len=64)
    with pytest.raises(PromptTooLong, match="KV pool"):
        sched.submit("a", [1] * 16, params())
    assert sched.submit("b", [1] * 15, params(max_tokens=100)).params.max_tokens == 1


def test_single_request_matches_the_model_and_frees_everything():
    sched, mesh = make()
    prompt = [1, 2, 3, 4, 5, 6]
    p = params(max_tokens=12)
    sched.submit("a", prompt, p)
    events = drain(sched, mesh)["a"]
    tokens, reason = expected(prompt, p)
    assert output_of(events) == tokens and events[-1].finish_reason == reason
    assert (events[0].num_prompt_tokens, events[0].num_cached_tokens) == (6, 0)
    assert events[0].queue_time_s is not None and events[0].queue_time_s >= 0
    assert all(e.num_prompt_tokens == 0 for e in events[1:])
    assert all(e.finish_reason is None for e in events[:-1])
    assert sched.kv.groups[0].pool.num_used == 0 and not sched.running and not sched.requests
    assert len(sched.kv.groups[0].free_slots) == 4 and not sched.kv.page_table.any()


def test_sequence_records_timestamps():
    sched, mesh = make()
    seq = sched.submit("a", [1, 2, 3], params(max_tokens=5, ignore_eos=True))
    drain(sched, mesh)
    assert seq.status is Status.FINISHED and seq.finish_reason == "length"
    assert seq.arrival_time <= seq.scheduled_time <= seq.first_token_time <= time.monotonic()
    assert len(seq.output_ids) == 5


def test_each_prompt_id_crosses_to_the_mesh_once():
    """A chunk carries the ids the mesh has not had since the sequence took its slot (from 0 on a seat's first chunk,
    a cached prefix too), not the whole sequence up to its end: that made the 32 chunks of a 128k prompt 6.6 MB to
    pickle, quadratic in the prompt. A later seat (a preemption, a recompute) starts again from 0."""
    sched, mesh = make(prefill_chunk=8, max_prefill_tokens=8, prefix_align=2 * BS)
    prompt = list(range(1, 42))
    events = defaultdict(list)
    for request_id, ids, cached in (("a", prompt, 0), ("b", prompt[:32] + [50, 51, 52], 32)):
        seq = sched.submit(request_id, ids, params(max_tokens=2, ignore_eos=True))
        chunks = []
        while not seq.output_ids:
            chunks += step(sched, mesh, events).prefills
        assert sum(len(c.token_ids) for c in chunks) == len(ids)
        assert [c.token_ids for c in chunks] == [ids[c.offset:c.end] for c in chunks]
        assert chunks[0].offset == 0 and chunks[0].start == cached
        assert all(c.offset == before.end for before, c in zip(chunks, chunks[1:]))
        while sched.requests:
            step(sched, mesh, events)
    answer = [t for e in events["b"] for t in e.token_ids]
    assert answer == reference_output(prompt[:32] + [50, 51, 52], params(max_tokens=2, ignore_eos=True), ())[0]


def test_long_prompt_is_chunked_without_holding_back_running_users():
    sched, mesh = make(prefill_chunk=8, max_prefill_tokens=12, prefix_align=2 * BS, decode_steps=2)
    sched.submit("short", [1, 2, 3], params(max_tokens=40, ignore_eos=True))
    events = defaultdict(list)
    step(sched, mesh, events)  # the short prompt is live now
    long_prompt = list(range(1, 15)) * 3  # 42 tokens
    long_seq = sched.submit("long", long_prompt, params(max_tokens=3, ignore_eos=True))
    chunks = []
    while not long_seq.output_ids:
        work = step(sched, mesh, events)
        assert work.decode is not None and sched.requests["short"].slot in work.decode.slots
        assert sum(c.end - c.start for c in work.prefills) <= 12
        chunks += work.prefills
    assert [(c.start, c.end) for c in chunks] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40),
                                                             (40, 42)]
    assert all(c.token_ids == long_prompt[c.offset:c.end] for c in chunks)
    assert all(not c.is_final and c.stop_token_ids == () for c in chunks[:-1])
    final = chunks[-1]
    assert final.is_final and final.params.max_tokens == 3 and final.num_prompt_tokens == 42
    assert len(final.block_ids) == 11
    drain(sched, mesh, events)
    assert output_of(events["long"]) == expected(long_prompt, final.params)[0]


def test_final_chunk_can_join_the_same_works_decode_round():
    sched, mesh = make(decode_steps=4)
    sched.submit("a", [1, 2, 3], params(max_tokens=20, ignore_eos=True))
    work = sched.schedule()
    assert work.prefills[0].is_final and work.decode.slots == [work.prefills[0].slot]
    assert work.num_messages == 5
    seq = sched.requests["a"]
    assert seq.num_planned == 3 + 1 + 4 and len(seq.block_table) * BS >= seq.num_planned - 1


def test_stop_token_ids_include_eos_unless_ignored():
    sched, mesh = make()
    sched.submit("a", [1], params(stop_token_ids=[7]))
    sched.submit("b", [2], params(stop_token_ids=[7], ignore_eos=True))
    finals = {c.request_id: c for c in sched.schedule().prefills}
    assert finals["a"].stop_token_ids == (EOS, 7) and finals["b"].stop_token_ids == (7,)


def test_page_table_rows_follow_block_tables_and_rounds_get_a_copy():
    sched, mesh = make(decode_steps=4)
    for i in range(3):
        sched.submit(f"r{i}", [i + 1] * (5 + 3 * i), params(max_tokens=30, ignore_eos=True))
    events = defaultdict(list)
    rounds = []
    for _ in range(6):
        work = step(sched, mesh, events)
        rounds.append((work.decode.page_table, sched.kv.page_table.copy()))
        for seq in sched.running.values():
            row = sched.kv.page_table[seq.slot]
            assert row[:len(seq.block_table)].tolist() == seq.block_table and not row[len(seq.block_table):].any()
            assert len(seq.block_table) * BS >= seq.num_planned - 1
            assert work.decode.page_table.shape[1] >= len(seq.block_table)  # every listed row whole
        # only as wide as the longest listed block table, not max_seq_len's
        assert work.decode.page_table.shape[1] == max(len(s.block_table) for s in sched.running.values())
    assert all(np.array_equal(sent, at_plan[:, :sent.shape[1]]) and not at_plan[:, sent.shape[1]:].any()
               for sent, at_plan in rounds)
    assert rounds[0][0] is not sched.kv.page_table and not np.array_equal(rounds[0][0], rounds[-1][1][:, :rounds[0][0].shape[1]])


def test_identical_prefix_shares_blocks_and_salt_or_difference_does_not():
    sched, mesh = make(decode_steps=2)
    prompt = list(range(1, 14))
    sched.submit("a", prompt, params(max_tokens=20, ignore_eos=True))
    events = defaultdict(list)
    step(sched, mesh, events)
    step(sched, mesh, events)  # a's prompt blocks are computed and cached
    sched.submit("same", prompt + [9], params(max_tokens=2, ignore_eos=True))
    sched.submit("salted", prompt + [9], params(max_tokens=2, ignore_eos=True), salt="t2")
    sched.submit("other", [2] + prompt[1:] + [9], params(max_tokens=2, ignore_eos=True))
    work = sched.schedule()
    a, same, salted, other = (sched.requests[r] for r in ("a", "same", "salted", "other"))
    assert same.num_computed == 12 and same.block_table[:3] == a.block_table[:3]
    assert all(sched.kv.groups[0].pool.ref_counts[b] == 2 for b in a.block_table[:3])
    assert salted.num_computed == 0 and other.num_computed == 0
    assert not set(salted.block_table) & set(a.block_table) and not set(other.block_table) & set(a.block_table)
    run(sched, mesh, work, events)
    drain(sched, mesh, events)
    assert events["same"][0].num_cached_tokens == 12 and events["salted"][0].num_cached_tokens == 0
    for rid, p in (("same", prompt + [9]), ("salted", prompt + [9]), ("other", [2] + prompt[1:] + [9])):
        assert output_of(events[rid]) == expected(p, params(max_tokens=2, ignore_eos=True))[0]
    stats = sched.stats()
    assert stats["prefix_hit_tokens"] == 12 and stats["prefix_query_tokens"] == 13 + 3 * 14


def test_finished_request_leaves_its_prefix_for_the_next_turn():
    sched, mesh = make(prefix_align=2 * BS)
    first = list(range(1, 12))
    sched.submit("t1", first, params(max_tokens=8, ignore_eos=True))
    events = drain(sched, mesh)
    history = first + output_of(events["t1"])  # 19 tokens: 16 of them in full blocks
    assert sched.kv.groups[0].pool.num_used == 0 and sched.kv.groups[0].pool.num_cached == 4
    sched.submit("t2", history + [3, 4], params(max_tokens=4, ignore_eos=True))
    drain(sched, mesh, events)
    assert events["t2"][0].num_cached_tokens == 16
    assert output_of(events["t2"]) == expected(history + [3, 4], params(max_tokens=4, ignore_eos=True))[0]


@pytest.mark.parametrize("caching", [True, False])
def test_with_prefix_caching_off_a_repeated_prompt_is_computed_again(caching):
    """vLLM's enable_prefix_caching: off, nothing is looked up or counted, and the answer is the same."""
    sched, mesh = make(prefix_align=2 * BS, enable_prefix_caching=caching)
    prompt, p = list(range(1, 30)), params(max_tokens=4, ignore_eos=True)
    events = defaultdict(list)
    for rid in ("a", "b"):
        sched.submit(rid, prompt, p)
        drain(sched, mesh, events)
    assert events["b"][0].num_cached_tokens == (24 if caching else 0)  # 28 reusable, aligned to 8
    assert (sched.prefix_query_tokens, sched.prefix_hit_tokens) == ((58, 24) if caching else (0, 0))
    assert output_of(events["a"]) == output_of(events["b"]) == expected(prompt, p)[0]
    hashes: list[bytes] = []
    extend_block_hashes(hashes, prompt, BS, None)
    assert sched.cached_prefix_tokens(hashes, len(prompt)) == (24 if caching else 0)  # what placement sees
    pool = sched.kv.groups[0].pool  # off, a freed block holds no reusable prefix: free, not cached
    assert (pool.num_cached, pool.num_free) == ((8, 56) if caching else (0, 64))


def test_out_of_blocks_preempts_the_newest_and_output_is_unchanged():
    # 16 blocks of 4 tokens: two sequences growing to 48 tokens each cannot both fit
    sched, mesh = make(num_blocks=16, num_slots=2, decode_steps=4)
    p = params(max_tokens=40, ignore_eos=True)
    sched.submit("old", [1] * 8, p)
    sched.submit("new", [2] * 8, p)
    events = defaultdict(list)
    released = []
    for _ in range(200):
        work = step(sched, mesh, events)
        if work is None:
            break
        released += work.release
    assert sched.num_preemptions >= 1 and sched.stats()["preemptions"] == sched.num_preemptions
    assert released  # the mesh was told to drop the preempted slot
    for rid, prompt in (("old", [1] * 8), ("new", [2] * 8)):
        assert output_of(events[rid]) == expected(prompt, p)[0]
        assert sum(e.num_prompt_tokens for e in events[rid]) == 8  # one first event only
    assert sched.kv.groups[0].pool.num_used == 0
    assert sched.stats()["prefix_query_tokens"] == 16  # the two prompts, not their recomputes


def test_a_prompt_preempted_before_its_first_token_reports_no_cache_hit_of_its_own_chunks():
    """cached_tokens are what the prefix cache held when the request came (vLLM: its first scheduling). A prompt
    preempted mid-prefill left its computed chunks in the cache, and its recompute hit them: usage reported
    its own tokens as cached (billed as cache hits), though prefix_cache_hits counted none."""
    sched, mesh = make(num_blocks=16, num_slots=2, decode_steps=4, prefill_chunk=4, max_prefill_tokens=4)
    sched.submit("old", [1] * 3, params(max_tokens=40, ignore_eos=True))  # grows a block per work
    events = defaultdict(list)
    step(sched, mesh, events)
    prompt = list(range(20, 60))  # 10 blocks, prefilled a block per work: the old one's growth preempts it
    sched.submit("long", prompt, params(max_tokens=4, ignore_eos=True))
    drain(sched, mesh, events)
    assert sched.num_preemptions >= 1 and sched.prefix_hit_tokens == 0
    (first,) = [e for e in events["long"] if e.num_prompt_tokens]
    assert first.num_cached_tokens == 0
    assert output_of(events["long"]) == expected(prompt, params(max_tokens=4, ignore_eos=True))[0]


def test_preempted_sequence_returns_to_the_head_of_the_queue():
    sched, mesh = make(num_blocks=16, num_slots=3, decode_steps=4)
    p = params(max_tokens=40, ignore_eos=True)
    for rid in ("a", "b"):
        sched.submit(rid, [1] * 20, p)
    events = defaultdict(list)
    while not sched.num_preemptions:
        step(sched, mesh, events)
    sched.submit("c", [3] * 4, p)
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    assert sched.requests["b"].status is Status.PREEMPTED
    assert sched.stats()["queued_tokens"] == len(sched.requests["b"].token_ids) + 4


def test_cancel_in_every_state_frees_everything():
    sched, mesh = make(num_slots=1, prefill_chunk=8, max_prefill_tokens=8)
    assert sched.cancel("nobody") is None
    sched.submit("waiting", [1, 2], params())
    sched.submit("prefilling", list(range(1, 30)), params())
    sched.submit("queued", [3], params())
    assert sched.cancel("waiting").finish_reason == "abort"
    work = sched.schedule()
    assert [c.request_id for c in work.prefills] == ["prefilling"]
    event = sched.cancel("prefilling", reason="stop")
    assert (event.finish_reason, event.num_prompt_tokens) == ("stop", 29)
    for result in mesh.execute(work):
        assert list(sched.process(result)) == []
    work = sched.schedule()
    assert work.release == [0] and work.prefills[0].request_id == "queued"
    assert sched.cancel("queued").finish_reason == "abort"
    for result in mesh.execute(work):
        assert list(sched.process(result)) == []
    assert sched.schedule() is None and sched.pending_release == [0]
    assert not sched.requests and sched.kv.groups[0].pool.num_used == 0 and sched.kv.groups[0].free_slots == [0]


def test_tokens_planned_before_a_cancel_are_dropped():
    sched, mesh = make(decode_steps=4)
    sched.submit("a", [1, 2, 3], params(max_tokens=30, ignore_eos=True))
    events = defaultdict(list)
    step(sched, mesh, events)
    work = sched.schedule()
    sched.cancel("a")
    sched.submit("b", [4, 5], params(max_tokens=30, ignore_eos=True))
    work_b = sched.schedule()  # b takes the slot a had, while a's round is still unanswered
    assert work_b.release == work.decode.slots and work_b.prefills[0].slot == work.decode.slots[0]
    got = [list(sched.process(r)) for r in mesh.execute(work)]
    assert got == [[]] * 4
    run(sched, mesh, work_b, events)
    assert output_of(events["b"]) == expected([4, 5], params(max_tokens=30, ignore_eos=True))[0][:5]


def test_pipelining_is_bounded_and_results_must_come_in_order():
    sched, mesh = make(max_inflight=2)
    sched.submit("a", [1, 2, 3], params(max_tokens=30, ignore_eos=True))
    w1, w2 = sched.schedule(), sched.schedule()
    assert sched.schedule() is None
    seq = sched.requests["a"]
    assert seq.num_planned == 3 + 1 + 2 * 3 and len(seq.block_table) * BS >= seq.num_planned - 1
    r1, r2 = mesh.execute(w1), mesh.execute(w2)
    with pytest.raises(ValueError, match="expected work"):
        sched.process(r2[0])
    for result in r1:
        sched.process(result)
    assert sched.schedule() is not None


def test_slot_retired_by_the_mesh_mid_round_is_freed_and_reused():
    sched, mesh = make(num_slots=1, decode_steps=8)
    sched.submit("a", [1, 2, 3], params(max_tokens=3, ignore_eos=True))
    sched.submit("b", [4, 5, 6], params(max_tokens=2, ignore_eos=True))
    events = defaultdict(list)
    work = sched.schedule()
    results = mesh.execute(work)
    assert [r.tokens[0] != NO_TOKEN for r in results] == [True, True, True] + [False] * 6
    assert results[2].finished == {0: "length"}
    for result in results:
        for event in sched.process(result):
            events[event.request_id].append(event)
    assert events["a"][-1].finish_reason == "length" and len(output_of(events["a"])) == 3
    assert sched.kv.groups[0].free_slots == [0]
    assert step(sched, mesh, events).release == []  # the mesh retired it itself
    drain(sched, mesh, events)
    assert output_of(events["b"]) == expected([4, 5, 6], params(max_tokens=2, ignore_eos=True))[0]


def test_logprobs_are_passed_through():
    sched, mesh = make()
    sched.submit("a", [1, 2], params(max_tokens=4, ignore_eos=True, logprobs=2))
    events = drain(sched, mesh)["a"]
    assert [lp.token_id for e in events for lp in e.logprobs] == output_of(events)


def test_messages_are_plain_picklable_data():
    sched, mesh = make()
    sched.submit("a", [1, 2, 3], params(max_tokens=4, logprobs=1))
    work = sched.schedule()
    again = pickle.loads(pickle.dumps(work))
    assert again.prefills[0].token_ids == [1, 2, 3] and np.array_equal(again.decode.page_table, work.decode.page_table)
    results = mesh.execute(work)
    events = list(sched.process(pickle.loads(pickle.dumps(results[0]))))
    assert pickle.loads(pickle.dumps(events))[0].token_ids == events[0].token_ids
    assert isinstance(sched.stats(), dict) and pickle.loads(pickle.dumps(sched.stats())) == sched.stats()


def test_stats_balance():
    sched, mesh = make(num_blocks=32)
    sched.submit("a", list(range(1, 11)), params(max_tokens=6, ignore_eos=True))
    sched.submit("b", [1], params())
    sched.schedule()
    s = sched.stats()
    assert (s["running"], s["waiting"], s["free_slots"], s["queued_tokens"]) == (2, 0, 2, 0)
    assert s["blocks_used"] + s["blocks_cached"] + s["blocks_free"] == s["blocks_total"] == 32
    assert s["blocks_used"] == sum(len(q.block_table) for q in sched.running.values())


@pytest.mark.parametrize("reason, says", [("error", "failed on the mesh host"), ("grammar_error", "gave up"),
                                          ("constraint_error", "leave no token")])
def test_a_slot_the_mesh_retired_ends_its_request_with_the_reason_and_frees_it(reason, says):
    sched, _ = make()
    sched.submit("a", [1, 2, 3, 4, 5, 6], params())
    work = sched.schedule()
    (chunk,) = work.prefills
    tokens = [NO_TOKEN] * 4
    (event,) = sched.process(StepResult(work.work_id, tokens, finished={chunk.slot: reason}, last=True))
    assert (event.request_id, event.finish_reason, event.token_ids) == ("a", reason, [])
    assert says in event.error
    assert not sched.requests and not sched.running and sched.kv.groups[0].pool.num_used == 0


def test_result_for_an_unknown_work_is_refused():
    sched, _ = make()
    with pytest.raises(ValueError):
        sched.process(StepResult(7, [NO_TOKEN] * 4))


def test_constructor_checks_alignment():
    with pytest.raises(ValueError):
        MeshScheduler(num_blocks=16, block_size=4, prefix_align=6, prefill_chunk=12)
    with pytest.raises(ValueError):
        MeshScheduler(num_blocks=16, block_size=4, prefix_align=8, prefill_chunk=12)
    with pytest.raises(ValueError):
        MeshScheduler(num_blocks=16, block_size=4, prefix_align=8, prefill_chunk=16, max_prefill_tokens=4)


def _turn(sched, mesh, work, pending: deque, events) -> bool:
    """One turn of the router's loop with works in flight: send `work`, or else take the oldest work's results
    (their events into `events`). False once neither is left."""
    if work is not None:
        pending.append(mesh.execute(work))
    elif pending:
        for result in pending.popleft():
            for event in sched.process(result):
                events[event.request_id].append(event)
    else:
        return False
    return True


def _pipelined(sched, mesh, answers):
    """Run `answers` ({id: (prompt, max_tokens)}, ignore_eos) as the router drives a mesh: works planned until
    max_inflight are out, then the oldest one's results. Returns each one's length at each of its preemptions."""
    seqs = {rid: sched.submit(rid, prompt, params(max_tokens=max_tokens, ignore_eos=True))
            for rid, (prompt, max_tokens) in answers.items()}
    events, pending, preempted_at = defaultdict(list), deque(), defaultdict(list)
    for _ in range(300):
        running = [seq for seq in seqs.values() if seq.status is Status.RUNNING]
        work = sched.schedule()
        for seq in running:
            if seq.status is Status.PREEMPTED:
                preempted_at[seq.request_id].append(len(seq.token_ids))
        if not _turn(sched, mesh, work, pending, events):
            break
    assert not sched.requests
    for rid, (prompt, max_tokens) in answers.items():
        assert output_of(events[rid]) == expected(prompt, params(max_tokens=max_tokens, ignore_eos=True))[0]
    return preempted_at


def test_a_preempted_sequence_is_preempted_again_only_after_a_token():
    """The router plans max_inflight works ahead of their results, so a re-seated sequence's recompute gives its token
    a work or more after its seat. c, preempted, was re-seated in the room a's end left (one block to spare), and the
    next round's lookahead of b, older, took that block by preempting c again before its recompute's token came: c
    preempted at 2 tokens twice (in an on-call run, one request 3 times at 183, each a Galaxy prefill of them). Now
    b waits a round for c's token: every preemption of a sequence comes after a token of it."""
    sched, mesh = make(num_blocks=6, num_slots=3, decode_steps=4, max_inflight=2)
    preempted_at = _pipelined(sched, mesh, {"a": ([1, 1], 4), "b": ([2, 2], 20), "c": ([3, 3], 4)})
    assert preempted_at["c"]
    for rid, lengths in preempted_at.items():
        assert lengths == sorted(set(lengths)), f"{rid} preempted with no token in between: {lengths}"


def test_a_preempted_sequence_is_re_seated_with_room_to_decode():
    """c, preempted at 6 tokens, was re-seated as soon as a's end left its 2 blocks, none to spare: b's growth
    preempted it again right after its recompute's one token (at 7), a recompute of 7 tokens for 1. Now it is
    re-seated with room for its group to grow (max_inflight + 1) decode rounds, so it makes its recompute's token
    and a decode round at least before any next preemption: here it has none."""
    sched, mesh = make(num_blocks=6, num_slots=3, decode_steps=4, max_inflight=2)
    preempted_at = _pipelined(sched, mesh, {"a": ([1, 1], 4), "b": ([2, 2], 20), "c": ([3] * 6, 4)})
    assert preempted_at["c"]
    for rid, lengths in preempted_at.items():
        assert all(b - a > sched.decode_steps for a, b in zip(lengths, lengths[1:])), (rid, lengths)


def test_a_long_recompute_is_re_seated_with_room_for_its_groups_growth_through_all_its_chunks():
    """c, preempted at 64 tokens on a mesh it left, came with 8 chunks to recompute (8 tokens a work) and was seated
    beside a with room for a's growth over max_inflight + 1 rounds, as for a one-chunk recompute: a grew into it
    during the recompute, sat out the round of c's last chunk, and once c's token came preempted c (the newest): 64
    tokens recomputed for 1, then again. Now the room counts every chunk of the recompute: c waits for it (here, for
    a's end), a decodes in every round, and nobody is preempted."""
    sched, mesh = make(num_blocks=25, num_slots=2, decode_steps=4, max_inflight=2, max_seq_len=256)
    a = sched.submit("a", [1, 1], params(max_tokens=60, ignore_eos=True))
    c_params = params(max_tokens=30, ignore_eos=True)
    events, pending, c = defaultdict(list), deque(), None
    for _ in range(400):
        if c is None and a.live:
            c = sched.submit("c", [3] * 60, c_params, output_ids=[4] * 4, migrated=True, num_tokens_preempted=64)
        decodes_a = a.status is Status.RUNNING and a.num_planned < a.max_tokens_total
        work = sched.schedule()
        if work is not None:
            assert not decodes_a or work.decode is not None and a.slot in work.decode.slots, "a sat a round out"
        if not _turn(sched, mesh, work, pending, events):
            break
    assert sched.num_preemptions == 0 and not sched.requests
    assert output_of(events["c"]) == expected([3] * 60 + [4] * 4, params(max_tokens=26, ignore_eos=True))[0]


def test_results_planned_for_an_earlier_placement_are_dropped():
    # three works in flight and a pool for one growing sequence: b is preempted, and placed again when the short c
    # ends, while a work planned for its first placement is still unanswered
    sched, mesh = make(num_blocks=8, num_slots=3, decode_steps=1, max_inflight=3, max_seq_len=32)
    p = params(max_tokens=20, ignore_eos=True)
    sched.submit("c", [3] * 6, params(max_tokens=4, ignore_eos=True))
    sched.submit("a", [1] * 6, p)
    b = sched.submit("b", [2] * 6, p)
    events, pending, stale_seen = defaultdict(list), deque(), False
    for _ in range(300):
        work = sched.schedule()
        if not _turn(sched, mesh, work, pending, events):
            break
        if work is not None:
            stale_seen |= any(seq is b and epoch < b.epoch and b.status is Status.RUNNING
                              for planned in sched.inflight for _, seq, epoch in planned.decode)
    assert stale_seen and b.epoch >= 2
    for rid, prompt in (("a", [1] * 6), ("b", [2] * 6)):
        assert output_of(events[rid]) == expected(prompt, p)[0]
    assert output_of(events["c"]) == expected([3] * 6, params(max_tokens=4, ignore_eos=True))[0]


def test_a_prefill_chunk_answered_after_its_sequence_moved_to_another_kv_group_is_not_credited():
    """b, seated in group 0 on c's cached prefix, has its chunk [8, 16) out when the next schedule's lookahead of c
    (older) runs group 0 dry: b is preempted and, in the same schedule, re-seated in group 1 (max_inflight 2, the
    router's default pipeline_depth), its recompute's chunk [0, 8) out. The old chunk's answer computed group 0's
    memory (a Galaxy column's). Credited to b's new seat, it named b's group 1 blocks for [8, 16), which nothing had
    computed, as b's prefix, and b was cancelled before its recompute got there: a later prompt with b's tokens took
    them from the cache and was answered from KV nobody wrote (the fake mesh's KVCorruption)."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=64, prefill_chunk=8,
                          max_prefill_tokens=8, decode_steps=3, eos_token_ids=(EOS,))
    mesh, events = FakeMesh(4, 8, BS, kv_groups=2), defaultdict(list)

    def take(results):
        for result in results:
            for event in sched.process(result):
                events[event.request_id].append(event)

    prefix = [3, 1, 4, 1, 5, 9, 2, 6]
    c_params, b_params = params(max_tokens=40, ignore_eos=True), params(max_tokens=4, ignore_eos=True)
    c = sched.submit("c", prefix + [7, 7], c_params)
    drain(sched, mesh, events, max_works=2)
    b_prompt = prefix + list(range(16))
    b = sched.submit("b", b_prompt, b_params)
    old = sched.schedule()
    assert [(ch.request_id, ch.start, ch.end) for ch in old.prefills] == [("b", 8, 16)]
    assert sched.kv.group_of(b.slot).index == 0 and c.live  # group 0 caches c's prefix: empty group 1 ranks below
    old_results = mesh.execute(old)
    new = sched.schedule()
    assert b.epoch == 2 and sched.kv.group_of(b.slot).index == 1 and sched.num_preemptions == 1
    assert [(ch.request_id, ch.start, ch.end) for ch in new.prefills] == [("b", 0, 8)]
    new_results = mesh.execute(new)
    take(old_results)
    assert b.num_computed == 0  # none of the new seat's chunks is answered yet
    assert all(sched.kv.groups[1].pool.block_hash[block] is None for block in b.block_table)
    take(new_results)
    sched.cancel("b")
    sched.submit("f", b_prompt, b_params)
    drain(sched, mesh, events)
    assert output_of(events["f"]) == expected(b_prompt, b_params)[0]
    assert output_of(events["c"]) == expected(c.prompt_ids, c.params)[0]


def test_a_final_chunk_answered_after_its_sequence_was_re_seated_in_the_same_slot_gives_no_token():
    """With pipeline_depth 3 (AppConfig allows up to 4) a work is planned while two are out. b, in slot 0 (w's, freed),
    has its final chunk out when the next schedule's lookahead of x (older) runs the pool dry: b is preempted. x's
    client leaves, and the third schedule re-seats b in slot 0, the lowest free, with its recompute's final chunk. The
    first chunk's answer carries b's first token at slot 0: credited to the new seat, b took it twice, once from each
    chunk (14, 14, 2, 3: one past max_tokens 3)."""
    sched, mesh = make(num_blocks=4, num_slots=2, decode_steps=2, max_inflight=3)
    events = defaultdict(list)
    sched.submit("w", [9], params(max_tokens=1))
    x = sched.submit("x", [5, 5, 5], params(max_tokens=30, ignore_eos=True))
    step(sched, mesh, events)  # w ends at its chunk's token; x decodes
    assert x.live and "w" not in sched.requests
    b_params = params(max_tokens=3, ignore_eos=True)
    b = sched.submit("b", [1, 2, 3, 4, 5, 6], b_params)
    first = sched.schedule()
    assert b.slot == 0 and [(ch.request_id, ch.is_final) for ch in first.prefills] == [("b", True)]
    first_results = mesh.execute(first)
    second = sched.schedule()
    assert b.status is Status.PREEMPTED and first.prefills[0].slot in second.release
    second_results = mesh.execute(second)
    sched.cancel("x")
    third = sched.schedule()
    assert b.epoch == 2 and b.slot == 0 and [(ch.request_id, ch.start) for ch in third.prefills] == [("b", 0)]
    for results in (first_results, second_results, mesh.execute(third)):
        for result in results:
            for event in sched.process(result):
                events[event.request_id].append(event)
    drain(sched, mesh, events)
    assert output_of(events["b"]) == expected([1, 2, 3, 4, 5, 6], b_params)[0]
    assert sum(e.num_prompt_tokens for e in events["b"]) == 6  # one first event


def test_bench_drives_the_work_protocol_end_to_end():
    """scheduler.bench speaks the same message protocol as a mesh; a drift there breaks the benchmark."""
    from scheduler.bench import decode_step_us
    runs = decode_step_us(num_slots=4, long_users=1, long_prompt=3000, short_prompt=100, rounds=3, repeats=1)
    assert len(runs) == 1 and runs[0] > 0


def _two_users_sharing_a_prefix(kv_groups: int):
    """Two slots on a mesh with two KV groups (one slot each); B arrives while A holds slot 0 (group 0)."""
    sched = MeshScheduler(num_blocks=32, block_size=BS, kv_groups=kv_groups, num_slots=2, max_seq_len=64,
                          prefill_chunk=8, max_prefill_tokens=16, decode_steps=2, eos_token_ids=(EOS,))
    mesh = FakeMesh(2, 32, BS, kv_groups=2)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    a, b = prefix + [7], prefix + [9, 9]
    events = defaultdict(list)
    sched.submit("a", a, params(max_tokens=20, ignore_eos=True))
    for _ in range(4):
        step(sched, mesh, events)
    sched.submit("b", b, params(max_tokens=6, ignore_eos=True))
    drain(sched, mesh, events)
    return sched, events, {"a": reference_output(a, params(max_tokens=20, ignore_eos=True), ()),
                           "b": reference_output(b, params(max_tokens=6, ignore_eos=True), ())}


def test_a_single_pool_on_a_mesh_with_kv_groups_reads_another_columns_memory():
    """The old placement: one pool for every slot shares A's cached blocks with B in the other group."""
    from tests.fake_mesh import KVCorruption
    with pytest.raises(KVCorruption):
        _two_users_sharing_a_prefix(kv_groups=1)


def test_kv_groups_keep_each_prefix_hit_inside_the_group_that_wrote_it():
    sched, events, expected = _two_users_sharing_a_prefix(kv_groups=2)
    for rid, (tokens, reason) in expected.items():
        assert [t for e in events[rid] for t in e.token_ids] == tokens
    stats = sched.stats()
    assert stats["kv_groups"] == 2 and [g["blocks_used"] for g in stats["groups"]] == [0, 0]
    assert stats["blocks_total"] == 64


def test_admission_picks_the_kv_group_that_caches_the_prefix_else_the_emptiest():
    sched = MeshScheduler(num_blocks=32, block_size=BS, kv_groups=4, num_slots=8, max_seq_len=64, prefill_chunk=8,
                          max_prefill_tokens=64, decode_steps=2, eos_token_ids=(EOS,))
    mesh = FakeMesh(8, 32, BS, kv_groups=4)
    events = defaultdict(list)
    prefix = list(range(1, 13))
    sched.submit("x", [9] * 6, params(max_tokens=30, ignore_eos=True))  # takes group 0 (ties: lowest)
    step(sched, mesh, events)
    assert sched.kv.group_of(sched.running["x"].slot).index == 0
    sched.submit("a", prefix + [1], params(max_tokens=2, ignore_eos=True))
    work = sched.schedule()
    assert sched.kv.group_of(sched.running["a"].slot).index == 1  # the emptiest group
    run(sched, mesh, work, events)
    while "a" in sched.requests:
        step(sched, mesh, events)
    sched.submit("b", prefix + [2, 2], params(max_tokens=2, ignore_eos=True))
    assert sched.cached_prefix_tokens(_hashes(prefix + [2, 2]), 14) == 12  # what the router ranks meshes by
    work = sched.schedule()
    b = sched.running["b"]
    assert sched.kv.group_of(b.slot).index == 1 and b.num_cached_tokens == 12  # the hit beats emptiness
    run(sched, mesh, work, events)


def _hashes(token_ids):
    hashes = []
    extend_block_hashes(hashes, token_ids, BS)
    return hashes


def test_prompts_taking_turns_keep_their_prefixes_in_different_groups():
    """Sequential requests tie on hits and free slots: they go to the group with the most blocks holding no
    cached prefix, not all to group 0, where each would evict the one before (then a resend hits nothing)."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=4, num_slots=8, max_seq_len=64, prefill_chunk=8,
                          max_prefill_tokens=64, decode_steps=2, eos_token_ids=(EOS,))
    mesh = FakeMesh(8, 8, BS, kv_groups=4)
    events = defaultdict(list)
    prompts = [[20 + i] * 20 for i in range(4)]  # 5 full blocks each: two do not fit one 8-block pool
    groups = []
    for rounds in range(2):
        for i, prompt in enumerate(prompts):
            rid = f"{rounds}-{i}"
            sched.submit(rid, prompt + [1], params(max_tokens=2, ignore_eos=True))
            work = sched.schedule()
            groups.append(sched.kv.group_of(sched.running[rid].slot).index)
            run(sched, mesh, work, events)
            while rid in sched.requests:
                step(sched, mesh, events)
    assert groups == [0, 1, 2, 3] * 2
    assert [events[f"1-{i}"][0].num_cached_tokens for i in range(4)] == [20] * 4  # every resend hits


def test_a_burst_into_free_slots_is_no_queue():
    """max_waiting_requests counts requests that wait for a slot: three at once into an idle mesh of two
    slots and a queue of one are all taken; the fourth waits beyond the limit."""
    sched, _ = make(num_slots=2, max_waiting_requests=1)
    for i in range(3):
        sched.submit(f"r{i}", [1, 2, 3], params())
    with pytest.raises(QueueFull, match="waiting for a slot"):
        sched.submit("r3", [1, 2, 3], params())


def test_a_stream_under_way_waits_before_every_request_not_started():
    """Moved off a failed mesh or continued after a router restart: its client is mid-stream."""
    sched = MeshScheduler(num_slots=1, num_blocks=64, block_size=16, max_seq_len=512, prefill_chunk=256,
                          max_prefill_tokens=256, decode_steps=4)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    for rid in ("new0", "new1"):
        sched.submit(rid, [1, 2, 3], params)
    sched.submit("moved0", [4, 5, 6], params, output_ids=[7, 8], migrated=True)
    sched.submit("moved1", [4, 5, 6], params, output_ids=[9], migrated=True)
    sched.submit("new2", [1, 2, 3], params)
    assert [s.request_id for s in sched.waiting] == ["moved0", "moved1", "new0", "new1", "new2"]


def test_a_request_moved_before_its_start_keeps_its_turn_among_those_not_started():
    """Served in order of arrival: one that waited on a mesh that failed is not put behind requests that came
    after it (it went to the back of the queue, behind every later arrival)."""
    sched = MeshScheduler(num_slots=1, num_blocks=64, block_size=16, max_seq_len=512, prefill_chunk=256,
                          max_prefill_tokens=256, decode_steps=4)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    sched.submit("moved-started", [4, 5, 6], params, output_ids=[7], migrated=True, arrival_time=5.0)
    for rid, at in (("new-a", 10.0), ("new-b", 12.0)):
        sched.submit(rid, [1, 2, 3], params, arrival_time=at)
    sched.submit("moved", [4, 5, 6], params, migrated=True, arrival_time=11.0)
    sched.submit("moved-first", [4, 5, 6], params, migrated=True, arrival_time=1.0)
    sched.submit("new-c", [1, 2, 3], params)  # now: the latest
    assert [s.request_id for s in sched.waiting] == ["moved-started", "moved-first", "new-a", "moved", "new-b",
                                                     "new-c"]


def test_requests_waiting_for_blocks_are_queued_though_slots_are_free():
    """num_queued is what the next schedule does not seat: with the head waiting for KV blocks, the whole
    queue (the router moves it to a mesh with room), not just what exceeds the free slots."""
    sched, _ = make(num_blocks=4)
    for i in range(3):  # 6 tokens each: two 4-token blocks; four blocks seat two of them
        sched.submit(f"r{i}", [i + 1] * 6, params())
    assert sched.num_queued == -1  # a burst into 4 free slots: no queue yet
    sched.schedule()
    assert (len(sched.running), sched.kv.num_free_slots, sched.num_queued) == (2, 2, 1)
    (queued,) = sched.queued()
    sched.cancel(queued.request_id, "abort")
    assert queued.request_id == "r2" and sched.num_queued == -2  # slots: the next admission tells of blocks
    assert not sched.seats(queued)  # no blocks for it: the router does not send it back here
    sched.cancel("r0")  # its blocks free: room again
    assert sched.num_queued == -3 and sched.seats(queued)
    sched.submit("r3", [9] * 6, params())
    assert not sched.seats(queued)  # the two blocks left are r3's, which waits here first


def _run(sched, mesh):
    work = sched.schedule()
    for result in mesh.execute(work) if work else ():
        sched.process(result)


def _moved_here(sched, token_ids, p):
    """`seats()` of a request that is another mesh's, then the request moved here and scheduled: whether it runs."""
    other = MeshScheduler(num_blocks=64, block_size=BS, num_slots=4, max_seq_len=64)
    seq = other.submit("moved", token_ids, p)
    extend_block_hashes(seq.block_hashes, token_ids, BS)
    said = sched.seats(seq)
    sched.submit("moved", token_ids, p, migrated=True)
    sched.schedule()
    return said, "moved" in sched.running


def test_seats_counts_the_slots_the_queue_takes_in_each_kv_group():
    """A queued request takes the only free slot of the group with the blocks: a request moved here on seats()'s
    word would wait at the head of this mesh's queue (holding back the queue behind it) until moved again."""
    for queue in ([[5, 6, 7]], []):
        sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=32,
                              prefill_chunk=32, max_prefill_tokens=32, decode_steps=1, max_inflight=1)
        mesh = FakeMesh(4, 8, BS, 2)
        sched.submit("big", list(range(100, 126)), params(5, ignore_eos=True))  # group 0: 7 of its 8 blocks
        _run(sched, mesh)
        sched.submit("x", [1, 2, 3], params(20, ignore_eos=True))  # group 1: one of its two slots
        _run(sched, mesh)
        for i, prompt in enumerate(queue):
            sched.submit(f"w{i}", prompt, params(20, ignore_eos=True))
        assert sched.num_queued < 0
        assert _moved_here(sched, [9] * 5, params(20, ignore_eos=True)) == ((False, False) if queue else (True, True))


def test_seats_counts_the_running_users_lookahead():
    """The next schedule reserves the running users' next decode_steps tokens before it admits anyone."""
    for decode_steps, expected in ((4, (False, False)), (1, (True, True))):
        sched = MeshScheduler(num_blocks=6, block_size=BS, num_slots=4, max_seq_len=24, prefill_chunk=24,
                              max_prefill_tokens=24, decode_steps=decode_steps, max_inflight=1)
        sched.submit("a", list(range(1, 12)), params(12, ignore_eos=True))  # 11 tokens: 3 blocks, 4 with its first
        _run(sched, FakeMesh(4, 6, BS))
        assert sched.kv.groups[0].pool.num_available == (2 if decode_steps == 4 else 3) and sched.num_queued == -3
        assert _moved_here(sched, list(range(50, 57)), params(2)) == expected  # 2 blocks


def test_seats_counts_a_cached_prefix_the_queue_shares_once():
    """Two queued requests reuse one cached prefix nobody owns: the first takes its blocks off the LRU, the
    second takes nothing more. Counted once per request, seats() said no to a request the schedule seats."""
    sched = MeshScheduler(num_blocks=10, block_size=BS, num_slots=4, max_seq_len=40, prefill_chunk=16,
                          max_prefill_tokens=16, decode_steps=1, max_inflight=1)
    mesh = FakeMesh(4, 10, BS)
    prefix = list(range(20, 28))  # two full blocks, cached once "p" ends
    sched.submit("p", prefix + [99], params(1, ignore_eos=True))
    while sched.requests:
        _run(sched, mesh)
    assert sched.kv.groups[0].pool.num_cached == 2
    sched.submit("w1", prefix + [1], params(3, ignore_eos=True))
    sched.submit("w2", prefix + [2], params(3, ignore_eos=True))
    assert _moved_here(sched, list(range(100, 117)), params(1, ignore_eos=True)) == (True, True)  # 5 blocks


def test_seats_counts_a_cached_prefix_block_the_lookahead_evicts():
    """With prefix_align two blocks, a hit of an owned block and a cached one nobody owns is lost whole when the
    running users' lookahead evicts the cached one (the oldest freed): the owned block alone is no aligned hit.
    seats() counted the hit as it is now, and said yes to a request the next schedule left waiting."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, num_slots=4, max_seq_len=32, prefill_chunk=8,
                          max_prefill_tokens=8, decode_steps=1, prefix_align=2 * BS, max_inflight=1)
    mesh = FakeMesh(4, 8, BS)
    x = list(range(1, 9))
    sched.submit("s", x[:4] + [50, 51, 52, 53, 54], params(40))  # computes (owns) x[:4]'s block, runs on
    for _ in range(3):
        _run(sched, mesh)
    for rid, prompt in (("t", x + [60]), ("u", list(range(70, 78)) + [79]), ("v", [100, 101, 102, 103])):
        sched.submit(rid, prompt, params(1))  # t leaves x[4:8]'s block cached, the oldest; u and v fill the pool
        while rid in sched.requests:
            _run(sched, mesh)
    pool = sched.kv.groups[0].pool
    s = sched.requests["s"]
    assert pool.num_free == 0 and blocks_for(s.num_planned, BS) > len(s.block_table)  # its lookahead evicts
    assert _moved_here(sched, x + [90, 91, 92, 93, 94], params(2)) == (False, False)


def test_placement_key_counts_a_preempted_requests_headroom_as_seats_does():
    """A failed mesh's preempted request is placed by placement_key (Router.place), and the next schedule seats it
    only with its _headroom (seats(), _admit): placement_key left that out, so it ranked first, as seating it now, a
    mesh that then left it waiting at the head of its queue (holding back the queue behind it) until _rebalance moved
    it on, over a mesh that seated it."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, num_slots=2, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=4, max_inflight=1)  # _headroom: 2 blocks a sequence
    sched.submit("a", [1, 2, 3], params(20, ignore_eos=True))
    _run(sched, FakeMesh(2, 8, BS))
    tokens = list(range(50, 58))  # 2 blocks, and (1 + 1) x 2 of room: 6 of the 6 blocks left after a's lookahead
    other = MeshScheduler(num_blocks=64, block_size=BS, num_slots=4, max_seq_len=64)
    seq = other.submit("moved", tokens, params(2), num_tokens_preempted=len(tokens))
    extend_block_hashes(seq.block_hashes, tokens, BS)
    assert sched.placement_key(seq.block_hashes, len(tokens))[0] == 1  # a new request of its length: seated now
    assert sched.placement_key(seq.block_hashes, len(tokens), seq.num_tokens_preempted)[0] == 0
    assert not sched.seats(seq)
    sched.submit("moved", tokens, params(2), migrated=True, num_tokens_preempted=len(tokens))
    sched.schedule()
    assert "moved" not in sched.running


def test_a_moved_request_with_tokens_since_its_preemption_is_seated_as_a_new_one():
    """A failover moves a request preempted on the failed mesh, then re-seated there, that has made tokens since: it
    carries its num_tokens_preempted (shorter than it now is), so _victim takes it like any other, yet its seat was
    asked the _headroom of one still owed its recompute's token: placed and seated as if it were, it waited for room it
    did not need. Now it is seated as a new request of its length."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, num_slots=2, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=4, max_inflight=1)  # _headroom: 2 blocks a sequence
    sched.submit("a", [1, 2, 3], params(20, ignore_eos=True))
    _run(sched, FakeMesh(2, 8, BS))
    tokens = list(range(50, 58))  # as above: seated now, unless it needs the headroom
    other = MeshScheduler(num_blocks=64, block_size=BS, num_slots=4, max_seq_len=64)
    seq = other.submit("moved", tokens[:5], params(6), output_ids=tokens[5:], num_tokens_preempted=5)  # 3 since
    extend_block_hashes(seq.block_hashes, tokens, BS)
    assert sched.placement_key(seq.block_hashes, len(tokens), seq.num_tokens_preempted)[0] == 1
    assert sched.seats(seq)
    sched.submit("moved", tokens[:5], params(6), output_ids=tokens[5:], migrated=True, num_tokens_preempted=5)
    sched.schedule()
    assert "moved" in sched.running


def test_seats_counts_no_hit_for_a_request_that_scores_its_prompt():
    """A request that asks for its prompt's logprobs is seated with no prefix-cache hit (it computes every position):
    seats() counted the blocks another running request holds for its prompt as a hit, and said yes to a request the
    next schedule left waiting (the router moved it there, to wait)."""
    prompt = list(range(20, 40))  # 5 blocks
    for scored, expected in ((None, (True, True)), (0, (False, False))):
        sched = MeshScheduler(num_blocks=8, block_size=BS, num_slots=4, max_seq_len=32, prefill_chunk=32,
                              max_prefill_tokens=32, decode_steps=1, max_inflight=1)
        mesh = FakeMesh(4, 8, BS)
        sched.submit("s", prompt, params(10, ignore_eos=True))  # owns its prompt's blocks, cached, and runs on
        for _ in range(3):
            _run(sched, mesh)
        assert sched.kv.groups[0].pool.num_available == 2
        # 14 tokens: 4 blocks, 3 of them s's (cached) for a request that takes a hit
        assert _moved_here(sched, prompt[:13] + [90], params(2, prompt_logprobs=scored)) == expected


def test_a_mesh_whose_queue_takes_the_blocks_does_not_rank_as_seating_a_request_now():
    """placement_key's first tier is for a mesh that seats the request now: not one whose own burst, not yet
    scheduled, takes the blocks, while another mesh has a free slot and the blocks."""
    a, _ = make(num_blocks=10, max_seq_len=40, prefill_chunk=40, max_prefill_tokens=40, decode_steps=1)
    b, b_mesh = make(num_blocks=10, max_seq_len=40, prefill_chunk=40, max_prefill_tokens=40, decode_steps=1)
    for i in range(3):
        b.submit(f"b{i}", [i + 1], params(8, ignore_eos=True))
    _run(b, b_mesh)
    a.submit("burst", list(range(30)), params(8, ignore_eos=True))  # 8 of a's 10 blocks
    prompt = list(range(50, 70))  # 5 blocks
    hashes = _hashes(prompt)
    assert a.placement_key(hashes, len(prompt))[0] == 0 and b.placement_key(hashes, len(prompt))[0] == 1
    assert b.placement_key(hashes, len(prompt)) > a.placement_key(hashes, len(prompt))


def test_meshes_that_tie_on_slots_and_prefix_rank_by_their_best_kv_groups_room():
    """placement_key's last tie-break is the room of the mesh's best KV group, not its first group's nor the groups'
    sum: two meshes of two groups, two answers running on each, seat a 3-token request now with the same (no) hit and
    slots left. On a they share group 0 (the second takes the first one's cached prefix) and leave group 1 empty; on b,
    shorter, one sits in each, with more blocks free in all. a ranks first: the request gets a group to itself there."""
    meshes = []
    for first, second in (([1] * 8 + [2] * 15, [1] * 8 + [3]), ([1] * 8 + [2], [5] * 8 + [3])):
        sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=32, prefill_chunk=32,
                              max_prefill_tokens=32, decode_steps=1, max_inflight=1)
        mesh, events = FakeMesh(4, 8, BS, 2), defaultdict(list)
        for rid, prompt in (("first", first), ("second", second)):
            sched.submit(rid, prompt, params(8, ignore_eos=True))
            step(sched, mesh, events)
        meshes.append(sched)
    a, b = meshes
    assert [[s.kv.group_of(q.slot).index for q in s.running.values()] for s in (a, b)] == [[0, 0], [0, 1]]
    assert sum(g.pool.num_free for g in a.kv.groups) < sum(g.pool.num_free for g in b.kv.groups)
    hashes = _hashes([7, 7, 7])
    assert a.placement_key(hashes, 3)[:3] == b.placement_key(hashes, 3)[:3] == (1, 0, 2)
    assert a.placement_key(hashes, 3) > b.placement_key(hashes, 3)


def test_executing_names_what_the_mesh_owes_first():
    """What a mesh failure is laid on (the router's max_mesh_failures): the request of the prefill chunk the mesh
    was computing, else every request of the decode round; one cancelled since is not named, but its slot still
    makes the round no one request's alone (the mesh computes it all the same)."""
    sched, mesh = make()
    sched.submit("a", [1, 2, 3, 4], params(ignore_eos=True))
    sched.submit("b", [5, 6, 7, 8], params(ignore_eos=True))
    assert sched.executing() == ([], False)
    work = sched.schedule()
    results = mesh.execute(work)
    assert [c.request_id for c in work.prefills] == ["a", "b"] and work.decode is not None
    assert sched.executing() == (["a"], True)
    sched.process(results[0])
    assert sched.executing() == (["b"], True)
    sched.process(results[1])
    names, alone = sched.executing()
    assert sorted(names) == ["a", "b"] and not alone
    sched.cancel("b")
    assert sched.executing() == (["a"], False)
    for result in results[2:]:
        sched.process(result)
    assert sched.executing() == ([], False)


def test_a_work_brings_at_most_two_grammars_the_mesh_has_not_used_lately():
    """A grammar the mesh has not used lately compiles on its worker thread when its final chunk runs (up to
    ~0.1 s each, every slot waiting): 31 distinct ones in one work stalled a mesh 1.3 s. Past
    MAX_NEW_GRAMMARS_PER_WORK a final chunk waits for a later work; a grammar it has (or this work brings) does not."""
    from scheduler.work import MAX_NEW_GRAMMARS_PER_WORK

    sched, mesh = make(num_slots=6, max_prefill_tokens=64)
    grammars = ["g0", "g1", "g2", "g0", "g3", None]
    for i, g in enumerate(grammars):
        sched.submit(f"r{i}", [1, 2, 3], params(grammar=g))
    events = defaultdict(list)
    finals = []
    while (work := step(sched, mesh, events)) is not None and len(finals) < 4:
        finals.append([c.request_id for c in work.prefills if c.is_final])
    assert MAX_NEW_GRAMMARS_PER_WORK == 2
    assert finals[0] == ["r0", "r1", "r3", "r5"]  # g0, g1 new; g0 again and no grammar are free
    assert finals[1] == ["r2", "r4"]
    drain(sched, mesh, events)
    assert all(output_of(events[f"r{i}"]) == expected([1, 2, 3], params())[0] for i in range(len(grammars)))


def test_a_grammar_the_meshs_cache_has_dropped_counts_as_new_again():
    """The mesh keeps the compiled matchers of the GRAMMARS_KEPT grammars it used last (GrammarCache). A router copy
    that kept one more still took the grammar the mesh had dropped for one it has: a work brought it beside
    MAX_NEW_GRAMMARS_PER_WORK new ones, one compile past the bound, every slot waiting."""
    from scheduler.work import GRAMMARS_KEPT

    sched, mesh = make(max_prefill_tokens=64)
    events = defaultdict(list)
    for i in range(GRAMMARS_KEPT + 1):  # g0 goes first: the GRAMMARS_KEPT after it push it out of the mesh's cache
        sched.submit(f"r{i}", [1, 2, 3], params(1, grammar=f"g{i}"))
    drain(sched, mesh, events)
    assert not sched.requests
    for rid, g in (("old", "g0"), ("new0", "h0"), ("new1", "h1")):
        sched.submit(rid, [1, 2, 3], params(1, grammar=g))
    work = step(sched, mesh, events)
    assert [c.request_id for c in work.prefills if c.is_final] == ["old", "new0"]


def test_a_head_that_fits_no_kv_group_reserves_one_and_the_queue_goes_on_in_the_others():
    """A prompt that needs nearly a whole KV group, behind one user per group: FCFS left the queue behind it
    waiting while three groups had room (each drains fully before it is seated). It reserves one group, which
    admits nobody else; the shorts behind it go into the other three, and it is seated as its group drains."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=4, num_slots=8, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=1, max_inflight=1)
    mesh, events = FakeMesh(8, 8, BS, 4), defaultdict(list)
    for i, max_tokens in enumerate((3, 10, 10, 10)):  # one per group; group 0's ends first
        sched.submit(f"run{i}", [i + 1] * 5, params(max_tokens, ignore_eos=True))
    step(sched, mesh, events)
    assert [sched.kv.group_of(sched.running[f"run{i}"].slot).index for i in range(4)] == [0, 1, 2, 3]
    sched.submit("long", list(range(100, 126)), params(2, ignore_eos=True))  # 7 of a group's 8 blocks
    for i in range(3):
        sched.submit(f"short{i}", [7, 8, 9], params(4, ignore_eos=True))
    step(sched, mesh, events)
    assert all(f"short{i}" in sched.running for i in range(3)), "the queue waited behind the long prompt"
    assert sorted(sched.kv.group_of(sched.running[f"short{i}"].slot).index for i in range(3)) == [1, 2, 3]
    assert sched.reserved is sched.requests["long"] and sched.reserved_group == 0
    assert sched.queued() == [sched.requests["long"]] and sched.num_queued == 0
    sched.submit("late", [7, 8, 9], params(4, ignore_eos=True))  # the free slot is group 0's: it waits
    while "run0" in sched.requests:
        assert "long" not in sched.running and "late" not in sched.running
        step(sched, mesh, events)
    work = step(sched, mesh, events)  # the first schedule after its group drained seats it
    (chunk,) = [c for c in work.prefills if c.request_id == "long"]
    assert sched.kv.group_of(chunk.slot).index == 0 and sched.reserved is None
    assert all(f"run{i}" in sched.running for i in (1, 2, 3))  # seated when its own group drained, not all four
    drain(sched, mesh, events)
    assert output_of(events["long"]) == expected(list(range(100, 126)), params(2, ignore_eos=True))[0]
    assert not sched.requests and all(g.pool.num_used == 0 for g in sched.kv.groups)


def _two_groups_of_8_blocks_with_a_seated():
    """Two KV groups of 8 4-token blocks and 2 slots each, one work out at a time; a (a 9-token prompt, 20 tokens
    to make) seated and live in group 0. Returns (sched, mesh, events, params, a)."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=32, prefill_chunk=8,
                          max_prefill_tokens=8, decode_steps=4, max_inflight=1)
    mesh, events, p = FakeMesh(4, 8, BS, 2), defaultdict(list), params(20, ignore_eos=True)
    a = sched.submit("a", [1] * 8 + [2], p)
    while not a.live:
        step(sched, mesh, events)
    return sched, mesh, events, p, a


def test_a_kv_group_out_of_blocks_stops_admission_to_itself_only():
    """a and b share a prefix, so both sit in group 0; their next round needs more blocks than it has, so b (the
    newest) is preempted. A dry pool stopped admission to every group: n, come just then, waited with group 1 empty
    (and so did b), as long as group 0 stayed dry: a round, or a whole recompute beside one re-seated there. Now
    only group 0 admits nobody: n and b are seated in group 1 in that same schedule."""
    sched, mesh, events, p, a = _two_groups_of_8_blocks_with_a_seated()
    b = sched.submit("b", [1] * 8 + [3], p)  # a's cached prefix draws it to group 0
    step(sched, mesh, events)
    assert sched.kv.group_of(a.slot).index == sched.kv.group_of(b.slot).index == 0
    lookahead = sum(blocks_for(min(s.num_planned + sched.decode_steps, s.max_tokens_total) - 1, BS) - len(s.block_table)
                    for s in (a, b))
    assert lookahead > sched.kv.groups[0].pool.num_available  # the next schedule preempts b
    n = sched.submit("n", [5, 6, 7], p)
    step(sched, mesh, events)
    assert sched.num_preemptions == 1 and sched.kv.group_of(a.slot).index == 0
    assert n.status is b.status is Status.RUNNING, "admission waited for group 0's blocks"
    assert sched.kv.group_of(n.slot).index == sched.kv.group_of(b.slot).index == 1
    drain(sched, mesh, events)
    for rid, prompt in (("a", [1] * 8 + [2]), ("b", [1] * 8 + [3]), ("n", [5, 6, 7])):
        assert output_of(events[rid]) == expected(prompt, p)[0]
    assert not sched.requests and all(g.pool.num_used == 0 for g in sched.kv.groups)


def test_a_dry_kv_group_admits_nobody_even_a_prompt_its_cache_draws():
    """The other half of the test above, which held with group 0 admitting too (n had no prefix there, and b's
    headroom kept it out): n shares a's cached prefix, which draws it to group 0, but that group just preempted b for
    its lookahead. Seated there, n would take the room that preemption just made (MeshScheduler._admit); it goes to
    group 1."""
    sched, mesh, events, p, a = _two_groups_of_8_blocks_with_a_seated()
    b = sched.submit("b", [1] * 8 + [3], p)
    step(sched, mesh, events)
    assert sched.kv.group_of(a.slot).index == sched.kv.group_of(b.slot).index == 0
    n = sched.submit("n", [1] * 8 + [4], p)
    assert sched.cached_prefix_tokens(sched._hashes(n), len(n.token_ids)) == 8  # a's blocks: group 1 is empty
    step(sched, mesh, events)
    assert sched.num_preemptions == 1 and n.status is Status.RUNNING
    assert sched.kv.group_of(n.slot).index == 1, "seated in the group whose pool its lookahead ran dry"
    drain(sched, mesh, events)
    assert output_of(events["n"]) == expected([1] * 8 + [4], p)[0]


def test_seats_says_no_while_the_lookahead_preempts_the_victim_goes_first():
    """As above, b is about to be preempted in group 0, and group 1 has a free slot. seats() (the router's word to
    move a request here) judged group 1 as the next schedule leaves it, but that schedule puts b at the queue's head,
    ahead of the moved request: seats() said yes to a request left waiting. It now says no while the lookahead
    preempts (a sequence that only sits the round out leaves the queue as it is)."""
    sched, mesh, events, p, a = _two_groups_of_8_blocks_with_a_seated()
    d = sched.submit("d", [4, 4, 4], p)
    b = sched.submit("b", [1] * 8 + [3], p)
    step(sched, mesh, events)
    assert [sched.kv.group_of(s.slot).index for s in (a, b, d)] == [0, 0, 1]
    lookahead = sum(blocks_for(min(s.num_planned + sched.decode_steps, s.max_tokens_total) - 1, BS) - len(s.block_table)
                    for s in (a, b))
    assert lookahead > sched.kv.groups[0].pool.num_available  # the next schedule preempts b
    said, runs = _moved_here(sched, [5, 6, 7], p)
    assert sched.num_preemptions == 1 and said == runs


def _a_group_waiting_for_a_reseated_ones_token(l_tokens: int, l_max_tokens: int = 1):
    """Two KV groups of 21 4-token blocks and 3 slots each, one work out at a time, 4 prompt tokens a work. a decodes 8
    tokens a round in group 0; p, preempted on another mesh, is re-seated beside it with its _headroom; l (an l_tokens
    prompt) takes group 1 and, older, takes every work's prefill budget, so p's recompute waits while a grows past that
    headroom. Returns (sched, a) at the round whose lookahead a sits out: p is newer and protected (_victim: None), so
    group 0 runs dry with a slot and a block free, and nobody is preempted."""
    sched = MeshScheduler(num_blocks=21, block_size=BS, kv_groups=2, num_slots=6, max_seq_len=84, prefill_chunk=4,
                          max_prefill_tokens=4, decode_steps=8, max_inflight=1)
    mesh, events = FakeMesh(6, 21, BS, 2), defaultdict(list)
    a = sched.submit("a", [1, 2, 3, 4, 5, 6], params(77, ignore_eos=True))
    step(sched, mesh, events)
    sched.submit("l", list(range(100, 100 + l_tokens)), params(l_max_tokens, ignore_eos=True))
    p = sched.submit("p", list(range(50, 58)), params(4, ignore_eos=True), num_tokens_preempted=8)
    for _ in range(8):
        step(sched, mesh, events)
    group = sched.kv.groups[0]
    assert [sched.kv.group_of(s.slot).index for s in (a, p)] == [0, 0] and not p.started
    assert len(group.free_slots) == group.pool.num_available == 1
    assert blocks_for(a.num_planned + sched.decode_steps - 1, BS) - len(a.block_table) == 2
    return sched, a


def test_seats_keeps_a_request_out_of_a_kv_group_whose_lookahead_sits_out():
    """Group 0 sits a out (its pool is dry, nobody to preempt): the next schedule admits nobody there, though its free
    slot and block would hold a 3-token request, and group 1 (l's) has no block left. seats() must say no, as must
    placement_key: judging group 0 by its room alone, they would send the router's request to wait here."""
    sched, a = _a_group_waiting_for_a_reseated_ones_token(83)
    planned = a.num_planned
    assert sched.placement_key(_hashes([7, 7, 7]), 3)[0] == 0
    assert _moved_here(sched, [7, 7, 7], params(2, ignore_eos=True)) == (False, False)
    assert sched.num_preemptions == 0 and a.num_planned == planned  # a sat the round out


def test_seats_counts_the_other_kv_groups_while_one_sits_a_round_out():
    """As above, with a block left in group 1: a sitting out preempts nobody, so the queue stays as it is and the next
    schedule seats a 3-token request in group 1. seats() and placement_key must say so (taken for a preemption, whose
    victim would go first, it said no to a mesh that seats it now)."""
    sched, a = _a_group_waiting_for_a_reseated_ones_token(79)
    planned = a.num_planned
    assert sched.placement_key(_hashes([7, 7, 7]), 3)[0] == 1
    assert _moved_here(sched, [7, 7, 7], params(2, ignore_eos=True)) == (True, True)
    assert a.num_planned == planned
    assert sched.num_preemptions == 0 and sched.kv.group_of(sched.running["moved"].slot).index == 1


def test_seats_says_no_behind_a_request_that_fits_no_group_while_one_sits_out():
    """As above, l with 40 tokens to make and 11 blocks left in group 1, and a 48-token request queued here: it fits
    neither group 1 nor dry group 0, and a dry group reserves nothing (it may fit that group next round), so the next
    schedule stops the queue at it. A forecast that reserved group 0 for it and went on said a 3-token request moved
    here would be seated in group 1: it waited behind the queue's head."""
    sched, _ = _a_group_waiting_for_a_reseated_ones_token(40, 40)
    big = sched.submit("big", list(range(200, 248)), params(2, ignore_eos=True))
    assert sched.num_queued < 0 and sched.placement_key(_hashes([7, 7, 7]), 3)[0] == 0
    assert _moved_here(sched, [7, 7, 7], params(2, ignore_eos=True)) == (False, False)
    assert big.status is Status.WAITING and sched.reserved is None and sched.head_blocked


def test_seats_says_no_behind_a_second_request_that_fits_no_group_but_the_reserved_one():
    """h fits no group and holds group 1 (reserved); then big, queued here, fits only group 1 too: the next schedule
    stops the queue at it (one reservation at a time), so a 3-token request moved here waits, though group 0 has a
    slot and the block for it. A forecast that reserved a group for big as well went on and said it seats."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=6, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=1, max_inflight=1)
    mesh, events = FakeMesh(6, 8, BS, 2), defaultdict(list)
    sched.submit("r0", list(range(20, 40)), params(8, ignore_eos=True))  # group 0: 6 of its 8 blocks
    sched.submit("r1", list(range(40, 52)), params(8, ignore_eos=True))  # group 1: 4
    step(sched, mesh, events)
    h = sched.submit("h", list(range(60, 88)), params(2, ignore_eos=True))  # 7 blocks
    step(sched, mesh, events)
    assert sched.reserved is h and sched.reserved_group == 1
    big = sched.submit("big", list(range(100, 120)), params(2, ignore_eos=True))  # 5 blocks
    assert sched.num_queued < 0 and sched.placement_key(_hashes([7, 7, 7]), 3)[0] == 0
    assert _moved_here(sched, [7, 7, 7], params(2, ignore_eos=True)) == (False, False)
    assert big.status is Status.WAITING and sched.head_blocked


def test_with_one_kv_group_a_head_that_fits_no_block_pool_holds_the_queue():
    """The torch backend's single pool: no group to reserve, plain FCFS (nobody overtakes the head)."""
    sched, mesh = make(num_blocks=8, max_seq_len=32, prefill_chunk=32, max_prefill_tokens=32, decode_steps=1)
    sched.submit("run", [1] * 5, params(10, ignore_eos=True))
    step(sched, mesh, defaultdict(list))
    sched.submit("long", list(range(100, 126)), params(2, ignore_eos=True))
    sched.submit("short", [7, 8, 9], params(4, ignore_eos=True))
    step(sched, mesh, defaultdict(list))
    assert list(sched.running) == ["run"] and sched.num_queued == 2 and not sched.seats(sched.waiting[1])


def test_a_long_prompt_reserves_the_kv_group_whose_running_answers_end_soonest():
    """Group 0 lacks fewer blocks for it now, but its answer has 20 tokens to go; group 1's ends in 3: reserved,
    group 0 would hold the long prompt until its answer ended (and keep its free slot from the queue)."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=1, max_inflight=1)
    mesh, events = FakeMesh(4, 8, BS, 2), defaultdict(list)
    sched.submit("slow", [1] * 5, params(20, ignore_eos=True))  # group 0: 2 blocks now, 7 at its end
    sched.submit("quick", [2] * 9, params(3, ignore_eos=True))  # group 1: 3 blocks
    step(sched, mesh, events)
    sched.submit("long", list(range(100, 125)), params(2, ignore_eos=True))  # 7 blocks
    step(sched, mesh, events)
    assert "long" in sched.requests and sched.reserved_group == 1
    while "quick" in sched.requests:
        step(sched, mesh, events)
    work = step(sched, mesh, events)
    (chunk,) = [c for c in work.prefills if c.request_id == "long"]
    assert sched.kv.group_of(chunk.slot).index == 1 and "slow" in sched.running


def test_a_kv_group_whose_shortest_answer_frees_exactly_the_blocks_needed_is_reserved_by_that_answer():
    """Group 0's room once a (1 token left) ends is exactly the 5 blocks the long prompt needs; group 1's comes when
    c (3 left) ends. The group seats it once a has ended: reserved. Counting a's end as not enough (room > need)
    waited for b's (5 left) there too, and so reserved group 1, seating it later."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=1, max_inflight=1)
    mesh, events = FakeMesh(4, 8, BS, 2), defaultdict(list)
    sched.submit("a", [1] * 5, params(3, ignore_eos=True))  # group 0: 2 blocks at its full length
    sched.submit("c", [3] * 13, params(5, ignore_eos=True))  # group 1: 5
    sched.submit("b", [2] * 5, params(7, ignore_eos=True))  # group 0: 3
    step(sched, mesh, events)
    assert [sched.kv.group_of(sched.running[r].slot).index for r in "acb"] == [0, 1, 0]
    long = sched.submit("long", list(range(100, 120)), params(2, ignore_eos=True))  # 5 blocks: fits neither now
    step(sched, mesh, events)
    assert sched.reserved is long and sched.reserved_group == 0
    work = step(sched, mesh, events)  # a has ended: group 0 holds b's 3 blocks and the long prompt's 5
    (chunk,) = [c for c in work.prefills if c.request_id == "long"]
    assert sched.kv.group_of(chunk.slot).index == 0 and {"b", "c"} <= set(sched.running)


def test_a_reserved_kv_groups_free_slots_take_no_burst_past_max_waiting_requests():
    """max_waiting_requests counts the requests that wait for a slot, a burst the free slots seat aside; a reserved
    group's free slots seat nobody but its holder, yet they counted as free: a request came in past the limit."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=1, max_inflight=1, max_waiting_requests=1)
    mesh = FakeMesh(4, 8, BS, 2)
    for i in range(3):  # three of the four slots, 2 blocks each
        sched.submit(f"run{i}", [i + 1] * 5, params(10, ignore_eos=True))
    step(sched, mesh, defaultdict(list))
    sched.submit("long", list(range(100, 126)), params(2, ignore_eos=True))  # 7 blocks: fits neither group
    step(sched, mesh, defaultdict(list))
    assert sched.reserved is sched.requests["long"] and len(sched.kv.groups[sched.reserved_group].free_slots) == 1
    with pytest.raises(QueueFull, match="1 requests are waiting"):  # only the reserved group has a free slot
        sched.submit("late", [7, 8, 9], params(4))


def test_free_slots_behind_a_head_waiting_for_kv_blocks_take_no_burst_past_max_waiting_requests():
    """With the queue's head waiting for KV blocks, the free slots seat nobody (num_queued counts the whole queue),
    yet max_waiting_requests subtracted them as a burst they would seat: requests came in past the limit, up to
    one per free slot (a Galaxy column's long contexts hold its blocks with 7 of its 8 slots free)."""
    sched, mesh = make(num_blocks=4, max_waiting_requests=1)
    for i in range(3):  # 6 tokens each: two 4-token blocks; four blocks seat two of them
        sched.submit(f"r{i}", [i + 1] * 6, params(20, ignore_eos=True))
    step(sched, mesh, defaultdict(list))
    assert (len(sched.running), sched.kv.num_free_slots, sched.num_queued) == (2, 2, 1)
    with pytest.raises(QueueFull, match="1 requests are waiting"):  # r2 waits for blocks: the queue is full
        sched.submit("late", [7, 8, 9], params(4))
    sched.cancel("r0")  # its blocks free: what waits may be seated now, and the free slots take a burst again
    sched.submit("late", [7, 8, 9], params(4))


def test_the_head_of_a_long_queue_costs_what_it_returns_not_the_queue():
    """The router asks each mesh for the first few of its queue (queued(MOVE_SCAN)) on every round while one mesh
    has room and another a queue; they were taken from a list of the whole queue, O(queue) per round per mesh.
    Counted: the sequences queued(8) reads of 10,000 waiting."""
    Waiting = counting(deque)
    sched, _ = make(num_blocks=8, max_waiting_requests=None)
    sched.waiting = Waiting()
    for i in range(10_000):
        sched.submit(f"r{i}", [1, 2, 3], params())
    assert sched.num_queued == 10_000 - 4  # beyond the 4 free slots
    Waiting.reads = 0
    assert [s.request_id for s in sched.queued(8)] == [f"r{i}" for i in range(4, 12)]
    assert Waiting.reads <= 4 + 8 + 1  # the free slots' seats, then what it returns


def _prefilled(mesh, rid):
    """Prompt tokens the mesh computed for request rid, over every work it ran."""
    return sum(c.end - c.start for w in mesh.works for c in w.prefills if c.request_id == rid)


def test_prompts_sent_together_compute_a_long_shared_prefix_once():
    """A shared system prompt sent by two users at once: both were seated before either had computed a block,
    so neither found the other's, and the mesh computed the prefix twice. The second now waits for the first's
    chunks and takes them from the prefix cache; both answers are unchanged and usage counts the hit."""
    shared = [(i * 7) % 13 + 1 for i in range(1200)]
    sched, mesh = make(num_blocks=700, max_seq_len=1400, prefill_chunk=256, max_prefill_tokens=512,
                       shared_prefill_tokens=1024)
    p = params(max_tokens=4, ignore_eos=True)
    prompts = {"a": shared + [3, 4, 5], "b": shared + [6, 7]}
    for rid, prompt in prompts.items():
        sched.submit(rid, prompt, p)
    events = drain(sched, mesh)
    for rid, prompt in prompts.items():
        assert output_of(events[rid]) == expected(prompt, p)[0]
    assert _prefilled(mesh, "a") == 1203
    hit = 1200  # (1202 - 1) // BS * BS: the hit leaves the last token to compute
    assert _prefilled(mesh, "b") == 1202 - hit
    assert events["b"][0].num_cached_tokens == hit and events["a"][0].num_cached_tokens == 0
    assert (sched.prefix_query_tokens, sched.prefix_hit_tokens) == (1203 + 1202, hit)
    assert sched.kv.groups[0].pool.num_used == 0


def test_a_short_shared_prefix_is_not_waited_for():
    """Below shared_prefill_tokens the wait (a decode round may run meanwhile) costs more than it saves: both
    prompts prefill in the first work."""
    sched, mesh = make(max_seq_len=64, prefill_chunk=32, max_prefill_tokens=64, shared_prefill_tokens=1024)
    p = params(max_tokens=2, ignore_eos=True)
    sched.submit("a", list(range(1, 25)), p)
    sched.submit("b", list(range(1, 25)) + [9], p)
    work = sched.schedule()
    assert [c.request_id for c in work.prefills] == ["a", "b"]


def test_a_seated_prompt_takes_the_blocks_an_earlier_one_computed_meanwhile():
    """Seated while the first prompt still computed the prefix they share, the second starts its prefill later
    (the budget): it takes the blocks the first has computed since, whatever their length."""
    sched, mesh = make(prefill_chunk=8, max_prefill_tokens=8, shared_prefill_tokens=1024)
    p = params(max_tokens=2, ignore_eos=True)
    prompts = {"a": list(range(1, 17)), "b": list(range(1, 17)) + [9, 10]}
    for rid, prompt in prompts.items():
        sched.submit(rid, prompt, p)
    events = drain(sched, mesh)
    for rid, prompt in prompts.items():
        assert output_of(events[rid]) == expected(prompt, p)[0]
    assert _prefilled(mesh, "b") == 2 and events["b"][0].num_cached_tokens == 16
    assert sched.prefix_hit_tokens == 16 and sched.kv.groups[0].pool.num_used == 0


def test_a_moved_prompt_reports_its_late_hit_as_its_seat_hit():
    """A prompt moved here before its first token (counted on the mesh it left) reports its first seat's hit here in
    usage: a late hit is such a hit too. It reported 0 where the same blocks cached one schedule earlier gave 16."""
    sched, mesh = make(prefill_chunk=8, max_prefill_tokens=8, shared_prefill_tokens=1024)
    p = params(max_tokens=2, ignore_eos=True)
    sched.submit("a", list(range(1, 17)), p)
    sched.submit("b", list(range(1, 17)) + [9, 10], p, migrated=True, counted=True)
    events = drain(sched, mesh)
    assert _prefilled(mesh, "b") == 2 and events["b"][0].num_cached_tokens == 16
    assert sched.prefix_hit_tokens == 0  # the mesh it left counted its query


def test_the_placement_forecast_follows_a_block_that_decode_fills_for_a_queued_prompt():
    """A decode round's plain tokens keep the placement forecast (rebuilt at each, placement's cost grew with the
    fleet's steps), except a token that fills a block while a request waits: that block may be the waiting prompt's
    prefix hit, so the forecast must see it."""
    sched, mesh = make(num_slots=2, decode_steps=8)
    p = params(10, ignore_eos=True)
    prompt = [1, 2, 3, 4, 5, 6]
    sched.submit("a", prompt, p)
    work = sched.schedule()  # a's prefill and its first decode round
    out, _ = expected(prompt, p)
    sched.submit("b", prompt + out[:4], params(4, ignore_eos=True))  # waits: a's block 1 (tokens 4-7) is its hit
    available = []
    for result in mesh.execute(work):
        sched._room_after_queue()  # kept, as placement keeps it
        sched.process(result)
        kept = sched._room_after_queue()
        sched._forecast_valid = False  # computed afresh
        assert sched._room_after_queue() == kept
        available.append(kept.room[0][2])
    # a's second decode token fills block 1: b's hit is 2 blocks from then on, so b would take one block fewer
    assert available[0] == available[1] == available[2] - 1 == available[-1] - 1, available


def test_an_isolated_sequence_decodes_one_step_alone_then_with_the_others():
    """A request the router could not lay a mesh failure on alone (isolated) decodes its next step in a round of its
    own; while that step is out, the others' rounds go on without it (not another lone step, which stalls them), and
    once its result is in it decodes with them again (not one step a round for good)."""
    sched, mesh = make(max_inflight=2)
    events = defaultdict(list)
    a = sched.submit("a", [1, 2, 3], params(10, ignore_eos=True), isolated=True)
    b = sched.submit("b", [4, 5, 6], params(10, ignore_eos=True))
    first = sched.schedule()  # both final chunks; the round is a's step alone
    assert first.decode.slots == [a.slot] and first.decode.num_steps == 1
    second = sched.schedule()  # a's step is out: b decodes without it
    assert second.decode.slots == [b.slot] and second.decode.num_steps == sched.decode_steps
    run(sched, mesh, first, events)
    run(sched, mesh, second, events)
    third = sched.schedule()
    assert not a.isolated and third.decode.slots == sorted([a.slot, b.slot])
    assert third.decode.num_steps == sched.decode_steps
    run(sched, mesh, third, events)
    drain(sched, mesh, events)
    assert output_of(events["a"]) == expected([1, 2, 3], params(10, ignore_eos=True))[0]

def test_a_prompt_that_fits_the_prefill_budget_left_is_one_final_chunk():
    """A prompt whose tokens equal what is left of the work's prefill budget goes out whole (its first token in this
    work): only a prompt longer than the room is cut, at prefix_align. a's 3 tokens leave 5 of the 8; b has 5."""
    sched, mesh = make()
    sched.submit("a", [1, 2, 3], params())
    sched.submit("b", [4, 5, 6, 7, 8], params())
    work = sched.schedule()
    assert [(c.request_id, c.start, c.end, c.params is not None) for c in work.prefills] == \
        [("a", 0, 3, True), ("b", 0, 5, True)]


def test_a_seat_takes_its_groups_lowest_free_slot():
    """KVCache.seat takes the lowest free slot of the group (its free slots are a heap), in admission order, and then
    the lowest of those freed between higher ones."""
    sched, mesh = make(num_slots=4)
    for rid in "abc":
        sched.submit(rid, [1, 2, 3], params())
    sched.schedule()
    assert [sched.running[rid].slot for rid in "abc"] == [0, 1, 2]
    sched.cancel("c")
    sched.cancel("a")
    sched.submit("d", [1, 2, 3], params())
    sched.schedule()
    assert sched.running["d"].slot == 0


def test_drain_hands_requests_back_oldest_arrival_first():
    """The router re-places a failed mesh's requests in the order drain() returns them: by arrival, not by when they
    reached this mesh (b, moved here after a, came first)."""
    sched, mesh = make()
    sched.submit("a", [1, 2], params(), arrival_time=2.0)
    sched.submit("b", [3, 4], params(), arrival_time=1.0, migrated=True)
    sched.submit("c", [5, 6], params(), arrival_time=3.0)
    sched.schedule()
    assert [seq.request_id for seq in sched.drain()] == ["b", "a", "c"]


def _seat_after_a_prefix(watermark_blocks):
    """b shares a's cached 2-block prefix (a still running, so those blocks cost b nothing) and needs 1 new block;
    a's group has 5 blocks available when b is admitted."""
    sched, mesh = make(num_blocks=8, watermark_blocks=watermark_blocks)
    prompt = list(range(1, 10))
    sched.submit("a", prompt, params(max_tokens=40, ignore_eos=True))
    step(sched, mesh, defaultdict(list))
    b = sched.submit("b", prompt[:8] + [99], params())
    sched.schedule()
    return sched, b


def test_the_watermark_holds_back_a_prompt_with_a_prefix_hit_too():
    """Admission leaves watermark_blocks for the running sequences to grow into, whatever part of the prompt the
    prefix cache holds: b's 1 new block plus a watermark of 4 fits the 5 available, plus one of 5 does not."""
    sched, b = _seat_after_a_prefix(watermark_blocks=4)
    assert b.status is Status.RUNNING and b.num_computed == 8
    assert sched.kv.groups[0].pool.num_available == 4
    sched, b = _seat_after_a_prefix(watermark_blocks=5)
    assert b.status is Status.WAITING and sched.kv.groups[0].pool.num_available == 5


def test_cancelling_the_reserved_groups_holder_opens_the_group_to_the_queue():
    """The long prompt reserves group 0 (as in the test above) and is then cancelled while it waits (its client
    left, or the router moved it): the group must admit the queue again, so late, waiting for group 0's free slot,
    is seated at the next schedule, not held behind a request that is gone, and is no queue meanwhile."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=4, num_slots=8, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=1, max_inflight=1)
    mesh, events = FakeMesh(8, 8, BS, 4), defaultdict(list)
    for i in range(4):
        sched.submit(f"run{i}", [i + 1] * 5, params(10, ignore_eos=True))
    step(sched, mesh, events)
    sched.submit("long", list(range(100, 126)), params(2, ignore_eos=True))
    for i in range(3):
        sched.submit(f"short{i}", [7, 8, 9], params(4, ignore_eos=True))
    step(sched, mesh, events)
    assert sched.reserved is sched.requests["long"] and sched.reserved_group == 0
    sched.submit("late", [7, 8, 9], params(4, ignore_eos=True))
    step(sched, mesh, events)
    assert "late" not in sched.running  # group 0's free slot is the holder's
    assert sched.cancel("long").finish_reason == "abort"
    assert sched.num_queued == 0  # late takes group 0's free slot (placement and the queue limit read this)
    step(sched, mesh, events)
    assert sched.reserved is None and sched.kv.group_of(sched.running["late"].slot).index == 0


def test_cancelling_the_request_that_blocks_the_queue_behind_the_holder_unblocks_it():
    """Behind the holder of the reserved group 0, a second long prompt fits no other group and stops the queue
    (head_blocked). Cancelled while it waits, the queue must be free again at once: group 1's free slot is room
    that placement and the queue limit read before the next schedule (a stale block said "no room" there)."""
    sched = MeshScheduler(num_blocks=8, block_size=BS, kv_groups=2, num_slots=4, max_seq_len=32, prefill_chunk=32,
                          max_prefill_tokens=32, decode_steps=1, max_inflight=1)
    mesh, events = FakeMesh(4, 8, BS, 2), defaultdict(list)
    for i in range(2):
        sched.submit(f"run{i}", [i + 1] * 5, params(10, ignore_eos=True))
    step(sched, mesh, events)
    sched.submit("long", list(range(100, 126)), params(2, ignore_eos=True))  # 7 of a group's 8 blocks
    sched.submit("long2", list(range(200, 226)), params(2, ignore_eos=True))
    step(sched, mesh, events)
    assert sched.reserved is sched.requests["long"] and sched.head_blocked and sched.num_queued == 1
    sched.cancel("long2")
    assert sched.num_queued == -1  # group 1's free slot takes the next request
    short = MeshScheduler(num_blocks=8, block_size=BS, num_slots=1, max_seq_len=32).submit("s", [7, 8, 9], params(2))
    assert sched.seats(short)


def test_a_kv_group_out_of_blocks_preempts_only_its_own_sequences():
    """A group's pool running dry preempts the newest sequence of that group: another group's, newer, gives back
    blocks of a pool the asking one cannot use. Here c, seated in group 1 after b, must keep running while group 0's
    lookahead preempts b (the victim from any group preempted c, then b: a recompute for nothing)."""
    sched, mesh, events, p, a = _two_groups_of_8_blocks_with_a_seated()
    b = sched.submit("b", [1] * 8 + [3], p)  # a's cached prefix draws it to group 0
    c = sched.submit("c", [5, 6, 7], p)  # the emptiest group: 1
    step(sched, mesh, events)
    assert [sched.kv.group_of(s.slot).index for s in (a, b, c)] == [0, 0, 1]
    step(sched, mesh, events)  # a and b's next round needs more blocks than group 0 has
    assert sched.num_preemptions == 1 and b.status is Status.PREEMPTED
    assert c.status is Status.RUNNING and c.epoch == 1
    drain(sched, mesh, events)
    for rid, prompt in (("a", [1] * 8 + [2]), ("b", [1] * 8 + [3]), ("c", [5, 6, 7])):
        assert output_of(events[rid]) == expected(prompt, p)[0]
    assert not sched.requests and all(g.pool.num_used == 0 for g in sched.kv.groups)


def test_a_salted_answers_blocks_serve_only_its_salt():
    """The blocks a salted request computed are cached under its salt's chain: a later prompt of the same tokens
    with another salt, or none, computes its own, and one with the same salt hits them. The first asks for its
    prompt's logprobs, so its seat hashes nothing: its blocks are first hashed as they are cached."""
    sched, mesh = make()
    prompt, p = list(range(1, 14)), params(max_tokens=4, ignore_eos=True)
    sched.submit("a", prompt, params(max_tokens=4, ignore_eos=True, prompt_logprobs=0), salt="t1")
    events = drain(sched, mesh)
    for rid, salt in (("none", None), ("t2", "t2"), ("t1", "t1")):
        sched.submit(rid, prompt, p, salt=salt)
        drain(sched, mesh, events)
        assert output_of(events[rid]) == expected(prompt, p)[0]
    assert [events[rid][0].num_cached_tokens for rid in ("none", "t2", "t1")] == [0, 0, 12]


def test_a_final_chunk_the_mesh_refused_to_run_leaves_no_prefix():
    """A mesh retires a slot whose grammar it cannot set up before computing its final chunk (grammar_error, no
    token): that chunk's blocks hold no KV, so they must not be offered to the prefix cache, or the next prompt
    of the same tokens would read memory nobody wrote. Here the whole prompt is one final chunk."""
    sched, mesh = make()
    prompt = list(range(1, 9))  # two full blocks, one chunk
    sched.submit("refused", prompt, params(grammar=REFUSED_GRAMMAR))
    events = drain(sched, mesh)
    assert events["refused"][-1].finish_reason == "grammar_error"
    assert sched.kv.groups[0].pool.num_cached == 0
    sched.submit("next", prompt + [9], params(max_tokens=3, ignore_eos=True))
    drain(sched, mesh, events)
    assert events["next"][0].num_cached_tokens == 0
    assert output_of(events["next"]) == expected(prompt + [9], params(max_tokens=3, ignore_eos=True))[0]


def test_a_late_hit_waits_for_the_prompts_own_chunk_in_flight():
    """A seated prompt takes another's newly cached blocks in place of its own only while none of its chunks is out:
    a chunk in flight writes into the blocks a late hit would free, and the hit would count as cached the tokens that
    chunk has the mesh compute. b's first chunks are out when a's first two are cached: b computes on, and every prompt
    token is either computed or reported cached, once."""
    sched, mesh = make(prefill_chunk=8, max_prefill_tokens=16, max_inflight=2, shared_prefill_tokens=1024)
    p = params(max_tokens=2, ignore_eos=True)
    prompts = {"a": list(range(1, 18)), "b": list(range(1, 18)) + [9]}
    for rid, prompt in prompts.items():
        sched.submit(rid, prompt, p)
    events, pending = defaultdict(list), deque()
    first, second = sched.schedule(), sched.schedule()  # a's 16 tokens, then a's last and b's first 12
    assert [(c.request_id, c.end) for c in second.prefills] == [("a", 17), ("b", 8), ("b", 12)]
    pending.extend(mesh.execute(first) + mesh.execute(second))
    for _ in range(first.num_messages):  # a's blocks 0-3 are cached, b's chunks still out
        sched.process(pending.popleft())
    third = sched.schedule()
    assert sched.requests["b"].num_computed == 0  # no late hit while b's chunks are out
    pending.extend(mesh.execute(third) if third is not None else [])
    while pending:
        for event in sched.process(pending.popleft()):
            events[event.request_id].append(event)
    drain(sched, mesh, events)
    for rid, prompt in prompts.items():
        assert output_of(events[rid]) == expected(prompt, p)[0]
        assert _prefilled(mesh, rid) + events[rid][0].num_cached_tokens == len(prompt)


def _pools_whole(sched) -> None:
    """Every block of every KV group is back exactly once: no owner left, none negative, each on one list."""
    for group in sched.kv.groups:
        pool = group.pool
        assert pool.ref_counts == [0] * pool.num_blocks
        assert sorted([*pool._free, *pool.eviction_order()]) == list(range(pool.num_blocks))
    assert sched.kv.num_free_slots == sched.num_slots


def test_drain_frees_the_blocks_and_slots_of_running_and_waiting_requests_alike():
    """A failed mesh's requests move elsewhere and its pools must be whole for when it comes back: a drain that
    aborted only the waiting ones would leave the running ones' blocks owned forever (that mesh short of KV)."""
    sched = MeshScheduler(num_blocks=16, block_size=BS, kv_groups=2, num_slots=2, max_seq_len=64, prefill_chunk=8,
                          max_prefill_tokens=8, decode_steps=3, eos_token_ids=(EOS,))
    mesh, events = FakeMesh(2, 16, BS, kv_groups=2), defaultdict(list)
    for rid in "abc":
        sched.submit(rid, [ord(rid) % 13 + 1] * 9, params(max_tokens=30, ignore_eos=True))
    while len(sched.running) < 2 or any(s.num_computed < 9 for s in sched.running.values()):
        step(sched, mesh, events)
    assert sched.waiting  # c waits for a slot
    assert sorted(seq.request_id for seq in sched.drain()) == ["a", "b", "c"]
    _pools_whole(sched)


def test_a_finished_or_cancelled_request_gives_each_block_back_once():
    """A block freed twice drops its owner count below the truth: a block another request still holds (a shared
    prefix) would go back to the free list and be overwritten under it."""
    sched, mesh = make(num_blocks=16)
    prompt = list(range(1, 10))
    sched.submit("a", prompt, params(max_tokens=5, ignore_eos=True))
    events = drain(sched, mesh)
    assert len(output_of(events["a"])) == 5
    _pools_whole(sched)
    sched.submit("b", prompt + [11], params(max_tokens=40, ignore_eos=True))  # shares a's cached prefix
    step(sched, mesh, events)
    step(sched, mesh, events)
    sched.cancel("b")
    drain(sched, mesh, events)
    _pools_whole(sched)
