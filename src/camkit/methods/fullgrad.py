"""FullGrad (Srinivas & Fleuret, NeurIPS 2019, "Full-Gradient Representation for Neural Network Visualization").

For a network built of convolutions, batch norms, linear layers and piecewise-linear activations, the score is
exactly its full-gradient decomposition (the paper's completeness property):

    S(x) = sum(dS/dx * x) + sum over bias layers l, calls, channels c, positions p of dS/dz_l[c, p] * b_l[c]

where ``z_l`` is the output of layer l and ``b_l`` its bias: a convolution's or linear layer's ``bias``, and for a
batch norm in eval mode the effective bias ``beta - mu * gamma / sqrt(var + eps)`` (gamma = 1, beta = 0 without
affine parameters). The saliency map (the paper's eq. 5) is

    psi(|dS/dx * x|) summed over input channels + sum over conv / BN layers and channels of psi(|dS/dz_l * b_l|)

with psi = min-max to [0, 1] per image and channel, then bilinear upsampling to the input size (pytorch-grad-cam's
order: scale, then resize; the resize is linear, so each layer's channels are summed before one resize). Linear
layers' biases enter the decomposition but not the map (they have no spatial extent), as in the paper.

How: a forward hook (this thread only) on every bias-carrying conv / BN / linear layer keeps the layer's output
node and hands the network a copy, so later in-place ops cannot change it; one ``torch.autograd.grad`` per target
gives dS/dx and every dS/dz_l. No module is replaced, no parameter's ``requires_grad`` or ``.grad`` is touched,
every hook is removed on exit, also on an exception. A batch norm module that also applies an activation
(timm's ``BatchNormAct2d``, whose children ``drop`` and ``act`` run after the normalisation) is read at the input
of its first child, which is the normalised tensor before the activation. Norms other than batch norm (LayerNorm, GroupNorm) are not
linear in their input: their biases are not part of the decomposition, so completeness holds only for networks
without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.methods.passes import Hooks, score_rows, stack_targets
from camkit.methods.registry import PassInput, PassMethod, register

__all__ = ["FullGradient", "bias_of", "full_gradients", "fullgrad_map"]

_BN = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd


def bias_of(module: nn.Module) -> Tensor | None:
    """The bias a layer adds per output channel: a conv's / linear layer's ``bias``, a batch norm's effective
    bias in eval mode ``beta - mu * gamma / sqrt(var + eps)``; None for other modules and for layers without one.

    Raises:
        ValueError: a batch norm without running statistics (its output depends on the batch: no fixed bias).
    """
    if isinstance(module, _BN):
        if module.running_mean is None or module.running_var is None:
            raise CamkitError(
                f"{type(module).__name__} without running statistics (track_running_stats=False) has no fixed "
                "bias: FullGrad needs batch norms with running statistics, in eval mode"
            )
        gamma = module.weight if module.weight is not None else torch.ones_like(module.running_mean)
        beta = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
        return (beta - module.running_mean * gamma / torch.sqrt(module.running_var + module.eps)).detach()
    if isinstance(module, (_CONV, nn.Linear)):
        bias = module.bias
        return None if bias is None else bias.detach()
    return None


@dataclass(frozen=True)
class FullGradient:
    """The full-gradient decomposition of one target's score.

    Attributes:
        input_term: dS/dx * x, Tensor[B, C, H, W].
        bias_terms: per bias layer call, shallow to deep: (layer name, dS/dz * b), Tensor[B, K, ...] of the layer's
            output shape (channel axis 1).
    """

    input_term: Tensor
    bias_terms: list[tuple[str, Tensor]]

    def total(self) -> Tensor:
        """sum of every term per image, Tensor[B]: equals the score for a piecewise-linear network."""
        out = self.input_term.flatten(1).sum(1)
        for _, t in self.bias_terms:
            out = out + t.flatten(1).sum(1)
        return out


def full_gradients(inp: PassInput) -> list[FullGradient]:
    """The full-gradient decomposition of each target's score (one per target; see the module docstring).

    Args:
        inp: the model, its input and the targets (:class:`PassInput`).

    Returns:
        one :class:`FullGradient` per target per image (k for classes [B, k], else 1).
    """
    names = {m: n for n, m in inp.model.named_modules()}
    kept: list[
        tuple[str, Tensor, Tensor]
    ] = []  # (name, the layer's output node, its bias shaped to match it)

    def keep(name: str, bias: Tensor, t: object, linear: bool = False) -> Tensor | None:
        if not isinstance(t, Tensor) or not t.requires_grad:
            return None
        kept.append((name, t, _broadcast(bias, t, linear)))
        return t.clone()  # later in-place ops write into the copy: the kept node stays the layer's output

    def hook(module: nn.Module, _inputs: object, output: object) -> object:
        bias = bias_of(module)
        if bias is None:
            return None
        return keep(names.get(module, type(module).__name__), bias, output, isinstance(module, nn.Linear))

    def fused_hook(owner: nn.Module) -> Callable[[nn.Module, tuple[object, ...]], object]:
        # a batch norm whose module also applies an activation (timm's BatchNormAct2d: batch norm, then its
        # children drop and act): its plain output is the input of its first child
        def pre(_child: nn.Module, args: tuple[object, ...]) -> object:
            bias = bias_of(owner)
            if bias is None or not args:
                return None
            onward = keep(names.get(owner, type(owner).__name__), bias, args[0])
            return None if onward is None else (onward, *args[1:])

        return pre

    x = inp.x.detach().clone().requires_grad_(True)
    with Hooks() as hooks:
        for m in inp.model.modules():
            if not isinstance(m, (_BN, _CONV, nn.Linear)) or bias_of(m) is None:
                continue
            first = next(iter(m.children()), None)
            if isinstance(m, _BN) and first is not None:
                hooks.add(first, fused_hook(m), pre=True)
            else:
                hooks.add(m, hook)
        out = inp.output_fn(inp.model(x))
        rows = score_rows(inp, out)
        results = []
        nodes = [x, *(node for _, node, _ in kept)]
        for t in range(rows.shape[0]):
            grads = torch.autograd.grad(
                rows[t].sum(), nodes, retain_graph=t < rows.shape[0] - 1, allow_unused=True
            )
            gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
            terms = []
            for (name, node, bias), g in zip(kept, grads[1:], strict=True):
                g = torch.zeros_like(node) if g is None else g
                terms.append((name, (g * bias.to(g.dtype)).detach()))
            results.append(FullGradient((gx * x).detach(), terms))
    return results


def _broadcast(bias: Tensor, node: Tensor, linear: bool) -> Tensor:
    """A per-channel bias shaped to multiply a layer output: a linear layer's features are its last axis (tokens
    [B, N, C] too), a conv's / batch norm's channels axis 1."""
    if linear:
        return bias
    return bias.reshape([1, -1] + [1] * (node.dim() - 2))


def _psi_sum(t: Tensor, size: tuple[int, int]) -> Tensor:
    """sum over channels of psi(t) for t [B, C, h, w]: |t| min-maxed to [0, 1] per image and channel, bilinearly
    resized to ``size`` -> Tensor[B, H, W]. Resizing is linear, so the channels are summed first and resized once
    (the same numbers as resizing each channel, for a fraction of the memory)."""
    a = t.abs().float()
    flat = a.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = (flat - lo).max(dim=2, keepdim=True).values
    total = ((flat - lo) / (hi + 1e-7)).sum(dim=1).reshape(a.shape[0], 1, *a.shape[2:])
    if tuple(total.shape[-2:]) != size:
        total = F.interpolate(total, size=size, mode="bilinear", align_corners=False)
    return total[:, 0]


def fullgrad_map(fg: FullGradient) -> Tensor:
    """The paper's saliency map (eq. 5) of one decomposition: Tensor[B, H, W] (not yet min-maxed)."""
    size = (fg.input_term.shape[-2], fg.input_term.shape[-1])
    total = _psi_sum(fg.input_term, size)
    for _, term in fg.bias_terms:
        if term.dim() == 4:  # conv / BN outputs; linear layers have no spatial extent
            total = total + _psi_sum(term, size)
    return total


def _run(inp: PassInput) -> dict[str, Tensor]:
    if inp.x.dim() != 4:
        raise CamkitError(f"FullGrad needs image input [B, C, H, W], got shape {tuple(inp.x.shape)}")
    return {"fullgrad": stack_targets(inp, [fullgrad_map(fg) for fg in full_gradients(inp)])}


register(
    PassMethod(
        name="fullgrad",
        run=_run,
        cost="1 forward + 1 backward to the input (its own pass; target layers are not used)",
        paper="Srinivas & Fleuret, NeurIPS 2019",
        summary="psi(|dS/dx * x|) + sum over conv/BN layers and channels of psi(|dS/dz * bias|)",
        prefer="a map at input resolution that accounts for the whole score (input and every bias), no layer choice",
        aliases=("full-grad", "fullgradcam"),
    )
)
