"""_sample_top_k_rows' search row by row (_scaled_top_k): each row divided by its temperature on its own keeps the same
logits, ids and exact flags, bit for bit, as the rows divided together (the search over those is test_nucleus_search's
test_batched_top_k_keeps_what_topk_kept)."""
import numpy as np
import pytest
import torch

import model.sampler as sampler
from model.sampler import take_rows
from scheduler.sampling import SamplingParams

WIDTH = 4096  # at least NUCLEUS_STRIDE x the largest k: the rows take _at_or_above_kth, not topk


def _rows(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows as a model's, and rows with what the search must get right: ties at the k-th, -inf, a NaN, huge and
    subnormal logits (a temperature under 1 sends 3e38 to inf, over 1 a subnormal to 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(8, WIDTH, generator=g) * 3
    rows[1, ::7] = 4.0
    rows[2, WIDTH // 2:] = float("-inf")
    rows[3, 17] = float("nan")
    rows[4, :64] = 3e38
    rows[5] = torch.randn(WIDTH, generator=g) * 1e-39
    rows[6, :40] = torch.tensor(2.0).nextafter(torch.tensor(3.0))  # ties a division by 0.7 may make or keep apart
    rows[6, 40:80] = 2.0
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_each_rows_search_keeps_what_the_batched_rows_kept(seed, dtype):
    """_scaled_top_k divides each row by its temperature on its own: the same float32 as torch's division of the rows
    together (IEEE 754 rounds each quotient correctly), so the same kept logits, ids and exact flags."""
    logits = _rows(seed, dtype)
    rows = [0, 1, 2, 3, 4, 5, 6, 7][seed % 2:]
    rng = np.random.default_rng(seed)
    params = [SamplingParams(temperature=float(rng.choice([0.6, 0.7, 1.0, 1.3, 0.013])),
                             top_k=int(rng.choice([1, 32, 64])), top_p=0.9) for _ in range(len(logits))]
    row_vals, row_ids, row_exact = sampler._scaled_top_k(logits, rows, params)
    temperatures = torch.tensor([params[i].temperature for i in rows]).unsqueeze(1)
    vals, ids, exact = sampler._top_k(take_rows(logits, rows).float() / temperatures, [params[i].top_k for i in rows])
    assert row_exact == exact
    assert np.array_equal(row_vals.numpy().view(np.uint32), vals.numpy().view(np.uint32))
    assert torch.equal(row_ids, ids)
