"""The torch backend's paged-cache behaviour on a tiny random model: chunked prefill, decode, batching."""
import logging

import pytest
import torch

from model.config import LlamaConfig
from model.torch_llama import TorchBackend, rope_inv_freq
from model.verify import SHORT_CONTEXT_ROPE, save_tiny_hf_model
from scheduler.sampling import SamplingParams

BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf_model(path, SHORT_CONTEXT_ROPE)
    return path


def make_backend(model_dir, **kwargs) -> TorchBackend:
    kwargs = {"num_slots": 4, "block_size": BLOCK, "num_blocks": 32, "max_seq_len": 256, "dtype": torch.float32,
              "device": "cpu", **kwargs}
    return TorchBackend(model_dir, **kwargs)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_llama3_rope_matches_transformers(model_dir):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(model_dir))
    ours = rope_inv_freq(LlamaConfig.from_dir(model_dir))
    torch.testing.assert_close(ours, expected)
    unscaled = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert (ours == unscaled).any() and (ours == unscaled / 4).any() and (ours != unscaled).any()


def test_chunked_prefill_equals_one_shot(model_dir):
    backend = make_backend(model_dir)
    tokens = prompt(70)
    whole = backend.prompt_logits(tokens, 0, [5, 1, 9, 3, 7])
    pieces = [backend.prompt_logits(tokens[:end], start, [20, 11, 30, 2, 17])
              for start, end in ((0, 13), (13, 40), (40, 70))]  # starts inside blocks
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backend.prefill(tokens, 69, [20, 11, 30, 2, 17], slot=0), whole[-1],
                               rtol=1e-5, atol=1e-5)


def test_decode_continues_a_prefill(model_dir):
    backend = make_backend(model_dir)
    tokens, blocks = prompt(50, seed=1), [8, 3, 12, 0]
    expected = backend.prompt_logits(tokens, 0, [20, 21, 22, 23])
    backend.prefill(tokens[:45], 0, blocks, slot=2)
    page_table = torch.zeros(4, backend.caps.max_blocks_per_seq, dtype=torch.int32)
    page_table[2, :4] = torch.tensor(blocks)
    active = torch.tensor([False, False, True, False])
    for pos in range(45, 50):
        ids = torch.zeros(4, dtype=torch.long)
        ids[2] = tokens[pos]
        logits = backend.decode(ids, torch.full((4,), pos), page_table, active)
        torch.testing.assert_close(logits[2], expected[pos], rtol=1e-5, atol=1e-5)


def test_batched_decode_rows_are_independent(model_dir):
    """Rows of different lengths in one step give what each gives alone."""
    backend = make_backend(model_dir)
    lengths, page_table = (20, 47, 33), torch.zeros(4, backend.caps.max_blocks_per_seq, dtype=torch.int32)
    for slot, n in enumerate(lengths):
        page_table[slot, :4] = torch.arange(4) * 4 + slot  # interleaved blocks
        backend.prefill(prompt(n, seed=slot), 0, page_table[slot, :4].tolist(), slot)
    ids, positions = torch.tensor([1, 2, 3, 0]), torch.tensor([*lengths, 0])
    batch_active = torch.tensor([True, True, True, False])
    cache = backend.kv_cache.clone()
    together = backend.decode(ids, positions, page_table, batch_active)
    for slot in range(3):
        backend.kv_cache.copy_(cache)
        alone = backend.decode(ids, positions, page_table, torch.arange(4) == slot)
        torch.testing.assert_close(together[slot], alone[slot], rtol=1e-5, atol=1e-5)


