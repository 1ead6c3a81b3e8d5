"""The frozen reference model's log-probs, computed once before training and cached on disk.

DPO-style losses compare the policy with the starting model π_ref. Instead of keeping a second model
in memory and running it every step (TRL's default), we run the starting model once over every
sequence, with no grad, and keep log π_ref(y|x) as an [N, 4] float32 table, N examples by the four
sequences of clo/batching.py. The file is keyed by a hash of the model's identity, the dtype and the
exact token ids, so any change to model, data or tokenization settings computes a new table.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from clo.batching import EncodedExample, collate
from clo.loss import response_logps


def model_fingerprint(folder: Path) -> str:
    """Identity of a checkpoint folder: its config and the names, sizes and times of its weight files."""
    parts = [(folder / "config.json").read_text()]
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_key(model_id: str, precision: str, examples: list[EncodedExample]) -> str:
    """Hash of the model, the numeric precision (weights dtype / autocast dtype) and every token id."""
    h = hashlib.sha256(f"{model_id}|{precision}".encode())
    for ex in examples:
        h.update(json.dumps(ex.sequences).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_reference_logps(
    model, examples: list[EncodedExample], pad_id: int, batch_size: int, bucket: int, autocast_dtype=None
) -> torch.Tensor:
    """log π_ref for every sequence: [N, 4] float32, row i = example i, columns in SEQUENCE_NAMES order."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    out = torch.empty(len(examples), 4)
    # shortest first: less padding, and a bar that speeds up is better than one that slows down
    order = sorted(range(len(examples)), key=lambda i: examples[i].longest)
    for start in tqdm(range(0, len(order), batch_size), desc="reference log-probs", unit="batch"):
        idx = order[start : start + batch_size]
        tokens, labels = collate([examples[i] for i in idx], pad_id, bucket)
        with torch.autocast(device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            hidden = model.hidden(tokens.to(device))
        head = model.lm_head.weight
        logps, _ = response_logps(hidden.to(head.dtype), head, labels.to(device))
        out[idx] = logps.float().cpu().view(4, len(idx)).T
    model.train(was_training)
    return out


def cached_reference_logps(cache_dir: Path, key: str, compute) -> tuple[torch.Tensor, bool]:
    """Load the table for `key` from `cache_dir`, or `compute()` and save it atomically. Returns (table, hit)."""
    path = Path(cache_dir) / f"ref-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True), True
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(table, tmp)
    os.replace(tmp, path)
    return table, False
