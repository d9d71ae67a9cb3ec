"""argparse types for the benchmarks' numbers: a value out of range is a usage error naming its flag (exit 2), not
a pydantic traceback from AppConfig or a failure deep in a run, after Ray and a Serve app have started."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from model.galaxy import MAX_SEQ_LEN, MAX_TIME_SCALE


def count(least: int = 1, most: int | None = None) -> Callable[[str], int]:
    """An int in [least, most]."""
    def parse(text: str) -> int:
        value = int(text)  # ValueError: argparse's own "invalid int value"
        if value < least or most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at least {least}{f' and at most {most}' if most else ''}, "
                                             f"not {value}")
        return value
    parse.__name__ = "int"
    return parse


def finite(text: str) -> float:
    """A float that is a number: NaN passes a bound's comparison as false, and "nan" parses."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def seconds(text: str) -> float:
    """A finite float above 0."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def time_scale(text: str) -> float:
    """The simulated backend's time_scale (AppConfig's range)."""
    value = float(text)
    if not 0 < value <= MAX_TIME_SCALE:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_TIME_SCALE:g}], not {text}")
    return value


def interval_ms(text: str) -> float:
    """AppConfig's stream_interval_ms: 0 to 1000."""
    value = float(text)
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be in [0, 1000], not {text}")
    return value


def check_context(p: argparse.ArgumentParser, prompt_tokens: int, output_tokens: int) -> None:
    """The benchmarks serve max_seq_len MAX_SEQ_LEN: a request past it is a 400, after Ray and the app have started."""
    if prompt_tokens + output_tokens > MAX_SEQ_LEN:
        p.error(f"argument --output-tokens: --prompt-tokens + --output-tokens is {prompt_tokens + output_tokens}, "
                f"past the served max_seq_len {MAX_SEQ_LEN}")
