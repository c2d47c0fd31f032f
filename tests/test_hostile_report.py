"""The report and the summary files under hostile use: concurrent ``camkit explain`` runs into one folder, stores
made with every metric, records and titles that carry script.

Runs use random-weight models (weights do not matter here); the browser tests use Debian's Chromium through
Playwright (``tests/_browser.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app

runner = CliRunner()
FAST = ["--model", "squeezenet1_0", "--no-pretrained", "--threads", "1"]
SRC = Path(__file__).resolve().parent.parent / "src"


def _photo(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------ 4: concurrent summary.json writers

# One process: import everything, say it is ready, wait for the start signal, then run `camkit explain` once per
# image (the CLI in this process, Typer's runner) into the shared --out.
_EXPLAIN_DRIVER = """
import sys, time
from pathlib import Path
from typer.testing import CliRunner
from camkit.cli import app
out, ready, go, *images = sys.argv[1:]
runner = CliRunner()
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
for image in images:
    res = runner.invoke(app, ["explain", image, "--model", "squeezenet1_0", "--no-pretrained", "--threads", "1",
                              "--out", out])
    if res.exit_code != 0:
        sys.exit(f"explain {image} failed: {res.output}")
"""


def test_concurrent_explain_runs_keep_every_summary_entry(tmp_path: Path) -> None:
    """Three processes, each running `camkit explain` on three images one after another into one --out, twice
    over: summary.json ends with an entry per PNG written, none lost to another process's read-merge-write."""
    procs, per_proc = 3, 3
    for trial in range(2):
        base = tmp_path / f"t{trial}"
        (base / "in").mkdir(parents=True)
        out = base / "out"
        go = base / "go"
        jobs = []
        for p in range(procs):
            images = [str(_photo(base / "in" / f"p{p}_{i}.png", seed=10 * p + i)) for i in range(per_proc)]
            cmd = [sys.executable, "-c", _EXPLAIN_DRIVER, str(out), str(base / f"ready{p}"), str(go), *images]
            jobs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 300
        while not all((base / f"ready{p}").exists() for p in range(procs)):
            assert time.monotonic() < deadline and all(j.poll() is None for j in jobs), [
                j.communicate()[1].decode() for j in jobs if j.poll() is not None
            ]
            time.sleep(0.02)
        go.touch()
        for job in jobs:
            _, err = job.communicate(timeout=600)
            assert job.returncode == 0, err.decode()
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert len(pngs) == procs * per_proc
        assert sorted(Path(e["file"]).name for e in summary) == pngs
        assert (out / ".camkit-summary.lock").exists()  # left in place: a waiting process may hold it open


# ---------------------------------------------------------------------- 7: a store made with every metric


def _report_data(page: str) -> dict[str, Any]:
    """The JSON block of a report page."""
    start = page.index('id="report-data">') + len('id="report-data">')
    data: dict[str, Any] = json.loads(page[start : page.index("</script>", start)])
    return data


def test_a_store_with_every_metric_is_reported(tmp_path: Path) -> None:
    """`camkit run` with every --metrics name (maxboxacc too, whose per-image value is an IoU curve: a list) on a
    manifest with boxes, then `camkit report`: the page has every one-number metric column of every method, no
    list column, and MaxBoxAcc (a data-set value) in its header line, as the store's summary gives it."""
    from camkit.run import open_store
    from camkit.run.runner import METRIC_COLUMNS

    (tmp_path / "in").mkdir()
    lines = ["path,class,boxes"]
    for i in range(3):
        path = _photo(tmp_path / "in" / f"p{i}.png", seed=i).resolve()
        lines.append(f'{path},{i},"[[4, 4, 30, 30]]"')
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = tmp_path / "store"
    args = ["run", str(manifest), "--out", str(store), *FAST, "--image-size", "64", "--workers", "0"]
    res = runner.invoke(
        app, [*args, "-m", "gradcam,layercam", "--metrics", ",".join(METRIC_COLUMNS), "--steps", "4"]
    )
    assert res.exit_code == 0, res.output
    assert "gradcam.iou_curve" in open_store(store).table().column_names  # the list column the report met

    page = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(store), "--out", str(page)])
    assert res.exit_code == 0, res.output
    data = _report_data(page.read_text(encoding="utf-8"))
    scalar = [c for cols in METRIC_COLUMNS.values() for c in cols if c != "iou_curve"]
    assert data["metricColumns"] == [[m, c] for m in ("gradcam", "layercam") for c in scalar]
    for image in data["images"]:
        for values in image["metrics"].values():
            assert set(values) == set(scalar)
            assert all(v is None or isinstance(v, float) for v in values.values())
    summary = open_store(store).summary()["maxboxacc"]
    shown = ", ".join(f"{m} {summary[m]['value']:.3f}" for m in ("gradcam", "layercam"))
    assert f"MaxBoxAcc {shown}" in data["meta"]
