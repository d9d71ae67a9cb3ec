"""Double of tt-metal models/demos/llama3_70b_galaxy/tt/generator.py, as read at commit 00b0fa3f57bf8c13
(tt-inference-server pins e867533, which the index could not resolve; the newer @f9153b43 keeps this interface, and
its decode-trace preparation is PREPARES_DECODE_AT_FIRST_PREFILL below): the
Generator constructor, prefill_forward_text and decode_forward with the real signatures (decode_forward's
read_from_device=False split from read_decode_output(async_read=True) and process_decode_output_host), the input checks,
page-table padding, the heuristic that recomputes a cached prefix when reusing it would not pay, sampling-
parameter placement, the lazy built-in prefill warm-up and the finaliser.

There is no model, but there is a KV cache, kept per mesh column as on the Galaxy: a user's KV lives only on
its column's 8 chips (slot s on column s // 8: prepare_prefill_inputs_host in llama_model.py pads the other
columns' page-table rows with -1, decode shards page table and positions over the 4 columns). The fake
cache holds the token id written at each position of each column's copy, and the next token is the sum of
the token ids read back through the row's page table, from that column's copy, modulo the vocabulary. So a
block read from the wrong column, or a wrong page table, gives a wrong token.

Each call is appended to `calls` with what the real generator would do with it: where it writes, the
sampling parameters each of the 32 slots ends up with, and the programs it `compiled` (new shapes: minutes
on a Galaxy, and a compile after trace capture can corrupt the traces, so a warmed-up server compiles none),
and when the sampling module changed mode between argmax and sampling, which releases its traces, and when a
decode captured one again.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import fields, replace

import torch

import ttnn
from models.common.sampling import SamplingParams, format_sampling_params
from models.demos.llama3_70b_galaxy.tt.model_config import SDPA_CHUNK_ALIGN

# The prefill lengths the generator traces (tt_ccl.support_seqlens, llama_ccl.py @bd428598, the newest the index
# holds; the older @00ab7c95 traced 8192 too); others run untraced.
SUPPORT_SEQLENS = (4096, 2048, 1024, 128)

# How a device-sampled prefill places its parameters. False: as generator.py @00b0fa3f (and every Galaxy generator.py
# the index holds that samples a prefill on the device): its own _scatter_params_to_slots leaves every other row
# format_sampling_params' padding (argmax), and reset_sampling_params gets no empty_slots, so all 32 log-probs flags
# are replaced. True: as a generator that takes models/common/sampling's scatter_sampling_params_to_slots (newer
# than @00b0fa3f; no Galaxy generator.py the index holds calls it) and passes empty_slots on, as its
# apply_prefill_state does: every other row takes the request's own values, and only the prefilled slots' log-probs
# flags change (set_log_probs_mode's partial update). Tests set this to True to stand for such a checkout.
SCATTER_SAMPLING_PARAMS_TO_SLOTS = False

# generator.py @f9153b43 (newer than @00b0fa3f: it has all of its interface and adds release_request and prepared
# trace I/O) keys each decode trace by its page table's shape too, and prepares the decode traces' inputs and
# outputs before any trace is captured: in the first prefill's warm-up, at that prefill's page-table width (rows
# padded to 32: _prepare_decode_before_prefill, _decode_preparation_key). Recording the prefill traces closes
# preparation (PreparedTraceIO.freeze), after which a traced decode of a shape not prepared fails ("preparation is
# closed"). Its own warmup_model_prefill therefore passes a page table as wide as max_seq_len's blocks. False stands
# for @00b0fa3f, whose decode trace is keyed by logits or tokens alone.
PREPARES_DECODE_AT_FIRST_PREFILL = True

MAX_BATCH = 32
ROWS = 8  # the mesh rows, over which each column's chips split the vocabulary (LogProbsCalculator's TP axis)
COLUMNS = 4  # prepare_prefill_inputs_host: `devices = 4`; user u lives on column u // 8
USERS_PER_COLUMN = MAX_BATCH // COLUMNS


def get_prefill_warmup_sequence_lengths(max_seq_len: int) -> list[int]:
    """generator.py: 128, then powers of two from 1024 up to max_seq_len."""
    return [128] + [2**i for i in range(10, max_seq_len.bit_length()) if 2**i <= max_seq_len]


def get_padded_prefill_len(seq_len: int) -> int:
    """generator.py get_padded_prefill_len: 128, 1024, then powers of two."""
    if seq_len <= 128:
        return 128
    if seq_len <= 1024:
        return 1024
    return 2 ** (seq_len - 1).bit_length()


def _should_skip_prefix_caching(seq_len: int, num_cached: int) -> bool:
    """generator.py's heuristic: recompute the cached prefix too (from position 0, overwriting its blocks with
    the same KV) when padding erases the saving, or chunked SDPA would cost more than it saves."""
    if num_cached == 0:
        return False
    padded_new, padded_total = get_padded_prefill_len(seq_len - num_cached), get_padded_prefill_len(seq_len)
    if padded_new >= padded_total:
        return True
    ratio = padded_new / padded_total
    if ratio <= 0.125:
        return False
    if ratio <= 0.25:
        return padded_total > 32768
    if ratio <= 0.5:
        return padded_total > 16384
    return True


def num_blocks_in_seq(seq_len: int, block_size: int) -> int:
    """tt_transformers/tt/common.py num_blocks_in_seq."""
    return -(-seq_len // block_size)


def get_block_size(kv_cache) -> int:
    """tt_transformers/tt/common.py get_block_size: dim 2 of a layer's K cache [blocks, heads, block, dim]."""
    return kv_cache[0][0].shape[2]


