"""JSON Lines that round-trip: one JSON value per line, where a line ends at "\\n" and nowhere else.

Python's `str.splitlines()` also breaks at U+000B, U+000C, U+001C-U+001E, U+0085, U+2028 and U+2029.
`json.dumps(..., ensure_ascii=False)` escapes the ASCII ones but writes the last three raw inside
strings, so a file split with `splitlines()` breaks in the middle of a record. Here both sides agree:

    dumps_line(obj)   one line of JSON + "\\n"; those three written as \\u escapes, other non-ASCII
                      text kept readable (Swahili, Yoruba, Chinese appear as themselves)
    split_lines(text) the lines of a JSONL text, split at "\\n" only (a trailing "\\r" is dropped), so
                      valid JSONL from other tools with raw U+2028 in a string is read as written
    read_lines(path)  the same for a UTF-8 file (read_text: its text), with one-line errors

Line numbers (1-based) count "\\n", as editors and `wc -l` do, so `file:line` in an error points at
the right line.
"""

import json
import math
from pathlib import Path

from clo.errors import CloError

# The characters splitlines() breaks at that json.dumps(ensure_ascii=False) leaves raw
# (it escapes everything below U+0020); tests/test_jsonl.py derives this from splitlines itself.
RAW_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_ESCAPES = str.maketrans(RAW_LINE_BREAKS)


def dumps_line(obj) -> str:
    """`obj` as one JSON line ending in "\\n", readable by any JSONL reader, `splitlines()` ones too;
    a NaN or infinity (a diverged model's numbers) is written as null, as JSON has no such values."""
    # Outside strings json.dumps writes only ASCII, so these characters can only sit inside a
    # string, where a \\u escape means the same character.
    return json.dumps(finite_or_null(obj), ensure_ascii=False, allow_nan=False).translate(_ESCAPES) + "\n"


def finite_or_null(obj):
    """`obj` with every float that is NaN or infinite replaced by None (JSON's null), in nested dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def split_lines(text: str) -> list[str]:
    """The lines of `text`, split at "\\n" only; a final "\\n" ends the last line, not a new empty one."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_text(path: Path | str) -> str:
    """A UTF-8 file's text, line ends as they are; a missing or unreadable file is a one-line CloError."""
    path = Path(path)
    try:
        # bytes, then decode: text mode would turn a lone "\r" into a line end
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CloError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CloError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise CloError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise CloError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_lines(path: Path | str) -> list[str]:
    """`split_lines` of a UTF-8 file (errors as `read_text`)."""
    return split_lines(read_text(path))
