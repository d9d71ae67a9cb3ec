"""The prompt's logprobs (completions' echo with logprobs, vLLM's prompt_logprobs) through the whole stack in one
process: the ingress app over a real Router and torch meshes serving a tiny random Llama in float32, checked
against a direct forward of the whole prompt, as lm-eval-harness's loglikelihood tasks read them."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import numpy as np
import torch

from model.embedded import ensure_smollm2
from model.simulated import SimulatedBackend
from model.tokenizer import load_tokenizer
from model.torch_llama import TorchBackend
from model.verify import META_EXPRESSIBLE_ROPE, save_tiny_hf_model
from scheduler.errors import Unsupported
from scheduler.sampling import SamplingParams
from scheduler.scheduler import SHARED_PREFILL_TOKENS, MeshScheduler
from tests.in_process import Stack, nothing_held, until

CHUNKS = dict(prefill_chunk=32, max_prefill_tokens=32)  # the router's prefill chunks, shorter than PROMPTS
# Token-id prompts of the tiny model's 256-token vocabulary, longer than a prefill chunk (32 here) and a block (16):
# SmolLM2's ids 17-110 are printable ASCII characters, one each, so the echoed text is theirs
PROMPTS = [[(7 * i + 3) % 94 + 17 for i in range(70)], [(11 * i + 5) % 94 + 17 for i in range(45)]]
DIGITS = "31415926535897932384626"  # SmolLM2 writes each digit as one token, inside the tiny model's vocabulary
LM_EVAL = {"model": "smollm2", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf_model(path, META_EXPRESSIBLE_ROPE, seed=5)
    return path


def torch_backend(model_dir, num_blocks: int = 64):
    return TorchBackend(model_dir, num_slots=4, block_size=16, num_blocks=num_blocks, max_seq_len=512,
                        dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def reference(model_dir):
    """A prompt's log_softmax at every position, from one forward of the whole prompt: [len - 1, vocab], row i
    scoring prompt token i + 1."""
    backend = torch_backend(model_dir)

    def logprobs(prompt: list[int]) -> torch.Tensor:
        logits = backend.prompt_logits(prompt, 0, list(range(-(-len(prompt) // 16))))
        return torch.log_softmax(logits, dim=-1)[:-1]
    return logprobs


@pytest.fixture(scope="module")
def stack(tok, model_dir):
    s = Stack(tok, lambda: torch_backend(model_dir), **CHUNKS)
    yield s
    s.close()


def sse(response) -> list[dict]:
    lines = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def check_echoed(choice: dict, prompt: list[int], expected: torch.Tensor, tok, k: int = 1, generated: int = 1) -> None:
    """A choice of an echo + logprobs answer, as lm-eval reads it: token_logprobs[ctxlen:-1] and is_greedy from
    top_logprobs, against the direct forward's values; text_offset indexes the choice's text."""
    lp = choice["logprobs"]
    n = len(prompt)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == n + generated
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    plain = [i for i in range(n) if prompt[i] not in tok.special_id_set and "\ufffd" not in tok.decode([prompt[i]])]
    assert [lp["tokens"][i] for i in plain] == [tok.decode([prompt[i]]) for i in plain]
    got = torch.tensor(lp["token_logprobs"][1:n])
    want = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for i in range(1, n):
        top = lp["top_logprobs"][i]
        name = lp["tokens"][i]
        assert name in top and len(top) <= k + 1
        greedy = max(top, key=top.get) == name
        assert greedy == (int(expected[i - 1].argmax()) == prompt[i]), i
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    echoed = tok.decode(prompt)
    assert choice["text"].startswith(echoed) and (not generated or offsets[n] == len(echoed))
    assert all(choice["text"][offsets[i]:].startswith(lp["tokens"][i]) for i in plain)
    assert not generated or choice["text"][offsets[n]:].startswith(lp["tokens"][n]) or \
        lp["tokens"][n].startswith(("bytes:", "<")) or "\ufffd" in lp["tokens"][n]  # a special or a character's part


def test_echo_logprobs_as_lm_eval_reads_them(stack, reference, tok):
    """A batch of token-id prompts, prefilled in chunks of 32 tokens: each choice's logprobs cover its prompt's
    tokens, then the one generated, with the values of a direct forward of the whole prompt."""
    r = stack.post("/v1/completions", {**LM_EVAL, "prompt": PROMPTS})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for prompt, choice in zip(PROMPTS, choices):
        check_echoed(choice, prompt, reference(prompt), tok)
    assert r.json()["usage"]["completion_tokens"] == 2


def test_echo_logprobs_of_a_text_prompt_and_max_tokens_0(stack, reference, tok):
    """A text prompt: the offsets index the echoed text. max_tokens 0: the prompt alone, its logprobs still in."""
    prompt = tok.encode(DIGITS)
    for max_tokens, generated in ((3, 3), (0, 0)):
        r = stack.post("/v1/completions", {**LM_EVAL, "prompt": DIGITS, "max_tokens": max_tokens, "logprobs": 3})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert "".join(choice["logprobs"]["tokens"][:len(prompt)]) == DIGITS and choice["text"].startswith(DIGITS)
        check_echoed(choice, prompt, reference(prompt), tok, k=3, generated=generated)
        assert r.json()["usage"]["completion_tokens"] == generated


@pytest.mark.parametrize("prompt_of", [lambda tok: "<|im_start|>" + DIGITS, lambda tok: tok.encode("<|im_start|>" + DIGITS)])
def test_echo_offsets_count_the_prompts_special_tokens(stack, reference, tok, prompt_of):
    """The echoed prompt keeps its special tokens' text (as given, or decoded with them), so its offsets count it,
    whatever skip_special_tokens says of the answer."""
    prompt = tok.encode("<|im_start|>" + DIGITS)
    assert prompt[0] in tok.special_id_set
    r = stack.post("/v1/completions", {**LM_EVAL, "prompt": prompt_of(tok), "max_tokens": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["text_offset"][1] == len("<|im_start|>")
    assert all(choice["text"][off:].startswith(t) for off, t in zip(lp["text_offset"], lp["tokens"][:len(prompt)]))
    check_echoed(choice, prompt, reference(prompt), tok, generated=2)


def test_echo_offsets_skip_the_bos_the_tokenizer_put_before_a_text(stack, tok, monkeypatch):
    """A text prompt's echo is the text as sent: the BOS the tokenizer prepends (Llama 3's) is listed first among its
    tokens but holds no character of it, so the next token starts at 0 too."""
    monkeypatch.setattr(tok, "bos_id", tok.encode("<|im_start|>")[0])  # a tokenizer that prepends one (SmolLM2's not)
    r = stack.post("/v1/completions", {**LM_EVAL, "prompt": DIGITS, "max_tokens": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"][0] == "<|im_start|>" and choice["text"].startswith(DIGITS)
    assert lp["text_offset"][:3] == [0, 0, 1]
    n = 1 + len(DIGITS)  # the BOS, then a token per digit
    assert lp["text_offset"][n] == len(DIGITS)  # the answer starts after the echoed text
    assert all(choice["text"][off:].startswith(t) for off, t in zip(lp["text_offset"][1:n], lp["tokens"][1:n]))


def test_prompt_logprobs_field(stack, reference, tok):
    """vLLM's prompt_logprobs: None, then per token {id: {logprob, rank, decoded_token}} holding the prompt token
    (its rank: how many tokens are at least as likely) and the k likeliest ranked 1..k; each choice of n has the
    same."""
    prompt = PROMPTS[0]
    expected = reference(prompt)
    r = stack.post("/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": 2, "n": 2,
                                       "prompt_logprobs": 2, "temperature": 1.0, "seed": 3})
    assert r.status_code == 200, r.text
    first, second = (c["prompt_logprobs"] for c in r.json()["choices"])
    assert first[0] is None is second[0] and len(first) == len(second) == len(prompt)
    for mine, theirs in zip(first[1:], second[1:]):  # chunked apart, they may differ in the last float bits
        assert mine.keys() == theirs.keys()
        assert all(mine[t]["logprob"] == pytest.approx(theirs[t]["logprob"], abs=1e-5) for t in mine)
    for i in range(1, len(prompt)):
        entry, row, token = first[i], expected[i - 1], prompt[i]
        top = row.topk(2)
        assert set(entry) == {str(token), *map(str, top.indices.tolist())}
        mine = entry[str(token)]
        assert mine["rank"] == int((row >= row[token]).sum()) and mine["decoded_token"] == tok.decode([token])
        assert mine["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        for rank, t in enumerate(top.indices.tolist(), 1):
            assert entry[str(t)]["rank"] == rank


def test_return_tokens_as_token_ids_leaves_prompt_logprobs_decoded_token_the_text(stack, tok):
    """vLLM's return_tokens_as_token_ids names the tokens of `logprobs` "token_id:<id>" (serving_completion.py's
    _create_completion_logprobs), but passes prompt_logprobs as the engine made them, decoded_token the token's text
    (request_output_to_completion_response: prompt_logprobs=final_res.prompt_logprobs). Here it was "token_id:<id>"
    too: a vLLM client reading the prompt's text there got ids. Whole and streamed."""
    prompt = PROMPTS[1]
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 2, "logprobs": 1, "prompt_logprobs": 1,
            "return_tokens_as_token_ids": True, "temperature": 0}
    whole = stack.post("/v1/completions", body)
    assert whole.status_code == 200, whole.text
    first = sse(stack.post("/v1/completions", {**body, "stream": True}))[0]["choices"][0]
    for choice in (whole.json()["choices"][0], first):
        assert all(t.startswith("token_id:") for t in choice["logprobs"]["tokens"])
        assert [{t: e["decoded_token"] for t, e in entry.items()} for entry in choice["prompt_logprobs"][1:]] == [
            {t: tok.decode([int(t)]) for t in entry} for entry in choice["prompt_logprobs"][1:]]


