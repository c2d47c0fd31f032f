"""Attention explanations for ViT-style transformers (global self-attention over [prefix + h*w] tokens).

* Attention rollout (Abnar & Zuidema, ACL 2020): per block l, the heads' mean attention A_l [N, N] is mixed with
  the residual connection, Ã_l = (A_l + I) / 2 with rows renormalised, and R = Ã_L ... Ã_1. The map is R's
  prefix-token rows over the patch tokens (the class token; DeiT distilled: the mean of the class and
  distillation rows; no prefix token: the mean of all rows). Class-agnostic, no backward.
* Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability
  for Interpreting Bi-Modal and Encoder-Decoder Transformers", eqs. 5-6): Ā_l = mean_h ReLU(dS/dA_l * A_l),
  R = I, R <- R + Ā_l R for l = 1..L; map = R's prefix rows over the patch tokens. Class-specific, one backward.
* LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, 2024, "LeGrad: An Explainability Method for Vision
  Transformers via Feature Formation Sensitivity"): for every block l, the block's own class score
  s^l = head(norm(mean_tokens(z^l)))_c (the model's final norm and classifier applied to the mean of the block's
  output tokens, as the authors' code and torchcam do), its gradient with respect to that block's attention
  probabilities, E^l = mean over heads and queries of ReLU(ds^l/dA^l), the prefix keys dropped; the map is the
  mean of E^l over all blocks. Attention values are not multiplied in. One forward and one (partial) backward per
  block. timm ViT / DeiT (``head(fc_norm(norm(.)))``; DeiT distilled: the mean of ``head`` and ``head_dist``, as
  its eval-mode output) and torchvision ViT (``heads(encoder.ln(.))``).

How the attention probabilities are obtained (they are not a module output in either library):

* timm ``Attention`` (ViT, DeiT, BEiT-style blocks with ``qkv`` / ``attn_drop``): its fused kernel
  (``F.scaled_dot_product_attention``) never forms the probabilities. Nothing of the module is changed (its
  ``fused_attn`` flag is shared by every thread): a forward pre-hook acting in the caller's thread only pushes a
  torch function mode (per-thread in PyTorch) for the duration of the block's forward, which computes that call the
  way timm's explicit path does, ``softmax((q * scale) k^T + mask) v``, and records the probabilities on the way;
  a forward hook pops it again. A block whose ``fused_attn`` is already off passes its probabilities through
  ``attn_drop`` (identity in eval mode), whose forward hook (this thread only) reads them.
* ``torch.nn.MultiheadAttention`` (torchvision ViT calls it with ``need_weights=False``): a forward hook recomputes
  the block's output from its input with the module's own weights (in_proj, softmax(q k^T / sqrt(d)), out_proj)
  and returns that, so the probabilities it reads are the ones the rest of the network uses. Self-attention with
  ``batch_first=True`` and no mask only.

With :mod:`camkit.core.capture`'s window, the forward runs with grad mode off; the first attention's probabilities become a leaf
that requires grad, so the backward stops there and no parameter gradient is computed. Windowed attention (Swin)
does not attend over all tokens: these methods refuse it with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camkit.core.capture import Window, target_gradients
from camkit.core.targets import score_fn
from camkit.core.tokens import infer_layout, prefix_tokens, suffix_tokens
from camkit.errors import CamkitError
from camkit.methods.registry import AttentionInput, AttentionMethod, register

__all__ = ["attention_probabilities", "grad_rollout", "legrad", "rollout"]


def _timm_style(m: nn.Module) -> bool:
    return (
        hasattr(m, "fused_attn")
        and isinstance(getattr(m, "attn_drop", None), nn.Module)
        and hasattr(m, "qkv")
    )


class _ExplicitAttention(TorchFunctionMode):
    """While pushed (inside one timm attention block's forward, in the explaining thread only: torch function
    modes are per-thread), ``F.scaled_dot_product_attention`` is computed as timm's explicit path does, and its
    probabilities are recorded; every other function runs as is."""

    def __init__(self, keep: Callable[[Tensor], Tensor], softmax: bool = False) -> None:
        super().__init__()
        self.keep = keep
        self.softmax = softmax  # transformers' eager path: the probabilities are the block's one softmax
        self.pushed = False

    def enter_block(self, *_: object) -> None:
        if not self.pushed:
            self.__enter__()
            self.pushed = True

    def leave_block(self, *_: object) -> None:
        if self.pushed:
            self.pushed = False
            self.__exit__(None, None, None)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._explicit(*args, **kwargs)
        if self.softmax and func in (F.softmax, torch.softmax, Tensor.softmax):
            return self.keep(func(*args, **kwargs))
        return func(*args, **kwargs)

    def _explicit(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if dropout_p or is_causal or enable_gqa or q.shape[-3] != k.shape[-3]:
            raise CamkitError(
                "attention methods read timm and transformers attention only without dropout, causal masking or "
                "grouped queries"
            )
        # the very operations of timm's explicit path (q * scale, then q k^T), so the result is the same bit for bit
        q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
        attn = q @ k.transpose(-2, -1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            else:
                attn = attn + attn_mask
        attn = self.keep(attn.softmax(dim=-1))
        return attn @ v


def _hf_attention_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The attention module classes that transformers models inside ``model`` declare (``_can_record_outputs``'s
    ``"attentions"`` when it names a module class: ViT, DeiT, DINOv2, BEiT...)."""
    found: list[type[nn.Module]] = []
    for m in model.modules():
        recorded = getattr(type(m), "_can_record_outputs", None)
        cls = recorded.get("attentions") if isinstance(recorded, dict) else None
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in found:
            found.append(cls)
    return tuple(found)


