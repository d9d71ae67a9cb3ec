"""MeshRunner: the mesh side of the work protocol, on a tiny deterministic logits backend."""
import contextlib

import numpy as np
import pytest
import torch

from model.backend import Backend, Capabilities
from model.runner import MeshRunner
from scheduler.sampling import SamplingParams
from scheduler.work import NO_TOKEN, DecodeRound, MeshWork, PrefillChunk, StaleWork, StepResult

VOCAB = 50


def next_token(last: int, position: int) -> int:
    return (last * 7 + position) % VOCAB


class CountingBackend(Backend):
    """Logits put all mass on next_token(last token, its position); `device` toggles self-sampling."""

    def __init__(self, device_sampling=frozenset()):
        self.caps = Capabilities(num_slots=4, block_size=4, num_blocks=64, max_seq_len=64, prefix_align=4,
                                 vocab_size=VOCAB, eos_token_ids=(0,), device_sampling=device_sampling)
        self.calls = []

    def _logits(self, token: int, position: int) -> torch.Tensor:
        row = torch.full((VOCAB,), -10.0)
        row[next_token(token, position)] = 10.0
        return row

    def prefill(self, token_ids, start, block_ids, slot, sampling=None):
        self.calls.append(("prefill", slot, start, len(token_ids)))
        row = self._logits(token_ids[-1], len(token_ids) - 1)
        return row.argmax() if sampling is not None else row

    def decode(self, tokens, positions, page_table, active, sampling=None):
        self.calls.append(("decode", active.nonzero().flatten().tolist()))
        logits = torch.stack([self._logits(int(t), int(p)) for t, p in zip(tokens, positions)])
        return logits.argmax(-1) if sampling is not None else logits


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq[-1], len(seq) - 1))
    return seq[len(prompt):]


def decode_round(slots, steps=3):
    return DecodeRound(steps, slots, np.zeros((4, 16), dtype=np.int32))


def run(runner, work):
    results = list(runner.execute(work))
    assert len(results) == work.num_messages
    assert [r.last for r in results] == [False] * (len(results) - 1) + [True]
    return results


def test_prefill_then_decode_matches_reference_and_retires_on_budget():
    runner = MeshRunner(CountingBackend())
    prompt = [3, 4, 5]
    work = MeshWork(0, [PrefillChunk("a", 1, prompt, 0, [0], greedy(max_tokens=3), len(prompt))],
                    decode_round([1], steps=4))
    results = run(runner, work)
    got = [r.tokens[1] for r in results if r.tokens[1] != NO_TOKEN]
    assert got == expected_tokens(prompt, 3)
    assert results[2].finished == {1: "length"}
    assert 1 not in runner.slots  # retired by itself: the 4th step decodes nobody
    assert runner.backend.calls[-1][0] == "decode" and len(runner.backend.calls) == 3


def test_non_final_chunk_produces_no_token():
    runner = MeshRunner(CountingBackend())
    results = run(runner, MeshWork(0, [PrefillChunk("a", 0, [1, 2, 3, 4], 0, [0])]))
    assert results[0].tokens == [NO_TOKEN] * 4 and 0 not in runner.slots


def test_stop_id_retires_but_not_before_min_tokens():
    prompt = [5]
    first = expected_tokens(prompt, 1)[0]
    runner = MeshRunner(CountingBackend())
    stop_now = PrefillChunk("a", 0, prompt, 0, [0], greedy(), 1, stop_token_ids=(first,))
    assert run(runner, MeshWork(0, [stop_now]))[0].finished == {0: "stop"}
    runner = MeshRunner(CountingBackend())
    held = PrefillChunk("b", 0, prompt, 0, [0], greedy(min_tokens=2, max_tokens=4), 1, stop_token_ids=(first,))
    result = run(runner, MeshWork(0, [held]))[0]
    assert result.finished == {} and result.tokens[0] != first


def test_min_tokens_keeps_eos_out_even_under_ignore_eos():
    """vLLM masks every stop id and the model's EOS ids (all_stop_token_ids) until min_tokens, ignore_eos or not;
    under ignore_eos the scheduler sends no EOS among the stop ids, so the runner takes them from its caps."""
    assert expected_tokens([0], 1) == [0]  # after prompt [0] the model's next token is EOS (caps id 0)
    free = PrefillChunk("a", 0, [0], 0, [0], greedy(ignore_eos=True, max_tokens=4), 1)
    result = run(MeshRunner(CountingBackend()), MeshWork(0, [free]))[0]
    assert result.tokens[0] == 0 and result.finished == {}  # EOS drawn, and it does not stop the answer
    held = PrefillChunk("b", 0, [0], 0, [0], greedy(ignore_eos=True, min_tokens=2, max_tokens=4), 1)
    backend = CountingBackend(device_sampling=frozenset({"temperature"}))
    result = run(MeshRunner(backend), MeshWork(0, [held]))[0]
    assert result.tokens[0] not in (0, NO_TOKEN) and result.finished == {}


def test_release_drops_slot_and_device_sampling_path():
    backend = CountingBackend(device_sampling=frozenset({"temperature"}))
    runner = MeshRunner(backend)
    run(runner, MeshWork(0, [PrefillChunk("a", 2, [9, 9], 0, [0], greedy(), 2),
                             PrefillChunk("b", 3, [1], 0, [1], greedy(), 1)]))
    results = run(runner, MeshWork(1, decode=decode_round([2, 3], steps=1), release=[2]))
    assert results[0].tokens[2] == NO_TOKEN and results[0].tokens[3] == expected_tokens([1], 2)[1]
    assert backend.calls[-1] == ("decode", [3])


class CloseCallsBackend(CountingBackend):
    """Logits close together (sin of id x last token), so penalties change which token wins."""

    def _logits(self, token: int, position: int) -> torch.Tensor:
        return torch.sin(torch.arange(VOCAB, dtype=torch.float32) * (token + 1) * 0.37 + position * 0.11)


