"""The method registry: a name on the command line or in ``explain(method=...)`` maps to a :class:`Method`."""

from camkit.methods.registry import METHODS, Method, MethodInput, get_method, method_names

__all__ = ["METHODS", "Method", "MethodInput", "get_method", "method_names"]
