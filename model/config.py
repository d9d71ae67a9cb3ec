"""Llama model shape from Meta's `params.json` or a Hugging Face `config.json`.

Both describe the same architecture with different names; Meta also leaves the FFN width and the
Llama 3 rope scaling constants implicit, so they are derived here the way Meta's reference code does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import checkpoint_format


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ("llama3" rope type) frequency scaling for long context."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: dim // n_heads
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        # A value of the wrong type (a number quoted in the JSON) passed every check and failed each replica's rope or
        # norm with a TypeError naming nothing; so does a zero or negative size.
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_position_embeddings"):
            _check_number(name, getattr(self, name), int)
        _check_number("head_dim", self.head_dim or 1, int)
        for name in ("norm_eps", "rope_theta"):
            _check_number(name, getattr(self, name), (int, float))
        if self.rope_scaling is not None:
            for name, value in self.rope_scaling.__dict__.items():
                _check_number(f"rope_scaling.{name}", value, (int, float))
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:  # both spellings: the error comes from params.json or config.json
            raise ValueError(f"n_heads (num_attention_heads) {self.n_heads} is not a multiple of n_kv_heads "
                             f"(num_key_value_heads) {self.n_kv_heads}")

    @classmethod
    def from_meta(cls, params: dict) -> LlamaConfig:
        """Meta params.json. `use_scaled_rope` turns on Llama 3.1+ scaling with Meta's fixed constants
        (only the factor is ever given, as `rope_scaling_factor`), and those models run 128k context."""
        scaled = params.get("use_scaled_rope")
        if scaled is None:  # left out (Llama 3), or null
            scaled = False
        elif not isinstance(scaled, bool):  # bool("false") is True: a string turned on Llama 3.1's rope scaling
            raise ValueError(f"use_scaled_rope is {scaled!r}, not true or false")
        # the FFN width is computed from these before the fields are checked: a string failed inside the arithmetic
        # naming no field, a negative multiple_of gave a wrong width
        dim, multiple_of, multiplier = params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
        _check_number("dim", dim, int)
        _check_number("multiple_of", multiple_of, int)
        if multiplier is not None:
            _check_number("ffn_dim_multiplier", multiplier, (int, float))
        return cls(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=params["vocab_size"],
            ffn_dim=meta_ffn_dim(dim, multiple_of, multiplier),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 500000.0),
            rope_scaling=RopeScaling(factor=params.get("rope_scaling_factor", 8.0)) if scaled else None,
            max_position_embeddings=131072 if scaled else 8192,
        )

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaConfig:
        """HF config.json. transformers < 5 writes `rope_theta` + `rope_scaling`; 5.x nests both in
        `rope_parameters`. A field left out takes transformers' LlamaConfig default, as vLLM reads it through that."""
        check_llama_architecture(cfg)
        # transformers refuses these types; taken, a string "false" tied the embeddings, and a string token id failed
        # each request's stop-token set in a replica
        for key in ("rope_parameters", "rope_scaling"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise ValueError(f"{key} is {cfg[key]!r}, not an object of rope fields")
        if not isinstance(cfg.get("tie_word_embeddings", False), bool):
            raise ValueError(f"tie_word_embeddings is {cfg['tie_word_embeddings']!r}, not true or false")
        eos = cfg.get("eos_token_id")
        if not all(type(t) is int for t in ([] if eos is None else eos if isinstance(eos, list) else [eos])):
            raise ValueError(f"eos_token_id is {eos!r}, not a token id (an integer) or a list of them")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r}")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                  high_freq_factor=rope["high_freq_factor"],
                                  original_max_position_embeddings=rope["original_max_position_embeddings"])
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            head_dim=cfg.get("head_dim") or 0,
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> LlamaConfig:
        """A checkpoint folder: Meta (params.json) or HF (config.json), as model.checkpoint.checkpoint_format decides
        by the weights it holds. Raises FileNotFoundError when that format's config is missing (or there is no
        checkpoint), ValueError naming the file when that is no Llama config read here (not JSON, a field missing, a
        rope type not supported): a bare KeyError said only the field's name."""
        path = Path(path)
        name, parse = ("params.json", cls.from_meta) if checkpoint_format(path) == "meta" else ("config.json",
                                                                                                cls.from_hf)
        file = path / name
        if not file.is_file():
            weights = "Meta weights (consolidated.*.pth)" if name == "params.json" else "Hugging Face weights"
            raise FileNotFoundError(f"{path} holds {weights} but no {name}")
        try:
            fields = json.loads(file.read_text())
            if not isinstance(fields, dict):
                raise ValueError(f"a JSON object of the model's fields is needed, not {type(fields).__name__} "
                                 f"{fields!r:.40}")
            return parse(fields)
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            # (JSONDecodeError is a ValueError; 0 heads a ZeroDivisionError)
            reason = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{file}: not a Llama config meshserve reads: {reason}") from e


# Meta's names (LlamaConfig's) -> config.json's, for errors about a value read from either file
_HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps"}


def _check_number(name: str, value: object, kind: type | tuple[type, ...]) -> None:
    """Raise ValueError naming the field (both spellings) unless `value` is a positive number of `kind` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        spelled = f"{name} ({_HF_NAMES[name]})" if name in _HF_NAMES else name
        raise ValueError(f"{spelled} is {value!r}, not a positive {'integer' if kind is int else 'number'}")


def check_llama_architecture(cfg: dict) -> None:
    """Raise ValueError naming the field when an HF config.json describes a model other than the Llama computed here
    (transformers' LlamaForCausalLM: SiLU MLP, no biases, unquantized): its weights have a Llama's names and shapes,
    so a Gemma, a biased or a quantized checkpoint would otherwise load and serve wrong tokens without a word. (vLLM
    picks the model class by `architectures`; a config without `model_type`, hand-written, is taken for a Llama.)"""
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type {model_type!r}: meshserve computes Llama models only (model_type 'llama')")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r}: a Llama's MLP is SiLU-gated (hidden_act 'silu')")
    for bias in ("attention_bias", "mlp_bias"):
        if cfg.get(bias):
            raise ValueError(f"{bias} true: meshserve's Llama has no bias terms")
    if cfg.get("quantization_config"):
        quantization = cfg["quantization_config"]
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ValueError(f"quantization_config ({method or 'given'}): meshserve reads unquantized weights only "
                         "(float32, float16 or bfloat16)")


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta computes it: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)
