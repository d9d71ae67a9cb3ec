"""Executes the router's work on one backend: the mesh side of the data path.

It keeps each live slot's sampling state (params, history, last token, budget) so the router can plan the
next round before this one ends, and retires a slot by itself on a stop id or an exhausted budget so a
finished user burns no steps while the router catches up. It holds no scheduling policy.

Host-side work for one slot (masking, penalties, sampling) that raises retires that slot alone with
finish_reason "error" ("grammar_error" when llguidance gave up on its grammar, "constraint_error" when its
masks together left no token); the other slots and the mesh go on. Nothing here writes in place into a
tensor a backend returned: backends may hand out inference-mode tensors, or views of their own buffers.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from model.backend import Backend, DecodeOutput
from model.grammar import GrammarCache, GrammarState, deep_stack_executor
from model.sampler import PenaltyState, sample_batch, take_rows
from scheduler.sampling import SamplingParams, TokenLogprobs
from scheduler.work import GRAMMARS_KEPT, NO_TOKEN, DecodeRound, MeshWork, PrefillChunk, PrefillHistory, StepResult

log = logging.getLogger("ray.serve")
_T = TypeVar("_T")


@dataclass
class SlotState:
    request_id: str
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far (its length gives the position)
    num_prompt_tokens: int
    stop_ids: frozenset[int]
    on_device: bool  # the backend can sample these params exactly (decided once, not per step)
    host_params: SamplingParams  # what the host samples with: params, or as the device applies them (on_device)
    # stop ids and the model's EOS ids (even under ignore_eos: vLLM's all_stop_token_ids, vllm/sampling_params.py
    # update_from_generation_config) inside the vocabulary: masked until min_tokens are generated. A tensor: a list
    # index is made one at every masked step (256 stop ids: ~40 us per slot per step)
    banned_early: torch.Tensor
    grammar: GrammarState | None = None  # the constraint the answer must match, advanced token by token
    penalties: PenaltyState | None = None  # with penalties: the sequence's token counts, advanced token by token
    # Built at the first masked step, at the width of the backend's rows (padding included), and again only if that
    # width changes (masks_width): read from the request's lists and dicts at every step, 1,024 logit_bias entries
    # cost ~0.5 ms per slot per step, which every user of the mesh waits for.
    masks_width: int = 0
    not_allowed: torch.Tensor | None = None  # with allowed_token_ids: bool [width], True where a token may not be drawn
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # with logit_bias: (ids [n], biases [n]) within the width
    # with bad_words: (the ids of one-token words [n], the longer words by their next-to-last token): a step compares
    # only the words whose next-to-last token the answer just made
    bad_words: tuple[torch.Tensor, dict[int, list[tuple[int, ...]]]] | None = None
    dead_end: bool = False  # its constraints left no token to sample: the client's request, not this host, failed

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def stops_masked(self) -> bool:
        """This step masks the stop ids (banned_early): min_tokens are not generated yet. min_tokens first: it is
        nearly always 0, and a tensor's len() is a Python call (~2 us, per slot per step: sample_on_device)."""
        min_tokens = self.params.min_tokens
        return min_tokens > 0 and min_tokens > self.num_generated and len(self.banned_early) > 0

    @property
    def sample_on_device(self) -> bool:
        """This step's token can come from the device sampler: its params allow it, and no stop id has
        to be masked any more (the device sampler cannot mask, so min_tokens is the host's until met)."""
        return self.on_device and not self.stops_masked

    def finish_reason(self, token: int) -> str | None:
        generated, params = len(self.token_ids) - self.num_prompt_tokens, self.params  # every slot, every step
        if token in self.stop_ids and generated >= params.min_tokens:
            return "stop"
        if generated >= params.max_tokens:
            return "length"
        return None


