"""The precision policy of training, in one place.

Three rules, from load to save:

1. Frozen weights are held in `Precision.frozen`: fp32 on CPU, bf16 on CUDA (`--dtype auto`).
   Compute runs under bf16 autocast where bf16 is fast (`Precision.autocast`: CUDA, CPUs with AMX or AVX512_BF16,
   `--amp on`), in fp32 otherwise. fp32 frozen weights keep the residual stream and the head in
   fp32 while the matmuls inside the blocks still run in bf16: in the default job the step-1
   rewards (policy vs cached reference, equal weights) stay within ±0.0031, against ±0.047 with
   `--dtype bfloat16`, which trades that for ~0.45 GiB less memory (BENCHMARKS.md). bf16 frozen
   weights need bf16 autocast: without it a bf16 activation would meet an fp32 master weight, so
   `--dtype bfloat16 --amp off` is refused (`check_precision_flags`).
2. What trains gets an fp32 master copy when its stage begins (`master_copies`): bf16 compute comes
   from autocast, updates accumulate in fp32, and the AdamW moments are fp32.
3. The checkpoint file is the master copy of every weight that does not train (`restore_originals`):
   before a stage starts training a weight, before a LoRA merge and before saving, a weight held
   narrower than the file gets the file's value back, and the model folder is saved in the file's
   own dtype (`checkpoint_dtype`). Untrained weights are saved bit for bit as they were loaded.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from clo.errors import CloError
from clo.model.hf_folder import hf_key, stored_weights, weight_files
from clo.runtime import bf16_is_fast

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Precision:
    frozen: torch.dtype  # what frozen weights are held in
    autocast: torch.dtype | None  # bf16 compute, or None for fp32
    # N processes on CUDA: FSDP2 casts every gathered weight (norms too) and each block's input to this dtype
    # for compute (clo/train/distributed.py), which autocast alone does not: other numbers than one process's
    gathered: torch.dtype | None = None

    def __str__(self) -> str:  # part of the reference cache key and of a checkpoint's settings
        return f"{self.frozen}/{self.autocast}" + (f"/gathered {self.gathered}" if self.gathered else "")

    def compute(self, device: torch.device):
        """The autocast context every forward pass of training runs in."""
        return torch.autocast(device.type, self.autocast or torch.float32, enabled=self.autocast is not None)


def check_precision_flags(dtype: str, amp: str) -> None:
    if dtype == "bfloat16" and amp == "off":
        raise CloError("--dtype bfloat16 with --amp off: frozen bf16 weights meet the fp32 master copies only under "
                       "bf16 autocast; use --amp on (bf16 compute) or --dtype float32 (fp32 compute)")


def training_precision(device: torch.device, dtype: str = "auto", amp: str = "auto", sharded: bool = False) -> Precision:
    """The policy for `--dtype` (auto, bfloat16, float32) and `--amp` (auto, on, off) on `device`.
    sharded (N processes, FSDP2): every weight is held in fp32, whose shard is no larger than a whole
    bf16 copy from 2 processes on (clo/train/distributed.py)."""
    check_precision_flags(dtype, amp)
    if sharded and dtype == "bfloat16":
        raise CloError("--dtype bfloat16 under torchrun: sharded weights are held in fp32 (compute is bf16 under --amp); leave --dtype auto")
    if sharded:
        dtype = "float32"
    # frozen weights held in bf16 need bf16 compute: --dtype bfloat16 turns auto autocast on everywhere
    use_amp = amp == "on" or (amp == "auto" and (bf16_is_fast(device) or dtype == "bfloat16"))
    auto = torch.bfloat16 if device.type == "cuda" and use_amp else torch.float32
    frozen = {"auto": auto, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    gathered = torch.bfloat16 if sharded and use_amp and device.type == "cuda" else None
    return Precision(frozen, torch.bfloat16 if use_amp else None, gathered)


def master_copies(params) -> None:
    """Rule 2: the parameters a stage trains, in fp32 (in place)."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def restore_originals(model, folder: Path | str, names) -> list[str]:
    """Rule 3: give the parameters `names` back their checkpoint values and dtype wherever memory holds
    them narrower than the file. Returns the names restored (none when memory already holds the
    file's dtype, or a wider one)."""
    params = dict(model.named_parameters())  # tied weights appear once, under embed_tokens
    wanted = {hf_key(n): n for n in names if n in params}
    restored = []
    for path in weight_files(Path(folder)):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = wanted.get(key)
                if name is None:
                    continue
                p = params[name]
                stored = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                # exact in memory: the same dtype, or a wider float (bf16 and fp16 are both 16 bits, neither holds the other)
                if stored is None or stored == p.dtype or torch.finfo(p.dtype).bits > torch.finfo(stored).bits:
                    continue
                p.data = f.get_tensor(key).to(p.device)
                restored.append(name)
    return restored


def checkpoint_dtype(model, folder: Path | str) -> torch.dtype:
    """Rule 3: the dtype the starting checkpoint's weights are stored in, which the saved folder keeps: the
    files' own headers (config.json's `torch_dtype` may say bfloat16 over F32 files), or, where they mix
    float dtypes, config.json's word."""
    stored = {SAFETENSORS_DTYPES.get(dtype) for dtype, _ in stored_weights(folder).values()} - {None}
    if len(stored) == 1:
        return stored.pop()
    named = model.cfg.raw.get("torch_dtype") or model.cfg.raw.get("dtype") or "float32"
    return getattr(torch, named) if isinstance(getattr(torch, str(named), None), torch.dtype) else torch.float32
