"""Targets for tasks other than single-label classification: each is a callable ``f(output) -> Tensor[B]``.

Pass one as ``targets=`` to :func:`camkit.explain` / :func:`camkit.compare`:

* :class:`SegmentationTarget` (semantic segmentation, output Tensor[B, C, H, W], e.g. torchvision FCN/DeepLabV3
  whose ``{"out": ...}`` dict is read automatically): the sum of one class's logits over a mask or the image.
* :class:`DetectionTarget` (torchvision Faster R-CNN / RetinaNet / FCOS in eval mode): the detection of a class
  that best overlaps a reference box; score = its confidence + its IoU with the reference box (the IoU term makes
  the map explain where the box is, as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` does). The models' list of
  dicts is packed by :func:`pack_detections` into a tensor that keeps the graph.
* :class:`MultiLabelTarget`: one or several independent (sigmoid) labels; logit or probability.
* :class:`RegressionTarget`: one output of a regression model (``sign=-1`` explains what lowers it).
* :class:`SimilarityTarget`: cosine similarity of the output embedding to a reference embedding ("why are these
  two images similar").

:func:`default_target` picks what to explain when nothing is asked (what ``camkit explain`` does for torchvision
segmentation and detection models, and :func:`camkit.explain` with no target, image by image, through
:func:`default_targets`): the non-background class covering most pixels of the predicted mask, or the
highest-scoring detection. :func:`model_task` tells the task of a model, :func:`set_score_threshold` sets a
detection model's score threshold.

Detection models normalise and resize inside (``GeneralizedRCNNTransform``): give them images in [0, 1]
(``Preprocess(mean=(0, 0, 0), std=(1, 1, 1))`` for files) and build them with ``min_size``/``max_size`` near
your input size. The map covers the network's (padded) batch image, upsampled to the input size: when the resized
image is not a multiple of 32 the right/bottom strip holds padding (at most 31 pixels of the resized image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


@dataclass
class SegmentationTarget:
    """Sum of class ``category``'s logits over ``mask`` (or the whole image).

    Args:
        category: class index of the segmentation output Tensor[B, C, H, W].
        mask: Tensor[H, W] or Tensor[B, H, W] (bool or float weights) at the output's resolution; None: all pixels.
    """

    category: int
    mask: Tensor | None = None

    def __call__(self, output: Tensor) -> Tensor:
        if output.dim() != 4:
            raise ValueError(
                f"SegmentationTarget needs a Tensor[B, C, H, W] output, got {tuple(output.shape)}"
            )
        if not 0 <= self.category < output.shape[1]:
            raise ValueError(f"class {self.category} out of range: the output has {output.shape[1]} classes")
        logits = output[:, self.category]
        if self.mask is None:
            return logits.sum(dim=(1, 2))
        mask = self.mask.to(device=logits.device, dtype=logits.dtype)
        if mask.shape[-2:] != logits.shape[-2:]:
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} does not match the output's {tuple(logits.shape[-2:])}"
            )
        return (logits * mask).sum(dim=(-2, -1))


def is_detection_output(out: object) -> bool:
    """True for a torchvision detection output: a list of dicts with ``boxes``, ``scores`` and ``labels``."""
    return (
        isinstance(out, (list, tuple))
        and len(out) > 0
        and all(isinstance(d, dict) and {"boxes", "scores", "labels"} <= set(d) for d in out)
    )


def pack_detections(out: Sequence[dict[str, Tensor]]) -> Tensor:
    """A list of B detection dicts -> Tensor[B, D, 6] rows (x1, y1, x2, y2, score, label), padded with label -1.

    Differentiable in the boxes and scores (the graph of the model output is kept).
    """
    rows = []
    for d in out:
        rows.append(
            torch.cat([d["boxes"], d["scores"][:, None], d["labels"][:, None].to(d["scores"].dtype)], dim=1)
        )
    most = max(r.shape[0] for r in rows)
    padded = []
    for r in rows:
        pad = torch.zeros(most - r.shape[0], 6, dtype=r.dtype, device=r.device)
        pad[:, 5] = -1
        padded.append(torch.cat([r, pad], dim=0))
    return torch.stack(padded)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes Tensor[N, 4] with one box Tensor[4] (x1, y1, x2, y2) -> Tensor[N] (differentiable)."""
    lt = torch.maximum(a[:, :2], b[:2])
    rb = torch.minimum(a[:, 2:], b[2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[2] - b[0]).clamp(min=0) * (b[3] - b[1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


@dataclass
class DetectionTarget:
    """The detection that best matches a reference box: score + IoU.

    Args:
        box: reference box (x1, y1, x2, y2) in input pixels, Tensor[4] or a sequence; or Tensor[B, 4], one per image.
        label: only detections of this class (None: any class).
        iou_threshold: a detection matches when its IoU with ``box`` is at least this.
        use_iou: add the IoU to the score (default), so the map also explains the box's position.

    The chosen detection (per image) is recorded in ``self.matched`` (row index into the packed output).
    """

    box: Tensor | Sequence[float]
    label: int | None = None
    iou_threshold: float = 0.5
    use_iou: bool = True

    def __post_init__(self) -> None:
        self.matched: list[int] = []

    def __call__(self, output: Tensor) -> Tensor:
        if output.dim() != 3 or output.shape[-1] != 6:
            raise ValueError(
                "DetectionTarget needs a detection model's output (a list of dicts with boxes/scores/labels, "
                f"packed to Tensor[B, D, 6]); got shape {tuple(output.shape)}"
            )
        ref = torch.as_tensor(self.box, dtype=output.dtype, device=output.device)
        refs = ref.expand(output.shape[0], 4) if ref.dim() == 1 else ref
        scores = []
        self.matched = []
        for i in range(output.shape[0]):
            det = output[i]
            valid = det[:, 5] >= 0
            if self.label is not None:
                valid = valid & (det[:, 5] == self.label)
            iou = box_iou(det[:, :4], refs[i])
            ok = valid & (iou.detach() >= self.iou_threshold)
            if not bool(ok.any()):
                best = float(iou.detach()[valid].max()) if bool(valid.any()) else 0.0
                raise ValueError(
                    f"image {i}: no detection{'' if self.label is None else f' of class {self.label}'} overlaps "
                    f"the reference box {refs[i].tolist()} with IoU >= {self.iou_threshold} (best {best:.2f} "
                    f"among {int(valid.sum())}); lower iou_threshold, or the model's score threshold"
                )
            key = torch.where(ok, iou.detach() + det[:, 4].detach(), torch.full_like(iou, -1.0))
            j = int(key.argmax())
            self.matched.append(j)
            scores.append(det[j, 4] + (iou[j] if self.use_iou else 0.0))
        return torch.stack(scores)


@dataclass
class MultiLabelTarget:
    """Independent labels of a multi-label model (sigmoid outputs).

    Args:
        classes: one class index, or several (their scores are summed: "why these labels together").
        probability: explain sigmoid(logit) instead of the logit. For one class the normalised map is the same
            either way for Grad-CAM-style methods (the sigmoid's derivative is one positive factor per image).
    """

    classes: int | Sequence[int]
    probability: bool = False

    def __call__(self, output: Tensor) -> Tensor:
        idx = [self.classes] if isinstance(self.classes, int) else list(self.classes)
        z = output[:, idx]
        if self.probability:
            z = torch.sigmoid(z)
        return z.sum(dim=1)


@dataclass
class RegressionTarget:
    """One output of a regression model: ``sign * output[:, index]`` (a Tensor[B] or [B, 1] output: ``index=0``).

    ``sign=-1`` explains what makes the value smaller.
    """

    index: int = 0
    sign: float = 1.0

    def __call__(self, output: Tensor) -> Tensor:
        y = output if output.dim() == 1 else output.reshape(output.shape[0], -1)[:, self.index]
        return self.sign * y


@dataclass
class SimilarityTarget:
    """Cosine similarity of the model's embedding to ``reference`` (Tensor[D] or Tensor[B, D], one per image).

    ``explain(model, image_a, targets=SimilarityTarget(model(image_b)))`` shows what in image A makes it similar to
    image B. The reference is detached (it is a constant).
    """

    reference: Tensor

    def __call__(self, output: Tensor) -> Tensor:
        emb = output.reshape(output.shape[0], -1)
        ref = self.reference.detach().to(device=emb.device, dtype=emb.dtype).reshape(-1, emb.shape[1])
        return F.cosine_similarity(emb, ref.expand_as(emb), dim=1)


# ------------------------------------------------------------------------------------ what to explain by default


def model_task(model: object) -> str:
    """``"detection"`` (torchvision detection models: they resize and normalise inside), ``"segmentation"``
    (torchvision FCN / DeepLabV3 / LRASPP), else ``"classification"``."""
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        from torchvision.models.segmentation import LRASPP
        from torchvision.models.segmentation._utils import _SimpleSegmentationModel
    except ImportError:  # pragma: no cover - torchvision without these modules
        return "classification"
    if isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
        return "detection"
    if isinstance(model, (_SimpleSegmentationModel, LRASPP)):
        return "segmentation"
    return "classification"


def _threshold_owner(model: object) -> object:
    heads = getattr(
        model, "roi_heads", None
    )  # Faster / Mask / Keypoint R-CNN (the RPN has its own threshold)
    if heads is not None and hasattr(heads, "score_thresh"):
        return heads
    if model_task(model) == "detection" and hasattr(model, "score_thresh"):  # RetinaNet, FCOS, SSD
        return model
    raise ValueError(
        f"{type(model).__name__} is not a torchvision detection model: it has no score threshold"
    )


def score_threshold(model: object) -> float:
    """The score a torchvision detection model's detections must exceed to be returned."""
    return float(_threshold_owner(model).score_thresh)  # type: ignore[attr-defined]


def set_score_threshold(model: object, threshold: float) -> None:
    """Set that threshold (``0.0`` keeps every detection, e.g. to explain a model with random weights)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"a detection score threshold lies in [0, 1], got {threshold}")
    _threshold_owner(model).score_thresh = float(threshold)  # type: ignore[attr-defined]


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
            raise ValueError(
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
    from camkit.targets import _class_index

    if isinstance(category, int) and num_classes is None:
        if category < 0:
            raise ValueError(f"class index {category} is negative")
        return category
    return _class_index(category, num_classes if num_classes is not None else len(labels or ()), labels)


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
        from camkit.pipeline import _output_fn

        output = _output_fn(None)(output)
    if output.shape[0] != 1:
        raise ValueError(f"default_target chooses for one image, got a batch of {output.shape[0]}")
    output = output.detach()
    if task == "segmentation":
        return _segmentation_default(output, category, labels, background)
    if task == "detection":
        return _detection_default(output, category, labels, threshold)
    raise ValueError(f"default_target is for segmentation and detection outputs, not {task!r}")


def _label(labels: Sequence[str] | None, category: int) -> str | None:
    return labels[category] if labels is not None and 0 <= category < len(labels) else None


def _segmentation_default(
    logits: Tensor, category: int | str | None, labels: Sequence[str] | None, background: int | None
) -> ChosenTarget:
    if logits.dim() != 4:
        raise ValueError(f"a segmentation output is Tensor[1, C, H, W], got {tuple(logits.shape)}")
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
        raise ValueError(
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
        raise ValueError(
            f"{what} above the model's score threshold{thr}{among}. Nothing to explain: with random weights "
            "scores stay low, so use pretrained weights, or lower the threshold (--det-threshold 0 on the "
            "command line, camkit.tasks.set_score_threshold(model, 0.0) in Python)"
            + ("" if cat is None else ", or pick another class with --target")
        )
    j = int(torch.where(valid, det[:, 4], torch.full_like(det[:, 4], -1.0)).argmax())
    lab = int(det[j, 5])
    box = [float(v) for v in det[j, :4]]
    target = DetectionTarget(det[j, :4].clone(), label=lab)
    return ChosenTarget(target, "detection", lab, _label(labels, lab), float(det[j, 4]), "box", box=box)
