"""Regenerate docs/methods.md from the method registry (camkit.methods.METHODS).

    .venv/bin/python tools/methods_table.py      # or: make methods-table

tests/test_docs.py fails when the committed docs/methods.md differs from what the registry renders, so the table
cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "methods.md"


def render() -> str:
    """The methods table in Markdown, one row per registered method, in the registry's order."""
    from camkit.methods import METHODS
    from camkit.methods.registry import method_parameters

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Methods",
        "",
        "Generated from the method registry by `make methods-table` (`tools/methods_table.py`); `camkit methods`",
        "prints the same (`--format json` for programs). The formulas in full: [Formulas and conventions](conventions.md);",
        "to add a method, see [Architecture](architecture.md#adding-a-method). The parameters, with their defaults, are",
        "set as `name(key=value, ...)` ([Method parameters](cli.md#method-parameters)).",
        "",
        "| name | family | parameters | map / weights | cost | when to prefer it | paper | aliases |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS.values():
        aliases = ", ".join(f"`{a}`" for a in m.aliases)
        params = ", ".join(f"`{k}={v!r}`" for k, v in method_parameters(m.name).items())
        lines.append(
            f"| `{m.name}` | {m.family} | {cell(params)} | {cell(m.summary)} | {cell(m.cost)} | {cell(m.prefer)} | "
            f"{cell(m.paper)} | {aliases} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    TARGET.write_text(render(), encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
