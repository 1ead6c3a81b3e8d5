"""Make CLO's cross-lingual training data: translate English SFT data, or pair human translations.

    # the paper's step: 6,400 English OASST1 examples translated into Swahili with M2M100
    python translate.py --source oasst1.trees.jsonl.gz --model m2m100_1.2B --lang sw --out sw.jsonl --n 6400
    # no machine translation: continuation pairs from line-aligned human translations
    python translate.py parallel --src eng_Latn.devtest --tgt swh_Latn.devtest --lang sw --out sw_flores.jsonl

Both write the JSONL that `train.py --data` reads, one record per English example, keys in order
{"id", "lang", "prompt_en", "response_en", "prompt", "response"} (prompt/response: target language).

`mt` (the default mode) is resumable: records are appended and flushed after every model batch, so a
crash loses at most the work in flight; running the same command again skips the ids already in
--out and never writes one twice (a torn last line left by a crash is cut away first). An existing
--out is checked whole before it is touched: a file that is not this tool's output for --lang is
refused unchanged. One run per --out at a time (clo/lock.py). `parallel` replaces --out atomically.

`torchrun --nproc-per-node N translate.py ...` deals the chunks out to N processes (on CUDA,
one GPU each) in lock-step rounds; process 0 alone writes, a round at a time, so --out holds the
same records in the same order and bytes as a one-process run on the same kind of device. A crash
of any process loses at most the round in flight; the same command, with any N or plain `python`,
resumes it. Write `--num-examples` there for `--n`, which torchrun's own parser would claim.

Features: OASST1 (both release formats), Alpaca JSON and plain JSONL sources (clo/translate/sft_sources.py);
responses cut at line breaks and sentences and put back together with their lists, tables and code
blocks intact, code untranslated (clo/translate/segment.py); identical sentences translated once per chunk;
length-sorted batches; greedy or beam search with the checkpoint's generation_config.json defaults
(clo/translate/search.py); M2M100 and NLLB-200 dense checkpoints (clo/translate/m2m100.py).
Limit: the source is English.
"""

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from clo.atomic import write_atomic
from clo.errors import ArgumentParser, CloError, run_cli
from clo.jsonfile import parse_json
from clo.jsonl import split_lines
from clo.languages import get_language, target_language
from clo.lock import output_lock
from clo.pairs import FIELDS, RECORD_START, pair_line
from clo.runtime import resolve_device
from clo.translate.parallel_pairs import continuation_pairs, read_doc_ids
from clo.translate.search import MAX_BEAMS, MAX_LENGTH
from clo.translate.segment import Segmented, reassemble, segment
from clo.translate.sft_sources import FORMATS, SftExample, read_sft_source, sample_examples
from clo.translate.translator import DTYPES, Translator
from clo.world import World, start

# --- the output file ------------------------------------------------------------------------------


@dataclass
class ExistingOut:
    """What an existing --out holds, found without changing it."""

    ids: set[str]  # ids of its records
    complete: int  # bytes up to the end of its last complete line
    last_line: str | None  # a last line without its newline: "record" (complete) or "torn"; None if none


def read_out(out: Path, lang: str) -> ExistingOut:
    """Check an existing --out before anything is written to it: every line must be a record this
    tool wrote for `lang`, and a last line without its newline either such a record or the start of
    one torn by a crash. Anything else (another file, another language) is a one-line CloError and
    the file is left as it was; `repair` later fixes the last line."""
    if not out.exists():
        return ExistingOut(set(), 0, None)
    try:
        data = out.read_bytes()
    except OSError as e:
        raise CloError(f"{out}: cannot read ({e.strerror})") from None
    complete = data.rfind(b"\n") + 1
    try:
        text = data[:complete].decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CloError(f"{out}:{line}: not UTF-8 text; not a file this tool wrote? choose another --out") from None
    lines = split_lines(text)
    ids: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            check_record(out, number, json_of(out, number, line), lang, ids)
    tail, last_line = data[complete:], None
    if tail:
        if is_torn(tail):
            last_line = "torn"
        else:
            check_record(out, len(lines) + 1, json_of(out, len(lines) + 1, tail), lang, ids)
            last_line = "record"
    return ExistingOut(ids, complete, last_line)