def _windowed(model: nn.Module) -> str | None:
    """The name of a windowed attention in ``model`` (timm Swin's WindowAttention, a transformers model whose
    config has a ``window_size``: Swin, Swinv2), or None."""
    for m in model.modules():
        if "WindowAttention" in type(m).__name__:
            return type(m).__name__
        config = getattr(m, "config", None)
        if hasattr(m, "base_model") and isinstance(getattr(config, "window_size", None), (int, list, tuple)):
            return type(m).__name__
    return None


class _AttentionWindow(Window):
    """A capture :class:`Window` whose hooks record every self-attention's probabilities, in call order."""

    def __init__(self, need_grad: bool) -> None:
        # The probabilities go straight into a matmul (never modified in place): no copy is needed.
        super().__init__(need_grad, copy=False)
        self.probs: list[Tensor] = []

    def keep(self, probs: Tensor) -> Tensor:
        kept, onward = self.record(probs)
        self.probs.append(kept)
        return onward

    def drop_hook(self, _m: nn.Module, _i: object, out: Tensor) -> Tensor:
        return self.keep(out)

    def mha_hook(
        self, m: nn.MultiheadAttention, args: tuple[object, ...], kwargs: dict[str, object], _out: object
    ) -> tuple[Tensor, None]:
        q_in = args[0] if args else kwargs.get("query")
        k_in = args[1] if len(args) > 1 else kwargs.get("key")
        v_in = args[2] if len(args) > 2 else kwargs.get("value")
        masked = any(kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask")) or len(args) > 4
        if (
            not isinstance(q_in, Tensor)
            or not (q_in is k_in is v_in)
            or not m.batch_first
            or not m._qkv_same_embed_dim
            or masked
        ):
            raise CamkitError(
                "attention methods read nn.MultiheadAttention only as unmasked self-attention with batch_first=True"
            )
        b, n, e = q_in.shape
        h = m.num_heads
        d = e // h
        qkv = F.linear(q_in, m.in_proj_weight, m.in_proj_bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = self.keep(torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d), dim=-1))
        out = (probs @ v).transpose(1, 2).reshape(b, n, e)
        return m.out_proj(out), None

    def _push_around(self, m: nn.Module, mode: _ExplicitAttention) -> None:
        """The mode pushed for the duration of ``m``'s forward, in this thread only."""
        self.hook(m, mode.enter_block, pre=True)
        self.hook(m, mode.leave_block, always_call=True)
        self.on_exit(mode.leave_block)  # a forward that raised before the block's hooks ran to the end

    def install(self, model: nn.Module) -> None:
        hf_attention = _hf_attention_classes(model)
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                self.hook(m, self.mha_hook, with_kwargs=True)
            elif hf_attention and isinstance(m, hf_attention):
                # transformers: sdpa is computed explicitly by the mode, eager's softmax is read by it; the
                # model's attn_implementation is not touched.
                self._push_around(m, _ExplicitAttention(self.keep, softmax=True))
            elif _timm_style(m):
                # Fused blocks: the mode computes the probabilities; unfused ones pass them through attn_drop.
                # Neither touches the module's attributes, and both hooks act in this thread only.
                self._push_around(m, _ExplicitAttention(self.keep))
                drop = m.attn_drop
                assert isinstance(drop, nn.Module)
                self.hook(drop, self.drop_hook)


