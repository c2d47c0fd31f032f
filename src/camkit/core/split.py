"""The capture's prepared copy split at its earliest target layer, the part before it compiled (``compile=``).

With ``compile`` (``PerturbationOptions(compile=...)``, the CLI's ``--compile``), the shared capture of the layer
methods that need dS/dA (:mod:`camkit.core.capture`: Grad-CAM and every method sharing its forward and backward)
runs on the prepared copy (:mod:`camkit.core.prepared`) cut in two with ``torch.fx``:

* the copy is symbolically traced with every target layer kept as a leaf module (called as a module, so the
  capture's per-thread forward hooks fire on it unchanged); a module class whose ``forward`` ``torch.fx`` cannot
  trace (timm's ``Conv2dSame``, data-dependent code inside a block) is kept as a leaf too, and the trace is
  repeated;
* the graph is cut just after the call of the earliest target layer: the **prefix** computes that layer too and
  returns every value that a later node reads (skip connections across the cut included, and the layer's output);
  the **suffix** takes them, first passes the layer's output through a :class:`TargetOutput` (an identity module
  that takes the layer's name for the capture, so its hooks see the layer's output there), and holds the later
  target layers (the copy's very modules, under the same names). The capture's gradients stop at the target
  layers' outputs, so nothing needs the layer's own backward. A target layer called more than once in the graph
  (or under two names) is not computed before the cut: the cut then comes just before its first call;
* the prefix needs no gradient: it runs under ``torch.no_grad`` through the compiled forwards of
  :mod:`camkit.core.accel` (``"jit"``: ``torch.jit.trace`` + ``freeze`` + ``optimize_for_inference``, prepared in
  seconds; ``"onnx"``: exported to ONNX and run by ONNX Runtime on the CPU, seconds, the fastest there;
  ``"inductor"``: ``torch.compile`` with freezing, tens of seconds), one per input shape; the suffix runs
  eagerly with the capture's hooks, and the backward goes through it alone, as without the split.

Each input shape is checked once against the model as given, by the rules of the prepared copy
(:func:`camkit.core.prepared.disagreement`). A model ``torch.fx`` cannot trace (data-dependent Python control flow
in the model's own ``forward``), a target layer that is not called as a module in the traced graph, a value crossing
the cut that is not a tensor, a compiler failure or a disagreement drop the split with one
:class:`camkit.core.accel.AccelWarning` naming the reason; the uncompiled prepared copy (or the model) then runs the
capture. A capture without gradients (CAM, Eigen-CAM, the Score-CAM family's capture) is never split: it runs
with grad mode off from end to end already. Without a prepared copy (``accelerate=False``, a model the copy does not
take, see :mod:`camkit.core.prepared`; on a GPU, a model without a BatchNorm to fold) there is no split either.

Cost: the trace and the cut take well under a second; the prefix is compiled once per input shape (``"jit"``: a
few seconds for ResNet-50; ``"inductor"``: tens of seconds), then the first capture of each shape is checked
against the model. A compiled prefix holds its own frozen (for ``"jit"``: pre-packed) weights, about the size of
the weights before the target layer, per input shape, for as long as the model lives.

Threads: the split is shared. ``torch.fx`` patches ``nn.Module.__call__`` for the whole process while it traces;
the tracer here only acts in its own thread, so another thread's forward meanwhile runs as usual. The compiled
prefixes are made under a lock, one per shape, and then run by several threads at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from camkit.core.accel import Compile, cached, compile_backend, compiled_forward, warn_once
from camkit.core.prepared import prepared_copy

__all__ = [
    "SplitCopy",
    "SplitError",
    "SplitForward",
    "TargetOutput",
    "split_copy",
    "split_for",
    "split_graph",
    "trace_with_leaves",
]

_RETRACES = 32
"""At most this many module classes are made leaves because ``torch.fx`` cannot trace their ``forward``."""

_FAILED = "_camkit_untraceable"


class SplitError(Exception):
    """The copy cannot be split or compiled (the message says why)."""


class _LeafTracer(fx.Tracer):
    """A tracer keeping ``targets`` (and modules of the ``opaque`` classes) as leaf modules; it acts only in the
    thread that traces (``torch.fx`` patches ``nn.Module`` for every thread while tracing)."""

    def __init__(self, targets: Collection[nn.Module], opaque: set[type]) -> None:
        super().__init__()
        self.targets = {id(m) for m in targets}
        self.opaque = opaque
        self.owner = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.targets or type(m) in self.opaque:
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if threading.get_ident() != self.owner:
            return forward(*args, **kwargs)
        saved = dict(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if getattr(err, _FAILED, None) is None:
                setattr(err, _FAILED, type(m))
            self.module_stack.clear()
            self.module_stack.update(saved)
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def trace_with_leaves(module: nn.Module, targets: Collection[nn.Module]) -> fx.GraphModule:
    """``module`` symbolically traced with ``targets`` as leaf modules; a module class whose ``forward`` fails to
    trace becomes a leaf and the trace is repeated.

    Raises:
        SplitError: the model's own ``forward`` (or a target's parent that must be traced) cannot be traced.
    """
    opaque: set[type] = set()
    for _ in range(_RETRACES):
        tracer = _LeafTracer(targets, opaque)
        try:
            graph = tracer.trace(module)
        except Exception as err:
            kind = getattr(err, _FAILED, None)
            if kind is None or kind in opaque or kind is type(module):
                raise SplitError(f"torch.fx cannot trace it ({type(err).__name__}: {err})") from err
            opaque.add(kind)
            continue
        return fx.GraphModule(tracer.root, graph, type(module).__name__)
    raise SplitError(f"torch.fx cannot trace more than {_RETRACES} of its module classes")


def _first_target(gm: fx.GraphModule, targets: dict[str, nn.Module]) -> int:
    """The position of the first call of a target layer in ``gm``'s graph; every target must be called there."""
    ids = {id(m): name for name, m in targets.items()}
    first, seen = -1, set()
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "call_module" and id(gm.get_submodule(str(node.target))) in ids:
            seen.add(ids[id(gm.get_submodule(str(node.target)))])
            first = i if first < 0 else first
    missing = sorted(set(targets) - seen)
    if missing:
        raise SplitError(f"target layer(s) {missing} are not called as modules in its traced graph")
    return first


