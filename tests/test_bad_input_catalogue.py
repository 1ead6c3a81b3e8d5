"""Bad input never poisons, executes or destroys: a catalogue of bad inputs, one line each.

Every case runs one script on one bad input in a fresh folder `{dir}` holding the case's files, and
checks: exit status 2; stderr exactly one line, `error: ...`, containing the case's fragment; every
file in `{dir}` (and in the shared fixtures) byte for byte as before; no new file, lock files and
temporary files included. Cases run in-process (`main(argv)` under `run_cli`, as the scripts do),
which costs milliseconds; those marked `cli=True` run again as a real subprocess, proving that the
command line prints that one line and nothing else.

Adding a case is one `Case(...)` line in CASES:
    Case(id, script, argv, fragment, files={path in {dir}: text or bytes}, cli=False, held="")
argv is one string, split like a shell line after its `{name}`s are filled in (the fragment's too):
    {dir}      the case's own folder, holding `files`
    {m2m}      a tiny random M2M100 folder            {source}   an English SFT JSONL (3 examples)
    {en} {sw}  line-aligned English / Swahili files    {chat}     a tiny ChatML model folder
    {broken}   {chat}'s config with garbage weights      {pid}      this process (holding `held`)
    {pairs}    4 cross-lingual pairs (train.py --data)
`held` names an output that another run is writing: the test holds its lock (clo/lock.py) meanwhile.
MT, PARALLEL, EVAL and TRAIN are working command lines to start from: argparse keeps the last value of a
flag given twice, so `MT + " --batch-size 0"` is MT with one bad flag.
"""

import io
import json
import os
import shlex
import subprocess
import sys
from contextlib import nullcontext, redirect_stderr
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import pytest
from test_m2m100 import write_tiny_m2m100, write_tiny_tokenizer
from tiny_chat_model import demo_texts, make_tiny_chat_model

from clo.errors import run_cli
from clo.lock import output_lock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts import as modules from any working directory
SCRIPTS = {"translate.py": "translate", "eval.py": "eval", "train.py": "train"}  # script -> module with main(argv)

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    id: str
    script: str  # a key of SCRIPTS
    argv: str  # shell-split after formatting with the fixtures' names
    fragment: str  # must be in the error line (formatted the same way)
    files: dict = field(default_factory=dict)  # relative path in {dir} -> str or bytes, made before the run
    cli: bool = False  # also run as a subprocess
    held: str = ""  # an output locked by "another run" (this test) while the case runs; formatted too


def record(i: int, lang: str = "sw") -> str:
    """Line i of a translate.py output, as translate.py writes it."""
    return json.dumps({"id": f"ex{i}", "lang": lang, "prompt_en": f"Question {i}?", "response_en": "Yes.",
                       "prompt": f"Swali {i}?", "response": "Ndiyo."}, ensure_ascii=False) + "\n"


OURS = record(0) + record(1)  # a partial translate.py output for sw
TORN = '{"id": "ex2", "lang": "sw", "prompt_en": "Quest'  # the last line a crash tore
NOTES = "my notes\nthe last line has no newline"
LLAMA = '{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'
CSV_BAD = "Q?,a,b,c,d,A\nQ2?,a\n"

