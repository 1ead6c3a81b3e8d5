"""translate.py under torchrun on CPU (gloo, 2 processes, the tiny random M2M100 of test_translate.py).

The oracle is a plain one-process run of the same command: the 2-process --out is the same file
byte for byte. Five examples of six distinct sentences, chunks of 4 sentences: five chunks of one
example each, so three rounds, the last one partial; beam search (3 beams). A process that dies
(the one that writes --out or another) ends the job within bounded time, --out keeps the whole rounds
written before, and the same command completes it into the uninterrupted file.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import test_translate
from test_translate import mt_args

import translate
from clo.translate.segment import segment
from clo.translate.sft_sources import read_sft_source, sample_examples

REPO = Path(__file__).resolve().parents[1]
mt_setup = test_translate.mt_setup  # the fixture: a source and a tiny M2M100, made once per module
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # each torchrun: ~5-10 s on 2 cores
DISTRIBUTED = ("--num-examples", "5", "--batch-size", "2", "--chunk-batches", "2", "--beams", "3", "--device", "cpu")
BATCHES_PER_GROUP = 3  # six distinct sentences per example, two per batch


def args(setup, out: Path) -> list[str]:
    return mt_args(setup, out, *DISTRIBUTED)


def torchrun(argv: list[str], script: Path = REPO / "translate.py", timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the oracle's one thread
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def reference(mt_setup, tmp_path_factory) -> bytes:
    """The one-process --out."""
    out = tmp_path_factory.mktemp("one") / "sw.jsonl"
    translate.main(args(mt_setup, out))
    return out.read_bytes()


def test_two_processes_write_the_one_process_file(mt_setup, reference, tmp_path):
    _, source, _ = mt_setup
    examples = sample_examples(read_sft_source(source).examples, 5, 0)
    # every example has at least a chunk's 4 distinct sentences: five chunks, rounds of 2, 2 and 1
    assert len(examples) == 5 and all(len(set(segment(e.prompt).pieces + segment(e.response).pieces)) >= 2 * 2 for e in examples)
    out = tmp_path / "sw.jsonl"
    done = torchrun(args(mt_setup, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert reference.count(b"\n") == 5
    assert out.read_bytes() == reference
    assert "translating 5 (30 sentences)" in done.stderr and "on 2 processes (cpu)" in done.stderr
    assert done.stderr.count("wrote 5 records") == 1  # process 0 alone reports


def dying_worker(tmp_path: Path, rank: int, at_call: int) -> Path:
    """A translate.py stand-in whose process `rank` dies (os._exit, no cleanup) at its at_call-th model batch."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import translate
        from clo.errors import run_cli
        from clo.translate.translator import Translator
        if os.environ["RANK"] == "{rank}":
            real, calls = Translator.translate_batch, []
            def translate_batch(self, batch):
                calls.append(1)
                if len(calls) == {at_call}:
                    os._exit(1)
                return real(self, batch)
            Translator.translate_batch = translate_batch
        run_cli(lambda: translate.main(sys.argv[1:]))
    """))
    return script


@pytest.mark.parametrize("rank", [0, 1])  # 0 writes --out; 1 only computes
def test_a_dying_process_loses_one_round_and_the_rerun_completes_the_file(mt_setup, reference, tmp_path, rank):
    out = tmp_path / "sw.jsonl"
    start = time.monotonic()
    # the process dies at the last batch of its second group (round 2): round 1 is in --out, round 2 lost
    died = torchrun(args(mt_setup, out), dying_worker(tmp_path, rank, 2 * BATCHES_PER_GROUP))
    assert died.returncode != 0
    assert time.monotonic() - start < 120
    partial = out.read_bytes()
    assert partial == b"".join(reference.splitlines(keepends=True)[:2])  # round 1's two records, whole, in order

    rerun = torchrun(args(mt_setup, out))  # the same command again
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "2 of 5 examples already in" in rerun.stderr
    assert out.read_bytes() == reference


def test_a_foreign_out_is_refused_in_one_line(mt_setup, tmp_path):
    out = tmp_path / "other_lang.jsonl"
    out.write_text('{"id": "a", "lang": "yo"}\n')
    before = out.read_bytes()
    start = time.monotonic()
    done = torchrun(args(mt_setup, out), timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out}:1: field 'lang' is 'yo', not 'sw'; choose another --out"]
    assert out.read_bytes() == before
