"""The HTML report: records from a model, one self-contained file, the command, and the page in Chromium (opened
from disk: the table sorts and filters, pages turn, a thumbnail opens its full-size view, nothing is fetched)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import _browser
import camkit
from _browser import photo, pixel_std
from camkit.cli import app
from camkit.localize import Box
from camkit.report import (
    FUSED,
    ImageRecord,
    MapEntry,
    Prediction,
    ReportOptions,
    build_records,
    render,
    write_report,
)

FAST = ["--model", "resnet18", "--no-pretrained", "--threads", "1"]


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    yield from _browser.launch_chromium()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from _browser.one_thread()


@pytest.fixture(scope="module")
def small_model() -> camkit.LoadedModel:
    return _browser.small_model()


def _data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert block is not None
    return json.loads(block.group(1))


def _synthetic(n: int, size: tuple[int, int] = (48, 32)) -> list[ImageRecord]:
    """Records made by hand (no model): what a stored run's adapter would give."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        m = rng.random((8, 8)).astype(np.float32)
        out.append(
            ImageRecord(
                name=f"img{i:02d}",
                image=photo(*size, seed=i),
                top5=[Prediction(i % 3, f"class{i % 3}", 0.9 - i / 100), Prediction(7, None, 0.05)],
                target=Prediction(i % 3, f"class{i % 3}", 0.9 - i / 100),
                maps=[MapEntry("gradcam", "layer4", m, [Box(1, 2, 30, 20, 0.5)])],
                metrics={"gradcam": {"insertion": (i * 7 % 10) / 10, "deletion": math.nan}},
            )
        )
    return out


def test_build_records_holds_the_librarys_maps_top5_and_boxes(small_model: camkit.LoadedModel) -> None:
    pics = [("a", photo(96, 64, 0)), ("b", photo(80, 80, 1))]
    records = list(
        build_records(
            small_model, pics, ["gradcam", "layercam"], "layer3,layer4", metrics=["insertion"], steps=3
        )
    )
    assert [r.name for r in records] == ["a", "b"]
    r = records[0]
    assert [(e.method, e.layer) for e in r.maps] == [
        ("gradcam", "layer3"), ("gradcam", "layer4"), ("gradcam", FUSED),
        ("layercam", "layer3"), ("layercam", "layer4"), ("layercam", FUSED),
    ]  # fmt: skip
    expl = camkit.explain(
        small_model.model, [pics[0][1]], "gradcam", "layer3,layer4", preprocess=small_model.preprocess
    )
    np.testing.assert_array_equal(r.maps[2].map, expl.maps[0].numpy())
    np.testing.assert_array_equal(r.maps[1].map, expl.layer_maps["layer4"][0].numpy())
    assert len(r.top5) == 5 and r.top5[0].prob >= r.top5[-1].prob
    assert r.target is not None and r.target.cls == r.top5[0].cls == int(expl.classes[0])
    assert r.maps[2].boxes and not r.maps[0].boxes  # boxes on the fused map only
    b = r.maps[2].boxes[0]
    assert 0 <= b.x0 < b.x1 <= 96 and 0 <= b.y0 < b.y1 <= 64  # original-image pixels
    assert 0.0 <= r.metrics["gradcam"]["insertion"] <= 1.0


