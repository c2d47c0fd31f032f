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
    "DetectionTarget",
    "MultiLabelTarget",
    "RegressionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "is_detection_output",
    "pack_detections",
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
