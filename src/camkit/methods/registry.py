"""Registry of CAM methods. Each method class has a :class:`MethodKind` that says how its map is made, and the
pipeline dispatches on that kind (:mod:`camkit.core.pipeline`):

* ``FORMULA``: a :class:`LayerMethod` whose map is a function of the shared capture's A and dS/dA;
* ``CHANNEL_WEIGHTS``: map = sum_k w_k A_k with w from the classifier (CAM, a :class:`LayerMethod` with
  ``needs_classifier``) or from extra forward passes (a :class:`PerturbationMethod`): :meth:`Method.channel_weights`;
* ``OWN_PASSES``: a :class:`PassMethod` running its own passes: :meth:`Method.own_maps`;
* ``ATTENTION``: an :class:`AttentionMethod`, its own pass over a transformer's attention: :meth:`Method.own_maps`.

The classes:

* :class:`LayerMethod`: a pure function of what one capture forward gives: the target layer's activation ``A``
  (Tensor[B, K, h, w]), the gradient ``G = dS/dA`` of the explained score, and for CAM the classifier's weights.
  It returns the *signed* map, Tensor[B, h, w], before the final ReLU.
* :class:`PerturbationMethod`: a weight formula ``w[B, T, K]`` computed from extra forward passes of perturbed
  inputs by the shared batching/replay engine (:mod:`camkit.methods.engine`); the map is ``sum_k w_k A_k``.
* :class:`AttentionMethod`: computes its map in its own pass over a transformer's attention probabilities.
* :class:`PassMethod`: runs its own forward/backward passes with the model and the input (FullGrad, guided
  backprop, ShapleyCAM's double backward, FinerCAM's contrast target, noise or multi-scale averaging) and returns
  named signed maps, at a layer's or the input's resolution.

ReLU, upsampling and normalisation happen in one place for all kinds (:mod:`camkit.core.postprocess`).
To add a method: write its formula in the module of its kind and call :func:`register` with keywords. Importing
:mod:`camkit.methods` (which any import of a submodule does first) registers every method.
"""

from __future__ import annotations

import difflib
import enum
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.methods.head import classifier_weights
from camkit.methods.spec import parse_spec, split_specs

if TYPE_CHECKING:
    from camkit.methods.engine import PerturbationContext

__all__ = [
    "METHODS",
    "AttentionInput",
    "AttentionMethod",
    "ClipPerturbationMethod",
    "LayerMethod",
    "Method",
    "MethodInput",
    "MethodKind",
    "PassInput",
    "PassMethod",
    "PerturbationMethod",
    "configure_method",
    "configured_name",
    "get_method",
    "method_names",
    "method_parameters",
    "register",
    "split_specs",
]


@dataclass(frozen=True)
class MethodInput:
    """What a layer method's function receives.

    Attributes:
        activations: Tensor[B, K, h, w], the target layer's output.
        gradients: Tensor[B, K, h, w], dS/dA (None for methods that need no gradient).
        class_weights: Tensor[B, K], classifier weights of each image's target class (CAM only).
    """

    activations: Tensor
    gradients: Tensor | None = None
    class_weights: Tensor | None = None


class MethodKind(enum.Enum):
    """How a method makes its map; the pipeline's stages 6 and 7 dispatch on it."""

    FORMULA = "formula"
    """A function of the target layer's A and dS/dA from the shared capture (Grad-CAM, ...)."""
    CHANNEL_WEIGHTS = "channel-weights"
    """sum_k w_k A_k with channel weights from the classifier (CAM) or from extra forward passes (Score-CAM, ...)."""
    OWN_PASSES = "own-passes"
    """Maps from the method's own forward / backward passes (FullGrad, Recipro-CAM, ...)."""
    ATTENTION = "attention"
    """A map from a transformer's attention probabilities, in the method's own pass (rollout, ...)."""

    @property
    def shared_capture(self) -> bool:
        """Whether the map is read from the shared capture's A (a sum over channels: eigen-smoothing applies)."""
        return self in (MethodKind.FORMULA, MethodKind.CHANNEL_WEIGHTS)


