"""Config parsing (Meta and HF spellings) and checkpoint loading (Meta shards, HF safetensors)."""
import json
import os
import re

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
# Llama 3.2 3B's: its FFN width before rounding, int(1.0 * 8192), is already a multiple of 256.
LLAMA_32_3B = {**LLAMA_33_70B, "dim": 3072, "n_layers": 28, "n_heads": 24, "ffn_dim_multiplier": 1.0,
               "multiple_of": 256}


def test_meta_params_give_the_published_hf_shapes():
    big = LlamaConfig.from_meta(LLAMA_33_70B)
    assert (big.ffn_dim, big.head_dim, big.n_kv_heads) == (28672, 128, 8)  # HF intermediate_size of 70B
    assert big.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)
    assert big.max_position_embeddings == 131072
    assert LlamaConfig.from_meta(LLAMA_31_8B).ffn_dim == 14336  # HF intermediate_size of 8B
    assert LlamaConfig.from_meta(LLAMA_32_3B).ffn_dim == 8192  # HF intermediate_size of 3B: no rounding up


def test_meta_ffn_rule_without_multiplier_rounds_up():
    assert meta_ffn_dim(64, 32, None) == 192  # int(2 * 256 / 3) = 170 -> next multiple of 32
    assert meta_ffn_dim(4096, 256, None) == 11008  # Llama 2 7B


def test_unscaled_meta_rope_has_no_scaling():
    cfg = LlamaConfig.from_meta({**LLAMA_31_8B, "use_scaled_rope": False})
    assert cfg.rope_scaling is None and cfg.max_position_embeddings == 8192


def test_meta_params_without_optional_fields_take_metas_defaults():
    """A params.json may leave out what Meta's ModelArgs defaults (llama-models' llama3/args.py: multiple_of 256,
    norm_eps 1e-5, rope_theta 500000, n_kv_heads = n_heads): Meta's code then builds that model, so must this."""
    cfg = LlamaConfig.from_meta({"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 256})
    # int(2 * 512 / 3) = 341: 512 rounded up to 256's multiple (384 to 128's)
    assert (cfg.ffn_dim, cfg.norm_eps, cfg.rope_theta, cfg.n_kv_heads) == (512, 1e-5, 500000.0, 4)


def test_both_hf_rope_spellings_parse_alike():
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "intermediate_size": 256, "rms_norm_eps": 1e-5, "eos_token_id": [1, 2]}
    scaling = {k: v for k, v in META_EXPRESSIBLE_ROPE.items() if k != "rope_theta"}
    v4 = LlamaConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {**scaling, "rope_type": "llama3"}})
    v5 = LlamaConfig.from_hf({**base, "rope_parameters": META_EXPRESSIBLE_ROPE})
    assert v4 == v5
    assert v5.rope_theta == 500000.0 and v5.rope_scaling.factor == 8.0 and v5.eos_token_ids == (1, 2)


@pytest.mark.parametrize("key", ["rope_type", "type"])  # "type": transformers' older spelling, in older configs
@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic"])
def test_unknown_rope_type_is_refused(rope_type, key):
    """Only Llama 3's scaling is computed here: a model of another rope type would be served plain rope, wrongly."""
    with pytest.raises(ValueError, match=f"unsupported rope type '{rope_type}'"):
        LlamaConfig.from_hf({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8,
                             "intermediate_size": 8, "rope_scaling": {key: rope_type, "factor": 2.0}})


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


def test_a_params_json_unlike_metas_defaults_reads_as_the_same_models_config_json(tiny_hf, tmp_path):
    """norm_eps, rope_theta and rope_scaling_factor equal Meta's defaults in META_PARAMS and the released 70B's
    params.json: a reader that ignored one, or looked it up under config.json's name, passed every test, and would
    serve a checkpoint that sets it (Llama 3.2 1B/3B's factor 32, Code Llama's theta 1e6) with another model's rope."""
    cfg = json.loads((tiny_hf[0] / "config.json").read_text())
    rope = {**cfg["rope_parameters"], "rope_theta": 1e6, "factor": 32.0}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6, "rope_parameters": rope}))
    hf = LlamaConfig.from_dir(tmp_path)
    meta = LlamaConfig.from_meta({**META_PARAMS, "norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling_factor": 32.0})
    assert meta == LlamaConfig(**{**hf.__dict__, "eos_token_ids": ()})


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
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path / "meta"))  # one of them left set from the demo, say: both named
    both = f"set only one of LLAMA_DIR \\('{tmp_path}/meta'\\) and HF_MODEL \\('{tmp_path}'\\)"
    with pytest.raises(ValueError, match=both):
        model_dir_from_env()
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path))
    monkeypatch.delenv("HF_MODEL")
    assert model_dir_from_env() == tmp_path
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="LLAMA_DIR"):
        model_dir_from_env()


