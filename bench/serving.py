"""Serving benchmark for any OpenAI-compatible endpoint (meshserve, vLLM, ...), streaming.

    python -m bench.serving --url http://localhost:8000 --num-prompts 200 --request-rate 4 \\
        --random-input-len 1024 --random-output-len 128 --goodput ttft:2000 tpot:50 --json out.json --chart out.png

Requests arrive as a Poisson process at --request-rate (inf: all at once), optionally capped at
--max-concurrency in flight. Prompts are random (words, or token ids on the completions endpoint) or come
from a prompt file. Random requests ask for ignore_eos so output lengths hold where the server honours it.
Warm-up requests run first and are not counted. Token counts come from the server's usage
(stream_options.include_usage) when it reports them, else one token per streamed chunk.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from itertools import cycle, islice

import numpy as np
from tqdm import tqdm

from bench import args as arg_types
from bench.chart import save_chart
from bench.client import (DEFAULT_URL, ENDPOINTS, add_api_key_argument, check_output_folder, check_url, first_model,
                          new_http_client, request_body, stream_request, write_json)
from bench.metrics import RequestResult, Summary, output_throughput_timeline, parse_slos, summarize
from bench.prompts import PromptFileError, load_prompts
from bench.textgen import random_words

# Token ids for random prompts: above the special and byte tokens of common vocabularies, below the
# smallest common vocabulary size (GPT-2's 50k), so every id is an ordinary token.
RANDOM_TOKEN_IDS = range(1000, 30000)


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    max_tokens: int
    prompt_tokens: int | None  # what the benchmark knows of the prompt's length; the server's usage wins
    ignore_eos: bool


def random_requests(
    n: int, input_len: int, output_len: int, range_ratio: float, kind: str, seed: int
) -> list[BenchRequest]:
    """Lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]. Words are about a token each."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(math.floor(mean * (1 - range_ratio)), math.ceil(mean * (1 + range_ratio))))

    requests = []
    for _ in range(n):
        prompt_len, max_tokens = length(input_len), length(output_len)
        if kind == "tokens":
            prompt = [rng.choice(RANDOM_TOKEN_IDS) for _ in range(prompt_len)]
        else:
            prompt = random_words(prompt_len, rng)
        requests.append(BenchRequest(prompt, max_tokens, prompt_len, ignore_eos=True))
    return requests


def file_requests(path: str, n: int | None, max_tokens: int) -> list[BenchRequest]:
    """The file's prompts in order, cycled to n when n is given."""
    prompts = load_prompts(path)
    prompts = list(islice(cycle(prompts), n or len(prompts)))
    return [BenchRequest(p, max_tokens, prompt_tokens=None, ignore_eos=False) for p in prompts]


async def run(
    args: argparse.Namespace, warmup: list[BenchRequest], requests: list[BenchRequest]
) -> tuple[list[RequestResult], float, float]:
    """Send the warm-up requests, then every request on its Poisson schedule.
    Returns (results, start time, duration)."""
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    async with new_http_client(args.max_concurrency, args.api_key) as http:
        model = args.model or await first_model(http, args.url)

        async def send(request: BenchRequest) -> RequestResult:
            body = request_body(
                args.endpoint, model, request.prompt, request.max_tokens, args.temperature,
                ignore_eos=request.ignore_eos and not args.no_ignore_eos,
            )
            async with limit:
                result = await stream_request(http, args.url, args.endpoint, body)
            if result.prompt_tokens is None:
                result.prompt_tokens = request.prompt_tokens
            return result

        if warmup:
            warm = await asyncio.gather(*(send(r) for r in warmup))
            if not any(r.ok for r in warm):
                raise SystemExit(f"bench.serving: every warm-up request failed; first error: {warm[0].error}")

        rng = np.random.default_rng(args.seed)
        gaps = np.zeros(len(requests)) if math.isinf(args.request_rate) else rng.exponential(
            1.0 / args.request_rate, len(requests)
        )
        arrivals = np.cumsum(gaps)
        with tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr) as progress:

            async def timed(request: BenchRequest) -> RequestResult:
                result = await send(request)
                progress.update()
                return result

            t0 = time.perf_counter()
            tasks = []
            for request, arrival in zip(requests, arrivals):
                await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
                tasks.append(asyncio.create_task(timed(request)))
            results = await asyncio.gather(*tasks)
            return results, t0, time.perf_counter() - t0


