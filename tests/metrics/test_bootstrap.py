"""Paired bootstrap intervals (camkit.metrics.bootstrap): known answers and agreement with scipy.stats.bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from camkit.errors import CamkitError
from camkit.metrics import max_box_acc_v2, max_box_acc_value, paired_bootstrap


def _pair(n: int = 40, shift: float = 0.02, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.2, 0.5, n)
    return b + shift + rng.normal(0, 0.03, n), b


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_mean_difference_matches_scipy(method: str) -> None:
    a, b = _pair()
    ref = scipy.stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=2000,
        confidence_level=0.95,
        method=method,
        rng=np.random.default_rng(7),
    ).confidence_interval
    ours = paired_bootstrap(a, b, resamples=2000, seed=7, method="bca" if method == "BCa" else "percentile")
    # the same index draws: the same interval, up to floating-point summation order
    assert ours.low == pytest.approx(ref.low, abs=1e-9)
    assert ours.high == pytest.approx(ref.high, abs=1e-9)
    assert ours.estimate == pytest.approx(float(np.mean(a - b)))
    assert ours.excludes_zero and ours.sign == 1 and ours.n == 40


def test_known_answers() -> None:
    a, b = _pair()
    # identical methods: every resampled difference is 0
    same = paired_bootstrap(a, a)
    assert (same.estimate, same.low, same.high, same.sign) == (0.0, 0.0, 0.0, 0)
    # a constant shift: every resample's difference is the shift
    shifted = paired_bootstrap(b + 0.1, b, method="bca")
    assert shifted.low == pytest.approx(0.1) and shifted.high == pytest.approx(0.1)
    # swapping the methods mirrors the interval; a fixed seed repeats it
    ab, ba = paired_bootstrap(a, b, seed=3), paired_bootstrap(b, a, seed=3)
    assert ab.low == pytest.approx(-ba.high) and ab.high == pytest.approx(-ba.low)
    assert paired_bootstrap(a, b, seed=3) == ab
    # noise around zero: the interval contains it
    rng = np.random.default_rng(0)
    noise = paired_bootstrap(b + rng.normal(0, 0.05, b.size), b)
    assert noise.low < 0 < noise.high and not noise.excludes_zero
    # the interval of a mean difference is about +-1.96 standard errors wide
    d = a - b
    se = d.std(ddof=1) / np.sqrt(d.size)
    wide = paired_bootstrap(a, b, resamples=4000)
    assert wide.high - wide.low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_max_box_acc_statistic() -> None:
    rng = np.random.default_rng(0)
    curves = rng.uniform(0, 1, (30, 100))
    ref = max_box_acc_v2(torch.as_tensor(curves, dtype=torch.float32)).value
    assert max_box_acc_value(curves) == pytest.approx(ref, abs=1e-6)
    # hand-made: 2 images, 2 thresholds; delta 0.5 hit by both at t0, 0.3 by both, 0.7 by one at t1
    hand = np.array([[0.6, 0.8], [0.55, 0.4]])
    assert max_box_acc_value(hand) == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    # the dataset-level maximum is recomputed inside each resample
    better = np.clip(curves + 0.2, 0, 1)
    res = paired_bootstrap(better, curves, max_box_acc_value, resamples=500)
    assert res.estimate == pytest.approx(max_box_acc_value(better) - max_box_acc_value(curves))
    assert res.low > 0


def test_errors() -> None:
    a, b = _pair()
    with pytest.raises(CamkitError, match="same images"):
        paired_bootstrap(a, b[:-1])
    with pytest.raises(CamkitError, match="at least 2"):
        paired_bootstrap(a[:1], b[:1])
    with pytest.raises(CamkitError, match="confidence"):
        paired_bootstrap(a, b, confidence=95)
    with pytest.raises(CamkitError, match="resamples"):
        paired_bootstrap(a, b, resamples=0)
    with pytest.raises(CamkitError, match="method"):
        paired_bootstrap(a, b, method="basic")  # type: ignore[arg-type]
    with pytest.raises(CamkitError, match="Array"):
        max_box_acc_value(np.zeros(3))
