"""`python -m bench.demo`: tt-metal's Llama-3.3-70B Galaxy text demo (models/demos/llama3_70b_galaxy/demo/
text_demo.py), run through meshserve's engine core in this process: MeshScheduler plans, MeshRunner executes
on the backend (torch, simulated or tt_galaxy), the scheduler takes the results in. No Ray, no HTTP.

The presets and options are the demo's. Each batch submits every user at once and runs until all finish;
repeat batches rotate the prompts among the users. Every user's prefix cache is salted apart, as the demo
prefills each user in full and zeroes its KV cache between batches. Figures per batch, with the demo's definitions:

- prefill time: batch start (every prompt already tokenized) -> the last user's first token. The Galaxy demo
  prints this as TTFT: its batch-32 prefill is one batched call, so every user gets the first token then.
- TTFT (avg): prefill time / users, the average prefill time per user ("Average prefill time for each user":
  tt_transformers' demo divides by the batch). meshserve prefills one user per backend call, like the
  published per-user TTFT the simulated backend is calibrated on, so this is the figure to compare.
- decode tokens/s/user: (tokens - 1) / time over each user's decode steps after the first (the demo drops its
  first iteration, which includes the trace compile), averaged over users; tokens/s = that x users.

The summary lines (TTFT, speed, the published comparison) are the first batch's, as in the demo; each batch
has its own line.

Times are wall-clock, including the scheduler and runner: any gap to the backend's own speed is the stack's
overhead. On the simulated backend they are divided by --time-scale, i.e. reported in Galaxy time, which
magnifies the stack's own overhead by 1 / time_scale: measure at time_scale 1 (the default).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pydantic import ValidationError  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import args as arg_types  # noqa: E402
from bench.prompts import SAMPLES_DIR, PromptFileError, load_prompts, read_prompt_file  # noqa: E402
from model.backend import Backend  # noqa: E402
from model.checkpoint import checkpoint_dir  # noqa: E402
from model.galaxy import LLAMA3_70B, MAX_TIME_SCALE  # noqa: E402
from model.runner import MeshRunner  # noqa: E402
from model.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from scheduler.blocks import blocks_for  # noqa: E402
from scheduler.sampling import SamplingParams  # noqa: E402
from scheduler.scheduler import MeshScheduler  # noqa: E402
from scheduler.sequence import Sequence  # noqa: E402

# At batch 32 the demo cuts each user's context to these many characters (user i: [i % 4]) instead of the
# file's max_length, so 32 users fit its per-user page table (2,048 blocks / 32 = 4,096 tokens each).
DEMO_BATCH32_CONTEXT_CHARS = (534, 1008, 4444, 13332)
GALAXY_SLOTS = 32


@dataclass(frozen=True)
class Settings:
    """The demo's parameters (its pytest parametrization), defaults as in all its performance presets."""

    input_prompts: Path
    batch_size: int
    instruct: bool = True
    repeat_batches: int = 1
    max_seq_len: int = 128 * 1024
    max_generated_tokens: int = 128
    block_size: int = 64  # page_params' page_block_size
    # page_params' page_max_num_blocks, when given: the demo's page table for the whole batch, of which each user
    # may fill block_size x page_max_num_blocks / 32 tokens at batch 32 (one user per row), all of it otherwise.
    page_max_num_blocks: int | None = None
    # KV blocks per KV group; None: the backend's own pool. The demo's page_params max_num_blocks (2,048) is one
    # page table for the whole batch (text_demo.py reshapes it to max_num_blocks // batch per user), which a
    # Galaxy column's pool of 2,056 blocks holds for any batch: passed per group it would be a smaller pool
    # than a column serving 128k tokens needs.
    max_blocks: int | None = None
    temperature: float = 0.0  # sampling_params; the demo's device sampler always uses top_k 32
    top_p: float = 0.08
    top_k: int = 32
    seed: int | None = None
    stop_at_eos: bool = False
    # Sampling parameters that differ by user (text_demo.py's non-uniform presets): user u takes entry u mod the
    # list's length, over the scalar fields above; an option given on the command line applies to every user.
    per_user: dict[str, tuple[float | int, ...]] = dataclasses.field(default_factory=dict)
    published_input_tokens: int | None = None  # the galaxy_perf.json row this preset reproduces


