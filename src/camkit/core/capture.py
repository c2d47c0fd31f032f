"""The capture window: target-layer activations and their gradients at the cost of about one forward.

How it works:

* the forward runs with grad mode **off**, so nothing before the earliest target layer records a graph;
* the forward hook of each target layer detaches its output into a leaf ``A`` that requires grad, turns grad
  mode on, and hands a *clone* of ``A`` to the rest of the network. Later in-place ops (``ReLU(inplace=True)``)
  write into the clone, so ``A`` keeps the values the layer produced;
* after the forward, ``torch.autograd.grad(score.sum(), [A1, A2, ...])`` gives ``dS/dA`` for every layer in one
  backward pass; per-image scores are independent, so the sum gives per-image gradients. ``T`` targets per image
  (``TopK``) go through one batched backward (:func:`target_gradients`), not ``T``. No parameter gradient
  is computed and ``param.grad`` / ``param.requires_grad`` are never touched;
* on exit every hook is removed and grad mode restored, also when the forward raises.

Threads: every hook camkit puts on a user's module is registered with :func:`hook_forward`, which makes it act
only in the thread that registered it. Another thread's forward through the same module calls the hook, which
returns at once without touching anything, so that forward runs exactly as without camkit. Grad mode and
inference mode are per-thread in PyTorch, so switching grad mode on inside a hook affects the caller's thread only.

When no gradient is needed (Eigen-CAM, CAM) the whole forward runs with grad mode off.

:class:`Window` is the generic piece (hooks, leaves, grad mode, the batched backward of several targets); :class:`LayerCapture`
records target layers with it, and the attention methods (:mod:`camkit.methods.attention`) record attention
probabilities with it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from camkit.errors import CamkitError, CamkitRuntimeError

__all__ = [
    "HOOK_LOCK",
    "Captured",
    "LayerCapture",
    "Window",
    "capture",
    "drop_thread_hooks",
    "hook_forward",
    "is_thread_hook",
    "target_gradients",
]

W = TypeVar("W", bound="Window")
L = TypeVar("L", bound="LayerCapture")

Gradients = Tensor | list[Tensor]  # one tensor, or one per target when the score is Tensor[T, B]


def hook_forward(
    module: nn.Module,
    fn: Callable[..., object],
    *,
    pre: bool = False,
    with_kwargs: bool = False,
    always_call: bool = False,
) -> RemovableHandle:
    """Register a forward hook (``pre``: a forward pre-hook) on ``module`` that acts only in the calling thread.

    In any other thread the hook returns None at once: that thread's forward through ``module`` keeps its inputs
    and output, and nothing of camkit's runs there. Every hook camkit puts on a user's module goes through here.

    Args:
        module: the module to hook.
        fn: the hook, called as PyTorch calls forward (pre-)hooks (``with_kwargs``: with the keyword arguments).
        pre: a forward pre-hook instead of a forward hook.
        with_kwargs: pass the forward's keyword arguments to ``fn``.
        always_call: (forward hooks) call ``fn`` also when the module's forward raises.

    Returns:
        the handle; the caller removes it (in ``finally``).
    """
    owner = threading.get_ident()

    # *args: a hook being removed by its own thread while another thread's forward has already listed it may be
    # called there with or without the keyword arguments; the guard answers None to either.
    def guarded(*args: object) -> object:
        if threading.get_ident() != owner:
            return None
        return fn(*args)

    setattr(guarded, _MARK, True)
    with HOOK_LOCK:
        if pre:
            handle = module.register_forward_pre_hook(guarded, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(guarded, with_kwargs=with_kwargs, always_call=always_call)
    return _LockedHandle(handle)


HOOK_LOCK = threading.RLock()
"""Held while camkit adds or removes a hook on a user's module (PyTorch numbers hooks with a class-wide counter that
two threads could read at once), and while a copy of a user's model is made (:func:`copy.deepcopy` walks the hook
dictionaries: a hook added or removed by another thread in the middle would make it fail)."""

_MARK = "_camkit_thread_hook"


class _LockedHandle(RemovableHandle):
    """The handle of a :func:`hook_forward` hook: removed under :data:`HOOK_LOCK`."""

    def __init__(self, handle: RemovableHandle) -> None:  # the very handle PyTorch returned, same id
        self.__dict__.update(handle.__dict__)

    def remove(self) -> None:
        with HOOK_LOCK:
            super().remove()


def is_thread_hook(fn: object) -> bool:
    """Whether ``fn`` is a hook registered by :func:`hook_forward` (of any thread)."""
    return bool(getattr(fn, _MARK, False))


def drop_thread_hooks(model: nn.Module) -> None:
    """Remove every :func:`hook_forward` hook from ``model``'s modules: for a copy of a user's model made while
    another thread's call had hooks on it (the copy must not carry them)."""
    for m in model.modules():
        for hooks, extras in (
            (m._forward_hooks, (m._forward_hooks_with_kwargs, m._forward_hooks_always_called)),
            (m._forward_pre_hooks, (m._forward_pre_hooks_with_kwargs,)),
        ):
            for key in [k for k, fn in hooks.items() if is_thread_hook(fn)]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)


