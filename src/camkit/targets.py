"""What score to explain.

A target spec is one of:

* ``None``: the top-1 class of each image (the default);
* an ``int`` class index, or a class *name* (``"tabby cat"``, matched case-insensitively against the labels);
* a sequence with one index or name per image;
* :class:`TopK`: the k best classes of each image (maps get a target axis: Tensor[B, k, H, W]);
* a callable ``f(output) -> Tensor[B]`` on the whole model output (any score: a difference of logits, a mask
  sum for segmentation, an embedding similarity...).

The score of a class is its **logit** (the pre-softmax output), as in the Grad-CAM paper.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TargetSpec", "TopK", "resolve_classes"]


@dataclass(frozen=True)
class TopK:
    """Explain the ``k`` highest-scoring classes of each image."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"TopK needs k >= 1, got {self.k}")


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


def _class_index(item: int | str, num_classes: int, labels: Sequence[str] | None) -> int:
    if isinstance(item, bool):
        raise TypeError("a class target must be an int or a class name, not a bool")
    if isinstance(item, int):
        if not 0 <= item < num_classes:
            raise ValueError(
                f"class index {item} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return item
    if isinstance(item, str):
        if labels is None:
            raise ValueError(
                f"class name {item!r} given but no class labels are known for this model; pass labels=... or an index"
            )
        key = item.strip().lower()
        names = _names(tuple(labels))
        hits = sorted({i for i, alts in enumerate(names) if key in alts})
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"class name {item!r} is ambiguous: classes {hits}; give the index instead")
        pool = {alt: i for i, alts in enumerate(names) for alt in alts}
        close = difflib.get_close_matches(key, list(pool), n=5, cutoff=0.6)
        hint = f" Closest: {', '.join(f'{c!r} ({pool[c]})' for c in close)}." if close else ""
        raise ValueError(f"unknown class name {item!r}.{hint}")
    raise TypeError(f"a class target must be an int or a class name, got {type(item).__name__}")


@functools.cache
def _names(labels: tuple[str, ...]) -> list[set[str]]:
    """Accepted names per class: the label, plus WordNet synonyms for ImageNet ("tabby" = "tabby cat")."""
    names = [{lab.lower()} for lab in labels]
    if len(labels) == 1000:
        from camkit.io import imagenet_labels

        if list(labels) == imagenet_labels():
            try:
                from timm.data import ImageNetInfo

                for i, desc in enumerate(ImageNetInfo().label_descriptions()):
                    names[i] |= {part.strip().lower() for part in desc.split(",") if part.strip()}
            except Exception:  # pragma: no cover - timm without ImageNet metadata
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
        raise ValueError(
            f"class targets need a model output of shape [B, num_classes], got {tuple(output.shape)}; "
            "pass a callable target f(output) -> Tensor[B] for other outputs"
        )
    batch, num_classes = output.shape
    if spec is None:
        return output.argmax(dim=1)
    if isinstance(spec, TopK):
        if spec.k > num_classes:
            raise ValueError(f"TopK({spec.k}) asks for more classes than the model has ({num_classes})")
        return output.topk(spec.k, dim=1).indices
    if isinstance(spec, (int, str)):
        idx = _class_index(spec, num_classes, labels)
        return torch.full((batch,), idx, dtype=torch.long, device=output.device)
    if isinstance(spec, Sequence):
        items = list(spec)
        if len(items) != batch:
            raise ValueError(
                f"{len(items)} targets given for a batch of {batch} images; give one per image or a single one"
            )
        return torch.tensor(
            [_class_index(i, num_classes, labels) for i in items], dtype=torch.long, device=output.device
        )
    raise TypeError(
        f"unsupported target {spec!r}: use None, an int, a class name, a list, TopK(k) or a callable"
    )


def make_score_fn(
    spec: TargetSpec, labels: Sequence[str] | None, store: dict[str, Tensor | None]
) -> Callable[[Tensor], Tensor]:
    """The score function for :func:`camkit.capture.capture`; it records the resolved classes in ``store``."""

    def score_fn(output: Tensor) -> Tensor:
        classes = resolve_classes(spec, output, labels)
        store["classes"] = classes
        if classes is None:
            assert callable(spec)
            scores = spec(output)
            if not isinstance(scores, Tensor) or scores.shape != (output.shape[0],):
                shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(
                    f"a callable target must return Tensor[B] (one score per image), got {shape}"
                )
            return scores
        if classes.dim() == 1:
            return output.gather(1, classes[:, None])[:, 0]
        return output.gather(1, classes).T  # Tensor[k, B]

    return score_fn
