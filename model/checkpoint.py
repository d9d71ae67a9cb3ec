"""Where the checkpoint is: a folder, or a Hugging Face hub id in the local cache, named in the config or by
the Galaxy demo's environment variables (models/demos/llama3_70b_galaxy/README.md: HF_MODEL, LLAMA_DIR).
Light on purpose: the Serve build resolves it without importing torch."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def model_dir_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The checkpoint the Galaxy demo would load: `LLAMA_DIR` (a Meta folder) or `HF_MODEL` (an HF folder, or a
    hub id such as meta-llama/Llama-3.3-70B-Instruct already in the local HF cache). None when neither is set.
    Raises ValueError when both are set (tt-metal's TtModelArgs asserts the same) or the one set is not there.
    `env` defaults to os.environ as it is at the call (a default of os.environ itself kept whatever mapping it was
    when this module was imported)."""
    env = os.environ if env is None else env
    llama_dir, hf_model = env.get("LLAMA_DIR"), env.get("HF_MODEL")
    if llama_dir and hf_model:
        raise ValueError(f"set only one of LLAMA_DIR ({llama_dir!r}) and HF_MODEL ({hf_model!r})")
    if llama_dir:
        path = Path(llama_dir).expanduser()
        if not path.is_dir():
            raise ValueError(f"LLAMA_DIR: {llama_dir!r} is not a directory{looked_in(path)}")
        return path
    if not hf_model:
        return None
    return find_checkpoint(hf_model, "HF_MODEL", hub_cache(env))


def hub_cache(env: Mapping[str, str] | None) -> str | None:
    """The HF hub cache `env` names ($HF_HUB_CACHE, else $HF_HOME/hub), as huggingface_hub would read it in a process
    with that environment (a Serve build or replica with the app's runtime_env.env_vars); None, with no `env` or
    neither variable: the library's own."""
    if env is None:
        return None
    if env.get("HF_HUB_CACHE"):
        return str(Path(env["HF_HUB_CACHE"]).expanduser())
    return str(Path(env["HF_HOME"]).expanduser() / "hub") if env.get("HF_HOME") else None


def find_checkpoint(name: str, field: str = "model", cache_dir: str | None = None) -> Path:
    """A checkpoint folder, or a Hugging Face hub id (`org/name`) already in the local HF cache (`cache_dir`, else
    $HF_HUB_CACHE / $HF_HOME as huggingface_hub read them): its snapshot folder. Nothing is downloaded; meshserve
    never reaches a model hub at run time. Raises ValueError naming `field` when it is neither."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError
    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # not an id, or not in the cache: the library's errors differ by case and version
        where = looked_in(path) if isinstance(e, HFValidationError) else ""  # no hub id's form: a path meant
        raise ValueError(f"{field}: {name!r} is neither a directory nor a Hugging Face model in the local cache "
                         f"(nothing is downloaded at run time: fetch it first, e.g. `hf download`){where}") from None


def looked_in(path: Path) -> str:
    """Where a relative path was looked for, for an error: Serve's build and replicas resolve one in Ray's working
    directory on their node (where `ray start` ran), which need not be the deploying shell's."""
    return "" if path.is_absolute() else f" (a relative path: looked for in {Path.cwd()}, the working directory here)"


def resolve_model_dir(model: str | None) -> Path:
    """The folder of the config's `model` on this node: 'smollm2' fetches the embedded default into this node's
    cache once; a folder or a cached hub id is used as is; empty falls back to $HF_MODEL / $LLAMA_DIR. Every
    replica resolves it where it runs, so a node needs the weights, not the deploying node's cache path.
    Raises ValueError naming the field when none of these is there."""
    if model == "smollm2":
        from model.embedded import ensure_smollm2
        return ensure_smollm2()
    return checkpoint_dir(model)


def checkpoint_dir(name: str | None, field: str = "model", env: Mapping[str, str] | None = None) -> Path:
    """`name` (find_checkpoint), or without one the demo's variables in `env` (model_dir_from_env). Raises
    ValueError as those do, and naming `field` when neither names a checkpoint."""
    path = find_checkpoint(name, field, hub_cache(env)) if name else model_dir_from_env(env)
    if path is None:
        raise ValueError(f"{field}: none given, and neither HF_MODEL nor LLAMA_DIR is set")
    return path


META_SHARDS = "consolidated.*.pth"
HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors")


def checkpoint_format(path: str | Path) -> str:
    """'meta' (params.json + consolidated.NN.pth) or 'hf' (config.json + safetensors) for a checkpoint folder, by the
    weights it holds, else by its config file (params.json first). Raises ValueError when it holds both kinds of
    weights (which would be served was a guess: Meta's own HF releases keep theirs apart, under original/), and
    FileNotFoundError when it has neither weights nor a config."""
    path = Path(path)
    meta, hf = any(path.glob(META_SHARDS)), any((path / f).is_file() for f in HF_WEIGHTS)
    if meta and hf:
        raise ValueError(f"{path} holds both Meta weights ({META_SHARDS}) and Hugging Face weights (model.safetensors"
                         "*): point the model at a folder with one format")
    if meta or hf:
        return "meta" if meta else "hf"
    for name, fmt in (("params.json", "meta"), ("config.json", "hf")):
        if (path / name).is_file():
            return fmt
    gguf = sorted(p.name for p in path.glob("*.gguf"))  # llama.cpp's download: config and tokenizer inside the file
    raise FileNotFoundError(f"{path} has neither config.json nor params.json" + (
        f" ({gguf[0]} is not read: a GGUF file needs converting into a Hugging Face folder first, e.g. by "
        "transformers' from_pretrained(folder, gguf_file=...) and save_pretrained)" if gguf else ""))