def _per_slot(params: SamplingParams) -> list[dict]:
    return [{f.name: getattr(params, f.name)[slot] for f in fields(params)} for slot in range(MAX_BATCH)]


def _sampling_kind(params: SamplingParams) -> str:
    """The sampling module runs a different program when every row is argmax than otherwise: tt_sampling.py
    _is_force_argmax_sampling, rows of top-k 1, top-p 0 or 1 and temperature 1. A greedy row (temperature 0 here:
    the double keeps temperatures as they came) gets temperature 1 and top-k 1 from format_sampling_params, and
    keeps the top-p it came with in the older versions (newer ones set 0.0), so it is argmax only with top-p 0
    or 1."""
    argmax = all(k == 1 and p in (0.0, 1.0) and t in (0, 1.0)
                 for t, k, p in zip(params.temperature, params.top_k, params.top_p))
    return "greedy" if argmax else "sampled"


def device_log_probs(logits: torch.Tensor, tokens: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Each row's log-prob of its token as tt-metal's LogProbsCalculator computes it on the device (models/common/
    sampling/tt_log_probs.py @023b5d02, calculate_log_probs): the logits in bfloat16, each of the 8 mesh rows' share
    of the vocabulary reduced apart (its max, then its sum of exp(logit - global max)), the 8 combined, then
    logit - global max - log(global sum), every op's result a bfloat16. bfloat16 [rows]. (The device's padding
    columns past the vocabulary are left out: the double has no LM-head padding.)"""
    x = logits.to(torch.bfloat16)
    shards = x.split(padded_vocab_size // ROWS, dim=-1)
    global_max = torch.stack([shard.max(-1).values for shard in shards]).max(0).values
    sums = [(shard - global_max[:, None]).exp().float().sum(-1).to(torch.bfloat16) for shard in shards]
    global_sum = torch.stack(sums).float().sum(0).to(torch.bfloat16)
    picked = x.gather(1, tokens.view(-1, 1).long())[:, 0]
    return (picked - global_max) - global_sum.log()


def _column_store(kv_cache) -> torch.Tensor:
    """What each column's copy of the cache holds: token ids [columns, blocks, block_size] (0: never written)."""
    k = kv_cache[0][0]
    if k.columns is None:
        k.columns = torch.zeros((COLUMNS, k.shape[0], k.shape[2]), dtype=torch.long)
    return k.columns


