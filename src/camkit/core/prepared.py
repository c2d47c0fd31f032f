"""The capture forward and backward (:mod:`camkit.core.capture`) on a prepared copy of the model.

The layer methods' one forward and one backward to the target layers run, by default, on a copy of the model made
for it, never on the model itself:

* every ``nn.BatchNorm2d`` and timm ``BatchNormAct2d`` that reads a convolution's output is folded into that
  convolution (:func:`camkit.core.accel.fold_batchnorm`, the folded weights computed in float64 and rounded once):
  one pass over each feature map less, forward and backward; a convolution that is itself a target layer keeps its
  own output (it is not folded);
* on CPU the input is sent channels-last, so oneDNN runs the whole network on NHWC tensors (faster convolutions,
  depthwise ones above all).

The copy's other parameters share the model's storage (no second set of them in memory); only the folded
convolutions have weights of their own. The conv/BatchNorm pairs are found by one forward on a copy on the meta
device (shapes only), or on the copy itself for a model that does not run on meta tensors.

The hooks of the capture go on the copy's modules of the same names, so ``A`` and ``dS/dA`` are the target layers'
output and its gradient, as on the model, up to float rounding. The activations and gradients handed on are
contiguous (NCHW) tensors, as from the model.

The copy is made once per model, device, dtype and set of target layers, and kept while the model is unchanged
(the cache of :mod:`camkit.core.accel`, same invalidation; :func:`camkit.core.accel.clear_cache` forgets it). The
first capture of each input shape runs on the copy, then on the model as given,
:data:`camkit.core.accel.CHECK_ROWS` images at a time (the whole batch for a callable target; the copy's graph is
freed first, so the check costs about the memory of the copy's pass alone), and the two are compared:
the same explained classes, each target layer's map (Grad-CAM's, or the channel sum without gradients) within
:data:`RTOL` of its scale, and the output, every activation and every gradient within :data:`TENSOR_RTOL` of the
largest value of the model's. An image that fails is computed again by a float64 copy of the model, alone, and
judged against that exact result instead: the float32 model itself can be the one that is off, where a
pre-activation lies within rounding of a ReLU's bend (EfficientNet-Lite0's ``blocks.4``: the model's map at one
thread is 3.7e-4 of its scale from the float64 map, the copy's 6e-7). A copy that cannot be made or run, or that
disagrees, is dropped for that model with one :class:`camkit.core.accel.AccelWarning` naming the reason, and the
model as given runs the capture, as before. Nothing is chosen by timing: two identical calls give identical maps.

Not used (the model as given runs the capture): ``explain(..., accelerate=False)``, input that is not a float32
image batch Tensor[B, C, H, W] (clips, half precision), torchvision segmentation and detection models, Keras models, a model carrying
hooks of its own (they must see their model run), and layers given as modules that are not submodules of the
model under their names. The methods with passes of their own (guided backprop, FullGrad, SmoothGrad, ...) and
the perturbation methods' extra forwards run on the model as given, as before: only the shared capture moves.

Threads: the copy is shared; the capture's hooks on it act only in the thread that put them there
(:func:`camkit.core.capture.hook_forward`), so several threads run it at once as they run a model.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from camkit.core.accel import CHECK_ROWS, cached, float64_copy, fold_batchnorm, peek, scoped, warn_once
from camkit.core.capture import Captured, Gradients, LayerCapture, is_thread_hook
from camkit.core.targets import score_fn

__all__ = [
    "RTOL",
    "TENSOR_RTOL",
    "PreparedCopy",
    "batch_first",
    "capture_rows",
    "check_map",
    "contiguous",
    "disagreement",
    "exact_rows",
    "lookup",
    "prepared_copy",
]

RTOL = 1e-5
"""How far the copy's map of each target layer (:func:`check_map`) may be from the model's at the check, relative
to the map's scale."""

TENSOR_RTOL = 1e-4
"""How far the copy's output, activations and gradients may be from the model's at the check, relative to the
largest absolute value of each tensor of the model's (float rounding of the folded weights and of the NHWC
convolutions, summed over the layers)."""

