"""The modes of the files camkit writes: every writer gives the mode a plain ``open()`` would under the process's
umask (``0o666 & ~umask``), never the ``0o600`` of the temporary file a write goes through, so that a colleague
or another user of a shared file system can read a report, an overlay or a store.

Each test sets the process's umask and restores it after (the runs here start no other process: ``--workers 0``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app

runner = CliRunner()
FAST = ["--model", "squeezenet1_0", "--no-pretrained", "--threads", "1"]


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    saved = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(saved)


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _modes(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` (``root`` included) -> its permission bits."""
    entries = [root, *root.rglob("*")]
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in entries}


def _assert_modes(root: Path, mask: int, expected_files: set[str]) -> None:
    modes = _modes(root)
    names = {Path(k).name for k, v in modes.items()}
    assert expected_files <= names, f"missing outputs: {expected_files - names}"
    wrong = {
        k: oct(v) for k, v in modes.items() if v != ((0o777 if (root.parent / k).is_dir() else 0o666) & ~mask)
    }
    assert not wrong, f"modes under umask {oct(mask)}: {wrong}"


def test_library_writers_give_the_umask_mode(tmp_path: Path, umask: int) -> None:
    from camkit.io.files import atomic_write, save_image, write_json
    from camkit.report import ImageRecord, Prediction, write_report

    out = tmp_path / "lib"
    out.mkdir()
    write_json(out / "a.json", {"x": 1})
    save_image(Image.new("RGB", (8, 8)), out / "b.png")
    save_image(Image.new("RGB", (8, 8)), out / "c.jpg", quality=80)
    with atomic_write(out / "d.bin") as f:
        f.write(b"x")
    pic = Image.new("RGB", (32, 24), (200, 100, 50))
    write_report([ImageRecord("x", pic, target=Prediction(1, "one", 0.5))], out / "r.html")
    _assert_modes(out, umask, {"a.json", "b.png", "c.jpg", "d.bin", "r.html"})


def test_a_store_its_report_and_explain_pngs_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    data = _photos(tmp_path / "in", 3)
    store = tmp_path / "store"
    args = ["run", str(data), "--out", str(store), *FAST, "--image-size", "64", "--workers", "0"]
    res = runner.invoke(app, [*args, "--thumbnails", "32", "--shard-size", "2"])
    assert res.exit_code == 0, res.output
    _assert_modes(
        store,
        umask,
        {"run.json", "items.parquet", "table.parquet", "summary.json", "zarr.json", "00000000.jpg"}
        | {"000000.parquet", "000000.done", "000001.parquet", "000001.done"},
    )
    chunks = [p for p in (store / "maps.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks  # the zarr chunk files were among those checked

    report = tmp_path / "report"
    report.mkdir()
    res = runner.invoke(app, ["report", str(store), "--out", str(report / "store.html")])
    assert res.exit_code == 0, res.output
    _assert_modes(report, umask, {"store.html"})

    ex = tmp_path / "ex"
    res = runner.invoke(
        app, ["explain", str(data / "p0.png"), *FAST, "--out", str(ex), "-m", "gradcam,layercam"]
    )
    assert res.exit_code == 0, res.output
    _assert_modes(ex, umask, {"summary.json", "p0_squeezenet1_0_gradcam.png", "p0_squeezenet1_0_grid.png"})
