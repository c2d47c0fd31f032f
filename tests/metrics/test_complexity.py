"""Sparseness, entropy and effective complexity (camkit.metrics.map_complexity): known answers."""

from __future__ import annotations

import math

import pytest
import torch

from camkit.errors import CamkitError
from camkit.metrics.map_complexity import effective_complexity, entropy_complexity, sparseness


def test_sparseness_is_the_gini_index() -> None:
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 1, 2] = 3.0
    assert float(sparseness(one_hot)[0]) == pytest.approx(1 - 1 / 16)
    assert float(sparseness(torch.full((1, 4, 4), 0.7))[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(sparseness(torch.zeros(1, 4, 4))[0]) == 0.0
    half = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])  # |M| sorted 0, 0, 1, 1: (-3*0 - 0 + 1 + 3) / (4 * 2)
    assert float(sparseness(half)[0]) == pytest.approx(0.5)
    # scale-free
    m = torch.rand(2, 8, 8)
    torch.testing.assert_close(sparseness(m), sparseness(5 * m))


def test_entropy_of_the_fractional_contributions() -> None:
    assert float(entropy_complexity(torch.ones(1, 4, 4))[0]) == pytest.approx(math.log(16))
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 0, 0] = -2.0
    assert float(entropy_complexity(one_hot)[0]) == 0.0
    two = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
    assert float(entropy_complexity(two)[0]) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    )
    assert math.isnan(float(entropy_complexity(torch.zeros(1, 4, 4))[0]))


def test_effective_complexity_is_the_share_above_eps_of_the_max() -> None:
    m = torch.tensor([[[1.0, 1e-6], [0.5, 0.0]]])
    assert float(effective_complexity(m)[0]) == 0.5
    assert float(effective_complexity(1000 * m)[0]) == 0.5  # relative to each map's maximum
    assert float(effective_complexity(m, eps=0.6)[0]) == 0.25
    assert float(effective_complexity(torch.zeros(1, 2, 2))[0]) == 0.0
    with pytest.raises(CamkitError, match="eps"):
        effective_complexity(m, eps=-1)
    with pytest.raises(CamkitError, match="Tensor\\[B, H, W\\]"):
        sparseness(torch.rand(2, 1, 4, 4))
