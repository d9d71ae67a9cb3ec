"""The TT Galaxy backend: tt-metal's Llama-3.3-70B Galaxy model (the generator tt-metal's vLLM integration
drives) on an 8x4 Wormhole mesh that this process opens.

Written against tt-metal's models/demos/llama3_70b_galaxy/tt/generator.py (`Generator.prefill_forward_text`
with `start_pos` prefix caching, `Generator.decode_forward`), model_config.py (`TtModelArgs`), llama_model.py
(`TtTransformer`) and generator_vllm.py (model build and KV cache allocation), and against the tt vLLM
worker's mesh open/close. `ttnn` and the checkout's `models` package are imported only when a backend is
built: ttnn installs only on Python 3.10 and 3.12 and computes nothing without chips.

Device block 0 is never handed to the caller: tt-metal pads prefill page tables with block 0 and writes
the padded positions' KV there (vLLM keeps block 0 as its null block). Caller block b is device block b + 1.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from model.backend import Backend, Capabilities
from model.galaxy import (BLOCK_SIZE, DEVICE_SAMPLING, LLAMA3_EOS, LLAMA3_VOCAB, MAX_SEQ_LEN,  # noqa: F401
                          NUM_SLOTS, PREFIX_ALIGN, TTMeshConfig)
from model.sampler import sample_row
from scheduler.sampling import SamplingParams

DEFAULT_NUM_BLOCKS = -(-(MAX_SEQ_LEN + BLOCK_SIZE * NUM_SLOTS) // BLOCK_SIZE)  # the tt vLLM worker's sizing: 2080

_GREEDY = SamplingParams(temperature=0.0)  # for rows without a request
_TT_EXTRA_HINT = ("the TT Galaxy backend needs ttnn: pip install 'meshserve[tt]' "
                 "(ttnn wheels exist only for Python 3.10 and 3.12)")


class TTGalaxyBackend(Backend):
    def __init__(self, model_dir: str | os.PathLike | None = None, *, mesh_shape: tuple[int, int] | None = None,
                 num_slots: int = NUM_SLOTS, block_size: int = BLOCK_SIZE, num_blocks: int | None = None,
                 max_seq_len: int | None = None, num_layers: int | None = None,
                 tt_config: TTMeshConfig | dict | None = None):
        """`model_dir` (a Hugging Face or Meta folder) is exported as HF_MODEL or LLAMA_DIR, where
        tt-metal's TtModelArgs looks; without it those variables must already be set.
        `num_layers` below 80 builds a truncated model for bring-up."""
        if num_slots != NUM_SLOTS:
            raise ValueError(f"the Galaxy model decodes exactly {NUM_SLOTS} slots, not {num_slots}")
        if PREFIX_ALIGN % block_size:
            raise ValueError(f"block_size must divide the prefix alignment {PREFIX_ALIGN}")
        config = TTMeshConfig(**tt_config) if isinstance(tt_config, dict) else tt_config or TTMeshConfig()
        if mesh_shape is not None:
            config = replace(config, mesh_shape=tuple(mesh_shape))
        self.config = config
        max_seq_len = max_seq_len or MAX_SEQ_LEN
        num_blocks = num_blocks or -(-(max_seq_len + block_size * NUM_SLOTS) // block_size)
        _export_weights_dir(model_dir)
        _export_line_env(config)

        self.ttnn = _import_ttnn()
        self.mesh = _open_mesh(self.ttnn, config)
        try:
            self.generator, args = _build_generator(self.ttnn, self.mesh, max_seq_len, num_layers)
            self.kv_cache = _allocate_kv_cache(self.ttnn, self.mesh, args, num_blocks + 1, block_size)
        except BaseException:
            self.close()
            raise
        self.caps = Capabilities(num_slots=NUM_SLOTS, block_size=block_size, num_blocks=num_blocks,
                                 max_seq_len=max_seq_len, prefix_align=PREFIX_ALIGN, vocab_size=args.vocab_size,
                                 eos_token_ids=LLAMA3_EOS,
                                 device_sampling=DEVICE_SAMPLING if config.sample_on_device_mode else frozenset())
        self._decode_forward = (getattr(self.generator, "decode_forward", None)
                                or self.generator.decode_forward_text)  # its name before tt-metal renamed it

    def prefill(self, token_ids: list[int], start: int, block_ids: list[int], slot: int,
                sampling: SamplingParams | None = None) -> torch.Tensor:
        on_device = sampling is not None and self.config.sample_on_device_mode == "all"
        out = self.generator.prefill_forward_text(
            torch.tensor([token_ids], dtype=torch.long),
            page_table=torch.tensor([block_ids], dtype=torch.int32) + 1,
            kv_cache=self.kv_cache,
            prompt_lens=[len(token_ids)],
            enable_trace=True,
            sampling_params=_tt_sampling([sampling]) if on_device else None,  # request order: moved to `slot`
            empty_slots=[slot],
            # tt-metal asserts block-aligned starts; rounding down only rewrites identical KV
            start_pos=[start - start % PREFIX_ALIGN],
        )
        if on_device:
            return out[0].to(torch.long)
        logits = out[0, -1].float()
        if sampling is None:
            return logits
        return torch.tensor(sample_row(logits, sampling, len(token_ids))[0])  # "decode_only": first token here

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
               active: torch.Tensor, sampling: list[SamplingParams | None] | None = None) -> torch.Tensor:
        out = self._decode_forward(
            tokens,
            torch.where(active, positions, -1),  # position -1: the slot is skipped, its cache untouched
            page_table=page_table + 1,
            kv_cache=self.kv_cache,
            enable_trace=True,
            read_from_device=True,
            sampling_params=None if sampling is None else _tt_sampling([p or _GREEDY for p in sampling]),
            reset_inputs=True,  # the host owns tokens and positions (slots join, leave and move between steps)
        )
        out = out[0] if isinstance(out, tuple) else out  # newer generators also return log-probs
        return out.to(torch.long) if sampling is not None else out[:, -1].float()

    def can_sample(self, params: SamplingParams) -> bool:
        return self.config.sample_on_device_mode is not None and super().can_sample(params)

    def close(self) -> None:
        """Release the traces and CCL buffers (the generator's finaliser), then the mesh and the fabric."""
        if getattr(self, "mesh", None) is None:
            return
        self.generator = self._decode_forward = None
        for submesh in self.mesh.get_submeshes():
            self.ttnn.close_mesh_device(submesh)
        self.ttnn.close_mesh_device(self.mesh)
        if self.config.fabric_config != "DISABLED":
            self.ttnn.set_fabric_config(self.ttnn.FabricConfig.DISABLED)
        self.mesh = None


def _tt_sampling(rows: list[SamplingParams]):
    """tt-metal's SamplingParams: a list per field, one value per row (the generator pads to 32 users)."""
    from models.common.sampling import SamplingParams as TTSamplingParams

    return TTSamplingParams(temperature=[p.temperature for p in rows], top_k=[p.top_k for p in rows],
                            top_p=[p.top_p for p in rows], seed=[p.seed for p in rows])


def _import_ttnn():
    try:
        import ttnn
    except ImportError as e:
        raise ImportError(_TT_EXTRA_HINT) from e
    return ttnn


def _export_weights_dir(model_dir: str | os.PathLike | None) -> None:
    """tt-metal's TtModelArgs reads the checkpoint from HF_MODEL (config.json) or LLAMA_DIR (params.json)
    and refuses both at once."""
    if model_dir:
        meta = (Path(model_dir) / "params.json").exists()
        os.environ["LLAMA_DIR" if meta else "HF_MODEL"] = str(model_dir)
        os.environ.pop("HF_MODEL" if meta else "LLAMA_DIR", None)
    elif not (os.environ.get("HF_MODEL") or os.environ.get("LLAMA_DIR")):
        raise ValueError("no weights: pass a model folder or set HF_MODEL (or LLAMA_DIR), as for the Galaxy demo")


def _export_line_env(config: TTMeshConfig) -> None:
    for name, value in (("LINE_RS", config.line_rs), ("LINE_AG", config.line_ag)):
        if value is not None:
            os.environ[name] = "1" if value else "0"


def _open_mesh(ttnn, config: TTMeshConfig):
    """As the tt vLLM worker does: fabric first, then the mesh with the dispatch axis and L1/trace sizes."""
    if config.fabric_config != "DISABLED":
        ttnn.set_fabric_config(getattr(ttnn.FabricConfig, config.fabric_config))
    axis = ttnn.DispatchCoreAxis.COL if config.dispatch_core_axis == "col" else ttnn.DispatchCoreAxis.ROW
    return ttnn.open_mesh_device(ttnn.MeshShape(*config.mesh_shape),
                                 dispatch_core_config=ttnn.DispatchCoreConfig(axis=axis),
                                 trace_region_size=config.trace_region_size,
                                 worker_l1_size=config.worker_l1_size,
                                 num_command_queues=1)


def _build_generator(ttnn, mesh, max_seq_len: int, num_layers: int | None):
    """TtModelArgs -> state dict -> TtTransformer (paged KV supplied by us) -> Generator, as generator_vllm.py."""
    try:
        from models.demos.llama3_70b_galaxy.tt.generator import Generator
        from models.demos.llama3_70b_galaxy.tt.llama_model import TtTransformer
        from models.demos.llama3_70b_galaxy.tt.model_config import LlamaOptimizations, TtModelArgs
    except ImportError as e:
        raise ImportError("the TT Galaxy backend builds tt-metal's Llama Galaxy model: put your tt-metal "
                          "checkout on PYTHONPATH (models/demos/llama3_70b_galaxy)") from e
    args = TtModelArgs(mesh, instruct=True, max_batch_size=NUM_SLOTS, optimizations=LlamaOptimizations.performance,
                       max_seq_len=max_seq_len)
    if num_layers is not None:
        args.n_layers = num_layers
    model = TtTransformer(args=args, mesh_device=mesh, dtype=ttnn.bfloat8_b, state_dict=args.load_state_dict(),
                          weight_cache_path=args.weight_cache_path(ttnn.bfloat8_b), use_paged_kv_cache=True,
                          mode="prefill", enable_prefetcher_performance_mode=True)
    return Generator(model, args, mesh), args


def _allocate_kv_cache(ttnn, mesh, args, num_blocks: int, block_size: int) -> list:
    """[[k, v] per layer] for the one mesh, bfp8 in DRAM, replicated: each chip holds one KV head (the 8 heads
    over the 8 mesh rows) and only its column's users write to it."""
    shape = (num_blocks, args.n_kv_heads // args.cluster_shape[0], block_size, args.head_dim)
    empty = torch.zeros(shape, dtype=torch.bfloat16)
    return [[[ttnn.as_tensor(empty, device=mesh, mesh_mapper=ttnn.ReplicateTensorToMesh(mesh),
                             layout=ttnn.TILE_LAYOUT, memory_config=ttnn.DRAM_MEMORY_CONFIG, dtype=ttnn.bfloat8_b,
                             cache_file_name=args.model_cache_path / f"empty_{kv}cache_paged_attention{shape}")
              for kv in "kv"]
             for _ in range(args.n_layers)]]