class MeshRunner:
    def __init__(self, backend: Backend, grammar_tokenizer: Callable[[], object] | None = None):
        """`grammar_tokenizer` builds llguidance's view of the model's tokenizer (model/grammar.py), once, when
        the first constrained request arrives; without it such a request is retired with "error"."""
        self.backend = backend
        self.caps = backend.caps
        self.slots: dict[int, SlotState] = {}
        self._prefilled = PrefillHistory()  # the ids of slots whose prefill is under way
        self._page_table = torch.zeros(self.caps.num_slots, self.caps.max_blocks_per_seq, dtype=torch.int32)
        self._page_width = 0  # columns of _page_table that may be non-zero
        self._grammar_tokenizer_factory = grammar_tokenizer
        self._grammars: GrammarCache | None = None
        self._masks: ThreadPoolExecutor | None = None  # the thread that computes masks beside a device step

    def close(self) -> None:
        """Close the device, then end the mask thread, also when the device's close raises (the replica's
        shutdown logs that and goes on): it computes only beside a step, which the caller's thread (the one that
        steps the device) is not running now."""
        try:
            self.backend.close()
        finally:
            if self._masks is not None:
                self._masks.shutdown(wait=False)

    def reset(self) -> None:
        """Forget every slot (a new router, or a router that re-joined this mesh, starts from scratch)."""
        self.slots.clear()
        self._prefilled.clear()

    def execute(self, work: MeshWork) -> Iterator[StepResult]:
        """Yields work.num_messages results: one per prefill chunk, then one per decode step."""
        for slot in work.release:
            self.slots.pop(slot, None)
            self._prefilled.drop(slot)
        for i, chunk in enumerate(work.prefills):
            yield self._prefill(work.work_id, chunk, last=work.decode is None and i == len(work.prefills) - 1)
        if work.decode:
            yield from self._decode(work.work_id, work.decode)

    def _prefill(self, work_id: int, chunk: PrefillChunk, last: bool) -> StepResult:
        result = StepResult(work_id, [NO_TOKEN] * self.caps.num_slots, last=last)
        self.slots.pop(chunk.slot, None)
        token_ids = self._prefilled.take(chunk)
        params = chunk.params
        scored = chunk.prompt_logprobs is not None  # the router asks only a backend that declares it
        last_logits = None  # the final position's, when scored: its token is then sampled on the host
        if scored:
            targets = token_ids[chunk.start + 1:chunk.num_prompt_tokens]
            if chunk.next_prompt_token >= 0:
                targets.append(chunk.next_prompt_token)
            logprobs, last_logits = self.backend.prefill_prompt_logprobs(
                token_ids, chunk.start, chunk.block_ids, chunk.slot, chunk.prompt_logprobs, targets)
            if logprobs is not None:  # None: the chunk held no position with a target
                result.prompt_logprobs[chunk.slot] = logprobs
        if params is None:  # not the final chunk: no token yet
            if not scored:
                self.backend.prefill(token_ids, chunk.start, chunk.block_ids, chunk.slot)
            return result
        vocab = self.caps.vocab_size
        samplable = self.backend.can_sample(params)
        state = SlotState(chunk.request_id, params, list(token_ids), chunk.num_prompt_tokens,
                          frozenset(chunk.stop_token_ids), samplable,
                          self.backend.as_device_samples(params) if samplable else params,
                          torch.tensor(sorted(t for t in {*chunk.stop_token_ids, *self.caps.eos_token_ids}
                                              if 0 <= t < vocab), dtype=torch.long))
        if params.needs_penalties:
            n = chunk.num_prompt_tokens
            state.penalties = PenaltyState(vocab, token_ids[:n], token_ids[n:])
        if params.grammar is not None:
            try:
                grammars = self.grammars()
            except Exception:  # this host's fault, not the request's
                log.exception("request %s: no grammar tokenizer on this mesh; its slot is retired", chunk.request_id)
                self._retire(chunk.slot, result, "error")
                return result
            try:  # resumes after the tokens a recomputed answer already has
                state.grammar = grammars.new_state(params.grammar, token_ids[chunk.num_prompt_tokens:])
            except Exception as exc:  # ValueError: llguidance refused the grammar or those tokens
                log.exception("request %s: its grammar cannot be matched here; its slot is retired", chunk.request_id)
                self._retire(chunk.slot, result, "grammar_error" if isinstance(exc, ValueError) else "error")
                return result
        on_device = state.sample_on_device and not scored
        if on_device and params.logprobs is not None:  # the device's logprob where its prefill gives one
            first = self.backend.prefill_logprobs(token_ids, chunk.start, chunk.block_ids, chunk.slot, params)
            if first is not None:
                self._advance(chunk.slot, state, first[0], TokenLogprobs(first[0], first[1], []), result)
                return result
            on_device = False  # else the host's, from the logits (one row, once)
        out = last_logits if scored else self.backend.prefill(
            token_ids, chunk.start, chunk.block_ids, chunk.slot, sampling=params if on_device else None)
        if on_device:
            self._advance(chunk.slot, state, int(out), None, result)
        else:
            tokens, logprobs = self._host_sample(out[None], [state])
            self._advance(chunk.slot, state, tokens[0], logprobs[0], result)
        return result

    def _decode(self, work_id: int, round_: DecodeRound) -> Iterator[StepResult]:
        n = self.caps.num_slots
        page_table = self._full_width(round_.page_table)
        listed = [s for s in round_.slots if s in self.slots]
        previous: StepResult | None = None
        started: tuple[list[int], DecodeOutput] | None = None  # this step's rows and output, when already started
        for step in range(round_.num_steps):
            result = StepResult(work_id, [NO_TOKEN] * n, last=step == round_.num_steps - 1)
            more = step + 1 < round_.num_steps
            if started is None:
                live = [s for s in listed if s in self.slots]
                inputs = self._decode_inputs(live, page_table) if live else None
                if previous is not None:
                    # The previous step's result leaves now, with this step's inputs ready and the device about to
                    # run: whoever takes it (the mesh replica's event loop, which needs the GIL for ~0.1-0.3 ms)
                    # then works while this thread waits on the device, not while it prepares the next step.
                    yield previous
                    previous = None
                if inputs is None or not (more and self.caps.async_decode and self._on_device(live)):
                    if inputs is not None:
                        self._decode_step(live, inputs, result)
                    previous = result
                    continue
                started = live, self._start(live, *inputs)
            live, output = started
            started = None
            if previous is not None:  # before the next step starts: a fault there loses no result already read
                try:
                    yield previous
                except GeneratorExit:  # its consumer let go (the replica's shutdown, which then closes the device):
                    output.tokens()  # no step is left running beside that
                    raise
            # The next step starts before this one's tokens are read, so the device never waits for the host's work
            # on them. Its rows: the slots still live that this step cannot end by their budget. One that this step
            # ends with a stop id runs once more; that step writes only the KV of its last token, at its own
            # position in its own blocks, and its token is dropped.
            # Every slot of a started step samples on the device, and stays so (min_tokens only ever stops masking).
            slots = self.slots
            following = [s for s in live if (st := slots.get(s)) is not None
                         and len(st.token_ids) - st.num_prompt_tokens + 1 < st.params.max_tokens]
            if following and more:
                _, positions, _, active = self._decode_inputs(following, page_table, ahead=1)
                started = following, self._start(following, output, positions, page_table, active)
            tokens = output.tokens().tolist()
            states = [slots.get(s) for s in live]  # None: retired by the step before (_advance retires its own alone)
            logprobs = _device_logprobs(live, states, [tokens[s] for s in live], output.logprobs()) \
                if any(st is not None and st.params.logprobs is not None for st in states) else [None] * len(live)
            for s, state, lp in zip(live, states, logprobs):
                if state is not None:
                    self._advance(s, state, tokens[s], lp, result)
            previous = result
        if previous is not None:
            yield previous

    def _start(self, live: list[int], tokens: torch.Tensor | DecodeOutput, positions: torch.Tensor,
               page_table: torch.Tensor, active: torch.Tensor) -> DecodeOutput:
        return self.backend.decode_async(tokens, positions, page_table, active, sampling=self._sampling(live))

    def _on_device(self, live: list[int]) -> bool:
        return all(self.slots[s].sample_on_device for s in live)

    def _sampling(self, live: list[int]) -> list[SamplingParams | None]:
        sampling: list[SamplingParams | None] = [None] * self.caps.num_slots
        for s in live:
            sampling[s] = self.slots[s].params
        return sampling

    def _full_width(self, rows: np.ndarray) -> torch.Tensor:
        """The round's page table [num_slots, width] as the backend's [num_slots, max_blocks_per_seq]."""
        width = rows.shape[1]
        self._page_table[:, :width] = torch.from_numpy(rows)
        if width < self._page_width:
            self._page_table[:, width:self._page_width] = 0
        self._page_width = width
        return self._page_table

    def _decode_inputs(self, live: list[int], page_table: torch.Tensor, ahead: int = 0) -> tuple:
        """The backend's decode arguments for the live slots: (tokens, positions, page_table, active); `ahead`
        steps later (the positions only: those steps' tokens are still on the device)."""
        n, slots = self.caps.num_slots, self.slots
        tokens, positions, active = [0] * n, [0] * n, [False] * n
        for s in live:
            ids = slots[s].token_ids
            tokens[s], positions[s], active[s] = ids[-1], len(ids) - 1 + ahead, True
        # via numpy: torch.tensor from a list costs ~12-15 us each on the 2-core box, this ~3, every step
        return (torch.from_numpy(np.array(tokens, dtype=np.int64)),
                torch.from_numpy(np.array(positions, dtype=np.int64)), page_table,
                torch.from_numpy(np.array(active, dtype=bool)))

    def _decode_step(self, live: list[int], args: tuple, result: StepResult) -> None:
        states = [self.slots[s] for s in live]
        device = [st.sample_on_device for st in states]
        sampling = self._sampling([s for s, on_device in zip(live, device) if on_device])
        sampled: list[int | None]
        logprobs: list[TokenLogprobs | None]
        if all(device):
            if any(st.params.logprobs is not None for st in states):  # logprobs 0 (can_sample): the device's own
                device_tokens, device_logprobs = self.backend.decode_logprobs(*args, sampling=sampling)
                every_slot = device_tokens.tolist()
                sampled = [every_slot[s] for s in live]
                logprobs = _device_logprobs(live, states, sampled, device_logprobs)
            else:
                every_slot = self.backend.decode(*args, sampling=sampling).tolist()
                sampled, logprobs = [every_slot[s] for s in live], [None] * len(live)
        elif not any(device):
            logits = self._beside_masks(states, lambda: self.backend.decode(*args))
            sampled, logprobs = self._host_sample(take_rows(logits, live), states)
        else:  # some slots need host logits (penalties, logprobs, min_tokens...): the others stay on the device
            # (decode_mixed gives tokens alone: a row asking logprobs 0 is sampled on the host from its logits too)
            host = [i for i, (on_device, st) in enumerate(zip(device, states))
                    if not on_device or st.params.logprobs is not None]
            device_tokens, logits = self._beside_masks(
                states, lambda: self.backend.decode_mixed(*args, sampling=sampling, host_rows=[live[i] for i in host]))
            if device_tokens is None:  # this backend gave logits for every row: all are sampled here
                sampled, logprobs = self._host_sample(take_rows(logits, live), states)
            else:
                every_slot = device_tokens.tolist()
                sampled, logprobs = [every_slot[s] for s in live], [None] * len(live)
                host_tokens, host_logprobs = self._host_sample(logits, [states[i] for i in host])
                for i, token, lp in zip(host, host_tokens, host_logprobs):
                    sampled[i], logprobs[i] = token, lp
        for s, st, token, lp in zip(live, states, sampled, logprobs):
            self._advance(s, st, token, lp, result)

    def _beside_masks(self, states: list[SlotState], step: Callable[[], _T]) -> _T:
        """`step()` (the device's step), while the mask thread computes the grammars' masks for its logits: they
        depend only on the tokens before it (vLLM's scheduler likewise fills the next bitmask while the model runs),
        so a grammar's cost per token, up to the step's own time, no longer adds to every user's step. The matchers
        are touched by that thread alone until it ends, which this waits for even when the device fails."""
        grammars = [st.grammar for st in states if st.grammar is not None]
        if not grammars:
            return step()
        masks = self._mask_thread().submit(_prefetch, grammars)
        try:
            return step()
        finally:
            masks.result()

    def _mask_thread(self) -> ThreadPoolExecutor:
        if self._masks is None:  # with a grammar's deep stack: llguidance builds a lexer's states lazily, in a mask
            self._masks = deep_stack_executor(1, "grammar-masks")
        return self._masks

    def grammars(self) -> GrammarCache:
        """The compiled grammars, built with llguidance's tokenizer at the first call. Raises what building
        that tokenizer raises (e.g. a slow tokenizer it cannot read), RuntimeError on a runner built without one."""
        if self._grammars is None:
            if self._grammar_tokenizer_factory is None:
                raise RuntimeError("this mesh was built without a tokenizer for grammars")
            self._grammars = GrammarCache(self._grammar_tokenizer_factory(), GRAMMARS_KEPT)
        return self._grammars

    def _host_sample(self, logits: torch.Tensor, states: list[SlotState]
                     ) -> tuple[list[int | None], list[TokenLogprobs | None]]:
        """Sample rows [len(states), vocab] on the host. Per row: a grammar masks every token it forbids;
        allowed_token_ids masks every other, and bad words their last token where the answer ends with the rest of
        one; logit_bias is added; before min_tokens, stop ids are masked so they cannot end the answer. Logprobs
        see the grammar's mask but not the rest, as vLLM's default raw_logprobs (its grammar bitmask is applied
        to the logits before its sampler, bias and min_tokens inside it). A row whose masking or sampling
        raises gets None (its slot is retired: see _retire)."""
        constrained = [(row, st) for row, st in enumerate(states) if st.grammar is not None]
        biased = [(row, st) for row, st in enumerate(states)
                  if st.stops_masked or st.params.logit_bias or st.params.allowed_token_ids
                  or st.params.bad_words_token_ids]
        failed: set[int] = set()
        # Copies of the rows they change (the backend's tensor stays as it was), not of the whole [rows, vocab]; a
        # greedy row under a grammar alone whose mask is a few ids takes its token without a copy (_greedy)
        changed, known = {}, {}
        unbiased = {row for row, _ in constrained} - {row for row, _ in biased}
        for row in sorted({row for row, _ in (*constrained, *biased)}):
            st, source = states[row], logits[row].detach().to("cpu", torch.float32)
            out = torch.empty_like(source)
            try:
                if st.grammar is None:
                    out.copy_(source)
                else:
                    mask = st.grammar.disallowed()
                    p = st.host_params
                    if row in unbiased and p.greedy and not p.needs_penalties and p.logprobs is None \
                            and (token := _greedy(source, mask, st.grammar.vocab_size)) is not None:
                        known[row] = token
                        continue
                    self._constrain(source, out, mask, st.grammar.vocab_size)
            except Exception:  # e.g. the grammar's mask: that request alone fails, not the step
                log.exception("constraining request %s failed; its slot is retired", st.request_id)
                failed.add(row)
                out.copy_(source)
            changed[row] = out
        raw = {}  # logprobs come from the rows before bias and min_tokens
        for row, st in biased:
            if st.params.logprobs is not None:
                raw[row] = changed[row].clone()
            try:
                self._bias(changed[row], st)
            except Exception:  # one request's own masks: it fails alone, as for its grammar
                log.exception("masking request %s's logits failed; its slot is retired", st.request_id)
                failed.add(row)
        try:
            tokens, logprobs = self._sample(logits, states, changed, raw, known)
        except Exception:  # find the rows at fault; the others are sampled again, one by one
            tokens, logprobs = [], []
            for row, st in enumerate(states):
                try:
                    (token,), (lp,) = self._sample(logits[row:row + 1], [st],
                                                   {0: changed[row]} if row in changed else None,
                                                   {0: raw[row]} if row in raw else None,
                                                   {0: known[row]} if row in known else None)
                except Exception:
                    log.exception("sampling failed for request %s; its slot is retired", st.request_id)
                    token, lp = None, None
                tokens.append(token)
                logprobs.append(lp)
        for row, st in (*constrained, *biased):  # a token drawn at a finite logit shows the row had one: no scan
            token = tokens[row]
            if row in failed or row in known:  # a known token is a finite logit
                continue
            if (token is None or not np.isfinite(changed[row].numpy()[token])) \
                    and not torch.isfinite(changed[row]).any():  # the draw was a banned id
                log.warning("request %s: its constraints leave no token; its slot is retired", st.request_id)
                st.dead_end = True
                failed.add(row)
        for row in failed:
            tokens[row], logprobs[row] = None, None
        return tokens, logprobs

    @staticmethod
    def _constrain(source: torch.Tensor, out: torch.Tensor, mask: tuple[np.ndarray | None, np.ndarray],
                   vocab: int) -> None:
        """`out` [width]: the row of logits `source` with what a grammar's `mask` forbids at -inf (its allowed ids,
        or its forbidden ids or bool mask: GrammarState.disallowed); columns past the grammar's vocabulary (`vocab`:
        a backend's padding to a tile) are never allowed."""
        allowed, forbidden = mask
        if allowed is not None:
            allowed = allowed[allowed < out.shape[0]]
            out.fill_(float("-inf"))
            out.numpy()[allowed] = source.numpy()[allowed]
            return
        n = min(vocab, out.shape[0])
        out.copy_(source)
        if forbidden.dtype == bool:
            np.copyto(out.numpy()[:n], np.float32("-inf"), where=forbidden[:n])
        else:
            out.numpy()[forbidden[forbidden < n]] = float("-inf")
        out[n:] = float("-inf")

    @staticmethod
    def _bias(row: torch.Tensor, st: SlotState) -> None:
        """Add logit_bias to one row of logits [vocab] in place, mask every id allowed_token_ids leaves out and
        each bad word's last token where the answer so far ends with the rest of it (vLLM's rule: the answer's
        tokens only, not the prompt's), and mask stop ids before min_tokens."""
        width = row.shape[0]
        if st.masks_width != width:
            st.masks_width, st.not_allowed, st.bias, st.bad_words = width, None, None, None
        if st.params.allowed_token_ids:
            if st.not_allowed is None:
                st.not_allowed = torch.ones(width, dtype=torch.bool)
                st.not_allowed[[t for t in st.params.allowed_token_ids if t < width]] = False
            row.masked_fill_(st.not_allowed, float("-inf"))
        if st.params.bad_words_token_ids:
            if st.bad_words is None:
                st.bad_words = _bad_word_index(st.params.bad_words_token_ids, width)
            always, by_next_to_last = st.bad_words
            seq, generated = st.token_ids, st.num_generated
            banned = [word[-1] for word in by_next_to_last.get(seq[-1], ())
                      if len(word) - 1 <= generated and tuple(seq[len(seq) - len(word) + 1:]) == word[:-1]]
            row[always] = float("-inf")
            row[banned] = float("-inf")
        if st.params.logit_bias:
            if st.bias is None:
                kept = [(t, b) for t, b in st.params.logit_bias.items() if t < width]
                st.bias = torch.tensor([t for t, _ in kept], dtype=torch.long), torch.tensor([b for _, b in kept])
            ids, biases = st.bias
            row[ids] += biases
        if st.stops_masked:
            row[st.banned_early] = float("-inf")

    @staticmethod
    def _sample(logits: torch.Tensor, states: list[SlotState], changed: dict[int, torch.Tensor] | None = None,
                raw: dict[int, torch.Tensor] | None = None, known: dict[int, int] | None = None
                ) -> tuple[list[int], list[TokenLogprobs | None]]:
        return sample_batch(logits, [st.host_params for st in states], [len(st.token_ids) for st in states],
                            [st.penalties for st in states], changed, raw, known)

    def _retire(self, slot: int, result: StepResult, reason: str) -> None:
        """The slot's request fails alone: "grammar_error" when llguidance gave up on its grammar, and
        "constraint_error" when its constraints together left no token to sample (the client's: a 400 naming the
        field), "error" for anything else on this host (a 500)."""
        result.finished[slot] = reason
        self.slots.pop(slot, None)

    def _advance(self, slot: int, state: SlotState, token: int | None, logprobs: TokenLogprobs | None,
                 result: StepResult) -> None:
        if token is None:  # this slot's host work failed: retire it alone
            self._retire(slot, result, "grammar_error" if state.grammar is not None and state.grammar.failed()
                         else "constraint_error" if state.dead_end else "error")
            return
        if state.grammar is not None:
            try:
                state.grammar.accept(token)
            except ValueError as exc:  # past its CPU budget; a token outside the mask would be this host's fault
                if state.grammar.too_costly:
                    log.warning("request %s: %s; its slot is retired", state.request_id, exc)
                else:
                    log.exception("request %s left its grammar; its slot is retired", state.request_id)
                self._retire(slot, result, "grammar_error")
                return
            except Exception:  # the matcher's own fault: this request fails alone, not the step
                log.exception("request %s: its grammar could not take a token; its slot is retired", state.request_id)
                self._retire(slot, result, "error")
                return
        state.token_ids.append(token)
        if state.penalties is not None:
            state.penalties.add(token)
        result.tokens[slot] = token
        if logprobs is not None:
            result.logprobs[slot] = logprobs
        reason = state.finish_reason(token)
        if reason is None and state.grammar is not None and state.grammar.matcher.is_stopped():
            reason = "stop"  # the grammar admits nothing more (e.g. a stop id it must end with is ignored)
        if reason:
            result.finished[slot] = reason
            self.slots.pop(slot, None)
        else:
            self.slots[slot] = state