def penalised_reference(backend, prompt: list[int], n: int, rep: float, freq: float, pres: float) -> list[int]:
    """Greedy with vLLM's penalties, recounted from the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(n):
        row, out = backend._logits(seq[-1], len(seq) - 1).tolist(), seq[len(prompt):]
        for t in set(seq):
            row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
        for t in set(out):
            row[t] -= freq * out.count(t) + pres
        seq.append(max(range(VOCAB), key=row.__getitem__))
    return seq[len(prompt):]


def test_penalties_counted_token_by_token_match_a_recount_and_survive_a_recompute():
    prompt, params = [3, 4, 5, 4], greedy(max_tokens=14, repetition_penalty=1.6, frequency_penalty=0.3,
                                          presence_penalty=0.2)
    expected = penalised_reference(CloseCallsBackend(), prompt, 14, 1.6, 0.3, 0.2)
    assert expected != penalised_reference(CloseCallsBackend(), prompt, 14, 1.0, 0.0, 0.0)  # they do bite
    runner = MeshRunner(CloseCallsBackend())
    results = run(runner, MeshWork(0, [PrefillChunk("a", 0, prompt, 0, [0], params, len(prompt))],
                                   decode_round([0], steps=13)))
    assert [r.tokens[0] for r in results] == expected
    # preempted after 6 tokens, recomputed on another mesh: prompt + those tokens come back as one prefill
    runner = MeshRunner(CloseCallsBackend())
    chunk = PrefillChunk("a", 0, prompt + expected[:6], 0, [0, 1, 2], params, len(prompt))
    results = run(runner, MeshWork(0, [chunk], decode_round([0], steps=7)))
    assert [r.tokens[0] for r in results] == expected[6:]


def test_logprobs_reported_on_host_path():
    runner = MeshRunner(CountingBackend())
    chunk = PrefillChunk("a", 0, [2], 0, [0], greedy(logprobs=2), 1)
    result = run(runner, MeshWork(0, [chunk]))[0]
    lp = result.logprobs[0]
    assert lp.token_id == result.tokens[0] and len(lp.top) == 2 and lp.top[0][0] == lp.token_id


def test_backend_without_device_sampling_always_gets_logits_even_for_default_params():
    """Default params (temperature 1.0) need nothing special, yet a logits-only backend must not sample."""
    class LogitsOnly(CountingBackend):
        def prefill(self, token_ids, start, block_ids, slot, sampling=None):
            assert sampling is None
            return super().prefill(token_ids, start, block_ids, slot)

        def decode(self, tokens, positions, page_table, active, sampling=None):
            assert sampling is None
            return super().decode(tokens, positions, page_table, active)

    runner = MeshRunner(LogitsOnly())
    results = run(runner, MeshWork(0, [PrefillChunk("a", 0, [4], 0, [0], SamplingParams(max_tokens=3), 1)],
                                   decode_round([0], steps=2)))
    assert all(r.tokens[0] != NO_TOKEN for r in results)


class InferenceModeBackend(CountingBackend):
    """Returns inference-mode tensors, as the torch backend does: writing into them in place raises."""

    def prefill(self, *args, **kw):
        with torch.inference_mode():
            return super().prefill(*args, **kw)

    def decode(self, *args, **kw):
        with torch.inference_mode():
            return super().decode(*args, **kw)


def test_min_tokens_masks_stop_ids_without_writing_into_the_backends_tensor():
    prompt = [5]
    first = expected_tokens(prompt, 1)[0]
    runner = MeshRunner(InferenceModeBackend())
    params = greedy(min_tokens=1, max_tokens=4)
    chunk = PrefillChunk("a", 0, prompt, 0, [0], params, 1, stop_token_ids=(first, 10**9, -1))  # ids out of vocab too
    results = run(runner, MeshWork(0, [chunk], decode_round([0], steps=3)))
    tokens = [r.tokens[0] for r in results if r.tokens[0] != NO_TOKEN]
    assert tokens[0] != first and all(not r.finished or r.finished[0] in ("stop", "length") for r in results)


def test_a_slot_whose_sampling_raises_is_retired_alone(monkeypatch):
    import model.sampler as sampling
    real = sampling.sample_row

    def flaky(logits, params, position, *a, **kw):
        if params.seed == 13:  # the poisoned request
            raise RuntimeError("host sampling broke")
        return real(logits, params, position, *a, **kw)

    monkeypatch.setattr(sampling, "sample_row", flaky)
    runner = MeshRunner(InferenceModeBackend())
    ok, bad = SamplingParams(temperature=0.5, seed=1, max_tokens=10), SamplingParams(temperature=0.5, seed=13, max_tokens=5)
    results = run(runner, MeshWork(0, [PrefillChunk("ok", 0, [2], 0, [0], ok, 1),
                                       PrefillChunk("bad", 1, [3], 0, [1], greedy(max_tokens=5), 1)],
                                   decode_round([0, 1], steps=2)))
    assert results[1].tokens[1] != NO_TOKEN  # greedy "bad" is fine so far
    runner.slots[1].params = runner.slots[1].host_params = bad  # now its sampling raises on every step
    results = run(runner, MeshWork(1, decode=decode_round([0, 1], steps=2)))
    assert results[0].finished == {1: "error"} and results[0].tokens[1] == NO_TOKEN
    assert all(r.tokens[0] != NO_TOKEN for r in results) and 1 not in runner.slots and 0 in runner.slots


def test_a_slot_whose_logit_masks_raise_is_retired_alone(monkeypatch):
    """logit_bias, allowed_token_ids, bad words and min_tokens' stop mask are one request's own: one of them raising
    retires that slot, as its sampling or its grammar raising does, not the whole step (a mesh failure)."""
    real = MeshRunner._bias

    def flaky(row, st):
        if st.request_id == "bad":
            raise RuntimeError("bias broke")
        real(row, st)

    monkeypatch.setattr(MeshRunner, "_bias", staticmethod(flaky))
    runner = MeshRunner(InferenceModeBackend())
    biased = greedy(max_tokens=4, logit_bias={5: 1.0})
    results = run(runner, MeshWork(0, [PrefillChunk("ok", 0, [2], 0, [0], biased, 1),
                                       PrefillChunk("bad", 1, [3], 0, [1], biased, 1)],
                                   decode_round([0], steps=2)))
    assert results[1].finished == {1: "error"} and results[1].tokens[1] == NO_TOKEN
    assert all(r.tokens[0] != NO_TOKEN for r in (results[0], *results[2:])) and 1 not in runner.slots


def test_reset_forgets_every_slot():
    runner = MeshRunner(CountingBackend())
    run(runner, MeshWork(0, [PrefillChunk("a", 0, [2], 0, [0], greedy(), 1)]))
    assert runner.slots
    runner.reset()
    assert runner.slots == {}


class MixedBackend(CountingBackend):
    """Device-samples temperature/top_k rows (top_k up to 2) and gives host rows their logits in the same step."""

    def __init__(self):
        super().__init__(device_sampling=frozenset({"temperature", "top_k"}))
        self.caps = Capabilities(**{**self.caps.__dict__, "max_device_top_k": 2})
        self.sampled_on_device: list[list[int]] = []  # per step: the rows the device sampled

    def prefill(self, token_ids, start, block_ids, slot, sampling=None):
        self.sampled_on_device.append([slot] if sampling is not None else [])
        return super().prefill(token_ids, start, block_ids, slot, sampling)

    def decode(self, tokens, positions, page_table, active, sampling=None):
        self.sampled_on_device.append([s for s, p in enumerate(sampling or ()) if p is not None])
        return super().decode(tokens, positions, page_table, active, sampling)

    def decode_mixed(self, tokens, positions, page_table, active, sampling, host_rows):
        self.sampled_on_device.append([s for s, p in enumerate(sampling) if p is not None])
        logits = CountingBackend.decode(self, tokens, positions, page_table, active)
        return logits.argmax(-1), logits[host_rows]


def test_a_request_the_device_cannot_sample_takes_host_logits_for_its_own_slot_only():
    backend = MixedBackend()
    runner = MeshRunner(backend)
    chunks = [PrefillChunk("plain", 0, [3], 0, [0], greedy(max_tokens=4), 1),
              PrefillChunk("logprobs", 1, [4], 0, [1], greedy(max_tokens=4, logprobs=1), 1),
              PrefillChunk("penalised", 2, [5], 0, [2], greedy(presence_penalty=0.5, max_tokens=4), 1)]
    results = run(runner, MeshWork(0, chunks, decode_round([0, 1, 2], steps=3)))
    assert backend.sampled_on_device == [[0], [], [], [0], [0], [0]]  # 3 prefills, then 3 mixed decode steps
    for slot, prompt in ((0, [3]), (1, [4]), (2, [5])):
        assert [r.tokens[slot] for r in results if r.tokens[slot] != NO_TOKEN] == expected_tokens(prompt, 4)
    assert all(1 in r.logprobs for r in results[1:2] + results[3:])


class LogprobsBackend(MixedBackend):
    """MixedBackend whose device also gives each sampled token's logprob (DEVICE_LOGPROB), as tt-metal's does."""

    DEVICE_LOGPROB = -0.25

    def __init__(self):
        super().__init__()
        self.caps = Capabilities(**{**self.caps.__dict__, "device_sampling": self.caps.device_sampling | {"logprobs"}})

    def decode_logprobs(self, tokens, positions, page_table, active, sampling):
        return self.decode(tokens, positions, page_table, active, sampling), torch.full((4,), self.DEVICE_LOGPROB)


def test_the_device_gives_a_logprobs_0_rows_logprob_and_the_host_where_it_samples_the_row():
    """The first token (the prefill gives a token alone) and a step where a neighbour needs logits (decode_mixed gives
    tokens alone) are the host's, from the row's logits; a step the device samples whole reports the device's."""
    backend = LogprobsBackend()
    assert backend.can_sample(greedy(logprobs=0)) and not backend.can_sample(greedy(logprobs=1))
    runner = MeshRunner(backend)
    host = float(CountingBackend()._logits(0, 0).log_softmax(-1).max())
    chunk = PrefillChunk("lp", 0, [3], 0, [0], greedy(max_tokens=3, logprobs=0), 1)
    results = run(runner, MeshWork(0, [chunk], decode_round([0], steps=2)))
    assert backend.sampled_on_device == [[], [0], [0]]
    assert [(r.logprobs[0].logprob, r.logprobs[0].top) for r in results] == \
        [(pytest.approx(host), []), (LogprobsBackend.DEVICE_LOGPROB, []), (LogprobsBackend.DEVICE_LOGPROB, [])]
    assert [r.logprobs[0].token_id for r in results] == [r.tokens[0] for r in results] == expected_tokens([3], 3)

    backend = LogprobsBackend()
    runner = MeshRunner(backend)
    chunks = [chunk, PrefillChunk("penalised", 1, [5], 0, [1], greedy(presence_penalty=0.5, max_tokens=3), 1)]
    results = run(runner, MeshWork(0, chunks, decode_round([0, 1], steps=2)))
    assert [r.logprobs[0].logprob for r in results if 0 in r.logprobs] == [pytest.approx(host)] * 3
    assert [r.tokens[0] for r in results if r.tokens[0] != NO_TOKEN] == expected_tokens([3], 3)


def test_min_tokens_is_sampled_on_the_host_until_met_then_on_the_device():
    backend = MixedBackend()
    runner = MeshRunner(backend)
    first = expected_tokens([7], 1)[0]
    chunk = PrefillChunk("a", 0, [7], 0, [0], greedy(min_tokens=3, max_tokens=5), 1, stop_token_ids=(first, 0))
    results = run(runner, MeshWork(0, [chunk], decode_round([0], steps=4)))
    # the prefill and two decode steps mask stop ids on the host (0, 1, 2 tokens < min_tokens 3), then the device
    assert backend.sampled_on_device == [[], [], [], [0], [0]]
    assert results[0].tokens[0] != first


