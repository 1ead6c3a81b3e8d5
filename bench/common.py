"""What every benchmark script shares: the machine it ran on, the device, the models of both sides, the result file.

Importing this module puts the repository on sys.path, so a script run as `python bench/<name>.py`
imports `clo` without an install. Models: an HF folder, or `random:<shape>` (RANDOM_SHAPES), random
weights built in memory with no files and no download, identical on the clo side (`clo_model`) and
the transformers side (`hf_model`).
"""

import json
import os
import platform
import sys
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clo.atomic import write_atomic  # noqa: E402
from clo.errors import CloError  # noqa: E402
from clo.runtime import amx_tiles, cpu_supports  # noqa: E402

# Shapes for `--model random:<name>`: random weights built in memory, no files, no download.
RANDOM_SHAPES = {
    "llama2-7b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "tiny": dict(  # for the smoke test
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
}


# --- the machine and the device ----------------------------------------------------------------


def machine() -> dict:
    """CPU model and bf16 instructions, cores, torch threads, torch and Python versions, the GPU's name if any."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "amx": amx_tiles(), "avx512_bf16": cpu_supports("_is_avx512_bf16_supported")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_device(spec: str) -> torch.device:
    """The device `--device spec` names; CloError for CUDA on a machine without one."""
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CloError("--device cuda: no CUDA device is visible")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- models: the same weights on both sides ----------------------------------------------------


def resolve_models(model: str, tokenizer: str | None) -> tuple[str, str]:
    """(model spec, tokenizer folder) for `--model` and `--tokenizer`: a `random:<shape>` stays as it is
    and takes its tokenizer from --tokenizer or the default model; a folder or name is resolved and is
    its own tokenizer unless --tokenizer says otherwise."""
    from clo.model.sources import DEFAULT_MODEL, resolve_model

    if model.startswith("random:"):
        if model.removeprefix("random:") not in RANDOM_SHAPES:
            raise CloError(f"--model: unknown shape {model!r}; shapes: {', '.join(RANDOM_SHAPES)}")
        return model, str(resolve_model(tokenizer or DEFAULT_MODEL))
    folder = str(resolve_model(model))
    return folder, str(resolve_model(tokenizer)) if tokenizer else folder


def model_name(model: str) -> str:
    """How a title names the model: `random:<shape>` as it is, a folder by its last part."""
    return model if model.startswith("random:") else Path(model).name


def model_config(spec: dict) -> dict:
    """The HF config.json dict of the benchmarked model."""
    if spec["model"].startswith("random:"):
        return dict(RANDOM_SHAPES[spec["model"].removeprefix("random:")])
    return json.loads((Path(spec["model"]) / "config.json").read_text())


def random_init_(named_params, seed: int = 0) -> None:
    """Fill parameters, named by their HF checkpoint keys, with N(0, 0.02) (norms: 1), one generator per name.

    Both sides call this with the same names, so both hold the same weights without any file.
    """
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            g = torch.Generator(p.device).manual_seed(seed + zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(0.02))


def clo_model(spec: dict, device: torch.device, dtype: torch.dtype | None):
    """clo's Transformer: loaded from the HF folder, or random in the shape of `random:<name>`."""
    from clo.model.hf_folder import hf_key, load_model
    from clo.runtime import default_dtype

    if not spec["model"].startswith("random:"):
        return load_model(Path(spec["model"]), device, dtype)
    from clo.model.config import ModelConfig
    from clo.model.decoder import Transformer, rope_inv_freq

    cfg = ModelConfig.from_hf(model_config(spec), source=spec["model"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default_dtype(device))
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    random_init_((hf_key(n), p) for n, p in model.named_parameters())
    return model.eval()


def hf_model(spec: dict, device: torch.device, dtype: torch.dtype):
    """The transformers model with the same weights as `clo_model` (SDPA attention)."""
    import transformers

    if not spec["model"].startswith("random:"):
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
        return model.to(device)
    config = transformers.LlamaConfig(**model_config(spec))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    random_init_(model.named_parameters())
    return model


def quiet_transformers() -> None:
    """transformers without its progress bars and warnings: stdout and stderr are the benchmark's."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# --- results -----------------------------------------------------------------------------------


def write_results(path: str | Path | None, default_name: str, payload: dict) -> Path:
    """Write `payload` as indented JSON to `path` (default runs/bench/<default_name>.json), all or nothing."""
    out = Path(path or REPO / "runs" / "bench" / f"{default_name}.json")
    write_atomic(out, json.dumps(payload, indent=2, default=str))
    print(f"\nresults: {out}", file=sys.stderr)
    return out
