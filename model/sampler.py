"""The host-side batch sampler: one row of logits per slot, each with its own SamplingParams.

It is reproducible per token: a seeded row draws its noise from a generator keyed on (seed, position), so a
sequence recomputed after preemption or migration to another mesh samples the same tokens.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from scheduler.sampling import MIN_LOGPROB, PromptLogprobs, SamplingParams, TokenLogprobs

_UNSEEDED = np.random.default_rng()  # numpy's Generator locks itself: meshes on threads may share it
BATCHED_TOP_K = 64  # unseeded rows with a top_k up to this are sampled together (_sample_top_k_rows)
NUCLEUS_SEARCH = 1024  # top-p alone: the tokens its nucleus is looked for in before the whole row is sorted
NUCLEUS_STRIDE = 16  # top-p alone: every this-th logit gives the threshold _nucleus_search narrows the row by
PROMPT_ROWS_PER_SLICE = 128  # logits rows scored at once: 128 x a 128k vocabulary is 64 MiB of float32


def score_prompt(logits: Callable[[int, int], torch.Tensor], targets: torch.Tensor, start: int,
                 num_logprobs: int) -> PromptLogprobs:
    """The logprobs of prompt tokens `targets` [T] (prompt token start + i is targets[i]) from their preceding
    positions' logits, `logits(i, j)` giving rows [i, j) [j - i, vocab]: the raw log_softmax (vLLM's default),
    vLLM's rank (how many tokens are at least as likely as the prompt token) and the num_logprobs likeliest.
    A slice of rows at a time, so a long chunk never holds [T, vocab] float32 twice."""
    n = len(targets)
    out = PromptLogprobs(start, np.empty(n, np.float32), np.empty(n, np.int32),
                         np.empty((n, num_logprobs), np.int32), np.empty((n, num_logprobs), np.float32))
    for i in range(0, n, PROMPT_ROWS_PER_SLICE):
        j = min(i + PROMPT_ROWS_PER_SLICE, n)
        # raw, -inf and values past the floor kept (the ingress floors what it sends), but for a NaN logit's row
        lp = torch.log_softmax(logits(i, j).float(), dim=-1).nan_to_num(nan=MIN_LOGPROB, neginf=float("-inf"))
        chosen = lp.gather(1, targets[i:j, None].long())
        out.logprobs[i:j] = chosen[:, 0].numpy()
        out.ranks[i:j] = (lp >= chosen).sum(dim=1).numpy()
        if num_logprobs:
            top = lp.topk(num_logprobs, dim=1)
            out.top_ids[i:j] = top.indices.numpy()
            out.top_logprobs[i:j] = top.values.numpy()
    return out


def finite_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, floored at vLLM's -9999: JSON carries neither the -inf of a -inf logit
    nor the NaN a NaN logit (a backend's overflow) spreads over its whole row."""
    return _floored(logits.log_softmax(-1))


def _floored(logprobs: torch.Tensor) -> torch.Tensor:
    """finite_logprobs' floor, element by element: applied to a few logprobs, the same values as to the whole row."""
    return torch.nan_to_num(logprobs, nan=MIN_LOGPROB).clamp(min=MIN_LOGPROB)


def _noise(n: int, seed: int | None, position: int) -> torch.Tensor:
    """Exp(1) noise [n] on the CPU, > 0; seeded: Philox keyed on (seed, position), so every pair has its own
    stream (torch's CPU generator keeps only a seed's low 32 bits: seeds 5 and 5 + 2**32 drew alike).
    numpy's float32 draw is exactly 0 about once in 2e7 (a 128k vocabulary's draw holds one ~1% of the time),
    and a token filtered or masked to probability 0 would then score 0/0 = NaN, which argmax picks: a zero
    becomes float32's smallest normal, which changes no other draw."""
    if seed is None:
        noise = torch.from_numpy(_UNSEEDED.standard_exponential(n, np.float32))  # a third of torch's exponential_
    else:
        key = np.array([seed, position], dtype=np.uint64)
        noise = torch.from_numpy(np.random.Generator(np.random.Philox(key=key)).standard_exponential(n, np.float32))
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


