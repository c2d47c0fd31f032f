"""Sanity check: cascading model parameter randomization (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018).

A map that explains the *model* must change when the model's weights are destroyed. Re-initialise the layers one
after the other from the top (logits) down, explain the same images and classes after each step, and compare
with the trained model's map by Spearman rank correlation: a method that passes drops towards 0; a method
whose maps stay similar (an edge detector, say) fails.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from camkit.errors import CamkitError

__all__ = ["SanityResult", "cascading_randomization", "randomizable_modules", "spearman"]


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks (0-based) of each row of Tensor[B, N], ties sharing their average rank."""
    out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    for i in range(x.shape[0]):
        vals, order = torch.sort(x[i])
        _, counts = torch.unique_consecutive(vals, return_counts=True)
        ends = counts.cumsum(0).double()
        avg = ends - (counts.double() + 1) / 2  # mean of start .. end - 1
        out[i, order] = torch.repeat_interleave(avg, counts)
    return out


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps, Tensor[B] (from Tensor[B, ...] each).

    Ties get their average rank (as ``scipy.stats.spearmanr``); when either map is constant the correlation is
    undefined and reported as 0 (the map carries no ranking).
    """
    ra = _average_ranks(a.detach().flatten(1).double())
    rb = _average_ranks(b.detach().flatten(1).double())
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = ra.norm(dim=1) * rb.norm(dim=1)
    num = (ra * rb).sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)).float()


def randomizable_modules(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly (convolutions, linear layers, norms), from the output
    back to the input (reverse registration order, which follows the forward order for common networks)."""
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def reinitialize(module: nn.Module) -> None:
    """Re-initialise every submodule that owns parameters with its own ``reset_parameters`` (PyTorch's default
    initialisation; BatchNorm also resets its running statistics), else N(0, 0.02) weights and zero biases."""
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
            continue
        with torch.no_grad():
            for p in own:
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.02)
                else:
                    p.zero_()


@dataclass
class SanityResult:
    """Result of :func:`cascading_randomization`.

    Attributes:
        steps: ``"original"``, then the module(s) re-initialised at each step (cumulative, top down).
        correlation: Tensor[S + 1, B], Spearman correlation between the trained model's map and the map after
            each step (row 0 is 1 by construction).
        classes: LongTensor[B], the explained classes (the trained model's, kept for every step).
        maps: Tensor[S + 1, B, H, W] when ``keep_maps``, else None.
        method: the method checked.
    """

    steps: list[str]
    correlation: Tensor
    classes: Tensor | None
    maps: Tensor | None
    method: str


def cascading_randomization(
    model: nn.Module,
    images: Any,
    method: str = "gradcam",
    layers: str | Sequence[str] = "auto",
    targets: Any = None,
    *,
    modules: Sequence[str | Sequence[str]] | None = None,
    seed: int = 0,
    keep_maps: bool = False,
    **explain_kwargs: Any,
) -> SanityResult:
    """Cascading parameter randomization (Adebayo et al. 2018, section 3.1).

    Paper: "we randomize the weights of a model starting from the top layer, successively, all the way to the
    bottom layer", and compare each map with the original one by Spearman rank correlation (with and without
    absolute values; CAM maps are non-negative, so both are the same here), SSIM and HOG similarity.

    Choices: the user's model is never modified: a deep copy is randomised (``reset_parameters``, PyTorch's
    default initialisation, instead of the paper's truncated normal; seeded, and the global RNG is left as it
    was). Each step re-initialises one entry of ``modules`` (a module name, or a list of names randomised
    together; default: :func:`randomizable_modules`, every module that owns parameters, top down). The classes
    explained are the trained model's (top-1 or ``targets``) at every step. Spearman on the maps at input
    size, ties averaged.

    Args:
        model: the trained model, eval mode (left untouched).
        images, method, layers, targets, explain_kwargs: as for :func:`camkit.explain` (``layers`` by name, so
            it resolves on the copy).
        modules: the randomisation steps, top down.
        seed: seed of the re-initialisation.
        keep_maps: also return every step's maps.
    """
    import camkit

    if not isinstance(layers, (str, list, tuple)):
        raise TypeError(
            "layers must be given by name (str or list of str): the layers of a copy are explained"
        )
    base = camkit.explain(model, images, method=method, layers=layers, targets=targets, **explain_kwargs)
    if base.maps.dim() != 3:
        raise CamkitError("the sanity check explains one target per image; TopK targets are not supported")
    classes = base.classes
    fixed_targets = targets if classes is None else [int(c) for c in classes]
    steps = list(modules) if modules is not None else randomizable_modules(model)
    if not steps:
        raise CamkitError("the model has no parameters to randomise")
    work = copy.deepcopy(model)
    names = dict(work.named_modules())
    for step in steps:
        for name in [step] if isinstance(step, str) else step:
            if name not in names:
                raise CamkitError(f"no module named {name!r} in the model")
    maps = [base.maps]
    corr = [torch.ones(base.maps.shape[0])]
    device = next(iter(work.parameters())).device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for step in steps:
            for name in [step] if isinstance(step, str) else step:
                reinitialize(names[name])
            e = camkit.explain(
                work, images, method=method, layers=layers, targets=fixed_targets, **explain_kwargs
            )
            corr.append(spearman(base.maps, e.maps).cpu())
            if keep_maps:
                maps.append(e.maps)
    return SanityResult(
        steps=["original"] + [s if isinstance(s, str) else "+".join(s) for s in steps],
        correlation=torch.stack(corr),
        classes=classes,
        maps=torch.stack(maps) if keep_maps else None,
        method=base.method,
    )
