"""Localisation against a ground-truth mask: energy-based pointing game, relevance mass accuracy, relevance rank
accuracy, ROC AUC and top-k intersection, as Quantus 0.6.0's localisation metrics.

The mask of an image is the union of its ground-truth boxes at the map's (the model input's) size:
:func:`box_mask` marks a map pixel when its centre, scaled to the original image (``image_sizes``), falls inside a
box, the point convention of :func:`camkit.metrics.pointing_game`. Every metric here is computed batched in torch
on the maps' device and gives NaN for an image whose mask is empty (no boxes, or boxes smaller than one map
pixel) or, for the AUC, full.

>>> from camkit.metrics.mask import box_mask, relevance_mass_accuracy
>>> mask = box_mask([[[10, 10, 50, 40]]], (16, 16), image_sizes=[(64, 64)])
>>> relevance_mass_accuracy(expl.maps, mask)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from camkit.errors import CamkitError
from camkit.metrics.localization import BoxesLike, as_boxes

__all__ = [
    "box_mask",
    "energy_pointing_game",
    "mask_auc",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
]


def box_mask(
    gt_boxes: Sequence[BoxesLike],
    size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """BoolTensor[B, H, W]: per image, the union of its boxes at the map size ``size`` = (H, W).

    A map pixel (i, j) is in the mask when its centre ((j + 0.5) * W_image / W, (i + 0.5) * H_image / H) lies in a
    half-open box [x0, x1) x [y0, y1) of original-image pixels (``image_sizes``: (W, H) of each original image;
    None: the boxes are in map pixels).
    """
    h, w = size
    if image_sizes is not None and len(image_sizes) != len(gt_boxes):
        raise CamkitError(f"{len(image_sizes)} image sizes for {len(gt_boxes)} box lists (one per image)")
    out = torch.zeros(len(gt_boxes), h, w, dtype=torch.bool, device=device)
    for i, boxes in enumerate(gt_boxes):
        gt = as_boxes(boxes)
        if gt.shape[0] == 0:
            continue
        sx = image_sizes[i][0] / w if image_sizes is not None else 1.0
        sy = image_sizes[i][1] / h if image_sizes is not None else 1.0
        px = (torch.arange(w, dtype=torch.float64) + 0.5) * sx
        py = (torch.arange(h, dtype=torch.float64) + 0.5) * sy
        in_x = (px[None] >= gt[:, 0:1]) & (px[None] < gt[:, 2:3])  # [N, W]
        in_y = (py[None] >= gt[:, 1:2]) & (py[None] < gt[:, 3:4])  # [N, H]
        out[i] = (in_y[:, :, None] & in_x[:, None, :]).any(dim=0).to(out.device)
    return out


def _pair(maps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Maps Tensor[B, N] (float64) and mask BoolTensor[B, N] on the maps' device, shapes checked."""
    if maps.dim() == 2:
        maps = maps[None]
    if mask.dim() == 2:
        mask = mask[None]
    if maps.dim() != 3 or tuple(mask.shape) != tuple(maps.shape):
        raise CamkitError(
            f"maps Tensor[B, H, W] and mask [B, H, W] must match, got {tuple(maps.shape)} and {tuple(mask.shape)}; "
            "build the mask at the maps' size with box_mask(boxes, maps.shape[-2:], image_sizes)"
        )
    m = maps.detach().double()
    if not bool(torch.isfinite(m).all()):
        raise CamkitError("maps contain NaN or Inf: a localisation score of such a map would be meaningless")
    return m.flatten(1), mask.to(m.device).bool().flatten(1)


def _nan_where_empty(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.any(dim=1), values, torch.full_like(values, float("nan"))).float()


def energy_pointing_game(maps: Tensor, mask: Tensor) -> Tensor:
    """Energy-based pointing game (Wang et al., "Score-CAM", CVPR Workshops 2020, section 5.2): the share of the
    map's energy inside the object, sum(M+ in mask) / sum(M+), M+ = max(M, 0) (Score-CAM's maps are non-negative;
    a signed map's negative part is no energy). Tensor[B] in [0, 1]; 0 for a map without positive values, NaN for
    an empty mask. Quantus 0.6.0: ``AttributionLocalisation(abs=False, positive_attributions=True)`` (Kohlbrenner
    et al. 2020's inside-total relevance ratio)."""
    m, s = _pair(maps, mask)
    e = m.clamp_min(0)
    total = e.sum(dim=1)
    inside = (e * s).sum(dim=1)
    return _nan_where_empty(
        torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)), s
    )


