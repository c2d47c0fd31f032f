"""What score to explain.

A target spec is one of:

* ``None``: the top-1 class of each image (the default);
* an ``int`` class index, or a class *name* (``"tabby cat"``, matched case-insensitively against the labels);
* a sequence with one index or name per image;
* :class:`TopK`: the k best classes of each image (maps get a target axis: Tensor[B, k, H, W]);
* a callable ``f(output) -> Tensor[B]`` on the whole model output (any score: a difference of logits, a mask
  sum for segmentation, an embedding similarity...), or ``-> Tensor[B, T]`` for T targets per image (maps get a
  target axis, as for ``TopK``; all T gradients come from one batched backward).

The score of a class is its **logit** (the pre-softmax output), as in the Grad-CAM paper.

Targets for tasks other than single-label classification, each a callable ``f(output) -> Tensor[B]``:

* :class:`SegmentationTarget` (semantic segmentation, output Tensor[B, C, H, W], e.g. torchvision FCN/DeepLabV3
  whose ``{"out": ...}`` dict is read automatically): the sum of one class's logits over a mask or the image.
* :class:`DetectionTarget` (torchvision Faster R-CNN / RetinaNet / FCOS in eval mode): the detection of a class
  that best overlaps a reference box; score = its confidence + its IoU with the reference box (the IoU term makes
  the map explain where the box is, as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` does). The models' list of
  dicts is packed by :func:`camkit.core.outputs.pack_detections` into a tensor that keeps the graph.
* :class:`MultiLabelTarget`: one or several independent (sigmoid) labels; logit or probability; with
  ``separate=True`` one map per label (a target axis, like ``TopK``).
* :class:`EachTarget`: several callable targets at once, one map each (several boxes of a detection model,
  several regions...): ``f(output) -> Tensor[B, T]``.
* :class:`RegressionTarget`: one output of a regression model (``sign=-1`` explains what lowers it).
* :class:`SimilarityTarget`: cosine similarity of the output embedding to a reference embedding ("why are these
  two images similar").

What to explain when nothing is asked (segmentation and detection models) is chosen in :mod:`camkit.core.tasks`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from camkit.errors import CamkitError

__all__ = [
    "DetectionTarget",
    "EachTarget",
    "MultiLabelTarget",
    "RegressionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "TargetSpec",
    "TopK",
    "class_index",
    "imagenet_labels",
    "parse_target",
    "resolve_classes",
    "score_fn",
]


@dataclass(frozen=True)
class TopK:
    """Explain the ``k`` highest-scoring classes of each image."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise CamkitError(f"TopK needs k >= 1, got {self.k}")


TargetSpec = None | int | str | TopK | Sequence[int | str] | Callable[[Tensor], Tensor]


def parse_target(text: str | None) -> TargetSpec:
    """Parse a command-line target: ``''``/``None`` -> top-1, ``'285'``, ``'tabby cat'``, ``'top3'``."""
    if text is None or text.strip() == "" or text.strip().lower() in {"top1", "top-1"}:
        return None
    t = text.strip()
    low = t.lower().replace("-", "").replace(":", "")
    if low.startswith("top") and low[3:].isdigit():
        return TopK(int(low[3:]))
    if t.lstrip("-").isdigit():
        return int(t)
    return t


