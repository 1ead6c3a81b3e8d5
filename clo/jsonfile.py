"""Reading the JSON files of a checkpoint folder, with errors that name the file and line."""

import json
from pathlib import Path

from clo.errors import CloError


def read_json(path: Path, missing_ok: bool = False) -> dict:
    """The parsed file; {} for a missing file when `missing_ok`; else a one-line CloError."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise CloError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CloError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise CloError(f"{path}: not UTF-8 text ({e.reason})") from None
