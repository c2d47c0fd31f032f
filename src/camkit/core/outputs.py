"""What a model gives back: reading the scores out of its output, and where the model lives.

Models return a tensor, a dict (``{"out": ...}`` for torchvision segmentation), an object with ``.logits``
(Hugging Face), a tuple, or a list of detection dicts (torchvision detection). :func:`output_fn` turns any of
these into the Tensor that is explained; the pipeline, the metrics and the task helpers all read outputs here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeGuard

import torch
from torch import Tensor, nn

__all__ = [
    "OutputSpec",
    "is_detection_output",
    "logits_of",
    "model_device",
    "output_fn",
    "pack_detections",
]

OutputSpec = int | str | Callable[[object], Tensor] | None
"""Which part of a model output holds the scores: an index, a key, an attribute name, a function, or None."""

_ASK = "pass output=<index, key or function> to say which element holds the scores to explain"


def is_detection_output(out: object) -> TypeGuard[Sequence[dict[str, Tensor]]]:
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


def logits_of(out: object) -> Tensor:
    """The scores of a model output read the default way.

    A tensor as is, then ``["logits"]``, ``["out"]``, ``.logits``, the first item of a tuple or list, or a detection
    model's list of dicts packed by :func:`pack_detections`.

    Raises:
        TypeError: none of these applies; the message says to pass ``output=``.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "out"):
            if key in out:
                return _tensor(out[key], repr(key))
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if is_detection_output(out):
        return pack_detections(out)
    raise TypeError(f"the model returned {type(out).__name__}; {_ASK}")


def output_fn(spec: OutputSpec) -> Callable[[object], Tensor]:
    """The function that reads the explained Tensor out of a model output.

    Args:
        spec: None (:func:`logits_of`), an index (``out[i]``), a key (``out[key]`` of a dict, else the attribute
            ``out.key``), or a function ``f(out) -> Tensor``.
    """
    if spec is None:
        return logits_of
    if callable(spec):
        return spec
    return lambda out: _select(out, spec)


def _select(out: object, spec: int | str) -> Tensor:
    if isinstance(out, Mapping):
        return _tensor(out[spec], repr(spec))
    if isinstance(spec, str):
        return _tensor(getattr(out, spec), f".{spec}")
    if isinstance(out, (Sequence, Tensor)):
        return _tensor(out[spec], f"[{spec}]")
    raise TypeError(f"the model returned {type(out).__name__}, which cannot be indexed with {spec!r}; {_ASK}")


def _tensor(value: object, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"the model output's {where} is {type(value).__name__}, not a tensor; {_ASK}")
    return value


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
