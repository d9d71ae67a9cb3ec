"""Long lists' JSON written a slice per call, put into an answer's JSON in place of marks.

One json.dumps or pydantic dump holds the GIL until it returns, on a thread as on the event loop: over a whole answer's
logprobs (8,192 tokens with 20 top_logprobs, 15 MB: a pydantic dump of the chat choice ~0.2 s, a model_dump and
json.dumps of it ~0.8 s and ~0.5 s on the 2-core box) it stood every stream of the ingress replica still. Written SLICE
items per call, the loop runs between calls, and the text is the one a single call writes. Each copy of a whole answer
holds the GIL too (15 MB: ~10-20 ms here), so the slices are joined once, with the answer around them.
"""
from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Sequence
from typing import AnyStr

from pydantic import BaseModel, TypeAdapter

SLICE = 256  # items per call: a few ms at most for a token's logprobs with 20 alternatives


class Spliced:
    """Long lists' JSON held apart from the answer that carries them: `mark` writes a list's JSON a slice per call
    and gives a string to put in the answer where the list goes (no text holds it: it is drawn for each answer);
    `fill` puts each list's JSON in its marks' places, in an answer written by a JSON dump that writes that string as
    is (quoted, ASCII). A pydantic model holding a mark where a list is typed is dumped with warnings=False: the value
    is not of the type, on purpose."""

    def __init__(self):
        self._tag = f"meshserve-list-{secrets.token_hex(8)}-"
        self._lists: list[tuple[list, str | bytes]] = []  # each: its slices' JSON without brackets, and `between`

    def mark(self, items: Sequence, dump: Callable[[list], AnyStr], between: AnyStr, size: int | None = None) -> str:
        """The mark of dump(items), written `size` (SLICE) items per call of dump. `between` is what dump writes
        between two items (its separator: "," compact, ", " json.dumps' default), of the answer's type (str, bytes)."""
        size = size or SLICE
        self._lists.append(([dump(items[at:at + size])[1:-1] for at in range(0, len(items), size)], between))
        return f"{self._tag}{len(self._lists) - 1}"

    def fill(self, answer: AnyStr) -> AnyStr:
        """`answer` with every quoted mark replaced by its list's JSON: one join of the whole."""
        if not self._lists:
            return answer
        text = isinstance(answer, str)
        quote, opening, closing = ('"', "[", "]") if text else (b'"', b"[", b"]")
        head, *rest = answer.split(quote + (self._tag if text else self._tag.encode()))
        parts = [head]
        for piece in rest:  # each: the list's number, the closing quote, the answer up to the next mark
            number, _, after = piece.partition(quote)
            slices, between = self._lists[int(number)]
            parts.append(opening)
            for i, sliced in enumerate(slices):
                parts += (between, sliced) if i else (sliced,)
            parts += (closing, after)
        return answer[:0].join(parts)


@functools.cache
def field_dump(model: type[BaseModel], field: str, validate: bool = False) -> Callable[[list], bytes]:
    """A dump (for Spliced.mark, between b",") of `model`'s list `field` as the model's own dump writes it (pydantic's
    floats, which json.dumps writes otherwise); with `validate`, each slice validated first, as model(...) validates."""
    adapter = TypeAdapter(model.model_fields[field].annotation)
    if validate:
        return lambda part: adapter.dump_json(adapter.validate_python(part))
    return lambda part: adapter.dump_json(part)
