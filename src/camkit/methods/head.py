"""The classifier head a CAM reads: the weights W[C, K] of a GAP + Linear (or 1x1 convolution + GAP) head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from camkit.errors import CamkitError

__all__ = ["classifier_weights"]


def classifier_weights(model: nn.Module, activation: Tensor, output: Tensor, layer: str) -> Tensor:
    """Weight matrix W[C, K] of the Linear layer that reads the global average of ``activation`` [B, K, h, w], or
    of a 1x1 ``nn.Conv2d`` (K -> C) whose output is globally averaged.

    Checked numerically: the output must equal mean_hw(A) @ W.T + b (for the convolution that is
    mean_hw(conv1x1(A)), the same thing), else the head is not linear in A: a ReLU between the 1x1 convolution
    and the pooling (torchvision's SqueezeNet) is refused.

    Raises:
        ValueError: the head is not GAP + Linear nor conv 1x1 + GAP; the message names the layer and what to do
            instead.
    """
    k = activation.shape[1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == k]
    convs = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        and m.in_channels == k
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.groups == 1
        and m.dilation == (1, 1)
        and m.padding in ((0, 0), "valid")
    ]
    why = ""
    with torch.no_grad():
        pooled = activation.float().mean(dim=(2, 3))
    for kind, head in (("Linear", linears[-1] if linears else None), ("conv", convs[-1] if convs else None)):
        if head is None:
            continue
        w = head.weight.detach().flatten(1)  # [C, K] (a 1x1 convolution's [C, K, 1, 1] too)
        with torch.no_grad():
            expected = pooled @ w.float().T
            if head.bias is not None:
                expected = expected + head.bias.float()
        if expected.shape == output.shape and torch.allclose(
            expected, output.float(), rtol=1e-3, atol=1e-3 * float(output.abs().max().clamp_min(1.0))
        ):
            return head.weight.detach() if kind == "Linear" else w
        why = (
            " (the model output is not mean(A) @ W.T + b for its last matching Linear layer)"
            if kind == "Linear"
            else " (the model output is not mean_hw(conv1x1(A)) for its last 1x1 convolution reading A: a "
            "non-linearity such as a ReLU between that convolution and the pooling, as in torchvision's "
            "SqueezeNet, makes the map non-linear)"
        )
    raise CamkitError(
        f"CAM needs the target layer {layer!r} to be followed by global average pooling and a single Linear "
        f"layer, or by a 1x1 convolution and global average pooling{why}. Target the layer that global pooling "
        "(or the 1x1 classifier convolution) reads (layers='auto'), or use 'gradcam', which equals CAM / (h*w) "
        "for such heads and works on any head."
    )
