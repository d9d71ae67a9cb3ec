import math
from collections import Counter

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from model import sampler
from model.sampler import PenaltyState, apply_penalties, sample_batch, sample_row
from scheduler.sampling import SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0, 2.0])


def draws(params_kw, seeds=range(2000), position=0, logits=LOGITS):
    return Counter(sample_row(logits, SamplingParams(seed=s, **params_kw), position)[0] for s in seeds)


def test_greedy_is_argmax_and_ignores_seed():
    assert sample_row(LOGITS, SamplingParams(temperature=0.0), 0) == (1, None)
    assert sample_row(LOGITS, SamplingParams(temperature=0.0, seed=3, top_k=2), 9)[0] == 1


def test_a_temperature_under_a_hundredth_is_raised_to_it_as_vllm_does():
    """vLLM's SamplingParams.__post_init__ raises 0 < temperature < 0.01 to 0.01 (smaller ones overflow logits /
    temperature); only 0 is greedy. Two logits 0.02 apart: at 0.01 the second is drawn 1 / (1 + e^2) = 11.9% of
    the time; at the 0.001 asked for, never."""
    for asked in (1e-40, 1e-5, 0.001, 0.0099):
        params = SamplingParams(temperature=asked)
        assert params.temperature == 0.01 and not params.greedy
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=0.01).temperature == 0.01
    close = torch.tensor([5.0, 5.02, 0.0])
    counts = draws({"temperature": 0.001}, seeds=range(2000), logits=close)
    assert set(counts) == {0, 1} and abs(counts[0] / 2000 - 1 / (1 + math.e ** 2)) < 0.03, counts
    assert {sample_row(LOGITS * 50, SamplingParams(temperature=1e-40, seed=s), 0)[0] for s in range(20)} == {1}


def test_sampling_follows_the_softmax():
    counts = draws({"temperature": 1.0}, seeds=range(4000))
    probs = LOGITS.softmax(-1).tolist()
    for token, p in enumerate(probs):
        assert abs(counts[token] / 4000 - p) < 0.03, (token, counts[token], p)


def test_temperature_sharpens_and_flattens():
    cold, hot = draws({"temperature": 0.3}), draws({"temperature": 3.0})
    assert cold[1] > hot[1] and cold[3] < hot[3]


def test_top_k_keeps_only_the_k_best():
    assert set(draws({"top_k": 2})) == {1, 2}
    assert set(draws({"top_k": 1, "temperature": 5.0})) == {1}


def test_top_p_keeps_the_smallest_nucleus():
    probs = sorted(LOGITS.softmax(-1).tolist(), reverse=True)  # tokens 1, 2, 5, 0, 4, 3
    assert set(draws({"top_p": probs[0] * 0.99})) == {1}
    assert set(draws({"top_p": probs[0] + probs[1] * 0.5})) == {1, 2}
    assert set(draws({"top_p": probs[0] + probs[1] + 0.01})) == {1, 2, 5}
    assert set(draws({"top_p": 1e-50})) == {1}  # 0 in float32: the top token still stays (it drew id 0)


def test_top_k_and_top_p_combine():
    assert set(draws({"top_k": 3, "top_p": 0.99})) <= {1, 2, 5}


def _kept_by_masks(scaled: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """What top-k then top-p keep, as plain masks over a full sort (the sampler finds it with topk)."""
    if top_k:
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[-1], float("-inf"))
    vals, order = torch.sort(scaled, descending=True)
    probs = vals.softmax(-1)
    keep = (probs.cumsum(-1) - probs < top_p) & (vals > float("-inf"))
    keep[0] = True
    return set(order[keep].tolist())


