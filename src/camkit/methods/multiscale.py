"""A multi-scale, multi-layer refinement in the spirit of SESS (Tyagi et al., ECCV 2022, "SESS: Saliency
Enhancing with Scaling and Sliding") and of multi-layer fusion (LayerCAM's, Jiang et al. 2021).

What camkit computes (``multiscalecam``; camkit called it ``refinecam`` before, the name the peers give another
algorithm, the multi-layer product of :mod:`camkit.methods.refine`): the input is resized by each factor in
``scales`` (bilinear); a base layer method (Grad-CAM by default) runs on each resized input for every target
layer; each map gets the ReLU, is resized back to the input size and min-maxed; the maps of one layer are averaged over the scales. The layers'
averaged maps are then fused by the pipeline (``fusion="max"`` by default, ``"mean"`` as an option), so
``layers="layer2,layer3,layer4"`` gives the multi-layer part. The class explained is the original input's.

What it does not do (honestly, compared with SESS): no sliding windows over the enlarged input, no pre-filtering
of windows by confidence and no calibration of their fusion. It fits CNNs that accept any input size;
transformers with a fixed token grid fail at other scales (use ``scales=(1.0,)`` there, which is the base method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from camkit.core.postprocess import normalize, upsample
from camkit.errors import CamkitError
from camkit.methods.passes import layer_features, per_target, scaled_size, stack_targets, target_count
from camkit.methods.registry import (
    LayerMethod,
    MethodInput,
    PassInput,
    PassMethod,
    configured_name,
    get_method,
    register,
)

__all__ = ["multiscalecam"]


def multiscalecam(scales: Sequence[float] = (1.0, 1.5, 2.0), base: str = "gradcam") -> PassMethod:
    """A multi-scale refinement method with these settings (``explain(..., method=multiscalecam((1, 2)))``), named
    ``multiscalecam`` with the default settings, else after the settings that differ
    (``multiscalecam(scales=(1.0, 2.0))``).

    Args:
        scales: resize factors of the input (each > 0); every scale costs one capture pass.
        base: a gradient layer method (``gradcam``, ``gradcam++``, ``layercam``, ...) computed at each scale.
    """
    sequence = isinstance(scales, Sequence) and not isinstance(scales, (str, bytes))
    given = list(scales) if sequence else []
    if not given or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in given):
        raise CamkitError(f"scales must be a non-empty sequence of factors > 0, got {scales!r}")
    factors = [float(s) for s in given]
    if any(not 0 < s < math.inf for s in factors):
        raise CamkitError(f"scales must be a non-empty sequence of factors > 0, got {scales!r}")
    formula = get_method(base)
    if not isinstance(formula, LayerMethod) or not formula.needs_grad or formula.needs_classifier:
        raise CamkitError(f"base must be a gradient layer method (gradcam, gradcam++, ...), got {base!r}")
    fn = formula.fn

    def run(inp: PassInput) -> dict[str, Tensor]:
        return _run(inp, factors, fn)

    settings = {"scales": tuple(factors), "base": base}
    return PassMethod(
        name=configured_name("multiscalecam", settings, {"scales": (1.0, 1.5, 2.0), "base": "gradcam"}),
        run=run,
        cost=f"1 forward + 1 backward per scale ({len(factors)}), its own passes",
        paper="SESS-style (Tyagi et al., ECCV 2022) without sliding windows",
        summary="base CAM at several input scales, resized back, min-maxed and averaged; layers fused",
        prefer="small or several objects: enlarged inputs give finer maps; fuse layers for detail",
        aliases=("sess", "multiscale", "multi-scale", "multiscale-cam"),
    )


def _run(inp: PassInput, scales: list[float], fn: Callable[[MethodInput], Tensor]) -> dict[str, Tensor]:
    size = (inp.x.shape[-2], inp.x.shape[-1])
    k = target_count(inp)
    sums: dict[str, list[Tensor]] = {}
    for s in scales:
        h, w = scaled_size("multiscalecam", size, s)
        x = (
            inp.x
            if (h, w) == size
            else F.interpolate(inp.x, size=(h, w), mode="bilinear", align_corners=False)
        )
        try:
            feats = layer_features(inp, x)
        except (RuntimeError, AssertionError, ValueError) as err:
            if (h, w) == size:
                raise
            raise CamkitError(
                f"multiscalecam resizes the input by {s:g} to {h}x{w}, and this model does not take that size "
                f"({type(err).__name__}: {err}); use scales=(1.0,) or a model that accepts any input size"
            ) from err
        for name, a in feats.activations.items():
            maps = [
                normalize(upsample(torch.relu(fn(MethodInput(a.float(), g))), size))
                for g in per_target(feats.gradients[name], k)
            ]
            if name not in sums:
                sums[name] = maps
            else:
                sums[name] = [acc + m for acc, m in zip(sums[name], maps, strict=True)]
    return {name: stack_targets(inp, [m / len(scales) for m in per]) for name, per in sums.items()}


register(multiscalecam(), multiscalecam)
