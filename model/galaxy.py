"""Facts of Llama-3.3-70B on a Galaxy (8x4 Wormhole mesh) that more than the TT backend needs: the simulator
sizes itself by them and the app config validates against them. Imports neither ttnn nor torch.

Sources: tt-metal models/demos/llama3_70b_galaxy/tt (model_config.py, generator.py @00b0fa3f, llama_model.py
prepare_prefill_inputs_host), tenstorrent/vllm vllm/worker/tt_worker.py @987d7bd2 (get_num_available_blocks_tt,
override_tt_config keys), tt-inference-server workflows/model_specs/prod/llm.yaml @cb954e42 (the Llama-3.3-70B
GALAXY spec); docs/DESIGN.md "KV groups".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, Strict

NUM_SLOTS = 32  # tt-metal's sampler and decode trace are fixed at 32 users
MESH_SHAPE = (8, 4)
KV_GROUPS = 4  # one per mesh column: slot s lives on column s // 8, and its KV only on that column's devices
BLOCK_SIZE = 64
MAX_SEQ_LEN = 131_072
PREFIX_ALIGN = 128  # SDPA_CHUNK_ALIGN in model_config.py: cached prefixes are cut down to a multiple of it
# The largest prefill chunk: above it, the generator's rule for when a cached prefix pays (_should_skip_prefix_caching,
# generator.py @00b0fa3f) recomputes a chunk from position 0 at twice its padded size or more (16,384 after 16,384
# cached: 32,768 tokens); at 8192 or less, no chunk at any start below 128k costs more recomputed than alone.
MAX_PREFILL_CHUNK = 8192


def padded_prefill_len(n: int) -> int:
    """The length the generator pads n new prefill tokens to: 128, 1024, then the next power of two
    (get_padded_prefill_len, generator.py @00b0fa3f)."""
    return 128 if n <= 128 else 1024 if n <= 1024 else 2 ** (n - 1).bit_length()


def blocks_per_group(max_seq_len: int, block_size: int, slots_per_group: int = NUM_SLOTS // KV_GROUPS) -> int:
    """A KV group's pool as tt_worker.py sizes each data-parallel rank (one per column, max_num_seqs 8):
    one max_seq_len user plus a block for each slot of the column, ceil((131072 + 64 * 8) / 64) = 2056."""
    return -(-(max_seq_len + block_size * slots_per_group) // block_size)


BLOCKS_PER_GROUP = blocks_per_group(MAX_SEQ_LEN, BLOCK_SIZE)  # 2056
LLAMA3_VOCAB = 128_256
LLAMA3_EOS = (128_001, 128_008, 128_009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
# The model tt-metal's llama3_70b_galaxy builds, whatever checkpoint it is given (its TtModelArgs and prefetcher are
# written for these): LlamaConfig's names, config.json's in check_galaxy_model's message
LLAMA3_70B = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": LLAMA3_VOCAB}


def check_galaxy_model(llama) -> None:
    """Raise ValueError naming the field when a checkpoint's model.config.LlamaConfig is not Llama 3 70B's shape (3.3,
    3.1 and their fine-tunes share it): the Galaxy model would fail on it in every mesh replica, once its mesh is
    open, or serve a wrong model."""
    from model.config import _HF_NAMES

    for name, expected in LLAMA3_70B.items():
        if (value := getattr(llama, name)) != expected:
            spelled = f"{name} ({_HF_NAMES[name]})" if name in _HF_NAMES else name
            raise ValueError(f"{spelled} is {value}, not {expected}: the tt_galaxy backend runs tt-metal's Llama 3 70B "
                             "Galaxy model, which serves Llama 3 70B checkpoints only (e.g. Llama-3.3-70B-Instruct)")
# What tt-metal's sampler draws with. Penalties stay on the host: this contract carries no token history, and a
# prefill sampled on the device resets every user's penalty history there (prefill_forward_text's
# reset_prompt_tokens and reset_output_state take no slots, generator.py @00b0fa3f), which it does only while a row
# carries a penalty (SamplingGenerator._penalties_active).
# A seed stays on the host too: tt-metal reseeds a slot's generator at each prefill and draws once per decode
# step (models/common/sampling SeedManager), so a seeded answer recomputed after a preemption or a failover, or
# decoded beside a host-sampled neighbour, would draw other tokens; the host sampler keys each draw on
# (seed, position), the same wherever and whenever the token is computed.
DEVICE_SAMPLING = frozenset({"temperature", "top_k", "top_p"})
DEVICE_MAX_TOP_K = 32  # tt-metal's on-device sampler keeps the top 32 (models/common/sampling); larger: host


def galaxy_sizes(mesh_shape, max_seq_len: int | None, num_blocks: int | None, block_size: int) -> tuple[int, int]:
    """(max_seq_len, num_blocks per KV group) a Galaxy serves, or ValueError naming the field. The mesh is 8x4
    (slot s on column s // 8), a block 64 tokens. The generator pads a prefill to the next power of two, and its
    warm-up prefills max_seq_len tokens after a PREFIX_ALIGN-token cached prefix (generator.py @00b0fa3f), so
    max_seq_len is a power of two >= 1024 and a column's cache (num_blocks + the spare block 0) holds max_seq_len +
    PREFIX_ALIGN tokens. Unset, num_blocks is blocks_per_group at max_seq_len, and max_seq_len 128k or the
    largest that num_blocks holds."""
    if tuple(mesh_shape) != MESH_SHAPE:
        raise ValueError(f"mesh_shape: the Galaxy model runs on an {MESH_SHAPE[0]}x{MESH_SHAPE[1]} mesh, "
                         f"not {tuple(mesh_shape)}")
    if block_size != BLOCK_SIZE:  # else refused only by ttnn, in a replica, after minutes of loading weights
        raise ValueError(f"block_size: the Galaxy model's paged KV cache takes {BLOCK_SIZE} tokens a block (the demo's "
                         f"page_params, as tt_worker.py sizes it), not {block_size}")
    def holds(blocks: int, length: int) -> bool:  # a column's cache: `blocks` and the spare block 0
        return (blocks + 1) * block_size >= length + PREFIX_ALIGN

    if max_seq_len is None:
        max_seq_len = MAX_SEQ_LEN
        while num_blocks and max_seq_len > 1024 and not holds(num_blocks, max_seq_len):
            max_seq_len //= 2
    if max_seq_len < 1024 or max_seq_len & (max_seq_len - 1) or max_seq_len > MAX_SEQ_LEN:
        raise ValueError(f"max_seq_len must be a power of two from 1024 to {MAX_SEQ_LEN} (Llama-3.3-70B's context) "
                         f"on a Galaxy, not {max_seq_len}")
    num_blocks = num_blocks or blocks_per_group(max_seq_len, block_size)
    if not holds(num_blocks, max_seq_len):
        raise ValueError(f"num_blocks {num_blocks} is too few for max_seq_len {max_seq_len}: a column's cache "
                         f"must hold {max_seq_len + PREFIX_ALIGN} tokens, {block_size} a block, block 0 spare")
    return max_seq_len, num_blocks


# The simulated Galaxy's limits (model/simulated.py; checked at deploy too). Its context may exceed a Galaxy's, for
# tests and capacity work, up to 8x. Its pools are memory: per mesh, the router keeps ~56 B a block (scheduler's
# BlockPool) and the mesh 4 B a token of cache; these are 128x a Galaxy's (4 x 2,056 blocks of 64 tokens), ~60 MB and
# 256 MiB. A time_scale far past its ceiling (~1e8) overflows the mesh's sleep inside a work.
MAX_SIMULATED_SEQ_LEN = 8 * MAX_SEQ_LEN
MAX_SIMULATED_BLOCKS = 2**20  # per mesh, all its KV groups together
MAX_SIMULATED_KV_TOKENS = 2**26  # per mesh
MAX_TIME_SCALE = 1000.0  # a Galaxy's decode step then takes 14-103 s, and a 128k prefill 28 hours


def simulated_sizes(num_slots: int, kv_groups: int, max_seq_len: int | None, num_blocks: int | None,
                    block_size: int) -> tuple[int, int]:
    """(max_seq_len, num_blocks per KV group) of a simulated Galaxy, or ValueError naming the field. Unset, they are
    a Galaxy's: 128k, and blocks_per_group at max_seq_len."""
    max_seq_len = max_seq_len or MAX_SEQ_LEN
    if not 2 <= max_seq_len <= MAX_SIMULATED_SEQ_LEN:
        raise ValueError(f"max_seq_len: 2 to {MAX_SIMULATED_SEQ_LEN} tokens on the simulated backend (8x a Galaxy's "
                         f"context), not {max_seq_len}")
    if num_blocks is None:
        num_blocks, unset = blocks_per_group(max_seq_len, block_size, num_slots // kv_groups), " (unset: max_seq_len's)"
    else:
        unset = ""
    blocks, tokens = kv_groups * num_blocks, kv_groups * num_blocks * block_size
    if blocks > MAX_SIMULATED_BLOCKS or tokens > MAX_SIMULATED_KV_TOKENS:
        raise ValueError(f"num_blocks: {num_blocks} a KV group{unset} x {kv_groups} groups is {blocks} blocks of "
                         f"{block_size} tokens; the simulated backend holds at most {MAX_SIMULATED_BLOCKS} blocks and "
                         f"{MAX_SIMULATED_KV_TOKENS} tokens a mesh (the router keeps ~56 B a block, the mesh 4 B a "
                         "token)")
    return max_seq_len, num_blocks


@dataclass(frozen=True)
class TTMeshConfig:
    """How the mesh is opened, sampled and warmed up. The defaults, and the names, are tt-inference-server's
    `override_tt_config` for Llama-3.3-70B on GALAXY (prod/llm.yaml @cb954e42, tt-metal e867533, vLLM 8f36910):
    the trace region holds the prefill traces (the generator traces the lengths of llama_ccl.py's
    support_seqlens, 128 to 4096 @bd428598, and 8192 too @00ab7c95, and runs longer prefills untraced), the
    decode and the sampling traces. The mesh shape is not here: it is AppConfig.mesh_shape, one knob.

    `enable_model_warmup` (tt_worker.py's key of that name) compiles and captures every prefill length, decode
    and sampling variant at load, before the replica takes traffic; off only for bring-up.
    `line_rs` / `line_ag` set LINE_RS / LINE_AG for tt-metal's CCLs (read when its llama_ccl module is
    imported); None leaves the environment as it is.
    `overlap_decode` (meshserve's own) starts decode step k + 1 on the device's tokens before step k is read
    (docs/DESIGN.md, overlapped steps); checked against the double of tt-metal's generator, not on a Galaxy, so
    false takes one step at a time, reading each, for a checkout whose on-device token feedback misbehaves."""

    dispatch_core_axis: Literal["row", "col"] = "col"
    fabric_config: Literal["DISABLED", "FABRIC_1D", "FABRIC_1D_RING", "FABRIC_2D"] = "FABRIC_1D_RING"
    # Strict when deployments.config validates them, as the app's other numbers and booleans: "off" or
    # "1344544" in YAML is a typo, not the value meant
    worker_l1_size: Annotated[int, Strict(), Field(gt=0)] = 1_344_544  # bytes; 0 or less only ttnn refused
    trace_region_size: Annotated[int, Strict(), Field(gt=0)] = 215_000_000
    # "all": prefill and decode sample on the device; "decode_only": prefill returns logits and the first
    # token is sampled here; None: the device never samples. Device top-k is at most 32 (0 means 32).
    sample_on_device_mode: Literal["all", "decode_only"] | None = "all"
    enable_model_warmup: Annotated[bool, Strict()] = True
    line_rs: Annotated[bool, Strict()] | None = None
    line_ag: Annotated[bool, Strict()] | None = None
    overlap_decode: Annotated[bool, Strict()] = True
