"""CAM (Zhou et al., CVPR 2016): map = sum_k W[c, k] A_k, with W the weight of the Linear layer that follows global
average pooling of the target layer. For such a head Grad-CAM equals CAM / (h*w).

:func:`classifier_weights` finds W and checks numerically that the head really is GAP + Linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from camkit.methods.registry import LayerMethod, MethodInput, register

__all__ = ["cam", "classifier_weights"]


def cam(x: MethodInput) -> Tensor:
    assert x.class_weights is not None, "CAM called without classifier weights"
    return torch.einsum("bk,bkhw->bhw", x.class_weights.to(x.activations.dtype), x.activations)


def classifier_weights(model: nn.Module, activation: Tensor, output: Tensor, layer: str) -> Tensor:
    """Weight matrix W[C, K] of the Linear layer that reads the global average of ``activation`` [B, K, h, w].

    Checked numerically: the output must equal mean_hw(A) @ W.T + b, else the head is not GAP + Linear.

    Raises:
        ValueError: the head is not GAP + Linear; the message names the layer and what to do instead.
    """
    k = activation.shape[1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == k]
    why = ""
    if linears:
        fc = linears[-1]
        with torch.no_grad():
            pooled = activation.float().mean(dim=(2, 3))
            expected = pooled @ fc.weight.float().T
            if fc.bias is not None:
                expected = expected + fc.bias.float()
        if expected.shape == output.shape and torch.allclose(
            expected, output.float(), rtol=1e-3, atol=1e-3 * float(output.abs().max().clamp_min(1.0))
        ):
            return fc.weight.detach()
        why = " (the model output is not mean(A) @ W.T + b for its last matching Linear layer)"
    raise ValueError(
        f"CAM needs the target layer {layer!r} to be followed by global average pooling and a single Linear "
        f"layer{why}. Target the layer that global pooling reads (layers='auto'), or use 'gradcam', which "
        "equals CAM / (h*w) for such heads and works on any head."
    )


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
