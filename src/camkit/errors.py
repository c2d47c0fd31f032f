"""The one exception camkit raises for what it was asked to do wrong: :class:`CamkitError`."""

from __future__ import annotations

__all__ = ["CamkitError", "CamkitRuntimeError"]


class CamkitError(ValueError):
    """A request camkit cannot carry out, found by camkit's own checks: an unknown layer or method, an image of the
    wrong shape, a model in training mode, a folder that is not a store, a bad option.

    The message says what was wrong and how to fix it. It is a :class:`ValueError`, so code that catches
    ``ValueError`` keeps working. The command line prints it as one ``error:`` line and the app answers it with a
    4xx status; any other exception is a bug in camkit (or in the model) and keeps its traceback.
    """


class CamkitRuntimeError(CamkitError, RuntimeError):
    """A :class:`CamkitError` that is also a :class:`RuntimeError`: what camkit reported as a ``RuntimeError``
    before it had its own exception (pretrained weights that cannot be had, a target layer that did not run or
    that the explained score does not depend on). Code catching either keeps working."""
