"""The cross-lingual JSONL format: one English SFT example and its translation per line.

    {"id": "demo-000", "lang": "sw",
     "prompt_en": "...", "response_en": "...",   # x_en, y_en: the English original
     "prompt": "...",    "response": "..."}      # x_t,  y_t:  the same in the target language

translate.py writes it; train.py and eval.py read it. Every line is checked before any training:
the first bad line stops the run with `file:line: what is wrong`. Lines end at "\n" only
(clo/jsonl.py), so a raw U+2028 inside a string is read as written. Duplicate ids are skipped and
counted (the first one is kept).
"""

from dataclasses import dataclass
from pathlib import Path

from clo.errors import CloError
from clo.jsonfile import parse_json
from clo.jsonl import dumps_line, read_lines
from clo.languages import get_language, target_language

FIELDS = ("id", "lang", "prompt_en", "response_en", "prompt", "response")
# Every line pair_line writes starts with these bytes, so a torn last line (a crash cut a write
# short) starts with them too, or is a prefix of them (translate.py's resume relies on it).
RECORD_START = b'{"id": "'
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


@dataclass(frozen=True)
class Example:
    id: str
    lang: str
    prompt_en: str
    response_en: str
    prompt: str
    response: str


@dataclass
class LoadReport:
    examples: list[Example]
    duplicates: int = 0

    def summary(self) -> str:
        return f"{len(self.examples)} examples, {self.duplicates} duplicate ids skipped"


def parse_line(line: str, where: str) -> Example:
    record = parse_json(line, where)
    if not isinstance(record, dict):
        raise CloError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in FIELDS:
        if field not in record:
            raise CloError(f"{where}: missing field {field!r}")
        if not isinstance(record[field], str):
            raise CloError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
        if not record[field].strip():
            raise CloError(f"{where}: field {field!r} is empty")
    return Example(**{f: record[f] for f in FIELDS})


def load_pairs(path: Path | str, lang: str | None = None) -> LoadReport:
    """Read and validate a cross-lingual JSONL file; `lang` (if given) must match every record's."""
    path = Path(path)
    if lang is not None:
        get_language(lang)
    report, seen = LoadReport([]), set()
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        ex = parse_line(line, f"{path}:{n}")
        if lang is not None and ex.lang != lang:
            raise CloError(f"{path}:{n}: field 'lang' is {ex.lang!r}, but --lang is {lang!r}")
        if ex.id in seen:
            report.duplicates += 1
            continue
        seen.add(ex.id)
        report.examples.append(ex)
    if not report.examples:
        raise CloError(f"{path}: no examples")
    return report


def demo_path(lang: str, heldout: bool = False) -> Path:
    """The shipped smoke-run set for `lang` (data/demo, 128 training + 16 held-out examples)."""
    code = target_language(lang).code
    return DEMO_DIR / (f"{code}.heldout.jsonl" if heldout else f"{code}.jsonl")


def pair_line(record: dict) -> str:
    """One record as a line of the format, fields in FIELDS order (the writer of what load_pairs reads)."""
    return dumps_line({key: record[key] for key in FIELDS})