def test_a_backend_that_yields_tokens_or_logits_falls_back_to_host_for_the_whole_step():
    backend = CountingBackend(device_sampling=frozenset({"temperature"}))
    runner = MeshRunner(backend)
    chunks = [PrefillChunk("plain", 0, [3], 0, [0], greedy(max_tokens=3), 1),
              PrefillChunk("logprobs", 1, [4], 0, [1], greedy(max_tokens=3, logprobs=0), 1)]
    results = run(runner, MeshWork(0, chunks, decode_round([0, 1], steps=2)))
    assert [r.tokens[0] for r in results if r.tokens[0] != NO_TOKEN] == expected_tokens([3], 3)
    assert [r.tokens[1] for r in results if r.tokens[1] != NO_TOKEN] == expected_tokens([4], 3)


class RampBackend(CountingBackend):
    """Logits rising slowly with the token id (near uniform); device-samples temperature up to top_k 2, and
    yields either tokens or logits per step (Backend.decode_mixed's default), as tt-metal's generator does."""

    def __init__(self):
        super().__init__(device_sampling=frozenset({"temperature"}))
        self.caps = Capabilities(**{**self.caps.__dict__, "max_device_top_k": 2})

    def _logits(self, token: int, position: int) -> torch.Tensor:
        return torch.linspace(0.0, 0.1, VOCAB)


def test_a_row_the_device_could_sample_is_sampled_as_the_device_would_when_a_neighbour_needs_logits():
    """The device keeps its top 2 for top_k off; on the host, beside a logprobs row, the row is sampled the same
    way, not from the whole vocabulary: a user's sampling does not depend on its neighbours'."""
    runner = MeshRunner(RampBackend())
    plain = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
    chunks = [PrefillChunk("plain", 0, [3], 0, [0], plain, 1),
              PrefillChunk("logprobs", 1, [4], 0, [1], greedy(max_tokens=40, logprobs=0, ignore_eos=True), 1)]
    results = run(runner, MeshWork(0, chunks, decode_round([0, 1], steps=30)))
    plain_tokens = [r.tokens[0] for r in results[2:]]
    assert len(plain_tokens) == 30 and set(plain_tokens) <= {VOCAB - 1, VOCAB - 2}
    assert all(r.logprobs.get(1) is not None for r in results[2:])  # the neighbour was host-sampled all along


def test_a_grammar_constrains_its_own_slot_and_survives_a_recompute():
    """Simulated logits (one-hot on an arbitrary token) under a JSON schema: the answer is valid JSON of the
    schema, an unconstrained neighbour is untouched, and a recompute from a partial answer ends the same."""
    import json

    from model.embedded import ensure_smollm2
    from model.grammar import json_schema_grammar, ll_tokenizer
    from model.simulated import SimulatedBackend
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_smollm2())
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    grammar_params = SamplingParams(temperature=0.0, max_tokens=40, grammar=json_schema_grammar(schema))
    free_params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    stop = tuple(sorted(tok.stop_ids))

    def run_to_end(prompt_and_output, num_prompt):
        backend = SimulatedBackend(time_scale=0.001, num_slots=2, kv_groups=1, num_blocks=16, max_seq_len=1024,
                                   vocab_size=tok.vocab_size, eos_token_ids=stop)
        runner = MeshRunner(backend, grammar_tokenizer=lambda: ll_tokenizer(tok, tok.vocab_size))
        chunks = [PrefillChunk("json", 0, prompt_and_output, 0, [0, 1, 2, 3], grammar_params, num_prompt, stop),
                  PrefillChunk("free", 1, [7] * 10, 0, [4], free_params, 10, stop)]
        table = np.zeros((2, 16), dtype=np.int32)
        table[0, :4], table[1, :1] = [0, 1, 2, 3], [4]
        results = list(runner.execute(MeshWork(0, chunks, DecodeRound(40, [0, 1], table))))
        outputs = {s: [r.tokens[s] for r in results if r.tokens[s] != NO_TOKEN] for s in (0, 1)}
        return outputs, {s: next(r.finished[s] for r in results if s in r.finished) for s in (0, 1)}

    prompt = tok.encode("Give me JSON:")
    outputs, finished = run_to_end(prompt, len(prompt))
    answer = outputs[0]
    assert finished == {0: "stop", 1: "length"}  # the grammar ends the answer once the object closes
    assert set(json.loads(tok.decode([t for t in answer if t not in tok.stop_ids]))) == {"answer"}
    resumed, _ = run_to_end(prompt + answer[:3], len(prompt))  # migrated after 3 tokens
    assert resumed[0] == answer[3:]


def grammar_runner(grammar_tokenizer=None, backend_class=None) -> MeshRunner:
    """A runner of 2 slots over a simulated backend (or `backend_class`, a SimulatedBackend) on SmolLM2's
    vocabulary, with llguidance's view of its tokenizer unless `grammar_tokenizer` is given."""
    from model.embedded import ensure_smollm2
    from model.grammar import ll_tokenizer
    from model.simulated import SimulatedBackend
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_smollm2())
    backend = (backend_class or SimulatedBackend)(time_scale=0.001, num_slots=2, kv_groups=1, num_blocks=16,
                                                  max_seq_len=1024, vocab_size=tok.vocab_size,
                                                  eos_token_ids=tuple(sorted(tok.stop_ids)))
    return MeshRunner(backend, grammar_tokenizer=grammar_tokenizer or (lambda: ll_tokenizer(tok, tok.vocab_size)))


def grammar_run(grammar: str, logit_bias: dict[int, float] | None = None, grammar_tokenizer=None,
                logprobs: int | None = None, backend_class=None, runner: MeshRunner | None = None
                ) -> list[StepResult]:
    """Slot 0 constrained by `grammar`, slot 1 free, through a prefill and 3 decode steps on `runner` (by
    default grammar_runner's)."""
    runner = runner or grammar_runner(grammar_tokenizer, backend_class)
    constrained = SamplingParams(temperature=0.0, max_tokens=8, grammar=grammar, logit_bias=logit_bias or {},
                                 logprobs=logprobs)
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    table = np.zeros((2, 16), dtype=np.int32)
    table[1, 0] = 1
    return list(runner.execute(MeshWork(0, [PrefillChunk("c", 0, [7] * 10, 0, [0], constrained, 10),
                                            PrefillChunk("f", 1, [7] * 10, 0, [1], free, 10)],
                                        DecodeRound(3, [0, 1], table))))


@pytest.mark.parametrize("device_close_fails", [False, True])
def test_close_closes_the_device_and_ends_the_mask_thread(device_close_fails):
    """A grammar's masks are computed on a thread of the runner's own beside each device step: closing the
    runner (the mesh replica's shutdown) ends it too, where it outlived the device before; also when the device's
    close raises (the replica logs that and goes on)."""
    import threading
    from model.grammar import choice_grammar

    def mask_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("grammar-masks")]

    before = set(mask_threads())
    runner = grammar_runner()
    closed = []

    def close():
        closed.append(True)
        if device_close_fails:
            raise RuntimeError("device close failed")
    runner.backend.close = close
    grammar_run(choice_grammar(["yes", "no"]), runner=runner)
    started = [t for t in mask_threads() if t not in before]
    assert len(started) == 1
    with pytest.raises(RuntimeError) if device_close_fails else contextlib.nullcontext():
        runner.close()
    started[0].join(timeout=5)
    assert closed == [True] and not started[0].is_alive()


def test_a_grammar_holds_on_rows_wider_than_the_vocabulary():
    """A backend's logits may be padded past the vocabulary (tt-metal pads to a tile), here with the best logit
    of the row in the padding: the grammar masks the padding too, and its answer is one of its choices (the
    mask, as wide as the vocabulary, could not be laid on the row: every constrained request failed with 500)."""
    from model.embedded import ensure_smollm2
    from model.grammar import choice_grammar
    from model.simulated import SimulatedBackend
    from model.tokenizer import load_tokenizer

    class Padded(SimulatedBackend):
        def _one_hot(self, tokens):
            rows = super()._one_hot(tokens)
            return torch.cat([rows, torch.full((len(tokens), 64), 50.0)], -1)

    tok = load_tokenizer(ensure_smollm2())
    results = grammar_run(choice_grammar(["yes", "no"]), backend_class=Padded)
    answer = [r.tokens[0] for r in results if r.tokens[0] != NO_TOKEN]
    assert [r.finished for r in results if r.finished] == [{0: "stop"}]
    assert tok.decode(answer) in ("yes", "no")
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])  # the neighbour decodes on


def test_a_grammar_llguidance_gives_up_on_mid_answer_retires_its_slot_alone_as_grammar_error():
    """A regex validate_grammar accepts whose lexer blows up while matching (the ingress then answers 400
    naming the field): that slot ends with "grammar_error", its neighbour decodes on."""
    from model.embedded import ensure_smollm2
    from model.grammar import regex_grammar
    from model.tokenizer import load_tokenizer

    aaaa = load_tokenizer(ensure_smollm2()).encode("aaaa")[0]  # the token whose match exceeds the lexer's limit
    results = grammar_run(regex_grammar("(a{1000}){1000}"), logit_bias={aaaa: 100.0})  # (the mask allows only it)
    assert results[0].finished == {0: "grammar_error"} and results[0].tokens[0] == NO_TOKEN
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])


