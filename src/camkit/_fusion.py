"""Convolutions with their weights packed once and the following activation and residual add done in the same
oneDNN call, for the CPU inference copies of :mod:`camkit._fastforward`.

``torch.nn.functional.conv2d`` on CPU hands oneDNN a plain weight tensor on every call, which oneDNN reorders into
its blocked layout each time, and the ReLU (or ReLU6, SiLU, Hardswish) and the residual ``+`` that follow are
separate passes over the feature map. :class:`FusedConv2d` keeps the weight in oneDNN's layout (packed once, for
the batch shape it will see) and calls ``torch.ops.mkldnn._convolution_pointwise``, the operator PyTorch's own
compiler (Inductor) emits for these patterns, with the activation and the add as post-ops. Measured on this
project's 2-core AVX2 CPU (batch 12, channels-last): ResNet-18's layers 3-17% faster one by one, and the whole
folded network 1.10-1.14x faster with its Winograd layers (21.7 against 24.8 ms per image, best of 8).

:func:`fuse` finds the patterns with ``torch.fx``: a ``Conv2d`` whose only use is an activation, or an add (of a
tensor of the same shape) whose only use may be an activation. Every other ``Conv2d`` is packed alone. A model that
``torch.fx`` cannot trace (control flow on values) gets no copy at all, and :mod:`camkit._fastforward` checks the
result of whatever is returned against the model as given before using it.

The graph module returned shares every module it does not replace with the model it was made from; neither that
model nor its modules are changed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from camkit import _winograd

__all__ = ["FusedConv2d", "available", "fuse"]

_UNARY_MODULES: dict[type, Callable[[nn.Module], tuple[str, list[float]]]] = {
    nn.ReLU: lambda m: ("relu", []),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0]),
    nn.Hardtanh: lambda m: ("hardtanh", [float(m.min_val), float(m.max_val)]),  # type: ignore[arg-type]
    nn.SiLU: lambda m: ("swish", []),
    nn.Hardswish: lambda m: ("hardswish", []),
}
_UNARY_FUNCTIONS: dict[object, tuple[str, list[float]]] = {
    F.relu: ("relu", []),
    F.relu_: ("relu", []),
    torch.relu: ("relu", []),
    torch.relu_: ("relu", []),
    F.relu6: ("hardtanh", [0.0, 6.0]),
    F.silu: ("swish", []),
    F.hardswish: ("hardswish", []),
}
_UNARY_METHODS = {"relu": ("relu", []), "relu_": ("relu", [])}
_AFTER_ADD = {"relu"}
"""The only activation oneDNN's fused add accepts after it (PyTorch 2.x: "Unary Fusion behavior undefined")."""
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ACTIVATIONS: dict[str, Callable[[Tensor, list[float], bool], Tensor]] = {
    "relu": lambda y, _s, inplace: F.relu(y, inplace=inplace),
    "hardtanh": lambda y, s, inplace: F.hardtanh(y, s[0], s[1], inplace=inplace),
    "swish": lambda y, _s, inplace: F.silu(y, inplace=inplace),
    "hardswish": lambda y, _s, inplace: F.hardswish(y, inplace=inplace),
}
"""What each oneDNN post-op name computes: ``(tensor, scalars, inplace) -> tensor``."""


def _in_place(name: str, scalars: list[float]) -> Callable[[Tensor], Tensor]:
    """The activation oneDNN calls ``name``, applied in place (for the Winograd path of a fused layer)."""
    act = _ACTIVATIONS[name]
    return lambda y: act(y, scalars, True)


