"""Documentation stays in step with the code, and the site builds without a warning."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
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
    assert committed == rendered, "docs/methods.md is out of date: run `make methods-table`"
    for name in METHODS:
        assert f"| `{name}` |" in rendered


def test_api_reference_lists_every_public_name() -> None:
    import camkit

    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: camkit\.(\w+)\s*$", api, flags=re.MULTILINE))
    public = {name for name in camkit.__all__ if not name.startswith("__")}
    assert public - documented == set(), "add a `::: camkit.NAME` line to docs/api.md"
    assert documented - public == set(), "docs/api.md documents names that camkit does not export"


def test_readme_links_point_at_files() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "README.md links to no file"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == [], f"README.md links to missing files: {missing}"


def _snapshot() -> set[str]:
    """The repository's top-level entries and everything under docs/ (what a build could write into)."""
    top = {p.name for p in ROOT.iterdir()}
    docs = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*")}
    return top | docs


def test_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict` (what `make docs` runs) into a temporary folder: any warning fails."""
    before = _snapshot()
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    result = subprocess.run(
        [*command, "-d", str(site), "-f", str(ROOT / "mkdocs.yml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (site / "index.html").is_file()
    assert (site / "api.html").is_file()
    api = (site / "api.html").read_text(encoding="utf-8")
    assert 'id="camkit.explain"' in api, "the API reference was not generated from the docstrings"
    assert _snapshot() == before, "the docs build wrote into the repository"
