"""Specs as text: ``name`` or ``name(key=value, ...)``, and comma-separated lists of them.

The one parser of configured method and metric names: used by :func:`camkit.methods.get_method` and so by every
command that takes methods (``--methods "finercam(alpha=0.5),gradcam"``) and by the web app's method field, and by
:func:`camkit.metrics.resolve_metrics` for metrics (``--metrics "infidelity(perturbation=gaussian),deletion"``). A
value is
read as a Python literal (``0.5``, ``16``, ``(1.0, 2.0)``, ``'layercam'``, ``None``, ``True``); a value that is
not a literal is taken as a plain string (``base=layercam``, ``weighting=channel-softmax``). A configured
method's own name (``smoothgradcam++(n=16)``, :func:`camkit.methods.registry.configured_name`) is a spec that
gives the same method again.

A bracketed value that is not a literal is read item by item, each item as a value: ``layers=(blocks.3,bn2)`` is
``("blocks.3", "bn2")``, ``layers=(layer4)`` is ``("layer4",)`` and ``[a, b]`` a list. A parenthesised literal stays
what Python makes of it: ``scales=(2)`` is the number 2, ``scales=(2,)`` a tuple.
"""

from __future__ import annotations

import ast

from camkit.errors import CamkitError

__all__ = ["parse_spec", "split_specs"]

#: Where each kind of spec lists its parameters.
_SEE = {"method": "`camkit methods`", "metric": "`camkit evaluate --help`"}

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


def split_specs(text: str, sep: str = ",", keep_empty: bool = False) -> list[str]:
    """Split on the ``sep`` outside brackets and quotes, items stripped, empty ones dropped (``keep_empty``: kept,
    as ``""``): ``"finercam(alpha=0.5, n_similar=2),gradcam"`` -> ``["finercam(alpha=0.5, n_similar=2)", "gradcam"]``.

    Raises:
        CamkitError: unbalanced brackets or an unclosed quote.
    """
    parts: list[str] = []
    stack: list[str] = []
    quote: str | None = None
    start = 0
    for i, ch in enumerate(text):
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            stack.append(ch)
        elif ch in _CLOSE:
            if not stack or stack.pop() != _CLOSE[ch]:
                raise CamkitError(f"unbalanced {ch!r} in {text!r}; write name(key=value, ...)")
        elif ch == sep and not stack:
            parts.append(text[start:i])
            start = i + 1
    if stack or quote is not None:
        what = f"an unclosed {stack[-1]!r}" if stack else f"an unclosed quote {quote}"
        raise CamkitError(f"{text!r} has {what}; write name(key=value, ...)")
    parts.append(text[start:])
    return [p.strip() for p in parts if keep_empty or p.strip()]


def parse_spec(text: str, kind: str = "method") -> tuple[str, dict[str, object] | None]:
    """``"finercam(alpha=0.5)"`` -> ``("finercam", {"alpha": 0.5})``; ``"gradcam"`` -> ``("gradcam", None)``
    (no parentheses: the registered method as it is). ``kind`` names what the spec is (``method``, ``metric``)
    in the messages.

    Raises:
        CamkitError: not ``name(key=value, ...)``, a value without a key, a key given twice, a value nested too
            deeply, an integer outside the signed 64 bits that torch takes.
    """
    text = text.strip()
    if "(" not in text and ")" not in text:
        return text, None
    if not text.endswith(")") or text.startswith("("):
        raise CamkitError(f"{text!r} is not a {kind} spec; write name or name(key=value, ...)")
    name, _, inner = text[:-1].partition("(")
    items = split_specs(inner, keep_empty=True)  # balanced brackets and quotes, else the error says so
    if items and not items[-1]:
        items.pop()  # a trailing comma, as Python allows: name(a=1,) and name()
    if "" in items:
        raise CamkitError(
            f"{text!r} has an empty setting between commas; write {name.strip()}(key=value, ...) with one comma "
            "between settings"
        )
    settings: dict[str, object] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise CamkitError(
                f"{text!r}: {item!r} is not key=value; write {name.strip()}(key=value, ...) "
                f"(see {_SEE.get(kind, 'the docs')} for the parameters)"
            )
        if key in settings:
            raise CamkitError(f"{text!r} gives {key!r} twice")
        settings[key] = _checked_value(text, key, raw.strip())
    return name.strip(), settings


def _checked_value(text: str, key: str, raw: str) -> object:
    """:func:`_value`, refusing a value nested too deeply to read and integers that no tensor holds."""
    try:
        value = _value(raw)
        fits = _fits_64_bits(value)
    except RecursionError:
        raise CamkitError(
            f"{text[:80]!r}...: the value of {key!r} is nested too deeply; write it flat"
        ) from None
    if not fits:
        raise CamkitError(
            f"{text!r}: the value of {key!r} is out of range: integers must lie within -2**63 .. 2**63 - 1"
        )
    return value


def _fits_64_bits(value: object) -> bool:
    """Whether every integer in ``value`` (in its sequences, sets and dicts too) fits a signed 64-bit integer."""
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_fits_64_bits(v) for v in value)
    if isinstance(value, dict):
        return all(_fits_64_bits(k) and _fits_64_bits(v) for k, v in value.items())
    return True


def _value(raw: str) -> object:
    """A Python literal, else a sequence of values for ``(a, b)`` / ``[a, b]``, else the text itself (a bare word
    such as ``layercam``)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if len(raw) >= 2 and (raw[0], raw[-1]) in (("(", ")"), ("[", "]")):
        try:
            parts = split_specs(raw[1:-1])
        except CamkitError:  # "(a)(b)": not one bracketed sequence
            return raw
        items = [_value(item) for item in parts]
        return tuple(items) if raw[0] == "(" else items
    return raw
