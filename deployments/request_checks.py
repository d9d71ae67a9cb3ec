"""What a request may ask of the model, checked in the ingress before anything reaches the router: token ids in the
vocabulary (one outside it would fail every request on a mesh), a prompt's characters within what the context can
hold (refused before tokenizing, which costs ~1 s per MB), logit_bias, bad_words and allowed_token_ids that leave
something to sample. Each refusal is a 400 APIError naming the field.
"""
from __future__ import annotations

import json

from deployments.errors import APIError
from deployments.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from model.tokenizer import Tokenizer

# A prompt with more characters per token of the context than its tokenizer's longest token holds cannot fit,
# and is refused before it is tokenized (~1 s per MB); English averages ~4 characters per token. A chat counts
# this many characters for each token a message's template text takes at least (chat_chars).
MAX_CHARS_PER_TOKEN = 32
MIN_TOKENS_PER_MESSAGE = 3  # a role header and an end-of-turn marker, at least, in every chat template


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids index the embedding and the logits on the mesh, where one outside the vocabulary would
    fail every request on it: refuse it here."""
    if not all(0 <= t < vocab_size for t in ids):
        raise APIError(400, f"{param}: token ids must lie in [0, {vocab_size})", param=param)


def check_prompt_chars(chars: int, limit: int, param: str, per_token: int, messages: int = 0) -> None:
    """`param`: "prompt", "messages", or "tools" (a chat whose tools' definitions are most of it); `per_token`: the
    most characters one of the model's tokens holds (Tokenizer.max_token_chars); `messages`: a chat's count. A chat's
    `chars` (chat_chars) count the template's tokens around each message too, so its refusal says the tokens they
    take at least, not characters: 3,000 messages of "x" were said to have 291,000 characters."""
    per = max(per_token, MAX_CHARS_PER_TOKEN)
    if chars > limit * per:
        if param == "prompt":
            why = f"the prompt has {chars} characters, more than that many tokens can hold"
        else:
            what = "messages and tools" if param == "tools" else "messages"
            count = f"{messages} message" + "s" * (messages != 1)
            why = f"the {what} take at least {chars // per} tokens ({count}, the template's tokens too)"
        raise APIError(400, f"This model's maximum context length is {limit} tokens; {why}.", param=param,
                       code="context_length_exceeded")


def chat_chars(req: ChatCompletionRequest | TokenizeRequest) -> tuple[int, str]:
    """What a chat puts into the template, in characters: every message's text and tool calls, the tools'
    definitions, and a template's few tokens per message (MIN_TOKENS_PER_MESSAGE), so that a huge tool list or
    100k empty messages are refused before templating (which holds the GIL, stalling every stream); with the
    field most of them come from ("messages" or "tools"), which a refusal names."""
    per_message = MIN_TOKENS_PER_MESSAGE * MAX_CHARS_PER_TOKEN
    chars = sum(len(m.text) + per_message + sum(_call_chars(c) for c in m.tool_calls or ()) for m in req.messages)
    # the definition's JSON as json writes it (templates render it with tojson, tools_system_message with json.dumps),
    # not pydantic's serializer: that stops a level short of the depth its validation takes (a 500 at 127 levels)
    tools = sum(len(json.dumps(t.function.model_dump(), ensure_ascii=False, separators=(",", ":")))
                for t in req.tools or ())
    return chars + tools, "tools" if tools > chars else "messages"


def _call_chars(call) -> int:
    """A call in a chat's history: its id, name and arguments, and a token at least of the template's own text
    around them (so 100k calls with empty arguments count)."""
    return len(call.id) + len(call.function.name) + len(call.function.arguments) + MAX_CHARS_PER_TOKEN


def check_vocab_bounds(req: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> None:
    """The rules that need the model's vocabulary (the protocol checks the rest)."""
    check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    check_token_ids(req.allowed_token_ids or [], vocab_size, "allowed_token_ids")


def logit_bias(req: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias (token id text -> bias) as ids, each in the vocabulary, each bias in [-100, 100]."""
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        # past 20 digits (leading zeros aside) a key is no token id; int() refuses past 4,300 digits, leading zeros
        # counted, so it reads the digits without them ("0" * 5000 + "7" is token 7, as int() reads a short one)
        digits = key.lstrip("0")
        token = int(digits or "0") if key.isascii() and key.isdigit() and len(digits) <= 20 else vocab_size
        if token >= vocab_size or not -100 <= value <= 100:
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise APIError(400, f"logit_bias: keys must be token ids in [0, {vocab_size}) and biases in "
                                f"[-100, 100]; got {shown!r}: {value}", param="logit_bias")
        bias[token] = value
    return bias


def bad_words_token_ids(tokenizer: Tokenizer, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
    """vLLM's bad_words as token sequences (vllm/sampling_params.py, update_from_tokenizer): each word as text
    starting the answer, and once more after a space, which is how it reads inside text, when that gives
    other tokens of the same count."""
    out: list[tuple[int, ...]] = []
    for word in words or ():
        alone = tuple(tokenizer.encode(word.lstrip()))
        spaced = tuple(tokenizer.encode(" " + word.lstrip()))
        out.append(alone)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return tuple(out)


def check_allowed(allowed: tuple[int, ...], bad_words: tuple[tuple[int, ...], ...], stop_ids: tuple[int, ...]) -> None:
    """allowed_token_ids that one-token bad words (or stop ids, before min_tokens) all rule out leave the sampler
    nothing to draw: a 400 here, not an answer of a token the whitelist excludes."""
    banned = {word[0] for word in bad_words if len(word) == 1}
    if set(allowed) <= banned | set(stop_ids):
        why = "are bad words" if set(allowed) <= banned else "end the answer before min_tokens"
        raise APIError(400, f"allowed_token_ids: every allowed token is ruled out (they {why}), so no token can be "
                            "sampled", param="allowed_token_ids")