def test_a_grammar_the_mesh_cannot_compile_retires_its_slot_alone_as_grammar_error():
    """A grammar llguidance refuses on the mesh (one the ingress let through) is the client's: "grammar_error", which
    the ingress answers with a 400 naming the field, not "error" (a 500); its neighbour decodes on."""
    from model.grammar import cfg_grammar

    results = grammar_run(cfg_grammar("start: ("))
    assert results[0].finished == {0: "grammar_error"} and results[0].tokens[0] == NO_TOKEN
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])


def test_a_mesh_keeps_only_its_most_recently_used_grammars_compiled(monkeypatch):
    """A compiled matcher holds its lexer's states: GrammarCache keeps `size` of them, a grammar used since stays,
    and the least recently used one is compiled again when it comes back."""
    import model.grammar as grammar_module
    from model.grammar import GrammarCache, regex_grammar

    compiled, real_compiled = [], grammar_module.compiled

    def counting(tokenizer, grammar):
        compiled.append(grammar)
        return real_compiled(tokenizer, grammar)
    monkeypatch.setattr(grammar_module, "compiled", counting)
    cache = GrammarCache(grammar_runner().grammars().tokenizer, size=2)
    one, two, three = (regex_grammar(f"[0-9]{{{n}}}") for n in (1, 2, 3))
    for grammar in (one, two, one, three, one, two):
        cache.new_state(grammar, [])
    assert compiled == [one, two, three, two]


@pytest.mark.parametrize("budget", ["step", "mean"])
def test_a_grammars_cpu_budgets_hold_at_their_limits(monkeypatch, budget):
    """Just past MAX_STEP_CPU_S for one mask, or past MAX_MEAN_STEP_CPU_S a token over COST_WINDOW tokens, a
    grammar fails; just under, its answer goes on (a fake CPU clock: every mask and step costs the same)."""
    from types import SimpleNamespace

    import model.grammar as grammar_module
    from model.embedded import ensure_smollm2
    from model.grammar import COST_WINDOW, MAX_MEAN_STEP_CPU_S, MAX_STEP_CPU_S, GrammarCache, regex_grammar
    from model.tokenizer import load_tokenizer

    a = load_tokenizer(ensure_smollm2()).encode("a")[0]
    cache = GrammarCache(grammar_runner().grammars().tokenizer)
    if budget == "step":
        monkeypatch.setattr(grammar_module, "MAX_MEAN_STEP_CPU_S", 1.0)  # the other budget out of the way
    ticks = {"step": MAX_STEP_CPU_S, "mean": MAX_MEAN_STEP_CPU_S / 2}[budget]  # a token is a mask and a step
    clock = [0.0, 0.0]  # now, and each tick's length

    def thread_time() -> float:
        clock[0] += clock[1]
        return clock[0]
    monkeypatch.setattr(grammar_module, "time", SimpleNamespace(thread_time=thread_time))
    for factor, fails in ((0.9, False), (1.1, True)):
        clock[1] = factor * ticks
        state = cache.new_state(regex_grammar("a*"), [])
        try:
            for _ in range(2 * COST_WINDOW):
                state.disallowed()
                state.accept(a)
        except ValueError as exc:
            assert fails and state.failed() and "ms of CPU" in str(exc)
        else:
            assert not fails and not state.failed()


def test_a_grammars_mask_is_computed_while_the_device_runs_the_step(monkeypatch):
    """A step's mask depends only on the tokens before it: the mesh computes it beside the device's step, not after
    it, so a grammar's cost per token does not add to every user's step (an ambiguous one's ~5 ms a token, ~1/3 of
    a Galaxy's step, until its budget ends it: bench.grammar_cost). Here the device's step waits up to 10 s for a
    mask to be computed meanwhile (1 s was once too short on the loaded 2-core box); before, each waited in vain.
    The answer follows the grammar all the same."""
    import threading
    import time

    from model.embedded import ensure_smollm2
    from model.grammar import GrammarState, choice_grammar
    from model.simulated import SimulatedBackend
    from model.tokenizer import load_tokenizer

    masks: list[int] = []  # the thread of each mask computed

    class Watched:
        def __init__(self, matcher):
            self._matcher = matcher

        def compute_bitmask(self):
            masks.append(threading.get_ident())
            return self._matcher.compute_bitmask()

        def __getattr__(self, name):
            return getattr(self._matcher, name)

    built = GrammarState.__init__
    monkeypatch.setattr(GrammarState, "__init__", lambda self, matcher, *rest: built(self, Watched(matcher), *rest))
    beside: list[bool] = []  # per device step: a mask was computed while it ran

    class Watching(SimulatedBackend):
        def decode_mixed(self, *args, **kwargs):
            before, deadline = len(masks), time.monotonic() + 10.0
            while len(masks) == before and time.monotonic() < deadline:
                time.sleep(0.001)
            beside.append(len(masks) > before)
            return super().decode_mixed(*args, **kwargs)

    results = grammar_run(choice_grammar(["yes indeed", "no way at all"]), backend_class=Watching)
    assert beside and all(beside)
    assert threading.get_ident() not in masks[-len(beside):]  # on another thread than the step's
    answer = [r.tokens[0] for r in results if r.tokens[0] != NO_TOKEN]
    text = load_tokenizer(ensure_smollm2()).decode(answer)  # 4 of its tokens: the prefill's and 3 steps'
    assert len(answer) == 4 and any(c.startswith(text) for c in ("yes indeed", "no way at all")), text
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])


@pytest.mark.parametrize("device_fails", [False, True])
def test_a_step_ending_before_its_masks_waits_for_them(monkeypatch, device_fails):
    """The test above has the device wait for the mask; here the mask thread is the slower. A matcher is touched by
    that thread alone until its mask is done (llguidance's matcher is no thread's to share): the step's host work
    takes the mask it computed, not one of its own beside it, and a device that fails leaves no mask running."""
    import threading
    import time

    from model.grammar import GrammarState, choice_grammar
    from model.simulated import SimulatedBackend

    main, masks, running = threading.get_ident(), [], []

    class Slow:
        def __init__(self, matcher):
            self._matcher = matcher

        def compute_bitmask(self):
            if threading.get_ident() != main:  # the mask thread: still at it when the device's step returns
                running.append(True)
                time.sleep(0.2)
            masks.append(threading.get_ident())
            bits = self._matcher.compute_bitmask()
            running.clear()
            return bits

        def __getattr__(self, name):
            return getattr(self._matcher, name)

    built = GrammarState.__init__
    monkeypatch.setattr(GrammarState, "__init__", lambda self, matcher, *rest: built(self, Slow(matcher), *rest))

    class Failing(SimulatedBackend):
        def decode_mixed(self, *args, **kwargs):
            raise RuntimeError("device fault")

    if device_fails:
        with pytest.raises(RuntimeError, match="device fault"):
            grammar_run(choice_grammar(["yes indeed", "no way at all"]), backend_class=Failing)
        assert masks[1:] and not running  # the step's mask was done before the fault reached the caller
    else:
        results = grammar_run(choice_grammar(["yes indeed", "no way at all"]))
        assert len([r for r in results if r.tokens[0] != NO_TOKEN]) == 4
    assert masks.count(main) == 1  # the prefill's (no step beside it); every step's came from the mask thread


def test_a_grammar_mask_that_raises_fails_its_request_not_the_step(monkeypatch):
    from model.grammar import GrammarState, regex_grammar

    def broken(self):
        raise RuntimeError("mask computation broke")
    monkeypatch.setattr(GrammarState, "disallowed", broken)
    results = grammar_run(regex_grammar("[a-z]+"))
    assert results[0].finished == {0: "error"}  # not the client's grammar: a 500 for it alone
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])


def test_a_grammar_step_that_raises_fails_its_request_not_the_step(monkeypatch):
    from model.grammar import GrammarState, regex_grammar

    def broken(self, token):
        raise RuntimeError("matcher broke")
    monkeypatch.setattr(GrammarState, "accept", broken)
    results = grammar_run(regex_grammar("[a-z]+"))
    assert results[0].finished == {0: "error"}  # this host's fault, not the client's grammar: a 500 for it alone
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])


def test_a_mesh_whose_grammar_tokenizer_fails_reports_its_own_error_not_the_clients():
    from model.grammar import regex_grammar

    def unusable():
        raise ValueError("Only fast tokenizers are supported")  # what llguidance.hf.from_tokenizer raises
    results = grammar_run(regex_grammar("[a-z]+"), grammar_tokenizer=unusable)
    assert results[0].finished == {0: "error"}  # a 500: not blamed on the client's grammar
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])


def test_logprobs_of_a_biased_or_constrained_row_are_the_models_own():
    """logit_bias forces token 11: it is sampled, and its logprob is what the model gave it (~-20), not ~0."""
    runner = MeshRunner(CountingBackend())
    natural = expected_tokens([3], 1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=1, logit_bias={11: 100.0}, logprobs=1)
    (result,) = run(runner, MeshWork(0, [PrefillChunk("f", 0, [3], 0, [0], params, 1)]))
    raw = CountingBackend()._logits(3, 0).log_softmax(-1)
    lp = result.logprobs[0]
    assert (result.tokens[0], lp.token_id) == (11, 11) and lp.logprob < -19
    assert lp.logprob == pytest.approx(float(raw[11]))
    assert lp.top == [(natural, pytest.approx(float(raw[natural])))]


