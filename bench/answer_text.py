"""The ingress's work per token as an answer grows: does a token late in a long answer cost what an early one does?

    python -m bench.answer_text [--lengths 1024,16384,131072] [--json]

For each length, the embedded model's tokenizer encodes mixed text (code, emoji, CJK; model/tokenizer.py's
MIXED_TEXT) repeated to that many tokens, and the ingress's per-token paths take them one token at a time, as
a stream of one-token events does (deployments/streaming.py, deployments/tool_calls.py):

  stream     ChoiceText (incremental detokenizing, a stop string searched) and the chunk's SSE text
             (ChunkTemplate.render), what every streamed token costs
  tool_call  ToolCallStream over those texts inside one forced call's arguments (held until the call ends)
  total      ChoiceTotal adding every delta, then its text once (a non-streaming answer)

CPU time (time.process_time) per token over the whole answer, and over its last 1,024 tokens: when work per
token grows with the answer, the last tokens cost more than the mean. 128k tokens is the longest answer a
Galaxy's context holds.
"""
from __future__ import annotations

import argparse
import json
import time

from deployments.streaming import TEXT_SLOT, ChoiceDelta, ChoiceText, ChoiceTotal, ChunkTemplate
from deployments.tool_calls import ToolCallStream
from model.embedded import ensure_smollm2
from model.tokenizer import MIXED_TEXT, Tokenizer, load_tokenizer

TAIL = 1024  # the last tokens, timed on their own
CHUNK = 'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":' + \
    json.dumps(TEXT_SLOT, ensure_ascii=False) + ',"finish_reason":null}],"usage":null}\n\n'
TOOL = "write"  # the forced call's tool


def answer_ids(tokenizer: Tokenizer, num_tokens: int) -> list[int]:
    ids = tokenizer.encode(MIXED_TEXT.replace('"', "'"))  # no quote ends the tool call's string argument early
    return (ids * (num_tokens // len(ids) + 1))[:num_tokens]


def _timed(ids: list[int], step) -> tuple[float, float]:
    """(us per token over all of ids, us per token over the last TAIL) of step(i, token)."""
    start = time.process_time()
    tail_start = start
    for i, token in enumerate(ids):
        if i == len(ids) - TAIL:
            tail_start = time.process_time()
        step(i, token)
    end = time.process_time()
    return (end - start) / len(ids) * 1e6, (end - tail_start) / min(TAIL, len(ids)) * 1e6


def measure(tokenizer: Tokenizer, num_tokens: int) -> dict:
    ids = answer_ids(tokenizer, num_tokens)
    texts: list[str] = []
    answer = ChoiceText(tokenizer, [], ("</answer>",), 0, None)
    template = ChunkTemplate(CHUNK)

    def stream(i: int, token: int) -> None:
        text, _, _, _ = answer.feed([token], i == len(ids) - 1)
        texts.append(text)
        template.render(text)
    result = {"tokens": num_tokens, "stream": _timed(ids, stream)}

    calls = ToolCallStream([TOOL], forced=True, parallel=True)
    calls.feed('{"name": "write", "arguments": {"text": "', False)
    result["tool_call"] = _timed(ids, lambda i, _: calls.feed(texts[i], False))

    total = ChoiceTotal()
    result["total"] = _timed(ids, lambda i, _: total.add(ChoiceDelta(0, texts[i], [], [], None, i + 1, 0)))
    start = time.process_time()
    whole = total.text
    result["total_join_ms"] = (time.process_time() - start) * 1e3
    result["chars"] = len(whole)
    return result


def token_counts(text: str) -> list[int]:
    """--lengths: positive whole numbers, comma-separated (0 divided by zero, a non-number failed in int())."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts of at least 1, comma-separated, e.g. 1024,16384")
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=token_counts, default="1024,16384,131072", help="answer lengths in tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(ensure_smollm2())
    results = [measure(tokenizer, n) for n in args.lengths]
    if args.json:
        print(json.dumps(results))
        return results
    print("CPU us per token of the ingress's text paths: mean over the answer / over its last tokens")
    print(f"{'tokens':>7} {'chars':>8} {'stream':>15} {'tool_call':>15} {'total':>15} {'join ms':>8}")
    for r in results:
        cols = "".join(f"{r[k][0]:>8.1f} /{r[k][1]:>5.1f}" for k in ("stream", "tool_call", "total"))
        print(f"{r['tokens']:>7} {r['chars']:>8} {cols} {r['total_join_ms']:>8.2f}")
    return results


if __name__ == "__main__":
    main()
