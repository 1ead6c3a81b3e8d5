"""One run per output (clo/lock.py): a second process is refused at once with the holder's pid, a
killed holder leaves nothing stuck, and a run leaves no lock file or folder behind."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clo.errors import CloError
from clo.lock import lock_path, output_lock

REPO = Path(__file__).resolve().parents[1]
# A holder process: takes the lock, says so, and waits until killed (or until stdin closes).
HOLDER = "import sys; from clo.lock import output_lock\nwith output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n"


def start_holder(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_second_process_is_refused_and_a_killed_holder_frees_the_output(tmp_path):
    out = tmp_path / "sw.jsonl"
    holder = start_holder(out)
    try:
        with pytest.raises(CloError, match=rf"^{out} is in use by another run \(pid {holder.pid}\)$"):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.wait()
    assert lock_path(out).exists()  # a killed holder leaves its (unlocked) file; the next run reuses it
    with output_lock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
    assert not lock_path(out).exists()


def test_a_finished_holder_frees_the_output(tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out)
    holder.stdin.close()  # the holder leaves its with block and exits normally
    assert holder.wait() == 0
    assert list(tmp_path.iterdir()) == []
    with output_lock(out):
        pass


def test_same_process_twice_is_refused_and_lock_file_is_beside_the_output(tmp_path):
    out = tmp_path / "runs" / "clo-sw"  # a folder output that does not exist yet
    with output_lock(out):
        assert lock_path(out) == tmp_path / "runs" / ".clo-sw.lock" and lock_path(out).is_file()
        with pytest.raises(CloError, match="is in use by another run"):
            with output_lock(out):
                pass
        out.mkdir()  # the run writes its output
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["clo-sw"]


def test_parents_made_for_the_lock_are_removed_when_nothing_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "a" / "b" / "out.jsonl"):
            raise RuntimeError("the run failed before writing")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CloError, match=r"file.txt/out.jsonl: cannot create the folder"):
        (tmp_path / "file.txt").write_text("x")
        with output_lock(tmp_path / "file.txt" / "out.jsonl" / "x"):
            pass


def test_every_name_of_one_output_shares_its_lock(tmp_path, monkeypatch):
    """A link to the output, `.` for the current folder, or a path through `..`: the same output, the same lock."""
    real = tmp_path / "runs" / "clo-sw"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(real)
    with output_lock(real):
        for other in (tmp_path / "link", Path("."), real / ".." / "clo-sw"):
            with pytest.raises(CloError, match="in use by another run"):
                with output_lock(other):
                    pass
    assert lock_path(Path(".")) == lock_path(tmp_path / "link") == tmp_path.resolve() / "runs" / ".clo-sw.lock"
