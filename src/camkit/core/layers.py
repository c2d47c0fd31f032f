"""Target layers: by dotted name, by module, several at once, or found automatically.

The automatic choice is the last *spatial feature map* before global pooling: among the modules whose output can
be read as Tensor[B, K, h, w] with h*w > 1 (token and channels-last outputs included, see :mod:`camkit.core.tokens`),
the one that finishes last in the forward pass, skipping pooling, dropout, identity and flatten modules, containers
whose output is the output of such a module, and modules called more than once per forward. A naive "last 4-D
output" would pick VGG's ``avgpool`` (AdaptiveAvgPool2d(7) still outputs 7x7) or a container ending in a pooling
layer; here VGG16 gets ``features.29``, ResNet ``layer4``, timm EfficientNet ``bn2``. Two refinements:

* attention models (a module whose class name contains ``Attention``): the last map that finishes before the
  *last attention module starts*, i.e. the input of the last attention (timm ViT/DeiT ``blocks.11.norm1``,
  torchvision ViT ``encoder.layers.encoder_layer_11.ln_1``, Swin ``...blocks[-1].norm1``). With class-token
  pooling the patch tokens after the last attention no longer reach the output: their gradient is exactly 0
  (pytorch-grad-cam's docs recommend ``blocks[-1].norm1`` for the same reason).
* models with a ``backbone`` (torchvision detection and segmentation; transformers DETR and UperNet, whose
  backbone is ``model.model.backbone`` / ``model.backbone`` in camkit's view): the backbone's last map
  (``backbone.body`` for feature-pyramid backbones), which every box / pixel depends on, not a head's class-score
  map.
"""

from __future__ import annotations

import difflib
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camkit.core.capture import hook_forward
from camkit.core.tokens import Layout, infer_layout, prefix_tokens, suffix_tokens, unwrap
from camkit.errors import CamkitError

__all__ = ["LayerInfo", "LayerSpec", "auto_layer", "describe_layers", "resolve_layers"]

LayerSpec = str | nn.Module | Sequence[str | nn.Module]

_SKIP_TYPES = ("Pool", "Dropout", "Identity", "Flatten", "DropPath")


@dataclass(frozen=True)
class LayerInfo:
    """One hookable layer as seen in a forward pass.

    Attributes:
        name: dotted name (``layer4.2.conv3``).
        type: class name of the module.
        shape: output shape for one image (without batch), or None when the output is not a tensor.
        calls: how many times the module ran in one forward.
        order: the rank at which the module finished its (last) call.
        passthrough: pooling / dropout / identity / flatten, or a container whose output is such a module's
            output: never chosen automatically.
        layout: how the output reads as [B, K, h, w] (:class:`camkit.core.tokens.Layout`), None if it cannot.
        start: the rank at which the module's (last) call started.
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    calls: int
    order: int
    passthrough: bool = False
    layout: Layout | None = None
    start: int = -1

    @property
    def spatial(self) -> tuple[int, int, int] | None:
        """(K, h, w) of the output read as a feature map, or None."""
        return self.layout.spatial_shape if self.layout is not None else None


def _is_skipped(module: nn.Module) -> bool:
    name = type(module).__name__
    return any(s in name for s in _SKIP_TYPES)


@dataclass
class _Trace:
    """What the trace saw of one module (updated by each of its calls)."""

    module: nn.Module
    calls: int = 0
    order: int = -1  # rank at which its last call finished
    out_id: int = 0  # id() of its last output
    full_shape: tuple[int, ...] | None = (
        None  # shape of its last output (with the batch), None if not a tensor
    )


class _Tracer:
    """Forward (pre-)hooks that rank every module's start and finish in one forward pass."""

    def __init__(self) -> None:
        self.records: dict[str, _Trace] = {}
        self.starts: dict[str, int] = {}
        self.counter = 0
        self.keep: list[object] = []  # keep outputs alive so that id() stays unique during the trace

    def pre_hook(self, name: str) -> Callable[[nn.Module, object], None]:
        def pre_hook(_m: nn.Module, _i: object) -> None:
            self.starts[name] = self.counter
            self.counter += 1

        return pre_hook

    def hook(self, name: str, module: nn.Module) -> Callable[[nn.Module, object, object], None]:
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            self.keep.append(out)
            rec = self.records.setdefault(name, _Trace(module))
            rec.calls += 1
            rec.order = self.counter
            rec.out_id = id(out)
            rec.full_shape = tuple(out.shape) if isinstance(out, Tensor) else None
            self.counter += 1

        return hook


