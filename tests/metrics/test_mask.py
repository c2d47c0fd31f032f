"""The mask localisation metrics (camkit.metrics.mask): the mask of the boxes and each metric's known answers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from camkit.errors import CamkitError
from camkit.metrics.mask import (
    box_mask,
    energy_pointing_game,
    mask_auc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)


def test_box_mask_marks_the_pixels_whose_centre_is_in_a_box() -> None:
    # an 8 x 8 map of a 16 x 16 image: map pixel j has its centre at 2j + 1 in original pixels
    (m,) = box_mask([[[4, 4, 8, 12]]], (8, 8), image_sizes=[(16, 16)])
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[2:6, 2:4] = True  # rows with centres 5, 7, 9, 11 in [4, 12); columns 5, 7 in [4, 8)
    assert torch.equal(m, want)
    # the union of two boxes; a non-square image (W 32, H 8): x scaled by 4, y by 1
    (u,) = box_mask([[[0, 0, 4, 1], [28, 7, 32, 8]]], (8, 8), image_sizes=[(32, 8)])
    assert u.sum() == 2 and u[0, 0] and u[7, 7]
    # without sizes the boxes are in map pixels; no boxes, or a box between pixel centres: an empty mask
    (plain, none, thin) = box_mask([[[1, 2, 3, 4]], [], [[2.6, 0, 3.4, 8]]], (8, 8))
    assert plain.sum() == 4 and plain[2:4, 1:3].all()
    assert not none.any() and not thin.any()
    with pytest.raises(CamkitError, match="image sizes"):
        box_mask([[], []], (8, 8), image_sizes=[(8, 8)])


def _mask(*cells: tuple[int, int], size: int = 4) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.bool)
    for i, j in cells:
        m[0, i, j] = True
    return m


def test_energy_and_mass_are_the_positive_share_inside() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 3, 3], maps[0, 2, 2] = 2.0, 1.0, 1.0, -5.0
    mask = _mask((0, 0), (0, 1), (2, 2))
    for fn in (energy_pointing_game, relevance_mass_accuracy):
        assert float(fn(maps, mask)[0]) == pytest.approx(3 / 4)  # the -5 inside is no energy
        assert float(fn(torch.zeros(1, 4, 4), mask)[0]) == 0.0
        assert math.isnan(float(fn(maps, _mask())[0]))


def test_rank_accuracy_counts_the_top_k_pixels_inside() -> None:
    maps = torch.arange(16.0).reshape(1, 4, 4)  # the highest pixels: (3, 3), (3, 2), (3, 1), ...
    assert float(relevance_rank_accuracy(maps, _mask((3, 3), (0, 0)))[0]) == 0.5
    assert float(relevance_rank_accuracy(maps, _mask((3, 3), (3, 2), (3, 1)))[0]) == 1.0
    # ties in raster order: of a constant map, the first K pixels
    assert float(relevance_rank_accuracy(torch.ones(1, 4, 4), _mask((0, 0), (3, 3)))[0]) == 0.5
    assert math.isnan(float(relevance_rank_accuracy(maps, _mask())[0]))


def test_top_k_intersection_as_a_count_or_a_fraction() -> None:
    maps = torch.arange(16.0).reshape(1, 4, 4)
    mask = _mask((3, 3), (3, 1))
    assert float(top_k_intersection(maps, mask, k=1)[0]) == 1.0
    assert float(top_k_intersection(maps, mask, k=2)[0]) == 0.5
    assert float(top_k_intersection(maps, mask, k=0.25)[0]) == 0.5  # 4 pixels, 2 of them inside
    assert float(top_k_intersection(maps, mask, k=0.01)[0]) == 1.0  # at least one pixel
    for bad in (0, 17, 0.0, 1.5):
        with pytest.raises(CamkitError, match="k must be"):
            top_k_intersection(maps, mask, k=bad)
    with pytest.raises(TypeError, match="k must be"):
        top_k_intersection(maps, mask, k="5")  # type: ignore[arg-type]


def _auc_by_pairs(values: list[float], inside: list[bool]) -> float:
    pos = [v for v, s in zip(values, inside, strict=True) if s]
    neg = [v for v, s in zip(values, inside, strict=True) if not s]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_mask_auc_is_the_share_of_pairs_ordered_right() -> None:
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(3, 4, 4, generator=g) * 3).round()  # many ties
    mask = torch.rand(3, 4, 4, generator=g) > 0.6
    got = mask_auc(maps, mask)
    for i in range(3):
        want = _auc_by_pairs(maps[i].flatten().tolist(), mask[i].flatten().tolist())
        assert float(got[i]) == pytest.approx(want, abs=1e-6)
    inside = _mask((0, 0), (1, 1))
    perfect = inside.float()
    assert float(mask_auc(perfect, inside)[0]) == 1.0
    assert float(mask_auc(1 - perfect, inside)[0]) == 0.0
    assert float(mask_auc(torch.ones(1, 4, 4), inside)[0]) == 0.5
    assert math.isnan(float(mask_auc(perfect, _mask())[0]))
    assert math.isnan(float(mask_auc(perfect, torch.ones(1, 4, 4, dtype=torch.bool))[0]))


def test_shapes_and_values_are_checked() -> None:
    with pytest.raises(CamkitError, match="must match"):
        energy_pointing_game(torch.rand(2, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(CamkitError, match="NaN or Inf"):
        mask_auc(torch.full((1, 4, 4), float("nan")), _mask((0, 0)))
