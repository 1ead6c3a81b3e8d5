"""The 95% bootstrap intervals of eval.py (clo/eval/bootstrap.py): properties of the percentile
bootstrap, and the vectorised statistics against `fidelity` / `preference_metrics` computed item by
item on the very same resamples (drawn here as `intervals` draws them)."""

import math
import random

import numpy as np
import pytest
import torch

from clo.eval.bootstrap import RESAMPLES, intervals
from clo.eval.generation import fidelity, fidelity_intervals
from clo.eval.preference import preference_intervals, preference_metrics
from clo.train.batching import EncodedExample


def same_draws(labels: list, seed: int = 0) -> np.ndarray:
    """The resample indices [RESAMPLES, n] `intervals` draws for these strata (its documented scheme)."""
    rng = np.random.default_rng(seed)
    labels = np.array(labels)
    groups = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    return np.concatenate([g[rng.integers(0, len(g), (RESAMPLES, len(g)))] for g in groups], axis=1)


def percentile(values: list[float]) -> list[float]:
    return [float(x) for x in np.quantile(np.array(values), [0.025, 0.975])]


def test_a_sample_of_equal_items_has_a_point_interval():
    items = np.full(10, 3.0)
    got = intervals(10, lambda idx: {"mean": items[idx].mean(1)})
    assert got == {"mean": [3.0, 3.0]}


def test_a_rate_matches_the_normal_approximation():
    """400 Bernoulli items with 120 ones: p = 0.3 ± 1.96·sqrt(p(1−p)/n) = ± 0.0449 (a textbook check;
    1000 resamples leave ~0.005 of Monte Carlo noise on each bound)."""
    items = np.array([1.0] * 120 + [0.0] * 280)
    lo, hi = intervals(len(items), lambda idx: {"p": items[idx].mean(1)})["p"]
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert lo == pytest.approx(0.3 - half, abs=0.01) and hi == pytest.approx(0.3 + half, abs=0.01)


def test_seeded_stratified_and_nan_rows_left_out():
    labels = ["a"] * 3 + ["b"] * 5
    count_a = lambda idx: {"a": (idx < 3).sum(1).astype(float)}  # noqa: E731
    assert intervals(8, count_a, strata=labels) == {"a": [3.0, 3.0]}  # each resample keeps 3 items of stratum a
    values = np.arange(8.0)
    mean = lambda idx: {"m": values[idx].mean(1)}  # noqa: E731
    assert intervals(8, mean, seed=1) == intervals(8, mean, seed=1) != intervals(8, mean, seed=2)
    nan_rows = lambda idx: {"x": np.where(idx[:, 0] == 0, np.nan, 1.0), "never": np.full(len(idx), np.nan)}  # noqa: E731
    assert intervals(8, nan_rows) == {"x": [1.0, 1.0], "never": None}


def test_fidelity_intervals_equal_fidelity_on_each_resample():
    g = random.Random(0)
    records = [{"prompt_lang": lang, "answer_lang": g.choice(["sw", "en", "fr"]), "degenerate": g.choice([None, None, "loop"]),
                "hit_max_new_tokens": False} for lang in ("sw", "en") for _ in range(7)]
    g.shuffle(records)  # the strata interleaved, as eval.py's records are not
    draws = same_draws([r["prompt_lang"] for r in records])
    by_row = [fidelity([records[i] for i in row]) for row in draws]
    got = fidelity_intervals(records)
    for lang in ("sw", "en"):
        for key in ("in_lang_rate", "in_lang_rate_ok", "degenerate_rate"):
            values = [f[lang][key] for f in by_row if f[lang][key] is not None]
            assert got[lang][key] == pytest.approx(percentile(values)), (lang, key)


def test_preference_intervals_equal_preference_metrics_on_each_resample():
    g = random.Random(1)
    examples = [EncodedExample(str(i), [([1], [0] * g.randint(1, 9)) for _ in range(4)]) for i in range(9)]
    logps = -torch.rand(9, 4, generator=torch.Generator().manual_seed(0)) * 50
    draws = same_draws([0] * 9)
    by_row = [preference_metrics(logps[torch.from_numpy(row)], [examples[i] for i in row]) for row in draws]
    got = preference_intervals(logps, examples)
    assert set(got) == {"pref_t", "margin_t", "pref_t_per_token", "pref_en", "margin_en", "pref_en_per_token", "nll_t", "nll_en"}
    for key, ci in got.items():
        assert ci == pytest.approx(percentile([m[key] for m in by_row]), rel=1e-5), key
        point = preference_metrics(logps, examples)[key]
        assert ci[0] <= point <= ci[1], key
