"""``camkit report STORE``: the report of a ``camkit run`` store, from the stored table and maps (no model): the
records equal the store's values, error rows and gone photos are shown as such, an unfinished run is reported as
far as it is done, and the page opened in Chromium sorts by a stored metric."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import _browser
import camkit
import camkit.cli.common
from camkit.cli import app
from camkit.report import ReportOptions
from camkit.report.store import is_store, report_store, store_records
from camkit.run import open_store

RUN_ARGS = ["--model", "resnet18", "--no-pretrained", "--seed", "3", "--threads", "1", "--image-size", "64"]
N = 10
BAD = 4  # not an image: an error row
GONE = 7  # deleted after the run: its card says so
runner = CliRunner()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    yield from _browser.launch_chromium()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from _browser.one_thread()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished store of 10 generated photos (JPEG and PNG, sizes vary), one unreadable, one deleted after."""
    root = tmp_path_factory.mktemp("rstore")
    data = root / "data"
    data.mkdir()
    for i in range(N):
        f = data / f"{i:02d}.{'jpg' if i % 2 else 'png'}"
        if i == BAD:
            f.write_bytes(b"\x89PNG truncated")
        else:
            _browser.photo(80 + 9 * i, 60 + 5 * i, seed=i).save(f)
    out = root / "store"
    res = runner.invoke(
        app,
        ["run", str(data), "--out", str(out), *RUN_ARGS, "--shard-size", "4", "--batch-size", "4",
         "--workers", "0", "--methods", "gradcam,layercam", "--metrics", "deletion", "--steps", "2"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output  # one unreadable input
    (data / f"{GONE:02d}.jpg").unlink()
    return out


def _data(page: str) -> dict[str, Any]:
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert block is not None
    data: dict[str, Any] = json.loads(block.group(1))
    return data


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model loading fails the test: a store's report recomputes nothing."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded to report a store")

    monkeypatch.setattr(camkit, "load_model", refuse)
    monkeypatch.setattr(camkit.cli.common, "load_model", refuse)


def test_records_hold_the_stored_values(store: Path, no_model: None) -> None:
    st = open_store(store)
    rows = st.table().to_pylist()
    records = list(store_records(store))
    assert len(records) == len(rows) == N
    assert [r.name for r in records] == [Path(row["path"]).name for row in rows]  # from their common folder
    for rec, row in zip(records, rows, strict=True):
        assert rec.source == row["path"]
        if row["status"] == "error":
            assert int(row["index"]) == BAD and rec.error == row["error"] and "cannot read" in rec.error
            assert rec.maps == [] and rec.top5 == [] and rec.target is None
            continue
        assert rec.error is None and rec.size == (row["width"], row["height"])
        assert [(p.cls, p.label) for p in rec.top5] == list(
            zip(row["topk_classes"], row["topk_labels"], strict=True)
        )
        assert [p.prob for p in rec.top5] == pytest.approx(row["topk_probs"])
        assert rec.target is not None and (rec.target.cls, rec.target.label) == (row["class"], row["label"])
        assert [e.method for e in rec.maps] == ["gradcam", "layercam"]
        for entry in rec.maps:
            stored = np.asarray(st.maps(entry.method)[row["index"]]).astype(np.float32)
            np.testing.assert_array_equal(entry.map, stored)  # the float16 map as stored, no recomputation
            box = row[f"{entry.method}.box"]
            assert [b.xyxy for b in entry.boxes] == ([box] if box else [])
            assert _same(rec.metrics[entry.method]["deletion"], row[f"{entry.method}.deletion"])
        if int(row["index"]) == GONE:
            assert rec.notes and "photo not found" in rec.notes[0] and rec.maps  # maps still shown
            assert rec.photo().getpixel((0, 0)) == (128, 128, 128)
        else:
            assert rec.notes == []
            assert rec.photo().size == rec.size  # small photos: read whole, same as the file
            expect = np.asarray(Image.open(row["path"]).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(rec.photo()), expect)


def test_records_limit_methods_and_bad_arguments(store: Path) -> None:
    records = list(store_records(store, methods="layercam", limit=3))
    assert len(records) == 3 and all([e.method for e in r.maps] == ["layercam"] for r in records)
    assert set(records[0].metrics) == {"layercam"}
    with pytest.raises(ValueError, match="holds no maps of 'scorecam'"):
        next(store_records(store, methods=["scorecam"]))
    with pytest.raises(ValueError, match="limit"):
        next(store_records(store, limit=0))
    with pytest.raises(ValueError, match="not a camkit run store"):
        next(store_records(store.parent / "data"))
    with pytest.raises(TypeError, match="store must be"):
        next(store_records(3))  # type: ignore[arg-type]
    assert is_store(store) and not is_store(store.parent / "data")


def test_large_jpeg_is_decoded_small_and_boxes_stay_in_original_pixels(tmp_path: Path) -> None:
    big = tmp_path / "data"
    big.mkdir()
    _browser.photo(1600, 1200, seed=1).save(big / "big.jpg", quality=90)
    out = tmp_path / "store"
    res = runner.invoke(app, ["run", str(big), "--out", str(out), *RUN_ARGS, "--workers", "0"])
    assert res.exit_code == 0, res.output
    rec = next(store_records(out, photo_side=128))
    assert rec.size == (1600, 1200) and 128 <= max(rec.photo().size) < 400  # JPEG draft: 1/8 scale
    stats = report_store(out, tmp_path / "r.html", ReportOptions(thumb_side=96, full_side=0))
    im = _data(stats.stats.path.read_text(encoding="utf-8"))["images"][0]
    assert (im["w"], im["h"]) == (1600, 1200)  # the boxes' frame: original pixels
    assert im["maps"][0]["boxes"][0][:4] == open_store(out).table().column("gradcam.box")[0].as_py()


def test_tar_members_and_manifest_paths_are_read(tmp_path: Path) -> None:
    """A tar member is read from its shard; a manifest's relative paths from --image-root (a gone one: noted)."""
    pics = [_browser.photo(70, 50, seed=i) for i in range(3)]
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for i, pic in enumerate(pics[:2]):
            data = _browser.png_bytes(pic)
            info = tarfile.TarInfo(f"k{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = runner.invoke(
        app, ["run", str(tmp_path / "a.tar"), "--out", str(tmp_path / "t"), *RUN_ARGS, "--workers", "0"]
    )
    assert res.exit_code == 0, res.output
    records = list(store_records(tmp_path / "t"))
    assert [r.name for r in records] == ["k0.png", "k1.png"] and all(not r.notes for r in records)
    for rec, pic in zip(records, pics[:2], strict=True):
        np.testing.assert_array_equal(np.asarray(rec.photo()), np.asarray(pic))
    sub = tmp_path / "m"
    sub.mkdir()
    pics[2].save(sub / "p.png")
    (sub / "list.csv").write_text("path\np.png\n")
    res = runner.invoke(
        app, ["run", str(sub / "list.csv"), "--out", str(tmp_path / "s"), *RUN_ARGS, "--workers", "0"]
    )
    assert res.exit_code == 0, res.output
    rec = next(store_records(tmp_path / "s", image_root=sub))
    assert not rec.notes and np.array_equal(np.asarray(rec.photo()), np.asarray(pics[2]))
    rec = next(store_records(tmp_path / "s", image_root=tmp_path))
    assert rec.notes and "photo not found at 'p.png'" in rec.notes[0] and "--image-root" in rec.notes[0]
    with pytest.raises(ValueError, match="is not a folder"):
        next(store_records(tmp_path / "s", image_root=tmp_path / "nope"))


def test_cli_report_store_writes_the_page_without_a_model(
    store: Path, tmp_path: Path, no_model: None
) -> None:
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(store), "-o", str(out), "--per-page", "4", "--thumb-side", "96"])
    assert res.exit_code == 0, res.output
    assert "kB per image" in res.output and "1 error row" in res.output and "1 photo(s)" in res.output
    data = _data(out.read_text(encoding="utf-8"))
    assert data["perPage"] == 4 and len(data["images"]) == N
    assert data["metricColumns"] == [["gradcam", "deletion"], ["layercam", "deletion"]]
    assert "model resnet18" in data["meta"] and "gradcam, layercam" in data["meta"]
    bad, gone, ok = data["images"][BAD], data["images"][GONE], data["images"][0]
    assert bad["error"] and bad["maps"] == []
    assert gone["notes"] and len(gone["maps"]) == 2
    assert ok["error"] is None and ok["notes"] == [] and len(ok["maps"]) == 2
    thumb = ok["maps"][0]["thumb"]
    assert (
        thumb.startswith("data:image/webp;base64,") and ok["full"] == ok["thumb"]
    )  # full_side 0 for a store
    res = runner.invoke(app, ["report", str(store), "-o", str(out), "--limit", "3", "--methods", "gradcam"])
    assert res.exit_code == 0, res.output
    data = _data(out.read_text(encoding="utf-8"))
    assert len(data["images"]) == 3 and {m["method"] for m in data["images"][0]["maps"]} == {"gradcam"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "insertion"], "--metrics: a store is reported as the run computed it"),
        (["--model", "resnet50", "--layers", "layer3"], "--layers, --model: a store"),
        (["--methods", "scorecam"], "holds no maps of 'scorecam'"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_cli_report_store_usage_errors_exit_2(
    store: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(store), "-o", str(out), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "9", "--compile"], "--compile, --steps: a store is summarised as the run computed it"),
        (["--model", "resnet50", "--metrics", "road"], "--metrics, --model: a store"),
        (["--methods", "scorecam"], "--methods: a store"),
        (["-o", "elsewhere"], "--out: a store"),
    ],
)
def test_cli_evaluate_store_refuses_options_it_would_ignore(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    """``camkit evaluate STORE`` prints what the run computed: an option that would change the numbers (or
    ``--out``, which it never writes) is an error, not silently dropped."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["evaluate", str(store), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert list(tmp_path.iterdir()) == []  # nothing written
    fine = runner.invoke(app, ["evaluate", str(store), "--format", "json", "--no-progress"])
    assert fine.exit_code == 0 and '"store"' in fine.stdout, fine.output


def test_cli_limit_without_a_store_is_an_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", "--limit", "3", "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "for a `camkit run` store" in res.output


def test_unfinished_store_reports_its_done_shards_with_a_warning(store: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    shutil.copytree(store, part)
    for f in ("table.parquet", "summary.json", "shards/000001.done"):
        (part / f).unlink()  # as a run killed while shard 1 was in flight
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(part), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "warning: the run" in res.output and "2 of 3 shards done" in res.output
    data = _data(out.read_text(encoding="utf-8"))
    assert [im["name"] for im in data["images"]] == [
        f"{i:02d}.{'jpg' if i % 2 else 'png'}" for i in (0, 1, 2, 3, 8, 9)
    ]
    assert "unfinished run: 6 of 10 images done" in data["meta"]
    result = report_store(part, tmp_path / "r2.html")
    assert result.partial and (result.done, result.total, result.errors) == (6, 10, 0)
    for f in ("000000.done", "000002.done"):
        (part / "shards" / f).unlink()
    res = runner.invoke(app, ["report", str(part), "-o", str(out)])
    assert res.exit_code == 2 and "holds no finished image yet" in res.output


def test_store_report_in_chromium_sorts_by_a_stored_metric(
    chromium: Any, store: Path, tmp_path: Path
) -> None:
    result = report_store(
        store, tmp_path / "report.html", ReportOptions(per_page=4, thumb_side=96, full_side=0)
    )
    values = {
        r["path"].rsplit("/", 1)[-1]: r["gradcam.deletion"] for r in open_store(store).table().to_pylist()
    }
    page = chromium.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(result.stats.path.as_uri())
        assert page.locator("#page").inner_text() == "page 1 of 3"

        def column(title: str) -> list[str]:
            idx = page.eval_on_selector_all(
                "#head th", "(ths, t) => ths.findIndex((th) => th.textContent === t)", title
            )
            assert idx >= 0, title
            out: list[str] = page.eval_on_selector_all(
                "#rows tr", "(trs, i) => trs.map((tr) => tr.cells[i].textContent)", idx
            )
            return out

        page.click("#head th:text-is('gradcam deletion')")
        shown = [float(v) for v in column("gradcam deletion")]
        finite = sorted(v for v in values.values() if not math.isnan(v))
        assert shown == pytest.approx(finite[:4], abs=1e-3) and shown == sorted(shown)
        assert page.get_attribute("#head th:text-is('gradcam deletion')", "aria-sort") == "ascending"
        page.click("#head th:text-is('gradcam deletion')")
        shown = [float(v) for v in column("gradcam deletion")]
        assert shown == pytest.approx(finite[::-1][:4], abs=1e-3)

        page.fill("#filter", "error")  # the error row: marked in the table and in its card
        assert column("image") == [f"{BAD:02d}.png"] and column("status") == ["error"]
        assert page.locator("#rows tr.error").count() == 1
        assert "cannot read" in page.inner_text("section.card p.error")
        assert page.locator("section.card h2 small").count() == 0  # no size: the image was never read
        page.fill("#filter", f"{GONE:02d}.jpg")
        assert column("status") == ["note"]
        assert "photo not found" in page.inner_text("section.card p.note")
        assert page.locator("section.card .overlays img").count() == 2  # the maps, over a grey picture
        page.fill("#filter", "")
        assert _browser.pixel_std(page.screenshot()) > 20
        assert errors == []
    finally:
        page.close()
