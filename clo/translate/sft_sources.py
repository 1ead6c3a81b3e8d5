"""English SFT data to translate: OASST1 as released, Alpaca JSON, or plain JSONL.

Every reader returns `SftExample(id, prompt, response)` in file order, with unique ids (resuming a
translation run skips ids already written).

- OASST1 (OpenAssistant Conversations, the paper's source), either release format:
    * message trees, one per line (`*.trees.jsonl[.gz]`): {"message_tree_id", "tree_state",
      "prompt": {message, "replies": [{message, "replies": [...]}, ...]}};
    * flat messages, one per line (`*.messages.jsonl[.gz]`, or the `OpenAssistant/oasst1` dataset
      exported to JSONL): {"message_id", "parent_id", "role", "text", "lang", "rank", ...}.
  Selection (the paper's "6,400 English samples"; docs/paper.md "Data" marks the exact rule as ours):
  the first turn only (a root prompter message, parent_id null) -> its best-ranked assistant reply
  (rank 0), both in English, neither deleted nor rejected in review, trees "ready_for_export".
  The example id is the reply's message_id.
- Alpaca JSON: a list of {"instruction", "input", "output"}; prompt = instruction, plus "\\n\\n" +
  input when input is non-empty; response = output; id "alpaca-<index>".
- Plain JSONL: {"prompt", "response"} or {"messages": [{"role": "user", "content"}, {"role":
  "assistant", "content"}, ...]} (the first user turn and the assistant turn right after it); id from
  the record's "id", else "<file stem>-<line>".
Alpaca and JSONL records need their text fields: a missing field (or one that is not a string) is
a one-line error; a record whose text is empty (Alpaca has a few) is skipped and counted.
"""

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from clo.errors import CloError
from clo.jsonfile import parse_json
from clo.jsonl import split_lines

FORMATS = ("auto", "oasst1", "alpaca", "jsonl")


@dataclass(frozen=True)
class SftExample:
    id: str
    prompt: str
    response: str


class EmptyText(Exception):
    """A record whose text field is empty: skipped, not fatal."""


@dataclass
class SftSource:
    examples: list[SftExample]
    skipped: list[str]  # one line per skipped record: where and why


