"""Outputs appear complete or not at all: write into a temporary sibling, then rename into place.

The one home of temp-file-then-`os.replace` in clo: `atomic_folder` (model and adapter folders),
`atomic_file` (anything a library writes to a path: torch.save, savefig), `write_atomic` (text or
bytes). Temporary names are `.<name>.<random>` beside the target, so the next run on a folder can
find and remove what a killed one left (`leftovers`).
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path | str):
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it a new file's mode
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, text: str | bytes) -> None:
    """Write `path` (UTF-8 for text) all or nothing."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)


def leftovers(path: Path | str) -> list[Path]:
    """Temporary files and folders that an interrupted atomic write of `path` left beside it."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*"))


@contextmanager
def atomic_folder(out_dir: Path | str):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on error it is removed.

    An existing `out_dir` is renamed away whole, then the new one renamed in, then the old removed: a kill
    leaves the old folder or the new one complete (between the two renames, the old one as a `.name.old-*`
    leftover), never a half-deleted folder that still holds a config.json and passes for finished."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an output folder gets a normal folder's mode
    try:
        yield tmp
        for f in tmp.rglob("*"):  # safetensors' save_file makes its files private (0600): give each a new file's mode
            if f.is_file():
                f.chmod(0o666 & ~_umask())
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None and not out_dir.exists():
                os.replace(old / out_dir.name, out_dir)  # the old folder back where it was
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
