"""``camkit methods``: the available methods, one line each, with their cost."""

from __future__ import annotations

from rich.table import Table

from camkit.cli.common import console

__all__ = ["methods"]


def methods() -> None:
    """List the available methods, one line each, with their cost."""
    from camkit.methods import METHODS, method_names

    table = Table(title="camkit methods")
    table.add_column("name", no_wrap=True, min_width=max(len(n) for n in method_names()))
    for col in ("what", "cost per image", "paper"):
        table.add_column(col)
    for name in method_names():
        m = METHODS[name]
        table.add_row(name, m.summary, m.cost, m.paper)
    console.print(table)