def relevance_mass_accuracy(maps: Tensor, mask: Tensor) -> Tensor:
    """Relevance mass accuracy (Arras et al., "CLEVR-XAI", Information Fusion 2022): R_within / R_total, the
    map's positive relevance inside the mask over the positive relevance of the whole map. Tensor[B] in [0, 1];
    0 for a map without positive values, NaN for an empty mask.

    On non-negative maps (camkit's) it equals :func:`energy_pointing_game`; the paper counts positive relevance
    only, Quantus 0.6.0 (``RelevanceMassAccuracy(abs=False)``) the signed values: they agree on non-negative maps.
    """
    return energy_pointing_game(maps, mask)


def relevance_rank_accuracy(maps: Tensor, mask: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras et al. 2022): with K the mask's pixel count, the fraction of the K
    highest-valued map pixels that lie in the mask. Tensor[B] in [0, 1], NaN for an empty mask. Ties are ranked
    in raster order (a stable sort); Quantus 0.6.0's ``np.argsort`` orders ties arbitrarily."""
    m, s = _pair(maps, mask)
    order = torch.argsort(m, dim=1, descending=True, stable=True)
    hits = s.gather(1, order)  # [B, N]: is the r-th highest pixel in the mask
    k = s.sum(dim=1)
    first_k = torch.arange(m.shape[1], device=m.device)[None] < k[:, None]
    value = (hits & first_k).sum(dim=1).double() / k.clamp_min(1)
    return _nan_where_empty(value, s)


def top_k_intersection(
    maps: Tensor, mask: Tensor, k: float = 0.02, concept_influence: bool = False
) -> Tensor:
    """Top-k intersection (Theiner et al., "Interpretable Semantic Photo Geolocalization", WACV 2022): the
    fraction of the k highest-valued map pixels that lie in the mask. Tensor[B] in [0, 1], NaN for an empty mask.

    Args:
        k: a fraction of the map's pixels in (0, 1] (default 0.02: Quantus's k = 1000 pixels at 224 x 224), rounded
            to a whole count of at least 1; or an int >= 1, a count of pixels. Ties in raster order.
        concept_influence: divide by the mask's share of the map's pixels (the paper's concept influence, Quantus'
            ``concept_influence``): 1 means as many hits as a map placed at random would make; no longer in [0, 1].
    """
    m, s = _pair(maps, mask)
    n = m.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a fraction of the pixels (float) or a pixel count (int), got {k!r}")
    ok = 1 <= k <= n if isinstance(k, int) else 0 < k <= 1
    if not ok:
        raise CamkitError(
            f"k must be a fraction in (0, 1] or a count in [1, {n}] of the map's pixels, got {k}"
        )
    count = k if isinstance(k, int) else max(1, round(k * n))
    top = torch.argsort(m, dim=1, descending=True, stable=True)[:, :count]
    value = s.gather(1, top).double().mean(dim=1)
    if concept_influence:
        value = value * n / s.sum(dim=1).clamp_min(1)
    return _nan_where_empty(value, s)


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of each row of Tensor[B, N], ties sharing their average rank (batched)."""
    b, n = x.shape
    vals, order = torch.sort(x, dim=1)
    new = torch.ones_like(vals, dtype=torch.bool)
    new[:, 1:] = vals[:, 1:] != vals[:, :-1]
    group = new.long().cumsum(dim=1) - 1 + torch.arange(b, device=x.device)[:, None] * n  # unique ids per row
    pos = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(b, n)
    mean = torch.zeros(b * n, dtype=torch.float64, device=x.device)
    mean.scatter_reduce_(0, group.flatten(), pos.flatten(), reduce="mean", include_self=False)
    ranks = torch.empty_like(pos)
    ranks.scatter_(1, order, mean[group])
    return ranks


def mask_auc(maps: Tensor, mask: Tensor) -> Tensor:
    """Area under the ROC curve of the map as a pixel-wise detector of the mask (Fawcett, "An introduction to ROC
    analysis", 2006): the probability that a random mask pixel outranks a random pixel outside it, ties counting
    one half (the Mann-Whitney statistic; ``sklearn.metrics.roc_auc_score``). Tensor[B] in [0, 1], 0.5 for a
    constant map; NaN when the mask is empty or covers the whole map. Quantus 0.6.0: ``AUC``."""
    m, s = _pair(maps, mask)
    pos = s.sum(dim=1).double()
    neg = s.shape[1] - pos
    ranks = _average_ranks(m)
    u = (ranks * s).sum(dim=1) - pos * (pos + 1) / 2
    value = u / (pos * neg).clamp_min(1)
    return torch.where((pos > 0) & (neg > 0), value, torch.full_like(value, float("nan"))).float()
