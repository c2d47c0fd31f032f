"""Attention explanations for ViT-style transformers (global self-attention over [prefix + h*w] tokens).

* Attention rollout (Abnar & Zuidema, ACL 2020): per block l, the heads' mean attention A_l [N, N] is mixed with
  the residual connection, Ã_l = (A_l + I) / 2 with rows renormalised, and R = Ã_L ... Ã_1. The map is R's
  prefix-token rows over the patch tokens (the class token; DeiT distilled: the mean of the class and
  distillation rows; no prefix token: the mean of all rows). Class-agnostic, no backward.
* Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability
  for Interpreting Bi-Modal and Encoder-Decoder Transformers", eqs. 5-6): Ā_l = mean_h ReLU(dS/dA_l * A_l),
  R = I, R <- R + Ā_l R for l = 1..L; map = R's prefix rows over the patch tokens. Class-specific, one backward.

How the attention probabilities are obtained (they are not a module output in either library):

* timm ``Attention`` (ViT, DeiT, BEiT-style blocks with ``qkv`` / ``attn_drop``): its fused kernel
  (``F.scaled_dot_product_attention``) never forms the probabilities, so ``fused_attn`` is switched off for the
  duration of the call (restored in ``finally``); the explicit path computes ``softmax(q k^T * scale)`` and passes
  it through ``attn_drop`` (identity in eval mode), whose forward hook reads it.
* ``torch.nn.MultiheadAttention`` (torchvision ViT calls it with ``need_weights=False``): a forward hook recomputes
  the block's output from its input with the module's own weights (in_proj, softmax(q k^T / sqrt(d)), out_proj)
  and returns that, so the probabilities it reads are the ones the rest of the network uses. Self-attention with
  ``batch_first=True`` and no mask only.

As in :mod:`camkit.capture`, the forward runs with grad mode off; the first attention's probabilities become a leaf
that requires grad, so the backward stops there and no parameter gradient is computed. Windowed attention (Swin)
does not attend over all tokens: these methods refuse it with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit.methods.registry import AttentionMethod, register
from camkit.tokens import infer_layout, prefix_tokens

__all__ = ["attention_probabilities", "grad_rollout", "rollout"]


def _timm_style(m: nn.Module) -> bool:
    return (
        hasattr(m, "fused_attn")
        and isinstance(getattr(m, "attn_drop", None), nn.Module)
        and hasattr(m, "qkv")
    )


class _Recorder:
    def __init__(self, need_grad: bool) -> None:
        self.need_grad = need_grad
        self.probs: list[Tensor] = []

    def record(self, probs: Tensor) -> Tensor:
        if self.need_grad:
            if not probs.requires_grad:
                # The earliest attention: a leaf, so the backward stops here (as in camkit.capture).
                probs = probs.detach().requires_grad_(True)
            torch.set_grad_enabled(True)
        self.probs.append(probs)
        return probs

    def drop_hook(self, _m: nn.Module, _i: object, out: Tensor) -> Tensor:
        return self.record(out)

    def mha_hook(
        self, m: nn.MultiheadAttention, args: tuple[object, ...], kwargs: dict[str, object], _out: object
    ):  # type: ignore[no-untyped-def]
        q_in = args[0] if args else kwargs.get("query")
        k_in = args[1] if len(args) > 1 else kwargs.get("key")
        v_in = args[2] if len(args) > 2 else kwargs.get("value")
        masked = any(kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask")) or len(args) > 4
        if not (q_in is k_in is v_in) or not m.batch_first or not m._qkv_same_embed_dim or masked:
            raise ValueError(
                "attention methods read nn.MultiheadAttention only as unmasked self-attention with batch_first=True"
            )
        x: Tensor = q_in  # type: ignore[assignment]
        b, n, e = x.shape
        h = m.num_heads
        d = e // h
        qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d), dim=-1)
        probs = self.record(probs)
        out = (probs @ v).transpose(1, 2).reshape(b, n, e)
        return m.out_proj(out), None


def attention_probabilities(
    model: nn.Module,
    x: Tensor,
    output_fn: Callable[[object], Tensor],
    score_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, list[Tensor], list[list[Tensor]]]:
    """One forward recording every self-attention's probabilities (and their gradients for ``score_fn``).

    Args:
        model: a transformer in eval mode (not modified: hooks removed and ``fused_attn`` restored in ``finally``).
        x: Tensor[B, 3, H, W].
        output_fn: model output -> Tensor.
        score_fn: output -> Tensor[B] or Tensor[T, B]; None: no gradient.

    Returns:
        (output, probabilities per block, shallow to deep, each Tensor[B, heads, N, N] detached,
        gradients: per target t, per block, dS_t/dA_l of the same shape; empty without ``score_fn``).
    """
    need_grad = score_fn is not None
    rec = _Recorder(need_grad)
    handles = []
    fused: list[tuple[nn.Module, object]] = []
    prev_grad = torch.is_grad_enabled()
    try:
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                handles.append(m.register_forward_hook(rec.mha_hook, with_kwargs=True))
            elif _timm_style(m):
                fused.append((m, m.fused_attn))
                m.fused_attn = False
                handles.append(m.attn_drop.register_forward_hook(rec.drop_hook))
        windowed = sorted(
            {type(m).__name__ for m in model.modules() if "WindowAttention" in type(m).__name__}
        )
        if windowed:
            raise ValueError(
                "attention rollout needs global self-attention over all tokens (ViT, DeiT); this model's windowed "
                f"attention ({windowed[0]}, Swin) is not supported: use a CAM method"
            )
        if not handles:
            raise ValueError(
                f"{type(model).__name__} has no self-attention camkit can read (timm Attention with qkv/attn_drop, "
                "or torch.nn.MultiheadAttention): attention rollout is for ViT-style transformers; use a CAM method"
            )
        with torch.inference_mode(False):
            torch.set_grad_enabled(False)
            out = output_fn(model(x))
            if not rec.probs:
                raise RuntimeError("no attention module ran during the forward pass")
            shapes = {tuple(p.shape) for p in rec.probs}
            n = rec.probs[0].shape[-1]
            if len(shapes) != 1 or rec.probs[0].shape[0] != x.shape[0] or rec.probs[0].shape[-2] != n:
                raise ValueError(
                    "attention rollout needs global self-attention over the same tokens in every block "
                    f"(ViT, DeiT); this model's attention maps have shapes {sorted(shapes)[:3]} for a batch of "
                    f"{x.shape[0]} (windowed attention such as Swin's is not supported): use a CAM method"
                )
            grads: list[list[Tensor]] = []
            if score_fn is not None:
                scores = score_fn(out)
                rows = scores[None] if scores.dim() == 1 else scores
                for t in range(rows.shape[0]):
                    g = torch.autograd.grad(
                        rows[t].sum(), rec.probs, retain_graph=t < rows.shape[0] - 1, allow_unused=True
                    )
                    grads.append(
                        [
                            torch.zeros_like(p) if gi is None else gi.detach()
                            for gi, p in zip(g, rec.probs, strict=True)
                        ]
                    )
            return out.detach(), [p.detach() for p in rec.probs], grads
    finally:
        for hnd in handles:
            hnd.remove()
        for m, value in fused:
            m.fused_attn = value
        torch.set_grad_enabled(prev_grad)


def _patch_map(model: nn.Module, r: Tensor, size: tuple[int, int]) -> Tensor:
    """Rows of the prefix tokens of R [B, N, N] over the patch tokens -> Tensor[B, h, w]."""
    b, n, _ = r.shape
    layout = infer_layout((b, n, 1), size, prefix=prefix_tokens(model))
    if layout is None:
        raise ValueError(f"cannot read {n} tokens as prefix + a grid for an input of {size[0]}x{size[1]}")
    p = layout.prefix
    rows = r[:, :p, p:].mean(dim=1) if p > 0 else r[:, :, :].mean(dim=1)
    return rows.reshape(b, *layout.grid)


def rollout(probs: list[Tensor]) -> Tensor:
    """Abnar & Zuidema's rollout of per-block attention Tensor[B, heads, N, N] -> R Tensor[B, N, N]."""
    eye = torch.eye(probs[0].shape[-1], dtype=torch.float64, device=probs[0].device)
    r = eye.expand(probs[0].shape[0], -1, -1)
    for a in probs:
        mixed = 0.5 * a.double().mean(dim=1) + 0.5 * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        r = mixed @ r
    return r


