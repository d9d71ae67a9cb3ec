"""The reference Llama in plain PyTorch over a paged KV cache, and the Backend that serves it.

One forward pass covers both phases: prefill is one sequence of T new tokens, decode is B sequences of
one token each. Either way the new keys/values are written into their blocks first, then every query
reads its sequence's keys through the page table (one gather per group of decode rows of about the same
length, up to the group's longest) under a mask, so a prefill can start anywhere and decode rows can have any
lengths.
The cache is [num_blocks, kv_heads, block_size, head_dim] per layer, as on the Galaxy. Reads and writes
address it as rows of head_dim values with flat indices: index_select/index_copy_ on one dimension are
several times faster on CPU than multi-dimensional advanced indexing.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.backend import Backend, Capabilities, check_num_slots
from model.config import LlamaConfig
from model.sampler import score_prompt
from model.weights import load_weights
from scheduler.sampling import PromptLogprobs, SamplingParams

log = logging.getLogger("ray.serve")


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotary frequencies (fp32). Llama 3 scaling divides the long-wavelength ones by `factor`, keeps the
    short ones, and blends between the two, so the model reaches past its original context."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    context = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    blend = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    return torch.where(wavelen > context / s.low_freq_factor, inv_freq / s.factor,
                       torch.where(wavelen < context / s.high_freq_factor, inv_freq, blended))


@dataclass
class KeyGroup:
    """Rows of a forward pass that read their keys together, each padded to the longest of them (S)."""

    rows: torch.Tensor | None  # [b] the batch rows in the group; None: every row
    read_rows: torch.Tensor  # [b*kv_heads*S] rows of each sequence's keys 0..S-1 in a cache viewed as [-1, head_dim]
    mask: torch.Tensor  # [b, 1, T, S] True where the query sees the key


@dataclass
class Step:
    """Where one forward pass of B sequences x T new tokens writes and reads the cache (all layers)."""

    cos: torch.Tensor  # [B, T, 1, head_dim]
    sin: torch.Tensor
    write_rows: torch.Tensor  # [B*T*kv_heads] rows of the new keys in a cache viewed as [-1, head_dim]
    groups: list[KeyGroup]
    # [2 * the largest group's len(read_rows) * head_dim]: every layer gathers its keys/values into this one
    # buffer. A new tensor per layer cost a fresh mmap of tens of MB each time (glibc's threshold is 32 MB), whose
    # page faults made the gather ~3.5x slower and most of a decode step at 32 slots x 1,000 tokens.
    gathered: torch.Tensor


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout (HF's q/k row order, see model/weights.py)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even for bf16 activations.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, step: Step, kv_cache: torch.Tensor) -> torch.Tensor:
        """kv_cache: this layer's [2 (keys, values), blocks, kv_heads, block, head_dim]."""
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self.wqkv(x).split([(H + KV) * D, KV * D], dim=-1)
        q, k = rotate(qk.view(B, T, H + KV, D), step.cos, step.sin).split([H, KV], dim=2)
        rows = kv_cache.view(2, -1, D)
        rows.index_copy_(1, step.write_rows, torch.stack([k, v.view(B, T, KV, D)]).view(2, -1, D))
        if len(step.groups) == 1:
            return self.wo(self._attend(q, step.groups[0], rows, step.gathered))
        out = q.new_empty(B, T, H * D)
        for group in step.groups:
            out.index_copy_(0, group.rows, self._attend(q[group.rows], group, rows, step.gathered))
        return self.wo(out)

    def _attend(self, q: torch.Tensor, group: KeyGroup, rows: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        """q [b, T, H, D] of the group's rows -> attention output [b, T, H*D] over their keys."""
        b, T = q.shape[:2]
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        n = group.read_rows.numel()
        buffer = gathered[:2 * n * D].view(2, n, D)
        keys, values = torch.index_select(rows, 1, group.read_rows, out=buffer).view(2, b, KV, -1, D)
        if T == 1:
            # Decode: a kv head's query heads become its query rows (the mask broadcasts over them).
            # On CPU this is ~1.3x (fp32) to ~4x (bf16) faster than SDPA's enable_gqa for one-token queries.
            out = F.scaled_dot_product_attention(q.reshape(b, KV, H // KV, D), keys, values, attn_mask=group.mask)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=group.mask,
                                                 enable_gqa=True).transpose(1, 2)
        return out.reshape(b, T, H * D)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        # Gate and up stay two matmuls: fused, the strided halves made decode ~5% slower on CPU.
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, step: Step, kv_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), step, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, step: Step, kv_cache: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, dim].
        kv_cache: [layers, 2 (keys, values), blocks, kv_heads, block, head_dim]."""
        x = self.embed(tokens)
        for layer, layer_cache in zip(self.layers, kv_cache):
            x = layer(x, step, layer_cache)
        return self.norm(x)

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Checkpoint name (model/weights.py) -> the parameter, or the slice of a fused one, it fills."""
        cfg = self.cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        targets = {"embed_tokens.weight": self.embed.weight, "norm.weight": self.norm.weight}
        if not cfg.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            wqkv = layer.attn.wqkv.weight
            targets.update({
                f"layers.{i}.self_attn.q_proj.weight": wqkv[:q],
                f"layers.{i}.self_attn.k_proj.weight": wqkv[q:q + kv],
                f"layers.{i}.self_attn.v_proj.weight": wqkv[q + kv:],
                f"layers.{i}.self_attn.o_proj.weight": layer.attn.wo.weight,
                f"layers.{i}.mlp.gate_proj.weight": layer.mlp.w1.weight,
                f"layers.{i}.mlp.up_proj.weight": layer.mlp.w3.weight,
                f"layers.{i}.mlp.down_proj.weight": layer.mlp.w2.weight,
                f"layers.{i}.input_layernorm.weight": layer.attn_norm.weight,
                f"layers.{i}.post_attention_layernorm.weight": layer.mlp_norm.weight,
            })
        return targets


