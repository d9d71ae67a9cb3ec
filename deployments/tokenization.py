"""vLLM's /tokenize and /detokenize: the served model's tokenizer and chat template, as the generation
endpoints use them, so a client can count and inspect tokens without generating."""
from __future__ import annotations

import json

from fastapi.responses import Response

from deployments.errors import APIError
from deployments.json_slices import Spliced
from deployments.openai_server import OpenAIServer
from deployments.request_checks import check_prompt_chars, check_token_ids
from deployments.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest


# Ids per json.dumps call (json_slices): ~2 ms each, so the GIL passes to the event loop between them.
JSON_SLICE = 65_536


async def tokenize(server: OpenAIServer, req: TokenizeRequest) -> Response:
    """The prompt's ids as /v1/completions (a `prompt`) or /v1/chat/completions (`messages`) makes them: a
    TokenizeResponse, as JSON built on the tokenizer's thread (FastAPI's serializing of 1.9M ids, a 3.9 MB prompt's,
    stood the replica's event loop, and so all its streams, still for ~0.1 s)."""
    server.check_model(req.model)
    limit = await server.model_len()
    chars, field = await server.chat_chars(req) if req.messages is not None else (len(req.prompt), "prompt")
    check_prompt_chars(chars, limit, field, server.tokenizer.max_token_chars, len(req.messages or ()))
    return Response(await server.off_loop(_tokenize, server, req, limit, chars=chars), media_type="application/json")


def _tokenize(server: OpenAIServer, req: TokenizeRequest, limit: int) -> bytes:
    """The answer's JSON, encoded here: a Response given a str encodes it on the loop (52 MB for an 8 MiB CJK
    prompt's token_strs: ~50 ms, 133 ms on a busy host)."""
    tokenizer = server.tokenizer
    if req.messages is not None:
        ids = server.encode_messages(req.messages, req.add_generation_prompt, req.tools, req.chat_template_kwargs,
                                     bool(req.add_special_tokens), req.continue_final_message)
    else:
        ids = tokenizer.encode(req.prompt, add_bos=req.add_special_tokens is not False)
    lists = Spliced()
    strs = lists.mark(tokenizer.token_strs(ids), _dumps, b",", JSON_SLICE) if req.return_token_strs else None
    answer = {"count": len(ids), "max_model_len": limit, "tokens": lists.mark(ids, _dumps, b",", JSON_SLICE),
              "token_strs": strs}
    return lists.fill(_dumps(answer))


def _dumps(value) -> bytes:
    """JSON as FastAPI writes it (compact, non-ASCII as is), encoded: a slice at a time, the whole joined once."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


async def detokenize(server: OpenAIServer, req: DetokenizeRequest) -> DetokenizeResponse:
    server.check_model(req.model)
    limit = await server.model_len()
    if len(req.tokens) > limit:  # no sequence the model takes is longer; bounds the decoding work
        raise APIError(400, f"tokens: at most {limit} (the model's maximum context length)", param="tokens")
    check_token_ids(req.tokens, server.tokenizer.vocab_size, "tokens")
    chars = len(req.tokens) * 4  # ~characters per token
    return DetokenizeResponse(prompt=await server.off_loop(server.tokenizer.decode, req.tokens, chars=chars))
