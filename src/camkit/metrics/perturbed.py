"""The perturbation machinery shared by the Quantus-family metrics (:mod:`camkit.metrics.correlation`,
:mod:`camkit.metrics.regions`): baselines, seeded pixel subsets, the scores of images perturbed step by step or
subset by subset (built a chunk at a time and sent through :class:`camkit.metrics.Forward`), and correlations."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.metrics._common import (
    Baseline,
    Forward,
    check_inputs,
    chunks,
    make_baseline,
    pixel_ranks,
    resolve_targets,
)

__all__ = [
    "PerturbSetup",
    "fill_baseline",
    "group_steps",
    "is_uniform",
    "pearson",
    "perturbed_scores",
    "prepare",
    "random_subsets",
    "square_fill",
    "square_grid",
    "step_fill",
    "step_scores",
    "step_sums",
    "subset_scores",
]


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row pair of Tensor[B, N], Tensor[B] (0 where a row is constant)."""
    a = a.double().flatten(1)
    b = b.double().flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    num = (a * b).sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


def fill_baseline(x: Tensor, baseline: Baseline) -> Tensor:
    """The values replaced pixels take, Tensor like ``x``: ``"black"`` / ``"white"`` = each image's minimum /
    maximum over all its values (Quantus' baselines), else :func:`camkit.metrics._common.make_baseline`."""
    if baseline == "black":
        return x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x).contiguous()
    if baseline == "white":
        return x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x).contiguous()
    return make_baseline(x, baseline, "zeros")