def is_torn(tail: bytes) -> bool:
    """Whether an unfinished last line is the start of a record this tool was writing."""
    try:
        json.loads(tail)
        return False  # whole JSON: a complete line without its newline, checked as one
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return tail.startswith(RECORD_START) or RECORD_START.startswith(tail)


def json_of(out: Path, number: int, line: str | bytes):
    """Line `number` of --out, parsed; a one-line CloError if it is not JSON."""
    try:
        return parse_json(line, f"{out}:{number}")
    except CloError as e:
        raise CloError(f"{e}; not a file this tool wrote? choose another --out") from None


def check_record(out: Path, number: int, record, lang: str, ids: set[str]) -> None:
    """A record of translate.py for `lang` whose id is not in `ids` yet (it is added)."""
    where = f"{out}:{number}"
    if not isinstance(record, dict):
        raise CloError(f"{where}: not a JSON object; not a file this tool wrote? choose another --out")
    for key in FIELDS:  # id and lang first: a file of ours for another language says so
        if not isinstance(record.get(key), str):
            raise CloError(f"{where}: field {key!r} is missing or not a string; not a file this tool wrote? choose another --out")
        if key == "lang" and record["lang"] != lang:
            raise CloError(f"{where}: field 'lang' is {record['lang']!r}, not {lang!r}; choose another --out")
    if record["id"] in ids:
        raise CloError(f"{where}: duplicate id {record['id']!r}")
    ids.add(record["id"])


def repair(out: Path, existing: ExistingOut) -> None:
    """Make the last line of a checked --out whole before appending: a complete last record gets its
    newline, a torn one is cut away."""
    if existing.last_line is None:
        return
    with open(out, "r+b") as f:
        if existing.last_line == "record":
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(existing.complete)
            print(f"{out}: dropped a torn last line left by an interrupted run", file=sys.stderr)


# --- mt: translate an English SFT source -----------------------------------------------------------


@dataclass
class Job:
    """One example to translate: its prompt and response cut into pieces."""

    example: SftExample
    prompt: Segmented
    response: Segmented

    @property
    def pieces(self) -> list[str]:
        return self.prompt.pieces + self.response.pieces


def chunks(jobs: list[Job], sentences_per_chunk: int) -> list[list[Job]]:
    """Consecutive jobs grouped so that each group has about sentences_per_chunk distinct pieces."""
    groups, current, distinct = [], [], set()
    for job in jobs:
        current.append(job)
        distinct.update(job.pieces)
        if len(distinct) >= sentences_per_chunk:
            groups.append(current)
            current, distinct = [], set()
    if current:
        groups.append(current)
    return groups


def run_mt(args) -> None:
    language = get_language(args.lang)
    # one process, or the N that torchrun started; a round waits for its slowest chunk (minutes of beam
    # search on a CPU), and a process that dies is noticed at once (torchrun stops the rest)
    world = start(torch.device(args.device), timeout_s=3600)
    translate_all(args, language, world)
    world.leave()  # process 0 goes on to report; the others exit here


