"""What to explain in a segmentation or detection model, and the task helpers around it.

:func:`default_target` picks what to explain when nothing is asked (what ``camkit explain`` does for torchvision
segmentation and detection models, and :func:`camkit.explain` with no target, image by image, through
:func:`default_targets`): the non-background class covering most pixels of the predicted mask, or the
highest-scoring detection. :func:`model_task` tells the task of a model, :func:`set_score_threshold` sets a
detection model's score threshold.

The targets themselves (:class:`SegmentationTarget`, :class:`DetectionTarget`, :class:`MultiLabelTarget`,
:class:`RegressionTarget`, :class:`SimilarityTarget`) live in :mod:`camkit.core.targets` and are importable from here
too; :func:`pack_detections` and :func:`is_detection_output` live in :mod:`camkit.core.outputs`.

Detection models normalise and resize inside (``GeneralizedRCNNTransform``): give them images in [0, 1]
(``Preprocess(mean=(0, 0, 0), std=(1, 1, 1))`` for files) and build them with ``min_size``/``max_size`` near
your input size. The map covers the network's (padded) batch image, upsampled to the input size: when the resized
image is not a multiple of 32 the right/bottom strip holds padding (at most 31 pixels of the resized image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor

from camkit.adapters.task import model_task
from camkit.core.outputs import is_detection_output, logits_of, pack_detections
from camkit.core.targets import (
    DetectionTarget,
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
    class_index,
)
from camkit.errors import CamkitError

__all__ = [
    "ChosenTarget",
    "DetectionTarget",
    "MultiLabelTarget",
    "PerImageTargets",
    "RegressionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "default_target",
    "default_targets",
    "is_detection_output",
    "model_task",
    "pack_detections",
    "score_threshold",
    "set_score_threshold",
]


# ------------------------------------------------------------------------------------ what to explain by default


class _Thresholded(Protocol):
    score_thresh: float


def _threshold_owner(model: object) -> _Thresholded:
    heads = getattr(
        model, "roi_heads", None
    )  # Faster / Mask / Keypoint R-CNN (the RPN has its own threshold)
    if heads is not None and hasattr(heads, "score_thresh"):
        return cast(_Thresholded, heads)
    if model_task(model) == "detection" and hasattr(model, "score_thresh"):  # RetinaNet, FCOS, SSD
        return cast(_Thresholded, model)
    raise CamkitError(
        f"{type(model).__name__} is not a torchvision detection model: it has no score threshold"
    )


def score_threshold(model: object) -> float:
    """The score a torchvision detection model's detections must exceed to be returned."""
    return float(_threshold_owner(model).score_thresh)


def set_score_threshold(model: object, threshold: float) -> None:
    """Set that threshold (``0.0`` keeps every detection, e.g. to explain a model with random weights)."""
    if not 0.0 <= threshold <= 1.0:
        raise CamkitError(f"a detection score threshold lies in [0, 1], got {threshold}")
    _threshold_owner(model).score_thresh = float(threshold)


@dataclass
class ChosenTarget:
    """What :func:`default_target` chose for one image.

    Attributes:
        target: the callable target to pass as ``targets=``.
        task: ``"segmentation"`` or ``"detection"``.
        category: the class index.
        label: its name when labels are known.
        score: segmentation: the class's mean softmax probability over the explained region; detection: the
            detection's confidence.
        region: segmentation: ``"mask"`` (the pixels predicted as the class) or ``"image"`` (no pixel is: the
            class's logits over the whole image); detection: ``"box"``.
        coverage: segmentation: fraction of the image's pixels predicted as the class.
        box: detection: (x1, y1, x2, y2) in pixels of the model input.
    """

    target: SegmentationTarget | DetectionTarget
    task: str
    category: int
    label: str | None
    score: float
    region: str
    coverage: float | None = None
    box: list[float] | None = None

    def describe(self) -> str:
        name = f"class {self.category}" + (f" {self.label!r}" if self.label else "")
        if self.region == "mask":
            return f"{name} over its predicted mask ({self.coverage:.1%} of the image)"
        if self.region == "image":
            return f"{name} over the whole image (no pixel is predicted as it)"
        box = ", ".join(f"{v:.0f}" for v in self.box or [])
        return f"the detection of {name}, score {self.score:.3f}, box ({box})"