@pytest.mark.parametrize("vocab, scale", [(6, 1.0), (5000, 0.01), (50_000, 3.0)])
def test_top_k_and_top_p_keep_what_masks_over_a_full_sort_keep(vocab, scale):
    """Random rows without ties; 5,000 near-equal logits make top-p's nucleus wider than the topk search."""
    from model.sampler import _kept

    gen = torch.Generator().manual_seed(vocab)
    for trial in range(6):
        row = torch.randn(vocab, generator=gen) * scale
        if trial % 2:
            row[torch.rand(vocab, generator=gen) < 0.5] = float("-inf")  # a grammar's mask
            row[0] = 1.0
        for top_k, top_p in [(0, 0.5), (0, 0.95), (0, 0.999), (1, 1.0), (3, 0.7), (40, 1.0), (2000, 0.9)]:
            kept = _kept(row, top_k, top_p)
            if not 0 < top_k < vocab and top_p == 1.0:  # neither filter is on: every token
                assert kept is None
                continue
            assert set(kept[0].tolist()) == _kept_by_masks(row, top_k if top_k < vocab else 0, top_p)
            assert torch.equal(kept[1], row[kept[0]]) and bool((kept[1][:-1] >= kept[1][1:]).all())
    assert _kept(torch.full((9,), float("-inf")), 2, 0.5) is None  # every token masked: the full path's NaN


def test_unseeded_top_k_rows_sampled_together_draw_from_what_each_row_keeps():
    """sample_batch samples unseeded temperature/top-k/top-p rows with one topk over all of them: each row's
    tokens are in its own kept set, at its own frequencies (LOGITS' top 3 renormalised: 0.507, 0.307, 0.186)."""
    from model.sampler import _kept

    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(8, 3000, generator=gen) * 2
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)
              for t, k, p in [(1.0, 1, 1.0), (0.5, 5, 1.0), (1.0, 64, 0.3), (2.0, 20, 0.9)] * 2]
    for _ in range(50):
        tokens, _ = sample_batch(rows, params, [0] * 8)
        for row, p, token in zip(rows, params, tokens):
            assert token in set(_kept(row / p.temperature, p.top_k, p.top_p)[0].tolist())
    counts = Counter(sample_batch(LOGITS.repeat(6000, 1), [SamplingParams(top_k=3, top_p=0.9)] * 6000, [0] * 6000)[0])
    assert set(counts) == {1, 2, 5}
    for token, p in ((1, 0.507), (2, 0.307), (5, 0.186)):
        assert abs(counts[token] / 6000 - p) < 0.03, (token, counts[token])


def test_a_top_k_past_the_vocabulary_keeps_every_token():
    counts = Counter(sample_batch(LOGITS.repeat(600, 1), [SamplingParams(top_k=40)] * 600, [0] * 600)[0])
    assert set(counts) == set(range(6)) - {3} or set(counts) == set(range(6))  # token 3 has p = 0.006


def test_a_top_k_row_with_ties_at_its_kth_logit_keeps_them_all():
    """One topk cuts ties at the k-th logit to k tokens; such a row is sampled alone, keeping every tie (as
    vLLM's mask does), and so is a row with fewer finite logits than its top_k."""
    tied = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0, -3.0])
    masked = torch.tensor([float("-inf"), 2.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")])
    params = [SamplingParams(temperature=5.0, top_k=2), SamplingParams(temperature=1.0, top_k=3)]
    seen = set()
    for _ in range(400):
        (tie_token, masked_token), _ = sample_batch(torch.stack([tied, masked]), params, [0, 0])
        seen.add(tie_token)
        assert masked_token == 1
    assert seen == {0, 1, 2, 3, 4}


def test_ties_at_top_ps_cut_go_to_the_lower_id_on_every_device():
    from model.sampler import _kept

    row = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, -1.0])
    assert _kept(row, 0, 0.3)[0].tolist() == [1, 2]
    assert _kept(row, 4, 0.3)[0].tolist() == [1, 2]
    flat = torch.zeros(3000)  # a tie across top-p's first search (the best 1,024): topk alone picks any of them
    assert _kept(flat, 0, 0.1005)[0].tolist() == list(range(302))


