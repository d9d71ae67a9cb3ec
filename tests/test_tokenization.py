"""vLLM's /tokenize and /detokenize: the same ids the generation endpoints send to the router."""
from __future__ import annotations

import json
from unittest import mock

import pytest
from fastapi.responses import Response

from deployments import tokenization
from deployments.protocol import TokenizeResponse
from model.embedded import ensure_llama3_tokenizer
from model.tokenizer import Tokenizer
from tests.ingress_support import (CHAT, MAX_LEN, MODEL, assert_error, client, eos, make_client,  # noqa: F401
                                   on_event_loop, router, tokenizer)

TEXT = "Hello <|im_end|> world 🚀"


def test_tokenize_a_prompt_as_completions_does(client, router, tokenizer):
    body = client.post("/tokenize", json={"model": MODEL, "prompt": TEXT}).json()
    ids = tokenizer.encode(TEXT, add_bos=True)
    assert body == {"count": len(ids), "max_model_len": MAX_LEN, "tokens": ids, "token_strs": None}
    client.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 1})
    (sent, _, _), = router.requests.values()
    assert sent == ids


def test_tokenize_messages_as_chat_completions_does(client, router, tokenizer):
    body = client.post("/tokenize", json={"messages": CHAT["messages"]}).json()
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})
    (sent, _, _), = router.requests.values()
    assert body["tokens"] == sent and body["count"] == len(sent)
    without = client.post("/tokenize", json={"messages": CHAT["messages"], "add_generation_prompt": False}).json()
    assert without["tokens"] == tokenizer.encode_chat(CHAT["messages"], add_generation_prompt=False)
    assert without["count"] < body["count"]


def test_token_strs(client, tokenizer):
    body = client.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True}).json()
    assert body["token_strs"] == tokenizer.hf_tokenizer.convert_ids_to_tokens(body["tokens"])  # as vLLM
    assert "\ufffd" not in "".join(body["token_strs"])  # the rocket's partial-byte tokens read as themselves


@pytest.mark.parametrize("strs", [False, True])
def test_tokenize_writes_the_json_fastapi_would_write(client, tokenizer, strs):
    """The answer's JSON is built in slices off the event loop: byte for byte what FastAPI writes for the model."""
    prompt = 'Quote " and backslash \\ and \u00e9\u65e5 and ' + "word " * 40
    with mock.patch.object(tokenization, "JSON_SLICE", 7):
        response = client.post("/tokenize", json={"prompt": prompt, "return_token_strs": strs})
    ids = tokenizer.encode(prompt, add_bos=True)
    model = TokenizeResponse(count=len(ids), max_model_len=MAX_LEN, tokens=ids,
                             token_strs=tokenizer.token_strs(ids) if strs else None)
    assert response.headers["content-type"] == "application/json"
    assert response.content == json.dumps(model.model_dump(), ensure_ascii=False, separators=(",", ":")).encode()
    assert len(ids) > 3 * 7


def test_tokenize_encodes_its_json_off_the_event_loop(client, monkeypatch):
    """The JSON's UTF-8 encoding is work in proportion to it: done as the Response was built, on the loop, an
    8 MiB CJK prompt's token_strs (52 MB of JSON) stood every stream of the replica still for ~50 ms (133 ms on a
    busy host)."""
    render, seen = Response.render, []

    def spy(self, content):
        seen.append((type(content).__name__, on_event_loop()))
        return render(self, content)

    monkeypatch.setattr(Response, "render", spy)
    response = client.post("/tokenize", json={"model": MODEL, "prompt": "\u65e5\u672c hi", "return_token_strs": True})
    assert response.status_code == 200 and response.json()["count"] > 1
    assert ("str", True) not in seen, seen


def test_add_special_tokens_adds_bos(router):
    llama3 = Tokenizer.from_tiktoken_file(ensure_llama3_tokenizer() / "tokenizer.model")
    client = make_client(router, llama3)
    bos = llama3.bos_id
    assert client.post("/tokenize", json={"prompt": "hi"}).json()["tokens"][0] == bos
    assert bos not in client.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()["tokens"]
    chat = client.post("/tokenize", json={"messages": CHAT["messages"]}).json()["tokens"]
    assert chat.count(bos) == 1  # the template's own
    assert client.post("/tokenize", json={"messages": CHAT["messages"],
                                          "add_special_tokens": True}).json()["tokens"][:2] == [bos, bos]


def test_generation_takes_add_special_tokens_as_tokenize_does(router):
    """vLLM's add_special_tokens: completions put the BOS first unless false; chats add one only when true."""
    llama3 = Tokenizer.from_tiktoken_file(ensure_llama3_tokenizer() / "tokenizer.model")
    client = make_client(router, llama3)
    for path, body in (("/v1/completions", {"prompt": "<|begin_of_text|>hi"}), ("/v1/chat/completions", CHAT)):
        for flag in (None, True, False):
            fields = {} if flag is None else {"add_special_tokens": flag}
            counted = client.post("/tokenize", json={**body, **fields}).json()["tokens"]
            assert client.post(path, json={**body, **fields, "max_tokens": 1}).status_code == 200
            (sent, _, _), = router.requests.values()
            router.requests.clear()
            assert sent == counted
            assert sent[:2].count(llama3.bos_id) == (2 if flag or (flag is None and "prompt" in body) else 1)


def test_tokenize_offers_the_tools_as_a_chat_does(router):
    llama3 = Tokenizer.from_tiktoken_file(ensure_llama3_tokenizer() / "tokenizer.model")
    client = make_client(router, llama3)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    body = {"messages": CHAT["messages"], "tools": tools}
    counted = client.post("/tokenize", json=body).json()
    assert client.post("/v1/chat/completions", json={**CHAT, "tools": tools, "max_tokens": 1}).status_code == 200
    (sent, _, _), = router.requests.values()
    assert counted["tokens"] == sent
    assert counted["count"] > client.post("/tokenize", json={"messages": CHAT["messages"]}).json()["count"]


