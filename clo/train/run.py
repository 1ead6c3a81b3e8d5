"""The mechanics of one training run, apart from the method: its folder, lock, resume, logs, Ctrl-C.

    <out>/run.json        the flags and what they resolved to, plus a summary at the end
    <out>/metrics.jsonl   one JSON line per optimizer step
    <out>/checkpoint.pt   resumable state (clo/train/resume.py), atomically replaced
    <out>/checkpoint-shards/step-S/rank-R-of-N.pt   its tensors, one file per process, under torchrun
    <out>/model/          the HF folder (and <out>/adapter/ with --lora), written by train.py

`Run` is a context manager: entering takes the folder's lock (one run per --out, taken first so
a second run stops at once) and removes what a killed save left; `steps()` opens the progress bar
and turns Ctrl-C / SIGTERM into a request read between steps (clo/train/interrupt.py).
"""

import json
import math
import shutil
import signal
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clo.atomic import leftovers, write_atomic
from clo.errors import CloError
from clo.jsonl import dumps_line, finite_or_null
from clo.lock import output_lock
from clo.train.distributed import local_weights, optimizer_state
from clo.train.interrupt import stop_requests
from clo.train.resume import (
    SHARD_FOLDER,
    SHARDS,
    read_checkpoint,
    read_shard,
    resume_from,
    rng_state,
    save_checkpoint,
    save_shard,
    set_rng_state,
    shard_folder,
    shard_name,
)
from clo.train.schedule import Position
from clo.world import World

RUN_FILES = ("run.json", "metrics.jsonl", "checkpoint.pt", SHARDS, "model", "adapter")


class Run:
    """One run's folder. resume: continue the run in it; overwrite: replace it (else a folder
    holding a run is refused, before any work)."""

    def __init__(self, out: Path, *, resume: bool = False, overwrite: bool = False, world: World = World(), locked: bool = False):
        self.out, self.resume, self.overwrite, self.world = Path(out), resume, overwrite, world
        self.locked = locked  # the caller holds the folder's lock already (sft-dpo, for both its phases)
        self.checkpoint_path, self.metrics_path = self.out / "checkpoint.pt", self.out / "metrics.jsonl"
        check_out(self.out, resume, overwrite)
        self._stack = ExitStack()
        self.bar, self.stop, self.stopped, self.diverged = None, None, False, False

    def __enter__(self) -> "Run":
        if self.world.main:  # process 0 writes every file, so it alone holds the lock
            if not self.locked:
                self._stack.enter_context(output_lock(self.out))
            removed = remove_leftovers(self.out)
            if removed:
                print(f"removed {len(removed)} temporary file(s) left in {self.out} by a killed run", file=sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def check_inputs(self, **inputs: Path) -> None:
        """With --overwrite, refuse inputs ({flag: path}) that the replaced run's files hold (--model <out>/model)."""
        if self.overwrite:
            for flag, path in inputs.items():
                check_kept(self.out, path, flag)

    def saved_checkpoint(self) -> dict | None:
        """The checkpoint to resume from (read safely), or None for a fresh run."""
        return read_checkpoint(self.checkpoint_path) if self.resume else None

    def check_resume(self, saved: dict | None, settings: dict, flag_names: dict) -> dict | None:
        """`saved`, if it was made with exactly `settings` (else a one-line error naming the flag), with
        this process's part of a sharded checkpoint read into its "weights" and "optimizer"."""
        if not saved:
            return None
        ckpt = resume_from(self.checkpoint_path, saved, settings, flag_names)  # the number of processes is a setting
        if ckpt["shards"] is not None:
            ckpt.update(read_shard(self.out, ckpt["shards"], self.world.rank, self.world.size))
        return ckpt

    def begin(self, ckpt: dict | None, info: dict) -> Position:
        """Start writing: on resume, restore the RNG and cut metrics back to the checkpoint's step;
        else clear the folder. Writes run.json. -> the position to start from."""
        if ckpt is not None:
            pos = ckpt["position"]
            rng = ckpt["rng"]
            set_rng_state(rng[self.world.rank] if isinstance(rng, list) else rng)  # nothing random happens before the next step
            if self.world.main:
                keep_metrics_until(self.metrics_path, pos.step)
                print(f"resuming from {self.checkpoint_path} at step {pos.step}", file=sys.stderr)
        else:
            pos = Position()
            if self.world.main:
                clear_run(self.out)  # only a run the user asked to --overwrite gets here with files in it
                self.out.mkdir(parents=True, exist_ok=True)
        if self.world.main:
            write_atomic(self.out / "run.json", json.dumps(info, indent=2))
        return pos

    @contextmanager
    def steps(self, total: int, initial: int, desc: str):
        """The training loop's span: a progress bar, and Ctrl-C / SIGTERM read between steps (`self.stop`)."""
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not self.world.main)
        try:
            with stop_requests() as self.stop:
                yield self
        finally:
            self.bar.close()

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (read between steps; every process stops at the same one)."""
        self.stopped = self.world.any(self.stop.requested)
        return self.stopped

    def record(self, row: dict) -> None:
        """One step's metrics: a line of metrics.jsonl (process 0) and the progress bar."""
        if self.world.main:
            with self.metrics_path.open("a") as f:
                f.write(dumps_line(row))  # standard JSON: a diverged step's NaN loss is null
            if not math.isfinite(row["loss"]) and not self.diverged:
                self.diverged = True
                self.bar.write(f"warning: step {row['step']}: the loss is {row['loss']}: the run diverged (a smaller --lr?)")
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{row['loss']:.3f}", **({"margin": f"{row['margin']:.3f}"} if "margin" in row else {}),
                              "tok/s": f"{row['tokens_per_s']:.0f}"})

    def save(self, model, trained: set[str], optimizer, position: Position, settings: dict) -> None:
        """The weights that trained so far and the optimizer state, resumable (every process takes part).
        One process: all in checkpoint.pt. N: each process writes its own shards to a file of
        checkpoint-shards/step-S/, then process 0 replaces checkpoint.pt, naming that folder, and
        removes the older folders (and any a killed save left half-written)."""
        weights, state = local_weights(model, trained), optimizer_state(model, optimizer)
        if self.world.size == 1:
            save_checkpoint(self.checkpoint_path, weights=weights, optimizer=state, position=position, settings=settings)
            return
        folder = shard_folder(position.step)
        save_shard(self.out / folder / shard_name(self.world.rank, self.world.size), weights=weights, optimizer=state)
        rng = self.world.gather_objects(rng_state())
        self.world.barrier()  # every part is on disk before checkpoint.pt names them
        if self.world.main:
            save_checkpoint(self.checkpoint_path, weights=None, optimizer=None, position=position, settings=settings, rng=rng,
                            shards={"folder": folder, "processes": self.world.size})
            for old in (self.out / SHARDS).iterdir():  # only the step folders saves made: never a link's target
                if old.name != Path(folder).name and SHARD_FOLDER.fullmatch(f"{SHARDS}/{old.name}") and not old.is_symlink():
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.world.barrier()

    def exit_if_stopped(self, step: int) -> None:
        """After the checkpoint is saved: a requested stop (one that came during the last step too) ends
        the process with 128 + the signal."""
        if self.stopped or (self.stop is not None and self.world.any(self.stop.requested)):
            if self.world.main:
                print(f"\ninterrupted: checkpoint saved to {self.checkpoint_path} at step {step}; continue with --resume", file=sys.stderr)
            sys.exit(128 + (self.stop.signum or signal.SIGTERM))

    def summarize(self, device: torch.device) -> None:
        """Median tokens/s, peak memory and first/last loss and margin, printed and added to run.json."""
        if not self.world.main:
            return
        rows = [json.loads(line) for line in self.metrics_path.read_text().split("\n") if line]
        if not rows:
            return
        summary = {
            "steps": len(rows),
            "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])),
            "peak_memory_gib": round(peak_memory_gib(device), 2),
            "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"],
        }
        if "margin" in rows[0]:
            summary.update(first_margin=rows[0]["margin"], last_margin=rows[-1]["margin"])
        run = json.loads((self.out / "run.json").read_text())
        write_atomic(self.out / "run.json", json.dumps(finite_or_null({**run, "summary": summary}), indent=2, allow_nan=False))
        print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()), file=sys.stderr)


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """--out must be a folder that holds no other run, unless the user resumes or overwrites it; --overwrite
    replaces only a run (a folder with run.json), never a folder that merely holds a `model/`, say."""
    if out.exists() and not out.is_dir():
        raise CloError(f"--out {out}: exists and is not a folder")
    links = [name for name in RUN_FILES if (out / name).is_symlink()]
    if links:  # a run replaces and prunes these: never through a link to elsewhere
        raise CloError(f"--out {out}: {links[0]} is a link; a run writes its own files there, not through a link")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not resume and not overwrite:
        raise CloError(f"--out {out}: holds a run ({held[0]}); --resume continues it, --overwrite replaces it, or choose another --out")
    if held and overwrite and not (out / "run.json").is_file():
        raise CloError(f"--out {out}: holds {held[0]} but no run.json, so not a train.py run: --overwrite replaces only a run; choose another --out")