@dataclass(frozen=True, kw_only=True)
class Method:
    """What every method declares.

    Attributes:
        name: canonical name (``gradcam++``).
        cost: forward/backward passes per image, for ``camkit methods``.
        paper: short reference.
        summary: one line: what the formula is.
        aliases: other accepted names.
        prefer: one line: when to prefer it over the others.
        needs_grad: whether the method needs dS/dA from the shared capture pass.
        needs_classifier: reads the weights of a GAP + Linear head (CAM): it explains classes, not a callable.
        fusion_tanh: when the call gives no ``fusion``, the layers but the deepest are rescaled as tanh(gamma * M)
            before their element-wise maximum with this gamma (LayerCAM's paper: 2); None: plain maximum.
        family: the class, for listings (``"layer"``, ``"perturbation"``, ``"attention"``, ``"own-pass"``).
        clips: whether the method explains clips Tensor[B, C, T, H, W] (:mod:`camkit.adapters.video`).
        augmentable: whether test-time augmentation (``augment=``) applies to the method's maps.
    """

    family: ClassVar[str] = "method"
    clips: ClassVar[bool] = False
    augmentable: ClassVar[bool] = True
    name: str
    cost: str
    paper: str
    summary: str
    aliases: tuple[str, ...] = ()
    prefer: str = ""
    needs_grad: bool = False
    needs_classifier: bool = False
    fusion_tanh: float | None = None

    @property
    def kind(self) -> MethodKind:
        """How the map is made (see :class:`MethodKind`)."""
        raise NotImplementedError(f"{type(self).__name__} declares no kind")

    def formula(self, inp: MethodInput) -> Tensor:
        """The signed map Tensor[B, h, w] of one layer and target from the shared capture (kind ``FORMULA``)."""
        raise CamkitError(f"{self.name} ({self.kind.value}) has no formula of A and dS/dA")

    def channel_weights(self, ctx: PerturbationContext) -> Tensor:
        """Channel weights Tensor[B, T, K] of one layer (kind ``CHANNEL_WEIGHTS``)."""
        raise CamkitError(f"{self.name} ({self.kind.value}) has no channel weights")

    def own_maps(self, inp: PassInput) -> dict[str, Tensor]:
        """The signed maps of the method's own passes (kinds ``OWN_PASSES`` and ``ATTENTION``)."""
        raise CamkitError(f"{self.name} ({self.kind.value}) runs no passes of its own")


@dataclass(frozen=True, kw_only=True)
class LayerMethod(Method):
    """A map that is a pure function of one layer's activation and gradient.

    Attributes:
        fn: ``MethodInput -> Tensor[B, h, w]``, the signed map before ReLU (``class_weights`` is filled for a
            method with ``needs_classifier``).
    """

    family: ClassVar[str] = "layer"
    clips: ClassVar[bool] = True
    fn: Callable[[MethodInput], Tensor]

    @property
    def kind(self) -> MethodKind:
        return MethodKind.CHANNEL_WEIGHTS if self.needs_classifier else MethodKind.FORMULA

    def formula(self, inp: MethodInput) -> Tensor:
        return self.fn(inp)

    def channel_weights(self, ctx: PerturbationContext) -> Tensor:
        """CAM: the classifier's rows of the explained classes, Tensor[B, T, K]."""
        if not self.needs_classifier:
            return super().channel_weights(ctx)
        classes = ctx.classes
        if classes is None:
            raise CamkitError(f"{self.name} explains a class: give class targets (an index, a name or TopK)")
        w = classifier_weights(ctx.model, ctx.activations, ctx.output, ctx.layer_name)
        rows = classes[:, None] if classes.dim() == 1 else classes
        return torch.stack([w[rows[:, t]] for t in range(rows.shape[1])], dim=1)


