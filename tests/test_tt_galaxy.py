"""The TT Galaxy backend against a double of ttnn and of tt-metal's Galaxy generator (tests/tt_double)."""
import os
import sys
from pathlib import Path

import pytest
import torch

from model.simulated import published_figures
from model.tt_galaxy import TTGalaxyBackend, TTMeshConfig
from scheduler.sampling import SamplingParams

DOUBLE = Path(__file__).parent / "tt_double"
GREEDY = SamplingParams(temperature=0.0)


def _forget_double():
    for name in list(sys.modules):
        if name in ("ttnn", "models") or name.startswith(("ttnn.", "models.")):
            del sys.modules[name]


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    """An HF model folder, a private environment, and the double importable as ttnn + tt-metal."""
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("HF_MODEL", "LLAMA_DIR", "LINE_RS", "LINE_AG")})
    monkeypatch.syspath_prepend(str(DOUBLE))
    _forget_double()
    yield tmp_path
    _forget_double()


@pytest.fixture
def ttnn(hf_dir):
    import ttnn
    ttnn.calls.clear()
    return ttnn


@pytest.fixture
def backend(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir)
    yield b
    b.close()


def last_call(backend, name):
    return [kwargs for n, kwargs in backend.generator.calls if n == name][-1]


def decode_inputs(active_slots, positions):
    active = torch.zeros(32, dtype=torch.bool)
    active[active_slots] = True
    pos = torch.zeros(32, dtype=torch.long)
    pos[active_slots] = torch.tensor(positions)
    return torch.arange(32, dtype=torch.long) * 10, pos, active


# --- opening, building, closing ----------------------------------------------------------------------

def test_config_defaults_are_the_seeds():
    seed = published_figures()["mesh_open_defaults_from_seed"]
    config = TTMeshConfig()
    assert config.mesh_shape == (8, 4)
    assert {k: getattr(config, k) for k in seed} == seed


def test_mesh_opens_with_fabric_first_and_the_seed_settings(backend, ttnn):
    names = [name for name, _ in ttnn.calls]
    assert names.index("set_fabric_config") < names.index("open_mesh_device")
    assert ttnn.calls[names.index("set_fabric_config")][1]["fabric_config"] == ttnn.FabricConfig.FABRIC_1D_RING
    opened = ttnn.calls[names.index("open_mesh_device")][1]
    assert opened["mesh_shape"] == (8, 4)
    assert opened["dispatch_core_config"].axis == ttnn.DispatchCoreAxis.COL
    assert (opened["trace_region_size"], opened["worker_l1_size"], opened["num_command_queues"]) == \
        (95693824, 1344544, 1)


def test_mesh_settings_come_from_the_config(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, mesh_shape=(4, 8), tt_config={"dispatch_core_axis": "row",
                                                            "fabric_config": "DISABLED", "trace_region_size": 7})
    opened = dict(ttnn.calls)["open_mesh_device"]
    assert opened["mesh_shape"] == (4, 8) and opened["trace_region_size"] == 7
    assert opened["dispatch_core_config"].axis == ttnn.DispatchCoreAxis.ROW
    assert "set_fabric_config" not in dict(ttnn.calls)
    b.close()
    assert "set_fabric_config" not in dict(ttnn.calls)


def test_model_is_built_as_generator_vllm_builds_it(backend, ttnn):
    args = backend.generator.model_args
    assert (args.max_batch_size, args.max_seq_len, args.instruct, args.optimizations.bfp4_mlp) == \
        (32, 131072, True, True)
    built = backend.generator.model.built_with
    assert built["use_paged_kv_cache"] and built["mode"] == "prefill" and built["dtype"] == ttnn.bfloat8_b
    assert built["enable_prefetcher_performance_mode"] and built["paged_attention_config"] is None
    caps = backend.caps
    assert (caps.num_slots, caps.block_size, caps.num_blocks, caps.max_seq_len, caps.prefix_align,
            caps.vocab_size) == (32, 64, 2080, 131072, 128, 128256)


def test_kv_cache_has_one_spare_block_per_layer_k_and_v(backend, ttnn):
    allocs = [kw for name, kw in ttnn.calls if name == "as_tensor"]
    assert len(allocs) == 80 * 2 and len(backend.kv_cache) == 1 and len(backend.kv_cache[0]) == 80
    assert {kw["shape"] for kw in allocs} == {(2081, 1, 64, 128)}  # 2080 usable + device block 0
    assert {(kw["dtype"], kw["layout"], kw["memory_config"]) for kw in allocs} == \
        {(ttnn.bfloat8_b, ttnn.TILE_LAYOUT, ttnn.DRAM_MEMORY_CONFIG)}
    assert all(isinstance(kw["mesh_mapper"], ttnn.ReplicateTensorToMesh) for kw in allocs)


