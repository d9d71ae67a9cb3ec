"""Tokenizers on real files: Meta's Llama 3 tokenizer.model and tokenizer.json (from PyPI, cached) and SmolLM2's."""
import json
import shutil

import jinja2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from deployments.protocol import CompletionRequest
from model.embedded import ensure_llama3_tokenizer, ensure_smollm2
from model.tokenizer import (LONG_TEXT_CHARS, MIXED_TEXT, IncrementalDetokenizer, Tokenizer, load_tokenizer,
                             tokenizer_match_report)

# Meta's published template for Llama 3 Instruct (tokenizer_config.json of Meta-Llama-3-8B-Instruct).
LLAMA3_HF_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHAT = [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": "  Hi 👋, 2+2?\n"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "日本語で?"}]


# Letters, digits, punctuation, whitespace, CJK and emoji: the scripts where byte-level BPE splits characters.
def mixed_text(**char_limits):
    return st.text(st.one_of(st.characters(codec="utf-8", exclude_characters="\ufffd", **char_limits),
                             st.sampled_from("\n\t\r  \ufe0f\u200d"),
                             st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
                             st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)), max_size=60)


# SmolLM2's vocabulary has no token for a few control bytes and for the lead bytes of planes 4 and up.
smollm2_safe_text = mixed_text(max_codepoint=0x3FFFF, exclude_categories=("Cc", "Cs"))


@pytest.fixture(scope="module")
def llama3_dir():
    return ensure_llama3_tokenizer()