def test_logprobs_of_a_guided_row_are_renormalised_over_what_the_grammar_allows():
    """As vLLM (its grammar bitmask is applied before its sampler): every listed alternative is a token the
    grammar allows, and their probabilities sum to at most 1 over those alone."""
    import math

    from model.embedded import ensure_smollm2
    from model.grammar import choice_grammar
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_smollm2())
    results = grammar_run(choice_grammar(["yes", "no"]), logprobs=5)
    lp = results[0].logprobs[0]
    assert all("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])) for t, _ in lp.top), lp.top
    # the simulated logits rank the grammar's tokens ~1e4 below the one it rules out: renormalised, the best is ~0
    assert max(value for _, value in lp.top) > -20
    assert sum(math.exp(v) for _, v in lp.top) == pytest.approx(1.0, abs=1e-3)


def test_logit_bias_forces_and_bans_on_the_host_path():
    runner = MeshRunner(CountingBackend())
    natural = expected_tokens([3], 1)[0]
    forced = SamplingParams(temperature=0.0, max_tokens=1, logit_bias={11: 100.0})
    banned = SamplingParams(temperature=0.0, max_tokens=1, logit_bias={natural: -100.0})
    result = run(runner, MeshWork(0, [PrefillChunk("f", 0, [3], 0, [0], forced, 1),
                                      PrefillChunk("b", 1, [3], 0, [1], banned, 1)]))
    assert result[0].tokens[0] == 11 and result[1].tokens[1] not in (natural, NO_TOKEN)


class TwoTokenBackend(CountingBackend):
    """Logits 4 for token 5, 0 for token 6, -50 for every other token, whatever came before."""

    def _logits(self, token: int, position: int) -> torch.Tensor:
        row = torch.full((VOCAB,), -50.0)
        row[5], row[6] = 4.0, 0.0
        return row


def test_logit_bias_is_added_before_the_penalties_as_in_vllm():
    """vLLM v1 adds logit_bias (a logits processor) before apply_penalties (vllm/v1/sample/sampler.py): token 5,
    biased to 4 - 3 = 1 and then halved by repetition_penalty 2 (it is in the prompt), still beats token 6's 0;
    penalised first (4 / 2 - 3 = -1) it would lose."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logit_bias={5: -3.0}, repetition_penalty=2.0)
    result = run(MeshRunner(TwoTokenBackend()), MeshWork(0, [PrefillChunk("r", 0, [5], 0, [0], params, 1)]))
    assert result[0].tokens[0] == 5


def test_a_narrow_page_table_reaches_the_backend_at_its_full_width_padded_with_zeros():
    class TableBackend(CountingBackend):
        def decode(self, tokens, positions, page_table, active, sampling=None):
            self.tables.append(page_table.clone())
            return super().decode(tokens, positions, page_table, active, sampling)
    backend = TableBackend()
    backend.tables = []
    runner = MeshRunner(backend)
    run(runner, MeshWork(0, [PrefillChunk("a", 0, [1, 2], 0, [5], greedy(max_tokens=9), 2)]))
    wide = np.arange(1, 4 * 6 + 1, dtype=np.int32).reshape(4, 6)
    run(runner, MeshWork(1, decode=DecodeRound(1, [0], wide)))
    narrow = np.full((4, 2), 9, dtype=np.int32)
    run(runner, MeshWork(2, decode=DecodeRound(1, [0], narrow)))
    first, second = backend.tables
    assert first.shape == second.shape == (4, backend.caps.max_blocks_per_seq)
    assert first[:, :6].tolist() == wide.tolist() and not first[:, 6:].any()
    assert second[:, :2].tolist() == narrow.tolist() and not second[:, 2:].any()  # nothing left of the wide one


def test_a_decode_steps_result_is_handed_on_once_the_next_steps_inputs_are_ready():
    """Whoever takes a result (the replica's loop, needing the GIL) then works while the device runs the next
    step, not while this thread prepares it; the last step's result comes right after its own step."""
    runner = MeshRunner(CountingBackend())
    prompt = [3, 4, 5]
    run(runner, MeshWork(0, [PrefillChunk("a", 1, prompt, 0, [0], greedy(max_tokens=10), len(prompt))]))
    prepared = []
    inputs = runner._decode_inputs
    runner._decode_inputs = lambda live, page_table: prepared.append(len(runner.backend.calls)) or inputs(
        live, page_table)
    seen = []
    for result in runner.execute(MeshWork(1, [], decode_round([1], steps=3))):
        seen.append((len(prepared), len(runner.backend.calls)))
    # result k arrives after step k ran (k + 2 backend calls, the prefill's included) and, but for the last,
    # with step k + 1's inputs already made
    assert seen == [(2, 2), (3, 3), (3, 4)]


def test_slots_with_one_grammar_compile_it_once_and_each_match_it_alone(monkeypatch):
    """Compiling takes up to 0.1 s of the worker thread, where every slot waits: a request's n choices, a
    batch's prompts and a recompute share one compiled grammar, and each slot advances its own copy."""
    import model.grammar as grammar_module
    from model.embedded import ensure_smollm2
    from model.grammar import ll_tokenizer, regex_grammar
    from model.simulated import SimulatedBackend
    from model.tokenizer import load_tokenizer

    compiled, real_matcher = [], grammar_module.LLMatcher

    def counting_matcher(tokenizer, grammar):
        compiled.append(grammar)
        return real_matcher(tokenizer, grammar)
    digits, letters = regex_grammar("[0-9]{6}"), regex_grammar("[a-z]{6}")
    monkeypatch.setattr(grammar_module, "LLMatcher", counting_matcher)
    tok = load_tokenizer(ensure_smollm2())
    backend = SimulatedBackend(time_scale=0.001, num_slots=3, kv_groups=1, num_blocks=16, max_seq_len=1024,
                               vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.stop_ids)))
    runner = MeshRunner(backend, grammar_tokenizer=lambda: ll_tokenizer(tok, tok.vocab_size))
    params = [SamplingParams(temperature=0.0, max_tokens=6, grammar=g) for g in (digits, digits, letters)]
    table = np.zeros((3, 16), dtype=np.int32)
    table[:, 0] = [0, 1, 2]
    chunks = [PrefillChunk(f"r{s}", s, [7] * 10, 0, [s], p, 10) for s, p in enumerate(params)]
    results = list(runner.execute(MeshWork(0, chunks, DecodeRound(5, [0, 1, 2], table))))
    assert compiled == [digits, letters]
    texts = [tok.decode([r.tokens[s] for r in results if r.tokens[s] != NO_TOKEN]) for s in range(3)]
    assert texts[0] == texts[1] and texts[0].isdigit() and texts[2].isalpha(), texts
    # a later slot (a recompute, say) resumes after its tokens from the same compiled grammar
    resumed = runner.execute(MeshWork(1, [PrefillChunk("again", 0, [7] * 10 + tok.encode(texts[0][:3]), 0, [0],
                                                       params[0], 10)]))
    assert next(resumed).finished.get(0) not in ("error", "grammar_error") and compiled == [digits, letters]


def test_a_grammar_past_its_cpu_budget_per_token_retires_its_slot_alone_as_grammar_error(monkeypatch):
    """Masks are computed slot after slot on the worker thread: an ambiguous grammar, whose cost grows at every
    token, would slow every slot's steps (20 ms a mask after ~100 random tokens of `s: s s | "a" | "b"` on the
    development box). Past MAX_STEP_CPU_S its slot ends with "grammar_error" (a 400 naming the field)."""
    import model.grammar as grammar_module
    from model.grammar import regex_grammar

    monkeypatch.setattr(grammar_module, "MAX_STEP_CPU_S", -1.0)  # every mask is over budget
    results = grammar_run(regex_grammar("[a-z]+"))
    assert results[0].finished == {0: "grammar_error"} and results[0].tokens[0] == NO_TOKEN
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])


def test_a_grammar_past_its_cpu_budget_over_its_last_tokens_retires_its_slot_alone(monkeypatch):
    """A grammar under MAX_STEP_CPU_S at every token can still cost ~10 ms a token ((a{150}){150}), added to every
    step of the mesh by each such slot: past COST_WINDOW x MAX_MEAN_STEP_CPU_S over its last COST_WINDOW tokens
    (from the first on) it fails."""
    import model.grammar as grammar_module
    from model.grammar import regex_grammar

    monkeypatch.setattr(grammar_module, "MAX_MEAN_STEP_CPU_S", 0.0)  # any cost is over it
    results = grammar_run(regex_grammar("[a-z]{60}"))  # prefills of slots 0 and 1, then 3 decode steps
    assert results[0].finished == {0: "grammar_error"} and results[0].tokens[0] == NO_TOKEN
    assert all(r.tokens[1] != NO_TOKEN for r in results[1:])
    monkeypatch.setattr(grammar_module, "MAX_MEAN_STEP_CPU_S", 1.0)  # ~0.1 ms a token: far under
    results = grammar_run(regex_grammar("[a-z]{60}"))
    assert not results[0].finished and all(r.tokens[0] != NO_TOKEN for r in results[2:])


