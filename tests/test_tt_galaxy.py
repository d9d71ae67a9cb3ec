"""The TT Galaxy backend against a double of ttnn and of tt-metal's Galaxy generator (tests/tt_double)."""
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.tt_galaxy import TTGalaxyBackend, TTMeshConfig
from scheduler.sampling import SamplingParams

DOUBLE = Path(__file__).parent / "tt_double"
GREEDY = SamplingParams(temperature=0.0)
VOCAB = 128256
GENERATOR_VLLM = "models.demos.llama3_70b_galaxy.tt.generator_vllm"
# tt-inference-server workflows/model_specs/prod/llm.yaml @cb954e42, Llama-3.3-70B on GALAXY
SPEC_OVERRIDE_TT_CONFIG = {"dispatch_core_axis": "col", "sample_on_device_mode": "all",
                           "fabric_config": "FABRIC_1D_RING", "worker_l1_size": 1344544,
                           "trace_region_size": 215000000}
BUCKETS = [128, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


def _forget_double():
    for name in list(sys.modules):
        if name in ("ttnn", "models") or name.startswith(("ttnn.", "models.")):
            del sys.modules[name]


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    """An HF model folder, a private environment, and the double importable as ttnn + tt-metal."""
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("HF_MODEL", "LLAMA_DIR", "LINE_RS", "LINE_AG", "TT_CACHE_PATH")})
    monkeypatch.syspath_prepend(str(DOUBLE))
    _forget_double()
    yield tmp_path
    _forget_double()


@pytest.fixture
def vllm_installed(monkeypatch):
    """A stand-in for vLLM, which generator_vllm imports (vllm.envs) at its top: with it, the checkout's
    LlamaForCausalLM and its KV allocator build the model. meshserve's environment has no vLLM."""
    vllm, envs = types.ModuleType("vllm"), types.ModuleType("vllm.envs")
    envs.VLLM_USE_V1 = True
    vllm.envs = envs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.envs", envs)


@pytest.fixture
def ttnn(hf_dir):
    import ttnn
    ttnn.reset()
    yield ttnn
    assert ttnn.errors == []


@pytest.fixture
def backend(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir)
    yield b
    b.close()


def gen_calls(backend, name):
    return [kwargs for n, kwargs in backend.generator.calls if n == name]


def last_call(backend, name):
    return gen_calls(backend, name)[-1]


def decode_inputs(active_slots, positions):
    active = torch.zeros(32, dtype=torch.bool)
    active[active_slots] = True
    pos = torch.zeros(32, dtype=torch.long)
    pos[active_slots] = torch.tensor(positions)
    return torch.arange(32, dtype=torch.long) * 10, pos, active


def empty_table(backend):
    return torch.zeros(32, backend.caps.max_blocks_per_seq, dtype=torch.int32)


def expected_next(tokens):
    """The double's model: the sum of the token ids its KV cache holds for the sequence, mod the vocabulary."""
    return sum(tokens) % VOCAB


# --- opening, building, closing ----------------------------------------------------------------------

def test_config_defaults_are_the_tt_inference_server_spec():
    config = TTMeshConfig()
    assert {k: getattr(config, k) for k in SPEC_OVERRIDE_TT_CONFIG} == SPEC_OVERRIDE_TT_CONFIG
    assert config.enable_model_warmup and not hasattr(config, "mesh_shape")


def test_mesh_shape_is_one_knob_not_a_tt_config_key():
    from deployments.config import AppConfig
    with pytest.raises(TypeError):
        TTMeshConfig(mesh_shape=(8, 4))
    with pytest.raises(ValidationError, match="mesh_shape"):
        AppConfig(override_tt_config={"mesh_shape": [8, 4]})


def test_mesh_opens_with_fabric_first_and_the_spec_settings(backend, ttnn):
    names = [name for name, _ in ttnn.calls]
    assert names.index("set_fabric_config") < names.index("open_mesh_device")
    assert ttnn.calls[names.index("set_fabric_config")][1]["fabric_config"] == ttnn.FabricConfig.FABRIC_1D_RING
    opened = ttnn.calls[names.index("open_mesh_device")][1]
    assert opened["mesh_shape"] == (8, 4)
    assert opened["dispatch_core_config"].axis == ttnn.DispatchCoreAxis.COL
    assert (opened["trace_region_size"], opened["worker_l1_size"]) == (215000000, 1344544)


def test_mesh_settings_come_from_the_config(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, mesh_shape=[8, 4], tt_config={"dispatch_core_axis": "row", "enable_model_warmup": False,
                                                            "fabric_config": "DISABLED", "trace_region_size": 7})
    opened = dict(ttnn.calls)["open_mesh_device"]
    assert opened["mesh_shape"] == (8, 4) and opened["trace_region_size"] == 7
    assert opened["dispatch_core_config"].axis == ttnn.DispatchCoreAxis.ROW
    assert "set_fabric_config" not in dict(ttnn.calls)
    b.close()
    assert "set_fabric_config" not in dict(ttnn.calls)


def test_model_is_built_as_generator_vllm_builds_it(vllm_installed, ttnn, hf_dir):
    from models.demos.llama3_70b_galaxy.tt.generator_vllm import LlamaForCausalLM
    backend = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    assert isinstance(backend.generator, LlamaForCausalLM)
    args = backend.generator.model_args
    assert (args.max_batch_size, args.max_seq_len, args.instruct, args.optimizations.bfp4_mlp) == \
        (32, 131072, True, True)
    built = backend.generator.model.built_with
    assert built["use_paged_kv_cache"] and built["mode"] == "prefill" and built["dtype"] == ttnn.bfloat8_b
    assert built["enable_prefetcher_performance_mode"] and built["paged_attention_config"] is None
    backend.close()


def test_the_hugging_face_model_is_not_kept_in_host_memory(backend):
    """TtModelArgs(cache_hf=True), model_config.py @019d812b's default, keeps the whole 70B reference model."""
    assert backend.generator.model_args.cached_hf_model is None


def test_model_args_without_cache_hf_still_build(ttnn, hf_dir, monkeypatch):
    from models.demos.llama3_70b_galaxy.tt import model_config
    plain = model_config.TtModelArgs.__init__
    monkeypatch.setattr(model_config.TtModelArgs, "__init__",
                        lambda self, mesh_device, instruct=False, dummy_weights=False, max_batch_size=1,
                        max_seq_len=1024 * 128, optimizations=None:
                        plain(self, mesh_device, instruct, dummy_weights, max_batch_size, max_seq_len, optimizations))
    b = TTGalaxyBackend(hf_dir, max_seq_len=4096)
    assert b.generator.model_args.max_seq_len == 4096
    b.close()


def test_caps_declare_a_kv_group_per_mesh_column_of_2056_blocks(backend):
    caps = backend.caps
    assert (caps.num_slots, caps.kv_groups, caps.slots_per_group, caps.num_blocks) == (32, 4, 8, 2056)
    assert (caps.block_size, caps.max_seq_len, caps.prefix_align, caps.vocab_size) == (64, 131072, 128, 128256)
    assert set(caps.eos_token_ids) == {128_001, 128_008, 128_009}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def test_what_the_device_cannot_sample_exactly_goes_to_the_host(backend):
    """tt-metal's sampler keeps the top 32 and applies no penalties, logprobs or min_tokens masks; a seeded draw
    stays on the host, keyed on (seed, position), so that a recompute draws the same tokens."""
    assert backend.can_sample(SamplingParams(temperature=0.7, top_k=32, top_p=0.9))
    assert not backend.can_sample(SamplingParams(temperature=0.7, top_k=32, top_p=0.9, seed=1))
    assert not backend.can_sample(SamplingParams(temperature=0.7, top_k=33))
    assert not backend.can_sample(SamplingParams(presence_penalty=0.5))
    assert not backend.can_sample(SamplingParams(logprobs=1))


def test_a_greedy_request_samples_on_the_device_whatever_seed_top_k_or_top_p_it_carries(backend):
    """argmax ignores them (vLLM resets top_p, top_k and min_p for temperature 0): "temperature": 0 with a seed,
    as clients send for reproducibility, must not have the host sample it from every row's 128k logits."""
    greedy = SamplingParams(temperature=0.0, seed=42, top_k=50, top_p=0.5, min_p=0.2)
    assert greedy == SamplingParams(temperature=0.0) and backend.can_sample(greedy)


def test_with_vllm_the_kv_cache_comes_from_the_checkouts_allocator(vllm_installed, ttnn, hf_dir):
    backend = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    assert backend.kv_cache_api == "checkout"
    [asked] = [kw for name, kw in ttnn.calls if name == "allocate_vllm_kv_cache"]
    assert asked == {"kv_cache_shape": (2057, 1, 64, 128), "dtype": torch.bfloat16, "num_layers": 80}
    allocs = [kw for name, kw in ttnn.calls if name == "as_tensor"]
    assert len(allocs) == 80 * 2 and len(backend.kv_cache) == 1 and len(backend.kv_cache[0]) == 80
    assert {kw["shape"] for kw in allocs} == {(2057, 1, 64, 128)}  # 2056 per group + device block 0
    assert {(kw["dtype"], kw["layout"], kw["memory_config"]) for kw in allocs} == \
        {(ttnn.bfloat8_b, ttnn.TILE_LAYOUT, ttnn.DRAM_MEMORY_CONFIG)}
    assert all(isinstance(kw["mesh_mapper"], ttnn.ReplicateTensorToMesh) for kw in allocs)
    backend.close()


def test_without_vllm_the_backend_allocates_the_same_cache(ttnn, hf_dir):
    """generator_vllm imports vllm.envs at its top (@0be6ffc8): without vLLM, as here and on a meshserve host,
    the plain Generator serves and the backend allocates the cache."""
    b = TTGalaxyBackend(hf_dir)
    from models.demos.llama3_70b_galaxy.tt.generator import Generator
    assert type(b.generator) is Generator and b.kv_cache_api == "backend"
    assert "allocate_vllm_kv_cache" not in dict(ttnn.calls)
    allocs = [kw for name, kw in ttnn.calls if name == "as_tensor"]
    assert len(allocs) == 160 and {kw["shape"] for kw in allocs} == {(2057, 1, 64, 128)}
    assert {(kw["dtype"], kw["layout"], kw["memory_config"]) for kw in allocs} == \
        {(ttnn.bfloat8_b, ttnn.TILE_LAYOUT, ttnn.DRAM_MEMORY_CONFIG)}
    assert {kw["cache_file_name"].name for kw in allocs} == \
        {f"empty_{kv}cache_paged_attention(2057, 1, 64, 128)" for kv in "kv"}
    token = b.prefill(list(range(10)), 0, [0], slot=0, sampling=GREEDY)  # and it serves
    assert int(token) == expected_next(range(10))
    b.close()


