"""Prompt sets for generation: AlpacaEval-format instructions, or the cross-lingual JSONL.

    AlpacaEval format (.json: a list of objects; .jsonl: one object per line)
        {"instruction": "...", "dataset": "...", "output": "...", "lang": "sw"}   # only "instruction" needed
        A record's "lang" says which language its answer should be in; without it, `default_lang`.
        The 805 AlpacaEval prompts (../shared/data/alpaca/alpaca_eval_805.jsonl) are English.

    cross-lingual JSONL (clo/pairs.py; translate.py writes it, data/demo ships held-out sets)
        every record gives two prompts: "prompt" (target language) and "prompt_en" (English),
        so one file measures both "answers in the target language" and "English is kept".

A file is recognised by its records: any record with "prompt_en" makes it cross-lingual.
"""

from dataclasses import dataclass
from pathlib import Path

from clo.errors import CloError
from clo.jsonfile import parse_json
from clo.jsonl import read_text, split_lines
from clo.languages import LANGUAGES, get_language
from clo.pairs import load_pairs


@dataclass(frozen=True)
class EvalPrompt:
    set: str  # the prompt set's name (its file name without extension)
    id: str  # unique within the set
    lang: str  # the language the answer should be in: the prompt's language
    text: str


def _read_records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for each record: a .json list (line = index + 1) or JSON lines."""
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = parse_json(text, str(path), whole_file=True)
        return list(enumerate(records, 1))
    out = []
    for n, line in enumerate(split_lines(text), 1):
        if line.strip():
            out.append((n, parse_json(line, f"{path}:{n}")))
    return out


def load_prompts(path: Path | str, default_lang: str = "en", limit: int = 0) -> list[EvalPrompt]:
    """The prompts of one file (the first `limit` records when limit > 0), checked record by record."""
    path = Path(path)
    name = path.name.removesuffix(".jsonl").removesuffix(".json")
    records = _read_records(path)
    if not records:
        raise CloError(f"{path}: no records")
    if any(isinstance(r, dict) and "prompt_en" in r for _, r in records):
        examples = load_pairs(path).examples
        examples = examples[:limit] if limit else examples
        prompts = [EvalPrompt(name, ex.id, ex.lang, ex.prompt) for ex in examples]
        return prompts + [EvalPrompt(name, ex.id, "en", ex.prompt_en) for ex in examples]

    get_language(default_lang)
    prompts, seen = [], set()
    for n, record in records[:limit] if limit else records:
        where = f"{path}:{n}"
        if not isinstance(record, dict):
            raise CloError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise CloError(f"{where}: field 'instruction' is missing or empty")
        if isinstance(record.get("input"), str) and record["input"].strip():
            text = f"{text}\n\n{record['input']}"  # Stanford Alpaca's optional input, as its own template joins it
        lang = record.get("lang", default_lang)
        if not isinstance(lang, str) or lang not in LANGUAGES:
            raise CloError(f"{where}: field 'lang' is {lang!r}; supported: {', '.join(LANGUAGES)}")
        record_id = str(record.get("id", n))
        if record_id in seen:
            raise CloError(f"{where}: duplicate id {record_id!r}")
        seen.add(record_id)
        prompts.append(EvalPrompt(name, record_id, lang, text))
    return prompts
