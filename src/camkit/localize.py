"""Weakly-supervised localization: map -> threshold -> connected components -> boxes.

The CAM paper (Zhou et al. 2016, section 3) keeps "the regions of which the value is above 20% of the max value of
the CAM" and "takes the bounding box that covers the largest connected component". :func:`localize` does that,
with the threshold as a fraction of each map's max (default 0.2), a fixed value, or Otsu's; and either the largest
component or every component above a minimum area.

Coordinates. A :class:`Box` is ``(x0, y0, x1, y1)`` in pixels with ``x0, y0`` inclusive and ``x1, y1``
exclusive (continuous coordinates where pixel ``i`` spans ``[i, i + 1)``): width ``x1 - x0``, the same convention
as ``torchvision.ops.box_iou`` and COCO ``[x, y, w, h]``. Components are found on the map at the model's input
size (8-connectivity, ``skimage.measure.label``), then the box edges are scaled to the original image:
camkit's :class:`~camkit.io.Preprocess` resizes the *whole* image (no crop), so input edge ``u`` is original
edge ``u * W / w`` (:func:`map_to_image`); edges are rounded to whole pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from camkit.errors import CamkitError

if TYPE_CHECKING:
    from camkit.core.explanation import Explanation

__all__ = [
    "Box",
    "binarize",
    "component_boxes",
    "localize",
    "map_to_image",
    "otsu_threshold",
    "parse_threshold",
]

Threshold = float | str | tuple[str, float]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels: ``[x0, x1) x [y0, y1)`` (x0/y0 inclusive, x1/y1 exclusive).

    Attributes:
        x0, y0: left and top edge (the first pixel inside).
        x1, y1: right and bottom edge (one past the last pixel inside); width = ``x1 - x0``.
        score: mean map value over the component's pixels.
        area: the component's area in pixels of the image the box refers to (its pixel count on the map times
            the scale factors): smaller than the box's area when the component is not a rectangle.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 1.0
    area: float = 0.0

    @property
    def xyxy(self) -> list[int]:
        """``[x0, y0, x1, y1]``."""
        return [self.x0, self.y0, self.x1, self.y1]

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def otsu_threshold(m: Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a map: the split of a ``bins``-bin histogram that maximises the between-class
    variance (``skimage.filters.threshold_otsu``), as the value between the two classes: the upper edge of the
    background's last bin, so that ``m > threshold`` is exactly the foreground class.

    ``threshold_otsu`` returns the *centre* of that bin; its upper half belongs to the background class of the
    split, so the edge is half a bin higher.
    """
    from skimage.filters import threshold_otsu

    arr = m.detach().double().cpu().numpy().ravel()
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return hi
    return float(threshold_otsu(arr, nbins=bins)) + (hi - lo) / (2 * bins)


def binarize(m: Tensor, threshold: Threshold = 0.2) -> Tensor:
    """The foreground mask of a map, BoolTensor[H, W].

    Args:
        m: Tensor[H, W].
        threshold: a float ``f``: keep ``m >= f * max(m)`` (the CAM paper's rule, f = 0.2); ``("value", t)``:
            keep ``m >= t``; ``("frac", f)``: same as ``f``; ``"otsu"``: keep ``m > t_otsu``.
            A map whose max is <= 0 has no foreground.
    """
    if float(m.max()) <= 0:
        return torch.zeros_like(m, dtype=torch.bool)
    if isinstance(threshold, tuple):
        kind, value = threshold
        if kind == "value":
            return m >= float(value)
        if kind == "frac":
            return m >= float(value) * float(m.max())
        raise CamkitError(f"unknown threshold kind {kind!r}: 'frac' or 'value'")
    if isinstance(threshold, str):
        if threshold.strip().lower() == "otsu":
            return m > otsu_threshold(m)
        raise CamkitError(
            f"unknown threshold {threshold!r}: a fraction of the max (0.2), ('value', t) or 'otsu'"
        )
    return m >= float(threshold) * float(m.max())


