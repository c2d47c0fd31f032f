"""CAM (Zhou et al., CVPR 2016): map = sum_k W[c, k] A_k, with W the weight of the Linear layer that follows global
average pooling of the target layer, or of a 1x1 convolution followed by global average pooling (SqueezeNet's
style of head, without a non-linearity in between: the two orders give the same output). For such a head Grad-CAM
equals CAM / (h*w).

:func:`classifier_weights` finds W and checks numerically that the head really is GAP + Linear (or conv 1x1 + GAP).
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.methods.head import classifier_weights
from camkit.methods.registry import LayerMethod, MethodInput, register

__all__ = ["cam", "classifier_weights"]


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
        prefer="a GAP + Linear classifier and no backward wanted: exact, the paper's signed map with relu=False",
        needs_classifier=True,
    )
)
