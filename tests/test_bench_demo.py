"""bench.demo: the Galaxy demo's presets and options, run through the engine core on the simulated and torch
backends (tiny runs; figures are printed, never asserted)."""
import json
import shutil

import pytest

from bench import demo


def run_json(capsys, *argv: str) -> dict:
    demo.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def prompt_file(tmp_path):
    """Three questions of clearly different lengths, so rotation between batches shows in prompt_tokens."""
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "Hi."}, {"prompt": "Name three birds that nest on sea cliffs."},
                                {"prompt": "Describe, in a few sentences, how a lighthouse lamp is kept "
                                           "burning through a long winter night at sea."}]))
    return path


def test_presets_mirror_the_galaxy_demo():
    for name, preset in demo.PRESETS.items():
        settings = demo.resolve(demo.parse_args(["--preset", name]))
        assert settings == preset and settings.input_prompts.is_file()
        assert (settings.max_generated_tokens, settings.repeat_batches, settings.block_size, settings.max_blocks,
                settings.instruct, settings.stop_at_eos) == (128, 2 if name.endswith("repeat2") else 1, 64, None, True,
                                                             False)
        assert settings.batch_size == (32 if "batch-32" in name or name.endswith("b32") else 1)
        sampling = (settings.temperature, settings.top_p)
        assert sampling == {"performance-long-8k-b1": (1.0, 0.04), "performance-batch-1": (0.0, 0.05)}.get(
            name, (0.0, 0.08))
        assert bool(settings.per_user) == ("non-uniform" in name or "log-probs" in name)


def test_non_uniform_presets_give_each_user_the_demos_own_parameters():
    """text_demo.py: temperature linspace(0, 1, 32), top_p linspace(0.08, 1, 32), top_k 1..32, penalties
    linspace(-2, 2, 32) (repetition 0.8-1.5); the log-probs preset asks each token's log-probability."""
    users = demo.sampling(demo.resolve(demo.parse_args(["--preset", "performance-batch-32-non-uniform-sampling"])))
    assert len(users) == 32 and len({u.seed for u in users}) == 32
    assert [(u.temperature, u.top_p, u.top_k) for u in (users[1], users[31])] == [(1 / 31, 0.08 + 0.92 / 31, 2),
                                                                                  (1.0, 1.0, 32)]
    # user 0 is greedy: argmax ignores its top_p 0.08 and top_k 1, which go back to their defaults (as in vLLM)
    assert users[0] == demo.SamplingParams(**{**users[0].model_dump(), "top_p": 0.08, "top_k": 1, "seed": 0})
    assert users[0].temperature == 0.0 and (users[0].top_p, users[0].top_k, users[0].seed) == (1.0, 0, None)
    assert users[0].presence_penalty == users[0].frequency_penalty == -2.0 and users[31].presence_penalty == 2.0
    assert (users[0].repetition_penalty, users[31].repetition_penalty) == (0.8, 1.5)
    assert abs(users[16].temperature - 16 / 31) < 1e-12 and users[16].logprobs is None
    logprobs = demo.sampling(demo.resolve(demo.parse_args(["--preset", "performance-batch-32-log-probs"])))
    assert all(u.logprobs == 0 and u.presence_penalty == 0.0 for u in logprobs) and logprobs[5].top_k == 6
    # an option on the command line is every user's: the preset's list for it no longer applies
    given = demo.sampling(demo.resolve(demo.parse_args(["--preset", "performance-batch-32-log-probs",
                                                        "--temperature", "0.5", "--batch-size", "4"])))
    assert [(u.temperature, u.top_k) for u in given] == [(0.5, 1), (0.5, 2), (0.5, 3), (0.5, 4)]


def test_a_non_uniform_batch_runs_every_users_parameters(capsys):
    rep = run_json(capsys, "--preset", "performance-batch-32-non-uniform-sampling", "--time-scale", "0.001",
                   "--max-generated-tokens", "3")
    assert rep["output_tokens"] == 96 and rep["published"] == {}
    assert rep["settings"]["per_user"]["top_k"] == list(range(1, 33))


