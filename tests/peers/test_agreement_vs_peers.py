"""Why camkit's Grad-CAM++ and XGrad-CAM differ from pytorch-grad-cam 1.5.7 on transformer layers: its epsilons
(README, "Methods from the peers (2)"; tools/peer_agreement.py measures DeiT, Swin and MobileNetV2)."""

from __future__ import annotations

import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import camkit
from testbed import GapHead


def _pearson(a, b) -> float:
    return float(
        np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1]
    )


class Small(nn.Module):
    """A CNN whose head makes the gradients at `features` tiny (about 1e-4), as on transformer layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.Tanh())
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(self.head(self.features(x)), 4).flatten(1) ** 2)


def test_gradcam_plus_plus_differs_from_the_peer_only_by_its_epsilon():
    torch.manual_seed(0)
    model = Small().eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e-3)
    x = torch.randn(1, 3, 16, 16)
    e = camkit.explain(model, x, "gradcam++", "features.1", targets=1)
    with pgc.GradCAMPlusPlus(model, [model.features[1]]) as cam:
        ref = cam(x, [ClassifierOutputTarget(1)])[0]
    from camkit.core.capture import capture

    cap = capture(model, x, {"features.1": model.features[1]}, lambda o: o[:, 1])
    a = cap.activations["features.1"].double()
    g = cap.gradients["features.1"]
    assert isinstance(g, torch.Tensor)
    g = g.double()
    assert float((2 * g**2 < 1e-6).double().mean()) > 0.9  # the epsilon dominates the denominator
    s = a.sum(dim=(2, 3), keepdim=True)
    alpha = torch.where(g != 0, g**2 / (2 * g**2 + s * g**3 + 1e-6), torch.zeros_like(g))
    peer_formula = torch.einsum("bk,bkhw->bhw", (torch.relu(g) * alpha).sum(dim=(2, 3)), a)
    peer_map = camkit.core.postprocess.normalize(torch.relu(peer_formula).float())
    assert _pearson(peer_map[0], ref) > 0.9999  # the peer is camkit's formula plus 1e-6
    assert _pearson(e.maps[0], ref) < 0.999  # and that epsilon changes the map


def test_xgradcam_epsilon_by_hand():
    """A channel whose activation sums to 1e-7: camkit (the paper) weighs it by sum A g / sum A = g at its one
    non-zero cell; pytorch-grad-cam divides by sum A + 1e-7, so gets half of that."""
    a = torch.zeros(1, 2, 2, 2)
    a[0, 0, 0, 0] = 1e-7
    a[0, 1] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    weight = torch.tensor([[4.0, 1.0]])  # dS/dA_k = W[0, k] / 4 everywhere
    model = GapHead(weight).eval()
    e = camkit.explain(model, a, "xgradcam", "feat", targets=0, relu=False)
    w_camkit = torch.tensor([1.0, 0.25])  # sum_ij A g / sum A = g
    torch.testing.assert_close(e.raw["feat"][0], torch.einsum("k,khw->hw", w_camkit, a[0]))
    with pgc.XGradCAM(model, [model.feat]) as cam:  # its weight formula, on the exact gradients
        weights = cam.get_cam_weights(
            a, None, None, a.numpy(), np.broadcast_to((weight[0] / 4)[None, :, None, None].numpy(), a.shape)
        )
    np.testing.assert_allclose(weights[0], [0.5, 0.25], rtol=1e-6)  # channel 0 halved by the epsilon
