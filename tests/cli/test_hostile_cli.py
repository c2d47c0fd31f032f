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
SRC = Path(__file__).resolve().parents[2] / "src"


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


def test_option_parser_messages_show_the_value_whole() -> None:
    res = invoke("methods", "--format", "[red]x[/x] :smile:")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "[red]x[/x] :smile:" in res.output


def test_layers_table_marks_auto(tmp_path: Path) -> None:
    res = invoke("layers", "squeezenet1_0", "--no-pretrained")
    assert res.exit_code == 0, res.output
    assert "<- auto" in res.stdout and "[bold" not in res.stdout


# ------------------------------------------------------------------ 21: full disk, read-only or forbidden --out


def _fail_with(monkeypatch: pytest.MonkeyPatch, target: object, name: str, code: int) -> list[str]:
    """Make ``target.name`` raise ``OSError(code)`` (as a full disk or a read-only mount would); the calls seen."""
    real = getattr(target, name)
    calls: list[str] = []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(name)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(target, name, failing)
    assert callable(real)
    return calls


def _leftovers(folder: Path) -> list[Path]:
    """Temporary files of interrupted writes (camkit's ``.part``, zarr's ``.partial``)."""
    return [p for p in folder.rglob("*") if p.suffix in (".part", ".partial")]


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.ENOSPC, "free some space or choose another --out, then run the same command again"),
        (errno.EDQUOT, "quota"),
        (errno.EROFS, "choose a writable folder with --out"),
        (errno.EACCES, "check its permissions"),
    ],
)
def test_explain_on_a_failing_disk_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, advice: str
) -> None:
    src = photo(tmp_path / "in" / "cat.png")
    out = tmp_path / "out"
    calls = _fail_with(monkeypatch, os, "fsync", code)  # each file is synced before its rename
    line = one_error(invoke("explain", src, *FAST, "--out", out))
    assert calls  # the failure happened while writing
    assert f"({errno.errorcode[code]})" in line and repr(str(out)) in line and advice in line
    assert _leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == []  # nothing half-written


def test_every_command_has_the_same_error_handling() -> None:
    import typer.main

    from camkit.cli import CamkitCommand

    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert set(commands) >= {"explain", "layers", "methods", "evaluate", "localize", "run", "report", "serve"}
    assert all(isinstance(c, CamkitCommand) for c in commands.values()), commands


def test_read_only_temporary_file_names_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    src = photo(tmp_path / "in" / "cat.png")
    out = tmp_path / "out"

    def read_only(
        *args: object, dir: str | Path | None = None, prefix: str = "", suffix: str = "", **kw: object
    ):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(str(dir)) / f"{prefix}x1y2{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    line = one_error(invoke("explain", src, *FAST, "--out", out))
    assert line.endswith(f"Read-only file system (EROFS): {str(out)!r}; choose a writable folder with --out")


def test_run_on_a_full_disk_is_one_error_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr.storage._local as zarr_local

    for i in range(3):
        photo(tmp_path / "in" / f"p{i}.png", seed=i)
    store = tmp_path / "store"
    real = zarr_local._put
    calls: list[Path] = []

    def full(path: Path, value: object, exclusive: bool = False) -> int:
        if "/c/" not in path.as_posix():  # the store's metadata is written; its map chunks are not
            return real(path, value, exclusive=exclusive)  # type: ignore[arg-type]
        calls.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.with_suffix(".x.partial").open("wb") as f:  # as zarr does: a temporary file first, then ...
            f.write(b"half")
        path.with_suffix(".x.partial").unlink()  # ... removed when the write fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zarr_local, "_put", full)
    args = ["run", tmp_path / "in", *FAST, "--methods", "gradcam", "--out", store]
    line = one_error(invoke(*args))
    assert calls and "No space left on device (ENOSPC)" in line and repr(str(store)) in line
    assert _leftovers(store) == []
    assert not list((store / "shards").glob("*.done")) if (store / "shards").exists() else True
    monkeypatch.setattr(zarr_local, "_put", real)  # space freed: the same command finishes the store
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "3 of 3 images explained" in res.stdout


def test_closed_stdout_pipe_is_not_reported_as_a_disk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import typer.core

    from camkit.cli import CamkitCommand

    def broken(self: object, ctx: object) -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(typer.core.TyperCommand, "invoke", broken)
    with pytest.raises(BrokenPipeError):  # left to typer, which exits quietly (`camkit methods | head`)
        CamkitCommand(name="x").invoke(types.SimpleNamespace(params={"out": tmp_path}))


# ------------------------------------------------------------------------------- 23: Ctrl-C, one line, 130


def test_interrupt_inside_a_command_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from camkit import _interrupt

    monkeypatch.setattr(_interrupt.state, "announced", False)
    monkeypatch.setattr(_interrupt.state, "interrupted", False)
    src = photo(tmp_path / "cat.png")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "load_model", interrupted)
    monkeypatch.setattr("camkit.cli.explain.load_model", interrupted, raising=False)
    res = invoke("explain", src, *FAST, "--out", tmp_path / "o")
    assert res.exit_code == 130, res.output
    assert res.stderr == "interrupted\n" and "Traceback" not in res.output


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, as in a terminal. A suite started in the background
    of a shell without job control inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("delay", [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0])
def test_ctrl_c_at_any_moment_is_one_line_and_130(tmp_path: Path, delay: float) -> None:
    """Start-up (imports of typer, torch, the library), model loading, Score-CAM's forwards: Ctrl-C ends the process
    with one line and status 130. Only a signal that lands in Python's own start-up, before the first line of
    camkit runs (a few tens of milliseconds), may end it otherwise; from 0.2 s on none does."""
    photos = [photo(tmp_path / f"p{i}.png", size=(96, 96), seed=i) for i in range(4)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "camkit", "explain", *map(str, photos), *FAST, "--methods", "scorecam",
         "--out", str(tmp_path / "o")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path, preexec_fn=_default_sigint,
    )  # fmt: skip
    time.sleep(delay)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, raw = proc.communicate(timeout=120)
    err = raw.decode()
    assert still_running, f"finished before the signal: {err}"
    assert _leftovers(tmp_path) == []
    if delay < 0.2 and proc.returncode != 130 and "KeyboardInterrupt" in err:
        assert str(SRC / "camkit") not in err, err  # Python's own start-up: no camkit code had run yet
        return
    assert proc.returncode == 130, err
    assert err == "interrupted\n"


def test_a_ctrl_c_caught_on_its_way_up_still_ends_as_interrupted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A library (or an extension that turns a Python error into its own) may catch the KeyboardInterrupt of the
    first Ctrl-C and carry on: the command still ends with the one line and status 130, not 0."""
    import camkit.cli
    from camkit import _entry
    from camkit._interrupt import state

    def swallowed() -> None:
        state.raised = True  # what the SIGINT handler records before it raises
        try:
            raise KeyboardInterrupt
        except BaseException:  # a library that catches everything
            pass

    monkeypatch.setattr(camkit.cli, "run_app", swallowed)
    monkeypatch.setattr(state, "raised", False)
    monkeypatch.setattr(state, "announced", False)
    monkeypatch.setattr(state, "interrupted", False)
    assert _entry._run() == 130
    assert capsys.readouterr().err == "interrupted\n"
