"""The host sampler's searches against the torch.topk they replaced: _kept's top-p alone (_nucleus_search) keeps the
same ids and logits, so every seeded token stays the same (a migrated request continues identically on another
mesh); a seeded row's shorter noise draw is the full draw's prefix; the batched top-k rows (_top_k) keep the same
logits, so their unseeded draws keep the same distribution."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from model.sampler import NUCLEUS_SEARCH, NUCLEUS_STRIDE, _kept, _nucleus_search, sample_row
from scheduler.sampling import SamplingParams


def _kept_before(scaled: torch.Tensor, top_k: int, top_p: float):
    """_kept as of 61a6ce7: topk of NUCLEUS_SEARCH over the whole row, then a pass for the ties."""
    vocab = scaled.shape[-1]
    top_k = top_k if 0 < top_k < vocab else 0
    if not top_k and top_p >= 1.0:
        return None
    kth = torch.topk(scaled, top_k or min(NUCLEUS_SEARCH, vocab)).values[-1]
    ids = torch.nonzero(scaled >= kth if kth > float("-inf") else scaled > kth).squeeze(1)
    vals, order = torch.sort(scaled[ids], descending=True, stable=True)
    ids = ids[order]
    if top_k:
        probs = vals.softmax(-1)
    else:
        probs = scaled.softmax(-1)[ids]
        if float(probs.sum()) < top_p:
            vals, ids = torch.sort(scaled, descending=True, stable=True)
            probs = vals.softmax(-1)
    if not len(vals) or vals[0] == float("-inf"):
        return None
    if top_p < 1.0:
        keep = max(1, int((probs.cumsum(-1) - probs < top_p).sum()))
        ids, vals = ids[:keep], vals[:keep]
    return ids, vals


def _row(seed: int, vocab: int, scale: float, levels: int, masked: float, infs: int, best: float,
         nans: int = 0) -> torch.Tensor:
    """A row [vocab]: N(0, scale), rounded to `levels` steps (ties) when levels, a `masked` share at -inf (a
    grammar's mask), `infs` +inf logits, the last id `best` above the rest (a simulated token), and `nans` NaN
    logits (a backend's overflow) elsewhere."""
    rng = np.random.default_rng(seed)
    row = rng.standard_normal(vocab).astype(np.float32) * scale
    if levels:
        row = np.round(row * levels / max(scale, 1e-3)).astype(np.float32)
    row[rng.random(vocab) < masked] = -np.inf
    row[rng.integers(0, vocab, infs)] = np.inf
    if best:
        row[-1] = np.float32(np.nanmax(np.where(np.isfinite(row), row, -np.inf)) + best) if np.isfinite(row).any() else 0
    row[rng.integers(0, vocab - 1, nans)] = np.nan
    return torch.from_numpy(row)


rows = st.builds(_row, st.integers(0, 2**32 - 1), st.sampled_from([NUCLEUS_STRIDE * NUCLEUS_SEARCH, 20_000, 50_000]),
                 st.sampled_from([0.0, 0.01, 1.0, 3.0, 20.0]), st.sampled_from([0, 0, 1, 4, 50]),
                 st.sampled_from([0.0, 0.0, 0.5, 0.9, 0.97, 0.99, 0.999, 1.0]), st.sampled_from([0, 0, 0, 1, 3]),
                 st.sampled_from([0.0, 2.0, 30.0]), st.sampled_from([0, 0, 0, 0, 1, 2]))


@settings(max_examples=300, deadline=None)
@given(rows, st.sampled_from([0.1, 0.6, 1.0, 1.7]), st.sampled_from([0.0, 0.05, 0.5, 0.9, 0.95, 0.999, 0.9999999]))
def test_kept_by_top_p_alone_is_what_topk_kept(row, temperature, top_p):
    scaled = row / temperature
    ids = _nucleus_search(scaled)
    if ids is not None:  # the same set as topk's k-th and a pass, ascending
        kth = torch.topk(scaled, NUCLEUS_SEARCH).values[-1]
        want = torch.nonzero(scaled >= kth if kth > float("-inf") else scaled > kth).squeeze(1)
        assert torch.equal(ids, want)
    got, before = _kept(scaled, 0, top_p), _kept_before(scaled, 0, top_p)
    assert (got is None) == (before is None)
    if got is not None:  # a NaN row's (topk's, as before) kept logit may be the NaN
        assert torch.equal(got[0], before[0])
        torch.testing.assert_close(got[1], before[1], rtol=0, atol=0, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(rows, st.integers(0, 2**63 - 1), st.integers(0, 100_000), st.sampled_from([0.6, 1.0]),
       st.sampled_from([0, 5, 40]), st.sampled_from([0.5, 0.9, 1.0]), st.sampled_from([0.0, 0.05]))
def test_a_seeded_token_is_the_one_drawn_from_what_topk_kept(row, seed, position, temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    if not torch.isfinite(row).any():
        return
    token, _ = sample_row(row, params, position)
    scaled = row / params.temperature
    if min_p:
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < min_p * probs.max(), float("-inf"))
    kept = _kept_before(scaled, params.top_k, params.top_p)
    key = np.array([seed, position], dtype=np.uint64)
    noise = torch.from_numpy(np.random.Generator(np.random.Philox(key=key)).standard_exponential(len(row), np.float32))
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    if kept is None:
        want = int(torch.argmax(scaled.softmax(-1) / noise))
    else:
        want = int(kept[0][torch.argmax(kept[1].softmax(-1) / noise[kept[0]])])
    assert token == want


def test_a_row_masked_but_for_a_few_or_short_keeps_every_finite_logit():
    row = torch.full((NUCLEUS_STRIDE * NUCLEUS_SEARCH,), float("-inf"))
    row[[3, 900, 16000]] = torch.tensor([1.0, 2.0, 1.0])
    assert torch.equal(_nucleus_search(row), torch.tensor([3, 900, 16000]))
    assert _nucleus_search(torch.zeros(1000)) is None  # short: topk's


def test_a_nan_off_the_stride_leaves_the_row_to_topk():
    """torch.topk counts a NaN as the largest logit, so its k-th is the (k-1)-th finite one, and a top-k row with a
    NaN never has exactly k at or above its k-th (sample_row takes it). A NaN where the stride's sample does not
    read it must do the same: _nucleus_search gives None, _top_k's row is not exact."""
    from model.sampler import _top_k
    row = torch.from_numpy(np.random.default_rng(0).standard_normal(NUCLEUS_STRIDE * NUCLEUS_SEARCH * 2)
                           .astype(np.float32) * 3)
    row[NUCLEUS_STRIDE * 7 + 5] = float("nan")
    assert _nucleus_search(row) is None
    _, _, exact = _top_k(torch.stack([row, row]), [1, 32])
    assert exact == [False, False]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**40), st.integers(1, 5000))
def test_a_seeded_draw_is_the_prefix_of_a_longer_one(seed, position, n):
    """sample_row draws a seeded row's noise only up to its last kept id."""
    from model.sampler import _noise
    assert torch.equal(_noise(n, seed, position), _noise(n + 3000, seed, position)[:n])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(rows, st.sampled_from([1, 2, 5, 32, 64])), min_size=1, max_size=3))
def test_batched_top_k_keeps_what_topk_kept(cases):
    """_sample_top_k_rows' kept logits (_top_k) against torch.topk and its ties' count over the whole row: the same
    k likeliest, the lower id first on a tie, and the same rows left to sample_row (more ties than k, or -inf); a
    row with a NaN takes topk itself."""
    from model.sampler import _top_k
    width = min(len(r) for r, _ in cases)
    scaled = torch.stack([r[:width] for r, _ in cases])
    ks = [k for _, k in cases]
    vals, ids, exact = _top_k(scaled, ks)
    for r, k in enumerate(ks):
        top, top_ids = torch.topk(scaled[r], k)
        kth = top[-1]
        assert exact[r] == bool(int((scaled[r] >= kth).sum()) == k and kth > float("-inf"))
        if exact[r] and scaled[r].isnan().any():  # topk's, as before: its order among ties unspecified
            torch.testing.assert_close(vals[r, :k], scaled[r][ids[r, :k]], rtol=0, atol=0, equal_nan=True)
        elif exact[r]:
            want = sorted(zip((-top).tolist(), top_ids.tolist()))
            assert ids[r, :k].tolist() == [i for _, i in want]
            assert torch.equal(vals[r, :k], scaled[r][ids[r, :k]])