def test_command_line_options_override_the_preset(prompt_file):
    args = demo.parse_args(["--preset", "performance-long-8k-b1", "--batch-size", "4", "--no-instruct",
                            "--temperature", "0.5", "--max-blocks", "100", "--stop-at-eos",
                            "--input-prompts", str(prompt_file)])
    settings = demo.resolve(args)
    assert (settings.batch_size, settings.instruct, settings.temperature, settings.max_blocks,
            settings.stop_at_eos, settings.input_prompts) == (4, False, 0.5, 100, True, prompt_file)
    assert settings.top_p == 0.04  # not given: the preset's
    assert settings.published_input_tokens is None  # other prompts: the published row no longer applies


def test_backends_size_their_own_pools_unless_told_and_num_layers_needs_tt_galaxy():
    for backend in ("torch", "simulated", "tt_galaxy"):
        assert demo.resolve(demo.parse_args(["--backend", backend])).max_blocks is None
        assert demo.resolve(demo.parse_args(["--backend", backend, "--max-blocks", "9"])).max_blocks == 9
    with pytest.raises(SystemExit):
        demo.parse_args(["--backend", "simulated", "--num-layers", "1"])


@pytest.mark.parametrize("layers", ["0", "81"])
def test_num_layers_is_held_to_llama_3_70bs_80_as_at_deploy(layers, capsys):
    """The serve app refuses num_layers past 80 (Llama 3 70B's) and below 1 (AppConfig); the demo took --num-layers 81
    and 0 to the backend, which opened the mesh and ran them over the double, where tt-metal would build a model the
    checkpoint has no weights for."""
    with pytest.raises(SystemExit) as exited:
        demo.parse_args(["--backend", "tt_galaxy", "--num-layers", layers])
    assert exited.value.code == 2 and f"--num-layers: 1 to 80 (Llama 3 70B's layers), not {layers}" in \
        capsys.readouterr().err
    assert demo.parse_args(["--backend", "tt_galaxy", "--num-layers", "80"]).num_layers == 80


@pytest.mark.parametrize("max_length", [15_000, 1_000])
def test_batch_32_cuts_each_users_context_like_the_demo(tmp_path, max_length):
    """text_demo.py's load_inputs clips each context to its per-user length at batch 32 in place of the entry's
    max_length (`max_length if batch == 1 else len_per_batch[i]`): a file's max_length of 1,000 capped users 2 and 3
    at 1,000 characters here, where the demo gives them 4,444 and 13,332. At batch 1 the file's max_length holds."""
    (tmp_path / "book.txt").write_text("x" * 20_000)
    path = tmp_path / "book.json"
    path.write_text(json.dumps([{"prompt": "Q?", "context": "book.txt", "max_length": max_length}]))
    settings = demo.resolve(demo.parse_args(["--input-prompts", str(path), "--batch-size", "32"]))
    contexts = [len(p) - len("``````\n\nQ?") for p in demo.demo_prompts(settings)]
    assert contexts == [534, 1008, 4444, 13332] * 8
    single = demo.resolve(demo.parse_args(["--input-prompts", str(path), "--batch-size", "1"]))
    assert [len(p) for p in demo.demo_prompts(single)] == [max_length + len("``````\n\nQ?")]


def test_simulated_run_reports_every_batch_and_rotates_prompts(capsys, prompt_file):
    rep = run_json(capsys, "--backend", "simulated", "--time-scale", "0.001", "--input-prompts", str(prompt_file),
                   "--batch-size", "3", "--repeat-batches", "2", "--max-generated-tokens", "5", "--print-outputs")
    assert [b["batch"] for b in rep["batches"]] == [0, 1]
    for b in rep["batches"]:
        assert [(u["output_tokens"], u["finish_reason"]) for u in b["users"]] == [(5, "length")] * 3
        assert b["prefill_s"] > 0 and b["ttft_ms"] > 0 and b["decode_tokens_per_s_per_user"] > 0
    first, second = rep["batches"]
    # Batch 1 gives user u the prompt of user u + 1; the simulated tokens depend only on the sequence.
    rotated = first["users"][1:] + first["users"][:1]
    pairs = [(u["prompt_tokens"], u["output"]) for u in second["users"]]
    assert pairs == [(u["prompt_tokens"], u["output"]) for u in rotated]
    assert len(set(u["prompt_tokens"] for u in first["users"])) == 3
    assert rep["output_tokens"] == 30 and rep["published"] == {} and rep["device_busy"] is not None