def allocated_bytes(run) -> int:
    """CPU memory the ops of `run()` allocate, each counted once (torch's profiler, self allocations)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def test_decode_gathers_the_keys_into_one_buffer(model_dir):
    """Every layer reads its keys and values into the same buffer: a new tensor per layer was a fresh mmap of
    tens of MB per layer on SmolLM2 at 32 slots, whose page faults took most of the step."""
    backend = make_backend(model_dir, num_slots=8, num_blocks=64, max_seq_len=512)
    width = backend.caps.max_blocks_per_seq
    page_table = torch.arange(8 * width, dtype=torch.int32).view(8, width) % 64
    args = (torch.ones(8, dtype=torch.long), torch.full((8,), 500), page_table, torch.ones(8, dtype=torch.bool))
    backend.decode(*args)
    cfg = backend.cfg
    # keys and values 0..500 of every row, fp32: once (plus the row indices, ~0.5x here), not once per layer
    gathered = 2 * 8 * cfg.n_kv_heads * 501 * cfg.head_dim * 4
    assert cfg.n_layers == 2 and allocated_bytes(lambda: backend.decode(*args)) < 1.75 * gathered


def test_decode_rows_do_not_read_as_many_keys_as_the_longest(model_dir):
    """One long sequence among short ones: each row reads about its own keys, not the longest row's (padded to it,
    one 8,000-token conversation made every step of 31 short ones ~12x as costly on SmolLM2); logits unchanged."""
    backend = make_backend(model_dir, num_slots=8, num_blocks=64, max_seq_len=512)
    page_table = torch.zeros(8, backend.caps.max_blocks_per_seq, dtype=torch.int32)
    page_table[0] = torch.arange(32)  # 512 tokens; the short rows one block each
    page_table[1:, 0] = torch.arange(32, 39)
    positions = torch.tensor([500, *[10] * 7])
    args = (torch.ones(8, dtype=torch.long), positions, page_table, torch.ones(8, dtype=torch.bool))
    cache = backend.kv_cache.clone()
    together = backend.decode(*args)
    cfg = backend.cfg
    long_row = 2 * cfg.n_kv_heads * 501 * cfg.head_dim * 4  # the long row's keys and values, fp32
    assert allocated_bytes(lambda: backend.decode(*args)) < 3 * long_row  # padded: 8 rows of 501 keys, ~12x
    for slot in (0, 3):
        backend.kv_cache.copy_(cache)
        alone = backend.decode(*args[:3], torch.arange(8) == slot)
        torch.testing.assert_close(together[slot], alone[slot], rtol=1e-5, atol=1e-5)


def test_inactive_rows_leave_the_cache_alone(model_dir):
    backend = make_backend(model_dir)
    page_table = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 0], [5, 6, 0, 0], [7, 8, 0, 0]], dtype=torch.int32)
    page_table = torch.nn.functional.pad(page_table, (0, backend.caps.max_blocks_per_seq - 4))
    before = backend.kv_cache.clone()
    backend.decode(torch.tensor([4, 5, 6, 7]), torch.tensor([3, 20, 5, 17]), page_table,
                   torch.tensor([False, True, False, False]))
    changed = (backend.kv_cache != before).flatten(3).any(-1).any(0).any(0)  # per block
    assert changed.nonzero().flatten().tolist() == [4]  # position 20 of slot 1 is in its second block


def test_no_active_rows_is_a_no_op(model_dir):
    backend = make_backend(model_dir)
    before = backend.kv_cache.clone()
    logits = backend.decode(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                            torch.zeros(4, backend.caps.max_blocks_per_seq, dtype=torch.int32),
                            torch.zeros(4, dtype=torch.bool))
    assert logits.shape == (4, 256) and torch.equal(backend.kv_cache, before)


def test_bf16_tracks_fp32(model_dir):
    tokens = prompt(40, seed=5)
    fp32 = make_backend(model_dir).prompt_logits(tokens, 0, [0, 1, 2])
    bf16 = make_backend(model_dir, dtype=torch.bfloat16).prompt_logits(tokens, 0, [0, 1, 2])
    assert bf16.dtype == torch.float32
    assert torch.corrcoef(torch.stack([fp32.flatten(), bf16.flatten()]))[0, 1] > 0.99


def test_capabilities_and_default_pool(model_dir):
    cfg = LlamaConfig.from_dir(model_dir)
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * BLOCK * cfg.head_dim * 4
    roomy = make_backend(model_dir, num_blocks=None, kv_cache_gb=1.0)
    assert roomy.caps.num_blocks == 4 * (256 // BLOCK)  # every slot at max_seq_len fits
    capped = make_backend(model_dir, num_blocks=None, kv_cache_gb=20 * block_bytes / 2**30)
    assert capped.caps.num_blocks == 20 and capped.kv_cache.shape[2] == 20  # more than one sequence, fewer than 4
    assert roomy.caps.device_sampling == frozenset() and roomy.caps.eos_token_ids == (2,)
    assert not roomy.can_sample(SamplingParams(temperature=0))


def test_a_max_seq_len_asked_is_held_past_the_default_cap(model_dir):
    """A larger model's max_seq_len (8,192 tokens) was cut to what the default 1 GiB of cache holds, without a word:
    the cap now yields to one sequence of a max_seq_len given (vLLM refuses a max_model_len its cache cannot hold). Left
    to the model's max_position_embeddings, the cap stands, and a warning says the context it holds."""
    cfg = LlamaConfig.from_dir(model_dir)
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * BLOCK * cfg.head_dim * 4
    tight = make_backend(model_dir, num_blocks=None, kv_cache_gb=10 * block_bytes / 2**30)
    assert tight.caps.num_blocks == 256 // BLOCK and tight.kv_cache.shape[2] == 256 // BLOCK
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("ray.serve").addHandler(handler)
    try:
        unasked = make_backend(model_dir, num_blocks=None, max_seq_len=None, kv_cache_gb=10 * block_bytes / 2**30)
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)
    assert unasked.caps.num_blocks == 10 and unasked.caps.max_seq_len == cfg.max_position_embeddings
    assert [r.getMessage() for r in records if "KV cache" in r.getMessage() and f"take {10 * BLOCK} tokens" in
            r.getMessage() and "set max_seq_len" in r.getMessage()], [r.getMessage() for r in records]


def test_a_cap_that_holds_the_models_context_exactly_is_not_warned_about(model_dir):
    """The warning says the cache holds fewer tokens than max_position_embeddings: not when it holds them all."""
    cfg = LlamaConfig.from_dir(model_dir)
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * BLOCK * cfg.head_dim * 4
    one_sequence = -(-cfg.max_position_embeddings // BLOCK)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("ray.serve").addHandler(handler)
    try:
        exact = make_backend(model_dir, num_blocks=None, max_seq_len=None,
                             kv_cache_gb=one_sequence * block_bytes / 2**30)
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)
    assert exact.caps.num_blocks == one_sequence
    assert not [r.getMessage() for r in records if "KV cache" in r.getMessage()]


