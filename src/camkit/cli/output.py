"""How ``camkit layers``, ``methods`` and ``evaluate`` print their listings: ``--format table|tsv|json``.

* ``table``: a rich table. Names are never cut: their columns fold instead of ending in ``...``, and when stdout is
  not a terminal (a pipe, a file) the table is printed as wide as it needs, not at 80 columns.
* ``tsv``: a header line, then one line per row, tab-separated (tabs and newlines inside values become spaces).
* ``json``: strict JSON (NaN and infinities as ``null``), UTF-8.

tsv and json go to stdout alone; notes meant for a person go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Format", "FormatOption", "emit", "note", "stdout_console"]


class Format(str, Enum):
    """Output formats of the listings."""

    table = "table"
    tsv = "tsv"
    json = "json"


FormatOption = Annotated[
    Format,
    typer.Option(
        "--format",
        "-f",
        case_sensitive=False,
        help="table (for people), tsv or json (for programs: stdout holds only the data).",
    ),
]


def stdout_console() -> Console:
    """A console on the current stdout; as wide as the content needs when stdout is not a terminal. It reads no
    markup and no emoji codes: strings (names, labels) are printed as they are."""
    probe = Console(markup=False, emoji=False)
    if probe.is_terminal:
        return probe
    return Console(width=100_000, soft_wrap=False, markup=False, emoji=False)


def note(text: str, fmt: Format) -> None:
    """A line for a person: on stdout under a table, on stderr with tsv/json (stdout holds only data)."""
    if fmt is Format.table:
        stdout_console().print(text, highlight=False, markup=False)
    else:
        Console(
            stderr=True, width=100_000 if not sys.stderr.isatty() else None, markup=False, emoji=False
        ).print(text, highlight=False, markup=False)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def emit(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: Format,
    *,
    table: Table | None = None,
    data: Any = None,
) -> None:
    """Print ``rows`` (one value per column) in ``fmt``: ``table`` (``table`` when given, else a plain one),
    ``tsv``, or ``json`` (``data`` when given, else a list of objects keyed by the columns)."""
    if fmt is Format.json:
        from camkit.io.files import strict_json

        payload = data if data is not None else [dict(zip(columns, r, strict=True)) for r in rows]
        sys.stdout.write(
            json.dumps(strict_json(payload), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        )
        return
    if fmt is Format.tsv:
        lines = ["\t".join(columns), *("\t".join(_cell(v) for v in r) for r in rows)]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    if table is None:
        table = Table(title=Text(title))
        for col in columns:
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*(Text(_cell(v)) for v in r))
    stdout_console().print(table)