@dataclass(frozen=True)
class Captured:
    """What one capture forward produced.

    Attributes:
        output: the model output (logits), detached from any graph.
        activations: layer name -> activation ``A`` (Tensor[B, K, h, w] for CNNs), detached.
        gradients: layer name -> ``dS/dA`` of the same shape (a list with one per target for scores Tensor[T, B]),
            or empty when no gradient was asked for.
        scores: the explained scores ``S`` (Tensor[B] or Tensor[T, B] for T targets per image), detached.
        order: layer names, shallow to deep (the order their last calls finished).
        calls: how many times each layer ran in the forward.
    """

    output: Tensor
    activations: dict[str, Tensor]
    gradients: dict[str, Gradients] = field(default_factory=dict)
    scores: Tensor | None = None
    order: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)


class Window:
    """A forward pass with hooks of ours, as a context manager.

    On entry grad mode is switched off (inside ``inference_mode(False)``, so it also works when the caller is in
    ``torch.inference_mode()``); :meth:`record` turns a tensor met during the forward into a leaf of the backward.
    On exit, also after an exception, the hooks are removed, the ``undo`` callbacks run and grad mode is restored.

    Args:
        need_grad: whether recorded tensors become leaves that require grad.
        copy: hand the network a copy of each recorded tensor, so that later in-place ops cannot overwrite it.
    """

    def __init__(self, need_grad: bool, copy: bool = True) -> None:
        self.need_grad = need_grad
        self.copy = copy
        self._handles: list[RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []
        self._prev_grad = torch.is_grad_enabled()
        self._inference = torch.inference_mode(False)

    def __enter__(self: W) -> W:
        self._prev_grad = torch.is_grad_enabled()
        self._inference.__enter__()
        torch.set_grad_enabled(False)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for handle in self._handles:
                handle.remove()
            for undo in reversed(self._undo):
                undo()
        finally:
            self._inference.__exit__(kind, exc, tb)
            torch.set_grad_enabled(self._prev_grad)

    def hook(
        self,
        module: nn.Module,
        fn: Callable[..., object],
        with_kwargs: bool = False,
        *,
        pre: bool = False,
        always_call: bool = False,
    ) -> None:
        """Register a forward (``pre``: pre-) hook acting in this thread only (:func:`hook_forward`), removed on
        exit."""
        self._handles.append(
            hook_forward(module, fn, pre=pre, with_kwargs=with_kwargs, always_call=always_call)
        )

    @property
    def hooked(self) -> bool:
        """Whether any hook is registered."""
        return bool(self._handles)

    def on_exit(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` on exit (e.g. to restore a flag switched for the forward)."""
        self._undo.append(undo)

    def record(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """-> (the tensor to keep, the tensor the network continues with).

        With ``need_grad`` the kept tensor is a leaf that requires grad (or ``t`` itself when it is already
        downstream of an earlier recorded tensor, so the graph through it stays intact) and grad mode is on from
        here. Without, the kept tensor is a detached copy.
        """
        if not self.need_grad:
            return (t.detach().clone(), t) if self.copy else (t, t)
        torch.set_grad_enabled(True)
        # A leaf that requires grad: gradients stop here, nothing before it is recorded.
        leaf = t if t.requires_grad else t.detach().requires_grad_(True)
        return leaf, (leaf.clone() if self.copy else leaf)


_VMAP_REFUSALS = ("vmap", "batching rule", "batched gradient", "is_grads_batched")
"""Words of PyTorch's messages when the batched backward (``is_grads_batched=True``, run under vmap) cannot run
an op; any other error (out of memory, a bug in a backward) propagates."""


def _vmap_refused(err: RuntimeError) -> bool:
    """Whether ``err`` is vmap refusing an op of the batched backward (the documented case for the fallback)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return False
    message = str(err).lower()
    return any(word in message for word in _VMAP_REFUSALS)


def target_gradients(
    scores: Tensor, leaves: Sequence[Tensor], batched: bool | None = None
) -> list[list[Tensor]]:
    """dS_t/dL for every target row t of ``scores`` (Tensor[B] or Tensor[T, B]) and every leaf L.

    T targets cost one backward pass, not T: the T one-hot output gradients go through the graph together as one
    batched vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over the
    backward). An op without a batching rule makes PyTorch fall back to a slower loop inside the same call (it
    warns; camkit silences that warning); an op that vmap cannot run at all makes camkit fall back to one
    backward per target (``retain_graph``), which gives the same gradients. A leaf the score does not depend on
    gets zeros.

    Args:
        scores: the explained scores, Tensor[B] or Tensor[T, B].
        leaves: the tensors to differentiate against.
        batched: force (True) or forbid (False) the batched backward; None: batched for T > 1.

    Returns:
        per target, per leaf, a gradient of the leaf's shape.
    """
    rows = scores[None] if scores.dim() == 1 else scores
    t_count = rows.shape[0]
    use_batched = t_count > 1 if batched is None else batched
    if use_batched:
        # grad_outputs[t] is 1 on row t and 0 elsewhere: dS_t/dL for every t in one backward.
        eye = torch.eye(t_count, dtype=rows.dtype, device=rows.device)
        seeds = eye[:, :, None].expand(t_count, t_count, rows.shape[1])
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Bb]atching rule.*")
                grads = torch.autograd.grad(
                    rows,
                    list(leaves),
                    grad_outputs=seeds,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
        except RuntimeError as err:
            if not _vmap_refused(err):
                raise
            # an op vmap cannot run: one backward per target below (the graph was retained)
        else:
            return [
                [torch.zeros_like(a) if g is None else g[t] for g, a in zip(grads, leaves, strict=True)]
                for t in range(t_count)
            ]
    out = []
    for t in range(t_count):
        per_leaf = torch.autograd.grad(
            rows[t].sum(), list(leaves), retain_graph=t < t_count - 1, allow_unused=True
        )
        out.append([torch.zeros_like(a) if g is None else g for g, a in zip(per_leaf, leaves, strict=True)])
    return out


class LayerCapture(Window):
    """A :class:`Window` with a forward hook on each target layer; the last call of each layer is kept.

    >>> with LayerCapture(layers, need_grad=True) as window:
    ...     out = window.forward(model, x)
    ...     captured = window.result(out, out[:, 0])
    """

    def __init__(self, layers: dict[str, nn.Module], need_grad: bool) -> None:
        super().__init__(need_grad)
        self.layers = layers
        self.leaves: dict[str, list[Tensor]] = {name: [] for name in layers}
        self.order: list[str] = []  # layer names in the order their last call finished

    def __enter__(self: L) -> L:
        super().__enter__()
        for name, module in self.layers.items():
            self.hook(module, self._hook_for(name))
        return self

    def _hook_for(self, name: str) -> Callable[[nn.Module, object, object], Tensor]:
        def hook(module: nn.Module, inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"target layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                    "not a tensor; choose a layer whose output is a feature map (see `camkit layers MODEL`)"
                )
            if name in self.order:
                self.order.remove(name)
            self.order.append(name)
            kept, onward = self.record(output)
            self.leaves[name].append(kept)
            return onward

        return hook

    def forward(
        self, model: nn.Module, inputs: Tensor, output_fn: Callable[[object], Tensor] | None = None
    ) -> Tensor:
        """Run ``model(inputs)`` and read its output with ``output_fn`` (default: the output as is)."""
        raw_out = model(inputs)
        out = output_fn(raw_out) if output_fn is not None else raw_out
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model returned {type(raw_out).__name__}; pass output=... to say which element "
                "holds the scores to explain"
            )
        missing = [n for n, kept in self.leaves.items() if not kept]
        if missing:
            raise CamkitRuntimeError(
                f"target layer(s) {missing} did not run during the forward pass; "
                "choose layers the model actually calls (see `camkit layers MODEL`)"
            )
        for name, kept in self.leaves.items():
            if len(kept) > 1:
                warnings.warn(
                    f"layer {name!r} ran {len(kept)} times in one forward; its last call is used",
                    stacklevel=3,
                )
        return out

    def result(self, output: Tensor, scores: Tensor | None = None) -> Captured:
        """The captured record; with ``need_grad``, ``dS/dA`` of ``scores`` (Tensor[B] or Tensor[T, B])."""
        leaves = {name: kept[-1] for name, kept in self.leaves.items()}
        calls = {name: len(kept) for name, kept in self.leaves.items()}
        if not self.need_grad or scores is None:
            return Captured(
                output=output.detach(),
                activations=leaves,
                scores=None if scores is None else scores.detach(),
                order=list(self.order),
                calls=calls,
            )
        if scores.dim() not in (1, 2):
            raise CamkitError(f"scores must be Tensor[B] or Tensor[T, B], got shape {tuple(scores.shape)}")
        if not scores.requires_grad:
            raise CamkitRuntimeError(
                f"the explained score does not depend on the target layer(s) {list(leaves)}: pick a layer on the "
                "path to the output"
            )
        names = list(leaves)
        per_target = target_gradients(scores, [leaves[n] for n in names])
        gradients: dict[str, Gradients] = {
            n: (per_target[0][i] if scores.dim() == 1 else [grads[i] for grads in per_target])
            for i, n in enumerate(names)
        }
        return Captured(
            output=output.detach(),
            activations={n: a.detach() for n, a in leaves.items()},
            gradients=gradients,
            scores=scores.detach(),
            order=list(self.order),
            calls=calls,
        )


def capture(
    model: nn.Module,
    inputs: Tensor,
    layers: dict[str, nn.Module],
    score_fn: Callable[[Tensor], Tensor] | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Captured:
    """Run ``model(inputs)`` once and capture the target layers' activations (and gradients).

    Args:
        model: the network, in eval mode. It is not modified: hooks are removed and grad mode restored on exit;
            ``requires_grad`` and ``.grad`` of parameters are never touched.
        inputs: Tensor[B, C, H, W], never modified, never made to require grad.
        layers: name -> module to capture. A module called several times in one forward keeps its last call.
        score_fn: maps the model output (Tensor[B, ...]) to scores, Tensor[B] (one target per image) or
            Tensor[T, B] (T targets per image). ``None``: no gradient is computed.
        output_fn: turns the raw model output (tuple, dict, ...) into a tensor; default: identity for tensors.

    Returns:
        a :class:`Captured`.
    """
    with LayerCapture(layers, need_grad=score_fn is not None) as window:
        out = window.forward(model, inputs, output_fn)
        return window.result(out, None if score_fn is None else score_fn(out))


def mode_dependent(m: nn.Module) -> bool:
    """Whether a module's output depends on its training flag (batch statistics, dropout, stochastic depth).

    Keras layers never do: Keras decides by the ``training`` argument of the call (camkit passes False).
    """
    if any(cls.__module__.split(".")[0] == "keras" for cls in type(m).__mro__):
        return False
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.RReLU)):
        return True
    if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and float(getattr(m, "dropout", 0.0) or 0.0) > 0:
        return True
    name = type(m).__name__
    return any(s in name for s in ("Dropout", "DropPath", "DropBlock", "StochasticDepth"))


def check_eval(model: nn.Module, stacklevel: int = 2) -> None:
    """Refuse a model whose mode-dependent modules (BatchNorm, Dropout, DropPath, ...) are in training mode, naming
    them; a model in training mode without any is explained as is, with a warning (``stacklevel`` as in
    :func:`warnings.warn`, counted from the caller of this function)."""
    training = [
        (name or type(model).__name__, type(m).__name__)
        for name, m in model.named_modules()
        if m.training and mode_dependent(m)
    ]
    if training:
        shown = ", ".join(f"{name!r} ({kind})" for name, kind in training[:4])
        more = f" and {len(training) - 4} more" if len(training) > 4 else ""
        raise CamkitError(
            f"the model is in training mode and {len(training)} module(s) whose output depends on it would run in "
            f"training mode: {shown}{more} (batch statistics or random dropping would make each map depend on "
            "the rest of the batch or on chance, and update running statistics). Call model.eval() first."
        )
    if model.training:
        which = (
            "its mode-dependent modules are in eval mode"
            if any(mode_dependent(m) for m in model.modules())
            else "has no mode-dependent modules"
        )
        warnings.warn(
            f"model is in training mode but {which}; explaining it as is; call model.eval() to silence",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