def read_sft_source(path: str | Path, fmt: str = "auto") -> SftSource:
    """All examples of an SFT file; fmt is one of FORMATS ("auto" looks at the content)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise CloError(f"unknown source format {fmt!r}; supported: {', '.join(FORMATS)}")
    if path.suffix == ".parquet":
        raise CloError(f"{path}: parquet is not read here; export it to JSONL (one message per line)")
    if fmt == "auto":
        fmt = detect_format(path)
    reader = {"oasst1": read_oasst1, "alpaca": read_alpaca, "jsonl": read_jsonl}[fmt]
    source = reader(path)
    if not source.examples:
        first = f" ({source.skipped[0]}, ...)" if source.skipped else ""
        raise CloError(f"{path}: no usable examples (format {fmt}){first}")
    return source


def sample_examples(examples: list[SftExample], n: int | None, seed: int) -> list[SftExample]:
    """n examples drawn without replacement with `seed`, kept in file order; all if n is None or
    n >= len(examples). The same (file, n, seed) always gives the same selection."""
    if n is None or n >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


def read_text(path: Path) -> str:
    """The file's text (gunzipped if .gz), line ends untouched: lines end at "\n" only (clo/jsonl.py)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read().decode("utf-8")
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CloError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    records = []
    for number, line in enumerate(split_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}")
        if not isinstance(record, dict):
            raise CloError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def detect_format(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    if name.endswith(".json"):
        return "alpaca"
    first_line = next((line for line in split_lines(read_text(path)) if line.strip()), "{}")
    try:
        first = json.loads(first_line)
    except (ValueError, RecursionError):  # not JSON (JSONDecodeError), too long a number, nested too deeply
        return "jsonl"  # the reader reports the bad line
    if not isinstance(first, dict):
        return "jsonl"
    if "message_tree_id" in first or ("message_id" in first and "role" in first):
        return "oasst1"
    return "jsonl"


# --- OASST1 -------------------------------------------------------------------------------------


def oasst_messages(path: Path) -> list[tuple[int, dict]]:
    """Flat (line, message) list from either release format; tree replies get their parent_id."""
    messages = []
    for number, record in json_lines(path):
        if "message_id" in record:
            messages.append((number, record))
            continue
        if "message_tree_id" not in record:
            raise CloError(f"{path}:{number}: neither an OASST1 message (message_id) nor a tree (message_tree_id)")
        stack = [(record.get("prompt"), None)]
        while stack:
            message, parent_id = stack.pop()
            if message is None:
                continue
            if not isinstance(message, dict) or not isinstance(message.get("replies") or [], list):
                raise CloError(f"{path}:{number}: field 'prompt' or one of its 'replies' is not a message object with a list of replies")
            flat = {k: v for k, v in message.items() if k != "replies"}
            flat.setdefault("parent_id", parent_id)
            flat.setdefault("tree_state", record.get("tree_state"))
            messages.append((number, flat))
            stack.extend((reply, message.get("message_id")) for reply in reversed(message.get("replies") or []))
    return messages


def usable(message: dict) -> bool:
    """English, not deleted, not rejected by review, in a tree released as ready."""
    return (
        message.get("lang") == "en"
        and not message.get("deleted")
        and message.get("review_result") is not False
        and message.get("tree_state", "ready_for_export") in ("ready_for_export", None)
        and bool((message.get("text") or "").strip())
    )


def read_oasst1(path: Path) -> SftSource:
    messages = oasst_messages(path)
    for number, m in messages:
        for field in ("message_id", "role"):
            if not m.get(field):
                raise CloError(f"{path}:{number}: OASST1 message without field {field!r}")
        if not isinstance(m.get("text") or "", str):
            raise CloError(f"{path}:{number}: field 'text' of message {m['message_id']!r} is not a string")
    best_reply: dict[str, dict] = {}
    for _, m in messages:
        if m["role"] == "assistant" and m.get("rank") == 0 and m.get("parent_id") and usable(m):
            best_reply.setdefault(m["parent_id"], m)
    examples = []
    for _, m in messages:
        if m["role"] == "prompter" and m.get("parent_id") is None and usable(m) and m["message_id"] in best_reply:
            reply = best_reply[m["message_id"]]
            examples.append(SftExample(reply["message_id"], m["text"], reply["text"]))
    return SftSource(unique(path, [(0, e) for e in examples]), [])


# --- Alpaca and plain JSONL -----------------------------------------------------------------------


def text_field(where: str, record: dict, field: str) -> str:
    value = record.get(field)
    if value is None or not isinstance(value, str):
        raise CloError(f"{where}: field {field!r} {'is missing' if value is None else 'is not a string'}")
    if not value.strip():
        raise EmptyText(f"{where}: field {field!r} is empty")
    return value


def read_alpaca(path: Path) -> SftSource:
    records = parse_json(read_text(path), str(path), whole_file=True)
    if not isinstance(records, list):
        raise CloError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
    examples, skipped = [], []
    for i, record in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise CloError(f"{where}: expected an object")
        try:
            prompt = text_field(where, record, "instruction")
            extra = record.get("input") or ""
            if not isinstance(extra, str):
                raise CloError(f"{where}: field 'input' is not a string")
            if extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            examples.append((i, SftExample(f"alpaca-{i}", prompt, text_field(where, record, "output"))))
        except EmptyText as e:
            skipped.append(str(e))
    return SftSource(unique(path, examples), skipped)


def read_jsonl(path: Path) -> SftSource:
    examples, skipped = [], []
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        try:
            if "messages" in record:
                prompt, response = first_exchange(where, record["messages"])
            else:
                prompt, response = text_field(where, record, "prompt"), text_field(where, record, "response")
        except EmptyText as e:
            skipped.append(str(e))
            continue
        example_id = str(record["id"]) if record.get("id") is not None else f"{path.stem}-{number}"
        examples.append((number, SftExample(example_id, prompt, response)))
    return SftSource(unique(path, examples), skipped)


def first_exchange(where: str, messages) -> tuple[str, str]:
    """The first user message and the assistant message right after it."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise CloError(f"{where}: field 'messages' is not a list of {{role, content}} objects")
    for i, m in enumerate(messages[:-1]):
        if m.get("role") == "user" and messages[i + 1].get("role") == "assistant":
            return text_field(where, m, "content"), text_field(where, messages[i + 1], "content")
    raise CloError(f"{where}: field 'messages' has no user message followed by an assistant message")


def unique(path: Path, numbered: list[tuple[int, SftExample]]) -> list[SftExample]:
    seen: set[str] = set()
    for number, example in numbered:
        if example.id in seen:
            raise CloError(f"{path}:{number}: duplicate id {example.id!r}" if number else f"{path}: duplicate id {example.id!r}")
        seen.add(example.id)
    return [e for _, e in numbered]
