"""Sparseness, complexity (entropy) and effective complexity against Quantus 0.6.0 (``Sparseness``,
``Complexity``, ``EffectiveComplexity``) on the same tiny random-weight CNN, inputs and Grad-CAM maps, and on
signed maps (Quantus's default ``abs=True``, camkit's |M|).

Quantus is called without its max-normalisation (``normalise=False``; it divides the whole batch by its largest
value, camkit each map by its own: the same for Grad-CAM maps, whose maximum is 1). Differences: Quantus adds 1e-7
to every value before the Gini index and 1e-12 inside the entropy's logarithm; effective complexity is Quantus's
count over the pixel count. Measured on 32 x 32 maps: max |difference| 2.8e-6 (sparseness of the Grad-CAM maps,
whose zeros make the 1e-7 count), 3e-7 (signed maps), 5e-7 (entropy, float32 results), 0 (effective complexity).
"""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from torch import Tensor, nn

import camkit
from camkit.metrics.map_complexity import effective_complexity, entropy_complexity, sparseness

pytestmark = [pytest.mark.slow, pytest.mark.reference]

ATOL = 1e-5


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
def case() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 3, 32, 32)
    classes = torch.tensor([0, 1, 2, 3])
    maps = camkit.explain(model, x, "gradcam", layers="features.3", targets=classes.tolist()).maps
    return model, x, classes, maps.float()


def _quantus(
    metric: quantus.Metric, model: nn.Module, x: Tensor, classes: Tensor, maps: Tensor
) -> np.ndarray:
    scores = metric(
        model=model, x_batch=x.numpy(), y_batch=classes.numpy(), a_batch=maps[:, None].numpy(), device="cpu"
    )
    return np.asarray(scores, dtype=np.float64)


def _signed(maps: Tensor) -> Tensor:
    return maps - 0.3 * torch.rand(maps.shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("signed", [False, True], ids=["gradcam", "signed"])
def test_sparseness_is_quantus_gini(case: tuple[nn.Module, Tensor, Tensor, Tensor], signed: bool) -> None:
    model, x, classes, maps = case
    maps = _signed(maps) if signed else maps
    want = _quantus(quantus.Sparseness(normalise=False, disable_warnings=True), model, x, classes, maps)
    np.testing.assert_allclose(sparseness(maps).double().numpy(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("signed", [False, True], ids=["gradcam", "signed"])
def test_entropy_is_quantus_complexity(case: tuple[nn.Module, Tensor, Tensor, Tensor], signed: bool) -> None:
    model, x, classes, maps = case
    maps = _signed(maps) if signed else maps
    want = _quantus(quantus.Complexity(normalise=False, disable_warnings=True), model, x, classes, maps)
    np.testing.assert_allclose(entropy_complexity(maps).double().numpy(), want, atol=ATOL, rtol=0)


def test_effective_complexity_is_quantus_count_over_pixels(
    case: tuple[nn.Module, Tensor, Tensor, Tensor],
) -> None:
    model, x, classes, maps = case
    maps = maps * (maps > 0.2)  # a map with exact zeros: the count is not every pixel
    for eps in (1e-5, 0.5):
        ref = quantus.EffectiveComplexity(eps=eps, normalise=False, disable_warnings=True)
        want = _quantus(ref, model, x, classes, maps) / (32 * 32)
        got = effective_complexity(maps, eps=eps).double().numpy()
        assert (want < 1).all() and (want > 0).all()
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