def translate_all(args, language, world) -> None:
    """The source's examples not yet in --out, translated in chunks and appended in source order."""
    examples = read_examples(args, world.main)
    out = Path(args.out)
    with ExitStack() as held:
        existing = claim_out(out, language.code, world, held)  # --out is checked, not yet changed
        if existing is None:
            return  # process 0 refused --out and says why
        todo = [e for e in examples if e.id not in existing.ids]
        if not todo:
            if world.main:
                repair(out, existing)
                print(f"nothing to do: all {len(examples)} examples are already in {out}", file=sys.stderr)
            return
        device = world.device(torch.device(args.device))
        translator = Translator(args.model, language, str(device), args.dtype, args.beams, args.max_length,
                                args.compile == "on")
        # Chunks of every example, written or not: a rerun forms the chunks, hence the batches, of an uninterrupted
        # run, and translates each chunk with a missing record whole (a sentence's tokens may change with its batch
        # partners in bf16), writing only what is missing. The same on every process.
        jobs = [Job(e, segment(e.prompt, args.max_chars), segment(e.response, args.max_chars)) for e in examples]
        groups = [g for g in chunks(jobs, args.batch_size * args.chunk_batches) if any(job.example.id not in existing.ids for job in g)]
        total = sum(len({p for job in group for p in job.pieces}) for group in groups)
        if not world.main:
            translate_groups(groups, translator, language.code, args.batch_size, world, lambda records: None, existing.ids)
            return
        where = args.device if world.size == 1 else f"{world.size} processes ({args.device})"
        print(f"{len(existing.ids)} of {len(examples)} examples already in {out}; translating {len(todo)} "
              f"({total} sentences) into {language.name} on {where} ({args.dtype}), "
              f"beams {translator.settings.num_beams}, max length {translator.settings.max_length}", file=sys.stderr)

        repair(out, existing)  # every check has passed: only now is --out changed
        started = time.perf_counter()
        with open(out, "a", encoding="utf-8") as f, tqdm(total=total, unit="sent", dynamic_ncols=True) as bar:
            appender = Appender(f, bar)
            translate_groups(groups, translator, language.code, args.batch_size, world, appender, existing.ids)
    elapsed = time.perf_counter() - started
    skipped = f"; skipped {appender.skipped} whose translation came out empty (a rerun gives the same; another --batch-size or --beams may not)" if appender.skipped else ""
    holes = f"; {appender.holes} of them with a sentence that translated to nothing (left out of the record)" if appender.holes else ""
    print(f"wrote {appender.written} records to {out} ({total / elapsed:.2f} sentences/s){holes}{skipped}", file=sys.stderr)


def read_examples(args, main: bool) -> list[SftExample]:
    """The examples to translate: the source read and --n drawn (the same on every process); notes
    about skipped records and a short source are printed by process 0 only."""
    source = read_sft_source(args.source, args.format)
    examples = sample_examples(source.examples, args.n, args.seed)
    if main:
        for line in source.skipped[:3]:
            print(f"skipped: {line}", file=sys.stderr)
        if len(source.skipped) > 3:
            print(f"skipped: ... {len(source.skipped)} records with empty text in all", file=sys.stderr)
        if args.n is not None and args.n > len(examples):
            print(f"--n {args.n}: the source has only {len(examples)} usable examples; taking all", file=sys.stderr)
    return examples


def claim_out(out: Path, lang: str, world: World, held: ExitStack) -> ExistingOut | None:
    """Process 0 takes --out's lock (kept until `held` closes) and checks the file (`read_out`); every
    process gets what it holds. When process 0 refuses --out (in use, not this tool's file), it raises
    the one-line CloError and the others get None and end quietly: an error exit of theirs would make
    torchrun stop process 0 before it has said why."""
    existing, refusal = None, None
    if world.main:
        try:
            held.enter_context(output_lock(out))
            existing = read_out(out, lang)
        except CloError as e:
            refusal = e
    existing = world.broadcast_object(existing)
    if refusal is not None:
        raise refusal
    return existing


@dataclass
class Records:
    """What translating some jobs gave: their records as lines of --out, in source order."""

    lines: list[str] = field(default_factory=list)
    sentences: int = 0  # distinct pieces translated for them
    skipped: int = 0  # records not written: a translation came out empty
    holes: int = 0  # records written with a sentence that translated to nothing (the rest of the field has text)

    def add(self, more: "Records") -> None:
        self.lines += more.lines
        self.sentences += more.sentences
        self.skipped += more.skipped
        self.holes += more.holes


class Appender:
    """Process 0's end of --out: records appended and flushed as they come, the bar advanced, the
    final line's counts kept."""

    def __init__(self, f, bar):
        self.f, self.bar, self.written, self.skipped, self.holes = f, bar, 0, 0, 0

    def __call__(self, records: Records) -> None:
        self.f.write("".join(records.lines))
        self.f.flush()
        self.bar.update(records.sentences)
        self.written += len(records.lines)
        self.skipped += records.skipped
        self.holes += records.holes