def _device_logprobs(live: list[int], states: list[SlotState | None], tokens: list[int],
                     values: torch.Tensor) -> list[TokenLogprobs | None]:
    """The logprob the device gave with each row's token (values [num_slots]), for the rows that ask logprobs 0
    (a None state, a slot retired meanwhile, gets none)."""
    row = values.float().tolist()
    return [None if st is None or st.params.logprobs is None else TokenLogprobs(token, row[s], [])
            for s, st, token in zip(live, states, tokens)]


def _bad_word_index(words: tuple[tuple[int, ...], ...], width: int
                    ) -> tuple[torch.Tensor, dict[int, list[tuple[int, ...]]]]:
    """The words whose last token is within a row of `width`: the one-token ones' ids, masked at every step, and
    the longer ones by their next-to-last token, the only one the answer must have just made for them to match."""
    always: list[int] = []
    by_next_to_last: dict[int, list[tuple[int, ...]]] = {}
    for word in words:
        if word[-1] >= width:
            continue
        if len(word) == 1:
            always.append(word[0])
        else:
            by_next_to_last.setdefault(word[-2], []).append(word)
    return torch.tensor(always, dtype=torch.long), by_next_to_last


def _greedy(source: torch.Tensor, mask: tuple[np.ndarray | None, np.ndarray], vocab: int) -> int | None:
    """The greedy token of the row of logits `source` under a grammar's `mask` (GrammarState.disallowed) as
    numpy's argmax of the masked row would pick it, without laying the mask when it is a few ids: the best of
    the allowed ids (the lowest on a tie), or the row's own best (the first) if not among the forbidden ids.
    None when the mask is a bool one, or the pick is not a finite logit (a NaN, an inf, or none left: the row
    laid whole decides). Laying a 128k row's mask and its argmax cost ~150 us a row on the 2-core box."""
    allowed, forbidden = mask
    values = source.numpy()
    if allowed is not None:
        allowed = allowed[allowed < len(values)]
        token = int(allowed[values[allowed].argmax()]) if len(allowed) else None
    elif forbidden.dtype != bool:
        token = int(values[:min(vocab, len(values))].argmax())
        at = int(np.searchsorted(forbidden, token))  # the forbidden ids are sorted (np.flatnonzero)
        token = None if at < len(forbidden) and forbidden[at] == token else token
    else:
        return None
    return token if token is not None and np.isfinite(values[token]) else None


def _prefetch(grammars: list[GrammarState]) -> None:
    for grammar in grammars:
        grammar.prefetch()
