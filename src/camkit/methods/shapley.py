"""ShapleyCAM (Cai et al., ICLR 2025, "CAMs as Shapley value-based explainers").

The channel weight is the second-order Taylor estimate of each channel's Shapley value: with g = dS/dA and the
Hessian-vector product ``H A = d(g . A)/dA`` (a double backward),

    w_k = mean_ij (g - 0.5 * H A)_k[ij],   map = sum_k w_k A_k

(pytorch-grad-cam's ShapleyCAM, the same formula). The paper pairs it with the ReST target, the logit minus the
cross-entropy ``y_c + log softmax(y)_c``; camkit explains whatever target the call gives (a logit by default;
``targets=rest_target(classes)`` for ReST).

How: one capture forward (:class:`camkit.core.capture.LayerCapture`: the target layers' outputs become leaves, so
nothing before them is recorded), ``torch.autograd.grad(..., create_graph=True)`` for g, then a second
``torch.autograd.grad(g, A, grad_outputs=A)`` for H A. The first backward keeps its graph for the second: the
memory cost is that graph on top of Grad-CAM's (README: "Methods from the peers (1)" has the measurement).
PyTorch's fused attention kernels have no double backward: during this forward (in the caller's thread only, by
a torch function mode) ``F.scaled_dot_product_attention`` is computed explicitly, softmax(q k^T * scale + mask) v,
which has one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from camkit.core.capture import LayerCapture
from camkit.core.tokens import to_spatial
from camkit.errors import CamkitError, CamkitRuntimeError
from camkit.methods.passes import score_rows, stack_targets
from camkit.methods.registry import PassInput, PassMethod, register

__all__ = ["rest_target", "shapley_gradients"]


def rest_target(classes: int | Sequence[int] | Tensor) -> Callable[[Tensor], Tensor]:
    """The paper's ReST target (residual softmax target-class): ``f(output) = y_c + log softmax(y)_c`` per image,
    for ``explain(..., targets=rest_target(c))`` (one class for every image, or one per image).

    Raises:
        TypeError: classes that are not integers.
    """
    c = torch.as_tensor(classes)
    if c.is_floating_point() or c.dtype == torch.bool or c.dim() > 1:
        raise TypeError(f"rest_target takes a class index or one per image (integers), got {classes!r}")

    def target(output: Tensor) -> Tensor:
        idx = c.to(output.device).expand(output.shape[0])[:, None]
        return output.gather(1, idx)[:, 0] + torch.log_softmax(output, dim=1).gather(1, idx)[:, 0]

    return target


class _ExplicitAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` computed with ordinary ops (twice differentiable) while active."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        return func(*args, **kwargs)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    if dropout_p:
        raise CamkitError("ShapleyCAM needs attention without dropout: call model.eval() first")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    logits = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = (
            logits.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else logits + attn_mask
        )
    return torch.softmax(logits, dim=-1) @ v


def shapley_gradients(inp: PassInput) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
    """The target layers' activations and, per target, ``g - 0.5 * H A`` in the layers' own layout.

    Returns:
        (layer name -> activation, layer name -> per target ``dS/dA - 0.5 * H A`` of the same shape).
    """
    with LayerCapture(inp.layers, need_grad=True) as window:
        with _ExplicitAttention():
            out = window.forward(inp.model, inp.x, inp.output_fn)
        rows = score_rows(inp, out)
        if not rows.requires_grad:
            raise CamkitRuntimeError(
                f"the explained score does not depend on the target layer(s) {list(inp.layers)}: pick a layer "
                "on the path to the output"
            )
        names = list(inp.layers)
        leaves = [window.leaves[n][-1] for n in names]
        combined: dict[str, list[Tensor]] = {n: [] for n in names}
        for t in range(rows.shape[0]):
            grads = torch.autograd.grad(rows[t].sum(), leaves, create_graph=True, allow_unused=True)
            pairs = [(g, a) for g, a in zip(grads, leaves, strict=True) if g is not None and g.requires_grad]
            hvps = (
                torch.autograd.grad(
                    [g for g, _ in pairs],
                    [a for _, a in pairs],
                    grad_outputs=[a.detach() for _, a in pairs],
                    retain_graph=t < rows.shape[0] - 1,
                    allow_unused=True,
                )
                if pairs
                else ()
            )
            hvp_of = {id(a): h for (_, a), h in zip(pairs, hvps, strict=True)}
            for n, g, a in zip(names, grads, leaves, strict=True):
                g = torch.zeros_like(a) if g is None else g.detach()
                h = hvp_of.get(id(a))
                combined[n].append(g if h is None else g - 0.5 * h.detach())
        return {n: a.detach() for n, a in zip(names, leaves, strict=True)}, combined


def _run(inp: PassInput) -> dict[str, Tensor]:
    acts, combined = shapley_gradients(inp)
    grads: dict[str, Tensor | list[Tensor]] = {n: list(v) for n, v in combined.items()}
    feats = to_spatial(acts, grads, inp.model, inp.layers, (inp.x.shape[-2], inp.x.shape[-1]), inp.reshape)
    out = {}
    for name, a in feats.activations.items():
        per = feats.gradients[name]
        assert isinstance(per, list)
        maps = [torch.einsum("bk,bkhw->bhw", w.float().mean(dim=(2, 3)), a.float()) for w in per]
        out[name] = stack_targets(inp, maps)
    return out


register(
    PassMethod(
        name="shapleycam",
        run=_run,
        cost="1 forward + a double backward to the layer (its own pass; keeps the first backward's graph)",
        paper="Cai et al., ICLR 2025",
        summary="weight = mean (g - 0.5 * H A), H A by double backward (second-order Shapley estimate)",
        prefer="Grad-CAM corrected by curvature: channels whose gradient changes along A, at ~2 backwards",
        aliases=("shapley-cam", "shapley"),
    )
)
