"""``camkit run --metrics`` with settings: the store's columns and run.json carry the metric's key
(``infidelity(perturbation=gaussian,samples=2)``), next to the default metric, and a resume with other settings
is refused (one line naming both), while the same settings written otherwise resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app
from camkit.run import open_store

ARGS = ["--model", "resnet18", "--no-pretrained", "--seed", "3", "--threads", "1", "--image-size", "32",
        "-m", "gradcam", "--steps", "4", "--batch-size", "4", "--shard-size", "4"]  # fmt: skip


def _images(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "c0").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "c0" / f"{i}.png")
    return root


def test_run_records_configured_metrics_and_refuses_a_resume_with_other_settings(tmp_path: Path) -> None:
    data, out = _images(tmp_path / "d"), tmp_path / "st"
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(data), "--out", str(out), *ARGS, "--metrics",
                              "infidelity(perturbation=gaussian, samples=2),infidelity"])  # fmt: skip
    assert res.exit_code == 0, res.output
    key = "infidelity(perturbation=gaussian,samples=2)"
    store = open_store(out)
    assert store.config["options"]["metrics"] == [key, "infidelity"]
    rows = store.table().to_pylist()
    assert all(math.isfinite(r[f"gradcam.{key}"]) and math.isfinite(r["gradcam.infidelity"]) for r in rows)
    assert rows[0][f"gradcam.{key}"] != rows[0]["gradcam.infidelity"]
    assert set(store.summary()["metrics"]["gradcam"]) == {key, "infidelity"}
    res = runner.invoke(app, ["run", str(data), "--out", str(out), *ARGS, "--metrics",
                              "infidelity(perturbation=gaussian,samples=3),infidelity"])  # fmt: skip
    assert res.exit_code == 2
    line = " ".join(res.output.split())
    assert "metrics:" in line and key in line and "samples=3" in line, line
    res = runner.invoke(app, ["run", str(data), "--out", str(out), *ARGS, "--metrics",
                              "infidelity( samples=2,perturbation=gaussian),infidelity"])  # fmt: skip
    assert res.exit_code == 0, res.output  # the same settings, written otherwise: the same store
    res = runner.invoke(app, ["run", str(data), "--out", str(tmp_path / "x"), *ARGS, "--metrics",
                              "infidelity(perturbation=gauss)"])  # fmt: skip
    assert res.exit_code == 2 and "unknown perturbation 'gauss'" in " ".join(res.output.split())