def map_to_image(
    box: Sequence[float], map_size: tuple[int, int], image_size: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    """Scale box edges from the map (at the model input, ``map_size`` = (H, W)) to the original image
    (``image_size`` = (W, H), PIL's order), undoing :class:`~camkit.io.Preprocess`'s whole-image resize.

    Edge ``u`` on the map is edge ``u * W_image / W_map`` on the image; edges are rounded to whole pixels.
    """
    x0, y0, x1, y1 = box
    if image_size is None:
        return round(x0), round(y0), round(x1), round(y1)
    sx = image_size[0] / map_size[1]
    sy = image_size[1] / map_size[0]
    return (
        round(x0 * sx),
        round(y0 * sy),
        min(image_size[0], round(x1 * sx)),
        min(image_size[1], round(y1 * sy)),
    )


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from skimage.measure import label

    lab, n = label(mask, connectivity=2, return_num=True)
    return lab, int(n)


def component_boxes(mask: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components (8-connectivity) of a boolean mask: boxes ``[n, 4]`` (x0, y0, x1, y1, half-open),
    pixel counts ``[n]`` and the label image (0 = background, i + 1 = component i)."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    lab, n = _components(arr.astype(bool))
    if n == 0:
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.int64), lab
    ys, xs = np.nonzero(lab)
    ids = lab[ys, xs] - 1
    counts = np.bincount(ids, minlength=n)
    x0 = np.full(n, arr.shape[1], dtype=np.int64)
    y0 = np.full(n, arr.shape[0], dtype=np.int64)
    x1 = np.zeros(n, dtype=np.int64)
    y1 = np.zeros(n, dtype=np.int64)
    np.minimum.at(x0, ids, xs)
    np.minimum.at(y0, ids, ys)
    np.maximum.at(x1, ids, xs + 1)
    np.maximum.at(y1, ids, ys + 1)
    return np.stack([x0, y0, x1, y1], axis=1), counts, lab


def _boxes_of_map(
    m: Tensor,
    threshold: Threshold,
    mode: str,
    min_area: float,
    image_size: tuple[int, int] | None,
) -> list[Box]:
    m = m.detach().float().cpu()
    h, w = m.shape
    boxes, counts, lab = component_boxes(binarize(m, threshold))
    if len(counts) == 0:
        return []
    sums = np.bincount(lab.ravel(), weights=m.numpy().ravel().astype(np.float64), minlength=len(counts) + 1)[
        1:
    ]
    sx = image_size[0] / w if image_size is not None else 1.0
    sy = image_size[1] / h if image_size is not None else 1.0
    if mode == "largest":
        keep = [int(np.argmax(counts))]  # ties: the first component in raster order
    elif mode == "all":
        keep = [i for i in np.argsort(-counts, kind="stable") if counts[i] >= min_area * h * w]
    else:
        raise CamkitError(f"unknown mode {mode!r}: 'largest' or 'all'")
    out = []
    for i in keep:
        x0, y0, x1, y1 = map_to_image(boxes[i].tolist(), (h, w), image_size)
        out.append(Box(x0, y0, x1, y1, score=float(sums[i] / counts[i]), area=float(counts[i]) * sx * sy))
    return out


def localize(
    source: Explanation | Tensor,
    threshold: Threshold = 0.2,
    mode: str = "largest",
    min_area: float = 0.0,
    image_sizes: Sequence[Sequence[int]] | None = None,
    target: int = 0,
) -> list[list[Box]]:
    """Boxes around the salient regions of each map.

    Args:
        source: an :class:`~camkit.Explanation` (boxes in the original images' pixels when it holds
            them), or maps Tensor[B, H, W] / Tensor[H, W] (boxes in map pixels unless ``image_sizes`` is given).
        threshold: ``0.2`` = keep pixels ``>= 0.2 * max`` (the CAM paper); ``("value", 0.5)`` a fixed value;
            ``"otsu"``.
        mode: ``"largest"``: the box of the largest connected component (by pixel count; the CAM paper);
            ``"all"``: one box per component with at least ``min_area`` of the map's pixels, largest first.
        min_area: fraction of the map's area (0..1) below which ``"all"`` drops a component.
        image_sizes: (W, H) of each original image, to scale the boxes to (default: the explanation's images).
        target: which target of a ``TopK`` explanation (maps Tensor[B, k, H, W]).

    Returns:
        one list of :class:`Box` per image (empty when the map has no foreground).
    """
    if isinstance(source, Tensor):
        maps = source
        if maps.dim() == 2:
            maps = maps[None]
    else:
        maps = source.maps
        if maps.dim() == 4:
            maps = maps[:, target]
        if image_sizes is None and source.images is not None:
            image_sizes = [im.size for im in source.images]
    if maps.dim() == 4:
        raise CamkitError("maps of shape [B, k, H, W]: pass maps[:, t] or an Explanation with target=t")
    if maps.dim() != 3:
        raise CamkitError(f"maps must be Tensor[B, H, W] or [H, W], got shape {tuple(maps.shape)}")
    if image_sizes is not None and len(image_sizes) != maps.shape[0]:
        raise CamkitError(f"{len(image_sizes)} image sizes for {maps.shape[0]} maps")
    if not 0.0 <= min_area <= 1.0:
        raise CamkitError(f"min_area is a fraction of the map's area, in [0, 1]; got {min_area}")
    return [
        _boxes_of_map(maps[i], threshold, mode, min_area, image_size(image_sizes, i))
        for i in range(maps.shape[0])
    ]


def image_size(image_sizes: Sequence[Sequence[int]] | None, i: int) -> tuple[int, int] | None:
    """Image ``i``'s (W, H) as a tuple (the sizes may come as lists, e.g. from JSON), None without sizes."""
    if image_sizes is None:
        return None
    w, h = image_sizes[i]
    return w, h


def parse_threshold(text: str | float) -> Threshold:
    """A threshold from the command line: ``0.2`` (fraction of the max), ``value:0.5`` (fixed), ``otsu``."""
    if isinstance(text, (int, float)):
        return float(text)
    t = text.strip().lower()
    if t == "otsu":
        return "otsu"
    for kind in ("value", "frac"):
        if t.startswith(kind + ":") or t.startswith(kind + "="):
            return (kind, float(t[len(kind) + 1 :]))
    try:
        return float(t)
    except ValueError:
        raise CamkitError(
            f"unknown threshold {text!r}: a fraction of the max (0.2), value:0.5 for a fixed value, or otsu"
        ) from None
