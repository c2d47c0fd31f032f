"""ARCC (ROAD combined with Complexity and Coherency) against pytorch-grad-cam 1.5.7's ``metrics.arcc.ARCC``, on the
same tiny random-weight CNN, inputs, maps, classes (softmax probability targets) and base method.

The imputation noise is 0 on both sides (pytorch-grad-cam draws it from torch's global generator, camkit from a
seeded one); the maps have no ties (pytorch-grad-cam removes every pixel at or above a percentile, camkit exactly
the fraction in rank order: with ties, e.g. the zeros of a ReLU'd map, the removed sets differ) and the images are
32 x 32, where pytorch-grad-cam's percentile thresholds remove as many pixels as camkit's round(fraction * pixels)
(they keep ceil((n - 1) p) pixels: on 24 x 24 images one pixel more is removed at two of the four steps, and the
scores move by up to 0.03). Then ARCC and its parts agree to ``ATOL`` (camkit solves the imputation by conjugate
gradient to 1e-4, pytorch-grad-cam by a direct sparse solve). Measured: ARCC 0.4046, 0, 0.0093 on the three
images, max |difference| 2.9e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import pytorch_grad_cam.metrics.arcc as pgc_arcc
import pytorch_grad_cam.metrics.road as pgc_road
import pytorch_grad_cam.utils.model_targets as pgc_targets
import torch
from torch import Tensor, nn

import camkit
from camkit.metrics import arcc, coherency, complexity

pytestmark = [pytest.mark.slow, pytest.mark.reference]


ATOL = 2e-4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Tensor, list[int], Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.fc.weight.mul_(
            30.0
        )  # confident predictions: ROAD's LeRF - MoRF is far from 0 for image 0 (0.40)
    x = torch.randn(3, 3, 32, 32)
    classes = [0, 2, 3]
    # the Grad-CAM maps, their ties (the zeros of the ReLU) broken by a small random term, min-maxed
    maps = camkit.explain(model, x, "gradcam", layers="features.3", targets=classes).maps
    flat = (maps + 1e-3 * torch.rand(3, 32, 32)).flatten(1)
    maps = (flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True))
    return model, x, classes, maps.reshape(3, 32, 32).float()


@pytest.fixture
def noiseless(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pgc_road.NoisyLinearImputer.__init__

    def init(self, noise=0.0, weighting=pgc_road.neighbors_weights):  # type: ignore[no-untyped-def]
        original(self, 0.0, weighting)

    monkeypatch.setattr(pgc_road.NoisyLinearImputer, "__init__", init)


def test_arcc_equals_pytorch_grad_cam(setup, noiseless) -> None:
    model, x, classes, maps = setup
    base = pgc.GradCAM(model, [model.features[3]])
    targets = [pgc_targets.ClassifierOutputSoftmaxTarget(c) for c in classes]
    peer = pgc_arcc.ARCC(base_method=base, road_percentiles=[20, 40, 60, 80])
    ref = np.asarray(peer(x, maps.numpy(), targets, model))
    assert ref[0] > 0.3  # a map the metric rewards, not only zeros

    def remap(xm: Tensor) -> Tensor:
        return torch.from_numpy(base(input_tensor=xm, targets=targets))

    mine = arcc(model, x, maps, remap, torch.tensor(classes), noise=0.0)
    np.testing.assert_allclose(mine.arcc.numpy(), ref, atol=ATOL)
    np.testing.assert_allclose(mine.complexity.numpy(), pgc_arcc.Complexity()(maps.numpy()), atol=1e-6)
    coh = pgc_arcc.Coherency()(x, maps.numpy(), targets, model, base)
    np.testing.assert_allclose(mine.coherency.numpy(), coh, atol=1e-5)
    road = (pgc_road.ROADCombined([20, 40, 60, 80])(x, maps.numpy(), targets, model) * 2).clip(0, 1)
    np.testing.assert_allclose(mine.road.numpy(), road, atol=ATOL)
    # camkit's Grad-CAM as the method (of the logit, as the maps camkit scores are made): pytorch-grad-cam's
    # coherency with logit targets (its ARCC passes one target list to ROAD and coherency alike)
    logits = [pgc_targets.ClassifierOutputTarget(c) for c in classes]
    coh_logit = pgc_arcc.Coherency()(x, maps.numpy(), logits, model, base)
    own = arcc(
        model,
        x,
        maps,
        lambda xm: camkit.explain(model, xm, "gradcam", layers="features.3", targets=classes).maps,
        torch.tensor(classes),
        noise=0.0,
    )
    np.testing.assert_allclose(own.coherency.numpy(), coh_logit, atol=1e-5)


def test_complexity_and_coherency_by_hand() -> None:
    m = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    torch.testing.assert_close(complexity(m), torch.tensor([0.5]))
    torch.testing.assert_close(coherency(m, m), torch.tensor([1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(coherency(m, 1 - m), torch.tensor([0.0]), atol=1e-6, rtol=0)
