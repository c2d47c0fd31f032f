"""The method registry: a name on the command line or in ``explain(method=...)`` maps to a :class:`Method`."""

from camkit.methods.registry import (
    METHODS,
    AttentionInput,
    AttentionMethod,
    LayerMethod,
    Method,
    MethodInput,
    MethodKind,
    PassInput,
    PassMethod,
    PerturbationMethod,
    get_method,
    method_names,
    register,
)

# Register every family, in the order `camkit methods` lists them.
from camkit.methods import cam, gradient, fem, projection, perturbation, attention  # noqa: F401  # isort: skip
from camkit.methods import fullgrad, guided, shapley, finer, smooth, multiscale, refine  # noqa: F401  # isort: skip
from camkit.methods import sharper  # noqa: F401  # isort: skip

__all__ = [
    "METHODS",
    "AttentionInput",
    "AttentionMethod",
    "LayerMethod",
    "Method",
    "MethodInput",
    "MethodKind",
    "PassInput",
    "PassMethod",
    "PerturbationMethod",
    "get_method",
    "method_names",
    "register",
]