def test_seed_and_position_fix_the_draw():
    params = SamplingParams(seed=1234, temperature=2.0)
    first = [sample_row(LOGITS, params, pos)[0] for pos in range(64)]
    assert first == [sample_row(LOGITS, params, pos)[0] for pos in range(64)]
    assert len(set(first)) > 1  # positions draw independently
    other_seed = [sample_row(LOGITS, SamplingParams(seed=99, temperature=2.0), pos)[0] for pos in range(64)]
    assert other_seed != first
    for far in (2**32, 2**63):  # int64 seeds are uint64 here, all 64 bits count: 1234 - 2**63 is another seed
        assert [sample_row(LOGITS, SamplingParams(seed=1234 + far, temperature=2.0), pos)[0]
                for pos in range(64)] != first


@pytest.mark.parametrize("seeded", [SamplingParams(seed=7, temperature=1.5),
                                    SamplingParams(seed=7, temperature=1.5, top_k=3),  # a device sampler's filters
                                    SamplingParams(seed=7, temperature=1.5, top_k=3, top_p=0.9)])
def test_seeded_row_does_not_depend_on_its_batch(seeded):
    """A seeded row draws what sample_row draws for its (seed, position), alone or batched with unseeded rows."""
    own = [sample_row(LOGITS, seeded, pos)[0] for pos in range(32)]
    alone = [sample_batch(LOGITS[None], [seeded], [pos])[0][0] for pos in range(32)]
    batch = torch.stack([LOGITS.flip(0), LOGITS, LOGITS * 2])
    together = [sample_batch(batch, [SamplingParams(temperature=1.0, top_k=2), seeded, SamplingParams(temperature=0.0)],
                             [pos + 5, pos, 3])[0][1] for pos in range(32)]
    assert alone == together == own


def test_batch_applies_each_rows_parameters():
    batch = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=1)]
    tokens, logprobs = sample_batch(batch, params, [0, 0, 0])
    assert tokens == [1, 4, 1]
    assert logprobs[0] is None and logprobs[2].token_id == 1


def test_greedy_rows_after_a_row_sampled_apart_take_their_own_argmax():
    """Most rows greedy: one argmax over every row, of which each greedy row reads its own, wherever it is."""
    batch = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])
    params = [SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0)]
    assert sample_batch(batch, params, [0, 0, 0])[0] == [1, 4, 1]


def test_a_top_k_row_with_a_masked_copy_is_drawn_from_that_copy():
    """A row whose masks or bias the runner applied (`changed`) is drawn from that copy, not from the batch's top-k
    of its raw logits: id 0 is outside LOGITS' top 3, and the only one the copy allows."""
    masked = torch.full_like(LOGITS, float("-inf"))
    masked[0] = 1.0
    tokens, _ = sample_batch(LOGITS.repeat(50, 1), [SamplingParams(top_k=3)] * 50, [0] * 50,
                             changed={i: masked for i in range(50)})
    assert tokens == [0] * 50


def test_repetition_penalty_covers_prompt_and_output():
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(LOGITS, params, PenaltyState(6, prompt_ids=[1], output_ids=[3, 3]))
    assert out.tolist() == [1.0, 1.5, 2.5, -2.0, 0.0, 2.0]
    assert LOGITS[1] == 3.0  # the input is left alone


def test_presence_and_frequency_penalties_cover_output_only():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(LOGITS, params, PenaltyState(6, prompt_ids=[0], output_ids=[2, 2, 4]))
    assert out.tolist() == pytest.approx([1.0, 3.0, 2.5 - 0.5 - 0.5, -1.0, 0.0 - 0.5 - 0.25, 2.0])


def test_penalty_state_advanced_token_by_token_is_the_one_built_from_the_whole_sequence():
    state = PenaltyState(6, prompt_ids=[0, 5], output_ids=[2])
    for token in (2, 4, 9, -1):  # ids outside the vocabulary (a padded row's) count for nothing
        state.add(token)
    whole = PenaltyState(6, prompt_ids=[0, 5], output_ids=[2, 2, 4, 9, -1])
    assert sorted(state.seen_ids.tolist()) == sorted(whole.seen_ids.tolist()) == [0, 2, 4, 5]
    assert sorted(state.output_ids.tolist()) == sorted(whole.output_ids.tolist()) == [2, 4]
    assert state.counts.tolist() == whole.counts.tolist() == [0, 0, 2, 0, 1, 0]


