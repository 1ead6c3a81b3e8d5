"""The decoder's hyper-parameters, read from a Hugging Face `config.json`.

One dataclass covers the paper's five models and the default: Llama-2, Llama-3 (with the `llama3`
RoPE scaling of 3.1/3.2), Mistral-7B-v0.1 (sliding window), Qwen-2.5 (q/k/v bias) and SmolLM2.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from clo.errors import CloError
from clo.jsonfile import read_json

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # intermediate_size
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q, k, v (not o)
    o_bias: bool = False  # Llama's attention_bias puts a bias on all four
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral-7B-v0.1: 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the config.json as read, saved back as is
    source: str = field(default="config.json", repr=False, compare=False)  # where it was read, for errors

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CloError(
                f"{source}: architecture {arch!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            # transformers >= 5 keeps rope_theta / rope scaling under "rope_parameters"
            rope = dict(hf.get("rope_parameters") or {})
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            if scaling is not None:
                scaling = dict(scaling)
                scaling.setdefault("rope_type", scaling.get("type", "default"))
                if scaling["rope_type"] not in ("llama3", "default"):
                    raise CloError(f"{source}: rope scaling {scaling['rope_type']!r} is not supported (only llama3)")
                if scaling["rope_type"] == "default":
                    scaling = None
            is_qwen = arch == "Qwen2ForCausalLM"
            act = hf.get("hidden_act", "silu")
            if act not in ("silu", "swish"):  # the SwiGLU feed-forward (clo/model/decoder.py) is all we compute
                raise CloError(f"{source}: hidden_act {act!r} is not supported (only silu)")
            window = sliding_window(hf, arch, int(hf["num_hidden_layers"]), source)
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                dim=dim,
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or dim // n_heads),
                ffn_dim=int(hf["intermediate_size"]),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=is_qwen or bool(hf.get("attention_bias", False)),
                o_bias=(not is_qwen) and bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
                raw=hf,
                source=source,
            )
        except KeyError as e:
            raise CloError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:  # "hidden_size": "abc", a list where a number goes, ...
            raise CloError(f"{source}: a field is not a number of the right kind ({str(e).splitlines()[0][:120]})") from None

    def __post_init__(self):
        """Values the decoder cannot compute with, refused before any tensor is made (a NaN epsilon gave NaN weights)."""
        where = self.source
        for name, value in (("vocab_size", self.vocab_size), ("hidden_size", self.dim), ("num_hidden_layers", self.n_layers),
                            ("num_attention_heads", self.n_heads), ("num_key_value_heads", self.n_kv_heads),
                            ("head_dim", self.head_dim), ("intermediate_size", self.ffn_dim)):
            if value < 1:
                raise CloError(f"{where}: field {name!r} is {value}; must be at least 1")
        if self.n_heads % self.n_kv_heads:
            raise CloError(f"{where}: num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        for name, value in (("rms_norm_eps", self.norm_eps), ("rope_theta", self.rope_theta)):
            if not (math.isfinite(value) and value > 0):
                raise CloError(f"{where}: field {name!r} is {value}; must be a positive number")
        factor = None if self.rope_scaling is None else self.rope_scaling.get("factor")
        if self.rope_scaling is not None and not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise CloError(f"{where}: rope scaling 'llama3' needs a positive 'factor', got {factor!r}")

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CloError(f"{folder}: no config.json (not a Hugging Face model folder)")
        return cls.from_hf(read_json(path), source=str(path))

    @property
    def n_params(self) -> int:
        """Parameter count, embeddings included (the head counted once when tied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        embed = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + embed + self.dim


def sliding_window(hf: dict, arch: str, n_layers: int, source: str) -> int | None:
    """The window every layer attends within, as transformers reads the config, or None for full attention.

    Mistral slides on every layer. Llama never does (transformers ignores a `sliding_window` key a
    converted config may carry). Qwen2 slides only with `use_sliding_window`, and then only on layers from
    `max_window_layers` on (transformers' `layer_types`); one window for some layers and not others is refused.
    """
    window = hf.get("sliding_window")
    if not window or arch == "LlamaForCausalLM":
        return None
    if arch != "Qwen2ForCausalLM":
        return int(window)
    kinds = hf.get("layer_types")
    if not isinstance(kinds, list):
        if not hf.get("use_sliding_window", False):
            return None  # Qwen2 lists a window but does not use it by default
        first = int(hf.get("max_window_layers", 28))  # transformers' default
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if set(kinds) == {"full_attention"}:
        return None
    if set(kinds) == {"sliding_attention"}:
        return int(window)
    raise CloError(f"{source}: a sliding window on some layers only (layer_types, max_window_layers) is not supported")
