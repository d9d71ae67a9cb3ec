"""Random interleavings of submit, schedule, results (pipelined), cancel and mesh failure, on small pools
under pressure.

The fake mesh computes each token from what its KV cache holds, so every finished answer is compared
with the same request run alone: chunking, prefix sharing, pipelining, preemption and migration to a fresh
mesh after a failure (its KV and unread results lost) must not change it.
"""
import itertools
import random
from collections import Counter, deque

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler.blocks import blocks_for, extend_block_hashes
from scheduler.errors import PromptTooLong, QueueFull
from scheduler.sampling import SamplingParams
from scheduler.scheduler import MeshScheduler
from scheduler.sequence import Sequence, Status
from tests.fake_mesh import REFUSED_GRAMMAR, VOCAB, FakeMesh, reference_output

EOS = VOCAB - 1
MAX_SEQ_LEN = 40
_rng = random.Random(7)
# With no new request, the oldest running prompt is never preempted (only the newest of its group is) and takes at
# least prefix_align >= 2 tokens of every work's prefill budget, and every decode round gives a live one a token: so a
# token or an end comes within a prefill of MAX_SEQ_LEN - 1 tokens (a work and its results: 2 rounds per chunk), plus
# its admission. More is preempt/recompute going round in circles.
MAX_STALL = 2 * (MAX_SEQ_LEN // 2 + 2)
PREFIXES = [[_rng.randrange(VOCAB) for _ in range(28)] for _ in range(3)]  # shared system prompts


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([2, 4]), align_blocks=st.sampled_from([1, 2]),
                kv_groups=st.sampled_from([1, 2]), slots_per_group=st.integers(1, 3), extra_blocks=st.integers(-8, 12),
                chunk_aligns=st.integers(1, 3),
                budget_aligns=st.integers(1, 4), decode_steps=st.integers(1, 4), max_inflight=st.integers(1, 3),
                watermark=st.integers(0, 2), queue_limit=st.sampled_from([None, 3]),
                token_limit=st.sampled_from([None, 30]), shared_aligns=st.integers(1, 4))
    def setup(self, block_size, align_blocks, kv_groups, slots_per_group, extra_blocks, chunk_aligns, budget_aligns,
              decode_steps, max_inflight, watermark, queue_limit, token_limit, shared_aligns):
        align = block_size * align_blocks
        num_slots = kv_groups * slots_per_group
        # below 0: a pool smaller than max_seq_len (a Galaxy column's, sized by num_blocks): its limit rules
        num_blocks = max(blocks_for(MAX_SEQ_LEN, block_size) + extra_blocks, 2)
        def make_mesh() -> tuple[MeshScheduler, FakeMesh]:
            sched = MeshScheduler(
                num_blocks=num_blocks, block_size=block_size, kv_groups=kv_groups, num_slots=num_slots,
                max_seq_len=MAX_SEQ_LEN,
                prefill_chunk=align * chunk_aligns, max_prefill_tokens=align * budget_aligns,
                decode_steps=decode_steps, prefix_align=align, watermark_blocks=watermark,
                max_waiting_requests=queue_limit, max_waiting_tokens=token_limit, eos_token_ids=(EOS,),
                max_inflight=max_inflight, shared_prefill_tokens=align * shared_aligns)
            return sched, FakeMesh(num_slots, num_blocks, block_size, kv_groups)
        self.make_mesh = make_mesh
        self.sched, self.mesh = make_mesh()
        self.pending = deque()  # results the mesh has produced and the router has not taken in yet
        self.expected: dict[str, tuple[list[int], str]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.scored_ends: dict[tuple[str, int], int] = {}  # a scored prompt's seat -> where its chunks have come to
        self.seqs: dict[str, Sequence] = {}  # each request's Sequence on the current mesh
        self.computed: Counter = Counter()  # (request, seat epoch) -> prompt tokens its chunks had the mesh compute
        self.submitted = 0
        self.preempted_at: dict[str, tuple[Sequence, int]] = {}  # a request's last preemption: (its Sequence, length)

    # ---- rules -----------------------------------------------------------------------------------
    @rule(prefix=st.integers(0, len(PREFIXES) - 1), prefix_len=st.integers(0, 28),
          tail=st.lists(st.integers(0, VOCAB - 1), max_size=14), max_tokens=st.integers(1, 24),
          min_tokens=st.integers(0, 3), stop=st.lists(st.integers(0, VOCAB - 2), max_size=2),
          ignore_eos=st.booleans(), salt=st.sampled_from([None, "tenant"]), scored=st.booleans(),
          refused=st.booleans())
    def submit(self, prefix, prefix_len, tail, max_tokens, min_tokens, stop, ignore_eos, salt, scored, refused=False):
        prompt = PREFIXES[prefix][:prefix_len] + tail
        rid = f"r{self.submitted}"
        self.submitted += 1
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens),
                                stop_token_ids=stop, ignore_eos=ignore_eos, prompt_logprobs=0 if scored else None,
                                grammar=REFUSED_GRAMMAR if refused else None)
        limit, token_limit = self.sched.max_waiting_requests, self.sched.max_waiting_tokens
        # whatever the prompt's length (a long one refused where a short one is taken waits for good under load)
        free = self.sched.kv.num_free_slots  # a reserved KV group's free slots seat nobody but its holder
        if self.sched.reserved is not None:
            free -= len(self.sched.kv.groups[self.sched.reserved_group].free_slots)
        if self.sched.head_blocked:  # nor do any while the queue's head waits for KV blocks (num_queued)
            free = 0
        queue_full = (limit is not None and len(self.sched.waiting) - free >= limit
                      or token_limit is not None and self.sched.waiting_tokens >= token_limit)
        try:
            seq = self.sched.submit(rid, prompt, params, salt)
        except PromptTooLong:
            assert len(prompt) >= self.sched.max_tokens_per_seq
            return
        except QueueFull:
            assert queue_full and len(prompt) < self.sched.max_tokens_per_seq
            return
        except ValueError:
            assert not prompt
            return
        assert prompt and len(prompt) < self.sched.max_tokens_per_seq and not queue_full
        assert len(prompt) + seq.params.max_tokens <= self.sched.max_tokens_per_seq
        self.expected[rid] = reference_output(prompt, seq.params, seq.stop_token_ids)
        self.outputs[rid] = []
        self.seqs[rid] = seq

    @rule()
    def schedule(self):
        sched = self.sched
        epochs = {rid: seq.epoch for rid, seq in sched.running.items()}
        forecast = sched._room_after_queue()
        predicted = None if forecast is None else ([r[0] for r in forecast.room], forecast.reserved)
        holder = (sched.reserved, sched.reserved_group) if sched.reserved is not None else None
        preemptions, admits = sched.num_preemptions, len(sched.inflight) < sched.max_inflight
        queue = list(sched.waiting)
        running = list(sched.running.values())
        planned = {(rid, seq.epoch): seq.num_planned for rid, seq in sched.running.items() if seq.live}
        work = sched.schedule()
        self._check_admissions(epochs)
        self._check_preemptions(running)
        # FCFS: apart from the reserved group's holder (before or after), those seated are the head of the queue
        line = [seq for seq in queue if seq is not sched.reserved and (holder is None or seq is not holder[0])]
        seated = [seq.status is Status.RUNNING for seq in line]
        assert seated == sorted(seated, reverse=True), "a request was seated ahead of one that came before it"
        if admits and sched.num_preemptions == preemptions:
            # the router's forecast is what the schedule did: the free slots each group has left, the group left
            # reserved (a forecast of None: it stopped at a request that fits no group it may enter)
            reserved = sched.reserved_group if sched.reserved is not None else None
            actual = [len(g.free_slots) for g in sched.kv.groups], reserved
            assert predicted is None and sched.head_blocked or predicted == actual, (predicted, actual)
        if holder is not None and holder[0].status is not Status.RUNNING:  # nobody overtakes it into its group
            entered = [s for rid, s in sched.running.items() if epochs.get(rid) != s.epoch]
            assert all(sched.kv.group_of(s.slot).index != holder[1] for s in entered), "the reserved group was taken"
        if work is None:  # a prompt may wait for an earlier one's chunk that is out, never for nothing
            assert len(sched.inflight) >= sched.max_inflight or all(
                s.live or sched.inflight and self._trails(s) for s in sched.running.values()), \
                "a prefill was left unplanned"
            return
        if sched.waiting:  # what this round left waiting is a queue: no free slot, or a request that fits none
            assert sched.queued() == sorted(sched.waiting, key=lambda seq: seq is not sched.reserved)  # holder first
            assert max(sched.num_queued, 0) == len(sched.waiting) - (sched.reserved is not None)
        if work.decode:  # an isolated sequence (one a failure could not be laid on alone) decodes a step alone
            listed = [seq for seq in self.sched.running.values() if seq.slot in work.decode.slots]
            if any(seq.isolated for seq in listed):
                assert len(work.decode.slots) == 1 and work.decode.num_steps == 1, "an isolated step was not alone"
            for seq in listed:  # a slot with no token left costs the mesh a round of decode_steps steps for nothing
                before = planned.get((seq.request_id, seq.epoch), len(seq.token_ids) + 1)  # else: its final chunk's
                assert before < seq.max_tokens_total, f"{seq.request_id}: a decode round for a sequence at full length"
        self._check_scored_chunks(work)
        self.pending.extend(self.mesh.execute(work))

    @precondition(lambda self: self.pending)
    @rule(n=st.integers(1, 8))
    def take_results(self, n):
        for _ in range(min(n, len(self.pending))):
            for event in self.sched.process(self.pending.popleft()):
                self._take(event)

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data(), reason=st.sampled_from(["abort", "stop"]))
    def cancel(self, data, reason):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        event = self.sched.cancel(rid, reason)
        assert event.finish_reason == reason and not event.token_ids
        self._take(event, cancelled=True)

    @precondition(lambda self: self.sched.num_queued > 0)
    @rule()
    def take_queued(self):
        """The router moves the queue beyond the free slots to a mesh that came up (here: back in line)."""
        sched = self.sched
        used = [group.pool.num_used for group in sched.kv.groups]
        taken = sched.queued()
        assert sched.queued(1) == taken[:1]
        for seq in taken:
            sched.cancel(seq.request_id, "abort")
        assert taken and sched.num_queued <= 0 and [g.pool.num_used for g in sched.kv.groups] == used
        for seq in taken:
            assert seq.request_id not in sched.requests and not seq.block_table
            # resubmitted under its id, it is a new Sequence whose seats count their epochs afresh
            self.scored_ends = {key: end for key, end in self.scored_ends.items() if key[0] != seq.request_id}
            self.computed = Counter({key: n for key, n in self.computed.items() if key[0] != seq.request_id})
            assert seq.output_ids == self.outputs[seq.request_id], "a confirmed token was not delivered"
            self.seqs[seq.request_id] = sched.submit(seq.request_id, seq.prompt_ids, seq.params, seq.salt,
                                                     seq.output_ids, migrated=True, counted=seq.counted,
                                                     isolated=seq.isolated,
                                                     num_tokens_preempted=seq.num_tokens_preempted)
            self._moved(seq, self.seqs[seq.request_id])

    @precondition(lambda self: len(self.sched.inflight) < self.sched.max_inflight)
    @rule(prefix=st.integers(0, len(PREFIXES) - 1), prefix_len=st.integers(0, 28),
          tail=st.lists(st.integers(0, VOCAB - 1), max_size=14), max_tokens=st.integers(1, 24),
          salt=st.sampled_from([None, "tenant"]), scored=st.booleans(), preempted=st.booleans())
    def move_here(self, prefix, prefix_len, tail, max_tokens, salt, scored=False, preempted=False):
        """The router moves another mesh's request here on seats()'s word: the next schedule must seat it. At a
        failover it places one by placement_key, whose "seats it now" must say what seats() says. `preempted`: it
        was preempted there (num_tokens_preempted, which the router carries)."""
        prompt = PREFIXES[prefix][:prefix_len] + tail
        if not prompt or len(prompt) >= self.sched.max_tokens_per_seq:
            return
        rid = f"r{self.submitted}"
        self.submitted += 1
        # one that scores its prompt looks nothing up: seats() must not count on a hit it will not take
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                prompt_logprobs=0 if scored else None)
        hashes: list[bytes] = []
        extend_block_hashes(hashes, prompt, self.sched.block_size, salt)
        preempted_at = len(prompt) if preempted else -1
        candidate = MeshScheduler(num_blocks=64, block_size=self.sched.block_size, num_slots=1,
                                  max_seq_len=MAX_SEQ_LEN).submit(rid, prompt, params, salt, block_hashes=hashes,
                                                                  num_tokens_preempted=preempted_at)
        seats = self.sched.seats(candidate)
        key = self.sched.placement_key([] if scored else hashes, len(prompt), preempted_at)
        assert (key[0] == 1) == seats, (key, seats)
        if not seats:
            return
        seq = self.sched.submit(rid, prompt, params, salt, migrated=True, block_hashes=hashes,
                                num_tokens_preempted=preempted_at)
        self.expected[rid] = reference_output(prompt, seq.params, seq.stop_token_ids)
        self.outputs[rid] = []
        self.seqs[rid] = seq
        epochs = {r: s.epoch for r, s in self.sched.running.items()}
        running = list(self.sched.running.values())
        work = self.sched.schedule()
        self._check_admissions(epochs)
        self._check_preemptions(running)
        assert seq.status is Status.RUNNING, "seats() said yes to a request the next schedule leaves waiting"
        if work is None:  # seated, it waits for an earlier prompt's chunk that is out
            assert self.sched.inflight and self._trails(seq), "a prefill was left unplanned"
            return
        self._check_scored_chunks(work)
        self.pending.extend(self.mesh.execute(work))

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def fail_mesh(self, data):
        """The mesh dies: its unread results are lost, every request moves to a fresh mesh with the tokens
        it has so far (as the router does), some isolated (the router could not lay the failure on them alone),
        and the dead mesh's scheduler gives every block back."""
        old = self.sched
        seqs = old.drain()
        assert not old.requests and not old.running and not old.waiting and not old.inflight
        for group in old.kv.groups:
            assert group.pool.num_used == 0 and not any(group.pool.ref_counts), "a block leaked"
        self.pending.clear()
        self.sched, self.mesh = self.make_mesh()
        self.scored_ends.clear()  # the new mesh's seats count their epochs afresh
        self.computed.clear()
        for seq in seqs:
            assert seq.output_ids == self.outputs[seq.request_id], "a confirmed token was not delivered"
            self.seqs[seq.request_id] = self.sched.submit(
                seq.request_id, seq.prompt_ids, seq.params, seq.salt, seq.output_ids, migrated=True,
                isolated=seq.isolated or data.draw(st.booleans()), num_tokens_preempted=seq.num_tokens_preempted)
            self._moved(seq, self.seqs[seq.request_id])

    def teardown(self):
        """Run everything to its end: nothing may hang, and every block must come back."""
        if not hasattr(self, "sched"):
            return
        stall = 0  # rounds (a schedule, or its results taken in) since the last token delivered or request ended
        for _ in range(5000):
            progress = len(self.finished) + sum(map(len, self.outputs.values()))
            if self.pending:
                self.take_results(len(self.pending))
            elif not self.sched.requests:
                break
            else:
                self.schedule()
            stall = 0 if len(self.finished) + sum(map(len, self.outputs.values())) > progress else stall + 1
            assert stall <= MAX_STALL, f"{stall} rounds without a token or an end: a livelock"
        sched = self.sched
        assert not sched.requests and not sched.running and not sched.waiting, "requests were left hanging"
        assert set(self.finished) == set(self.expected)
        for group in sched.kv.groups:
            pool = group.pool
            assert pool.num_used == 0 and pool.num_free + pool.num_cached == pool.num_blocks
            assert all(count == 0 for count in pool.ref_counts)
        free = sorted(slot for group in sched.kv.groups for slot in group.free_slots)
        assert free == list(range(sched.num_slots)) and not sched.kv.page_table.any()
        assert set(self.mesh.slots) <= set(sched.pending_release), "the mesh still decodes a freed slot"

    # ---- checks ----------------------------------------------------------------------------------
    def _take(self, event, cancelled=False):
        rid = event.request_id
        assert rid not in self.finished, f"{rid} got an event after it finished"
        out = self.outputs[rid]
        out += event.token_ids
        tokens, reason = self.expected[rid]
        assert out == tokens[:len(out)], f"{rid}: {out} is not a prefix of the answer {tokens}"
        if event.num_prompt_tokens and event.token_ids:  # its first token: usage's cached tokens
            self._check_cached_tokens(rid, event)
        if event.finish_reason is not None:
            self.finished[rid] = event.finish_reason
            if not cancelled:
                assert (out, event.finish_reason) == (tokens, reason)

    def _check_cached_tokens(self, rid, event):
        """A request's first event reports as cached (usage) the prompt tokens that its first seat here did not have
        the mesh compute (vLLM: those of its first scheduling), never the last one."""
        n, cached = event.num_prompt_tokens, event.num_cached_tokens
        assert 0 <= cached < n, (rid, cached, n)
        if self.seqs[rid].epoch == 1:
            assert cached == n - self.computed[rid, 1], (rid, cached, n, self.computed[rid, 1])

    def _check_admissions(self, epochs_before):
        """Identical prefixes share blocks: a sequence admitted now reuses every cached block that a
        running sequence of its KV group holds for the same leading tokens (same salt), up to the alignment
        and the cap; a block is never shared across groups (each group's ids name its own memory)."""
        sched, bs = self.sched, self.sched.block_size
        for rid, seq in sched.running.items():
            if epochs_before.get(rid) == seq.epoch:
                continue
            if MeshScheduler.scores_prompt(seq):  # it looks nothing up: every position is computed
                assert seq.num_computed == 0
                continue
            n = len(seq.token_ids)
            group = sched.kv.group_of(seq.slot)
            pool = group.pool
            for other in sched.running.values():
                if other is seq or other.salt != seq.salt or sched.kv.group_of(other.slot) is not group:
                    continue
                m = 0
                while (m < len(other.block_table) and pool.block_hash[other.block_table[m]] is not None
                       and (m + 1) * bs <= n and other.token_ids[:(m + 1) * bs] == seq.token_ids[:(m + 1) * bs]):
                    m += 1
                reusable = min(m * bs, n - 1) // sched.prefix_align * sched.prefix_align
                assert seq.num_computed >= reusable
                assert seq.block_table[:reusable // bs] == other.block_table[:reusable // bs]

    def _check_preemptions(self, running):
        """A sequence preempted again has made a token since its last preemption (the recompute's first token at
        least), so a request is preempted at most once per token it makes, plus once: its recomputes add up to at
        most (max_tokens + 1) x its length. Across moves too (take_queued, fail_mesh carry it as the router does)."""
        for seq in running:
            if seq.status is Status.PREEMPTED:
                last = self.preempted_at.get(seq.request_id)
                if last is not None and last[0] is seq:
                    assert len(seq.token_ids) > last[1], f"{seq.request_id} preempted again at {last[1]} tokens"
                self.preempted_at[seq.request_id] = seq, len(seq.token_ids)

    def _moved(self, old, new):
        """`old`'s request goes on as `new` (a move): its last preemption goes with it."""
        if self.preempted_at.get(old.request_id, (None,))[0] is old:
            self.preempted_at[old.request_id] = new, self.preempted_at[old.request_id][1]

    def _check_scored_chunks(self, work):
        """A prompt that asks for its logprobs, until its first token, computes every position in order from 0 in
        each seat and asks each chunk to score them; no other chunk asks."""
        for chunk in work.prefills:
            seq = self.sched.running[chunk.request_id]
            key = chunk.request_id, seq.epoch
            self.computed[key] += chunk.end - chunk.start
            if MeshScheduler.scores_prompt(seq):
                assert chunk.prompt_logprobs == 0 and chunk.start == self.scored_ends.get(key, 0), "a position skipped"
                self.scored_ends[key] = chunk.end
            else:
                assert chunk.prompt_logprobs is None

    def _trails(self, seq) -> bool:
        """Whether an earlier prompt of seq's KV group (same salt) has the same first shared_prefill_tokens tokens
        and seq's next ones, and has not computed those next ones yet (seq then takes them from the cache)."""
        sched = self.sched
        next_end = seq.num_prefill_planned + sched.prefix_align
        shared = max(sched.shared_prefill_tokens, next_end)
        earlier = itertools.takewhile(lambda other: other is not seq, sched.running.values())
        return any(sched.kv.group_of(other.slot) is sched.kv.group_of(seq.slot) and other.salt == seq.salt
                   and len(other.token_ids) >= shared and other.token_ids[:shared] == seq.token_ids[:shared]
                   and other.num_computed < next_end for other in earlier)

    @invariant()
    def blocks_have_exactly_their_owners(self):
        for group in self.sched.kv.groups:
            self._check_group_blocks(group)

    @invariant()
    def a_cached_block_holds_its_prefixs_kv(self):
        """Every block the prefix cache names, owned or not, holds in its group's memory on the mesh the KV of the
        tokens its digest names (the fake mesh runs a work when it is handed out: no write of a work out may land on a
        block once it is cached)."""
        bs = self.sched.block_size
        tokens_of: dict[bytes, list[int]] = {}
        for seq in self.seqs.values():
            digests: list[bytes] = []
            extend_block_hashes(digests, seq.token_ids, bs, seq.salt)
            for i, digest in enumerate(digests):
                tokens_of[digest] = seq.token_ids[i * bs:(i + 1) * bs]
        for group in self.sched.kv.groups:
            for block, digest in enumerate(group.pool.block_hash):
                if digest is not None:
                    assert self.mesh.kv[group.index, block].tolist() == tokens_of[digest], (group.index, block)

    def _check_group_blocks(self, group):
        sched, pool, bs = self.sched, group.pool, self.sched.block_size
        owners = Counter()
        holders: dict[int, list[tuple[int, object]]] = {}
        for seq in sched.running.values():
            if sched.kv.group_of(seq.slot) is not group:
                continue
            table = seq.block_table
            assert seq.status is Status.RUNNING and len(set(table)) == len(table)
            owners.update(table)
            for index, block in enumerate(table):
                holders.setdefault(block, []).append((index, seq))
            # covers the planned length plus lookahead (the newest token's KV comes one step later)
            assert len(table) * bs >= (seq.num_planned - 1 if seq.live else len(seq.token_ids))
            row = sched.kv.page_table[seq.slot]
            assert row[:len(table)].tolist() == table and not row[len(table):].any()
            truth: list[bytes] = []
            extend_block_hashes(truth, seq.token_ids, bs, seq.salt)
            for index in range(seq.num_cached_blocks):
                assert pool.block_hash[table[index]] in (None, truth[index]), "a cached block's name lies"
        assert all(pool.ref_counts[b] == owners[b] for b in range(pool.num_blocks)), "ref count != owners"
        assert pool.num_used == len(owners) and pool.num_free + pool.num_cached + pool.num_used == pool.num_blocks
        # what stats() reports (metrics): an unowned block is cached while it still names a prefix, else free
        unowned = [b for b in range(pool.num_blocks) if not owners[b]]
        cached = sum(1 for b in unowned if pool.block_hash[b] is not None)
        reported = sched.stats()["groups"][group.index]
        assert (reported["blocks_used"], reported["blocks_cached"], reported["blocks_free"]) == \
            (len(owners), cached, len(unowned) - cached)
        for block, shared in holders.items():
            if len(shared) < 2:
                continue
            index, first = shared[0]
            end = (index + 1) * bs
            assert pool.block_hash[block] is not None, "an uncached block has two owners"
            for other_index, other in shared[1:]:
                assert other_index == index and other.salt == first.salt, "a block shared across positions"
                assert other.token_ids[:end] == first.token_ids[:end], "a block shared by different prefixes"
                assert min(first.num_computed, other.num_computed) >= end

    @invariant()
    def slots_and_queue_are_consistent(self):
        sched = self.sched
        slots = [seq.slot for seq in sched.running.values()]
        for group in sched.kv.groups:  # each group's free slots are its own
            assert all(sched.kv.group_of(slot) is group for slot in group.free_slots)
        free = [slot for group in sched.kv.groups for slot in group.free_slots]
        assert sorted(slots + free) == list(range(sched.num_slots))
        assert sched.kv.num_free_slots == len(free)  # kept by seat and release
        for slot in free:
            assert not sched.kv.page_table[slot].any()
        for seq in sched.waiting:
            assert seq.status in (Status.WAITING, Status.PREEMPTED) and not seq.block_table and seq.slot == -1
        assert set(sched.requests) == set(sched.running) | {seq.request_id for seq in sched.waiting}
        assert sched.waiting_tokens == sum(len(seq.token_ids) for seq in sched.waiting)
        assert len(sched.inflight) <= sched.max_inflight

    @invariant()
    def the_kept_placement_forecast_is_the_current_one(self):
        """seats() and placement_key() reuse the forecast of the next schedule and the mesh's room until the state
        changes: every change that matters to them must drop them."""
        sched = self.sched
        kept = sched._room_after_queue()
        probes = [PREFIXES[0][:n] + [0] for n in (3, 12, 27)]  # a miss, and hits on what the prefixes cached
        hashes = [[] for _ in probes]
        for prompt, digests in zip(probes, hashes):
            extend_block_hashes(digests, prompt, sched.block_size)
        keys = [sched.placement_key(digests, len(prompt)) for prompt, digests in zip(probes, hashes)]
        sched._forecast_valid, sched._placement_room = False, None  # computed afresh (not by _state_changed, tested)
        assert sched._room_after_queue() == kept
        assert [sched.placement_key(digests, len(prompt)) for prompt, digests in zip(probes, hashes)] == keys


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=500, deadline=None, stateful_step_count=40,
                                  suppress_health_check=[HealthCheck.too_slow])