def available() -> bool:
    """Whether this PyTorch build has the oneDNN operators :class:`FusedConv2d` calls."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(
            torch.ops.mkldnn, "_convolution_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


def packable(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` (exactly) on CPU in float32 with zero padding given as numbers."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.weight.dtype == torch.float32
        and conv.weight.device.type == "cpu"
    )


class FusedConv2d(nn.Module):
    """``activation(conv(x) [+ other])`` in one oneDNN call, the weight packed once for ``input_shape``.

    Args:
        conv: a :func:`packable` convolution (kept, unchanged, for the reference path).
        input_shape: the shape of the inputs it will mostly see (others work, at the cost of a reorder).
        unary: None or a oneDNN post-op name (``"relu"``, ``"hardtanh"``, ``"swish"``, ``"hardswish"``).
        scalars: the post-op's parameters (``hardtanh``: min and max).
        binary: whether ``forward`` takes a second tensor that is added before the activation (then the
            activation can only be ``"relu"``).

    Inputs that are not float32 on CPU, or that need a gradient, take the reference path (the same operations,
    unfused, through ``conv``).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        input_shape: tuple[int, ...],
        unary: str | None = None,
        scalars: list[float] | None = None,
        binary: bool = False,
    ) -> None:
        super().__init__()
        if not packable(conv):
            raise ValueError(f"not a convolution FusedConv2d can pack: {conv}")
        if unary is not None and unary not in _ACTIVATIONS:
            raise ValueError(f"unknown post-op {unary!r}: one of {sorted(_ACTIVATIONS)}")
        if binary and unary is not None and unary not in _AFTER_ADD:
            raise ValueError(f"oneDNN fuses only {sorted(_AFTER_ADD)} after an add, not {unary!r}")
        self.conv = conv
        self.unary = unary
        self.scalars = list(scalars or [])
        self.binary = binary
        self.pad = [int(p) for p in conv.padding]  # type: ignore[union-attr]
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        with torch.no_grad():
            self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                conv.weight.detach().to_mkldnn(),
                self.pad,
                self.stride,
                self.dilation,
                conv.groups,
                list(input_shape),
            )
        self.bias = None if conv.bias is None else conv.bias.detach()

    def reference(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        """The same result through ``conv`` and separate operations."""
        y = self.conv(x)
        if other is not None:
            y = y + other
        return y if self.unary is None else _ACTIVATIONS[self.unary](y, self.scalars, False)

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        if (other is not None) != self.binary:
            raise TypeError(f"FusedConv2d(binary={self.binary}) called with other={other is not None}")
        if (
            x.dim() != 4
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or (
                other is not None
                and (other.dtype != torch.float32 or other.shape[1] != self.conv.out_channels)
            )
            or (torch.is_grad_enabled() and (x.requires_grad or (other is not None and other.requires_grad)))
        ):
            return self.reference(x, other)
        args = (self.packed, self.bias, self.pad, self.stride, self.dilation, self.conv.groups)
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, self.unary or "none", self.scalars, "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, *args, "add", None, self.unary, self.scalars, ""
        )

    def extra_repr(self) -> str:
        post = (
            ("add" if self.binary else "") + ("+" if self.binary and self.unary else "") + (self.unary or "")
        )
        return f"post={post or 'none'!r}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_winograd.WinogradConv2d, FusedConv2d)) or super().is_leaf_module(m, qualname)


