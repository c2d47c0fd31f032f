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


# --- import graph: no cycle among camkit's modules, imports inside functions included ---------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _exists(module: str) -> bool:
    return _is_module(*module.rsplit(".", 1)) if "." in module else module == "camkit"


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``: imports that never run."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level, inside functions, classes, ``try`` and ``if`` blocks,
    but not under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def _imported_modules(
    source: str, module: str, is_package: bool, lazy: dict[str, dict[str, str]] | None = None
) -> set[str]:
    """The camkit modules that ``module`` imports: ``import camkit.x``, ``from camkit.x import y`` (``camkit.x.y``
    when ``y`` is a submodule, else ``camkit.x``, and the module ``y`` comes from when the package ``camkit.x``
    imports it on first use: ``lazy``), relative imports resolved against the package."""
    lazy = lazy or {}
    package = module if is_package else module.rpartition(".")[0]
    edges: set[str] = set()
    for node in _runtime_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names}
            continue
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            edges.add(f"{base}.{alias.name}" if _exists(f"{base}.{alias.name}") else base)
            if alias.name in lazy.get(base, {}):
                edges.add(lazy[base][alias.name])
    own = _ancestors(module) | {module}
    edges = {name for name in edges if name == "camkit" or name.startswith("camkit.")}
    # importing camkit.a.b runs camkit/a/__init__.py first, unless the importer is inside camkit.a already
    return {found for name in edges for found in _ancestors(name) | {name} if found not in own}


def _ancestors(module: str) -> set[str]:
    """The packages above ``module`` (``camkit.a.b``: ``camkit``, ``camkit.a``)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _lazy_exports(source: str) -> dict[str, str]:
    """A package's ``_EXPORTS`` (name -> the module its ``__getattr__`` imports it from on first use), or {}."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_EXPORTS"]:
            value = ast.literal_eval(node.value)
            assert isinstance(value, dict)
            return value
    return {}


def _import_graph() -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    lazy = {_module_name(p): _lazy_exports(p.read_text()) for p in paths if p.name == "__init__.py"}
    return {
        _module_name(p): _imported_modules(p.read_text(), _module_name(p), p.name == "__init__.py", lazy)
        for p in paths
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "{" + ", ".join(component) + "}: " + "; ".join(edges)


def test_no_import_cycle_among_camkit_modules() -> None:
    """No two camkit modules import each other, directly or through others, at module level or inside a function
    (an import moved into a function hides a cycle from the interpreter, not from the design)."""
    graph = _import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (each a set of modules, then its edges):\n" + "\n".join(
        _describe(component, graph) for component in cycles
    )


def test_the_import_scan_sees_function_imports_submodules_relative_imports_and_packages() -> None:
    source = (
        "import camkit.errors\n"
        "from camkit.core import pipeline\n"
        "from camkit.adapters import load_model\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from camkit.report import html\n"
        "def f():\n    from .zoo import load_model\n    from . import keras\n    from ..io.files import x\n"
    )
    # the importer's own package (camkit.adapters) is running already: no edge to it
    assert _imported_modules(source, "camkit.adapters.video", is_package=False) == {
        "camkit.errors",
        "camkit.core",
        "camkit.core.pipeline",
        "camkit.adapters.zoo",
        "camkit.adapters.keras",
        "camkit.io",
        "camkit.io.files",
    }
    # a name a package imports on first use (its _EXPORTS) is an edge to the module it comes from
    lazy = {"camkit.adapters": _lazy_exports('_EXPORTS = {"load_model": "camkit.adapters.zoo"}\n')}
    assert _imported_modules(
        "from camkit.adapters import load_model\n", "camkit.run.runner", False, lazy
    ) == {
        "camkit.adapters",
        "camkit.adapters.zoo",
    }
    # importing camkit.adapters.task from elsewhere runs camkit/adapters/__init__.py first
    assert _imported_modules("from camkit.adapters.task import model_task\n", "camkit.core.tasks", False) == {
        "camkit.adapters",
        "camkit.adapters.task",
    }


def test_the_cycle_finder_finds_each_strongly_connected_component() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"g"}}
    assert _cycles(graph) == [["a", "b", "c"], ["e", "f"]]


# --- function length: no function body over 60 lines -------------------------------------------------------------

MAX_BODY_LINES = 60


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement of the body to the end of the last, the docstring left out (nested
    functions and classes count in their parent)."""
    body = fn.body
    first = body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def _long_functions(source: str) -> list[tuple[int, str, int]]:
    """(line, name, body lines) of each function whose body passes ``MAX_BODY_LINES``."""
    return [
        (node.lineno, node.name, _body_lines(node))
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_BODY_LINES
    ]


def test_no_function_body_over_60_lines() -> None:
    offenders = [
        f"{path.relative_to(ROOT.parent).as_posix()}:{line} {name}: {lines} lines"
        for path in sorted(SRC.rglob("*.py"))
        for line, name, lines in _long_functions(path.read_text())
    ]
    assert not offenders, (
        f"function bodies over {MAX_BODY_LINES} lines (signature and docstring not counted); split them:\n"
        + "\n".join(offenders)
    )


def test_the_length_check_counts_the_body_without_the_docstring() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_BODY_LINES))
    short = f'def f(\n    a: int,\n) -> None:\n    """Doc\n\n    more.\n    """\n{body}'
    nested = (
        f"def g():\n    def h():\n{''.join('    ' + line for line in body.splitlines(True))}    return h\n"
    )
    assert _long_functions(short) == []
    assert _long_functions(nested) == [(1, "g", MAX_BODY_LINES + 2)]


# --- the public API and the version --------------------------------------------------------------------------------


def test_tune_allocator_is_not_public_but_stays_in_the_runtime() -> None:
    """It changes the whole process (malloc's thresholds): the ``camkit`` command calls it, the library does not
    export it."""
    from camkit.core import runtime

    assert "tune_allocator" not in camkit.__all__ and "tune_allocator" not in dir(camkit)
    assert not hasattr(camkit, "tune_allocator")
    assert callable(runtime.tune_allocator)


def test_the_version_is_written_in_one_place() -> None:
    """``camkit.__version__`` is the version; ``pyproject.toml`` has none of its own and reads that one."""
    import tomllib

    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "camkit.__version__"}
    assert isinstance(camkit.__version__, str) and camkit.__version__.count(".") >= 2
    # setuptools reads the attribute without importing camkit: it must stay a literal string assignment
    tree = ast.parse((SRC / "__init__.py").read_text(encoding="utf-8"))
    literal = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literal == [camkit.__version__]
