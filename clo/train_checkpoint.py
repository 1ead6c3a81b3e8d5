"""Training checkpoints: everything `--resume` needs to continue exactly where a run stopped.

One file, `<out>/checkpoint.pt`, written atomically (temp file + os.replace), holding the weights
that have trained so far (or the LoRA adapters), the optimizer state, the RNG states, the position
in the data (stage, epoch, next batch), the global step, and the identity of the starting model.
The learning-rate schedule is a pure function of the step, so it needs no state of its own.
"""

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clo.errors import CloError


@dataclass
class Position:
    stage: int = 0
    epoch: int = 0  # within the stage
    batch: int = 0  # next micro-batch within the epoch
    step: int = 0  # optimizer steps done, over the whole run


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, weights: dict, optimizer, position: Position, model_id: str, settings: dict) -> None:
    payload = {
        "weights": {k: v.detach().cpu() for k, v in weights.items()},
        "optimizer": optimizer.state_dict(),
        "position": asdict(position),
        "rng": rng_state(),
        "model_id": model_id,
        "settings": settings,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model_id: str, settings: dict) -> dict:
    """Read a checkpoint and check it belongs to this model and these settings (one-line error if not)."""
    if not path.is_file():
        raise CloError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:
        raise CloError(f"{path}: cannot read checkpoint: {str(e).splitlines()[0]}") from None
    if ckpt.get("model_id") != model_id:
        raise CloError(f"{path}: checkpoint was made from a different model ({ckpt.get('model_id')} != {model_id})")
    for key, value in settings.items():
        if ckpt["settings"].get(key) != value:
            raise CloError(f"{path}: checkpoint has {key}={ckpt['settings'].get(key)!r}, this run has {value!r}")
    ckpt["position"] = Position(**ckpt["position"])
    return ckpt