def test_a_prompt_waiting_for_an_earlier_ones_chunk_is_no_unplanned_prefill():
    """The machine's schedule rule, by hand: b waits for a's final chunk, which is out (a's one token needs no decode
    round), so schedule() plans nothing with one of two works out. That is no prefill left unplanned (the rule said
    it was); the result of a's chunk brings b's."""
    machine = SchedulerMachine()
    machine.setup(block_size=2, align_blocks=1, kv_groups=1, slots_per_group=2, extra_blocks=12, chunk_aligns=3,
                  budget_aligns=4, decode_steps=1, max_inflight=2, watermark=0, queue_limit=None, token_limit=None,
                  shared_aligns=1)
    machine.submit(0, 6, [], 1, 0, [], True, None, False)
    machine.submit(0, 6, [3], 2, 0, [], True, None, False)
    machine.schedule()
    machine.schedule()
    assert len(machine.sched.inflight) == 1 and not machine.sched.running["r1"].live
    machine.take_results(1)
    machine.schedule()
    assert machine.sched.running["r1"].live
    machine.teardown()


def test_a_moved_prompt_may_wait_for_an_earlier_ones_chunk():
    """move_here, by hand: the request moved here is seated and waits for a's final chunk, which is out, so its
    schedule plans no work (the rule ran a work of None)."""
    machine = SchedulerMachine()
    machine.setup(block_size=2, align_blocks=1, kv_groups=1, slots_per_group=2, extra_blocks=0, chunk_aligns=1,
                  budget_aligns=4, decode_steps=1, max_inflight=3, watermark=0, queue_limit=None, token_limit=None,
                  shared_aligns=1)
    machine.submit(ignore_eos=False, max_tokens=1, min_tokens=0, prefix=0, prefix_len=16, salt=None, stop=[], tail=[], scored=False)
    machine.schedule()
    machine.schedule()
    machine.move_here(max_tokens=1, prefix=0, prefix_len=3, salt=None, tail=[])
    assert not machine.sched.running["r1"].live
    machine.teardown()


