"""The `camkit` command, run as a user would (Typer's runner, same process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import camkit
from camkit.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


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


def test_corrupt_image_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = runner.invoke(app, ["explain", str(bad), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "cannot read" in res.output


def test_layers_and_methods_commands():
    res = runner.invoke(app, ["layers", "efficientnet_lite0"])
    assert res.exit_code == 0 and "auto: bn2" in res.output
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in camkit.method_names():
        assert name in res.output
