"""Sampling parameters, validated at the boundary, and the logprobs a token comes back with.

Plain data: the router, the ingress and the engine core import this without torch. The sampler that applies
them on the host is model/sampler.py.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_LOGPROBS = 20
MIN_LOGPROB = -9999.0  # what -inf (and a NaN logit's logprobs) is sent as: JSON has neither (vLLM floors at the same)
# Temperatures in (0, MIN_TEMPERATURE) are raised to it, as vLLM does (vllm/sampling_params.py, __post_init__:
# smaller ones overflow logits / temperature); only 0 samples greedily.
MIN_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY = 0.01  # logits / 1e-38 overflow float32: the distribution turns to NaN
MAX_LOGIT_BIAS_ENTRIES = 1024  # each one is an entry per sampled token in the host sampler
MAX_GRAMMAR_CHARS = 1_000_000  # a compiled grammar crosses the router and the mesh with the request


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 (or -1 at the API) disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's: tokens below min_p x the top probability are dropped
    seed: int | None = Field(None, ge=0, lt=2**64)  # a uint64: the API's int64 as its bits
    max_tokens: int = Field(256, ge=1)
    min_tokens: int = Field(0, ge=0)
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the answer stays in its text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's prompt_logprobs: each prompt token's logprob and this many alternatives, from a prefill that computes
    # every position (no prefix-cache hit); None: none. Completions' echo with logprobs asks for them too.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Added to the token's logit before sampling (OpenAI's logit_bias: -100 bans, +100 forces).
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS_ENTRIES)
    # vLLM's whitelist: only these ids may be sampled (None: any). Sorted, without repeats; never empty.
    allowed_token_ids: tuple[int, ...] | None = None
    # vLLM's bad_words as token sequences: the last token of one is masked where the answer ends with the rest.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    skip_special_tokens: bool = True  # the answer's text leaves special tokens out (the ingress's detokenizer)
    detokenize: bool = True  # false: the ingress makes no text of the answer (vLLM's; its ids are what is wanted)
    # Constrained decoding: an llguidance grammar (model/grammar.py) the answer must match; None: free text.
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, v):
        if v is None:
            return ()
        return (v,) if isinstance(v, str) else tuple(v)

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids_as_tuple(cls, v):
        return () if v is None else tuple(v)

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_not_negative(cls, v):
        # a negative id would index the logits from the end; the ingress also checks the vocabulary's end
        if any(t < 0 for t in v):
            raise ValueError("stop_token_ids must not be negative")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_bounds(cls, v):
        if any(t < 0 for t in v) or any(not -100.0 <= b <= 100.0 for b in v.values()):
            raise ValueError("logit_bias maps token ids >= 0 to biases in [-100, 100]")
        return v

    @field_validator("allowed_token_ids", mode="before")
    @classmethod
    def _allowed_as_sorted_set(cls, v):
        return None if v is None else tuple(sorted(set(v)))

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_not_empty(cls, v):
        if v is not None and (not v or v[0] < 0):
            raise ValueError("allowed_token_ids must be non-empty token ids >= 0")
        return v

    @field_validator("bad_words_token_ids")
    @classmethod
    def _bad_words_not_empty(cls, v):
        if any(not word or min(word) < 0 for word in v):
            raise ValueError("bad_words_token_ids must be non-empty sequences of token ids >= 0")
        return v

    @field_validator("temperature")
    @classmethod
    def _at_least_min_temperature(cls, v):
        return MIN_TEMPERATURE if 0.0 < v < MIN_TEMPERATURE else v

    @field_validator("top_p", "top_k", "min_p", "seed")
    @classmethod
    def _default_when_greedy(cls, v, info: ValidationInfo):
        """argmax ignores them: a greedy request goes with their defaults, as vLLM's SamplingParams.__post_init__
        resets top_p, top_k and min_p, so it stays sampleable on the device (a Galaxy's takes no seed and a top_k
        of 32 at most: "temperature": 0 with "seed": 42 or "top_k": 50 had the host sample it from all logits)."""
        if info.data.get("temperature", 1.0) != 0.0:
            return v
        return cls.model_fields[info.field_name].default

    @field_validator("min_tokens")
    @classmethod
    def _min_le_max(cls, v, info: ValidationInfo):
        # a field validator, so the error is located at min_tokens (the API names the bad parameter)
        if v > info.data.get("max_tokens", v):
            raise ValueError("min_tokens must not exceed max_tokens")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class TokenLogprobs:
    """Log-probability of the sampled token and the top-n alternatives (n = params.logprobs)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class PromptLogprobs:
    """The logprobs of prompt tokens [start, start + T) of one prefill chunk, as arrays (mesh -> router -> ingress):
    a pickled array per field, never an object per position. Row i is prompt token start + i, scored by the model's
    raw log_softmax at position start + i - 1 (vLLM's raw logprobs). `ranks`: vLLM's rank of the prompt token, the
    number of tokens at least as likely (1: the likeliest)."""

    start: int  # >= 1: prompt token 0 has no logprob
    logprobs: np.ndarray  # float32 [T]
    ranks: np.ndarray  # int32 [T]
    top_ids: np.ndarray  # int32 [T, k], likeliest first
    top_logprobs: np.ndarray  # float32 [T, k]

    def __len__(self) -> int:
        return len(self.logprobs)

    @property
    def end(self) -> int:
        return self.start + len(self.logprobs)