def test_tt_metals_weight_cache_goes_under_meshserves_cache_not_into_the_weights(ttnn, hf_dir, tmp_path_factory):
    """Unset, tt-metal puts its converted weights (tens of GB) at os.path.join("model_cache", HF_MODEL, "TG"), for
    an absolute HF_MODEL inside the weights folder. Each weights folder gets its own (the cache is read back
    unchecked); a TT_CACHE_PATH that is set is left as it is."""
    cache = tmp_path_factory.mktemp("meshserve_cache")
    os.environ["MESHSERVE_CACHE"] = str(cache)

    def cache_dir(weights) -> Path:
        os.environ.pop("TT_CACHE_PATH", None)
        b = TTGalaxyBackend(weights)
        written = {kw["cache_file_name"].parent for name, kw in ttnn.calls if name == "as_tensor"}
        written.add(b.generator.model.built_with["weight_cache_path"].parent)
        b.close()
        ttnn.calls.clear()
        (path,) = written
        assert path.name == "TG" and path.parent == Path(os.environ["TT_CACHE_PATH"])
        return path.parent

    first = cache_dir(hf_dir)
    assert first.parent == cache / "tt_cache" and first.name.startswith(hf_dir.name + "-")
    twin = tmp_path_factory.mktemp("other") / hf_dir.name  # another checkpoint, the same folder name
    twin.mkdir()
    (twin / "config.json").write_text("{}")
    assert cache_dir(twin) != first and cache_dir(hf_dir) == first
    snapshot = tmp_path_factory.mktemp("hub") / "models--meta-llama--Llama-3.3-70B-Instruct" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert cache_dir(snapshot) == cache / "tt_cache" / f"models--meta-llama--Llama-3.3-70B-Instruct-{'ab' * 6}"
    os.environ["TT_CACHE_PATH"] = "/fast/ttnn_cache"
    b = TTGalaxyBackend(hf_dir)
    assert b.generator.model_args.model_cache_path == Path("/fast/ttnn_cache/TG")
    b.close()


def test_num_layers_and_sizes_are_configurable(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, num_layers=2, num_blocks=100, max_seq_len=4096)
    assert len(b.kv_cache[0]) == 2 and b.kv_cache[0][0][0].shape == (101, 1, 64, 128)
    assert (b.caps.num_blocks, b.caps.max_seq_len, b.generator.model_args.max_seq_len) == (100, 4096, 4096)
    b.close()


def test_step_deadlines_assume_the_published_times_once_warmed_up(ttnn, hf_dir):
    """A hung Galaxy is seen in a minute or two, not after the slow defaults' 6-20 minutes; without warm-up
    the first requests compile, and the slow defaults hold."""
    from model.simulated import GalaxyTiming
    timing = GalaxyTiming.published()
    warmed = TTGalaxyBackend(hf_dir, max_seq_len=4096)
    # one user at 4096, the others holding the rest of four columns of 72 blocks (4096 + 8 x 64 tokens each)
    assert warmed.caps.decode_step_s == pytest.approx(timing.decode_step_seconds(4096, 4 * 72 * 64 - 4096))
    assert warmed.caps.decode_step_s < 0.1
    assert warmed.caps.prefill_token_s == pytest.approx(timing.ttft(4096) / 4096)
    warmed.close()
    cold = TTGalaxyBackend(hf_dir, max_seq_len=4096, tt_config={"enable_model_warmup": False})
    assert (cold.caps.decode_step_s, cold.caps.prefill_token_s) == (1.0, 0.01)
    cold.close()


@pytest.mark.parametrize("num_blocks, max_seq_len", [(1024, 32_768), (18, 1024)])  # 19 x 64 holds 1,024 + 128
def test_fewer_blocks_serve_the_longest_context_they_hold(ttnn, hf_dir, num_blocks, max_seq_len):
    b = TTGalaxyBackend(hf_dir, num_blocks=num_blocks, tt_config={"enable_model_warmup": False})
    assert (b.caps.max_seq_len, b.caps.num_blocks) == (max_seq_len, num_blocks)
    b.close()


def test_default_blocks_follow_max_seq_len_per_group(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, max_seq_len=4096, tt_config={"enable_model_warmup": False})
    assert b.caps.num_blocks == (4096 + 64 * 8) // 64  # one such user plus a block per slot of the column
    b.close()


def test_close_releases_model_then_kv_cache_then_submeshes_mesh_fabric(backend, ttnn):
    mesh = backend.mesh
    [submesh] = mesh.create_submeshes(ttnn.MeshShape(8, 4))
    kv = [t for layer in backend.kv_cache[0] for t in layer]
    backend.close()
    names = [name for name, _ in ttnn.calls]
    model_done = names.index("tt_ccl.close")
    assert "release_trace" in names and max(i for i, n in enumerate(names) if n == "release_trace") < model_done
    freed = [i for i, n in enumerate(names) if n == "deallocate"]
    assert len(freed) == 160 and model_done < min(freed) and not any(t.is_allocated for t in kv)
    closed = [(i, kw["mesh_device"]) for i, (n, kw) in enumerate(ttnn.calls) if n == "close_mesh_device"]
    assert [m for _, m in closed] == [submesh, mesh]
    assert max(freed) < closed[0][0] < closed[1][0] < len(names) - 1
    assert ttnn.calls[-1] == ("set_fabric_config", {"fabric_config": ttnn.FabricConfig.DISABLED,
                                                    "reliability_mode": None})
    backend.close()  # a second close does nothing (the double refuses closing a mesh twice)


def test_a_failed_build_closes_the_mesh(ttnn, hf_dir, monkeypatch):
    from models.demos.llama3_70b_galaxy.tt import model_config
    monkeypatch.setattr(model_config.TtModelArgs, "load_state_dict", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        TTGalaxyBackend(hf_dir)
    assert [name for name, _ in ttnn.calls][-2:] == ["close_mesh_device", "set_fabric_config"]


def test_a_failed_warmup_releases_everything(ttnn, hf_dir, monkeypatch):
    from models.demos.llama3_70b_galaxy.tt.generator import Generator
    monkeypatch.setattr(Generator, "decode_forward", lambda self, *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        TTGalaxyBackend(hf_dir)
    names = [name for name, _ in ttnn.calls]
    assert names.index("tt_ccl.close") < names.index("deallocate")
    assert names[-2:] == ["close_mesh_device", "set_fabric_config"]


def test_weights_folder_is_exported_where_tt_metal_reads_it(ttnn, hf_dir, tmp_path_factory, monkeypatch):
    TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False}).close()
    assert os.environ["HF_MODEL"] == str(hf_dir) and "LLAMA_DIR" not in os.environ
    from models.demos.llama3_70b_galaxy.tt import model_config
    monkeypatch.setattr(model_config, "READS_LLAMA_DIR", True)  # a checkout from before tt-metal issue #42139
    meta = tmp_path_factory.mktemp("meta")
    (meta / "params.json").write_text("{}")
    TTGalaxyBackend(meta, tt_config={"enable_model_warmup": False}).close()  # tt-metal refuses both variables
    assert os.environ["LLAMA_DIR"] == str(meta) and "HF_MODEL" not in os.environ


def test_a_meta_folder_on_a_checkout_that_reads_hugging_face_only_is_refused_by_name(ttnn, tmp_path_factory):
    """model_config.py @019d812b asserts HF_MODEL ("Please set HF_MODEL to a HuggingFace model name"): for a
    deployment whose `model` is a Meta folder that message names neither the folder nor the cause."""
    meta = tmp_path_factory.mktemp("meta")
    (meta / "params.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{meta}.*Meta.*Hugging Face weights only"):
        TTGalaxyBackend(meta)
    assert [name for name, _ in ttnn.calls][-2:] == ["close_mesh_device", "set_fabric_config"]


def test_an_hf_folder_with_a_params_json_is_exported_as_hf_model(ttnn, hf_dir, tmp_path):
    """A params.json beside config.json and the safetensors (Mistral's HF repos ship both; a copied original/
    params.json too) exported the folder as LLAMA_DIR, where tt-metal looks for Meta's consolidated.*.pth. The
    weights decide, as for the torch backend (model.checkpoint.checkpoint_format)."""
    folder = tmp_path / "hf"
    folder.mkdir()
    for name, text in (("config.json", "{}"), ("model.safetensors", ""), ("params.json", "{}")):
        (folder / name).write_text(text)  # tt-metal's double reads none of them
    TTGalaxyBackend(folder, tt_config={"enable_model_warmup": False}).close()
    assert os.environ["HF_MODEL"] == str(folder) and "LLAMA_DIR" not in os.environ


def test_no_weights_is_a_clear_error(ttnn):
    with pytest.raises(ValueError, match="HF_MODEL"):
        TTGalaxyBackend()


def test_line_rs_and_line_ag_reach_tt_metal_ccl(ttnn, hf_dir):
    TTGalaxyBackend(hf_dir, tt_config={"line_rs": True, "line_ag": False, "enable_model_warmup": False}).close()
    from models.demos.llama3_70b_galaxy.tt import llama_ccl
    assert (llama_ccl.LINE_RS, llama_ccl.LINE_AG) == (True, False)


