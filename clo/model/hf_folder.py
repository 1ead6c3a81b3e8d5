"""Load and save Hugging Face safetensors checkpoints (single file or sharded with an index).

Loading builds the model on the meta device and reads one tensor at a time straight into the target
dtype and device, so peak memory is the model plus one tensor: a 7B model loads on a machine with
~1.2x its size in RAM. Saving writes the same layout (config.json + safetensors + tokenizer files),
which `transformers` loads.
"""

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clo.atomic import atomic_folder
from clo.errors import CloError
from clo.jsonfile import read_json, shard_names
from clo.model.config import ModelConfig
from clo.model.decoder import Transformer, rope_inv_freq
from clo.runtime import default_dtype

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def hf_key(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint key."""
    return name if name.startswith("lm_head.") else "model." + name


def our_key(key: str) -> str:
    return key.removeprefix("model.")


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = shard_names(index)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CloError(f"{index}: shard {missing[0]} is listed but not in the folder")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise CloError(f"{folder}: no model.safetensors or model.safetensors.index.json (no weights)")


def load_model(folder: Path | str, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """An HF-format folder -> our Transformer on `device`, in `dtype` (default: bf16 on CUDA, fp32 on CPU)."""
    model = empty_model(folder)
    dtype = dtype or default_dtype(device)
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in read_weights(folder, model)}
    if model.cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True breaks the tie; restore it
    model.inv_freq = rope_inv_freq(model.cfg).to(device)
    return model.eval()


def empty_model(folder: Path | str) -> Transformer:
    """The folder's architecture on the meta device: shapes, no storage (tied embeddings tied).

    Even without storage each layer costs Python objects, so a config.json that describes far more
    parameters than its weight files hold (num_hidden_layers 10^6: ~47 GB) is refused before it is built."""
    cfg = ModelConfig.from_folder(Path(folder))
    stored = sum(math.prod(shape) for _, shape in stored_weights(Path(folder)).values())
    if cfg.n_params > 1.5 * stored + 2**20:  # biases and the like are not in n_params; a wrong config is off by far more
        raise CloError(f"{Path(folder) / 'config.json'}: describes {cfg.n_params:,} parameters, but the weight files hold "
                       f"{stored:,}: it is not these weights' config")
    with torch.device("meta"):
        return Transformer(cfg)


def stored_weights(folder: Path | str) -> dict[str, tuple[str, list[int]]]:
    """{HF tensor name: (safetensors dtype such as "BF16", shape)} of the folder's weight files, from their headers alone."""
    stored = {}
    for path in weight_files(Path(folder)):
        with _open_weights(path) as f:
            for key in f.keys():
                view = f.get_slice(key)
                stored[key] = (view.get_dtype(), view.get_shape())
    return stored


def read_weights(folder: Path | str, model: Transformer):
    """An iterator of (our name, CPU tensor in the file's dtype) over every weight of `model` (from
    `empty_model`; the names are taken now, so adapters added later are not expected), read one at a
    time, each checked against the config's shapes; a tensor the model lacks, or one missing from the
    files, is a one-line CloError naming it."""
    expected = {hf_key(n): p.shape for n, p in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    return _tensors(Path(folder), model.cfg, expected)


def _tensors(folder: Path, cfg: ModelConfig, expected: dict):
    seen = set()
    for path in weight_files(folder):
        with _open_weights(path) as f:
            for key in f.keys():
                if key not in expected:
                    if cfg.tie_word_embeddings and key == "lm_head.weight":
                        continue  # some tied checkpoints store the head anyway
                    if key.endswith("rotary_emb.inv_freq"):
                        continue  # old checkpoints saved this buffer; we recompute it
                    raise CloError(f"{path.name}: unexpected tensor {key!r} for {cfg.architecture}")
                tensor = f.get_tensor(key)
                if tensor.shape != expected[key]:
                    raise CloError(
                        f"{path.name}: tensor {key!r} has shape {list(tensor.shape)}, "
                        f"expected {list(expected[key])} from config.json"
                    )
                seen.add(key)
                yield our_key(key), tensor
    missing = sorted(set(expected) - seen)
    if missing:
        raise CloError(f"{folder}: weight {missing[0]!r} missing from the checkpoint ({len(missing)} missing)")


def _open_weights(path: Path):
    """safe_open, with a truncated or garbage file as a one-line CloError naming it."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except SafetensorError as e:
        raise CloError(f"{path}: unreadable safetensors file ({e})") from None


def save_model(
    model: Transformer,
    out_dir: Path | str,
    tokenizer_from: Path | str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    chat_format: str | None = None,
) -> Path:
    """Write config.json + safetensors (sharded above `max_shard_bytes`) + tokenizer files, atomically.

    The folder appears complete or not at all: everything is written into a temporary sibling first.
    chat_format: the format the model was trained with, recorded as "clo_chat_format" in
    tokenizer_config.json so that eval.py and clo.model.generate serve it in that format (transformers
    ignores the field).
    """
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        state = {}
        for name, tensor in model.state_dict().items():
            if model.cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            t = tensor.detach()
            state[hf_key(name)] = (t.to(dtype) if dtype else t).contiguous().cpu()
        saved_dtype = next(iter(state.values())).dtype

        shards, current, size = [], {}, 0
        for key, t in state.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = t
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        config = dict(model.cfg.raw)
        config["torch_dtype"] = config["dtype"] = str(saved_dtype).removeprefix("torch.")  # transformers 4 / 5
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if chat_format is not None:
            config_path = tmp / "tokenizer_config.json"
            tok_config = read_json(config_path, missing_ok=True)
            (tmp / "tokenizer_config.json").write_text(json.dumps({**tok_config, "clo_chat_format": chat_format}, indent=2, ensure_ascii=False))
    return out_dir
