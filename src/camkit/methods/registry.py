"""Registry of CAM methods.

Every method here is a small pure function of what one capture forward gives (DESIGN.md section 1): the target
layer's activation ``A`` (Tensor[B, K, h, w]), the gradient ``G = dS/dA`` of the explained score, and for CAM the
weights of the classifier. It returns the *signed* map, Tensor[B, h, w], before the final ReLU; ReLU, upsampling
and normalisation happen in one place (:mod:`camkit.postprocess`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["METHODS", "Method", "MethodInput", "get_method", "method_names"]


@dataclass(frozen=True)
class MethodInput:
    """What a method's function receives.

    Attributes:
        activations: Tensor[B, K, h, w], the target layer's output.
        gradients: Tensor[B, K, h, w], dS/dA (None for methods that need no gradient).
        class_weights: Tensor[B, K], classifier weights of each image's target class (CAM only).
    """

    activations: Tensor
    gradients: Tensor | None = None
    class_weights: Tensor | None = None


@dataclass(frozen=True)
class Method:
    """A CAM method.

    Attributes:
        name: canonical name (``gradcam++``).
        fn: ``MethodInput -> Tensor[B, h, w]`` signed map, before ReLU.
        needs_grad: whether the method needs dS/dA.
        needs_classifier: whether it reads the weights of a GAP+Linear head (CAM).
        cost: forward/backward passes per image, for ``camkit methods``.
        paper: short reference.
        summary: one line: what the formula is.
        aliases: other accepted names.
        run: for methods that are not a function of one layer's (A, dS/dA) (attention rollout...):
            ``run(model, x, output_fn, classes, targets) -> Tensor[B, h, w]`` (``[B, k, h, w]`` for ``classes``
            of shape [B, k]), the signed map from the method's own pass; ``fn`` is then unused.
        perturb: for perturbation methods (Score-CAM, Ablation-CAM...): ``perturb(PerturbationContext) ->
            Tensor[B, T, K]`` channel weights from extra forward passes; ``fn`` then gets them as
            ``class_weights``.
    """

    name: str
    fn: Callable[[MethodInput], Tensor]
    needs_grad: bool
    cost: str
    paper: str
    summary: str
    needs_classifier: bool = False
    aliases: tuple[str, ...] = ()
    run: Callable[..., Tensor] | None = None
    perturb: Callable[..., Tensor] | None = None


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name and aliases, case-insensitive)."""
    METHODS[method.name] = method
    for key in (method.name, *method.aliases):
        _ALIASES[_norm(key)] = method.name
    return method


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def get_method(name: str) -> Method:
    """Look a method up by name or alias; unknown names raise ``ValueError`` with the closest matches."""
    _ensure_loaded()
    key = _norm(name)
    if key in _ALIASES:
        return METHODS[_ALIASES[key]]
    close = difflib.get_close_matches(name.lower(), list(METHODS), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(METHODS)}")


def method_names() -> list[str]:
    """Canonical names of all registered methods."""
    _ensure_loaded()
    return list(METHODS)


def _ensure_loaded() -> None:
    from camkit.methods import attention, cam, gradient, perturbation, projection  # noqa: F401  (registers on import)
