"""Facts of Llama-3.3-70B on a Galaxy (8x4 Wormhole mesh) that more than the TT backend needs: the simulator
sizes itself by them and the app config validates against them. Imports neither ttnn nor torch.

Sources: tt-metal models/demos/llama3_70b_galaxy/tt (model_config.py, generator.py, llama_attention.py) and
tt-inference-server's Llama-3.3-70B Galaxy model spec; DESIGN.md "KV groups".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NUM_SLOTS = 32  # tt-metal's sampler and decode trace are fixed at 32 users
MESH_SHAPE = (8, 4)
KV_GROUPS = 4  # one per mesh column: slot s lives on column s // 8, and its KV only on that column's devices
BLOCK_SIZE = 64
MAX_SEQ_LEN = 131_072
PREFIX_ALIGN = 128  # SDPA_CHUNK_ALIGN in model_config.py: cached prefixes are cut down to a multiple of it
# Per KV group: one 128k user plus a block for each other slot of the column (tt-inference-server: ~2,056/rank).
BLOCKS_PER_GROUP = -(-(MAX_SEQ_LEN + BLOCK_SIZE * (NUM_SLOTS // KV_GROUPS)) // BLOCK_SIZE)  # 2056
LLAMA3_VOCAB = 128_256
LLAMA3_EOS = (128_001, 128_008, 128_009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
# What tt-metal's sampler draws with. Penalties stay on the host: this contract carries no token history.
DEVICE_SAMPLING = frozenset({"temperature", "top_k", "top_p", "seed"})


@dataclass(frozen=True)
class TTMeshConfig:
    """How the mesh is opened and sampled; the defaults are the seed's (galaxy_perf.json,
    mesh_open_defaults_from_seed). `line_rs` / `line_ag` set LINE_RS / LINE_AG for tt-metal's CCLs
    (read when its llama_ccl module is imported); None leaves the environment as it is."""

    mesh_shape: tuple[int, int] = MESH_SHAPE
    dispatch_core_axis: Literal["row", "col"] = "col"
    fabric_config: Literal["DISABLED", "FABRIC_1D", "FABRIC_1D_RING", "FABRIC_2D"] = "FABRIC_1D_RING"
    worker_l1_size: int = 1_344_544
    trace_region_size: int = 95_693_824
    # "all": prefill and decode sample on the device; "decode_only": prefill returns logits and the first
    # token is sampled here; None: the device never samples. Device top-k is at most 32 (0 means 32).
    sample_on_device_mode: Literal["all", "decode_only"] | None = "all"
    line_rs: bool | None = None
    line_ag: bool | None = None