def simulated(tok, prompt_logprobs: bool = True):
    """Simulated meshes of SmolLM2's whole vocabulary (chat templates' tokens), scoring prompts or not."""
    def make():
        backend = SimulatedBackend(time_scale=0.001, num_slots=4, kv_groups=1, num_blocks=64, max_seq_len=512,
                                   vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.stop_ids)))
        backend.caps = dataclasses.replace(backend.caps, prompt_logprobs=prompt_logprobs)
        return backend
    return Stack(tok, make, prefill_chunk=128, max_prefill_tokens=128)


def test_chat_prompt_logprobs_are_its_templated_prompts(tok):
    """Chat's prompt_logprobs (on the response; streamed, on the first content chunk) are those of its templated
    prompt sent as a completion's token ids."""
    s = simulated(tok)
    try:
        messages = [{"role": "user", "content": "Tell me a story " * 40}]
        ids = tok.encode_chat(messages)
        chat = s.post("/v1/chat/completions", {"model": "smollm2", "messages": messages, "max_tokens": 3,
                                               "prompt_logprobs": 1})
        assert chat.status_code == 200, chat.text
        scored = chat.json()["prompt_logprobs"]
        assert scored[0] is None and len(scored) == len(ids) > 128  # more than one prefill chunk
        assert all(str(ids[i]) in scored[i] and any(e["rank"] == 1 for e in scored[i].values())
                   for i in range(1, len(ids)))
        completion = s.post("/v1/completions", {"model": "smollm2", "prompt": ids, "max_tokens": 3,
                                                "prompt_logprobs": 1})
        assert completion.json()["choices"][0]["prompt_logprobs"] == scored
        chunks = sse(s.post("/v1/chat/completions", {"model": "smollm2", "messages": messages, "max_tokens": 3,
                                                     "prompt_logprobs": 1, "stream": True}))
        assert [c["prompt_logprobs"] for c in chunks if c.get("prompt_logprobs")] == [scored]
    finally:
        s.close()


