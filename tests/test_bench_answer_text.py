"""bench.answer_text times the ingress's real per-token paths over the whole answer."""
import pytest

from bench.answer_text import answer_ids, main
from tests.ingress_support import tokenizer  # noqa: F401  (fixture)


def test_it_times_every_path_over_the_whole_answer(tokenizer):  # noqa: F811
    (result,) = main(["--lengths", "1500", "--json"])
    assert result["tokens"] == 1500
    whole = tokenizer.decode(answer_ids(tokenizer, 1500), skip_special=True)
    assert result["chars"] == len(whole.rstrip("\ufffd"))  # all of it streamed, less a character cut at the end
    for path in ("stream", "tool_call", "total"):
        mean, tail = result[path]
        assert mean > 0 and tail > 0


@pytest.mark.parametrize("lengths", ["0", "-5", "abc", "10,", "1e3"])
def test_bad_lengths_are_usage_errors(lengths, capsys):
    """0 and negative lengths ended in ZeroDivisionError, a non-number in int()'s ValueError: tracebacks."""
    with pytest.raises(SystemExit) as exit_:
        main(["--lengths", lengths])
    assert exit_.value.code == 2 and "--lengths" in capsys.readouterr().err