MT = "--source {source} --model {m2m} --lang sw --out {dir}/out.jsonl --batch-size 2"
PARALLEL = "parallel --src {en} --tgt {sw} --lang sw --out {dir}/out.jsonl"
EVAL = "--lang sw --models {chat} --limit 1 --max-new-tokens 2 --out {dir}/eval"
TRAIN = "--lang sw --model {chat} --data {pairs} --out {dir}/run --max-steps 1"
RUN = {"run/run.json": "{}", "run/metrics.jsonl": '{"step": 1}\n', "run/checkpoint.pt": b"\0"}  # a finished run
CASES = [
    # --- translate.py (mt): flags ---
    Case("mt-batch-size-0", "translate.py", MT + " --batch-size 0", "--batch-size must be at least 1, got 0"),
    Case("mt-beams-0", "translate.py", MT + " --beams 0", "--beams must be at least 1, got 0"),
    Case("mt-max-length-negative", "translate.py", MT + " --max-length -5", "--max-length must be at least 1, got -5"),
    Case("mt-max-chars-0", "translate.py", MT + " --max-chars 0", "--max-chars must be at least 1, got 0"),
    Case("mt-chunk-batches-0", "translate.py", MT + " --chunk-batches 0", "--chunk-batches must be at least 1, got 0"),
    Case("mt-n-negative", "translate.py", MT + " --n -1", "--n must be at least 1, got -1"),
    Case("mt-lang-unknown", "translate.py", MT + " --lang xx", "unknown language 'xx'"),
    Case("mt-lang-english", "translate.py", MT + " --lang en", "--lang en: English is the source side"),
    Case("mt-device-bogus", "translate.py", MT + " --device bogus", "--device 'bogus': not a device"),
    Case("mt-max-length-huge", "translate.py", MT + " --max-length 1000000000", "--max-length must be at most 4096, got 1000000000"),
    Case("mt-device-absent", "translate.py", MT + " --device cuda:99", "--device 'cuda:99': "),
    # --- translate.py (mt): inputs ---
    Case("mt-source-missing", "translate.py", MT + " --source {dir}/none.jsonl", "--source {dir}/none.jsonl: no such file"),
    Case("mt-source-folder", "translate.py", MT + " --source {dir}", "--source {dir}: is a folder, not a file"),
    Case("mt-source-no-response", "translate.py", MT + " --source {dir}/s.jsonl", "s.jsonl:1: field 'response' is missing", {"s.jsonl": '{"prompt": "hi"}\n'}),
    Case("mt-source-bad-json", "translate.py", MT + " --source {dir}/s.jsonl", "s.jsonl:2: invalid JSON", {"s.jsonl": '{"prompt": "a", "response": "b"}\n{"prompt":\n'}),
    Case("mt-source-field-twice", "translate.py", MT + " --source {dir}/s.jsonl", "s.jsonl:1: field 'response' appears twice",
         {"s.jsonl": '{"prompt": "a", "response": "b", "response": "c"}\n'}),
    Case("mt-source-alpaca-field-twice", "translate.py", MT + " --source {dir}/a.json --format alpaca", "a.json:3: record 2: field 'output' appears twice",
         {"a.json": '[{"instruction": "a", "input": "", "output": "b"},\n\n {"instruction": "c", "input": "", "output": "d", "output": "e"}]\n'}),
    Case("mt-source-nested-too-deep", "translate.py", MT + " --source {dir}/s.jsonl", "s.jsonl:1: invalid JSON: nested too deeply", {"s.jsonl": "[" * 100_000 + "\n"}),
    Case("mt-source-all-empty", "translate.py", MT + " --source {dir}/s.jsonl", "no usable examples", {"s.jsonl": '{"prompt": " ", "response": "b"}\n'}),
    Case("mt-source-wrong-format", "translate.py", MT + " --format alpaca", "invalid JSON: Extra data"),
    Case("mt-model-missing", "translate.py", MT + " --model {dir}/none", "--model {dir}/none: no such folder"),
    Case("mt-model-not-m2m100", "translate.py", MT + " --model {dir}/llama", "'model_type' is 'llama'", {"llama/config.json": LLAMA}),
    # --- translate.py (mt): an existing --out is refused before it is changed ---
    Case("mt-out-folder", "translate.py", MT + " --out {dir}/o", "--out {dir}/o: is a folder; give a file name", {"o/keep.txt": "x"}),
    Case("mt-out-under-a-file", "translate.py", MT + " --out {dir}/notes.txt/out.jsonl", "{dir}/notes.txt is a file, not a folder", {"notes.txt": NOTES}),
    Case("mt-out-unrelated-text", "translate.py", MT + " --out {dir}/notes.txt", "notes.txt:1: invalid JSON", {"notes.txt": NOTES}, cli=True),
    Case("mt-out-json-no-newline", "translate.py", MT + " --out {dir}/a.json", "a.json:1: field 'id' is missing", {"a.json": '{"a": 1}'}),
    Case("mt-out-other-language", "translate.py", MT + " --out {dir}/yo.jsonl", "field 'lang' is 'yo', not 'sw'", {"yo.jsonl": record(0, "yo") + TORN}),
    Case("mt-out-torn-bad-model", "translate.py", MT + " --model {dir}/llama", "'model_type' is 'llama'", {"out.jsonl": OURS + TORN, "llama/config.json": LLAMA}),
    Case("mt-out-torn-bad-device", "translate.py", MT + " --device bogus", "--device 'bogus'", {"out.jsonl": OURS + TORN}),
    Case("mt-out-duplicate-id", "translate.py", MT, "out.jsonl:3: duplicate id 'ex0'", {"out.jsonl": OURS + record(0) + TORN}),
    Case("mt-out-not-utf8", "translate.py", MT, "out.jsonl:2: not UTF-8 text", {"out.jsonl": OURS.encode()[:-1] + b"\xff\n" + TORN.encode()}),
    Case("mt-out-in-use", "translate.py", MT, "{dir}/out.jsonl is in use by another run (pid {pid})", {"out.jsonl": OURS}, held="{dir}/out.jsonl", cli=True),
    Case("mt-out-is-source", "translate.py", MT + " --source {dir}/s.jsonl --out {dir}/s.jsonl", "is the --source file", {"s.jsonl": '{"prompt": "a", "response": "b"}'}),
    # --- translate.py parallel ---
    Case("par-context-0", "translate.py", PARALLEL + " --context 0", "--context must be at least 1, got 0"),
    Case("par-src-missing", "translate.py", PARALLEL + " --src {dir}/none.txt", "--src {dir}/none.txt: no such file"),
    Case("par-doc-ids-missing", "translate.py", PARALLEL + " --doc-ids {dir}/none.tsv", "--doc-ids {dir}/none.tsv: no such file"),
    Case("par-misaligned", "translate.py", PARALLEL + " --tgt {dir}/short.txt", "1 lines, but", {"short.txt": "Moja.\n"}),
    Case("par-doc-ids-count", "translate.py", PARALLEL + " --doc-ids {dir}/ids.tsv", "document ids: 1 lines", {"ids.tsv": "a\n"}),
    Case("par-no-window", "translate.py", PARALLEL + " --src {dir}/e.txt --tgt {dir}/s.txt", "no window of 3 consecutive non-empty lines", {"e.txt": "a\n\nb\n", "s.txt": "a\n\nb\n"}),
    Case("par-lang-unknown", "translate.py", PARALLEL + " --lang xx", "unknown language 'xx'"),
    Case("par-lang-english", "translate.py", PARALLEL + " --lang en", "--lang en"),
    Case("par-out-folder", "translate.py", PARALLEL + " --out {dir}/o", "--out {dir}/o: is a folder", {"o/keep.txt": "x"}, cli=True),
    Case("par-out-unrelated-text", "translate.py", PARALLEL + " --out {dir}/notes.txt", "notes.txt:1: invalid JSON", {"notes.txt": NOTES + "\n"}),
    Case("par-out-other-language", "translate.py", PARALLEL + " --lang yo", "field 'lang' is 'sw', not 'yo'", {"out.jsonl": OURS}),
    Case("par-out-mt-output", "translate.py", PARALLEL, "holds records not made from sw.txt (id 'ex0')", {"out.jsonl": OURS}),
    Case("par-out-in-use", "translate.py", PARALLEL, "{dir}/out.jsonl is in use by another run", {"out.jsonl": OURS}, held="{dir}/out.jsonl"),
    Case("par-out-is-tgt", "translate.py", PARALLEL + " --tgt {dir}/s.txt --out {dir}/s.txt", "is the --tgt file", {"s.txt": "Moja.\nMbili.\nTatu.\n"}),
    # --- eval.py: flags ---
    Case("eval-max-new-tokens-0", "eval.py", EVAL + " --max-new-tokens 0", "--max-new-tokens: must be >= 1, got 0"),
    Case("eval-batch-size-0", "eval.py", EVAL + " --batch-size 0", "--batch-size: must be >= 1, got 0"),
    Case("eval-limit-negative", "eval.py", EVAL + " --limit -1", "--limit: must be >= 0, got -1"),
    Case("eval-copy-threshold", "eval.py", EVAL + " --copy-threshold 2", "--copy-threshold: must be in (0, 1], got 2.0"),
    Case("eval-device-bogus", "eval.py", EVAL + " --device bogus", "--device 'bogus': not a device"),
    Case("eval-lang-english", "eval.py", EVAL + " --lang en", "must not be English"),
    Case("eval-lang-unknown", "eval.py", EVAL + " --lang xx", "unknown language 'xx'"),
    Case("eval-langs-unknown", "eval.py", EVAL + " --langs en qq", "no model for 'qq'"),
    Case("eval-judge-alone", "eval.py", EVAL + " --judge {chat}", "--judge: needs at least two --models"),
    Case("eval-names-count", "eval.py", EVAL + " --names a b", "--names: 2 names for 1 models"),
    Case("eval-names-one-file", "eval.py", EVAL + " --models {chat} {chat} --names a/b a_b", "'a/b' and 'a_b' would both be written to alpaca_eval/a_b.json"),
    # --- eval.py: inputs ---
    Case("eval-prompts-missing", "eval.py", EVAL + " --prompts {dir}/none.jsonl", "none.jsonl: no such file"),
    Case("eval-prompts-bad-json", "eval.py", EVAL + " --prompts {dir}/p.jsonl", "p.jsonl:2: invalid JSON", {"p.jsonl": '{"instruction": "ok"}\n{"instruction": \n'}),
    Case("eval-prompts-field-twice", "eval.py", EVAL + " --prompts {dir}/p.jsonl", "p.jsonl:2: field 'instruction' appears twice",
         {"p.jsonl": '{"instruction": "ok"}\n{"instruction": "a", "instruction": "b"}\n'}),
    Case("eval-heldout-other-language", "eval.py", EVAL + " --heldout {dir}/h.jsonl", "h.jsonl:1: field 'lang' is 'yo', but --lang is 'sw'", {"h.jsonl": record(0, "yo")}),
    Case("eval-mmlu-bad-csv", "eval.py", EVAL + " --mmlu {dir}/x_test.csv", "x_test.csv:2: expected 6 columns", {"x_test.csv": CSV_BAD}),
    Case("eval-model-missing", "eval.py", EVAL + " --models {dir}/none", "neither a local folder"),
    Case("eval-model-garbage-weights", "eval.py", EVAL + " --models {chat} {broken}", "cannot read weights"),
    # --- eval.py: --out checked before any generation ---
    Case("eval-out-is-file", "eval.py", EVAL + " --out {dir}/eval", "{dir}/eval is a file, not a folder", {"eval": "x"}, cli=True),
    Case("eval-out-under-a-file", "eval.py", EVAL + " --out {dir}/notes.txt/eval", "{dir}/notes.txt is a file, not a folder", {"notes.txt": NOTES}),
    Case("eval-out-training-run", "eval.py", EVAL + " --out {dir}/run", "holds run.json, which eval.py does not write", {"run/metrics.jsonl": '{"step": 1}\n', "run/run.json": "{}"}),
    Case("eval-out-wrong-kind", "eval.py", EVAL, "alpaca_eval is a file; eval.py writes a folder there", {"eval/alpaca_eval": "x"}),
    # --- train.py: flags, checked before any work (the reference cache above all: a bad table would be reused) ---
    Case("train-batch-size-0", "train.py", TRAIN + " --batch-size 0", "--batch-size 0: must be at least 1", cli=True),
    Case("train-batch-size-negative", "train.py", TRAIN + " --batch-size -1", "--batch-size -1: must be at least 1"),
    Case("train-batch-size-text", "train.py", TRAIN + " --batch-size x", "argument --batch-size: invalid int value: 'x'", cli=True),
    Case("train-grad-accum-0", "train.py", TRAIN + " --grad-accum 0", "--grad-accum 0: must be at least 1"),
    Case("train-lr-negative", "train.py", TRAIN + " --lr -1", "--lr -1.0: must be 0 or more"),
    Case("train-lr-inf", "train.py", TRAIN + " --lr inf", "--lr inf"),
    Case("train-max-steps-negative", "train.py", TRAIN + " --max-steps -1", "--max-steps -1"),
    Case("train-max-examples-negative", "train.py", TRAIN + " --max-examples -1", "--max-examples -1"),
    Case("train-warmup", "train.py", TRAIN + " --warmup 1.5", "--warmup 1.5"),
    Case("train-lam", "train.py", TRAIN + " --lam -0.1", "--lam -0.1"),
    Case("train-beta", "train.py", TRAIN + " --beta -1", "--beta -1.0"),
    Case("train-grad-clip", "train.py", TRAIN + " --grad-clip nan", "--grad-clip nan"),
    Case("train-lora-r", "train.py", TRAIN + " --lora --lora-r 0", "--lora-r 0"),
    Case("train-device-bogus", "train.py", TRAIN + " --device bogus", "--device 'bogus': not a device"),
    Case("train-device-absent", "train.py", TRAIN + " --device cuda:7", "--device 'cuda:7'"),
    Case("train-method-unknown", "train.py", TRAIN + " --method ppo", "argument --method: invalid choice: 'ppo'"),
    Case("train-bf16-amp-off", "train.py", TRAIN + " --dtype bfloat16 --amp off", "--dtype bfloat16 with --amp off"),
    Case("train-resume-and-overwrite", "train.py", TRAIN + " --resume --overwrite", "choose one"),
    Case("train-lang-english", "train.py", TRAIN + " --lang en", "must not be English"),
    Case("train-stages-bad", "train.py", TRAIN + " --stages attn", "--stages: 'attn' is not GROUP:EPOCHS"),
    Case("train-chat-format-unknown", "train.py", TRAIN + " --chat-format vicuna", "unknown chat format 'vicuna'"),
    # --- train.py: inputs ---
    Case("train-data-missing", "train.py", TRAIN + " --data {dir}/none.jsonl", "none.jsonl"),
    Case("train-data-bad-line", "train.py", TRAIN + " --data {dir}/d.jsonl", "d.jsonl:1: invalid JSON", {"d.jsonl": '{"id": \n'}),
    Case("train-data-field-twice", "train.py", TRAIN + " --data {dir}/d.jsonl", "d.jsonl:1: field 'response' appears twice in one object",
         {"d.jsonl": '{"id": "a", "lang": "sw", "prompt_en": "x", "response_en": "y", "prompt": "z", "response": "w", "response": "v"}\n'}),
    Case("train-data-huge-number", "train.py", TRAIN + " --data {dir}/d.jsonl", "d.jsonl:1: invalid JSON", {"d.jsonl": '{"id": ' + "9" * 5000 + "}\n"}),
    Case("train-model-missing", "train.py", TRAIN + " --model {dir}/none", "{dir}/none"),
    Case("train-model-garbage-weights", "train.py", TRAIN + " --model {broken}", "broken"),
    # --- train.py: --out (a finished run, another kind of file, another run writing it) ---
    Case("train-out-finished-run", "train.py", TRAIN, "holds a run (run.json); --resume continues it, --overwrite replaces it", RUN, cli=True),
    Case("train-out-is-file", "train.py", TRAIN + " --out {dir}/notes.txt", "exists and is not a folder", {"notes.txt": NOTES}),
    Case("train-out-in-use", "train.py", TRAIN + " --overwrite", "{dir}/run is in use by another run (pid {pid})", RUN, held="{dir}/run"),
    Case("train-resume-nothing", "train.py", TRAIN + " --resume", "no checkpoint at {dir}/run/checkpoint.pt"),
    Case("train-resume-not-a-checkpoint", "train.py", TRAIN + " --resume", "cannot read checkpoint", RUN),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """The shared, valid inputs the cases start from (never to be changed by a case)."""
    root = tmp_path_factory.mktemp("fixtures")
    examples = [{"id": f"s{i}", "prompt": f"Question {i}. Can you answer it?", "response": f"Answer {i}.\n\n- a list"} for i in range(3)]
    (root / "source.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    m2m = root / "m2m100"
    vocab_size = write_tiny_tokenizer(m2m, [e["prompt"] + " " + e["response"] for e in examples] * 10, vocab_size=60, drop=0)
    write_tiny_m2m100(m2m, vocab_size, generation={"num_beams": 1, "max_length": 4})
    (root / "en.txt").write_text("One.\nTwo.\nThree.\nFour.\n")
    (root / "sw.txt").write_text("Moja.\nMbili.\nTatu.\nNne.\n")
    demo = (REPO / "data" / "demo" / "sw.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "pairs.jsonl").write_text("".join(demo[:4]), encoding="utf-8")
    chat = make_tiny_chat_model(root / "chat", demo_texts("sw"))
    broken = root / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((chat / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    return {"m2m": m2m, "source": root / "source.jsonl", "en": root / "en.txt", "sw": root / "sw.txt",
            "chat": chat, "broken": broken, "pairs": root / "pairs.jsonl", "root": root}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder`: relative path -> bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def prepare(case: Case, fixtures: dict[str, Path], folder: Path) -> tuple[list[str], str, str]:
    """Make the case's files in `folder`; return its argv, fragment and held output with the names
    filled in."""
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    names = {**{k: str(v) for k, v in fixtures.items()}, "dir": str(folder), "pid": os.getpid()}
    return shlex.split(case.argv.format(**names)), case.fragment.format(**names), case.held.format(**names)


def check_error(stderr: str, fragment: str) -> None:
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line:\n{stderr}"
    assert stderr.startswith("error: "), stderr
    assert fragment in stderr, stderr


def run_in_process(script: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `script`'s main(argv) run as its __main__ does, under run_cli."""
    main = import_module(SCRIPTS[script]).main
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, err.getvalue()


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    folder = tmp_path / "case"
    folder.mkdir()
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) would land here and be seen
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, fixtures, case_dir):
    argv, fragment, held = prepare(case, fixtures, case_dir)
    before, shared = snapshot(case_dir.parent), snapshot(fixtures["root"])
    with output_lock(held) if held else nullcontext():
        code, stderr = run_in_process(case.script, argv)
    assert code == 2, stderr
    check_error(stderr, fragment)
    assert snapshot(case_dir.parent) == before  # nothing changed, nothing new (lock and temp files too)
    assert snapshot(fixtures["root"]) == shared


CLI_CASES = [c for c in CASES if c.cli]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_input_on_the_command_line(case, fixtures, case_dir):
    argv, fragment, held = prepare(case, fixtures, case_dir)
    before = snapshot(case_dir.parent)
    env = {**os.environ, "CLO_CACHE": str(case_dir.parent / "cache"), "OMP_NUM_THREADS": "1"}
    with output_lock(held) if held else nullcontext():  # held by this process, the other run
        proc = subprocess.run([sys.executable, str(REPO / case.script), *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    check_error(proc.stderr, fragment)
    assert snapshot(case_dir.parent) == before


def test_the_catalogue_is_large_and_unique():
    assert len({c.id for c in CASES}) == len(CASES) >= 40
    assert {c.script for c in CASES} == {"translate.py", "eval.py", "train.py"}
    assert sum(c.argv.startswith("parallel") for c in CASES) >= 10