def test_stream_equals_whole_answer(stack):
    """Streamed, each choice's first chunk carries the echo and the prompt's logprobs; joined, the chunks are the
    whole answer."""
    body = {**LM_EVAL, "prompt": PROMPTS, "max_tokens": 4, "prompt_logprobs": 1}
    whole = stack.post("/v1/completions", body).json()["choices"]
    chunks = sse(stack.post("/v1/completions", {**body, "stream": True}))
    for index, choice in enumerate(whole):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["prompt_logprobs"] == choice["prompt_logprobs"]
        assert all("prompt_logprobs" not in c for c in mine[1:])
        assert "".join(c["text"] for c in mine) == choice["text"]
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((c["logprobs"][field] for c in mine), []) == choice["logprobs"][field]


def test_cached_prefix_and_preemption_do_not_change_values(tok, model_dir, reference):
    """A prompt already in the prefix cache is computed again (no hit: every position is scored), and prompts that
    preempt one another in a tiny block pool give each position once, with the direct forward's values."""
    s = Stack(tok, lambda: torch_backend(model_dir, num_blocks=9), decode_steps=4, **CHUNKS)
    try:
        prompt = PROMPTS[0]
        assert s.post("/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": 1}).status_code == 200
        r = s.post("/v1/completions", {**LM_EVAL, "prompt": prompt})
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        check_echoed(r.json()["choices"][0], prompt, reference(prompt), tok)
        bodies = [{**LM_EVAL, "prompt": p, "max_tokens": 40, "ignore_eos": True} for p in PROMPTS * 2]
        before = s.stats()["meshes"][0]["preemptions"]
        for body, r in zip(bodies, s.posts("/v1/completions", bodies)):
            assert r.status_code == 200, r.text
            prompt = body["prompt"]
            choice = r.json()["choices"][0]
            check_echoed(choice, prompt, reference(prompt), tok, generated=40)
        after = s.stats()["meshes"][0]
        assert after["preemptions"] > before
        s.run(nothing_held(s.router))
    finally:
        s.close()