def class_index(item: int | str, num_classes: int, labels: Sequence[str] | None) -> int:
    """The index of one class target: an index (checked against ``num_classes``) or a class name.

    Names match ``labels`` case-insensitively (for ImageNet's labels also WordNet synonyms, "tabby" = "tabby cat").

    Raises:
        ValueError: an index out of range, or an unknown or ambiguous name (with the closest names).
    """
    if isinstance(item, bool):
        raise TypeError("a class target must be an int or a class name, not a bool")
    if isinstance(item, int):
        if not 0 <= item < num_classes:
            raise CamkitError(
                f"class index {item} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return item
    if isinstance(item, str):
        if labels is None:
            raise CamkitError(
                f"class name {item!r} given but no class labels are known for this model; pass labels=... or an index"
            )
        key = item.strip().lower()
        names = _names(tuple(labels))
        hits = sorted({i for i, alts in enumerate(names) if key in alts})
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise CamkitError(f"class name {item!r} is ambiguous: classes {hits}; give the index instead")
        pool = {alt: i for i, alts in enumerate(names) for alt in alts}
        close = difflib.get_close_matches(key, list(pool), n=5, cutoff=0.6)
        hint = f" Closest: {', '.join(f'{c!r} ({pool[c]})' for c in close)}." if close else ""
        raise CamkitError(f"unknown class name {item!r}.{hint}")
    raise TypeError(f"a class target must be an int or a class name, got {type(item).__name__}")


@functools.cache
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, as shipped with torchvision (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@functools.cache
def _names(labels: tuple[str, ...]) -> list[set[str]]:
    """Accepted names per class: the label, plus WordNet synonyms for ImageNet ("tabby" = "tabby cat")."""
    names = [{lab.lower()} for lab in labels]
    if len(labels) == 1000 and list(labels) == imagenet_labels():
        try:
            from timm.data import ImageNetInfo  # optional: timm's WordNet descriptions

            for i, desc in enumerate(ImageNetInfo().label_descriptions()):
                names[i] |= {part.strip().lower() for part in desc.split(",") if part.strip()}
        except (
            ImportError,
            AttributeError,
            OSError,
            ValueError,
        ):  # pragma: no cover - timm without its metadata
            pass
    return names


def resolve_classes(spec: TargetSpec, output: Tensor, labels: Sequence[str] | None) -> Tensor | None:
    """Class indices to explain for a classifier output Tensor[B, C].

    Returns:
        LongTensor[B] (one target per image), LongTensor[B, k] for :class:`TopK`, or None for a callable spec.
    """
    if callable(spec) and not isinstance(spec, TopK):
        return None
    if output.dim() != 2:
        raise CamkitError(
            f"class targets need a model output of shape [B, num_classes], got {tuple(output.shape)}; "
            "pass a callable target f(output) -> Tensor[B] for other outputs"
        )
    batch, num_classes = output.shape
    if spec is None:
        return output.argmax(dim=1)
    if isinstance(spec, TopK):
        if spec.k > num_classes:
            raise CamkitError(f"TopK({spec.k}) asks for more classes than the model has ({num_classes})")
        return output.topk(spec.k, dim=1).indices
    if isinstance(spec, (int, str)):
        idx = class_index(spec, num_classes, labels)
        return torch.full((batch,), idx, dtype=torch.long, device=output.device)
    if isinstance(spec, Sequence):
        items = list(spec)
        if len(items) != batch:
            raise CamkitError(
                f"{len(items)} targets given for a batch of {batch} images; give one per image or a single one"
            )
        return torch.tensor(
            [class_index(i, num_classes, labels) for i in items], dtype=torch.long, device=output.device
        )
    raise TypeError(
        f"unsupported target {spec!r}: use None, an int, a class name, a list, TopK(k) or a callable"
    )


def score_fn(classes: Tensor | None, target: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor]:
    """The explained score ``S`` of a model output: the logits of ``classes``, or a callable target's value.

    Args:
        classes: LongTensor[B] (one class per image) or [B, T] (T per image), from :func:`resolve_classes`; None
            for a callable target.
        target: the callable target ``f(output) -> Tensor[B]`` (used when ``classes`` is None).

    Returns:
        ``f(output) -> Tensor[B]``, or Tensor[T, B] for classes [B, T].
    """
    if classes is not None:
        return functools.partial(_class_scores, classes)
    if target is None:
        raise CamkitError("a score needs classes or a callable target")
    return functools.partial(_target_scores, target)


def _class_scores(classes: Tensor, output: Tensor) -> Tensor:
    if classes.dim() == 1:
        return output.gather(1, classes[:, None])[:, 0]
    return output.gather(1, classes).T  # Tensor[T, B]


def _target_scores(target: Callable[[Tensor], Tensor], output: Tensor) -> Tensor:
    scores = target(output)
    batch = output.shape[0]
    if isinstance(scores, Tensor) and scores.dim() == 2 and scores.shape[0] == batch and scores.shape[1] >= 1:
        explicit = isinstance(target, (MultiLabelTarget, EachTarget))
        if not explicit and output.dim() == 2 and scores.shape == output.shape and scores.shape[1] > 1:
            raise CamkitError(
                f"the callable target returned a score for every one of the output's {scores.shape[1]} columns "
                "(Tensor[B, C]), which would explain each of them; return Tensor[B] (e.g. out[:, c]), or use "
                "TopK(k), MultiLabelTarget(classes, separate=True) or EachTarget([...]) for several targets"
            )
        return scores.T  # Tensor[T, B]: T targets per image
    if not isinstance(scores, Tensor) or scores.shape != (batch,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise CamkitError(
            f"a callable target must return Tensor[B] (one score per image) or Tensor[B, T] (T per image), "
            f"got {shape} for a batch of {batch}"
        )
    return scores


# ------------------------------------------------------------------------------------ targets of other tasks


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
            raise CamkitError(
                f"SegmentationTarget needs a Tensor[B, C, H, W] output, got {tuple(output.shape)}"
            )
        if not 0 <= self.category < output.shape[1]:
            raise CamkitError(f"class {self.category} out of range: the output has {output.shape[1]} classes")
        logits = output[:, self.category]
        if self.mask is None:
            return logits.sum(dim=(1, 2))
        mask = self.mask.to(device=logits.device, dtype=logits.dtype)
        if mask.shape[-2:] != logits.shape[-2:]:
            raise CamkitError(
                f"mask shape {tuple(self.mask.shape)} does not match the output's {tuple(logits.shape[-2:])}"
            )
        return (logits * mask).sum(dim=(-2, -1))


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
            raise CamkitError(
                "DetectionTarget needs a detection model's output (a list of dicts with boxes/scores/labels, "
                f"packed to Tensor[B, D, 6]); got shape {tuple(output.shape)}"
            )
        from torchvision.ops import (
            box_iou,
        )  # here: importing torchvision takes seconds, needed only for boxes

        ref = torch.as_tensor(self.box, dtype=output.dtype, device=output.device)
        refs = ref.expand(output.shape[0], 4) if ref.dim() == 1 else ref
        scores = []
        self.matched = []
        for i in range(output.shape[0]):
            det = output[i]
            valid = det[:, 5] >= 0
            if self.label is not None:
                valid = valid & (det[:, 5] == self.label)
            iou = box_iou(det[:, :4], refs[i][None])[:, 0]
            ok = valid & (iou.detach() >= self.iou_threshold)
            if not bool(ok.any()):
                best = float(iou.detach()[valid].max()) if bool(valid.any()) else 0.0
                raise CamkitError(
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
        separate: one map per class instead of their sum (scores Tensor[B, T], maps Tensor[B, T, H, W]).
    """

    classes: int | Sequence[int]
    probability: bool = False
    separate: bool = False

    def __call__(self, output: Tensor) -> Tensor:
        idx = [self.classes] if isinstance(self.classes, int) else list(self.classes)
        z = output[:, idx]
        if self.probability:
            z = torch.sigmoid(z)
        return z if self.separate else z.sum(dim=1)


@dataclass
class EachTarget:
    """Several callable targets explained at once, one map each: ``f(output) -> Tensor[B, T]``.

    ``EachTarget([DetectionTarget(box1), DetectionTarget(box2)])`` explains two boxes of a detection model with one
    forward and one batched backward; maps get a target axis, Tensor[B, T, H, W].
    """

    targets: Sequence[Callable[[Tensor], Tensor]]

    def __post_init__(self) -> None:
        if not self.targets or not all(callable(t) for t in self.targets):
            raise TypeError("EachTarget takes a non-empty list of callable targets f(output) -> Tensor[B]")

    def __call__(self, output: Tensor) -> Tensor:
        rows = []
        for i, target in enumerate(self.targets):
            s = target(output)
            if not isinstance(s, Tensor) or s.shape != (output.shape[0],):
                shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise CamkitError(f"EachTarget: target {i} must return Tensor[B], got {shape}")
            rows.append(s)
        return torch.stack(rows, dim=1)


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
