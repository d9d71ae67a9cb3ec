"""Llama 3 tokenizers in both on-disk formats behind one class, and detokenization for streaming.

Meta's checkpoints ship `tokenizer.model`: tiktoken BPE ranks only; the special tokens and the split regex
live in Meta's code and are reproduced here. Hugging Face folders ship `tokenizer.json` (and the model's chat
template in tokenizer_config.json). Serving must treat both alike: the same ids for the same text, the same
chat prompt and the same stop ids, which `tokenizer_match_report` checks on Meta's real files.

Special-token text inside the input ("<|eot_id|>") becomes the special id in `encode`, as Hugging Face
tokenizers do; rendered chat templates rely on it. `encode_chat` makes only the template's own special
tokens special: inside a message the same text stays text, so a user cannot forge a turn.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken
from tiktoken.load import load_tiktoken_bpe

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# From Meta's llama3 reference tokenizer: how text is split before BPE, and the 256 special tokens after the ranks.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
LLAMA3_NAMED_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
# End-of-turn markers that stop generation besides eos (<|eom_id|>: end of a tool-calling message).
TURN_END_TOKENS = ("<|eot_id|>", "<|eom_id|>")
# Texts longer than this (all that the ingress tokenizes off its event loop: INLINE_CHARS) are tokenized by the
# Hugging Face tokenizer's encode_batch, which releases the GIL while it runs. Its encode holds the GIL: a 7.8 MB
# prompt (vLLM's truncate_prompt_tokens takes one up to the body limit) stalled every other request of the replica
# for ~3 s (py-spy: the tokenizer thread "active+gil", the event loop waiting for it), a 99,000-character one 36 ms.
LONG_TEXT_CHARS = 2_000
# ...and in pieces of about PIECE_CHARS (see `text_pieces`), PIECES_PER_BATCH to a call. Reading a whole text's
# ids (60 ms for 3.9 MB, 1.9M ids) and freeing its Encoding (140-235 ms: Rust frees each token's string and
# offsets) hold the GIL, which stood every stream of the replica still once per long prompt; a piece's share is
# ~1-2 ms. A batch's working memory (~165-240 bytes per byte of text) is freed before the next batch's is taken.
PIECE_CHARS = 32_768
PIECES_PER_BATCH = 8
_CUT = re.compile(r"(?<=[0-9A-Za-z])(?= )|(?<=\S\n)(?=\S)")  # where text_pieces may cut
# Characters _CUT searches per call: a call holds the GIL (up to ~120 ns a character: 8 MB of spaces or letters,
# where it finds no cut, took 0.3-0.9 s in one call, standing every stream still), so it searches in windows.
CUT_SEARCH_CHARS = 32_768

ChatMessage = Mapping[str, str]
_LLAMA3_ROLES = {"tool": "ipython"}  # Llama 3 names the turn that carries a tool's output `ipython`


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at least `size` characters (the last one shorter; the whole text where there is
    no cut), each cut just before a space that follows an ASCII letter or digit, or just after a newline with a
    non-space on either side.

    Both are where the split regexes of GPT-2 (the ByteLevel pre-tokenizer's own) and of Llama 3
    (LLAMA3_SPLIT_PATTERN) end a pre-token, at the end of the text as in its middle: in both, a pre-token that
    holds a letter or digit ends with one and holds no space after it, one that holds a newline holds only
    whitespace after it, and a newline between non-spaces ends its pre-token (".\n" or "\n") whether a
    non-space or the text's end comes next. Neither regex looks behind, so the text after a cut splits as it does
    in place, and BPE merges only within a pre-token: the pieces' ids are the whole text's."""
    pieces, start, at = [], 0, size
    while at < len(text):
        if cut := _CUT.search(text, at, at + CUT_SEARCH_CHARS):
            pieces.append(text[start:cut.start()])
            start = cut.start()
            at = start + size
        else:
            at += CUT_SEARCH_CHARS
    pieces.append(text[start:])
    return pieces


