"""What a request's choices and chunks carry beside their text: each choice's seed, and usage."""
from __future__ import annotations

import pytest

from tests.ingress_support import CHAT, ENDPOINTS, client, eos, router, sse, tokenizer  # noqa: F401


@pytest.mark.parametrize("path, base", ENDPOINTS)
def test_each_choice_of_a_seeded_request_has_its_own_seed_as_an_int64(client, router, path, base):
    """vLLM's parallel sampling: choice i samples with seed + i, so the choices differ and each is reproducible; the
    int64 -2 is the bits 2**64 - 2, and its third choice's seed wraps to 0 (the mesh's seed is a uint64)."""
    assert client.post(path, json={**base, "n": 3, "seed": -2, "max_tokens": 2}).status_code == 200
    seeds = {rid.rsplit("-", 1)[1]: params.seed for rid, (_, params, _) in router.requests.items()}
    assert seeds == {"0": 2**64 - 2, "1": 2**64 - 1, "2": 0}


def test_a_chat_streams_echo_chunks_carry_usage_when_every_chunk_does(client):
    """vLLM's continuous_usage_stats puts usage on every chunk, the echoed final message's too (its prompt, no
    completion tokens yet): a client that sums usage chunk by chunk must not meet a null one."""
    messages = [{"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": "The answer is"}]
    body = {**CHAT, "messages": messages, "add_generation_prompt": False, "continue_final_message": True,
            "echo": True, "n": 2, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = sse(client.post("/v1/chat/completions", json=body))
    echoed = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content") == "The answer is"]
    assert len(echoed) == 2 and all(c["usage"] is not None for c in chunks)
    prompt = chunks[-1]["usage"]["prompt_tokens"]
    assert all((c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) == (prompt, 0) for c in echoed)