@pytest.mark.parametrize("device_sampling", [frozenset(), frozenset({"temperature", "seed"})])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_token_ids_are_the_only_tokens_sampled(device_sampling, temperature):
    """vLLM's whitelist: tokens outside it are never drawn (a device sampler that cannot mask leaves it to the
    host); where the model's own choice is allowed it stays, and logprobs are the model's (vLLM's raw_logprobs)."""
    prompt = [3, 4, 5]
    natural = expected_tokens(prompt, 12)
    allowed = sorted({natural[0], natural[2], 11, 23, 31})
    params = SamplingParams(temperature=temperature, seed=7, max_tokens=12, logprobs=0, allowed_token_ids=allowed)
    runner = MeshRunner(CountingBackend(device_sampling))
    assert not runner.backend.can_sample(params)
    work = MeshWork(0, [PrefillChunk("a", 0, prompt, 0, [0], params, len(prompt))], decode_round([0], steps=11))
    results = run(runner, work)
    tokens = [r.tokens[0] for r in results]
    assert len(tokens) == 12 and set(tokens) <= set(allowed)
    seq, overruled = list(prompt), 0
    for result, token in zip(results, tokens):
        favourite = next_token(seq[-1], len(seq) - 1)
        if favourite in allowed:
            assert token == favourite
        overruled += favourite not in allowed
        lp = result.logprobs[0]
        assert lp.token_id == token and lp.logprob == pytest.approx(-0.0 if token == favourite else -20.0, abs=1e-3)
        seq.append(token)
    assert overruled  # the whitelist did change the answer


def test_bad_words_mask_their_last_token_where_the_answer_ends_with_the_rest():
    """vLLM's rule: a word's last token is masked where the answer's own tokens (not the prompt's) end with the
    tokens before it; a one-token word is masked everywhere."""
    prompt = [3, 4, 5]
    natural = expected_tokens(prompt, 4)

    def answer(*bad_words) -> list[int]:
        params = greedy(max_tokens=4, bad_words_token_ids=bad_words)
        runner = MeshRunner(CountingBackend(frozenset({"temperature"})))
        assert runner.backend.can_sample(params) == (not bad_words)  # the device sampler cannot mask them
        work = MeshWork(0, [PrefillChunk("a", 0, prompt, 0, [0], params, len(prompt))], decode_round([0], steps=3))
        return [r.tokens[0] for r in run(runner, work)]

    assert answer() == natural
    two = answer((natural[0], natural[1]))
    assert two[0] == natural[0] and two[1] != natural[1]
    assert answer((natural[0],))[0] != natural[0]
    assert answer((prompt[-1], natural[0])) == natural  # its first token is the prompt's: not the answer's
    assert answer((natural[1], natural[0])) == natural  # the right tokens in the wrong order


def test_allowed_token_ids_hold_on_rows_wider_than_the_vocabulary():
    """A backend's logits may be padded past the vocabulary (tt-metal pads to a tile): the padding is never
    allowed."""
    class Padded(CountingBackend):
        def _logits(self, token: int, position: int) -> torch.Tensor:
            return torch.cat([super()._logits(token, position), torch.tensor([0.0, 50.0, 0.0])])

    params = greedy(max_tokens=3, allowed_token_ids=[7, 9])
    runner = MeshRunner(Padded())
    work = MeshWork(0, [PrefillChunk("a", 0, [3, 4], 0, [0], params, 2)], decode_round([0], steps=2))
    assert set(r.tokens[0] for r in run(runner, work)) <= {7, 9}


def test_constraints_that_leave_no_token_retire_that_slot_alone():
    """A whitelist whose every id a bad word bans leaves only -inf: sampling would draw token 0, which the
    whitelist excludes. The slot is retired instead, as the client's constraint_error (a 400, not a 500); the
    slot beside it decodes on."""
    prompt = [3, 4, 5]
    natural = expected_tokens(prompt, 3)
    blocked = greedy(max_tokens=3, allowed_token_ids=[natural[0]], bad_words_token_ids=((natural[0],),))
    runner = MeshRunner(CountingBackend())
    work = MeshWork(0, [PrefillChunk("a", 0, prompt, 0, [0], blocked, 3),
                        PrefillChunk("b", 1, prompt, 0, [1], greedy(max_tokens=3), 3)], decode_round([1], steps=2))
    results = run(runner, work)
    assert results[0].finished == {0: "constraint_error"} and results[0].tokens[0] == NO_TOKEN
    assert [r.tokens[1] for r in results[1:]] == natural


def test_logit_bias_entries_are_read_once_per_slot_not_at_every_step():
    """A slot's logit_bias is a per-request constant: read at each step, 1,024 entries cost ~0.5 ms of the mesh
    host's CPU per slot per step, which every user of the mesh waits for."""
    from tests.counting import counting
    natural = expected_tokens([3], 8)
    filler = {t: 0.0 for t in range(VOCAB) if t not in (*natural[:2], 11)}
    bias = counting(dict)(filler | {natural[1]: -100.0, 11: 5.0})
    params = greedy(max_tokens=8)
    object.__setattr__(params, "logit_bias", bias)  # frozen: counted where the runner reads it
    runner = MeshRunner(CountingBackend())
    results = run(runner, MeshWork(0, [PrefillChunk("a", 0, [3], 0, [0], params, 1)], decode_round([0], steps=7)))
    tokens = [r.tokens[0] for r in results]
    assert tokens[0] == natural[0] and tokens[1] == 11  # the bias bans and favours as before
    assert bias.reads <= 2 * len(bias)


def test_a_masked_row_is_scanned_whole_for_a_token_only_when_its_draw_found_none(monkeypatch):
    """Whether masks left a row any token was a scan of all its logits (~0.3 ms per slot per step on the mesh host):
    a drawn token with a finite logit already shows there is one. A row left without one is still retired."""
    scans = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: scans.append(t.numel()) or real(t))
    natural = expected_tokens([3], 8)
    runner = MeshRunner(CountingBackend())
    params = [greedy(max_tokens=8, logit_bias={11: 5.0}), SamplingParams(temperature=1.0, seed=3, max_tokens=8,
              min_tokens=8, bad_words_token_ids=((natural[0], natural[1]),))]
    results = run(runner, MeshWork(0, [PrefillChunk(str(s), s, [3], 0, [s], p, 1) for s, p in enumerate(params)],
                                   decode_round([0, 1], steps=7)))
    assert [sum(r.tokens[s] != NO_TOKEN for r in results) for s in (0, 1)] == [8, 8]
    assert [n for n in scans if n >= VOCAB] == []
    test_constraints_that_leave_no_token_retire_that_slot_alone()
    assert [n for n in scans if n >= VOCAB]


def test_bad_words_are_read_once_per_slot_and_a_step_matches_only_those_the_answer_can_end():
    """A step matched every bad word against the answer's end (up to 256 words: ~0.3 ms per slot per step on the
    mesh host). Only a word whose next-to-last token the answer just made can match, so only those are compared."""
    from tests.counting import counting
    prompt = [3, 4, 5]
    natural = expected_tokens(prompt, 8)
    unmatched = [(t, t, u) for t in range(VOCAB) if t not in natural for u in (1, 2)]
    words = counting(tuple)([*unmatched, (natural[2], natural[3])])
    params = greedy(max_tokens=8)
    object.__setattr__(params, "bad_words_token_ids", words)  # frozen: counted where the runner reads them
    runner = MeshRunner(CountingBackend())
    results = run(runner, MeshWork(0, [PrefillChunk("a", 0, prompt, 0, [0], params, 3)], decode_round([0], steps=7)))
    tokens = [r.tokens[0] for r in results]
    assert tokens[:3] == natural[:3] and tokens[3] != natural[3]  # the word's last token is still masked
    assert words.reads <= len(words)


class RowCopies(torch.Tensor):
    """Logits that count the rows copied out of them (by a list of rows or index_select); a row's view is free."""
    copied = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.index_select, torch.index_select):
            index = args[-1] if func is not torch.Tensor.__getitem__ else args[1]
            if isinstance(index, (list, torch.Tensor)) and (func is not torch.Tensor.__getitem__ or index.__len__()):
                RowCopies.copied += len(index)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_full_mesh_sampled_on_the_host_copies_none_of_its_logits():
    """Each host step took its rows out of the backend's logits by a list, and the batched argmax did so again:
    two copies of 32 x 128k logits, ~8 ms of the mesh host's CPU per step, which every user of the mesh waits for."""
    class CopyCounting(CountingBackend):
        def decode(self, tokens, positions, page_table, active, sampling=None):
            return super().decode(tokens, positions, page_table, active, sampling).as_subclass(RowCopies)

    runner = MeshRunner(CopyCounting())
    prompts = [[3 + s] for s in range(4)]
    run(runner, MeshWork(0, [PrefillChunk(str(s), s, p, 0, [s], greedy(max_tokens=9), 1)
                             for s, p in enumerate(prompts)]))
    RowCopies.copied = 0
    results = run(runner, MeshWork(1, decode=decode_round([0, 1, 2, 3], steps=5)))
    assert [[r.tokens[s] for r in results] for s in range(4)] == [expected_tokens(p, 6)[1:] for p in prompts]
    assert RowCopies.copied == 0


