"""The simulated Galaxy: the real backend's contract and KV accounting, with compute replaced by sleeping
for the published time (galaxy_perf.json), so capacity and scale-out work runs without the hardware.

Tokens are a pure function of the sequence so far, read back through the page table: the fake KV cache
holds the token id written at each position, and the next token is a hash of the last `WINDOW` tokens, of
tokens at exponentially spaced distances back (16, 32, ... 65536, so a wrong block anywhere in a long prefix
shows), and of the position, all gathered through the blocks the caller names. Recompute or migration into other blocks gives
identical tokens; a wrong page table gives different ones, so paging bugs show up as wrong outputs. Like a
Galaxy, it keeps one KV cache per group (mesh column): slot s reads and writes only group s // (slots per
group), so a block id reused from another group's slot reads memory that group never wrote (wrong tokens).
The parameters never change the token: it is what any sampler would pick from a one-hot distribution.
"""
from __future__ import annotations

import bisect
import functools
import json
import math
import time
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import torch

from model.backend import SAMPLING_FIELDS, Backend, Capabilities, DecodeOutput, check_num_slots
from model.galaxy import (BLOCK_SIZE, KV_GROUPS, LLAMA3_EOS, LLAMA3_VOCAB, MAX_TIME_SCALE, NUM_SLOTS, PREFIX_ALIGN,
                          padded_prefill_len, simulated_sizes)
from scheduler.sampling import PromptLogprobs, SamplingParams


WINDOW = 8  # the last tokens the next token depends on
DEMO_MEAN_GENERATED = 64  # the demo's decode rates average 128 generated tokens: mean context is input + 64
_BACK = np.concatenate([2 ** np.arange(16, 3, -1), np.arange(WINDOW - 1, -1, -1)])  # distances back, oldest first
_BACK_COLUMN = _BACK[:, None]  # _window_at's rows: one per distance
_MIXERS = np.random.default_rng(0x6A1A).integers(1, 2**63, size=len(_BACK) + 1, dtype=np.uint64) | np.uint64(1)
_LOGIT_FLOOR = -1e4  # far enough below the chosen token that no temperature or penalty can flip it
# The other tokens fall by this much per id below the floor: no two tie (distinct in float32 down to -11,283), as in
# a real model's logits. Tied, the whole vocabulary tied with top-k's k-th logit, and sampling sorted all of it
# (~50 ms a row on the 2-core box: the demo's log-probs preset ran 80 times slower than a Galaxy would).
_LOGIT_STEP = 0.01
_MAX_CATCH_UP_S = 0.010  # oversleep repaid on the next call, so a loaded host keeps the published rate