def _layout_of(model: nn.Module, rec: _Trace, size: tuple[int, int]) -> Layout | None:
    """How one traced output (batch 1) reads as a feature map: the model's prefix and suffix tokens, and its
    channels-last flag (Keras models, :class:`camkit.adapters.keras.KerasModel`)."""
    assert rec.full_shape is not None
    channels_last = bool(getattr(model, "channels_last", False))
    return infer_layout(
        rec.full_shape,
        size,
        batch=1,
        prefix=prefix_tokens(model),
        module=rec.module,
        channels_last=channels_last,
        suffix=suffix_tokens(model),
    )


def describe_layers(model: nn.Module, example: Tensor) -> list[LayerInfo]:
    """Trace one forward (no grad) and describe every submodule that ran, in finish order.

    Args:
        model: the network (not modified; hooks are removed on return).
        example: an input batch, Tensor[B, C, H, W] (only the first image is used).
    """
    model = unwrap(model)  # a Keras model: its view with the Keras layers by name
    tracer = _Tracer()
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                # per-thread hooks: another thread's forward is neither traced nor changed
                handles.append(hook_forward(module, tracer.pre_hook(name), pre=True))
                handles.append(hook_forward(module, tracer.hook(name, module)))
        with torch.inference_mode():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    records = tracer.records
    # A module is a passthrough if it is a pooling/dropout/identity/flatten module, or a container whose last
    # finished descendant is a passthrough returning the very same tensor (VGG's `features` ends in a MaxPool).
    passthrough: dict[str, bool] = {}
    for name, rec in sorted(records.items(), key=lambda kv: kv[1].order):
        if _is_skipped(rec.module):
            passthrough[name] = True
            continue
        prefix = name + "."
        children = [(r.order, n) for n, r in records.items() if n.startswith(prefix)]
        before = [c for c in children if c[0] < rec.order]
        if before:
            last = max(before)[1]
            passthrough[name] = passthrough.get(last, False) and records[last].out_id == rec.out_id
        else:
            passthrough[name] = False
    size = (int(example.shape[-2]), int(example.shape[-1]))

    def layout(rec: _Trace) -> Layout | None:
        return None if rec.full_shape is None else _layout_of(model, rec, size)

    infos = [
        LayerInfo(
            name=name,
            type=type(rec.module).__name__,
            shape=None if rec.full_shape is None else rec.full_shape[1:],
            calls=rec.calls,
            order=rec.order,
            passthrough=passthrough[name],
            layout=layout(rec),
            start=tracer.starts.get(name, -1),
        )
        for name, rec in records.items()
    ]
    infos.sort(key=lambda i: i.order)
    return infos


_AUTO_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], str]] = weakref.WeakKeyDictionary()
_AUTO_LOCK = threading.Lock()  # guards _AUTO_CACHE (not held during the trace: threads trace concurrently)


def _is_attention(info: LayerInfo) -> bool:
    return "Attention" in info.type


def _backbone_scopes(names: set[str]) -> tuple[str, ...]:
    """Where the backbone's maps live: ``backbone.body.``, ``backbone.``, or the same under the shallowest module
    named ``backbone`` (transformers detection and segmentation models: ``model.model.backbone.``)."""
    nested = [n for n in names if n == "backbone" or n.endswith(".backbone")]
    if not nested:
        return ()
    top = min(nested, key=lambda n: (n.count("."), n))
    return (f"{top}.body.", f"{top}.")