def print_table(summary: Summary, slos: dict[str, float], out) -> None:
    rows = [
        ("Successful requests", summary.completed),
        ("Failed requests", summary.failed),
        ("Benchmark duration (s)", f"{summary.duration_s:.2f}"),
        ("Total input tokens", summary.input_tokens),
        ("Total output tokens", summary.output_tokens),
        ("Requests with server usage", f"{summary.usage_reported}/{summary.completed}"),
        ("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{summary.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{summary.total_token_throughput:.2f}"),
    ]
    if summary.goodput is not None:
        slo_text = " ".join(f"{k}<={v * 1000:g}ms" for k, v in slos.items())
        rows.append((f"Goodput (req/s, {slo_text})", f"{summary.goodput:.2f}"))
    for label, dist in [
        ("Time to first token", summary.ttft_ms),
        ("Time per output token (excl. 1st)", summary.tpot_ms),
        ("Inter-token latency", summary.itl_ms),
        ("End-to-end latency", summary.e2el_ms),
    ]:
        rows.append((f"-- {label} (ms)", ""))
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"   {stat}", "-" if dist is None else f"{getattr(dist, stat):.2f}"))
    print("=" * 20 + " Serving benchmark " + "=" * 20, file=out)
    for label, value in rows:
        print(f"{label:<45}{value:>14}", file=out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        "python -m bench.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="server root or its /v1 root (default: %(default)s)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions", help="(default: %(default)s)")
    parser.add_argument("--model", help="model name (default: the first one the server lists)")
    parser.add_argument("--num-prompts", type=int, help="requests to time (default: 100, or the file's prompts)")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson rate, req/s (default: inf)")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight (default: no limit)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests sent first (default: %(default)s)")
    parser.add_argument("--prompt-json-path", help="prompt file (Galaxy demo format) instead of random prompts")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per file prompt (default: %(default)s)")
    parser.add_argument("--random-input-len", type=int, default=1024, help="(default: %(default)s)")
    parser.add_argument("--random-output-len", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths vary by +-this fraction (default: 0)"
    )
    parser.add_argument(
        "--random-prompt", choices=["words", "tokens"], default="words",
        help="random words, or token ids (completions endpoint only) (default: %(default)s)",
    )
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos with random prompts")
    parser.add_argument("--temperature", type=arg_types.finite, default=0.0, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="for random prompts and arrivals (default: %(default)s)")
    parser.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    parser.add_argument("--json", metavar="FILE", help="write every metric as JSON to FILE ('-': stdout)")
    parser.add_argument("--chart", metavar="PNG", help="save latency distributions and throughput over time")
    add_api_key_argument(parser)
    args = parser.parse_args(argv)
    for flag, value, least in (("--num-prompts", args.num_prompts, 1), ("--max-concurrency", args.max_concurrency, 1),
                               ("--warmup", args.warmup, 0), ("--max-tokens", args.max_tokens, 1),
                               ("--random-input-len", args.random_input_len, 1),
                               ("--random-output-len", args.random_output_len, 1)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, not {value}")
    if not args.request_rate > 0:  # inf: all at once
        parser.error(f"--request-rate must be positive (inf: all at once), not {args.request_rate}")
    if not 0 <= args.random_range_ratio < 1:
        parser.error(f"--random-range-ratio must be in [0, 1), not {args.random_range_ratio}")
    if args.random_prompt == "tokens" and args.endpoint == "chat" and not args.prompt_json_path:
        parser.error("--random-prompt tokens needs --endpoint completions (chat messages are text)")
    check_output_folder(parser, "--json", args.json)
    check_output_folder(parser, "--chart", args.chart)
    check_url(parser, args.url)
    try:
        slos = parse_slos(args.goodput)
    except ValueError as e:
        parser.error(str(e))

    if args.prompt_json_path:
        try:
            requests = file_requests(args.prompt_json_path, args.num_prompts, args.max_tokens)
        except PromptFileError as e:
            parser.error(str(e))
        warmup = list(islice(cycle(requests), args.warmup))
    else:
        # Warm-up prompts of their own, so no timed request finds its prompt already in a prefix cache.
        requests = random_requests(
            args.warmup + (args.num_prompts or 100), args.random_input_len, args.random_output_len,
            args.random_range_ratio, args.random_prompt, args.seed,
        )
        warmup, requests = requests[: args.warmup], requests[args.warmup :]
    results, t0, duration_s = asyncio.run(run(args, warmup, requests))
    summary = summarize(results, duration_s, slos)
    bin_s = max(duration_s / 50, 0.01)
    timeline = output_throughput_timeline(results, t0, bin_s)

    print_table(summary, slos, sys.stderr if args.json == "-" else sys.stdout)
    errors = [r.error for r in results if not r.ok]
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr)
    report = {
        **asdict(summary),
        "slos_ms": {k: v * 1000 for k, v in slos.items()},
        "output_throughput_timeline": {"bin_s": bin_s, "tokens_per_s": timeline},
        # JSON has no infinity; the API key is a secret, not a setting (reports get shared)
        "config": {**{k: v for k, v in vars(args).items() if k != "api_key"},
                   "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf"},
        "requests": [
            {
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "ttft_ms": 1000 * r.ttft if r.ok else None,
                "tpot_ms": 1000 * r.tpot if r.ok and r.tpot is not None else None,
                "e2el_ms": 1000 * r.e2el if r.ok else None,
                "error": r.error,
            }
            for r in results
        ],
    }
    if args.json:
        write_json(report, args.json)
    if args.chart:
        save_chart(results, timeline, bin_s, args.chart)
    return report


if __name__ == "__main__":
    main()
