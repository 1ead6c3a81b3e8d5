"""95% percentile-bootstrap intervals: how far a held-out number could move with another sample of items.

For N items (held-out pairs, or answers), draw B = 1000 resamples of N items with replacement (within
each stratum, e.g. per prompt language, so each keeps its size), compute the number on every resample,
and report its 2.5th and 97.5th percentiles (Efron & Tibshirani 1993, ch. 13). On 24 pairs a rate
moves in steps of 4.2 points, and the interval says how many of those steps separate two models.
Seeded: the same items give the same interval on every run and every process.

The interval is of one model's number on this held-out sample; it says nothing of other seeds or
other training data, and two models' intervals overlapping is not a test of their difference.
"""

from collections.abc import Callable

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def intervals(n: int, statistic: Callable[[np.ndarray], dict[str, np.ndarray]], strata: list | None = None,
              resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, list[float] | None]:
    """{key: [lo, hi]} of every number `statistic(indices)` returns, where indices [resamples, n] holds
    one resample of the n items per row and the statistic gives one value per row ([resamples]).

    strata: a label per item; each resample draws within each label as many items as it has.
    Rows where a number is not finite (NaN: a rate over no answers) are left out; None where all are.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n if strata is None else strata)
    groups = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    idx = np.concatenate([g[rng.integers(0, len(g), (resamples, len(g)))] for g in groups], axis=1) if n else np.zeros((resamples, 0), int)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    out = {}
    for key, values in statistic(idx).items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = [float(x) for x in np.quantile(values, q)] if len(values) else None
    return out
