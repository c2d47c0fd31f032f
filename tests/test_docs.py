"""Generated documentation stays in step with the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_table_matches_the_registry() -> None:
    from camkit.methods import METHODS

    rendered = _tool("methods_table").render()
    committed = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    assert committed == rendered, "docs/methods.md is out of date: run `make docs`"
    for name in METHODS:
        assert f"| `{name}` |" in rendered
