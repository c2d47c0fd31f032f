"""Faithfulness by correlation and monotonicity (the Quantus family): does the model's score change with what the
map puts on the pixels a perturbation touches?

* Faithfulness Correlation (Bhatt et al., IJCAI 2020): Pearson correlation, over random pixel subsets, between the
  sum of the map on the subset and the score drop when the subset is replaced by a baseline.
* Faithfulness Estimate (Alvarez-Melis & Jaakkola, NeurIPS 2018): Pearson correlation, over groups of pixels taken
  in decreasing map order, between the map's sum on the group and the score drop when only that group is replaced.
* Monotonicity (Arya et al., AIX360, 2019): start from the baseline, put the pixels of the image back in
  increasing map order; 1 where the score never decreases.
* Monotonicity Correlation (Nguyen & Martinez, 2020): Spearman correlation between the map's sum on each group of
  pixels and the expected squared change of the score when that group is filled with random values.
* Sensitivity-n (Ancona et al., ICLR 2018): for subsets of n pixels, the Pearson correlation between the map's sum
  on the subset and the score drop when the subset is replaced; one value per n.
* Infidelity (Yeh et al., NeurIPS 2019): mean of (sum (x - x') * map - (f(x) - f(x')))^2 over perturbations x'.

Shared choices. A *feature* is a pixel: all its channels are replaced together and the map (Tensor[B, H, W]) has one
value per pixel. Quantus 0.6.0 works on the elements of the input: a map broadcast to C channels makes C features
of a pixel, replaced one at a time; on one-channel inputs both are the same. ``baseline="black"`` is the image's
minimum over all channels and pixels (Quantus' ``"black"``); the other baselines are camkit's
(:func:`camkit.metrics._common.make_baseline`). The maps are used as given (camkit's maps are already ReLU'd and
min-maxed; Quantus' ``normalise``/``abs`` steps are not applied). Ties in the map are ordered in raster order. A
correlation of a constant vector is undefined and reported as 0. Perturbed images of all steps and images go to
the model in chunks (:class:`camkit.metrics.Forward`), on the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.metrics._common import Baseline, Forward
from camkit.metrics.perturbed import (
    PerturbSetup,
    fill_baseline,
    group_steps,
    is_uniform,
    pearson,
    perturbed_scores,
    prepare,
    random_subsets,
    square_fill,
    square_grid,
    step_fill,
    step_scores,
    step_sums,
    subset_scores,
)
from camkit.metrics.sanity import spearman

__all__ = [
    "InfidelityLoss",
    "SensitivityN",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "fill_baseline",
    "infidelity",
    "monotonicity_arya",
    "monotonicity_nguyen",
    "pearson",
    "random_subsets",
    "sensitivity_n",
]


def _check_similarity(kind: str) -> None:
    if kind not in ("pearson", "spearman"):
        raise CamkitError(f"unknown similarity {kind!r}: 'pearson' or 'spearman'")


def _similarity(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """The correlation of each row pair of Tensor[B, N]: ``"pearson"`` or ``"spearman"`` (ties averaged)."""
    return pearson(a, b) if kind == "pearson" else spearman(a, b)


def faithfulness_correlation(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    runs: int = 100,
    subset_size: int = 224,
    baseline: Baseline = "black",
    score: str = "logit",
    seed: int = 0,
    batch_size: int | None = None,
    forward: Forward | None = None,
    similarity: str = "pearson",
) -> Tensor:
    """Faithfulness Correlation (Bhatt et al. 2020; higher is better), Tensor[B] in [-1, 1].

    Paper: ``corr_{S in random subsets of size |S|}(sum_{i in S} g(f, x)_i, f(x) - f(x_{x_S = baseline}))``.
    Choices: Quantus 0.6.0's defaults (100 runs, subsets of 224 pixels, the ``"black"`` baseline, the logit,
    the Pearson correlation; ``similarity="spearman"`` for Spearman's, Quantus' ``similarity_func``), the
    subsets from :func:`random_subsets` with ``seed`` (at most the image's pixels). ``baseline="uniform"``: each
    run's subset takes one value from U(0, 1) per image (Quantus' ``"uniform"``), ``torch.rand(B, runs)`` from the
    subsets' generator after them.
    """
    _check_similarity(similarity)
    s = prepare(model, inputs, maps, classes, score, batch_size, forward)
    b, _, h, w = s.x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = random_subsets(b, runs, h * w, min(subset_size, h * w), gen).to(s.x.device)
    if is_uniform(baseline):
        values = torch.rand(b, runs, generator=gen).to(s.x.device)
        drops = s.y[:, None] - subset_scores(s, s.x, idx, values)
    else:
        drops = s.y[:, None] - subset_scores(s, fill_baseline(s.x, baseline), idx)
    sums = s.maps.flatten(1)[torch.arange(b, device=s.x.device)[:, None, None], idx].double().sum(dim=2)
    return _similarity(sums, drops, similarity)


def faithfulness_estimate(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    features_in_step: int = 1,
    baseline: Baseline = "black",
    score: str = "logit",
    batch_size: int | None = None,
    forward: Forward | None = None,
    similarity: str = "pearson",
    seed: int = 0,
) -> Tensor:
    """Faithfulness Estimate (Alvarez-Melis & Jaakkola 2018; higher is better), Tensor[B] in [-1, 1].

    Paper: the correlation between each feature's relevance and the drop of the score when that feature alone is
    removed. Choices: groups of ``features_in_step`` pixels in decreasing map order (one model call per group and
    image), each replaced alone by ``baseline`` (Quantus' ``"black"``); Pearson correlation (``similarity=
    "spearman"``: Spearman's, Quantus' ``similarity_func``); the logit. ``baseline="uniform"``: each group takes
    one value from U(0, 1) per image (Quantus' ``"uniform"``; ``torch.rand(B, groups)`` from a CPU generator
    seeded with ``seed``).
    """
    _check_similarity(similarity)
    s = prepare(model, inputs, maps, classes, score, batch_size, forward)
    key, steps = group_steps(s.maps, features_in_step, descending=True)
    fill = step_fill(s.x, baseline, key, steps, seed)
    drops = s.y[:, None] - step_scores(s, s.x, fill, key, steps, cumulative=False)
    return _similarity(step_sums(s.maps, key, steps), drops, similarity)


def monotonicity_arya(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    features_in_step: int = 1,
    baseline: Baseline = "black",
    score: str = "prob",
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> Tensor:
    """Monotonicity (Arya et al. 2019; higher is better), Tensor[B] of 1.0 (monotonic) or 0.0.

    Paper (AIX360's ``monotonicity``): from the baseline, put the image's features back in increasing order of
    relevance; the score must never decrease. Choices: groups of ``features_in_step`` pixels; the first point is
    after the first group (the baseline alone is not compared, as AIX360 and Quantus); the softmax probability.
    Quantus 0.6.0's default perturbation writes the baseline's own value back instead of the image's, so its
    images never change and every map gets True; camkit puts the image's pixels back.
    """
    s = prepare(model, inputs, maps, classes, score, batch_size, forward)
    key, steps = group_steps(s.maps, features_in_step, descending=False)
    scores = step_scores(s, fill_baseline(s.x, baseline), s.x, key, steps, cumulative=True)
    return (scores.diff(dim=1) >= 0).all(dim=1).float()


def monotonicity_nguyen(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    samples: int = 100,
    features_in_step: int = 1,
    baseline: Baseline = "uniform",
    eps: float = 1e-5,
    score: str = "prob",
    seed: int = 0,
    batch_size: int | None = None,
    forward: Forward | None = None,
    similarity: str = "spearman",
) -> Tensor:
    """Monotonicity Correlation (Nguyen & Martinez 2020; higher is better), Tensor[B] in [-1, 1].

    Paper: the Spearman correlation between each feature's relevance and the variance of the score when that
    feature is replaced by random values, ``E[(f(x) - f(x'))^2]``. Choices (Quantus 0.6.0's): groups of
    ``features_in_step`` pixels in increasing map order; ``"uniform"``: each of ``samples`` draws fills the group
    with one value from U(0, 1) per image (``torch.rand(B, steps, samples)`` from a CPU generator seeded with
    ``seed``); another baseline fills it with its values (one draw suffices); the squared change is divided by
    ``f(x)^2`` where ``|f(x)| >= eps``; the softmax probability; ``similarity="pearson"`` for Pearson's
    correlation (Quantus' ``similarity_func``).
    """
    _check_similarity(similarity)
    s = prepare(model, inputs, maps, classes, score, batch_size, forward)
    key, steps = group_steps(s.maps, features_in_step, descending=False)
    if baseline == "uniform":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        draws = torch.rand(s.x.shape[0], steps, samples, generator=gen).to(s.x.device)
        scores = _uniform_scores(s, key, draws)
    else:
        scores = step_scores(s, s.x, fill_baseline(s.x, baseline), key, steps, cumulative=False)[..., None]
    inv = torch.where(s.y.abs() >= eps, 1 / s.y.abs().clamp_min(1e-30), torch.ones_like(s.y)) ** 2
    variance = (scores - s.y[:, None, None]).double().pow(2).mean(dim=2) * inv[:, None].double()
    return _similarity(step_sums(s.maps, key, steps), variance, similarity)


def _uniform_scores(s: PerturbSetup, key: Tensor, draws: Tensor) -> Tensor:
    """Tensor[B, steps, samples]: the score with the pixels of each step filled with that draw's value."""
    b, steps, samples = draws.shape
    _, _, h, w = s.x.shape

    def make(idx: Tensor) -> tuple[Tensor, Tensor]:
        img, t, j = idx // (steps * samples), (idx // samples) % steps, idx % samples
        mask = (key[img] == t[:, None]).view(-1, 1, h, w)
        return torch.where(mask, draws[img, t, j].view(-1, 1, 1, 1), s.x[img]), img

    return perturbed_scores(s, b * steps * samples, make, (b, steps, samples))


@dataclass(frozen=True)
class SensitivityN:
    """Sensitivity-n of each image.

    Attributes:
        ns: LongTensor[K], the subset sizes (pixels).
        correlation: Tensor[B, K], the Pearson correlation at each n over the random subsets.
    """

    ns: Tensor
    correlation: Tensor

    @property
    def mean(self) -> Tensor:
        """Tensor[B], the mean correlation over the subset sizes."""
        return self.correlation.mean(dim=1)


def sensitivity_n(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8),
    runs: int = 100,
    baseline: Baseline = "black",
    score: str = "prob",
    seed: int = 0,
    batch_size: int | None = None,
    forward: Forward | None = None,
) -> SensitivityN:
    """Sensitivity-n (Ancona et al. 2018; higher is better).

    Paper: a map satisfies sensitivity-n when, for every subset S of n features, ``sum_{i in S} R_i`` equals the
    drop of the output when S is removed; measured by their Pearson correlation over random subsets of size n.
    Choices: n = round(fraction x pixels) for each of ``fractions`` (at least 1), ``runs`` subsets per n (from
    :func:`random_subsets`, seed ``seed + position of n``), removed to ``baseline``; the softmax probability.
    Quantus 0.6.0's ``SensitivityN`` computes another quantity: it removes pixels cumulatively in decreasing map
    order and correlates, at each step, over the *images* of the batch (see the documentation).
    """
    s = prepare(model, inputs, maps, classes, score, batch_size, forward)
    b, _, h, w = s.x.shape
    ns = [max(1, min(h * w, round(float(f) * h * w))) for f in fractions]
    base = fill_baseline(s.x, baseline)
    flat = s.maps.flatten(1)
    rows = torch.arange(b, device=s.x.device)[:, None, None]
    out = []
    for i, n in enumerate(ns):
        idx = random_subsets(b, runs, h * w, n, seed + i).to(s.x.device)
        drops = s.y[:, None] - subset_scores(s, base, idx)
        out.append(pearson(flat[rows, idx].double().sum(dim=2), drops))
    return SensitivityN(ns=torch.tensor(ns), correlation=torch.stack(out, dim=1))


#: An infidelity loss: (score drops, I^T g), both Tensor[B, T] (float64), -> Tensor[B].
InfidelityLoss = Callable[[Tensor, Tensor], Tensor]


def infidelity(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None = None,
    patch_sizes: Sequence[int] = (4,),
    baseline: Baseline = "black",
    score: str = "logit",
    batch_size: int | None = None,
    forward: Forward | None = None,
    *,
    perturbation: str = "baseline",
    samples: int = 10,
    noise_mean: float = 0.0,
    noise_std: float = 0.01,
    loss: str | InfidelityLoss = "mse",
    seed: int = 0,
) -> Tensor:
    """Infidelity (Yeh et al. 2019; lower is better), Tensor[B].

    Paper: ``E_I[(I^T g(f, x) - (f(x) - f(x - I)))^2]`` over perturbations I. Choices (Quantus 0.6.0's square
    perturbation): for each patch size p, the p x p squares of the image in raster order are perturbed one after
    the other, cumulatively; perturbation t is ``I = x - x_t`` (the first t + 1 squares perturbed), ``I^T g`` =
    sum over channels and pixels of ``I * map``; the loss over the steps, averaged over the patch sizes, then
    over the ``samples`` draws; the logit. Squares at the right and bottom edges are cut to the image (Quantus
    pads; both agree where p divides the height and width). The map's scale matters (no optimal rescaling).

    Args:
        perturbation: ``"baseline"``: a square takes ``baseline``'s values (Quantus' default perturbation);
            ``baseline="uniform"`` gives each square one value from U(0, 1) per image (Quantus' ``"uniform"``).
            ``"gaussian"``: a square gets noise N(``noise_mean``, ``noise_std``^2) added to each of its values
            (Quantus' ``batch_gaussian_noise``; ``baseline`` is not used). With one square covering a square image
            (``patch_sizes=(H,)``) each draw is the paper's noisy baseline, I = -noise on the whole image.
        samples: draws of a random perturbation (``"gaussian"``, ``"uniform"``), averaged (Quantus'
            ``n_perturb_samples``, 10); a deterministic baseline is computed once (every draw would be the same).
        loss: ``"mse"`` (the mean squared error over the steps, Quantus' default) or a function
            ``loss(drops, dots)`` of Tensor[B, T] -> Tensor[B] (Quantus' ``loss_func(a=drops, b=dots)``).
        seed: seed of the CPU generator of the draws: per draw, per patch size in order, ``torch.randn(B, C, H,
            W)`` (``"gaussian"``, each square's noise where it lies) or ``torch.rand(B, squares)``
            (``"uniform"``).
    """
    random = _check_infidelity(perturbation, baseline, samples, (noise_mean, noise_std), loss)
    s = prepare(model, inputs, maps, classes, score, batch_size, forward)
    grids = [square_grid(s.x.shape[2], s.x.shape[3], p, s.x.device) for p in patch_sizes]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fixed = None if random else fill_baseline(s.x, baseline)
    draws = []
    for _ in range(samples if random else 1):
        losses = []
        for block, steps in grids:
            if fixed is not None:
                fill = fixed
            elif perturbation == "gaussian":
                noise = torch.randn(s.x.shape, generator=gen).to(s.x.device, s.x.dtype)
                fill = s.x + noise * noise_std + noise_mean
            else:
                fill = square_fill(s.x, block, steps, gen)
            losses.append(_square_loss(s, fill, block, steps, loss))
        draws.append(torch.stack(losses, dim=1).mean(dim=1))
    return torch.stack(draws, dim=1).mean(dim=1).float()


def _check_infidelity(
    perturbation: str,
    baseline: Baseline,
    samples: int,
    noise: tuple[float, float],
    loss: str | InfidelityLoss,
) -> bool:
    """Check infidelity's options (``noise``: its mean and std); True where its perturbation is random."""
    noise_mean, noise_std = noise
    if (
        isinstance(noise_mean, bool)
        or not isinstance(noise_mean, (int, float))
        or not math.isfinite(noise_mean)
    ):
        raise CamkitError(f"noise_mean must be a finite number, got {noise_mean!r}")
    if perturbation not in ("baseline", "gaussian"):
        raise CamkitError(f"unknown perturbation {perturbation!r}: 'baseline' or 'gaussian'")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CamkitError(f"samples must be an int >= 1, got {samples!r}")
    if (
        isinstance(noise_std, bool)
        or not isinstance(noise_std, (int, float))
        or not 0 <= noise_std < math.inf
    ):
        raise CamkitError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if not (loss == "mse" or (callable(loss) and not isinstance(loss, str))):
        raise CamkitError(f"unknown loss {loss!r}: 'mse' or a function loss(drops, dots) -> Tensor[B]")
    return perturbation == "gaussian" or is_uniform(baseline)


def _square_loss(
    s: PerturbSetup, fill: Tensor, block: Tensor, steps: int, loss: str | InfidelityLoss
) -> Tensor:
    """Tensor[B] (float64): the loss between the score drops and ``I^T g`` while the squares ``block`` take
    ``fill``'s values, cumulatively."""
    b = s.x.shape[0]
    key = block.expand(b, -1)
    drops = (s.y[:, None] - step_scores(s, s.x, fill, key, steps, cumulative=True)).double()
    diff = ((s.x - fill) * s.maps[:, None]).sum(dim=1).flatten(1).double()  # I^T g of each pixel
    dots = (
        torch.zeros(b, steps, dtype=torch.float64, device=s.x.device).scatter_add_(1, key, diff).cumsum(dim=1)
    )
    if isinstance(loss, str):  # "mse", checked
        return (dots - drops).pow(2).mean(dim=1)
    out = loss(drops, dots)
    if not isinstance(out, Tensor) or tuple(out.shape) != (b,):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CamkitError(f"the infidelity loss must give a Tensor of shape ({b},), got {got}")
    return out.to(s.x.device).double()
