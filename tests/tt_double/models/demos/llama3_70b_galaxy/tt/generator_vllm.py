"""Double of tt-metal models/demos/llama3_70b_galaxy/tt/generator_vllm.py @0be6ffc8792d6416: LlamaForCausalLM,
the Generator subclass tenstorrent/vllm's model runner drives, whose allocate_kv_cache(kv_cache_shape, dtype,
num_layers) is how the checkout allocates the paged KV cache the way its model reads it (allocate_vllm_kv_cache:
one [k, v] pair per layer, bfloat8_b, tile layout, DRAM, replicated over the mesh).

Like the real module (@0be6ffc8 and @08b93c9f alike), it imports `vllm.envs` at the top: without vLLM installed,
as in meshserve's environment, its import fails and the backend allocates the same tensors itself. Tests that want
this module install a stand-in `vllm` package.
"""
from pathlib import Path

import torch

import ttnn
import vllm.envs as envs  # noqa: F401  (the real module reads envs.VLLM_USE_V1 when vLLM builds the model)
from models.demos.llama3_70b_galaxy.tt.generator import Generator


def allocate_vllm_kv_cache(kv_cache_shape, dtype, num_layers, model, tt_cache_path):
    ttnn.calls.append(("allocate_vllm_kv_cache", {"kv_cache_shape": tuple(kv_cache_shape), "dtype": dtype,
                                                  "num_layers": num_layers}))
    cache_kv = torch.zeros(kv_cache_shape, dtype=dtype)
    mesh = model.mesh_device
    return [[[ttnn.as_tensor(cache_kv, device=mesh, mesh_mapper=ttnn.ReplicateTensorToMesh(mesh),
                             layout=ttnn.TILE_LAYOUT, memory_config=ttnn.DRAM_MEMORY_CONFIG, dtype=ttnn.bfloat8_b,
                             cache_file_name=Path(tt_cache_path) / f"empty_{kv}cache_paged_attention{kv_cache_shape}")
              for kv in "kv"]
             for _ in range(num_layers)]]


class LlamaForCausalLM(Generator):
    model_capabilities = {"supports_prefix_caching": False}

    @property
    def cache_path(self):
        return self.model_args.model_cache_path

    def prefill_forward(self, *args, **kwargs):
        return super().prefill_forward_text(*args, **kwargs)

    def decode_forward(self, *args, **kwargs):  # as @0be6ffc8 has it: a generator.py that names decode only
        return super().decode_forward_text(*args, **kwargs)  # decode_forward (@00b0fa3f) has no such parent method

    def allocate_kv_cache(self, *args, **kwargs):
        return allocate_vllm_kv_cache(*args, **kwargs, model=self.model, tt_cache_path=self.cache_path)