def _linspace(start: float, end: float, steps: int = GALAXY_SLOTS) -> tuple[float, ...]:
    """torch.linspace's values, as the demo's presets write them."""
    return tuple(start + (end - start) * i / (steps - 1) for i in range(steps))


# text_demo.py's batch-32-non-uniform-sampling (read at tt-metal ec187a58): every user its own temperature, top_p,
# top_k, penalties and seed. The demo draws the seeds at random in 0-32 at each run; here user u has seed u, so
# runs repeat. Its batch-32-log-probs (a later copy): temperature, top_p and top_k as there, and each token's
# log-probability.
NON_UNIFORM_SAMPLING = {"temperature": _linspace(0.0, 1.0), "top_p": _linspace(0.08, 1.0),
                        "top_k": tuple(range(1, GALAXY_SLOTS + 1))}


PRESETS = {
    "performance-batch-32": Settings(SAMPLES_DIR / "batch32.json", 32, published_input_tokens=128),
    "performance-batch-1": Settings(SAMPLES_DIR / "batch32.json", 1, top_p=0.05),
    "performance-repeat2": Settings(SAMPLES_DIR / "batch32.json", 1, repeat_batches=2),
    "performance-long-4k-b1": Settings(SAMPLES_DIR / "long_4k.json", 1, published_input_tokens=4096),
    "performance-long-8k-b1": Settings(SAMPLES_DIR / "long_8k.json", 1, temperature=1.0, top_p=0.04,
                                       published_input_tokens=8192),
    "performance-batch-32-non-uniform-sampling": Settings(
        SAMPLES_DIR / "batch32.json", 32, per_user={
            **NON_UNIFORM_SAMPLING, "presence_penalty": _linspace(-2.0, 2.0), "frequency_penalty": _linspace(-2.0, 2.0),
            "repetition_penalty": _linspace(0.8, 1.5), "seed": tuple(range(GALAXY_SLOTS))}),
    "performance-batch-32-log-probs": Settings(SAMPLES_DIR / "batch32.json", 32,
                                               per_user={**NON_UNIFORM_SAMPLING, "logprobs": (0,)}),
    "performance-long-16k-b1": Settings(SAMPLES_DIR / "long_16k.json", 1, published_input_tokens=16384),
    "performance-long-16k-b32": Settings(SAMPLES_DIR / "long_16k.json", 32),  # the demo's name before long-16k-b1
    "performance-long-32k-b1": Settings(SAMPLES_DIR / "long_32k.json", 1, published_input_tokens=32768),
    "performance-long-64k-b1": Settings(SAMPLES_DIR / "long_64k.json", 1, published_input_tokens=65536),
    "performance-long-128k-b1": Settings(SAMPLES_DIR / "long_128k.json", 1, published_input_tokens=131072),
}


@dataclass
class UserResult:
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    output: str | None = None  # with --print-outputs


@dataclass
class BatchResult:
    batch: int
    prefill_s: float
    ttft_ms: float
    decode_tokens_per_s_per_user: float | None  # None when no user decoded 3+ tokens
    decode_tokens_per_s: float | None
    users: list[UserResult]


def _flag(text: str) -> bool:
    """The demo's 0/1 (its --instruct and --stop_at_eos take an int), or true/false."""
    value = {"0": False, "1": True, "false": False, "true": True}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected 0, 1, true or false, not {text!r}")
    return value


