"""Complexity of maps: sparseness (Gini index), complexity (entropy) and effective complexity, as Quantus 0.6.0's
complexity metrics. Each takes maps Tensor[B, H, W] (camkit's, or any signed attribution: the absolute value is
used, as the papers and Quantus's defaults do) and gives Tensor[B], computed batched in torch on the maps' device.

These are not :func:`camkit.metrics.complexity`, ARCC's mean |M| (Nguyen & Martinez's L1 complexity).

>>> from camkit.metrics.map_complexity import sparseness, entropy_complexity, effective_complexity
>>> sparseness(expl.maps)          # 1: all mass on one pixel, 0: a uniform map (higher is sparser)
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.errors import CamkitError

__all__ = ["effective_complexity", "entropy_complexity", "sparseness"]


def _flat_abs(maps: Tensor) -> Tensor:
    if maps.dim() == 2:
        maps = maps[None]
    if maps.dim() != 3:
        raise CamkitError(f"maps must be Tensor[B, H, W], got shape {tuple(maps.shape)}")
    a = maps.detach().double().flatten(1).abs()
    if not bool(torch.isfinite(a).all()):
        raise CamkitError("maps contain NaN or Inf: a complexity of such a map would be meaningless")
    return a


def sparseness(maps: Tensor) -> Tensor:
    """Sparseness (Chalasani et al., "Concise Explanations of Neural Networks using Adversarial Training", ICML
    2020): the Gini index of |M| over the pixels, sum_k (2k - n - 1) a_(k) / (n sum_k a_(k)) with a_(1) <= ... <=
    a_(n) sorted. Tensor[B] in [0, 1 - 1/n]: higher is sparser (more concentrated); 0 for a uniform (or all-zero)
    map. Quantus 0.6.0 adds 1e-7 to every value first, which scales the index by sum / (sum + n * 1e-7)."""
    a = torch.sort(_flat_abs(maps), dim=1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(dim=1)
    gini = ((2 * k - n - 1) * a).sum(dim=1) / (n * total.clamp_min(1e-300))
    return torch.where(total > 0, gini, torch.zeros_like(gini)).float()


def entropy_complexity(maps: Tensor) -> Tensor:
    """Complexity (Bhatt et al., "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020): the
    entropy -sum_i P_i ln P_i of the fractional contributions P_i = |M_i| / sum_j |M_j| (natural log, 0 ln 0 = 0).
    Tensor[B] in [0, ln n]: lower is simpler; NaN for an all-zero map (no distribution). Quantus 0.6.0 adds 1e-12
    inside the logarithm (a difference below 1e-9 here)."""
    a = _flat_abs(maps)
    total = a.sum(dim=1, keepdim=True)
    p = a / total.clamp_min(1e-300)
    h = -torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(dim=1)
    return torch.where(total[:, 0] > 0, h, torch.full_like(h, float("nan"))).float()


def effective_complexity(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """Effective complexity (Nguyen & Martinez, "On Quantitative Aspects of Model Interpretability", arXiv
    2007.07584, 2020): the number of pixels whose |M| / max |M| exceeds ``eps``, as a fraction of the map's pixels
    (so that maps of different sizes compare). Tensor[B] in [0, 1]: lower is simpler; 0 for an all-zero map.

    Quantus 0.6.0 (``EffectiveComplexity``) gives the count, after dividing the whole batch by its largest |M|
    (``normalise_by_max`` over all axes); camkit normalises each map by its own maximum.
    """
    if not eps >= 0:
        raise CamkitError(f"eps must be >= 0, got {eps}")
    a = _flat_abs(maps)
    peak = a.amax(dim=1, keepdim=True)
    above = (a / peak.clamp_min(1e-300)) > eps
    return torch.where(peak[:, 0] > 0, above.double().mean(dim=1), torch.zeros_like(peak[:, 0])).float()