def test_a_row_narrower_than_the_vocabulary_skips_the_ids_it_lacks():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)
    out = apply_penalties(LOGITS[:4], params, PenaltyState(6, prompt_ids=[1, 5], output_ids=[3, 4, 4]))
    assert out.tolist() == [1.0, 1.5, 2.5, -3.0]


def test_a_row_wider_than_the_vocabulary_keeps_its_extra_ids_as_they_are():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)
    wide = torch.cat([LOGITS, torch.tensor([7.0, -7.0])])
    out = apply_penalties(wide, params, PenaltyState(6, prompt_ids=[1], output_ids=[3]))
    assert out.tolist() == [1.0, 1.5, 2.5, -3.0, 0.0, 2.0, 7.0, -7.0]


def test_penalties_change_the_greedy_choice():
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample_row(LOGITS, params, 0, PenaltyState(6, prompt_ids=[1]))[0] == 2
    tokens, _ = sample_batch(LOGITS[None], [params], [0], [PenaltyState(6, prompt_ids=[1])])
    assert tokens == [2]


def test_logprobs_report_the_token_and_the_top_n():
    token, lp = sample_row(LOGITS, SamplingParams(temperature=1.0, seed=3, logprobs=3), 0)
    logp = LOGITS.log_softmax(-1)
    assert lp.token_id == token and lp.logprob == pytest.approx(float(logp[token]))
    assert [t for t, _ in lp.top] == [1, 2, 5]
    assert [v for _, v in lp.top] == pytest.approx([float(logp[t]) for t in (1, 2, 5)])
    assert math.isclose(sum(math.exp(v) for v in logp.tolist()), 1.0, rel_tol=1e-5)
    assert sample_row(LOGITS, SamplingParams(logprobs=0), 0)[1].top == []


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 101), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("seed", -1), ("max_tokens", 0), ("min_tokens", -1), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0.0), ("logprobs", 21), ("min_tokens", 300),
    ("best_of", 2), ("allowed_token_ids", [3, -1]), ("bad_words_token_ids", [[4, -1]]), ("logit_bias", {5: 100.5}),
])
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    assert [err["loc"] for err in info.value.errors()] == [(field,)]


def test_min_tokens_may_equal_max_tokens():
    """vLLM takes min_tokens up to max_tokens: an answer of exactly that length."""
    assert SamplingParams(max_tokens=5, min_tokens=5).min_tokens == 5
    with pytest.raises(ValidationError) as info:
        SamplingParams(max_tokens=5, min_tokens=6)
    assert [err["loc"] for err in info.value.errors()] == [("min_tokens",)]


def test_stop_fields_normalise():
    params = SamplingParams(stop="END", stop_token_ids=[5, 6])
    assert params.stop == ("END",) and params.stop_token_ids == (5, 6)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    with pytest.raises(ValidationError):
        params.temperature = 0.5  # frozen: shared between the router and the mesh


def test_logprobs_are_the_raw_distribution_whatever_picks_the_token():
    """vLLM's default logprobs_mode (raw_logprobs): penalties, temperature and top-k leave logprobs alone, and
    a row biased before sampling (logit_bias, min_tokens; `raw` its logits before) reports the model's own."""
    logp = LOGITS.log_softmax(-1)
    params = SamplingParams(temperature=5.0, top_k=2, seed=1, presence_penalty=2.0, repetition_penalty=1.5, logprobs=2)
    token, lp = sample_row(LOGITS, params, 0, PenaltyState(6, prompt_ids=[1], output_ids=[2]))
    assert lp.logprob == pytest.approx(float(logp[token]))
    assert lp.top == [(t, pytest.approx(float(logp[t]))) for t in (1, 2)]
    forced = torch.full_like(LOGITS, float("-inf"))
    forced[5] = 0.0  # e.g. a +100 logit_bias on token 5
    token, lp = sample_row(forced, SamplingParams(temperature=0.0, logprobs=1), 0, raw=LOGITS)
    assert (token, lp.logprob) == (5, pytest.approx(float(logp[5])))
    assert lp.top == [(1, pytest.approx(float(logp[1])))]