@dataclass(frozen=True, kw_only=True)
class PerturbationMethod(Method):
    """Channel weights from extra forward passes; the map is ``sum_k w_k A_k``.

    Attributes:
        weights: ``PerturbationContext -> Tensor[B, T, K]``, built on the shared engine.
    """

    family: ClassVar[str] = "perturbation"
    weights: Callable[[PerturbationContext], Tensor]

    @property
    def kind(self) -> MethodKind:
        return MethodKind.CHANNEL_WEIGHTS

    def channel_weights(self, ctx: PerturbationContext) -> Tensor:
        return self.weights(ctx)


@dataclass(frozen=True, kw_only=True)
class ClipPerturbationMethod(PerturbationMethod):
    """A perturbation method whose masks are defined for clips too (Score-CAM, SS-CAM, IS-CAM, Ablation-CAM): on
    a clip Tensor[B, C, T, H, W] each channel of a 3-D layer is upsampled trilinearly to a [T, H, W] mask, or its
    replay ablates the whole space-time channel."""

    clips: ClassVar[bool] = True


@dataclass(frozen=True)
class AttentionInput:
    """What an attention method's pass receives.

    Attributes:
        model: the transformer, in eval mode.
        x: its input, Tensor[B, 3, H, W].
        output_fn: raw model output -> the explained Tensor.
        classes: LongTensor[B] or [B, k] of the explained classes; None for a callable target.
        target_fn: the callable target ``f(output) -> Tensor[B]`` when ``classes`` is None.
    """

    model: nn.Module
    x: Tensor
    output_fn: Callable[[object], Tensor]
    classes: Tensor | None
    target_fn: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True, kw_only=True)
class AttentionMethod(Method):
    """A map from a transformer's attention probabilities, in the method's own pass.

    Attributes:
        run: ``AttentionInput -> Tensor[B, h, w]`` (``[B, k, h, w]`` for ``classes`` of shape [B, k]), the signed
            map.
    """

    family: ClassVar[str] = "attention"
    augmentable: ClassVar[bool] = False
    run: Callable[[AttentionInput], Tensor]

    @property
    def kind(self) -> MethodKind:
        return MethodKind.ATTENTION

    def own_maps(self, inp: PassInput) -> dict[str, Tensor]:
        """Its one map, filed under the method's name."""
        return {
            self.name: self.run(AttentionInput(inp.model, inp.x, inp.output_fn, inp.classes, inp.target_fn))
        }


@dataclass(frozen=True)
class PassInput:
    """What a :class:`PassMethod`'s passes receive.

    Attributes:
        model: the network, in eval mode (the method must leave it exactly as it was: hooks only through
            :func:`camkit.core.capture.hook_forward`, removed on exit, and no module swapped).
        x: its input, Tensor[B, C, H, W].
        layers: the resolved target layers, ``{dotted name: module}``, shallow to deep as given.
        output_fn: raw model output -> the explained Tensor.
        classes: LongTensor[B] or [B, k] of the explained classes; None for a callable target.
        target_fn: the callable target ``f(output) -> Tensor[B]`` when ``classes`` is None.
        activations: the shared capture's activations as Tensor[B, K, h, w] per layer (for methods that combine
            their own pass with the shared one, e.g. Guided Grad-CAM).
        gradients: the shared capture's dS/dA per layer (a list with one per target), empty without
            ``needs_grad``.
        reshape: the user's ``reshape`` function for token layouts, or None.
    """

    model: nn.Module
    x: Tensor
    layers: dict[str, nn.Module]
    output_fn: Callable[[object], Tensor]
    classes: Tensor | None
    target_fn: Callable[[Tensor], Tensor] | None = None
    activations: dict[str, Tensor] = field(default_factory=dict)
    gradients: dict[str, Tensor | list[Tensor]] = field(default_factory=dict)
    reshape: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True, kw_only=True)
class PassMethod(Method):
    """Maps from the method's own forward/backward passes.

    Attributes:
        run: ``PassInput -> {name: Tensor[B, h, w]}`` (``[B, k, h, w]`` for ``classes`` of shape [B, k]), the
            signed maps (a layer name, or the method's name for an input-resolution map); the pipeline applies
            the ReLU, upsampling, min-max and fusion as for every kind.
    """

    family: ClassVar[str] = "own-pass"
    run: Callable[[PassInput], dict[str, Tensor]]

    @property
    def kind(self) -> MethodKind:
        return MethodKind.OWN_PASSES

    def own_maps(self, inp: PassInput) -> dict[str, Tensor]:
        return self.run(inp)


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}
_FACTORIES: dict[str, tuple[Callable[..., Method], dict[str, object]]] = {}