def pick_auto(infos: list[LayerInfo], model: nn.Module | None = None) -> str | None:
    """The automatic choice among traced layers (see the module docstring), or None; the layer ``model`` names in
    ``camkit_auto_layer`` when it names one (see :func:`auto_layer`)."""
    declared = getattr(unwrap(model), "camkit_auto_layer", None) if model is not None else None
    if isinstance(declared, str) and declared:
        return _canonical(unwrap(model), declared)  # type: ignore[arg-type]
    candidates = [
        i
        for i in infos
        if not i.passthrough
        and i.layout is not None
        and i.calls == 1
        and i.layout.grid[0] * i.layout.grid[1] > 1
    ]
    names = {i.name for i in infos}
    for scope in _backbone_scopes(names):
        if any(n.startswith(scope) for n in names):
            inside = [i for i in candidates if i.name.startswith(scope)]
            if inside:
                candidates = inside
                break
    attention = [i for i in infos if _is_attention(i) and i.start >= 0]
    if attention:
        last = max(attention, key=lambda i: i.order)
        before = [i for i in candidates if i.order < last.start]
        if before:
            candidates = before
    best = max(candidates, key=lambda i: i.order, default=None)
    return best.name if best else None


def auto_layer(model: nn.Module, example: Tensor) -> str:
    """Name of the automatic target layer for ``model`` on inputs shaped like ``example``.

    Cached per model and input shape (one extra batch-1 forward the first time; two threads asking at once may
    both trace, and get the same name). A model that names its layer in a ``camkit_auto_layer`` attribute gets
    that one, untraced (the transformers MobileViT view: its transformer blocks run on unfolded patches, whose
    tokens a trace cannot tell from a feature map).
    """
    model = unwrap(model)
    declared = getattr(model, "camkit_auto_layer", None)
    if isinstance(declared, str) and declared:
        return _canonical(model, declared)
    key = (tuple(example.shape[1:]), example.dtype, str(example.device))
    with _AUTO_LOCK:
        cached = _AUTO_CACHE.get(model, {}).get(key)
    if cached is not None:
        return cached
    infos = describe_layers(model, example)
    name = pick_auto(infos)
    if name is None:
        raise CamkitError(
            "could not find a spatial feature map (an output readable as Tensor[B, K, h, w] with h*w > 1: "
            "NCHW, channels-last or tokens) in this model; pass layers=... and, for an unusual layout, reshape=..."
        )
    with _AUTO_LOCK:
        _AUTO_CACHE.setdefault(model, {})[key] = name
    return name


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return str(name)  # named_modules() is untyped in torch
    raise CamkitError(f"the module {type(module).__name__} passed as a target layer is not part of the model")


def _canonical(model: nn.Module, name: str) -> str:
    """Accept names with or without the ``module.`` (DataParallel) / ``_orig_mod.`` (torch.compile) prefixes."""
    if name:
        try:
            model.get_submodule(name)  # the usual case, without a walk over every module
            return name
        except AttributeError:
            pass
    names = {n for n, _ in model.named_modules() if n}
    if name in names:
        return name
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix) and name[len(prefix) :] in names:
            return name[len(prefix) :]
        if prefix + name in names:
            return prefix + name
    return name


def _get(model: nn.Module, name: str) -> nn.Module:
    names = [n for n, _ in model.named_modules() if n]
    name = _canonical(model, name)
    if name in names:
        return model.get_submodule(name)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Closest matches: {', '.join(close)}." if close else ""
    raise CamkitError(
        f"unknown layer {name!r} in {type(model).__name__}.{hint} "
        "List the hookable layers with `camkit layers MODEL` or camkit.describe_layers(model, x)."
    )


def resolve_layers(model: nn.Module, spec: LayerSpec, example: Tensor) -> dict[str, nn.Module]:
    """Turn a layer spec into ``{dotted name: module}`` in the order given.

    Args:
        model: the network.
        spec: ``"auto"``, a dotted name, a comma-separated list of names, a module, or a sequence of those.
        example: an input batch (used for ``"auto"``).
    """
    model = unwrap(model)
    items: list[str | nn.Module]
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, nn.Module):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise CamkitError("no target layer given; use 'auto' or a layer name such as 'layer4'")
    out: dict[str, nn.Module] = {}
    for item in items:
        if isinstance(item, nn.Module):
            name = _name_of(model, item)
        elif item == "auto":
            name = _canonical(model, auto_layer(model, example))
        elif isinstance(item, str):
            _get(model, item)
            name = _canonical(model, item)
        else:
            raise TypeError(f"a target layer is a name or a module, got {type(item).__name__}")
        if name == "":
            raise CamkitError("the model itself cannot be a target layer; choose one of its submodules")
        out[name] = model.get_submodule(name)
    return out
