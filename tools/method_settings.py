"""List the settings in each registered method's code that the method spec cannot set.

    .venv/bin/python tools/method_settings.py

A *setting* is a parameter with a default value of a function that a method runs: its ``fn`` / ``weights`` /
``run`` and the functions of the same module that these call or close over, to a depth of three. A method
exposes a setting when its factory (:func:`camkit.methods.registry.register`'s ``factory``) has a parameter of the
same name, so that ``name(setting=value)`` reaches it. :data:`NOT_SETTINGS` lists the defaults that are not
settings (numerical guards, values fixed by the method's identity). Exit status 1 when a setting is neither
exposed nor listed there; ``tests/methods/test_method_parameters.py`` runs the same check.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NOT_SETTINGS: dict[str, str] = {
    "polycam_recursion.eps": "a guard against dividing by an empty cell, not a choice of the method",
    "pcam_plus.signed": "fixed by the method: pcamp is signed=False, pcampm signed=True",
    "attention_probabilities.score_fn": "the explained score, given by the method's code",
    "recipro_masks.device": "where the masks are made",
    "poly_layers.method": "the method's name in the messages",
}
"""``function.parameter`` -> why that default is not a method setting."""


def _functions(fn: object, depth: int, seen: set[int], module: str = "") -> Iterator[Callable[..., object]]:
    """``fn`` and the functions of its module (``module``: the first one's) that it calls by global name or closes
    over, ``depth`` levels down (the shared engine's arguments are set by the formulas, not by the user)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not isinstance(fn, types.FunctionType) or id(fn) in seen:
        return
    module = module or fn.__module__
    if fn.__module__ != module or not module.startswith("camkit.methods"):
        return
    seen.add(id(fn))
    yield fn
    if depth == 0:
        return
    inner: list[object] = [c.cell_contents for c in fn.__closure__ or () if _filled(c)]
    codes = [fn.__code__, *(c for c in fn.__code__.co_consts if isinstance(c, types.CodeType))]
    inner += [fn.__globals__.get(name) for code in codes for name in code.co_names]
    for item in inner:
        yield from _functions(item, depth - 1, seen, module)


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018  # an empty cell raises
    except ValueError:
        return False
    return True


def method_settings(method: object) -> dict[str, object]:
    """``{"function.parameter": default}`` of the functions a method runs (see the module docstring)."""
    out: dict[str, object] = {}
    seen: set[int] = set()
    for attr in ("fn", "weights", "run"):
        for fn in _functions(getattr(method, attr, None), 3, seen):
            for p in inspect.signature(fn).parameters.values():
                if p.default is not inspect.Parameter.empty:
                    out[f"{fn.__name__}.{p.name}"] = p.default
    return out


def unexposed_settings() -> dict[str, dict[str, object]]:
    """Per method, the settings in its code that its factory does not take and :data:`NOT_SETTINGS` does not
    list; empty when every method exposes its settings."""
    from camkit.methods.registry import METHODS, method_parameters

    out: dict[str, dict[str, object]] = {}
    for name, method in METHODS.items():
        params = method_parameters(name)
        missing = {
            key: default
            for key, default in method_settings(method).items()
            if key not in NOT_SETTINGS and key.split(".")[-1] not in params
        }
        if missing:
            out[name] = missing
    return out


def main() -> int:
    missing = unexposed_settings()
    for name, settings in missing.items():
        listed = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        print(f"{name}: {listed}")
    if not missing:
        print("every method's settings are parameters of its spec")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