class TargetOutput(nn.Module):
    """Stands in the suffix for the earliest target layer once the prefix computes it: returns its input (the
    layer's output, computed by the prefix), so that the capture's hooks on this module see that output."""

    def forward(self, x: Tensor) -> Tensor:
        return x


_STAND_IN = "_camkit_target_output"


def _through(gm: fx.GraphModule, targets: dict[str, nn.Module], cut: int) -> str | None:
    """The name of the target layer the prefix may compute itself (the one called at node ``cut``), or None: it
    must be called exactly once in the graph, under one target name only."""
    node = list(gm.graph.nodes)[cut]
    module = gm.get_submodule(str(node.target))
    names = [name for name, m in targets.items() if m is module]
    calls = sum(
        1 for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(str(n.target)) is module
    )
    return names[0] if len(names) == 1 and calls == 1 else None


def split_graph(
    gm: fx.GraphModule, targets: dict[str, nn.Module], through: bool = False
) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, nn.Module]]:
    """``gm`` cut just before the first call of a target layer: the prefix (the input -> the tuple of every value
    a later node reads) and the suffix (those values, in that order -> the output), sharing ``gm``'s modules; and
    the target layers the suffix calls in another module's place (empty).

    ``through``: where that first target layer is called once, the cut comes just after it instead: the prefix
    computes the layer too, and the suffix first passes its output through a :class:`TargetOutput`, returned
    under the layer's name in the third value (the capture hooks it there: its output is the layer's)."""
    nodes = list(gm.graph.nodes)
    cut = _first_target(gm, targets)
    name = _through(gm, targets, cut) if through else None
    if name is not None:
        cut += 1
    head, tail = nodes[:cut], set(nodes[cut:])
    crossing = [n for n in head if n.op != "get_attr" and any(u in tail for u in n.users)]
    if name is not None and nodes[cut - 1] not in crossing:
        crossing.append(nodes[cut - 1])  # its output is captured even where nothing later reads it
    attrs = [n for n in head if n.op == "get_attr" and any(u in tail for u in n.users)]
    first: fx.Graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in head:
        env[n] = first.node_copy(n, lambda a: env[a])
    first.output(tuple(env[n] for n in crossing))
    second: fx.Graph = fx.Graph()
    env2: dict[fx.Node, fx.Node] = {n: second.placeholder(n.name) for n in crossing}
    replaced: dict[str, nn.Module] = {}
    if name is not None:
        stand_in = TargetOutput()
        gm.add_submodule(_STAND_IN, stand_in)  # the traced copy's own graph never calls it
        env2[nodes[cut - 1]] = second.call_module(_STAND_IN, (env2[nodes[cut - 1]],))
        replaced[name] = stand_in
    for n in [*attrs, *nodes[cut:]]:
        env2[n] = second.node_copy(n, lambda a: env2[a])
    return fx.GraphModule(gm, first, "Prefix"), fx.GraphModule(gm, second, "Suffix"), replaced


class SplitForward(nn.Module):
    """The split copy's forward for one input shape: the compiled prefix without gradients, then the suffix."""

    def __init__(
        self, prefix: Callable[[Tensor], Any], suffix: fx.GraphModule, nhwc: bool, nhwc_input: bool
    ) -> None:
        super().__init__()
        self._prefix = prefix  # not a submodule: a compiled callable
        self.suffix = suffix
        self.nhwc = nhwc
        self.nhwc_input = nhwc_input

    def forward(self, x: Tensor) -> Any:
        with torch.no_grad():
            values = self._prefix(_layout(x, self.nhwc_input))
        if self.nhwc:
            values = tuple(
                v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in values
            )
        return self.suffix(*values)


