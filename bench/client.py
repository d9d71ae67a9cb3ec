"""Send a prompt file's prompts at once to a running OpenAI-compatible server and show what came back.

    python -m bench.client --num-concurrent 32 --prompt-json-path bench/prompts/batch32.json

Each answer is printed with its time to first token and decode tokens/s (1 / TPOT: tokens after the first over
the time after the first, as a client sees them), then a summary. Not the Galaxy demo's tokens/s/user, which
leaves out each user's first decode step, where at batch 32 the users prefilled before the last one wait for the
prefills after them: a client sees chunk times only, and with tokens coalesced cannot tell that step apart.
`python -m bench.demo` measures the demo's figure. A file with fewer prompts than --num-concurrent is cycled to
fill the batch, as the demo fills its batch. This module also holds the one streaming request both this client and bench.serving make.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from itertools import cycle, islice

import httpx
from tqdm import tqdm

from bench import args as arg_types
from bench.metrics import RequestResult
from bench.prompts import SAMPLES_DIR, PromptFileError, load_prompts

DEFAULT_URL = "http://localhost:8000"
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def api_base(url: str) -> str:
    """Accept the server root or its /v1 root."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def new_http_client(max_connections: int | None = None, api_key: str | None = None,
                    read_timeout: float | None = None) -> httpx.AsyncClient:
    """`api_key`: sent as a bearer token (a server with `api_keys` refuses requests without one: 401).
    `read_timeout`: the longest silence within an answer (None: wait for ever, as a 128k-token prefill on a server
    without SSE keep-alives can take long before its first byte)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=30.0, read=read_timeout),
        limits=httpx.Limits(max_connections=max_connections),
        headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
    )


def add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer key for a server with api_keys (default: $OPENAI_API_KEY, as the openai SDK)")


def check_output_folder(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """A usage error before any request, rather than a traceback once the whole run is done and its figures lost."""
    folder = os.path.dirname(os.path.abspath(path)) if path and path != "-" else None
    if folder and not os.path.isdir(folder):
        parser.error(f"{flag} {path}: the folder {folder} does not exist")


def check_url(parser: argparse.ArgumentParser, url: str) -> None:
    """A usage error before any request: a mistyped --url ended in an InvalidURL or OverflowError traceback, or in
    "is the server up?" for a missing scheme."""
    try:
        parsed = httpx.URL(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.host) and (parsed.port or 80) < 65536
    except httpx.InvalidURL:
        ok = False
    if not ok:
        parser.error(f"--url {url}: not a server address such as {DEFAULT_URL}")


async def first_model(http: httpx.AsyncClient, url: str) -> str:
    try:
        response = await http.get(f"{api_base(url)}/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:  # TypeError: a list of another shape
        # A server with api_keys answers 401: say so rather than suggest it is down.
        unauthorized = isinstance(e, httpx.HTTPStatusError) and e.response.status_code == 401
        hint = "a missing or wrong API key: --api-key or $OPENAI_API_KEY" if unauthorized else "is the server up?"
        raise SystemExit(f"cannot list the models at {api_base(url)}/v1/models: {e} ({hint})") from e


def request_body(
    endpoint: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
    temperature: float = 0.0,
    ignore_eos: bool = False,
) -> dict:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if ignore_eos:  # not an OpenAI field; vLLM-style servers honour it, so lengths hold for benchmarks
        body["ignore_eos"] = True
    return body


async def stream_request(http: httpx.AsyncClient, url: str, endpoint: str, body: dict) -> RequestResult:
    """POST one streaming request and time every text chunk. Never raises: failures land in .error."""
    result = RequestResult(start=time.perf_counter())
    pieces = []
    try:
        async with http.stream("POST", f"{api_base(url)}{ENDPOINTS[endpoint]}", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    error = _take_chunk(json.loads(data), endpoint, result, pieces)
                except (ValueError, TypeError, AttributeError) as e:  # another shape: this request's failure only
                    result.error = f"malformed chunk {data[:200]!r}: {type(e).__name__}: {e}"
                    break
                if error:
                    result.error = error
                    break
            if result.error is None and not done:  # OpenAI-compatible servers (the ingress too) always end so
                result.error = "the stream ended before data: [DONE]: the answer may be cut short"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter()
    result.text = "".join(pieces)
    if not result.usage_reported:
        result.output_tokens = len(result.chunk_times)
    if result.error is None and not result.chunk_times:
        result.error = "the stream ended without any text"
    return result


def _take_chunk(chunk: dict, endpoint: str, result: RequestResult, pieces: list[str]) -> str | None:
    """Time and keep one SSE chunk's text and usage; returns the error it carries, if any."""
    if chunk.get("error"):
        return str(chunk["error"])
    if chunk.get("usage"):
        result.prompt_tokens = chunk["usage"].get("prompt_tokens")
        result.output_tokens = int(chunk["usage"].get("completion_tokens", 0))
        result.usage_reported = True
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text of type {type(text).__name__}")
        if text or choice.get("finish_reason"):  # the end brings a token (EOS) even without text
            result.chunk_times.append(time.perf_counter())
            pieces.append(text or "")
    return None