def test_batch_32_preset_compares_with_the_published_rows(capsys):
    rep = run_json(capsys, "--backend", "simulated", "--time-scale", "0.001")
    (batch,) = rep["batches"]
    assert len(batch["users"]) == 32 and rep["output_tokens"] == 32 * 128
    assert set(rep["published"]) == {"by_input_length[128]", "headline_batch32_input128"}
    for row in rep["published"].values():
        assert row["ttft_rel_diff"] == pytest.approx(rep["ttft_ms"] / row["ttft_ms"] - 1)


def test_only_the_published_run_is_compared_with_the_published_figures(capsys):
    """Another batch size than the preset's is another run (long-4k-b1 at batch 32 cuts its contexts)."""
    rep = run_json(capsys, "--preset", "performance-long-4k-b1", "--batch-size", "32", "--time-scale", "0.001",
                   "--max-generated-tokens", "2")
    assert rep["published"] == {} and rep["output_tokens"] == 64


@pytest.mark.parametrize("tokens", ["1024", "3"])
def test_a_run_of_another_length_is_not_compared_with_the_published_figures(tokens):
    """The published tokens/s/user is the mean over the demo's 128 generated tokens. 1,024 tokens decode at longer
    contexts (batch 32: ~62 tok/s/user on the simulated mesh, against the row's 70), and the report printed the gap
    (-11%) where it stands for the stack's own overhead (`--max_generated_tokens 1024`, as the demo's evals run)."""
    assert demo.resolve(demo.parse_args(["--max-generated-tokens", tokens])).published_input_tokens is None
    assert demo.resolve(demo.parse_args(["--max-generated-tokens", "128"])).published_input_tokens == 128


@pytest.mark.parametrize("option, message", [
    (["--block-size", "0"], "--block-size must be at least 1"),
    (["--max-seq-len", "0"], "--max-seq-len must be at least 1"),  # ran at 128k, the report saying max_seq_len 0
    (["--max-blocks", "-1"], "--max-blocks must be at least 1"),  # "negative dimensions are not allowed"
    (["--block-size", "48"], r"\(--block-size 48\): prefix_align"),
    (["--top-p", "0"], "--top-p: Input should be greater than 0"),
    (["--temperature", "-1"], "--temperature: Input should be greater than or equal to 0"),
])
def test_bad_options_are_usage_errors_not_tracebacks(option, message):
    with pytest.raises(SystemExit, match=message):
        demo.main(["--time-scale", "0.001", "--max-generated-tokens", "2", *option])


@pytest.mark.parametrize("flag", ["--temperature", "--top-p"])
def test_a_number_that_is_not_finite_is_named_so(flag, capsys):
    """NaN passed every bound's comparison but one, so SamplingParams said "less than or equal to 100"."""
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args([flag, "nan"])
    assert exit_.value.code == 2 and f"argument {flag}: must be a finite number, not nan" in capsys.readouterr().err


def test_a_model_folder_without_a_tokenizer_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="cannot open the simulated backend"):
        demo.main(["--model", str(tmp_path), "--time-scale", "0.001", "--max-generated-tokens", "2"])


def test_text_report_has_the_demos_lines(capsys, prompt_file):
    demo.main(["--backend", "simulated", "--time-scale", "0.001", "--input-prompts", str(prompt_file),
               "--batch-size", "2", "--max-generated-tokens", "4"])
    out = capsys.readouterr().out
    assert "batch 0: prompts" in out and "TTFT (avg)" in out
    assert "Average Time to First Token (TTFT):" in out and "tok/s/user" in out and "Total: 8 tokens" in out


