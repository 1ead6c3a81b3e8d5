"""The shipped demo set data/demo/*.jsonl: format, alignment across languages, and that each
target text really is in its language (script checks always; py3langid when it is installed)."""

import json
import re
import unicodedata

import pytest

from clo.languages import TARGET_CODES
from clo.pairs import FIELDS, demo_path, load_pairs

N_TRAIN, N_HELDOUT = 128, 16
LATIN_LANGS = ("sw", "yo", "id", "de")


def read_records(lang: str, heldout: bool) -> list[dict]:
    """Parse a demo file line by line with json alone, independent of clo.pairs."""
    path = demo_path(lang, heldout=heldout)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_records(lang: str) -> list[dict]:
    return read_records(lang, heldout=False) + read_records(lang, heldout=True)


@pytest.mark.parametrize("lang", TARGET_CODES)
def test_files_parse_with_expected_counts_and_key_order(lang):
    for heldout, expected in ((False, N_TRAIN), (True, N_HELDOUT)):
        path = demo_path(lang, heldout=heldout)
        raw = path.read_bytes()
        assert not raw.startswith(b"\xef\xbb\xbf"), f"{path.name}: has a UTF-8 byte-order mark"
        assert raw.endswith(b"\n") and b"\r" not in raw, f"{path.name}: lines must end in a bare \\n"
        assert b"\\u" not in raw, f"{path.name}: written with ensure_ascii=True"
        records = read_records(lang, heldout)
        assert len(records) == expected
        for record in records:
            assert tuple(record) == FIELDS  # same keys, same order
        # the project's own loader accepts the file, with nothing skipped
        report = load_pairs(path, lang=lang)
        assert len(report.examples) == expected and report.duplicates == 0


@pytest.mark.parametrize("lang", TARGET_CODES)
def test_ids_unique_consecutive_and_split(lang):
    train, heldout = read_records(lang, False), read_records(lang, True)
    assert [r["id"] for r in train] == [f"demo-{i:03d}" for i in range(N_TRAIN)]
    assert [r["id"] for r in heldout] == [f"demo-{i:03d}" for i in range(N_TRAIN, N_TRAIN + N_HELDOUT)]


@pytest.mark.parametrize("lang", TARGET_CODES)
def test_lang_field_matches_file_and_no_field_is_blank(lang):
    for record in all_records(lang):
        assert record["lang"] == lang
        for field in FIELDS:
            value = record[field]
            assert isinstance(value, str) and value.strip(), (record["id"], field)
            assert value == value.strip() and "\n" not in value, (record["id"], field)
            assert unicodedata.is_normalized("NFC", value), (record["id"], field)


def test_english_is_identical_across_languages():
    reference = [(r["id"], r["prompt_en"], r["response_en"]) for r in all_records(TARGET_CODES[0])]
    assert len({p for _, p, _ in reference}) == len(reference), "duplicate English prompts"
    for lang in TARGET_CODES[1:]:
        assert [(r["id"], r["prompt_en"], r["response_en"]) for r in all_records(lang)] == reference, lang


def test_english_has_the_documented_shape():
    for r in all_records(TARGET_CODES[0]):
        prompt, response = r["prompt_en"], r["response_en"]
        assert 5 <= len(prompt.split()) <= 20, r["id"]
        assert 10 <= len(response.split()) <= 50, r["id"]
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", response)) <= 3, r["id"]
        assert not re.search(r"translate", prompt, re.IGNORECASE), r["id"]
        assert not re.search(r"[`*#]|^\s*(?:-|\d+\.)\s", prompt + "\n" + response, re.MULTILINE), r["id"]


@pytest.mark.parametrize("lang", TARGET_CODES)
def test_target_text_differs_from_english(lang):
    for r in all_records(lang):
        assert r["prompt"].casefold() != r["prompt_en"].casefold(), r["id"]
        assert r["response"].casefold() != r["response_en"].casefold(), r["id"]


def script_share(text: str, in_script) -> float:
    """Fraction of the letters in `text` (digits, spaces and punctuation ignored) that are in a script."""
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    return sum(map(in_script, letters)) / max(len(letters), 1)


def is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf"


def is_hangul(c: str) -> bool:
    return "\uac00" <= c <= "\ud7a3" or "\u1100" <= c <= "\u11ff" or "\u3130" <= c <= "\u318f"


@pytest.mark.parametrize("lang, in_script", [("zh", is_cjk), ("ko", is_hangul)])
def test_cjk_and_hangul_texts_are_in_their_script(lang, in_script):
    for r in all_records(lang):
        for field in ("prompt", "response"):
            assert script_share(r[field], in_script) >= 0.9, (r["id"], field, r[field])


@pytest.mark.parametrize("lang", LATIN_LANGS)
def test_latin_script_texts_are_latin(lang):
    is_latin = lambda c: unicodedata.name(c, "").startswith("LATIN")  # noqa: E731
    for r in all_records(lang):
        assert script_share(r["prompt"] + r["response"], is_latin) == 1.0, r["id"]


def test_yoruba_carries_tone_marks_and_subdots():
    """Standard written Yoruba marks high and low tones and writes ẹ ọ ṣ with a dot below."""
    for r in all_records("yo"):
        decomposed = unicodedata.normalize("NFD", r["prompt"] + r["response"])
        assert "\u0301" in decomposed or "\u0300" in decomposed, r["id"]  # acute / grave
    text = unicodedata.normalize("NFD", "".join(r["response"] for r in all_records("yo")))
    assert text.count("\u0323") > 500  # combining dot below, as in ẹ ọ ṣ


@pytest.mark.parametrize("lang", ["sw", "id", "ko", "zh", "de"])  # py3langid has no Yoruba model
def test_language_id_prefers_target_over_english(lang):
    py3langid = pytest.importorskip("py3langid")
    records = all_records(lang)
    wins = 0
    for r in records:
        scores = dict(py3langid.rank(r["prompt"] + " " + r["response"]))
        wins += scores[lang] > scores["en"]
    assert wins >= 0.95 * len(records), f"{lang}: only {wins}/{len(records)} records scored above English"
