"""RefineCAM: the multi-layer product of pytorch-grad-cam 1.5.7's ``RefineCAM`` and torchcam 0.5.0's ``RefineCAM``
("How to Evaluate and Refine your CAM", arXiv 2605.14641).

What camkit computes (``refinecam``): for each target layer, a base layer method's map (Grad-CAM++ by default, as
both peers) from the shared capture; each gets the ReLU, is upsampled (bilinear) to the input size and min-maxed to
[0, 1]; the layers' maps are multiplied element-wise, and the product is min-maxed. A region survives only where
every layer sees it, so the fine detail of shallow layers is kept where the deep layers agree (the shallow layers'
noise is cut).

This is pytorch-grad-cam's order (each layer's map is brought to the input size, then multiplied). torchcam
multiplies at the largest layer's resolution and leaves the upsampling to the caller; the two differ only by where
the bilinear resize happens (measured in ``tests/peers/test_fem_segeigen_refine_vs_peers.py``). With one target
layer the product is the base method's map. camkit's multi-scale method (called ``refinecam`` before) is
``multiscalecam`` (:mod:`camkit.methods.multiscale`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.core.postprocess import normalize, upsample
from camkit.errors import CamkitError
from camkit.methods.passes import per_target, stack_targets, target_count
from camkit.methods.registry import (
    LayerMethod,
    MethodInput,
    PassInput,
    PassMethod,
    configured_name,
    get_method,
    register,
)

__all__ = ["refinecam"]


def refinecam(base: str = "gradcam++", **removed: object) -> PassMethod:
    """The multi-layer product with this base method (``explain(..., method=refinecam("layercam"), layers=...)``),
    named ``refinecam`` with the default base, else ``refinecam(base='layercam')``.

    Args:
        base: a layer method of the shared capture (``gradcam++``, ``gradcam``, ``layercam``, ``eigencam``, ...;
            not ``cam``, which reads the classifier).
        removed: none; the settings of the multi-scale method camkit called ``refinecam`` before (``scales``) are
            refused with a pointer to :func:`camkit.methods.multiscale.multiscalecam`.
    """
    if removed:
        raise CamkitError(
            f"refinecam takes base= only; {', '.join(removed)} belonged to the multi-scale method that camkit called "
            "refinecam before: use multiscalecam(scales=...) (camkit.methods.multiscale)"
        )
    if not isinstance(base, str):
        raise CamkitError(
            f"refinecam takes base= (a layer method's name), got {base!r}; the multi-scale method that camkit "
            "called refinecam before is multiscalecam(scales=...)"
        )
    formula = get_method(base)
    if not isinstance(formula, LayerMethod) or formula.needs_classifier:
        raise CamkitError(
            f"base must be a layer method of A and dS/dA (gradcam++, gradcam, ...), got {base!r}"
        )

    def run(inp: PassInput) -> dict[str, Tensor]:
        return _run(inp, formula)

    return PassMethod(
        name=configured_name("refinecam", {"base": base}, {"base": "gradcam++"}),
        run=run,
        needs_grad=formula.needs_grad,
        cost="1 forward + 1 backward (shared); the base map of every target layer",
        paper="How to Evaluate and Refine your CAM, arXiv 2605.14641 (pytorch-grad-cam / torchcam RefineCAM)",
        summary="product of the min-maxed base maps (Grad-CAM++) of the target layers, at input size",
        prefer="several layers (e.g. layer2,layer3,layer4): shallow detail kept only where deep layers agree",
        aliases=("refine-cam",),
    )


def _run(inp: PassInput, formula: LayerMethod) -> dict[str, Tensor]:
    """The product over the target layers of each layer's normalised base map, one per target."""
    size = (inp.x.shape[-2], inp.x.shape[-1])
    k = target_count(inp)
    product: list[Tensor] | None = None
    for name, a in inp.activations.items():
        grads = inp.gradients.get(name)
        per: list[Tensor | None] = list(per_target(grads, k)) if grads is not None else [None] * k
        maps = [normalize(upsample(torch.relu(formula.fn(MethodInput(a.float(), g))), size)) for g in per]
        product = maps if product is None else [p * m for p, m in zip(product, maps, strict=True)]
    if product is None:
        raise CamkitError("refinecam needs at least one target layer")
    return {"refinecam": stack_targets(inp, product)}


register(refinecam(), refinecam)