def attention_probabilities(
    model: nn.Module,
    x: Tensor,
    output_fn: Callable[[object], Tensor],
    score_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, list[Tensor], list[list[Tensor]]]:
    """One forward recording every self-attention's probabilities (and their gradients for ``score_fn``).

    Args:
        model: a transformer in eval mode (not modified: only per-thread hooks, removed on exit).
        x: Tensor[B, 3, H, W].
        output_fn: model output -> Tensor.
        score_fn: output -> Tensor[B] or Tensor[T, B]; None: no gradient.

    Returns:
        (output, probabilities per block, shallow to deep, each Tensor[B, heads, N, N] detached,
        gradients: per target t, per block, dS_t/dA_l of the same shape; empty without ``score_fn``).
    """
    with _AttentionWindow(need_grad=score_fn is not None) as window:
        window.install(model)
        windowed = _windowed(model)
        if windowed:
            raise CamkitError(
                "attention rollout needs global self-attention over all tokens (ViT, DeiT); this model's windowed "
                f"attention ({windowed}, Swin) is not supported: use a CAM method"
            )
        if not window.hooked:
            raise CamkitError(
                f"{type(model).__name__} has no self-attention camkit can read (timm Attention with qkv/attn_drop, "
                "torch.nn.MultiheadAttention, or a transformers ViT-family attention): attention rollout is for "
                "ViT-style transformers; use a CAM method"
            )
        out = output_fn(model(x))
        probs = window.probs
        if not probs:
            raise RuntimeError("no attention module ran during the forward pass")
        shapes = {tuple(p.shape) for p in probs}
        n = probs[0].shape[-1]
        if len(shapes) != 1 or probs[0].shape[0] != x.shape[0] or probs[0].shape[-2] != n:
            raise CamkitError(
                "attention rollout needs global self-attention over the same tokens in every block "
                f"(ViT, DeiT); this model's attention maps have shapes {sorted(shapes)[:3]} for a batch of "
                f"{x.shape[0]} (windowed attention such as Swin's is not supported): use a CAM method"
            )
        grads: list[list[Tensor]] = []
        if score_fn is not None:
            grads = [[g.detach() for g in per_block] for per_block in target_gradients(score_fn(out), probs)]
        return out.detach(), [p.detach() for p in probs], grads


def _patch_map(model: nn.Module, r: Tensor, size: tuple[int, int]) -> Tensor:
    """Rows of the prefix tokens of R [B, N, N] over the patch tokens -> Tensor[B, h, w]."""
    b, n, _ = r.shape
    layout = infer_layout((b, n, 1), size, prefix=prefix_tokens(model), suffix=suffix_tokens(model))
    if layout is None:
        raise CamkitError(f"cannot read {n} tokens as prefix + a grid for an input of {size[0]}x{size[1]}")
    p, end = layout.prefix, n - layout.suffix
    rows = r[:, :p, p:end].mean(dim=1) if p > 0 else r[:, :, :end].mean(dim=1)
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


