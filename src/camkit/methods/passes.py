"""Helpers shared by the methods that run their own passes (:class:`camkit.methods.registry.PassMethod`).

Every pass here leaves the user's model exactly as it was: hooks go through :func:`camkit.core.capture.hook_forward`
(acting in the calling thread only) and are removed in ``finally``; no module is replaced, no ``requires_grad``
flag and no ``.grad`` is touched (gradients come from :func:`torch.autograd.grad`, never ``backward``), the
model's mode is never switched, and grad mode is restored on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from camkit.core.capture import capture, hook_forward
from camkit.core.targets import score_fn
from camkit.core.tokens import FeatureMaps, to_spatial
from camkit.errors import CamkitError
from camkit.methods.registry import PassInput

__all__ = [
    "MAX_SCALED_PIXELS",
    "Hooks",
    "image_rows",
    "layer_features",
    "multi",
    "per_target",
    "scaled_size",
    "score_rows",
    "stack_targets",
    "target_count",
]

#: The most pixels of an input resized by a method's scale factor (``cameras``, ``multiscalecam``): PIL's
#: decompression-bomb limit, the default of ``--max-pixels``.
MAX_SCALED_PIXELS = 89_478_485


class Hooks:
    """Forward hooks on a user's modules, all removed when the ``with`` block ends (also on an exception), with
    grad mode on (outside inference mode) inside the block and the caller's grad mode restored after."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._grad = torch.is_grad_enabled()
        self._inference = torch.inference_mode(False)

    def add(self, module: nn.Module, fn: Callable[..., object], pre: bool = False) -> None:
        """A forward (``pre``: pre-) hook acting in this thread only."""
        self._handles.append(hook_forward(module, fn, pre=pre))

    def __enter__(self) -> Hooks:
        self._grad = torch.is_grad_enabled()
        self._inference.__enter__()
        torch.set_grad_enabled(True)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        finally:
            self._inference.__exit__(None, None, None)
            torch.set_grad_enabled(self._grad)


def target_count(inp: PassInput) -> int:
    """How many targets per image the call explains (k for classes [B, k], else 1)."""
    return 1 if inp.classes is None or inp.classes.dim() == 1 else int(inp.classes.shape[1])


def multi(inp: PassInput) -> bool:
    """Whether the call explains several targets per image (maps then get a target axis: [B, k, ...])."""
    return inp.classes is not None and inp.classes.dim() == 2


def score_rows(inp: PassInput, output: Tensor) -> Tensor:
    """The explained scores of ``output`` as Tensor[T, B] (T = targets per image)."""
    scores = score_fn(inp.classes, inp.target_fn)(output)
    return scores[None] if scores.dim() == 1 else scores


def image_rows(inp: PassInput, output: Tensor, image: int) -> Tensor:
    """The callable target's value for each row of ``output``, every row a copy of image ``image`` (masked,
    blurred, ...): a target chosen per image (a detection's, :class:`camkit.core.tasks.PerImageTargets`) scores
    each row for that image's choice."""
    assert inp.target_fn is not None
    rows = getattr(inp.target_fn, "score_rows", None)
    if rows is None:
        return inp.target_fn(output).float()
    which = torch.full((output.shape[0],), image, dtype=torch.long, device=output.device)
    scores: Tensor = rows(output, which)
    return scores.float()


def stack_targets(inp: PassInput, per_target: Sequence[Tensor]) -> Tensor:
    """Maps per target -> Tensor[B, ...] for one target, Tensor[B, k, ...] for classes [B, k]."""
    return torch.stack(list(per_target), dim=1) if multi(inp) else per_target[0]


def layer_features(inp: PassInput, x: Tensor, score: Callable[[Tensor], Tensor] | None = None) -> FeatureMaps:
    """One capture pass of ``x`` through the target layers (:func:`camkit.core.capture.capture`) read as feature maps
    [B, K, h, w]; ``score`` (default: the call's targets) gives the gradients."""
    fn = score if score is not None else score_fn(inp.classes, inp.target_fn)
    cap = capture(inp.model, x, inp.layers, fn, inp.output_fn)
    return to_spatial(
        cap.activations, cap.gradients, inp.model, inp.layers, (x.shape[-2], x.shape[-1]), inp.reshape
    )


def per_target(grads: Tensor | list[Tensor], n: int) -> list[Tensor]:
    """A captured gradient (one tensor, or one per target) as a list of n float tensors."""
    return [g.float() for g in grads] if isinstance(grads, list) else [grads.float()] * n


def scaled_size(method: str, size: tuple[int, int], factor: float) -> tuple[int, int]:
    """The (height, width) of an input of ``size`` resized by ``factor`` (at least 1 x 1).

    Raises:
        CamkitError: more than :data:`MAX_SCALED_PIXELS` pixels (an overflowing or infinite factor included).
    """
    h, w = size[0] * factor, size[1] * factor
    if not h * w <= MAX_SCALED_PIXELS:
        raise CamkitError(
            f"{method} resizes the input by the scale factor {factor:g} to {h:.0f}x{w:.0f}, more than "
            f"{MAX_SCALED_PIXELS} pixels; use smaller scales, e.g. scales=(1, 1.5, 2)"
        )
    return max(1, round(h)), max(1, round(w))