def test_a_batch_larger_than_the_kv_pool_is_refused(prompt_file):
    with pytest.raises(SystemExit, match="a KV group needs"):
        demo.main(["--backend", "simulated", "--time-scale", "0.001", "--input-prompts", str(prompt_file),
                   "--batch-size", "3", "--max-blocks", "2"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer (its vocabulary size), as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.embedded import ensure_smollm2

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_smollm2() / name, path / name)
    return path


def test_torch_backend_runs_the_demo(capsys, prompt_file, tiny_model):
    rep = run_json(capsys, "--backend", "torch", "--model", str(tiny_model), "--input-prompts", str(prompt_file),
                   "--batch-size", "2", "--max-generated-tokens", "4", "--max-blocks", "16",
                   "--temperature", "0.8", "--seed", "7")
    (batch,) = rep["batches"]
    assert [u["output_tokens"] for u in batch["users"]] == [4, 4]
    assert rep["time_scale"] is None and rep["device_busy"] is None and rep["settings"]["seed"] == 7


def test_a_cpu_model_is_not_compared_with_the_galaxys_figures(capsys, tiny_model):
    rep = run_json(capsys, "--backend", "torch", "--model", str(tiny_model), "--max-generated-tokens", "2",
                   "--max-blocks", "96")  # the batch-32 preset, whose run the published figures are
    assert rep["published"] == {} and rep["output_tokens"] == 64


@pytest.fixture
def llama_70b_config(tmp_path):
    """A folder with Llama 3 70B's config.json and a tokenizer, no weights: what the Galaxy backend checks before
    tt-metal reads the weights itself."""
    from transformers import LlamaConfig

    from model.embedded import ensure_llama3_tokenizer

    LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_llama3_tokenizer() / name, tmp_path / name)
    return tmp_path


def test_the_galaxy_backend_without_ttnn_says_what_to_install(monkeypatch, llama_70b_config):
    """One line, not an ImportError's traceback: the ttnn built from the tt-metal checkout, in its python_env (it
    named a `tt` extra, whose PyPI ttnn is built from another commit than the checkout's models)."""
    import os
    import sys

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the backend exports the folder as HF_MODEL
    monkeypatch.setitem(sys.modules, "ttnn", None)  # not importable, as on every host without a Galaxy
    with pytest.raises(SystemExit) as exited:
        demo.main(["--backend", "tt_galaxy", "--model", str(llama_70b_config)])
    said = str(exited.value.code)
    assert "built from the tt-metal checkout" in said and "python_env" in said and "3.10 or 3.12" in said
    assert "meshserve[tt]" not in said


def test_a_torch_model_is_held_to_its_own_context(tmp_path, tiny_model):
    """The presets' max_seq_len, 128k (Llama 3.3's), went to the torch backend as is: a model of 4,096 positions
    (SmolLM2: 8,192) prefilled a longer prompt at positions its rope was never trained on, where the serve app
    refuses such a max_seq_len as vLLM does. It now runs at the model's context unless told, and is told no more."""
    prompts = tmp_path / "long.json"
    prompts.write_text(json.dumps([{"prompt": "word " * 5000}]))
    run = ["--backend", "torch", "--model", str(tiny_model), "--input-prompts", str(prompts), "--batch-size", "1",
           "--max-generated-tokens", "2"]
    with pytest.raises(SystemExit, match="exceeds max_seq_len 4096"):
        demo.main(run)
    with pytest.raises(SystemExit, match=r"--max-seq-len 8192 is beyond the model's context \(4096 tokens"):
        demo.main([*run, "--max-seq-len", "8192"])