def _run_rollout(inp: AttentionInput) -> Tensor:
    _, probs, _ = attention_probabilities(inp.model, inp.x, inp.output_fn)
    m = _patch_map(inp.model, rollout(probs), (inp.x.shape[-2], inp.x.shape[-1])).float()
    if (
        inp.classes is not None and inp.classes.dim() == 2
    ):  # TopK: the same class-agnostic map for every target
        m = m[:, None].expand(-1, inp.classes.shape[1], -1, -1)
    return m


def _run_grad_rollout(inp: AttentionInput) -> Tensor:
    score = score_fn(inp.classes, inp.target_fn)
    _, probs, grads = attention_probabilities(inp.model, inp.x, inp.output_fn, score)
    size = (inp.x.shape[-2], inp.x.shape[-1])
    maps = [_patch_map(inp.model, grad_rollout(probs, g), size).float() for g in grads]
    return torch.stack(maps, dim=1) if inp.classes is not None and inp.classes.dim() == 2 else maps[0]


def _hf_blocks_and_projection(
    model: nn.Module,
) -> tuple[list[nn.Module], Callable[[Tensor], Tensor]] | None:
    """A transformers ViT / DeiT / DINOv2-style classifier (also inside camkit's ``HFClassifier`` view, as
    ``model``): its blocks (``layers`` or ``encoder.layer``) and ``classifier(layernorm(.))`` (DeiT with teacher: the
    mean of ``cls_classifier`` and ``distillation_classifier``, its eval-mode output). None for anything else."""
    inner = getattr(model, "model", None)
    hf = inner if isinstance(inner, nn.Module) and hasattr(inner, "base_model") else model
    base = getattr(hf, "base_model", None)
    if not isinstance(base, nn.Module) or base is hf:
        return None
    blocks = getattr(base, "layers", None) or getattr(getattr(base, "encoder", None), "layer", None)
    norm = getattr(base, "layernorm", None)
    heads = [getattr(hf, n, None) for n in ("classifier", "cls_classifier", "distillation_classifier")]
    linear = [h for h in heads if isinstance(h, nn.Linear)]
    width = getattr(getattr(hf, "config", None), "hidden_size", None)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(norm, nn.Module) or not linear:
        return None
    if any(h.in_features != width for h in linear):
        return None  # DINOv2's head reads [class token, mean of patches]: not a projection of one token
    hf_norm = norm
    return list(blocks), lambda z: torch.stack([h(hf_norm(z.mean(dim=1))) for h in linear]).mean(dim=0)


def _blocks_and_projection(model: nn.Module) -> tuple[list[nn.Module], Callable[[Tensor], Tensor]]:
    """The transformer blocks (shallow to deep) and LeGrad's score projection z [B, N, D] -> logits [B, C]."""
    hf = _hf_blocks_and_projection(model)
    if hf is not None:
        return hf
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    ln = getattr(encoder, "ln", None)
    heads = getattr(model, "heads", None)
    if (
        isinstance(layers, nn.Module) and isinstance(ln, nn.Module) and isinstance(heads, nn.Module)
    ):  # torchvision
        tv_ln, tv_heads = ln, heads
        return list(layers.children()), lambda z: tv_heads(tv_ln(z.mean(dim=1)))
    blocks = getattr(model, "blocks", None)
    norm = getattr(model, "norm", None)
    head = getattr(model, "head", None)
    if isinstance(blocks, nn.Module) and isinstance(norm, nn.Module) and isinstance(head, nn.Module):  # timm
        fc_norm = getattr(model, "fc_norm", None)
        timm_norm, timm_head = norm, head
        post = fc_norm if isinstance(fc_norm, nn.Module) else nn.Identity()
        dist = getattr(model, "head_dist", None)
        if isinstance(dist, nn.Module):  # DeiT distilled: in eval mode its output is the mean of both heads
            dist_head = dist
            return (
                list(blocks.children()),
                lambda z: (
                    (timm_head(post(timm_norm(z.mean(dim=1)))) + dist_head(post(timm_norm(z.mean(dim=1)))))
                    / 2
                ),
            )
        return list(blocks.children()), lambda z: timm_head(post(timm_norm(z.mean(dim=1))))
    raise CamkitError(
        f"LeGrad needs a ViT whose blocks and classifier camkit can find: timm (blocks, norm, head), torchvision "
        "(encoder.layers, encoder.ln, heads) or a transformers ViT/DeiT (layers, layernorm, classifier); "
        f"{type(model).__name__} is none of them: use gradrollout or a CAM method"
    )


