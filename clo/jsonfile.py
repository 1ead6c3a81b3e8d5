"""Reading JSON with errors that name the file and line: a checkpoint folder's files, and JSON Lines records.

`parse_json` turns every way a text can fail to be JSON into one CloError (invalid syntax with its line,
nesting too deep for the parser, a number too long to convert, a data record naming a field twice);
`read_json` reads a file that must hold one JSON object (config.json, tokenizer_config.json, ...).
"""

import itertools
import json
import re
from pathlib import Path

from clo.errors import CloError


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """An object's pairs as a dict, refusing a key given twice ({"prompt": "a", "prompt": "b"}): json.loads
    would keep the last silently, so the record would train on something its author may not have meant."""
    out = dict(pairs)  # at C speed: the usual object has no key twice
    if len(out) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"field {key!r} appears twice in one object")
            seen.add(key)
    return out


_BETWEEN_RECORDS = re.compile(r"[\s,]*")


def _record_of_duplicate(text: str) -> str:
    """":line: record i" of the first record that names a field twice, when `text` is a JSON list of records
    (Alpaca's files: one line for the whole file would not say where); "" otherwise."""
    decoder, at = json.JSONDecoder(object_pairs_hook=_unique_keys), text.find("[") + 1
    if at == 0 or text[: at - 1].strip():
        return ""
    for i in itertools.count(1):
        at = _BETWEEN_RECORDS.match(text, at).end()
        try:
            _, at = decoder.raw_decode(text, at)
        except _DuplicateKey:
            return f":{text.count(chr(10), 0, at) + 1}: record {i}"
        except ValueError:
            return ""


def parse_json(text: str | bytes, where: str, whole_file: bool = False, unique_keys: bool = True):
    """json.loads(text), or a one-line CloError that starts with `where`: a record's file:line, or a file
    (whole_file: the error's own line number is added). unique_keys: refuse an object that names a field
    twice (data records); the model files of other tools (`read_json`) are read as transformers reads them."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except _DuplicateKey as e:
        record = _record_of_duplicate(text) if whole_file and isinstance(text, str) else ""
        raise CloError(f"{where}{record}: {e}") from None
    except json.JSONDecodeError as e:
        line = f":{e.lineno}" if whole_file else ""
        raise CloError(f"{where}{line}: invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError:
        raise CloError(f"{where}: invalid JSON: not UTF-8 text") from None
    except RecursionError:
        raise CloError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise CloError(f"{where}: invalid JSON: {str(e).splitlines()[0][:120]}") from None


def shard_names(index: Path) -> list[str]:
    """The file names a sharded checkpoint's `*.index.json` lists: plain names of files beside it, never a path
    that leads out of the folder (one-line CloError otherwise)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v == Path(v).name for v in weight_map.values()):
        raise CloError(f"{index}: field 'weight_map' is not a map of tensor names to file names in this folder")
    return sorted(set(weight_map.values()))


def read_json(path: Path, missing_ok: bool = False) -> dict:
    """The JSON object in `path`; {} for a missing file when `missing_ok`; else a one-line CloError."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise CloError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CloError(f"{path}: not UTF-8 text ({e.reason})") from None
    value = parse_json(text, str(path), whole_file=True, unique_keys=False)
    if not isinstance(value, dict):
        raise CloError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