class _Shapes(fx.Interpreter):
    """Runs the graph once and records the shape of every tensor a node produces."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.shapes[n] = tuple(out.shape)
            self.dtypes[n] = out.dtype
        return out


def _unary(gm: fx.GraphModule, n: fx.Node, src: fx.Node) -> tuple[str, list[float]] | None:
    """The oneDNN post-op that node ``n`` applies to ``src``, if it is a supported activation of it alone."""
    if not n.args or n.args[0] is not src or len(n.args) > 1:
        return None
    if set(n.kwargs) - {"inplace"}:
        return None
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        make = _UNARY_MODULES.get(type(m))
        return make(m) if make is not None else None
    if n.op == "call_function":
        return _UNARY_FUNCTIONS.get(n.target)  # type: ignore[arg-type]
    if n.op == "call_method":
        return _UNARY_METHODS.get(str(n.target))
    return None


def _added(n: fx.Node, src: fx.Node) -> fx.Node | None:
    """The other operand when ``n`` is ``src + other`` (or ``other + src``), two tensors, no ``alpha``."""
    if n.kwargs or len(n.args) != 2:
        return None
    is_add = (n.op == "call_function" and n.target in _ADD_FUNCTIONS) or (
        n.op == "call_method" and n.target in _ADD_METHODS and n.args[0] is src
    )
    if not is_add:
        return None
    a, b = n.args
    other = b if a is src else a if b is src else None
    return other if isinstance(other, fx.Node) and other is not src else None


def fuse(model: nn.Module, example: Tensor, batch: int | None = None) -> tuple[fx.GraphModule, int] | None:
    """A graph module computing ``model``'s output with every :func:`packable` ``Conv2d`` replaced by a
    :class:`FusedConv2d` (with the activation and add that follow it where the graph allows), and how many
    convolutions that is; None when oneDNN's operators are missing, ``torch.fx`` cannot trace the model, or there is
    no convolution to pack.

    Args:
        model: traced, not modified (the result shares its other modules).
        example: an input batch (one image is enough) that is run once through the graph to learn the shapes.
        batch: the batch size the weights are packed for (default: ``example``'s).
    """
    if not available():
        return None
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception:  # control flow on values, unsupported Python: no fused copy
        return None
    graph = gm.graph
    for n in list(graph.nodes):  # the Identity left by folded BatchNorms
        if (
            n.op == "call_module"
            and type(gm.get_submodule(str(n.target))) is nn.Identity
            and len(n.args) == 1
        ):
            n.replace_all_uses_with(n.args[0])  # type: ignore[arg-type]
            graph.erase_node(n)
    gm.recompile()
    probe = _Shapes(gm)
    try:
        with torch.inference_mode():
            probe.run(example)
    except Exception:
        return None
    batch = example.shape[0] if batch is None else batch
    count = 0
    for n in list(graph.nodes):
        if n.op != "call_module" or n not in probe.shapes:
            continue
        mod = gm.get_submodule(str(n.target))
        # a Winograd layer still deciding, without post-ops: its direct path gets packed, and the post-ops join it
        wino = isinstance(mod, _winograd.WinogradConv2d) and mod.choice == "tune" and mod.direct is None
        conv = mod.conv if wino else mod
        src = n.args[0] if n.args else None
        if (
            not packable(conv)
            or len(n.args) != 1
            or n.kwargs
            or not isinstance(src, fx.Node)
            or src not in probe.shapes
        ):
            continue
        unary: tuple[str, list[float]] | None = None
        other: fx.Node | None = None
        last: fx.Node = n
        users = list(n.users)
        if len(users) == 1:
            add_other = _added(users[0], n)
            if (
                add_other is not None
                and probe.shapes.get(add_other) == probe.shapes[n]
                and probe.dtypes.get(add_other) == torch.float32
            ):
                other, last = add_other, users[0]
                after = list(last.users)
                if len(after) == 1 and (u := _unary(gm, after[0], last)) is not None and u[0] in _AFTER_ADD:
                    unary, last = u, after[0]
            elif (u := _unary(gm, users[0], n)) is not None:
                unary, last = u, users[0]
        shape = (batch, *probe.shapes[src][1:])
        try:
            fused: nn.Module = FusedConv2d(conv, shape, *(unary or (None, None)), binary=other is not None)  # type: ignore[arg-type]
            if wino:
                post = None if unary is None else _in_place(*unary)
                fused = _winograd.WinogradConv2d(conv, fused, post, binary=other is not None, u=mod.u)
        except Exception:
            continue
        name = f"fused_{count}_{str(n.target).replace('.', '_')}"
        gm.add_submodule(name, fused)
        with graph.inserting_after(last):
            new = graph.call_module(name, (src,) if other is None else (src, other))
        last.replace_all_uses_with(new)
        probe.shapes[new], probe.dtypes[new] = probe.shapes[last], probe.dtypes[last]
        dead = [last]
        while dead[-1] is not n:
            dead.append(dead[-1].args[0] if dead[-1].args[0] is not other else dead[-1].args[1])  # type: ignore[arg-type]
        for d in dead:
            graph.erase_node(d)
        count += 1
    if not count:
        return None
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, count