def test_paths_under_home_are_found_as_a_shell_would(monkeypatch, tmp_path):
    """`LLAMA_DIR: ~/llama` in a runtime_env's env_vars, or `model: ~/llama` in the config, reaches Python unexpanded
    (no shell reads it): each must name the folder under $HOME, as the shell's `LLAMA_DIR=~/llama` does, not a
    folder named '~'; so must a hub cache named so."""
    from model.checkpoint import hub_cache

    (tmp_path / "llama").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HF_MODEL", raising=False)
    monkeypatch.setenv("LLAMA_DIR", "~/llama")
    assert model_dir_from_env() == find_checkpoint("~/llama") == tmp_path / "llama"
    assert hub_cache({"HF_HUB_CACHE": "~/hub"}) == hub_cache({"HF_HOME": "~"}) == str(tmp_path / "hub")


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


def _hf_variant(hf_dir, path, state=None, config=None):
    """A copy of the tiny HF model at `path`, its tensors (with `model.` names) and config.json changed by the
    callables given, with a tokenizer (so the tokenizer check does not come first)."""
    from safetensors.torch import load_file, save_file

    from model.verify import save_byte_tokenizer

    tensors = load_file(hf_dir / "model.safetensors")
    save_byte_tokenizer(path)
    save_file(state(tensors) if state else tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((hf_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config(cfg) if config else cfg))


def _sharded(hf_dir, path, change):
    from transformers import LlamaForCausalLM

    from model.verify import save_byte_tokenizer
    LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(path, max_shard_size="40KB")
    save_byte_tokenizer(path)
    change(path)


def _meta(hf_dir, path, num_shards=2, params=None, change=None):
    from safetensors.torch import load_file

    from model.verify import save_byte_tokenizer
    save_meta_checkpoint(load_file(hf_dir / "model.safetensors"), {**META_PARAMS, **(params or {})}, path, num_shards)
    save_byte_tokenizer(path)
    if change:
        change(path)


def _second_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[1]


def _copy_into_second_shard(folder):
    """The first shard's first tensor, zeroed, also in the second: the one loaded last was served."""
    from safetensors.torch import load_file, save_file

    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    name, tensor = sorted(load_file(first).items())[0]
    save_file({**load_file(second), name: torch.zeros_like(tensor)}, second, metadata={"format": "pt"})


def _tokenizer_json(folder):
    """The embedded SmolLM2's tokenizer files in `folder`: an HF tokenizer that loads."""
    import shutil

    from model.embedded import ensure_smollm2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_smollm2() / name, folder / name)


def _widen_in_second_shard(folder):
    """consolidated.01.pth's wq of another model's width: the check summed only the split dimension, and each replica
    failed in torch.cat naming no file."""
    shard = torch.load(folder / "consolidated.01.pth")
    shard["layers.0.attention.wq.weight"] = torch.zeros(32, 48)
    torch.save(shard, folder / "consolidated.01.pth")


def _add_to_second_shard(folder):
    """A tensor consolidated.00.pth lacks, in consolidated.01.pth: read by the first shard's names, it went unseen."""
    shard = torch.load(folder / "consolidated.01.pth")
    shard["layers.0.attention.bias"] = torch.zeros(16)
    torch.save(shard, folder / "consolidated.01.pth")


def _add_rope_table(folder):
    """Llama 2's consolidated.NN.pth hold its rope table, rope.freqs, in every shard beside the weights."""
    for shard in folder.glob("consolidated.*.pth"):
        torch.save({**torch.load(shard), "rope.freqs": torch.ones(8)}, shard)


def _add_bias(folder):
    """A bias beside wq in each shard: Meta's Llamas have none, and named like wq's weight it must not be read as it."""
    for shard in folder.glob("consolidated.*.pth"):
        torch.save({**torch.load(shard), "layers.0.attention.wq.bias": torch.zeros(32)}, shard)


