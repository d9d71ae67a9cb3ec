"""The embedded SmolLM2 folder: complete, loadable by transformers, coherent (q/k rows in HF layout)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model import embedded


@pytest.fixture(scope="module")
def smollm2_dir():
    return embedded.ensure_smollm2()


def test_folder_is_complete_hf_llama(smollm2_dir):
    assert all((smollm2_dir / name).is_file() for name in embedded.SMOLLM2_FILES)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert "quantization_config" not in config  # dequantized: a plain checkpoint, not a GGUF wrapper
    assert "<|im_start|>" in json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]


def test_second_call_reuses_the_folder(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert embedded.ensure_smollm2() == smollm2_dir
    assert weights.stat().st_mtime_ns == before


def test_chat_generation_is_coherent(smollm2_dir):
    """llama.cpp stores q/k rows permuted for its rope; if that were not undone the answer would be noise."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_ensure_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path))

    def failing_build(workdir, out):
        out.mkdir()
        (out / "a.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        embedded._ensure("thing", ("a.txt", "b.txt"), failing_build)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the staging dir is left behind

    def build(workdir, out):
        out.mkdir()
        for name in ("a.txt", "b.txt"):
            (out / name).write_text(name)

    assert embedded._ensure("thing", ("a.txt", "b.txt"), build) == tmp_path / "thing"
    assert embedded._ensure("thing", ("a.txt", "b.txt"), failing_build) == tmp_path / "thing"  # no rebuild
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_a_cache_under_home_given_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    """`MESHSERVE_CACHE: ~/fast/cache` in a config's runtime_env.env_vars (or a systemd Environment=) reaches Python
    unexpanded, as HF_HOME does, which is read expanded: the model was fetched into a folder named `~` in Ray's
    working directory of each node."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MESHSERVE_CACHE", "~/fast/cache")
    assert embedded.cache_root() == tmp_path / "fast" / "cache"