def load_transformer(path: str | Path, cfg: LlamaConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    """Build without initialising (meta device), allocate once in `dtype`, then stream the checkpoint in."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device).requires_grad_(False).eval()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    targets = model.checkpoint_targets()
    for name, tensor in load_weights(path, cfg):  # every name and shape checked against cfg (check_weights)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the copy anyway
        targets[name].copy_(tensor)
    return model


def _memory_bytes(device: torch.device) -> int:
    """All the memory of the device (a GPU's, or this host's RAM): the most a cache could ever take."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class TorchBackend(Backend):
    """Serves a Llama checkpoint with PyTorch on CPU (default fp32) or CUDA (default bf16).

    Returns logits; the host samples (no device sampling). Holds no per-slot state: everything a step
    needs is in the page tables and positions it is given.
    """

    def __init__(self, model_dir: str | Path, num_slots: int = 32, block_size: int = 64,
                 num_blocks: int | None = None, max_seq_len: int | None = None,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 kv_cache_gb: float = 1.0):
        """num_blocks defaults to every slot at max_seq_len, capped at `kv_cache_gb` of cache, but never below one
        sequence of a max_seq_len given (as vLLM refuses a max_model_len its KV cache cannot hold, not serve a shorter
        one): a larger model's 8,192 tokens were cut to what 1 GiB holds without a word. With max_seq_len left to the
        model's max_position_embeddings, the cap stands and a warning says the context served. Raises ValueError
        naming num_slots past MAX_NUM_SLOTS, or num_blocks (max_seq_len, when num_blocks is its default) whose cache
        would not fit the device's memory (a mistyped size was the allocator's error naming nothing, or the mesh
        killed for memory and restarted, again)."""
        check_num_slots(num_slots)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.cfg = cfg = LlamaConfig.from_dir(model_dir)
        asked, max_seq_len = max_seq_len is not None, max_seq_len or cfg.max_position_embeddings
        block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * block_size * cfg.head_dim * dtype.itemsize
        field = "num_blocks: "
        if num_blocks is None:
            one_sequence = -(-max_seq_len // block_size)
            num_blocks = max(1, min(num_slots * one_sequence, int(kv_cache_gb * 2**30) // block_bytes))
            if asked and num_blocks < one_sequence:
                num_blocks, field = one_sequence, f"max_seq_len: {max_seq_len} tokens need "
            elif num_blocks < one_sequence:
                log.warning("KV cache: %d blocks (%.1f GiB, the default cap) hold %d tokens, fewer than the model's "
                            "max_position_embeddings %d: a request's prompt and answer may take %d tokens in all; set "
                            "max_seq_len (or num_blocks) for more", num_blocks, num_blocks * block_bytes / 2**30,
                            num_blocks * block_size, max_seq_len, num_blocks * block_size)
        memory = _memory_bytes(self.device)
        if num_blocks * block_bytes > memory:
            raise ValueError(f"{field}{num_blocks} blocks of {block_bytes} B is {num_blocks * block_bytes / 2**30:.1f}"
                             f" GiB of KV cache, more than the {memory / 2**30:.1f} GiB of memory {self.device} has")
        self.model = load_transformer(model_dir, cfg, dtype, self.device)
        # Zeros, not empty: masked-out keys still meet the values in the matmul, and 0 * NaN is NaN.
        self.kv_cache = torch.zeros(cfg.n_layers, 2, num_blocks, cfg.n_kv_heads, block_size, cfg.head_dim,
                                    dtype=dtype, device=self.device)
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.caps = Capabilities(num_slots=num_slots, block_size=block_size, num_blocks=num_blocks,
                                 max_seq_len=max_seq_len, prefix_align=block_size,
                                 vocab_size=cfg.vocab_size, eos_token_ids=cfg.eos_token_ids, prompt_logprobs=True)

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                sampling: SamplingParams | None = None) -> torch.Tensor:
        _host_sampling_only(sampling)
        hidden = self._prefill(token_ids, start, block_ids)
        return self.model.lm_head(hidden[-1]).float().cpu()

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], start: int, block_ids: list[int]) -> torch.Tensor:
        """Like prefill, but the logits of every position in [start, len(token_ids)): [T, vocab]."""
        return self.model.lm_head(self._prefill(token_ids, start, block_ids)).float().cpu()

    @torch.inference_mode()
    def prefill_prompt_logprobs(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                                num_logprobs: int, targets: list[int]) -> tuple[PromptLogprobs | None, torch.Tensor]:
        hidden = self._prefill(token_ids, start, block_ids)
        last = self.model.lm_head(hidden[-1]).float().cpu()
        if not targets:
            return None, last
        # lm_head a slice of positions at a time: a 4,096-token chunk's logits at once are 2 GiB at a 128k vocabulary
        return score_prompt(lambda i, j: self.model.lm_head(hidden[i:j]).float().cpu(), torch.tensor(targets),
                            start + 1, num_logprobs), last

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
               active: torch.Tensor, sampling: list[SamplingParams | None] | None = None) -> torch.Tensor:
        _host_sampling_only(sampling)
        rows = active.nonzero().flatten()
        if rows.numel() == 0:
            return torch.zeros(self.caps.num_slots, self.cfg.vocab_size)
        hidden = self._forward(tokens[rows, None].to(self.device), positions[rows, None].to(self.device),
                               page_table[rows].to(self.device, torch.long))
        logits = self.model.lm_head(hidden[:, 0]).float().cpu()
        if rows.numel() == self.caps.num_slots:
            return logits
        return torch.zeros(self.caps.num_slots, self.cfg.vocab_size).index_copy_(0, rows.cpu(), logits)

    def _prefill(self, token_ids: list[int], start: int, block_ids: list[int]) -> torch.Tensor:
        end = len(token_ids)
        n_blocks = -(-end // self.caps.block_size)
        if not 0 <= start < end:
            raise ValueError(f"prefill start {start} outside [0, {end})")
        if len(block_ids) < n_blocks:
            raise ValueError(f"{end} tokens need {n_blocks} blocks, got {len(block_ids)}")
        tokens = torch.tensor(token_ids[start:], device=self.device)[None]
        positions = torch.arange(start, end, device=self.device)[None]
        page_table = torch.tensor(block_ids[:n_blocks], device=self.device)[None]
        return self._forward(tokens, positions, page_table)[0]

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B, T]; page_table [B, n] covering every position -> hidden [B, T, dim]."""
        bs, kv_heads = self.caps.block_size, self.cfg.n_kv_heads
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
        # Flat row of (block, head, offset) in a layer's keys or values viewed as [-1, head_dim].
        heads = torch.arange(kv_heads, device=self.device)[:, None]
        new_positions = positions.flatten()[:, None, None]
        new_blocks = page_table.gather(1, positions // bs).flatten()[:, None, None]
        write = (new_blocks * kv_heads + heads) * bs + new_positions % bs  # [B*T, kv_heads, 1]
        groups = [self._key_group(rows, positions, page_table) for rows in self._decode_buckets(positions)]
        size = 2 * max(group.read_rows.numel() for group in groups) * self.cfg.head_dim
        step = Step(cos=angles.cos().to(self.kv_cache.dtype), sin=angles.sin().to(self.kv_cache.dtype),
                    write_rows=write.flatten(), groups=groups, gathered=self.kv_cache.new_empty(size))
        return self.model(tokens, step, self.kv_cache)

    def _decode_buckets(self, positions: torch.Tensor) -> list[torch.Tensor | None]:
        """Decode rows grouped by their length in blocks rounded up to a power of two, so each row reads at most
        ~2x its own keys: padded to the batch's longest, one 8,000-token conversation made 31 short ones read
        8,000 keys each, every step. [None] (one group of every row) for a prefill or rows of one bucket."""
        B, T = positions.shape
        if T > 1 or B == 1:
            return [None]
        blocks = positions[:, 0] // self.caps.block_size + 1
        buckets = torch.ceil(torch.log2(blocks.double())).long()
        distinct = buckets.unique()
        return [None] if len(distinct) == 1 else [(buckets == b).nonzero().flatten() for b in distinct]

    def _key_group(self, rows: torch.Tensor | None, positions: torch.Tensor, page_table: torch.Tensor) -> KeyGroup:
        """Where the rows' keys 0..S-1 lie (S: their longest sequence) and which of them each query sees."""
        if rows is not None:
            positions, page_table = positions[rows], page_table[rows]
        bs, kv_heads = self.caps.block_size, self.cfg.n_kv_heads
        heads = torch.arange(kv_heads, device=self.device)[:, None]
        key_positions = torch.arange(int(positions.max()) + 1, device=self.device)
        key_blocks = page_table[:, None, key_positions // bs]
        read = (key_blocks * kv_heads + heads) * bs + key_positions % bs  # [b, kv_heads, S]
        return KeyGroup(rows, read.flatten(), (key_positions <= positions[..., None]).unsqueeze(1))


def _host_sampling_only(sampling) -> None:
    if sampling is not None:
        raise ValueError("the torch backend samples nothing itself (device_sampling is empty): "
                         "sample its logits on the host")
