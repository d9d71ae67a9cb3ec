"""The TT Galaxy backend: tt-metal's Llama-3.3-70B Galaxy model (the generator tenstorrent/vllm drives) on an
8x4 Wormhole mesh that this process opens.

Targets the versions tt-inference-server pins for Llama-3.3-70B on GALAXY (workflows/model_specs/prod/llm.yaml
@cb954e42: tt-metal e867533, tenstorrent/vllm 8f36910). The index could not resolve those short hashes, so the
interface is read from the nearest versions it holds, each cited where used:
- tt-metal models/demos/llama3_70b_galaxy/tt/generator.py @00b0fa3f: `prefill_forward_text` (`start_pos`
  prefix caching), `decode_forward` (`decode_forward_text` before the rename), the lazy built-in prefill
  warm-up on the first prefill, the finaliser that releases the traces;
- its generator_vllm.py @0be6ffc8: the model build (TtModelArgs -> TtTransformer(use_paged_kv_cache=True)) and
  `LlamaForCausalLM.allocate_kv_cache`, the checkout's own KV allocator;
- llama_model.py @2c4674af `prepare_prefill_inputs_host` / `prepare_decode_inputs_host`: a user's KV lives on
  its mesh column only (slot s on column s // 8), so the mesh is four KV caches (`kv_groups`);
- tenstorrent/vllm vllm/worker/tt_worker.py @987d7bd2 (mesh open/close, fabric), vllm/v1/worker/
  tt_model_runner.py @db78fb6c (per-rank page tables, warm-up at start), models/common/warmup/
  warmup_utils.py @9f669429 in tt-metal (the decode warm-up's sampling variants).
`ttnn` and the checkout's `models` package are imported only when a backend is built: ttnn is the checkout's own
build (its python_env, Python 3.10 or 3.12) and computes nothing without chips.

Device block 0 is never handed to the caller: tt-metal pads prefill page tables with block 0 and writes the
padded positions' KV there (vLLM keeps block 0 as its null block, in each data-parallel rank's pool). Caller
block b of a group is device block b + 1 of that group's column: each column's chips hold their own copy of
the cache, so block ids mean a different memory in each group and page-table rows need no translation.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import inspect
import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from model.backend import Backend, Capabilities, DecodeOutput
from model.embedded import cache_root
from model.galaxy import (BLOCK_SIZE, DEVICE_MAX_TOP_K, DEVICE_SAMPLING, KV_GROUPS, LLAMA3_EOS, MESH_SHAPE,
                          NUM_SLOTS, PREFIX_ALIGN, TTMeshConfig, galaxy_sizes, padded_prefill_len)
from model.sampler import sample_row
from model.simulated import GalaxyTiming
from scheduler.sampling import SamplingParams

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0)  # for rows without a request
# A non-greedy row: the device runs another sampling program for it than for an all-argmax batch
# (warmup_utils.py warms temperature 1.0, top-k 10, top-p 0.9 likewise).
_SAMPLED = SamplingParams(temperature=1.0, top_k=10, top_p=0.9)
# A row asking its token's logprob: the sampler runs the LogProbsCalculator too, in a trace of its own
# (SamplingGenerator's trace key has log_probs_on, models/common/sampling/generator.py @00b0fa3f)
_LOG_PROBS = SamplingParams(temperature=1.0, top_k=10, top_p=0.9, logprobs=0)
_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32
# The ttnn of the checkout whose models/ run here, not a PyPI wheel of another commit (README, Running on a Galaxy)
_TTNN_HINT = ("the TT Galaxy backend needs the ttnn built from the tt-metal checkout it runs: pip install -e '.[tt]' "
              "(meshserve) into that checkout's python_env (Python 3.10 or 3.12) and start Ray from it")


class TTGalaxyBackend(Backend):
    def __init__(self, model_dir: str | os.PathLike | None = None, *, mesh_shape: tuple[int, int] = MESH_SHAPE,
                 num_slots: int = NUM_SLOTS, block_size: int = BLOCK_SIZE, num_blocks: int | None = None,
                 max_seq_len: int | None = None, num_layers: int | None = None,
                 tt_config: TTMeshConfig | dict | None = None):
        """`model_dir` (a Hugging Face or Meta folder) is exported as HF_MODEL or LLAMA_DIR, where
        tt-metal's TtModelArgs looks; without it those variables must already be set. `num_blocks` is per
        KV group (mesh column). `num_layers` below 80 builds a truncated model for bring-up.
        Returns once the model is warmed up (unless the config turns that off): a replica is ready only
        when no request will compile."""
        if num_slots != NUM_SLOTS:
            raise ValueError(f"the Galaxy model decodes exactly {NUM_SLOTS} slots, not {num_slots}")
        if PREFIX_ALIGN % block_size:
            raise ValueError(f"block_size must divide the prefix alignment {PREFIX_ALIGN}")
        self.config = config = TTMeshConfig(**tt_config) if isinstance(tt_config, dict) else tt_config or TTMeshConfig()
        max_seq_len, num_blocks = galaxy_sizes(mesh_shape, max_seq_len, num_blocks, block_size)
        self._device_tokens = (num_blocks + 1) * block_size  # a column's cache, the spare block 0 included
        self._device_argmax: bool | None = None  # the device sampler's mode after the last parameters it took
        self._last_step: _TTDecodeOutput | None = None  # the device's decode inputs are this step's next ones
        self._prefill_log_probs: bool | None = None  # whether the checkout's prefill returned log-probs asked of it
        _export_weights_dir(model_dir)
        _export_cache_dir()
        _export_line_env(config)

        self.ttnn = _import_ttnn()
        self.generator = self.kv_cache = None
        self.mesh = _open_mesh(self.ttnn, config, mesh_shape)
        try:
            self.generator, self._decode_forward, args = _build_generator(self.ttnn, self.mesh, max_seq_len,
                                                                          num_layers)
            self.kv_cache, self.kv_cache_api = _allocate_kv_cache(self.ttnn, self.generator, self.mesh, args,
                                                                  num_blocks + 1, block_size)
            # prompt_logprobs stays False: prefill_forward_text returns each user's last-token logits (or token) only,
            # so the prompt's logprobs are refused at the ingress (a 400 naming the field), never sent here
            self.caps = Capabilities(num_slots=NUM_SLOTS, block_size=block_size, num_blocks=num_blocks,
                                     max_seq_len=max_seq_len, prefix_align=PREFIX_ALIGN, vocab_size=args.vocab_size,
                                     eos_token_ids=LLAMA3_EOS, kv_groups=KV_GROUPS,
                                     device_sampling=_device_sampling(config),
                                     max_device_top_k=DEVICE_MAX_TOP_K,
                                     async_decode=config.overlap_decode and config.sample_on_device_mode is not None
                                     and _reads_async(self.generator),
                                     **_expected_times(config, max_seq_len, num_blocks * block_size))
            if config.enable_model_warmup:
                self.warmup()
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # its frames hold the generator: let close() release it
            self.close()
            raise

    def prefill(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                sampling: SamplingParams | None = None) -> torch.Tensor:
        on_device = sampling is not None and self.config.sample_on_device_mode == "all" and \
            (not _argmax(sampling) or self._device_argmax is not False)
        out, _ = self._prefill(token_ids, start, torch.tensor([block_ids], dtype=torch.int32) + 1, slot,
                               sampling if on_device else None)
        if on_device:
            return out[0].to(torch.long)
        logits = out[0, -1].float()
        if sampling is None:
            return logits
        # "decode_only", or a greedy request among sampled decodes: its first token is taken here, as the device
        # would sample it (its top 32 for top_k off), as every later one is
        return torch.tensor(sample_row(logits, self.as_device_samples(sampling), len(token_ids))[0])

    def prefill_logprobs(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                         sampling: SamplingParams) -> tuple[int, float] | None:
        """The first token sampled on the device with its log-prob, as tenstorrent/vllm's runner takes a prefill's
        (vllm/v1/worker/tt_model_runner.py @007ec40d execute_sync_with_model_input: (tokens, log-probs) whenever a
        device-sampled request asks them): prefill_forward_text returns (output_toks, prefill_log_probs) where its
        sampler computed log-probs (generator.py @00b0fa3f), the LogProbsCalculator's bfloat16 value, as
        decode_logprobs'. None without device prefill sampling ("decode_only") or where the checkout's prefill
        returned no log-probs: the warm-up's logprobs prefill finds that out, else the first request's."""
        if self.config.sample_on_device_mode != "all" or "logprobs" not in self.caps.device_sampling \
                or self._prefill_log_probs is False:
            return None
        tokens, log_probs = self._prefill(token_ids, start, torch.tensor([block_ids], dtype=torch.int32) + 1, slot,
                                          sampling)
        if log_probs is None:
            return None
        return int(tokens[0]), float(log_probs.view(-1)[0])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
               active: torch.Tensor, sampling: list[SamplingParams | None] | None = None) -> torch.Tensor:
        device_table, positions = _device_rows(page_table, positions, active)
        out, _ = self._decode(tokens, positions, device_table,
                              None if sampling is None else [p or _GREEDY for p in sampling])
        return out.to(torch.long) if sampling is not None else out[:, -1].float()

    def decode_logprobs(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
                        active: torch.Tensor, sampling: list[SamplingParams | None]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """decode, and the log-probs the device computed beside the tokens: decode_forward returns
        process_decode_output_host's (tokens, log-probs) (generator.py @00b0fa3f), the log-probs those of tt-metal's
        LogProbsCalculator (models/common/sampling/tt_log_probs.py @023b5d02): log_softmax of the raw logits at the
        sampled token, computed in bfloat16 (logit - global max - log(sum of exp)), so bfloat16-precise, as
        text_demo.py's batch-32-log-probs reports them."""
        device_table, positions = _device_rows(page_table, positions, active)
        out, log_probs = self._decode(tokens, positions, device_table, [p or _GREEDY for p in sampling])
        if log_probs is None:
            raise RuntimeError("this tt-metal checkout's decode_forward returned no log-probs")
        return out.to(torch.long), log_probs.view(-1)[:NUM_SLOTS].float()

    def decode_async(self, tokens: torch.Tensor | DecodeOutput, positions: torch.Tensor, page_table: torch.Tensor,
                     active: torch.Tensor, sampling: list[SamplingParams | None]) -> DecodeOutput:
        """decode_forward(read_from_device=False), its read enqueued at once (read_decode_output(async_read=True),
        generator.py @00b0fa3f): the step's tokens are the decode trace's own token input, which the next step
        reads and overwrites, so the copy must be in the queue before that step. A step chained on the last one
        (same device page table, so the same rows; positions one further; same parameters; nothing run between)
        goes with reset_inputs=False: the trace replays on the device's tokens and positions + 1, as tenstorrent/
        vllm's runner chains its steps (vllm/worker/tt_model_runner.py @00d852e2). Any other step makes the
        generator load the host's inputs, so it takes the previous step's tokens from the host."""
        device_table, positions = _device_rows(page_table, positions, active)
        params = [p or _GREEDY for p in sampling]
        last = self._last_step
        chained = tokens is last and last is not None and torch.equal(last.device_table, device_table) \
            and torch.equal(last.positions + (last.positions >= 0), positions) and last.params == params
        if isinstance(tokens, DecodeOutput) and not chained:
            tokens = tokens.tokens()
        out = self._decode(torch.zeros(NUM_SLOTS, dtype=torch.long) if chained else tokens, positions, device_table,
                           params, read_from_device=False, reset_inputs=not chained)
        host, events = self.generator.read_decode_output(out, async_read=True)
        self._last_step = _TTDecodeOutput(self, host, events, device_table, positions, params)
        return self._last_step

    def _prefill(self, token_ids: list[int], start: int, device_row: torch.Tensor, slot: int,
                 sampling: SamplingParams | None):
        """One user's prefill on device block ids (serving and warm-up take this same call). Returns (tokens [1] or
        logits [1, 1, vocab], the device's log-probs [1] or None). With `sampling`, the device samples for the request's
        slot, and all 32 rows' top-k, top-p and temperature are replaced: every other row with format_sampling_params'
        padding, argmax (prefill_forward_text's own _scatter_params_to_slots, generator.py @00b0fa3f and every Galaxy
        generator.py the index holds that samples a prefill), or with the request's own values (models/common/sampling's
        scatter_sampling_params_to_slots, newer: "Rows no request occupies inherit the last real request's values").
        Either way the sampler's mode becomes the request's (TTSampling.reset_params decides it from all 32 rows' k, p
        and temperature, tt_sampling.py @0365bf78), and the running users' rows are not theirs until a decode loads the
        host's parameters: the next decode goes with reset_inputs (below). Log-probs flags: @00b0fa3f passes no
        empty_slots, so all 32 become the request's (its one flag broadcast); a checkout passing them on
        (SamplingGenerator.apply_prefill_state; reset_params @0365bf78 hands them to set_log_probs_mode alone) changes
        the prefilled slot's alone, and a prefill not asking log-probs after a decode that did returns them too (taken
        apart below). What a prefill does to the other users' seeds and penalty history does not matter here: no device
        row carries either (DEVICE_SAMPLING's comment, model/galaxy.py).
        The row goes as wide as a decode's page table, padded with the spare block 0: generator.py @f9153b43 prepares
        the decode traces, keyed by their page table's shape, in the first prefill's warm-up at that prefill's width,
        and a traced decode of another width fails once its prefill traces are recorded ("preparation is closed";
        its own warmup_model_prefill passes max_seq_len's blocks for that reason). The generator cuts the row to the
        blocks it prefills, so the padding is never read."""
        width = self.caps.max_blocks_per_seq
        if device_row.shape[1] < width:
            device_row = torch.nn.functional.pad(device_row, (0, width - device_row.shape[1]))
        # the next decode loads the host's inputs (reset_inputs): a prefill sampled on the device leaves the model in
        # decode mode (prefill_forward_text's switch_mode("decode"), generator.py @00b0fa3f), so no mode change would
        self._last_step = None
        if sampling is not None:
            self._device_argmax = _argmax(sampling)
        out = self.generator.prefill_forward_text(
            torch.tensor([token_ids], dtype=torch.long),
            page_table=device_row,
            kv_cache=self.kv_cache,
            prompt_lens=[len(token_ids)],
            enable_trace=True,
            sampling_params=None if sampling is None else _tt_sampling([sampling]),  # request order: moved to `slot`
            empty_slots=[slot],
            start_pos=[prefill_start(start, len(token_ids), self._device_tokens)],
        )
        out, log_probs = out if isinstance(out, tuple) else (out, None)  # @00b0fa3f's when its sampler computed them
        if sampling is not None and sampling.logprobs is not None and self._prefill_log_probs is None:
            self._prefill_log_probs = log_probs is not None
            if log_probs is None:
                log.warning("this tt-metal checkout's prefill_forward_text returns no log-probs: a first token's "
                            "logprob is sampled on the host")
        return out, log_probs

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, device_table: torch.Tensor,
                sampling: list[SamplingParams] | None, read_from_device: bool = True, reset_inputs: bool = True):
        """One step of all 32 slots on device block ids.
        reset_inputs=True every step: decode_forward (generator.py @00b0fa3f) otherwise loads tokens, positions
        and sampling parameters only when the page table changed, and replays its trace on the device's own
        (the tokens it sampled, positions + 1). tenstorrent/vllm's runner (tt_model_runner.py @007ec40d) passes
        no reset_inputs and relies on that; here a slot retires at EOS with its page-table row unchanged, and
        host-sampled rows feed tokens the device did not pick. (decode_async chains steps where that holds.)
        Read from the device: (tokens [32] or logits [32, 1, vocab], the device's log-probs [32] or None)."""
        self._last_step = None
        if sampling is not None:
            self._device_argmax = all(_argmax(p) for p in sampling)
        out = self._decode_forward(
            tokens,
            positions,
            page_table=device_table,
            kv_cache=self.kv_cache,
            enable_trace=True,
            read_from_device=read_from_device,
            sampling_params=None if sampling is None else _tt_sampling(sampling),
            reset_inputs=reset_inputs,  # the host owns tokens and positions (slots join, leave and move between steps)
        )
        if not read_from_device:
            return out  # (tokens, log-probs) on the device, as read_decode_output takes them
        return out if isinstance(out, tuple) else (out, None)  # older generators return no log-probs

    def warmup(self) -> None:
        """Compile and capture, before any request, every program serving will run: each prefill length
        bucket from scratch and after a cached prefix, each output and sampling variant, decode with each.
        The first request would otherwise compile for minutes, and a compile after a trace is captured can
        corrupt the traces. What tenstorrent/vllm does at start (tt_model_runner.py warmup_model), through
        this backend's own calls; all of it writes only device block 0, which no caller owns."""
        plan = self._warmup_plan()
        began = time.perf_counter()
        log.info("TT warm-up: %d runs (%s KV allocator)", len(plan), self.kv_cache_api)
        for _, run in tqdm(plan, desc="TT warm-up", unit="run"):
            run()
        log.info("TT warm-up done in %.1f s", time.perf_counter() - began)

    def _warmup_plan(self) -> list[tuple[str, Callable[[], object]]]:
        caps, mode = self.caps, self.config.sample_on_device_mode
        # A logprobs prefill also tells prefill_logprobs, before any request, whether the checkout's prefill gives them
        log_probs = [_LOG_PROBS] if "logprobs" in caps.device_sampling else []
        prefill_outputs = [None] + ([_GREEDY, _SAMPLED, *log_probs] if mode == "all" else [])
        decode_outputs = [None] + ([_GREEDY, _SAMPLED] if mode else []) + log_probs

        def prefill(new: int, start: int, sampling: SamplingParams | None):
            blocks = -(-(start + new) // caps.block_size)
            return lambda: self._prefill([0] * (start + new), start, torch.zeros(1, blocks, dtype=torch.int32),
                                         0, sampling)

        def decode(sampling: SamplingParams | None):
            zeros = torch.zeros(NUM_SLOTS, dtype=torch.long)
            table = torch.zeros(NUM_SLOTS, caps.max_blocks_per_seq, dtype=torch.int32)
            return lambda: self._decode(zeros, zeros, table, None if sampling is None else [sampling] * NUM_SLOTS)

        # Buckets are the generator's padded prefill lengths (get_padded_prefill_len); a cached prefix is
        # PREFIX_ALIGN tokens, as the generator's own prefix-caching warm-up uses (generator.py @00b0fa3f).
        buckets = [128] + [2**i for i in range(10, caps.max_seq_len.bit_length()) if 2**i <= caps.max_seq_len]
        plan = [(f"prefill {n}", prefill(n, 0, None)) for n in buckets]
        # Not the longest after a prefix: past max_seq_len, the generator's heuristic (_should_skip_prefix_caching,
        # generator.py @00b0fa3f) would recompute all 128 + n tokens, padded to twice the cache. No request can
        # take it (within max_seq_len, n new tokens in the top bucket always recompute their prefix, from the
        # top bucket's uncached trace), and the generator's own warm-up captures it.
        plan += [(f"prefill {n} after a cached prefix", prefill(n, PREFIX_ALIGN, None)) for n in buckets
                 if PREFIX_ALIGN + n <= caps.max_seq_len]
        plan += [(f"prefill sampling {s}", prefill(128, 0, s)) for s in prefill_outputs[1:]]
        plan += [(f"decode sampling {s}", decode(s)) for s in decode_outputs]
        return plan

    def can_sample(self, params: SamplingParams) -> bool:
        return self.config.sample_on_device_mode is not None and super().can_sample(params)

    def close(self) -> None:
        """Model, then KV cache, then submeshes, mesh and fabric, as tt_worker.py's close does: dropping the
        generator runs its finaliser (traces released, CCL closed) while the mesh is still open."""
        if getattr(self, "mesh", None) is None:
            return
        self.generator = self._decode_forward = None
        gc.collect()  # a generator caught in a reference cycle is finalised now, not after the mesh closes
        for layer in (self.kv_cache or [[]])[0]:
            for tensor in layer:
                self.ttnn.deallocate(tensor)
        self.kv_cache = None
        for submesh in self.mesh.get_submeshes():
            self.ttnn.close_mesh_device(submesh)
        self.ttnn.close_mesh_device(self.mesh)
        if self.config.fabric_config != "DISABLED":
            self.ttnn.set_fabric_config(self.ttnn.FabricConfig.DISABLED)
        self.mesh = None


class _TTDecodeOutput(DecodeOutput):
    """A step decode_async started, its read enqueued: what the next step must match to chain on it."""

    def __init__(self, backend: TTGalaxyBackend, host, events: list, device_table: torch.Tensor,
                 positions: torch.Tensor, params: list[SamplingParams]):
        self._backend, self._host, self._events = backend, host, events
        self.device_table, self.positions, self.params = device_table, positions, params
        self._tokens: torch.Tensor | None = None
        self._log_probs: torch.Tensor | None = None

    def tokens(self) -> torch.Tensor:
        if self._tokens is None:  # as tenstorrent/vllm's runner reads (tt_model_runner.py @00d852e2)
            for event in self._events:
                self._backend.ttnn.event_synchronize(event)
            read_log_probs = self._host[1] is not None  # else process_decode_output_host fills in ones
            tokens, log_probs = self._backend.generator.process_decode_output_host(self._host, is_tokens=True)
            self._tokens = tokens.view(-1)[:NUM_SLOTS].to(torch.long)
            self._log_probs = log_probs.view(-1)[:NUM_SLOTS].float() if read_log_probs else None
            self._host = self._events = None
        return self._tokens

    def logprobs(self) -> torch.Tensor:
        """The log-probs read with the tokens (process_decode_output_host; TTGalaxyBackend.decode_logprobs)."""
        self.tokens()
        if self._log_probs is None:
            raise RuntimeError("this tt-metal checkout's decode_forward returned no log-probs")
        return self._log_probs


def _device_rows(page_table: torch.Tensor, positions: torch.Tensor, active: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's (device page table int32 [32, width], positions [32]): caller block ids + 1 (the spare device
    block 0 is none of the router's), and for an inactive row position -1 (skipped, its cache untouched) and the
    spare block 0, as vLLM pads idle rows with its null block (tt_model_runner.py @007ec40d): a retired slot's row
    names blocks the router may have given to another slot of its column since."""
    return torch.where(active[:, None], page_table + 1, 0).to(torch.int32), torch.where(active, positions, -1)


def _reads_async(generator) -> bool:
    """Whether the generator splits a decode from its read as generator.py @00b0fa3f does: read_decode_output(tt_out,
    async_read) enqueues the copy and returns its events, process_decode_output_host makes torch tensors of it.
    Older ones take read_decode_output(tt_out, unpadded_batch_size, is_tokens) (what tenstorrent/vllm's runner
    @00d852e2 calls), which this backend does not drive."""
    read = getattr(generator, "read_decode_output", None)
    return read is not None and "async_read" in inspect.signature(read).parameters and \
        hasattr(generator, "process_decode_output_host")


def _expected_times(config: TTMeshConfig, max_seq_len: int, column_tokens: int) -> dict:
    """What the router's step deadlines assume: the published Galaxy times at the longest context, every
    column's cache full, once the warm-up has compiled every program; without it, Capabilities' slow
    defaults, as first requests compile."""
    if not config.enable_model_warmup:
        return {}
    timing = GalaxyTiming.published()
    return {"decode_step_s": timing.slowest_step_seconds(max_seq_len, KV_GROUPS * column_tokens),
            "prefill_token_s": timing.ttft(max_seq_len) / max_seq_len}


def prefill_start(start: int, end: int, device_tokens: int) -> int:
    """Where the device's prefill of [start, end) begins: `start` rounded down to PREFIX_ALIGN (tt-metal asserts
    block-aligned starts), and lower while the padded new tokens would need more pages than a column's cache
    has (`device_tokens`: its blocks x block_size; the generator's page table for a traced prefill is as wide
    as the cache, generator.py @00b0fa3f). E.g. a 2,972-token tail after a 127,872-token cached prefix pads
    to 4,096 and would end at 131,968, past the 131,648 of the default cache. Starting lower only recomputes
    KV the cache already holds; from 0 a prompt within max_seq_len (a power of two) always fits."""
    begin = start - start % PREFIX_ALIGN
    while begin and begin + padded_prefill_len(end - begin) > device_tokens:
        begin -= PREFIX_ALIGN
    return begin


def _device_sampling(config: TTMeshConfig) -> frozenset[str]:
    """The SamplingParams fields the device applies. "logprobs" (the sampled token's alone: Backend.can_sample)
    where the checkout's sampler computes them: its SamplingParams has enable_log_probs, which decode_forward hands
    to TTSampling.reset_params and its LogProbsCalculator (models/common/sampling/generator.py @00b0fa3f
    reset_sampling_params), and decode_forward returns them beside the tokens."""
    if not config.sample_on_device_mode:
        return frozenset()
    from models.demos.llama3_70b_galaxy.tt.generator import SamplingParams as TTSamplingParams

    logprobs = "enable_log_probs" in {f.name for f in dataclasses.fields(TTSamplingParams)}
    return DEVICE_SAMPLING | {"logprobs"} if logprobs else DEVICE_SAMPLING


def _argmax(p: SamplingParams) -> bool:
    """Whether tt-metal samples this row by argmax: TTSampling._is_force_argmax_sampling (models/common/sampling/
    tt_sampling.py @00b0fa3f) takes a batch whose rows all have top-k 1, top-p 0 or 1 and temperature 1 (greedy
    rows become that) down a faster path. SamplingGenerator.reset_sampling_params (its generator.py) releases
    every captured sampling trace when that mode changes, and the next traced decode captures again; each
    prefill the device samples sets the mode for its own request (the other rows are argmax padding, or the
    request's own values in newer checkouts: _prefill). So a
    greedy request's first token is the host's argmax when the running batch is sampled: sampled on the device,
    it would cost two mode changes and a capture. (A sampled request joining an argmax batch changes the mode
    once wherever its first token is taken.) A row asking its logprob is not: the argmax program computes no
    log-probs (TTSampling.forward: "Argmax fast-path does not compute logprobs", tt_sampling.py @0365bf78), so
    such a row keeps the batch on the sampling program, where top-k 1 draws the same top token (_tt_sampling)."""
    return (p.greedy or (p.top_k == 1 and p.temperature == 1.0 and p.top_p in (0.0, 1.0))) and p.logprobs is None


def _tt_sampling(rows: list[SamplingParams]):
    """tt-metal's SamplingParams: a list per field, one value per row (the generator pads to 32 users). Taken
    from the Galaxy generator's module, which imports it in every version: from models.common.sampling
    (@b69a64e6, @00b0fa3f) or from models.tt_transformers.tt.generator (@08b93c9f)."""
    from models.demos.llama3_70b_galaxy.tt.generator import SamplingParams as TTSamplingParams

    # A top_p too small for float32 (1e-50) would be 0 there: it goes as float32's smallest normal, which keeps the
    # top token alone, as 1e-50 means. A greedy row goes with top_p 1.0: older format_sampling_params keep a greedy
    # row's top_p (newer ones set 0.0), and _is_force_argmax_sampling takes the argmax path only for top_p 0 or 1
    # (see _argmax). A row asking its logprob that draws its top token (greedy, or top-k 1) goes as temperature 1,
    # top-k 1 and top_p float32's smallest normal, off the argmax program (see _argmax): top-k 1 keeps its top token
    # alone. Not as temperature 0: newer format_sampling_params make that top-k 1 and top-p 0.0 ("the compact argmax
    # representation for greedy rows": models/common/sampling/generator.py in the stored version with num_logprobs,
    # whose commit the index does not name; @5e75671c still kept its top_p); nor with top-p 1, the argmax program's
    # too: a batch of such rows went there and reported the generator's ones.
    # enable_log_probs only where the checkout has it (_device_sampling).
    logprob_greedy = [p.logprobs is not None and (p.greedy or p.top_k == 1) for p in rows]
    log_probs = {"enable_log_probs": [p.logprobs is not None for p in rows]} \
        if any(p.logprobs is not None for p in rows) else {}
    return TTSamplingParams(temperature=[1.0 if lg else p.temperature  # 0.0 (greedy): the device's argmax
                                         for p, lg in zip(rows, logprob_greedy)],
                            top_k=[1 if lg else p.top_k for p, lg in zip(rows, logprob_greedy)],
                            top_p=[_TINY if lg else 1.0 if p.greedy else max(p.top_p, _TINY)
                                   for p, lg in zip(rows, logprob_greedy)],
                            seed=[p.seed for p in rows], **log_probs)


def _import_ttnn():
    try:
        import ttnn
    except ImportError as e:
        raise ImportError(_TTNN_HINT) from e
    return ttnn


def _export_weights_dir(model_dir: str | os.PathLike | None) -> None:
    """tt-metal's TtModelArgs reads the checkpoint from HF_MODEL (config.json) or, before tt-metal issue #42139,
    LLAMA_DIR (params.json), and refuses both at once (models/demos/llama3_70b_galaxy/tt/model_config.py,
    TtModelArgs.__init__; @019d812b reads HF_MODEL only, and _build_generator names a Meta folder it refuses). Which one
    the folder's weights decide (checkpoint_format): an HF folder may hold a params.json too (Mistral's repos)."""
    if model_dir:
        from model.checkpoint import checkpoint_format
        meta = checkpoint_format(model_dir) == "meta"
        os.environ["LLAMA_DIR" if meta else "HF_MODEL"] = str(model_dir)
        os.environ.pop("HF_MODEL" if meta else "LLAMA_DIR", None)
    elif not (os.environ.get("HF_MODEL") or os.environ.get("LLAMA_DIR")):
        raise ValueError("no weights: pass a model folder or set HF_MODEL (or LLAMA_DIR), as for the Galaxy demo")


def _export_cache_dir() -> None:
    """tt-metal's TtModelArgs writes its converted weights (tens of GB) and empty KV-cache files under
    $TT_CACHE_PATH/TG, else under os.path.join("model_cache", HF_MODEL, "TG") (model_config.py @019d812b), which
    for an absolute HF_MODEL is the weights folder itself: a read-only or shared mount fails the load, and a
    Hugging Face cache snapshot grows by the cache. Unset, it goes under meshserve's cache, one folder per
    weights folder: a hub snapshot's named by repository and revision, another by its name and a digest of its
    absolute path (the cache is read back unchecked: two checkpoints sharing one would serve the first's weights)."""
    if os.environ.get("TT_CACHE_PATH"):
        return
    given = os.environ.get("HF_MODEL") or os.environ["LLAMA_DIR"]
    weights = Path(given).expanduser()
    if not weights.exists():  # a hub id, which tt-metal looks up itself
        name = given.strip("/").replace("/", "--")
    elif (weights := weights.resolve()).parent.name == "snapshots":
        name = f"{weights.parent.parent.name}-{weights.name[:12]}"
    else:
        name = f"{weights.name}-{hashlib.sha256(str(weights).encode()).hexdigest()[:12]}"
    os.environ["TT_CACHE_PATH"] = str(cache_root() / "tt_cache" / name)


def _export_line_env(config: TTMeshConfig) -> None:
    for name, value in (("LINE_RS", config.line_rs), ("LINE_AG", config.line_ag)):
        if value is not None:
            os.environ[name] = "1" if value else "0"


def _open_mesh(ttnn, config: TTMeshConfig, mesh_shape: tuple[int, int]):
    """As tt_worker.py's open_mesh_device: the host's chips counted (its get_mesh_grid), fabric first, then the mesh
    with the dispatch axis and the trace-region and worker-L1 sizes."""
    chips, needed = len(ttnn.get_device_ids()), mesh_shape[0] * mesh_shape[1]
    if chips < needed:  # a host that advertises `galaxy` but is none: tt-metal would fail opening the mesh
        raise RuntimeError(f"this host has {chips} Tenstorrent chips, and an {mesh_shape[0]}x{mesh_shape[1]} Galaxy "
                           f"mesh needs {needed}: only Galaxy hosts may advertise the mesh's resource (`ray start "
                           "--resources='{\"galaxy\": 1}'`, mesh_resources)")
    if config.fabric_config != "DISABLED":
        ttnn.set_fabric_config(getattr(ttnn.FabricConfig, config.fabric_config))
    axis = ttnn.DispatchCoreAxis.COL if config.dispatch_core_axis == "col" else ttnn.DispatchCoreAxis.ROW
    return ttnn.open_mesh_device(ttnn.MeshShape(*mesh_shape),
                                 dispatch_core_config=ttnn.DispatchCoreConfig(axis=axis),
                                 trace_region_size=config.trace_region_size,
                                 worker_l1_size=config.worker_l1_size)


def _build_generator(ttnn, mesh, max_seq_len: int, num_layers: int | None):
    """TtModelArgs -> state dict -> TtTransformer (paged KV supplied by us) -> generator, as generator_vllm.py's
    initialize_vllm_text_transformer. The generator is its LlamaForCausalLM where that module imports (it
    brings the checkout's KV allocator); it imports vllm.envs (@0be6ffc8), so without vLLM the plain Generator.
    Returns (generator, its decode method, args). Decode is the plain Generator's own `decode_forward`
    (`decode_forward_text` before tt-metal renamed it), bound to the generator: LlamaForCausalLM's override only
    forwards to its parent under one of the two names (`super().decode_forward_text` @0be6ffc8), which a
    checkout whose generator.py has the other one (@00b0fa3f has only `decode_forward`) lacks."""
    try:
        from models.demos.llama3_70b_galaxy.tt.generator import Generator
        from models.demos.llama3_70b_galaxy.tt.llama_model import TtTransformer
        from models.demos.llama3_70b_galaxy.tt.model_config import LlamaOptimizations, TtModelArgs
    except ImportError as e:
        raise ImportError("the TT Galaxy backend builds tt-metal's Llama Galaxy model: put your tt-metal "
                          "checkout on PYTHONPATH (models/demos/llama3_70b_galaxy)") from e
    decode_forward = getattr(Generator, "decode_forward", None) or Generator.decode_forward_text
    try:
        from models.demos.llama3_70b_galaxy.tt.generator_vllm import LlamaForCausalLM as Generator  # noqa: F811
    except ImportError as e:
        log.info("tt-metal's generator_vllm does not import here (%s): the backend allocates the KV cache", e)
    if "start_pos" not in inspect.signature(Generator.prefill_forward_text).parameters:  # before minutes of loading
        raise RuntimeError("this tt-metal checkout's Galaxy generator takes no start_pos in prefill_forward_text "
                           "(prefix caching; e.g. c9bcbd99): meshserve resumes prefills from cached prefixes and "
                           "prefill chunks, and needs a checkout that has it (generator.py @00b0fa3f does)")
    # cache_hf=False where it exists (model_config.py @019d812b defaults it to True: load_state_dict then keeps the
    # whole Hugging Face model in host memory for the process's life; its demos and vLLM pass False)
    cache_hf = {"cache_hf": False} if "cache_hf" in inspect.signature(TtModelArgs).parameters else {}
    try:
        args = TtModelArgs(mesh, instruct=True, max_batch_size=NUM_SLOTS,
                           optimizations=LlamaOptimizations.performance, max_seq_len=max_seq_len, **cache_hf)
    except AssertionError as e:  # model_config.py @019d812b: `assert HF_MODEL, "Please set HF_MODEL ..."`
        meta = os.environ.get("LLAMA_DIR")
        if meta and not os.environ.get("HF_MODEL") and "HF_MODEL" in str(e):
            raise ValueError(f"{meta} is a Meta checkpoint (params.json), and this tt-metal checkout's Galaxy model "
                             "reads Hugging Face weights only (HF_MODEL; tt-metal issue #42139, model_config.py "
                             "@019d812b): point `model` at a Hugging Face folder of the same weights") from e
        raise
    if num_layers is not None:
        args.n_layers = num_layers
    model = TtTransformer(args=args, mesh_device=mesh, dtype=ttnn.bfloat8_b, state_dict=args.load_state_dict(),
                          weight_cache_path=args.weight_cache_path(ttnn.bfloat8_b), use_paged_kv_cache=True,
                          mode="prefill", enable_prefetcher_performance_mode=True)
    generator = Generator(model, args, mesh)
    return generator, decode_forward.__get__(generator), args


def _allocate_kv_cache(ttnn, generator, mesh, args, num_blocks: int, block_size: int) -> tuple[list, str]:
    """[[k, v] per layer] for the one mesh, in tenstorrent/vllm's shape (blocks, kv heads per chip, block, head
    dim; vllm/v1/worker/tt_model_runner.py @007ec40d initialize_kv_cache: kv heads // min(chips per data-parallel
    rank, kv heads)): each chip holds one KV head (8 heads over the 8 mesh rows), and each column's chips their
    own copy.
    Allocated by the checkout's allocate_kv_cache where it has one (what vLLM's model runner calls), else by
    the same tensors built here. Returns the cache and which allocator made it."""
    shape = (num_blocks, args.n_kv_heads // args.cluster_shape[0], block_size, args.head_dim)
    if hasattr(generator, "allocate_kv_cache"):
        return generator.allocate_kv_cache(shape, torch.bfloat16, args.n_layers), "checkout"
    empty = torch.zeros(shape, dtype=torch.bfloat16)
    return [[[ttnn.as_tensor(empty, device=mesh, mesh_mapper=ttnn.ReplicateTensorToMesh(mesh),
                             layout=ttnn.TILE_LAYOUT, memory_config=ttnn.DRAM_MEMORY_CONFIG, dtype=ttnn.bfloat8_b,
                             cache_file_name=args.model_cache_path / f"empty_{kv}cache_paged_attention{shape}")
              for kv in "kv"]
             for _ in range(args.n_layers)]], "backend"
