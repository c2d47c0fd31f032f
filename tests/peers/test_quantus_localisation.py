"""The mask localisation metrics against Quantus 0.6.0 (``AttributionLocalisation``, ``RelevanceMassAccuracy``,
``RelevanceRankAccuracy``, ``AUC``, ``TopKIntersection``) on the same tiny random-weight CNN, inputs, Grad-CAM maps
and ground-truth masks (camkit's :func:`box_mask` of one or two boxes per image, given to both).

Quantus is called without its max-normalisation and absolute value (``normalise=False, abs=False``): the
Grad-CAM maps are non-negative, and every score here is invariant to a positive scale. The maps have no ties
(a small random term breaks the ReLU's zeros): Quantus ranks ties in ``np.argsort``'s arbitrary order, camkit in
raster order. Measured: max |difference| below 1e-7 for every metric (float32 maps, float64 sums).
"""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from torch import Tensor, nn

import camkit
from camkit.metrics.mask import (
    box_mask,
    energy_pointing_game,
    mask_auc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)

pytestmark = [pytest.mark.slow, pytest.mark.reference]

ATOL = 1e-5
#: per image, boxes in pixels of a 48 x 40 original image (the maps are 32 x 32)
BOXES = [[[4, 4, 24, 20]], [[20, 10, 44, 36]], [[0, 16, 30, 40], [36, 0, 48, 12]], [[10, 5, 30, 25]]]
SIZES = [(48, 40)] * 4


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
def case() -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 3, 32, 32)
    classes = torch.tensor([0, 1, 2, 3])
    maps = camkit.explain(model, x, "gradcam", layers="features.3", targets=classes.tolist()).maps
    maps = maps + 1e-3 * torch.rand(4, 32, 32)
    mask = box_mask(BOXES, (32, 32), image_sizes=SIZES)
    return model, x, classes, maps.float(), mask


def _quantus(metric: quantus.Metric, case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]) -> np.ndarray:
    model, x, classes, maps, mask = case
    scores = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=classes.numpy(),
        a_batch=maps[:, None].numpy(),
        s_batch=mask[:, None].numpy().astype(np.float32),
        device="cpu",
    )
    return np.asarray(scores, dtype=np.float64)


def _close(got: Tensor, want: np.ndarray) -> None:
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got.double().numpy(), want, atol=ATOL, rtol=0)


def test_mask_is_a_real_partition(case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]) -> None:
    mask = case[4]
    frac = mask.flatten(1).float().mean(dim=1)
    assert bool(((frac > 0.05) & (frac < 0.6)).all()), frac  # neither empty nor the whole map


def test_energy_pointing_game_is_quantus_attribution_localisation(
    case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor],
) -> None:
    ref = quantus.AttributionLocalisation(
        abs=False, normalise=False, positive_attributions=True, disable_warnings=True
    )
    _close(energy_pointing_game(case[3], case[4]), _quantus(ref, case))


def test_relevance_mass_accuracy_is_quantus(case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]) -> None:
    ref = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)
    _close(relevance_mass_accuracy(case[3], case[4]), _quantus(ref, case))


def test_relevance_rank_accuracy_is_quantus(case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]) -> None:
    ref = quantus.RelevanceRankAccuracy(abs=False, normalise=False, disable_warnings=True)
    _close(relevance_rank_accuracy(case[3], case[4]), _quantus(ref, case))


def test_mask_auc_is_quantus_auc(case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]) -> None:
    ref = quantus.AUC(abs=False, normalise=False, disable_warnings=True)
    _close(mask_auc(case[3], case[4]), _quantus(ref, case))
    # ties (a ReLU'd map's zeros, a quantised map) count one half on both sides
    coarse = (case[3] * 4).round() / 4
    _close(mask_auc(coarse, case[4]), _quantus(ref, (*case[:3], coarse, case[4])))


@pytest.mark.parametrize("k", [1, 20, 0.02, 0.3])
def test_top_k_intersection_is_quantus(
    case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor], k: float
) -> None:
    count = k if isinstance(k, int) else max(1, round(k * 32 * 32))
    ref = quantus.TopKIntersection(k=count, abs=False, normalise=False, disable_warnings=True)
    _close(top_k_intersection(case[3], case[4], k=k), _quantus(ref, case))


def test_top_k_concept_influence_is_quantus(case: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]) -> None:
    ref = quantus.TopKIntersection(
        k=20, concept_influence=True, abs=False, normalise=False, disable_warnings=True
    )
    ours = top_k_intersection(case[3], case[4], k=20, concept_influence=True)
    _close(ours, _quantus(ref, case))
    assert float(ours.max()) > 1  # scaled by the pixels over the mask's
