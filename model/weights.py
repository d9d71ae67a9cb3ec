"""Stream Llama weights from a Meta (`consolidated.NN.pth` + params.json) or Hugging Face (safetensors)
checkpoint, one tensor at a time, in one layout: Hugging Face names (without the `model.` prefix) and HF's
q/k row order.

HF stores each q/k head's rotary pairs as two halves (rotate-half RoPE); Meta interleaves them. Meta
checkpoints are permuted on the way in. Meta's tensor-parallel shards are merged per tensor from
memory-mapped files, so the caller copies each into its parameter and at most one extra tensor is alive.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from model.config import LlamaConfig

# Meta name -> HF name, per layer and top level.
META_TO_HF = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "tok_embeddings": "embed_tokens", "norm": "norm", "output": "lm_head",
}
# Tensor-parallel split dimension of Meta's shards: column-parallel layers (and Llama 3's vocab-parallel
# embedding) split output rows, row-parallel layers split input columns. Anything else is replicated.
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


def load_weights(path: str | Path, cfg: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name without `model.`, tensor) for every weight in the checkpoint at `path`: a folder
    with params.json is Meta's, any other HF's."""
    path = Path(path)
    if (path / "params.json").exists():
        return _meta_weights(path, cfg)
    return _hf_weights(path)


def _hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    handles = [safe_open(path / f, framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys() if not k.endswith("rotary_emb.inv_freq")]
    for handle, key in tqdm(keys, desc=f"loading {path.name}", unit="tensor", disable=None):
        yield key.removeprefix("model."), handle.get_tensor(key)


def _meta_weights(path: Path, cfg: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"params.json but no consolidated.*.pth in {path}")
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    keys = [k for k in shards[0] if k != "rope.freqs"]  # Llama 2 saved its rope table
    for key in tqdm(keys, desc=f"loading {path.name} ({len(files)} shards)", unit="tensor", disable=None):
        module = key.removesuffix(".weight")
        kind = module.rsplit(".", 1)[-1]
        pieces = [shard[key] for shard in shards]
        tensor = pieces[0] if kind not in _META_SHARD_DIM else torch.cat(pieces, dim=_META_SHARD_DIM[kind])
        if kind == "wq":
            tensor = interleaved_to_half_split(tensor, cfg.n_heads)
        elif kind == "wk":
            tensor = interleaved_to_half_split(tensor, cfg.n_kv_heads)
        yield _meta_name(module) + ".weight", tensor


def _meta_name(module: str) -> str:
    if module.startswith("layers."):
        _, layer, rest = module.split(".", 2)
        return f"layers.{layer}.{META_TO_HF[rest]}"
    return META_TO_HF[module]


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's rotary pairs (x0, x1), (x2, x3)... to HF's halves
    (x0, x2, ...), (x1, x3, ...) within each head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half_split` (HF -> Meta), for writing Meta checkpoints in tests."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
