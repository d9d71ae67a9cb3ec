"""Double of tt-metal models/demos/llama3_70b_galaxy/tt/model_config.py (@019d812b): TtModelArgs' constructor, the
weights environment it reads, and the attributes the backend and generator use (Llama-3.3-70B values)."""
import os
from dataclasses import dataclass
from pathlib import Path

SDPA_CHUNK_ALIGN = 128
# @019d812b reads Hugging Face checkpoints only: "Galaxy Llama 3.3-70B is HuggingFace-only (Meta / LLAMA_DIR support
# was removed, Issue #42139)", an assert on HF_MODEL. Older checkouts also read LLAMA_DIR (one of the two); tests set
# this to True to stand for one of those.
READS_LLAMA_DIR = False


@dataclass
class LlamaOptimizations:
    bfp4_mlp: bool

    @classmethod
    def accuracy(cls, model_name):
        return cls(bfp4_mlp="70B" in model_name)

    @classmethod
    def performance(cls, model_name):
        return cls(bfp4_mlp=True)


class TtModelArgs:
    def __init__(self, mesh_device, instruct=False, dummy_weights=False, max_batch_size=1, max_seq_len=1024 * 128,
                 optimizations=LlamaOptimizations.accuracy, cache_hf=True):
        self.num_devices = mesh_device.get_num_devices() if mesh_device else 0
        if self.num_devices != 32:
            raise ValueError(f"Unsupported number of devices: {self.num_devices}. "
                             "Only 32 devices (Galaxy) are supported.")
        llama_dir, hf_model = os.getenv("LLAMA_DIR"), os.getenv("HF_MODEL")
        if READS_LLAMA_DIR:
            assert not (llama_dir and hf_model), "Only one of LLAMA_DIR or HF_MODEL should be set"
            assert llama_dir or hf_model, "Please set HF_MODEL (or LLAMA_DIR)"
        else:
            assert hf_model, "Please set HF_MODEL to a HuggingFace model name, e.g. meta-llama/Llama-3.3-70B-Instruct"
            llama_dir = None
        self.CKPT_DIR = llama_dir or hf_model
        self.mesh_device = mesh_device
        self.instruct = instruct
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.model_name = Path(self.CKPT_DIR).name
        self.optimizations = optimizations(self.model_name) if callable(optimizations) else optimizations
        self.cluster_shape = list(mesh_device.shape)
        self.n_layers = 80
        self.n_heads = 64
        self.n_kv_heads = 8
        self.head_dim = 128
        self.dim = 8192
        self.vocab_size = 128256
        self.padded_vocab_size = 128 * 1024
        # @019d812b: $TT_CACHE_PATH/TG, else os.path.join("model_cache", HF_MODEL, "TG"): an absolute HF_MODEL
        # drops "model_cache", putting the cache inside the weights folder
        self.model_cache_path = Path(os.getenv("TT_CACHE_PATH") or os.path.join("model_cache", self.CKPT_DIR)) / "TG"
        self.cache_hf_flag = cache_hf
        self.cached_hf_model = None

    def load_state_dict(self):
        """@019d812b: with cache_hf the state dict comes from the Hugging Face reference model, which is kept."""
        if self.cache_hf_flag:
            self.cached_hf_model = f"the whole Hugging Face model at {self.CKPT_DIR}, in host memory"
        return {}

    def weight_cache_path(self, dtype):
        return self.model_cache_path / f"tensor_cache_{dtype.name.lower()}"