async def run_batch(args: argparse.Namespace, prompts: list[str]) -> tuple[list[RequestResult], float]:
    """All prompts, at most --num-concurrent in flight; returns the results and the wall time."""
    limit = asyncio.Semaphore(args.num_concurrent)
    async with new_http_client(args.num_concurrent, args.api_key, args.read_timeout) as http:
        model = args.model or await first_model(http, args.url)
        with tqdm(total=len(prompts), desc="requests", unit="req", file=sys.stderr) as progress:

            async def one(prompt: str) -> RequestResult:
                async with limit:
                    body = request_body("chat", model, prompt, args.max_tokens, args.temperature, args.ignore_eos)
                    result = await stream_request(http, args.url, "chat", body)
                progress.update()
                return result

            start = time.perf_counter()
            results = await asyncio.gather(*(one(p) for p in prompts))
            return results, time.perf_counter() - start


def report(results: list[RequestResult], wall_s: float) -> dict:
    done = [r for r in results if r.ok]
    rates = [r.decode_tokens_per_s for r in done if r.decode_tokens_per_s]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(results),
        "failed": len(results) - len(done),
        "wall_s": wall_s,
        "mean_ttft_ms": 1000 * sum(r.ttft for r in done) / len(done) if done else None,
        "mean_decode_tokens_per_s_per_user": sum(rates) / len(rates) if rates else None,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        "python -m bench.client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-concurrent", type=int, default=32, help="requests in flight (default: %(default)s)")
    parser.add_argument(
        "--prompt-json-path", default=str(SAMPLES_DIR / "batch32.json"), help="prompt file (default: %(default)s)"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="server root or its /v1 root (default: %(default)s)")
    parser.add_argument("--model", help="model name (default: the first one the server lists)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=arg_types.finite, default=0.0, help="(default: %(default)s, greedy)")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="generate --max-tokens every time, like the demo without stop_at_eos"
    )
    parser.add_argument("--json", metavar="FILE", help="write the answers and figures as JSON to FILE ('-': stdout)")
    parser.add_argument(
        "--read-timeout", type=float, default=600.0, metavar="S",
        help="a request whose stream stays silent this long fails, the others go on (meshserve sends a keep-alive "
        "every sse_keep_alive_interval, 300 s at most, and its headers within 45 s; default: %(default)s)",
    )
    add_api_key_argument(parser)
    args = parser.parse_args(argv)
    if not args.read_timeout > 0:  # also NaN
        parser.error(f"--read-timeout must be more than 0 seconds, not {args.read_timeout}")
    for flag, value in (("--num-concurrent", args.num_concurrent), ("--max-tokens", args.max_tokens)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, not {value}")
    check_output_folder(parser, "--json", args.json)
    check_url(parser, args.url)

    try:
        prompts = load_prompts(args.prompt_json_path)
    except PromptFileError as e:
        parser.error(str(e))
    prompts = list(islice(cycle(prompts), max(len(prompts), args.num_concurrent)))
    results, wall_s = asyncio.run(run_batch(args, prompts))
    summary = report(results, wall_s)

    out = sys.stderr if args.json == "-" else sys.stdout
    for i, r in enumerate(results):
        if r.ok:
            rate = f"{r.decode_tokens_per_s:.1f} tokens/s" if r.decode_tokens_per_s else "- tokens/s"
            print(f"--- request {i}: TTFT {1000 * r.ttft:.0f} ms, {rate}, {r.output_tokens} tokens", file=out)
            print(r.text, file=out)
        else:
            print(f"--- request {i}: FAILED: {r.error}", file=out)
    print(
        f"=== {summary['requests'] - summary['failed']}/{summary['requests']} requests in {wall_s:.2f} s; "
        f"mean TTFT {_fmt(summary['mean_ttft_ms'])} ms; "
        f"mean decode {_fmt(summary['mean_decode_tokens_per_s_per_user'])} tokens/s/user; "
        f"{summary['output_tokens_per_s']:.1f} output tokens/s in total",
        file=out,
    )
    if args.json:
        answers = [
            {
                "ok": r.ok,
                "ttft_ms": 1000 * r.ttft if r.ok else None,
                "decode_tokens_per_s": r.decode_tokens_per_s if r.ok else None,
                "output_tokens": r.output_tokens,
                "text": r.text,
                "error": r.error,
            }
            for r in results
        ]
        write_json({"summary": summary, "requests": answers}, args.json)
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_json(payload: dict, where: str) -> None:
    """To the file `where`, or to stdout when it is '-'."""
    text = json.dumps(payload, indent=2)
    if where == "-":
        print(text)
    else:
        with open(where, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)  # a failed request is a failed run (scripts check the status)
