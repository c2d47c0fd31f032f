"""Post-processing, in one place.

raw map at feature resolution (signed) -> ReLU -> bilinear upsample to the input size (``align_corners=False``)
-> min-max per map. A constant map (max - min <= 1e-6 * max|map|, or all zeros) becomes all zeros, never NaN.
We normalise *after* upsampling, so every map at input size spans exactly [0, 1]. For several layers
pytorch-grad-cam min-maxes each layer's map *before* resizing it (then averages and min-maxes again); the per-layer
maps differ from ours by an affine map (same correlation), the fused mean slightly (Pearson > 0.9999 measured).
For one layer it min-maxes again after resizing, which is exactly ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from camkit.errors import CamkitError

__all__ = ["fuse", "normalize", "upsample"]


def normalize(maps: Tensor, rel_eps: float = 1e-6) -> Tensor:
    """Min-max normalise each map of Tensor[..., H, W] to [0, 1]; constant maps become zeros."""
    flat = maps.flatten(-2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    span = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    ok = (span > rel_eps * scale) & (span > 0)
    out = torch.where(ok, (flat - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of Tensor[..., h, w] to ``size`` (H, W), ``align_corners=False``."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return y.reshape(*lead, *size)


def fuse(maps: Sequence[Tensor], mode: str = "max", shallow_tanh: float | None = None) -> Tensor:
    """Fuse normalised maps of several layers (all at the same size, ordered shallow to deep).

    Args:
        maps: Tensors[..., H, W] in [0, 1], one per layer.
        mode: ``"max"`` (element-wise maximum, LayerCAM / torchcam) or ``"mean"`` (pytorch-grad-cam).
        shallow_tanh: if set (LayerCAM uses 2), every layer but the deepest is rescaled as tanh(gamma * M),
            the LayerCAM paper's eq. 9 that lifts the small values of shallow layers (M is already M / max M).
    Returns:
        the fused map, min-max normalised again.
    """
    if len(maps) == 1:
        return maps[0]
    scaled = list(maps)
    if shallow_tanh is not None:
        scaled = [torch.tanh(shallow_tanh * m) for m in scaled[:-1]] + [scaled[-1]]
    stack = torch.stack(scaled)
    if mode == "max":
        fused = stack.amax(dim=0)
    elif mode == "mean":
        fused = stack.mean(dim=0)
    else:
        raise CamkitError(f"unknown fusion {mode!r}: use 'max' or 'mean'")
    return normalize(fused)