def translate_groups(groups: list[list[Job]], translator: Translator, lang: str, batch_size: int,
                     world: World, write, written: set[str] = frozenset()) -> None:
    """Translate every group and `write` its Records in source order, except those of the ids `written`.

    One process writes after every model batch. N processes go in lock-step rounds: in round k,
    process r translates group k·N + r exactly as one process would (the same batches, so the same
    numbers and bytes), then the round's Records are gathered and written in group order. A crash
    loses at most the round in flight (one chunk per process), and the file stays in source order.
    """
    if world.size == 1:
        for group in groups:
            for records in translate_group(group, translator, lang, batch_size, written):
                write(records)
        return
    for first in range(0, len(groups), world.size):
        mine = first + world.rank
        records = Records()
        if mine < len(groups):
            for step in translate_group(groups[mine], translator, lang, batch_size, written):
                records.add(step)
        for part in world.gather_objects(records):  # in rank order: group order
            write(part)


def translate_group(group: list[Job], translator: Translator, lang: str, batch_size: int,
                    written: set[str] = frozenset()) -> Iterator[Records]:
    """Translate the distinct pieces of `group`, longest first in batches of batch_size; after each
    batch (and once before the first, for jobs with nothing to translate), yield the records of the
    leading jobs that are now complete, so they keep the source order; those of ids `written` (by an
    earlier run) are not yielded again. A record whose prompt or response translates to nothing but
    whitespace is skipped: train.py's loader refuses a file with an empty field."""
    encoded = {piece: translator.encode(piece) for job in group for piece in job.pieces}
    order = sorted(encoded, key=lambda piece: -len(encoded[piece]))
    translated: dict[str, str] = {}
    finished = 0

    def complete_jobs(sentences: int) -> Records:
        nonlocal finished
        records = Records(sentences=sentences)
        while finished < len(group) and all(p in translated for p in group[finished].pieces):
            job = group[finished]
            finished += 1
            if job.example.id in written:
                continue
            record = {
                "id": job.example.id, "lang": lang,
                "prompt_en": job.example.prompt, "response_en": job.example.response,
                "prompt": reassemble(job.prompt, [translated[p] for p in job.prompt.pieces]),
                "response": reassemble(job.response, [translated[p] for p in job.response.pieces]),
            }
            if record["prompt"].strip() and record["response"].strip():  # the test clo/pairs.py applies
                records.lines.append(pair_line(record))
                records.holes += any(not translated[p].strip() for p in job.pieces)
            else:
                records.skipped += 1
        return records

    yield complete_jobs(0)
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        translated.update(zip(batch, translator.translate_batch([encoded[p] for p in batch])))
        yield complete_jobs(len(batch))


# --- parallel: pairs from human translations ------------------------------------------------------


