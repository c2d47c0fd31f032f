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

import numpy as np
from PIL import Image

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
