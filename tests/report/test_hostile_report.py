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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app

runner = CliRunner()
FAST = ["--model", "squeezenet1_0", "--no-pretrained", "--threads", "1"]
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    import _browser

    yield from _browser.launch_chromium()


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


# ------------------------------------------------------------------ 16: records and titles that carry script

XSS = "<img src=x onerror=alert(1)>"


def _record(**fields: Any) -> Any:
    from camkit.localize import Box
    from camkit.report import ImageRecord, MapEntry, Prediction

    base: dict[str, Any] = {
        "name": "cat",
        "image": Image.new("RGB", (48, 32), (120, 90, 60)),
        "top5": [Prediction(3, "three", 0.6), Prediction(1, None, 0.2)],
        "target": Prediction(3, "three", 0.6),
        "maps": [
            MapEntry(
                "gradcam",
                "layer4",
                np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8),
                [Box(1, 2, 30, 20, 0.5)],
            )
        ],
        "metrics": {"gradcam": {"insertion": 0.5}},
    }
    base.update(fields)
    return ImageRecord(**base)


def _bad_records() -> list[tuple[str, Any]]:
    """(field named in the error, a record with a wrong-typed value there)."""
    from camkit.localize import Box
    from camkit.report import MapEntry, Prediction

    m = np.zeros((4, 4), np.float32)
    return [
        ("target.cls", _record(target=Prediction(XSS, "t", 0.5))),  # type: ignore[arg-type]
        ("target.prob", _record(target=Prediction(1, "t", XSS))),  # type: ignore[arg-type]
        ("top5[1].label", _record(top5=[Prediction(1, "a", 0.5), Prediction(2, 7, 0.1)])),  # type: ignore[arg-type]
        ("top5[0]", _record(top5=[(1, XSS, 0.5)])),
        ("size", _record(size=(XSS, "1"))),
        ("maps[0].boxes[0].x0", _record(maps=[MapEntry("g", "l", m, [Box(XSS, 0, 5, 5)])])),  # type: ignore[arg-type]
        ("maps[0].boxes[0]", _record(maps=[MapEntry("g", "l", m, [[0, 0, 5, XSS]])])),  # type: ignore[list-item]
        ("maps[0].method", _record(maps=[MapEntry(1, "l", m)])),  # type: ignore[arg-type]
        ("maps[0].map", _record(maps=[MapEntry("g", "l", XSS)])),  # type: ignore[arg-type]
        ("metrics['gradcam']['insertion']", _record(metrics={"gradcam": {"insertion": XSS}})),
        ("notes", _record(notes=XSS)),
        ("error", _record(error=["x"])),
        ("source", _record(source=Path("x"))),
    ]


def test_records_of_the_wrong_type_are_refused_naming_the_field(tmp_path: Path) -> None:
    """The issue's record (a class that is a string of markup) and its kin: write_report refuses each with a
    TypeError naming the record and the field, and leaves no file."""
    from camkit.report import write_report

    for field, record in _bad_records():
        try:
            write_report([_record(), record], tmp_path / "r.html")
        except TypeError as err:
            assert f"record 1 ('cat'): {field}" in str(err), (field, str(err))
        else:
            raise AssertionError(f"a record with a wrong {field} was written")
        assert list(tmp_path.iterdir()) == []