def test_failover_mid_prefill_gives_each_position_once(tok, model_dir, reference):
    """The mesh computing the prompt dies after its first chunk: the request moves and is recomputed on the other
    mesh; the client gets every position once, with the direct forward's values."""
    s = Stack(tok, lambda: torch_backend(model_dir), num_meshes=2, **CHUNKS)
    try:
        prompt = PROMPTS[0]
        s.meshes[0].inject("vanish", 1)  # the first of equal meshes takes it; it dies after one chunk's result
        r = s.post("/v1/completions", {**LM_EVAL, "prompt": prompt})
        assert r.status_code == 200, r.text
        s.run(nothing_held(s.router, {"mesh-0": 1}))
        check_echoed(r.json()["choices"][0], prompt, reference(prompt), tok)
    finally:
        s.close()


def test_backend_without_prompt_logprobs_is_a_400(tok):
    """A deployment whose prefill gives only the last position's logits (tt-metal's Galaxy generator) refuses the
    prompt's logprobs with a 400 naming the field, before any mesh is asked; its scheduler refuses them too."""
    s = simulated(tok, prompt_logprobs=False)
    try:
        for body, param in (({"prompt": DIGITS, "prompt_logprobs": 1}, "prompt_logprobs"),
                            ({"prompt": DIGITS, "echo": True, "logprobs": 0, "max_tokens": 0}, "echo")):
            r = s.post("/v1/completions", {"model": "smollm2", **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert param in r.json()["error"]["message"]
        r = s.post("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                                            "prompt_logprobs": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
        assert s.post("/v1/completions", {"model": "smollm2", "prompt": DIGITS, "logprobs": 1}).status_code == 200
    finally:
        s.close()
    sched = MeshScheduler(num_blocks=8, block_size=16, num_slots=2, max_seq_len=128, prompt_logprobs=False)
    with pytest.raises(Unsupported, match="prompt_logprobs"):
        sched.submit("r", [1, 2, 3], SamplingParams(prompt_logprobs=0))


@pytest.mark.parametrize("value", [-1, 21, "2", 1.5])
def test_prompt_logprobs_field_errors_name_it(stack, value):
    for path, body in (("/v1/completions", {"prompt": [1, 2, 3]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = stack.post(path, {"model": "smollm2", **body, "prompt_logprobs": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


def test_scheduler_takes_no_cached_block_for_a_scored_prompt():
    """vLLM V1 skips the prefix-cache lookup for a prompt_logprobs request: every chunk computes from position 0,
    and asks for the logprobs, though the prompt's blocks are cached; the blocks it computes are cached for others."""
    sched = MeshScheduler(num_blocks=32, block_size=16, num_slots=2, max_seq_len=256, prefill_chunk=32,
                          max_prefill_tokens=64, prefix_align=16)
    prompt = list(range(1, 70))
    sched.submit("warm", prompt, SamplingParams(max_tokens=1))
    _drain(sched)
    queried = sched.prefix_query_tokens
    sched.submit("scored", prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
    chunks = _drain(sched)
    assert chunks[0].start == 0 and all(c.prompt_logprobs == 0 for c in chunks)
    assert sum(c.end - c.start for c in chunks) == len(prompt)
    assert sched.prefix_query_tokens == queried  # no lookup, so no query in the hit rate (as vLLM counts none)
    sched.submit("after", prompt, SamplingParams(max_tokens=1))
    assert _drain(sched)[0].start == 64  # a hit on the blocks computed before


def _drain(sched: MeshScheduler) -> list:
    """Run the scheduler against a mesh that answers every chunk (a token for the final one) until it is idle."""
    from scheduler.work import NO_TOKEN, StepResult
    chunks = []
    while (work := sched.schedule()) is not None:
        chunks += work.prefills
        for chunk in work.prefills:
            tokens = [NO_TOKEN] * sched.num_slots
            finished = {}
            if chunk.is_final:
                tokens[chunk.slot], finished[chunk.slot] = 7, "length"
            sched.process(StepResult(work.work_id, tokens, finished))
        if work.decode is not None:
            for step in range(work.decode.num_steps):
                sched.process(StepResult(work.work_id, [NO_TOKEN] * sched.num_slots))
    return chunks


def test_cancel_mid_prefill_leaves_nothing(tok, model_dir):
    """A scored prompt cancelled after its first chunk's logprobs came: its slot, blocks and request are freed."""
    s = Stack(tok, lambda: torch_backend(model_dir), **CHUNKS)
    try:
        async def main():
            params = SamplingParams(max_tokens=5, prompt_logprobs=3)
            async for event in s.router.generate("c", PROMPTS[0], params, None, [], continuation=False):
                assert event.prompt_logprobs and not event.token_ids  # the first chunk's, before any token
                s.router.cancel("c")
                break
            await nothing_held(s.router)
        s.run(main())
    finally:
        s.close()


def test_prompt_scores_keep_each_position_once_and_refuse_a_gap():
    """A recompute (preemption, failover, router restart) sends positions again from 1: they are kept once; a part
    past the positions received would leave a gap, which is refused rather than answered with holes."""
    import numpy as np
    from deployments.streaming import PromptScores
    from scheduler.sampling import PromptLogprobs

    def part(start: int, end: int, value: float) -> PromptLogprobs:
        n = end - start
        return PromptLogprobs(start, np.full(n, value, np.float32), np.ones(n, np.int32), np.zeros((n, 1), np.int32),
                              np.zeros((n, 1), np.float32))
    scores = PromptScores(list(range(10)), 1)
    scores.add(part(1, 5, -1.0))
    assert not scores.complete
    scores.add(part(1, 5, -2.0))  # recomputed
    scores.add(part(5, 9, -3.0))
    assert not scores.complete  # the last position is still to come
    scores.add(part(9, 10, -3.0))
    assert scores.complete and scores.logprobs[1:].tolist() == [-2.0] * 4 + [-3.0] * 5
    scores.add(part(1, 5, -2.0))  # sent again after the whole prompt: nothing after it is lost
    assert scores.complete and scores.scored == 10
    packed = scores.packed(1)
    assert len(packed) == 10 and packed[0].logprob != packed[0].logprob and packed[0].top == []
    assert packed[9].token_id == 9 and packed[9].top == [(0, 0.0)]
    with pytest.raises(RuntimeError, match="came before"):
        PromptScores(list(range(10)), 1).add(part(3, 5, -1.0))


@pytest.mark.parametrize("k", [0, 1, 5])
def test_simulated_scores_are_those_of_its_logits(k):
    """The simulated backend's closed form equals log_softmax, rank and top-k over the one-hot logits it returns,
    where the target is the token its rule makes (every 7th position here) and where it is not."""
    from model.sampler import score_prompt
    b = SimulatedBackend(time_scale=0.001, num_slots=4, kv_groups=1, num_blocks=16, max_seq_len=512, vocab_size=300)
    ids = [(i * 37) % 290 + 5 for i in range(100)]
    b.prefill(ids, 0, list(range(2)), 0)
    positions = np.arange(99)
    made = b._next_tokens(b._window_at(np.arange(2)[None], np.zeros(99, dtype=np.int64), positions,
                                       np.zeros(99, dtype=np.int64)), positions)
    targets = np.where(positions % 7 == 0, made, np.asarray(ids[1:])).tolist()
    got, _ = b.prefill_prompt_logprobs(ids, 0, list(range(2)), 0, k, targets)
    want = score_prompt(lambda i, j: b._one_hot(made[i:j]), torch.tensor(targets), 1, k)
    assert got.start == want.start == 1
    for field in ("logprobs", "ranks", "top_ids", "top_logprobs"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def test_scored_prompt_preempted_mid_prefill_is_scored_again_from_position_0():
    """A scored prompt preempted before its first token is recomputed from position 0, every chunk scored again,
    though its first chunks' blocks are cached by then (the ingress keeps each position once)."""
    from scheduler.work import NO_TOKEN, StepResult
    sched = MeshScheduler(num_blocks=6, block_size=16, num_slots=2, max_seq_len=256, prefill_chunk=16,
                          max_prefill_tokens=16, prefix_align=16, decode_steps=8)
    sched.submit("a", list(range(1, 17)), SamplingParams(max_tokens=60, ignore_eos=True))
    sched.submit("b", list(range(100, 164)), SamplingParams(max_tokens=1, prompt_logprobs=1))
    b_chunks, preempted_at = [], None
    while (work := sched.schedule()) is not None:
        for chunk in work.prefills:
            if chunk.request_id == "b":
                b_chunks.append((chunk.start, chunk.prompt_logprobs))
            tokens = [NO_TOKEN] * 2
            if chunk.is_final:
                tokens[chunk.slot] = 7
            sched.process(StepResult(work.work_id, tokens))
        for _ in range(work.decode.num_steps if work.decode else 0):
            tokens, finished = [NO_TOKEN] * 2, {}
            for seq in list(sched.running.values()):
                if seq.slot in work.decode.slots and seq.live:
                    tokens[seq.slot] = 9
                    if len(seq.token_ids) + 1 == seq.max_tokens_total:  # the mesh retires it at its budget
                        finished[seq.slot] = "length"
            sched.process(StepResult(work.work_id, tokens, finished))
        if preempted_at is None and sched.num_preemptions:
            preempted_at = len(b_chunks)
        if "b" not in sched.requests:
            break
    assert preempted_at is not None and 0 < preempted_at < 4  # b lost its seat mid-prefill
    again = b_chunks[preempted_at:]
    assert again[0] == (0, 1) and all(k == 1 for _, k in again)
    assert [start for start, _ in again] == [0, 16, 32, 48]


def test_choices_of_a_long_scored_prompt_do_not_wait_for_the_first(tok):
    """The choices of a prompt of SHARED_PREFILL_TOKENS or more wait for the first one's first token, to reuse its
    cached prompt; a prompt that is scored reuses nothing (each choice computes every position), so its choices waited
    for nothing: computed one after the other. Shown with the mesh held busy: every choice reaches the router."""
    def make():
        return SimulatedBackend(time_scale=0.001, num_slots=4, kv_groups=1, num_blocks=64, max_seq_len=2048,
                                vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.stop_ids)))
    s = Stack(tok, make, prefill_chunk=128, max_prefill_tokens=128)
    prompt = [(7 * i + 3) % 94 + 17 for i in range(SHARED_PREFILL_TOKENS + 40)]

    async def main():
        async with s.meshes[0].lock:  # no work runs: no choice has a token yet
            answer = asyncio.ensure_future(s.client.post("/v1/completions", json={
                "model": "smollm2", "prompt": prompt, "n": 2, "max_tokens": 2, "prompt_logprobs": 0}))
            await until(lambda: len(s.router.requests) == 2)
        return await answer
    try:
        r = s.run(main())
        assert r.status_code == 200, r.text
        scored = [c["prompt_logprobs"] for c in r.json()["choices"]]
        assert len(scored[0]) == len(prompt) and scored[0] == scored[1]
    finally:
        s.close()
