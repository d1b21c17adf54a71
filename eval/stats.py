"""Paired bootstrap: is the fine-tune's gain on this held-out set real?

Both columns answered the same examples, so resample *examples* (with replacement), recompute
the metric for both columns on the same resample, and take the spread of the difference. With
200 examples, +3 points can easily be noise; the interval says so.
"""

from __future__ import annotations

import numpy as np

from eval.metrics import Metric, Outcome


def paired_bootstrap(metric: Metric, base: list[Outcome], tuned: list[Outcome], samples: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(delta, low, high): fine-tuned minus base on the full set, and the percentile interval."""
    assert len(base) == len(tuned)
    n = len(base)
    delta = metric.compute(tuned) - metric.compute(base)
    if n == 0:
        return delta, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n))
    if metric.is_mean:  # resampled means from one matrix operation
        diff = np.array([metric.per_example(t) - metric.per_example(b) for b, t in zip(base, tuned)])
        deltas = diff[draws].mean(axis=1)
    else:
        deltas = np.array([metric.compute([tuned[i] for i in row]) - metric.compute([base[i] for i in row])
                           for row in draws])
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(deltas, [tail, 100 - tail])
    return float(delta), float(low), float(high)


def mean_interval(values, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of per-item values by the percentile bootstrap over items. Given paired
    differences (fine-tuned minus base on the same item) it is the paired interval of the delta."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values[draws].mean(axis=1), [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)
