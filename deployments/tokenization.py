"""vLLM's /tokenize and /detokenize: the served model's tokenizer and chat template, as the generation
endpoints use them, so a client can count and inspect tokens without generating."""
from __future__ import annotations

from deployments.errors import APIError
from deployments.openai_server import OpenAIServer, check_prompt_chars, check_token_ids
from deployments.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


async def tokenize(server: OpenAIServer, req: TokenizeRequest) -> TokenizeResponse:
    """The prompt's ids as /v1/completions (a `prompt`) or /v1/chat/completions (`messages`) makes them."""
    server.check_model(req.model)
    limit = await server.model_len()
    chars, field = await server.chat_chars(req) if req.messages is not None else (len(req.prompt), "prompt")
    check_prompt_chars(chars, limit, field)
    ids, strs = await server.off_loop(_tokenize, server, req, chars=chars)
    return TokenizeResponse(count=len(ids), max_model_len=limit, tokens=ids, token_strs=strs)


def _tokenize(server: OpenAIServer, req: TokenizeRequest) -> tuple[list[int], list[str] | None]:
    tokenizer = server.tokenizer
    if req.messages is not None:
        ids = server.encode_messages(req.messages, req.add_generation_prompt, req.tools, req.chat_template_kwargs,
                                     bool(req.add_special_tokens), req.continue_final_message)
    else:
        ids = tokenizer.encode(req.prompt, add_bos=req.add_special_tokens is not False)
    return ids, tokenizer.token_strs(ids) if req.return_token_strs else None


async def detokenize(server: OpenAIServer, req: DetokenizeRequest) -> DetokenizeResponse:
    server.check_model(req.model)
    limit = await server.model_len()
    if len(req.tokens) > limit:  # no sequence the model takes is longer; bounds the decoding work
        raise APIError(400, f"tokens: at most {limit} (the model's maximum context length)", param="tokens")
    check_token_ids(req.tokens, server.tokenizer.vocab_size, "tokens")
    chars = len(req.tokens) * 4  # ~characters per token
    return DetokenizeResponse(prompt=await server.off_loop(server.tokenizer.decode, req.tokens, chars=chars))