class ListIndexed(torch.Tensor):
    """Logits that count the entries of the Python lists their copies are indexed with (each made a tensor)."""
    entries = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[1], list):
            ListIndexed.entries += len(args[1])
        return super().__torch_function__(func, types, args, kwargs or {})


def test_stop_ids_masked_before_min_tokens_are_not_made_a_tensor_at_every_step():
    """min_tokens masks up to 256 stop ids and the EOS ids: as a list, made a tensor at each masked step (~40 us per
    slot per step on the mesh host, for every user of the mesh to wait for)."""
    class ListCounting(CountingBackend):
        def decode(self, tokens, positions, page_table, active, sampling=None):
            return super().decode(tokens, positions, page_table, active, sampling).as_subclass(ListIndexed)

    natural = expected_tokens([3], 8)
    stops = [t for t in range(1, VOCAB) if t != natural[1]]
    params = greedy(max_tokens=8, min_tokens=8, stop_token_ids=stops)
    runner = MeshRunner(ListCounting())
    ListIndexed.entries = 0
    work = MeshWork(0, [PrefillChunk("a", 0, [3], 0, [0], params, 1, stop_token_ids=tuple(stops))],
                    decode_round([0], steps=7))
    results = run(runner, work)
    assert [r.tokens[0] for r in results] == [natural[1]] * 8  # the one id neither a stop id nor EOS
    assert results[-1].finished == {0: "length"}
    assert ListIndexed.entries == 0


def test_each_row_gets_its_own_grammars_mask_for_this_step_as_the_rows_change():
    """Masks are laid on host rows in a buffer kept from step to step, in the order of the rows that change: two
    grammars whose masks change at every token (a digit, then a letter, ...) and a biased free row between them,
    which ends first (the rows that change then move up the buffer). A mask on the wrong row, or a stale one (the
    step before's), breaks a grammar (grammar_error) or changes the free row's tokens."""
    import re

    from model.embedded import ensure_smollm2
    from model.grammar import ll_tokenizer, regex_grammar
    from model.simulated import SimulatedBackend
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_smollm2())
    stop = tuple(sorted(tok.stop_ids))
    params = [SamplingParams(temperature=0.0, max_tokens=12, grammar=regex_grammar("([0-9][a-z]){4}")),
              SamplingParams(temperature=0.0, max_tokens=4, logit_bias={5: 0.0}, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, grammar=regex_grammar("([A-Z][0-9]){4}"))]

    def outputs(params):
        backend = SimulatedBackend(time_scale=0.001, num_slots=3, kv_groups=1, num_blocks=16, max_seq_len=1024,
                                   vocab_size=tok.vocab_size, eos_token_ids=stop)
        runner = MeshRunner(backend, grammar_tokenizer=lambda: ll_tokenizer(tok, tok.vocab_size))
        table = np.zeros((3, 16), dtype=np.int32)
        table[:, 0] = [0, 1, 2]
        chunks = [PrefillChunk(f"r{s}", s, [7 + s] * 10, 0, [s], p, 10, stop) for s, p in enumerate(params)]
        results = list(runner.execute(MeshWork(0, chunks, DecodeRound(12, [0, 1, 2], table))))
        finished = {s: reason for r in results for s, reason in r.finished.items()}
        return [[r.tokens[s] for r in results if r.tokens[s] != NO_TOKEN] for s in range(3)], finished

    (digits, free, letters), finished = outputs(params)
    assert finished == {0: "stop", 1: "length", 2: "stop"}, finished
    assert re.fullmatch("([0-9][a-z]){4}", tok.decode([t for t in digits if t not in stop]))
    assert re.fullmatch("([A-Z][0-9]){4}", tok.decode([t for t in letters if t not in stop]))
    alone, _ = outputs([params[1]] * 3)  # the free row's own tokens, no grammar beside it
    assert free == alone[1]