def test_logprobs_of_a_backends_minus_infinity_are_finite():
    """A -inf logit's logprob is -inf, which JSON cannot carry (a 500 once): it is floored as vLLM does."""
    masked = LOGITS.clone()
    masked[1:] = float("-inf")
    token, lp = sample_row(masked, SamplingParams(temperature=0.0, logprobs=3), 0)
    assert token == 0 and lp.logprob == 0.0
    assert all(-10_000 < value <= 0 for _, value in lp.top)


def test_logprobs_of_a_nan_logit_are_finite():
    """A NaN logit (a backend's overflow) makes every logprob of its row NaN, which JSON cannot carry either:
    /v1/responses answered 500, chat sent "logprob": null and completions the null of an echoed prompt's first
    token. Floored as -inf is, sampled or scored."""
    from model.sampler import score_prompt
    from scheduler.sampling import MIN_LOGPROB
    broken = LOGITS.clone()
    broken[3] = float("nan")
    _, lp = sample_row(broken, SamplingParams(temperature=0.0, logprobs=3), 0)
    assert [lp.logprob] + [v for _, v in lp.top] == [MIN_LOGPROB] * 4
    scored = score_prompt(lambda i, j: torch.stack([LOGITS, broken])[i:j], torch.tensor([1, 2]), 1, 2)
    assert np.isfinite(scored.logprobs).all() and np.isfinite(scored.top_logprobs).all()
    assert scored.logprobs[1] == MIN_LOGPROB and scored.ranks[1] == len(LOGITS)


def test_min_p_drops_tokens_less_likely_than_min_p_times_the_top_one():
    """vLLM's min_p, on the temperature-scaled distribution: at min_p 0.3 only tokens with probability >= 0.3 x
    the likeliest's are ever drawn; without it, less likely ones are drawn too."""
    probs = (LOGITS / 2.0).softmax(-1)
    allowed = {t for t in range(len(probs)) if probs[t] >= 0.3 * probs.max()}
    drawn = {sample_row(LOGITS, SamplingParams(temperature=2.0, min_p=0.3, seed=s), 0)[0] for s in range(300)}
    free = {sample_row(LOGITS, SamplingParams(temperature=2.0, seed=s), 0)[0] for s in range(300)}
    assert drawn <= allowed and len(allowed) >= 2 and len(drawn) >= 2
    assert free - allowed


LLAMA3_VOCAB = 128_256


def _seed_whose_noise_holds_a_zero(position: int) -> tuple[int, int]:
    """A seed whose raw float32 Philox draw at `position` is exactly 0 somewhere (one draw in ~100 at Llama 3's
    vocabulary): the seeded sampler must still never pick a token of probability 0 there."""
    for seed in range(20_000):
        key = np.array([seed, position], dtype=np.uint64)
        raw = np.random.Generator(np.random.Philox(key=key)).standard_exponential(LLAMA3_VOCAB, np.float32)
        if (zeros := np.flatnonzero(raw == 0)).size:
            return seed, int(zeros[0])
    raise AssertionError("no zero in 20,000 draws")


