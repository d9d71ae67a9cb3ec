"""Double of tt-metal models/demos/llama3_70b_galaxy/tt/llama_model.py: TtTransformer's constructor (the
arguments generator_vllm.py passes), its mode switch and its CCL handle."""
from models.demos.llama3_70b_galaxy.tt.llama_ccl import TT_CCL


class TtTransformer:
    def __init__(self, args, dtype, mesh_device, state_dict, weight_cache_path, paged_attention_config=None,
                 use_paged_kv_cache=False, enable_prefetcher_performance_mode=False, mode="decode",
                 allocate_prefill_buffers=True, decode_mode_only=False):
        self.args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.mesh_device = mesh_device
        self.dtype = dtype
        self.built_with = {"dtype": dtype, "weight_cache_path": weight_cache_path,
                           "paged_attention_config": paged_attention_config, "use_paged_kv_cache": use_paged_kv_cache,
                           "enable_prefetcher_performance_mode": enable_prefetcher_performance_mode, "mode": mode}
        self.tt_ccl = TT_CCL(mesh_device, args, mode)
        self.mode = mode

    def switch_mode(self, mode):
        self.mode = mode
