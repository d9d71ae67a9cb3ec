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
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from model.checkpoint import META_SHARDS, checkpoint_format
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
    """Yield (HF name without `model.`, tensor) for every weight in the checkpoint at `path`, Meta's or HF's as
    model.checkpoint.checkpoint_format decides, after `check_weights` found every one and of the right shape.
    Raises as check_weights does, before the first tensor."""
    path = Path(path)
    if checkpoint_format(path) == "meta":
        files, shards = _load_shards(path)  # memory-mapped once, for the check and the load
        _check_shapes(path, cfg, _meta_shapes(path, files, shards), meta=True)
        return _meta_weights(path, cfg, files, shards)
    _check_shapes(path, cfg, _hf_shapes(path), meta=False)
    return _hf_weights(path)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF name (without `model.`) -> the shape `cfg` needs (transformers' LlamaForCausalLM). A tied model needs no
    lm_head (a checkpoint may store the copy anyway)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        layer = f"layers.{i}."
        shapes.update({
            layer + "self_attn.q_proj.weight": (q, cfg.dim), layer + "self_attn.k_proj.weight": (kv, cfg.dim),
            layer + "self_attn.v_proj.weight": (kv, cfg.dim), layer + "self_attn.o_proj.weight": (cfg.dim, q),
            layer + "mlp.gate_proj.weight": (cfg.ffn_dim, cfg.dim), layer + "mlp.up_proj.weight": (cfg.ffn_dim, cfg.dim),
            layer + "mlp.down_proj.weight": (cfg.dim, cfg.ffn_dim), layer + "input_layernorm.weight": (cfg.dim,),
            layer + "post_attention_layernorm.weight": (cfg.dim,),
        })
    return shapes


def check_weights(path: str | Path, cfg: LlamaConfig) -> None:
    """Raise ValueError naming the file and the tensor when the checkpoint at `path` lacks a tensor `cfg` needs, holds
    one no Llama of it has, holds one of another shape, one not of a float dtype, or one twice (in two safetensors
    files); ValueError too for a file that is no safetensors or torch.load checkpoint, a broken index or one naming
    absent files, a gap in Meta's shard numbers, or both formats in one folder; FileNotFoundError when it holds no
    weights (neither model.safetensors nor its index, nor any consolidated.NN.pth). Reads only headers (safetensors)
    and memory-maps Meta's shards, so the Serve build checks this before any replica starts; a replica would otherwise
    fail inside torch's copy_ (or broadcast a wrong shape into its parameter without a word)."""
    path = Path(path)
    meta = checkpoint_format(path) == "meta"
    _check_shapes(path, cfg, _meta_shapes(path, *_load_shards(path)) if meta else _hf_shapes(path), meta)


def _check_shapes(path: Path, cfg: LlamaConfig, found: dict[str, tuple[tuple[int, ...], str, str]],
                  meta: bool) -> None:
    """check_weights' verdict on `found`: HF name -> (shape, file, the checkpoint's own key)."""
    config_file = path / ("params.json" if meta else "config.json")
    expected = expected_shapes(cfg)
    for name, (shape, where, key) in found.items():
        if name not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ValueError(f"{where}: tensor {key!r} is no weight of the Llama model {config_file} describes")
        if shape != expected[name]:
            hint = (f" ({config_file.name} wrong, or a consolidated.NN.pth shard missing?)"
                    if meta and shape[0] < expected[name][0] else "")
            raise ValueError(f"{where}: tensor {key!r} has shape {list(shape)}, but {config_file} needs "
                             f"{list(expected[name])}{hint}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors {config_file.name} needs, e.g. {missing[:3]} "
                         "(HF names, without `model.`)")


# Weights are read as floats and cast to the model's dtype; integer or float8 ones are a quantized checkpoint's codes,
# which copy_ would cast as if they were the values.
_SAFETENSORS_FLOATS = {"F64", "F32", "F16", "BF16"}
_TORCH_FLOATS = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def _not_float(file: Path, key: str, dtype: str) -> str:
    return (f"{file}: tensor {key!r} has dtype {dtype}: meshserve reads float weights (F32, F16, BF16), not a "
            "quantized checkpoint's")


def _hf_files(path: Path) -> list[str]:
    """The safetensors files of an HF folder: those its index names (each must be there), else model.safetensors."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        if not (path / "model.safetensors").exists():
            others = [*sorted(p.name for p in path.glob("*.bin")), *sorted(p.name for p in path.glob("*.pth")),
                      *sorted(p.name for p in path.glob("*.gguf"))]
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}"
                                    + (f" (only safetensors are read, not {others[0]})" if others else ""))
        return ["model.safetensors"]
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if not all(isinstance(f, str) for f in files):  # a number was joined to the folder's path: a TypeError
            raise ValueError(f"file names are strings, not {next(f for f in files if not isinstance(f, str))!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, no weight_map, not a mapping
        raise ValueError(f"{index}: not a safetensors index (a JSON object whose weight_map maps each tensor to its "
                         f"file): {e!r}") from None
    absent = [f for f in files if not (path / f).is_file()]
    if absent:
        raise ValueError(f"{index} names {len(absent)} files not in {path}, e.g. {absent[:3]} (a partial download?)")
    return files


def _hf_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str, str]]:
    shapes = {}
    for file in _hf_files(path):
        try:
            with safe_open(path / file, framework="pt") as handle:
                for key in handle.keys():
                    if not key.endswith("rotary_emb.inv_freq"):
                        tensor = handle.get_slice(key)
                        if tensor.get_dtype() not in _SAFETENSORS_FLOATS:
                            raise ValueError(_not_float(path / file, key, tensor.get_dtype()))
                        shape = tuple(tensor.get_shape())
                        name = key.removeprefix("model.")
                        if name in shapes:  # which copy the model got was the order of the files
                            raise ValueError(f"{path / file}: tensor {key!r} is also in {shapes[name][1]} (as "
                                             f"{shapes[name][2]!r}): one checkpoint holds each weight once")
                        shapes[name] = (shape, str(path / file), key)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path / file}: not a safetensors file ({e})") from None
    return shapes


def _meta_shards(path: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, every number there. Raises otherwise, naming what is missing."""
    files = sorted(path.glob(META_SHARDS))
    if not files:
        raise FileNotFoundError(f"params.json but no consolidated.*.pth in {path}")
    numbers = [f.name.split(".")[1] for f in files]
    if not all(n.isdigit() for n in numbers) or sorted(map(int, numbers)) != list(range(len(files))):
        raise ValueError(f"{path}: Meta's shards are consolidated.00.pth to consolidated.NN.pth, every number, but "
                         f"these are {[f.name for f in files]} (a shard missing?)")
    return sorted(files, key=lambda f: int(f.name.split(".")[1]))


def _load_shards(path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    files = _meta_shards(path)
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch's errors for a file that is no checkpoint vary by cause
            raise ValueError(f"{f}: not a PyTorch checkpoint torch.load reads ({e})") from None
        if set(shards[-1]) != set(shards[0]):
            odd = sorted(set(shards[-1]) ^ set(shards[0]))
            raise ValueError(f"{f} and {files[0].name} hold different tensors, e.g. {odd[:3]}: not one model's shards")
    return files, shards


def _meta_kind(key: str) -> str:
    """The last part of a Meta weight's module name ("wq", "tok_embeddings"): what _META_SHARD_DIM is keyed by."""
    return key.removesuffix(".weight").rsplit(".", 1)[-1]


def _meta_shapes(path: Path, files: list[Path],
                 shards: list[dict[str, torch.Tensor]]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    where = str(files[0]) if len(files) == 1 else f"{path}/consolidated.00-{len(files) - 1:02d}.pth"
    shapes = {}
    for key in shards[0]:
        if key == "rope.freqs":
            continue
        kind = _meta_kind(key)
        shape = list(shards[0][key].shape)
        split = _META_SHARD_DIM.get(kind) if len(shape) == 2 else None
        for file, shard in zip(files, shards):
            if shard[key].dtype not in _TORCH_FLOATS:
                raise ValueError(_not_float(file, key, str(shard[key].dtype).removeprefix("torch.")))
            other = list(shard[key].shape)
            if len(other) != len(shape) or any(a != b for d, (a, b) in enumerate(zip(other, shape)) if d != split):
                # torch.cat's error at load named no file; a replicated tensor's other copies were never read
                raise ValueError(f"{file}: tensor {key!r} has shape {other} there but {shape} in {files[0].name} "
                                 "(shards of two models?)")
        if split is not None:
            shape[split] = sum(shard[key].shape[split] for shard in shards)
        name = _meta_name(key)
        shapes[name or key] = (tuple(shape), where, key)
    return shapes


def _hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    handles = [safe_open(path / f, framework="pt") for f in _hf_files(path)]
    keys = [(h, k) for h in handles for k in h.keys() if not k.endswith("rotary_emb.inv_freq")]
    for handle, key in tqdm(keys, desc=f"loading {path.name}", unit="tensor", disable=None):
        yield key.removeprefix("model."), handle.get_tensor(key)


def _meta_weights(path: Path, cfg: LlamaConfig, files: list[Path],
                  shards: list[dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    keys = [k for k in shards[0] if k != "rope.freqs"]  # Llama 2 saved its rope table
    for key in tqdm(keys, desc=f"loading {path.name} ({len(files)} shards)", unit="tensor", disable=None):
        kind = _meta_kind(key)
        pieces = [shard[key] for shard in shards]
        tensor = pieces[0] if kind not in _META_SHARD_DIM else torch.cat(pieces, dim=_META_SHARD_DIM[kind])
        if kind == "wq":
            tensor = interleaved_to_half_split(tensor, cfg.n_heads)
        elif kind == "wk":
            tensor = interleaved_to_half_split(tensor, cfg.n_kv_heads)
        yield _meta_name(key), tensor


def _meta_name(key: str) -> str | None:
    """The HF name (without `model.`) of a Meta weight, None for a name no Llama weight has."""
    module, suffix = key.rsplit(".", 1) if "." in key else (key, "")
    if suffix != "weight":
        return None
    if module.startswith("layers."):
        _, layer, rest = module.split(".", 2)
        return f"layers.{layer}.{META_TO_HF[rest]}.weight" if rest in META_TO_HF and layer.isdigit() else None
    return f"{META_TO_HF[module]}.weight" if module in META_TO_HF else None


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's rotary pairs (x0, x1), (x2, x3)... to HF's halves
    (x0, x2, ...), (x1, x3, ...) within each head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half_split` (HF -> Meta), for writing Meta checkpoints in tests."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
