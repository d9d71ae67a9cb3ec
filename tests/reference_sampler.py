"""An independent sampler to check the product's against: each step written from its definition (vLLM's, OpenAI's),
plainly and in float64 over the whole row, sharing no code with model/sampler.py. Only the seeded draw's noise is the
product's own scheme, as it promises it (README: a seeded token is a function of the seed and its position, so an
answer recomputed on any mesh draws the same tokens), and its race is written here again."""
from __future__ import annotations

import numpy as np
import torch

# A product's token that differs from the reference's passes only where the two scores are this close (relative):
# the product works in float32, and its logits may come from another implementation of the model
NEAR = 1e-4


def penalties(logits: torch.Tensor, prompt: list[int], output: list[int], repetition: float, presence: float,
              frequency: float) -> torch.Tensor:
    """vLLM's apply_penalties (vllm/model_executor/layers/utils.py): the repetition penalty divides a positive logit
    and multiplies a negative one, of every token in the prompt or the output; the frequency penalty (times the
    token's count) and the presence penalty (once) are subtracted for tokens of the output only, as OpenAI defines
    them (platform.openai.com/docs/api-reference/parameter-details, which vLLM's code cites:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c[j] the times j was sampled)."""
    logits = logits.double().clone()
    vocab = len(logits)
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).double()
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt + output, dtype=torch.long)] = True
    logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
    return logits - frequency * counts - presence * (counts > 0).double()


def kept(scaled: torch.Tensor, min_p: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities [vocab] a temperature-scaled row keeps, 0 where dropped, in vLLM v1's Sampler order (min_p,
    then top-k, then top-p over what is left, renormalised): min_p drops a token less likely than min_p x the
    likeliest; top-k keeps the tokens at or above the k-th largest logit (0: off); top-p keeps a token while the
    mass ranked above it is < top_p (vLLM's apply_top_k_top_p drops a sorted token whose cumulative mass from the
    bottom is <= 1 - top_p), the likeliest always."""
    scaled = scaled.double()
    probs = scaled.softmax(-1)
    scaled = scaled.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if 0 < top_k < len(scaled):
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1)
    if top_p < 1.0:
        order = probs.argsort(descending=True, stable=True)
        above = probs[order].cumsum(-1) - probs[order]
        dropped = order[above >= top_p]
        probs[dropped[dropped != order[0]]] = 0.0
    return probs / probs.sum()


def race(probs: torch.Tensor, seed: int, position: int) -> torch.Tensor:
    """The seeded draw's scores [vocab]: probs over Exp(1) noise from Philox keyed on (seed, position), the token
    the largest (an exact draw from probs: the exponential race); a zero draw counts as float32's smallest normal."""
    key = np.array([seed, position], dtype=np.uint64)
    noise = np.random.Generator(np.random.Philox(key=key)).standard_exponential(len(probs), np.float32)
    return probs.double() / torch.from_numpy(noise).double().clamp_min(float(np.finfo(np.float32).tiny))


def check_draw(token: int, logits: torch.Tensor, prompt: list[int], output: list[int], *, temperature: float,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
               what=()) -> None:
    """Assert `token`, drawn at position len(prompt) + len(output) from `logits` [vocab] (bias and masks applied), is
    the reference's: greedy the argmax after penalties; else a token the filters keep, and seeded the race's."""
    row = penalties(logits, prompt, output, repetition_penalty, presence_penalty, frequency_penalty)
    if temperature == 0.0:
        assert row[token] >= row.max() - NEAR * max(1.0, float(row.max().abs())), (*what, token, int(row.argmax()))
        return
    probs = kept(row / temperature, min_p, top_k, top_p)
    assert probs[token] > 0, (*what, token, "a token the filters drop")
    if seed is not None:
        scores = race(probs, seed, len(prompt) + len(output))
        assert scores[token] >= scores.max() * (1 - NEAR), (*what, token, int(scores.argmax()))