def register(
    method: Method,
    factory: Callable[..., Method] | None = None,
    parameters: Mapping[str, object] | None = None,
) -> Method:
    """Add a method to the registry (its name and aliases, case-insensitive).

    Args:
        method: the method with its default settings.
        factory: makes a configured instance from keyword settings (``finercam(alpha=0.5)``), so that
            ``get_method("finercam(alpha=0.5)")`` and ``--methods "finercam(alpha=0.5)"`` work.
        parameters: the factory's parameters and their defaults (default: read from its signature).
    """
    if not isinstance(method, (LayerMethod, PerturbationMethod, AttentionMethod, PassMethod)):
        raise TypeError(
            "register a LayerMethod, PerturbationMethod, AttentionMethod or PassMethod, not "
            f"{type(method).__name__}"
        )
    METHODS[method.name] = method
    for key in (method.name, *method.aliases):
        _ALIASES[_norm(key)] = method.name
    if factory is not None:
        if parameters is None:
            parameters = {
                p.name: p.default
                for p in inspect.signature(factory).parameters.values()
                if p.default is not inspect.Parameter.empty
            }
        _FACTORIES[method.name] = (factory, dict(parameters))
    return method


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def get_method(name: Any) -> Method:
    """Look a method up by name or alias, or make a configured one from a spec ``name(key=value, ...)``
    (``"finercam(alpha=0.5)"``, :func:`configure_method`); unknown names raise a CamkitError with the closest
    matches."""
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"a method is given by its name (a str, see `camkit methods`), not {type(name).__name__}"
        )
    base, settings = parse_spec(name)
    if settings is not None:
        return configure_method(base, settings)
    return METHODS[_canonical(name)]


def _canonical(name: str) -> str:
    key = _norm(name)
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(name.lower(), list(METHODS), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise CamkitError(f"unknown method {name!r}.{hint} Available: {', '.join(METHODS)}")


def method_parameters(name: str) -> dict[str, object]:
    """The parameters of a method and their defaults (``{}`` for a method without any), by name or alias."""
    entry = _FACTORIES.get(_canonical(name))
    return dict(entry[1]) if entry else {}


def configure_method(name: str, settings: Mapping[str, object]) -> Method:
    """The method ``name`` with these settings (the spec ``name(key=value, ...)``), checked as the Python API
    checks them.

    Raises:
        CamkitError: an unknown method, a parameter the method does not have (with its parameters and the
            closest match), or a value the method refuses (its own message).
    """
    canonical = _canonical(name)
    if canonical not in _FACTORIES:
        if not settings:
            return METHODS[canonical]
        raise CamkitError(f"{canonical} takes no parameters; write {canonical} (see `camkit methods`)")
    factory, params = _FACTORIES[canonical]
    for key in settings:
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else ""
            listed = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise CamkitError(f"{canonical} has no parameter {key!r}.{hint} Its parameters: {listed}")
    try:
        return factory(**settings)
    except (TypeError, ValueError) as err:
        if isinstance(err, CamkitError):
            raise
        raise CamkitError(f"{canonical}: {err}") from err


def configured_name(name: str, settings: Mapping[str, object], defaults: Mapping[str, object]) -> str:
    """The name of a configured instance: ``name`` for the default settings, else ``name(key=value, ...)`` with the
    settings that differ, so that two configurations of one method in one :func:`camkit.compare` keep apart."""
    changed = [f"{k}={settings[k]!r}" for k in settings if settings[k] != defaults.get(k)]
    return f"{name}({', '.join(changed)})" if changed else name


def method_names() -> list[str]:
    """Canonical names of all registered methods."""
    return list(METHODS)
