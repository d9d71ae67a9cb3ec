"""The contract a mesh replica calls, shaped after tt-metal's Galaxy generator for vLLM:
allocate the paged KV cache once, prefill one user's tokens into its pages from a start position,
decode every slot one step on fixed-shape page tables.

A backend either returns logits (the host samples them) or samples itself ("device sampling"):
when `sampling` is passed, prefill/decode return token ids instead of logits. Which parameters a
backend can sample on its own is declared in `Capabilities.device_sampling`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler.sampling import PromptLogprobs, SamplingParams

if TYPE_CHECKING:  # the router imports Capabilities, and must not pay for torch
    import torch

# Decode slots a mesh may have: a Galaxy has 32 (model.galaxy.NUM_SLOTS), the simulated and torch backends up to 8x
# that. Past it the per-step buffers are memory, not a batch: host sampling holds float32 logits [num_slots, vocab]
# each step, 128 MiB at 256 slots of Llama 3's 128,256-token vocabulary.
MAX_NUM_SLOTS = 256


def check_num_slots(num_slots: int) -> None:
    """Raises ValueError naming num_slots unless 1 <= num_slots <= MAX_NUM_SLOTS."""
    if not 1 <= num_slots <= MAX_NUM_SLOTS:
        raise ValueError(f"num_slots: 1 to {MAX_NUM_SLOTS} decode slots a mesh (a Galaxy has 32), not {num_slots}")


@dataclass(frozen=True)
class Capabilities:
    num_slots: int  # decode batch (32 on a Galaxy; slot s lives on mesh column s // 8)
    block_size: int  # tokens per KV block (64 on a Galaxy)
    num_blocks: int  # KV blocks per KV group: block ids 0..num_blocks-1 name a different memory in each group
    max_seq_len: int  # longest sequence (prompt + output)
    prefix_align: int  # prefix-cache hits are rounded down to this many tokens
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    # Independent KV caches: slot s writes and reads only group s // (num_slots // kv_groups). A Galaxy has
    # one per mesh column (4); a block id or a cached prefix is only meaningful inside its group.
    kv_groups: int = 1
    # SamplingParams fields the backend applies itself; any other non-default field needs host logits.
    device_sampling: frozenset[str] = field(default_factory=frozenset)
    max_device_top_k: int | None = None  # the device sampler's largest top_k (32 on a Galaxy); None: no limit
    # Expected worst-case times, from which the router and the replica derive when a work has hung:
    decode_step_s: float = 1.0  # one decode step of all slots, at the longest context
    prefill_token_s: float = 0.01  # one prefill token, at the longest context
    # Its prefill can give the logits of every position, not only the last (prefill_prompt_logprobs): vLLM's
    # prompt_logprobs and completions' echo with logprobs. False: such requests are refused (a 400 naming the field).
    prompt_logprobs: bool = False
    # decode_async returns before its step ends, so the host works while the device runs (the runner starts step k + 1
    # before it reads step k's tokens). False: the host and the device take turns, and each step waits for the host.
    async_decode: bool = False

    def expected_seconds(self, num_prefill_tokens: int, num_decode_steps: int) -> float:
        """How long a work of that size should take at worst (seconds)."""
        return num_prefill_tokens * self.prefill_token_s + num_decode_steps * self.decode_step_s

    def __post_init__(self):
        check_num_slots(self.num_slots)
        if self.kv_groups < 1 or self.num_slots % self.kv_groups:
            raise ValueError(f"{self.num_slots} slots cannot be split evenly over {self.kv_groups} KV groups")

    @property
    def slots_per_group(self) -> int:
        return self.num_slots // self.kv_groups

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_seq_len // self.block_size)


class DecodeOutput(ABC):
    """A step decode_async started: its sampled tokens, read when the host needs them."""

    @abstractmethod
    def tokens(self) -> torch.Tensor:
        """The step's token ids, int64 [num_slots] (inactive rows are padding), once the device has made them
        (blocks until then)."""

    def logprobs(self) -> torch.Tensor:
        """The step's sampled tokens' logprobs, float32 [num_slots], for the rows whose params ask logprobs 0 (others
        are padding), once tokens() has returned. Only where caps.device_sampling has "logprobs"."""
        raise NotImplementedError("this backend's device gives no logprobs")


class Backend(ABC):
    """One mesh's model. Not thread-safe: the mesh replica drives it from one thread."""

    caps: Capabilities

    @abstractmethod
    def prefill(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                sampling: SamplingParams | None = None) -> torch.Tensor:
        """Compute positions [start, len(token_ids)) into the blocks; the KV of [0, start) is
        already in them. Returns logits [vocab] of the last position, or (with `sampling`) a 0-d
        token id tensor."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
               active: torch.Tensor, sampling: list[SamplingParams | None] | None = None) -> torch.Tensor:
        """One step for all slots. tokens/positions: int64 [num_slots]; page_table: int32
        [num_slots, max_blocks_per_seq]; active: bool [num_slots] (inactive rows are padding and
        must not write the cache). Returns logits [num_slots, vocab], or (with `sampling`) token ids
        [num_slots]."""

    def decode_logprobs(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
                        active: torch.Tensor, sampling: list[SamplingParams | None]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """decode with `sampling`, which also gives the sampled tokens' logprobs: (token ids [num_slots], float32
        [num_slots], set for the rows whose params ask logprobs 0, padding elsewhere). Only where caps.device_sampling
        has "logprobs"."""
        raise NotImplementedError("this backend's device gives no logprobs")

    def prefill_logprobs(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                         sampling: SamplingParams) -> tuple[int, float] | None:
        """prefill with `sampling` (a row asking logprobs 0 that can_sample takes), whose device also gives the first
        token's logprob: (token id, float32 logprob), or None where this backend's prefill gives the token alone (the
        runner then samples that token on the host from prefill's logits; a backend may have run the prefill to find
        out, and running it again writes the same KV)."""
        return None

    def prefill_prompt_logprobs(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                                num_logprobs: int, targets: list[int]) -> tuple[PromptLogprobs | None, torch.Tensor]:
        """prefill without sampling, which also scores `targets`, the prompt tokens that positions start,
        start + 1, ... predict (at most one per position: token start + 1 first): (their logprobs, None if there are
        none; the last position's logits [vocab]). Only where caps.prompt_logprobs."""
        raise NotImplementedError("this backend's prefill gives only the last position's logits")

    def decode_mixed(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
                     active: torch.Tensor, sampling: list[SamplingParams | None], host_rows: list[int]
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One step where the rows with `sampling[s]` set are sampled on the device and the active rows in
        `host_rows` need logits for the host. Returns (token ids [num_slots] or None, logits
        [len(host_rows), vocab]). This default, for a backend that yields either tokens or logits per step
        (tt-metal's generator does), returns logits of every row [num_slots, vocab] and None: the runner
        then samples every row on the host, exactly."""
        return None, self.decode(tokens, positions, page_table, active)

    def decode_async(self, tokens: torch.Tensor | DecodeOutput, positions: torch.Tensor, page_table: torch.Tensor,
                     active: torch.Tensor, sampling: list[SamplingParams | None]) -> DecodeOutput:
        """Start one step sampled on the device for every active row (decode's arguments, `sampling[s]` set for each)
        and return without waiting for it. `tokens` may be the previous step's output, whose tokens stay on the
        device: the host starts step k + 1 before it reads step k, as tenstorrent/vllm's TT runner does
        (vllm/worker/tt_model_runner.py @00d852e2) with tt-metal's `decode_forward(read_from_device=False)` and
        `read_decode_output(async_read=True)` (models/demos/llama3_70b_galaxy/tt/generator.py @00b0fa3f). Only where
        caps.async_decode."""
        raise NotImplementedError("this backend decodes one step at a time (caps.async_decode is False)")

    def can_sample(self, params: SamplingParams) -> bool:
        """True when the backend samples `params` by itself (no host logits needed): every non-default field
        is one it declares, and top_k is within its limit. One exception to exactness: top_k off (0) on a
        backend with a `max_device_top_k` samples from that many top tokens, as tt-metal's device sampler
        does (format_sampling_params turns k < 1 into 32); sending the commonest request's 128k logits per
        slot to the host would cost more than the decode step (README, "Running on a Galaxy"). A backend that
        declares no device sampling never samples, not even with default parameters. (min_tokens is the
        runner's: it masks stop ids on the host until they are generated.) A device that declares "logprobs" gives
        the sampled token's alone (logprobs 0), as tt-metal's LogProbsCalculator (models/common/sampling/
        tt_log_probs.py @023b5d02, calculate_log_probs: one value per user): top_logprobs need the host."""
        if not self.caps.device_sampling or params.logprobs:
            return False
        limit = self.caps.max_device_top_k
        if limit is not None and params.top_k > limit:
            return False
        defaults = SamplingParams()
        needed = {name for name in SamplingParams.model_fields
                  if name in SAMPLING_FIELDS and getattr(params, name) != getattr(defaults, name)}
        return needed <= self.caps.device_sampling

    def as_device_samples(self, params: SamplingParams) -> SamplingParams:
        """`params` as the device sampler applies them (can_sample's one inexactness: top_k off is the device's
        top_k limit), for a row it could sample that is sampled on the host this step: a backend that yields
        either tokens or logits per step (decode_mixed) gives every row's logits when one row needs them, and
        the other rows are sampled as the device would have, so no user's sampling depends on its neighbours'."""
        limit = self.caps.max_device_top_k
        return params.model_copy(update={"top_k": limit}) if limit is not None and params.top_k == 0 else params

    def close(self) -> None:
        """Release the device (close the mesh)."""


# Fields that change how a token is drawn (the rest are stop/budget rules the runner applies).
SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                              "frequency_penalty", "repetition_penalty", "logprobs", "logit_bias", "grammar",
                              "allowed_token_ids", "bad_words_token_ids"})