@pytest.mark.parametrize("mask", ["top_k", "top_p", "min_p", "minus_inf"])
def test_a_zero_in_the_seeded_noise_never_picks_a_token_of_probability_zero(mask):
    """0/0 is NaN and argmax picks a NaN: a token outside top_k/top_p/min_p, or one a grammar or the min_tokens
    mask set to -inf (an EOS before min_tokens), came out for ~1% of seeded draws."""
    seed, zero_at = _seed_whose_noise_holds_a_zero(position=100)
    logits = torch.full((LLAMA3_VOCAB,), -10.0)
    logits[zero_at + 1], logits[zero_at + 2] = 10.0, 9.5  # nearly all the mass, on two tokens beside the zero
    fields = {"top_k": {"top_k": 2}, "top_p": {"top_p": 0.5}, "min_p": {"min_p": 0.5}, "minus_inf": {}}[mask]
    if mask == "minus_inf":
        logits[zero_at] = float("-inf")
    token, _ = sample_row(logits, SamplingParams(temperature=1.0, seed=seed, **fields), position=100)
    if mask == "minus_inf":
        assert token != zero_at
    else:
        assert token in (zero_at + 1, zero_at + 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_take_the_first_best_id_and_a_nan_as_torch_argmax_does(dtype):
    """Greedy host sampling reads float32 rows by numpy's argmax (model.sampler.argmax, ~25x quicker at a 128k row):
    it must pick what torch.argmax picks, the first of tied logits, a NaN over any number, 0 in a row all -inf,
    in a batch, in a masked (`changed`) row and through sample_row."""
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, nan, 5.0, nan], [-inf, -inf, -inf, -inf], [-0.0, 0.0, -1.0, 0.0],
                         [1.0, inf, inf, 2.0]], dtype=dtype)
    expected = [1, 1, 0, 0, 1]
    assert torch.argmax(rows, dim=-1).tolist() == expected  # what the host sampled with before
    greedy = [SamplingParams(temperature=0.0)] * len(rows)
    assert sample_batch(rows, greedy, [0] * len(rows))[0] == expected
    assert sample_batch(rows, greedy, [0] * len(rows), changed={i: rows[i].float() for i in range(len(rows))})[0] \
        == expected
    assert [sample_row(row, greedy[0], 0)[0] for row in rows] == expected
    wide = torch.full((2, 128256), -5.0, dtype=dtype)
    wide[0, [70000, 70001]], wide[1, [9, 100000]] = 2.0, nan
    assert sample_batch(wide, greedy[:2], [0, 0])[0] == [70000, 9]


REFERENCE_CASES = 400


def test_each_parameter_draws_what_an_independent_reference_sampler_draws():
    """sample_row (and sample_batch, rows beside each other) against tests/reference_sampler.py, written from vLLM's
    and OpenAI's definitions: random rows of positive and negative logits, prompt and output tokens that overlap and
    repeat, each of temperature, top_k, top_p, min_p and the three penalties off or at one of a few values (top_k 1,
    greedy, a repetition penalty under 1, negative presence and frequency among them). A seeded row's token is the
    reference's race over the same noise; every drawn token one the filters keep."""
    from tests import reference_sampler as reference

    rng = np.random.default_rng(2024)
    vocab = 40
    cases = []
    for case in range(REFERENCE_CASES):
        logits = torch.from_numpy((rng.standard_normal(vocab) * rng.choice([0.5, 2.0, 5.0])).astype(np.float32))
        prompt = rng.integers(0, vocab, int(rng.integers(0, 12))).tolist()
        output = rng.integers(0, vocab, int(rng.integers(0, 16))).tolist()
        knobs = {"temperature": float(rng.choice([0.0, 0.5, 1.0, 1.7])), "top_k": int(rng.choice([0, 0, 1, 3, 12])),
                 "top_p": float(rng.choice([1.0, 1.0, 0.3, 0.8, 0.95])),
                 "min_p": float(rng.choice([0.0, 0.0, 0.05, 0.3])),
                 "repetition_penalty": float(rng.choice([1.0, 1.0, 0.7, 1.3, 3.0])),
                 "presence_penalty": float(rng.choice([0.0, 0.0, -1.0, 0.8, 2.0])),
                 "frequency_penalty": float(rng.choice([0.0, 0.0, -0.5, 0.6, 2.0]))}
        seed = int(rng.integers(0, 2**63))
        params = SamplingParams(**knobs, seed=seed)
        token, _ = sample_row(logits, params, len(prompt) + len(output), PenaltyState(vocab, prompt, output))
        knobs = {k: getattr(params, k) for k in knobs}  # a greedy request's filters reset (SamplingParams)
        reference.check_draw(token, logits, prompt, output, **knobs, seed=seed, what=(case, knobs))
        cases.append((logits, params, prompt, output))
    for start in range(0, len(cases), 8):  # a batch of rows, each with its penalties' state advanced token by token
        batch = cases[start:start + 8]
        states = []
        for _, _, prompt, output in batch:
            states.append(PenaltyState(vocab, prompt, output[:2]))
            for t in output[2:]:
                states[-1].add(t)
        tokens, _ = sample_batch(torch.stack([c[0] for c in batch]), [c[1] for c in batch],
                                 [len(c[2]) + len(c[3]) for c in batch], states)
        for token, (logits, params, prompt, output) in zip(tokens, batch):
            reference.check_draw(token, logits, prompt, output, temperature=params.temperature, top_k=params.top_k,
                                 top_p=params.top_p, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                                 presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                                 seed=params.seed)
    # unseeded, without penalties or min_p: most rows take the batched top-k path (_sample_top_k_rows), whose draw
    # is unpredictable but must be one of the tokens its row keeps
    plain = [(logits, params.model_copy(update={"seed": None, "min_p": 0.0, "repetition_penalty": 1.0,
                                                "presence_penalty": 0.0, "frequency_penalty": 0.0}))
             for logits, params, _, _ in cases]
    for start in range(0, len(plain), 8):
        batch = plain[start:start + 8]
        tokens, _ = sample_batch(torch.stack([c[0] for c in batch]), [c[1] for c in batch], [0] * len(batch))
        for token, (logits, params) in zip(tokens, batch):
            reference.check_draw(token, logits, [], [], temperature=params.temperature, top_k=params.top_k,
                                 top_p=params.top_p)


