"""Guided Backpropagation (Springenberg et al., ICLR 2015 workshop) and Guided Grad-CAM (Selvaraju et al. 2017).

Guided backprop is dS/dx with a changed ReLU backward rule: a ReLU passes back only positive gradients where its
input was positive, ``grad_in = ReLU(grad_out) * [x > 0]``. camkit applies the rule with an
:class:`torch.overrides.TorchFunctionMode`, pushed in the caller's thread for the forward only, that computes
every ReLU call through an autograd Function with that backward. No module is replaced (pytorch-grad-cam swaps
the model's ``nn.ReLU`` modules), so the model comes back exactly as it was, also on an exception.

Covered: ``nn.ReLU`` modules (also ``inplace=True``), ``F.relu`` / ``F.relu_``, ``torch.relu`` / ``torch.relu_``,
``Tensor.relu`` / ``Tensor.relu_``, and the clipped ReLUs ``nn.ReLU6`` / ``F.relu6`` / ``F.hardtanh`` with
``min_val=0`` (EfficientNet-Lite, MobileNetV2), whose rule passes positive gradients where 0 < x < max. Not
covered: other activations (SiLU, GELU, LeakyReLU, Hardswish) keep their ordinary gradient; and ReLUs computed inside fused C++ kernels that never reach Python
(``torch.ops.aten.*`` calls, TorchScript models).

Every image of the batch gets its own gradient (scores of different images are independent in eval mode, so one
backward of their sum gives each image's gradient). The 3-channel gradients are returned by
:func:`guided_gradients`; the registered method's map is ``max_c |g_c|`` per pixel (Simonyan et al.'s saliency
convention). Guided Grad-CAM is the paper's product of guided backprop with the upsampled, min-maxed Grad-CAM of
the target layers (several layers: their maps fused by element-wise max first): :func:`guided_gradcam` gives
the 3-channel product, the registered method ``max_c |g_c| * cam``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from camkit.core.postprocess import fuse, normalize, upsample
from camkit.errors import CamkitError
from camkit.methods.passes import Hooks, per_target, score_rows, stack_targets, target_count
from camkit.methods.registry import PassInput, PassMethod, register

__all__ = ["GuidedReLU", "guided_gradcam", "guided_gradients"]


class _GuidedClamp(torch.autograd.Function):
    """``clamp(x, 0, hi)`` (ReLU: hi = None; ReLU6: hi = 6) whose backward passes only positive gradients where
    the input was inside (0, hi)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, hi: float | None, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_(min=0, max=hi)
        else:
            out = x.clamp(min=0, max=hi)
        ctx.hi = hi
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (out,) = ctx.saved_tensors
        inside = out > 0
        if ctx.hi is not None:
            inside = inside & (out < ctx.hi)
        return grad.clamp(min=0) * inside.to(grad.dtype), None, None


_RELU = {F.relu, torch.relu, Tensor.relu}
_RELU_ = {torch.relu_, Tensor.relu_}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class GuidedReLU(TorchFunctionMode):
    """While active (``with GuidedReLU(): ...``, this thread only), every ReLU / ReLU6 call listed in the module
    docstring runs with guided backprop's backward rule."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        x = _arg(args, kwargs, 0, "input", None)
        if isinstance(x, Tensor) and x.requires_grad:
            if func in _RELU or func in _RELU_:
                inplace = func in _RELU_ or bool(_arg(args, kwargs, 1, "inplace", False))
                return _GuidedClamp.apply(x, None, inplace)
            if func is F.relu6:
                return _GuidedClamp.apply(x, 6.0, bool(_arg(args, kwargs, 1, "inplace", False)))
            if func is F.hardtanh and float(_arg(args, kwargs, 1, "min_val", -1.0)) == 0.0:
                hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
                return _GuidedClamp.apply(x, hi, bool(_arg(args, kwargs, 3, "inplace", False)))
        return func(*args, **kwargs)


def guided_gradients(inp: PassInput) -> list[Tensor]:
    """Guided backprop: per target, dS/dx with the guided ReLU rule, Tensor[B, C, H, W] for every image.

    Args:
        inp: the model, its input and the targets (:class:`PassInput`).
    """
    x = inp.x.detach().clone().requires_grad_(True)
    with Hooks():
        with GuidedReLU():
            out = inp.output_fn(inp.model(x))
        rows = score_rows(inp, out)
        grads = []
        for t in range(rows.shape[0]):
            (g,) = torch.autograd.grad(
                rows[t].sum(), [x], retain_graph=t < rows.shape[0] - 1, allow_unused=True
            )
            grads.append(torch.zeros_like(x) if g is None else g.detach())
    return grads


def _cams(inp: PassInput) -> list[Tensor]:
    """Per target, the min-maxed Grad-CAM of the shared capture at input size, layers fused by max: [B, H, W]."""
    if not inp.gradients:
        raise CamkitError("Guided Grad-CAM needs the shared capture's gradients (needs_grad=True)")
    size = (inp.x.shape[-2], inp.x.shape[-1])
    n = target_count(inp)
    out = []
    for t in range(n):
        maps = []
        for name, a in inp.activations.items():
            g = per_target(inp.gradients[name], n)[t]
            cam = torch.einsum("bk,bkhw->bhw", g.mean(dim=(2, 3)), a.float())
            maps.append(normalize(upsample(torch.relu(cam), size)))
        out.append(fuse(maps, mode="max"))
    return out


def guided_gradcam(inp: PassInput) -> list[Tensor]:
    """Guided Grad-CAM per target: guided backprop x the upsampled Grad-CAM, Tensor[B, C, H, W] (every image)."""
    return [g * cam[:, None] for g, cam in zip(guided_gradients(inp), _cams(inp), strict=True)]


def _run_guided(inp: PassInput) -> dict[str, Tensor]:
    return {"guided-backprop": stack_targets(inp, [g.abs().amax(dim=1) for g in guided_gradients(inp)])}


def _run_guided_gradcam(inp: PassInput) -> dict[str, Tensor]:
    maps = [g.abs().amax(dim=1) * cam for g, cam in zip(guided_gradients(inp), _cams(inp), strict=True)]
    return {"guided-gradcam": stack_targets(inp, maps)}


register(
    PassMethod(
        name="guided-backprop",
        run=_run_guided,
        cost="1 forward + 1 backward to the input (its own pass; target layers are not used)",
        paper="Springenberg et al., ICLR 2015 workshop",
        summary="max_c |dS/dx_c| with ReLU backward = ReLU(grad) * [input > 0]",
        prefer="pixel-level edges of what raises the score (class-insensitive: combine with a CAM)",
        aliases=("guidedbackprop", "guided-bp", "guided"),
    )
)
register(
    PassMethod(
        name="guided-gradcam",
        run=_run_guided_gradcam,
        needs_grad=True,
        cost="shared forward + backward, and 1 forward + 1 backward to the input",
        paper="Selvaraju et al., ICCV 2017",
        summary="guided backprop (max_c |g_c|) x upsampled min-maxed Grad-CAM",
        prefer="high-resolution and class-discriminative at once: fine detail inside the Grad-CAM region",
        aliases=("guidedgradcam", "guided-grad-cam"),
    )
)