class Generator:
    def __init__(self, model, model_args, mesh_device, tokenizer=None, formatter=None):
        self.model = model[0] if isinstance(model, list) else model
        self.model_args = model_args[0] if isinstance(model_args, list) else model_args
        self.mesh_device = mesh_device
        self.already_warmed_up_prefill = False
        self.trace_id_prefill = defaultdict(lambda: None)
        self.trace_ids_decode = defaultdict(lambda: None)
        self.calls: list[tuple[str, dict]] = []
        self.compiled: set[tuple] = set()
        self.sampling_mode: str | None = None  # the sampling module's: "greedy" (argmax) or "sampled"
        self.sampling_traces: set[str] = set()  # its captured traces: by mode, and whether log-probs are on
        self.log_probs_enabled = [False] * MAX_BATCH  # LogProbsCalculator.logprobs_enabled: per user
        self.device_params: list[dict] | None = None  # each slot's sampling parameters as the sampler holds them
        # decode_forward's input state (generator.py @00b0fa3f): what the decode trace's device inputs hold
        # after the last step (the sampled tokens, the positions one further), and what decides a reload
        self.device_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prev_page_table: torch.Tensor | None = None
        self.prev_sampling_on_device: bool | None = None
        # model.is_decode_setup: a prefill switches the model to prefill mode, and one sampled on the device back to
        # decode mode for its sampling (prefill_forward_text's switch_mode("decode"); switch_mode sets the flag,
        # llama_model.py @00ab7c95), after which a decode loads no inputs for the mode's sake
        self.decode_setup = False
        self.prepared_decode_shapes: set[tuple[int, int]] = set()  # PREPARES_DECODE_AT_FIRST_PREFILL's
        self.trace_preparation_closed = False
        self.token_buffer = ttnn.DeviceBuffer(torch.zeros(MAX_BATCH, dtype=torch.int32))  # the trace's token input
        # the LogProbsCalculator's output_tensor
        self.log_probs_buffer = ttnn.DeviceBuffer(torch.ones(MAX_BATCH, dtype=torch.bfloat16))

    def _reset_sampling(self, params: SamplingParams, empty_slots: list[int] | None = None) -> bool:
        """SamplingGenerator.reset_sampling_params (models/common/sampling/generator.py @00b0fa3f): TTSampling takes
        all 32 rows' k, p and temperature whatever empty_slots is (reset_params hands them to set_log_probs_mode
        alone, tt_sampling.py @0365bf78), and a change of mode releases every captured sampling trace (reset_trace).
        The users' log-probs flags go to the LogProbsCalculator (set_log_probs_mode, tt_log_probs.py @023b5d02), all
        32 of them, as the Galaxy generator's prefill and decode pass no empty_slots; with empty_slots
        (SCATTER_SAMPLING_PARAMS_TO_SLOTS's prefill) only those slots' flags change, the rest keep theirs
        (set_log_probs_mode's partial update). Returns whether the mode changed."""
        flags = [bool(flag) for flag in params.enable_log_probs]
        if empty_slots is None:
            self.log_probs_enabled = flags
        else:
            for slot in empty_slots:
                self.log_probs_enabled[slot] = flags[slot]
        self.device_params = _per_slot(params)
        mode = _sampling_kind(params)
        changed = self.sampling_mode is not None and mode != self.sampling_mode
        if changed:
            self.sampling_traces.clear()
        self.sampling_mode = mode
        return changed

    def _compile(self, *keys: tuple) -> list[tuple]:
        new = [key for key in keys if key not in self.compiled]
        self.compiled.update(new)
        return new

    def _trace(self, traces: dict, key) -> None:
        if traces[key] is None:
            traces[key] = ttnn.begin_trace_capture(self.mesh_device, cq_id=0)
            ttnn.end_trace_capture(self.mesh_device, traces[key], cq_id=0)

    def prefill_warmup(self, tokens, page_table=None, kv_cache=None, prompt_lens=None, enable_trace=True,
                       sampling_params=None, empty_slots=None, tt_out_logits_all_users=None):
        """The real one runs, on the first prefill, every warm-up length at batch 1 and 32 (32 below 4096),
        the sampling variants once, then one prefix-cached (128 tokens) trace per length."""
        self.already_warmed_up_prefill = True
        if PREPARES_DECODE_AT_FIRST_PREFILL and enable_trace and page_table is not None:
            self.prepared_decode_shapes.add((max(MAX_BATCH, page_table.shape[0]), page_table.shape[1]))
            self.trace_preparation_closed = True  # its prefill traces are recorded at the end of the warm-up
        lengths = get_prefill_warmup_sequence_lengths(self.model.args.max_seq_len)
        keys = [("prefill", n, False, b) for n in lengths for b in (1, 32) if b == 1 or n < 4096]
        keys += [("prefill", n, True, 1) for n in lengths]
        keys += [("prefill_out", "logits"), ("prefill_out", "tokens"), ("sampling", "greedy"), ("sampling", "sampled")]
        for key in keys:
            if enable_trace and key[0] == "prefill" and key[1] in SUPPORT_SEQLENS:
                self._trace(self.trace_id_prefill, key)
        self.calls.append(("prefill_warmup", {"lengths": lengths, "compiled": self._compile(*keys)}))

    def prefill_forward_text(self, tokens: torch.Tensor, page_table=None, kv_cache=None, prompt_lens=None,
                             enable_trace=True, sampling_params=None, empty_slots=None, tt_out_logits_all_users=None,
                             prompt_tokens: torch.Tensor | None = None, output_tokens: torch.Tensor | None = None,
                             start_pos: list[int] | None = None):
        if not self.already_warmed_up_prefill:
            self.prefill_warmup(tokens, page_table, kv_cache, prompt_lens, enable_trace, None, empty_slots, None)
        self.decode_setup = False
        kv_cache = kv_cache[0]
        batch, _ = tokens.shape
        assert tokens.dtype == torch.long
        assert isinstance(page_table, torch.Tensor), "page_table must be a torch.Tensor"
        assert page_table.dtype == torch.int32 and page_table.shape[0] == batch
        prompt_lens = list(prompt_lens) if prompt_lens is not None else [tokens.shape[1]] * batch
        empty_slots = list(range(batch)) if empty_slots is None else list(empty_slots)
        block_size, device_blocks = get_block_size(kv_cache), kv_cache[0][0].shape[0]
        store = _column_store(kv_cache)
        if start_pos is not None:
            assert all(start_pos[i] % block_size == 0 for i in range(batch)), "start_pos must be aligned to block_size"
        next_tokens, written, compiled = [], [], []
        for i in range(batch):
            cached = (int(start_pos[i]) if start_pos is not None else 0) // SDPA_CHUNK_ALIGN * SDPA_CHUNK_ALIGN
            if _should_skip_prefix_caching(prompt_lens[i], cached):  # outside the generator's own warm-up
                cached = 0
            padded_len = get_padded_prefill_len(prompt_lens[i] - cached)
            # _easy_trace_prefill pads the page table to the cache's width and never cuts it
            assert num_blocks_in_seq(cached + padded_len, block_size) <= device_blocks, "prefill past the KV cache"
            # _get_prefill_user_page_table: cut or zero-pad the row to the padded length's blocks
            blocks = num_blocks_in_seq(cached + padded_len, block_size)
            row = page_table[i, :blocks]
            row = torch.cat([row, torch.zeros(blocks - len(row), dtype=torch.int32)]).long()
            assert 0 <= int(row.min()) and int(row.max()) < device_blocks, "block id outside the KV cache"
            column = empty_slots[i] // USERS_PER_COLUMN
            # Positions [cached, cached + padded_len) are computed and written; padding writes token 0.
            pos = torch.arange(cached, cached + padded_len)
            values = torch.zeros(padded_len, dtype=torch.long)
            values[:prompt_lens[i] - cached] = tokens[i, cached:prompt_lens[i]]
            store[column, row[pos // block_size], pos % block_size] = values
            if cached:  # newer prepare_prefill_inputs_host zero the other columns' page-table rows here (not -1):
                for other in range(COLUMNS):  # their chips write the same positions into their device block 0
                    if other != column:
                        store[other, 0, pos % block_size] = values
            seen = torch.arange(prompt_lens[i])
            next_tokens.append(int(store[column, row[seen // block_size], seen % block_size].sum())
                               % self.model.vocab_size)
            written.append((column, row[cached // block_size:].tolist()))
            key = ("prefill", padded_len, cached > 0, 1)  # _easy_trace_prefill's f"{len}_{batch}_{sp0|sp1}"
            if enable_trace and padded_len in SUPPORT_SEQLENS:  # longer prefills run untraced
                self._trace(self.trace_id_prefill, key)
            compiled += self._compile(key)
        placed, mode_changed, log_probs = None, False, None
        if sampling_params is not None:  # sampled untraced, after reset_sampling_params on the scattered rows
            scattered = _scatter_to_slots(format_sampling_params(sampling_params, MAX_BATCH), empty_slots)
            placed = _per_slot(scattered)
            # @00b0fa3f: reset_sampling_params(sampling_params), no empty_slots: every user's log-probs flag is the
            # scattered one (the request's, its filler the broadcast value), not only the prefilled slots'
            mode_changed = self._reset_sampling(scattered, empty_slots if SCATTER_SAMPLING_PARAMS_TO_SLOTS else None)
            compiled += self._compile(("prefill_out", "tokens"), ("sampling", _sampling_kind(scattered)))
            if any(self.log_probs_enabled) and self.sampling_mode == "sampled":  # TTSampling computed them
                compiled += self._compile(("log_probs",))
                picked = torch.tensor(next_tokens)
                logits = torch.zeros(batch, self.model.vocab_size)
                logits[torch.arange(batch), picked] = 1.0
                log_probs = device_log_probs(logits, picked, self.model.args.padded_vocab_size)
        else:
            compiled += self._compile(("prefill_out", "logits"))
        self.decode_setup = sampling_params is not None
        self.calls.append(("prefill_forward_text", {
            "tokens": tokens, "page_table": page_table, "prompt_lens": prompt_lens, "enable_trace": enable_trace,
            "empty_slots": empty_slots, "start_pos": start_pos, "sampling_params": sampling_params,
            "written_blocks": written, "slot_params": placed, "sampling_mode_changed": mode_changed,
            "compiled": compiled}))
        if sampling_params is None:
            logits = torch.zeros(batch, 1, self.model.vocab_size)
            logits[torch.arange(batch), 0, torch.tensor(next_tokens)] = 1.0
            return logits
        tokens_out = torch.tensor(next_tokens, dtype=torch.int32)  # sampled_tensor[empty_slots]: request order
        # (output_toks, prefill_log_probs) when the sampler computed log-probs (bfloat16 [batch], request order)
        return tokens_out if log_probs is None else (tokens_out, log_probs)

    def decode_forward(self, tokens, start_pos, page_table=None, kv_cache=None, enable_trace=True,
                       read_from_device=True, async_read=False, sampling_params: SamplingParams = None,
                       reset_inputs=False, tt_out_logits_saved=None, is_cur_pos_sharded=False,
                       is_page_table_sharded=False, reset_batch=False, prompt_tokens: torch.Tensor | None = None,
                       output_tokens: torch.Tensor | None = None, slot_remap=None):
        kv_cache = kv_cache[0]
        tokens = tokens.view(-1, 1)
        assert tokens.shape == (MAX_BATCH, 1) and start_pos.shape == (MAX_BATCH,)
        assert isinstance(page_table, torch.Tensor) and page_table.dtype == torch.int32
        assert page_table.shape[0] == MAX_BATCH
        # The real decode_forward loads the host's tokens, positions and sampling parameters only when it must:
        # reset_inputs, logits wanted, a switch between device and host sampling, another page table, or a
        # prefill that returned logits since the last decode (one sampled on the device leaves the model in decode
        # mode). Otherwise the trace replays on what its device inputs hold: the tokens
        # it sampled last step, the positions one further. A skipped user, -1, stays skipped: the Galaxy model's
        # decode ends with ttnn.plus_one(current_pos, skip_negative_entries=True) (llama_model.py,
        # _increment_decode_positions_device, in the versions whose decode returns log-probs as @00b0fa3f's
        # generator expects; the older llama_model.py @2c4674af passes no skip_negative_entries, so there -1
        # becomes 0 and the row writes its page-table row's first block: the spare device block 0 here).
        if self.prev_page_table is not None and self.prev_page_table.shape != page_table.shape:
            # the real one's `torch.any(self.prev_page_table != page_table)` cannot broadcast another width
            raise RuntimeError(f"The size of tensor a ({self.prev_page_table.shape[1]}) must match the size of "
                               f"tensor b ({page_table.shape[1]}) at non-singleton dimension 1")
        shape = tuple(page_table.shape)
        if PREPARES_DECODE_AT_FIRST_PREFILL and enable_trace and shape not in self.prepared_decode_shapes:
            if self.trace_preparation_closed:  # _capture_trace_text: _prepared_trace_io.require_preparation()
                raise RuntimeError(f"trace I/O preparation is closed: no decode trace was prepared for a page table of "
                                   f"shape {shape}")
            self.prepared_decode_shapes.add(shape)
        sampling_on_device = sampling_params is not None
        loaded = (reset_inputs or not sampling_on_device or not self.decode_setup or self.device_inputs is None
                  or self.prev_sampling_on_device != sampling_on_device
                  or (self.prev_page_table is not None and not torch.equal(self.prev_page_table, page_table)))
        self.prev_sampling_on_device, self.prev_page_table, self.decode_setup = sampling_on_device, \
            page_table.clone(), True
        if not loaded:
            tokens, start_pos = self.device_inputs
        block_size, device_blocks = get_block_size(kv_cache), kv_cache[0][0].shape[0]
        store = _column_store(kv_cache)
        written, next_tokens = {}, torch.zeros(MAX_BATCH, dtype=torch.long)
        for slot in range(MAX_BATCH):
            pos = int(start_pos[slot])
            if pos < 0:  # paged_update_cache skips users at position -1
                continue
            column = slot // USERS_PER_COLUMN
            row = page_table[slot].long()
            block = int(row[pos // block_size])
            assert 0 <= block < device_blocks, "block id outside the KV cache"
            store[column, block, pos % block_size] = int(tokens[slot, 0])
            seen = torch.arange(pos + 1)
            next_tokens[slot] = int(store[column, row[seen // block_size], seen % block_size].sum()) \
                % self.model.vocab_size
            written[slot] = (column, block, pos % block_size)
        return_logits = sampling_params is None
        if enable_trace:
            self._trace(self.trace_ids_decode, return_logits)
        keys = [("decode", "logits" if return_logits else "tokens")]
        placed, mode_changed, captured, log_probs = None, False, None, None
        if sampling_params is not None:
            formatted = format_sampling_params(sampling_params, MAX_BATCH)
            placed = _per_slot(formatted) if loaded else None  # else the device keeps the parameters it had
            if loaded:
                mode_changed = self._reset_sampling(formatted)
            keys.append(("sampling", self.sampling_mode))
            log_probs_on = any(self.log_probs_enabled)  # SamplingGenerator._log_probs_active: one trace per value
            if log_probs_on and self.sampling_mode == "sampled":  # the argmax program computes none (tt_sampling.py)
                keys.append(("log_probs",))
                logits = torch.zeros(MAX_BATCH, self.model.vocab_size)
                logits[torch.arange(MAX_BATCH), next_tokens] = 1.0
                log_probs = device_log_probs(logits, next_tokens, self.model.args.padded_vocab_size)
            trace = f"{self.sampling_mode} with log-probs" if log_probs_on else self.sampling_mode
            if enable_trace and trace not in self.sampling_traces:  # sample(): capture on first use
                self.sampling_traces.add(captured := trace)
        self.calls.append(("decode_forward", {
            "tokens": tokens, "start_pos": start_pos, "page_table": page_table, "enable_trace": enable_trace,
            "read_from_device": read_from_device, "reset_inputs": reset_inputs, "inputs_loaded": loaded,
            "sampling_params": sampling_params,
            "written": written, "slot_params": placed, "sampling_mode_changed": mode_changed,
            "sampling_trace_captured": captured, "compiled": self._compile(*keys)}))
        self.device_inputs = next_tokens.view(-1, 1), torch.where(start_pos >= 0, start_pos + 1, start_pos)
        if not read_from_device:
            # (tt_tok, tt_log_probs) on the device. tt_tok is the decode trace's own token input
            # (sampling.sample(..., tt_out_tok=self.trace_inputs_decode[return_logits][0])): the next step reads it
            # and writes its own tokens over it, so a read must be enqueued before that step runs.
            # tt_log_probs is the LogProbsCalculator's own output_tensor, likewise written over by the next step.
            self.token_buffer.value = next_tokens.to(torch.int32)
            if log_probs is None:
                return self.token_buffer, None
            self.log_probs_buffer.value = log_probs
            return self.token_buffer, self.log_probs_buffer
        if return_logits:  # process_decode_output_host: logits [32, 1, vocab]
            logits = torch.zeros(MAX_BATCH, 1, self.model.vocab_size)
            logits[torch.arange(MAX_BATCH), 0, next_tokens] = 1.0
            return logits, torch.ones(MAX_BATCH, 1)
        # (tokens [32], log-probs [32]: bfloat16 as the device computed them, or ones where it computed none)
        return next_tokens.to(torch.int32), torch.ones(MAX_BATCH) if log_probs is None else log_probs

    def read_decode_output(self, tt_out, async_read=True):
        """generator.py @00b0fa3f: async_read enqueues a non-blocking copy of the tokens (and log-probs) to the
        host on command queue 0 (model.process_output_decode: .cpu(blocking=False, cq_id=0)) and records an event
        after it: ((tokens, log_probs), [event]). The copy holds the buffer as it is when the queue reaches it,
        so what a later step writes into it is not in it."""
        tt_tok, tt_log_probs = tt_out if isinstance(tt_out, tuple) else (tt_out, None)
        if not async_read:
            return tt_tok.cpu(), None if tt_log_probs is None else tt_log_probs.cpu()
        event = ttnn.record_event(self.mesh_device, 0)  # llama_model.py process_output_decode: both reads, one event
        return (tt_tok.cpu(blocking=False, event=event),
                None if tt_log_probs is None else tt_log_probs.cpu(blocking=False, event=event)), [event]

    def process_decode_output_host(self, tt_out, is_tokens=True):
        """generator.py @00b0fa3f: host tensors to torch: (tokens [32], log-probs [32]; ones when the device gave
        none). The host copy is complete only once its read's event is synchronised."""
        tt_tok, tt_log_probs = tt_out if isinstance(tt_out, tuple) else (tt_out, None)
        tokens = ttnn.to_torch(tt_tok)
        return tokens, torch.ones(tokens.shape) if tt_log_probs is None else ttnn.to_torch(tt_log_probs)

    def __del__(self):
        """The real finaliser releases every captured trace, then closes the model's CCL."""
        for trace_id in [*self.trace_id_prefill.values(), *self.trace_ids_decode.values()]:
            if trace_id is not None:
                ttnn.release_trace(self.mesh_device, trace_id)
        self.model.tt_ccl.close()


def _scatter_to_slots(params: SamplingParams, slots: list[int]) -> SamplingParams:
    """prefill_forward_text's _scatter_params_to_slots (generator.py @00b0fa3f): values arrive in request order, padded
    to 32 by format_sampling_params, and move to the requests' slots; the rest get the value after the last request's
    (the padding: temperature 0, so argmax; enable_log_probs of one request broadcast, so its flag). With
    SCATTER_SAMPLING_PARAMS_TO_SLOTS, models/common/sampling's scatter_sampling_params_to_slots: the rest get the last
    request's own values ("Rows no request occupies inherit the last real request's values"). Seeds stay (in request
    order, for the seed manager) in both."""
    updates = {}
    for f in fields(params):
        values = getattr(params, f.name)
        if f.name == "seed" or not isinstance(values, list):
            updates[f.name] = values
            continue
        if len(values) == 1 and len(slots) > 1:
            values = values * len(slots)
        filler = values[len(slots) - 1] if SCATTER_SAMPLING_PARAMS_TO_SLOTS else \
            values[len(slots)] if len(values) > len(slots) else values[-1]
        scattered = [filler] * MAX_BATCH
        for value, slot in zip(values[:len(slots)], slots):
            scattered[slot] = value
        updates[f.name] = scattered
    return replace(params, **updates)
