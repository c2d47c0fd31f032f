"""CAM (Zhou et al., CVPR 2016): map = sum_k W[c, k] A_k, with W the weight of the Linear layer that follows global
average pooling of the target layer. For such a head Grad-CAM equals CAM / (h*w)."""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.methods.registry import LayerMethod, MethodInput, register


def cam(x: MethodInput) -> Tensor:
    assert x.class_weights is not None, "CAM called without classifier weights"
    return torch.einsum("bk,bkhw->bhw", x.class_weights.to(x.activations.dtype), x.activations)


register(
    LayerMethod(
        name="cam",
        fn=cam,
        needs_grad=False,
        cost="1 forward, no backward",
        paper="Zhou et al., CVPR 2016",
        summary="map = sum_k W[c,k] A_k with W the fc weights of a GAP+Linear head",
        needs_classifier=True,
    )
)