def test_num_layers_and_sizes_are_configurable(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, num_layers=2, num_blocks=100, max_seq_len=4096)
    assert len(b.kv_cache[0]) == 2 and b.kv_cache[0][0][0].shape == (101, 1, 64, 128)
    assert (b.caps.num_blocks, b.caps.max_seq_len, b.generator.model_args.max_seq_len) == (100, 4096, 4096)
    b.close()


def test_close_releases_generator_then_mesh_then_fabric(backend, ttnn):
    backend.close()
    names = [name for name, _ in ttnn.calls]
    assert names[-3:] == ["tt_ccl.close", "close_mesh_device", "set_fabric_config"]
    assert ttnn.calls[-1][1]["fabric_config"] == ttnn.FabricConfig.DISABLED
    backend.close()  # a second close does nothing (the double refuses closing a mesh twice)


def test_a_failed_build_closes_the_mesh(ttnn, hf_dir, monkeypatch):
    from models.demos.llama3_70b_galaxy.tt import model_config
    monkeypatch.setattr(model_config.TtModelArgs, "load_state_dict", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        TTGalaxyBackend(hf_dir)
    assert [name for name, _ in ttnn.calls][-2:] == ["close_mesh_device", "set_fabric_config"]


def test_weights_folder_is_exported_where_tt_metal_reads_it(ttnn, hf_dir, tmp_path_factory):
    TTGalaxyBackend(hf_dir).close()
    assert os.environ["HF_MODEL"] == str(hf_dir) and "LLAMA_DIR" not in os.environ
    meta = tmp_path_factory.mktemp("meta")
    (meta / "params.json").write_text("{}")
    TTGalaxyBackend(meta).close()  # the double, like tt-metal, refuses HF_MODEL and LLAMA_DIR together
    assert os.environ["LLAMA_DIR"] == str(meta) and "HF_MODEL" not in os.environ


def test_no_weights_is_a_clear_error(ttnn):
    with pytest.raises(ValueError, match="HF_MODEL"):
        TTGalaxyBackend()


def test_line_rs_and_line_ag_reach_tt_metal_ccl(ttnn, hf_dir):
    TTGalaxyBackend(hf_dir, tt_config={"line_rs": True, "line_ag": False}).close()
    from models.demos.llama3_70b_galaxy.tt import llama_ccl
    assert (llama_ccl.LINE_RS, llama_ccl.LINE_AG) == (True, False)


def test_missing_ttnn_names_the_extra_and_python_versions(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ttnn", None)
    with pytest.raises(ImportError, match=r"meshserve\[tt\]") as err:
        TTGalaxyBackend(hf_dir)
    assert "3.10" in str(err.value) and "3.12" in str(err.value)


def test_missing_checkout_names_pythonpath_and_closes_the_mesh(ttnn, hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "models", None)
    with pytest.raises(ImportError, match="PYTHONPATH"):
        TTGalaxyBackend(hf_dir)
    assert "close_mesh_device" in dict(ttnn.calls)


def test_only_32_slots(ttnn, hf_dir):
    with pytest.raises(ValueError, match="32"):
        TTGalaxyBackend(hf_dir, num_slots=8)


# --- prefill -----------------------------------------------------------------------------------------

def test_prefill_maps_tokens_blocks_slot_and_trace(backend):
    prompt = list(range(1000, 1300))
    token = backend.prefill(prompt, 0, [7, 3, 9, 1, 5], slot=5, sampling=GREEDY)
    call = last_call(backend, "prefill_forward_text")
    assert call["tokens"].shape == (1, 300) and call["tokens"].dtype == torch.long
    assert call["page_table"].tolist() == [[8, 4, 10, 2, 6]] and call["page_table"].dtype == torch.int32
    assert (call["prompt_lens"], call["empty_slots"], call["start_pos"], call["enable_trace"]) == \
        ([300], [5], [0], True)
    assert token.dim() == 0 and token.dtype == torch.long and int(token) == 1300  # the double: last + 1


def test_prefill_padding_writes_only_the_spare_device_block(backend):
    backend.prefill(list(range(300)), 0, [0, 1, 2, 3, 4], slot=0, sampling=GREEDY)
    written = last_call(backend, "prefill_forward_text")["written_blocks"][0]
    # 300 tokens pad to 1024 = 16 blocks: the caller's 5 (shifted by one) and 11 of padding in block 0
    assert written == [1, 2, 3, 4, 5] + [0] * 11


@pytest.mark.parametrize("start, expected", [(0, 0), (128, 128), (200, 128), (256, 256), (320, 256)])
def test_prefill_continuation_starts_at_the_aligned_prefix(backend, start, expected):
    backend.prefill(list(range(512)), start, list(range(8)), slot=2, sampling=GREEDY)
    assert last_call(backend, "prefill_forward_text")["start_pos"] == [expected]


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
    assert logits.shape == (128256,) and logits.dtype == torch.float32 and int(logits.argmax()) == 10


def test_decode_only_mode_samples_the_first_token_on_the_host(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, tt_config={"sample_on_device_mode": "decode_only"})
    token = b.prefill(list(range(10)), 0, [0], slot=0, sampling=GREEDY)
    assert last_call(b, "prefill_forward_text")["sampling_params"] is None and int(token) == 10
    b.close()


# --- decode ------------------------------------------------------------------------------------------

def test_decode_maps_fixed_page_table_positions_and_inactive_slots(backend):
    tokens, positions, active = decode_inputs([0, 5, 31], [70, 128, 4000])
    table = torch.zeros(32, backend.caps.max_blocks_per_seq, dtype=torch.int32)
    table[0, :2], table[5, :3], table[31, :63] = torch.tensor([4, 6]), torch.tensor([9, 8, 7]), torch.arange(63)
    out = backend.decode(tokens, positions, table, active, [GREEDY] * 32)
    call = last_call(backend, "decode_forward")
    assert call["page_table"].shape == (32, 2048) and call["page_table"].dtype == torch.int32
    assert torch.equal(call["page_table"], table + 1)
    assert call["start_pos"].tolist() == [70 if s == 0 else 128 if s == 5 else 4000 if s == 31 else -1
                                          for s in range(32)]
    assert call["written"] == {0: (7, 6), 5: (8, 0), 31: (63, 32)}  # device block = caller block + 1
    assert (call["enable_trace"], call["read_from_device"], call["reset_inputs"]) == (True, True, True)
    assert out.shape == (32,) and out.dtype == torch.long
    assert out[[0, 5, 31]].tolist() == [1, 51, 311]  # the double: fed token + 1


def test_decode_sampling_params_per_slot_and_greedy_padding(backend):
    tokens, positions, active = decode_inputs([3, 4], [10, 10])
    table = torch.zeros(32, backend.caps.max_blocks_per_seq, dtype=torch.int32)
    sampling = [None] * 32
    sampling[3] = SamplingParams(temperature=0.8, top_k=0, top_p=0.95, seed=7)
    sampling[4] = GREEDY
    backend.decode(tokens, positions, table, active, sampling)
    call = last_call(backend, "decode_forward")
    slots = call["slot_params"]
    assert (slots[3]["temperature"], slots[3]["top_k"], slots[3]["top_p"], slots[3]["seed"]) == (0.8, 32, 0.95, 7)
    assert all(slots[s]["temperature"] == 0 and slots[s]["top_k"] == 1 for s in range(32) if s != 3)
    assert len(call["sampling_params"].temperature) == 32


def test_decode_without_sampling_returns_logits(backend):
    tokens, positions, active = decode_inputs([1], [5])
    table = torch.zeros(32, backend.caps.max_blocks_per_seq, dtype=torch.int32)
    logits = backend.decode(tokens, positions, table, active)
    assert last_call(backend, "decode_forward")["sampling_params"] is None
    assert logits.shape == (32, 128256) and logits.dtype == torch.float32 and int(logits[1].argmax()) == 11


def test_older_generators_decode_through_decode_forward_text(ttnn, hf_dir, monkeypatch):
    from models.demos.llama3_70b_galaxy.tt.generator import Generator
    monkeypatch.setattr(Generator, "decode_forward_text", Generator.decode_forward, raising=False)
    monkeypatch.delattr(Generator, "decode_forward")
    b = TTGalaxyBackend(hf_dir)
    tokens, positions, active = decode_inputs([0], [3])
    table = torch.zeros(32, b.caps.max_blocks_per_seq, dtype=torch.int32)
    assert int(b.decode(tokens, positions, table, active, [GREEDY] * 32)[0]) == 1
    b.close()


# --- what runs on the device ----------------------------------------------------------------------------

def test_device_samples_temperature_top_k_top_p_seed_not_penalties_or_logprobs(backend):
    assert backend.can_sample(GREEDY)
    assert backend.can_sample(SamplingParams(temperature=0.6, top_k=10, top_p=0.9, seed=1))
    assert not backend.can_sample(SamplingParams(repetition_penalty=1.1))
    assert not backend.can_sample(SamplingParams(presence_penalty=0.5))
    assert not backend.can_sample(SamplingParams(logprobs=2))


def test_no_device_sampling_mode_sends_everything_to_the_host(ttnn, hf_dir):
    b = TTGalaxyBackend(hf_dir, tt_config={"sample_on_device_mode": None})
    assert not b.can_sample(GREEDY) and b.caps.device_sampling == frozenset()
    b.close()