def legrad(inp: AttentionInput) -> Tensor:
    """LeGrad's map (see the module docstring): Tensor[B, h, w], or [B, k, h, w] for classes [B, k]."""
    model = inp.model
    blocks, project = _blocks_and_projection(model)
    if inp.classes is None:
        raise CamkitError("LeGrad explains a class through each block's own class score: give class targets")
    size = (inp.x.shape[-2], inp.x.shape[-1])
    with _AttentionWindow(need_grad=True) as window:
        window.install(model)
        if _windowed(model):
            raise CamkitError(
                "LeGrad needs global self-attention (ViT, DeiT); Swin's windowed attention is not"
            )
        outputs: list[Tensor] = []
        for block in blocks:
            window.hook(block, lambda _m, _i, out: outputs.append(out))
        inp.output_fn(model(inp.x))
        probs = window.probs
        if len(probs) != len(blocks) or len(outputs) != len(blocks):
            raise CamkitError(
                f"LeGrad found {len(probs)} attention maps and {len(outputs)} block outputs for {len(blocks)} "
                "blocks: a ViT with one self-attention per block is needed"
            )
        classes = inp.classes if inp.classes.dim() == 2 else inp.classes[:, None]
        maps = []
        for t in range(classes.shape[1]):
            relevance = []
            for z, a in zip(outputs, probs, strict=True):
                if not a.requires_grad:
                    raise CamkitError("LeGrad: an attention map is not connected to the class score")
                score = project(z).gather(1, classes[:, t : t + 1].to(z.device))[:, 0]
                (grad,) = torch.autograd.grad(score.sum(), a, retain_graph=True)
                relevance.append(torch.relu(grad.double()).mean(dim=(1, 2)))  # [B, N keys]
            e = torch.stack(relevance).mean(dim=0)  # [B, N]
            maps.append(_patch_row(model, e, size).float())
    return torch.stack(maps, dim=1) if inp.classes.dim() == 2 else maps[0]


def _patch_row(model: nn.Module, row: Tensor, size: tuple[int, int]) -> Tensor:
    """A per-key relevance Tensor[B, N] without its prefix keys, as Tensor[B, h, w]."""
    b, n = row.shape
    layout = infer_layout((b, n, 1), size, prefix=prefix_tokens(model), suffix=suffix_tokens(model))
    if layout is None:
        raise CamkitError(f"cannot read {n} tokens as prefix + a grid for an input of {size[0]}x{size[1]}")
    return row[:, layout.prefix : n - layout.suffix].reshape(b, *layout.grid)


register(
    AttentionMethod(
        name="rollout",
        needs_grad=False,
        cost="1 extra forward (class-agnostic), no backward",
        paper="Abnar & Zuidema, ACL 2020",
        summary="R = prod_l (mean_h A_l + I)/2 over the blocks; map = class-token row of R over the patches",
        prefer="a ViT/DeiT's class-agnostic attention flow, with no backward",
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
        prefer="a class-specific map of a ViT/DeiT read from its attention, not from a CNN-style layer",
        aliases=("grad-rollout", "chefer", "chefer2021", "attention-grad"),
        run=_run_grad_rollout,
    )
)
register(
    AttentionMethod(
        name="legrad",
        needs_grad=False,
        cost="1 extra forward + 1 partial backward per block",
        paper="Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, 2024 (LeGrad)",
        summary="map = mean over blocks l of mean_{heads, queries} ReLU(d s^l / d A^l), s^l = head(norm(mean(z^l)))_c",
        prefer="a class-specific ViT map from every block's own prediction (timm and torchvision ViTs)",
        aliases=("le-grad",),
        run=legrad,
    )
)
