"""Logprobs as OpenAI defines them: each token's own `bytes` (they spell the text even where a token is part
of an emoji) and completions' `text_offset` into the whole text, also while a stop string holds text back."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import BaseModel

from deployments.streaming import PromptScores
from scheduler.sampling import PackedLogprobs, PromptLogprobs, TokenLogprobs

from tests.ingress_support import ANSWER, CHAT, COMPLETION, client, eos, router, sse, tokenizer  # noqa: F401


def starts(tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text starts: the characters that the tokens before it complete."""
    return [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprob_bytes_spell_the_answer(client, router, tokenizer, stream):
    r = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2, "stream": stream})
    if stream:
        content = [e for c in sse(r) for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    else:
        content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["bytes"] for e in content] == [list(tokenizer.token_bytes(t)) for t in router.answer]
    assert b"".join(bytes(e["bytes"]) for e in content[:-1]) == ANSWER.encode()  # the last is the stop token
    partial = [e for e in content if e["token"] == "\ufffd"]
    assert partial and all(e["bytes"] != list("\ufffd".encode()) for e in partial)  # the emoji's pieces
    assert all(top["bytes"] == list(tokenizer.token_bytes(t)) for e in content
               for top, t in zip(e["top_logprobs"], [0, 1]) if top["token"] == tokenizer.decode([t]))


def test_completion_text_offsets(client, router, tokenizer):
    body = client.post("/v1/completions", json={**COMPLETION, "logprobs": 0, "max_tokens": 64}).json()
    assert body["choices"][0]["logprobs"]["text_offset"] == starts(tokenizer, router.answer)


@pytest.mark.parametrize("stop", ["never appears, but long", "done"])
def test_streamed_text_offsets_count_text_held_back_by_a_stop_string(client, router, tokenizer, stop):
    chunks = sse(client.post("/v1/completions", json={**COMPLETION, "logprobs": 0, "stream": True, "stop": [stop],
                                                      "max_tokens": 64}))
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    offsets = [o for lp in lps for o in lp["text_offset"]]
    assert offsets == starts(tokenizer, router.answer)[:len(offsets)]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == ANSWER.split(stop)[0]
    # each token's text sits at its offset in the text sent
    for token, offset in zip((t for lp in lps for t in lp["tokens"]), offsets):
        if "\ufffd" not in token and offset + len(token) <= len(text):
            assert text[offset:offset + len(token)] == token