def _json_object(text: str) -> dict:
    """The demo's dict options (sampling_params, page_params), as JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="performance-batch-32")
    p.add_argument("--backend", choices=("torch", "simulated", "tt_galaxy"), default="simulated")
    p.add_argument("--model", help="model folder (HF or Meta) or a hub id in the local HF cache; default: "
                                   "embedded SmolLM2 for torch, Llama 3's tokenizer for simulated, $HF_MODEL "
                                   "or $LLAMA_DIR for tt_galaxy")
    # Each of the demo's options also under its own spelling (--max_seq_len, --instruct 0, --sampling_params '{..}'),
    # so its command lines work here.
    demo = p.add_argument_group("demo parameters (default: the preset's)")
    demo.add_argument("--input-prompts", "--input_prompts", type=Path,
                      help="prompt file (JSON list of prompt/context/max_length)")
    demo.add_argument("--instruct", nargs="?", const=True, type=_flag, default=None,
                      help="chat template and context in a code block (instruct weights); --instruct 0: base")
    demo.add_argument("--no-instruct", dest="instruct", action="store_false", default=None)
    demo.add_argument("--repeat-batches", "--repeat_batches", type=int)
    demo.add_argument("--max-seq-len", "--max_seq_len", type=int)
    demo.add_argument("--batch-size", "--batch_size", type=int)
    demo.add_argument("--max-generated-tokens", "--max_generated_tokens", type=int)
    demo.add_argument("--page-params", "--page_params", type=_json_object,
                      help='the demo\'s {"page_block_size": 64, "page_max_num_blocks": 2048}: block size, and each '
                           "user's share of the page table as a limit on its length (the KV pool is --max-blocks)")
    demo.add_argument("--sampling-params", "--sampling_params", type=_json_object,
                      help='the demo\'s {"temperature": 0.0, "top_p": 0.08, ...}: replaces the preset\'s; a list '
                           "gives user u its entry u mod the list's length")
    demo.add_argument("--block-size", type=int, help="page_params: tokens per KV block")
    demo.add_argument("--max-blocks", type=int, help="KV blocks per KV group (default: the backend's own pool)")
    demo.add_argument("--temperature", type=arg_types.finite)
    demo.add_argument("--top-p", type=arg_types.finite)
    demo.add_argument("--top-k", type=int)
    demo.add_argument("--seed", type=int)
    demo.add_argument("--stop-at-eos", "--stop_at_eos", nargs="?", const=True, type=_flag, default=None)
    demo.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false", default=None)
    p.add_argument("--num-layers", "--num_layers", type=int, help="tt_galaxy only: a truncated model for bring-up")
    p.add_argument("--print-outputs", "--print_outputs", nargs="?", const=True, type=_flag, default=False,
                   help="print each user's prompt and answer")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated only: 0.1 runs 10x faster")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per scheduler round")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = p.parse_args(argv)
    if args.num_layers is not None and args.backend != "tt_galaxy":
        p.error("--num-layers is supported by the tt_galaxy backend only")
    if args.num_layers is not None and not 1 <= args.num_layers <= LLAMA3_70B["n_layers"]:  # as AppConfig refuses it
        p.error(f"--num-layers: 1 to {LLAMA3_70B['n_layers']} (Llama 3 70B's layers), not {args.num_layers}")
    if not 0 < args.time_scale <= MAX_TIME_SCALE or args.decode_steps < 1:
        p.error(f"--time-scale must be in (0, {MAX_TIME_SCALE:g}] and --decode-steps at least 1")
    return args


def resolve(args: argparse.Namespace) -> Settings:
    """The preset with the options given on the command line applied."""
    preset = PRESETS[args.preset]
    names = {f.name for f in dataclasses.fields(Settings)} - {"published_input_tokens", "per_user"}
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    per_user = dict(preset.per_user)
    if args.page_params is not None:
        unknown = set(args.page_params) - {"page_block_size", "page_max_num_blocks"}
        if unknown:
            raise SystemExit(f"--page-params: unknown keys {sorted(unknown)} (page_block_size, page_max_num_blocks)")
        given.setdefault("block_size", args.page_params.get("page_block_size", preset.block_size))
        given["page_max_num_blocks"] = args.page_params.get("page_max_num_blocks")
    if args.sampling_params is not None:  # the demo's dict replaces the preset's whole sampling_params
        per_user = {}
        for name, value in args.sampling_params.items():
            if name == "log_probs":  # the demo's flag: each token's log-probability, which logprobs 0 asks for
                name = "logprobs"
                value = [0 if v else None for v in value] if isinstance(value, list) else (0 if value else None)
            if isinstance(value, list):
                if not value:
                    raise SystemExit(f"--sampling-params: {name} is an empty list")
                per_user[name] = tuple(value)
            elif name in ("temperature", "top_p", "top_k", "seed"):
                given.setdefault(name, value)  # an option of its own (--top-p) still wins
            else:
                per_user[name] = (value,)
    given["per_user"] = {name: values for name, values in per_user.items() if name not in given}
    # Other prompts, another batch, another length (a row's tokens/s/user is the mean over the demo's 128 generated
    # tokens: longer runs decode at longer contexts), a CPU model: not the published run.
    if args.input_prompts is not None or given.get("batch_size", preset.batch_size) != preset.batch_size \
            or given.get("max_generated_tokens", preset.max_generated_tokens) != preset.max_generated_tokens \
            or args.backend == "torch":
        given["published_input_tokens"] = None
    settings = dataclasses.replace(preset, **given)
    # max_seq_len 0 fell to the backend's default (`or`) while the report said 0; max_blocks < 0 failed in numpy
    counts = ("batch_size", "repeat_batches", "max_generated_tokens", "block_size", "max_seq_len", "max_blocks",
              "page_max_num_blocks")
    low = [f"--{name.replace('_', '-')} must be at least 1" for name in counts
           if getattr(settings, name) is not None and getattr(settings, name) < 1]
    if low:
        raise SystemExit("; ".join(low))
    return settings


def sampling(settings: Settings) -> list[SamplingParams]:
    """Each user's sampling parameters, user u at index u; SystemExit naming the options out of range."""
    uniform = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed,
                   max_tokens=settings.max_generated_tokens, ignore_eos=not settings.stop_at_eos)
    try:
        return [SamplingParams(**{**uniform, **{name: values[user % len(values)]
                                                for name, values in settings.per_user.items()}})
                for user in range(settings.batch_size)]
    except ValidationError as e:
        raise SystemExit("; ".join(f"--{'-'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                         .replace("_", "-")) from None


def demo_prompts(settings: Settings) -> list[str]:
    """The prompt list the batches rotate through (the demo's load_inputs): the file's prompts, and at
    batch 32 one per user with contexts cut to DEMO_BATCH32_CONTEXT_CHARS."""
    path = settings.input_prompts
    joined = load_prompts(path, settings.instruct)
    entries = read_prompt_file(path)
    if settings.batch_size != 32 or all(e.context is None or e.max_length is None for e in entries):
        return joined
    contexts = load_prompts(path, instruct=False, cut=False)  # an entry with a context: that context, whole
    prompts = []
    for user in range(32):
        i = user % len(entries)
        if entries[i].context is None or entries[i].max_length is None:
            prompts.append(joined[i])
            continue
        context = contexts[i][:DEMO_BATCH32_CONTEXT_CHARS[user % 4]]
        # Joined as bench.prompts joins (the demo's markdown block), with the shorter context.
        prompts.append(f"```{context}```\n\n{entries[i].prompt}" if settings.instruct else context)
    return prompts


def open_backend(args: argparse.Namespace, settings: Settings) -> tuple[Backend, Tokenizer]:
    """Import only the backend in use: ttnn exists only on Galaxy hosts, torch models are heavy."""
    try:  # only tt_galaxy takes the demo's variables: the others have a model of their own
        model_dir = checkpoint_dir(args.model, "--model") if args.model or args.backend == "tt_galaxy" else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.backend == "torch":
        from model.config import LlamaConfig
        from model.embedded import ensure_smollm2
        from model.torch_llama import TorchBackend

        model_dir = model_dir or ensure_smollm2()
        # The presets' 128k is Llama 3.3's context: a CPU model runs at its own unless told, and is told no more
        # (past max_position_embeddings its rope was never trained; the serve app and vLLM refuse it too). Its own
        # goes as None, not as a length asked: the backend holds a sequence of one asked past its default cache cap.
        context = LlamaConfig.from_dir(model_dir).max_position_embeddings
        if args.max_seq_len is not None and args.max_seq_len > context:
            raise SystemExit(f"--max-seq-len {args.max_seq_len} is beyond the model's context ({context} tokens, "
                             "max_position_embeddings)")
        backend = TorchBackend(model_dir, num_slots=settings.batch_size, block_size=settings.block_size,
                               num_blocks=settings.max_blocks, max_seq_len=args.max_seq_len)
        return backend, load_tokenizer(model_dir)
    if settings.batch_size > GALAXY_SLOTS:
        raise SystemExit(f"a Galaxy decodes at most {GALAXY_SLOTS} users; --batch-size {settings.batch_size}")
    if args.backend == "simulated":
        import torch

        from model.embedded import ensure_llama3_tokenizer
        from model.simulated import SimulatedBackend

        # A Serve mesh of it has one torch thread for its host sampling (serve_config.simulated.yaml mesh_num_cpus 0.2:
        # Ray sets OMP_NUM_THREADS to max(floor(num_cpus), 1), ray/_private/utils.py set_omp_num_threads_if_unset).
        # With torch's default two on the 2-core box, every op over a 128k row waited for a thread the box's other
        # work held: the log-probs preset stepped at 45-683 ms as the load went from 3 to 5.6, against ~30 on one.
        torch.set_num_threads(1)
        tokenizer = load_tokenizer(model_dir or ensure_llama3_tokenizer())
        backend = SimulatedBackend(time_scale=args.time_scale, block_size=settings.block_size,
                                   num_blocks=settings.max_blocks, max_seq_len=settings.max_seq_len,
                                   vocab_size=tokenizer.vocab_size, eos_token_ids=tuple(sorted(tokenizer.stop_ids)))
        return backend, tokenizer
    from model.config import LlamaConfig
    from model.galaxy import check_galaxy_model
    from model.tt_galaxy import TTGalaxyBackend

    try:  # its errors name the folder or the file already
        llama = LlamaConfig.from_dir(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    try:  # as the serve app refuses it at deploy (check_model_files): tt-metal's 70B model would fail on the open mesh
        check_galaxy_model(llama)
    except ValueError as e:
        raise SystemExit(f"{model_dir}: {e}") from None  # given by --model, HF_MODEL or LLAMA_DIR
    tokenizer = load_tokenizer(model_dir)  # tt_galaxy: checkpoint_dir found it, or said what to set
    try:
        backend = TTGalaxyBackend(model_dir, block_size=settings.block_size, num_blocks=settings.max_blocks,
                                  max_seq_len=settings.max_seq_len, num_layers=args.num_layers)
    except ImportError as e:
        if not str(e).startswith("the TT Galaxy backend"):  # an import inside tt-metal that failed: its traceback
            raise
        raise SystemExit(f"{e} ({e.__cause__})") from None  # no ttnn, or no tt-metal checkout: what to install
    return backend, tokenizer


def tokenize(tokenizer: Tokenizer, prompts: list[str], instruct: bool) -> list[list[int]]:
    if instruct:
        return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    return [tokenizer.encode(p, add_bos=True) for p in prompts]


def check_fits(batches: list[list[list[int]]], settings: Settings, backend: Backend) -> None:
    """Like the demo's asserts: every user fits max_seq_len, and a whole batch fits the KV groups at once
    (otherwise the scheduler would run it in waves and the figures would not be the demo's)."""
    caps = backend.caps
    for batch in batches:
        longest = max(len(ids) for ids in batch)
        if settings.page_max_num_blocks is not None:
            share = settings.block_size * settings.page_max_num_blocks // (GALAXY_SLOTS if settings.batch_size ==
                                                                             GALAXY_SLOTS else 1)
            if longest + settings.max_generated_tokens > share:
                raise SystemExit(f"a prompt of {longest} tokens + {settings.max_generated_tokens} generated exceeds a "
                                 f"user's share of the page table, {share} tokens (page_params)")
        if longest + settings.max_generated_tokens > caps.max_seq_len:
            raise SystemExit(f"a prompt of {longest} tokens + {settings.max_generated_tokens} generated exceeds "
                             f"max_seq_len {caps.max_seq_len}")
        # Admission fills the emptiest KV group first: user u lands in group u mod kv_groups.
        needed = max(sum(blocks_for(len(ids) + settings.max_generated_tokens, caps.block_size)
                         for ids in batch[g::caps.kv_groups]) for g in range(caps.kv_groups))
        if needed > caps.num_blocks:
            raise SystemExit(f"a KV group needs {needed} blocks of {caps.block_size} tokens for this batch, each "
                             f"has {caps.num_blocks}: raise --max-blocks or lower --batch-size")


def run_batch(scheduler: MeshScheduler, runner: MeshRunner, prompts: list[list[int]],
              params: list[SamplingParams], batch: int, progress: tqdm
              ) -> tuple[float, list[Sequence], dict[str, list[float]]]:
    """Submit every user, then schedule -> execute -> process until all finish. Returns the batch start
    (time.monotonic, the clock of the sequences' timestamps), the finished sequences, and per user the
    time each of its tokens came (the router keeps no per-token times: the demo keeps its own).

    One thread, one work at a time: a mesh thread that overlaps the scheduler with the backend (the router's
    pipelining) measured slower here, as both threads then contend for the GIL on every step."""
    # A salt per user: no user reuses another's KV, of this batch or the one before, as the demo prefills each
    # user in full into its own pages and zeroes the cache between batches.
    start = time.monotonic()
    sequences = [scheduler.submit(f"batch-{batch}-user-{user}", ids, params[user], salt=f"batch-{batch}-user-{user}")
                 for user, ids in enumerate(prompts)]
    token_times: dict[str, list[float]] = {seq.request_id: [] for seq in sequences}
    while scheduler.requests:
        work = scheduler.schedule()
        if work is None:
            raise RuntimeError(f"the scheduler stalled with {len(scheduler.requests)} unfinished requests")
        for result in runner.execute(work):
            now = time.monotonic()
            for event in scheduler.process(result):
                token_times[event.request_id] += [now] * len(event.token_ids)
                progress.update(len(event.token_ids))
    return start, sequences, token_times


def batch_result(batch: int, start: float, sequences: list[Sequence], token_times: dict[str, list[float]],
                 time_scale: float, tokenizer: Tokenizer | None) -> BatchResult:
    """The demo's figures from the users' token times; durations divided by time_scale."""
    prefill_s = (max(seq.first_token_time for seq in sequences) - start) / time_scale
    times = [token_times[seq.request_id] for seq in sequences]
    rates = [(len(t) - 2) / (t[-1] - t[1]) * time_scale for t in times if len(t) >= 3]
    per_user = sum(rates) / len(rates) if rates else None
    users = [UserResult(seq.num_prompt_tokens, len(seq.output_ids), seq.finish_reason,
                        tokenizer.decode(seq.output_ids, skip_special=True) if tokenizer else None)
             for seq in sequences]
    return BatchResult(batch, prefill_s, prefill_s / len(sequences) * 1000, per_user,
                       per_user * len(sequences) if per_user is not None else None, users)


def run(args: argparse.Namespace) -> dict:
    """Run the demo; returns the report (what --json prints)."""
    settings = resolve(args)
    params = sampling(settings)  # checked before the backend opens
    try:
        prompts = demo_prompts(settings)
    except PromptFileError as e:
        raise SystemExit(str(e)) from None
    try:
        backend, tokenizer = open_backend(args, settings)
    except (OSError, ValueError) as e:  # a model folder without a tokenizer, a size the backend cannot take
        raise SystemExit(f"cannot open the {args.backend} backend: {e}") from None
    settings = dataclasses.replace(settings, max_seq_len=backend.caps.max_seq_len)  # the report's: what ran
    try:
        token_ids = tokenize(tokenizer, prompts, settings.instruct)
        # The demo's rotation: batch b gives user u the prompt (u + b) mod the number of prompts.
        batches = [[token_ids[(user + b) % len(token_ids)] for user in range(settings.batch_size)]
                   for b in range(settings.repeat_batches)]
        check_fits(batches, settings, backend)
        caps = backend.caps
        # The demo prefills every user, each prompt in one call, before the first decode step.
        whole_prompt = blocks_for(caps.max_seq_len, caps.prefix_align) * caps.prefix_align
        try:
            scheduler = MeshScheduler(
                num_blocks=caps.num_blocks, block_size=caps.block_size, kv_groups=caps.kv_groups,
                num_slots=caps.num_slots, max_seq_len=caps.max_seq_len, prefill_chunk=whole_prompt,
                max_prefill_tokens=whole_prompt * caps.num_slots, decode_steps=args.decode_steps,
                prefix_align=caps.prefix_align, eos_token_ids=tuple(sorted(tokenizer.stop_ids)))
        except ValueError as e:  # e.g. a --block-size the backend's prefix alignment is no multiple of
            raise SystemExit(f"cannot schedule this run (--block-size {settings.block_size}): {e}") from None
        runner = MeshRunner(backend)
        time_scale = args.time_scale if args.backend == "simulated" else 1.0
        results = []
        device_s = getattr(backend, "device_seconds", None)  # the simulated mesh's busy time (scaled)
        began = time.monotonic()
        total = settings.repeat_batches * settings.batch_size * settings.max_generated_tokens
        with tqdm(total=total, unit="tok", desc=args.preset, file=sys.stderr, leave=False) as progress:
            for b, batch in enumerate(batches):
                start, sequences, token_times = run_batch(scheduler, runner, batch, params, b, progress)
                results.append(batch_result(b, start, sequences, token_times, time_scale,
                                            tokenizer if args.print_outputs else None))
        wall_s = (time.monotonic() - began) / time_scale
        device_busy = (backend.device_seconds - device_s) / time_scale / wall_s if device_s is not None else None
    finally:
        backend.close()
    return report(args, settings, results, wall_s, device_busy, prompts if args.print_outputs else None)


def published_rows(settings: Settings) -> dict[str, dict]:
    """The galaxy_perf.json figures this run reproduces, if its preset has them and the batch is theirs."""
    if settings.published_input_tokens is None:
        return {}
    from model.simulated import published_figures

    figures = published_figures()
    rows = {f"by_input_length[{r['input_tokens']}]": r for r in figures["by_input_length"]
            if r["input_tokens"] == settings.published_input_tokens and r["batch"] == settings.batch_size}
    if settings.published_input_tokens == 128 and settings.batch_size == 32:
        rows["headline_batch32_input128"] = figures["headline_batch32_input128"]
    return {name: {"ttft_ms": r["ttft_ms"], "decode_tokens_per_s_per_user": r["decode_tokens_per_s_per_user"]}
            for name, r in rows.items()}


def report(args: argparse.Namespace, settings: Settings, results: list[BatchResult], wall_s: float,
           device_busy: float | None, prompts: list[str] | None) -> dict:
    # The summary is batch 0's, as the demo's (its profiler reads iteration 0); later batches have their own lines.
    first = results[0]
    ttft_ms, per_user = first.ttft_ms, first.decode_tokens_per_s_per_user
    out = {
        "preset": args.preset,
        "backend": args.backend,
        "time_scale": args.time_scale if args.backend == "simulated" else None,
        "decode_steps": args.decode_steps,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
        "batches": [dataclasses.asdict(r) for r in results],
        "ttft_ms": ttft_ms,
        "decode_tokens_per_s_per_user": per_user,
        "decode_tokens_per_s": first.decode_tokens_per_s,
        "output_tokens": sum(u.output_tokens for r in results for u in r.users),
        "wall_s": wall_s,
        "device_busy": device_busy,  # simulated: share of the run the mesh computed; the rest is the stack's
        "published": {},
    }
    for name, row in published_rows(settings).items():
        out["published"][name] = {
            **row,
            "ttft_rel_diff": ttft_ms / row["ttft_ms"] - 1 if ttft_ms is not None else None,
            "tokens_per_s_per_user_rel_diff":
                per_user / row["decode_tokens_per_s_per_user"] - 1 if per_user is not None else None,
        }
    if prompts is not None:
        out["prompts"] = prompts
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(rep: dict) -> str:
    s = rep["settings"]
    scale = f", time_scale {rep['time_scale']} (times in Galaxy time)" if rep["time_scale"] not in (None, 1.0) else ""
    lines = [f"{rep['preset']} on {rep['backend']}{scale}: {s['batch_size']} user(s) x {s['repeat_batches']} "
             f"batch(es), {s['max_generated_tokens']} tokens each, {rep['decode_steps']} decode steps per round"]
    for b in rep["batches"]:
        prompt_tokens = [u["prompt_tokens"] for u in b["users"]]
        lines.append(f"batch {b['batch']}: prompts {min(prompt_tokens)}-{max(prompt_tokens)} tokens | "
                     f"prefill {b['prefill_s'] * 1000:.1f} ms | TTFT (avg) {b['ttft_ms']:.2f} ms | "
                     f"decode {_fmt(b['decode_tokens_per_s_per_user'], '.2f')} t/s/u, "
                     f"{_fmt(b['decode_tokens_per_s'], '.1f')} t/s | "
                     f"{sum(u['output_tokens'] for u in b['users'])} tokens")
        if "prompts" in rep:
            for user, u in enumerate(b["users"]):
                prompt = rep["prompts"][(user + b["batch"]) % len(rep["prompts"])]
                if len(prompt) > 200:
                    prompt = prompt[:100] + "\n<long prompt not printed in full>\n" + prompt[-100:]
                lines.append(f"==BATCH {b['batch']} USER {user} - PROMPT\n{prompt}\n"
                             f"==BATCH {b['batch']} USER {user} - OUTPUT\n{u['output'].strip()}")
    per_user = rep["decode_tokens_per_s_per_user"]
    lines += ["=== Performance metrics ===",
              f"Average Time to First Token (TTFT): {rep['ttft_ms']:.2f} ms",
              f"Average speed: {_fmt(per_user and 1000 / per_user, '.2f')} ms @ {_fmt(per_user, '.2f')} tok/s/user "
              f"({_fmt(rep['decode_tokens_per_s'], '.2f')} tok/s throughput)",
              f"Total: {rep['output_tokens']} tokens in {rep['wall_s']:.2f} s"]
    if rep["device_busy"] is not None:
        lines.append(f"Simulated mesh busy {rep['device_busy']:.1%} of the run; the rest is the stack's overhead")
    for name, row in rep["published"].items():
        lines.append(f"Published ({name}): TTFT {row['ttft_ms']} ms ({_fmt(row['ttft_rel_diff'], '+.1%')}), "
                     f"{row['decode_tokens_per_s_per_user']} tok/s/user "
                     f"({_fmt(row['tokens_per_s_per_user_rel_diff'], '+.1%')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rep = run(args)
    print(json.dumps(rep) if args.json else format_report(rep))


if __name__ == "__main__":
    main()