def test_missing_ttnn_names_the_checkouts_python_env(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ttnn", None)
    with pytest.raises(ImportError, match="built from the tt-metal checkout.*python_env") as err:
        TTGalaxyBackend(hf_dir)
    assert "3.10" in str(err.value) and "3.12" in str(err.value)


def test_missing_checkout_names_pythonpath_and_closes_the_mesh(ttnn, hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "models", None)
    with pytest.raises(ImportError, match="PYTHONPATH"):
        TTGalaxyBackend(hf_dir)
    assert "close_mesh_device" in dict(ttnn.calls)


def test_a_generator_without_prefix_caching_is_refused_before_the_model_loads(ttnn, hf_dir, monkeypatch):
    """Older Galaxy generators (tt-metal c9bcbd99) take no start_pos: the first warm-up prefill would fail
    with a TypeError after minutes of loading weights."""
    from models.demos.llama3_70b_galaxy.tt import generator, model_config
    monkeypatch.setattr(model_config.TtModelArgs, "load_state_dict", lambda self: pytest.fail("weights loaded"))

    def older(self, tokens, page_table=None, kv_cache=None, prompt_lens=None, enable_trace=True,
              sampling_params=None, empty_slots=None, tt_out_logits_all_users=None):
        raise AssertionError("never called")
    monkeypatch.setattr(generator.Generator, "prefill_forward_text", older)
    with pytest.raises(RuntimeError, match="start_pos"):
        TTGalaxyBackend(hf_dir)
    assert [name for name, _ in ttnn.calls][-2:] == ["close_mesh_device", "set_fabric_config"]


def test_only_32_slots(ttnn, hf_dir):
    with pytest.raises(ValueError, match="32"):
        TTGalaxyBackend(hf_dir, num_slots=8)


@pytest.mark.parametrize("shape", [(4, 8), (1, 1)])
def test_only_an_8x4_mesh(ttnn, hf_dir, shape):
    """Slot s lives on column s // 8 of an 8x4 mesh (its four KV groups): another shape would misplace KV."""
    with pytest.raises(ValueError, match="8x4"):
        TTGalaxyBackend(hf_dir, mesh_shape=shape)
    assert "open_mesh_device" not in dict(ttnn.calls)


@pytest.mark.parametrize("chips", [8, 31])
def test_a_host_with_fewer_chips_than_the_mesh_is_named_before_it_opens(ttnn, hf_dir, monkeypatch, chips):
    """A host that advertises `galaxy: 1` but is no Galaxy (a T3000's 8 chips), or a Galaxy with a chip missing: the
    mesh open failed inside tt-metal. tenstorrent/vllm's worker counts the chips first (tt_worker.py get_mesh_grid:
    ttnn.get_device_ids())."""
    monkeypatch.setattr(ttnn, "num_devices", chips)
    with pytest.raises(RuntimeError, match=f"(?s){chips} Tenstorrent chips.*needs 32.*galaxy"):
        TTGalaxyBackend(hf_dir)
    assert ttnn.calls == []  # no fabric set, no mesh opened


# --- warm-up -----------------------------------------------------------------------------------------

def test_warmup_at_load_covers_every_bucket_prefix_and_sampling_variant(backend):
    prefills = gen_calls(backend, "prefill_forward_text")
    uncached = [c for c in prefills if c["start_pos"] == [0] and c["sampling_params"] is None]
    assert [c["prompt_lens"][0] for c in uncached] == BUCKETS
    cached = [c for c in prefills if c["start_pos"] == [128]]
    assert [c["prompt_lens"][0] - 128 for c in cached] == BUCKETS[:-1]  # 128 + 131,072 is past max_seq_len
    sampled = [c["sampling_params"] for c in prefills if c["sampling_params"] is not None]
    assert [(p.temperature, p.top_k, p.top_p) for p in sampled] == [([0.0], [0], [1.0])] + [([1.0], [10], [0.9])] * 2
    assert [p.enable_log_probs for p in sampled] == [False, False, [True]]  # prefill_logprobs' too
    decodes = gen_calls(backend, "decode_forward")
    assert [None if c["sampling_params"] is None else c["sampling_params"].temperature[0] for c in decodes] == \
        [None, 0.0, 1.0, 1.0]
    assert decodes[3]["sampling_params"].enable_log_probs == [True] * 32  # the sampler's log-probs trace
    assert all(c["enable_trace"] for c in prefills + decodes)
    # Warm-up writes only device block 0, which no caller owns.
    assert {b for c in prefills for _, row in c["written_blocks"] for b in row} == {0}
    assert {blk for c in decodes for _, blk, _ in c["written"].values()} == {0}
    # The generator's own lazy prefill warm-up ran once, inside the first prefill.
    assert len(gen_calls(backend, "prefill_warmup")) == 1


def test_after_warmup_serving_compiles_nothing(backend):
    n = len(backend.generator.calls)
    for length in (5, 700, 3000, 40000):
        backend.prefill(list(range(length)), 0, list(range(-(-length // 64))), slot=1)
    prompt = list(range(1000, 1600))
    for sampling in (GREEDY, SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3), None):
        backend.prefill(prompt, 256, list(range(10)), slot=2, sampling=sampling)
    tokens, positions, active = decode_inputs([1, 2], [40000, 600])
    table = empty_table(backend)
    for sampling in (None, [GREEDY] * 32, [SamplingParams(temperature=0.5)] + [None] * 31):
        backend.decode(tokens, positions, table, active, sampling)
    assert [c["compiled"] for _, c in backend.generator.calls[n:]] == [[]] * 10


def test_without_warmup_the_first_requests_compile(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    assert b.generator.calls == []
    tokens, positions, active = decode_inputs([0], [3])
    b.decode(tokens, positions, empty_table(b), active, [GREEDY] * 32)
    assert last_call(b, "decode_forward")["compiled"] == [("decode", "tokens"), ("sampling", "greedy")]
    b.close()


def test_warmup_shows_a_progress_bar(ttnn, hf_dir, capfd):
    TTGalaxyBackend(hf_dir, max_seq_len=4096).close()
    err = capfd.readouterr().err
    assert "TT warm-up" in err and "100%" in err and "14/14" in err  # 4 + 3 after a prefix + 3 prefill + 4 decode


@pytest.mark.parametrize("mode, prefill_sampling, decode_sampling", [
    ("all", 3, 3), ("decode_only", 0, 3), (None, 0, 0)])
def test_warmup_variants_follow_sample_on_device_mode(ttnn, hf_dir, mode, prefill_sampling, decode_sampling):
    b = TTGalaxyBackend(hf_dir, max_seq_len=4096, tt_config={"sample_on_device_mode": mode})
    assert sum(c["sampling_params"] is not None for c in gen_calls(b, "prefill_forward_text")) == prefill_sampling
    assert sum(c["sampling_params"] is not None for c in gen_calls(b, "decode_forward")) == decode_sampling
    b.close()


# --- prefill -----------------------------------------------------------------------------------------

def test_prefill_maps_tokens_blocks_slot_and_trace(backend):
    prompt = list(range(1000, 1300))
    token = backend.prefill(prompt, 0, [7, 3, 9, 1, 5], slot=5, sampling=GREEDY)
    call = last_call(backend, "prefill_forward_text")
    assert call["tokens"].shape == (1, 300) and call["tokens"].dtype == torch.long
    assert call["page_table"].shape == (1, 2048) and call["page_table"].dtype == torch.int32
    assert call["page_table"][0, :5].tolist() == [8, 4, 10, 2, 6] and not call["page_table"][0, 5:].any()
    assert (call["prompt_lens"], call["empty_slots"], call["start_pos"], call["enable_trace"]) == \
        ([300], [5], [0], True)
    assert token.dim() == 0 and token.dtype == torch.long and int(token) == expected_next(prompt)


def test_a_first_prefill_lets_every_decode_after_it_run_traced(ttnn, hf_dir):
    """generator.py @f9153b43 prepares its decode traces in the first prefill's warm-up, at that prefill's page-table
    width, and refuses a traced decode of another width once its prefill traces are recorded: a first request's
    prefill row as wide as its 5 blocks would leave every decode (max_blocks_per_seq wide) failing."""
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    prompt = list(range(1000, 1300))
    first = int(b.prefill(prompt, 0, [7, 3, 9, 1, 5], slot=5, sampling=GREEDY))
    tokens, positions, active = decode_inputs([5], [300])
    tokens[5] = first
    table = empty_table(b)
    table[5, :5] = torch.tensor([7, 3, 9, 1, 5])
    out = b.decode(tokens, positions, table, active, [GREEDY] * 32)
    assert int(out[5]) == expected_next(prompt + [first])
    b.close()


def test_prefill_padding_writes_only_the_spare_device_block(backend):
    backend.prefill(list(range(300)), 0, [0, 1, 2, 3, 4], slot=0, sampling=GREEDY)
    column, written = last_call(backend, "prefill_forward_text")["written_blocks"][0]
    # 300 tokens pad to 1024 = 16 blocks: the caller's 5 (shifted by one) and 11 of padding in block 0
    assert (column, written) == (0, [1, 2, 3, 4, 5] + [0] * 11)


@pytest.mark.parametrize("start, expected", [(0, 0), (128, 128), (200, 128), (256, 256), (320, 256)])
def test_prefill_continuation_starts_at_the_aligned_prefix(backend, start, expected):
    backend.prefill(list(range(512)), start, list(range(8)), slot=2, sampling=GREEDY)
    assert last_call(backend, "prefill_forward_text")["start_pos"] == [expected]


DEFAULT_DEVICE_TOKENS = 2057 * 64  # a column's cache at max_seq_len 131,072: 2,056 blocks and the spare


@pytest.mark.parametrize("start, end, expected", [
    (3072, 4000, 3072),
    (127_744, 130_000, 127_488),  # 2,256 new tokens pad to 4,096: from 127,744 they would end past the cache
    (127_900, 130_872, 127_488),  # from 127,872 (2,972 new tokens, padded to 4,096) they would end at 131,968
    (130_944, 131_072, 130_944),  # 128 new tokens pad to 128: they fit
    (0, 131_072, 0),
])
def test_a_prefill_starts_early_enough_that_its_padding_fits_the_cache(start, end, expected):
    from model.galaxy import padded_prefill_len
    from model.tt_galaxy import prefill_start
    got = prefill_start(start, end, DEFAULT_DEVICE_TOKENS)
    assert got == expected and got + padded_prefill_len(end - got) <= DEFAULT_DEVICE_TOKENS


def test_a_prefill_whose_padding_ends_at_the_caches_last_block_starts_at_its_prefix(ttnn, hf_dir):
    """A column of 71 blocks and the spare holds 4,608 tokens: 416 new tokens after 3,584 cached pad to 1,024 and end
    exactly there, so nothing before the prefix is recomputed (the spare block 0 counts: the generator pads a
    prefill's page table with it)."""
    b = TTGalaxyBackend(hf_dir, max_seq_len=4096, num_blocks=71, tt_config={"enable_model_warmup": False})
    try:
        prompt = [i % 5000 + 7 for i in range(4000)]
        blocks = list(range(63))
        b.prefill(prompt[:3584], 0, blocks[:56], slot=0, sampling=GREEDY)
        token = b.prefill(prompt, 3584, blocks, slot=1, sampling=GREEDY)
        assert last_call(b, "prefill_forward_text")["start_pos"] == [3584]
        assert int(token) == expected_next(prompt)
    finally:
        b.close()


def test_a_tail_after_a_long_cached_prefix_is_recomputed_within_the_cache(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, max_seq_len=4096)  # 72 blocks + the spare: 4,672 tokens a column
    try:
        prompt = [i % 5000 + 7 for i in range(4000)]
        blocks = list(range(63))
        b.prefill(prompt[:3712], 0, blocks[:58], slot=0, sampling=GREEDY)
        token = b.prefill(prompt, 3712, blocks, slot=1, sampling=GREEDY)  # the double asserts the pages fit
        assert last_call(b, "prefill_forward_text")["start_pos"] == [3584]  # 3,712 + 1,024 > 4,672
        assert int(token) == expected_next(prompt)
    finally:
        b.close()


@pytest.mark.parametrize("sizes, match", [(dict(max_seq_len=100_000), "power of two"),
                                          (dict(max_seq_len=512), "power of two"),
                                          (dict(max_seq_len=4096, num_blocks=64), "too few")])
def test_a_galaxy_context_is_a_power_of_two_that_the_cache_holds(ttnn, hf_dir, sizes, match):
    with pytest.raises(ValueError, match=match):
        TTGalaxyBackend(hf_dir, **sizes)


def test_the_smallest_cache_that_holds_the_context_and_a_prefix_is_enough(ttnn, hf_dir):
    """65 blocks and the spare are 4,224 tokens: 4,096 and the warm-up's 128-token prefix, exactly."""
    b = TTGalaxyBackend(hf_dir, max_seq_len=4096, num_blocks=65)
    assert (b.caps.max_seq_len, b.caps.num_blocks) == (4096, 65)
    b.close()


def test_prefill_lengths_are_padded_as_the_generator_pads_them(hf_dir):
    """The backend plans where a prefill starts (prefill_start) by the generator's padding (get_padded_prefill_len,
    generator.py @00b0fa3f); a length one off at a bucket's edge would plan pages the device does not use, or miss
    some it does."""
    from models.demos.llama3_70b_galaxy.tt.generator import get_padded_prefill_len

    from model.galaxy import padded_prefill_len
    lengths = [1, 127, 128, 129, 1023, 1024, 1025, 2048, 2049, 4096, 4097, 131_072]
    assert [padded_prefill_len(n) for n in lengths] == [get_padded_prefill_len(n) for n in lengths]
    assert [padded_prefill_len(n) for n in (128, 129, 1024, 1025)] == [128, 1024, 1024, 2048]


def test_sampling_params_come_from_the_generators_module(backend, monkeypatch):
    """Older checkouts' models.common.sampling has no SamplingParams (@110b5382); the generator imports one
    in every version."""
    monkeypatch.delattr(sys.modules["models.common.sampling"], "SamplingParams")
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    backend.prefill(list(range(10)), 0, [0], slot=3, sampling=params)
    assert last_call(backend, "prefill_forward_text")["slot_params"][3]["top_k"] == 20


def test_prefill_puts_the_requests_sampling_params_on_its_slot(backend):
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=42)
    backend.prefill(list(range(10)), 0, [0], slot=9, sampling=params)
    slots = last_call(backend, "prefill_forward_text")["slot_params"]
    assert {k: slots[9][k] for k in ("temperature", "top_k", "top_p")} == \
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    assert last_call(backend, "prefill_forward_text")["sampling_params"].seed == [42]
    assert all(slots[s]["top_k"] == 1 for s in range(32) if s != 9)  # every other slot: argmax


def test_prefill_without_sampling_returns_last_position_logits(backend):
    logits = backend.prefill(list(range(10)), 0, [0], slot=0)
    assert last_call(backend, "prefill_forward_text")["sampling_params"] is None
    assert logits.shape == (128256,) and logits.dtype == torch.float32
    assert int(logits.argmax()) == expected_next(range(10))


def test_prefill_takes_tokens_with_log_probs_too(backend, monkeypatch):
    plain = backend.generator.prefill_forward_text
    monkeypatch.setattr(backend.generator, "prefill_forward_text", lambda *a, **kw: (plain(*a, **kw), "log-probs"))
    token = backend.prefill(list(range(10)), 0, [0], slot=0, sampling=SamplingParams(temperature=0.7, seed=1))
    assert last_call(backend, "prefill_forward_text")["sampling_params"] is not None
    assert token.dim() == 0 and int(token) == expected_next(range(10))


def test_without_warmup_a_greedy_first_request_is_sampled_on_the_device(ttnn, hf_dir):
    """Before any step the device sampler's mode is unknown, so taking a greedy first token on the host saves no mode
    change: it is the device's, and the 128k logits stay there."""
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    token = b.prefill(list(range(10)), 0, [0], slot=0, sampling=GREEDY)
    assert last_call(b, "prefill_forward_text")["sampling_params"] is not None
    assert int(token) == expected_next(range(10))
    b.close()


def test_decode_only_mode_samples_the_first_token_on_the_host(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, tt_config={"sample_on_device_mode": "decode_only", "enable_model_warmup": False})
    token = b.prefill(list(range(10)), 0, [0], slot=0, sampling=GREEDY)
    assert last_call(b, "prefill_forward_text")["sampling_params"] is None and int(token) == expected_next(range(10))
    b.close()


def test_a_first_token_sampled_on_the_host_is_drawn_as_the_device_draws_the_rest(ttnn, hf_dir, monkeypatch):
    """decode_only: the device samples every later token from its top 32 when top_k is off; the first, on the
    host, was drawn from the whole vocabulary."""
    import model.tt_galaxy as tt

    drawn = []
    monkeypatch.setattr(tt, "sample_row", lambda logits, params, position: (drawn.append(params) or (7, None)))
    b = TTGalaxyBackend(hf_dir, tt_config={"sample_on_device_mode": "decode_only", "enable_model_warmup": False})
    assert int(b.prefill(list(range(10)), 0, [0], slot=0, sampling=SamplingParams(temperature=1.0))) == 7
    assert [p.top_k for p in drawn] == [32]
    b.close()


SAMPLED = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3)


def sampling_events(backend, since: int) -> list[tuple]:
    """Each call since `since` that changed the device sampler's mode (releasing its traces) or captured one."""
    return [(name, c["sampling_mode_changed"], c.get("sampling_trace_captured"))
            for name, c in backend.generator.calls[since:]
            if c.get("sampling_mode_changed") or c.get("sampling_trace_captured")]


def test_a_greedy_request_joining_sampled_decodes_costs_no_sampling_trace(backend):
    """tt-metal releases every sampling trace when its sampler switches between argmax and sampling, and a
    device-sampled prefill switches it to the request's mode: a greedy prefill among sampled users switched
    it twice, and the next decode captured its trace again. Its first token is the host's argmax instead."""
    tokens, positions, active = decode_inputs([1], [40])
    table, running = empty_table(backend), [SAMPLED] + [None] * 31
    backend.decode(tokens, positions, table, active, running)
    n = len(backend.generator.calls)
    prompt = list(range(300, 340))
    token = backend.prefill(prompt, 0, [3], slot=2, sampling=GREEDY)
    assert int(token) == expected_next(prompt)  # the argmax of the same logits
    assert last_call(backend, "prefill_forward_text")["sampling_params"] is None
    backend.decode(tokens, positions, table, active, [SAMPLED, GREEDY] + [None] * 30)
    assert sampling_events(backend, n) == []


def test_a_greedy_request_joining_a_greedy_logprobs_batch_costs_no_sampling_trace(backend):
    """A greedy row asking its logprob keeps the device on its sampling program (the argmax one computes no
    log-probs), so a greedy request joining it takes its first token on the host, as among sampled users."""
    tokens, positions, active = decode_inputs([1], [40])
    table, rows = empty_table(backend), [GREEDY, SamplingParams(temperature=0.0, logprobs=0)] + [GREEDY] * 30
    backend.decode_logprobs(tokens, positions, table, active, rows)
    n = len(backend.generator.calls)
    prompt = list(range(300, 340))
    assert int(backend.prefill(prompt, 0, [3], slot=2, sampling=GREEDY)) == expected_next(prompt)
    assert last_call(backend, "prefill_forward_text")["sampling_params"] is None
    backend.decode_logprobs(tokens, positions, table, active, rows)
    assert sampling_events(backend, n) == []


def test_a_greedy_request_joining_argmax_decodes_is_sampled_on_the_device(backend):
    tokens, positions, active = decode_inputs([1], [40])
    backend.decode(tokens, positions, empty_table(backend), active, [GREEDY] * 32)
    n = len(backend.generator.calls)
    backend.prefill(list(range(40)), 0, [3], slot=2, sampling=GREEDY)
    assert last_call(backend, "prefill_forward_text")["sampling_params"] is not None
    backend.decode(tokens, positions, empty_table(backend), active, [GREEDY] * 32)
    assert sampling_events(backend, n) == []


def test_the_sampler_mode_changes_only_when_the_running_batch_changes_mode(backend):
    """Unavoidable: the last sampled user leaves (argmax from then), and a sampled one joins again."""
    tokens, positions, active = decode_inputs([1], [40])
    table = empty_table(backend)
    backend.decode(tokens, positions, table, active, [SAMPLED] + [None] * 31)
    n = len(backend.generator.calls)
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    backend.prefill(list(range(40)), 0, [3], slot=2, sampling=SAMPLED)
    backend.decode(tokens, positions, table, active, [GREEDY, GREEDY, SAMPLED] + [None] * 29)
    assert sampling_events(backend, n) == [("decode_forward", True, "greedy"), ("prefill_forward_text", True, None),
                                           ("decode_forward", False, "sampled")]


# --- decode ------------------------------------------------------------------------------------------

def test_decode_maps_fixed_page_table_positions_and_inactive_slots(backend):
    tokens, positions, active = decode_inputs([0, 5, 31], [70, 128, 4000])
    table = empty_table(backend)
    table[0, :2], table[5, :3], table[31, :63] = torch.tensor([4, 6]), torch.tensor([9, 8, 7]), torch.arange(63)
    out = backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    call = last_call(backend, "decode_forward")
    assert call["page_table"].shape == (32, 2048) and call["page_table"].dtype == torch.int32
    assert torch.equal(call["page_table"], torch.where(active[:, None], table + 1, 0))
    assert call["start_pos"].tolist() == [70 if s == 0 else 128 if s == 5 else 4000 if s == 31 else -1
                                          for s in range(32)]
    # (mesh column, device block = caller block + 1, offset)
    assert call["written"] == {0: (0, 7, 6), 5: (0, 8, 0), 31: (3, 63, 32)}
    assert (call["enable_trace"], call["read_from_device"], call["reset_inputs"]) == (True, True, True)
    assert out.shape == (32,) and out.dtype == torch.long
    assert out[[0, 5, 31]].tolist() == [0, 50, 310]  # nothing else written in those blocks: the fed token


def test_an_idle_slots_row_reaches_the_device_as_the_spare_block(backend):
    """vLLM's runner pads idle decode rows with block 0, its null block, beside position -1
    (vllm/v1/worker/tt_model_runner.py @007ec40d, _prepare_model_inputs): a kernel that did not skip -1 would
    touch only that block. A slot retired here keeps its row, whose blocks the router may have given to
    another slot of its column since; it goes to the device as the spare device block 0."""
    tokens, positions, active = decode_inputs([9], [70])
    table = empty_table(backend)
    table[0, :2], table[9, :2] = torch.tensor([4, 6]), torch.tensor([4, 6])  # slot 0 retired; its blocks reused
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    device_table = last_call(backend, "decode_forward")["page_table"]
    assert device_table[9, :2].tolist() == [5, 7]
    assert not device_table[~active].any()


def test_decode_loads_the_hosts_inputs_every_step(backend):
    """tt-metal's decode_forward (generator.py @00b0fa3f) loads tokens, positions and sampling parameters only
    with reset_inputs or a changed page table; else its trace replays on the device's own (last sampled tokens,
    positions + 1), as vLLM's runner relies on. The host here owns them: a slot retired at EOS keeps its
    page-table row, and replayed it would go on writing blocks the router frees; a token the host chose (a
    host-sampled row) would be ignored."""
    tokens, positions, active = decode_inputs([0, 9], [70, 70])
    table = empty_table(backend)
    table[0, :2], table[9, :2] = torch.tensor([4, 6]), torch.tensor([8, 9])
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    active[0] = False  # slot 0 retired; its row in the round's page table unchanged
    tokens[9], positions[9] = 1234, 71
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    call = last_call(backend, "decode_forward")
    assert call["inputs_loaded"] and list(call["written"]) == [9]
    assert backend.generator.device_inputs[1][9] == 72


def test_the_doubles_decode_after_a_device_sampled_prefill_needs_reset_inputs(backend):
    """generator.py @00b0fa3f prefill_forward_text switches the model back to decode mode to sample on the device
    (switch_mode("decode"), which sets is_decode_setup: llama_model.py @00ab7c95), so decode_forward after it, with
    reset_inputs=False, the same page table and device sampling, loads nothing: it replays on the last decode's
    tokens and positions + 1. A prefill that returned logits leaves the model in prefill mode, and the decode
    after it loads the host's inputs."""
    from models.common.sampling import SamplingParams as TTSamplingParams
    gen = backend.generator
    tokens, positions, active = decode_inputs([1], [40])
    table = torch.where(active[:, None], empty_table(backend) + 1, 0).to(torch.int32)
    rows = TTSamplingParams(temperature=[0.6] * 32, top_k=[20] * 32, top_p=[0.9] * 32)

    def decode_loads() -> bool:
        gen.decode_forward(tokens, torch.where(active, positions, -1), page_table=table, kv_cache=backend.kv_cache,
                           sampling_params=rows)
        return gen.calls[-1][1]["inputs_loaded"]

    def prefill(sampling):
        gen.prefill_forward_text(torch.tensor([list(range(10))]), page_table=torch.tensor([[2]], dtype=torch.int32),
                                 kv_cache=backend.kv_cache, prompt_lens=[10], sampling_params=sampling,
                                 empty_slots=[3])

    assert decode_loads()
    prefill(TTSamplingParams(temperature=[0.6], top_k=[20], top_p=[0.9]))
    assert not decode_loads()
    prefill(None)
    assert decode_loads()


def test_every_decode_takes_a_page_table_of_one_width(backend):
    """tt-metal's decode_forward (generator.py @00b0fa3f) compares each page table with the last one by `!=`,
    which fails on another width (and its traces hold the width they were captured with); vLLM's runner pads
    every decode table to one width (tt_model_runner.py @007ec40d) for that reason."""
    tokens, positions, active = decode_inputs([0], [70])
    table = empty_table(backend)
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    with pytest.raises(RuntimeError, match="must match"):
        backend.decode(tokens, positions, table[:, :64], active, [GREEDY] * 32)


def test_a_greedy_request_with_a_top_p_keeps_the_device_on_argmax(backend):
    """Older format_sampling_params keep a greedy row's top_p, and the argmax program takes top_p 0 or 1 only:
    sent as it came, a greedy top_p 0.5 would switch the device to sampling (its traces released, captured
    again) while the backend counts it as argmax."""
    tokens, positions, active = decode_inputs([1, 2], [40, 40])
    table = empty_table(backend)
    backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    n = len(backend.generator.calls)
    backend.decode(tokens, positions, table, active, [SamplingParams(temperature=0.0, top_p=0.5)] * 32)
    assert last_call(backend, "decode_forward")["slot_params"][1]["top_p"] == 1.0
    assert sampling_events(backend, n) == []


def test_a_near_zero_temperature_goes_to_the_device_as_a_hundredth(backend):
    """vLLM raises 0 < temperature < 0.01 to 0.01; sent as it is, the device would divide by 1e-40 (inf)."""
    tokens, positions, active = decode_inputs([3, 4], [10, 10])
    sampling = [None] * 32
    sampling[3], sampling[4] = SamplingParams(temperature=1e-40), SamplingParams(temperature=0.0)
    backend.decode(tokens, positions, empty_table(backend), active, sampling)
    slots = last_call(backend, "decode_forward")["slot_params"]
    assert slots[3]["temperature"] == 0.01 and slots[4]["temperature"] == 0.0


def test_decode_sampling_params_per_slot_and_greedy_padding(backend):
    tokens, positions, active = decode_inputs([3, 4], [10, 10])
    sampling = [None] * 32
    sampling[3] = SamplingParams(temperature=0.8, top_k=0, top_p=0.95, seed=7)
    sampling[4] = GREEDY
    sampling[5] = SamplingParams(temperature=1.0, top_p=1e-50)  # 0 in float32: goes as its smallest normal
    backend.decode(tokens, positions, empty_table(backend), active, sampling)
    call = last_call(backend, "decode_forward")
    slots = call["slot_params"]
    assert (slots[3]["temperature"], slots[3]["top_k"], slots[3]["top_p"], slots[3]["seed"]) == (0.8, 32, 0.95, 7)
    assert call["sampling_params"].top_p[5] == torch.finfo(torch.float32).tiny
    assert all(slots[s]["temperature"] == 0 and slots[s]["top_k"] == 1 for s in range(32) if s not in (3, 5))
    assert len(call["sampling_params"].temperature) == 32


def test_decode_without_sampling_returns_logits(backend):
    tokens, positions, active = decode_inputs([1], [5])
    logits = backend.decode(tokens, positions, empty_table(backend), active)
    assert last_call(backend, "decode_forward")["sampling_params"] is None
    assert logits.shape == (32, 128256) and logits.dtype == torch.float32 and int(logits[1].argmax()) == 10


def test_decode_continues_a_prefilled_sequence(backend):
    prompt = list(range(500, 700))
    first = int(backend.prefill(prompt, 0, [4, 5, 6, 7], slot=12, sampling=GREEDY))
    tokens, positions, active = decode_inputs([12], [200])
    tokens[12] = first
    table = empty_table(backend)
    table[12, :4] = torch.tensor([4, 5, 6, 7])
    out = backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    assert int(out[12]) == expected_next(prompt + [first])


# --- overlapped decode (decode_async) -----------------------------------------------------------------

def two_prefilled_slots(backend):
    """Slots 12 and 13 (mesh column 1) after their prefills: (prompts with first tokens, decode inputs, table)."""
    a, b = list(range(500, 700)), list(range(900, 1000))
    a.append(int(backend.prefill(a, 0, [4, 5, 6, 7], slot=12, sampling=GREEDY)))
    b.append(int(backend.prefill(b, 0, [8, 9], slot=13, sampling=GREEDY)))
    tokens, positions, active = decode_inputs([12, 13], [len(a) - 1, len(b) - 1])
    tokens[12], tokens[13] = a[-1], b[-1]
    table = empty_table(backend)
    table[12, :4], table[13, :2] = torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9])
    return (a, b), (tokens, positions, active), table


def test_overlapped_steps_only_where_the_generator_reads_asynchronously(ttnn, hf_dir, monkeypatch):
    """read_decode_output(async_read=True) and process_decode_output_host: generator.py @00b0fa3f. Without device
    sampling there is no token on the device to feed the next step."""
    for mode, expected in (("all", True), ("decode_only", True), (None, False)):
        b = TTGalaxyBackend(hf_dir, tt_config={"sample_on_device_mode": mode, "enable_model_warmup": False})
        assert b.caps.async_decode is expected
        b.close()
    from models.demos.llama3_70b_galaxy.tt.generator import Generator
    monkeypatch.setattr(Generator, "read_decode_output", lambda self, tt_out, unpadded_batch_size, is_tokens: None)
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    assert not b.caps.async_decode  # an older signature (vllm/worker/tt_model_runner.py @00d852e2 calls this one)
    b.close()


def test_overlapped_steps_can_be_turned_off(ttnn, hf_dir):
    """The operator's switch (override_tt_config.overlap_decode): overlap is checked against the double only."""
    b = TTGalaxyBackend(hf_dir, tt_config={"overlap_decode": False, "enable_model_warmup": False})
    assert not b.caps.async_decode
    b.close()


def test_an_overlapped_step_runs_on_the_devices_own_tokens_and_reads_each_step(backend, ttnn):
    """The runner starts step k + 1 before it reads step k. tt-metal's decode_forward(read_from_device=False)
    returns the step's tokens on the device: the decode trace's own token input, which the sampler writes
    (tt_out_tok) and the next replay reads and overwrites. With reset_inputs=False, the same page table and
    device sampling, no prefill between, the next step loads nothing from the host: it runs on those tokens at
    the positions + 1 (generator.py @00b0fa3f, as tenstorrent/vllm's runner @00d852e2 chains its steps). Each
    step's read is enqueued (read_decode_output(async_read=True)) before the next step runs."""
    (a, b), (tokens, positions, active), table = two_prefilled_slots(backend)
    sampling = [GREEDY if s in (12, 13) else None for s in range(32)]
    first = backend.decode_async(tokens, positions, table, active, sampling)
    second = backend.decode_async(first, positions + active, table, active, sampling)
    calls = gen_calls(backend, "decode_forward")[-2:]
    assert [c["read_from_device"] for c in calls] == [False, False]
    assert [(c["reset_inputs"], c["inputs_loaded"]) for c in calls] == [(True, True), (False, False)]
    assert list(calls[1]["written"]) == [12, 13]
    read = first.tokens()
    assert read.shape == (32,) and read.dtype == torch.long
    a.append(expected_next(a)), b.append(expected_next(b))
    assert read[[12, 13]].tolist() == [a[-1], b[-1]]
    assert second.tokens()[[12, 13]].tolist() == [expected_next(a), expected_next(b)]
    assert first.tokens()[[12, 13]].tolist() == [a[-1], b[-1]]  # read once, kept


def test_a_chained_step_starts_before_the_last_one_is_read(backend, ttnn):
    """The overlap itself: step k + 1 is enqueued on the device's own tokens while step k's read is still in flight,
    so the host's work between steps costs the device nothing. Reading step k first (its event synchronised) before
    starting k + 1 gives the same tokens and loses the overlap."""
    (a, b), (tokens, positions, active), table = two_prefilled_slots(backend)
    sampling = [GREEDY if s in (12, 13) else None for s in range(32)]
    n = len(ttnn.calls)
    first = backend.decode_async(tokens, positions, table, active, sampling)
    second = backend.decode_async(first, positions + active, table, active, sampling)
    assert [name for name, _ in ttnn.calls[n:]] == ["record_event", "record_event"]  # two reads enqueued, none waited
    assert last_call(backend, "decode_forward")["inputs_loaded"] is False
    a.append(expected_next(a))
    assert [int(first.tokens()[12]), int(second.tokens()[12])] == [a[-1], expected_next(a)]


def test_an_overlapped_step_of_greedy_users_keeps_the_device_on_argmax(backend):
    """Idle rows go as greedy ones, as in decode: an idle row sent as a sampled one took an all-greedy batch off the
    argmax program (releasing the sampler's traces when the mode changed) and sent the next greedy first token to
    the host."""
    (a, b), (tokens, positions, active), table = two_prefilled_slots(backend)
    sampling = [GREEDY if s in (12, 13) else None for s in range(32)]
    step = backend.decode_async(tokens, positions, table, active, sampling)
    assert backend.generator.sampling_mode == "greedy"
    assert {slot["top_k"] for slot in last_call(backend, "decode_forward")["slot_params"]} == {1}
    assert int(step.tokens()[13]) == expected_next(b)


@pytest.mark.parametrize("between", ["a slot leaves", "a prefill", "a step one at a time", "a block joins",
                                     "the parameters change"])
def test_a_step_the_device_cannot_chain_loads_the_previous_tokens_from_the_host(backend, ttnn, between):
    """A slot that leaves goes to the device at position -1 with the spare block's row: another page table, so
    decode_forward loads every input from the host (generator.py @00b0fa3f), tokens included, as it must after a
    prefill (one sampled on the device leaves the model in decode mode, so only reset_inputs makes it load) or
    after another decode; tokens the host has not read would be lost. So the previous step is read first and the
    step takes its tokens from the host. Likewise when a block joins a row (decode_forward loads the host's inputs
    for any other page table) and when the parameters change (under the same table and no reset_inputs it loads
    none, and the device would sample with the old ones)."""
    (a, b), (tokens, positions, active), table = two_prefilled_slots(backend)
    sampling = [GREEDY if s in (12, 13) else None for s in range(32)]
    first = backend.decode_async(tokens, positions, table, active, sampling)
    following, next_table, next_sampling = active.clone(), table, list(sampling)
    if between == "a slot leaves":
        following[13] = False
        next_sampling[13] = None
    elif between == "a prefill":
        backend.prefill(list(range(300)), 0, [20, 21, 22, 23, 24], slot=0, sampling=GREEDY)
    elif between == "a step one at a time":
        backend.decode(torch.zeros(32, dtype=torch.long), torch.full((32,), -1), table,
                       torch.zeros(32, dtype=torch.bool), [None] * 32)
    elif between == "a block joins":
        next_table = table.clone()
        next_table[13, 2] = 10
    else:
        next_sampling[12] = RUNNING
    second = backend.decode_async(first, positions + following, next_table, following, next_sampling)
    call = last_call(backend, "decode_forward")
    assert (call["reset_inputs"], call["inputs_loaded"]) == (True, True)
    a.append(expected_next(a)), b.append(expected_next(b))
    assert call["tokens"][[12, 13], 0].tolist() == [a[-1], b[-1]]
    assert list(call["written"]) == ([12] if between == "a slot leaves" else [12, 13])
    assert first.tokens()[[12, 13]].tolist() == [a[-1], b[-1]]
    assert int(second.tokens()[12]) == expected_next(a)


def test_an_overlapped_step_without_the_devices_log_probs_gives_none(backend):
    """An argmax batch computes no log-probs (TTSampling's fast path), and process_decode_output_host then fills in
    ones: read as log-probs, every token would get logprob 0.0 (probability 1)."""
    (a, b), (tokens, positions, active), table = two_prefilled_slots(backend)
    step = backend.decode_async(tokens, positions, table, active, [GREEDY if s in (12, 13) else None for s in range(32)])
    assert int(step.tokens()[12]) == expected_next(a)
    with pytest.raises(RuntimeError, match="no log-probs"):
        step.logprobs()


RUNNING = SamplingParams(temperature=0.6, top_k=10, top_p=0.9)
JOINING = SamplingParams(temperature=0.9, top_k=5, top_p=0.8)


@pytest.fixture(params=["00b0fa3f", "scatter_sampling_params_to_slots"])
def prefill_scatter(request, hf_dir, monkeypatch):
    """The double as generator.py @00b0fa3f (a device-sampled prefill's other rows get format_sampling_params'
    argmax padding, and all 32 log-probs flags the request's) and as a checkout that takes models/common/sampling's
    scatter_sampling_params_to_slots and passes empty_slots on (the other rows get the request's own values, and
    only the prefilled slot's log-probs flag changes)."""
    from models.demos.llama3_70b_galaxy.tt import generator
    monkeypatch.setattr(generator, "SCATTER_SAMPLING_PARAMS_TO_SLOTS", request.param != "00b0fa3f")
    return request.param


def test_a_device_sampled_prefill_leaves_the_sampler_in_the_requests_mode(prefill_scatter, backend):
    """Whichever fills the other rows, the sampler's mode after a prefill is the request's (all 32 rows argmax only
    where the request's is): a greedy request joining right after a sampled one takes its first token on the host,
    and nothing switches the mode again."""
    tokens, positions, active = decode_inputs([1], [40])
    backend.decode(tokens, positions, empty_table(backend), active, [GREEDY] * 32)
    n = len(backend.generator.calls)
    backend.prefill(list(range(40)), 0, [3], slot=2, sampling=JOINING)
    others = {backend.generator.device_params[s]["top_k"] for s in range(32) if s != 2}
    assert others == ({1} if prefill_scatter == "00b0fa3f" else {5})
    backend.prefill(list(range(60)), 0, [4], slot=3, sampling=GREEDY)
    assert last_call(backend, "prefill_forward_text")["sampling_params"] is None
    backend.decode(tokens, positions, empty_table(backend), active, [GREEDY, GREEDY, JOINING, GREEDY] + [None] * 28)
    assert sampling_events(backend, n) == [("prefill_forward_text", True, None), ("decode_forward", False, "sampled")]


def test_the_decode_after_a_device_sampled_prefill_samples_each_user_with_its_own_parameters(prefill_scatter,
                                                                                              backend):
    """A device-sampled prefill replaces every row's parameters, the running users' with argmax padding (@00b0fa3f)
    or with the joining request's temperature, top-k and top-p (scatter_sampling_params_to_slots), and leaves the
    model in decode mode: only reset_inputs makes the next decode load the users' own. A step chained over the
    prefill would sample them so."""
    _, (tokens, positions, active), table = two_prefilled_slots(backend)
    sampling = [RUNNING if s in (12, 13) else None for s in range(32)]
    first = backend.decode_async(tokens, positions, table, active, sampling)
    backend.prefill(list(range(300)), 0, [20, 21, 22, 23, 24], slot=0, sampling=JOINING)
    assert backend.generator.device_params[12]["top_k"] == (1 if prefill_scatter == "00b0fa3f" else 5)
    backend.decode_async(first, positions + active, table, active, sampling)
    assert last_call(backend, "decode_forward")["inputs_loaded"]
    assert [{k: backend.generator.device_params[s][k] for k in ("temperature", "top_k", "top_p")}
            for s in (12, 13)] == [{"temperature": 0.6, "top_k": 10, "top_p": 0.9}] * 2


def test_a_prefill_returning_log_probs_it_did_not_ask_still_gives_its_token(prefill_scatter, ttnn, hf_dir):
    """After a decode asking log-probs, @00b0fa3f's prefill of a request not asking them sets every flag off and
    returns its tokens alone; a checkout passing empty_slots on keeps the running users' flags, and its sampler
    returns log-probs beside the token. Either way the token is taken, and (without warm-up) whether prefills give
    log-probs is decided by the first that asks them, which gets the device's value."""
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    tokens, positions, active = decode_inputs([1], [40])
    b.decode_logprobs(tokens, positions, empty_table(b), active, [None, LOGPROBS] + [None] * 30)
    prompt = list(range(300, 340))
    assert int(b.prefill(prompt, 0, [3], slot=2, sampling=JOINING)) == expected_next(prompt)
    assert b.generator.log_probs_enabled[1] is (prefill_scatter != "00b0fa3f")
    token, value = b.prefill_logprobs(prompt, 0, [5], slot=4, sampling=LOGPROBS)
    assert token == expected_next(prompt) and abs(value - host_logprob()) <= 2 ** -8 * abs(host_logprob())
    b.close()


def serve_on_the_galaxy(hf_dir, async_decode: bool) -> tuple[list, int, torch.Tensor]:
    """MeshRunner over the backend: three slots on two mesh columns, each with its own budget, over two works of
    five steps. Returns (each step's tokens and finish reasons, how many steps ran on the device's own inputs,
    the KV the columns hold)."""
    import dataclasses

    import numpy as np

    from model.runner import MeshRunner
    from scheduler.work import DecodeRound, MeshWork, PrefillChunk
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    b.caps = dataclasses.replace(b.caps, async_decode=async_decode)
    runner = MeshRunner(b)
    table = np.zeros((32, 4), dtype=np.int32)
    prefills = []
    for slot, prompt, max_tokens in ((0, list(range(1, 70)), 3), (9, list(range(80, 200)), 20), (10, [7], 7)):
        blocks = [slot * 4 + i for i in range(4)]
        table[slot] = blocks
        prefills.append(PrefillChunk(f"r{slot}", slot, prompt, 0, blocks, SamplingParams(temperature=0.0,
                                     max_tokens=max_tokens), len(prompt), stop_token_ids=(128009,)))
    messages = []
    for work_id in range(2):
        listed = [0, 9, 10] if work_id == 0 else sorted(runner.slots)
        work = MeshWork(work_id, prefills if work_id == 0 else [], DecodeRound(5, listed, table))
        messages += [(list(r.tokens), dict(r.finished)) for r in runner.execute(work)]
    chained = sum(not c["inputs_loaded"] for c in gen_calls(b, "decode_forward"))
    kv = b.kv_cache[0][0][0].columns.clone()
    b.close()
    return messages, chained, kv


def test_the_runners_overlapped_steps_give_the_answers_and_kv_of_one_step_at_a_time(ttnn, hf_dir):
    """The runner leaves a slot whose budget a step spends out of the next step (model/runner.py): on the Galaxy
    that step loads the host's inputs; the others run on the device's own."""
    expected, none_chained, expected_kv = serve_on_the_galaxy(hf_dir, async_decode=False)
    got, chained, kv = serve_on_the_galaxy(hf_dir, async_decode=True)
    assert got == expected and torch.equal(kv, expected_kv)
    # In each work: step 0 loads, 1 chains, 2 loads (the first work's slot 0, the second's slot 10 left), 3 and 4 chain
    assert none_chained == 0 and chained == 6


def test_older_generators_decode_through_decode_forward_text(ttnn, hf_dir, monkeypatch):
    from models.demos.llama3_70b_galaxy.tt.generator import Generator
    monkeypatch.setitem(sys.modules, GENERATOR_VLLM, None)
    monkeypatch.setattr(Generator, "decode_forward_text", Generator.decode_forward, raising=False)
    monkeypatch.delattr(Generator, "decode_forward")
    b = TTGalaxyBackend(hf_dir, max_seq_len=4096)
    tokens, positions, active = decode_inputs([0], [3])
    assert int(b.decode(tokens, positions, empty_table(b), active, [GREEDY] * 32)[0]) == 0
    b.close()


# --- KV groups: one KV cache per mesh column ---------------------------------------------------------

# 1,100 tokens in 18 blocks, the first 16 (1,024 tokens) a reusable prefix: the generator reuses a prefix only
# where that pays (76 new tokens pad to 128, against 2,048 for the whole prompt)
PROMPT = list(range(2000, 3100))
PREFIX, BLOCKS = 1024, list(range(10, 28))
REUSED = BLOCKS[:16] + [40, 41]


def test_a_prefix_reused_within_its_column_gives_the_right_token(backend):
    backend.prefill(PROMPT, 0, BLOCKS, slot=0, sampling=GREEDY)
    token = backend.prefill(PROMPT, PREFIX, REUSED, slot=5, sampling=GREEDY)  # slot 5: column 0
    call = last_call(backend, "prefill_forward_text")
    assert call["start_pos"] == [PREFIX] and call["written_blocks"][0] == (0, [41, 42])  # device ids: + 1
    assert int(token) == expected_next(PROMPT)


def test_a_prefix_reused_from_another_column_gives_a_wrong_token(backend):
    """What a single block pool for all 32 slots does on a Galaxy: slot 9 lives on column 1, whose chips
    never held what slot 0 wrote into blocks 10 to 25."""
    backend.prefill(PROMPT, 0, BLOCKS, slot=0, sampling=GREEDY)
    token = backend.prefill(PROMPT, PREFIX, REUSED, slot=9, sampling=GREEDY)
    assert last_call(backend, "prefill_forward_text")["written_blocks"][0][0] == 1
    assert int(token) != expected_next(PROMPT)
    assert int(token) == expected_next(PROMPT[PREFIX:])  # column 1 read back only what slot 9 wrote


def test_a_prefix_too_short_to_pay_is_recomputed_by_the_generator(backend):
    """tt-metal's _should_skip_prefix_caching (generator.py @00b0fa3f): 172 new tokens after 128 cached pad to
    1,024, as the whole 300 do, so it prefills from 0 and writes the prefix's blocks again (the same KV)."""
    prompt = PROMPT[:300]
    backend.prefill(prompt, 0, BLOCKS[:5], slot=0, sampling=GREEDY)
    token = backend.prefill(prompt, 128, BLOCKS[:2] + [30, 31, 32], slot=9, sampling=GREEDY)
    call = last_call(backend, "prefill_forward_text")
    assert call["start_pos"] == [128] and call["written_blocks"][0] == (1, [11, 12, 31, 32, 33] + [0] * 11)
    assert int(token) == expected_next(prompt)


def test_the_largest_prefill_chunk_allowed_is_never_recomputed_at_a_larger_size(hf_dir):
    """AppConfig caps prefill_chunk on a Galaxy at MAX_PREFILL_CHUNK: at every aligned start below 128k, when the
    generator's rule recomputes such a chunk (or a shorter last one) from position 0, that costs no more than the
    chunk alone, both padded to the same bucket; at twice the cap it costs twice or more."""
    from models.demos.llama3_70b_galaxy.tt.generator import _should_skip_prefix_caching, get_padded_prefill_len

    from model.galaxy import MAX_PREFILL_CHUNK, MAX_SEQ_LEN, PREFIX_ALIGN

    def dearer(chunk: int) -> list[tuple[int, int]]:
        return [(start, n) for start in range(PREFIX_ALIGN, MAX_SEQ_LEN, PREFIX_ALIGN)
                for n in range(PREFIX_ALIGN, min(chunk, MAX_SEQ_LEN - start) + 1, PREFIX_ALIGN)
                if _should_skip_prefix_caching(start + n, start)
                and get_padded_prefill_len(start + n) > get_padded_prefill_len(n)]
    assert dearer(MAX_PREFILL_CHUNK) == []
    assert (16384, 16384) in dearer(2 * MAX_PREFILL_CHUNK)  # 32,768 tokens prefilled for 16,384


def test_each_column_has_its_own_blocks_under_the_same_ids(backend):
    """Per-group pools hand out the same block ids in every column: they never collide."""
    prompts = {slot: list(range(100 * slot, 100 * slot + 150)) for slot in (0, 8, 16, 24)}  # one per column
    for slot, prompt in prompts.items():
        backend.prefill(prompt, 0, [1, 2, 3], slot=slot, sampling=GREEDY)
    tokens, positions, active = decode_inputs(list(prompts), [150] * 4)
    table = empty_table(backend)
    table[list(prompts), :3] = torch.tensor([1, 2, 3], dtype=torch.int32)
    out = backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    for slot, prompt in prompts.items():
        assert int(out[slot]) == expected_next(prompt + [int(tokens[slot])])


def test_decode_reads_only_its_columns_blocks(backend):
    backend.prefill(PROMPT, 0, BLOCKS, slot=1, sampling=GREEDY)  # column 0
    tokens, positions, active = decode_inputs([2, 10], [len(PROMPT)] * 2)  # slot 2: column 0, slot 10: column 1
    table = empty_table(backend)
    table[[2, 10], :len(BLOCKS)] = torch.tensor(BLOCKS, dtype=torch.int32)
    tokens[[2, 10]] = 7
    out = backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    assert int(out[2]) == expected_next(PROMPT + [7]) and int(out[10]) == expected_next([7])


# --- what runs on the device ----------------------------------------------------------------------------

def test_device_samples_temperature_top_k_top_p_not_seeds_penalties_or_logprobs(backend):
    assert backend.can_sample(GREEDY)
    assert backend.can_sample(SamplingParams(temperature=0.6, top_k=10, top_p=0.9))
    assert not backend.can_sample(SamplingParams(temperature=0.6, seed=1))
    assert not backend.can_sample(SamplingParams(repetition_penalty=1.1))
    assert not backend.can_sample(SamplingParams(presence_penalty=0.5))
    assert not backend.can_sample(SamplingParams(logprobs=2))


def test_no_device_sampling_mode_sends_everything_to_the_host(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, tt_config={"sample_on_device_mode": None, "enable_model_warmup": False})
    assert not b.can_sample(GREEDY) and b.caps.device_sampling == frozenset()
    b.close()


def test_the_demo_runs_a_preset_on_the_galaxy_backend(ttnn, hf_dir, tmp_path_factory, capsys):
    """bench.demo's presets on tt_galaxy use a column's own pool: the demo's 2,048-block page table is the
    whole batch's, and as a per-column pool it is too small for 128k (it was refused at open)."""
    import json
    import shutil

    from transformers import LlamaConfig

    from bench import demo
    from model.embedded import ensure_llama3_tokenizer

    for f in ensure_llama3_tokenizer().iterdir():
        shutil.copy(f, hf_dir / f.name)
    # Llama 3 70B's shape, which bench.demo checks as the serve app does (the double reads no weights)
    LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8).save_pretrained(hf_dir)
    prompts = tmp_path_factory.mktemp("prompts") / "p.json"
    prompts.write_text(json.dumps([{"prompt": "Hi."}, {"prompt": "Name a bird."}]))
    demo.main(["--backend", "tt_galaxy", "--model", str(hf_dir), "--input-prompts", str(prompts),
               "--batch-size", "2", "--max-generated-tokens", "3", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["settings"]["max_seq_len"] == 131072 and rep["output_tokens"] == 6
    assert [u["finish_reason"] for u in rep["batches"][0]["users"]] == ["length", "length"]


# --- log-probs on the device ----------------------------------------------------------------------------

LOGPROBS = SamplingParams(temperature=0.6, top_k=20, top_p=0.9, logprobs=0)


def host_logprob(vocab: int = 128256) -> float:
    """The double's logits row (1.0 at the next token, 0 elsewhere): the host's float32 log_softmax at its token."""
    row = torch.zeros(vocab)
    row[5] = 1.0
    return float(row.log_softmax(-1)[5])


def test_the_device_gives_the_sampled_tokens_logprob_not_top_logprobs(backend):
    """tt-metal's LogProbsCalculator computes the sampled token's log-prob on the device (one value per user,
    tt_log_probs.py @023b5d02): logprobs 0 stays on the device; top_logprobs need the host's rows."""
    assert "logprobs" in backend.caps.device_sampling
    assert backend.can_sample(LOGPROBS) and backend.can_sample(SamplingParams(temperature=0.0, logprobs=0))
    assert not backend.can_sample(SamplingParams(temperature=0.6, logprobs=1))
    assert not backend.can_sample(SamplingParams(temperature=0.6, logprobs=0, seed=1))


def test_a_checkout_whose_sampler_has_no_log_probs_sends_them_to_the_host(ttnn, hf_dir, monkeypatch):
    import dataclasses

    from models.demos.llama3_70b_galaxy.tt import generator

    older = dataclasses.make_dataclass("SamplingParams", ["temperature", "top_k", "top_p", ("seed", object, None)],
                                       frozen=True)
    monkeypatch.setattr(generator, "SamplingParams", older)
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    assert "logprobs" not in b.caps.device_sampling and not b.can_sample(LOGPROBS) and b.can_sample(GREEDY)
    b.close()


def test_decode_returns_the_devices_bfloat16_log_probs_beside_its_tokens(backend):
    from models.demos.llama3_70b_galaxy.tt.generator import device_log_probs
    a, b = list(range(5, 40)), list(range(100, 180))
    tokens, positions, active = decode_inputs([3, 17], [len(a) - 1, len(b) - 1])
    tokens[3], tokens[17] = a[-1], b[-1]
    table = empty_table(backend)
    table[3, 0], table[17, 0], table[17, 1] = 4, 6, 7
    backend.prefill(a, 0, [4], slot=3)
    backend.prefill(b, 0, [6, 7], slot=17)
    sampling = [None] * 32
    sampling[3], sampling[17] = LOGPROBS, SamplingParams(temperature=0.8)
    got, log_probs = backend.decode_logprobs(tokens, positions, table, active, sampling)
    call = last_call(backend, "decode_forward")
    assert call["sampling_params"].enable_log_probs[:18] == [False] * 3 + [True] + [False] * 14
    assert got[[3, 17]].tolist() == [expected_next(a), expected_next(b)]
    logits = torch.zeros(32, 128256)
    logits[torch.arange(32), got] = 1.0
    assert log_probs.dtype == torch.float32
    assert torch.equal(log_probs, device_log_probs(logits, got, 128 * 1024).float())
    assert log_probs[3] != 1.0 and abs(float(log_probs[3]) - host_logprob()) <= 2 ** -8 * abs(host_logprob())


def test_a_greedy_request_asking_its_logprob_keeps_the_device_off_its_argmax_program(backend):
    """tt-metal's argmax program computes no log-probs (the generator then returns ones): such a row goes with
    top-k 1 and the smallest top_p, the sampling program's argmax, which computes them."""
    tokens, positions, active = decode_inputs([1], [40])
    greedy = SamplingParams(temperature=0.0, logprobs=0)
    got, log_probs = backend.decode_logprobs(tokens, positions, empty_table(backend), active, [greedy] * 32)
    call = last_call(backend, "decode_forward")
    assert call["slot_params"][1]["top_k"] == 1 and backend.generator.sampling_mode == "sampled"
    assert abs(float(log_probs[1]) - host_logprob()) <= 2 ** -8 * abs(host_logprob())
    assert int(got[1]) == expected_next([0] * 40 + [int(tokens[1])])


def newer_format_sampling_params(monkeypatch):
    """format_sampling_params as in newer versions: a temperature-0 row becomes top-k 1 and top-p 0.0 whatever top_p
    it came with ("the compact argmax representation for greedy rows": models/common/sampling/generator.py in the
    stored version with num_logprobs, whose commit the index does not name; @5e75671c kept the row's top_p)."""
    import dataclasses

    from models.demos.llama3_70b_galaxy.tt import generator
    older = generator.format_sampling_params

    def newer(params, max_batch_size):
        formatted = older(params, max_batch_size)
        return dataclasses.replace(formatted, top_p=[0.0 if t == 0 else p for t, p in
                                                     zip(formatted.temperature, formatted.top_p)])

    monkeypatch.setattr(generator, "format_sampling_params", newer)


def test_a_greedy_request_asking_its_logprob_stays_off_the_argmax_program_of_newer_checkouts(backend, monkeypatch):
    """With newer_format_sampling_params, a greedy row asking its logprob, sent as temperature 0, made an all-greedy
    batch the argmax program's, which computes no log-probs: the generator's ones were reported as its logprob."""
    newer_format_sampling_params(monkeypatch)
    tokens, positions, active = decode_inputs([1], [40])
    rows = [SamplingParams(temperature=0.0, logprobs=0)] + [GREEDY] * 31
    got, log_probs = backend.decode_logprobs(tokens, positions, empty_table(backend), active, rows)
    assert abs(float(log_probs[1]) - host_logprob()) <= 2 ** -8 * abs(host_logprob())  # was 1.0
    assert backend.generator.sampling_mode == "sampled" and last_call(backend, "decode_forward")["compiled"] == []
    assert int(got[1]) == expected_next([0] * 40 + [int(tokens[1])])


def test_a_top_k_1_request_asking_its_logprob_stays_off_the_argmax_program(backend):
    """Temperature 1, top-k 1 and top-p 1 are the argmax program's row (_is_force_argmax_sampling, tt_sampling.py
    @0365bf78) whatever the temperature a greedy row is sent with: such a request asking its logprob, alone among
    idle rows, went there and was reported the generator's ones."""
    tokens, positions, active = decode_inputs([1], [40])
    rows = [SamplingParams(temperature=1.0, top_k=1, logprobs=0)] + [GREEDY] * 31
    got, log_probs = backend.decode_logprobs(tokens, positions, empty_table(backend), active, rows)
    assert abs(float(log_probs[1]) - host_logprob()) <= 2 ** -8 * abs(host_logprob())  # was 1.0
    assert backend.generator.sampling_mode == "sampled" and last_call(backend, "decode_forward")["compiled"] == []
    assert int(got[1]) == expected_next([0] * 40 + [int(tokens[1])])


def test_after_warmup_a_logprobs_request_compiles_nothing(backend):
    n = len(backend.generator.calls)
    tokens, positions, active = decode_inputs([1, 2], [40, 60])
    for rows in ([LOGPROBS] * 32, [SamplingParams(temperature=0.0, logprobs=0)] + [GREEDY] * 31):
        backend.decode_logprobs(tokens, positions, empty_table(backend), active, rows)
    assert [c["compiled"] for _, c in backend.generator.calls[n:]] == [[]] * 2


def test_the_doubles_prefill_returns_the_samplers_log_probs_as_the_generator_does(backend):
    """generator.py @00b0fa3f prefill_forward_text: sampled on the device, it returns (output_toks, prefill_log_probs)
    when the sampler computed log-probs (TTSampling: a user's enable_log_probs on, not the argmax program), else the
    tokens alone; reset_sampling_params gets no empty_slots there, so every user's flag is the scattered one."""
    from models.common.sampling import SamplingParams as TTSamplingParams
    from models.demos.llama3_70b_galaxy.tt.generator import device_log_probs
    prompt = list(range(10))

    def prefill(**params):
        return backend.generator.prefill_forward_text(
            torch.tensor([prompt]), page_table=torch.tensor([[1]], dtype=torch.int32), kv_cache=backend.kv_cache,
            prompt_lens=[10], sampling_params=TTSamplingParams(**params), empty_slots=[3])

    tokens, log_probs = prefill(temperature=[0.6], top_k=[20], top_p=[0.9], enable_log_probs=[True])
    assert tokens.tolist() == [expected_next(prompt)] and tokens.dtype == torch.int32
    row = torch.zeros(1, VOCAB)
    row[0, expected_next(prompt)] = 1.0
    assert log_probs.dtype == torch.bfloat16 and torch.equal(log_probs, device_log_probs(row, tokens, 128 * 1024))
    tokens_in, positions, active = decode_inputs([1], [40])
    backend.decode_logprobs(tokens_in, positions, empty_table(backend), active, [LOGPROBS] * 32)
    assert isinstance(prefill(temperature=[0.6], top_k=[20], top_p=[0.9]), torch.Tensor)  # no flag left on
    assert isinstance(prefill(temperature=[0.0], top_k=[1], top_p=[1.0], enable_log_probs=[True]), torch.Tensor)


def serve_logprobs(hf_dir, async_decode: bool, monkeypatch) -> tuple[list, list, int]:
    """MeshRunner over the backend: two slots asking logprobs 0 (one greedy) beside one that does not, over one
    work of four steps. The device's log-prob of token t is made the double's less t / 2**13 (its one-hot rows give
    every token the same), so a value delivered beside another step's token shows. Returns (each step's tokens,
    each step's logprobs by slot, decode steps that brought logits to the host)."""
    import dataclasses

    import numpy as np

    from model.runner import MeshRunner
    from scheduler.work import DecodeRound, MeshWork, PrefillChunk
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    from models.demos.llama3_70b_galaxy.tt import generator
    same = generator.device_log_probs
    monkeypatch.setattr(generator, "device_log_probs", lambda logits, tokens, padded:
                        same(logits, tokens, padded) - (tokens / 2 ** 13).to(torch.bfloat16))
    b.caps = dataclasses.replace(b.caps, async_decode=async_decode)
    runner = MeshRunner(b)
    table = np.zeros((32, 4), dtype=np.int32)
    prefills = []
    for slot, params in ((0, SamplingParams(temperature=0.0, logprobs=0, max_tokens=8)),
                         (9, SamplingParams(temperature=0.6, top_p=0.9, logprobs=0, max_tokens=8)),
                         (20, SamplingParams(temperature=0.6, max_tokens=8))):
        blocks = [slot * 4 + i for i in range(4)]
        table[slot] = blocks
        prompt = list(range(slot + 1, slot + 50))
        prefills.append(PrefillChunk(f"r{slot}", slot, prompt, 0, blocks, params, len(prompt)))
    results = list(runner.execute(MeshWork(0, prefills, DecodeRound(4, [0, 9, 20], table))))
    logits = sum(c["sampling_params"] is None for name in ("prefill_forward_text", "decode_forward")
                 for c in gen_calls(b, name))
    b.close()
    return ([list(r.tokens) for r in results],
            [{s: (lp.token_id, lp.logprob, lp.top) for s, lp in r.logprobs.items()} for r in results], logits)


@pytest.mark.parametrize("async_decode", [False, True])
def test_a_logprobs_user_is_sampled_on_the_device_from_its_first_token(ttnn, hf_dir, async_decode, monkeypatch):
    """The demo's batch-32-log-probs on the Galaxy: before, a user asking logprobs brought every row's 128k logits
    to the host each step, then (479222e) only its prefill's. Now the prefill and every decode step sample on the
    device, and each logprob is the device's (bfloat16-precise), its own token's, as tenstorrent/vllm's runner
    takes them."""
    tokens, logprobs, host_steps = serve_logprobs(hf_dir, async_decode, monkeypatch)
    assert host_steps == 0
    assert [sorted(step) for step in logprobs] == [[0], [9], []] + [[0, 9]] * 4  # 3 prefills, then 4 decode steps
    host = host_logprob()
    for i, step in enumerate(logprobs):
        for slot, (token, lp, top) in step.items():
            assert token == tokens[i][slot] and top == []
            # bfloat16: the double's value, the offset and their difference (to -26.5) each rounded
            assert lp != host - token / 2 ** 13 and lp == pytest.approx(host - token / 2 ** 13, abs=2 ** -3)


def test_prefill_logprobs_gives_the_devices_first_token_and_logprob(backend):
    from models.demos.llama3_70b_galaxy.tt.generator import device_log_probs
    prompt = list(range(10))
    token, value = backend.prefill_logprobs(prompt, 0, [0], slot=3, sampling=LOGPROBS)
    call = last_call(backend, "prefill_forward_text")
    assert call["sampling_params"].enable_log_probs == [True] and call["slot_params"][3]["top_k"] == 20
    row = torch.zeros(1, VOCAB)
    row[0, expected_next(prompt)] = 1.0
    assert token == expected_next(prompt)
    assert value == float(device_log_probs(row, torch.tensor([token]), 128 * 1024)[0])
    greedy = SamplingParams(temperature=0.0, logprobs=0)  # off the argmax program, which computes none
    assert backend.prefill_logprobs(prompt, 0, [0], slot=3, sampling=greedy) == (token, value)


def without_prefill_log_probs(monkeypatch):
    """A checkout whose prefill_forward_text returns the device's tokens alone."""
    import functools

    from models.demos.llama3_70b_galaxy.tt import generator
    plain = generator.Generator.prefill_forward_text

    @functools.wraps(plain)  # its signature too: the backend looks for start_pos
    def tokens_alone(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    monkeypatch.setattr(generator.Generator, "prefill_forward_text", tokens_alone)


def test_the_warmup_finds_a_prefill_without_log_probs_before_any_request(ttnn, hf_dir, monkeypatch):
    without_prefill_log_probs(monkeypatch)
    b = TTGalaxyBackend(hf_dir)
    n = len(b.generator.calls)
    assert b.prefill_logprobs(list(range(10)), 0, [0], slot=3, sampling=LOGPROBS) is None
    assert len(b.generator.calls) == n  # nothing ran: the runner prefills once, for host logits
    b.close()


def test_without_warmup_the_first_request_finds_it_and_gets_the_hosts_logprob(ttnn, hf_dir, monkeypatch):
    """The runner then prefills again for the logits (the same KV written again): that request alone."""
    from model.runner import MeshRunner
    from scheduler.work import MeshWork, PrefillChunk
    without_prefill_log_probs(monkeypatch)
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    runner = MeshRunner(b)
    for slot in (0, 1):
        params = SamplingParams(temperature=0.0, logprobs=0, max_tokens=8)  # the host's argmax: the double's token
        chunk = PrefillChunk(f"r{slot}", slot, list(range(10)), 0, [slot], params, 10)
        result, = runner.execute(MeshWork(slot, [chunk], None))
        assert result.tokens[slot] == expected_next(range(10))
        assert result.logprobs[slot].logprob == pytest.approx(host_logprob(), rel=1e-6)
    assert [c["sampling_params"] is None for c in gen_calls(b, "prefill_forward_text")] == [False, True, True]
    b.close()


def test_without_warmup_a_greedy_first_request_finds_a_prefill_with_log_probs_on_newer_checkouts(ttnn, hf_dir,
                                                                                                  monkeypatch):
    """Without warm-up the first prefill asking log-probs decides, for the backend's life, whether prefills give
    them. With newer_format_sampling_params, a greedy row sent as temperature 0 would be the argmax program's, which
    computes none, so a greedy first request would have sent every later one's first token to the host: the prefill
    too sends it as temperature 1, top-k 1 (_tt_sampling)."""
    from model.runner import MeshRunner
    from models.demos.llama3_70b_galaxy.tt.generator import device_log_probs
    from scheduler.work import MeshWork, PrefillChunk
    newer_format_sampling_params(monkeypatch)
    b = TTGalaxyBackend(hf_dir, tt_config={"enable_model_warmup": False})
    runner = MeshRunner(b)
    row = torch.zeros(1, VOCAB)
    row[0, expected_next(range(10))] = 1.0
    device = float(device_log_probs(row, torch.tensor([expected_next(range(10))]), 128 * 1024)[0])
    for slot, params in enumerate([SamplingParams(temperature=0.0, logprobs=0), LOGPROBS]):
        chunk = PrefillChunk(f"r{slot}", slot, list(range(10)), 0, [slot], params, 10)
        result, = runner.execute(MeshWork(slot, [chunk], None))
        assert result.tokens[slot] == expected_next(range(10))
        assert result.logprobs[slot].logprob == device != host_logprob()
        assert last_call(b, "prefill_forward_text")["sampling_params"] is not None  # one prefill, on the device
    assert len(gen_calls(b, "prefill_forward_text")) == 2 and b.generator.sampling_mode == "sampled"
    b.close()


def test_the_doubles_log_probs_are_log_softmax_to_bfloat16_precision(ttnn):
    """The double's device_log_probs (LogProbsCalculator's steps in bfloat16) against float64 log_softmax."""
    from models.demos.llama3_70b_galaxy.tt.generator import device_log_probs
    logits = torch.randn(32, 128256, generator=torch.Generator().manual_seed(0)) * 3
    tokens = logits.topk(32, dim=-1).indices[torch.arange(32), torch.arange(32)]  # each row's (r+1)-th likeliest
    got = device_log_probs(logits, tokens, 128 * 1024)
    exact = logits.double().log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    assert got.dtype == torch.bfloat16 and not torch.equal(got.double(), exact)
    assert torch.allclose(got.double(), exact, rtol=2 ** -6, atol=0.05)