def check_kept(out: Path, path: Path, flag: str) -> None:
    """An input (`flag` names it) must not lie in what --overwrite is about to delete: the run files of `out`."""
    inside = [name for name in RUN_FILES if (out / name).exists() and Path(path).resolve().is_relative_to((out / name).resolve())]
    if inside:
        raise CloError(f"{flag} {path}: inside {out / inside[0]}, which --overwrite would delete; copy it elsewhere or choose another --out")


def clear_run(out: Path) -> None:
    """Remove an earlier run's files from `out` (called only for a fresh run; --overwrite asked for it)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def remove_leftovers(out: Path) -> list[Path]:
    """Temporary files and folders a killed save left in `out` (`.checkpoint.pt.XXXX`, `.model.XXXX/`,
    `checkpoint-shards/step-S/.rank-R-of-N.pt.XXXX`, ...);
    called with the folder locked, so no other run can be writing them."""
    found = [p for name in ("run.json", "checkpoint.pt", "metrics.jsonl", "model", "adapter") for p in leftovers(out / name)]
    found += [p for step in sorted((out / SHARDS).glob("step-*")) for p in sorted(step.glob(".rank-*"))]  # a process's part, torn
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint's step (they will be written again), and a last line
    torn by a kill; any other line that is not a metrics row is a one-line error."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    kept = []
    for number, line in enumerate(lines[:-1], 1):  # after the last newline: empty, or a line torn mid-write
        try:
            at = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            raise CloError(f"{path}:{number}: not a metrics line (field 'step' missing or invalid JSON)") from None
        if at <= step:
            kept.append(line)
    write_atomic(path, "".join(r + "\n" for r in kept))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
