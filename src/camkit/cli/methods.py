"""``camkit methods``: the available methods, one line each: family, what, cost, when to prefer it, paper."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from camkit.cli.output import Format, FormatOption, emit

__all__ = ["methods"]

COLUMNS = ("name", "family", "what", "cost per image", "prefer it when", "paper")


def methods(fmt: FormatOption = Format.table) -> None:
    """List the available methods: family, what the formula is, cost, when to prefer it, paper."""
    from camkit.methods import METHODS, method_names

    names = method_names()
    rows = [
        (n, METHODS[n].family, METHODS[n].summary, METHODS[n].cost, METHODS[n].prefer, METHODS[n].paper)
        for n in names
    ]
    table = Table(title="camkit methods")
    table.add_column("name", no_wrap=True, overflow="fold", min_width=max(len(n) for n in names))
    table.add_column("family", overflow="fold")
    for col in COLUMNS[2:]:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(Text(v) for v in r))
    data = [
        {"name": n, "family": f, "summary": s, "cost": c, "prefer": p, "paper": pa}
        for n, f, s, c, p, pa in rows
    ]
    emit("camkit methods", COLUMNS, rows, fmt, table=table, data=data)