class PenaltyState:
    """One sequence's tokens as penalties read them: the distinct ids of its prompt and output, and how often
    each id came in its output, over a vocabulary of `vocab` ids (ids outside it are ignored). Built from the
    tokens so far in one vectorised pass, then kept up to date a token at a time (`add`, ~1 us): rebuilt from
    the whole sequence at every step, they cost O(prompt + output) per token on the mesh host (a 100k-token
    prompt: ~40 ms a step on the 2-core box, which every slot of the mesh waits for). A step then touches
    only the ids the sequence holds. numpy arrays: a scalar update costs a fraction of a tensor's."""

    def __init__(self, vocab: int, prompt_ids=(), output_ids=()):
        self.vocab = vocab
        prompt, output = (_in_vocab(ids, vocab) for ids in (prompt_ids, output_ids))
        self.counts = np.bincount(output, minlength=vocab).astype(np.int32)  # [vocab]: each id's count in the output
        self._seen = np.zeros(vocab, dtype=bool)
        self._seen[prompt] = True
        self._seen[output] = True
        self._seen_ids = np.empty(vocab, dtype=np.int64)  # the distinct ids of prompt and output
        self._output_ids = np.empty(vocab, dtype=np.int64)  # the distinct ids of the output
        self._num_seen = _fill(self._seen_ids, np.flatnonzero(self._seen))
        self._num_output = _fill(self._output_ids, np.flatnonzero(self.counts))

    @property
    def seen_ids(self) -> torch.Tensor:
        return torch.from_numpy(self._seen_ids[:self._num_seen])

    @property
    def output_ids(self) -> torch.Tensor:
        return torch.from_numpy(self._output_ids[:self._num_output])

    def add(self, token: int) -> None:
        """A token of the output."""
        if not 0 <= token < self.vocab:
            return
        if not self._seen[token]:
            self._seen[token] = True
            self._seen_ids[self._num_seen] = token
            self._num_seen += 1
        if not self.counts[token]:
            self._output_ids[self._num_output] = token
            self._num_output += 1
        self.counts[token] += 1


def _in_vocab(ids, vocab: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids[(ids >= 0) & (ids < vocab)]


def _fill(buffer: np.ndarray, values: np.ndarray) -> int:
    buffer[:len(values)] = values
    return len(values)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, state: PenaltyState) -> torch.Tensor:
    """vLLM semantics: repetition over prompt + output, presence/frequency over output only. logits [width], on
    any device: ids at or past `width` (a row narrower than the vocabulary) are skipped, and a wider row's ids
    past the vocabulary are left as they are."""
    logits = logits.clone()
    width = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        ids = _below(state.seen_ids, width, state.vocab).to(logits.device)
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        ids = _below(state.output_ids, width, state.vocab)
        counts = torch.from_numpy(state.counts)[ids].to(logits.device, logits.dtype)
        logits[ids.to(logits.device)] -= params.frequency_penalty * counts + params.presence_penalty
    return logits


def _below(ids: torch.Tensor, width: int, vocab: int) -> torch.Tensor:
    return ids if width >= vocab else ids[ids < width]