class PackedLogprobs(Sequence[TokenLogprobs]):
    """Logprobs the ingress holds for a while (a whole answer's, until its JSON is written; a lagging reader's, until
    it reads them) as flat arrays of numbers. Held as TokenLogprobs (as the link's pickles make them: an object, its
    dict and a list per token, all tracked by the cyclic GC), 8,192 tokens were 25,000 objects that each full
    collection of the replica walked, for as long as they were held; these are six, of any length. A slice gives
    TokenLogprobs again, made for the slice being written."""

    __slots__ = ("token_ids", "logprobs", "top_ids", "top_logprobs", "top_ends")

    def __init__(self, lps: Iterable[TokenLogprobs] = ()) -> None:
        self.token_ids, self.logprobs = array("q"), array("d")  # a float's double as is: its JSON is unchanged
        self.top_ids, self.top_logprobs = array("q"), array("d")  # every token's alternatives, one after another
        self.top_ends = array("q")  # where each token's alternatives end in them
        self.extend(lps)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __iadd__(self, lps: Iterable[TokenLogprobs]) -> PackedLogprobs:
        self.extend(lps)
        return self

    def extend(self, lps: Iterable[TokenLogprobs]) -> None:
        if isinstance(lps, PackedLogprobs):
            base = len(self.top_ids)
            self.top_ends.extend(array("q", [end + base for end in lps.top_ends]))
            for mine, theirs in ((self.token_ids, lps.token_ids), (self.logprobs, lps.logprobs),
                                 (self.top_ids, lps.top_ids), (self.top_logprobs, lps.top_logprobs)):
                mine.extend(theirs)
            return
        for lp in lps:
            self.token_ids.append(lp.token_id)
            self.logprobs.append(lp.logprob)
            for token_id, logprob in lp.top:
                self.top_ids.append(token_id)
                self.top_logprobs.append(logprob)
            self.top_ends.append(len(self.top_ids))

    def __getitem__(self, part: int | slice) -> TokenLogprobs | list[TokenLogprobs]:
        if not isinstance(part, slice):
            at = range(len(self))[part]  # raises IndexError as a list does
            return self[at:at + 1][0]
        start, stop, step = part.indices(len(self))
        assert step == 1, "contiguous slices only"
        begin = self.top_ends[start - 1] if start else 0
        out = []
        for i in range(start, stop):
            end = self.top_ends[i]
            out.append(TokenLogprobs(self.token_ids[i], self.logprobs[i],
                                     list(zip(self.top_ids[begin:end], self.top_logprobs[begin:end]))))
            begin = end
        return out