@dataclass
class PerImageTargets:
    """One :class:`ChosenTarget` per image of a batch, as one callable target ``f(output) -> Tensor[B]``.

    :func:`camkit.explain` builds it with :func:`default_targets` when a torchvision segmentation or detection
    model is explained with no target; the choices are on ``Explanation.chosen``.
    """

    chosen: list[ChosenTarget]

    def __call__(self, output: Tensor) -> Tensor:
        if output.shape[0] != len(self.chosen):
            raise CamkitError(
                f"targets were chosen for {len(self.chosen)} images, but the output has {output.shape[0]} rows"
            )
        return torch.cat([c.target(output[i : i + 1]) for i, c in enumerate(self.chosen)])

    def score_rows(self, output: Tensor, image: Tensor) -> Tensor:
        """Scores Tensor[n] of output rows that belong to images ``image`` (LongTensor[n]), e.g. masked copies."""
        scores = torch.empty(output.shape[0], dtype=torch.float32, device=output.device)
        image = image.to(output.device)
        for i in image.unique().tolist():
            rows = (image == i).nonzero()[:, 0]
            scores[rows] = self.chosen[i].target(output[rows]).float()
        return scores


def default_targets(
    output: Tensor,
    task: str,
    category: int | str | None = None,
    labels: Sequence[str] | None = None,
    background: int | None = 0,
    threshold: float | None = None,
) -> PerImageTargets:
    """:func:`default_target` for each image of a batch output (segmentation Tensor[B, C, H, W], detection
    :func:`pack_detections` Tensor[B, D, 6]), with the same ``category`` (None: chosen per image)."""
    output = output.detach()
    return PerImageTargets(
        [
            default_target(
                output[i : i + 1],
                task,
                category=category,
                labels=labels,
                background=background,
                threshold=threshold,
            )
            for i in range(output.shape[0])
        ]
    )


def _category(category: int | str, num_classes: int | None, labels: Sequence[str] | None) -> int:
    if isinstance(category, int) and num_classes is None:
        if category < 0:
            raise CamkitError(f"class index {category} is negative")
        return category
    return class_index(category, num_classes if num_classes is not None else len(labels or ()), labels)


def default_target(
    output: object,
    task: str,
    category: int | str | None = None,
    labels: Sequence[str] | None = None,
    background: int | None = 0,
    threshold: float | None = None,
) -> ChosenTarget:
    """The target to explain in one image's segmentation or detection output.

    Args:
        output: the model's output for one image: segmentation Tensor[1, C, H, W] (or torchvision's
            ``{"out": ...}``), detection list of one dict (or its :func:`pack_detections` Tensor[1, D, 6]).
        task: ``"segmentation"`` or ``"detection"`` (see :func:`model_task`).
        category: None: segmentation: the class other than ``background`` that covers the most pixels of the
            predicted mask (argmax over classes); when only the background is predicted, the other class with the
            highest mean probability, over the whole image. Detection: the highest-scoring detection
            (boxes of zero width or height are skipped). An index or a class name: segmentation: that class over its predicted mask, or over the whole image
            when no pixel is predicted as it; detection: that class's highest-scoring detection.
        labels: class names (to resolve names, and for the result).
        background: the class never chosen by default in segmentation (torchvision's VOC weights: 0); None: none.
        threshold: the detection model's score threshold, for the message when nothing was detected.

    Raises:
        ValueError: a batch of several images, an unknown class, or (detection) no detection to explain.
    """
    if not isinstance(output, Tensor):
        output = logits_of(output)
    if output.shape[0] != 1:
        raise CamkitError(f"default_target chooses for one image, got a batch of {output.shape[0]}")
    output = output.detach()
    if task == "segmentation":
        return _segmentation_default(output, category, labels, background)
    if task == "detection":
        return _detection_default(output, category, labels, threshold)
    raise CamkitError(f"default_target is for segmentation and detection outputs, not {task!r}")


