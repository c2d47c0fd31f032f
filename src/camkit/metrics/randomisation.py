"""Randomisation metrics: random logit and model parameter randomisation (MPRT), as Quantus 0.6.0's
``RandomLogit`` and ``MPRT``. Both explain again: the same inputs for other classes (random logit), or with copies
of the model whose parameters are re-initialised (MPRT), through ``explain(model, inputs, classes) -> maps``, the
method that made the maps, e.g.

>>> explain = lambda model, x, classes: camkit.explain(model, x, "gradcam", targets=classes.tolist()).maps
>>> random_logit(model, x, expl.maps, explain)     # SSIM with another class's map: lower is better
>>> mprt(model, x, expl.maps, explain).last        # Spearman after every layer is re-initialised

MPRT is :func:`camkit.metrics.cascading_randomization`'s test (the same module order, re-initialisation and
Spearman correlation) on the maps of one batch, with a per-image score. The user's model is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.metrics._common import Forward, check_inputs, resolve_targets
from camkit.metrics.sanity import randomizable_modules, reinitialize, spearman

__all__ = ["Explainer", "MprtResult", "mprt", "off_classes", "random_logit", "ssim"]

#: The maps of a method for a model, inputs Tensor[B, C, H, W] and classes LongTensor[B] -> Tensor[B, H, W].
Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]


def ssim(a: Tensor, b: Tensor, win_size: int = 7) -> Tensor:
    """Mean structural similarity (Wang et al., IEEE TIP 2004) of each pair of maps Tensor[B, H, W], Tensor[B].

    As ``skimage.metrics.structural_similarity`` with its defaults: a ``win_size`` x ``win_size`` uniform window,
    sample covariances, K1 = 0.01, K2 = 0.03, the mean over the windows that fit inside the map; the data range
    of a pair is max - min over both maps (Quantus's ``ssim``). Two equal constant maps give 1.
    """
    x, y = a.detach().double(), b.detach().double()
    if x.dim() != 3 or x.shape != y.shape:
        raise CamkitError(
            f"SSIM compares maps Tensor[B, H, W] of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < win_size:
        raise CamkitError(
            f"SSIM needs maps of at least {win_size} x {win_size} pixels, got {tuple(x.shape[-2:])}"
        )
    both = torch.cat([x.flatten(1), y.flatten(1)], dim=1)
    rng = (both.amax(dim=1) - both.amin(dim=1))[:, None, None]
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    stack = torch.stack([x, y, x * x, y * y, x * y], dim=1)
    ux, uy, uxx, uyy, uxy = F.avg_pool2d(stack, win_size, stride=1).unbind(dim=1)
    norm = win_size**2 / (win_size**2 - 1)
    vx, vy, vxy = norm * (uxx - ux * ux), norm * (uyy - uy * uy), norm * (uxy - ux * uy)
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    value = s.flatten(1).mean(dim=1)
    same = (x == y).flatten(1).all(dim=1)
    return torch.where(same, torch.ones_like(value), value).float()


def off_classes(classes: Tensor, n_classes: int, seed: int = 0) -> Tensor:
    """LongTensor[B]: per image, a class drawn uniformly from the ``n_classes - 1`` classes other than its own
    (a CPU ``torch.Generator`` seeded with ``seed``, so the draw is the same on every device)."""
    if n_classes < 2:
        raise CamkitError(f"random logit needs a model with at least 2 outputs, got {n_classes}")
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, n_classes - 1, (classes.shape[0],), generator=g).to(classes.device)
    return r + (r >= classes).long()


def _check_maps(got: object, like: Tensor, what: str) -> Tensor:
    if not isinstance(got, Tensor) or tuple(got.shape) != tuple(like.shape):
        shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise CamkitError(f"{what} must give maps of shape {tuple(like.shape)}, got {shape}")
    return got.to(like.device).float()


def random_logit(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    explain: Explainer,
    classes: Tensor | int | None = None,
    others: Tensor | None = None,
    seed: int = 0,
    forward: Forward | None = None,
) -> Tensor:
    """Random logit test (Sixt et al., "When Explanations Lie: Why Many Modified BP Attributions Fail", ICML
    2020): the SSIM (:func:`ssim`, on the 2-D maps) between each map and the same method's map of the same input
    for a random other class. Tensor[B], lower is better (a class-sensitive method).

    Args:
        model: the classifier, in eval mode.
        inputs: normalised Tensor[B, C, H, W]; maps: the method's maps Tensor[B, H, W] for ``classes``.
        explain: ``explain(model, inputs, classes) -> maps`` of the same method.
        classes: the explained classes (None: each image's top-1).
        others: the other classes, LongTensor[B] (None: :func:`off_classes` with ``seed``).
        forward: how the inputs reach the model (in chunks).
    """
    x, m = check_inputs(model, inputs, maps)
    fwd = forward or Forward(model)
    logits = fwd(x)
    cls = logits.argmax(dim=1) if classes is None else resolve_targets(fwd, x, classes)
    off = off_classes(cls, logits.shape[1], seed) if others is None else torch.as_tensor(others).to(cls)
    if tuple(off.shape) != tuple(cls.shape) or bool((off == cls).any()):
        raise CamkitError(
            "others must hold one class per image, each different from the image's explained class"
        )
    other = _check_maps(explain(model, x, off), m, "random logit's explain")
    return ssim(m, other)


@dataclass(frozen=True)
class MprtResult:
    """Result of :func:`mprt`.

    Attributes:
        steps: the module(s) re-initialised at each step (cumulative, top down).
        correlation: Tensor[S, B], Spearman correlation between each map and the map after each step.
        mean: Tensor[B], the mean over the steps (lower is better).
        last: Tensor[B], after the last step, every module re-initialised (lower is better).
    """

    steps: list[str]
    correlation: Tensor
    mean: Tensor
    last: Tensor


def mprt(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    explain: Explainer,
    classes: Tensor | int | None = None,
    modules: Sequence[str | Sequence[str]] | None = None,
    seed: int = 43,
    forward: Forward | None = None,
    layer_order: str = "top_down",
) -> MprtResult:
    """Cascading model parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS
    2018, section 3.1), per image: Spearman correlation (ties averaged, 0 for a constant map) between each map and
    the map of the same method, inputs and classes on a copy of the model re-initialised from the top down.

    Choices: the steps are :func:`camkit.metrics.randomizable_modules` (every module that owns parameters, output
    first; ``modules`` to choose), each re-initialised by its ``reset_parameters`` (PyTorch's default
    initialisation) from torch's generator seeded with ``seed`` before each step (Quantus 0.6.0's ``MPRT(seed=s)``
    seeds ``s + 1`` before each layer: ``seed=43`` draws its default's weights); the global generator is left as
    it was, and the user's model is untouched. One explanation of the batch per step.

    Args:
        model: the trained classifier, eval mode.
        inputs: normalised Tensor[B, C, H, W]; maps: the method's maps of the trained model, Tensor[B, H, W].
        explain: ``explain(model, inputs, classes) -> maps`` of the same method (called with the copies).
        classes: the explained classes (None: each image's top-1 on the trained model).
        modules: the randomisation steps, top down (a module name, or a list of names randomised together).
        seed: the seed of each step's re-initialisation.
        forward: how the inputs reach the model (for the top-1).
        layer_order: ``"top_down"`` (cascading, the paper's section 3.1) or ``"independent"`` (each step
            re-initialises its module(s) alone on the trained weights, the paper's independent randomisation;
            Quantus' ``layer_order``).
    """
    if layer_order not in ("top_down", "independent"):
        raise CamkitError(f"unknown layer_order {layer_order!r}: 'top_down' or 'independent'")
    x, m = check_inputs(model, inputs, maps)
    cls = resolve_targets(forward or Forward(model), x, classes)
    steps = list(modules) if modules is not None else randomizable_modules(model)
    if not steps:
        raise CamkitError("the model has no parameters to randomise")
    work = copy.deepcopy(model)
    names = dict(work.named_modules())
    groups = [[s] if isinstance(s, str) else list(s) for s in steps]
    for name in (n for g in groups for n in g):
        if name not in names:
            raise CamkitError(
                f"no module named {name!r} in the model; see camkit.metrics.randomizable_modules"
            )
    corr = []
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for group in groups:
            if layer_order == "independent":
                work.load_state_dict(model.state_dict())
            torch.manual_seed(seed)
            for name in group:
                reinitialize(names[name])
            other = _check_maps(explain(work, x, cls), m, "MPRT's explain")
            corr.append(spearman(m, other).to(m.device))
    c = torch.stack(corr)
    return MprtResult(steps=["+".join(g) for g in groups], correlation=c, mean=c.mean(dim=0), last=c[-1])
