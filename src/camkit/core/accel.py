"""Batched inference forwards of the perturbation methods and the metrics: the one place where they are made faster.

Every batch of perturbed inputs (Score-CAM's masked images, deletion/insertion steps, ...) goes through a
:class:`BatchForward`. It runs one of three paths, all on public PyTorch only:

* **default** (deterministic): on a copy of the model (never yours), every ``nn.BatchNorm2d`` that reads an
  ``nn.Conv2d``'s output is folded into that convolution (:func:`fold_weights`, computed in float64 and rounded
  once: one pass over each feature map less), and on CPU the inputs are sent channels-last (oneDNN's convolutions are
  faster on NHWC tensors and keep their input's layout, so the whole network runs NHWC). The first batch is checked
  ONCE against the model as given (its first :data:`CHECK_ROWS` rows, ``rtol=1e-3`` and ``atol=1e-4`` of the
  output's scale). Nothing is chosen by timing, so two identical calls give bitwise-identical outputs. A model
  whose code breaks under the fold or the layout (``.view`` on a feature map, a convolution output also used
  outside its BatchNorm) falls back to the next path: folded + channels-last, then channels-last alone, then the
  model as given. Each fallback emits one :class:`AccelWarning` naming the reason.
* **compiled** (``compile=...``, opt-in), one of three backends on a copy of the model:

  - ``"jit"``: the BatchNorm-folded copy in eval mode is traced with ``torch.jit.trace`` on an example batch, then
    ``torch.jit.freeze`` (weights become constants) and ``torch.jit.optimize_for_inference`` (conv/BatchNorm
    folding, oneDNN weight layouts on CPU). Preparing takes seconds. ``torch.jit``'s deprecation FutureWarnings
    are silenced inside this call (the user opted in). A trace that warns (``torch.jit.TracerWarning``:
    data-dependent control flow or values baked in as constants) counts as a failure.
  - ``"inductor"``: ``torch.compile`` with inductor's ``freezing`` (weights become constants: BatchNorm folding,
    weight pre-packing and layout choice happen at compile time). Compiling costs tens of seconds once.

  - ``"onnx"`` (CPU only; ``pip install 'camkit[onnx]'``): the BatchNorm-folded copy is exported for the batch
    shape with ``torch.onnx.export(..., dynamo=True)`` and run by an ONNX Runtime session (its CPU provider,
    ``torch.get_num_threads()`` threads, deterministic compute; its graph optimisations fuse convolutions with
    their activations). Preparing takes seconds. It is the fastest of the three on CPU (``docs/performance.md``).
    ONNX Runtime's outputs are new CPU tensors without gradients.

  ``compile=True`` means ``"onnx"`` on CPU where ONNX Runtime and onnxscript are installed, else ``"jit"`` (per
  batch as fast as inductor there, for a fraction of the preparation time, see ``benchmarks/README.md``), and
  ``"inductor"`` on other devices. Either is prepared once per model,
  dtype, device, memory format and batch size, and kept for the process; a smaller last batch is padded to the
  prepared batch size, so no second preparation happens. The first batch is checked against the model like the
  default path; a failure to prepare (a tracer warning, a compiler error, no ``torch.jit.freeze`` in this torch)
  or a disagreement warns once and falls back to the default path. No ONNX Runtime for ``"onnx"``, or an input
  off the CPU, counts as a failure to prepare. Worth it for many images of one model.
* **your callable** (``forward=f``): ``f(inputs)`` instead of the model, e.g. an ONNX Runtime session you wrapped
  (it must return what the model returns). It is used as given: no copy, no check.

Prepared copies and compiled models are cached per model (a weak reference: a model that is deleted frees its
copies). A cache entry is used only while the model is unchanged: the same modules, training flags and hooks;
each module's class, its class's ``forward`` and every plain attribute of the module (``eps``, ``momentum``,
``padding``, a ``forward`` set on the instance: numbers, strings and tuples by value, other objects by
identity); and each parameter and buffer the same tensor object, storage and version counter
(``Tensor._version``, which every in-place change bumps, ``load_state_dict`` and optimiser steps included). Not
covered, so call :func:`clear_cache` after them: writes through ``.data`` (they do not bump the version), changes
inside an object a module holds (a list, dict or config object changed in place), global hooks
(``register_module_forward_hook``) and patched functions the model calls (``torch.nn.functional``...).

Threads: the cache is lock-protected (one thread prepares and checks a path, the others then use it), the hooks a
concurrent camkit call has on the model (per-thread, :func:`camkit.core.capture.hook_forward`) do not count as a
change, and a copy never carries them. Prepared copies have no hooks and are run by several threads at once.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Collection, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar, cast

import torch
from torch import Tensor, nn

from camkit.core.capture import HOOK_LOCK, drop_thread_hooks, is_thread_hook
from camkit.errors import CamkitError

__all__ = [
    "CHECK_ROWS",
    "COMPILE_CHOICES",
    "AccelWarning",
    "BatchForward",
    "Compile",
    "FoldedNormAct",
    "OnnxForward",
    "cached",
    "check_compile",
    "clear_cache",
    "compile_backend",
    "compiled_forward",
    "float64_copy",
    "fold_batchnorm",
    "fold_weights",
    "one_lookup",
    "onnx_available",
    "peek",
    "scoped",
    "warn_once",
]

CHECK_ROWS = 2
"""Rows of the first batch that also run through the model as given, to check the faster path once."""

ModelForward = Callable[[Tensor], object]
T = TypeVar("T")

Compile = bool | Literal["jit", "inductor", "onnx"]
"""The ``compile`` setting: False (default path), True (the device's default backend), ``"jit"``, ``"inductor"``
or ``"onnx"``."""

COMPILE_CHOICES: tuple[Compile, ...] = (False, True, "jit", "inductor", "onnx")


def check_compile(value: object) -> None:
    """Raise ValueError unless ``value`` is one of :data:`COMPILE_CHOICES`."""
    if not (isinstance(value, bool) or (isinstance(value, str) and value in ("jit", "inductor", "onnx"))):
        raise CamkitError(f"compile must be False, True, 'jit', 'inductor' or 'onnx', got {value!r}")


def onnx_available() -> bool:
    """Whether the ``"onnx"`` backend can be prepared here: ONNX Runtime and onnxscript (the exporter's) are
    installed (``pip install 'camkit[onnx]'``)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnxscript"))


def compile_backend(value: Compile, device: torch.device) -> str:
    """The backend a ``compile`` setting (not False) means on ``device``: ``"jit"``, ``"inductor"`` or ``"onnx"``
    (True: ``"onnx"`` on CPU where ONNX Runtime is installed, else ``"jit"`` on CPU, ``"inductor"`` elsewhere)."""
    if value is True:
        if device.type != "cpu":
            return "inductor"
        return "onnx" if onnx_available() else "jit"
    return str(value)


class AccelWarning(UserWarning):
    """A faster forward path could not be used for a model; camkit runs a slower, equivalent one."""


# ------------------------------------------------------------------------------------------------- the cache


@dataclass
class _Path:
    """One prepared way to run the model: what to call, in which layout, and whether it was checked."""

    name: str
    run: (
        ModelForward | None
    )  # None: the user's model itself (not held here: the cache must not keep it alive)
    channels_last: bool
    pad_to: int | None = None  # compiled: the batch size it was compiled for
    checked: bool = False


@dataclass
class _Entry:
    signature: tuple[object, ...]
    paths: dict[Hashable, _Path] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    kept: dict[Hashable, object] = field(default_factory=dict)  # what :func:`cached` built


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()
"""Guards :data:`_CACHE` and every entry in it: one thread prepares (copies, folds, checks) a path, the others wait
and use it. Not held while a checked path runs."""


def clear_cache() -> None:
    """Forget every prepared copy and compiled model (they are rebuilt on next use)."""
    with _LOCK:
        _CACHE.clear()


def _version(t: Tensor) -> int:
    if t.is_inference():  # inference tensors have no version counter
        return -1
    return int(t._version)


_MODULE_STATE = frozenset(nn.Module().__dict__)
"""The attributes every module has (parameters, buffers, submodules, hook dictionaries): the signature reads them
through the module's own accessors, not as plain attributes."""


_PLAIN = frozenset({type(None), bool, int, str, bytes})


def _value(value: object) -> object:
    """A plain attribute as the signature holds it: numbers, strings and None by value (floats by their exact
    hex form, so that NaN equals itself), tuples item by item, tensors by identity, storage and version, other
    objects (a ``forward`` set on the instance, a callable, a list or dict the model keeps) by identity: a weak
    reference to them, or their type and id when they take none (never a strong reference: the cache must not keep
    the model alive). A mutable container is not read: a model that appends to a list in its ``forward`` keeps its
    prepared copy."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, tuple):
        if all(type(v) in _PLAIN for v in value):
            return value  # kernel_size, padding, ...: immutable, compared by value
        return kind, tuple(_value(v) for v in value)
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, Tensor):
        return _tensor(value)
    try:
        return weakref.ref(value)  # equal while the same object is alive; a dead one equals nothing new
    except TypeError:
        return kind, id(value)


def _tensor(t: Tensor) -> tuple[object, ...]:
    return id(t), t.data_ptr(), _version(t), t.dtype, t.device, tuple(t.shape)


def _hook_keys(hooks: dict[int, Callable[..., object]]) -> tuple[int, ...]:
    """The keys of a module's hook dictionary, without camkit's per-thread hooks (of another thread's call)."""
    if not hooks:
        return ()
    return tuple(k for k, fn in list(hooks.items()) if not is_thread_hook(fn))


def _signature(model: nn.Module) -> tuple[object, ...]:
    """What must not change for a prepared copy to stay valid (cheap: no pass over the weights' values).

    Per module: its identity, class and the class's ``forward``, training flag, hooks (not the per-thread hooks of
    a concurrent camkit call) and every plain attribute (``eps``, ``momentum``, ``padding``, a ``forward`` set on
    the instance...: :func:`_value`); per parameter and buffer (each once): identity, storage, version, dtype,
    device, shape.
    """
    modules = []
    tensors = []
    seen: set[int] = set()
    for m in model.modules():
        state = m.__dict__
        modules.append(
            (
                id(m),
                type(m),
                getattr(type(m), "forward", None),
                m.training,
                # another thread's camkit call may have its (per-thread) hooks on the model just now: not a change
                _hook_keys(m._forward_hooks),
                _hook_keys(m._forward_pre_hooks),
                tuple((k, _value(v)) for k, v in list(state.items()) if k not in _MODULE_STATE),
            )
        )
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is not None and id(t) not in seen:  # a shared parameter counts once, as in parameters()
                seen.add(id(t))
                tensors.append(_tensor(t))
    return tuple(modules), tuple(tensors)


_SCOPE = threading.local()
"""Per thread: the model whose cache entry :func:`one_lookup` holds, its entry and what :func:`scoped` computed."""


@contextmanager
def one_lookup(model: nn.Module) -> Iterator[None]:
    """Within this block, in this thread, ``model``'s cache entry is looked up (its signature computed) once, and
    :func:`scoped` computes each of its values once: for one camkit call, during which the model does not change
    (a call that changes the model it explains is not supported anyway). Nested blocks share the outer one's."""
    if getattr(_SCOPE, "model", None) is not None:
        yield
        return
    _SCOPE.model, _SCOPE.entry, _SCOPE.values = model, None, {}
    try:
        yield
    finally:
        _SCOPE.model = _SCOPE.entry = _SCOPE.values = None


def scoped(model: nn.Module, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, computed once per :func:`one_lookup` block of ``model`` in this thread (every time outside
    one)."""
    if getattr(_SCOPE, "model", None) is not model:
        return compute()
    values = cast(dict[Hashable, object], _SCOPE.values)
    if key not in values:
        values[key] = compute()
    return cast(T, values[key])


def _entry(model: nn.Module) -> _Entry:
    if getattr(_SCOPE, "model", None) is model and _SCOPE.entry is not None:
        with _LOCK:
            if _CACHE.get(model) is _SCOPE.entry:  # not replaced by another thread meanwhile
                return cast(_Entry, _SCOPE.entry)
    entry = _lookup(model)
    if getattr(_SCOPE, "model", None) is model:
        _SCOPE.entry = entry
    return entry


def _lookup(model: nn.Module) -> _Entry:
    sig = _signature(model)
    with _LOCK:
        entry = _CACHE.get(model)
        if entry is None or entry.signature != sig:
            entry = _Entry(sig)
            _CACHE[model] = entry
        return entry


def _warn_once(entry: _Entry, reason: str) -> None:
    with _LOCK:
        first = reason not in entry.warned
        entry.warned.add(reason)
    if first:
        warnings.warn(reason, AccelWarning, stacklevel=4)


def cached(model: nn.Module, key: Hashable, build: Callable[[], T]) -> T:
    """What ``build()`` returns, built once per model and ``key`` (by one thread; the others wait for it) and kept
    while the model is unchanged, like the prepared copies (a changed model gets a fresh build). ``build``'s
    result must not hold a strong reference to ``model`` (the cache would keep it alive)."""
    entry = _entry(model)
    with _LOCK:
        if key not in entry.kept:
            entry.kept[key] = build()
        return cast(T, entry.kept[key])


def peek(model: nn.Module, key: Hashable) -> object | None:
    """What :func:`cached` built for ``model`` and ``key`` while the model is unchanged, or None (nothing built)."""
    entry = _entry(model)
    with _LOCK:
        return entry.kept.get(key)


def warn_once(model: nn.Module, reason: str) -> None:
    """Emit ``reason`` as an :class:`AccelWarning` the first time it is given for ``model`` (while it is unchanged)."""
    _warn_once(_entry(model), reason)


# ------------------------------------------------------------------------------------------------- folding


def _copy(model: nn.Module, share: bool = False) -> nn.Module:
    """A deep copy for inference, without gradients. ``share``: the copy's parameters are new ``Parameter``
    objects (``requires_grad=False``) over the model's own storage, not copies of it (no memory for them; the
    caller must never write into them); buffers are copied either way."""
    return _twin(model, (lambda p: p.detach()) if share else None)


def float64_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in float64 (parameters and floating-point buffers), without gradients; its parameters
    are made in float64 directly, with no transient float32 copy."""
    return _twin(
        model, lambda p: p.detach().double() if p.is_floating_point() else p.detach().clone()
    ).double()


def _twin(model: nn.Module, param: Callable[[Tensor], Tensor] | None) -> nn.Module:
    """A deep copy without gradients and without camkit's per-thread hooks; ``param`` (if given) makes each of
    the copy's parameters from the model's instead of a deep copy."""
    memo: dict[int, object] = {}
    if param is not None:
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(param(p), requires_grad=False)
    with HOOK_LOCK:  # no other thread adds or removes a hook while the copy walks the hook dictionaries
        twin = copy.deepcopy(model, memo)
    drop_thread_hooks(twin)  # another thread's call may have had its hooks on the model: not on the copy
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class FoldedNormAct(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once its BatchNorm is folded into the convolution before it: its
    dropout and activation, under the same names (``drop``, ``act``), so that a layer name such as ``bn2.act``
    still names the same module in the copy."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.act(self.drop(x))
        return out


def _foldable_norm(m: nn.Module) -> bool:
    """An eval-able BatchNorm with running statistics: exactly ``nn.BatchNorm2d``, or timm's ``BatchNormAct2d``
    (BatchNorm, then its ``drop`` and ``act`` modules)."""
    if not isinstance(m, nn.BatchNorm2d) or m.running_mean is None or m.running_var is None:
        return False
    kind = type(m)
    if kind is nn.BatchNorm2d:
        return True
    return (
        kind.__name__ == "BatchNormAct2d"
        and kind.__module__.split(".")[0] == "timm"
        and isinstance(getattr(m, "drop", None), nn.Module)
        and isinstance(getattr(m, "act", None), nn.Module)
    )


def _after_fold(norm: nn.BatchNorm2d) -> nn.Module:
    """The module that takes a folded BatchNorm's place: nothing, or a ``BatchNormAct2d``'s dropout and activation."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    drop, act = getattr(norm, "drop"), getattr(norm, "act")  # noqa: B009 - checked by _foldable_norm
    return FoldedNormAct(drop, act)


def fold_batchnorm(
    model: nn.Module, example: Tensor, keep: Collection[str] = (), share: bool = False
) -> tuple[nn.Module, int]:
    """A copy of ``model`` in which each ``nn.BatchNorm2d`` or timm ``BatchNormAct2d`` (with running statistics,
    called once per forward) that receives an ``nn.Conv2d``'s output (that conv called once) is folded into the
    conv (:func:`fold_weights`: computed in float64, rounded once), and the number of folds. The BatchNorm is
    replaced by ``nn.Identity`` (a ``BatchNormAct2d`` by :class:`FoldedNormAct`, its dropout and activation);
    module names stay valid in the copy.

    One forward of ``example`` (one image) on the copy finds the pairs. The caller must check the copy's outputs:
    a conv output that is also used elsewhere (a skip connection before the BatchNorm) makes it differ.

    Args:
        model: the model (not modified).
        example: an input of one image.
        keep: names of modules whose output must stay what the model computes (target layers): a convolution named
            here is not folded (a BatchNorm named here may be: the module in its place returns its output).
        share: the copy's unfolded parameters share the model's storage (:func:`_copy`); the folded weights are
            new tensors either way, made without a transient copy of the convolution.

    Raises:
        TypeError, RuntimeError, copy.Error: the model cannot be deep-copied or run on ``example``.
    """
    twin = _copy(model, share)
    kept = {id(twin.get_submodule(name)) for name in keep if _has(twin, name)}
    convs: set[nn.Module] = {m for m in twin.modules() if type(m) is nn.Conv2d and id(m) not in kept}
    norms = {m for m in twin.modules() if _foldable_norm(m)}
    if not convs or not norms:
        return twin, 0
    pairs = _find_pairs(twin, convs, norms, example)
    names = {id(m): name for name, m in twin.named_modules()}
    for conv, norm in pairs:
        weight, bias = fold_weights(conv, norm)
        conv.eval()
        conv.weight = nn.Parameter(
            weight, requires_grad=False
        )  # the copy's own conv: the model's is untouched
        conv.bias = nn.Parameter(bias, requires_grad=False)
        parent, _, child = names[id(norm)].rpartition(".")
        setattr(twin.get_submodule(parent), child, _after_fold(norm))
    return twin, len(pairs)


def fold_weights(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The weight and bias of ``norm(conv(x))`` as one convolution, in the conv's dtype: ``w * s`` and
    ``(b - mean) * s + beta`` per output channel, ``s = gamma / sqrt(var + eps)``, computed in float64 (float32 on
    devices without it) and rounded once."""
    w = conv.weight.detach()
    wide = torch.float32 if w.device.type == "mps" else torch.float64
    mean, var = cast(Tensor, norm.running_mean).to(wide), cast(Tensor, norm.running_var).to(wide)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().to(wide)
    shift = -mean if conv.bias is None else conv.bias.detach().to(wide) - mean
    bias = shift * scale + (0 if norm.bias is None else norm.bias.detach().to(wide))
    weight = w.to(wide) * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return weight.to(w.dtype), bias.to(w.dtype)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _find_pairs(
    twin: nn.Module, convs: set[nn.Module], norms: set[nn.Module], example: Tensor
) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """:func:`_conv_norm_pairs`, found first on a copy of ``twin`` on the meta device (shapes only: no memory, no
    arithmetic), else (a model that does not run on meta tensors: data-dependent code, ``.item()``, a tensor
    attribute that is not a buffer...) on ``twin`` itself."""
    try:
        meta = _meta_copy(twin)
        back = {id(m): t for m, t in zip(meta.modules(), twin.modules(), strict=True)}
        to_meta = {id(t): m for m, t in zip(meta.modules(), twin.modules(), strict=True)}
        found = _conv_norm_pairs(
            meta, {to_meta[id(c)] for c in convs}, {to_meta[id(n)] for n in norms}, example.to("meta")
        )
    except Exception:  # any failure on meta tensors: find them on the real copy
        return _conv_norm_pairs(twin, convs, norms, example)
    return [(cast(nn.Conv2d, back[id(c)]), cast(nn.BatchNorm2d, back[id(n)])) for c, n in found]


def _meta_copy(twin: nn.Module) -> nn.Module:
    """A copy of ``twin`` whose parameters and buffers are on the meta device (no data)."""
    with torch.inference_mode(False):
        memo: dict[int, object] = {
            id(p): nn.Parameter(p.detach().to("meta"), False) for p in twin.parameters()
        }
        memo.update({id(b): b.detach().to("meta") for b in twin.buffers()})
        return copy.deepcopy(twin, memo)


def _conv_norm_pairs(
    twin: nn.Module, convs: set[nn.Module], norms: set[nn.Module], example: Tensor
) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The (conv, BatchNorm) pairs of ``twin`` where the BatchNorm reads the conv's output, each called once, the
    BatchNorm in eval mode: one forward of ``example`` with hooks on the private copy."""
    produced: dict[int, nn.Conv2d] = {}
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(m: nn.Module, _i: object, out: object) -> None:
        calls[m] = calls.get(m, 0) + 1
        if isinstance(out, Tensor) and isinstance(m, nn.Conv2d):
            produced[id(out)] = m

    def before_norm(m: nn.Module, inputs: tuple[object, ...]) -> None:
        calls[m] = calls.get(m, 0) + 1
        conv = produced.get(id(inputs[0])) if inputs else None
        if conv is not None and isinstance(m, nn.BatchNorm2d):
            pairs.append((conv, m))

    keep: list[object] = []  # the conv outputs stay alive during the forward, so their ids are unique

    def keep_alive(_m: nn.Module, _i: object, out: object) -> None:
        keep.append(out)

    # hooks on the private copy (no other thread sees it yet), not on the user's model
    handles = [m.register_forward_hook(after_conv) for m in convs]
    handles += [m.register_forward_hook(keep_alive) for m in convs]
    handles += [m.register_forward_pre_hook(before_norm) for m in norms]
    try:
        with torch.inference_mode():
            twin(example)
    finally:
        for h in handles:
            h.remove()
        keep.clear()
    # training-mode BatchNorms normalise with batch statistics: not foldable
    return [(c, n) for c, n in pairs if calls.get(c) == 1 and calls.get(n) == 1 and not n.training]


def _agree(ref: Tensor, out: Tensor) -> bool:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    a, b = ref.float(), out.float()
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return False
    if not bool(finite.all()):
        a, b = a[finite], b[finite]
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-6)))


# ------------------------------------------------------------------------------------------------- compiling


def _compile_model(module: nn.Module) -> ModelForward:
    """``torch.compile`` with inductor's freezing (weights as constants: BatchNorms folded, weights packed)."""
    return torch.compile(module, dynamic=False, options={"freezing": True})


class _NotPrepared(Exception):
    """A compiled path could not be prepared (the message says why)."""


def _trace_model(module: nn.Module, example: Tensor) -> ModelForward:
    """``torch.jit.trace`` of ``module`` (a folded copy in eval mode) on ``example``, frozen and optimised for
    inference. ``torch.jit``'s deprecation FutureWarnings are silenced; a ``TracerWarning`` raises _NotPrepared,
    other warnings pass through.

    Raises:
        _NotPrepared: no ``torch.jit.freeze``/``optimize_for_inference`` in this torch, or the trace warned.
        RuntimeError, TypeError: tracing or freezing failed.
    """
    jit = getattr(torch, "jit", None)
    trace = getattr(jit, "trace", None)
    freeze = getattr(jit, "freeze", None)
    optimize = getattr(jit, "optimize_for_inference", None)
    if trace is None or freeze is None or optimize is None:
        raise _NotPrepared("this torch has no torch.jit.trace/freeze/optimize_for_inference")
    tracer_warning = getattr(jit, "TracerWarning", None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        traced = trace(module.eval(), example, check_trace=False)
        prepared: ModelForward = optimize(freeze(traced))
    bad = [w for w in seen if tracer_warning is not None and issubclass(w.category, tracer_warning)]
    for w in seen:
        if w not in bad:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if bad:
        raise _NotPrepared(f"tracing it warned ({bad[0].message})")
    return prepared


class OnnxForward:
    """A module exported to ONNX for one input shape and run by an ONNX Runtime session on CPU: takes a Tensor
    shaped like the export's example, returns what the module returned (a Tensor, or a tuple of Tensors) as CPU
    tensors without gradients. Several threads may call it at once (ONNX Runtime's ``run`` is thread-safe and
    releases the GIL)."""

    def __init__(self, session: object, single: bool) -> None:
        self.session = session
        self.single = single
        inputs = session.get_inputs()  # type: ignore[attr-defined]
        self.input = str(inputs[0].name)

    def __call__(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        array = x.detach().contiguous().numpy()
        outs = self.session.run(None, {self.input: array})  # type: ignore[attr-defined]
        tensors = tuple(torch.from_numpy(o) for o in outs)
        return tensors[0] if self.single else tensors


def _onnx_model(module: nn.Module, example: Tensor) -> ModelForward:
    """``module`` (a folded copy in eval mode, or a split's prefix) exported to ONNX with ``torch.onnx.export``
    (``dynamo=True``: ``torch.export``, then onnxscript) for ``example``'s shape and run by ONNX Runtime's CPU
    provider with ``torch.get_num_threads()`` threads and its deterministic compute. Seconds to prepare.

    Raises:
        _NotPrepared: ONNX Runtime or onnxscript is missing, the input is not on the CPU, or the module's output is
            not a Tensor or a tuple/list of Tensors.
        Exception: the export or the session failed (an operator ONNX has no export for...).
    """
    if example.device.type != "cpu":
        raise _NotPrepared(f"the onnx backend runs on the CPU only, the input is on {example.device}")
    if not onnx_available():
        raise _NotPrepared("ONNX Runtime or onnxscript is not installed (pip install 'camkit[onnx]')")
    import onnxruntime as ort

    with torch.inference_mode(False):
        ex = example.detach().clone().contiguous()
        with torch.no_grad():
            out = module(ex)
        if isinstance(out, Tensor):
            single = True
        elif isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) for o in out):
            single = False
        else:
            raise _NotPrepared(f"its output is a {type(out).__name__}, not a Tensor or a tuple of Tensors")
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # the exporter's notes on its own internals: not the user's concern
            program = torch.onnx.export(module, (ex,), dynamo=True, verbose=False)
        if program is None:
            raise _NotPrepared("torch.onnx.export returned no program")
        proto = program.model_proto.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = True
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are not the user's concern
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return OnnxForward(session, single)


def compiled_forward(module: nn.Module, example: Tensor, backend: str) -> ModelForward:
    """``module`` (a copy in eval mode, for inference) prepared by ``backend``: ``"jit"`` (a frozen trace on
    ``example``, optimised for inference: seconds), ``"inductor"`` (``torch.compile`` with freezing, compiled on
    its first call: tens of seconds) or ``"onnx"`` (exported for ``example``'s shape and run by ONNX Runtime on
    the CPU: seconds).

    Raises:
        Exception: any failure to prepare it (a tracer warning, a compiler error, no ONNX Runtime); the message
            says why.
    """
    if backend == "inductor":
        return _compile_model(module)
    if backend == "onnx":
        return _onnx_model(module, example)
    return _trace_model(module, example)


# ------------------------------------------------------------------------------------------------- the forward


class BatchForward:
    """``output_fn(model(inputs))`` for batches of perturbed inputs, through the fastest path allowed.

    Args:
        model: the model, in eval mode; never modified (faster paths run on copies).
        output_fn: turns the model's output into the Tensor that is scored.
        channels_last: None (default): channels-last inputs on CPU; True: on any device; False: never (and no
            BatchNorm folding either: the model as given).
        compile: False (default): the default path; ``"jit"``: a traced, frozen copy; ``"inductor"``: a
            ``torch.compile``'d copy; True: ``"jit"`` on CPU, ``"inductor"`` elsewhere. Prepared once per model
            and batch shape, then reused in the process.
        forward: a callable used instead of the model (no copy, no check); its output goes through ``output_fn``.
        batch: the usual number of rows per call, for ``compile``: the copy is prepared for that batch size and
            smaller batches are padded to it (default: the first batch's size).

    Attributes:
        path: the path that ran the last batch: ``"jit"``, ``"inductor"``, ``"folded+channels-last"``,
            ``"folded"``, ``"channels-last"``, ``"plain"`` or ``"forward"``.

    Example:
        >>> fwd = BatchForward(model, lambda out: out)  # doctest: +SKIP
        >>> with torch.inference_mode():  # doctest: +SKIP
        ...     logits = fwd(batch)
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: Callable[[object], Tensor],
        *,
        channels_last: bool | None = None,
        compile: Compile = False,
        forward: ModelForward | None = None,
        batch: int | None = None,
    ) -> None:
        if channels_last not in (None, True, False):
            raise CamkitError(f"channels_last must be None, True or False, got {channels_last!r}")
        check_compile(compile)
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable Tensor[N, C, H, W] -> model output, got {forward!r}")
        self.model = model
        self.output_fn = output_fn
        self.channels_last = channels_last
        self.compile = compile
        self.forward = forward
        self.batch = batch
        self.path: str | None = None

    def __call__(self, inputs: Tensor) -> Tensor:
        if self.forward is not None:
            self.path = "forward"
            return self.output_fn(self.forward(inputs))
        if inputs.dim() != 4 or (self.channels_last is False and not self.compile):
            self.path = "plain"
            return self.output_fn(self.model(inputs))
        entry = _entry(self.model)
        if self.compile:
            out = self._compiled(entry, inputs)
            if out is not None:
                return out
        return self._default(entry, inputs)

    # -- default path

    def _layout(self, inputs: Tensor) -> bool:
        return self.channels_last is True or (self.channels_last is None and inputs.device.type == "cpu")

    def _default(self, entry: _Entry, inputs: Tensor) -> Tensor:
        nhwc = self._layout(inputs) and self.channels_last is not False
        key = ("default", inputs.device, inputs.dtype, nhwc)
        with _LOCK:  # one thread prepares the path, the others use it
            path = entry.paths.get(key)
            if path is None:
                path = self._prepare_default(entry, inputs, nhwc)
                entry.paths[key] = path
        self.path = path.name
        return self._run_checked(entry, path, inputs, key)

    def _prepare_default(self, entry: _Entry, inputs: Tensor, nhwc: bool) -> _Path:
        if self.channels_last is False:
            return _Path("plain", None, False, checked=True)
        try:
            folded, n = fold_batchnorm(self.model, inputs[:1])
        except (TypeError, RuntimeError, copy.Error) as err:
            _warn_once(
                entry,
                f"camkit.core.accel: BatchNorm folding skipped, the model could not be copied/run ({err})",
            )
            folded, n = None, 0
        if folded is not None and n:
            return _Path("folded+channels-last" if nhwc else "folded", folded, nhwc)
        if nhwc:
            return _Path("channels-last", None, True)
        return _Path("plain", None, False, checked=True)

    def _fallback(self, path: _Path) -> _Path | None:
        if path.name == "folded+channels-last":
            return _Path("channels-last", None, True)
        if path.name in ("folded", "channels-last"):
            return _Path("plain", None, False, checked=True)
        return None  # jit/inductor: the caller falls back to the default path

    def _run_checked(self, entry: _Entry, path: _Path, inputs: Tensor, key: Hashable) -> Tensor:
        if path.checked:
            return self._run(path, inputs)
        with _LOCK:  # the first batch is checked (and a failed path replaced) by one thread at a time
            path = entry.paths.get(key, path)
            self.path = path.name
            return self._check_first(entry, path, inputs, key)

    def _check_first(self, entry: _Entry, path: _Path, inputs: Tensor, key: Hashable) -> Tensor:
        while True:
            if path.checked:
                return self._run(path, inputs)
            try:
                out = self._run(path, inputs)
            except RuntimeError as err:  # e.g. ``.view`` on a channels-last feature map
                reason = f"it raised {type(err).__name__}: {err}"
            else:
                rows = min(CHECK_ROWS, inputs.shape[0])
                ref = self.output_fn(self.model(inputs[:rows]))
                if out.dim() and _agree(ref, out[:rows]):
                    path.checked = True
                    return out
                reason = "its outputs differ from the model's (layout- or BatchNorm-dependent code?)"
            nxt = self._fallback(path)
            _warn_once(
                entry,
                f"camkit.core.accel: the {path.name} forward of {type(self.model).__name__} is not used, {reason}; "
                f"running it {'as ' + nxt.name if nxt else 'on the default (uncompiled) path'} instead",
            )
            if nxt is None:
                raise _Fallback
            path = nxt
            entry.paths[key] = path
            self.path = path.name

    def _run(self, path: _Path, inputs: Tensor) -> Tensor:
        x = inputs.contiguous(memory_format=torch.channels_last) if path.channels_last else inputs
        n = x.shape[0]
        run = self.model if path.run is None else path.run
        if path.pad_to is not None and n < path.pad_to:
            fmt = torch.channels_last if path.channels_last else torch.contiguous_format
            x = torch.cat([x, x.new_zeros(path.pad_to - n, *x.shape[1:])]).contiguous(memory_format=fmt)
            return self.output_fn(run(x))[:n]
        return self.output_fn(run(x))

    # -- compiled path

    def _backend(self, inputs: Tensor) -> str:
        return compile_backend(self.compile, inputs.device)

    def _compiled(self, entry: _Entry, inputs: Tensor) -> Tensor | None:
        backend = self._backend(inputs)
        nhwc = self._layout(inputs) and backend == "inductor"  # jit: optimize_for_inference picks the layout
        if self.batch is None:
            self.batch = inputs.shape[0]
        key = (backend, inputs.device, inputs.dtype, nhwc, self.batch)
        with _LOCK:
            path = entry.paths.get(key)
            if path is None:
                path = self._prepare_compiled(entry, backend, inputs, nhwc)
                entry.paths[key] = path
        if path.name != backend:
            return None  # an earlier failure: the default path
        if path.pad_to is not None and inputs.shape[0] > path.pad_to:
            return torch.cat([self._one_compiled(entry, part) for part in inputs.split(path.pad_to)])
        self.path = backend
        try:
            return self._run_checked(entry, path, inputs, key)
        except _Fallback:
            with _LOCK:
                entry.paths[key] = _Path("failed", None, False)
            return None

    def _prepare_compiled(self, entry: _Entry, backend: str, inputs: Tensor, nhwc: bool) -> _Path:
        assert self.batch is not None
        try:
            if backend == "inductor":
                return _Path(
                    backend, compiled_forward(_copy(self.model), inputs, backend), nhwc, pad_to=self.batch
                )
            folded, _ = fold_batchnorm(self.model, inputs[:1])
            example = inputs[: self.batch]
            if example.shape[0] < self.batch:
                example = torch.cat(
                    [example, example.new_zeros(self.batch - example.shape[0], *example.shape[1:])]
                )
            return _Path(
                backend, compiled_forward(folded, example.contiguous(), backend), False, pad_to=self.batch
            )
        except Exception as err:  # any model the tracer or compiler cannot take: the default path
            why = str(err) if isinstance(err, _NotPrepared) else f"{type(err).__name__}: {err}"
            _warn_once(
                entry,
                f"camkit.core.accel: the {backend} forward of {type(self.model).__name__} is not used, it could not be "
                f"prepared: {why}; running it on the default (uncompiled) path instead",
            )
            return _Path("failed", None, False)

    def _one_compiled(self, entry: _Entry, inputs: Tensor) -> Tensor:
        out = self._compiled(entry, inputs)
        return self._default(entry, inputs) if out is None else out


class _Fallback(Exception):
    """The compiled path failed its check: use the default path."""