def _layout(x: Tensor, nhwc: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if nhwc else x.contiguous()


def _shape(x: Tensor) -> tuple[object, ...]:
    return tuple(x.shape), x.dtype, x.device


@dataclass
class SplitCopy:
    """The prepared copy split at its earliest target layer, with its compiled prefixes by input shape.

    Attributes:
        backend: ``"jit"``, ``"onnx"`` or ``"inductor"``.
        layers: the modules the capture hooks, by the model's layer names: the copy's target modules (the suffix
            calls these very modules), the earliest one's :class:`TargetOutput` where the prefix computes it.
        nhwc: the suffix takes channels-last feature maps (CPU, as the prepared copy).
        failed: why the split is not used (None: it is).
    """

    backend: str
    layers: dict[str, nn.Module]
    nhwc: bool
    prefix: fx.GraphModule | None = None
    suffix: fx.GraphModule | None = None
    failed: str | None = None
    _runs: dict[tuple[object, ...], SplitForward] = field(default_factory=dict)
    _checked: set[tuple[object, ...]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def usable(self) -> bool:
        """Whether the split may run the capture (it was made and not dropped)."""
        with self._lock:
            return self.failed is None

    def checked(self, x: Tensor) -> bool:
        """Whether a capture of ``x``'s shape was checked against the model."""
        with self._lock:
            return self.failed is None and _shape(x) in self._checked

    def forward_for(self, x: Tensor) -> SplitForward:
        """The forward for inputs shaped like ``x`` (its prefix compiled now if need be, under the lock).

        Raises:
            SplitError: the prefix could not be compiled, or the split was dropped.
        """
        with self._lock:
            if self.failed is not None or self.prefix is None or self.suffix is None:
                raise SplitError(self.failed or "it was not made")
            run = self._runs.get(_shape(x))
            if run is None:
                nhwc_input = self.nhwc and self.backend != "onnx"  # ONNX Runtime takes NCHW arrays
                prefix = _compile_prefix(self.prefix, _layout(x, nhwc_input), self.backend)
                run = SplitForward(prefix, self.suffix, self.nhwc, nhwc_input)
                self._runs[_shape(x)] = run
            return run

    def settle(self, model: nn.Module, x: Tensor, reason: str | None) -> None:
        """Record the check of ``x``'s shape: passed (``reason`` None), or failed: the split is dropped with one
        warning naming ``reason``."""
        with self._lock:
            if reason is None:
                self._checked.add(_shape(x))
                return
            self.failed = reason
            self.prefix = self.suffix = None
            self._runs.clear()
        warn_once(
            model,
            f"camkit.core.split: the {self.backend}-compiled split copy of {type(model).__name__} is not used for "
            f"the capture, {reason}; the uncompiled prepared copy runs it (pass compile=False to skip the split)",
        )


def _compile_prefix(prefix: fx.GraphModule, example: Tensor, backend: str) -> Callable[[Tensor], Any]:
    """The prefix compiled by ``backend`` for inputs like ``example`` (in its memory format) and run once on it
    (inductor compiles there); every value it hands on must be a tensor."""
    try:
        with torch.no_grad():
            eager = prefix(example)
        bad = [i for i, v in enumerate(eager) if not isinstance(v, Tensor)]
        if bad:
            raise SplitError(f"a value crossing the cut is not a tensor ({type(eager[bad[0]]).__name__})")
        run = compiled_forward(prefix, example, backend)
        with torch.no_grad():
            run(example)
    except SplitError:
        raise
    except Exception as err:  # any model the tracer or compiler cannot take: the uncompiled copy
        raise SplitError(f"its prefix could not be compiled ({type(err).__name__}: {err})") from err
    return run


def split_copy(
    model: nn.Module, copy: nn.Module, layers: dict[str, nn.Module], backend: str, nhwc: bool
) -> SplitCopy:
    """The prepared ``copy`` of ``model`` split before its earliest target layer of ``layers`` (the copy's
    modules by name); a split that cannot be made is returned failed, with one warning naming why."""
    split = SplitCopy(backend, dict(layers), nhwc)
    try:
        gm = trace_with_leaves(copy, list(layers.values()))
        split.prefix, split.suffix, replaced = split_graph(gm, layers, through=True)
        split.layers.update(replaced)
    except SplitError as err:
        split.failed = str(err)
        warn_once(
            model,
            f"camkit.core.split: no {backend}-compiled split copy of {type(model).__name__} for the capture, "
            f"{err}; the uncompiled prepared copy runs it (pass compile=False to skip the split)",
        )
    return split


def split_for(
    model: nn.Module, x: Tensor, layers: dict[str, nn.Module], setting: Compile
) -> SplitCopy | None:
    """The split of the prepared copy of ``model`` for capturing ``layers`` on inputs like ``x`` with the
    ``compile`` setting ``setting`` (made once per model, backend, device, dtype and layers), or None where there is
    no prepared copy or the split was dropped."""
    prep = prepared_copy(model, x, layers)
    if prep is None or prep.module is None:
        return None
    kind = compile_backend(setting, x.device)
    key = ("capture-split", kind, x.device, x.dtype, tuple(sorted(layers)))
    module, copied = prep.module, prep.layers
    split = cached(model, key, lambda: split_copy(model, module, copied, kind, prep.channels_last))
    return split if split.usable() else None