def cuts_are_exact(backend: HFTokenizer) -> bool:
    """Whether `text_pieces` keeps the ids of this Hugging Face tokenizer: a BPE model after GPT-2's or Llama 3's
    split regex with no prefix space added, no normalizer (one could join across a cut), no padding (encode_batch
    would pad each piece to the batch's longest), and added tokens (split out before the regex) that hold no space
    or newline and strip nothing beside them."""
    def like(node, fields: Mapping) -> bool:
        return isinstance(node, Mapping) and all(node.get(k) == v for k, v in fields.items())

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    llama3 = ({"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False})
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
    steps = pre.get("pretokenizers", ()) if like(pre, {"type": "Sequence"}) else ()
    regex = like(pre, gpt2) or (len(steps) == len(llama3) and all(map(like, steps, llama3)))
    bpe = type(backend.model).__name__ == "BPE" and backend.model.dropout is None
    return (regex and bpe and backend.normalizer is None and backend.truncation is None
            and backend.padding is None
            and not any(" " in t.content or "\n" in t.content or t.lstrip or t.rstrip
                        for t in backend.get_added_tokens_decoder().values()))


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's, used by Llama 3 and SmolLM2) stores each byte as a printable character:
    printable Latin-1 bytes as themselves, the other bytes as U+0100 onwards. Char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()
_CHAR_OF_BYTE = {b: c for c, b in _BYTE_OF_CHAR.items()}


def llama3_special_tokens() -> list[str]:
    """Meta's order (their ids follow the BPE ranks): the named tokens, then reserved 2..247."""
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(2, LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED_SPECIAL) + 2)]
    return [*LLAMA3_NAMED_SPECIAL, *reserved]