def test_the_torch_demo_keeps_the_default_cache_unless_given_a_length(monkeypatch, capsys, prompt_file, tiny_model):
    """The demo gave the torch backend the model's whole context as a max_seq_len asked (the presets' 128k, cut to
    it), which the backend now holds past its 1 GiB default cap: a 128k-context model's cache, 8 GiB for a 1B in
    fp32, taken without --max-seq-len, or a refusal naming a max_seq_len never given. Unless told a length, the cap
    stands (the backend warns of the context it holds); told one, the cache holds a sequence of it."""
    from model import torch_llama
    from model.config import LlamaConfig

    cfg = LlamaConfig.from_dir(tiny_model)
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * 64 * cfg.head_dim * 4
    built = []

    class Capped(torch_llama.TorchBackend):  # a cap of 16 blocks (1,024 tokens), under the model's 4,096
        def __init__(self, *args, **kwargs):
            super().__init__(*args, kv_cache_gb=16 * block_bytes / 2**30, **kwargs)
            built.append(self.caps)

    monkeypatch.setattr(torch_llama, "TorchBackend", Capped)
    run = ["--backend", "torch", "--model", str(tiny_model), "--input-prompts", str(prompt_file), "--batch-size", "1",
           "--max-generated-tokens", "2"]
    assert run_json(capsys, *run)["settings"]["max_seq_len"] == 4096
    assert (built[-1].num_blocks, built[-1].max_seq_len) == (16, 4096)
    run_json(capsys, *run, "--max-seq-len", "2048")
    assert (built[-1].num_blocks, built[-1].max_seq_len) == (2048 // 64, 2048)


def test_users_of_one_batch_share_no_prefix_cache(monkeypatch):
    """The Galaxy demo prefills every user in full (a page table each, no prefix cache). Users of one batch with the
    same prompt (performance-long-16k-b32: 8 users per context length; any file shorter than the batch) hit the
    prefix cache of those before them in their KV group, so their prefill, the TTFT reported, was short by up to
    3,840 of 3,850 tokens."""
    cached = []
    batch_result = demo.batch_result

    def spy(batch, start, sequences, *args):
        cached.extend(seq.num_cached_tokens for seq in sequences)
        return batch_result(batch, start, sequences, *args)

    monkeypatch.setattr(demo, "batch_result", spy)
    demo.main(["--preset", "performance-long-4k-b1", "--batch-size", "8", "--time-scale", "0.001",
               "--max-generated-tokens", "2", "--repeat-batches", "2", "--json"])
    assert cached == [0] * 16  # nor the users of the batch before (the demo zeroes its KV cache between batches)


def test_the_summary_is_the_first_batchs_as_in_the_demo():
    """The demo's summary lines ("Average Time to First Token", "Average speed") are batch 0's figures (its
    profiler's steps at iteration 0); repeat batches only print their outputs. An average over batches was
    another figure under the demo's label."""
    args = demo.parse_args(["--preset", "performance-repeat2"])
    settings = demo.resolve(args)
    users = [demo.UserResult(10, 4, "length")]
    batches = [demo.BatchResult(0, 0.05, 50.0, 60.0, 60.0, users), demo.BatchResult(1, 0.09, 90.0, 20.0, 20.0, users)]
    rep = demo.report(args, settings, batches, wall_s=1.0, device_busy=None, prompts=None)
    assert (rep["ttft_ms"], rep["decode_tokens_per_s_per_user"], rep["decode_tokens_per_s"]) == (50.0, 60.0, 60.0)
    assert rep["output_tokens"] == 8  # the total is still every batch's


def test_the_demos_own_option_spellings_are_taken(prompt_file):
    """A demo user passes its pytest options: underscores, 0/1 for instruct and stop_at_eos, and sampling_params
    and page_params as dicts (sampling_params replaces the preset's whole dict; a list gives each user its own)."""
    args = demo.parse_args([
        "--preset", "performance-batch-32-non-uniform-sampling", "--input_prompts", str(prompt_file),
        "--batch_size", "2", "--repeat_batches", "3", "--max_seq_len", "4096", "--max_generated_tokens", "7",
        "--instruct", "0", "--stop_at_eos", "1", "--print_outputs", "True",
        "--sampling_params", '{"temperature": [0.0, 0.7], "top_p": 0.9, "seed": 5}',
        "--page_params", '{"page_block_size": 32, "page_max_num_blocks": 1024}'])
    settings = demo.resolve(args)
    assert (settings.input_prompts, settings.batch_size, settings.repeat_batches, settings.max_seq_len,
            settings.max_generated_tokens, settings.instruct, settings.stop_at_eos, args.print_outputs) == (
        prompt_file, 2, 3, 4096, 7, False, True, True)
    assert (settings.block_size, settings.page_max_num_blocks) == (32, 1024)
    users = demo.sampling(settings)
    assert [(u.temperature, u.top_p, u.top_k, u.seed, u.presence_penalty) for u in users] == [
        (0.0, 1.0, 0, None, 0.0), (0.7, 0.9, 32, 5, 0.0)]  # user 0 greedy (top_p/top_k/seed unused)


def test_the_demos_page_table_limits_each_user(prompt_file):
    """The demo refuses a user longer than its page table's share: page_block_size x page_max_num_blocks,
    divided among 32 users at batch 32."""
    with pytest.raises(SystemExit, match="page_params"):
        demo.main(["--time-scale", "0.001", "--input-prompts", str(prompt_file), "--batch-size", "1",
                   "--max-generated-tokens", "40", "--page_params",
                   '{"page_block_size": 32, "page_max_num_blocks": 1}'])


def test_the_demos_log_probs_key_asks_each_tokens_log_probability():
    """The demo's batch-32-log-probs preset writes "log_probs": [true] * 32 in its sampling_params; passed as the
    demo writes it, it was refused as an unknown field."""
    settings = demo.resolve(demo.parse_args(["--batch_size", "2", "--sampling_params",
                                             '{"temperature": 0.5, "log_probs": [true, false]}']))
    assert [u.logprobs for u in demo.sampling(settings)] == [0, None]


def test_the_simulated_mesh_samples_on_one_torch_thread_as_under_serve():
    """A Serve mesh of the simulated backend gets OMP_NUM_THREADS=1 from Ray (mesh_num_cpus 0.2); the demo's host
    sampling runs as it would there, not on torch's default of a thread per core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = demo.parse_args(["--backend", "simulated"])
        demo.open_backend(args, demo.resolve(args))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_galaxy_backend_refuses_a_checkpoint_not_shaped_as_llama_3_70b(monkeypatch, tiny_model):
    """The serve app refuses such a folder at deploy (check_model_files); the demo, which a Galaxy operator runs
    first, opened the mesh on it and ran (over tests/tt_double: a 2-layer, 64-wide Llama took its tokens), where
    tt-metal's 70B Galaxy model would fail on it once its mesh is open, or serve a wrong model. Now refused before
    ttnn is needed, as at deploy."""
    import sys

    monkeypatch.setitem(sys.modules, "ttnn", None)  # refused before: no ttnn, no mesh
    with pytest.raises(SystemExit) as exited:
        demo.main(["--backend", "tt_galaxy", "--model", str(tiny_model), "--max-generated-tokens", "2"])
    said = str(exited.value.code)
    assert said.startswith(f"{tiny_model}: dim (hidden_size) is 64, not 8192") and "Llama 3 70B" in said


def test_a_galaxy_checkpoint_the_demo_cannot_read_is_named_once(monkeypatch, tmp_path):
    """LlamaConfig.from_dir's errors name the folder or the file themselves: the demo prefixed the folder again
    ('/x: /x has neither config.json nor params.json')."""
    import sys

    monkeypatch.setitem(sys.modules, "ttnn", None)
    with pytest.raises(SystemExit) as exited:
        demo.main(["--backend", "tt_galaxy", "--model", str(tmp_path)])
    assert str(exited.value.code) == f"{tmp_path} has neither config.json nor params.json"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exited:
        demo.main(["--backend", "tt_galaxy", "--model", str(tmp_path)])
    assert str(exited.value.code).startswith(f"{tmp_path / 'config.json'}: not a Llama config meshserve reads")


def test_the_figures_follow_the_demos_definitions():
    """Prefill time runs from the batch start to the last user's first token; TTFT (avg) is it per user; tokens/s/user
    is (tokens - 2) over the time after each user's first decode step (the demo drops its first iteration), averaged
    over the users that decoded 3+ tokens; tokens/s is it times the users. All in Galaxy time (/ time_scale)."""
    from types import SimpleNamespace

    def user(name: str, times: list[float]) -> SimpleNamespace:
        return SimpleNamespace(request_id=name, first_token_time=times[0], num_prompt_tokens=3,
                               output_ids=[1] * len(times), finish_reason="length")

    times = {"a": [0.25, 0.5, 0.75, 1.0, 1.25], "b": [0.5, 1.0, 1.5, 2.0], "c": [0.25, 0.5]}
    result = demo.batch_result(0, 0.0, [user(name, t) for name, t in times.items()], times, 0.5, None)
    assert result.prefill_s == pytest.approx(1.0)
    assert result.ttft_ms == pytest.approx(1000 / 3)
    # a: 3 tokens in 0.75 s, b: 2 in 1 s, at time_scale 0.5: 2 and 1 tokens/s; c decoded too few to count
    assert result.decode_tokens_per_s_per_user == pytest.approx(1.5)
    assert result.decode_tokens_per_s == pytest.approx(4.5)


def test_each_preset_is_compared_with_its_own_published_row():
    """A preset's published row is that of its prompt file's length and its batch: galaxy_perf.json has 4,096-token
    rows for batch 1 and 32, and the batch-1 run was compared with the batch-32 one."""
    for name, preset in demo.PRESETS.items():
        if preset.published_input_tokens is None:
            continue
        stem = preset.input_prompts.stem
        assert preset.published_input_tokens == (128 if stem == "batch32" else int(stem.split("_")[1][:-1]) * 1024)
    rows = demo.published_rows(demo.PRESETS["performance-long-4k-b1"])
    assert rows == {"by_input_length[4096]": {"ttft_ms": 625.08, "decode_tokens_per_s_per_user": 54.07}}


def test_the_report_prints_the_demos_summary_and_the_gap_to_the_published_figures():
    args = demo.parse_args(["--preset", "performance-long-4k-b1"])
    users = [demo.UserResult(4000, 128, "length")]
    batches = [demo.BatchResult(0, 0.5, 500.0, 50.0, 50.0, users)]
    rep = demo.report(args, demo.resolve(args), batches, wall_s=3.0, device_busy=None, prompts=None)
    row = rep["published"]["by_input_length[4096]"]
    assert row["ttft_rel_diff"] == pytest.approx(500 / 625.08 - 1)
    assert row["tokens_per_s_per_user_rel_diff"] == pytest.approx(50 / 54.07 - 1)
    text = demo.format_report(rep)
    assert "Average Time to First Token (TTFT): 500.00 ms" in text
    assert "Average speed: 20.00 ms @ 50.00 tok/s/user (50.00 tok/s throughput)" in text
    assert "TTFT 625.08 ms (-20.0%), 54.07 tok/s/user (-7.5%)" in text


def test_the_presets_generate_their_whole_length_unless_told_to_stop_at_eos():
    """The demo's performance runs decode max_generated_tokens whatever the model says (stop_at_eos False)."""
    assert all(u.ignore_eos for u in demo.sampling(demo.resolve(demo.parse_args(["--batch-size", "2"]))))
    stop = demo.resolve(demo.parse_args(["--batch-size", "2", "--stop-at-eos", "1"]))
    assert not any(u.ignore_eos for u in demo.sampling(stop))


def test_a_cpu_model_run_is_never_the_published_run():
    assert demo.resolve(demo.parse_args(["--backend", "torch"])).published_input_tokens is None
    assert demo.resolve(demo.parse_args(["--backend", "simulated"])).published_input_tokens == 128


def test_only_batch_32_cuts_contexts_and_users_take_the_files_entries_in_turn(tmp_path):
    """text_demo.py's load_inputs cuts to its per-user lengths only at batch 32 (any other batch reads the file's
    max_length), and user u takes entry u mod the file's entries."""
    (tmp_path / "book.txt").write_text("x" * 20_000)
    path = tmp_path / "two.json"
    path.write_text(json.dumps([{"prompt": "A?", "context": "book.txt", "max_length": 15_000},
                                {"prompt": "B?", "context": "book.txt", "max_length": 15_000}]))
    at_8 = demo.resolve(demo.parse_args(["--input-prompts", str(path), "--batch-size", "8"]))
    assert [len(p) for p in demo.demo_prompts(at_8)] == [15_000 + len("``````\n\nA?")] * 2
    at_32 = demo.resolve(demo.parse_args(["--input-prompts", str(path), "--batch-size", "32"]))
    assert [p[-2] for p in demo.demo_prompts(at_32)] == ["A", "B"] * 16


def test_below_batch_32_each_user_may_fill_the_whole_page_table(capsys, prompt_file):
    """text_demo.py divides the page table among users at batch 32 only (batch_size_per_device_group 32 if
    batch_size == 32 else 1): 2 users of ~20 tokens + 100 generated fit a table of 128 tokens."""
    rep = run_json(capsys, "--time-scale", "0.001", "--input-prompts", str(prompt_file), "--batch-size", "2",
                   "--max-generated-tokens", "100", "--page_params",
                   '{"page_block_size": 32, "page_max_num_blocks": 4}')
    assert 128 // 2 < max(u["prompt_tokens"] for u in rep["batches"][0]["users"]) + 100 <= 128
    assert rep["output_tokens"] == 200
