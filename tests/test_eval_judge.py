"""Pairwise judging (clo/eval/judge.py): verdict parsing, both orders, the language rule, AlpacaEval export."""

import pytest
from tiny_chat_model import make_tiny_chat_model

import clo.eval.judge as judge_module
from clo.eval.judge import alpaca_eval_outputs, judge_pairs, parse_verdict
from clo.model.chat import detect_format
from clo.model.tokenizer import load_tokenizer


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Output (a)", "a"),
        ("output (B)", "b"),
        ("Output (b) is better because it answers in Swahili.", "b"),
        ("Output (a) is better than Output (b).", "a"),  # both named, but it opens with its verdict
        ("(b)", "b"),
        ("b.", "b"),
        ("**Output (a)**", "a"),
        ("Output a", "a"),
        ("I think Output (b) is worse than Output (a).", None),  # both named, no opening verdict: malformed
        ("Both are fine.", None),
        ("", None),
        ("\n\n\n", None),
        ("about", None),  # a word starting with a or b is not a label
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("judge"), ["Output (a) Output (b) GOOD bad answer instruction"] * 20)


@pytest.fixture(scope="module")
def tiny_judge(tiny_folder):
    tok = load_tokenizer(tiny_folder)
    return tok, detect_format(tok)


def record(i, answer, answer_lang="sw", prompt_lang="sw"):
    return {"set": "s", "id": str(i), "prompt_lang": prompt_lang, "prompt": f"swali {i}", "answer": answer, "answer_lang": answer_lang}


def scripted_judge(monkeypatch, tok, rule):
    """Replace generation in clo.eval.judge: the reply is rule(judge prompt text), encoded."""

    def fake_generate(model, prompts, max_new_tokens, stop_ids, pad_id):
        return [tok.encode(rule(tok.decode(ids, skip_special=False))) for ids in prompts]

    monkeypatch.setattr(judge_module, "generate", fake_generate)


def good_one(prompt: str) -> str:
    """A fair judge: picks the output containing GOOD."""
    a_part = prompt.split("# Output (a)")[1].split("# Output (b)")[0]
    return "Output (a)" if "GOOD" in a_part else "Output (b)"


def test_fair_judge_both_orders(monkeypatch, tiny_judge):
    tok, fmt = tiny_judge
    scripted_judge(monkeypatch, tok, good_one)
    a = [record(0, "GOOD"), record(1, "GOOD"), record(2, "bad")]
    b = [record(0, "bad"), record(1, "bad"), record(2, "GOOD")]
    rows, summary = judge_pairs(None, tok, fmt, a, b, batch_size=2)
    assert summary["win_rate"] == pytest.approx(2 / 3)
    assert (summary["wins"], summary["losses"], summary["ties"], summary["n_judgments"]) == (4, 2, 0, 6)
    assert sorted((r["id"], r["a_shown_first"]) for r in rows) == [(i, o) for i in "012" for o in (False, True)]


def test_position_bias_cancels(monkeypatch, tiny_judge):
    tok, fmt = tiny_judge
    scripted_judge(monkeypatch, tok, lambda prompt: "Output (a)")  # always the first shown
    a, b = [record(i, "x") for i in range(4)], [record(i, "y") for i in range(4)]
    _, summary = judge_pairs(None, tok, fmt, a, b, batch_size=3)
    assert summary["win_rate"] == 0.5 and summary["ties"] == 0


def test_malformed_replies_are_ties(monkeypatch, tiny_judge):
    tok, fmt = tiny_judge
    scripted_judge(monkeypatch, tok, lambda prompt: "I cannot decide")
    rows, summary = judge_pairs(None, tok, fmt, [record(0, "x")], [record(0, "y")], batch_size=2)
    assert summary["win_rate"] == 0.5 and summary["malformed"] == 2 and summary["ties"] == 2
    assert all(r["decided_by"] == "malformed" and r["reply"] == "I cannot decide" for r in rows)


def test_wrong_language_loses_without_asking(monkeypatch, tiny_judge):
    tok, fmt = tiny_judge
    scripted_judge(monkeypatch, tok, lambda prompt: "Output (a)")
    a = [record(0, "GOOD", answer_lang="en"), record(1, "x", answer_lang="en")]
    b = [record(0, "bad", answer_lang="sw"), record(1, "y", answer_lang="en")]
    rows, summary = judge_pairs(None, tok, fmt, a, b, batch_size=2)
    assert summary["decided_by_language"] == 2  # prompt 0, both orders; prompt 1 (both wrong) goes to the judge
    assert [r["score_a"] for r in rows if r["id"] == "0"] == [0.0, 0.0]
    assert summary["win_rate"] == pytest.approx((0 + 0 + 1 + 0) / 4)
    _, asked = judge_pairs(None, tok, fmt, a, b, batch_size=2, language_check="judge")
    assert asked["decided_by_language"] == 0


def test_judge_prompt_has_the_language_rule_and_both_answers(monkeypatch, tiny_judge):
    tok, fmt = tiny_judge
    seen = []
    scripted_judge(monkeypatch, tok, lambda prompt: seen.append(prompt) or "Output (a)")
    judge_pairs(None, tok, fmt, [record(0, "first answer")], [record(0, "second answer")], batch_size=2)
    assert len(seen) == 2
    assert all("different language from the instruction is always worse" in p and "swali 0" in p for p in seen)
    assert seen[0].index("first answer") < seen[0].index("second answer")
    assert seen[1].index("second answer") < seen[1].index("first answer")


def test_real_generation_path_runs(tiny_folder, tiny_judge):
    """Unscripted: the tiny judge's reply is whatever it is; every judgment is a verdict or a tie."""
    from clo.model.hf_folder import load_model

    tok, fmt = tiny_judge
    rows, summary = judge_pairs(load_model(tiny_folder), tok, fmt, [record(0, "x")], [record(0, "y")], batch_size=2, max_new_tokens=4)
    assert summary["n_judgments"] == 2 and summary["wins"] + summary["losses"] + summary["ties"] == 2


def test_alpaca_eval_export():
    rows = alpaca_eval_outputs([{**record(3, "jibu"), "set": "sw.heldout"}], "clo-sw")
    assert rows == [{"instruction": "swali 3", "output": "jibu", "generator": "clo-sw", "dataset": "sw.heldout", "id": "3", "lang": "sw"}]
