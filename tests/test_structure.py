"""The package's structure: every module imports on its own, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import camkit

SRC = Path(camkit.__file__).resolve().parent  # src/camkit
ROOT = SRC.parent


def _modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """An import cycle shows up as an ImportError only for some import orders: import each module first.

    One interpreter for all (importing torch dozens of times is slow), with every ``camkit`` module dropped from
    ``sys.modules`` before each import, so that each module starts the import of the package from scratch.
    """
    code = f"""
import importlib, sys, traceback
failed = []
for name in {_modules()!r}:
    for loaded in [m for m in sys.modules if m == "camkit" or m.startswith("camkit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT.parent
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _is_module(package: str, name: str) -> bool:
    base = ROOT.joinpath(*package.split("."), name)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _private_imports(source: str, package: str) -> list[str]:
    """Private names that ``source`` (a module of ``package``) imports from camkit modules."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative import: resolve against the package
            parts = package.split(".")
            module = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module != "camkit" and not module.startswith("camkit."):
            continue
        for alias in node.names:
            name = alias.name
            private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
            if private and not _is_module(module, name):  # a private submodule is a module, not a name
                found.append(name)
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).parent.parts)
        rel = path.relative_to(ROOT).as_posix()
        found |= {(rel, name) for name in _private_imports(path.read_text(), package)}
    unexpected = sorted(found)
    assert not unexpected, f"private names imported from other camkit modules: {unexpected}; make them public"


def test_the_private_import_scan_sees_names_not_private_modules() -> None:
    source = (
        "from camkit.core.targets import _names, class_index\n"
        "from camkit.metrics import _common\n"
        "def f():\n    from .outputs import _tensor\n"
    )
    assert _private_imports(source, "camkit") == ["_names", "_tensor"]
