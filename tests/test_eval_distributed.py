"""eval.py under torchrun (gloo, 2 CPU processes, fp32): the same files as one process, byte for byte.

The processes take in turn the batches one process forms (prompts, held-out pairs, questions,
judge prompts), so each batch computes exactly as in one process and the merged outputs are equal,
settings included (the number of processes is not recorded: it changes no number). The sizes below
give every step an odd number of batches, so one process gets one batch fewer. A bad input, or a
failure on process 0 alone, ends the job at once, each process saying why in one line, and
nothing is written.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_chat_model import make_tiny_chat_model

import eval as eval_script
from clo.lock import output_lock
from clo.pairs import demo_path, load_pairs

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # 3 torchrun starts: ~50 s on 2 busy cores
# --limit 9 at --batch-size 4: 18 prompts -> 5 batches, 9 held-out pairs -> 3, 9 questions -> 3, 36 judge prompts -> 9
LIMIT, BATCH = 9, 4
MC_ROWS = [(f"Swali {k}: {k} + {k}?", str(2 * k), str(k), str(k + 1), "0", "ABCD"[k % 4]) for k in range(LIMIT)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny ChatML checkpoints (different seeds) and an MMLU-format CSV. Weights drawn 10x wider
    than HF's default, so that answers differ from prompt to prompt (at 0.02 every answer is the same
    newlines, and a merge in the wrong order would go unseen)."""
    examples = load_pairs(demo_path("sw")).examples
    texts = [t for ex in examples for t in (ex.prompt_en, ex.response_en, ex.prompt, ex.response)]
    root = tmp_path_factory.mktemp("tiny")
    csv_path = root / "misc_test.csv"
    csv_path.write_text("".join(",".join(row) + "\n" for row in MC_ROWS), encoding="utf-8")
    base = make_tiny_chat_model(root / "base", texts, initializer_range=0.2)
    return base, make_tiny_chat_model(root / "clo-sw" / "model", texts, seed=1, initializer_range=0.2), csv_path


def argv(tiny, out: Path, *extra: str) -> list[str]:
    base, clo, csv_path = tiny
    return ["--lang", "sw", "--models", str(base), str(clo), "--heldout", str(demo_path("sw", heldout=True)), "--mmlu", str(csv_path),
            "--limit", str(LIMIT), "--batch-size", str(BATCH), "--max-new-tokens", "5", "--judge", str(base), "--judge-language-check", "judge",
            "--device", "cpu", "--dtype", "float32", "--compile", "off", "--out", str(out), *extra]  # fmt: skip


def torchrun(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(REPO / "eval.py"), *args]
    return subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_write_what_one_writes(tiny, tmp_path):
    """Generations, held-out preference, multiple choice and judging split over 2 processes: every
    file equals the 1-process run's (the same --out, so the recorded settings match too)."""
    out = tmp_path / "eval"
    eval_script.main(argv(tiny, out))
    one = files(out)
    out.rename(tmp_path / "one")

    done = torchrun(argv(tiny, out))
    assert done.returncode == 0, done.stderr[-3000:]
    two = files(out)
    assert sorted(two) == sorted(one)
    assert {"generations.jsonl", "heldout.jsonl", "metrics.jsonl", "metrics.json", "judgments.jsonl", "report.md", "alpaca_eval/base.json"} <= set(one)
    assert [name for name in one if one[name] != two[name]] == []
    answers = [json.loads(line)["answer"] for line in one["generations.jsonl"].decode().splitlines()]
    assert len(set(answers)) > len(answers) // 2  # prompts get different answers: the order of the merge shows
    assert done.stderr.count("eval: wrote") == 1  # process 0 alone writes and reports


def test_bad_input_ends_every_process_with_one_line(tiny, tmp_path):
    """A missing prompt file: every process finds it before any model runs and stops with one line."""
    out = tmp_path / "eval"
    start = time.monotonic()
    done = torchrun(argv(tiny, out, "--prompts", str(tmp_path / "missing.jsonl")), timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(line.endswith("missing.jsonl: no such file") for line in errors)
    assert 'eval.py", line' not in done.stderr  # no traceback of ours
    assert time.monotonic() - start < 90
    assert not out.exists()


def test_a_failure_on_process_0_alone_ends_the_job(tiny, tmp_path):
    """--out in use by another run: process 0 stops at the lock while process 1, which takes none,
    has begun; torchrun stops it, and nothing waits for a collective that never comes."""
    out = tmp_path / "eval"
    start = time.monotonic()
    with output_lock(out):
        done = torchrun(argv(tiny, out), timeout=120)
    assert done.returncode != 0
    assert "is in use by another run" in done.stderr
    assert time.monotonic() - start < 90
    assert not out.exists()