_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@dataclass
class PreparedCopy:
    """The copy that runs a model's capture.

    Attributes:
        module: the copy (BatchNorms folded, no parameter requiring grad).
        layers: the copy's target modules, by the model's layer names.
        channels_last: whether the input goes channels-last.
        folds: how many BatchNorms were folded.
        failed: why the copy is not used (None: it is).
    """

    module: nn.Module | None
    layers: dict[str, nn.Module]
    channels_last: bool
    folds: int = 0
    failed: str | None = None
    _checked: set[tuple[object, ...]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        """``"folded+channels-last"``, ``"folded"`` or ``"channels-last"``."""
        parts = (["folded"] if self.folds else []) + (["channels-last"] if self.channels_last else [])
        return "+".join(parts)

    def input(self, x: Tensor) -> Tensor:
        """``x`` as the copy takes it."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def checked(self, x: Tensor) -> bool:
        """Whether a capture of ``x``'s shape was checked against the model."""
        with self._lock:
            return _shape(x) in self._checked

    def settle(self, model: nn.Module, x: Tensor, reason: str | None) -> None:
        """Record the check of ``x``'s shape: passed (``reason`` None), or failed: the copy is dropped with one
        warning naming ``reason``."""
        with self._lock:
            if reason is None:
                self._checked.add(_shape(x))
                return
            self.failed = reason
            self.module = None
            self.layers = {}
        warn_once(
            model,
            f"camkit.core.prepared: the {self.name} copy of {type(model).__name__} is not used for the capture, "
            f"{reason}; the model as given runs it (pass accelerate=False to skip the copy)",
        )


def _shape(x: Tensor) -> tuple[object, ...]:
    return tuple(x.shape), x.dtype, x.device


def prepared_copy(model: nn.Module, x: Tensor, layers: dict[str, nn.Module]) -> PreparedCopy | None:
    """The prepared copy for capturing ``layers`` of ``model`` on inputs like ``x`` (made now if need be), or None
    where the model as given runs the capture (see the module's notes: not an image batch, Keras, hooks of the
    user's, layers that are not submodules under their names, nothing to gain, or a copy that failed)."""
    key = _key(model, x, layers)
    if key is None:
        return None
    prep = cached(model, key, lambda: _prepare(model, x[:1], sorted(layers), bool(key[3])))
    return None if prep.failed is not None or prep.module is None else prep


def lookup(model: nn.Module, x: Tensor, layers: dict[str, nn.Module]) -> tuple[bool, PreparedCopy | None]:
    """Without making anything: whether a prepared copy may run the capture of ``layers`` on inputs like ``x``
    (the model and input allow one, and none was dropped), and the copy if it is made and in use."""
    key = _key(model, x, layers)
    if key is None:
        return False, None
    found = peek(model, key)
    if not isinstance(found, PreparedCopy):
        return True, None
    usable = found.failed is None and found.module is not None
    return usable, found if usable else None


def _key(model: nn.Module, x: Tensor, layers: dict[str, nn.Module]) -> tuple[object, ...] | None:
    """The cache key of the copy for ``layers`` on inputs like ``x``, or None where no copy may be made."""
    if x.dim() != 4 or x.dtype != torch.float32 or not layers:
        return None
    if scoped(model, "keras-or-user-hooks", lambda: _keras(model) or _user_hooks(model)):
        return None
    for name, module in layers.items():
        try:
            if model.get_submodule(name) is not module:
                return None
        except AttributeError:
            return None
    nhwc = x.device.type == "cpu"
    return ("capture", x.device, x.dtype, nhwc, tuple(sorted(layers)))


def _prepare(model: nn.Module, example: Tensor, names: list[str], nhwc: bool) -> PreparedCopy:
    """Copy and fold ``model`` (outside inference mode: the folded weights take part in the backward); the copy's
    unfolded parameters share the model's storage (:func:`camkit.core.accel.fold_batchnorm`, ``share``)."""
    try:
        with torch.inference_mode(False):
            twin, folds = fold_batchnorm(model, example.clone(), keep=names, share=True)
    except (TypeError, RuntimeError, AttributeError, copy.Error) as err:
        prep = PreparedCopy(None, {}, nhwc, failed=f"it could not be made ({type(err).__name__}: {err})")
        warn_once(
            model,
            f"camkit.core.prepared: no prepared copy of {type(model).__name__} for the capture, {prep.failed}; "
            "the model as given runs it",
        )
        return prep
    if not folds and not nhwc:
        return PreparedCopy(None, {}, nhwc, failed="nothing to gain")
    return PreparedCopy(twin, {n: twin.get_submodule(n) for n in names}, nhwc, folds)


def capture_rows(
    model: nn.Module,
    x: Tensor,
    layers: dict[str, nn.Module],
    classes: Tensor,
    need_grad: bool,
    read: Callable[[object], Tensor],
    rows: int = CHECK_ROWS,
) -> Captured:
    """``model``'s capture of ``layers`` on ``x``, ``rows`` images at a time (the peak memory of ``rows``
    images), each image explaining its row of ``classes``; the pieces joined along the batch."""
    parts = []
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        with LayerCapture(layers, need_grad) as window:
            out = window.forward(model, x[part], read)
            parts.append(window.result(out, score_fn(classes[part], None)(out)))
    return _join(parts)


def _join(parts: list[Captured]) -> Captured:
    """Batch-first captures of consecutive images as one (order and calls of the first)."""
    first = parts[0]

    def grads(name: str) -> Gradients:
        g = first.gradients[name]
        if isinstance(g, list):
            return [
                torch.cat([cast(list[Tensor], p.gradients[name])[t] for p in parts]) for t in range(len(g))
            ]
        return torch.cat([cast(Tensor, p.gradients[name]) for p in parts])

    scores = None if first.scores is None else torch.cat([cast(Tensor, p.scores) for p in parts], dim=-1)
    return Captured(
        output=torch.cat([p.output for p in parts]),
        activations={n: torch.cat([p.activations[n] for p in parts]) for n in first.activations},
        gradients={n: grads(n) for n in first.gradients},
        scores=scores,
        order=list(first.order),
        calls=dict(first.calls),
    )


def exact_rows(
    model: nn.Module,
    x: Tensor,
    names: list[str],
    classes: Tensor,
    need_grad: bool,
    read: Callable[[object], Tensor],
) -> Callable[[int], Captured]:
    """For :func:`disagreement`: image ``i``'s capture by a float64 copy of ``model`` (made on first use, freed
    with the function), explaining its row of ``classes``."""
    wide: list[nn.Module] = []

    def run(i: int) -> Captured:
        if not wide:
            wide.append(float64_copy(model))
        twin = wide[0]
        return capture_rows(
            twin,
            x[i : i + 1].double(),
            {n: twin.get_submodule(n) for n in names},
            classes[i : i + 1],
            need_grad,
            read,
        )

    return run


def _keras(model: nn.Module) -> bool:
    return any(cls.__module__.split(".")[0] == "keras" for m in model.modules() for cls in type(m).__mro__)


def _user_hooks(model: nn.Module) -> bool:
    """Whether the model or torch carries module hooks other than camkit's per-thread ones."""
    for m in model.modules():
        if not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            continue  # the usual case, checked without a look at each dictionary's values
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
            if any(not is_thread_hook(fn) for fn in list(hooks.values())):
                return True
    return any(getattr(torch_module, name, None) for name in _GLOBAL_HOOKS)


def contiguous(cap: Captured) -> Captured:
    """The copy's capture with its tensors in the default (NCHW) memory format, as the model's."""

    def grads(g: Gradients) -> Gradients:
        return [t.contiguous() for t in g] if isinstance(g, list) else g.contiguous()

    return Captured(
        output=cap.output.contiguous(),
        activations={n: a.contiguous() for n, a in cap.activations.items()},
        gradients={n: grads(g) for n, g in cap.gradients.items()},
        scores=cap.scores,
        order=list(cap.order),
        calls=dict(cap.calls),
    )


def disagreement(
    ref: Captured,
    got: Captured,
    ref_classes: Tensor | None,
    got_classes: Tensor | None,
    exact: Callable[[int], Captured] | None = None,
) -> str | None:
    """Why the copy's capture ``got`` is not the model's ``ref`` (None: they agree): other classes, other layers,
    a map further than :data:`RTOL` (relative, see :func:`check_map`) from the model's, or an output,
    activation or gradient further than :data:`TENSOR_RTOL` of its largest value from the model's.

    ``exact(i)``: the model's capture of image ``i`` alone in float64. Given, an image whose maps or tensors are
    too far from the model's float32 ones is judged against it instead: the copy passes where it is within the
    same tolerances of the exact result (the model's own float32 rounding was the larger error, e.g. a
    pre-activation within rounding of a ReLU's bend, on the other side of it than the exact value)."""
    if (ref_classes is None) != (got_classes is None) or (
        ref_classes is not None and got_classes is not None and not torch.equal(ref_classes, got_classes)
    ):
        return "it explains other classes than the model"
    if ref.order != got.order or ref.calls != got.calls or set(ref.gradients) != set(got.gradients):
        return "its target layers run in another order or number of times"
    reason = _numeric(ref, got)
    if reason is None or exact is None or not batch_first(ref, got):
        return reason
    for i in range(ref.output.shape[0]):
        got_i = _image(got, i)
        if _numeric(_image(ref, i), got_i) is None:
            continue
        try:
            exact_i = exact(i)
        except (RuntimeError, TypeError):  # the model does not run in float64
            return reason
        why = _numeric(exact_i, got_i)
        if why is not None:
            return reason
    return None


def _numeric(ref: Captured, got: Captured) -> str | None:
    """The first map, output, activation or gradient of ``got`` beyond tolerance from ``ref``'s (None: none)."""
    pairs: list[tuple[str, Tensor, Tensor]] = [("the output", ref.output, got.output)]
    if ref.scores is not None and got.scores is not None:
        pairs.append(("the explained scores", ref.scores, got.scores))
    for name, a in ref.activations.items():
        pairs.append((f"the activation of {name!r}", a, got.activations[name]))
        ref_g, got_g = _first(ref.gradients.get(name)), _first(got.gradients.get(name))
        if ref_g is not None and got_g is not None:
            pairs.append((f"the gradient of {name!r}", ref_g, got_g))
        map_err = _map_error(a, got.activations[name], ref_g, got_g)
        if map_err > RTOL:
            return f"its map of {name!r} differs from the model's by {map_err:.1e} (more than {RTOL:g})"
    for what, r, o in pairs:
        err = _relative_error(r, o)
        if err > TENSOR_RTOL:
            return f"{what} differs from the model's by {err:.1e} of its largest value (more than {TENSOR_RTOL:g})"
    return None


def batch_first(*caps: Captured) -> bool:
    """Whether every tensor of the captures has the images along its first axis (so one image can be cut out)."""
    for cap in caps:
        batch = cap.output.shape[0] if cap.output.dim() else -1
        tensors = [*cap.activations.values(), *(t for g in cap.gradients.values() for t in _all(g))]
        if batch < 1 or any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
            return False
    return True


def _all(g: Gradients) -> list[Tensor]:
    return g if isinstance(g, list) else [g]


def _image(cap: Captured, i: int) -> Captured:
    """Image ``i`` of a capture (batch first; the explained scores Tensor[B] or Tensor[T, B])."""

    def grads(g: Gradients) -> Gradients:
        return [t[i : i + 1] for t in g] if isinstance(g, list) else g[i : i + 1]

    scores = cap.scores
    return Captured(
        output=cap.output[i : i + 1],
        activations={n: a[i : i + 1] for n, a in cap.activations.items()},
        gradients={n: grads(g) for n, g in cap.gradients.items()},
        scores=None if scores is None else scores[..., i : i + 1],
        order=list(cap.order),
        calls=dict(cap.calls),
    )


def _first(g: Gradients | None) -> Tensor | None:
    return g[0] if isinstance(g, list) else g


def check_map(a: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor]:
    """The map the check compares and its scale per image: Grad-CAM's sum_k mean(dS/dA_k) A_k with a gradient,
    else the channel sum of ``A``; the scale is the same sum of absolute values (the size of the terms that float
    rounding acts on). Token layouts (not Tensor[B, K, h, w]) compare ``A`` and the gradient alone."""
    if a.dim() != 4:
        return torch.zeros(1), torch.ones(1)
    a64 = a.detach().double()
    w = (
        torch.ones_like(a64[:, :, :1, :1])
        if g is None
        else g.detach().double().mean(dim=(2, 3), keepdim=True)
    )
    terms = w * a64
    scale = terms.abs().sum(dim=1).flatten(1).amax(dim=1).clamp_min(1e-30)
    return terms.sum(dim=1), scale[:, None, None]


def _map_error(a: Tensor, b: Tensor, ga: Tensor | None, gb: Tensor | None) -> float:
    """max |map_b - map_a| relative to the scale of ``a``'s map, per image (inf for other shapes or non-finite)."""
    if a.shape != b.shape:
        return float("inf")
    (ref, scale), (got, _) = check_map(a, ga), check_map(b, gb)
    diff = (got - ref).abs() / scale
    return float(diff.max()) if bool(torch.isfinite(diff).all()) else float("inf")


def _relative_error(ref: Tensor, out: Tensor) -> float:
    """max |out - ref| / max |ref| (inf for other shapes or non-finite values in other places)."""
    if ref.shape != out.shape:
        return float("inf")
    a, b = ref.detach().double(), out.detach().double()
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return float("inf")
    a, b = a[finite], b[finite]
    if not a.numel():
        return 0.0
    scale = float(a.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff
