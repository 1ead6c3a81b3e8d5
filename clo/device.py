"""`--device`, checked before any work: a typo or a missing GPU is one line, not a traceback later."""

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
