"""Paired bootstrap confidence intervals: is one method's score over a set of images different from another's?

Both methods are scored on the same images, so the images are resampled in pairs: each resample draws n image
indices with replacement (``numpy.random.default_rng(seed).integers(0, n, (resamples, n))``, the draw
``scipy.stats.bootstrap`` makes for ``paired=True``), recomputes the statistic of both methods on the drawn images
and keeps the difference. The interval is the percentile interval of those differences, or the BCa interval
(bias-corrected and accelerated, Efron 1987; acceleration from the jackknife over images), as
``scipy.stats.bootstrap`` computes them.

The statistic need not be a mean: MaxBoxAccV2 is a maximum over map thresholds of the fraction of images whose
box hits, taken over the whole data set, so :func:`max_box_acc_value` recomputes that maximum inside each
resample from the images' IoU curves.

>>> res = paired_bootstrap(polycam_insertion, gradcam_insertion)        # per-image values, same image order
>>> res.estimate, res.low, res.high, res.excludes_zero
>>> paired_bootstrap(polycam_curves, gradcam_curves, max_box_acc_value)   # Tensor/array [n, T] each
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from camkit.errors import CamkitError

__all__ = ["PairedBootstrap", "max_box_acc_value", "mean_statistic", "paired_bootstrap"]

Statistic = Callable[[NDArray[np.float64]], float]
"""A statistic of one method over a set of images: its values (first axis: images) -> one number."""


@dataclass(frozen=True)
class PairedBootstrap:
    """A paired bootstrap interval of statistic(a) - statistic(b).

    Attributes:
        estimate: the difference on all the images.
        low: the interval's lower end.
        high: its upper end.
        confidence: the interval's confidence level (0.95: a 95% interval).
        resamples: how many resamples it was computed from.
        n: the number of images (pairs).
        method: ``"percentile"`` or ``"bca"``.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int
    n: int
    method: str

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval is above or below zero: the difference is significant."""
        return self.low > 0 or self.high < 0

    @property
    def sign(self) -> int:
        """1 when the interval is above zero, -1 when below, 0 when it contains zero."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


def mean_statistic(values: NDArray[np.float64]) -> float:
    """The mean over images (the first axis)."""
    return float(np.mean(values, axis=0))


def max_box_acc_value(
    curves: NDArray[np.float64], iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7)
) -> float:
    """MaxBoxAccV2 of IoU curves Array[n, T] (one row per image, one column per map threshold).

    The mean over the IoU thresholds delta of max_t (fraction of images with IoU >= delta at threshold t): the
    value of :func:`camkit.metrics.max_box_acc_v2`, in numpy, for use as a bootstrap statistic.
    """
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0:
        raise CamkitError(f"max_box_acc_value needs IoU curves Array[n, T] with n >= 1; got shape {c.shape}")
    return float(np.mean([(c >= d).mean(axis=0).max() for d in iou_thresholds]))


def _check(a: NDArray[np.float64], b: NDArray[np.float64], resamples: int, confidence: float) -> None:
    if a.shape[:1] != b.shape[:1] or a.ndim == 0:
        raise CamkitError(
            f"paired_bootstrap needs the two methods' values on the same images (first axis); got shapes "
            f"{a.shape} and {b.shape}: pass one value (or curve) per image, in the same image order"
        )
    if a.shape[0] < 2:
        raise CamkitError(f"paired_bootstrap needs at least 2 images, got {a.shape[0]}")
    if resamples < 1:
        raise CamkitError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise CamkitError(f"confidence must be between 0 and 1 (0.95 for a 95% interval), got {confidence}")


def _bca_levels(
    dist: NDArray[np.float64], estimate: float, jackknife: NDArray[np.float64], alpha: float
) -> tuple[float, float]:
    """BCa's two percentile levels (0..1): bias z0 from the resamples, acceleration from the jackknife."""
    norm = NormalDist()
    share = float(((dist < estimate).sum() + (dist <= estimate).sum()) / (2 * dist.size))
    share = min(max(share, 1.0 / (2 * dist.size)), 1 - 1.0 / (2 * dist.size))
    z0 = norm.inv_cdf(share)
    u = jackknife.mean() - jackknife
    den = float((u**2).sum()) ** 1.5
    acc = float((u**3).sum()) / (6 * den) if den > 0 else 0.0
    levels = []
    for z in (norm.inv_cdf(alpha), norm.inv_cdf(1 - alpha)):
        levels.append(norm.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z))))
    return levels[0], levels[1]


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    statistic: Statistic | None = None,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    method: Literal["percentile", "bca"] = "percentile",
) -> PairedBootstrap:
    """The paired bootstrap interval of statistic(a) - statistic(b) over images.

    Args:
        a: the first method's values, Array[n, ...]: one value (or one IoU curve, ...) per image.
        b: the second method's, on the same n images in the same order.
        statistic: values of a set of images -> one number (default: the mean, :func:`mean_statistic`;
            :func:`max_box_acc_value` for MaxBoxAccV2 from IoU curves).
        resamples: bootstrap resamples (2000 or more for a 95% interval).
        confidence: the interval's level.
        seed: the seed of the resampling (the same seed gives the same interval).
        method: ``"percentile"`` (the quantiles of the resampled differences) or ``"bca"``.

    Raises:
        CamkitError: different numbers of images, fewer than 2, a bad level or resample count or method.
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check(xa, xb, resamples, confidence)
    if method not in ("percentile", "bca"):
        raise CamkitError(f"method must be 'percentile' or 'bca', got {method!r}")
    stat = statistic or mean_statistic
    n = xa.shape[0]

    def diff(idx: NDArray[np.intp]) -> float:
        return stat(xa[idx]) - stat(xb[idx])

    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))
    dist = np.array([diff(i) for i in draws], dtype=np.float64)
    estimate = diff(np.arange(n))
    alpha = (1 - confidence) / 2
    lo_level, hi_level = alpha, 1 - alpha
    if method == "bca" and float(dist.max() - dist.min()) > 0:
        jack = np.array([diff(np.delete(np.arange(n), i)) for i in range(n)], dtype=np.float64)
        lo_level, hi_level = _bca_levels(dist, estimate, jack, alpha)
    low, high = np.percentile(dist, [100 * lo_level, 100 * hi_level])
    return PairedBootstrap(estimate, float(low), float(high), confidence, resamples, n, method)
