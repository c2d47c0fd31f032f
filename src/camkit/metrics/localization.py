"""Localization against ground-truth boxes: pointing game, box IoU / accuracy, MaxBoxAccV2.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the *original* image, half-open (``x1`` exclusive, width
``x1 - x0``; see :mod:`camkit.localize`). Maps are at the model's input size (``Explanation.maps``); give
``image_sizes`` ((W, H) per image) when the ground truth is in original-image pixels and the preprocessing
resized the image (camkit's does: the whole image, no crop), otherwise the map's pixels are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from camkit.errors import CamkitError
from camkit.localize import Box, binarize, component_boxes, image_size, localize, map_to_image

__all__ = [
    "BoxAccuracy",
    "MaxBoxAcc",
    "box_accuracy",
    "box_iou",
    "iou_curves",
    "max_box_acc_v2",
    "pointing_game",
]

BoxesLike = Tensor | np.ndarray | Sequence[Sequence[float]] | Sequence[Box]


def as_boxes(boxes: BoxesLike | Box) -> Tensor:
    """Boxes as a float64 Tensor[N, 4] (x0, y0, x1, y1), checked: finite, x1 >= x0, y1 >= y0."""
    if isinstance(boxes, Box):
        return torch.tensor([boxes.xyxy], dtype=torch.float64)
    if isinstance(boxes, Tensor):
        t = boxes.detach().cpu().double()
    elif len(boxes) and isinstance(boxes[0], Box):
        t = torch.tensor([b.xyxy if isinstance(b, Box) else list(b) for b in boxes], dtype=torch.float64)
    else:
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != 4:
        raise CamkitError(f"boxes must be [N, 4] (x0, y0, x1, y1), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise CamkitError("boxes must have finite coordinates (a NaN or infinite coordinate was given)")
    if ((t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])).any():
        raise CamkitError("boxes must have x1 >= x0 and y1 >= y0 (x0, y0, x1, y1 order)")
    return t


def box_iou(a: BoxesLike | Box, b: BoxesLike | Box) -> Tensor:
    """Intersection over union of every box of ``a`` [N, 4] with every box of ``b`` [M, 4]: Tensor[N, M].

    Half-open boxes: area = (x1 - x0) * (y1 - y0) (``torchvision.ops.box_iou``'s convention). Two empty boxes
    have IoU 0.
    """
    # imported here: torchvision takes seconds to import and only box comparisons need it
    from torchvision.ops import box_iou as iou

    return torch.nan_to_num(iou(as_boxes(a), as_boxes(b)), nan=0.0)  # two empty boxes: 0 / 0 -> 0


def _maps3(maps: Tensor) -> Tensor:
    if maps.dim() == 2:
        maps = maps[None]
    if maps.dim() != 3:
        raise CamkitError(f"maps must be Tensor[B, H, W], got shape {tuple(maps.shape)}")
    return maps.detach().float().cpu()


def _check_lengths(maps: Tensor, gt_boxes: Sequence[BoxesLike], image_sizes: Sequence | None) -> None:
    if len(gt_boxes) != maps.shape[0]:
        raise CamkitError(f"{len(gt_boxes)} ground-truth box lists for {maps.shape[0]} maps (one per image)")
    if image_sizes is not None and len(image_sizes) != maps.shape[0]:
        raise CamkitError(f"{len(image_sizes)} image sizes for {maps.shape[0]} maps")


def pointing_game(
    maps: Tensor,
    gt_boxes: Sequence[BoxesLike],
    tolerance: float = 15.0,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016).

    Paper: a hit when the map's maximum point falls on the annotated object, allowing "a 15-pixel tolerance to
    the ground-truth region"; accuracy = hits / (hits + misses). ``tolerance=0`` is the strict variant (the
    point must be inside a box).

    Choices: the point is the centre of the first (raster order) maximum pixel of the map, scaled to the
    original image (``image_sizes``); the distance is the Euclidean distance in original pixels from that point
    to the nearest ground-truth box (0 inside). An image without boxes gives NaN.

    Args:
        maps: Tensor[B, H, W].
        gt_boxes: one [N_i, 4] list of boxes per image (original-image pixels).
        tolerance: in pixels (15 in the paper; 0 = strict).
        image_sizes: (W, H) of each original image.

    Returns:
        Tensor[B]: 1.0 hit, 0.0 miss, NaN without ground truth.
    """
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not 0 <= tolerance < math.inf
    ):
        raise CamkitError(f"tolerance must be a finite number of pixels >= 0 (0: strict), got {tolerance!r}")
    m = _maps3(maps)
    _check_lengths(m, gt_boxes, image_sizes)
    b, h, w = m.shape
    idx = m.flatten(1).argmax(dim=1)
    out = torch.empty(b, dtype=torch.float32)
    for i in range(b):
        gt = as_boxes(gt_boxes[i])
        if gt.shape[0] == 0:
            out[i] = float("nan")
            continue
        sx = image_sizes[i][0] / w if image_sizes is not None else 1.0
        sy = image_sizes[i][1] / h if image_sizes is not None else 1.0
        py = (int(idx[i]) // w + 0.5) * sy
        px = (int(idx[i]) % w + 0.5) * sx
        dx = torch.clamp(torch.maximum(gt[:, 0] - px, px - gt[:, 2]), min=0)
        dy = torch.clamp(torch.maximum(gt[:, 1] - py, py - gt[:, 3]), min=0)
        dist = torch.sqrt(dx**2 + dy**2).min()
        out[i] = float(dist <= tolerance)
    return out


@dataclass
class BoxAccuracy:
    """Per-image results of :func:`box_accuracy`.

    Attributes:
        iou: Tensor[B], best IoU between the predicted box and any ground-truth box (0 without a prediction,
            NaN for an image without ground-truth boxes).
        correct: Tensor[B], 1.0 where ``iou >= iou_threshold``, 0.0 below, NaN for an image without ground truth
            (it is excluded, not a miss: average with ``nanmean``).
        boxes: the predicted boxes per image.
    """

    iou: Tensor
    correct: Tensor
    boxes: list[list[Box]]


def box_accuracy(
    maps: Tensor,
    gt_boxes: Sequence[BoxesLike],
    threshold: float | str | tuple[str, float] = 0.2,
    iou_threshold: float = 0.5,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> BoxAccuracy:
    """Box IoU and box accuracy at one map threshold (CAM paper, Zhou et al. 2016, section 3).

    Paper: the box of the largest connected component of the map thresholded at 20% of its max is correct
    when its IoU with the ground truth is at least 0.5 (top-1 localization also asks for the right class;
    combine with the predictions yourself). With several ground-truth boxes the best IoU counts.
    """
    m = _maps3(maps)
    _check_lengths(m, gt_boxes, image_sizes)
    pred = localize(m, threshold=threshold, mode="largest", image_sizes=image_sizes)
    ious = torch.zeros(m.shape[0])
    for i, boxes in enumerate(pred):
        gt = as_boxes(gt_boxes[i])
        if gt.shape[0] == 0:
            ious[i] = float("nan")
        elif boxes:
            ious[i] = float(box_iou(boxes, gt).max())
    correct = torch.where(torch.isnan(ious), ious, (ious >= iou_threshold).float())
    return BoxAccuracy(iou=ious, correct=correct, boxes=pred)


def iou_curves(
    maps: Tensor,
    gt_boxes: Sequence[BoxesLike],
    thresholds: Sequence[float] | Tensor | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    multi_contour: bool = True,
) -> Tensor:
    """Best IoU of each image at each map threshold, Tensor[B, T] (the raw material of MaxBoxAccV2).

    At threshold ``t`` the map is cut at ``t * max`` (``m >= t * max``); with ``multi_contour`` every connected
    component gives a box (Choe et al.'s "multi_contour_eval", part of MaxBoxAccV2), else only the largest;
    the image's value is the best IoU of any of these boxes with any ground-truth box (0 when the mask is empty).
    Default thresholds: 0, 0.01, ..., 0.99 (wsolevaluation's ``cam_curve_interval=0.01``).
    """
    m = _maps3(maps)
    _check_lengths(m, gt_boxes, image_sizes)
    thr = torch.arange(0, 1, 0.01) if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)
    b, h, w = m.shape
    out = torch.zeros(b, thr.numel())
    for i in range(b):
        gt = as_boxes(gt_boxes[i])
        if gt.shape[0] == 0:
            out[i] = float("nan")
            continue
        size = image_size(image_sizes, i)
        for j, t in enumerate(thr.tolist()):
            boxes, counts, _ = component_boxes(binarize(m[i], ("frac", t)))
            if len(counts) == 0:
                continue
            if not multi_contour:
                boxes = boxes[[int(np.argmax(counts))]]
            scaled = [map_to_image(bx.tolist(), (h, w), size) for bx in boxes]
            out[i, j] = float(box_iou(scaled, gt).max())
    return out


@dataclass
class MaxBoxAcc:
    """MaxBoxAccV2 over a set of images.

    Attributes:
        value: the mean over ``iou_thresholds`` of the best box accuracy (in [0, 1]).
        per_iou: IoU threshold -> best accuracy over the map thresholds.
        best_thresholds: IoU threshold -> the map threshold that reached it.
        n_images: images with ground truth.
    """

    value: float
    per_iou: dict[float, float]
    best_thresholds: dict[float, float]
    n_images: int


def max_box_acc_v2(
    curves: Tensor,
    thresholds: Sequence[float] | Tensor | None = None,
    iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
) -> MaxBoxAcc:
    """MaxBoxAccV2 (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020).

    Paper: BoxAcc(t, delta) = fraction of images whose box at map threshold ``t`` has IoU >= delta with a
    ground-truth box; MaxBoxAcc(delta) = max over t (one threshold for the whole data set, so the metric does not
    depend on a threshold chosen by hand); MaxBoxAccV2 = mean over delta in {0.3, 0.5, 0.7}, with the best
    box over all components of the mask (multi-contour). Class labels are not used.

    Args:
        curves: Tensor[N, T] from :func:`iou_curves` over the whole data set (images without ground truth, NaN
            rows, are left out).
        thresholds: the T map thresholds the curves were computed at (default 0, 0.01, ..., 0.99).
        iou_thresholds: the deltas.
    """
    thr = torch.arange(0, 1, 0.01) if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)
    c = curves[~torch.isnan(curves).any(dim=1)]
    if c.shape[0] == 0:
        raise CamkitError("no image with ground-truth boxes")
    if c.shape[1] != thr.numel():
        raise CamkitError(f"curves have {c.shape[1]} thresholds, {thr.numel()} given")
    per, best = {}, {}
    for delta in iou_thresholds:
        acc = (c >= delta).float().mean(dim=0)
        j = int(acc.argmax())
        per[float(delta)] = float(acc[j])
        best[float(delta)] = float(thr[j])
    return MaxBoxAcc(
        value=float(np.mean(list(per.values()))), per_iou=per, best_thresholds=best, n_images=c.shape[0]
    )
