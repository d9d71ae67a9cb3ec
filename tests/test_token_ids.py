"""vLLM's `return_token_ids` (the prompt's and the answer's token ids beside the text) and
`return_tokens_as_token_ids` (logprobs name tokens "token_id:<id>"), whole and streamed."""
from __future__ import annotations

import pytest

from tests.ingress_support import (ANSWER, CHAT, COMPLETION, client, eos, make_client, router, sse,  # noqa: F401
                                   tokenizer)

IDS = {"return_token_ids": True}


def _prompt(router, index: int = 0) -> list[int]:
    return list(router.requests.values())[index][0]


def test_unasked_token_ids_are_left_out_not_null(client):
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        body = client.post(path, json=base).json()
        assert "prompt_token_ids" not in body and "token_ids" not in body["choices"][0]
        assert "prompt_token_ids" not in body["choices"][0]
        for chunk in sse(client.post(path, json={**base, "stream": True})):
            assert "prompt_token_ids" not in chunk
            assert all("token_ids" not in c and "prompt_token_ids" not in c for c in chunk["choices"])


def test_chat_returns_the_templated_prompt_and_the_answer_with_its_eos(client, router, tokenizer, eos):
    body = client.post("/v1/chat/completions", json={**CHAT, **IDS}).json()
    assert body["prompt_token_ids"] == _prompt(router)
    assert tokenizer.decode(body["prompt_token_ids"]).endswith("hi<|im_end|>\n<|im_start|>assistant\n")
    choice = body["choices"][0]
    assert choice["token_ids"] == tokenizer.encode(ANSWER) + [eos]  # the EOS that ended it too, as vLLM's
    assert tokenizer.decode(choice["token_ids"], skip_special=True) == choice["message"]["content"] == ANSWER


@pytest.mark.parametrize("merge", [1, 5])
def test_streamed_chat_carries_the_prompt_in_the_first_chunk_and_each_chunks_tokens(tokenizer, eos, router, merge):
    router.merge = merge  # several tokens per router event
    chunks = sse(make_client(router, tokenizer).post("/v1/chat/completions", json={**CHAT, **IDS, "stream": True}))
    assert chunks[0]["prompt_token_ids"] == _prompt(router)
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    ids = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
    assert ids == tokenizer.encode(ANSWER) + [eos]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == ANSWER
    ids, text = [], ""
    for c in chunks[1:]:  # no chunk's text runs ahead of the tokens sent with it (an emoji's wait for its last)
        (ch,) = c["choices"]
        ids, text = ids + ch["token_ids"], text + ch["delta"].get("content", "")
        assert tokenizer.decode(ids, skip_special=True).startswith(text)


def test_a_stop_string_ends_the_ids_at_the_token_that_completed_it(client, tokenizer):
    answer = tokenizer.encode(ANSWER)
    body = client.post("/v1/completions", json={**COMPLETION, **IDS, "stop": ["answer is"], "max_tokens": 50}).json()
    choice = body["choices"][0]
    assert choice["text"] == "Hello world, the "
    ids = choice["token_ids"]
    assert ids == answer[:len(ids)]
    assert "answer is" in tokenizer.decode(ids) and "answer is" not in tokenizer.decode(ids[:-1])
    streamed = sse(client.post("/v1/completions", json={**COMPLETION, **IDS, "stop": ["answer is"], "max_tokens": 50,
                                                         "stream": True}))
    assert [t for c in streamed for ch in c["choices"] for t in ch.get("token_ids", [])] == ids


def test_completions_give_each_choice_its_own_prompt(client, router, tokenizer):
    prompts = ["Once upon a time", "In a galaxy far away"]
    body = client.post("/v1/completions", json={**COMPLETION, **IDS, "prompt": prompts, "n": 2, "max_tokens": 4,
                                                "echo": True}).json()
    answer = tokenizer.encode(ANSWER)[:4]
    for i, choice in enumerate(body["choices"]):
        assert choice["prompt_token_ids"] == tokenizer.encode(prompts[i // 2], add_bos=True)
        assert choice["token_ids"] == answer
        assert choice["text"] == prompts[i // 2] + tokenizer.decode(answer)
    assert "prompt_token_ids" not in body


def test_streamed_completions_send_each_choices_prompt_once(client, tokenizer):
    token_prompt = [7, 8, 9, 10]
    chunks = sse(client.post("/v1/completions", json={**COMPLETION, **IDS, "prompt": token_prompt, "n": 3,
                                                      "max_tokens": 6, "stream": True}))
    for index in range(3):
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == index]
        assert mine[0]["prompt_token_ids"] == token_prompt
        assert all("prompt_token_ids" not in ch for ch in mine[1:])
        assert [t for ch in mine for t in ch["token_ids"]] == tokenizer.encode(ANSWER)[:6]


def test_streamed_tool_call_tokens_are_all_sent(tokenizer, eos):
    from tests.fake_router import FakeRouter
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    router = FakeRouter(tokenizer.encode(call) + [eos], max_model_len=4096)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = sse(make_client(router, tokenizer).post("/v1/chat/completions", json={
        **CHAT, **IDS, "tools": tools, "stream": True}))
    assert [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])] == router.answer
    calls = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert calls and calls[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_name_tokens_by_id(client, tokenizer, eos, stream):
    r = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2, "stream": stream,
                                                  "return_tokens_as_token_ids": True})
    content = ([lp for c in sse(r) for ch in c["choices"] for lp in (ch.get("logprobs") or {}).get("content", [])]
               if stream else r.json()["choices"][0]["logprobs"]["content"])
    assert [lp["token"] for lp in content] == [f"token_id:{t}" for t in tokenizer.encode(ANSWER) + [eos]]
    for lp in content:
        assert bytes(lp["bytes"]).decode() == lp["token"]  # vLLM's: the bytes of the name sent
        assert [alt["token"] for alt in lp["top_logprobs"]] == [lp["token"], "token_id:1"]


def test_completion_logprobs_name_tokens_by_id(client, tokenizer):
    body = client.post("/v1/completions", json={**COMPLETION, "logprobs": 1, "max_tokens": 12,
                                                "return_tokens_as_token_ids": True}).json()
    logprobs = body["choices"][0]["logprobs"]
    names = [f"token_id:{t}" for t in tokenizer.encode(ANSWER)[:12]]
    assert logprobs["tokens"] == names  # the emoji's byte tokens too: each has a name of its own
    assert [list(top) for top in logprobs["top_logprobs"]] == [[n] for n in names]