def _hostile_page(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A report whose data block (written with valid records) is then given markup in every value the script
    shows (as a page edited by hand, or a writer that skipped the checks, would hold): the script alone must keep
    it text. Returns the page and the markup put in per field."""
    from camkit.report import ReportOptions, render

    page = render([_record(notes=["n"]), _record(name="dog", error="e")], ReportOptions(title="t"))
    start = page.index('id="report-data">') + len('id="report-data">')
    end = page.index("</script>", start)
    data = json.loads(page[start:end])
    payload = {f: f"<img src=x onerror=alert('{f}')><b>{f}</b>" for f in
               ("name", "source", "label", "class", "w", "box", "method", "layer", "metric", "note", "error", "meta",
                "top")}  # fmt: skip
    first, second = data["images"]
    first["name"], first["source"], first["w"] = payload["name"], payload["source"], payload["w"]
    first["target"] = [payload["class"], payload["label"], 0.5]
    first["top5"][0] = [payload["top"], None, payload["top"]]
    first["notes"] = [payload["note"]]
    first["maps"][0].update(method=payload["method"], layer=payload["layer"])
    first["maps"][0]["boxes"] = [[payload["box"], 0, 10, 10, 0.5]]
    first["metrics"] = {payload["method"]: {payload["metric"]: 0.25}}
    data["metricColumns"] = [[payload["method"], payload["metric"]]]
    second["error"] = payload["error"]
    data["meta"] = payload["meta"]
    block = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    path = tmp_path / "hostile.html"
    path.write_text(page[:start] + block + page[end:], encoding="utf-8")
    return path, payload


_WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


def _open(browser: Any, path: Path, bypass_csp: bool) -> tuple[Any, Any, list[str], list[str]]:
    context = browser.new_context(bypass_csp=bypass_csp)
    page = context.new_page()
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(_WATCH)
    page.goto(path.as_uri())
    page.wait_for_timeout(300)  # an injected handler (onerror of a broken picture) would have fired by now
    return context, page, dialogs, errors


def test_markup_in_report_data_stays_text_in_chromium(chromium: Any, tmp_path: Path) -> None:
    """Markup in every value the page shows never runs and is shown literally: with the page's CSP bypassed
    (the script's escaping alone) and with it (no violation: the page's own script and style are allowed by hash,
    none of the data is markup that CSP would have to block)."""
    path, payload = _hostile_page(tmp_path)
    for bypass in (True, False):
        context, page, dialogs, errors = _open(chromium, path, bypass)
        try:
            assert dialogs == [] and errors == []
            assert page.evaluate("document.querySelectorAll('img[src=\"x\"], b').length") == 0
            body = page.inner_text("body")
            for field in ("name", "label", "class", "top", "method", "layer", "metric", "note", "meta"):
                assert payload[field] in body, field
            assert page.inner_text("#meta") == payload["meta"]
            page.fill("#filter", "error")
            assert payload["error"] in page.inner_text("#cards")
            if not bypass:
                assert page.evaluate("window.__csp") == []
        finally:
            context.close()


def test_the_issues_record_is_refused_and_titles_are_titles(chromium: Any, tmp_path: Path) -> None:
    """`--title "__DATA__"`, `--title "__JS__"` and a title of markup come out as the page's title, literally;
    the page's script runs under its CSP (it builds, sorts and filters the table, with no CSP violation)."""
    pic = _photo(tmp_path / "p.png", seed=1)
    for i, title in enumerate(("__DATA__", "__JS__", "<script>alert(1)</script>__TITLE__")):
        out = tmp_path / f"t{i}.html"
        res = runner.invoke(app, ["report", str(pic), *FAST, "--title", title, "--out", str(out)])
        assert res.exit_code == 0, res.output
        text = out.read_text(encoding="utf-8")
        assert (
            text.count('"use strict"') == 1 and "script-src 'sha256-" in text and "unsafe-inline" not in text
        )
        assert "form-action 'none'" in text and "base-uri 'none'" in text
        context, page, dialogs, errors = _open(chromium, out, bypass_csp=False)
        try:
            assert page.title() == title and page.inner_text("h1") == title
            assert dialogs == [] and errors == []
            assert page.locator("#rows tr").count() == 1 and page.locator("section.card").count() == 1
            page.click("#head th:text-is('image')")
            assert page.get_attribute("#head th:text-is('image')", "aria-sort") == "ascending"
            page.fill("#filter", "nothing-matches-this")
            assert page.locator("#rows tr").count() == 0 and "No image matches" in page.inner_text("#cards")
            assert page.evaluate("window.__csp") == []
        finally:
            context.close()
