"""Double of tt-metal models/common/sampling: the SamplingParams dataclass (sampling_params.py) and the
padding/greedy rules of format_sampling_params (generator.py), which the Galaxy generator applies."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class SamplingParams:
    temperature: float | list[float]
    top_k: int | list[int]
    top_p: float | list[float]
    presence_penalty: float | list[float] = 0.0
    frequency_penalty: float | list[float] = 0.0
    repetition_penalty: float | list[float] = 1.0
    seed: int | list[int] | None = None
    enable_log_probs: bool | list[bool] = False


_PAD = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "repetition_penalty": 1.0, "seed": None, "enable_log_probs": False}


def format_sampling_params(sampling_params: SamplingParams, max_batch_size: int) -> SamplingParams:
    """Lists padded to max_batch_size (enable_log_probs of one value broadcast, as generator.py @00b0fa3f
    _broadcast_pad); temperature 0 becomes k=1 (argmax); top_k < 1 or > 32 becomes 32.
    (The real one also inverts temperature; the double keeps it readable.)"""
    assert max_batch_size % 32 == 0
    padded = {}
    for f in fields(sampling_params):
        value = getattr(sampling_params, f.name)
        values = list(value) if isinstance(value, list) else [value]
        if f.name == "enable_log_probs" and len(values) == 1:  # _broadcast_pad: one flag is every user's
            values = values * max_batch_size
        assert len(values) <= max_batch_size, f"{f.name} has {len(values)} values for {max_batch_size} users"
        padded[f.name] = values + [_PAD[f.name]] * (max_batch_size - len(values))
    for i, temperature in enumerate(padded["temperature"]):
        if temperature == 0:
            padded["top_k"][i] = 1
        padded["top_k"][i] = min(32, padded["top_k"][i]) if padded["top_k"][i] >= 1 else 32
    return replace(sampling_params, **padded)
