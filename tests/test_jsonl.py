"""JSON Lines that round-trip (clo/jsonl.py), and every JSONL reader of the project reading them:
what we write with U+2028 and friends we read back, and valid JSONL from others with them raw is
accepted, with line numbers that count "\\n"."""

import gzip
import json

import pytest

from clo.errors import CloError
from clo.eval.prompts import load_prompts
from clo.eval.report import write_jsonl
from clo.jsonl import RAW_LINE_BREAKS, dumps_line, read_lines, split_lines
from clo.pairs import load_pairs
from clo.translate.parallel_pairs import continuation_pairs
from clo.translate.sft_sources import read_sft_source

# every character str.splitlines() ends a line at, found by asking it
SPLITLINES_BREAKS = [c for c in map(chr, range(0x110000)) if len(f"a{c}b".splitlines()) > 1]
TRICKY = "".join(SPLITLINES_BREAKS) + " Kiswahili: habari, 你好, ẹ kú àárọ̀"


def test_the_escaped_set_is_what_splitlines_breaks_at_and_json_leaves_raw():
    assert len(SPLITLINES_BREAKS) == 10  # \n \v \f \r \x1c \x1d \x1e \x85 \u2028 \u2029
    raw = [c for c in SPLITLINES_BREAKS if c in json.dumps(c, ensure_ascii=False)]
    assert sorted(raw) == sorted(RAW_LINE_BREAKS)


def test_dumps_line_is_one_line_for_every_reader_and_keeps_text_readable():
    record = {"id": "x", "text": TRICKY, "nested": [TRICKY, {"k": TRICKY}]}
    line = dumps_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    assert len(line.splitlines()) == 1 and len(line.encode().splitlines()) == 1
    assert json.loads(line) == record
    assert "你好" in line and "ẹ kú àárọ̀" in line  # not \u-escaped


def test_split_lines_breaks_at_newline_only():
    assert split_lines("") == []
    assert split_lines("a\nb") == ["a", "b"] == split_lines("a\nb\n") == split_lines("a\r\nb\r\n")
    assert split_lines("\n\n") == ["", ""]
    assert split_lines("a\u2028b\x85c\rd\n") == ["a\u2028b\x85c\rd"]


def test_read_lines_errors(tmp_path):
    with pytest.raises(CloError, match=r"missing.txt: no such file$"):
        read_lines(tmp_path / "missing.txt")
    with pytest.raises(CloError, match=r": is a folder, not a file$"):
        read_lines(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(CloError, match=r"latin1.txt: not UTF-8 text \(invalid continuation byte at byte 3\)$"):
        read_lines(tmp_path / "latin1.txt")


def pair(i: int, text: str = "") -> dict:
    return {"id": f"p{i}", "lang": "sw", "prompt_en": f"Question {i}?{text}", "response_en": f"Answer{text}",
            "prompt": f"Swali {i}?{text}", "response": f"Jibu{text}"}


def raw_jsonl(records) -> str:
    """JSONL as other tools write it: UTF-8 with U+2028 and U+0085 raw inside strings."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def test_cross_lingual_pairs_round_trip_and_others_jsonl_is_accepted(tmp_path):
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    records = [pair(i, TRICKY) for i in range(3)]
    write_jsonl(ours, records)
    theirs.write_text(raw_jsonl(records), encoding="utf-8")
    for path in (ours, theirs):
        examples = load_pairs(path, "sw").examples
        assert [ex.response for ex in examples] == [r["response"] for r in records]
    # line numbers count "\n": the bad record is line 3, whatever U+2028s came before it
    theirs.write_text(raw_jsonl(records[:2]) + '{"id": "p2"}\n', encoding="utf-8")
    with pytest.raises(CloError, match=r"theirs.jsonl:3: missing field 'lang'"):
        load_pairs(theirs)


def test_prompts_read_raw_line_breaks(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(raw_jsonl([{"instruction": f"Say\u2028hi {i}.\x85"} for i in range(2)]) + '{"instruction": ""}\n')
    with pytest.raises(CloError, match=r"prompts.jsonl:3: field 'instruction' is missing or empty"):
        load_prompts(path)
    path.write_text(raw_jsonl([{"instruction": f"Say\u2028hi {i}.\x85"} for i in range(2)]))
    assert [p.text for p in load_prompts(path)] == ["Say\u2028hi 0.\x85", "Say\u2028hi 1.\x85"]
    cross = tmp_path / "cross.jsonl"
    write_jsonl(cross, [pair(0, TRICKY)])
    assert [p.text for p in load_prompts(cross)] == [pair(0, TRICKY)["prompt"], pair(0, TRICKY)["prompt_en"]]


def test_sft_sources_read_raw_line_breaks(tmp_path):
    rows = [{"prompt": f"P{i}\u2028more", "response": f"R{i}\u2029more\x85"} for i in range(3)]
    plain, packed = tmp_path / "plain.jsonl", tmp_path / "plain2.jsonl.gz"
    plain.write_text(raw_jsonl(rows), encoding="utf-8")
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(raw_jsonl(rows))
    for path in (plain, packed):
        examples = read_sft_source(path).examples
        assert [(e.prompt, e.response) for e in examples] == [(r["prompt"], r["response"]) for r in rows]
        assert examples[-1].id.endswith("-3")  # the id counts lines by "\n"


def test_parallel_files_are_split_at_newline_only(tmp_path):
    """Line-aligned text files define a line by "\\n": a U+2028 inside a sentence must not shift
    every later line (splitlines() made the files look misaligned, or silently mispaired them)."""
    src, tgt = tmp_path / "en.txt", tmp_path / "sw.txt"
    src.write_text("One.\nTwo\u2028still two.\nThree.\n", encoding="utf-8")
    tgt.write_text("Moja.\nMbili.\nTatu\x85bado tatu.\n", encoding="utf-8")
    records = continuation_pairs(src, tgt, "sw", context=1)
    assert [(r["id"], r["response_en"], r["response"]) for r in records] == [
        ("sw.txt:2", "Two\u2028still two.", "Mbili."), ("sw.txt:3", "Three.", "Tatu\x85bado tatu.")]
