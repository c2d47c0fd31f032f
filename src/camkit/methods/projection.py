"""Projection CAMs (no class weights).

* Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the activations as a matrix X = [h*w, K]; the map is the projection
  X v1 on the first right singular vector of X. As in the paper X is not mean-centred (pytorch-grad-cam centres it).
  The SVD's sign is arbitrary: it is fixed so that the map sums to a non-negative value.
* EigenGrad-CAM (pytorch-grad-cam's EigenGradCAM): the same projection applied to g * A.
Eigen-CAM is class-agnostic: the target changes nothing, and it needs no backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.methods.registry import LayerMethod, MethodInput, register


def first_component(x: Tensor) -> Tensor:
    """Projection of Tensor[B, K, h, w] on its first principal direction over channels -> Tensor[B, h, w]."""
    b, k, h, w = x.shape
    mat = x.reshape(b, k, h * w).transpose(1, 2).double()  # [B, h*w, K]
    _, _, vh = torch.linalg.svd(mat, full_matrices=False)
    proj: Tensor = mat @ vh[:, 0, :, None]  # [B, h*w, 1]
    sign = torch.where(proj.sum(dim=(1, 2), keepdim=True) < 0, -1.0, 1.0).to(proj.dtype)
    return (proj * sign).reshape(b, h, w).to(x.dtype)


def eigencam(x: MethodInput) -> Tensor:
    return first_component(x.activations)


def eigengradcam(x: MethodInput) -> Tensor:
    assert x.gradients is not None
    return first_component(x.gradients * x.activations)


register(
    LayerMethod(
        name="eigencam",
        fn=eigencam,
        needs_grad=False,
        cost="1 forward, no backward (class-agnostic)",
        paper="Muhammad & Yeasin, IJCNN 2020",
        summary="map = projection of A on its first principal component (SVD over channels)",
        prefer="what the layer sees regardless of class (class-agnostic), with no backward; any head",
    )
)
register(
    LayerMethod(
        name="eigengradcam",
        fn=eigengradcam,
        needs_grad=True,
        cost="1 forward + 1 backward to the layer (shared)",
        paper="pytorch-grad-cam's EigenGradCAM",
        summary="map = first principal component of g * A",
        prefer="an Eigen-CAM that follows the explained class, denoised by the projection",
    )
)