def random_subsets(b: int, runs: int, n: int, k: int, seed: int | torch.Generator = 0) -> Tensor:
    """LongTensor[b, runs, k]: for each image and run, k distinct pixel indices of n, uniformly drawn (a random
    permutation's first k, ``torch.rand(b, runs, n).argsort(dim=2)``, from a CPU generator seeded with ``seed``,
    or from the generator given)."""
    if not 1 <= k <= n:
        raise CamkitError(f"a subset must have between 1 and {n} pixels (the image's), got {k}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(b, runs, n, generator=gen).argsort(dim=2)[..., :k]


@dataclass(frozen=True)
class PerturbSetup:
    """The checked inputs of one metric call: the forward, inputs, maps, classes and unperturbed scores."""

    fwd: Forward
    x: Tensor
    maps: Tensor
    classes: Tensor
    y: Tensor
    score: str


def prepare(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | int | None,
    score: str,
    batch_size: int | None,
    forward: Forward | None,
) -> PerturbSetup:
    """Check the inputs and maps (moved to the model's device), resolve the classes, score the unperturbed inputs."""
    x, m = check_inputs(model, inputs, maps)
    fwd = forward or Forward(model, batch_size)
    cls = resolve_targets(fwd, x, classes)
    return PerturbSetup(fwd, x, m, cls, fwd.scores(x, cls, score), score)


def perturbed_scores(
    s: PerturbSetup, n: int, make: Callable[[Tensor], tuple[Tensor, Tensor]], shape: tuple[int, ...]
) -> Tensor:
    """Scores of ``n`` perturbed images, Tensor[shape]: ``make(indices)`` -> (images, their image indices),
    built and sent to the model a chunk at a time."""
    out = torch.empty(n, device=s.x.device)
    for lo, hi in chunks(n, s.fwd.batch_size):
        images, img = make(torch.arange(lo, hi, device=s.x.device))
        out[lo:hi] = s.fwd.scores(images, s.classes[img], s.score)
    return out.view(shape)


def step_scores(
    s: PerturbSetup, start: Tensor, fill: Tensor, key: Tensor, steps: int, cumulative: bool
) -> Tensor:
    """Tensor[B, steps]: the score after step t, where the pixels whose ``key`` (LongTensor[B, H*W]) is t (or at
    most t when ``cumulative``) take ``fill``'s values and the others ``start``'s."""
    b, _, h, w = s.x.shape

    def make(idx: Tensor) -> tuple[Tensor, Tensor]:
        img, t = idx // steps, idx % steps
        k = key[img]
        mask = (k <= t[:, None]) if cumulative else (k == t[:, None])
        return torch.where(mask.view(-1, 1, h, w), fill[img], start[img]), img

    return perturbed_scores(s, b * steps, make, (b, steps))


def subset_scores(s: PerturbSetup, base: Tensor, idx: Tensor, values: Tensor | None = None) -> Tensor:
    """Tensor[B, R]: the score with the pixels ``idx`` (LongTensor[B, R, k]) replaced by ``base``, or by the value
    of ``values`` (Tensor[B, R]) of that image and run."""
    b, runs, _ = idx.shape
    _, _, h, w = s.x.shape
    idx = idx.to(s.x.device)

    def make(i: Tensor) -> tuple[Tensor, Tensor]:
        img, r = i // runs, i % runs
        mask = torch.zeros(i.shape[0], h * w, dtype=torch.bool, device=s.x.device)
        mask.scatter_(1, idx[img, r], True)
        fill = base[img] if values is None else values[img, r].view(-1, 1, 1, 1).to(s.x.dtype)
        return torch.where(mask.view(-1, 1, h, w), fill, s.x[img]), img

    return perturbed_scores(s, b * runs, make, (b, runs))


def group_steps(maps: Tensor, features_in_step: int, descending: bool) -> tuple[Tensor, int]:
    """The step of each pixel, LongTensor[B, H*W] (``features_in_step`` pixels a step in map order), and the number
    of steps."""
    if isinstance(features_in_step, bool) or not isinstance(features_in_step, int) or features_in_step < 1:
        raise CamkitError(f"features_in_step must be an int >= 1, got {features_in_step!r}")
    n = maps[0].numel()
    return pixel_ranks(maps, descending=descending) // features_in_step, math.ceil(n / features_in_step)


def step_sums(maps: Tensor, key: Tensor, steps: int) -> Tensor:
    """Tensor[B, steps]: the map's sum over the pixels of each step."""
    flat = maps.flatten(1).double()
    return torch.zeros(flat.shape[0], steps, dtype=torch.float64, device=flat.device).scatter_add_(
        1, key, flat
    )


def square_grid(h: int, w: int, p: int, device: torch.device | str | None = None) -> tuple[Tensor, int]:
    """The square of each pixel, LongTensor[H*W] (``p`` x ``p`` squares of a grid from the top left, in raster order;
    those at the right and bottom edges cut to the image), and the number of squares."""
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise CamkitError(f"patch sizes must be ints >= 1, got {p!r}")
    cols = math.ceil(w / p)
    rows = torch.arange(h, device=device)[:, None] // p
    return (rows * cols + torch.arange(w, device=device)[None] // p).flatten(), math.ceil(h / p) * cols


def is_uniform(baseline: object) -> bool:
    """``baseline`` is ``"uniform"``: one U(0, 1) value per image and step (Quantus 0.6.0's batched ``"uniform"``)."""
    return isinstance(baseline, str) and baseline == "uniform"


def step_fill(x: Tensor, baseline: Baseline, key: Tensor, steps: int, seed: int) -> Tensor:
    """:func:`fill_baseline`, or for ``"uniform"`` :func:`square_fill` with a CPU generator seeded with ``seed``
    (one value per image and step of ``key``)."""
    if is_uniform(baseline):
        return square_fill(x, key, steps, torch.Generator(device="cpu").manual_seed(seed))
    return fill_baseline(x, baseline)


def square_fill(x: Tensor, key: Tensor, steps: int, gen: torch.Generator) -> Tensor:
    """Tensor like ``x`` Tensor[B, C, H, W]: one value from U(0, 1) per image and step, on every channel of the
    pixels whose ``key`` (LongTensor[B, H*W] or [H*W]) is that step (Quantus 0.6.0's batched ``"uniform"``
    baseline); the values are ``torch.rand(B, steps, generator=gen)``."""
    b, c, h, w = x.shape
    u = torch.rand(b, steps, generator=gen).to(x.device, x.dtype)
    return u.gather(1, key.expand(b, -1)).view(b, 1, h, w).expand(b, c, h, w).contiguous()
