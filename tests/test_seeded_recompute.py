"""Seeded sampling through everything the router does to a request, on real logits.

The README promises that a seeded answer is unchanged through batching, a prefix-cache hit, preemption,
chunked prefill and a failover, because the sampler draws from (seed, position), not from a slot or a batch.
The simulated backend ignores seeds, so this runs the torch backend on a tiny random Llama in float32,
where a recompute gives the same logits as the decode step it replaces (in bfloat16 it need not: see README).
"""
import asyncio

import pytest
import torch

from deployments.router import Router, RouterConfig
from model.torch_llama import TorchBackend
from model.verify import META_EXPRESSIBLE_ROPE, save_tiny_hf_model
from scheduler.sampling import SamplingParams
from tests.local_mesh import LocalMesh
from tests.test_router import FAST, until

BASE = [(7 * i) % 250 + 1 for i in range(40)]
REQUESTS = [
    (BASE + [3, 4, 5], SamplingParams(temperature=1.0, seed=1, max_tokens=32, ignore_eos=True)),
    (BASE + [3, 4, 6], SamplingParams(temperature=0.9, seed=2, top_p=0.8, max_tokens=32, ignore_eos=True,
                                      logprobs=2)),
    (BASE + [9, 9, 9, 9], SamplingParams(temperature=1.2, seed=3, top_k=20, max_tokens=32, ignore_eos=True,
                                         presence_penalty=1.0, frequency_penalty=0.5)),
    (BASE[:20] + [8] * 30, SamplingParams(temperature=1.0, seed=4, min_p=0.05, max_tokens=32, ignore_eos=True,
                                          repetition_penalty=1.3, logprobs=1)),
    (list(range(1, 100)), SamplingParams(temperature=1.0, seed=6, max_tokens=32, ignore_eos=True,
                                         logit_bias={5: 3.0})),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf_model(path, META_EXPRESSIBLE_ROPE, seed=3)
    return path


async def start(model_dir, num_meshes: int, num_blocks: int, **config) -> tuple[Router, list[LocalMesh]]:
    def backend():
        return TorchBackend(model_dir, num_slots=4, block_size=16, num_blocks=num_blocks, max_seq_len=512,
                            dtype=torch.float32, device="cpu")
    meshes = [LocalMesh(backend) for _ in range(num_meshes)]
    router = Router([(f"mesh-{i}", m) for i, m in enumerate(meshes)], RouterConfig(**{**FAST, **config}))
    await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
    return router, meshes


async def answer(router: Router, request_id: str, prompt: list[int], params: SamplingParams):
    tokens, logprobs, reason = [], [], None
    async for event in router.generate(request_id, prompt, params, None, [], continuation=False):
        tokens += event.token_ids
        logprobs += [(lp.token_id, round(lp.logprob, 4)) for lp in event.logprobs]
        reason = event.finish_reason or reason
    return tokens, logprobs, reason


async def solo_runs(model_dir):
    """Each request alone on a fresh router: no batch, no prefix hit, no preemption."""
    runs = []
    for i, (prompt, params) in enumerate(REQUESTS):
        router, _ = await start(model_dir, 1, 64)
        runs.append(await answer(router, f"solo-{i}", prompt, params))
        await router.close()
    return runs


def test_seeded_answers_survive_prefix_hits_preemption_and_failover(model_dir):
    async def main():
        solo = await solo_runs(model_dir)
        assert len({tuple(tokens) for tokens, _, _ in solo}) == len(REQUESTS)

        # One router in turn: the later requests hit the earlier ones' cached prefix (BASE).
        router, _ = await start(model_dir, 1, 64)
        cached = [await answer(router, f"hit-{i}", p, s) for i, (p, s) in enumerate(REQUESTS)]
        assert router.stats()["meshes"][0]["prefix_hit_tokens"] > 0
        await router.close()
        assert cached == solo

        # All at once on two meshes short of blocks, prefilled in chunks, one mesh failing part way.
        for fault, after in (("raise", 9), ("vanish", 21)):
            router, meshes = await start(model_dir, 2, 12, prefill_chunk=32, max_prefill_tokens=32, decode_steps=4)
            meshes[0].inject(fault, after=after)
            together = await asyncio.gather(*(answer(router, f"{fault}-{i}", p, s)
                                              for i, (p, s) in enumerate(REQUESTS)))
            stats = router.stats()["meshes"]
            await router.close()
            assert sum(m["preemptions"] for m in stats) > 0 and stats[0]["failovers"] > 0, stats
            assert together == solo, fault

    asyncio.run(main())
