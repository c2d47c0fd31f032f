"""The capture window: target-layer activations and their gradients at the cost of about one forward.

How it works (see DESIGN.md section 1):

* the forward runs with grad mode **off**, so nothing before the earliest target layer records a graph;
* the forward hook of each target layer detaches its output into a leaf ``A`` that requires grad, turns grad
  mode on, and hands a *clone* of ``A`` to the rest of the network. Later in-place ops (``ReLU(inplace=True)``)
  write into the clone, so ``A`` keeps the values the layer produced;
* after the forward, ``torch.autograd.grad(score.sum(), [A1, A2, ...])`` gives ``dS/dA`` for every layer in one
  backward pass; per-image scores are independent, so the sum gives per-image gradients. No parameter gradient
  is computed and ``param.grad`` / ``param.requires_grad`` are never touched;
* in ``finally`` every hook is removed and grad mode restored, also when the forward raises.

When no gradient is needed (Eigen-CAM, CAM) the whole forward runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Captured", "capture"]


@dataclass
class Captured:
    """What one capture forward produced.

    Attributes:
        output: the model output (logits), detached from any graph.
        activations: layer name -> activation ``A`` (Tensor[B, K, h, w] for CNNs), detached.
        gradients: layer name -> ``dS/dA`` of the same shape, or empty when no score was given.
        scores: the explained scores ``S`` (Tensor[B] or Tensor[T, B] for T targets per image), detached.
    """

    output: Tensor
    activations: dict[str, Tensor]
    gradients: dict[str, Tensor | list[Tensor]] = field(default_factory=dict)
    scores: Tensor | None = None
    order: list[str] = field(default_factory=list)  # layer names, shallow to deep (finish order)
    calls: dict[str, int] = field(default_factory=dict)  # how many times each layer ran in the forward


class _LayerHook:
    """Forward hook for one target layer; keeps the leaf of the last call."""

    def __init__(self, name: str, window: _Window) -> None:
        self.name = name
        self.window = window
        self.leaves: list[Tensor] = []

    def __call__(self, module: nn.Module, inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"target layer {self.name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                "not a tensor; choose a layer whose output is a feature map (see `camkit layers MODEL`)"
            )
        self.window.finished(self.name)
        if not self.window.need_grad:
            # Clone so that later in-place ops cannot overwrite what we read.
            leaf = output.detach().clone()
            self.leaves.append(leaf)
            return output
        torch.set_grad_enabled(True)
        if output.requires_grad:
            # Already downstream of an earlier target layer: keep the graph through it intact.
            leaf = output
        else:
            # A leaf that requires grad: gradients stop here, nothing before it is recorded.
            leaf = output.detach().requires_grad_(True)
        self.leaves.append(leaf)
        # The network continues on a copy: in-place ops downstream cannot touch ``leaf``.
        return leaf.clone()


class _Window:
    def __init__(self, need_grad: bool) -> None:
        self.need_grad = need_grad
        self.order: list[str] = []  # layer names in the order their last call finished

    def finished(self, name: str) -> None:
        if name in self.order:
            self.order.remove(name)
        self.order.append(name)


def capture(
    model: nn.Module,
    inputs: Tensor,
    layers: dict[str, nn.Module],
    score_fn: Callable[[Tensor], Tensor] | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Captured:
    """Run ``model(inputs)`` once and capture the target layers' activations (and gradients).

    Args:
        model: the network, in eval mode. It is not modified: hooks are removed and grad mode restored in
            ``finally``; ``requires_grad`` and ``.grad`` of parameters are never touched.
        inputs: Tensor[B, C, H, W], never modified, never made to require grad.
        layers: name -> module to capture. A module called several times in one forward keeps its last call.
        score_fn: maps the model output (Tensor[B, ...]) to scores, Tensor[B] (one target per image) or
            Tensor[T, B] (T targets per image). ``None``: no gradient is computed.
        output_fn: turns the raw model output (tuple, dict, ...) into a tensor; default: identity for tensors.

    Returns:
        a :class:`Captured`.
    """
    need_grad = score_fn is not None
    window = _Window(need_grad)
    hooks = {name: _LayerHook(name, window) for name in layers}
    handles = []
    prev_grad = torch.is_grad_enabled()
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(hooks[name]))
        # inference_mode(False): also works when the caller is inside torch.inference_mode().
        with torch.inference_mode(False):
            torch.set_grad_enabled(False)
            raw_out = model(inputs)
            out = output_fn(raw_out) if output_fn is not None else raw_out
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"the model returned {type(raw_out).__name__}; pass output=... to say which element "
                    "holds the scores to explain"
                )
            missing = [n for n, h in hooks.items() if not h.leaves]
            if missing:
                raise RuntimeError(
                    f"target layer(s) {missing} did not run during the forward pass; "
                    "choose layers the model actually calls (see `camkit layers MODEL`)"
                )
            for name, h in hooks.items():
                if len(h.leaves) > 1:
                    warnings.warn(
                        f"layer {name!r} ran {len(h.leaves)} times in one forward; its last call is used",
                        stacklevel=3,
                    )
            leaves = {name: h.leaves[-1] for name, h in hooks.items()}
            if not need_grad:
                return Captured(
                    output=out.detach(),
                    activations=leaves,
                    order=list(window.order),
                    calls={n: len(h.leaves) for n, h in hooks.items()},
                )
            assert score_fn is not None
            scores = score_fn(out)
            if scores.dim() not in (1, 2):
                raise ValueError(f"scores must be Tensor[B] or Tensor[T, B], got shape {tuple(scores.shape)}")
            if not scores.requires_grad:
                raise RuntimeError(
                    "the explained score does not depend on the target layer(s) "
                    f"{list(leaves)}: pick a layer on the path to the output"
                )
            names = list(leaves)
            tensors = [leaves[n] for n in names]
            if scores.dim() == 1:
                grads = torch.autograd.grad(scores.sum(), tensors, allow_unused=True)
                gradients: dict[str, Tensor | list[Tensor]] = {
                    n: _zero_if_none(g, t) for n, g, t in zip(names, grads, tensors, strict=True)
                }
            else:
                per_target: dict[str, list[Tensor]] = {n: [] for n in names}
                n_targets = scores.shape[0]
                for t in range(n_targets):
                    grads = torch.autograd.grad(
                        scores[t].sum(), tensors, retain_graph=t < n_targets - 1, allow_unused=True
                    )
                    for n, g, a in zip(names, grads, tensors, strict=True):
                        per_target[n].append(_zero_if_none(g, a))
                gradients = dict(per_target.items())
            return Captured(
                output=out.detach(),
                activations={n: a.detach() for n, a in leaves.items()},
                gradients=gradients,
                scores=scores.detach(),
                order=list(window.order),
                calls={n: len(h.leaves) for n, h in hooks.items()},
            )
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(prev_grad)


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g
