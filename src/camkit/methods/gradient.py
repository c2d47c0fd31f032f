"""Gradient CAMs. A_k: channel k of the target layer, g_k = dS/dA_k (S: the explained score), Z = h*w.

* Grad-CAM (Selvaraju et al. 2017): w_k = (1/Z) sum_ij g_k[ij]; map = sum_k w_k A_k.
* Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential score): alpha = g^2 / (2 g^2 + sum_ab A_k[ab] g^3),
  0 where the denominator is 0; w_k = sum_ij alpha_ij ReLU(g_ij).
* XGrad-CAM (Fu et al. 2020): w_k = sum_ij (A_k[ij] / sum_ab A_k[ab]) g_k[ij] (0 where sum_ab A_k[ab] = 0).
* HiResCAM (Draelos & Carin 2020): map = sum_k g_k * A_k, element-wise.
* Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise): map = sum_k ReLU(g_k * A_k).
* LayerCAM (Jiang et al. 2021): map = sum_k ReLU(g_k) * A_k.
All maps then get a ReLU (camkit.core.postprocess).
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.methods.registry import LayerMethod, MethodInput, register


def _grad(x: MethodInput) -> Tensor:
    assert x.gradients is not None, "gradient method called without gradients"
    return x.gradients


def _weighted(weights: Tensor, a: Tensor) -> Tensor:
    """sum_k w_k A_k for weights Tensor[B, K] and activations Tensor[B, K, h, w] -> Tensor[B, h, w]."""
    return torch.einsum("bk,bkhw->bhw", weights, a)


def gradcam(x: MethodInput) -> Tensor:
    return _weighted(_grad(x).mean(dim=(2, 3)), x.activations)


def gradcampp(x: MethodInput) -> Tensor:
    a, g = x.activations, _grad(x)
    g2 = g * g
    g3 = g2 * g
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3))
    return _weighted(weights, a)


def xgradcam(x: MethodInput) -> Tensor:
    a, g = x.activations, _grad(x)
    total = a.sum(dim=(2, 3))
    num = (a * g).sum(dim=(2, 3))
    weights = torch.where(total != 0, num / torch.where(total != 0, total, torch.ones_like(total)), 0.0)
    return _weighted(weights, a)


def hirescam(x: MethodInput) -> Tensor:
    return (_grad(x) * x.activations).sum(dim=1)


def gradcam_elementwise(x: MethodInput) -> Tensor:
    return torch.relu(_grad(x) * x.activations).sum(dim=1)


def layercam(x: MethodInput) -> Tensor:
    return (torch.relu(_grad(x)) * x.activations).sum(dim=1)


_ONE = "1 forward + 1 backward to the layer (shared)"

register(
    LayerMethod(
        name="gradcam",
        fn=gradcam,
        needs_grad=True,
        cost=_ONE,
        paper="Selvaraju et al., ICCV 2017",
        summary="channel weight = spatial mean of dS/dA",
        prefer="the default: one backward, robust on any architecture, the most compared-against",
        aliases=("grad-cam",),
    )
)
register(
    LayerMethod(
        name="gradcam++",
        fn=gradcampp,
        needs_grad=True,
        cost=_ONE,
        paper="Chattopadhyay et al., WACV 2018",
        summary="weight = sum alpha*ReLU(g), alpha = g^2/(2g^2 + sum(A) g^3)",
        prefer="several instances of the class in one image (weights favour every positive gradient region)",
        aliases=("gradcampp", "gradcamplusplus"),
    )
)
register(
    LayerMethod(
        name="xgradcam",
        fn=xgradcam,
        needs_grad=True,
        cost=_ONE,
        paper="Fu et al., BMVC 2020",
        summary="weight = sum (A/sum A) * g",
        prefer="Grad-CAM with weights that satisfy the sensitivity and conservation axioms; as cheap",
        aliases=("xgrad-cam",),
    )
)
register(
    LayerMethod(
        name="hirescam",
        fn=hirescam,
        needs_grad=True,
        cost=_ONE,
        paper="Draelos & Carin, 2020",
        summary="map = sum_k g_k * A_k (element-wise, no averaging)",
        prefer="maps that provably reflect where the model looks (no gradient averaging), at the same cost",
        aliases=("hires-cam",),
    )
)
register(
    LayerMethod(
        name="gradcam-elementwise",
        fn=gradcam_elementwise,
        needs_grad=True,
        cost=_ONE,
        paper="pytorch-grad-cam's GradCAMElementWise",
        summary="map = sum_k ReLU(g_k * A_k)",
        prefer="like HiResCAM but without negative evidence cancelling positive evidence",
        aliases=("gradcamelementwise",),
    )
)
register(
    LayerMethod(
        name="layercam",
        fn=layercam,
        needs_grad=True,
        cost=_ONE,
        paper="Jiang et al., IEEE TIP 2021",
        summary="map = sum_k ReLU(g_k) * A_k; several layers fused (tanh-scaled shallow maps, element-wise max)",
        prefer="fine detail from shallow layers, or fusing several layers (layers='layer2,layer3,layer4')",
        aliases=("layer-cam",),
        fusion_tanh=2.0,
    )
)
