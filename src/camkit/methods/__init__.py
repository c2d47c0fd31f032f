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
    configure_method,
    get_method,
    method_names,
    method_parameters,
    register,
)

# Register every family, in the order `camkit methods` lists them.
from camkit.methods import cam, gradient, fem, projection, perturbation, attention  # noqa: F401  # isort: skip
from camkit.methods import fullgrad, guided, shapley, finer, smooth, multiscale, refine  # noqa: F401  # isort: skip
from camkit.methods import sharper, union  # noqa: F401  # isort: skip

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
    "configure_method",
    "get_method",
    "method_names",
    "method_parameters",
    "register",
]