def test_tokenize_by_get(client, tokenizer):
    body = client.get("/tokenize", params={"prompt": TEXT, "return_token_strs": "true"}).json()
    assert body["tokens"] == tokenizer.encode(TEXT, add_bos=True) and len(body["token_strs"]) == body["count"]


def test_tokenize_by_get_refuses_escapes_that_are_no_utf8(client, tokenizer):
    """"%FF%FE" was read as two U+FFFD and tokenized; the body's text is checked as strictly."""
    assert_error(client.get("/tokenize?prompt=%FF%FE"), 400, param="prompt")
    assert_error(client.get("/tokenize?prompt=ok&model=%C3"), 400, param="model")
    body = client.get("/tokenize?prompt=caf%C3%A9+%E2%82%AC").json()  # UTF-8 escapes and "+" still decode
    assert body["tokens"] == tokenizer.encode("café €", add_bos=True)


def test_detokenize(client, tokenizer):
    ids = tokenizer.encode(TEXT)
    assert client.post("/detokenize", json={"model": MODEL, "tokens": ids}).json() == {"prompt": TEXT}
    assert client.get("/detokenize", params={"tokens": ids}).json() == {"prompt": TEXT}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "messages"),
    ("/tokenize", {"prompt": "a", "messages": CHAT["messages"]}, 400, "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": CHAT["messages"], "continue_final_message": True}, 400, "continue_final_message"),
    # refused as a chat refuses them: a /tokenize that ignored them counted the model's own template's prompt
    ("/tokenize", {"messages": CHAT["messages"], "chat_template": "{{ messages[0].content }}"}, 400, "chat_template"),
    ("/tokenize", {"messages": CHAT["messages"], "documents": [{"title": "t", "text": "x"}]}, 400, "documents"),
    ("/tokenize", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1] * (MAX_LEN + 1)}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "gpt-9"}, 404, "model"),
])
def test_bad_tokenizer_requests(client, path, body, status, param):
    assert_error(client.post(path, json=body), status, param=param)


def test_bad_query_is_400_naming_the_parameter(client):
    assert_error(client.get("/detokenize", params={"tokens": "x"}), 400, param="tokens.0")
    assert_error(client.get("/tokenize"), 400, param="prompt")


def test_a_legacy_function_message_goes_to_the_template_as_its_own_turn(client, router, tokenizer):
    """OpenAI's function message (role "function", the function's name and result), from code written before
    tools: vLLM takes it and hands it to the chat template as it is; it was a 400 naming messages.1.role."""
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "function", "name": "get_weather", "content": "sunny, 3 C"}]
    body = client.post("/tokenize", json={"messages": messages}).json()
    assert "function" in tokenizer.decode(body["tokens"]) and "sunny, 3 C" in tokenizer.decode(body["tokens"])
    assert body["tokens"] == tokenizer.encode_chat(messages)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("kwargs", [{"date_string": "7 " * 100_000}, {"custom_tools": [{"name": "x" * 200_000}]}])
def test_a_chat_with_large_template_kwargs_is_templated_off_the_event_loop(client, monkeypatch, kwargs):
    """chat_template_kwargs are not in the chat's measured size (they may be unused: no refusal counts them), yet a
    template may write them whole (Llama 3.x's date_string, custom_tools): a short chat carrying 2 MB of date_string
    was templated and tokenized on the loop, holding every stream of the replica ~6 s."""
    encode_chat, seen = Tokenizer.encode_chat, []

    def spy(self, *args, **kw):
        seen.append(on_event_loop())
        return encode_chat(self, *args, **kw)

    monkeypatch.setattr(Tokenizer, "encode_chat", spy)
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, "chat_template_kwargs": kwargs})
    assert response.status_code == 200, response.text
    assert seen == [False]


def test_a_tool_result_in_llamas_ipython_role_is_its_tool_turn(router):
    """Meta's Llama 3.1+ prompt docs send a tool's output as role "ipython"; Llama 3.3's template reads it as a
    tool turn and vLLM takes any role. It was a 400 naming messages.2.role. (Meta's format renders both as the
    ipython turn.)"""
    llama3 = Tokenizer.from_tiktoken_file(ensure_llama3_tokenizer() / "tokenizer.model")
    client = make_client(router, llama3)
    call = {"id": "call0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    history = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "tool_calls": [call]}]
    messages = [*history, {"role": "ipython", "content": "sunny, 3 C"}]
    as_tool = [*history, {"role": "tool", "tool_call_id": "call0", "content": "sunny, 3 C"}]
    body = client.post("/tokenize", json={"messages": messages})
    assert body.status_code == 200, body.text
    assert body.json()["tokens"] == client.post("/tokenize", json={"messages": as_tool}).json()["tokens"]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_prompt_is_tokenized_whatever_the_chat_fields_say(client, tokenizer):
    """The chat form's fields are ignored for a `prompt`, as vLLM's TokenizeCompletionRequest ignores them:
    continue_final_message (with add_generation_prompt's default true) was a 400 telling the client to turn off
    add_generation_prompt "to continue the final message" of a request that has none."""
    for fields in ({"continue_final_message": True}, {"continue_final_message": True, "add_generation_prompt": True}):
        response = client.post("/tokenize", json={"prompt": TEXT, **fields})
        assert response.status_code == 200, response.text
        assert response.json()["tokens"] == tokenizer.encode(TEXT, add_bos=True)
