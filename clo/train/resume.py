"""Training checkpoints: everything `--resume` needs to continue exactly where a run stopped.

`<out>/checkpoint.pt`, written atomically (clo/atomic.py), holds the weights that have trained so
far (or the LoRA adapters), the optimizer state, the RNG states, the position in the data (stage,
epoch, next batch), the global step, and the settings of the run (every flag that changes what it
computes, the starting model's identity, a hash of the data's token ids). The learning-rate
schedule is a pure function of the step, so it needs no state of its own.

Under torchrun with N processes the weights and optimizer state are sharded, and so is the
checkpoint: process r writes its own part to `<out>/checkpoint-shards/step-S/rank-r-of-N.pt`
(`save_shard`), and then checkpoint.pt, written last, names that folder (`"shards"`) in place of
the tensors. Until it is replaced the previous checkpoint.pt names the previous, complete folder,
so a save killed at any point loses nothing.

The file holds only tensors and plain Python values, so it is read with `torch.load(...,
weights_only=True)`: a run folder is something people download and share, and a pickle that could
run code on `--resume` is refused instead of executed.
"""

import random
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from clo.atomic import atomic_file
from clo.errors import CloError
from clo.train.schedule import Position


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values (weights_only-loadable)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


SHARDS = "checkpoint-shards"  # the run folder's subfolder of sharded checkpoints, one step-S/ each
SHARD_FOLDER = re.compile(re.escape(SHARDS) + r"/step-\d{8}")


def shard_folder(step: int) -> str:
    """Where the N processes' parts of the checkpoint at `step` go, relative to the run folder."""
    return f"{SHARDS}/step-{step:08d}"


def shard_name(rank: int, processes: int) -> str:
    return f"rank-{rank:05d}-of-{processes:05d}.pt"


def save_checkpoint(path: Path, *, weights: dict | None, optimizer: dict | None, position: Position, settings: dict, rng=None,
                    shards: dict | None = None) -> None:
    """optimizer: its state dict; rng: the RNG states (default: this process's; a list, one per process, with N);
    shards: {"folder": shard_folder(step), "processes": N} when the tensors are in the shard files instead."""
    payload = {
        "weights": None if weights is None else {k: v.detach().cpu() for k, v in weights.items()},
        "optimizer": optimizer,
        "position": asdict(position),
        "rng": rng_state() if rng is None else rng,
        "settings": settings,
        "shards": shards,
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def save_shard(path: Path, *, weights: dict, optimizer: dict) -> None:
    """One process's part of a sharded checkpoint: its shards of the trained weights and of the optimizer state."""
    with atomic_file(path) as tmp:
        torch.save({"weights": weights, "optimizer": optimizer}, tmp)


def _load(path: Path, what: str) -> dict:
    try:
        # mmap: tensors are read from the page cache as they are used, one copy shared by every process
        # of the machine; pages are private, so nothing written to a tensor ever reaches the file
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CloError(f"{path}: cannot read {what} (not written by this version of train.py, or unsafe): {first[:200]}") from None


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, loaded without running any pickled code (one-line error if unreadable)."""
    if not path.is_file():
        raise CloError(f"--resume: no checkpoint at {path}")
    ckpt = _load(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"weights", "optimizer", "position", "rng", "settings", "shards"} <= set(ckpt):
        raise CloError(f"{path}: not a train.py checkpoint (fields missing)")
    return ckpt


def read_shard(run_dir: Path, shards: dict, rank: int, processes: int) -> dict:
    """This process's part of a sharded checkpoint, {"weights", "optimizer"}, as `save_shard` wrote it."""
    folder = shards.get("folder") if isinstance(shards, dict) else None
    if not isinstance(folder, str) or not SHARD_FOLDER.fullmatch(folder) or shards.get("processes") != processes:
        raise CloError(f"{run_dir / 'checkpoint.pt'}: field 'shards' is not {processes} processes' parts of a checkpoint: {shards!r:.200}")
    path = run_dir / folder / shard_name(rank, processes)
    if not path.is_file():
        raise CloError(f"{path}: missing (checkpoint.pt names it; the run folder is incomplete)")
    part = _load(path, "checkpoint part")
    if not isinstance(part, dict) or set(part) != {"weights", "optimizer"}:
        raise CloError(f"{path}: not a part of a train.py checkpoint (fields missing)")
    return part


def check_settings(path: Path, saved: dict, current: dict, names: dict) -> None:
    """Refuse to resume when any setting that changes the computation differs; `names` maps keys to flags."""
    for key, value in current.items():
        old = saved.get(key)
        if old != value:
            flag = names.get(key, key)
            raise CloError(f"{path}: the run was made with {flag} {old!r}, this one has {value!r}; use the same settings or a new --out")
    extra = sorted(set(saved) - set(current))
    if extra:
        raise CloError(f"{path}: the run was made with {names.get(extra[0], extra[0])} {saved[extra[0]]!r}, which this run does not set")


def resume_from(path: Path, ckpt: dict, settings: dict, names: dict | None = None) -> dict:
    """A checkpoint read by `read_checkpoint`, checked to belong to these settings (model and data identity included)."""
    check_settings(path, ckpt["settings"], settings, names or {})
    ckpt["position"] = Position(**ckpt["position"])
    return ckpt