@pytest.mark.parametrize("path, body, build", [
    ("/v1/chat/completions", {**CHAT, "n": 4, "logprobs": True, "top_logprobs": 20}, "_chat_answer"),
    ("/v1/completions", {**COMPLETION, "n": 4, "logprobs": 20, "max_tokens": 64}, "_completion_answer"),
])
def test_a_large_answer_is_built_off_the_event_loop(client, path, body, build, monkeypatch):
    """4 choices x ~20 tokens x 21 logprobs: built on the loop, a large answer stalls every other stream of the
    replica for its whole build (n = 16 x 2,000 tokens x 21 logprobs: 36 s)."""
    import threading

    server = client.app.state.server
    threads, real = [], getattr(server, build)

    def recorded(*args):
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(server, build, recorded)
    r = client.post(path, json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    assert r.headers["content-type"] == "application/json"
    (thread,) = threads
    assert thread.name.startswith("meshserve-")  # the tokenizer's threads or, this large, the bulk ones
    small = client.post(path, json={k: v for k, v in body.items() if "logprobs" not in k})
    assert small.status_code == 200 and not threads[1].name.startswith("meshserve-")


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "n": 16, "logprobs": True, "top_logprobs": 20}),
    ("/v1/completions", {**COMPLETION, "n": 16, "logprobs": 20, "max_tokens": 64}),
])
def test_a_large_answer_is_serialized_by_choice(client, path, body, monkeypatch):
    """n = 16 answers with 20 top_logprobs were serialized by one pydantic call, which holds the GIL throughout:
    from the tokenizer thread it still held the loop ~400 ms (16 x 500 tokens, 30 streams running). No one
    serialization may now write more than about one choice's share of the answer."""
    sizes, real = [], BaseModel.model_dump_json

    def recorded(self, **kwargs):
        out = real(self, **kwargs)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(BaseModel, "model_dump_json", recorded)
    r = client.post(path, json=body)
    assert r.status_code == 200
    answer = r.json()
    assert [c["index"] for c in answer["choices"]] == list(range(16)) and answer["usage"]["completion_tokens"] > 0
    assert max(sizes) < len(r.content) / 8, (max(sizes), len(r.content))


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 20}),
    ("/v1/completions", {**COMPLETION, "logprobs": 20, "max_tokens": 64}),
])
def test_a_large_answers_logprobs_are_serialized_in_slices(client, path, body, monkeypatch):
    """One pydantic dump holds the GIL until it returns, so on a thread too a choice dumped whole stood every other
    stream of the replica still (n = 1, 8,192 tokens with 20 top_logprobs: ~0.2 s). No one call may write more than
    about a slice of the logprobs."""
    from pydantic import TypeAdapter

    from deployments import json_slices

    monkeypatch.setattr(json_slices, "SLICE", 4)
    sizes, model_dump_json, dump_json = [], BaseModel.model_dump_json, TypeAdapter.dump_json

    def recorded(real):
        def dump(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            sizes.append(len(out.encode() if isinstance(out, str) else out))
            return out
        return dump

    monkeypatch.setattr(BaseModel, "model_dump_json", recorded(model_dump_json))
    monkeypatch.setattr(TypeAdapter, "dump_json", recorded(dump_json))
    r = client.post(path, json=body)
    assert r.status_code == 200
    (choice,) = r.json()["choices"]
    logprobs = choice["logprobs"]
    tokens = len(logprobs["content"] if "content" in logprobs else logprobs["tokens"])
    assert tokens > 3 * 4 and r.json()["usage"]["completion_tokens"] == tokens
    assert sum(sizes) >= len(r.content)  # every byte of the answer came from a call recorded here
    slice_chars = 4 * len(json.dumps(logprobs, separators=(",", ":"))) // tokens
    assert max(sizes) < 2 * slice_chars, (max(sizes), slice_chars)


def test_packed_logprobs_give_back_what_was_packed():
    """A whole answer's logprobs are kept as arrays of numbers (PackedLogprobs): a slice or an item is the
    TokenLogprobs that went in, the same ints and floats, with any number of alternatives."""
    lps = [TokenLogprobs(7, -0.1, []), TokenLogprobs(2**40, -1e-300, [(3, -2.5), (2**40, -1e-300)]),
           TokenLogprobs(0, -0.0, [(1, float("-inf"))]), TokenLogprobs(9, -123.456, [(4, -1 / 3)] * 20)]
    packed = PackedLogprobs()
    packed.extend(lps[:1])
    packed.extend(lps[1:])
    assert len(packed) == len(lps)
    assert packed[:] == lps and packed[1:3] == lps[1:3] and packed[3:10] == lps[3:] and packed[2:2] == []
    assert packed[-1] == lps[-1] and list(packed) == lps
    with pytest.raises(IndexError):
        packed[len(lps)]


def _echoed_answer(client, body: dict) -> tuple[str, dict]:
    """The completion's text and its logprobs' tokens and text_offset, streamed (`body["stream"]`) or whole."""
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if body["stream"]:
        choices = [c["choices"][0] for c in sse(r) if c["choices"]]
        lp = {k: [x for c in choices if c["logprobs"] for x in c["logprobs"][k]] for k in ("tokens", "text_offset")}
        return "".join(c["text"] for c in choices), lp
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_echoed_prompt_cut_by_truncate_prompt_tokens_is_the_part_the_model_read(client, router, tokenizer, side,
                                                                                   stream):
    """echo with truncate_prompt_tokens: the text echoed is the prompt's kept tokens, which the answer continues and
    logprobs list, each at its text_offset in it (the whole prompt echoed put ' delta' at 0, where 'alpha' is)."""
    prompt = "alpha beta gamma delta epsilon"
    kept = tokenizer.encode(prompt)
    kept = kept[-2:] if side == "left" else kept[:2]
    body = {**COMPLETION, "prompt": prompt, "truncate_prompt_tokens": 2, "truncation_side": side, "echo": True,
            "logprobs": 0, "max_tokens": 3, "stream": stream}
    text, lp = _echoed_answer(client, body)
    echoed = tokenizer.decode(kept)
    assert text == echoed + tokenizer.decode(router.answer[:3])
    assert lp["tokens"][:2] == [tokenizer.decode([t]) for t in kept]
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert text[offset:offset + len(token)] == token


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("echo", [False, True])
def test_a_token_after_a_character_left_unfinished_starts_after_its_replacement(tokenizer, eos, stream, echo):
    """A token holding the first bytes of a character ('東' is 3 bytes: this one has 2) followed by one that does
    not finish it: the text has U+FFFD there, and the next token starts after it, not on it (its text_offset
    was the U+FFFD's, as if it continued the character). The same in an echoed prompt of these ids."""
    from tests.fake_router import FakeRouter
    from tests.ingress_support import make_client
    part = tokenizer.encode("東")[:1]
    assert len(tokenizer.token_bytes(part[0])) == 2
    words = tokenizer.encode("din ok")
    answer = part + words + part + part + tokenizer.encode("!")
    c = make_client(FakeRouter(answer + [eos]), tokenizer)
    r = c.post("/v1/completions", json={**COMPLETION, "prompt": answer if echo else "x", "logprobs": 0, "echo": echo,
                                        "max_tokens": len(answer), "stream": stream})
    if stream:
        choices = [ch["choices"][0] for ch in sse(r) if ch["choices"]]
        text = "".join(ch["text"] for ch in choices)
        offsets = [o for ch in choices if ch["logprobs"] for o in ch["logprobs"]["text_offset"]]
    else:
        text, offsets = r.json()["choices"][0]["text"], r.json()["choices"][0]["logprobs"]["text_offset"]
    written = "\ufffddin ok\ufffd\ufffd!"
    # each token of "din ok" after the first U+FFFD; the second and third U+FFFD and "!" at 7, 8 and 9
    mine = [0] + [1 + len(tokenizer.decode(words[:j])) for j in range(len(words))] + [7, 8, 9]
    if echo:
        assert text == written + written and offsets == mine + [len(written) + o for o in mine]
    else:
        assert text == written and offsets == mine


def test_a_chat_stream_of_n_choices_carries_its_prompts_logprobs_once(client):
    """Chat's prompt_logprobs belong to the response, not a choice: a whole answer carries them once, and so must a
    stream of n choices (each choice's first content chunk carried them: n copies of the prompt's, a 128k-token
    prompt's millions of entries each)."""
    body = {**CHAT, "n": 3, "max_tokens": 2, "prompt_logprobs": 1}
    whole = client.post("/v1/chat/completions", json=body).json()
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert [c["prompt_logprobs"] for c in chunks if "prompt_logprobs" in c] == [whole["prompt_logprobs"]]
    assert {ch["index"] for c in chunks for ch in c["choices"] if ch["delta"].get("content")} == {0, 1, 2}


@pytest.mark.parametrize("stream", [False, True])
def test_an_echoed_prompt_after_a_bos_is_offset_from_its_own_text(client, router, tokenizer, monkeypatch, stream):
    """echo with logprobs on a tokenizer that puts a BOS before a text (Llama 3's <|begin_of_text|>): the echoed text is
    the prompt as given, without the BOS's, so the BOS is listed at offset 0 and every later token at its own text's
    start (counting the BOS's text put each after where it is)."""
    monkeypatch.setattr(tokenizer, "bos_id", 1)  # a tokenizer that prepends a BOS (SmolLM2's does not)
    prompt = "alpha beta gamma"
    body = {**COMPLETION, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 3, "stream": stream}
    text, lp = _echoed_answer(client, body)
    assert text == prompt + tokenizer.decode(router.answer[:3])
    assert lp["tokens"][0] == tokenizer.decode([1]) and lp["text_offset"][0] == 0
    for token, offset in zip(lp["tokens"][1:], lp["text_offset"][1:]):
        assert text[offset:offset + len(token)] == token


def test_sentencepiece_tokens_keep_their_leading_spaces(tmp_path):
    """A SentencePiece decoder strips a decode's leading space, so "▁h" alone decoded to "h": the tokens of " hi hi"
    read "", "h", "i", "", "h", "i", whose join lost the spaces, none at its text_offset, and chat's `token` was not
    its `bytes` (vLLM puts the space back for a Metaspace pre-tokenizer)."""
    from transformers import AutoTokenizer

    from model.tokenizer import load_tokenizer
    from tests.fake_router import FakeRouter
    from tests.ingress_support import make_client
    from tests.test_tokenizer import save_byte_fallback_tokenizer

    save_byte_fallback_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    c = make_client(FakeRouter([*tok.encode("hi hi"), tok.eos_id]), tok)
    choice = c.post("/v1/completions", json={**COMPLETION, "logprobs": 0}).json()["choices"][0]
    text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"][:-1], choice["logprobs"]["text_offset"]
    assert text == " hi hi" == "".join(tokens)
    assert all(text[o:o + len(t)] == t for t, o in zip(tokens, offsets))
    chat = c.post("/v1/chat/completions", json={**CHAT, "logprobs": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content[:-1]] == tokens
    assert all(e["token"].encode() == bytes(e["bytes"]) for e in content)


def scored(prompt: list[int], rows: list[tuple[float, int, list[tuple[int, float]]]]) -> PromptScores:
    """The PromptScores of `prompt` whose positions after the first have these (logprob, rank, [(top id, its
    logprob), ...]), as a mesh sends them."""
    scores = PromptScores(prompt, len(rows[0][2]))
    scores.add(PromptLogprobs(1, np.array([lp for lp, _, _ in rows], np.float32),
                              np.array([rank for _, rank, _ in rows], np.int32),
                              np.array([[t for t, _ in top] for _, _, top in rows], np.int32),
                              np.array([[p for _, p in top] for _, _, top in rows], np.float32)))
    return scores


def test_prompt_logprobs_give_k_alternatives_each_ranked_by_its_place(client, tokenizer):
    """vLLM's prompt_logprobs of a prompt scored with more alternatives than asked (echo's logprobs 3 beside
    prompt_logprobs 2 score it once, with 3): k each, ranked 1..k; a prompt token among them has their entry, its rank
    there even where it ties with one above it (vLLM's dict: the prompt token first, then the k likeliest over it);
    -inf is -9999.0, as JSON has no infinity."""
    logprobs, name = client.app.state.server.logprobs, tokenizer.decode
    scores = scored([40, 41, 42], [(-0.5, 2, [(41, -0.5), (43, -0.5), (44, -2.0)]),
                                   (float("-inf"), 900, [(43, -1.0), (44, float("-inf")), (45, float("-inf"))])])
    got = logprobs.prompt(scores, 2)
    assert got == [None,
                   {"41": {"logprob": -0.5, "rank": 1, "decoded_token": name([41])},
                    "43": {"logprob": -0.5, "rank": 2, "decoded_token": name([43])}},
                   {"42": {"logprob": -9999.0, "rank": 900, "decoded_token": name([42])},
                    "43": {"logprob": -1.0, "rank": 1, "decoded_token": name([43])},
                    "44": {"logprob": -9999.0, "rank": 2, "decoded_token": name([44])}}]
    assert [list(entry) for entry in got[1:]] == [["41", "43"], ["42", "43", "44"]]


def test_a_token_that_is_u_fffd_itself_keeps_its_text(client, tokenizer):
    """A token whose bytes are U+FFFD's own (SmolLM2 has one) is a whole character: completions name it by its text;
    "bytes:..." names only a character's incomplete part."""
    (fffd,) = tokenizer.encode("\ufffd")
    lp = client.app.state.server.logprobs.completion([TokenLogprobs(fffd, -0.5, [(fffd, -0.5)])], [0])
    assert lp.tokens == ["\ufffd"] and lp.top_logprobs == [{"\ufffd": -0.5}]
