"""`python -m model.bench --json`: the torch backend's decode throughput on the embedded SmolLM2 at batch 32
(128 prompt tokens, 128 new, greedy, fp32 unless --dtype) beside transformers' `generate` on the same
batch in the same process.

The two decode in alternating steps: after each step of `generate`, the backend runs one step of its
own. On a shared box the load from other processes changes by the minute, so two runs one after the
other can differ by 2x; alternating steps puts both under the same load. Decode time excludes prefill
(both sides start counting at their first generated token). Peak RSS covers both models at once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model.embedded import ensure_smollm2  # noqa: E402
from model.torch_llama import TorchBackend  # noqa: E402


class BackendDecoder:
    """The torch backend's side: prefill every prompt into its slot, then one decode step per call."""

    def __init__(self, backend: TorchBackend, prompts: torch.Tensor):
        batch, self.prompt_len = prompts.shape
        blocks_per_seq = backend.caps.max_blocks_per_seq
        self.backend = backend
        self.page_table = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)
        self.active = torch.ones(batch, dtype=torch.bool)
        start = time.perf_counter()
        self.generated = [torch.stack([backend.prefill(p.tolist(), 0, self.page_table[slot].tolist(), slot).argmax()
                                       for slot, p in enumerate(prompts)])]
        self.prefill_s = time.perf_counter() - start
        self.decode_s = 0.0

    def step(self) -> None:
        start = time.perf_counter()
        positions = torch.full_like(self.generated[-1], self.prompt_len + len(self.generated) - 1)
        logits = self.backend.decode(self.generated[-1], positions, self.page_table, self.active)
        self.generated.append(logits.argmax(-1))
        self.decode_s += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default is indented)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides")
    args = parser.parse_args()
    from transformers import LlamaForCausalLM, StoppingCriteria
    from transformers.utils import logging
    logging.disable_progress_bar()

    class Alternate(StoppingCriteria):
        """Called by generate after each token: times generate's step, then runs one backend step."""

        def __init__(self, ours: BackendDecoder, progress: tqdm):
            self.ours, self.first, self.last, self.decode_s = ours, 0.0, 0.0, 0.0
            self.progress = progress

        def __call__(self, input_ids, scores, **kwargs):
            now = time.perf_counter()
            if self.last:
                self.decode_s += now - self.last
                self.ours.step()
                self.progress.update()  # outside both sides' timed spans
            else:
                self.first = now  # after prefill and the first token
            self.last = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    dtype = getattr(torch, args.dtype)
    model_dir = ensure_smollm2()
    backend = TorchBackend(model_dir, num_slots=args.batch, max_seq_len=args.prompt_tokens + args.new_tokens,
                           dtype=dtype, device="cpu")
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # every row runs every step
    # Random ids from the ordinary vocabulary (SmolLM2's specials sit at the start).
    prompts = torch.randint(100, backend.cfg.vocab_size, (args.batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0))

    ours = BackendDecoder(backend, prompts)
    # minutes on a loaded 2-core box, where nothing else is printed before the result (on stderr, a terminal only)
    progress = tqdm(total=args.new_tokens - 1, desc="decode steps, each side", unit="step", disable=None)
    alternate = Alternate(ours, progress)
    start = time.perf_counter()
    with torch.inference_mode(), progress:
        hf_tokens = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=args.new_tokens, stopping_criteria=[alternate])[:, args.prompt_tokens:]
    decode_tokens = args.batch * (args.new_tokens - 1)
    ours_tps, hf_tps = decode_tokens / ours.decode_s, decode_tokens / alternate.decode_s
    result = {
        "model": model_dir.name, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "decode_tokens_per_s": round(ours_tps, 1),
        "hf_decode_tokens_per_s": round(hf_tps, 1),
        "decode_speedup_vs_hf": round(ours_tps / hf_tps, 3),
        "prefill_s": round(ours.prefill_s, 2),
        "hf_prefill_s": round(alternate.first - start, 2),
        "rows_equal_to_hf": int((torch.stack(ours.generated, dim=1) == hf_tokens).all(dim=1).sum()),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
