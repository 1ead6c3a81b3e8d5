"""The frozen reference model's log-probs, computed once before training and cached on disk.

DPO-style losses compare the policy with the starting model π_ref. Instead of keeping a second model
in memory and running it every step (TRL's default), we run the starting model once over every
sequence, with no grad, and keep log π_ref(y|x) as an [N, 4] float32 table, N examples by the four
sequences of clo/train/batching.py. The file is keyed by a hash of the weights' content, the precision, the
batching and the exact token ids, so any change to model, data or tokenization settings computes a
new table. A table is cached only when every row was computed and is finite.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from clo.atomic import atomic_file, write_atomic
from clo.errors import CloError
from clo.model.hf_folder import weight_files
from clo.train.batching import EncodedExample
from clo.train.distributed import is_sharded
from clo.train.scoring import Batching, example_logps
from clo.world import World


def model_fingerprint(folder: Path, memo: Path | None = None) -> str:
    """Identity of a checkpoint folder by content: config.json and the SHA-256 of every weight file.

    Hashing reads the weights once: SHA-256 ran at 1.1 GB/s on a 2-core AMD EPYC (SmolLM2's 538 MB in
    0.49 s, page cache warm), so ~12 s for a 7B model in bf16 plus its read from disk. The digest of
    each file is remembered in `memo` (a JSON file) under the file's path, size, mtime, ctime and
    inode: a file rewritten in place or copied with its mtime restored (cp -p, rsync -a, tar) always
    gets a new ctime, which no user tool can set back, so it is hashed again.
    """
    parts = [(folder / "config.json").read_text()]
    known = _read_memo(memo)
    for f in weight_files(folder):
        st = f.stat()
        stamp = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
        if stamp not in known:
            known[stamp] = file_sha256(f)
        parts.append(f"{f.name}:{known[stamp]}")
    if memo is not None:
        _write_memo(memo, known)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def file_sha256(path: Path, block: int = 2**24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _read_memo(memo: Path | None) -> dict:
    try:
        known = json.loads(memo.read_text()) if memo is not None else {}
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: only costs a rehash


def _write_memo(memo: Path, known: dict) -> None:
    write_atomic(memo, json.dumps(dict(list(known.items())[-256:])))  # the newest 256 files


def cache_key(model_id: str, precision: str, examples: list[EncodedExample], batching: str = "") -> str:
    """Hash of the model, the numeric precision (weights dtype / autocast dtype), the batching
    (batch size and length bucket decide the padded shapes, hence the float rounding) and every token id."""
    return hashlib.sha256(f"{model_id}|{precision}|{batching}|{data_digest(examples)}".encode()).hexdigest()[:24]


def data_digest(examples: list[EncodedExample]) -> str:
    """Hash of every example's token ids in order: what a run trains on, whatever file it came from."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.sequences).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_reference_logps(model, examples: list[EncodedExample], batching: Batching, batch_size: int, autocast_dtype=None,
                            world: World = World()) -> torch.Tensor:
    """log π_ref for every sequence: [N, 4] float32, row i = example i, columns in SEQUENCE_NAMES order.

    `batch_size` examples at a time, shortest first, scored as training scores them (`batching`)."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.autocast(device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = example_logps(model, examples, batching, batch_size, desc="reference log-probs", world=world)
    if is_sharded(model):
        model.reshard()  # FSDP keeps the root gathered after a forward; training must gather it again, with gradients
    model.train(was_training)
    bad = (~torch.isfinite(out)).any(1).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise CloError(f"reference log-probs of example {examples[i].id!r} are not finite ({out[i].tolist()}): the starting model gives inf/NaN")
    return out


def cached_reference_logps(cache_dir: Path, key: str, compute, rows: int, recompute: bool = False,
                           world: World = World()) -> tuple[torch.Tensor, bool]:
    """The [rows, 4] table for `key` from `cache_dir`, or `compute()` it and save it atomically. -> (table, hit).

    A cached file that is unreadable, of the wrong shape or not finite is computed again and replaced
    (with a warning naming it), as is any file when `recompute`. With N processes, process 0 reads
    and writes the file and hands the table to the others; all of them compute it together.
    """
    path = Path(cache_dir) / f"ref-{key}.pt"
    table = read_cached(path, rows) if world.main and not recompute else None
    table = world.broadcast_object(table)
    if table is not None:
        return table, True
    table = compute()
    if table.shape != (rows, 4) or not torch.isfinite(table).all():
        raise CloError(f"reference log-probs: expected a finite [{rows}, 4] table, got {list(table.shape)}")  # never cached
    if world.main:
        with atomic_file(path) as tmp:
            torch.save(table, tmp)
    world.barrier()
    return table, False


def read_cached(path: Path, rows: int) -> torch.Tensor | None:
    """The cached table at `path`, or None if there is none or it is damaged (with a warning)."""
    if not path.is_file():
        return None
    try:
        table = torch.load(path, weights_only=True)
        if isinstance(table, torch.Tensor) and table.shape == (rows, 4) and torch.isfinite(table).all():
            return table
        problem = "wrong shape or values"
    except Exception as e:
        problem = type(e).__name__
    print(f"warning: {path}: damaged reference cache ({problem}); computing it again", file=sys.stderr)
    return None
