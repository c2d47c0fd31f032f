"""Faithfulness: does the model's score follow the pixels the map says matter?

* Deletion / Insertion (Petsiuk et al., RISE, BMVC 2018): remove (insert) pixels from the most to the least
  salient, score the class after each step, report the area under the curve. Lower deletion and higher insertion
  are better.
* Average Drop / Increase in Confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018): score the image masked
  by the map.
* ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022):
  remove a percentage of pixels (most relevant first, MoRF, or least relevant first, LeRF) and fill them by
  *noisy linear imputation*, so that the shape of the removed region does not leak the class.

All functions take the model (in eval mode), the *normalised* model inputs Tensor[B, C, H, W] (what
``Preprocess`` returns), the maps Tensor[B, H, W] at the input size (``Explanation.maps``) and the classes to
score (default: the model's top-1 on the inputs). Work happens on the model's device; perturbed images of all
steps and images are stacked and sent to the model in chunks of ``batch_size`` (one model call per chunk, under
``torch.inference_mode()``). Scores are softmax probabilities by default (``score="logit"`` for logits).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.metrics._common import (
    Baseline,
    Forward,
    check_inputs,
    chunks,
    class_scores,
    make_baseline,
    pixel_ranks,
    resolve_targets,
)
from camkit.metrics.imputation import harmonic_fill

__all__ = [
    "ConfidenceChange",
    "Curve",
    "RoadResult",
    "average_drop",
    "confidence_change",
    "deletion",
    "deletion_insertion",
    "increase_in_confidence",
    "insertion",
    "noisy_linear_impute",
    "road",
]


@dataclass
class Curve:
    """A deletion or insertion curve.

    Attributes:
        auc: Tensor[B], trapezoidal area under ``scores`` over ``fractions`` (in [0, 1] for probabilities).
        fractions: Tensor[S + 1], fraction of pixels removed (deletion) or inserted (insertion) at each step.
        scores: Tensor[B, S + 1], the class score after each step (``scores[:, 0]`` = no pixel changed).
        classes: LongTensor[B], the scored classes.
    """

    auc: Tensor
    fractions: Tensor
    scores: Tensor
    classes: Tensor


def _step_counts(n_pixels: int, steps: int) -> Tensor:
    if isinstance(steps, bool):
        raise TypeError(f"steps must be an int >= 1, got {steps!r}")
    try:
        steps = operator.index(steps)  # ints and numpy integers; 1.5 is refused, not truncated
    except TypeError:
        raise TypeError(f"steps must be an int >= 1, got {steps!r}") from None
    if steps < 1:
        raise CamkitError(f"steps must be >= 1, got {steps}")
    steps = min(steps, n_pixels)
    return torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_pixels / steps).long()


def _causal_curve(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None,
    steps: int,
    start_of: str,
    baseline: Baseline,
    default_baseline: str,
    score: str,
    batch_size: int | None,
    forward: Forward | None,
) -> Curve:
    x, m = check_inputs(model, inputs, maps, clips=True)
    fwd = forward or Forward(model, batch_size)
    cls = resolve_targets(fwd, x, classes)
    base = make_baseline(x, baseline, default_baseline)
    # deletion: x -> baseline; insertion: baseline -> x; pixels switch in the order of the map (most salient first)
    start, finish = (x, base) if start_of == "image" else (base, x)
    b, space = x.shape[0], x.shape[2:]  # (H, W), or (T, H, W) for a clip
    counts = _step_counts(space.numel(), steps)
    n_steps = counts.shape[0] - 1
    ranks = pixel_ranks(m).view(b, 1, *space)
    scores = torch.empty(b, n_steps + 1, device=x.device)
    # the two ends do not depend on the map: one call for all images
    ends = fwd.scores(torch.cat([start, finish]), torch.cat([cls, cls]), score)
    scores[:, 0], scores[:, n_steps] = ends[:b], ends[b:]
    # the inner steps: one curve (curve 0 of _step_scores) per image
    _step_scores(fwd, (start[None], finish[None]), ranks[None], counts, cls, score, scores[None])
    fractions = counts.to(x.device, torch.float32) / space.numel()
    auc = torch.trapezoid(scores, fractions, dim=1)
    return Curve(auc=auc, fractions=fractions, scores=scores, classes=cls)


def deletion(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    steps: int = 50,
    baseline: Baseline = "zeros",
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> Curve:
    """Deletion AUC (RISE, Petsiuk et al. 2018; lower is better).

    Paper: pixels are removed from the image in decreasing order of the saliency map, "replacing them with
    zeros", the probability of the class is recorded after each step and the area under that curve (x = fraction
    of pixels removed) is the score. A sharp drop (low AUC) means the map found what the model uses.

    Choices: ``steps`` equal steps (step i removes ``round(i * H * W / steps)`` pixels; RISE's code removes 224
    pixels per step on 224 x 224 images, i.e. 224 steps); removed pixels take the value of ``baseline``
    (default ``"zeros"`` *of the normalised input*, as RISE's code does: the dataset's mean colour for mean/std
    normalisation); pixels of equal map value go in raster order; the score is the softmax probability
    (``score="logit"`` for the logit); the area is the trapezoidal rule over the fractions, so it lies in [0, 1]
    and equals RISE's ``auc()`` when the step divides H * W. All channels of a pixel are removed together.

    Args:
        model: the classifier, in eval mode (never modified).
        inputs: normalised Tensor[B, C, H, W].
        maps: Tensor[B, H, W] at the input size.
        classes: the classes to score, LongTensor[B] or an int (default: the top-1 on ``inputs``).
        steps: number of removal steps (the curve has ``steps + 1`` points).
        baseline: ``"zeros"``, ``"blur"``, ``"mean"``, a number, a Tensor or a function of the inputs.
        score: ``"prob"`` or ``"logit"``.
        batch_size: images per model call (default: 8 on CPU, 64 on GPU).
        forward: a :class:`~camkit.metrics._common.Forward` to share (and count) model calls.
    """
    return _causal_curve(
        model, inputs, maps, classes, steps, "image", baseline, "zeros", score, batch_size, forward
    )


def insertion(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    steps: int = 50,
    baseline: Baseline = "blur",
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> Curve:
    """Insertion AUC (RISE, Petsiuk et al. 2018; higher is better).

    Paper: start from a blurred copy of the image and insert the original pixels in decreasing order of the
    saliency map; the area under the class probability curve is the score. Choices as in :func:`deletion`; the
    default start is ``"blur"``: a Gaussian blur with kernel 11 and sigma 5 (RISE's code), reflect-padded at the
    borders (RISE pads with zeros), applied to the normalised input.
    """
    return _causal_curve(
        model, inputs, maps, classes, steps, "baseline", baseline, "blur", score, batch_size, forward
    )


def _step_scores(
    fwd: Forward,
    ends: tuple[Tensor, Tensor],
    ranks: Tensor,
    counts: Tensor,
    cls: Tensor,
    score: str,
    scores: Tensor,
) -> None:
    """Fill ``scores[j, i, 1:-1]`` (Tensor[J, B, S + 1]) with the class scores of the inner steps of curve ``j`` on
    image ``i``: curve ``j`` switches the pixels of ``ranks[j // 2]`` from ``start[j % 2]`` to ``finish[j % 2]``
    (``ends`` = (start, finish), each Tensor[2, B, C, H, W], or [1, B, C, H, W] for a single curve); every (curve,
    image, step) in one stream of chunks."""
    n_steps = counts.shape[0] - 1
    if n_steps < 2:
        return
    start, finish = ends
    jobs, b = scores.shape[:2]
    tasks = torch.cartesian_prod(torch.arange(jobs), torch.arange(b), torch.arange(1, n_steps))
    counts_dev = counts.to(cls.device)
    shape = (-1, *(1,) * (ranks.dim() - 2))
    for lo, hi in chunks(tasks.shape[0], fwd.batch_size):
        job, img, step = tasks[lo:hi].to(cls.device).unbind(1)
        batch = start.new_empty((hi - lo, *start.shape[2:]))
        # the rows of one (curve, image) pair are consecutive steps: their images are written straight from that
        # pair's start and finish (broadcast), with no gathered copies of them
        for a, z, j, i in _runs(tasks[lo:hi, 0].tolist(), tasks[lo:hi, 1].tolist()):
            switched = ranks[j // 2, i] < counts_dev[step[a:z]].view(shape)
            torch.where(switched, finish[j % 2, i], start[j % 2, i], out=batch[a:z])
        scores[job, img, step] = fwd.scores(batch, cls[img], score)


def _runs(jobs: list[int], images: list[int]) -> list[tuple[int, int, int, int]]:
    """(first row, end row, curve, image) of each run of rows with the same curve and image."""
    out: list[tuple[int, int, int, int]] = []
    for row, pair in enumerate(zip(jobs, images, strict=True)):
        if out and (out[-1][2], out[-1][3]) == pair:
            out[-1] = (out[-1][0], row + 1, *pair)
        else:
            out.append((row, row + 1, *pair))
    return out


def deletion_insertion(
    model: nn.Module,
    inputs: Tensor,
    maps: dict[str, Tensor],
    classes: Tensor | int | None = None,
    steps: int = 50,
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
    clean: Tensor | None = None,
) -> dict[str, tuple[Curve, Curve]]:
    """:func:`deletion` and :func:`insertion` (default baselines: zeros, blur) of several maps of the same images,
    in one stream of model calls: name -> (deletion curve, insertion curve), the same values as the two functions
    called map by map (to float rounding: only the grouping of images into model calls differs).

    What is shared: the scores of the curves' ends, which do not depend on the map (the image, its zeroed and
    its blurred copy: one call for all maps instead of four images per map), and the chunks, which run on across
    maps and the two metrics (no partly filled chunk per map).

    Args:
        model, inputs, classes, steps, score, batch_size, forward: as :func:`deletion`.
        maps: name -> Tensor[B, H, W] at the input size (e.g. each method's ``Explanation.maps``).
        clean: the model's output (logits Tensor[B, classes]) on ``inputs`` when already known: not computed
            again.
    """
    checked = {name: check_inputs(model, inputs, m, clips=True) for name, m in maps.items()}
    if not checked:
        return {}
    x = next(iter(checked.values()))[0]
    fwd = forward or Forward(model, batch_size)
    if clean is not None and classes is None:
        cls = clean.argmax(dim=1).to(x.device)
    else:
        cls = resolve_targets(fwd, x, classes)
    b, space = x.shape[0], x.shape[2:]  # (H, W), or (T, H, W) for a clip
    counts = _step_counts(space.numel(), steps)
    n_steps = counts.shape[0] - 1
    zeros, blur = make_baseline(x, None, "zeros"), make_baseline(x, None, "blur")
    ends = fwd.scores(torch.cat([zeros, blur]), torch.cat([cls, cls]), score)
    image = class_scores(clean.to(x.device), cls, score) if clean is not None else fwd.scores(x, cls, score)
    scores = torch.empty(2 * len(checked), b, n_steps + 1, device=x.device)
    scores[0::2, :, 0], scores[0::2, :, n_steps] = image, ends[:b]  # deletion: image -> zeros
    scores[1::2, :, 0], scores[1::2, :, n_steps] = ends[b:], image  # insertion: blur -> image
    ranks = torch.stack([pixel_ranks(m) for _, m in checked.values()]).view(len(checked), b, 1, *space)
    _step_scores(fwd, (torch.stack([x, blur]), torch.stack([zeros, x])), ranks, counts, cls, score, scores)
    fractions = counts.to(x.device, torch.float32) / space.numel()
    auc = torch.trapezoid(scores, fractions, dim=2)
    return {
        name: (
            Curve(auc=auc[2 * k], fractions=fractions, scores=scores[2 * k], classes=cls),
            Curve(auc=auc[2 * k + 1], fractions=fractions, scores=scores[2 * k + 1], classes=cls),
        )
        for k, name in enumerate(checked)
    }


@dataclass
class ConfidenceChange:
    """Per-image results of :func:`confidence_change`.

    Attributes:
        drop: Tensor[B], ``max(0, Y - O) / Y`` (Average Drop is its mean, x 100 in the paper).
        increase: Tensor[B], 1.0 where ``O > Y`` (Increase in Confidence is its mean, x 100 in the paper).
        original: Tensor[B], Y: the class score on the image.
        explained: Tensor[B], O: the class score on the explanation map ``image * map``.
        classes: LongTensor[B].
    """

    drop: Tensor
    increase: Tensor
    original: Tensor
    explained: Tensor
    classes: Tensor


def confidence_change(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    baseline: Baseline = "zeros",
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> ConfidenceChange:
    """Average Drop and Increase in Confidence (Grad-CAM++, Chattopadhyay et al. 2018, section 5.1).

    Paper: the explanation map is ``E = L * I`` (the saliency map times the image, element-wise); with ``Y`` the
    model's confidence for the class on the image and ``O`` on ``E``, Average Drop = ``100/N sum max(0, Y - O) /
    Y`` (lower is better) and Increase in Confidence = ``100/N sum 1[Y < O]`` (higher is better).

    Choices: the product is taken in the model's input space around ``baseline`` (default zeros of the
    normalised input, as pytorch-grad-cam's ``input_tensor * cam``): ``E = baseline + map * (x - baseline)``;
    confidence is the softmax probability (``score="logit"`` for logits; then ``Y`` may be negative and the
    drop is not meaningful). Values are per image, as fractions (the paper's numbers are their mean x 100).
    """
    x, m = check_inputs(model, inputs, maps, clips=True)
    fwd = forward or Forward(model, batch_size)
    out = fwd(x)
    cls = resolve_targets(fwd, x, classes) if classes is not None else out.argmax(dim=1)
    y = class_scores(out, cls, score)
    base = make_baseline(x, baseline, "zeros")
    e = base + m[:, None] * (x - base)
    o = fwd.scores(e, cls, score)
    drop = torch.clamp(y - o, min=0) / y.clamp_min(1e-12)
    return ConfidenceChange(drop=drop, increase=(o > y).float(), original=y, explained=o, classes=cls)


def average_drop(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    baseline: Baseline = "zeros",
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> Tensor:
    """Per-image ``max(0, Y - O) / Y`` of :func:`confidence_change` (Average Drop = its mean x 100)."""
    return confidence_change(model, inputs, maps, classes, baseline, score, batch_size, forward).drop


def increase_in_confidence(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    baseline: Baseline = "zeros",
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> Tensor:
    """Per-image ``1[O > Y]`` of :func:`confidence_change` (Increase in Confidence = its mean x 100)."""
    return confidence_change(model, inputs, maps, classes, baseline, score, batch_size, forward).increase


# ROAD's neighbour weights (its code's imputation): 1/6 for the 4 direct neighbours, 1/12 diagonal.
def noisy_linear_impute(
    inputs: Tensor,
    remove: Tensor,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
    max_iter: int = 1000,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022, section 4.2).

    Every removed pixel ``i`` takes the weighted mean of its (in-image) 8 neighbours,
    ``x_i = sum_j w_ij x_j / sum_j w_ij`` with ``w = 1/6`` (direct) and ``1/12`` (diagonal), where neighbours may
    themselves be removed: one sparse linear system per channel whose unknowns are the removed pixels. ROAD's
    code builds it with scipy and calls ``spsolve``; here the system ``L x = b`` (``L = D - W`` restricted to the
    removed pixels, symmetric positive definite as soon as one pixel is kept) is solved batched on the device by
    conjugate gradient preconditioned with one multigrid V-cycle (:mod:`camkit.metrics.imputation`: about ten
    iterations whatever the hole's size), until the residual is below ``tol`` times the right-hand side (or
    ``max_iter`` iterations). Then Gaussian noise of standard deviation
    ``noise`` is added to the imputed pixels (ROAD: 0.01).

    Args:
        inputs: Tensor[N, C, H, W] (normalised images).
        remove: BoolTensor[N, H, W] (or [N, 1, H, W]), True = impute this pixel (all channels).
        noise: standard deviation of the added noise.
        generator: for the noise, for reproducible results.
    """
    _check_noise(noise)
    x = inputs.float()
    n, _, h, w = x.shape
    u = remove.reshape(n, 1, h, w).to(x.device, torch.float32)
    sol = harmonic_fill(x, u, tol, max_iter)
    if noise > 0:
        eps = torch.randn(
            x.shape, generator=generator, device="cpu" if generator is None else generator.device
        )
        sol = sol + noise * u * eps.to(x.device)
    return x * (1 - u) + u * sol


def _check_noise(noise: object) -> None:
    """ROAD's imputation noise: a finite number >= 0 (a standard deviation), else a CamkitError."""
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < math.inf:
        raise CamkitError(f"noise must be a finite number >= 0 (the imputation noise's std), got {noise!r}")


@dataclass
class RoadResult:
    """ROAD scores at each removal percentage.

    Attributes:
        percentages: Tensor[P], fractions of pixels removed.
        scores: Tensor[B, P], class score (softmax probability by default) after removal and imputation.
        correct: Tensor[B, P], 1.0 where the class is still the model's top-1 (the paper's accuracy is its mean).
        order: ``"morf"`` or ``"lerf"``.
        classes: LongTensor[B].
    """

    percentages: Tensor
    scores: Tensor
    correct: Tensor
    order: str
    classes: Tensor

    @property
    def mean_score(self) -> Tensor:
        """Tensor[B], the mean score over the percentages (area under the curve for equally spaced ones)."""
        return self.scores.mean(dim=1)


def road(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    percentages: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    order: str = "morf",
    noise: float = 0.01,
    seed: int = 0,
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> RoadResult:
    """ROAD: RemOve And Debias (Rong et al. 2022).

    Paper: remove the ``p`` most relevant (MoRF) or least relevant (LeRF) pixels by the attribution's ranking,
    fill them with noisy linear imputation (:func:`noisy_linear_impute`), and measure the model's accuracy on
    the imputed images, without retraining. A good map makes MoRF accuracy drop fast (low) and LeRF stay high.

    Choices: the ranking is the map's (one value per pixel, all channels removed together; ties in raster
    order); per image we report the softmax probability of the class and whether it is still the top-1
    (accuracy per image), at ``percentages`` (default 10%..90%, as in the paper's plots); the noise is seeded.
    """
    if order not in ("morf", "lerf"):
        raise CamkitError(f"unknown order {order!r}: 'morf' (most relevant first) or 'lerf'")
    _check_noise(noise)
    x, m = check_inputs(model, inputs, maps)
    fwd = forward or Forward(model, batch_size)
    cls = resolve_targets(fwd, x, classes)
    b, _, h, w = x.shape
    pct = torch.tensor([float(p) for p in percentages], dtype=torch.float64)
    if pct.numel() == 0 or not ((pct >= 0) & (pct <= 1)).all():  # NaN too
        raise CamkitError(f"percentages are fractions in [0, 1] (at least one), got {list(percentages)}")
    counts = torch.round(pct * h * w).long().to(x.device)
    ranks = pixel_ranks(m, descending=(order == "morf")).view(b, h, w)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pairs = torch.cartesian_prod(torch.arange(b), torch.arange(len(pct))).to(x.device)
    scores = torch.empty(b, len(pct), device=x.device)
    correct = torch.empty(b, len(pct), device=x.device)
    for lo, hi in chunks(pairs.shape[0], fwd.batch_size):
        img, k = pairs[lo:hi, 0], pairs[lo:hi, 1]
        removed = ranks[img] < counts[k].view(-1, 1, 1)
        imputed = noisy_linear_impute(x[img], removed, noise=noise, generator=gen)
        out = fwd(imputed)
        scores[img, k] = class_scores(out, cls[img], score)
        correct[img, k] = (out.argmax(dim=1) == cls[img]).float()
    return RoadResult(percentages=pct.float(), scores=scores, correct=correct, order=order, classes=cls)