@pytest.mark.parametrize("pattern", ["[0-9]", '[^"]*', "[a-z ]*"])  # few allowed, few forbidden, neither
def test_a_grammars_mask_leaves_every_allowed_logit_as_it_was_and_forbids_the_rest(pattern):
    """A mask comes as the allowed ids, the forbidden ids or a bool mask, by how many each are: each way, the row
    is the logits with exactly the tokens llguidance's bitmask forbids at -inf (a NaN or an inf allowed stays), the
    padding past the vocabulary too, and the backend's row is not written."""
    from model.embedded import ensure_smollm2
    from model.grammar import GrammarCache, ll_tokenizer, regex_grammar
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_smollm2())
    grammar = GrammarCache(ll_tokenizer(tok, tok.vocab_size)).new_state(regex_grammar(pattern), [])
    bits = np.frombuffer(grammar.matcher.deep_copy().compute_bitmask(), dtype=np.uint8)
    allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:tok.vocab_size].astype(bool))
    source = torch.randn(tok.vocab_size + 64, generator=torch.Generator().manual_seed(0))
    special = torch.nonzero(allowed).squeeze(1)[:3]
    source[special] = torch.tensor([float("nan"), float("inf"), float("-inf")])[:len(special)]
    kept = source.clone()
    out = torch.full_like(source, 7.0)
    MeshRunner._constrain(source, out, grammar.disallowed(), grammar.vocab_size)
    expected = torch.full_like(source, float("-inf"))
    expected[:tok.vocab_size][allowed] = source[:tok.vocab_size][allowed]
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(source, kept, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("pattern", ["[0-9]", '[^"]*', "[a-z ]*"])  # few allowed, few forbidden, neither
def test_a_greedy_token_taken_from_a_masks_ids_is_the_masked_rows_argmax(pattern):
    """A greedy row under a grammar alone takes its token from the mask's ids without the mask laid on it: the
    same token as the argmax of the masked row (the first of a tie, not a forbidden best), or none (the row is
    then laid whole) where that pick is not a finite logit: a NaN, an inf, no logit left."""
    from model.embedded import ensure_smollm2
    from model.grammar import GrammarCache, ll_tokenizer, regex_grammar
    from model.runner import _greedy
    from model.sampler import argmax
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(ensure_smollm2())
    grammar = GrammarCache(ll_tokenizer(tok, tok.vocab_size)).new_state(regex_grammar(pattern), [])
    mask = grammar.disallowed()
    allowed_ids = np.flatnonzero(np.unpackbits(np.frombuffer(grammar.matcher.deep_copy().compute_bitmask(),
                                                             dtype=np.uint8), bitorder="little")[:tok.vocab_size])
    forbidden_id = int(np.setdiff1d(np.arange(tok.vocab_size), allowed_ids)[0])
    rows = []
    for case in ("plain", "tie", "forbidden best", "nan", "inf", "none left", "padding best"):
        row = torch.randn(tok.vocab_size + 64, generator=torch.Generator().manual_seed(len(rows)))
        row[tok.vocab_size:] = -10.0
        if case == "tie":
            row[allowed_ids[-2:]] = row[allowed_ids[:1]] = 9.0
        elif case == "forbidden best":
            row[forbidden_id] = 9.0
        elif case in ("nan", "inf"):
            row[allowed_ids[1]] = float(case)
        elif case == "none left":
            row[allowed_ids] = float("-inf")
        elif case == "padding best":
            row[tok.vocab_size:] = 9.0
        out = torch.empty_like(row)
        MeshRunner._constrain(row, out, mask, grammar.vocab_size)
        token = _greedy(row, mask, grammar.vocab_size)
        rows.append(case)
        expected = int(argmax(out))
        if mask[1].dtype == bool or case in ("nan", "inf", "none left"):
            assert token is None, case
        elif case == "forbidden best" and mask[0] is None:
            assert token is None, case
        else:
            assert token == expected and torch.isfinite(row[token]), case


@pytest.mark.parametrize("forget", ["reset", "release", "final"])
def test_a_chunk_continuing_a_prefill_the_mesh_forgot_is_stale_work(forget):
    """After a reset (a new router), a release (the request cancelled mid-prefill) or its final chunk, the slot's
    prefilled ids are gone: a later chunk that claims to continue them, e.g. after one of its works was dropped,
    is StaleWork, not a prefill of another request's prompt with this one's tail."""
    runner = MeshRunner(CountingBackend())
    final = greedy(max_tokens=1) if forget == "final" else None
    run(runner, MeshWork(0, [PrefillChunk("a", 1, [5, 6, 7, 8], 0, [0], final, 4)]))
    if forget == "reset":
        runner.reset()
    elif forget == "release":
        run(runner, MeshWork(1, decode=decode_round([], steps=1), release=[1]))
    with pytest.raises(StaleWork):
        list(runner.execute(MeshWork(2, [PrefillChunk("b", 1, [9], 0, [0, 1], greedy(), 5, offset=4)])))


def test_a_chunk_that_does_not_follow_the_slots_last_is_stale_work():
    runner = MeshRunner(CountingBackend())
    run(runner, MeshWork(0, [PrefillChunk("a", 1, [5, 6, 7, 8], 0, [0])]))
    with pytest.raises(StaleWork):
        list(runner.execute(MeshWork(1, [PrefillChunk("a", 1, [9], 4, [0, 1], greedy(), 6, offset=5)])))
    run(runner, MeshWork(0, [PrefillChunk("a", 1, [5, 6, 7, 8], 0, [0])]))
    [result] = run(runner, MeshWork(1, [PrefillChunk("a", 1, [9], 4, [0, 1], greedy(), 5, offset=4)]))
    assert result.tokens[1] == expected_tokens([5, 6, 7, 8, 9], 1)[0]


def test_a_live_slot_the_round_does_not_list_sits_the_round_out():
    """The router leaves a live slot out of a round when its KV group ran out of blocks (it waits for them) or
    another slot's step must run alone: decoded anyway, it would write KV past the blocks it was given and
    make tokens the router never planned."""
    backend = CountingBackend()
    runner = MeshRunner(backend)
    run(runner, MeshWork(0, [PrefillChunk("a", 1, [3], 0, [0], greedy(), 1),
                             PrefillChunk("b", 2, [4], 0, [1], greedy(), 1)]))
    results = run(runner, MeshWork(1, decode=decode_round([1], steps=2)))
    assert [r.tokens[2] for r in results] == [NO_TOKEN] * 2 and backend.calls[-2:] == [("decode", [1])] * 2
    [result] = run(runner, MeshWork(2, decode=decode_round([1, 2], steps=1)))
    assert (result.tokens[1], result.tokens[2]) == (expected_tokens([3], 4)[3], expected_tokens([4], 2)[1])


def test_presence_and_frequency_penalties_count_the_answer_not_the_prompt():
    """vLLM's presence and frequency penalties read the output alone: the prompt's last token is no output, fresh or
    in a recompute's prefill (where the chunk carries prompt + answer so far and num_prompt_tokens splits them)."""
    prompt, params = [3, 4, 5, 4], greedy(max_tokens=6, presence_penalty=2.0, frequency_penalty=0.5)
    expected = penalised_reference(CloseCallsBackend(), prompt, 6, 1.0, 0.5, 2.0)
    assert expected[1] == prompt[-1]  # the prompt's last token comes again, unpenalised
    results = run(MeshRunner(CloseCallsBackend()),
                  MeshWork(0, [PrefillChunk("a", 0, prompt, 0, [0], params, len(prompt))], decode_round([0], steps=5)))
    assert [r.tokens[0] for r in results] == expected
    chunk = PrefillChunk("a", 0, prompt + expected[:2], 0, [0, 1], params, len(prompt))
    results = run(MeshRunner(CloseCallsBackend()), MeshWork(0, [chunk], decode_round([0], steps=3)))
    assert [r.tokens[0] for r in results] == expected[2:]


def test_a_neighbour_sampled_again_after_a_failed_row_keeps_its_own_masks(monkeypatch):
    """When one row's sampling raises, the others are sampled again one by one: each with its own masked or
    biased row, not the backend's raw one."""
    import model.sampler as sampling
    real = sampling.sample_row

    def flaky(logits, params, position, *a, **kw):
        if params.seed == 13:
            raise RuntimeError("host sampling broke")
        return real(logits, params, position, *a, **kw)

    monkeypatch.setattr(sampling, "sample_row", flaky)
    runner = MeshRunner(CountingBackend())
    forced = SamplingParams(temperature=0.5, seed=1, max_tokens=10, logit_bias={11: 100.0})
    run(runner, MeshWork(0, [PrefillChunk("ok", 0, [2], 0, [0], forced, 1),
                             PrefillChunk("bad", 1, [3], 0, [1], greedy(), 1)]))
    runner.slots[1].params = runner.slots[1].host_params = SamplingParams(temperature=0.5, seed=13)
    results = run(runner, MeshWork(1, decode=decode_round([0, 1], steps=2)))
    assert results[0].finished == {1: "error"} and [r.tokens[0] for r in results] == [11, 11]


def test_allowed_token_ids_hold_when_decode_rows_are_wider_than_the_prefills():
    """A backend may pad its decode logits (tt-metal pads to a tile) but not its prefill's last row: the masks built
    at the prefill's width are built again at the decode's."""
    class WiderDecode(CountingBackend):
        def decode(self, tokens, positions, page_table, active, sampling=None):
            logits = super().decode(tokens, positions, page_table, active, sampling)
            return torch.cat([logits, torch.full((len(logits), 3), 50.0)], dim=1)

    runner = MeshRunner(WiderDecode())
    work = MeshWork(0, [PrefillChunk("a", 0, [3, 4], 0, [0], greedy(max_tokens=3, allowed_token_ids=[7, 9]), 2)],
                    decode_round([0], steps=2))
    results = run(runner, work)
    assert {r.tokens[0] for r in results} <= {7, 9} and results[-1].finished == {0: "length"}


def test_a_greedy_guided_row_takes_its_logit_bias_too():
    """A greedy row under a grammar alone takes its token from the mask's ids (_greedy); one with a logit_bias too
    is biased first, within what the grammar allows."""
    from model.grammar import choice_grammar

    def answer(logit_bias=None) -> list[int]:
        results = grammar_run(choice_grammar(["yes", "no"]), logit_bias=logit_bias)
        assert all(r.finished.get(0) in (None, "stop") for r in results)
        return [r.tokens[0] for r in results if r.tokens[0] != NO_TOKEN]

    plain = answer()
    biased = answer({plain[0]: -100.0})
    assert biased and biased[0] != plain[0]


def test_prompt_logprobs_score_each_chunks_next_prompt_tokens_and_the_first_token_comes_from_its_logits():
    """Each chunk's positions predict the prompt tokens after them (the next chunk's first one included, even id 0),
    its scores are its own slot's, and the final chunk's first token is sampled from the logits the scoring gave,
    also for params the device could sample (its prefill gives no token there)."""
    class Scoring(CountingBackend):
        def __init__(self):
            super().__init__(device_sampling=frozenset({"temperature"}))
            self.caps = Capabilities(**{**self.caps.__dict__, "prompt_logprobs": True})
            self.targets = []

        def prefill_prompt_logprobs(self, token_ids, start, block_ids, slot, num_logprobs, targets):
            self.targets.append(list(targets))
            return ("scored", start), super().prefill(token_ids, start, block_ids, slot)

    backend = Scoring()
    runner = MeshRunner(backend)
    prompt = [5, 6, 7, 8, 0, 10]
    first = run(runner, MeshWork(0, [PrefillChunk("a", 2, prompt[:4], 0, [0], None, len(prompt), prompt_logprobs=1,
                                                  next_prompt_token=prompt[4])]))
    final = run(runner, MeshWork(1, [PrefillChunk("a", 2, prompt[4:], 4, [0, 1], greedy(), len(prompt),
                                                  prompt_logprobs=1, offset=4)]))
    assert backend.targets == [prompt[1:5], prompt[5:]]
    assert (first[0].prompt_logprobs, final[0].prompt_logprobs) == ({2: ("scored", 0)}, {2: ("scored", 4)})
    assert final[0].tokens[2] == expected_tokens(prompt, 1)[0]


def test_a_bad_word_of_three_tokens_needs_both_tokens_before_its_last():
    """Its last token is masked only where the answer ends with its first two, not with its second alone."""
    prompt = [3, 4, 5]
    natural = expected_tokens(prompt, 4)

    def answer(word) -> list[int]:
        params = greedy(max_tokens=4, bad_words_token_ids=(word,))
        work = MeshWork(0, [PrefillChunk("a", 0, prompt, 0, [0], params, len(prompt))], decode_round([0], steps=3))
        return [r.tokens[0] for r in run(MeshRunner(CountingBackend()), work)]

    banned = answer(tuple(natural[:3]))
    assert banned[:2] == natural[:2] and banned[2] != natural[2]
    assert answer(((natural[0] + 1) % VOCAB, natural[1], natural[2])) == natural


@pytest.mark.parametrize("kv_groups", [0, -1, 3])
def test_capabilities_whose_slots_do_not_split_over_the_kv_groups_are_refused(kv_groups):
    """A backend's KV groups each take num_slots / kv_groups slots: by the remainder alone, 0 groups would divide by
    zero, naming nothing, and -1 would split 4 slots "evenly" into -4 a group, for the scheduler to index by."""
    with pytest.raises(ValueError, match=f"4 slots cannot be split evenly over {kv_groups} KV groups"):
        Capabilities(num_slots=4, block_size=4, num_blocks=64, max_seq_len=64, prefix_align=4, vocab_size=8,
                     kv_groups=kv_groups)
    assert Capabilities(num_slots=4, block_size=4, num_blocks=64, max_seq_len=64, prefix_align=4, vocab_size=8,
                        kv_groups=2).slots_per_group == 2
