"""Double of tt-metal models/demos/llama3_70b_galaxy/tt/generator.py (as read at commit 00b0fa3f): the
Generator constructor, prefill_forward_text and decode_forward with the real signatures, the input checks,
page-table padding and sampling-parameter placement the real one applies, and the shapes and dtypes it
returns. There is no model: the next token is the last input token + 1 (logits: one-hot at it).

Each call is appended to `calls` with what the real generator would do with it: the device blocks it
writes KV into and the sampling parameters each of the 32 slots ends up with.
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch

from models.common.sampling import SamplingParams, format_sampling_params
from models.demos.llama3_70b_galaxy.tt.model_config import SDPA_CHUNK_ALIGN

MAX_BATCH = 32


def get_padded_prefill_len(seq_len: int) -> int:
    """generator.py get_padded_prefill_len: 128, 1024, then powers of two."""
    if seq_len <= 128:
        return 128
    if seq_len <= 1024:
        return 1024
    return 2 ** (seq_len - 1).bit_length()


def num_blocks_in_seq(seq_len: int, block_size: int) -> int:
    """tt_transformers/tt/common.py num_blocks_in_seq."""
    return -(-seq_len // block_size)


def get_block_size(kv_cache) -> int:
    """tt_transformers/tt/common.py get_block_size: dim 2 of a layer's K cache [blocks, heads, block, dim]."""
    return kv_cache[0][0].shape[2]


def _per_slot(params: SamplingParams) -> list[dict]:
    return [{f.name: getattr(params, f.name)[slot] for f in fields(params)} for slot in range(MAX_BATCH)]


class Generator:
    def __init__(self, model, model_args, mesh_device, tokenizer=None, formatter=None):
        self.model = model[0] if isinstance(model, list) else model
        self.model_args = model_args[0] if isinstance(model_args, list) else model_args
        self.mesh_device = mesh_device
        self.calls: list[tuple[str, dict]] = []

    def prefill_forward_text(self, tokens: torch.Tensor, page_table=None, kv_cache=None, prompt_lens=None,
                             enable_trace=True, sampling_params=None, empty_slots=None, tt_out_logits_all_users=None,
                             prompt_tokens: torch.Tensor | None = None, output_tokens: torch.Tensor | None = None,
                             start_pos: list[int] | None = None):
        kv_cache = kv_cache[0]
        batch, _ = tokens.shape
        assert tokens.dtype == torch.long
        assert isinstance(page_table, torch.Tensor), "page_table must be a torch.Tensor"
        assert page_table.dtype == torch.int32 and page_table.shape[0] == batch
        prompt_lens = list(prompt_lens) if prompt_lens is not None else [tokens.shape[1]] * batch
        empty_slots = list(range(batch)) if empty_slots is None else list(empty_slots)
        block_size, device_blocks = get_block_size(kv_cache), kv_cache[0][0].shape[0]
        if start_pos is not None:
            assert all(start_pos[i] % block_size == 0 for i in range(batch)), "start_pos must be aligned to block_size"
        next_tokens, written = [], []
        for i in range(batch):
            cached = (int(start_pos[i]) if start_pos is not None else 0) // SDPA_CHUNK_ALIGN * SDPA_CHUNK_ALIGN
            padded_len = get_padded_prefill_len(prompt_lens[i] - cached)
            # _get_prefill_user_page_table: cut or zero-pad the row to the padded length's blocks
            row = page_table[i, :num_blocks_in_seq(cached + padded_len, block_size)]
            row = torch.cat([row, torch.zeros(num_blocks_in_seq(cached + padded_len, block_size) - len(row),
                                              dtype=torch.int32)])
            assert 0 <= int(row.min()) and int(row.max()) < device_blocks, "block id outside the KV cache"
            written.append(row[cached // block_size:].tolist())
            next_tokens.append(int(tokens[i, prompt_lens[i] - 1]) + 1)
        placed = None
        if sampling_params is not None:
            formatted = format_sampling_params(sampling_params, MAX_BATCH)
            placed = _per_slot(_scatter_to_slots(formatted, empty_slots))
        self.calls.append(("prefill_forward_text", {
            "tokens": tokens, "page_table": page_table, "prompt_lens": prompt_lens, "enable_trace": enable_trace,
            "empty_slots": empty_slots, "start_pos": start_pos, "sampling_params": sampling_params,
            "written_blocks": written, "slot_params": placed}))
        if sampling_params is None:
            logits = torch.zeros(batch, 1, self.model.vocab_size)
            logits[torch.arange(batch), 0, torch.tensor(next_tokens)] = 1.0
            return logits
        return torch.tensor(next_tokens, dtype=torch.int32)

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
        block_size, device_blocks = get_block_size(kv_cache), kv_cache[0][0].shape[0]
        written = {}
        for slot in range(MAX_BATCH):
            pos = int(start_pos[slot])
            if pos >= 0:  # paged_update_cache skips users at position -1
                block = int(page_table[slot, pos // block_size])
                assert 0 <= block < device_blocks, "block id outside the KV cache"
                written[slot] = (block, pos % block_size)
        placed = None if sampling_params is None else _per_slot(format_sampling_params(sampling_params, MAX_BATCH))
        self.calls.append(("decode_forward", {
            "tokens": tokens, "start_pos": start_pos, "page_table": page_table, "enable_trace": enable_trace,
            "read_from_device": read_from_device, "reset_inputs": reset_inputs, "sampling_params": sampling_params,
            "written": written, "slot_params": placed}))
        next_tokens = tokens[:, 0] + 1
        if sampling_params is None:  # process_decode_output_host: logits [32, 1, vocab]
            logits = torch.zeros(MAX_BATCH, 1, self.model.vocab_size)
            logits[torch.arange(MAX_BATCH), 0, next_tokens] = 1.0
            return logits, torch.ones(MAX_BATCH, 1)
        return next_tokens.to(torch.int32), torch.ones(MAX_BATCH)  # (tokens [32], log-probs [32])

    def __del__(self):
        """The real finaliser releases the traces and closes the model's CCL."""
        self.model.tt_ccl.close()


def _scatter_to_slots(params: SamplingParams, slots: list[int]) -> SamplingParams:
    """prefill_forward_text's _scatter_params_to_slots: values arrive in request order and move to the
    requests' slots; the rest get the value after the last request's (a padding default). Seeds stay."""
    updates = {}
    for f in fields(params):
        values = getattr(params, f.name)
        if f.name == "seed" or not isinstance(values, list):
            updates[f.name] = values
            continue
        if len(values) == 1 and len(slots) > 1:
            values = values * len(slots)
        filler = values[len(slots)] if len(values) > len(slots) else values[-1]
        scattered = [filler] * MAX_BATCH
        for value, slot in zip(values[:len(slots)], slots):
            scattered[slot] = value
        updates[f.name] = scattered
    return replace(params, **updates)
