"""What structured outputs cost a mesh's host per decode step: MeshRunner over the simulated Galaxy at real time.

    python -m bench.grammar_cost [--rounds 12] [--steps 8] [--json]

Batches of 32 slots (`--batches`), each on its own runner and backend, run one decode round (`--steps` steps)
each in turn, so all meet the same load from the rest of the box (an A/B in one run):

- free: 32 unconstrained greedy users (sampled on the device, steps overlapped: async decode);
- host: 32 unconstrained users sampled on the host (a logit_bias of 0: the host-logits path without a grammar);
- json: 32 users under a `response_format` json_schema (nested objects, enums, arrays, a number range);
- tools: 32 users under `tool_choice: required` over 8 tools;
- json1: one json user beside 31 free ones, on this backend (the 31 sampled on the device: decode_mixed);
- json1-tt: the same on a backend that yields either tokens or logits per step, as tt-metal's generator does
  (Backend.decode_mixed's default): one constrained row makes the host sample all 32;
- ambig1, ambig1-tt: as json1 and json1-tt with, in place of the schema, an ambiguous grammar (Lark
  `s: s s | "a"`, which the ingress takes: its masks cost more at every token, until its slot's CPU budget
  ends it with a grammar_error, ~170 tokens in; the slot then takes the same grammar again).

`--temperature`/`--top-p` set every user's sampling (default greedy; Llama 3.3's defaults are 0.6 / 0.9), and
`--spread-logits` gives the host logits spread as a model's in place of the simulated Galaxy's one-hot rows.

The grammars are made as the ingress makes them (deployments.structured.constraint_for) for Llama 3's
tokenizer (128,256 ids, the Galaxy's vocabulary). A slot whose answer ends (its grammar complete) is
prefilled again with a new prompt between rounds, outside the timed rounds. Per step it prints the wall
time, the CPU of the thread that runs the steps (time.thread_time: the backend sleeps out the device's time),
that of all the process's threads (time.process_time: the mask thread's too), the step thread's part in the
runner's host sampling (MeshRunner._host_sample: the masks laid on the rows and the draw; the rest is mostly
the simulated backend making the logits, which a Galaxy reads back instead, not measured), the part of all
threads' CPU inside llguidance's masks and steps (GrammarState's mask and accept), the device's busy fraction
(simulated device seconds over wall seconds) and the tokens made per second. Its torch runs on one thread, as
in a mesh replica.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from model import grammar as grammar_mod
from model.embedded import ensure_llama3_tokenizer
from model.grammar import cfg_grammar, ll_tokenizer
from model.runner import MeshRunner
from model.simulated import SimulatedBackend
from model.tokenizer import Tokenizer
from scheduler.sampling import SamplingParams
from scheduler.work import NO_TOKEN, DecodeRound, MeshWork, PrefillChunk

SLOTS = 32
PROMPT = 128
MAX_SEQ = 4096
BLOCK = 64

# An extraction schema of the kind agents send: nested objects, enums, arrays of objects, a bounded number.
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_id": {"type": "string"},
        "status": {"type": "string", "enum": ["draft", "sent", "paid", "overdue", "void"]},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string"},
            "address": {"type": "object", "properties": {
                "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"},
                "country": {"type": "string", "enum": ["US", "CA", "GB", "DE", "FR", "JP", "IN", "BR"]}},
                "required": ["street", "city", "country"]}},
            "required": ["name", "address"]},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "description": {"type": "string"},
            "quantity": {"type": "integer", "minimum": 1}, "unit_price": {"type": "number", "minimum": 0},
            "tax": {"type": "string", "enum": ["none", "reduced", "standard"]}},
            "required": ["sku", "quantity", "unit_price"]}, "minItems": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "total": {"type": "number"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["invoice_id", "status", "customer", "lines", "total"],
}


def _tool(name: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": required}}}


TOOLS = [
    _tool("get_weather", {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}, ["city"]),
    _tool("search_web", {"query": {"type": "string"}, "max_results": {"type": "integer"}}, ["query"]),
    _tool("send_email", {"to": {"type": "array", "items": {"type": "string"}}, "subject": {"type": "string"},
                         "body": {"type": "string"}}, ["to", "subject", "body"]),
    _tool("create_event", {"title": {"type": "string"}, "start": {"type": "string"}, "end": {"type": "string"},
                           "attendees": {"type": "array", "items": {"type": "object", "properties": {
                               "name": {"type": "string"}, "email": {"type": "string"}}}}}, ["title", "start"]),
    _tool("lookup_order", {"order_id": {"type": "string"}, "include_items": {"type": "boolean"}}, ["order_id"]),
    _tool("convert_currency", {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
          ["amount", "from", "to"]),
    _tool("run_sql", {"query": {"type": "string"}, "database": {"type": "string", "enum": ["prod", "analytics"]}},
          ["query"]),
    _tool("set_reminder", {"text": {"type": "string"}, "at": {"type": "string"},
                           "repeat": {"type": "string", "enum": ["none", "daily", "weekly"]}}, ["text", "at"]),
]


def grammars(llt, schema: dict = JSON_SCHEMA) -> dict[str, str]:
    """The two grammars as the ingress builds and checks them for these requests. Raises the ingress's APIError
    (a 400 naming the field) for a schema it refuses."""
    from deployments.protocol import ChatCompletionRequest
    from deployments.structured import constraint_for

    messages = [{"role": "user", "content": "hi"}]
    json_req = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "response_format": {
        "type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}}})
    tools_req = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "tools": TOOLS,
                                                      "tool_choice": "required"})
    return {"json": constraint_for(json_req, lambda: llt).grammar,
            "tools": constraint_for(tools_req, lambda: llt).grammar}


class _AllLogits(SimulatedBackend):
    """A step gives every row's tokens or every row's logits (Backend.decode_mixed), and top_k off samples the top 32
    tokens, as tt-metal's generator and device sampler do (model.tt_galaxy)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.caps = dataclasses.replace(self.caps, max_device_top_k=32)

    def decode_mixed(self, tokens, positions, page_table, active, sampling, host_rows):
        return None, self.decode(tokens, positions, page_table, active)