@pytest.fixture(scope="module")
def meta(llama3_dir):
    return Tokenizer.from_tiktoken_file(llama3_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf(llama3_dir):
    return Tokenizer.from_hf_dir(llama3_dir)


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(ensure_smollm2())


@pytest.fixture(scope="module")
def tokenizers(meta, hf, smol):
    return {"meta": meta, "hf": hf, "smol": smol}


@pytest.fixture
def llama3_dir_with(tmp_path, llama3_dir):
    """A copy of the Llama 3 HF files with extra entries merged into tokenizer_config / generation_config."""
    def make(config_extra=None, generation_config=None):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(llama3_dir / name, tmp_path / name)
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **(config_extra or {})}))
        if generation_config is not None:
            (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
        return tmp_path
    return make


def test_tokenizer_match_report(llama3_dir):
    report = tokenizer_match_report()
    assert report["match"], report
    assert report["num_ids"] > 100 and report["first_mismatch"] is None


@settings(max_examples=300, deadline=None)
@given(mixed_text())
def test_meta_and_hf_formats_give_same_ids_and_round_trip(meta, hf, text):
    ids = meta.encode(text)
    assert hf.encode(text) == ids
    assert meta.decode(ids) == text and hf.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(mixed_text())
def test_token_strs_are_the_vocabulary_strings_in_both_formats(meta, hf, text):
    """vLLM's /tokenize token_strs are convert_ids_to_tokens: a token that is part of an emoji reads as itself,
    not U+FFFD. Meta's format has no strings of its own and gets the HF conversion's."""
    ids = hf.encode(f"<|begin_of_text|>{text}<|eot_id|>")
    assert meta.token_strs(ids) == hf.token_strs(ids) == hf.hf_tokenizer.convert_ids_to_tokens(ids)


def test_token_strs_of_a_split_character(smol):
    ids = smol.encode("🚀")
    assert len(ids) > 1 and "\ufffd" not in "".join(smol.token_strs(ids))
    assert smol.token_strs(ids) == smol.hf_tokenizer.convert_ids_to_tokens(ids)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        smol.token_strs([smol.vocab_size + 5])


def test_token_strs_refuses_an_unknown_id_in_both_formats(meta, hf):
    """An id past the vocabulary is the ValueError token_strs names, in Meta's format too (tiktoken's own word for
    it is a KeyError)."""
    for tokenizer in (meta, hf):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            tokenizer.token_strs([tokenizer.vocab_size + 5])


def test_a_long_text_gets_the_same_ids_by_the_gil_free_path(hf, smol):
    """Texts over LONG_TEXT_CHARS go through encode_batch (it releases the GIL): the same ids as encode."""
    text = (MIXED_TEXT + " ") * (LONG_TEXT_CHARS // len(MIXED_TEXT) + 2)
    for tok in (hf, smol):
        assert len(text) > LONG_TEXT_CHARS
        assert tok.encode(text) == tok.hf_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_special_tokens_are_single_ids_in_both_formats(meta, hf):
    assert meta.bos_id == hf.bos_id == meta.special_ids["<|begin_of_text|>"] == 128000  # Meta's published ids
    assert meta.special_ids["<|eot_id|>"] == 128009
    assert len(meta.special_ids) == 256 and meta.vocab_size == 128256
    text = "a<|start_header_id|>b<|eot_id|>"
    for tok in (meta, hf):
        ids = tok.encode(text)
        assert ids[1] == tok.special_ids["<|start_header_id|>"] and ids[-1] == tok.special_ids["<|eot_id|>"]
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special=True) == "ab"


def test_bos_follows_the_models_own_tokenizer(meta, hf, smol, llama3_dir):
    text = "Hello world"
    assert meta.encode(text, add_bos=True) == [meta.bos_id, *meta.encode(text)]
    for tok, folder in ((hf, llama3_dir), (smol, ensure_smollm2())):
        assert tok.encode(text, add_bos=True) == AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert smol.bos_id is None  # SmolLM2's tokenizer prepends nothing; its template starts with <|im_start|>


def test_stop_ids(meta, hf, smol, llama3_dir_with):
    turn_ends = {meta.special_ids[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}
    assert meta.stop_ids == hf.stop_ids == turn_ends
    assert smol.stop_ids == {smol.special_ids["<|im_end|>"]}
    pad_id = meta.special_ids["<|finetune_right_pad_id|>"]
    with_generation_config = Tokenizer.from_hf_dir(llama3_dir_with(generation_config={"eos_token_id": [pad_id]}))
    assert with_generation_config.stop_ids == turn_ends | {pad_id}


def test_one_eos_id_written_as_an_int_in_generation_config_stops_too(hf, llama3_dir_with):
    """generation_config.json may name its eos_token_id as one int, not a list (transformers' GenerationConfig
    takes both): read as no ids, a model whose turns end with it would run on to max_tokens."""
    pad_id = hf.special_ids["<|finetune_right_pad_id|>"]
    tok = Tokenizer.from_hf_dir(llama3_dir_with(generation_config={"eos_token_id": pad_id}))
    assert tok.stop_ids == hf.stop_ids | {pad_id}


def test_generation_config_sampling_values_are_the_request_defaults(hf, llama3_dir_with):
    """vLLM takes repetition_penalty, temperature, top_k, top_p and min_p from generation_config.json as a
    request's defaults (Llama 3.3 Instruct's file sets temperature 0.6 and top_p 0.9); one no request could take
    fails the load, naming the file."""
    llama33 = {"eos_token_id": [128001, 128008, 128009], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    assert Tokenizer.from_hf_dir(llama3_dir_with(generation_config=llama33)).sampling_defaults == {
        "temperature": 0.6, "top_p": 0.9}
    assert hf.sampling_defaults == {}
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer.from_hf_dir(llama3_dir_with(generation_config={"top_p": 0.0}))
    # top_k -1 is "off" in the file as at the API
    off = Tokenizer.from_hf_dir(llama3_dir_with(generation_config={"top_k": -1, "temperature": 0.7}))
    assert off.sampling_defaults == {"top_k": -1, "temperature": 0.7}
    params = CompletionRequest(model="m", prompt="hi").sampling_params(16, defaults=off.sampling_defaults)
    assert (params.top_k, params.temperature) == (0, 0.7)


def test_header_format_equals_metas_hf_template(meta, hf, llama3_dir_with):
    templated = Tokenizer.from_hf_dir(llama3_dir_with({"chat_template": LLAMA3_HF_TEMPLATE}))
    assert templated.chat_template == LLAMA3_HF_TEMPLATE
    for add_generation_prompt in (True, False):
        expected = templated.render_chat(CHAT, add_generation_prompt)
        assert meta.render_chat(CHAT, add_generation_prompt) == expected
        assert hf.render_chat(CHAT, add_generation_prompt) == expected
    ids = meta.encode_chat(CHAT)
    assert ids == hf.encode_chat(CHAT) == templated.encode_chat(CHAT)
    assert ids[0] == meta.bos_id and ids.count(meta.bos_id) == 1
    assert ids.count(meta.special_ids["<|eot_id|>"]) == len(CHAT)


@pytest.mark.parametrize("final", ["", "  ", "\n", "Sure  ", "  Sure"])
def test_an_empty_final_message_is_continued_after_its_header_whole(meta, smol, llama3_dir_with, final):
    """continue_final_message ends the prompt where the final message's text ends. transformers cuts a trimming
    template's render at its tag and strips the whitespace before it, which for an empty (or blank) final message was
    the template's own: Meta's format and Llama's template gave "...<|end_header_id|>\\n\\n", the template alone
    "...<|end_header_id|>", whose answer then began with the blank line the prompt lacked."""
    templated = Tokenizer.from_hf_dir(llama3_dir_with({"chat_template": LLAMA3_HF_TEMPLATE}))
    chat = [*CHAT, {"role": "assistant", "content": final}]
    expected = meta.render_chat(chat, False, continue_final_message=True)
    assert expected.endswith("<|end_header_id|>\n\n" + final.strip())
    assert templated.render_chat(chat, False, continue_final_message=True) == expected
    # a template that does not trim keeps the blank text itself, as written
    assert smol.render_chat(chat, False, continue_final_message=True).endswith("<|im_start|>assistant\n" + final)


def test_model_template_is_used_when_present(smol):
    template = json.loads((ensure_smollm2() / "tokenizer_config.json").read_text())["chat_template"]
    expected = jinja2.Template(template).render(messages=CHAT, add_generation_prompt=True)
    assert smol.render_chat(CHAT) == expected
    assert smol.encode_chat(CHAT) == smol.encode(expected)
    assert "<|start_header_id|>" not in expected


def test_load_tokenizer_picks_the_format(llama3_dir, tmp_path, hf):
    assert "<|image|>" in load_tokenizer(llama3_dir).special_ids  # tokenizer.json preferred (vision release)
    shutil.copy(llama3_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    for path in (tmp_path, tmp_path / "tokenizer.model"):
        tok = load_tokenizer(path)
        assert "<|image|>" not in tok.special_ids and tok.chat_template is None
        assert tok.encode(MIXED_TEXT) == hf.encode(MIXED_TEXT)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "empty")


def stream(tok, ids, chunk_sizes, **kwargs):
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas, i = [], 0
    for size in chunk_sizes:
        deltas.append(detok.step(ids[i:i + size]))
        i += size
    deltas.append(detok.step(ids[i:]))
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
@settings(max_examples=60, deadline=None)
@given(text=smollm2_safe_text, chunk_sizes=st.lists(st.integers(1, 3), max_size=40))
def test_incremental_detokenization_equals_full_decode(tokenizers, name, text, chunk_sizes):
    tok = tokenizers[name]
    assume(not any(special in text for special in tok.special_ids))  # encode makes those special tokens
    ids = tok.encode(text)
    deltas = stream(tok, ids, chunk_sizes)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_detokenizer_holds_back_split_characters(tokenizers, name):
    tok = tokenizers[name]
    ids = tok.encode("東京🚀👩‍💻")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens really end mid-character
    deltas = stream(tok, ids, [1] * len(ids))
    assert "".join(deltas) == "東京🚀👩‍💻" and not any("\ufffd" in d for d in deltas)
    # A stream cut mid-character (max_tokens) holds the partial bytes, and the end drops them: no U+FFFD.
    for cut in [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]:
        detok = IncrementalDetokenizer(tok)
        text = "".join(detok.step([i]) for i in ids[:cut]) + detok.flush()
        assert text == tok.decode(ids[:cut])[:-1] and "\ufffd" not in text
    # ... also when a skipped special token came after the partial bytes (an answer with ignore_eos).
    first_cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.step([i]) for i in [*ids[:first_cut], tok.eos_id]) + detok.flush()
    assert text == tok.decode(ids[:first_cut])[:-1]


def save_byte_fallback_tokenizer(path) -> None:
    """A SentencePiece-style BPE (spaces as U+2581, byte fallback) that knows only "h", "i" and "▁" as text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "h": 259, "i": 260, "▁": 261}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>").save_pretrained(path)


def test_a_cut_character_is_dropped_whole_with_sentencepiece_byte_fallback(tmp_path):
    """Byte fallback decodes each byte of a partial character to its own U+FFFD: all of them go."""
    save_byte_fallback_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hi 😀")
    assert tok.decode(ids[:-1]) == "hi \ufffd\ufffd\ufffd"  # three bytes of four, one U+FFFD each
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step([i]) for i in ids[:-1]) + detok.flush() == "hi "


def test_sentencepiece_token_bytes_have_their_spaces(tmp_path):
    """A SentencePiece token writes a space as U+2581: its bytes (logprobs' `bytes`) hold the space itself, so the
    bytes of a text's tokens spell the text (after the space the normalizer prepends)."""
    save_byte_fallback_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert b"".join(map(tok.token_bytes, tok.encode("hi hi 😀"))) == " hi hi 😀".encode()


def test_a_tokenizer_without_a_decoder_loads(tmp_path):
    """A tokenizer.json's decoder may be null (decode then joins the tokens with spaces): it has no steps to read,
    none of them byte-level, and it streams as it decodes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    hf = HFTokenizer(models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "h": 3, "i": 4}, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["decoder"] is None
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hi")
    assert not tok.decodes_bytes and [tok.token_text(i) for i in ids] == ["h", "i"]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step([i]) for i in ids) + detok.flush() == tok.decode(ids) == "h i"

def test_a_sentencepiece_tokens_text_is_its_pieces_with_the_space_its_decode_strips(tmp_path):
    """logprobs' `token` of a piece that starts with "▁": its decode alone ("hi") with the space put back in front
    (" hi"), as the piece spells it; a piece of one character ("▁" alone) never showed whether it went in front."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "h": 3, "i": 4, "▁": 5, "▁h": 6, "▁hi": 7}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi hi") == [7, 7] and tok.decode([7]) == "hi"
    assert [tok.token_text(i) for i in (7, 6, 3)] == [" hi", " h", "h"]


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_a_replacement_character_the_model_wrote_is_kept(tokenizers, name):
    tok = tokenizers[name]
    for text in ["bad byte: \ufffd", "\ufffd", "x\ufffd\ufffd"]:
        assert "".join(stream(tok, tok.encode(text), [1] * 10)) == text


def test_detokenizer_skips_special_tokens_and_uses_prompt_context(meta):
    prompt = meta.encode_chat([{"role": "user", "content": "hi"}])
    answer = meta.encode("Hello there 👋") + [meta.special_ids["<|eot_id|>"]]
    deltas = stream(meta, answer, [1] * len(answer), prompt_ids=prompt)
    assert "".join(deltas) == "Hello there 👋"
    assert "".join(stream(meta, answer, [], skip_special=False)) == "Hello there 👋<|eot_id|>"


class DecodeSpy:
    """Forwards decode and records how many ids each call had to decode (the rest is the tokenizer's)."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, skip_special=False):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special)


def test_detokenizer_work_per_step_does_not_grow_with_output(meta):
    ids = meta.encode("多言語のテキスト 🚀 and English words, numbers 12345. " * 40)
    spy = DecodeSpy(meta)
    detok = IncrementalDetokenizer(spy)
    text = "".join(detok.step([i]) for i in ids) + detok.flush()
    assert text == meta.decode(ids) and len(ids) > 500
    assert max(spy.sizes) <= 8


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_a_token_of_whole_characters_decodes_alone(tokenizers, name):
    """With nothing held back, a byte-level tokenizer's token whose text is whole characters adds that text after
    any context: the step decodes it alone (kept once found), not its context with it, the stream's every token."""
    tok = tokenizers[name]
    text = "The quick brown fox jumps over the lazy dog, 42 times. Café 🚀 " * 10
    ids = tok.encode(text)
    spy = DecodeSpy(tok)
    detok = IncrementalDetokenizer(spy)
    deltas = [detok.step([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    partial = sum("\ufffd" in tok.decode([i]) for i in ids)  # a character's first bytes: held back, and the next
    windows = sum(size > 1 for size in spy.sizes)  # token's step decodes the window
    assert windows <= 2 * partial + 1 < len(ids) // 2


@pytest.mark.parametrize("name", ["meta", "smol"])
def test_a_run_of_skipped_special_tokens_does_not_grow_the_work(tokenizers, name):
    """Under ignore_eos a model may write EOS after EOS; skipped, they add no text. They stayed in the window,
    so each step decoded the whole run again: 8,000 of them took ~10 s of the ingress loop's CPU."""
    tok = tokenizers[name]
    ids = [*tok.encode("Hi 🚀"), *[tok.eos_id] * 2000, *tok.encode(" ok 東京"), tok.eos_id]
    spy = DecodeSpy(tok)
    detok = IncrementalDetokenizer(spy)
    text = "".join(detok.step([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special=True) == "Hi 🚀 ok 東京"
    assert max(spy.sizes) <= 8
    detok = IncrementalDetokenizer(tok, skip_special=False)  # kept as text, they are emitted as they come
    assert "".join(detok.step([i]) for i in ids) + detok.flush() == tok.decode(ids)


@pytest.mark.parametrize("name", ["meta", "smol"])
def test_a_run_of_bytes_that_never_form_a_character_does_not_grow_the_work(tokenizers, name):
    """Every token of a run of lone lead bytes (allowed_token_ids can force one) ends the text in U+FFFD: all of
    them were held while it did, and each step decoded the whole run again (8,000 took ~30 s of the ingress
    loop's CPU). Each is U+FFFD once the next lead byte shows it can never be completed."""
    tok = tokenizers[name]
    lead = next(t for t in range(tok.vocab_size) if tok.token_bytes(t) == b"\xc3")
    ids = [*tok.encode("Hi"), *[lead] * 500, *tok.encode("é 🚀"), lead]
    spy = DecodeSpy(tok)
    detok = IncrementalDetokenizer(spy)
    deltas = [detok.step([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids)[:-1] == "Hi" + "\ufffd" * 500 + "é 🚀"
    assert max(spy.sizes) <= 8
    first = len(tok.encode("Hi"))
    assert deltas[first:first + 3] == ["", "\ufffd", "\ufffd"]  # a lead byte waits only for the next token


def test_chat_template_kwargs_are_template_variables():
    """vLLM's chat_template_kwargs: more variables for the model's own template."""
    import copy

    tok = copy.deepcopy(load_tokenizer(ensure_smollm2()))
    tok._hf.chat_template = tok.chat_template = (
        "{% for m in messages %}{{ greeting | default('hello') }} {{ m['content'] }}{% endfor %}")
    messages = [{"role": "user", "content": "x"}]
    assert tok.render_chat(messages, False) == "hello x"
    assert tok.render_chat(messages, False, template_kwargs={"greeting": "hi"}) == "hi x"


@pytest.mark.parametrize("prefill", ["The answer is", "  The answer is \n"])
def test_continue_final_message_ends_inside_it(meta, hf, smol, llama3_dir_with, prefill):
    """transformers' continue_final_message (vLLM's) is the reference; Meta's header format gives the same text."""
    chat = [*CHAT, {"role": "assistant", "content": prefill}]
    templated = Tokenizer.from_hf_dir(llama3_dir_with({"chat_template": LLAMA3_HF_TEMPLATE}))
    expected = templated.render_chat(chat, False, continue_final_message=True)
    assert expected.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is")
    assert meta.render_chat(chat, False, continue_final_message=True) == expected
    assert hf.render_chat(chat, False, continue_final_message=True) == expected
    assert meta.encode_chat(chat, False, continue_final_message=True) == meta.encode(expected)
    smol_text = smol.render_chat(chat, False, continue_final_message=True)
    assert smol_text == smol.render_chat(chat, False).removesuffix("<|im_end|>\n")  # its template keeps the spaces
    for tok in (meta, smol):
        with pytest.raises(ValueError):  # nothing to continue
            tok.render_chat([*CHAT, {"role": "assistant", "content": None}], False, continue_final_message=True)


@pytest.mark.parametrize("name", ["meta", "hf", "smol"])
def test_a_character_still_being_written_costs_no_third_decode(tokenizers, name):
    """While the only unread tokens are those of one character still being written, nothing is final: the step
    returns at once, with the two decodes of any step (a third decoded what was already emitted)."""
    tok = tokenizers[name]
    ids = tok.encode("東京タワー😀🚀👩‍💻" * 20)
    spy = DecodeSpy(tok)
    detok = IncrementalDetokenizer(spy)
    assert "".join(detok.step([i]) for i in ids) + detok.flush() == "東京タワー😀🚀👩‍💻" * 20
    assert len(spy.sizes) <= 2 * len(ids) + 2


@pytest.mark.parametrize("name", ["meta", "smol"])
def test_one_ids_text_kept_for_the_detokenizer_follows_skip_special(llama3_dir, name):
    """decode keeps one id's text (the incremental detokenizer's context at every step): a special token's is
    itself or nothing by skip_special, whichever was asked first, and a plain token's is the same either way."""
    fresh = [Tokenizer.from_tiktoken_file(llama3_dir / "tokenizer.model") if name == "meta"
             else load_tokenizer(ensure_smollm2()) for _ in range(2)]
    for tok, order in zip(fresh, [(False, True), (True, False)]):
        eos, (word,) = tok.eos_id, tok.encode(" hello")
        for skip in order * 2:
            assert tok.decode([eos], skip) == ("" if skip else tok.decode([word, eos])[len(" hello"):])
            assert tok.decode([word], skip) == " hello"
        assert tok.decode([tok.vocab_size + 7]) == ""  # past the vocabulary: adds nothing, as before


def test_a_byte_level_added_tokens_bytes_are_what_decode_reads(tmp_path):
    """The byte-level decoder reads an added token's text in its byte alphabet, as a vocabulary token's: "ĠfooĠ" is
    " foo ", "aðŁĺ" an "a" and an emoji's first bytes. Taken as its text's UTF-8, its bytes (logprobs', and the
    detokenizer's, which holds a character's first bytes back) said otherwise, and the emoji it began streamed as
    U+FFFD."""
    hf = AutoTokenizer.from_pretrained(ensure_smollm2())
    hf.add_tokens(["ĠfooĠ", "aðŁĺ"])
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = hf.convert_tokens_to_ids(["ĠfooĠ", "aðŁĺ", "Ģ"])  # "Ģ": the byte 0x80, the emoji's last
    assert tok.decode(ids) == " foo a😀"
    assert b"".join(map(tok.token_bytes, ids)) == " foo a😀".encode()
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step([i]) for i in ids) + detok.flush() == " foo a😀"


def test_an_added_token_that_is_not_special_is_streamed_as_text(tmp_path):
    """Only added tokens marked special are skipped: a plain added token ("<x>" here; some models add their
    reasoning tags so) is text, as transformers' decode with skip_special_tokens keeps it."""
    save_byte_fallback_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    hf.add_tokens(["<x>"])
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = [*tok.encode("hi"), hf.convert_tokens_to_ids("<x>"), tok.eos_id]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step([i]) for i in ids) + detok.flush() == hf.decode(ids, skip_special_tokens=True)


def test_a_step_of_several_tokens_ending_inside_a_character_sends_what_comes_before(meta):
    """A token may start with a stray continuation byte and end with a lead byte (Llama 3's b"\\xa4\\xed"): nothing is
    pending before it, so the text before it is final. A step of "a" and that token sends "a"; the flush drops only
    the token that the unfinished character crosses."""
    (a,) = meta.encode("a")
    stray = next(t for t in range(meta.vocab_size) if meta.token_bytes(t) == b"\xa4\xed")
    detok = IncrementalDetokenizer(meta)
    assert detok.step([a, stray]) == "a"
    assert detok.flush() == ""


@pytest.mark.parametrize("name", ["meta", "smol"])
def test_a_run_of_skipped_special_tokens_in_steps_of_several_does_not_grow_the_work(tokenizers, name):
    """A step of several ids (a message of overlapped decode steps) drops skipped special tokens too: kept, a run of
    EOS stayed in the window, and each step decoded all of it again."""
    tok = tokenizers[name]
    ids = [*tok.encode("Hi 🚀"), *[tok.eos_id] * 500, *tok.encode(" ok 東京")]
    spy = DecodeSpy(tok)
    detok = IncrementalDetokenizer(spy)
    text = "".join(detok.step(ids[i:i + 2]) for i in range(0, len(ids), 2)) + detok.flush()
    assert text == "Hi 🚀 ok 東京"
    assert max(spy.sizes) <= 8


def test_an_id_past_the_vocabulary_keeps_the_context_that_a_leading_space_needs(tmp_path):
    """An id that adds no text (past the vocabulary: a padded logits row) leaves the window's context alone: with a
    SentencePiece decoder, which strips a decode's leading space, the next word's space needs the word before."""
    save_byte_fallback_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hi hi")
    ids = [*ids[:3], tok.vocab_size + 5, *ids[3:]]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step([i]) for i in ids) + detok.flush() == tok.decode(ids) == "hi hi"


def test_a_byte_level_added_token_outside_the_byte_alphabet_is_its_text(tmp_path):
    """The byte-level decoder reads an added token with a character outside its byte alphabet ("Ġ東京") as its text
    as written, so its bytes are that text's UTF-8, not a byte per alphabet character it holds."""
    hf = AutoTokenizer.from_pretrained(ensure_smollm2())
    hf.add_tokens(["Ġ東京"])
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("x Ġ東京 y")
    assert hf.convert_tokens_to_ids("Ġ東京") in ids
    assert b"".join(map(tok.token_bytes, ids)) == tok.decode(ids).encode() == "x Ġ東京 y".encode()


@pytest.mark.parametrize("text", ["hi <x> 東京 hi", "<x>hi東京"])
def test_sentencepiece_added_tokens_bytes_are_what_decode_reads(tmp_path, text):
    """An added token of a SentencePiece tokenizer is kept as its normalizer writes it ("<x>" as "▁<x>"), and decode
    reads that, space and all: taken as its text, its bytes (logprobs') lacked the space decode gives it."""
    save_byte_fallback_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    hf.add_tokens(["<x>", "東京"])
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(text)
    assert hf.convert_tokens_to_ids("<x>") in ids
    assert b"".join(map(tok.token_bytes, ids)) == (" " + tok.decode(ids)).encode()  # the decoder strips one space


def test_a_byte_level_decoder_before_a_strip_keeps_each_tokens_leading_space(tmp_path):
    """A Strip after ByteLevel drops a decode's leading space, as SentencePiece's does: token_text took any
    byte-level decode for the token's text, so the tokens of "Hi there" read "Hi", "there" (logprobs' `token`), neither
    at its text_offset in context nor what its `bytes` spell."""
    from tokenizers import decoders

    hf = AutoTokenizer.from_pretrained(ensure_smollm2())
    hf.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("Hi there world")
    assert [tok.token_text(i) for i in ids] == ["Hi", " there", " world"]
    assert all(tok.token_text(i).encode() == tok.token_bytes(i) for i in ids)


@pytest.mark.parametrize("then", ["", "replace", "strip"], ids=["alone", "then-replace", "then-strip"])
def test_a_byte_level_decoder_inside_a_sequence_is_byte_level(tmp_path, then):
    """Some training scripts write the ByteLevel decoder inside a Sequence, alone or before more steps; decode is the
    same. Taken for SentencePiece, a token's bytes (logprobs', the detokenizer's) were its alphabet characters' UTF-8
    ("Ġ" as C4 A0) and never part of a character, so an emoji streamed as U+FFFD."""
    from tokenizers import decoders

    hf = AutoTokenizer.from_pretrained(ensure_smollm2())
    # a step after it that strips a decode's leading space: one token's decode alone is not its text after others
    steps = {"": [], "replace": [decoders.Replace("\u2581", " ")], "strip": [decoders.Strip(" ", 1, 0)]}[then]
    hf.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), *steps])
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "Hi there 😀 東京"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(map(tok.token_bytes, ids)) == text.encode()
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step([i]) for i in ids) + detok.flush() == text
