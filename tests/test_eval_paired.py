"""Paired differences (clo/eval/paired.py) by hand, and identical answers in held-out preference (clo/eval/preference.py)."""

import random

import pytest
import torch

from clo.errors import CloError
from clo.eval.paired import answer_differences, heldout_differences
from clo.eval.preference import heldout_rows, preference_metrics
from clo.train.batching import SEQUENCE_NAMES, EncodedExample


def examples(n, seed=0):
    g = random.Random(seed)
    return [EncodedExample(f"p{i}", [([1, 2], [3 + k] * g.randint(1, 9)) for k in range(4)]) for i in range(n)]


def logps(n, seed):
    return -torch.rand(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 50


def test_identical_answers_count_half_and_add_no_margin():
    same = EncodedExample("s", [([1], [5, 6]), ([1], [5, 6]), ([2], [5, 6]), ([2], [5, 6])])  # y_t == y_en
    other = EncodedExample("o", [([1], [5]), ([1], [7, 8]), ([2], [7, 8]), ([2], [5])])
    lp = torch.tensor([[-3.0, -3.0 - 1e-6, -4.0, -4.0 + 1e-6],  # rounding alone separates the same answer twice
                       [-1.0, -9.0, -2.0, -1.0]])  # en prefers y_en by 8; t prefers y_en by 1
    m = preference_metrics(lp, [same, other])
    assert m["same_answers"] == 1
    assert m["pref_t"] == m["pref_t_per_token"] == 0.25 and m["pref_en"] == m["pref_en_per_token"] == 0.75
    assert m["margin_t"] == pytest.approx(-1.0 / 2) and m["margin_en"] == pytest.approx(8.0 / 2)
    assert m["nll_t"] == pytest.approx(6 / 4)  # likelihood counts every pair


def test_heldout_difference_is_the_difference_of_the_numbers_and_its_interval_is_paired():
    ex = examples(20)
    a_lp, b_lp = logps(20, 1), logps(20, 2)
    got = heldout_differences(heldout_rows("a", a_lp, ex), heldout_rows("b", b_lp, ex))
    ma, mb = preference_metrics(a_lp, ex), preference_metrics(b_lp, ex)
    for key, d in got.items():
        assert d["value"] == pytest.approx(ma[key] - mb[key], abs=1e-6), key
        assert d["ci95"][0] <= d["value"] <= d["ci95"][1], key

    # A = B with every y_t given x_t one nat likelier: the margin differs by exactly 1 on every pair, so a
    # paired interval is the point [1, 1], where the two models' own intervals are tens of nats wide
    shifted = b_lp.clone()
    shifted[:, SEQUENCE_NAMES.index("t_t")] += 1.0
    got = heldout_differences(heldout_rows("a", shifted, ex), heldout_rows("b", b_lp, ex))
    assert got["margin_t"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert got["margin_t"]["ci95"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert got["margin_en"]["value"] == 0 and got["margin_en"]["ci95"] == [0.0, 0.0]


def test_heldout_pairs_are_matched_by_id_not_by_line():
    ex = examples(6)
    a_lp, b_lp = logps(6, 3), logps(6, 4)
    b_rows = heldout_rows("b", b_lp, ex)
    in_order = heldout_differences(heldout_rows("a", a_lp, ex), b_rows)
    assert heldout_differences(heldout_rows("a", a_lp, ex), b_rows[::-1]) == in_order
    with pytest.raises(CloError, match="different held-out pairs"):
        heldout_differences(heldout_rows("a", a_lp, ex), b_rows[:-1])


def records(grades):
    """One answer record per (prompt language, answer language, degenerate)."""
    return [{"set": "s", "id": f"q{i}", "prompt_lang": p, "answer_lang": a, "degenerate": "loop" if d else None}
            for i, (p, a, d) in enumerate(grades)]  # fmt: skip


def test_answer_differences_by_hand():
    a = records([("sw", "sw", 0), ("sw", "sw", 1), ("sw", "en", 0), ("sw", "sw", 0), ("en", "en", 0), ("en", "en", 0)])
    b = records([("sw", "en", 0), ("sw", "sw", 1), ("sw", "en", 1), ("sw", "sw", 0), ("en", "sw", 0), ("en", "en", 0)])
    got = answer_differences(a, b)
    assert got["sw"]["in_lang_rate"]["value"] == pytest.approx(3 / 4 - 2 / 4)
    assert got["sw"]["degenerate_rate"]["value"] == pytest.approx(1 / 4 - 2 / 4)
    assert got["en"]["in_lang_rate"]["value"] == pytest.approx(1 - 1 / 2)
    for lang in got.values():
        for d in lang.values():
            assert d["ci95"][0] <= d["value"] <= d["ci95"][1]
    same = answer_differences(a, list(reversed(a)))  # a model against itself: zero, and a point interval
    assert all(d["value"] == 0 and d["ci95"] == [0.0, 0.0] for lang in same.values() for d in lang.values())
    with pytest.raises(CloError, match="different prompts"):
        answer_differences(a, b[:-1])