@dataclass(frozen=True)
class GalaxyTiming:
    """Published prefill and decode times (galaxy_perf.json), interpolated log-log between rows (prefill and
    attention cost grow as powers of length between the measured points), clamped outside them.

    TTFT is per user (the Galaxy prefills one user at a time). A decode step runs all 32 slots in one
    fixed-shape trace: it takes a lone user's step at the longest live context, plus `others_s_per_token` for
    each token of context the other live users hold (their attention reads). PERF.md's pairs of rows at one
    input length for batch 1 and batch 32 give that cost: 31 ns per token at 1K (16.53 vs 17.58 ms a step)
    and 30 ns at 4K (18.50 vs 22.43 ms). No batch-32 row is published beyond 4K, so a long full batch is
    this linear rule extrapolated. At 128 tokens PERF.md gives one row for batch 1 and 32 alike (14.28 ms);
    the json keeps it as batch 32's, so a lone 128-token user steps 1.3% faster than that row here. A row's
    tokens/s/user was measured over the demo's 128 generated tokens after input_tokens, so it is placed at
    the mean context of that run, input_tokens + DEMO_MEAN_GENERATED.
    """

    lengths: tuple[int, ...]
    ttft_s: tuple[float, ...]
    step_s: tuple[float, ...]  # a lone user's decode step at each of step_contexts
    others_s_per_token: float = 0.0

    @classmethod
    def published(cls) -> GalaxyTiming:
        rows = published_figures()["by_input_length"]
        step = {(r["input_tokens"], r["batch"]): 1 / r["decode_tokens_per_s_per_user"] for r in rows}
        per_token = [(s - step[n, 1]) / ((b - 1) * (n + DEMO_MEAN_GENERATED))
                     for (n, b), s in step.items() if b > 1 and (n, 1) in step]
        others = sum(per_token) / len(per_token) if per_token else 0.0
        lengths = sorted({n for n, _ in step})
        ttft = [float(np.mean([r["ttft_ms"] / 1000 for r in rows if r["input_tokens"] == n])) for n in lengths]
        lone = [step.get((n, 1)) or min(s - others * (b - 1) * (n + DEMO_MEAN_GENERATED)
                                        for (m, b), s in step.items() if m == n) for n in lengths]
        return cls(tuple(lengths), tuple(ttft), tuple(lone), others)

    @functools.cached_property  # every simulated step reads it
    def step_contexts(self) -> tuple[int, ...]:
        return tuple(n + DEMO_MEAN_GENERATED for n in self.lengths)

    def ttft(self, num_tokens: int) -> float:
        return _loglog(num_tokens, self.lengths, self.ttft_s)

    def prefill_seconds(self, start: int, end: int) -> float:
        """Computing positions [start, end) after a cached prefix: the extra cost over the prefix, never less
        than a fresh prefill of that many tokens. The device computes the new tokens padded to the generator's
        length (`padded_prefill_len`), so a 3,850-token prompt costs the published 4,096-token row."""
        new = padded_prefill_len(end - start)
        if start == 0:
            return self.ttft(new)
        return max(self.ttft(start + new) - self.ttft(start), self.ttft(new))

    def decode_step_seconds(self, longest: int, others: int = 0) -> float:
        """Seconds of one decode step: the longest live context `longest` tokens, and `others` tokens of context
        held by the other live users in all."""
        return _loglog(longest, self.step_contexts, self.step_s) + self.others_s_per_token * others

    def batch_step_seconds(self, context: int, users: int = NUM_SLOTS) -> float:
        """A step of `users` users each at `context` tokens (the published batch rows)."""
        return self.decode_step_seconds(context, (users - 1) * context)

    def slowest_step_seconds(self, max_seq_len: int, cache_tokens: int, users: int = NUM_SLOTS) -> float:
        """The slowest step a mesh can take: a user at max_seq_len, and the others holding what is left of
        the `cache_tokens` its KV caches hold (what the router's step deadlines assume)."""
        return self.decode_step_seconds(max_seq_len, min(cache_tokens - max_seq_len, (users - 1) * max_seq_len))


def _loglog(x: float, xs: tuple[int, ...], ys: tuple[float, ...]) -> float:
    """y at x, linear between the points (xs ascending) in log-log space, clamped outside them. Plain Python:
    np.interp on a scalar cost ~25 us on the 2-core box, and every simulated step asks once."""
    x = max(x, 1)
    i = bisect.bisect_left(xs, x)
    if i == len(xs):
        return ys[-1]
    if i == 0 or xs[i] == x:
        return ys[i]
    t = math.log(x / xs[i - 1]) / math.log(xs[i] / xs[i - 1])
    return math.exp(math.log(ys[i - 1]) + t * math.log(ys[i] / ys[i - 1]))


def published_figures() -> dict:
    return json.loads(files("model").joinpath("galaxy_perf.json").read_text())