def test_a_max_seq_len_between_blocks_gets_the_block_its_last_tokens_need(model_dir):
    """One sequence is max_seq_len rounded up to whole blocks: rounded down, a max_seq_len of 17 blocks' tokens
    plus one was given 17 blocks, and a sequence that long found no block for its last token."""
    cfg = LlamaConfig.from_dir(model_dir)
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * BLOCK * cfg.head_dim * 4
    tight = make_backend(model_dir, num_blocks=None, max_seq_len=17 * BLOCK + 1, kv_cache_gb=block_bytes / 2**30)
    roomy = make_backend(model_dir, num_blocks=None, max_seq_len=17 * BLOCK + 1, kv_cache_gb=1.0)
    assert (tight.caps.num_blocks, roomy.caps.num_blocks) == (18, 4 * 18)


def test_a_cap_under_one_block_still_gives_the_cache_a_block(model_dir):
    """kv_cache_gb under one block's bytes, with max_seq_len left to the model: a cache of no blocks could hold
    no prompt at all; one block holds a short one."""
    backend = make_backend(model_dir, num_blocks=None, max_seq_len=None, kv_cache_gb=0.0)
    assert backend.caps.num_blocks == 1 and backend.kv_cache.shape[2] == 1


def test_sizes_past_the_slot_ceiling_or_the_memory_are_refused_naming_the_field(model_dir):
    """A mistyped size was accepted: 1,024 slots (logits [1024, vocab] each step), or a cache larger than the host,
    which failed as the allocator's RuntimeError naming nothing (or, under the host's memory, got the mesh killed)."""
    import os
    cfg = LlamaConfig.from_dir(model_dir)
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * BLOCK * cfg.head_dim * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(ValueError, match="^num_slots: "):
        make_backend(model_dir, num_slots=1024)
    with pytest.raises(ValueError, match="^num_blocks: .* more than the .* GiB of memory cpu has"):
        make_backend(model_dir, num_blocks=2 * memory // block_bytes)
    with pytest.raises(ValueError, match=r"^max_seq_len: \d+ tokens need \d+ blocks .* GiB of memory cpu has"):
        make_backend(model_dir, num_blocks=None, max_seq_len=2 * memory // block_bytes * BLOCK)
    assert make_backend(model_dir, num_slots=256).caps.num_slots == 256


def test_host_sampling_only(model_dir):
    backend = make_backend(model_dir)
    with pytest.raises(ValueError, match="host"):
        backend.prefill(prompt(4), 0, [0], 0, sampling=SamplingParams())


def test_bad_prefill_arguments(model_dir):
    backend = make_backend(model_dir)
    with pytest.raises(ValueError, match="blocks"):
        backend.prefill(prompt(40), 0, [0, 1], 0)
    with pytest.raises(ValueError, match="start"):
        backend.prefill(prompt(4), 4, [0], 0)


def test_tied_checkpoint_shares_the_embedding(tmp_path):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    config = HFConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    backend = make_backend(tmp_path, num_slots=1, num_blocks=2)
    assert backend.model.lm_head.weight is backend.model.embed.weight
    with torch.no_grad():
        expected = hf(torch.tensor([[1, 2, 3]])).logits[0]
    torch.testing.assert_close(backend.prompt_logits([1, 2, 3], 0, [1]), expected, rtol=1e-4, atol=1e-5)


def test_incomplete_checkpoint_is_refused(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    with pytest.raises(ValueError, match="lacks 1"):
        make_backend(tmp_path)


def test_logits_equal_transformers_with_the_checkpoints_norm_eps(tmp_path):
    """RMSNorm takes the checkpoint's rms_norm_eps: against activations of a 0.02-scale init, an eps of 1e-3 moves
    every logit, which the verify bar's correlation of 0.9999 let pass when it was ignored."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    config = HFConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-3)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    backend = make_backend(tmp_path, num_slots=1, num_blocks=3)
    tokens = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(backend.prompt_logits(tokens, 0, [2, 0, 1]), expected, rtol=1e-4, atol=1e-5)


def test_bf16_error_does_not_grow_along_a_long_prompt(model_dir):
    """Rotary angles are computed in fp32 whatever the cache's dtype (as transformers does): with frequencies
    rounded to bf16, a position p's angle is off by p times the rounding, and bf16's error from fp32 at the end of
    2,048 tokens was twice that at their start."""
    n = 2048
    tokens = prompt(n, seed=5)
    fp32, bf16 = (make_backend(model_dir, num_slots=1, block_size=64, num_blocks=n // 64, max_seq_len=n, dtype=dtype)
                  .prompt_logits(tokens, 0, list(range(n // 64))) for dtype in (torch.float32, torch.bfloat16))
    error = (fp32 - bf16).abs()
    assert error[-64:].mean() < 1.3 * error[:64].mean()