def run_parallel(args) -> None:
    doc_ids = read_doc_ids(args.doc_ids) if args.doc_ids else None
    records = continuation_pairs(args.src, args.tgt, args.lang, args.context, doc_ids)
    out, made_from = Path(args.out), Path(args.tgt).name
    with output_lock(out):
        # --out is replaced whole: only a file of pairs from the same --tgt file may be
        foreign = sorted(i for i in read_out(out, args.lang).ids if not i.startswith(f"{made_from}:"))
        if foreign:
            raise CloError(f"{out}: holds records not made from {made_from} (id {foreign[0]!r}); choose another --out")
        write_atomic(out, "".join(pair_line(r) for r in records))
    print(f"wrote {len(records)} continuation pairs to {out}", file=sys.stderr)


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="mode 'mt' is the default")
    modes = parser.add_subparsers(dest="mode", required=True)

    mt = modes.add_parser("mt", help="translate English SFT data with an M2M100 or NLLB-200 checkpoint (default)")
    mt.add_argument("--source", required=True, help="English SFT file: OASST1 (.jsonl[.gz]), Alpaca (.json) or JSONL")
    mt.add_argument("--format", default="auto", choices=FORMATS, help="source format; auto looks at the file (default)")
    mt.add_argument("--model", required=True, help="M2M100 or NLLB-200 checkpoint folder (config.json, weights, sentencepiece.bpe.model, vocab.json or tokenizer.json)")
    mt.add_argument("--lang", required=True, help="target language code, e.g. sw yo id ko zh de")
    mt.add_argument("--out", required=True, help="output JSONL; appended to, and resumed from, if it exists")
    mt.add_argument("--n", "--num-examples", type=int, default=None, help="translate this many examples, drawn with --seed (default: all); the paper used 6400; under torchrun write --num-examples (torchrun takes --n for its own --nnodes)")
    mt.add_argument("--seed", type=int, default=0, help="seed for drawing the --n examples (default 0)")
    mt.add_argument("--batch-size", type=int, default=16, help="sentences per model batch, per process under torchrun (default 16)")
    mt.add_argument("--beams", type=int, default=None, help="beam size; 1 is greedy (default: the checkpoint's generation_config.json)")
    mt.add_argument("--max-length", type=int, default=None, help="max decoder tokens per sentence, incl. the start token (default: the checkpoint's)")
    mt.add_argument("--max-chars", type=int, default=400, help="cut sentences longer than this many characters (default 400)")
    mt.add_argument("--chunk-batches", type=int, default=8, help="batches per length-sorted chunk, the unit dealt to a process under torchrun; a crash loses at most one chunk's unfinished records per process (default 8)")
    mt.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    mt.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    mt.add_argument("--compile", choices=["on", "off"], default="off",
                    help="beam search through a compiled decoding step in static shapes, a CUDA graph per step on CUDA "
                         "(clo/translate/static_decode.py; greedy decoding stays eager). Off by default until its speed is measured on a GPU")
    mt.set_defaults(run=run_mt)

    par = modes.add_parser("parallel", help="continuation pairs from line-aligned human translations (no MT)")
    par.add_argument("--src", required=True, help="English file, one sentence per line (e.g. eng_Latn.devtest, en-swa_train.en)")
    par.add_argument("--tgt", required=True, help="the target-language file, line-aligned with --src")
    par.add_argument("--lang", required=True, help="target language code of --tgt, e.g. sw")
    par.add_argument("--out", required=True, help="output JSONL (replaced atomically)")
    par.add_argument("--context", type=int, default=2, help="lines of passage in each prompt; the response is the line after (default 2)")
    par.add_argument("--doc-ids", default=None, help="optional file with one document id per line (first TSV column, e.g. FLORES metadata); windows stay inside a document")
    par.set_defaults(run=run_parallel)
    return parser


def check_args(args) -> None:
    """Every flag, checked before any work (one line naming the flag and its value); resolves
    --device and --dtype "auto". File contents are checked by their readers, still before any work."""
    for flag in ("batch_size", "beams", "max_length", "max_chars", "chunk_batches", "n", "context"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CloError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    for flag, top in (("beams", MAX_BEAMS), ("max_length", MAX_LENGTH)):  # beam search allocates their product up front
        value = getattr(args, flag, None)
        if value is not None and value > top:
            raise CloError(f"--{flag.replace('_', '-')} must be at most {top}, got {value}")
    target_language(args.lang)
    inputs = {"--source": getattr(args, "source", None), "--src": getattr(args, "src", None),
              "--tgt": getattr(args, "tgt", None), "--doc-ids": getattr(args, "doc_ids", None)}
    inputs = {flag: Path(value) for flag, value in inputs.items() if value is not None}
    for flag, path in inputs.items():
        if not path.is_file():
            raise CloError(f"{flag} {path}: {'is a folder, not a file' if path.is_dir() else 'no such file'}")
    if args.mode == "mt":
        if not Path(args.model).is_dir():
            raise CloError(f"--model {args.model}: no such folder (an M2M100 or NLLB-200 checkpoint folder)")
        device = resolve_device(args.device)
        args.device = str(device)
        if args.dtype == "auto":
            args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    check_out(Path(args.out), inputs)


def check_out(out: Path, inputs: dict[str, Path]) -> None:
    """--out can be written as a file, and is none of the input files."""
    if out.is_dir():
        raise CloError(f"--out {out}: is a folder; give a file name")
    folder = out.parent
    while not folder.exists():  # the nearest existing folder: the run creates the rest
        folder = folder.parent
    if not folder.is_dir():
        raise CloError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(out if out.exists() else folder, os.W_OK):
        raise CloError(f"--out {out}: {out if out.exists() else folder} is not writable")
    for flag, path in inputs.items():
        if out.exists() and os.path.samefile(out, path):
            raise CloError(f"--out {out}: is the {flag} file; choose another --out")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("mt", "parallel", "-h", "--help"):
        argv.insert(0, "mt")
    args = build_parser().parse_args(argv)
    check_args(args)
    args.run(args)


if __name__ == "__main__":
    run_cli(main)