def test_min_p_of_1_keeps_every_token_tied_with_the_likeliest():
    """vLLM's min_p drops a token only when it is less likely than min_p x the likeliest: at min_p 1 the tokens
    tied with the likeliest all stay and are drawn (dropped at equality, no token at all would be left)."""
    tied = torch.tensor([2.0, 0.0, 2.0, 1.0])
    assert {sample_row(tied, SamplingParams(min_p=1.0, seed=s), 0)[0] for s in range(200)} == {0, 2}


def test_min_p_drops_a_token_just_under_its_bound_and_keeps_one_just_over():
    """min_p's bound is min_p x the likeliest's probability itself, not a rounded one: token 1 has e^-0.69 =
    0.50158 of token 0's probability, so min_p 0.5019 (0.06% above) drops it and 0.5012 (0.07% below) keeps it,
    where it is a third of the draws (float32 is exact to ~1e-7 here)."""
    row = torch.tensor([0.0, -0.69])
    assert {sample_row(row, SamplingParams(min_p=0.5019, seed=s), 0)[0] for s in range(100)} == {0}
    assert {sample_row(row, SamplingParams(min_p=0.5012, seed=s), 0)[0] for s in range(100)} == {0, 1}


@pytest.mark.parametrize("params, kept", [
    ({"top_k": 2, "repetition_penalty": 10.0}, {2, 5}),  # token 1, LOGITS' best (3.0), falls to 0.3
    ({"top_k": 3, "min_p": 0.5}, {1, 2}),  # of the top 3 (1, 2, 5), token 5 has e^-1 of token 1's probability
])
def test_an_unseeded_top_k_row_beside_plain_ones_keeps_its_penalty_and_min_p(monkeypatch, params, kept):
    """sample_batch draws unseeded rows of temperature, top-k and top-p alone together; a row that also has a
    penalty or min_p is drawn as they say, beside such rows. Each token a row keeps has 19-62% of its draws, so
    100 draws on a fixed stream bring them all (as on any stream, but once in ~1e20)."""
    monkeypatch.setattr(sampler, "_UNSEEDED", np.random.default_rng(0))
    rows = [SamplingParams(**params), SamplingParams(top_k=3)]
    drawn: list[set[int]] = [set(), set()]
    for _ in range(100):
        tokens, _ = sample_batch(LOGITS.repeat(2, 1), rows, [0, 0], [PenaltyState(6, prompt_ids=[1]), None])
        for seen, token in zip(drawn, tokens):
            seen.add(token)
    assert drawn == [kept, {1, 2, 5}]