class _SpreadLogits:
    """Logits spread as a model's (N(0, 3), from a bank of rows made once), the simulated token's 2 above the row's
    best, in place of SimulatedBackend's one-hot rows (the rest at -1e4 and below): sampling from those costs what
    no model's logits cost (torch.logsumexp over them ~1.4 ms a row here, ~60 us over a model's)."""

    _bank: torch.Tensor | None = None
    _turn = 0

    def _one_hot(self, tokens: np.ndarray) -> torch.Tensor:
        if _SpreadLogits._bank is None:
            _SpreadLogits._bank = torch.randn(64, self.caps.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
        bank = _SpreadLogits._bank
        self._turn += 1
        rows = bank[torch.from_numpy((self._turn * 7 + np.arange(len(tokens))) % len(bank))]  # a copy
        at = torch.arange(len(tokens)), torch.from_numpy(tokens)
        rows[at] = rows.max(-1).values + 2.0
        return rows


class Batch:
    """One runner over its own simulated Galaxy, its 32 slots kept full; slot 0 takes `first`'s params if given."""

    def __init__(self, name: str, params: SamplingParams, tok: Tokenizer, llt, time_scale: float,
                 first: SamplingParams | None = None, all_logits: bool = False, spread: bool = False):
        self.name, self.params, self.first, self.stop = name, params, first, tuple(sorted(tok.stop_ids))
        backend = _AllLogits if all_logits else SimulatedBackend
        if spread:
            backend = type(f"Spread{backend.__name__}", (_SpreadLogits, backend), {})
        self.backend = backend(time_scale=time_scale, num_slots=SLOTS, kv_groups=1, block_size=BLOCK,
                                        num_blocks=SLOTS * (MAX_SEQ // BLOCK), max_seq_len=MAX_SEQ,
                                        vocab_size=tok.vocab_size, eos_token_ids=self.stop)
        self.runner = MeshRunner(self.backend, grammar_tokenizer=lambda: llt)
        per = MAX_SEQ // BLOCK
        self.table = np.arange(SLOTS * per, dtype=np.int32).reshape(SLOTS, per)
        self.work_id, self.seed, self.live = 0, 0, set()
        self.steps = self.wall = self.cpu = self.process_cpu = self.grammar_cpu = self.sample_cpu = self.device = 0.0
        self.tokens = 0
        self.ended = 0

    def refill(self) -> None:
        """Prefill every free slot with a fresh prompt (not timed)."""
        chunks = []
        for s in sorted(set(range(SLOTS)) - self.live):
            self.seed += 1
            prompt = [int(t) for t in np.random.default_rng(self.seed).integers(1000, 100000, PROMPT)]
            params = self.first if s == 0 and self.first else self.params
            chunks.append(PrefillChunk(f"{self.name}-{self.seed}", s, prompt, 0, self.table[s].tolist(), params,
                                       PROMPT, self.stop))
        if chunks:
            self._run(MeshWork(self._next_id(), chunks))

    def round(self, steps: int) -> None:
        width = self.table.shape[1]
        work = MeshWork(self._next_id(), decode=DecodeRound(steps, sorted(self.live), self.table[:, :width]))
        device = self.backend.device_seconds
        THREAD_CPU.update(grammar=0.0, sample=0.0)
        wall, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
        self._run(work)
        self.wall += time.perf_counter() - wall
        self.cpu += time.thread_time() - cpu
        self.process_cpu += time.process_time() - process
        self.grammar_cpu += THREAD_CPU["grammar"]
        self.sample_cpu += THREAD_CPU["sample"]
        self.device += self.backend.device_seconds - device
        self.steps += steps

    def _run(self, work: MeshWork) -> None:
        for result in self.runner.execute(work):
            for s, t in enumerate(result.tokens):
                if t != NO_TOKEN:
                    self.live.add(s)
                    if work.decode:
                        self.tokens += 1
            for s in result.finished:
                self.live.discard(s)
                self.ended += 1

    def _next_id(self) -> int:
        self.work_id += 1
        return self.work_id

    def report(self) -> dict:
        return {"steps": int(self.steps), "tokens_per_step": self.tokens / self.steps,
                "wall_ms_per_step": self.wall / self.steps * 1e3,
                "host_cpu_us_per_step": self.cpu / self.steps * 1e6,
                "process_cpu_us_per_step": self.process_cpu / self.steps * 1e6,
                "grammar_cpu_us_per_step": self.grammar_cpu / self.steps * 1e6,
                "host_sample_cpu_us_per_step": self.sample_cpu / self.steps * 1e6,
                "device_busy": self.device / self.wall, "tokens_per_s": self.tokens / self.wall,
                "answers_ended": self.ended}


THREAD_CPU = {"grammar": 0.0, "sample": 0.0}  # CPU seconds counted by _count_thread_cpu since the round began


def _count_thread_cpu(cls: type, name: str, key: str) -> None:
    """Add the thread CPU of every call of cls.name to THREAD_CPU[key]. Counted so: "grammar", llguidance's time in
    each slot's mask (GrammarState._mask, on the mask thread beside the device's step) and step (accept), which
    never run together; "sample", the runner's host sampling (MeshRunner._host_sample: masks laid on the rows,
    sampling), the step thread's CPU less the backend's (which makes the simulated logits; a Galaxy reads them back
    instead). Once: a second main() in the process patches again, and would count each call twice."""
    inner = getattr(cls, name)
    if getattr(inner, "counted", None) == key:
        return

    def timed(self, *args):
        start = time.thread_time()
        try:
            return inner(self, *args)
        finally:
            THREAD_CPU[key] += time.thread_time() - start
    timed.counted = key
    setattr(cls, name, timed)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=8, help="decode steps per round (the router's decode_steps)")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--batches", default="free,host,json,tools,json1,json1-tt,ambig1,ambig1-tt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--spread-logits", action="store_true", help="host logits spread as a model's (_SpreadLogits), "
                                                                 "not the simulated Galaxy's one-hot rows")
    p.add_argument("--schema", type=argparse.FileType(), help="a JSON schema file for the json batches in place of "
                                                                "the invoice schema (a pathological one, say)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    # A mesh replica's torch has one thread (Ray sets OMP_NUM_THREADS from its num_cpus); with two, on this box's two
    # busy cores, copying a 128k row waited ms for the other thread (tests/conftest.py sets one for the same reason)
    torch.set_num_threads(1)
    tok = Tokenizer.from_hf_dir(ensure_llama3_tokenizer())
    llt = ll_tokenizer(tok, tok.vocab_size)
    started = time.perf_counter()
    made = grammars(llt, json.load(args.schema) if args.schema else JSON_SCHEMA)
    print(f"the ingress built and checked both grammars in {time.perf_counter() - started:.2f} s")
    base = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    free = SamplingParams(**base, ignore_eos=True)
    json_params = SamplingParams(**base, grammar=made["json"])
    ambiguous = SamplingParams(**base, grammar=cfg_grammar('start: s\ns: s s | "a"'))
    kinds = {"free": (free, None, False),
             "host": (SamplingParams(**base, ignore_eos=True, logit_bias={0: 0.0}), None, False),
             "json": (json_params, None, False),
             "tools": (SamplingParams(**base, grammar=made["tools"]), None, False),
             "json1": (free, json_params, False),
             "json1-tt": (free, json_params, True),
             "ambig1": (free, ambiguous, False),
             "ambig1-tt": (free, ambiguous, True)}
    _count_thread_cpu(grammar_mod.GrammarState, "_mask", "grammar")
    _count_thread_cpu(grammar_mod.GrammarState, "accept", "grammar")
    _count_thread_cpu(MeshRunner, "_host_sample", "sample")
    batches = [Batch(k, kinds[k][0], tok, llt, args.time_scale, kinds[k][1], kinds[k][2], args.spread_logits)
               for k in args.batches.split(",")]
    for b in batches:
        b.refill()
        b.round(args.steps)  # warm: the grammar's lexer states, torch's first calls
        b.steps = b.wall = b.cpu = b.process_cpu = b.grammar_cpu = b.sample_cpu = b.device = 0.0
        b.tokens = b.ended = 0
    for _ in range(args.rounds):
        for b in batches:
            b.refill()
            b.round(args.steps)
    report = {"config": {"rounds": args.rounds, "steps": args.steps, "time_scale": args.time_scale,
                         "temperature": args.temperature, "top_p": args.top_p,
                         "spread_logits": args.spread_logits,
                         "vocab": tok.vocab_size, "grammar_bytes": {k: len(v) for k, v in made.items()}},
              **{b.name: b.report() for b in batches}}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'batch':9} {'wall ms/step':>12} {'step thread CPU us':>18} {'all threads':>11} {'sampling':>8} "
              f"{'grammar':>7} {'device busy':>11} "
              f"{'tok/s':>7} {'ended':>5}")
        for b in batches:
            r = b.report()
            print(f"{b.name:9} {r['wall_ms_per_step']:12.2f} {r['host_cpu_us_per_step']:18.0f} "
                  f"{r['process_cpu_us_per_step']:11.0f} {r['host_sample_cpu_us_per_step']:8.0f} "
                  f"{r['grammar_cpu_us_per_step']:7.0f} {r['device_busy']:11.3f} "
                  f"{r['tokens_per_s']:7.0f} "
                  f"{r['answers_ended']:5d}")
    return report


if __name__ == "__main__":
    main()
