"""zarr and pyarrow are the ``camkit[run]`` extra: without them, ``camkit run``, ``open_store`` and
``camkit report STORE`` stop with one error that names ``pip install "camkit[run]"``; everything else imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import camkit
from camkit.cli import app
from camkit.run import ModelSpec, RunOptions, open_store, run
from camkit.run.extra import RUN_EXTRA, require_run_extra

runner = CliRunner()
HINT = 'pip install "camkit[run]"'


@pytest.fixture
def store_folder(tmp_path: Path) -> Path:
    """A folder that says it is a finished store (nothing else is read before the extra is checked)."""
    folder = tmp_path / "store"
    folder.mkdir()
    marker = {"format": "camkit-run-store", "version": 2, "state": "ready", "n": 1, "shard_size": 1}
    (folder / "run.json").write_text(json.dumps(marker))
    return folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("missing", [("zarr",), ("pyarrow",), ("zarr", "pyarrow")])
def test_missing_packages_are_named_with_the_extra(
    monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...]
) -> None:
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # what an import of a package that is not installed does
    with pytest.raises(camkit.CamkitError) as caught:
        require_run_extra("camkit run")
    message = str(caught.value)
    assert RUN_EXTRA == HINT and message.endswith(HINT) and "\n" not in message
    assert all(name in message for name in missing)


def test_python_api_without_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store_folder: Path, photos: Path
) -> None:
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(camkit.CamkitError, match=HINT.replace("[", r"\[").replace("]", r"\]")):
        open_store(store_folder)
    out = tmp_path / "new"
    with pytest.raises(camkit.CamkitError, match="camkit run needs zarr"):
        run([photos], out, model=ModelSpec("never-loaded"), options=RunOptions())
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("command", ["run", "report", "evaluate"])
def test_commands_without_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store_folder: Path, photos: Path, command: str
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    args = {
        "run": ["run", str(photos), "--out", str(tmp_path / "new"), "--workers", "0"],
        "report": ["report", str(store_folder), "--out", str(tmp_path / "r.html")],
        "evaluate": ["evaluate", str(store_folder)],
    }[command]
    res = runner.invoke(app, args)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(lines) == 1 and lines[0].startswith("error:") and HINT in res.output, res.output


def test_nothing_imports_them_before_a_store_is_used(tmp_path: Path, photos: Path) -> None:
    """In a fresh interpreter where zarr and pyarrow cannot be imported at all: ``camkit``, ``camkit.run``,
    ``camkit.report`` and the command import, and ``camkit run`` ends with one error line naming the extra."""
    code = f"""
import sys
sys.modules["zarr"] = None
sys.modules["pyarrow"] = None
import camkit, camkit.run, camkit.report, camkit.evaluate
from camkit._entry import main
sys.argv = ["camkit", "run", {str(photos)!r}, "--out", {str(tmp_path / "st")!r}, "--workers", "0"]
main()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert lines == [f"error: camkit run needs zarr and pyarrow, which are not installed: {HINT}"], res.stderr


def test_import_camkit_loads_neither_the_extra_nor_torch() -> None:
    code = "import sys, camkit; print(sorted(m for m in ('torch', 'zarr', 'pyarrow', 'numpy') if m in sys.modules))"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert res.stdout.strip() == "[]"
