"""The `camkit` command, run as a user would (Typer's runner, same process), and its package layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import camkit
from camkit.cli import app

runner = CliRunner()
COMMANDS = ("explain", "layers", "methods", "localize", "evaluate")


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and command in res.output


def test_no_command_shows_the_commands():
    res = runner.invoke(app, [])
    for command in COMMANDS:
        assert command in res.output


def test_each_command_lives_in_its_module():
    import importlib

    for command in COMMANDS:
        module = importlib.import_module(f"camkit.cli.{command}")
        assert callable(getattr(module, command))


def test_the_command_tunes_the_allocator(monkeypatch) -> None:
    from camkit import cli
    from camkit.core import runtime

    calls: list[str] = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("tune") or True)
    monkeypatch.setattr(cli, "app", lambda: calls.append("app"))
    cli.run_app()
    assert calls == ["tune", "app"]


def test_summary_rows_keep_their_json_keys(tmp_path):
    from camkit.cli.explain import SummaryRow, TaskInfo

    row = SummaryRow("cat", 285, "Egyptian cat", 0.5, "gradcam", ["bn2"], tmp_path / "cat_gradcam.png")
    assert list(row.to_dict()) == ["image", "class", "label", "prob", "method", "layers", "file"]
    assert row.cells()[:3] == ("cat", "285 Egyptian cat", "0.500")
    task = SummaryRow(
        "cat",
        17,
        "cat",
        0.9,
        "gradcam",
        ["x"],
        tmp_path / "f.png",
        TaskInfo("segmentation", "mask", coverage=0.25),
    )
    assert task.to_dict()["task"] == "segmentation" and task.to_dict()["coverage"] == 0.25
    assert "box" not in task.to_dict()


def test_user_errors_exit_2_without_loading_anything(tmp_path):
    res = runner.invoke(app, ["explain", "--alpha", "2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "error:" in res.output and "alpha" in res.output
    res = runner.invoke(app, ["explain", "--method", "gradcm", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "gradcam" in res.output
    res = runner.invoke(app, ["localize", "--target", "top2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not topK" in res.output


@pytest.mark.slow
def test_default_run_writes_a_cat_overlay(tmp_path):
    res = runner.invoke(app, ["explain", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = Image.open(tmp_path / "chelsea_gradcam.png")
    cat = camkit.sample_image("chelsea")
    assert out.size == cat.size
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(cat, dtype=int)).mean()
    assert diff > 10  # a heatmap was blended in
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary[0]["class"] == 285 and summary[0]["label"] == "Egyptian cat"


@pytest.mark.slow
def test_compare_methods_and_layers_writes_a_grid(tmp_path):
    photo = tmp_path / "coffee.jpg"
    camkit.sample_image("coffee").save(photo)
    res = runner.invoke(
        app,
        [
            "explain",
            str(photo),
            "--methods",
            "gradcam,gradcam++,layercam",
            "--layers",
            "blocks.3,blocks.5,bn2",
            "--target",
            "top2",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    for name in ("coffee_gradcam_top1.png", "coffee_layercam_top2.png", "coffee_grid_top1.png"):
        assert (tmp_path / name).exists(), name
    grid = Image.open(tmp_path / "coffee_grid_top1.png")
    assert grid.width > grid.height  # input + 3 layers + fused columns, 3 method rows


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "missing.jpg"], "not found"),
        (["explain", "--layer", "bn3"], "bn2"),
        (["explain", "--target", "1000"], "out of range"),
        (["explain", "--method", "gradcm"], "gradcam"),
        (["explain", "--model", "resnet5O"], "resnet50"),
        (["explain", "--alpha", "2"], "alpha"),
    ],
)
def test_user_errors_are_clean(tmp_path, args, message):
    res = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "error:" in res.output and message in res.output
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_corrupt_image_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = runner.invoke(app, ["explain", str(bad), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "cannot read" in res.output


@pytest.mark.slow
def test_layers_and_methods_commands():
    res = runner.invoke(app, ["layers", "efficientnet_lite0"])
    assert res.exit_code == 0 and "auto: bn2" in res.output
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in camkit.method_names():
        assert name in res.output