def test_a_reseated_sequence_is_not_preempted_before_its_token():
    """The machine's rules, driven as the router drives a mesh (max_inflight works out, then the oldest one's results):
    r2, preempted mid-prefill, is re-seated when r0 ends, one block to spare, and r1's lookahead of the round after
    needs that block before r2's recompute has given its token (its work is still out). The old schedule preempted r2
    again at the same 2 tokens (_check_preemptions); now r1 waits a round for it."""
    machine = SchedulerMachine()
    machine.setup(block_size=4, align_blocks=1, kv_groups=1, slots_per_group=3, extra_blocks=-4, chunk_aligns=2,
                  budget_aligns=2, decode_steps=4, max_inflight=2, watermark=0, queue_limit=None, token_limit=None,
                  shared_aligns=4)
    for token, max_tokens in ((1, 4), (2, 20), (3, 4)):
        machine.submit(0, 0, [token] * 2, max_tokens, 0, [], True, None, False)
    sched = machine.sched
    assert sched.kv.blocks_per_group == 6
    for _ in range(100):
        if not sched.requests:
            break
        out = len(sched.inflight)
        machine.schedule()
        if len(sched.inflight) == out and sched.inflight:
            machine.take_results(sched.inflight[0].messages_left)
    assert sched.num_preemptions and not sched.requests
    machine.teardown()
