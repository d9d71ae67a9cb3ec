"""Long texts are encoded in pieces (model.tokenizer.text_pieces), which must give exactly the whole text's ids."""
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from transformers import AutoTokenizer

import model.tokenizer as tokenizer_module
from model.embedded import ensure_llama3_tokenizer, ensure_smollm2
from model.tokenizer import Tokenizer, cuts_are_exact, load_tokenizer, text_pieces

# Where the split regexes turn: letters and digits (ASCII and not), contractions, runs of spaces and newlines,
# punctuation, Unicode spaces (NBSP, ideographic, NEL, line separator), CJK, emoji, and special-token text.
FRAGMENTS = ["a", "Z", "9", "123", "1234", "don", "'t", "'S", "'ll", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n",
             ".", ",", "!?", "\u2014", "\u2026", "\u00e9", "\u65e5\u672c\u8a9e", "\u3002", "\U0001f44b", "\u200d",
             "\u00a0", "\u3000", "\x85", "\u2028", "\u00bd", "_", "<|eot_id|>", "<|im_end|>", "<|begin_of_text|>"]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=60).map("".join)


def may_cut(text: str, at: int) -> bool:
    """The rule text_pieces documents, written out character by character."""
    before_space = text[at] == " " and text[at - 1].isascii() and text[at - 1].isalnum()
    after_newline = at >= 2 and text[at - 1] == "\n" and not text[at - 2].isspace() and not text[at].isspace()
    return before_space or after_newline


@settings(max_examples=400, deadline=None)
@given(text=texts, size=st.integers(1, 12), window=st.integers(1, 4))
def test_pieces_rejoin_and_are_cut_at_the_first_place_allowed(text, size, window):
    with mock.patch.object(tokenizer_module, "CUT_SEARCH_CHARS", window):  # cuts are searched for window by window
        pieces = text_pieces(text, size)
    assert "".join(pieces) == text and (all(pieces) or pieces == [""])
    at = 0
    for piece in pieces[:-1]:
        assert len(piece) >= size
        assert not any(may_cut(text, k) for k in range(at + size, at + len(piece)))  # no earlier cut missed
        at += len(piece)
        assert may_cut(text, at)
    assert not any(may_cut(text, k) for k in range(at + size, len(text)))


@pytest.mark.parametrize("text", ["a" * 8_000_000, " " * 8_000_000], ids=["letters", "spaces"])
def test_looking_for_a_cut_lets_other_threads_run(text):
    """Finding the cuts is Python's regex, which holds the GIL: searched in one call, 8 MB with no place to cut
    (base64, a run of spaces) stood the event loop, so every stream of the replica, still for 0.3-0.9 s.
    Counted, not timed: while the worker searches, this thread is let in at each switch interval (5 ms) between two
    searches, so it runs dozens of times (34-45 here); one search over the whole text gives it no turn until the end."""
    worker = threading.Thread(target=text_pieces, args=(text,))
    turns = 0
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        turns += 1
    assert turns >= 5


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    llama3 = ensure_llama3_tokenizer()
    return {"meta": Tokenizer.from_tiktoken_file(llama3 / "tokenizer.model"), "hf": Tokenizer.from_hf_dir(llama3),
            "smol": load_tokenizer(ensure_smollm2())}


def whole_ids(tok: Tokenizer, text: str, plain: bool) -> list[int]:
    """The ids of `text` in one call to the tokenizer library."""
    if tok.tiktoken_encoding is not None:
        special = {"allowed_special": set(), "disallowed_special": ()} if plain else {"allowed_special": "all"}
        return tok.tiktoken_encoding.encode(text, **special)
    backend = tok._hf_plain if plain else tok.hf_tokenizer.backend_tokenizer
    return backend.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
@settings(max_examples=150, deadline=None)
@given(text=texts, size=st.integers(1, 12))
def test_pieces_give_the_whole_texts_ids(tokenizers, name, text, size):
    tok = tokenizers[name]
    assert tok._cuts_are_exact  # both regexes, both formats: these are the tokenizers that take pieces
    with mock.patch.multiple(tokenizer_module, LONG_TEXT_CHARS=0, PIECE_CHARS=size, PIECES_PER_BATCH=3):
        assert tok.encode(text) == whole_ids(tok, text, plain=False)
        assert tok._encode_plain(text) == whole_ids(tok, text, plain=True)


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_a_long_document_gets_the_whole_texts_ids(tokenizers, name):
    """At the real sizes: ~55 pieces of PIECE_CHARS, in batches of PIECES_PER_BATCH."""
    text = (Path(__file__).parent.parent / "bench" / "prompts" / "logbook.txt").read_text() * 3
    assert len(text_pieces(text, tokenizer_module.PIECE_CHARS)) > 2 * tokenizer_module.PIECES_PER_BATCH
    tok = tokenizers[name]
    assert tok.encode(text) == whole_ids(tok, text, plain=False)


def changed_smollm2(change) -> Tokenizer:
    hf = AutoTokenizer.from_pretrained(ensure_smollm2())
    change(hf.backend_tokenizer)
    return Tokenizer(hf_tokenizer=hf)


def keep_trailing_spaces(backend):  # pre-tokens "word " end in the space a cut goes before
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[^ ]+ ?"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


CHANGES = {
    "a split regex that keeps trailing spaces": keep_trailing_spaces,
    "a prefix space": lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "a normalizer": lambda b: setattr(b, "normalizer", normalizers.NFKC()),
    "an added token with a space": lambda b: b.add_tokens([AddedToken("sea wind")]),
    "an added token that strips": lambda b: b.add_tokens([AddedToken("<pad>", rstrip=True)]),
    "padding (a tokenizer.json saved after a padded batch)": lambda b: b.enable_padding(pad_id=2),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_tokenizer_the_cuts_do_not_fit_is_encoded_whole(change):
    tok = changed_smollm2(change)
    assert not cuts_are_exact(tok.hf_tokenizer.backend_tokenizer)
    text = "Day 3. The sea wind rose <pad> steadily\nall night. " * 4
    with mock.patch.multiple(tokenizer_module, LONG_TEXT_CHARS=0, PIECE_CHARS=8):
        assert tok.encode(text) == whole_ids(tok, text, plain=False)


def test_pieces_would_change_the_ids_of_a_tokenizer_refused():
    """Why the check above matters: an added token that holds a space is one id whole, text cut in two."""
    backend = changed_smollm2(CHANGES["an added token with a space"]).hf_tokenizer.backend_tokenizer
    text = "The sea wind rose. " * 20
    assert " wind" in text_pieces(text, 3)
    in_pieces = [i for piece in text_pieces(text, 3) for i in backend.encode(piece, add_special_tokens=False).ids]
    assert in_pieces != backend.encode(text, add_special_tokens=False).ids


def test_warm_builds_the_plain_copy_before_any_request_needs_it(tokenizers):
    tok = Tokenizer.from_hf_dir(ensure_llama3_tokenizer())
    assert "_hf_plain" not in vars(tok)
    tok.warm()
    assert "_hf_plain" in vars(tok)
    assert tok.encode_chat([{"role": "user", "content": "<|eot_id|>"}]) == \
        tokenizers["hf"].encode_chat([{"role": "user", "content": "<|eot_id|>"}])
