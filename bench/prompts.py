"""Prompt files in the format of tt-metal's Llama-3.3-70B Galaxy text demo.

A prompt file is a JSON list of {"prompt": str, "context": str, "max_length": int}; only "prompt" is
required. "context" names a text file (a relative path is taken from the prompt file's folder, so the
shipped samples work from any directory) or an http(s) URL. "max_length" keeps the context's first N
characters, which is how one long text serves every context length; without a context it has nothing to cut.

Joining follows the demo: an instruct model gets the context in a markdown code block, a blank line, then
the prompt; a base model gets the context alone (the demo drops the question for base weights).

Shipped samples (SAMPLES_DIR), all text written or generated here (bench/textgen.py):
  batch32.json     32 questions of 84-102 Llama-3 tokens (94-112 with the chat template): the demo's batch-32.
  long_<N>k.json   one question about logbook.txt, cut so the joined prompt is N*1024 - 256 Llama-3 tokens,
                   leaving room for the chat template and 128 generated tokens (4k, 8k, 16k, 32k, 64k, 128k).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, PositiveInt, TypeAdapter, ValidationError

SAMPLES_DIR = Path(__file__).with_name("prompts")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and, where it can, the entry."""


class PromptEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    context: str | None = None
    max_length: PositiveInt | None = None


_ENTRIES = TypeAdapter(list[PromptEntry])


def read_prompt_file(path: str | Path) -> list[PromptEntry]:
    """The file's entries, validated; contexts are not read yet."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read prompt file: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: not valid JSON: {e}") from e
    except UnicodeDecodeError as e:  # JSON files are UTF-8 (RFC 8259); a Latin-1 or UTF-16 export is not
        raise PromptFileError(f"{path}: not UTF-8 text: {e}") from e
    if not isinstance(raw, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompt entries, got {type(raw).__name__}")
    if not raw:
        raise PromptFileError(f"{path}: the list of prompts is empty")
    try:
        return _ENTRIES.validate_python(raw)
    except ValidationError as e:
        index = e.errors()[0]["loc"][0]
        problems = [
            ": ".join([*map(str, err["loc"][1:]), err["msg"]]) for err in e.errors() if err["loc"][0] == index
        ]
        raise PromptFileError(f"{path}: entry {index}: {'; '.join(problems)}") from e


def load_prompts(path: str | Path, instruct: bool = True, cut: bool = True) -> list[str]:
    """The prompt texts of a file, each with its context read, cut to max_length (unless `cut` is False: the demo at
    batch 32 cuts to lengths of its own instead) and joined."""
    path = Path(path)
    prompts = []
    for i, entry in enumerate(read_prompt_file(path)):
        if entry.context is None:
            prompts.append(entry.prompt)
            continue
        try:
            context = _read_source(entry.context, path.parent)[: entry.max_length if cut else None]
        except (OSError, httpx.HTTPError, UnicodeDecodeError) as e:
            raise PromptFileError(f"{path}: entry {i}: cannot read context {entry.context!r}: {e}") from e
        prompts.append(f"```{context}```\n\n{entry.prompt}" if instruct else context)
    return prompts


def _read_source(source: str, base_dir: Path) -> str:
    if source.startswith(("http://", "https://")):
        return _fetch(source)
    return (base_dir / Path(source).expanduser()).read_text(encoding="utf-8")


@lru_cache(maxsize=16)
def _fetch(url: str) -> str:
    """Cached: a prompt file often names one long text for every entry, and a batch repeats entries."""
    response = httpx.get(url, follow_redirects=True, timeout=60)
    response.raise_for_status()
    return response.text
