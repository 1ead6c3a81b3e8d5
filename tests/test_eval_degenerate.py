"""Degenerate answers (clo/eval/degenerate.py): scores by hand, real answers pass, echoes and loops are caught."""

import pytest

from clo.eval.degenerate import classify_answer, copy_score, repeat_score, units
from clo.languages import TARGET_CODES
from clo.pairs import demo_path, load_pairs


def test_units_split_words_and_unspaced_scripts():
    assert units("Hello, World! 42") == ["hello", "world", "42"]
    assert units("我爱你。") == ["我", "爱", "你"]
    assert units("안녕하세요 세계") == ["안녕하세요", "세계"]  # Korean is written with spaces


def test_scores_by_hand():
    # answer 3-grams: (a b c) (b c d); the prompt has (a b c) only -> 1/2
    assert copy_score("x a b c y", "a b c d") == pytest.approx(0.5)
    # 3-grams of "a b c a b c": abc bca cab abc -> 3 distinct of 4 -> 1 - 3/4
    assert repeat_score("a b c a b c") == pytest.approx(0.25)
    # shorter than n: scored with n = its length; "b c" is in the prompt
    assert copy_score("a b c", "b c") == 1.0
    assert repeat_score("ok") == 0.0


def test_real_answers_are_not_degenerate():
    """Every human-written answer of the demo sets (both languages, all six targets) passes."""
    for code in TARGET_CODES:
        for held_out in (False, True):
            for ex in load_pairs(demo_path(code, held_out)).examples:
                for prompt, answer in ((ex.prompt, ex.response), (ex.prompt_en, ex.response_en)):
                    verdict = classify_answer(prompt, answer)
                    assert not verdict.degenerate, (code, ex.id, verdict)


def test_echo_loop_and_empty_are_caught():
    ex = load_pairs(demo_path("sw", heldout=True)).examples[0]
    assert classify_answer(ex.prompt, ex.prompt).reason == "copy"
    assert classify_answer(ex.prompt, f"{ex.prompt} Ndiyo.").reason == "copy"
    assert classify_answer(ex.prompt, "Osha jeraha. " * 12).reason == "repeat"
    assert classify_answer(ex.prompt, " \n\n ").reason == "empty"
    zh = load_pairs(demo_path("zh", heldout=True)).examples[0]
    assert classify_answer(zh.prompt, zh.response[:10] * 5).reason == "repeat"
    assert classify_answer(zh.prompt, zh.prompt).reason == "copy"


def test_thresholds_are_respected():
    prompt, answer = "x a b c y", "a b c d"  # copy score 0.5
    assert classify_answer(prompt, answer, copy_threshold=0.5).reason == "copy"
    assert classify_answer(prompt, answer, copy_threshold=0.51).reason is None


def test_in_word_loops():
    assert classify_answer("Eleza.", "Nangababababababa.").reason == "repeat"
    assert classify_answer("How many?", "About 1000000 of them.").reason is None  # digits are not a loop


def test_human_text_is_rarely_flagged(shared_data):
    """FLORES sentences of all 7 languages: never; AlpacaEval reference answers: <= 2% (copy-by-design tasks, emoji-only)."""
    import json

    for path in (shared_data / "flores200_devtest").glob("*.devtest"):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert not any(classify_answer("", line).degenerate for line in lines), path.name
    rows = [json.loads(line) for line in (shared_data / "alpaca" / "alpaca_eval_805.jsonl").read_text().splitlines()]
    flagged = sum(classify_answer(r["instruction"], r["output"]).degenerate for r in rows)
    assert flagged / len(rows) <= 0.02