def _drop_item(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


BROKEN_CHECKPOINTS = {  # name -> (make(hf_dir, path), the file the error names, what it says)
    "misshapen norm": (lambda h, p: _hf_variant(h, p, state=lambda s: {**s, "model.norm.weight": s[
        "model.norm.weight"][:1].clone()}), "model.safetensors", "'model.norm.weight' has shape [1], but"),
    "config contradicts weights": (lambda h, p: _hf_variant(h, p, config=lambda c: {**c, "num_key_value_heads": 4}),
                                   "model.safetensors", "'model.layers.0.self_attn.k_proj.weight' has shape [32, 64]"),
    "vocab in config past the weights": (lambda h, p: _hf_variant(h, p, config=lambda c: {**c, "vocab_size": 320}),
                                         "model.safetensors", "has shape [256, 64], but"),
    "extra tensor": (lambda h, p: _hf_variant(h, p, state=lambda s: {
        **s, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), "model.safetensors", "q_proj.bias' is no weight"),
    "renamed tensor": (lambda h, p: _hf_variant(h, p, state=lambda s: {
        k.replace("mlp.up_proj", "mlp.fc_in"): v for k, v in s.items()}), "model.safetensors", "mlp.fc_in"),
    "missing tensor": (lambda h, p: _hf_variant(h, p, state=lambda s: _drop_item(s, "model.layers.1.mlp.up_proj.weight")),
                       "", "lacks 1 tensors config.json needs, e.g. ['layers.1.mlp.up_proj.weight']"),
    # weights of the right shape but not floats: copy_ cast them into the model (int8 codes as values)
    "integer weights": (lambda h, p: _hf_variant(h, p, state=lambda s: {
        k: (v * 100).to(torch.int8) if "mlp" in k else v for k, v in s.items()}), "model.safetensors",
        "'model.layers.0.mlp.down_proj.weight' has dtype I8"),
    "fp8 weights": (lambda h, p: _hf_variant(h, p, state=lambda s: {
        k: v.to(torch.float8_e4m3fn) if "up_proj" in k else v for k, v in s.items()}), "model.safetensors",
        "'model.layers.0.mlp.up_proj.weight' has dtype F8_E4M3"),
    "index names an absent file": (lambda h, p: _sharded(h, p, lambda d: _second_shard(d).unlink()),
                                   "model.safetensors.index.json", "names 1 files not in"),
    "a tensor in two shards": (lambda h, p: _sharded(h, p, _copy_into_second_shard), "model-00002-of-",
                               "is also in"),
    "index not JSON": (lambda h, p: _sharded(h, p, lambda d: (d / "model.safetensors.index.json").write_text("{x")),
                       "model.safetensors.index.json", "not a safetensors index"),
    "index naming a file by a number": (lambda h, p: _sharded(h, p, lambda d: (d / "model.safetensors.index.json")
                                                               .write_text('{"weight_map": {"model.norm.weight": 1}}')),
                                         "model.safetensors.index.json", "file names are strings, not 1"),
    "a shard not safetensors": (lambda h, p: _sharded(h, p, lambda d: _second_shard(d).write_bytes(b"\x00" * 9)),
                                "model-00002-of-", "not a safetensors file"),
    "pytorch_model.bin only": (lambda h, p: _hf_variant(h, p) or (p / "model.safetensors").rename(
        p / "pytorch_model.bin"), "", "only safetensors are read, not pytorch_model.bin"),
    # llama.cpp's download: the GGUF file alone (its config and tokenizer inside it), or beside an HF config
    "a GGUF file alone": (lambda h, p: (p / "tiny.Q4_1.gguf").write_bytes(b"GGUF\x03\x00\x00\x00"), "",
                          "tiny.Q4_1.gguf is not read"),
    "GGUF beside a config": (lambda h, p: _hf_variant(h, p) or (p / "model.safetensors").rename(
        p / "tiny.Q4_1.gguf"), "", "only safetensors are read, not tiny.Q4_1.gguf"),
    "both formats": (lambda h, p: _hf_variant(h, p) or _meta(h, p), "", "holds both Meta weights"),
    "meta: last shard missing": (lambda h, p: _meta(h, p, change=lambda d: (d / "consolidated.01.pth").unlink()),
                                 "consolidated.00.pth", "weight' has shape [128, 64], but"),
    "meta: a shard between missing": (lambda h, p: _meta(h, p, 4, change=lambda d: (d / "consolidated.02.pth").unlink()),
                                      "", "'consolidated.01.pth', 'consolidated.03.pth'] (a shard missing?)"),
    "meta: params contradict weights": (lambda h, p: _meta(h, p, params={"n_kv_heads": 4}), "consolidated.00-01.pth",
                                        "'layers.0.attention.wk.weight' has shape [32, 64], but"),
    "meta: integer weights": (lambda h, p: _meta(h, p, change=lambda d: torch.save(
        {k: v.to(torch.int8) if k.endswith("wo.weight") else v
         for k, v in torch.load(d / "consolidated.01.pth").items()}, d / "consolidated.01.pth")), "consolidated.01.pth", "'layers.0.attention.wo.weight' has dtype int8"),
    "meta: shards of two models": (lambda h, p: _meta(h, p, change=_widen_in_second_shard), "consolidated.01.pth",
                                   "'layers.0.attention.wq.weight' has shape [32, 48] there"),
    "meta: a tensor in one shard only": (lambda h, p: _meta(h, p, change=_add_to_second_shard), "consolidated.01.pth",
                                         "hold different tensors, e.g. ['layers.0.attention.bias']"),
    "meta: a bias": (lambda h, p: _meta(h, p, change=_add_bias), "consolidated.00-01.pth",
                     "'layers.0.attention.wq.bias' is no weight"),
    "meta: shard not a checkpoint": (lambda h, p: _meta(h, p, change=lambda d: (d / "consolidated.01.pth")
                                                        .write_text("x")), "consolidated.01.pth", "not a PyTorch"),
    "meta: no params.json": (lambda h, p: _meta(h, p, change=lambda d: (d / "params.json").unlink()), "",
                             "holds Meta weights (consolidated.*.pth) but no params.json"),
    # config.json of another architecture, or of a Llama meshserve does not compute: served as a plain Llama before
    "another architecture": (lambda h, p: _hf_variant(h, p, config=lambda c: {**c, "model_type": "gemma"}),
                             "config.json", "model_type 'gemma'"),
    "another activation": (lambda h, p: _hf_variant(h, p, config=lambda c: {**c, "hidden_act": "gelu"}),
                           "config.json", "hidden_act 'gelu'"),
    "attention biases": (lambda h, p: _hf_variant(h, p, config=lambda c: {**c, "attention_bias": True}),
                         "config.json", "attention_bias"),
    "mlp biases": (lambda h, p: _hf_variant(h, p, config=lambda c: {**c, "mlp_bias": True}), "config.json",
                   "mlp_bias"),
    "a number written as a string": (lambda h, p: _hf_variant(h, p, config=lambda c: {
        **c, "rope_parameters": {**c["rope_parameters"], "rope_theta": "500000.0"}}), "config.json", "rope_theta"),
    "eps written as a string": (lambda h, p: _hf_variant(h, p, config=lambda c: {**c, "rms_norm_eps": "1e-5"}),
                                "config.json", "norm_eps"),
    "quantized": (lambda h, p: _hf_variant(h, p, config=lambda c: {
        **c, "quantization_config": {"quant_method": "fp8"}}), "config.json", "quantization_config"),
    # a tokenizer file there but unreadable: the check saw only that it existed, and every ingress replica failed
    "tokenizer.json not JSON": (lambda h, p: _hf_variant(h, p) or (p / "tokenizer.json").write_text("{x"),
                                "tokenizer.json", "not a tokenizer meshserve reads"),
    "generation_config.json not JSON": (lambda h, p: _hf_variant(h, p) or _tokenizer_json(p) or (
        p / "generation_config.json").write_text("{x"), "generation_config.json", "not JSON"),
    "tokenizer_config.json not JSON": (lambda h, p: _hf_variant(h, p) or _tokenizer_json(p) or (
        p / "tokenizer_config.json").write_text("{x"), "tokenizer_config.json", "not JSON"),
    "meta: tokenizer.model not tiktoken's": (lambda h, p: _meta(h, p, change=lambda d: (d / "tokenizer.model")
                                                                .write_bytes(b"\n\x0b\n\x05<unk>\x15")),
                                             "tokenizer.model", "not a tokenizer meshserve reads"),
    "meta: no tokenizer.model": (lambda h, p: _meta(h, p, change=lambda d: (d / "tokenizer.model").unlink()), "",
                                 "no tokenizer.json or tokenizer.model in"),
}


@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS)
def test_a_checkpoint_no_replica_could_load_fails_the_config_check(tiny_hf, tmp_path, case):
    """Each passed `make serve`'s check and the Serve build (only the config file was read), and then every mesh
    replica failed to start: with torch's copy_ error that named no file, a KeyError, a JSONDecodeError, or (a
    misshapen norm) none at all, the wrong weight broadcast into the model. Now the check names the file and the
    tensor, before Ray starts a replica."""
    import yaml

    from deployments.config import check_serve_config

    make, file, reason = BROKEN_CHECKPOINTS[case]
    model = tmp_path / "model"
    model.mkdir()
    make(tiny_hf[0], model)
    app = {"name": "m", "import_path": "deployments.app:build", "args": {"model": str(model)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (error,) = check_serve_config(str(path))
    assert error.startswith(f"{path}: application 'm', args.model: ") and f"{model / file}" in error, error
    assert reason in error, error


def test_a_misshapen_weight_fails_the_build_and_the_replica(tiny_hf, tmp_path):
    """A norm of shape [1] was broadcast into the model's [64] by copy_: the replica served a wrong model."""
    from deployments.app import build
    from deployments.config import AppConfig
    from model.torch_llama import TorchBackend

    BROKEN_CHECKPOINTS["misshapen norm"][0](tiny_hf[0], tmp_path)
    with pytest.raises(ValueError, match="model.safetensors: tensor 'model.norm.weight' has shape \\[1\\]"):
        build(AppConfig(model=str(tmp_path)))
    with pytest.raises(ValueError, match="model.safetensors: tensor 'model.norm.weight' has shape \\[1\\]"):
        TorchBackend(tmp_path, num_slots=1, block_size=16, num_blocks=2, max_seq_len=32, device="cpu")


def test_a_misshapen_meta_weight_fails_the_replica_too(tiny_hf, tmp_path):
    """A replica loads Meta shards through the same shape check as safetensors: without it, a norm of shape [1] in
    every shard was broadcast into the model's [64] by copy_, and the replica served a wrong model."""
    from model.torch_llama import TorchBackend

    def shrink_norm(folder):
        for shard in folder.glob("consolidated.*.pth"):
            torch.save({**torch.load(shard), "norm.weight": torch.ones(1)}, shard)

    _meta(tiny_hf[0], tmp_path, change=shrink_norm)
    with pytest.raises(ValueError, match=r"consolidated.00-01.pth: tensor 'norm.weight' has shape \[1\]"):
        TorchBackend(tmp_path, num_slots=1, block_size=16, num_blocks=2, max_seq_len=32, device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_in_both_layouts(tiny_hf, tmp_path, dtype):
    """Llama's releases are bfloat16, Meta's shards and HF's safetensors alike (some conversions float16), while the
    tiny test models are float32: a dtype check that refused either half type passed every other test."""
    hf_dir, state = tiny_hf
    half = {name: tensor.to(dtype) for name, tensor in state.items()}
    _hf_variant(hf_dir, tmp_path / "hf", state=lambda s: {name: tensor.to(dtype) for name, tensor in s.items()})
    save_meta_checkpoint({f"model.{k}": v for k, v in half.items()}, META_PARAMS, tmp_path / "meta", num_shards=2)
    for folder in (tmp_path / "hf", tmp_path / "meta"):
        loaded = dict(load_weights(folder, LlamaConfig.from_dir(folder)))
        assert loaded.keys() == half.keys()
        assert all(torch.equal(loaded[k], half[k]) for k in half), folder


def test_an_hf_folder_with_a_stray_params_json_serves_its_safetensors(tmp_path):
    """A params.json beside config.json and safetensors (no consolidated.*.pth) made the loader take the folder for
    Meta's and fail ('params.json but no consolidated.*.pth'); the weights there decide the format."""
    from model.torch_llama import TorchBackend
    from model.verify import save_tiny_hf_model

    hf = save_tiny_hf_model(tmp_path, META_EXPRESSIBLE_ROPE, seed=5)
    (tmp_path / "params.json").write_text(json.dumps({**META_PARAMS, "n_layers": 1}))
    backend = TorchBackend(tmp_path, num_slots=1, block_size=16, num_blocks=2, max_seq_len=32, device="cpu")
    with torch.no_grad():
        expected = hf(torch.tensor([[1, 2, 3, 4]])).logits[0]
    torch.testing.assert_close(backend.prompt_logits([1, 2, 3, 4], 0, [1]), expected, rtol=1e-4, atol=1e-5)


def test_the_demos_variables_are_read_from_the_environment_of_the_call(monkeypatch, tmp_path):
    """Not from whatever os.environ was when model.checkpoint was imported: imported while a test had swapped it for
    a dict naming a checkpoint, the module kept reading that dict (test_app_config failed after test_tt_galaxy)."""
    import importlib

    import model.checkpoint
    with monkeypatch.context() as swapped:
        swapped.setattr(os, "environ", {"HF_MODEL": str(tmp_path)})
        importlib.reload(model.checkpoint)
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    monkeypatch.delenv("HF_MODEL", raising=False)
    assert model.checkpoint.model_dir_from_env() is None
    with pytest.raises(ValueError, match="neither HF_MODEL nor LLAMA_DIR"):
        model.checkpoint.checkpoint_dir(None)


def test_a_hub_id_is_looked_up_in_the_cache_the_apps_env_vars_name(tiny_hf, tmp_path, monkeypatch):
    """Serve builds the app (and its replicas resolve the hub id) with the app's runtime_env.env_vars: with HF_HOME
    set there, the check looked in this shell's cache instead and refused a model every replica would find."""
    import yaml

    from deployments.config import check_serve_config

    for name in ("HF_MODEL", "LLAMA_DIR", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    repo = tmp_path / "hf_home" / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    _hf_variant(tiny_hf[0], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    app = {"name": "m", "import_path": "deployments.app:build", "args": {"model": ""},
           "runtime_env": {"env_vars": {"HF_HOME": str(tmp_path / "hf_home"), "HF_MODEL": "org/tiny"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert check_serve_config(str(path)) == []
    app["runtime_env"]["env_vars"]["HF_MODEL"] = "org/absent"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (error,) = check_serve_config(str(path))
    assert "HF_MODEL: 'org/absent' is neither a directory nor a Hugging Face model in the local cache" in error


def test_hf_hub_cache_is_looked_in_before_hf_home(tmp_path):
    """huggingface_hub takes $HF_HUB_CACHE over $HF_HOME/hub when an environment sets both: the other order looked
    for an app's hub id in a cache its replicas never read."""
    from model.checkpoint import hub_cache

    both = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    assert hub_cache(both) == str(tmp_path / "hub")
    assert hub_cache({"HF_HOME": str(tmp_path / "home")}) == str(tmp_path / "home" / "hub")


def test_a_config_json_without_optional_fields_reads_as_transformers_reads_it(tiny_hf, tmp_path):
    """A hand-written config.json may leave out what LlamaConfig defaults: transformers (and vLLM, through it) then
    normalise with eps 1e-6 and allow 2048 positions, while meshserve took 1e-5 and 8192, another model."""
    from transformers import AutoConfig

    cfg = json.loads((tiny_hf[0] / "config.json").read_text())
    for key in ("rms_norm_eps", "max_position_embeddings", "num_key_value_heads", "tie_word_embeddings", "rope_theta",
                "rope_parameters", "rope_scaling", "head_dim", "hidden_act"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours, theirs = LlamaConfig.from_dir(tmp_path), AutoConfig.from_pretrained(tmp_path)
    assert (ours.norm_eps, ours.max_position_embeddings, ours.n_kv_heads, ours.tie_word_embeddings, ours.head_dim) == (
        theirs.rms_norm_eps, theirs.max_position_embeddings, theirs.num_key_value_heads, theirs.tie_word_embeddings,
        theirs.head_dim)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_scaling is None


def test_a_rope_theta_both_in_rope_parameters_and_top_level_reads_as_transformers_reads_it(tiny_hf, tmp_path):
    """A config.json of transformers 5 (rope_parameters) that also keeps 4.x's top-level rope_theta, say converted by
    hand: transformers (and vLLM through it) take rope_parameters' value, so the rotary frequencies must be those."""
    from transformers import AutoConfig

    cfg = json.loads((tiny_hf[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))
    ours, theirs = LlamaConfig.from_dir(tmp_path), AutoConfig.from_pretrained(tmp_path)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == cfg["rope_parameters"]["rope_theta"] != 10000.0


def _logits_of_both(path, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend's and transformers' logits of `tokens` for the HF folder at `path`."""
    from transformers import LlamaForCausalLM

    from model.torch_llama import TorchBackend

    backend = TorchBackend(path, num_slots=1, block_size=16, num_blocks=2, max_seq_len=32, device="cpu")
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(path).eval()(torch.tensor([tokens])).logits[0]
    return backend.prompt_logits(tokens, 0, [1]), expected


def test_a_head_dim_other_than_the_width_over_the_heads_is_computed_as_transformers_does(tmp_path):
    """config.json's head_dim need not be hidden_size / num_attention_heads (transformers takes it as given): read
    as that quotient, q, k, v and o would have other shapes than the checkpoint's."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    torch.manual_seed(6)
    LlamaForCausalLM(HFLlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   initializer_range=0.1)).save_pretrained(tmp_path)
    assert LlamaConfig.from_dir(tmp_path).head_dim == 32
    ours, theirs = _logits_of_both(tmp_path, [1, 2, 3, 4])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_tied_checkpoint_that_stores_its_lm_head_too_loads(tiny_hf, tmp_path):
    """Some tied checkpoints store the lm_head copy anyway: it is no stray tensor (transformers ties it and loads)."""
    from model.weights import check_weights

    _hf_variant(tiny_hf[0], tmp_path, state=lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"].clone()},
                config=lambda c: {**c, "tie_word_embeddings": True})
    check_weights(tmp_path, LlamaConfig.from_dir(tmp_path))
    ours, theirs = _logits_of_both(tmp_path, [1, 2, 3, 4])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_tied_checkpoint_without_an_lm_head_serves_its_embedding_as_the_head(tiny_hf, tmp_path):
    """The usual tied checkpoint (SmolLM2's) stores no lm_head: read as untied, it lacks a tensor; needing one anyway,
    the check refuses it. Only the embedded SmolLM2's greedy test, which fetches the model, held either before."""
    _hf_variant(tiny_hf[0], tmp_path, state=lambda s: _drop_item(s, "lm_head.weight"),
                config=lambda c: {**c, "tie_word_embeddings": True})
    ours, theirs = _logits_of_both(tmp_path, [1, 2, 3, 4])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_an_older_checkpoints_saved_rope_tables_are_skipped(tiny_hf, tmp_path):
    """Older transformers saved each layer's rotary_emb.inv_freq buffer with the weights (TinyLlama's checkpoints
    hold them): no weight, and computed from config.json here, so neither refused nor loaded."""
    from model.weights import check_weights

    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}
    _hf_variant(tiny_hf[0], tmp_path, state=lambda s: {**s, **inv_freq})
    cfg = LlamaConfig.from_dir(tmp_path)
    check_weights(tmp_path, cfg)
    assert dict(load_weights(tmp_path, cfg)).keys() == tiny_hf[1].keys()


def test_metas_saved_rope_table_is_neither_refused_nor_loaded(tiny_hf, tmp_path):
    """rope.freqs is no weight (computed from params.json here): refused, a Llama 2 style folder would fail the
    check; loaded, it would be yielded under no weight's name."""
    from model.weights import check_weights

    _meta(tiny_hf[0], tmp_path, change=_add_rope_table)
    cfg = LlamaConfig.from_dir(tmp_path)
    check_weights(tmp_path, cfg)
    assert dict(load_weights(tmp_path, cfg)).keys() == tiny_hf[1].keys()


def test_a_meta_tensor_larger_than_params_json_says_is_not_blamed_on_a_missing_shard(tiny_hf, tmp_path):
    """A missing shard only makes a split tensor smaller: for a larger one the hint sent people looking for a file."""
    from model.weights import check_weights

    _meta(tiny_hf[0], tmp_path, params={"n_kv_heads": 1})  # the weights have 2 KV heads
    with pytest.raises(ValueError, match=r"'layers.0.attention.wk.weight' has shape \[32, 64\], but .*params.json "
                                         r"needs \[16, 64\]$"):
        check_weights(tmp_path, LlamaConfig.from_dir(tmp_path))


def test_query_heads_that_do_not_group_over_the_kv_heads_are_named_in_the_files_spelling(tiny_hf, tmp_path):
    """Grouped-query attention shares each KV head among n_heads / n_kv_heads query heads: a config.json whose
    num_key_value_heads does not divide num_attention_heads was refused naming n_heads and n_kv_heads, names that
    file does not have."""
    cfg = json.loads((tiny_hf[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": cfg["num_attention_heads"] + 1}))
    with pytest.raises(ValueError, match=r"config.json: .*\(num_attention_heads\).*\(num_key_value_heads\)"):
        LlamaConfig.from_dir(tmp_path)


@pytest.mark.parametrize("field, value, named", [
    ("num_hidden_layers", True, "n_layers (num_hidden_layers) is True"),  # Python's 1: a model of one layer
    ("rms_norm_eps", True, "norm_eps (rms_norm_eps) is True"),
    ("intermediate_size", 0, "ffn_dim (intermediate_size) is 0"),
    ("vocab_size", -1, "vocab_size is -1"),
])
def test_a_size_given_as_a_boolean_or_not_positive_is_named_in_the_files_spelling(tiny_hf, tmp_path, field, value,
                                                                                  named):
    """A bool is an int to Python, and a size of 0 or less is no model: taken, either built a model that failed
    later, on weights it had too many of or of another shape, or in a division by zero, naming no field."""
    cfg = json.loads((tiny_hf[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=rf"config.json: not a Llama config meshserve reads: {re.escape(named)}, not a"):
        LlamaConfig.from_dir(tmp_path)


@pytest.mark.parametrize("file, change, named", [
    # transformers refuses each of these types (a strict dataclass field): here "false" tied the embeddings, serving
    # the input embedding as lm_head, and "2" failed every request's stop-token set in the replica
    ("config.json", {"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', not true or false"),
    ("config.json", {"eos_token_id": "2"}, "eos_token_id is '2', not a token id"),
    ("config.json", {"eos_token_id": [1, 2.0]}, "eos_token_id is [1, 2.0], not a token id"),
    ("config.json", {"eos_token_id": True}, "eos_token_id is True, not a token id"),
    ("config.json", {"head_dim": "16"}, "head_dim is '16', not a positive integer"),
    ("config.json", {"head_dim": -16}, "head_dim is -16, not a positive integer"),
    ("config.json", {"rope_parameters": [1]}, "rope_parameters is [1], not an object"),
    # null is no Llama's type: only a config.json without the field is taken for one
    ("config.json", {"model_type": None}, "model_type None: meshserve computes Llama models only"),
    # params.json's fields the FFN width is computed from: an error inside the arithmetic, or a wrong width
    ("params.json", {"multiple_of": "256"}, "multiple_of is '256', not a positive integer"),
    ("params.json", {"multiple_of": -64}, "multiple_of is -64, not a positive integer"),
    ("params.json", {"multiple_of": 0}, "multiple_of is 0, not a positive integer"),
    ("params.json", {"ffn_dim_multiplier": "1.3"}, "ffn_dim_multiplier is '1.3', not a positive number"),
    ("params.json", {"dim": "64"}, "dim (hidden_size) is '64', not a positive integer"),
    # bool("false") is True: Llama 3.1's rope scaling turned on for a model trained without it
    ("params.json", {"use_scaled_rope": "false"}, "use_scaled_rope is 'false', not true or false"),
])
def test_a_field_of_the_wrong_type_is_named_not_misread(tiny_hf, tmp_path, file, change, named):
    """Each was taken with a wrong value, or failed with an error that named no field."""
    cfg = META_PARAMS if file == "params.json" else json.loads((tiny_hf[0] / "config.json").read_text())
    (tmp_path / file).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=f"{file}: not a Llama config meshserve reads: {re.escape(named)}"):
        LlamaConfig.from_dir(tmp_path)


def test_fields_written_as_null_take_their_defaults_not_a_type_error(tiny_hf, tmp_path):
    """The type checks refuse a wrong value, not a null: transformers 4.x writes `"rope_scaling": null` for a model
    without scaling (Llama 2, TinyLlama), a config may give `"eos_token_id": null`, and a params.json written from
    Meta's ModelArgs `"ffn_dim_multiplier": null`."""
    cfg = json.loads((tiny_hf[0] / "config.json").read_text())
    cfg = {**cfg, "rope_parameters": None, "rope_scaling": None, "rope_theta": 10000.0, "eos_token_id": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = LlamaConfig.from_dir(tmp_path)
    assert (hf.rope_scaling, hf.rope_theta, hf.eos_token_ids) == (None, 10000.0, ())
    (tmp_path / "config.json").unlink()
    (tmp_path / "params.json").write_text(json.dumps({**META_PARAMS, "ffn_dim_multiplier": None,
                                                      "use_scaled_rope": None}))
    meta = LlamaConfig.from_dir(tmp_path)
    assert meta.ffn_dim == meta_ffn_dim(META_PARAMS["dim"], META_PARAMS.get("multiple_of", 256), None)
    assert meta.rope_scaling is None


@pytest.mark.parametrize("file", ["config.json", "params.json"])
def test_a_config_file_that_is_no_json_object_is_said_to_be_so(tmp_path, file):
    """A list there failed with "'list' object has no attribute 'get'", naming no field nor what was wrong."""
    (tmp_path / file).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{file}: not a Llama config meshserve reads: a JSON object of the model's "
                                         "fields is needed, not list \[1, 2\]"):
        LlamaConfig.from_dir(tmp_path)


@pytest.mark.parametrize("params, field", [(LLAMA_31_8B, "dim (hidden_size) is 4096"),
                                           ({**LLAMA_33_70B, "vocab_size": 32000}, "vocab_size is 32000")])
def test_a_galaxy_deploy_of_another_models_checkpoint_fails_the_check(tmp_path, params, field):
    """tt-metal's Galaxy model is Llama 3 70B's, fixed in its code (80 layers, 8192 wide, 64 heads, 8 KV heads, Llama
    3's vocabulary): a tt_galaxy config naming an 8B folder (or its tokenizer beside other weights) passed the check
    and the build, which read only the tokenizer, to fail in every mesh replica, after its mesh opened, in tt-metal."""
    import yaml

    from deployments.app import build
    from deployments.config import AppConfig, check_serve_config
    from model.verify import save_byte_tokenizer

    model = tmp_path / "model"
    save_byte_tokenizer(model)
    (model / "params.json").write_text(json.dumps(params))
    args = {"model": str(model), "backend": "tt_galaxy", "mesh_resources": {"galaxy": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "m", "import_path": "deployments.app:build",
                                                      "args": args}]}))
    (error,) = check_serve_config(str(path))
    assert error.startswith(f"{path}: application 'm', args.model: ") and field in error and "70B" in error, error
    with pytest.raises(ValueError, match="70B"):
        build(AppConfig(**args))
    (model / "params.json").write_text(json.dumps(LLAMA_33_70B))
    assert check_serve_config(str(path)) == []
    (model / "params.json").unlink()  # the tokenizer alone, for the ingress replicas of a head without the weights
    assert check_serve_config(str(path)) == []


def _check(tmp_path, args, env_vars=None):
    """check_serve_config of one meshserve application with these args (and runtime_env.env_vars): errors, notes."""
    import yaml

    from deployments.config import check_serve_config

    app = {"name": "m", "import_path": "deployments.app:build", "args": args}
    if env_vars:
        app["runtime_env"] = {"env_vars": env_vars}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    notes = []
    return check_serve_config(str(path), notes), notes


@pytest.mark.parametrize("variable", ["HF_MODEL", "LLAMA_DIR"])
def test_a_broken_folder_the_demos_variable_names_is_refused_naming_the_variable(tiny_hf, tmp_path, monkeypatch,
                                                                                 variable):
    """`model:` empty and HF_MODEL naming a folder without weights: the check said `args.model: no model.safetensors
    ...`, a key the user had left empty, not the variable that named the folder."""
    for name in ("HF_MODEL", "LLAMA_DIR"):
        monkeypatch.delenv(name, raising=False)
    model = tmp_path / "model"
    model.mkdir()
    _hf_variant(tiny_hf[0], model)
    (model / "model.safetensors").unlink()
    (error,), _ = _check(tmp_path, {"model": ""}, {variable: str(model)})
    assert f"application 'm', {variable}: no model.safetensors or model.safetensors.index.json in {model}" in error, (
        error)


def test_a_relative_model_path_is_noted_and_its_error_says_where_it_was_looked_for(tiny_hf, tmp_path, monkeypatch):
    """Serve's build and each replica resolve a relative `model` (or HF_MODEL / LLAMA_DIR) in the working directory
    of Ray on their node (where `ray start` ran), not the shell's that checked the config: the check passed
    `model: ./model` without a word, and the build then failed saying only that './model' was no directory."""
    from model.checkpoint import checkpoint_dir

    for name in ("HF_MODEL", "LLAMA_DIR"):
        monkeypatch.delenv(name, raising=False)
    _hf_variant(tiny_hf[0], tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    errors, notes = _check(tmp_path, {"model": "./model"})
    assert errors == [] and any("'./model' is a relative path" in n and str(tmp_path) in n for n in notes), notes
    errors, notes = _check(tmp_path, {"model": ""}, {"HF_MODEL": "model"})
    assert errors == [] and any("HF_MODEL 'model' is a relative path" in n for n in notes), notes
    errors, notes = _check(tmp_path, {"model": str(tmp_path / "model")})
    assert errors == [] and notes == []
    repo = tmp_path / "hub" / "models--org--tiny"  # a cached hub id is no relative path
    (repo / "snapshots").mkdir(parents=True)
    _hf_variant(tiny_hf[0], repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    errors, notes = _check(tmp_path, {"model": "org/tiny"}, {"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert errors == [] and notes == []
    elsewhere = tmp_path / "ray"  # a Ray started in another directory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match=f"model: './model' is neither .* looked for in {elsewhere}"):
        checkpoint_dir("./model")
    with pytest.raises(ValueError, match=f"LLAMA_DIR: './model' is not a directory .*looked for in {elsewhere}"):
        checkpoint_dir(None, env={"LLAMA_DIR": "./model"})
    with pytest.raises(ValueError, match=r"'org/absent' is neither .* `hf download`\)$"):  # a hub id's form: no path
        checkpoint_dir("org/absent")


def test_the_demos_variables_set_beside_a_model_are_noted_as_not_used(tiny_hf, tmp_path, monkeypatch):
    """`HF_MODEL=/my/model make serve` with the shipped config (`model: smollm2`, or no `model` key) served SmolLM2
    without a word: the variables are read only when `model` is empty."""
    _hf_variant(tiny_hf[0], tmp_path / "model")
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    monkeypatch.setenv("HF_MODEL", str(tmp_path / "model"))
    for args in ({"model": "smollm2"}, {}):
        errors, notes = _check(tmp_path, args)
        assert errors == [] and any(f"HF_MODEL ('{tmp_path / 'model'}') is not used" in n for n in notes), notes
    errors, notes = _check(tmp_path, {"model": ""})
    assert errors == [] and not any("not used" in n for n in notes), notes
