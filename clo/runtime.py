"""Where and how a script computes: the device, the default dtype, whether bf16 is fast, compile.

One resolver for train.py, eval.py, translate.py and clo.model.generate, so "auto" means the same in
each: `--device auto` is CUDA if available; `--compile auto` and bf16 compute are on for CUDA (and
bf16 for CPUs with AMX or AVX512_BF16). The training precision policy built on this is clo/train/precision.py.
"""

import torch

from clo.errors import CloError


def resolve_device(spec: str) -> torch.device:
    """The device `--device spec` names: "auto" (CUDA if available, else CPU), "cpu", "cuda" or
    "cuda:N"; CloError if it is not one of those or not on this machine."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CloError(f"--device {spec!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CloError(f"--device {spec!r}: not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CloError(f"--device {spec!r}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CloError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (exact comparisons and generation default to full precision on CPU)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def bf16_is_fast(device: torch.device | str) -> bool:
    """True on CUDA and on CPUs with bf16 matmul instructions (BENCHMARKS.md, bench/bench_matmul.py):
    AMX tiles (Intel Xeon, 4th generation on: bf16 matmuls ~8x fp32) or AVX512_BF16 (AMD EPYC Zen 4
    on, Intel Cooper Lake: 2.3x fp32, a whole CLO step 1.5x). Without either (AVX2 only) bf16 matmuls
    are emulated and 3-10x slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return amx_tiles() or cpu_supports("_is_avx512_bf16_supported")


def amx_tiles() -> bool:
    """True on CPUs with AMX tiles, whose bf16 matmul kernels (oneDNN's, and the CPU flash attention's
    blocks) use them; False elsewhere, where the CPU flash attention is faster in fp32 (clo/model/gathered_attention.py)."""
    return cpu_supports("_is_amx_tile_supported")


def cpu_supports(check: str) -> bool:
    found = getattr(torch.cpu, check, None)  # private, so guarded
    return found is not None and bool(found())


def on_for_cuda(flag: str, device: torch.device | str) -> bool:
    """An on/off/auto flag where auto means: on for CUDA (the --compile flags of train, eval and generate)."""
    return flag == "on" or (flag == "auto" and torch.device(device).type == "cuda")


def compile_blocks(model) -> None:
    """torch.compile each decoder block in place, once (static shapes: one graph per bucketed length).

    Regional compilation: the blocks share their code, so one graph serves all of them and it builds
    in seconds; compiling `model.hidden` whole unrolls every layer (SmolLM2, CPU, cold caches: 100 s vs
    28 s to the first step, the same step time after: bench/bench_compile.py). Embedding, RoPE tables
    and the final norm stay eager, and so do the per-sequence attention calls of packed rows
    (`attend_gathered`): each block then runs as two graphs around them.
    """
    torch._dynamo.config.recompile_limit = 64  # one graph per (batch, bucketed length): more than dynamo's default 8
    for layer in model.layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=False)
