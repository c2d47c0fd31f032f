"""Method specs as text: ``name`` or ``name(key=value, ...)``; the parser is :mod:`camkit.core.spec`, shared with
the metrics."""

from __future__ import annotations

from camkit.core.spec import parse_spec, split_specs

__all__ = ["parse_spec", "split_specs"]
