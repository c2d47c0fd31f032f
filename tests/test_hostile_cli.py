"""The command line under hostile input and hostile conditions: user text is never read as Rich markup (file
names, labels, boxes in messages, progress bars and tables), a read-only or full disk ends in one ``error:`` line
with exit status 2 and nothing half-written, and Ctrl-C at any moment (start-up included) ends in one line and
exit status 130.

Runs use a random-weight SqueezeNet (``--model squeezenet1_0 --no-pretrained``) on small photos.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app, common

runner = CliRunner()
FAST = ["--model", "squeezenet1_0", "--no-pretrained"]
SRC = Path(__file__).resolve().parents[1] / "src"


def photo(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def one_error(res, status: int = 2) -> str:
    """The single ``error:`` line of a run that failed cleanly."""
    assert res.exit_code == status, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr counts as a terminal, so progress bars render (into the runner's captured stderr)."""
    monkeypatch.setattr(common.err_console, "_force_terminal", True)
    monkeypatch.setattr(common.err_console, "is_interactive", True)


# --------------------------------------------------------------------------- 22: no user text is markup


@pytest.mark.parametrize("name", ["IMG [copy].jpg", "a [bold]b[/bold] :smile: c.png", "[red]x.png"])
def test_missing_file_name_is_shown_exactly(tmp_path: Path, name: str) -> None:
    line = one_error(invoke("explain", tmp_path / name, *FAST, "--out", tmp_path / "o"))
    assert repr(str(tmp_path / name)) in line


def test_closing_tag_in_a_path_is_one_clean_error(tmp_path: Path) -> None:
    missing = tmp_path / "a[" / "x]b.png"  # the path holds "[/x]"
    assert "[/x]" in str(missing)
    line = one_error(invoke("explain", missing, *FAST, "--out", tmp_path / "o"))
    assert repr(str(missing)) in line
    line = one_error(invoke("run", missing, *FAST, "--out", tmp_path / "store"))
    assert "[/x]" in line


def test_box_in_a_message_is_shown_whole(tmp_path: Path) -> None:
    img = photo(tmp_path / "cat.png")
    ann = tmp_path / "ann.json"
    ann.write_text('{"cat.png": {"boxes": [[NaN, 0, 100, 100]]}}', encoding="utf-8")
    line = one_error(invoke("evaluate", img, "-a", ann, *FAST, "--out", tmp_path / "o"))
    assert "box [nan, 0, 100, 100] has a missing or non-finite coordinate" in line


def test_fail_and_warn_print_text_as_given(capsys: pytest.CaptureFixture[str]) -> None:
    text = "x [/x] [bold]y[/bold] [link=file:///etc]z[/link] :warning: \\[w]"
    common.warn(text)
    with pytest.raises(typer.Exit) as exited:
        common.fail(ValueError(text))
    assert exited.value.exit_code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {text}", f"error: {text}"]


def test_bracketed_names_in_explain_progress_and_table(tmp_path: Path, terminal: None) -> None:
    src = photo(tmp_path / "in" / "IMG [copy].png")
    other = photo(tmp_path / "in" / "[bold]b.png", seed=1)
    res = invoke(
        "explain", other, src, *FAST, "--methods", "scorecam", "--top-channels", "2", "--progress",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "images (IMG [copy])" in res.stderr  # the progress bar's description (its last frame)
    assert "IMG [copy]" in res.stdout and "[bold]b" in res.stdout  # the table
    written = json.loads((tmp_path / "o" / "summary.json").read_text(encoding="utf-8"))
    assert {Path(str(e["source"])).name for e in written} == {src.name, other.name}


def test_bracketed_names_in_evaluate_progress(tmp_path: Path, terminal: None) -> None:
    src = photo(tmp_path / "IMG [copy].png")
    res = invoke(
        "evaluate", src, *FAST, "--methods", "gradcam", "--metrics", "deletion", "--steps", "2", "--progress",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "gradcam on IMG [copy].png" in res.stderr  # the progress bar's description (its last frame)


def test_unreadable_bracketed_file_is_named_in_its_skip_line(tmp_path: Path) -> None:
    good = photo(tmp_path / "good.png")
    bad = tmp_path / "bad [copy].png"
    bad.write_bytes(b"not an image")
    res = invoke("explain", good, bad, *FAST, "--out", tmp_path / "o")
    assert res.exit_code == 1, res.output
    assert f"error: skipped {str(bad)!r}" in res.stderr


def test_layers_table_marks_auto(tmp_path: Path) -> None:
    res = invoke("layers", "squeezenet1_0", "--no-pretrained")
    assert res.exit_code == 0, res.output
    assert "<- auto" in res.stdout and "[bold" not in res.stdout
