"""Faithfulness by removing regions in map order (the Quantus family).

* Pixel Flipping (Bach et al., PLoS ONE 2015): camkit's :func:`camkit.metrics.deletion` with one pixel (or
  ``features_in_step`` pixels) a step; :func:`pixel_flipping` is that call.
* Region Perturbation (Samek et al., IEEE TNNLS 2017): replace p x p squares, most (or least) relevant first by the
  map's sum on the square, cumulatively; AOPC, the mean score drop over the steps.
* Selectivity (Montavon et al., Digital Signal Processing 2018): the same removal of squares, most relevant first;
  the area under the score curve (lower is better).
* IROF (Rieger & Hansen, 2020): Iterative Removal Of Features: superpixels (SLIC) in decreasing order of the
  map's mean on them, cumulatively replaced by the image's mean; the area over the curve of the score relative
  to the unperturbed score.

Shared choices as in :mod:`camkit.metrics.correlation`: a feature is a pixel (all channels), ``"black"`` is the
image's minimum, maps are used as given, ties go in raster order, perturbed images go to the model in chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.metrics._common import Baseline, Forward, check_inputs
from camkit.metrics.faithfulness import Curve, deletion
from camkit.metrics.perturbed import (
    fill_baseline,
    group_steps,
    is_uniform,
    prepare,
    square_fill,
    square_grid,
    step_fill,
    step_scores,
)

__all__ = [
    "IrofResult",
    "RegionCurve",
    "irof",
    "pixel_flipping",
    "region_perturbation",
    "selectivity",
    "slic_segments",
    "superpixels",
]


def pixel_flipping(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    features_in_step: int = 1,
    baseline: Baseline = "black",
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
    seed: int = 0,
) -> Curve:
    """Pixel Flipping (Bach et al. 2015): :func:`camkit.metrics.deletion` with ``ceil(H * W / features_in_step)``
    steps, to ``baseline`` (Quantus' ``"black"`` by default), scored by the softmax probability.

    Where ``features_in_step`` divides H * W, step i has removed exactly ``i * features_in_step`` pixels in
    decreasing map order, so ``scores[:, 1:]`` is Quantus 0.6.0's ``PixelFlipping`` curve (one-channel inputs) and
    its AUC is ``torch.trapezoid(scores[:, 1:], dim=1)`` (unit spacing, no unperturbed point); camkit's ``auc`` is
    over the fraction removed, the unperturbed point included. ``baseline="uniform"``: each group of
    ``features_in_step`` pixels in map order takes one value from U(0, 1) per image (Quantus' ``"uniform"``;
    ``torch.rand(B, groups)`` from a CPU generator seeded with ``seed``).
    """
    if isinstance(features_in_step, bool) or not isinstance(features_in_step, int) or features_in_step < 1:
        raise CamkitError(f"features_in_step must be an int >= 1, got {features_in_step!r}")
    h, w = inputs.shape[-2:]
    base: Baseline = baseline
    if inputs.dim() == 4 and is_uniform(baseline):  # else deletion refuses the inputs
        x, m = check_inputs(model, inputs, maps)
        key, groups = group_steps(m, features_in_step, descending=True)
        base = step_fill(x.float(), baseline, key, groups, seed)
    elif inputs.dim() == 4:
        base = fill_baseline(inputs.float(), baseline)
    steps = math.ceil(h * w / features_in_step)
    return deletion(model, inputs, maps, classes, steps, base, score, batch_size, forward)


@dataclass(frozen=True)
class RegionCurve:
    """The scores while squares are removed in map order.

    Attributes:
        scores: Tensor[B, R + 1], the class score with 0, 1, ..., R squares replaced.
        aopc: Tensor[B], the mean of ``scores[:, 0] - scores`` over the R + 1 points (Samek's AOPC; higher is better
            for the most relevant first).
        auc: Tensor[B], the trapezoidal area under ``scores`` over the fraction of steps, in [0, 1] for
            probabilities (Selectivity; lower is better).
    """

    scores: Tensor
    aopc: Tensor
    auc: Tensor


def _patch_curve(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None,
    patch_size: int,
    order: str,
    regions: int | None,
    baseline: Baseline,
    score: str,
    forward: Forward | None,
    seed: int = 0,
) -> RegionCurve:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise CamkitError(f"patch_size must be an int >= 1, got {patch_size!r}")
    if order not in ("morf", "lerf", "random"):
        raise CamkitError(f"unknown order {order!r}: 'morf' (most relevant first), 'lerf' or 'random'")
    s = prepare(model, inputs, maps, classes, score, None, forward)
    b, _, h, w = s.x.shape
    grid, n_patches = square_grid(h, w, patch_size, s.x.device)
    patch = grid.expand(b, -1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if order == "random":  # a permutation of the squares per image
        ranked = torch.rand(b, n_patches, generator=gen).argsort(dim=1).to(s.x.device)
    else:
        sums = torch.zeros(b, n_patches, dtype=torch.float64, device=s.x.device)
        sums.scatter_add_(1, patch, s.maps.flatten(1).double())
        ranked = torch.argsort(sums, dim=1, descending=(order == "morf"), stable=True)
    rank = torch.empty_like(ranked).scatter_(
        1, ranked, torch.arange(n_patches, device=s.x.device).expand(b, -1)
    )
    steps = n_patches if regions is None else max(1, min(regions, n_patches))
    key = rank.gather(1, patch)
    if is_uniform(baseline):  # one value per square, drawn in removal order
        fill = square_fill(s.x, key, n_patches, gen)
    else:
        fill = fill_baseline(s.x, baseline)
    curve = step_scores(s, s.x, fill, key, steps, cumulative=True)
    scores = torch.cat([s.y[:, None], curve], dim=1)
    auc = torch.trapezoid(scores, dx=1 / steps, dim=1)
    return RegionCurve(scores=scores, aopc=(s.y[:, None] - scores).mean(dim=1), auc=auc)


def region_perturbation(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    patch_size: int = 8,
    order: str = "morf",
    regions: int | None = 100,
    baseline: Baseline = "black",
    score: str = "prob",
    forward: Forward | None = None,
    seed: int = 0,
) -> RegionCurve:
    """Region Perturbation (Samek et al. 2017): the curve and AOPC of removing ``patch_size`` squares.

    Paper: order the regions by relevance, replace them one after the other (most relevant first, MoRF, or least,
    LeRF) and average the score drop over the steps (AOPC). Choices (Quantus 0.6.0's defaults): non-overlapping
    8 x 8 squares of a grid from the top left (squares at the right and bottom edges cut to the image), ordered
    by the map's sum on them (ties in raster order), the first ``regions`` (100; None: all) replaced by
    ``baseline`` (Quantus' ``"black"``; the paper draws uniform noise); the softmax probability. Quantus' curve
    is ``scores[:, 0] - scores[:, 1:]`` on one-channel inputs whose sides the squares divide.

    ``order="random"``: the squares in a random order, the map unused (the paper's random baseline curve; a
    permutation per image, ``torch.rand(B, squares, generator).argsort(dim=1)``, Quantus' ``np.random.permutation``
    per image). ``baseline="uniform"``: each square takes one value from U(0, 1) per image (Quantus' ``"uniform"``;
    ``torch.rand(B, squares, generator)``, the value of the square removed at step t in column t). Both draw from
    one CPU generator seeded with ``seed``, the order first.
    """
    return _patch_curve(
        model, inputs, maps, classes, patch_size, order, regions, baseline, score, forward, seed
    )


def selectivity(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    patch_size: int = 8,
    baseline: Baseline = "black",
    score: str = "prob",
    forward: Forward | None = None,
    seed: int = 0,
) -> RegionCurve:
    """Selectivity (Montavon et al. 2018; ``auc``, lower is better): every ``patch_size`` square removed, most
    relevant first, as :func:`region_perturbation` (``baseline="uniform"`` and ``seed`` as there). Quantus
    0.6.0's curve is ``scores[:, 1:]`` and its AUC ``torch.trapezoid(scores[:, 1:], dim=1)`` (unit spacing);
    camkit's ``auc`` is over the fraction of squares removed, the unperturbed point included, in [0, 1] for
    probabilities."""
    return _patch_curve(
        model, inputs, maps, classes, patch_size, "morf", None, baseline, score, forward, seed
    )


def slic_segments(inputs: Tensor) -> Tensor:
    """LongTensor[B, H, W]: SLIC superpixels of each image (``skimage.segmentation.slic(image, start_label=0)`` on
    the channels-last input as given, Quantus 0.6.0's ``get_superpixel_segments``), labels 0..n - 1."""
    return superpixels(inputs, "slic")


def superpixels(inputs: Tensor, method: str = "slic") -> Tensor:
    """LongTensor[B, H, W]: superpixels of each image, labels 0..n - 1, from scikit-image's defaults on the
    channels-last input as given (Quantus 0.6.0's ``get_superpixel_segments``): ``"slic"``
    (``slic(image, start_label=0)``) or ``"felzenszwalb"`` (``felzenszwalb(image)``)."""
    from skimage.segmentation import felzenszwalb, slic

    if method not in ("slic", "felzenszwalb"):
        raise CamkitError(f"unknown segmentation {method!r}: 'slic' or 'felzenszwalb'")
    out = []
    for img in inputs.detach().cpu().double().numpy():
        image = np.moveaxis(img, 0, -1)
        labels = slic(image, start_label=0) if method == "slic" else felzenszwalb(image)
        out.append(torch.from_numpy(np.unique(labels, return_inverse=True)[1].reshape(labels.shape)))
    return torch.stack(out).long()


@dataclass(frozen=True)
class IrofResult:
    """IROF of each image.

    Attributes:
        aoc: Tensor[B], 1 - the trapezoidal area under ``curve`` over the fraction of segments removed (higher is
            better).
        curve: Tensor[B, S + 1], the score with 0, 1, ..., n segments removed divided by the unperturbed score
            (NaN after an image's n, when images have fewer segments than the most of the batch).
        segments: LongTensor[B], each image's number of segments n.
    """

    aoc: Tensor
    curve: Tensor
    segments: Tensor


def irof(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    segments: Tensor | None = None,
    baseline: Baseline = "mean",
    score: str = "prob",
    forward: Forward | None = None,
    segmentation: str = "slic",
) -> IrofResult:
    """IROF (Rieger & Hansen 2020; higher is better).

    Paper: segment the image into superpixels, remove them in decreasing order of their mean relevance, replacing
    them by the mean value, and report the area over the curve of the class probability relative to the
    unperturbed one. Choices: ``segments`` LongTensor[B, H, W] of labels 0..n - 1 (None: :func:`superpixels` of
    the inputs by ``segmentation``, ``"slic"`` or ``"felzenszwalb"``, as Quantus' ``segmentation_method``);
    ``baseline`` ``"mean"`` is each image's mean per channel, fixed before the removal (Quantus 0.6.0 fills with
    the mean of the whole batch array as perturbed so far); the softmax probability; the area is over the
    fraction of segments removed, so IROF lies in [0, 1] when the score only falls. Quantus' value is
    ``n - torch.trapezoid(curve[b, 1 : n + 1])`` (unit spacing, no unperturbed point).
    """
    s = prepare(model, inputs, maps, classes, score, None, forward)
    b = s.x.shape[0]
    seg = superpixels(s.x, segmentation) if segments is None else segments.to(s.x.device).long()
    if tuple(seg.shape) != tuple(s.maps.shape) or (seg.numel() and int(seg.min()) < 0):
        raise CamkitError(
            f"segments must be labels >= 0 of shape {tuple(s.maps.shape)}, got {tuple(seg.shape)}"
        )
    seg = seg.to(s.x.device).flatten(1)
    n_seg = int(seg.max()) + 1
    count = torch.zeros(b, n_seg, device=s.x.device).scatter_add_(1, seg, torch.ones_like(s.maps.flatten(1)))
    total = torch.zeros(b, n_seg, dtype=torch.float64, device=s.x.device)
    mean = total.scatter_add_(1, seg, s.maps.flatten(1).double()) / count.clamp_min(1)
    mean = torch.where(count > 0, mean, torch.full_like(mean, -math.inf))
    ranked = torch.argsort(mean, dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(n_seg, device=s.x.device).expand(b, -1))
    scores = step_scores(s, s.x, fill_baseline(s.x, baseline), rank.gather(1, seg), n_seg, cumulative=True)
    ratio = torch.cat([torch.ones(b, 1, device=s.x.device), scores / s.y[:, None]], dim=1)
    n = (count > 0).sum(dim=1)
    steps = torch.arange(n_seg + 1, device=s.x.device)[None]
    curve = torch.where(steps <= n[:, None], ratio, torch.full_like(ratio, math.nan))
    aoc = torch.stack([1 - torch.trapezoid(curve[i, : int(n[i]) + 1], dx=1 / int(n[i])) for i in range(b)])
    return IrofResult(aoc=aoc, curve=curve, segments=n)
