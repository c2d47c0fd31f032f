"""Test-time augmentation of any map (``explain(..., augment=...)``).

Each :class:`Augment` changes the model input, the map of the changed input is computed as usual (normalised at
the changed input's size), warped back onto the original input (flipped back, resized back) and the maps of all
augmentations are averaged, then min-max normalised again. The explained classes are those of the original input
(the first pass), so every augmentation explains the same class.

``augment=True`` (or ``"gradcam"``) is pytorch-grad-cam's ``aug_smooth`` set: no flip and a horizontal flip, each
with the input multiplied by 0.9, 1 and 1.1 (ttach's ``HorizontalFlip`` and ``Multiply``): 6 passes.
``"flip"``: the input and its mirror image (2 passes). Or any sequence of :class:`Augment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from camkit.core.postprocess import normalize
from camkit.errors import CamkitError

__all__ = ["Augment", "AugmentSpec", "resolve_augment"]


@dataclass(frozen=True)
class Augment:
    """One test-time augmentation.

    Attributes:
        hflip: mirror the input left-right (the map is mirrored back).
        multiply: multiply the (normalised) input by this factor, as ttach's ``Multiply`` (the map is not warped).
        scale: resize the input by this factor, bilinear (the map is resized back to the original size).
    """

    hflip: bool = False
    multiply: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("multiply", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise CamkitError(f"Augment.{name} must be a number > 0, got {value!r}")

    @property
    def identity(self) -> bool:
        return not self.hflip and self.multiply == 1.0 and self.scale == 1.0

    def apply(self, x: Tensor) -> Tensor:
        """The augmented input of Tensor[B, C, H, W]."""
        if self.scale != 1.0:
            size = (max(1, round(x.shape[-2] * self.scale)), max(1, round(x.shape[-1] * self.scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if self.hflip:
            x = x.flip(-1)
        return x * self.multiply if self.multiply != 1.0 else x

    def invert(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        """A map Tensor[..., h, w] of the augmented input, back on the original input of ``size`` (H, W)."""
        if self.hflip:
            maps = maps.flip(-1)
        if tuple(maps.shape[-2:]) != size:
            lead = maps.shape[:-2]
            flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
            maps = F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)
        return maps


AugmentSpec = bool | str | Sequence[Augment] | None

_GRADCAM = tuple(Augment(hflip=f, multiply=m) for f in (False, True) for m in (0.9, 1.0, 1.1))


def resolve_augment(spec: AugmentSpec) -> list[Augment]:
    """``augment=`` -> the augmentations, the identity first (its pass gives the classes, scores and raw maps).

    None / False: none (an empty list). True or ``"gradcam"``: pytorch-grad-cam's set (6). ``"flip"``: identity
    and horizontal flip. A sequence of :class:`Augment`: those (the identity is added first when missing, and
    counts in the average only when it was given).
    """
    if spec is None or spec is False:
        return []
    if spec is True:
        spec = "gradcam"
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in ("none", "off", ""):
            return []
        if key == "gradcam":
            return list(_GRADCAM)
        if key == "flip":
            return [Augment(), Augment(hflip=True)]
        raise CamkitError(
            f"unknown augment {spec!r}: use True / 'gradcam' (flip x multiply 0.9, 1, 1.1), 'flip', or a list of "
            "camkit.Augment"
        )
    items = list(spec)
    if not items or not all(isinstance(a, Augment) for a in items):
        raise TypeError("augment must be True, 'gradcam', 'flip' or a non-empty list of camkit.Augment")
    return items


def average(maps: list[Tensor]) -> Tensor:
    """The mean of maps already warped back, min-max normalised again (constant maps -> zeros)."""
    return normalize(torch.stack(maps).mean(dim=0))
