"""``camkit methods``: the available methods, one line each: family, parameters with their defaults, what, cost,
when to prefer it, paper."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from camkit.cli.output import Format, FormatOption, emit

__all__ = ["methods"]

COLUMNS = ("name", "family", "parameters", "what", "cost per image", "prefer it when", "paper")


def methods(fmt: FormatOption = Format.table) -> None:
    """List the available methods: family, parameters (set as `--methods "name(key=value)"`) with their
    defaults, what the formula is, cost, when to prefer it, paper."""
    from camkit.methods import METHODS, method_names
    from camkit.methods.registry import method_parameters

    names = method_names()
    params = {n: method_parameters(n) for n in names}
    rows = [
        (n, METHODS[n].family, ", ".join(f"{k}={v!r}" for k, v in params[n].items()), METHODS[n].summary,
         METHODS[n].cost, METHODS[n].prefer, METHODS[n].paper)
        for n in names
    ]  # fmt: skip
    table = Table(title="camkit methods")
    table.add_column("name", no_wrap=True, overflow="fold", min_width=max(len(n) for n in names))
    table.add_column("family", overflow="fold")
    for col in COLUMNS[2:]:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(Text(v) for v in r))
    data = [
        {"name": n, "family": f, "parameters": _jsonable(params[n]), "summary": s, "cost": c, "prefer": p,
         "paper": pa}
        for n, f, _, s, c, p, pa in rows
    ]  # fmt: skip
    emit("camkit methods", COLUMNS, rows, fmt, table=table, data=data)


def _jsonable(params: dict[str, object]) -> dict[str, object]:
    """The defaults as JSON values (a tuple becomes a list)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