class Tokenizer:
    """encode/decode, chat prompt, BOS and stop ids for one model; build with `load_tokenizer`."""

    def __init__(self, *, tiktoken_encoding: tiktoken.Encoding | None = None,
                 hf_tokenizer: PreTrainedTokenizerBase | None = None, extra_stop_ids: Sequence[int] = (),
                 sampling_defaults: Mapping[str, float] | None = None):
        """`sampling_defaults`: what a request that leaves a sampling field out gets (see generation_defaults)."""
        assert (tiktoken_encoding is None) != (hf_tokenizer is None), "exactly one format"
        self._tiktoken = tiktoken_encoding
        self._hf = hf_tokenizer
        # bound once: the incremental detokenizer decodes at every token, and the property costs ~0.3 us a call
        self._hf_decode = hf_tokenizer.backend_tokenizer.decode if hf_tokenizer is not None else None
        if tiktoken_encoding is not None:
            self.special_ids: dict[str, int] = {t: tiktoken_encoding.encode_single_token(t)
                                                for t in tiktoken_encoding.special_tokens_set}
            self.vocab_size = tiktoken_encoding.n_vocab
            self.bos_id: int | None = self.special_ids["<|begin_of_text|>"]
            eos_id = self.special_ids["<|end_of_text|>"]
            self.chat_template: str | None = None  # Meta's format has none: Llama 3's header format applies
            self._cuts_are_exact = (tiktoken_encoding._pat_str == LLAMA3_SPLIT_PATTERN  # from_tiktoken_file's
                                    and not any(" " in t or "\n" in t for t in tiktoken_encoding.special_tokens_set))
            self.decodes_bytes = True
        else:
            backend = hf_tokenizer.backend_tokenizer
            self.special_ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            # BOS is whatever the tokenizer's own post-processor prepends: Llama 3 adds one, SmolLM2 none.
            prepended = backend.encode("", add_special_tokens=True).ids
            self.bos_id = prepended[0] if prepended[:1] == [hf_tokenizer.bos_token_id] else None
            eos_id = hf_tokenizer.eos_token_id
            self.chat_template = hf_tokenizer.chat_template
            # The decoder's steps: a Sequence's, else itself. Some training scripts (the tokenizers library)
            # write ByteLevel inside a Sequence; taken for SentencePiece, a token's bytes were its alphabet's
            # characters' UTF-8 ("Ġhi" as C4 A0 68 69), none partial, and an emoji streamed as U+FFFD.
            decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
            steps = [d.get("type") for d in decoder.get("decoders", [decoder])]
            self._byte_level = steps[:1] == ["ByteLevel"]  # the bytes the steps after it (if any) read
            self.decodes_bytes = steps == ["ByteLevel"]
            self._cuts_are_exact = cuts_are_exact(backend)
        # decodes_bytes: decode is the ids' bytes joined, read as UTF-8 with U+FFFD for bytes that form no character
        # (tiktoken's, and Hugging Face's byte-level decoder alone): then text that starts at a character's first
        # byte decodes alike alone or after any tokens, which the incremental detokenizer's usual step relies on
        self.eos_id: int | None = eos_id
        turn_ends = [self.special_ids[t] for t in TURN_END_TOKENS if t in self.special_ids]
        self.stop_ids = frozenset(i for i in (eos_id, *turn_ends, *extra_stop_ids) if i is not None)
        self.special_id_set = frozenset(self.special_ids.values())
        self.sampling_defaults: dict[str, float] = dict(sampling_defaults or {})
        self._bytes_of: dict[int, bytes] = {}  # token_bytes' answers: at most the vocabulary (~10 MB for 128k)
        self._text_of: tuple[dict[int, str], dict[int, str]] = ({}, {})  # one id's decode, by skip_special; likewise
        alternatives = "|".join(map(re.escape, sorted(self.special_ids, key=len, reverse=True)))
        self._special_text = re.compile(f"({alternatives or '(?!)'})")  # (?!): a tokenizer with none

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token holds (SmolLM2's: a newline and 80 spaces; Llama 3's: 128 spaces): text
        with more characters than this per token of a context cannot fit it."""
        if self._tiktoken is not None:
            return max(map(len, self._tiktoken.token_byte_values()))
        return max(map(len, self._hf.get_vocab()))  # a byte-level token's text: a character per byte

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding | None:
        """The Meta-format encoding (None for a Hugging Face tokenizer); grammar engines build on it."""
        return self._tiktoken

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The Hugging Face tokenizer (None for Meta's format); grammar engines build on it."""
        return self._hf

    @classmethod
    def from_tiktoken_file(cls, path: str | Path) -> Tokenizer:
        ranks = load_tiktoken_bpe(str(path))
        specials = {token: len(ranks) + i for i, token in enumerate(llama3_special_tokens())}
        encoding = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_SPLIT_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=specials)
        return cls(tiktoken_encoding=encoding)

    @classmethod
    def from_hf_dir(cls, model_dir: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer  # heavy import: only the HF format pays for it

        model_dir = Path(model_dir)
        generation_config = model_dir / "generation_config.json"
        config = _json_file(generation_config)
        eos = config.get("eos_token_id")  # e.g. Llama 3.3 lists [128001, 128008, 128009] here
        extra_stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        with _named(model_dir / "tokenizer.json"):
            hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls(hf_tokenizer=hf_tokenizer, extra_stop_ids=extra_stop_ids,
                   sampling_defaults=generation_defaults(config, generation_config))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` prepends the model's BOS if it uses one."""
        ids = self._encode(text, plain=False)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes, which need not be whole UTF-8 characters (an emoji is often 2-4 tokens), where
        decoding it alone gives U+FFFD. Logprobs report these, so a client can join them into the exact text.
        Kept once found: the detokenizer asks for a token of every character still being written (with CJK
        text, a third of the tokens), and logprobs for every token. Raises ValueError for an id past the
        vocabulary."""
        try:
            return self._bytes_of[token_id]
        except KeyError:
            data = self._bytes_of[token_id] = self._find_bytes(token_id)
            return data

    def _find_bytes(self, token_id: int) -> bytes:
        if self._tiktoken is not None:
            try:
                return self._tiktoken.decode_single_token_bytes(token_id)
            except KeyError:  # tiktoken's word for it
                raise ValueError(f"token id {token_id} is not in the vocabulary") from None
        # An added token's string too, as stored, is what decode reads, not its text's UTF-8 (which the bytes of
        # logprobs and the detokenizer were): the byte-level decoder reads it through the byte alphabet ("ĠfooĠ" is
        # " foo ", "aðŁĺ" an "a" and an emoji's first bytes), and a SentencePiece normalizer stores "<x>" as "▁<x>".
        token = self._hf.backend_tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if self._byte_level:
            if all(c in _BYTE_OF_CHAR for c in token):
                return bytes(_BYTE_OF_CHAR[c] for c in token)
            return token.encode()  # an added token outside the byte alphabet: the decoder keeps its text
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()  # SentencePiece marks a space with U+2581

    def token_text(self, token_id: int) -> str:
        """The token's text alone (logprobs' `token`): its decode, with the leading spaces back that a SentencePiece
        decoder strips from a decode's start ("▁hi" decodes alone to "hi", " hi" after a word). Without them the
        tokens of " hello hi" read "hello" and "hi": joined they lost the text's spaces, and a token's text no
        longer sat at its text_offset or spelled its `bytes` (vLLM puts them back for a Metaspace pre-tokenizer).
        Only spaces are put back: another decoder's work (WordPiece's "##", a suffix) stays as decode leaves it."""
        text = self.decode([token_id])
        if self.decodes_bytes:  # tiktoken, or ByteLevel alone: one id's decode is its bytes' text already (a step
            return text  # after ByteLevel, as a Strip of the leading space, is undone below as SentencePiece's is)
        try:
            whole = self.token_bytes(token_id).decode("utf-8", "replace")
        except ValueError:  # past the vocabulary
            return text
        lead = whole[:len(whole) - len(text)]
        return whole if whole.endswith(text) and lead.strip(" ") == "" else text

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """Each id's vocabulary string, as `convert_ids_to_tokens` gives it (vLLM's /tokenize `token_strs`):
        byte-level BPE writes a token's bytes in its printable alphabet (" hello" is "Ġhello"), so a token
        that is part of a UTF-8 character still reads as itself. Meta's format has no strings of its own; it
        gets the ones Hugging Face's conversion of the same ranks has. Raises ValueError for an unknown id."""
        if self._tiktoken is None:
            backend = self._hf.backend_tokenizer
            strs = [backend.id_to_token(i) for i in ids]
            if None in strs:
                raise ValueError(f"token id {ids[strs.index(None)]} is not in the vocabulary")
            return strs
        strs = []
        for i in ids:
            raw = self.token_bytes(i)  # its ValueError for an unknown id, not tiktoken's KeyError
            strs.append(raw.decode() if i in self.special_id_set else "".join(_CHAR_OF_BYTE[b] for b in raw))
        return strs

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters come out as U+FFFD. Ids past the
        vocabulary add nothing, in both formats (tiktoken raises KeyError for them; the HF tokenizer skips them).
        One id's text is kept once found: the incremental detokenizer decodes its context, nearly always the one
        token before, at every step."""
        if len(ids) == 1 and 0 <= (token_id := ids[0]) < self.vocab_size:
            texts = self._text_of[skip_special]
            try:
                return texts[token_id]
            except KeyError:
                text = texts[token_id] = self._decode(ids, skip_special)
                return text
        return self._decode(ids, skip_special)

    def _decode(self, ids: Sequence[int], skip_special: bool) -> str:
        if self._tiktoken is not None:
            if skip_special:
                ids = [i for i in ids if i not in self.special_id_set]
            try:
                return self._tiktoken.decode(list(ids))
            except KeyError:
                return self._tiktoken.decode([i for i in ids if 0 <= i < self.vocab_size])
        return self._hf_decode(list(ids), skip_special_tokens=skip_special)

    def special_text(self, text: str) -> str | None:
        """The first special-token text ("<|eot_id|>") in `text`, or None."""
        found = self._special_text.search(text)
        return found[0] if found else None

    @property
    def template_takes_tools(self) -> bool:
        """The model's chat template renders `tools` itself (Llama 3.1+'s does; SmolLM2's and Meta's format
        do not: the caller then describes the tools in a message of its own)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, template_kwargs: dict | None = None,
                    continue_final_message: bool = False) -> str:
        """The prompt text: the model's own chat template when it has one, Llama 3's header format otherwise.
        `tools` (OpenAI's function definitions) go to a template that takes them; `template_kwargs` are more
        variables for the template (vLLM's chat_template_kwargs; Meta's fixed format has none).
        `continue_final_message` ends the text where the final message's content ends, for the answer to go
        on from there (transformers' rule, which vLLM uses). Raises ValueError where the template refuses the
        messages, or the final message has no text to continue."""
        if self.chat_template is not None:
            def render(msgs: Sequence[ChatMessage]) -> str:
                return self._hf.apply_chat_template([dict(m) for m in msgs], tokenize=False,
                                                    add_generation_prompt=add_generation_prompt,
                                                    continue_final_message=continue_final_message,
                                                    tools=tools if self.template_takes_tools else None,
                                                    **(template_kwargs or {}))
            rendered = render(messages)
            final = messages[-1].get("content") if continue_final_message and messages else None
            if isinstance(final, str) and not final.strip():
                # transformers cuts at a tag after the final text and, where the template trimmed the tag's space,
                # strips the whitespace before it: for a blank final message, the template's own ("\n\n" after
                # Llama's header). Text in its place shows where the message starts.
                marker = f"\ue000{secrets.token_hex(8)}\ue001"
                marked = render([*messages[:-1], {**messages[-1], "content": marker}])
                head = marked.removesuffix(marker)
                if len(head) < len(marked) and len(head) > len(rendered) and head.startswith(rendered):
                    return head
            return rendered
        if "<|start_header_id|>" not in self.special_ids:
            raise ValueError("tokenizer has no chat template and no Llama 3 header tokens")
        if continue_final_message and not isinstance(messages[-1].get("content"), str):
            raise ValueError("continue_final_message is set but the final message has no content to continue")
        # Meta's ChatFormat: BOS, then per message a role header and the stripped content closed by <|eot_id|>.
        parts = ["<|begin_of_text|>"]
        parts += [f"<|start_header_id|>{_LLAMA3_ROLES.get(m['role'], m['role'])}<|end_header_id|>\n\n"
                  f"{m['content'].strip()}<|eot_id|>" for m in messages]
        if continue_final_message:
            parts[-1] = parts[-1].removesuffix("<|eot_id|>")
        elif add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, template_kwargs: dict | None = None,
                    continue_final_message: bool = False) -> list[int]:
        """Prompt ids for a chat; the template writes any BOS itself, so none is added. Special-token text
        inside a message's content stays text (see `encode_template`)."""
        return self.encode_template(messages, lambda msgs: self.render_chat(msgs, add_generation_prompt, tools,
                                                                            template_kwargs, continue_final_message))

    def encode_template(self, messages: Sequence[ChatMessage],
                        render: Callable[[Sequence[ChatMessage]], str]) -> list[int]:
        """Ids of `render(messages)` in which only the template's own special tokens are special.

        A message whose content holds special-token text ("<|im_end|>") is rendered with an unguessable
        marker in its place, which shows where the template put that content (trimmed or not); the content
        is then encoded as plain text there, JSON-escaped where the template wrote it as a JSON string (Llama
        3.1+'s tool results: `content | tojson`). A template whose output depends on the content in other ways
        is refused for such messages, as a ValueError."""
        rendered = render(messages)
        slots = [i for i, m in enumerate(messages)
                 if isinstance(m.get("content"), str) and self._special_text.search(m["content"])]
        if not slots:
            return self.encode(rendered)
        return self._encode_slots_as_text(messages, slots, render, rendered)

    def _encode_slots_as_text(self, messages: Sequence[ChatMessage], slots: Sequence[int],
                              render: Callable[[Sequence[ChatMessage]], str], rendered: str) -> list[int]:
        nonce, pad = secrets.token_hex(8), "\u2003"  # an em space: whitespace a trimming template strips
        marked = [{**m, "content": f"{pad}\ue000{nonce}:{i}\ue001{pad}"} if i in slots else m
                  for i, m in enumerate(messages)]
        template = render(marked)
        marks = list(re.finditer(f"({pad}?)\ue000{nonce}:(\\d+)\ue001({pad}?)", template))
        pieces: list[tuple[str, bool]] = []  # (text, is a message's content)
        at = pos = 0  # in template, in rendered
        for k, mark in enumerate(marks):
            content = messages[int(mark[2])]["content"]
            content = content if mark[1] else content.lstrip()
            content = content if mark[3] else content.rstrip()
            upto = marks[k + 1].start() if k + 1 < len(marks) else len(template)
            before, after = template[at:mark.start()], template[mark.end():upto]
            forms = [content]  # as written; where the template quotes it, maybe as jinja's tojson wrote it
            if template[mark.start() - 1:mark.start()] == '"' == template[mark.end():mark.end() + 1]:
                forms.append(json.dumps(content, ensure_ascii=False)[1:-1])
            # the two forms differ from their first escaped character on: at most one rebuilds what follows
            content = next((c for c in forms if rendered.startswith(before + c + after, pos)), content)
            pieces += [(before, False), (content, True)]
            at, pos = mark.end(), pos + len(before) + len(content)
        pieces.append((template[at:], False))
        if "".join(text for text, _ in pieces) != rendered:
            raise ValueError("a message holds special-token text, which this model's chat template cannot "
                             "keep as text")
        ids: list[int] = []
        text: list[str] = []  # plain text since the last special token
        for piece, is_content in pieces:
            parts = [piece] if is_content else self._special_text.split(piece)  # odd indexes: special tokens
            for j, part in enumerate(parts):
                if j % 2:
                    ids += self._encode_plain("".join(text)) + [self.special_ids[part]]
                    text = []
                else:
                    text.append(part)
        return ids + self._encode_plain("".join(text))

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with special-token text encoded as ordinary text."""
        return self._encode(text, plain=True) if text else []

    def _encode(self, text: str, plain: bool) -> list[int]:
        """Ids of `text`, special-token text as ordinary text if `plain`. A text over LONG_TEXT_CHARS is encoded by
        calls that release the GIL while they work, in pieces (`text_pieces`) where that keeps the whole text's
        ids, else whole; each piece's ids are read and its Encoding freed on their own, so the GIL is free in
        between."""
        long = len(text) > LONG_TEXT_CHARS
        pieces = text_pieces(text, PIECE_CHARS) if long and self._cuts_are_exact else [text]
        ids: list[int] = []
        if self._tiktoken is not None:
            special = {"allowed_special": set(), "disallowed_special": ()} if plain else {"allowed_special": "all"}
            for piece in pieces:
                ids += self._tiktoken.encode(piece, **special)
            return ids
        backend = self._hf_plain if plain else self._hf.backend_tokenizer
        if not long:
            return backend.encode(text, add_special_tokens=False).ids
        for at in range(0, len(pieces), PIECES_PER_BATCH):
            encodings = backend.encode_batch(pieces[at:at + PIECES_PER_BATCH], add_special_tokens=False)
            encodings.reverse()
            while encodings:
                ids += encodings.pop().ids
        return ids

    def warm(self) -> None:
        """Builds now what the first message holding special-token text would build on a request's thread with
        the GIL held, stalling every stream of the replica: Llama 3's plain copy (`_hf_plain`) takes ~0.9 s;
        its longest token (`max_token_chars`, a walk of the vocabulary) is asked by every request's length check."""
        self.max_token_chars  # noqa: B018 (a cached property: built here, once)
        if self._hf is not None:
            self._hf_plain  # noqa: B018 (a cached property: built here, once)

    @cached_property
    def _hf_plain(self):
        """A copy of the HF tokenizer that does not match special-token text (a flag on the tokenizer, so a
        copy: the shared one is used by other threads)."""
        from tokenizers import Tokenizer as HFTokenizer

        plain = HFTokenizer.from_str(self._hf.backend_tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain


# The generation_config.json fields vLLM takes as a request's defaults (vllm/config/model.py,
# get_diff_sampling_param; its max_new_tokens, a cap on every answer, is not taken here)
GENERATION_DEFAULT_FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


def generation_defaults(config: Mapping, source: Path) -> dict[str, float]:
    """The sampling defaults a model's generation_config.json sets (Llama 3.3 Instruct's: temperature 0.6, top_p
    0.9), which vLLM's server (its default --generation-config auto) gives a request that leaves them out or null:
    "user -> server default -> OpenAI default" (vllm/entrypoints/openai/chat_completion/protocol.py,
    to_sampling_params). Checked here, so a value no request could take fails the deployment, not every request."""
    from pydantic import ValidationError

    from scheduler.sampling import SamplingParams

    defaults = {name: config[name] for name in GENERATION_DEFAULT_FIELDS if config.get(name) is not None}
    try:  # a top_k of -1 is "off" at the API as in the file (vLLM's); the scheduler's is 0
        SamplingParams(**{**defaults, **({"top_k": max(defaults["top_k"], 0)} if "top_k" in defaults else {})})
    except (ValidationError, TypeError) as exc:
        raise ValueError(f"{source}: a sampling default no request could take: {exc}") from None
    return defaults


def tokenizer_file(model_dir: str | Path) -> Path:
    """The tokenizer file `load_tokenizer` reads in a model folder: tokenizer.json, else Meta's tokenizer.model.
    Raises FileNotFoundError naming the folder when it has neither."""
    model_dir = Path(model_dir)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {model_dir} (a Meta folder needs Meta's "
                            "tokenizer.model beside its weights)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A model folder (tokenizer.json preferred, else Meta's tokenizer.model) or either file itself. Raises
    FileNotFoundError as tokenizer_file does, and ValueError naming the file when it is no tokenizer read here (a
    broken tokenizer.json raised a JSONDecodeError naming no file; a SentencePiece tokenizer.model is no
    tiktoken file)."""
    path = Path(path)
    if path.is_dir():
        path = tokenizer_file(path)
    if path.name == "tokenizer.json":
        return Tokenizer.from_hf_dir(path.parent)
    with _named(path):
        return Tokenizer.from_tiktoken_file(path)


def check_tokenizer(model_dir: str | Path) -> None:
    """Raise as load_tokenizer(model_dir) would, without transformers' import (~7 s on a 2-core box), which the config
    check would otherwise add to every `make serve` and deploy: tokenizer.json read by the tokenizers library (which
    transformers' fast tokenizer wraps), tokenizer_config.json and generation_config.json parsed and the latter's
    sampling defaults checked, a tokenizer.model read as tiktoken's."""
    path = tokenizer_file(model_dir)
    with _named(path):
        if path.name == "tokenizer.model":
            Tokenizer.from_tiktoken_file(path)
            return
        from tokenizers import Tokenizer as RustTokenizer
        RustTokenizer.from_file(str(path))
    _json_file(path.parent / "tokenizer_config.json")
    generation_config = path.parent / "generation_config.json"
    generation_defaults(_json_file(generation_config), generation_config)


def _json_file(path: Path) -> dict:
    """The JSON object in `path`, {} when there is no such file; ValueError naming it when it is not JSON (a
    JSONDecodeError named no file)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e


@contextmanager
def _named(path: Path) -> Iterator[None]:
    """Re-raise what reading the tokenizer file `path` raised as ValueError naming it (a missing file stays an
    OSError, which names it already)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # the tokenizers library raises bare Exceptions; JSON, tiktoken and transformers their own
        raise ValueError(f"{path}: not a tokenizer meshserve reads ({type(e).__name__}: {e})") from e


class IncrementalDetokenizer:
    """Text deltas of a growing token stream that never split a UTF-8 character across deltas.

    Byte-level BPE tokens can end mid-character (an emoji is often 2-4 tokens). Each step decodes only a
    small window: the tokens of the last emitted delta (context, so tokenizers that drop a leading space at
    the start of a decode stay right) plus the tokens not yet emitted, and holds back those that a character
    still being written crosses. The work per step is therefore bounded by the window, not the whole output.
    (Bytes that can never form a character are U+FFFD once the next byte shows it; `flush` drops the tokens a
    character the stream ended in the middle of crosses, as vLLM's detokenizer does, rather than send U+FFFD.)
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._skipped = tokenizer.special_id_set if skip_special else frozenset()
        # a little prompt context for the first delta (skipped special tokens add no text there either)
        self._window = [t for t in prompt_ids[-4:] if t not in self._skipped]
        self._read = 0  # window[:_read] is already emitted (or prompt)
        # A prompt of token ids may end inside a character (a client continuing an answer that max_tokens cut
        # mid-emoji): its bytes stay unread, so the character is the answer's once its bytes complete it, as vLLM's
        # detokenizer primed with the prompt gives it. Read as emitted, they were lost.
        self._read = self._final_end()
        self.carried = self._window[self._read:]  # the prompt's tokens whose text is the answer's (ids)

    def step(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete ("" while a character is still partial)."""
        # Skipped special tokens add no text: kept, a run of them (EOS after EOS under ignore_eos) stayed in the
        # window, and every step decoded all of it again.
        if len(new_ids) == 1:  # nearly every step: a generator per token cost more than its one test
            if new_ids[0] not in self._skipped:
                if self._read == len(self._window) and self.tokenizer.decodes_bytes:
                    # Nothing held back: a token whose text alone is whole characters (no U+FFFD) adds just that
                    # text after any context, as decoding the window would find (its one-id decode is cached;
                    # the window's decode was ~1 us a token, a third of the detokenizer's work).
                    text = self.tokenizer.decode(new_ids, self.skip_special)
                    if text and "\ufffd" not in text:
                        self._window, self._read = [new_ids[0]], 1  # the next step's context, as _emit leaves it
                        return text
                self._window.append(new_ids[0])
        else:
            self._window.extend(t for t in new_ids if t not in self._skipped)
        return self._emit()

    def flush(self) -> str:
        """At the end of a stream, whatever was held back, less the tokens that a character the model never finished
        crosses (e.g. a max_tokens cut inside an emoji), whole: SmolLM2's " \\xf0\\x9f" is a space and an emoji's
        first bytes, and its space is not sent either, as vLLM's detokenizer never sends the text of the tokens it
        holds back. A continuation whose prompt ends with those tokens carries their text (`carried`): sent here
        too, the client that joined the two answers had the space twice. A U+FFFD the model did write (bytes EF BF
        BD) is text, and stays."""
        return self._emit()

    def _bytes(self, token_id: int) -> bytes:
        try:
            return self.tokenizer.token_bytes(token_id)
        except ValueError:  # an id past the tokenizer's vocabulary (a padded logits row): decode skips it too
            return b""

    def _emit(self) -> str:
        end = len(self._window)
        text = self.tokenizer.decode(self._window, self.skip_special)
        if text.endswith("\ufffd") and (end := self._final_end()) < len(self._window):
            if end == self._read:  # a character still being written, nothing final yet: the usual case, one decode
                return ""
            text = self.tokenizer.decode(self._window[:end], self.skip_special)
        emitted = self.tokenizer.decode(self._window[:self._read], self.skip_special)
        if len(text) <= len(emitted):
            return ""
        read, self._window = self._read, self._window[self._read:]  # what is emitted now is the next step's context
        self._read = end - read
        return text[len(emitted):]

    def _final_end(self) -> int:
        """How much of the window has its final text: all of it unless its bytes end inside a character; then
        up to the last token boundary that no character still being written crosses (there, nothing is
        pending, or the next byte starts a character: the pending bytes are one U+FFFD whatever follows).
        Holding every unread token while the text ended in U+FFFD kept a run of bytes that never form a
        character (allowed_token_ids of one lead byte) in the window, and every step decoded all of it again."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        end = self._read
        for i, token in enumerate(self._window[self._read:], self._read):
            data = self._bytes(token)
            if data and (not decoder.getstate()[0] or not 0x80 <= data[0] < 0xC0):
                end = i
            decoder.decode(data)
        return end if decoder.getstate()[0] else len(self._window)


# Code, emoji (multi-codepoint ZWJ sequences too), CJK, numbers, odd whitespace and contractions.
MIXED_TEXT = (
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n\n"
    "Prices: 3.14159, 1,000,000 and 12345678901234567890; dates 2024-09-30T14:57:00Z.\n"
    "Emoji 👩‍💻🚀🇯🇵 😀😃, accents café naïve Ångström, CJK 你好，世界！ 東京タワー 한국어.\n"
    "  tabs\tand\r\nnewlines \n\n\n  trailing   spaces   I'm we'LL they've <b>html</b> {\"json\": [1, 2]}"
)


def tokenizer_match_report() -> dict:
    """Meta's tokenizer.model and HF's tokenizer.json for Llama 3: identical ids, special tokens, stop ids and
    chat prompt ids, and exact decode round trips. `match` is the bar; the rest says where it failed.

    The files come from the Llama 3.2 Vision release, whose tokenizer.json adds one vision token
    (<|image|> = 128256) after Meta's 256 text special tokens; it is reported, not counted as a mismatch.
    """
    from model.embedded import ensure_llama3_tokenizer

    files = ensure_llama3_tokenizer()
    meta = Tokenizer.from_tiktoken_file(files / "tokenizer.model")
    hf = Tokenizer.from_hf_dir(files)
    meta_ids, hf_ids = meta.encode(MIXED_TEXT, add_bos=True), hf.encode(MIXED_TEXT, add_bos=True)
    mismatch = next((i for i, (a, b) in enumerate(zip(meta_ids, hf_ids)) if a != b),
                    None if len(meta_ids) == len(hf_ids) else min(len(meta_ids), len(hf_ids)))
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": MIXED_TEXT}]
    checks = {
        "ids_match": mismatch is None,
        "meta_roundtrip": meta.decode(meta_ids, skip_special=True) == MIXED_TEXT,
        "hf_roundtrip": hf.decode(hf_ids, skip_special=True) == MIXED_TEXT,
        "special_tokens_match": all(hf.special_ids.get(t) == i for t, i in meta.special_ids.items()),
        "stop_ids_match": meta.stop_ids == hf.stop_ids,
        "chat_ids_match": meta.encode_chat(chat) == hf.encode_chat(chat),
    }
    hf_only = {t: i for t, i in hf.special_ids.items() if t not in meta.special_ids}
    return {"match": all(checks.values()), **checks, "num_ids": len(meta_ids), "first_mismatch": mismatch,
            "text_chars": len(MIXED_TEXT), "vocab_size": {"tokenizer.model": meta.vocab_size,
                                                          "tokenizer.json": hf.vocab_size},
            "hf_only_special_tokens": hf_only, "stop_ids": sorted(meta.stop_ids), "source": str(files)}