class SimulatedBackend(Backend):
    """`time_scale` multiplies every sleep (0.1 runs ten times faster than the Galaxy). `device_seconds`
    totals the simulated device time. `eos_rate` makes that fraction of tokens an EOS (default: never).

    It samples every field itself except `top_logprobs`, `logit_bias`, `allowed_token_ids`, bad words and `grammar`:
    those take the logits path,
    which returns one-hot-like logits [*, vocab] (the chosen token at 0, the rest at -1e4 and below, lower for
    higher ids; ~16 MB per decode step at the Llama 3 vocab, a few ms), so host sampling picks the same token
    whatever its parameters, unless a mask rules it out (allowed_token_ids, a bad word, a grammar: then the best
    token left, the lowest allowed id). A logit_bias, at most 100 either way, never bridges the 1e4 below the
    chosen token: on this backend -100 bans nothing and +100 forces nothing (the real backends' logits are spread
    over tens, not thousands). A request asking its sampled token's logprob alone (logprobs 0) stays on the
    device, as on tt-metal's Galaxy (TTGalaxyBackend.decode_logprobs): 0.0, its one-hot row's log_softmax at the
    token (exp of -1e4 is 0 in float32), the value the host computes from that row.
    """

    def __init__(self, *, time_scale: float = 1.0, num_slots: int = NUM_SLOTS, block_size: int = BLOCK_SIZE,
                 num_blocks: int | None = None, kv_groups: int = KV_GROUPS, max_seq_len: int | None = None,
                 vocab_size: int = LLAMA3_VOCAB, eos_token_ids: tuple[int, ...] = LLAMA3_EOS, eos_rate: float = 0.0,
                 timing: GalaxyTiming | None = None):
        """num_blocks is per KV group. None sizes like the Galaxy: 128k tokens, and per group a pool for one
        such user plus a block for each slot of the group (2,056 blocks). Checked as the config checks them (built
        directly, by bench/demo.py, too): a size past model.galaxy's ceilings would exhaust memory."""
        if not 0 < time_scale <= MAX_TIME_SCALE:
            raise ValueError(f"time_scale: more than 0 and at most {MAX_TIME_SCALE:g}, not {time_scale} (far past it "
                             "the simulated mesh cannot sleep that long)")
        check_num_slots(num_slots)  # before anything sized by it
        if kv_groups < 1 or num_slots % kv_groups:
            raise ValueError(f"{num_slots} slots cannot be split evenly over {kv_groups} KV groups")
        max_seq_len, num_blocks = simulated_sizes(num_slots, kv_groups, max_seq_len, num_blocks, block_size)
        timing = timing or GalaxyTiming.published()
        self.caps = Capabilities(num_slots=num_slots, block_size=block_size, num_blocks=num_blocks,
                                 max_seq_len=max_seq_len, prefix_align=PREFIX_ALIGN, vocab_size=vocab_size,
                                 eos_token_ids=tuple(eos_token_ids), kv_groups=kv_groups,
                                 device_sampling=SAMPLING_FIELDS - {"logit_bias", "grammar", "allowed_token_ids",
                                                                    "bad_words_token_ids"},
                                 decode_step_s=timing.slowest_step_seconds(
                                     max_seq_len, kv_groups * num_blocks * block_size, num_slots) * time_scale,
                                 prefill_token_s=timing.ttft(max_seq_len) / max_seq_len * time_scale,
                                 prompt_logprobs=True, async_decode=True)
        self.time_scale = time_scale
        self.timing = timing
        self.eos_rate = eos_rate
        self.device_seconds = 0.0
        # The token id written at each position, per KV group: [kv_groups, num_blocks, block_size], a view of
        # _kv_flat: [group, block, offset] flattened, and after them one -1 that no position names, which _window_at's
        # index -1 reads for a position before 0.
        self._kv_flat = np.full(kv_groups * num_blocks * block_size + 1, -1, dtype=np.int32)
        self.kv = self._kv_flat[:-1].reshape(kv_groups, num_blocks, block_size)
        self._group_of_slot = np.arange(num_slots) // (num_slots // kv_groups)
        self._group_base = self._group_of_slot * num_blocks  # each slot's group's first block in _kv_flat
        self._ordinary_ids = np.setdiff1d(np.arange(vocab_size), eos_token_ids)
        self._floor = _LOGIT_FLOOR - _LOGIT_STEP * torch.arange(vocab_size, dtype=torch.float32)  # _one_hot's row
        self._late = 0.0
        self._free_at = 0.0  # when the device ends the last step decode_async started (perf_counter seconds)

    def prefill(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                sampling: SamplingParams | None = None) -> torch.Tensor:
        entered = time.perf_counter()
        bs, end = self.caps.block_size, len(token_ids)
        if not 0 <= start < end <= min(len(block_ids) * bs, self.caps.max_seq_len):
            raise ValueError(f"cannot prefill [{start}, {end}) into {len(block_ids)} blocks")
        table = np.asarray(block_ids, dtype=np.int64)[None]
        positions = np.arange(start, end)
        group = self._group_of_slot[slot]
        self.kv[group, table[0, positions // bs], positions % bs] = token_ids[start:]
        last = np.array([end - 1])
        token = self._next_tokens(self._window_at(table, np.zeros(1, dtype=np.int64), last,
                                                  self._group_base[slot:slot + 1]), last)
        self._occupy(entered, self.timing.prefill_seconds(start, end))
        return torch.tensor(int(token[0])) if sampling is not None else self._one_hot(token)[0]

    def prefill_prompt_logprobs(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                                num_logprobs: int, targets: list[int]) -> tuple[PromptLogprobs | None, torch.Tensor]:
        """As prefill, and the targets scored from each position's one-hot logits (_one_hot) in closed form: their
        log_softmax is 0 at the token the rule makes and the floor's value elsewhere (exp(-1e4) is 0 in float32), so
        a 4,096-token chunk at a 128k vocabulary costs no [rows, vocab] pass (score_prompt over them took ~15 s
        on the 2-core box, past what the timing model gives a prefill)."""
        last = self.prefill(token_ids, start, block_ids, slot)
        rows = len(targets)
        if not rows:
            return None, last
        positions = np.arange(start, start + rows)
        table = np.asarray(block_ids, dtype=np.int64)[None]
        at = self._window_at(table, np.zeros(rows, dtype=np.int64), positions, np.full(rows, self._group_base[slot]))
        made = self._next_tokens(at, positions)
        target = np.asarray(targets, dtype=np.int64)
        floor = self._floor.numpy()
        hit = target == made
        # the floor falls with the id: ids up to the target's, the made one aside, are at least as likely
        ranks = np.where(hit, 1, target + 2 - (made <= target))
        others = np.arange(max(num_logprobs - 1, 0))[None, :]
        others = others + (others >= made[:, None])  # the likeliest after the made token: the lowest other ids
        top_ids = np.concatenate([made[:, None], others], axis=1)[:, :num_logprobs]
        top_logprobs = np.concatenate([np.zeros((rows, 1), np.float32), floor[others]], axis=1)[:, :num_logprobs]
        return PromptLogprobs(start + 1, np.where(hit, 0.0, floor[target]).astype(np.float32), ranks.astype(np.int32),
                              top_ids.astype(np.int32), top_logprobs.astype(np.float32)), last

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
               active: torch.Tensor, sampling: list[SamplingParams | None] | None = None) -> torch.Tensor:
        next_tokens = self._step(tokens, positions, page_table, active)
        return torch.from_numpy(next_tokens) if sampling is not None else self._one_hot(next_tokens)

    def decode_logprobs(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
                        active: torch.Tensor, sampling: list[SamplingParams | None]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """decode with sampling, and each token's logprob: 0.0 (the class docstring)."""
        next_tokens = self.decode(tokens, positions, page_table, active, sampling)
        return next_tokens, torch.zeros(len(next_tokens), dtype=torch.float32)

    def decode_mixed(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
                     active: torch.Tensor, sampling: list[SamplingParams | None], host_rows: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled tokens for every row and one-hot logits for `host_rows`, from one step."""
        next_tokens = self._step(tokens, positions, page_table, active)
        return torch.from_numpy(next_tokens), self._one_hot(next_tokens[host_rows])

    def decode_async(self, tokens: torch.Tensor | DecodeOutput, positions: torch.Tensor, page_table: torch.Tensor,
                     active: torch.Tensor, sampling: list[SamplingParams | None]) -> DecodeOutput:
        """As decode with sampling, on the device's timeline: the step starts when the one before it ends (now, if
        the device is idle), and its tokens are ready the step's time later. Only reading them holds the host."""
        entered = max(time.perf_counter(), self._free_at)
        chained = isinstance(tokens, _SimulatedOutput)
        next_tokens, seconds = self._compute(tokens.on_device if chained else tokens.numpy(), positions, page_table,
                                             active)
        scaled = seconds * self.time_scale
        self.device_seconds += scaled
        self._free_at = entered + scaled
        return _SimulatedOutput(next_tokens, self._free_at)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
              active: torch.Tensor) -> np.ndarray:
        entered = time.perf_counter()
        next_tokens, seconds = self._compute(tokens.numpy(), positions, page_table, active)
        self._occupy(entered, seconds)
        return next_tokens

    def _compute(self, tokens: np.ndarray, positions: torch.Tensor, page_table: torch.Tensor, active: torch.Tensor
                 ) -> tuple[np.ndarray, float]:
        """Write the active rows' tokens at their positions: (the next token of every row [num_slots], the step's
        unscaled seconds). The rows' blocks are gathered from the full-width page table in place: a copy of its
        rows is 256 KiB at 128k tokens (~130 us a step on the 2-core box)."""
        rows = np.flatnonzero(active.numpy())
        pos = positions.numpy()[rows]
        at = self._window_at(page_table.numpy(), rows, pos, self._group_base[rows])
        self._kv_flat[at[-1]] = tokens[rows]  # distance 0: the token at its position
        next_tokens = np.zeros(self.caps.num_slots, dtype=np.int64)
        next_tokens[rows] = self._next_tokens(at, pos)
        context = pos.tolist()  # plain Python: numpy's reductions cost more than 32 additions
        longest = max(context, default=-1) + 1
        return next_tokens, self.timing.decode_step_seconds(longest, sum(context) + len(context) - longest)

    def _window_at(self, table: np.ndarray, rows: np.ndarray, last: np.ndarray, bases: np.ndarray) -> np.ndarray:
        """Indices into the flat KV cache [len(_BACK), len(rows)] of the positions `last - _BACK` of each row, read
        through its page table row `table[row]` in its KV group's cache (block `bases[i]` of the flat cache on:
        _group_base), and -1 (the -1 after the cache) for a position before 0.

        Every numpy pass here costs ~1 us on the 2-core box however little it computes (32 rows of 21), and one that
        broadcasts a row's value along the other axis a little more, so this makes few: the block's column is found
        in the flattened table (a view, the runner's table being contiguous; rows * width on from each row's start),
        and block * bs + window % bs is (block - column) * bs + window. A row's values lie along the last axis,
        where numpy's inner loop broadcasts the distances most cheaply."""
        bs = self.caps.block_size
        starts = rows * table.shape[1]
        window = last - _BACK_COLUMN
        before = window < 0
        np.maximum(window, 0, out=window)
        column = window // bs
        column += starts
        at = table.reshape(-1)[column] + (bases + starts)  # int64, as bases are
        at -= column
        at *= bs
        at += window
        np.putmask(at, before, -1)
        return at

    def _next_tokens(self, at: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Hash of the tokens at the flat KV indices `at` of each row (_window_at; -1 before position 0) and of
        its position `last`."""
        # The uint64 sum of products the rule is, the int32 tokens cast inside the ufuncs (no pass of their own).
        # In uint64, not int64: C defines unsigned arithmetic mod 2**64 and a negative int's conversion to unsigned
        # (C11 6.3.1.3, 6.2.5p9), but a signed overflow is undefined, and numpy's int64 loops are plain C arithmetic
        # (numpy's data types guide only calls an overflow's result incorrect; its UBSan runs report signed overflow in
        # its integer loops: numpy#24209).
        h = np.matmul(_MIXERS[:-1], self._kv_flat[at], dtype=np.uint64, casting="unsafe")
        h += np.multiply(last, _MIXERS[-1], dtype=np.uint64, casting="unsafe")
        h = _splitmix(h)
        tokens = self._ordinary_ids[h % np.uint64(len(self._ordinary_ids))]
        if self.eos_rate and self.caps.eos_token_ids:
            uniform = (h >> np.uint64(11)).astype(np.float64) / 2.0**53
            tokens = np.where(uniform < self.eos_rate, self.caps.eos_token_ids[0], tokens)
        return tokens

    def _one_hot(self, tokens: np.ndarray) -> torch.Tensor:
        logits = self._floor.expand(len(tokens), -1).clone()
        logits[torch.arange(len(tokens)), torch.from_numpy(tokens)] = 0.0
        return logits

    def _occupy(self, entered: float, seconds: float) -> None:
        """Hold the caller until `seconds` (scaled) after it entered, or after the device ends a step decode_async
        started, sleeping rather than spinning."""
        entered = max(entered, self._free_at)
        scaled = seconds * self.time_scale
        self.device_seconds += scaled
        deadline = entered + scaled - self._late
        now = time.perf_counter()
        if deadline > now:
            time.sleep(deadline - now)
            now = time.perf_counter()
        self._late = min(max(now - deadline, 0.0), _MAX_CATCH_UP_S)


class _SimulatedOutput(DecodeOutput):
    def __init__(self, on_device: np.ndarray, ready_at: float):
        self.on_device = on_device  # what a chained step reads without the host: int64 [num_slots]
        self.ready_at = ready_at  # perf_counter seconds

    def tokens(self) -> torch.Tensor:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return torch.from_numpy(self.on_device)

    def logprobs(self) -> torch.Tensor:
        """Each token's logprob: 0.0 (SimulatedBackend's docstring)."""
        return torch.zeros(len(self.tokens()), dtype=torch.float32)


_SPLITMIX = tuple(np.uint64(c) for c in (30, 0xBF58476D1CE4E5B9, 27, 0x94D049BB133111EB, 31))


def _splitmix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output. In place."""
    s1, m1, s2, m2, s3 = _SPLITMIX
    h ^= h >> s1
    h *= m1
    h ^= h >> s2
    h *= m2
    h ^= h >> s3
    return h


def calibration_max_rel_err(reps: int = 2, decode_steps: int = 8, max_call_s: float = 0.7) -> float:
    """Worst relative error between measured wall time and the published TTFT and tokens/s/user rows.

    Each row runs on a fresh backend: `reps` prefills of input_tokens, then `decode_steps` steps with
    `batch` live slots at the row's mean decode context (input_tokens + DEMO_MEAN_GENERATED). Calls are
    timed with the real clock. Decode steps (at most 91 ms)
    and prefills up to `max_call_s` run at time_scale 1; longer prefills (32k-128k: 9.5-102 s) run at
    time_scale max_call_s / ttft and the measured time is divided by that scale.
    """
    rows = published_figures()["by_input_length"]
    worst = 0.0
    greedy = SamplingParams(temperature=0.0)
    for row in rows:
        n, batch = row["input_tokens"], row["batch"]
        ttft = row["ttft_ms"] / 1000
        blocks_per_seq = -(-(n + DEMO_MEAN_GENERATED + decode_steps) // BLOCK_SIZE)
        backend = SimulatedBackend(time_scale=min(1.0, max_call_s / ttft), num_blocks=batch * blocks_per_seq)
        prompt = list(range(n))
        began = time.perf_counter()
        for _ in range(reps):
            backend.prefill(prompt, 0, list(range(blocks_per_seq)), 0, greedy)
        measured_ttft = (time.perf_counter() - began) / reps / backend.time_scale

        backend.time_scale = 1.0
        table = torch.arange(NUM_SLOTS * blocks_per_seq, dtype=torch.int32).reshape(NUM_SLOTS, -1)
        table[batch:] = 0
        active = torch.arange(NUM_SLOTS) < batch
        tokens = torch.zeros(NUM_SLOTS, dtype=torch.long)
        sampling = [greedy] * NUM_SLOTS
        began = time.perf_counter()
        for step in range(decode_steps):
            position = torch.full((NUM_SLOTS,), n + DEMO_MEAN_GENERATED - decode_steps // 2 + step)
            tokens = backend.decode(tokens, position, table, active, sampling)
        measured_step = (time.perf_counter() - began) / decode_steps

        published_step = 1 / row["decode_tokens_per_s_per_user"]
        worst = max(worst, abs(measured_ttft - ttft) / ttft, abs(measured_step - published_step) / published_step)
    return worst
