"""Logprobs as clients read them, from the mesh's token ids and logprobs: chat's `logprobs.content`, legacy
completions' four lists and vLLM's prompt_logprobs, each whole (a stream's chunk) or written a slice at a time into a
whole answer's JSON (deployments.json_slices), with each token's text and bytes decoded once per replica."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from deployments.json_slices import Spliced, field_dump
from deployments.protocol import (ChatLogprobs, ChatTokenLogprob, CompletionChoice, CompletionLogprobs,
                                  PromptLogprobs, TopLogprob)
from deployments.streaming import PromptScores
from model.tokenizer import Tokenizer
from scheduler.sampling import MIN_LOGPROB, TokenLogprobs


class LogprobsRenderer:
    """One replica's: `as_ids` everywhere is vLLM's return_tokens_as_token_ids (tokens named "token_id:<id>")."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._tokens: dict[int, tuple[str, bytes]] = {}  # _token_info's

    def _token_info(self, token_id: int) -> tuple[str, bytes]:
        """A token's text alone and its bytes, kept once asked (at most the vocabulary's): an answer with 20
        top_logprobs names 21 tokens per token it generates, and decoding one costs ~10 us. Kept as str and bytes,
        the cyclic GC stops tracking each tuple (a list of the bytes kept it and the tuple tracked: two objects per
        token that every full collection of the replica walked, for good)."""
        info = self._tokens.get(token_id)
        if info is None:
            info = self._tokens[token_id] = (self.tokenizer.token_text(token_id),
                                             self.tokenizer.token_bytes(token_id))
        return info

    def _token(self, token_id: int) -> str:
        return self._token_info(token_id)[0]

    def _top(self, token_id: int, logprob: float, as_id: bool = False, cls: type[TopLogprob] = TopLogprob,
             **more) -> TopLogprob:
        """`bytes` are the token's own, so they spell the text even where `token` is U+FFFD (part of an emoji);
        `as_id` (vLLM's return_tokens_as_token_ids) names the token "token_id:<id>", and `bytes` spell that, as
        vLLM's do. Built without validation: every value is ours."""
        if as_id:
            token = f"token_id:{token_id}"
            return cls.model_construct(token=token, logprob=logprob, bytes=list(token.encode()), **more)
        text, raw = self._token_info(token_id)
        return cls.model_construct(token=text, logprob=logprob, bytes=list(raw), **more)

    def chat(self, lps: list[TokenLogprobs], as_ids: bool = False) -> ChatLogprobs:
        return ChatLogprobs.model_construct(content=[
            self._top(lp.token_id, lp.logprob, as_ids, ChatTokenLogprob,
                      top_logprobs=[self._top(t, p, as_ids) for t, p in lp.top])
            for lp in lps])

    def spliced_chat(self, lps: Sequence[TokenLogprobs], as_ids: bool, lists: Spliced) -> ChatLogprobs:
        """A whole answer's logprobs: their list's JSON, held in `lists`, a mark in its place (so the choice's own dump
        leaves it out). Built and written a slice at a time: freeing all of them at once (8,192 tokens with 20
        top_logprobs: 170,000 models) held the GIL ~30 ms."""
        dump = field_dump(ChatLogprobs, "content")
        return ChatLogprobs.model_construct(content=lists.mark(
            lps, lambda part: dump(self.chat(part, as_ids).content), b","))

    def completion(self, lps: list[TokenLogprobs], offsets: list[int], as_ids: bool = False) -> CompletionLogprobs:
        return CompletionLogprobs(**self._completion_lists(lps, offsets, as_ids))

    def spliced_completion(self, lps: Sequence[TokenLogprobs], offsets: list[int], as_ids: bool,
                           lists: Spliced) -> CompletionLogprobs:
        """A whole answer's logprobs, as spliced_chat holds them; each list made and validated a slice per
        call (its lists of a whole answer were 8,192 dicts at once, each tracked by the GC), as
        CompletionLogprobs(...) validates it whole."""
        def written(name: str, column: Callable[[list[TokenLogprobs]], list]) -> Callable[[list[TokenLogprobs]], bytes]:
            dump = field_dump(CompletionLogprobs, name, validate=True)
            return lambda part: dump(column(part))

        marks = {name: lists.mark(lps, written(name, column), b",")
                 for name, column in self._completion_columns(as_ids).items()}
        marks["text_offset"] = lists.mark(offsets, field_dump(CompletionLogprobs, "text_offset", validate=True), b",")
        return CompletionLogprobs.model_construct(**marks)

    def _completion_lists(self, lps: list[TokenLogprobs], offsets: list[int], as_ids: bool = False) -> dict[str, list]:
        """CompletionLogprobs' fields."""
        return {**{name: column(lps) for name, column in self._completion_columns(as_ids).items()},
                "text_offset": offsets}

    def _completion_columns(self, as_ids: bool) -> dict[str, Callable[[list[TokenLogprobs]], list]]:
        """CompletionLogprobs' fields but text_offset, each made from its tokens' logprobs. Each position's
        `top_logprobs` holds the chosen token too, whether or not it is among the most likely (OpenAI's legacy
        completions: "the logprobs most likely tokens, as well the chosen tokens"; vLLM does the same)."""
        name = (lambda t: f"token_id:{t}") if as_ids else self._completion_token
        # NaN: the prompt's first token, echoed (PromptScores.packed): nothing comes before it, null as in vLLM
        return {"tokens": lambda lps: [name(lp.token_id) for lp in lps],
                "token_logprobs": lambda lps: [None if lp.logprob != lp.logprob else lp.logprob for lp in lps],
                "top_logprobs": lambda lps: [None if lp.logprob != lp.logprob else
                                             {**{name(t): p for t, p in lp.top}, name(lp.token_id): lp.logprob}
                                             for lp in lps]}

    def prompt(self, scores: PromptScores, k: int, positions: range | None = None) -> PromptLogprobs:
        """vLLM's prompt_logprobs (of `positions`, default all): None for the first token, then per token {id: its
        logprob, rank, decoded_token} and the k likeliest, ranked 1..k (the prompt token's entry is theirs when it is
        among them, as in vLLM). decoded_token is the text even with return_tokens_as_token_ids, as in vLLM (which
        passes the engine's prompt_logprobs on as they are): the entry's key is its id already."""
        ids = scores.prompt_ids
        at = positions if positions is not None else range(len(ids))
        part = slice(at.start, at.stop)
        lps = np.maximum(scores.logprobs[part], MIN_LOGPROB).tolist()
        ranks = scores.ranks[part].tolist()
        top_ids = scores.top_ids[part, :k].tolist()
        top_lps = np.maximum(scores.top_logprobs[part, :k], MIN_LOGPROB).tolist()
        out: PromptLogprobs = []
        for j, i in enumerate(at):
            if i == 0:
                out.append(None)
                continue
            entry = {str(ids[i]): {"logprob": lps[j], "rank": ranks[j], "decoded_token": self._token(ids[i])}}
            for rank, (t, p) in enumerate(zip(top_ids[j], top_lps[j]), 1):
                entry[str(t)] = {"logprob": p, "rank": rank, "decoded_token": self._token(t)}
            out.append(entry)
        return out

    def spliced_prompt(self, scores: PromptScores, k: int, lists: Spliced) -> str:
        """A whole answer's prompt_logprobs, as spliced_chat holds its logprobs: a 128k-token prompt with
        k = 20 is 2.7 million entries, made and written a slice of positions at a time."""
        dump = field_dump(CompletionChoice, "prompt_logprobs")
        return lists.mark(range(len(scores.prompt_ids)),
                          lambda part: dump(self.prompt(scores, k, part)), b",")

    def _completion_token(self, token_id: int) -> str:
        """The token's text; for a token that is part of a character (an emoji is often 2-4 tokens) its bytes,
        as OpenAI's legacy completions write them ("bytes:\\xf0\\x9f"): alone, each such token decodes to
        U+FFFD, and `top_logprobs` is keyed by text, so the alternatives would overwrite one another."""
        text = self._token(token_id)
        if "\ufffd" not in text:
            return text
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode()  # a real U+FFFD
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