def test_build_records_metrics_explain_again_without_a_prepared_copy(
    small_model: camkit.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shown maps are ``camkit.explain``'s (one prepared-copy lookup per image); MPRT's explanations of its
    re-initialised copies run on them as given (before: 84 lookups here, a copy made and checked per step)."""
    import camkit.core.pipeline as pipeline

    calls: list[int] = []
    real = pipeline.lookup

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "lookup", spy)
    pics = [("a", photo(64, 48, 0)), ("b", photo(48, 48, 1))]
    records = list(build_records(small_model, pics, ["gradcam"], "layer4", metrics=["mprt"]))
    assert [r.name for r in records] == ["a", "b"]
    assert all(-1.0 <= r.metrics["gradcam"]["mprt"] <= 1.0 for r in records)
    assert len(calls) == 2


def test_build_records_refuses_bad_arguments_before_any_work(small_model: camkit.LoadedModel) -> None:
    pics = [("a", photo())]
    with pytest.raises(ValueError, match="unknown metric"):
        next(build_records(small_model, pics, metrics=["iou"]))
    with pytest.raises(ValueError, match="topK"):
        next(build_records(small_model, pics, target=camkit.TopK(3)))
    with pytest.raises(ValueError, match="unknown method"):
        next(build_records(small_model, pics, methods=["gradcam", "nope"]))
    with pytest.raises(ValueError, match="steps"):
        next(build_records(small_model, pics, steps=0))
    with pytest.raises(TypeError, match=r"PIL image or a pathlib\.Path"):
        ImageRecord("x", "photo.jpg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_page"):
        ReportOptions(per_page=0)
    with pytest.raises(ValueError, match="format"):
        ReportOptions(format="gif")


def test_render_is_one_offline_file(tmp_path: Path) -> None:
    stats = write_report(_synthetic(3), tmp_path / "r.html", ReportOptions(title="<T&>", per_page=2))
    page = stats.path.read_text(encoding="utf-8")
    assert stats.images == 3 and stats.bytes == len(page.encode("utf-8"))
    assert "<title>&lt;T&amp;&gt;</title>" in page
    # nothing fetched: every picture is a data: URI, no src/href to a URL, a CSP that allows only inline data
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "default-src 'none'; img-src data:" in page
    data = _data(page)
    assert data["perPage"] == 2 and data["metricColumns"] == [
        ["gradcam", "insertion"],
        ["gradcam", "deletion"],
    ]
    im = data["images"][0]
    assert im["thumb"].startswith("data:image/webp;base64,") and im["full"].startswith(
        "data:image/webp;base64,"
    )
    assert im["maps"][0]["boxes"] == [[1, 2, 30, 20, 0.5]]
    assert im["metrics"]["gradcam"]["deletion"] is None  # NaN -> null: strict JSON
    assert im["w"] == 48 and im["h"] == 32


def test_render_escapes_script_endings_and_thumbnails_only_is_smaller() -> None:
    rec = _synthetic(1)[0]
    rec.name = "</script><script>alert(1)</script>"
    page = render([rec])
    assert page.count("</script>") == 2  # the data block's and the code's own, not the name's
    assert _data(page)["images"][0]["name"] == rec.name
    full = render(_synthetic(2, (400, 300)), ReportOptions(full_side=800, format="jpeg"))
    small = render(_synthetic(2, (400, 300)), ReportOptions(full_side=0, format="jpeg"))
    assert "data:image/jpeg;base64," in full and len(small) < len(full)


def test_write_report_refuses_no_records_and_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no image"):
        write_report([], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists() and list(tmp_path.iterdir()) == []  # no temporary file left
    with pytest.raises(ValueError, match="is a folder"):
        write_report(_synthetic(1), tmp_path)


def test_cli_report_writes_the_file_and_names_the_size(tmp_path: Path) -> None:
    for i in range(2):
        photo(64, 48, i).save(tmp_path / f"p{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "rep.html"
    res = CliRunner().invoke(
        app,
        ["report", str(tmp_path / "p0.png"), str(tmp_path / "p1.png"), str(tmp_path / "bad.png"), *FAST,
         "--methods", "gradcam,eigencam", "--metrics", "insertion", "--steps", "2", "-o", str(out),
         "--full-side", "0", "--title", "mine"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output  # one input unreadable: named, skipped, the others reported
    assert "bad.png" in res.output and "kB per image" in res.output
    data = _data(out.read_text(encoding="utf-8"))
    assert [im["name"] for im in data["images"]] == ["p0", "p1"]
    assert {m["method"] for m in data["images"][0]["maps"]} == {"gradcam", "eigencam"}
    assert "model resnet18" in data["meta"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "iou"], "unknown metric"),
        (["--methods", "nope"], "unknown method"),
        (["--per-page", "0"], "per_page"),
        (["--format", "gif"], "format"),
    ],
)
def test_cli_report_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["report", *FAST, "-o", str(tmp_path / "r.html"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r.html").exists()


def test_cli_report_out_folder_is_an_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["report", *FAST, "-o", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.output


def test_report_in_chromium_from_disk_sorts_filters_pages_and_zooms(
    chromium: object, small_model: camkit.LoadedModel, tmp_path: Path
) -> None:
    pics = [(f"photo{i}", photo(96, 64, i)) for i in range(5)] + [("chelsea", camkit.sample_image("chelsea"))]
    records = list(
        build_records(
            small_model, pics, ["gradcam", "layercam"], "layer3,layer4", metrics=["insertion"], steps=3
        )
    )
    stats = write_report(records, tmp_path / "report.html", ReportOptions(per_page=4, title="camkit report"))
    page = chromium.new_page(viewport={"width": 1100, "height": 900})  # type: ignore[attr-defined]
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(stats.path.as_uri())
        rows = page.locator("#rows tr")
        assert rows.count() == 4 and page.locator("#page").inner_text() == "page 1 of 2"
        assert page.locator("section.card").count() == 4  # only this page's cards are built

        def column(title: str) -> list[str]:
            idx = page.eval_on_selector_all(
                "#head th", "(ths, t) => ths.findIndex((th) => th.textContent === t)", title
            )
            return page.eval_on_selector_all(
                "#rows tr", "(trs, i) => trs.map((tr) => tr.cells[i].textContent)", idx
            )

        page.click("#head th:text-is('gradcam insertion')")
        page.click("#next")
        page.click("#prev")
        values = [float(v) for v in column("gradcam insertion")]
        expected = sorted(r.metrics["gradcam"]["insertion"] for r in records)[:4]
        assert values == pytest.approx(expected, abs=1e-3) and values == sorted(values)
        assert page.get_attribute("#head th:text-is('gradcam insertion')", "aria-sort") == "ascending"
        page.click("#head th:text-is('gradcam insertion')")
        values = [float(v) for v in column("gradcam insertion")]
        assert values == sorted(values, reverse=True)
        page.click("#head th:text-is('image')")
        assert column("image")[:3] == ["chelsea", "photo0", "photo1"]

        page.fill("#filter", "chelsea")
        assert column("image") == ["chelsea"] and page.locator("section.card").count() == 1
        page.fill("#filter", "gradcam.insertion>2")
        assert rows.count() == 0 and "No image matches" in page.inner_text("#cards")
        page.fill("#filter", "")
        page.click("#head th:text-is('image')")
        page.click("#head th:text-is('image')")  # descending: photo4 first
        page.click("#next")
        assert page.locator("#page").inner_text() == "page 2 of 2" and rows.count() == 2

        page.fill("#filter", "chelsea")
        assert not page.locator("#viewer").is_visible()
        page.locator("section.card figure img").first.click()
        assert page.locator("#viewer").is_visible()
        full = page.get_attribute("#viewer-img", "src")
        assert full is not None and full.startswith("data:image/webp")
        assert (
            page.evaluate("document.getElementById('viewer-img').naturalWidth") == 451
        )  # chelsea, full size
        page.keyboard.press("Escape")
        assert not page.locator("#viewer").is_visible()
        shot = page.screenshot()
        assert pixel_std(shot) > 20  # not blank: photos and overlays drawn
        assert errors == []
        assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested
    finally:
        page.close()


def test_many_images_are_paginated_and_sorted_across_pages(chromium: object, tmp_path: Path) -> None:
    """600 images, 50 per page: only one page's cards exist; a sort orders all images, not one page."""
    rng = np.random.default_rng(1)
    pic = photo(40, 30, 0)
    values = rng.random(600)
    records = (
        ImageRecord(
            f"im{i:03d}",
            pic,
            [Prediction(1, "one", 0.5)],
            None,
            [MapEntry("gradcam", "layer4", rng.random((4, 4)).astype(np.float32))],
            {"gradcam": {"insertion": float(values[i])}},
        )
        for i in range(600)
    )
    stats = write_report(
        records, tmp_path / "many.html", ReportOptions(per_page=50, full_side=0, thumb_side=32)
    )
    assert stats.images == 600
    page = chromium.new_page()  # type: ignore[attr-defined]
    try:
        page.goto(stats.path.as_uri())
        assert page.locator("#page").inner_text() == "page 1 of 12"
        assert page.locator("section.card").count() == 50 and page.locator("#rows tr").count() == 50
        page.click("#head th:text-is('gradcam insertion')")
        page.click("#head th:text-is('gradcam insertion')")
        first = page.locator("#rows tr").first.locator("td").nth(1).inner_text()
        assert first == f"im{int(np.argmax(values)):03d}"
        for _ in range(11):
            page.click("#next")
        assert (
            page.locator("#page").inner_text() == "page 12 of 12" and page.locator("#rows tr").count() == 50
        )
        last = page.locator("#rows tr").last.locator("td").nth(1).inner_text()
        assert last == f"im{int(np.argmin(values)):03d}"
        page.fill("#filter", "gradcam.insertion>=0.5")
        assert page.locator("#count").inner_text() == f"{int((values >= 0.5).sum())} of 600 images"
    finally:
        page.close()


def test_records_may_hold_paths_read_when_rendered(tmp_path: Path) -> None:
    photo(300, 200, 4).save(tmp_path / "p.jpg")
    rec = ImageRecord("p", tmp_path / "p.jpg", maps=[MapEntry("gradcam", "l", np.eye(4, dtype=np.float32))])
    data = _data(render([rec], ReportOptions(thumb_side=100, full_side=250)))
    assert (data["images"][0]["w"], data["images"][0]["h"]) == (300, 200)
    thumb = Image.open(io.BytesIO(base64.b64decode(data["images"][0]["maps"][0]["thumb"].split(",", 1)[1])))
    full = Image.open(io.BytesIO(base64.b64decode(data["images"][0]["maps"][0]["full"].split(",", 1)[1])))
    assert thumb.size == (100, 67) and full.size == (250, 167) and thumb.format == "WEBP"
    (tmp_path / "p.jpg").write_bytes(b"gone")
    with pytest.raises(ValueError, match="cannot read"):
        render([rec])


def test_build_records_refuses_a_training_model_before_any_forward(small_model: camkit.LoadedModel) -> None:
    import copy

    import torch

    loaded = copy.deepcopy(small_model)
    loaded.model.train()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(ValueError, match="training mode"):
        next(iter(build_records(loaded, [("cat", photo())])))
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BatchNorm statistic moved
    assert loaded.model.training
    with pytest.raises(TypeError, match="LoadedModel"):
        next(iter(build_records(loaded.model, [("cat", photo())])))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pairs"):
        next(iter(build_records(small_model, [photo()])))  # type: ignore[list-item]


def _count_forwards(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    return calls, model.register_forward_hook(hook)


def test_build_records_runs_only_the_forwards_the_explanations_need(small_model: camkit.LoadedModel) -> None:
    """The top-5 and the explained class come from the explanations' own forward: no second model call."""
    pics = [("a", photo(96, 64, 0)), ("b", photo(80, 80, 1))]
    # once before counting: a model's first explanation may run a one-time check
    camkit.compare(
        small_model.model, [pics[0][1]], ["gradcam", "fullgrad"], preprocess=small_model.preprocess
    )
    calls, handle = _count_forwards(small_model.model)
    try:
        for _, pic in pics:
            camkit.compare(
                small_model.model, [pic], ["gradcam", "fullgrad"], preprocess=small_model.preprocess
            )
        needed = calls[0]
        calls[0] = 0
        records = list(build_records(small_model, pics, ["gradcam", "fullgrad"]))
        made = calls[0]
    finally:
        handle.remove()
    assert needed >= len(pics) and made == needed
    for r, (_, pic) in zip(records, pics, strict=True):
        logits = small_model.model(small_model.preprocess([pic]))[0]
        expected = camkit.report.top_predictions(logits, small_model.labels)
        assert [p.cls for p in r.top5] == [p.cls for p in expected]
        assert [p.prob for p in r.top5] == pytest.approx([p.prob for p in expected], abs=1e-5)
        assert r.target is not None and r.target.cls == r.top5[0].cls


def test_report_grid_puts_own_pass_methods_in_one_column(small_model: camkit.LoadedModel) -> None:
    """A method that makes its map in its own passes names the map after itself, not after a layer: all such
    maps share the one OWN_MAP column (no diagonal grid of empty cells), as in ``camkit explain``'s grid."""
    from camkit.report import OWN_MAP

    records = list(build_records(small_model, [("a", photo())], ["gradcam", "fullgrad", "polycam"], "layer4"))
    cells = [(e.method, e.layer) for e in records[0].maps]
    assert cells == [("gradcam", "layer4"), ("fullgrad", OWN_MAP), ("polycam", OWN_MAP)]
    assert len({layer for _, layer in cells}) == 2  # two columns for three methods


def test_build_records_metrics_come_from_the_metric_registry(small_model: camkit.LoadedModel) -> None:
    """The report's metrics are the registry's (camkit.metrics.METRICS) without boxes, computed by the one
    dispatcher: the same numbers as the metric functions called directly."""
    from camkit import metrics as M
    from camkit.report import METRICS

    assert set(METRICS) == {k for k, m in M.METRICS.items() if not m.needs_boxes}
    pic = photo()
    (record,) = build_records(small_model, [("a", pic)], ["gradcam"], metrics=["deletion", "road"], steps=3)
    expl = camkit.explain(small_model.model, [pic], "gradcam", preprocess=small_model.preprocess)
    x = small_model.preprocess([pic])
    assert set(record.metrics["gradcam"]) == {"deletion", "road_morf", "road_lerf"}
    direct = M.deletion(small_model.model, x, expl.maps, expl.classes, steps=3).auc[0]
    assert record.metrics["gradcam"]["deletion"] == pytest.approx(float(direct), abs=1e-6)
    morf = M.road(small_model.model, x, expl.maps, expl.classes).mean_score[0]
    assert record.metrics["gradcam"]["road_morf"] == pytest.approx(float(morf), abs=1e-6)


@pytest.mark.parametrize("flag", ["--progress", "--no-progress"])
def test_cli_report_moves_one_bar_per_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    from camkit.cli import progress

    shown: list[tuple[bool, str]] = []
    stages: list[str] = []
    monkeypatch.setattr(
        progress.RunProgress, "image_done", lambda self, name: shown.append((self._bar is not None, name))
    )
    real_stage = progress.RunProgress.stage
    monkeypatch.setattr(
        progress.RunProgress, "stage", lambda self, text: stages.append(text) or real_stage(self, text)
    )
    for i in range(2):
        photo(64, 48, i).save(tmp_path / f"p{i}.png")
    out = tmp_path / "rep.html"
    res = CliRunner().invoke(
        app,
        ["report", str(tmp_path / "p0.png"), str(tmp_path / "p1.png"), *FAST, flag, "-o", str(out),
         "--methods", "gradcam,eigencam", "--metrics", "deletion", "--steps", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert shown == [(flag == "--progress", "p0"), (flag == "--progress", "p1")]  # each image as it is done
    # within an image, what it is at: the explanation, then each method's metrics (mprt can take minutes there)
    assert stages == [
        f"{name}: {part}"
        for name in ("p0", "p1")
        for part in ("explaining", "metrics of gradcam", "metrics of eigencam")
    ]
    assert [im["name"] for im in _data(out.read_text(encoding="utf-8"))["images"]] == ["p0", "p1"]


def test_cli_report_counts_the_explanations_a_metric_asks_for_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MPRT explains once per module with parameters: the stage text counts them, so a long metric is seen to
    move."""
    from camkit.cli import progress

    stages: list[str] = []
    monkeypatch.setattr(progress.RunProgress, "stage", lambda self, text: stages.append(text))
    photo(64, 48, 0).save(tmp_path / "p0.png")
    res = CliRunner().invoke(
        app,
        ["report", str(tmp_path / "p0.png"), *FAST, "--progress", "-o", str(tmp_path / "rep.html"),
         "--methods", "gradcam", "--metrics", "mprt"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert stages[:2] == ["p0: explaining", "p0: metrics of gradcam"]
    counted = stages[2:]
    assert len(counted) > 10  # one per randomised module of the model
    assert counted == [f"p0: metrics of gradcam, explained again: {k}" for k in range(1, len(counted) + 1)]
