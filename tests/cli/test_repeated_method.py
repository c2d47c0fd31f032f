"""``--method`` (and ``--metrics``) given several times (as docs/cli.md shows) runs every one given, in order, as one
comma-separated ``--methods`` does; before, only the last one ran and the others were dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app

runner = CliRunner()
FAST = ["--model", "squeezenet1_0", "--no-pretrained", "--threads", "1"]


def _image(folder: Path) -> Path:
    img = folder / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    return img


def test_a_repeated_method_option_runs_each_method(tmp_path: Path) -> None:
    img = _image(tmp_path)
    args = ["explain", str(img), *FAST, "--out", str(tmp_path / "o"), "--method", "gradcam",
            "--method", "layercam,gradcam++", "-m", "xgradcam"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [e["method"] for e in summary if e["method"] != "grid"][:4] == [
        "gradcam", "layercam", "gradcam++", "xgradcam"
    ]  # fmt: skip


def test_a_repeated_metrics_option_computes_each_metric(tmp_path: Path) -> None:
    img = _image(tmp_path)
    args = ["evaluate", str(img), *FAST, "--out", str(tmp_path / "o"), "--methods", "gradcam",
            "--metrics", "avg_drop", "--metrics", "increase,sparseness"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    means = json.loads((tmp_path / "o" / "evaluate.json").read_text())
    text = json.dumps(means)
    assert all(m in text for m in ("avg_drop", "increase", "sparseness")), text[:500]


def test_localize_refuses_a_repeated_method_option(tmp_path: Path) -> None:
    """localize boxes one method: a second --method is an error, not a silent choice of the last."""
    res = runner.invoke(app, ["localize", *FAST, "--method", "gradcam", "--method", "layercam",
                              "--out", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--method" in errors[0], res.output
    assert not (tmp_path / "o").exists()


def test_an_empty_metrics_option_is_an_error_not_the_default(tmp_path: Path) -> None:
    img = _image(tmp_path)
    for value in ("", " , "):
        res = runner.invoke(
            app, ["evaluate", str(img), *FAST, "--out", str(tmp_path / "o"), "--metrics", value]
        )
        assert res.exit_code == 2 and "--metrics is empty" in res.output, res.output
    assert not (tmp_path / "o").exists()  # refused before anything ran
