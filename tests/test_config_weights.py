"""Config parsing (Meta and HF spellings) and checkpoint loading (Meta shards, HF safetensors)."""
import json

import pytest
import torch

from model.checkpoint import find_checkpoint, model_dir_from_env
from model.config import LlamaConfig, RopeScaling, meta_ffn_dim
from model.verify import META_EXPRESSIBLE_ROPE, META_PARAMS, save_meta_checkpoint, save_tiny_hf_model
from model.weights import half_split_to_interleaved, interleaved_to_half_split, load_weights

# Meta's params.json for Llama 3.3 70B and Llama 3.1 8B, as released.
LLAMA_33_70B = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
                "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
                "use_scaled_rope": True}
LLAMA_31_8B = {**LLAMA_33_70B, "dim": 4096, "n_layers": 32, "n_heads": 32, "ffn_dim_multiplier": 1.3}


def test_meta_params_give_the_published_hf_shapes():
    big = LlamaConfig.from_meta(LLAMA_33_70B)
    assert (big.ffn_dim, big.head_dim, big.n_kv_heads) == (28672, 128, 8)  # HF intermediate_size of 70B
    assert big.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)
    assert big.max_position_embeddings == 131072
    assert LlamaConfig.from_meta(LLAMA_31_8B).ffn_dim == 14336  # HF intermediate_size of 8B


def test_meta_ffn_rule_without_multiplier_rounds_up():
    assert meta_ffn_dim(64, 32, None) == 192  # int(2 * 256 / 3) = 170 -> next multiple of 32
    assert meta_ffn_dim(4096, 256, None) == 11008  # Llama 2 7B


def test_unscaled_meta_rope_has_no_scaling():
    cfg = LlamaConfig.from_meta({**LLAMA_31_8B, "use_scaled_rope": False})
    assert cfg.rope_scaling is None and cfg.max_position_embeddings == 8192


def test_both_hf_rope_spellings_parse_alike():
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "intermediate_size": 256, "rms_norm_eps": 1e-5, "eos_token_id": [1, 2]}
    scaling = {k: v for k, v in META_EXPRESSIBLE_ROPE.items() if k != "rope_theta"}
    v4 = LlamaConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {**scaling, "rope_type": "llama3"}})
    v5 = LlamaConfig.from_hf({**base, "rope_parameters": META_EXPRESSIBLE_ROPE})
    assert v4 == v5
    assert v5.rope_theta == 500000.0 and v5.rope_scaling.factor == 8.0 and v5.eos_token_ids == (1, 2)


def test_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_hf({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                             "vocab_size": 8, "intermediate_size": 8, "rope_parameters": {"rope_type": "yarn"}})


def test_permutation_is_what_rotate_half_needs():
    """Meta rotates adjacent pairs (complex view); HF rotates the two halves of each head. With the
    rows permuted, HF's RoPE on the permuted projection equals Meta's RoPE on the original, permuted."""
    heads, head_dim, dim, pos = 2, 8, 16, 5
    w_meta = torch.randn(heads * head_dim, dim, dtype=torch.float64)
    x = torch.randn(dim, dtype=torch.float64)
    angles = pos * 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    q = (w_meta @ x).view(heads, head_dim // 2, 2)
    rotation = torch.polar(torch.ones_like(angles), angles)
    meta_rotated = torch.view_as_real(torch.view_as_complex(q.contiguous()) * rotation)
    w_hf = interleaved_to_half_split(w_meta, heads)
    q = (w_hf @ x).view(heads, head_dim)
    cos, sin = torch.cat([angles, angles]).cos(), torch.cat([angles, angles]).sin()
    hf_rotated = q * cos + torch.cat([-q[:, head_dim // 2:], q[:, :head_dim // 2]], dim=-1) * sin
    # Put Meta's result in HF row order and compare.
    expected = interleaved_to_half_split(meta_rotated.reshape(heads * head_dim, 1), heads).view(heads, head_dim)
    torch.testing.assert_close(hf_rotated, expected)
    torch.testing.assert_close(half_split_to_interleaved(w_hf, heads), w_meta)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = save_tiny_hf_model(path, META_EXPRESSIBLE_ROPE, seed=4)
    return path, {k.removeprefix("model."): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_meta_shards_merge_into_the_hf_tensors(tiny_hf, tmp_path, num_shards):
    hf_dir, state = tiny_hf
    save_meta_checkpoint({f"model.{k}": v for k, v in state.items()}, META_PARAMS, tmp_path, num_shards)
    cfg = LlamaConfig.from_dir(tmp_path)
    loaded = dict(load_weights(tmp_path, cfg))
    assert loaded.keys() == state.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name


def test_meta_and_hf_configs_of_the_same_model_agree(tiny_hf, tmp_path):
    hf_dir, state = tiny_hf
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS))
    meta, hf = LlamaConfig.from_dir(tmp_path), LlamaConfig.from_dir(hf_dir)
    assert meta == LlamaConfig(**{**hf.__dict__, "eos_token_ids": ()})  # Meta leaves stop ids to the tokenizer


def test_sharded_safetensors_load_like_one_file(tiny_hf, tmp_path):
    hf_dir, state = tiny_hf
    from transformers import LlamaForCausalLM
    LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = dict(load_weights(tmp_path, LlamaConfig.from_dir(tmp_path)))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_checkpoint_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        list(load_weights(tmp_path, None))
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS))
    with pytest.raises(FileNotFoundError, match="consolidated"):
        list(load_weights(tmp_path, LlamaConfig.from_dir(tmp_path)))


def test_model_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    monkeypatch.delenv("HF_MODEL", raising=False)
    assert model_dir_from_env() is None
    monkeypatch.setenv("HF_MODEL", str(tmp_path))
    assert model_dir_from_env() == tmp_path
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="only one"):
        model_dir_from_env()
    monkeypatch.delenv("HF_MODEL")
    assert model_dir_from_env() == tmp_path
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="LLAMA_DIR"):
        model_dir_from_env()


def test_a_hub_id_resolves_to_its_snapshot_in_the_local_cache_only(monkeypatch, tmp_path):
    """The Galaxy README's `HF_MODEL=meta-llama/Llama-3.3-70B-Instruct`: the cached snapshot, nothing fetched."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    repo = tmp_path / "models--meta-llama--Llama-3.3-70B-Instruct"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_MODEL", "meta-llama/Llama-3.3-70B-Instruct")
    assert model_dir_from_env() == snapshot
    assert find_checkpoint(str(snapshot)) == snapshot
    monkeypatch.setenv("HF_MODEL", "meta-llama/Llama-3.1-8B-Instruct")  # not in the cache: named, not fetched
    with pytest.raises(ValueError, match="HF_MODEL: 'meta-llama/Llama-3.1-8B-Instruct' is neither"):
        model_dir_from_env()
    with pytest.raises(ValueError, match="model: '/no/such/folder' is neither"):
        find_checkpoint("/no/such/folder")