def _label(labels: Sequence[str] | None, category: int) -> str | None:
    return labels[category] if labels is not None and 0 <= category < len(labels) else None


def _segmentation_default(
    logits: Tensor, category: int | str | None, labels: Sequence[str] | None, background: int | None
) -> ChosenTarget:
    if logits.dim() != 4:
        raise CamkitError(f"a segmentation output is Tensor[1, C, H, W], got {tuple(logits.shape)}")
    num = logits.shape[1]
    probs = torch.softmax(logits[0].float(), dim=0)  # [C, H, W]
    pred = probs.argmax(dim=0)
    others = torch.ones(num, dtype=torch.bool, device=logits.device)
    if background is not None and 0 <= background < num and num > 1:
        others[background] = False
    if category is None:
        counts = torch.bincount(pred.flatten(), minlength=num).masked_fill(~others, 0)
        if int(counts.max()) > 0:
            cat = int(counts.argmax())
        else:  # only the background is predicted
            cat = int(probs.mean(dim=(1, 2)).masked_fill(~others, -1.0).argmax())
    else:
        cat = _category(category, num, labels)
    mask = pred == cat
    coverage = float(mask.float().mean())
    if bool(mask.any()):
        target, region, score = SegmentationTarget(cat, mask), "mask", float(probs[cat][mask].mean())
    else:
        target, region, score = SegmentationTarget(cat), "image", float(probs[cat].mean())
    return ChosenTarget(target, "segmentation", cat, _label(labels, cat), score, region, coverage=coverage)


def _detection_default(
    packed: Tensor, category: int | str | None, labels: Sequence[str] | None, threshold: float | None
) -> ChosenTarget:
    if packed.dim() != 3 or packed.shape[-1] != 6:
        raise CamkitError(
            "a detection output is a list of dicts with boxes/scores/labels (or its packed Tensor[1, D, 6]), "
            f"got shape {tuple(packed.shape)}"
        )
    det = packed[0]
    # a box of zero width or height has IoU 0 with itself: DetectionTarget could not find it again
    valid = (det[:, 5] >= 0) & (det[:, 2] > det[:, 0]) & (det[:, 3] > det[:, 1])
    cat = None if category is None else _category(category, len(labels) if labels else None, labels)
    if cat is not None:
        valid = valid & (det[:, 5] == cat)
    if not bool(valid.any()):
        thr = f" ({threshold:g})" if threshold is not None else ""
        what = "no detection" if cat is None else f"no detection of class {cat}"
        if cat is not None and _label(labels, cat):
            what += f" {_label(labels, cat)!r}"
        among = (
            ""
            if cat is None
            else f" (the model detected {int((det[:, 5] >= 0).sum())} object(s) of other classes)"
        )
        raise CamkitError(
            f"{what} above the model's score threshold{thr}{among}. Nothing to explain: with random weights "
            "scores stay low, so use pretrained weights, or lower the threshold (--det-threshold 0 with camkit "
            "explain, camkit.core.tasks.set_score_threshold(model, 0.0) in Python)"
            + ("" if cat is None else ", or pick another class with --target")
        )
    j = int(torch.where(valid, det[:, 4], torch.full_like(det[:, 4], -1.0)).argmax())
    lab = int(det[j, 5])
    box = [float(v) for v in det[j, :4]]
    target = DetectionTarget(det[j, :4].clone(), label=lab)
    return ChosenTarget(target, "detection", lab, _label(labels, lab), float(det[j, 4]), "box", box=box)
