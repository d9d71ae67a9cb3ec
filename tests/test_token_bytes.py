"""Tokenizer.token_bytes: a token's own bytes (what logprobs report), not the UTF-8 of its decoded text."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.embedded import ensure_llama3_tokenizer, ensure_smollm2
from model.tokenizer import Tokenizer, load_tokenizer

EMOJI = "Emoji 👩‍💻🚀🇯🇵 café 你好"


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    files = ensure_llama3_tokenizer()
    return {"meta": Tokenizer.from_tiktoken_file(files / "tokenizer.model"), "hf": Tokenizer.from_hf_dir(files),
            "smol": load_tokenizer(ensure_smollm2())}


def test_hf_byte_level_bytes_equal_metas_for_every_token(tokenizers):
    meta, hf = tokenizers["meta"], tokenizers["hf"]
    assert all(hf.token_bytes(i) == meta.token_bytes(i) for i in range(meta.vocab_size))


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_partial_characters_have_their_own_bytes(tokenizers, name):
    tok = tokenizers[name]
    ids = tok.encode(EMOJI)
    partial = [t for t in ids if tok.decode([t]).endswith("\ufffd")]
    assert partial, "the emoji must split across tokens for this test to mean anything"
    assert all(b"\xef\xbf\xbd" not in tok.token_bytes(t) for t in partial)
    assert b"".join(tok.token_bytes(t) for t in ids) == EMOJI.encode()


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_special_tokens_are_their_text(tokenizers, name):
    tok = tokenizers[name]
    for text, token_id in list(tok.special_ids.items())[:20]:
        assert tok.token_bytes(token_id) == text.encode()


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_categories=("Cc", "Cs")),
                    max_size=40))
def test_the_bytes_of_a_texts_tokens_spell_the_text(tokenizers, name, text):
    tok = tokenizers[name]
    assert b"".join(tok.token_bytes(t) for t in tok.encode(text)) == text.encode()


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_an_id_past_the_vocabulary_is_a_value_error_in_every_format(tokenizers, name):
    """tiktoken's own error is a KeyError, which the detokenizer (it skips such an id, as decode does) did not
    catch: a padded logits row's id failed the Meta-format stream and not the HF one."""
    from model.tokenizer import IncrementalDetokenizer

    tok = tokenizers[name]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_bytes(tok.vocab_size + 5)
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("日本")
    assert "".join(detok.step([t]) for t in [ids[0], tok.vocab_size + 5, *ids[1:]]) + detok.flush() == "日本"
