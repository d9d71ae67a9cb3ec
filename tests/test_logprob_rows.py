"""sample_row's rows with logprobs (a user asking them is sampled on the host, all 32 rows at a tt-metal step): its
top-k search without torch.topk over the row keeps what topk kept, so a seeded token is the same, and logprobs 0
floors the token's logprob alone, to the same value as the whole row floored (finite_logprobs)."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from model.sampler import NUCLEUS_STRIDE, _kept, finite_logprobs, sample_batch, sample_row
from scheduler.sampling import SamplingParams
from tests.test_nucleus_search import _kept_before, rows

VOCAB = 128_256  # Llama 3's


def _one_hot(token: int) -> torch.Tensor:
    """The simulated Galaxy's row (model/simulated.py _one_hot): 0 at the token, the rest falling 0.01 an id from -1e4."""
    row = -1e4 - 0.01 * torch.arange(VOCAB, dtype=torch.float32)
    row[token] = 0.0
    return row


@settings(max_examples=300, deadline=None)
@given(rows, st.sampled_from([0.1, 0.6, 1.0, 1.7]), st.sampled_from([1, 2, 5, 32, 64, 1000]),
       st.sampled_from([0.08, 0.5, 0.9, 1.0]))
def test_kept_by_top_k_is_what_topk_kept(row, temperature, top_k, top_p):
    scaled = row / temperature
    got, before = _kept(scaled, top_k, top_p), _kept_before(scaled, top_k, top_p)
    assert (got is None) == (before is None)
    if got is not None:
        assert torch.equal(got[0], before[0])
        torch.testing.assert_close(got[1], before[1], rtol=0, atol=0, equal_nan=True)


def test_a_top_k_row_is_searched_without_topk_over_the_row(monkeypatch):
    """The demo's log-probs preset: top_k 1-32 over 128k rows, each sample_row's (~0.5 ms of the 2-core box's CPU a
    row in topk and nonzero, 32 rows a step). A row shorter than NUCLEUS_STRIDE x top_k still takes topk."""
    cases = [(_one_hot(top_k * 1000) / 0.5, top_k) for top_k in (1, 2, 17, 32)]
    short = torch.randn(NUCLEUS_STRIDE * 64 - 1)
    want = [_kept_before(scaled, top_k, 0.9)[0] for scaled, top_k in (*cases, (short, 64))]
    calls = []
    topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda t, k, *a, **kw: calls.append((t.shape[-1], k)) or topk(t, k, *a, **kw))
    for (scaled, top_k), ids in zip(cases, want):
        assert torch.equal(_kept(scaled, top_k, 0.9)[0], ids)
    assert calls == []
    assert torch.equal(_kept(short, 64, 0.9)[0], want[-1])
    assert calls == [(len(short), 64)]


def _row(seed: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(VOCAB, generator=g) * 4
    if kind == "masked":  # a grammar's -inf
        row[torch.rand(VOCAB, generator=g) < 0.9] = float("-inf")
    elif kind == "floor":  # logprobs under -9999, floored
        row[: VOCAB // 2] = -2e4
    elif kind == "nan":  # a backend's overflow: every logprob NaN, floored
        row[5] = float("nan")
    elif kind == "inf":
        row[7] = float("inf")
    return row


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["plain", "masked", "floor", "nan", "inf"]),
       st.sampled_from([SamplingParams(temperature=0.0, logprobs=0),
                        SamplingParams(temperature=0.6, top_k=20, top_p=0.9, logprobs=0, seed=3),
                        SamplingParams(temperature=1.0, logprobs=0, seed=5),
                        SamplingParams(temperature=0.8, top_k=7, logprobs=2, seed=9)]))
def test_a_tokens_logprob_is_its_floored_row_value(seed, kind, params):
    row = _row(seed, kind)
    token, lp = sample_row(row, params, 11)
    logp = finite_logprobs(row)
    assert lp.token_id == token and np.float32(lp.logprob) == logp[token].numpy()  # the same float32, bit for bit
    top = torch.topk(logp, params.logprobs)
    assert lp.top == list(zip(top.indices.tolist(), top.values.tolist()))


def test_logprobs_0_floors_the_tokens_logprob_alone(monkeypatch):
    floored = []
    nan_to_num = torch.nan_to_num
    monkeypatch.setattr(torch, "nan_to_num", lambda t, *a, **kw: floored.append(t.numel()) or nan_to_num(t, *a, **kw))
    token, lp = sample_row(_one_hot(4321), SamplingParams(temperature=0.5, top_k=8, logprobs=0), 3)
    assert token == 4321 and lp.logprob == 0.0 and lp.top == []
    assert floored == [1]


def test_a_tiny_vocabularys_top_k_row_is_sampled():
    """A row of 16-48 logits at top_k 1-3 samples 1-3 logits for _at_or_above_kth's threshold, fewer than its rank
    of 8: np.partition raised (kth out of bounds), where topk had kept the k likeliest."""
    for vocab, top_k in ((16, 1), (40, 2), (48, 3)):
        row = torch.arange(vocab, dtype=torch.float32)
        assert torch.equal(_kept(row, top_k, 1.0)[0], _kept_before(row, top_k, 1.0)[0])
        token, lp = sample_row(row, SamplingParams(temperature=0.01, top_k=top_k, logprobs=0, seed=1), 0)
        assert token >= vocab - top_k and lp.token_id == token
        tokens, _ = sample_batch(row[None].repeat(2, 1), [SamplingParams(temperature=0.01, top_k=top_k)] * 2, [0, 1])
        assert all(t >= vocab - top_k for t in tokens)