def grad_rollout(probs: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Chefer et al. 2021 relevancy R = prod_l (I + mean_h ReLU(dS/dA_l * A_l)), applied as R <- R + Ā_l R."""
    eye = torch.eye(probs[0].shape[-1], dtype=torch.float64, device=probs[0].device)
    r = eye.expand(probs[0].shape[0], -1, -1).clone()
    for a, g in zip(probs, grads, strict=True):
        bar = torch.relu(g.double() * a.double()).mean(dim=1)
        r = r + bar @ r
    return r


def _score_fn(classes: Tensor | None, targets: object) -> Callable[[Tensor], Tensor]:
    def score(out: Tensor) -> Tensor:
        if classes is None:
            assert callable(targets)
            return targets(out)  # type: ignore[no-any-return]
        if classes.dim() == 1:
            return out.gather(1, classes[:, None])[:, 0]
        return out.gather(1, classes).T

    return score


def _run_rollout(
    model: nn.Module,
    x: Tensor,
    output_fn: Callable[[object], Tensor],
    classes: Tensor | None,
    targets: object,
) -> Tensor:
    _, probs, _ = attention_probabilities(model, x, output_fn)
    m = _patch_map(model, rollout(probs), (x.shape[-2], x.shape[-1])).float()
    if classes is not None and classes.dim() == 2:  # TopK: the same class-agnostic map for every target
        m = m[:, None].expand(-1, classes.shape[1], -1, -1)
    return m


def _run_grad_rollout(
    model: nn.Module,
    x: Tensor,
    output_fn: Callable[[object], Tensor],
    classes: Tensor | None,
    targets: object,
) -> Tensor:
    _, probs, grads = attention_probabilities(model, x, output_fn, _score_fn(classes, targets))
    size = (x.shape[-2], x.shape[-1])
    maps = [_patch_map(model, grad_rollout(probs, g), size).float() for g in grads]
    return torch.stack(maps, dim=1) if classes is not None and classes.dim() == 2 else maps[0]


register(
    AttentionMethod(
        name="rollout",
        needs_grad=False,
        cost="1 extra forward (class-agnostic), no backward",
        paper="Abnar & Zuidema, ACL 2020",
        summary="R = prod_l (mean_h A_l + I)/2 over the blocks; map = class-token row of R over the patches",
        aliases=("attention-rollout", "attentionrollout"),
        run=_run_rollout,
    )
)
register(
    AttentionMethod(
        name="gradrollout",
        needs_grad=False,
        cost="1 extra forward + 1 backward through the blocks",
        paper="Chefer, Gur & Wolf, ICCV 2021 (generic attention explainability)",
        summary="R = prod_l (I + mean_h ReLU(dS/dA_l * A_l)); map = class-token row of R over the patches",
        aliases=("grad-rollout", "chefer", "chefer2021", "attention-grad"),
        run=_run_grad_rollout,
    )
)
