"""Finer-CAM (Zhang et al., CVPR 2025, "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
Explanation").

Instead of the target class's logit y_c alone, Finer-CAM explains how c differs from the classes the model finds
most similar to it: the ``n_similar`` classes whose logits are closest to y_c (|y_j - y_c| smallest, c itself
excluded). With p = softmax(y), the explained score is

    S = sum_j p_j (y_c - alpha * y_j) / (sum_j p_j + 1e-9)

(pytorch-grad-cam's FinerWeightedTarget, the same formula: the comparison classes weighted by their probability,
p in the graph). ``alpha = 0`` gives the base method back; ``alpha = 1`` is the paper's default. The map is the
base layer method (Grad-CAM by default) of that score's gradient.

Cost: its own capture pass (1 forward + 1 backward to the layer), since the score differs from the call's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from camkit.errors import CamkitError
from camkit.methods.passes import layer_features, per_target, stack_targets, target_count
from camkit.methods.registry import (
    LayerMethod,
    MethodInput,
    PassInput,
    PassMethod,
    configured_name,
    get_method,
    register,
)

__all__ = ["finer_score", "finercam", "similar_classes"]


def similar_classes(output: Tensor, classes: Tensor, n: int) -> Tensor:
    """The ``n`` classes whose scores are closest to each image's target class's, nearest first, the class itself
    excluded: LongTensor[B, n] for ``output`` [B, C] and ``classes`` LongTensor[B]."""
    y = output.detach().float()
    gap = (y - y.gather(1, classes[:, None])).abs()
    gap.scatter_(1, classes[:, None], float("inf"))
    return gap.argsort(dim=1, stable=True)[:, :n]


def finer_score(output: Tensor, classes: Tensor, similar: Tensor, alpha: float) -> Tensor:
    """Finer-CAM's score per image, Tensor[B] (see the module docstring)."""
    y = output.float()
    p = torch.softmax(y, dim=1).gather(1, similar)
    diff = y.gather(1, classes[:, None]) - alpha * y.gather(1, similar)
    return (p * diff).sum(dim=1) / (p.sum(dim=1) + 1e-9)


def finercam(alpha: float = 1.0, n_similar: int = 3, base: str = "gradcam") -> PassMethod:
    """A Finer-CAM method with these settings (``explain(..., method=finercam(alpha=0.5))``), named ``finercam``
    with the default settings, else after the settings that differ (``finercam(alpha=0.5)``).

    Args:
        alpha: how much of the similar classes' logits is subtracted (0: the base method).
        n_similar: how many of the most similar classes to contrast with.
        base: a gradient layer method whose formula makes the map (``gradcam``, ``gradcam++``, ``layercam``, ...).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a finite number, got {alpha!r} ({type(alpha).__name__})")
    if not -float("inf") < alpha < float("inf"):
        raise CamkitError(f"alpha must be a finite number, got {alpha!r}")
    if isinstance(n_similar, bool) or not isinstance(n_similar, int) or n_similar < 1:
        raise CamkitError(f"n_similar must be an integer >= 1, got {n_similar!r}")
    formula = get_method(base)
    if not isinstance(formula, LayerMethod) or not formula.needs_grad or formula.needs_classifier:
        raise CamkitError(f"base must be a gradient layer method (gradcam, gradcam++, ...), got {base!r}")
    fn = formula.fn

    def run(inp: PassInput) -> dict[str, Tensor]:
        return _run(inp, float(alpha), n_similar, fn)

    settings = {"alpha": alpha, "n_similar": n_similar, "base": base}
    return PassMethod(
        name=configured_name("finercam", settings, {"alpha": 1.0, "n_similar": 3, "base": "gradcam"}),
        run=run,
        cost="1 forward + 1 backward to the layer (its own pass: a different score)",
        paper="Zhang et al., CVPR 2025",
        summary="base CAM of S = sum_j p_j (y_c - alpha*y_j) / sum_j p_j over the classes nearest in logit",
        prefer="fine-grained classes: what tells the class apart from its look-alikes, not what they share",
        aliases=("finer-cam", "finer"),
    )


def _run(
    inp: PassInput, alpha: float, n_similar: int, fn: Callable[[MethodInput], Tensor]
) -> dict[str, Tensor]:
    if inp.classes is None:
        raise CamkitError(
            "Finer-CAM contrasts a class with its look-alikes: give class targets, not a function"
        )
    n = target_count(inp)
    cls = inp.classes if inp.classes.dim() == 2 else inp.classes[:, None]

    def score(output: Tensor) -> Tensor:
        if output.dim() != 2 or output.shape[1] < 2:
            raise CamkitError(
                f"Finer-CAM needs class scores [B, C] with C >= 2 to compare classes, got {tuple(output.shape)}"
            )
        k = min(n_similar, output.shape[1] - 1)
        rows = [
            finer_score(output, cls[:, t], similar_classes(output, cls[:, t], k), alpha) for t in range(n)
        ]
        return torch.stack(rows) if n > 1 else rows[0]

    feats = layer_features(inp, inp.x, score)
    out = {}
    for name, a in feats.activations.items():
        grads = per_target(feats.gradients[name], n)
        out[name] = stack_targets(inp, [fn(MethodInput(a.float(), g)) for g in grads])
    return out


register(finercam(), finercam)