def _filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the likeliest's (after temperature, before top-k/top-p,
    as vLLM's v1 sampler orders them)."""
    if not min_p:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def _kept(scaled: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What top-k and then top-p keep of a row [vocab] (vLLM's order: top-p over the top-k renormalised), as
    (ids [n], logits [n]) with the likeliest first; None when neither filter is on or every logit is -inf.
    Ties with the k-th logit stay (a mask `logits < kth`, as vLLM's); top-p keeps the smallest prefix reaching
    top_p, and the top token always. Found with torch.topk, not a sort of the whole row: a 128k-token sort costs
    ~10 ms of a mesh host's CPU per row on the 2-core box, and every slot of the mesh waits for its host rows.
    Top-p alone looks in the best NUCLEUS_SEARCH tokens first and sorts the row only when they fall short."""
    vocab = scaled.shape[-1]
    top_k = top_k if 0 < top_k < vocab else 0
    if not top_k and top_p >= 1.0:
        return None
    ids = _nucleus_search(scaled, top_k or NUCLEUS_SEARCH)
    if ids is None:
        kth = torch.topk(scaled, top_k or min(NUCLEUS_SEARCH, vocab)).values[-1]
        # the ties with the k-th too, none at -inf: a pass over the row less when the k-th is finite (~0.15 ms at 128k)
        ids = torch.nonzero(scaled >= kth if kth > float("-inf") else scaled > kth).squeeze(1)
    # likeliest first and, among equal logits, lowest id first: a tie at top-p's cut goes the same way on every device
    vals, order = torch.sort(scaled[ids], descending=True, stable=True)
    ids = ids[order]
    if top_k:
        probs = vals.softmax(-1)
    else:
        # softmax over the row, not exp(vals - logsumexp(row)): torch 2.13's CPU logsumexp takes 0.5-0.8 ms for a 128k
        # row that a grammar masked to -inf in part (~60 us unmasked), its softmax ~75 us either way (2-core box)
        probs = scaled.softmax(-1)[ids]
        if float(probs.sum()) < top_p:  # a wider nucleus than the search
            vals, ids = torch.sort(scaled, descending=True, stable=True)
            probs = vals.softmax(-1)
    if not len(vals) or vals[0] == float("-inf"):
        return None
    if top_p < 1.0:
        keep = max(1, int((probs.cumsum(-1) - probs < top_p).sum()))  # a top_p under float32's range is 0 here
        ids, vals = ids[:keep], vals[:keep]
    return ids, vals


def _nucleus_search(scaled: torch.Tensor, k: int = NUCLEUS_SEARCH) -> torch.Tensor | None:
    """The ids (ascending) of a row's [vocab] tokens at or above its k-th largest logit, none at -inf: the same set
    as torch.topk's k-th and a pass, found without topk over the whole row (~0.7 ms at 128k on the 2-core box, and
    nonzero over a low k-th ~0.6 ms more; a top-k row with logprobs, which sample_row takes, spent ~0.5 ms on them
    at k <= 32). A threshold from every NUCLEUS_STRIDE-th logit, which ~2 x k of a model's row are above, narrows
    the row to those; the k-th is found among them (every logit at or above it is above the threshold, as at least
    k are). A row with fewer above (ties, a grammar's -inf) is narrowed to its finite logits. None off the CPU, for
    a short row or a NaN (the caller's topk then), as numpy's comparisons and topk's order differ there."""
    if scaled.device.type != "cpu" or scaled.dtype != torch.float32:
        return None
    ids = _at_or_above_kth(scaled.detach().numpy(), k)
    return None if ids is None else torch.from_numpy(ids)


def _at_or_above_kth(row: np.ndarray, k: int) -> np.ndarray | None:
    """The ids (ascending) of row's [vocab] float32 logits at or above its k-th largest, none at -inf
    (_nucleus_search); None for a row shorter than NUCLEUS_STRIDE x k or with a NaN anywhere: topk counts a NaN
    as the largest, which the comparisons here leave out (a NaN the stride did not read made a top-k row's kept
    set the k best finite logits, where topk's left sample_row the k - 1 best). A row's max is NaN exactly when
    it holds one (numpy's max propagates NaN): ~6 us a 128k row on the 2-core box."""
    if len(row) < NUCLEUS_STRIDE * k or np.isnan(row.max()):
        return None
    sample = row[::NUCLEUS_STRIDE]
    # at most the sample's length: a row of 16-48 logits at k <= 3 samples 1-3 (np.partition's kth out of bounds,
    # where 4-7 wrapped round as a negative kth); any rank finds the same ids, a lower one only narrows less
    rank = min(max(2 * k // NUCLEUS_STRIDE, 8), len(sample))
    threshold = np.partition(sample, len(sample) - rank)[len(sample) - rank]
    ids = np.flatnonzero(row >= threshold) if threshold > -np.inf else np.empty(0, np.int64)
    if len(ids) < k:
        ids = np.flatnonzero(row > -np.inf)
        if len(ids) <= k:
            return ids
    vals = row[ids]
    return ids[vals >= np.partition(vals, len(vals) - k)[len(vals) - k]]


def argmax(logits: torch.Tensor) -> torch.Tensor | np.ndarray:
    """The index of each row's largest logit (logits [..., vocab]), the first on a tie, a NaN's if the row has one,
    as torch.argmax; by numpy for float32 on the CPU. torch 2.13's CPU argmax takes ~170 us for one 128k row on
    the 2-core box (2.7 ms for 32 rows), numpy's ~6 us: greedy host sampling of a constrained batch spent ~7 ms of
    each step there, beside a Galaxy's 14 ms step (bench/grammar_cost.py)."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu":
        return logits.detach().numpy().argmax(-1)  # first occurrence; a NaN wins, as in torch (test_sampling)
    return torch.argmax(logits, dim=-1)


def sample_row(logits: torch.Tensor, params: SamplingParams, position: int, penalties: PenaltyState | None = None,
               raw: torch.Tensor | None = None) -> tuple[int, TokenLogprobs | None]:
    """Sample one token from one row of logits [vocab]. `position` is the new token's position; `penalties`
    the sequence's tokens, which params' penalties need: without them, none is applied.

    Logprobs are the model's own distribution: `raw` [vocab] (the row before logit_bias and the min_tokens
    mask; default `logits`), before penalties, temperature and top-k/top-p, as vLLM reports them by default
    (logprobs_mode "raw_logprobs"). A grammar's mask is in `raw`, as vLLM applies it before its sampler: a
    guided choice's logprobs are the model's, renormalised over what the grammar allows."""
    raw = logits if raw is None else raw
    logits = logits.float()
    if params.needs_penalties and penalties is not None:
        logits = apply_penalties(logits, params, penalties)
    if params.greedy:
        token = int(argmax(logits))
    else:
        scaled = _filter_min_p(logits / params.temperature, params.min_p)
        # Noise is drawn on the CPU whatever the logits' device, for the whole vocabulary whatever the filters
        # keep: the same (seed, position) gives the same token on every backend, so a sequence migrated to
        # another mesh continues identically.
        kept = _kept(scaled, params.top_k, params.top_p)
        if kept is None:
            noise = _noise(scaled.shape[-1], params.seed, position).to(scaled.device)
            token = int(argmax(scaled.softmax(-1) / noise))  # Gumbel-style race: an exact draw from probs
        else:  # the same race among the kept tokens (the others' probability is 0); unseeded, only theirs is drawn;
            # seeded, the stream up to the last kept id: numpy fills an array a draw at a time, in order
            # (random_standard_exponential_fill_f), so a shorter draw is the longer one's prefix
            ids, vals = kept
            noise = _noise(int(ids.max()) + 1 if params.seed is not None else len(ids), params.seed, position)
            noise = noise.to(scaled.device)
            token = int(ids[torch.argmax(vals.softmax(-1) / (noise[ids] if params.seed is not None else noise))])
    lp = None
    if params.logprobs:
        logp = finite_logprobs(raw.float())
        top = torch.topk(logp, params.logprobs)
        lp = TokenLogprobs(token, float(logp[token]), list(zip(top.indices.tolist(), top.values.tolist())))
    elif params.logprobs is not None:  # the token's alone: two passes over the row fewer (~0.05 ms at 128k)
        lp = TokenLogprobs(token, float(_floored(raw.float().log_softmax(-1)[token:token + 1])[0]), [])
    return token, lp


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                 penalties: list[PenaltyState | None] | None = None, changed: dict[int, torch.Tensor] | None = None,
                 raw: dict[int, torch.Tensor] | None = None, known: dict[int, int] | None = None
                 ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample each row of logits [rows, vocab] with its own parameters. Greedy rows without extras take one
    batched argmax. `changed`: rows [vocab] that replace logits' (masked or biased copies: the whole matrix is
    not copied for them), and `raw` their logits before bias and the min_tokens mask, for logprobs
    (sample_row); by default a row's own. `known`: the tokens of rows already sampled (greedy rows whose
    grammar's mask the caller applied by its ids), which are taken as they are."""
    changed, raw, known = changed or {}, raw or {}, known or {}
    tokens: list[int | None] = [known.get(i) for i in range(len(params))]
    logprobs: list[TokenLogprobs | None] = [None] * len(params)
    simple = [i for i, p in enumerate(params) if p.greedy and not p.needs_penalties and p.logprobs is None]
    batched = [i for i in simple if i not in changed and i not in known]
    if 2 * len(batched) > len(params):  # most rows: the argmax of all, which reads a row at ~half a copy's CPU
        picks = argmax(logits).tolist()
        for i in batched:
            tokens[i] = picks[i]
    elif batched:
        for i, t in zip(batched, argmax(take_rows(logits, batched)).tolist()):
            tokens[i] = t
    top_k_rows = [i for i, p in enumerate(params)
                  if i not in changed and _plain_top_k(p) and p.top_k < logits.shape[-1]]
    if top_k_rows:
        for i, t in zip(top_k_rows, _sample_top_k_rows(logits, top_k_rows, params)):
            tokens[i] = t
    for i, p in enumerate(params):
        if i in changed and i in simple:
            tokens[i] = int(argmax(changed[i]))
        elif tokens[i] is None:
            tokens[i], logprobs[i] = sample_row(changed.get(i, logits[i]), p, positions[i],
                                                penalties[i] if penalties else None, raw.get(i))
    return tokens, logprobs


def take_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows] [len(rows), vocab]: logits itself when rows are all of them in order, else a copy by
    index_select. A list index copies at a quarter of its speed: 32 rows of a 128k vocabulary cost ~4 ms of the
    mesh host's CPU per step, twice per host step, which every user of the mesh waits for."""
    if rows == list(range(len(logits))):
        return logits
    return logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))


def _plain_top_k(p: SamplingParams) -> bool:
    """Sampled with temperature, top-k (at most BATCHED_TOP_K) and top-p alone, unseeded: what a Galaxy's device
    sampler does, which rows sampled on the host beside one that needs logits mostly are."""
    return (not p.greedy and p.seed is None and 0 < p.top_k <= BATCHED_TOP_K and not p.min_p
            and not p.needs_penalties and p.logprobs is None)


def _sample_top_k_rows(logits: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> list[int | None]:
    """Tokens for logits' `rows` of _plain_top_k params, all together once each row's k likeliest are found
    (_scaled_top_k; per row, top-k and top-p as _kept, then the race): ~a tenth of their CPU one by one. None for a
    row where more tokens tie with its k-th logit than top_k keeps, which sample_row takes (it keeps them all)."""
    vals, ids, exact = _scaled_top_k(logits, rows, params)
    params = [params[i] for i in rows]
    k = torch.tensor([p.top_k for p in params])
    probs = vals.masked_fill(torch.arange(vals.shape[1]) >= k.unsqueeze(1), float("-inf")).softmax(-1)
    top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    cut = probs.cumsum(-1) - probs >= top_p
    cut[:, 0] = False  # the top token always stays
    noise = torch.from_numpy(_UNSEEDED.standard_exponential(tuple(vals.shape), np.float32))
    race = probs.masked_fill(cut, 0.0) / noise.clamp_min_(torch.finfo(torch.float32).tiny)
    tokens = ids.gather(1, race.argmax(-1, keepdim=True)).squeeze(1).tolist()
    return [t if ok else None for t, ok in zip(tokens, exact)]


def _scaled_top_k(logits: torch.Tensor, rows: list[int], params: list[SamplingParams]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """_top_k of logits' `rows` divided by their temperatures. On the CPU a row at a time, read in place and divided
    on its own: the same float32 as the rows divided together (IEEE 754 rounds each quotient correctly), without a
    copy of the rows and a second one scaled (~5 ms of the 2-core box's CPU for 31 rows of 128k, most of it the
    pages of two fresh 16 MB tensors)."""
    ks = [params[i].top_k for i in rows]
    temperatures = torch.tensor([params[i].temperature for i in rows])
    if logits.device.type != "cpu":
        return _top_k(take_rows(logits, rows).float() / temperatures.unsqueeze(1), ks)
    source, width = logits.detach(), max(ks)
    return _stacked([_row_top_k((source[i].float() / t).numpy(), k, width) for i, t, k in zip(rows, temperatures, ks)])


def _top_k(scaled: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Each row's [n, vocab] ks[i] largest logits and their ids [n, max k], likeliest first and the lower id first
    on a tie, and whether exactly ks[i] are at or above its k-th (none at -inf). By _row_top_k on the CPU:
    torch.topk over 32 rows of 128k and a pass counting the k-th's ties cost ~11 ms on the 2-core box."""
    width = max(ks)
    if scaled.device.type != "cpu" or scaled.dtype != torch.float32:
        return _top_k_by_topk(scaled, ks, width)
    rows = scaled.detach().numpy()
    return _stacked([_row_top_k(rows[r], k, width) for r, k in enumerate(ks)])


def _row_top_k(row: np.ndarray, k: int, width: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """_top_k of one float32 row [vocab]: (its k likeliest logits [width], -inf past k, their ids [width], exact),
    the logits and ids left -inf and 0 where not exact. By _at_or_above_kth, or topk for a short row or a NaN."""
    at = _at_or_above_kth(row, k)
    if at is None:
        v, i, ok = _top_k_by_topk(torch.from_numpy(row)[None], [k], width)
        return v[0].numpy(), i[0].numpy(), ok[0]
    vals, ids = np.full(width, -np.inf, np.float32), np.zeros(width, np.int64)
    if len(at) == k:
        order = np.argsort(-row[at], kind="stable")
        ids[:k] = at[order]
        vals[:k] = row[ids[:k]]
    return vals, ids, len(at) == k


def _stacked(found: list[tuple[np.ndarray, np.ndarray, bool]]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    vals, ids, exact = zip(*found)
    return torch.from_numpy(np.stack(vals)), torch.from_numpy(np.stack(ids)), list(exact)


def _top_k_by_topk(scaled: torch.Tensor, ks: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    vals, ids = torch.topk(scaled, width)
    kth = vals.gather(1, (torch.tensor(ks) - 1).unsqueeze(1))
    exact = ((scaled >= kth).sum(1) == torch.tensor(ks)) & (kth.squeeze(1) > float("-inf"))
    return vals, ids, exact.tolist()
