"""bench.answer_text times the ingress's real per-token paths over the whole answer."""
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
