"""`camkit evaluate` / `camkit localize`: annotation formats, the evaluation loop, files written, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from camkit.adapters import Preprocess
from camkit.cli import app
from camkit.evaluate import baseline_map, collect_images, evaluate
from camkit.io import Annotation, read_annotations
from camkit.metrics import max_box_acc_value

runner = CliRunner()


def test_read_camkit_json(tmp_path) -> None:
    p = tmp_path / "ann.json"
    p.write_text(
        json.dumps({"sub/a.jpg": {"class": 3, "boxes": [[1, 2, 10, 20]]}, "b.png": {"class": "tabby"}})
    )
    ann = read_annotations(p)
    assert ann["a.jpg"] == Annotation(cls=3, boxes=[[1.0, 2.0, 10.0, 20.0]])
    assert ann["b.png"].cls == "tabby" and ann["b.png"].boxes == []
    p.write_text(json.dumps({"a.jpg": {"boxes": [[10, 0, 5, 5]]}}))
    with pytest.raises(ValueError, match="inverted"):
        read_annotations(p)


def test_read_coco_json(tmp_path) -> None:
    coco = {
        "images": [{"id": 7, "file_name": "x/cat.jpg", "width": 100, "height": 80}],
        "annotations": [
            {"image_id": 7, "bbox": [10, 20, 30, 40], "category_id": 2},
            {"image_id": 7, "bbox": [0, 0, 5, 5], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
    }
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(coco))
    ann = read_annotations(p)["cat.jpg"]
    assert ann.boxes == [[10, 20, 40, 60], [0, 0, 5, 5]] and ann.cls == "cat" and not ann.strict_class


def test_read_voc_xml(tmp_path) -> None:
    xml = """<annotation><filename>dog.jpg</filename>
      <object><name>dog</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
      <object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>6</xmax><ymax>6</ymax></bndbox></object>
    </annotation>"""
    (tmp_path / "dog.xml").write_text(xml)
    for source in (tmp_path / "dog.xml", tmp_path):
        ann = read_annotations(source)["dog.jpg"]
        assert (
            ann.boxes == [[0, 10, 50, 60], [4, 4, 6, 6]] and ann.cls == "dog"
        )  # 1-based inclusive -> half-open


def test_collect_images(tmp_path) -> None:
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in collect_images([tmp_path])] == ["a.jpg", "b.png"]
    with pytest.raises(FileNotFoundError):
        collect_images([tmp_path / "missing.jpg"])


def test_baseline_maps() -> None:
    c = baseline_map("center", 2, (8, 8))
    assert c.shape == (2, 8, 8) and c[0, 3:5, 3:5].min() == c.max() and c[0, 0, 0] < 0.2
    assert torch.equal(baseline_map("random", 1, (4, 4), seed=1), baseline_map("random", 1, (4, 4), seed=1))


def test_evaluate_loop_rows_summary_and_files(tiny, tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = [
        (f"im{i}.png", Image.fromarray((torch.rand(40, 60, 3, generator=g) * 255).byte().numpy()))
        for i in range(3)
    ]
    anns = {
        "im0.png": Annotation(cls=2, boxes=[[10, 10, 30, 30]]),
        "im1.png": Annotation(boxes=[[0, 0, 60, 40]]),
    }
    res = evaluate(
        tiny,
        imgs,
        methods=["gradcam", "layercam", "center", "random"],
        metrics=["deletion", "insertion", "avg_drop", "pointing", "box", "maxboxacc"],
        annotations=anns,
        preprocess=Preprocess(size=(32, 32)),
        layers="features.2",
        steps=4,
        images_per_batch=2,
    )
    assert len(res.rows) == 3 * 4
    assert res.columns == ["deletion", "insertion", "avg_drop", "pointing", "box_iou", "box_acc"]
    row0 = next(r for r in res.rows if r["image"] == "im0.png" and r["method"] == "gradcam")
    assert row0["class"] == 2  # the annotated class is explained, not the top-1
    # whole-image ground truth: every box of a non-empty map overlaps it; no boxes for im2 -> NaN
    row2 = next(r for r in res.rows if r["image"] == "im2.png" and r["method"] == "gradcam")
    assert math.isnan(row2["pointing"]) and not math.isnan(row2["deletion"])
    assert set(res.maxboxacc) == {"gradcam", "layercam", "center", "random"}
    for method, vals in res.summary.items():
        rows = [r for r in res.rows if r["method"] == method]
        assert vals["deletion"] == pytest.approx(sum(r["deletion"] for r in rows) / 3)
        assert vals["pointing"] == pytest.approx(sum(r["pointing"] for r in rows[:2]) / 2)
    res.to_csv(tmp_path / "e.csv")
    res.to_json(tmp_path / "e.json")
    with open(tmp_path / "e.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["rows"][0]["method"] == "gradcam" and data["summary"]["center"]["deletion"] is not None
    assert res.timing["metric_images"] > 0
    # the per-image IoU curves of the images with boxes give MaxBoxAccV2 back (to 4 decimals), in JSON too
    assert set(res.iou_curves["gradcam"]) == {"im0.png", "im1.png"}
    for method, curves in data["iou_curves"].items():
        again = max_box_acc_value([curves[n] for n in ("im0.png", "im1.png")])
        assert again == pytest.approx(res.maxboxacc[method]["value"], abs=1e-3)


def test_evaluate_refuses_box_metrics_without_boxes(tiny) -> None:
    with pytest.raises(ValueError, match="needs ground-truth boxes"):
        evaluate(tiny, [("a", Image.new("RGB", (8, 8)))], metrics=["pointing"], layers="features.2")
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(tiny, [("a", Image.new("RGB", (8, 8)))], metrics=["nope"], layers="features.2")


def test_cli_errors_exit_2(tmp_path) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nothing.jpg")])
    assert result.exit_code == 2 and "error:" in result.output


@pytest.mark.slow
def test_cli_evaluate_and_localize_on_photos(tmp_path) -> None:
    from camkit.io import sample_image

    folder = tmp_path / "photos"
    folder.mkdir()
    sample_image("chelsea").save(folder / "cat.jpg")
    sample_image("coffee").save(folder / "coffee.png")
    (tmp_path / "ann.json").write_text(
        json.dumps({"cat.jpg": {"class": "Egyptian cat", "boxes": [[40, 0, 420, 300]]}})
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(folder),
            "--methods",
            "gradcam,random",
            "--metrics",
            "deletion,pointing,box",
            "--annotations",
            str(tmp_path / "ann.json"),
            "--steps",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "deletion" in result.output and "gradcam" in result.output
    data = json.loads((out / "evaluate.json").read_text())
    cat = next(r for r in data["rows"] if r["image"] == "cat.jpg" and r["method"] == "gradcam")
    assert cat["class"] == 285 and cat["pointing"] == 1.0 and cat["box_iou"] > 0.5
    result = runner.invoke(app, ["localize", str(folder / "cat.jpg"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    boxes = json.loads((out / "boxes.json").read_text())[0]
    assert boxes["size"] == [451, 300] and len(boxes["boxes"]) == 1
    b = boxes["boxes"][0]
    assert 0 <= b["x0"] < b["x1"] <= 451 and 0 <= b["y0"] < b["y1"] <= 300
    assert (out / "cat_boxes.png").exists()


def test_iter_evaluate_batches_summarise_to_evaluates_result(tiny) -> None:
    """evaluate() is plan_evaluation + iter_evaluate + summarize: the batches, summarised, give its result."""
    from camkit.evaluate import BatchResult, iter_evaluate, plan_evaluation, summarize

    g = torch.Generator().manual_seed(1)
    imgs = [
        (f"im{i}.png", Image.fromarray((torch.rand(40, 60, 3, generator=g) * 255).byte().numpy()))
        for i in range(5)
    ]
    anns = {"im0.png": Annotation(boxes=[[10, 10, 30, 30]]), "im3.png": Annotation(boxes=[[0, 0, 20, 40]])}
    kwargs = dict(
        methods=["gradcam", "center"],
        metrics=["deletion", "avg_drop", "increase", "pointing", "maxboxacc"],
        annotations=anns,
        preprocess=Preprocess(size=(32, 32)),
        layers="features.2",
        steps=3,
        images_per_batch=2,
    )
    whole = evaluate(tiny, imgs, **kwargs)  # type: ignore[arg-type]
    plan = plan_evaluation(tiny, imgs, **kwargs)  # type: ignore[arg-type]
    batches = list(iter_evaluate(plan))
    assert all(isinstance(b, BatchResult) for b in batches)
    assert [b.images for b in batches] == [["im0.png", "im1.png"], ["im2.png", "im3.png"], ["im4.png"]]
    assert [len(b.rows) for b in batches] == [4, 4, 2]  # (image, method) rows of each batch
    assert all(set(b.curves) == {"gradcam", "center"} for b in batches)
    parts = summarize(plan, batches)
    assert [(r.image, r.method, r.cls, r.prob) for r in parts.rows] == [
        (r.image, r.method, r.cls, r.prob) for r in whole.rows
    ]
    assert all(_same_values(a.values, b.values) for a, b in zip(parts.rows, whole.rows, strict=True))
    assert parts.columns == whole.columns and parts.excluded == whole.excluded == [
        "im1.png",
        "im2.png",
        "im4.png",
    ]
    assert parts.maxboxacc == whole.maxboxacc
    for method, values in whole.summary.items():
        assert _same_values(parts.summary[method], values)
    assert parts.config == whole.config and parts.timing["metric_images"] == whole.timing["metric_images"]


def _same_values(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(v) and math.isnan(b[k])) or v == b[k] for k, v in a.items()
    )


def test_collect_images_walks_nested_folders_in_the_order_of_run(tmp_path) -> None:
    """evaluate's folder walk is the one input discovery of every command: sorted by path, so a subfolder's
    files come where their path sorts (a/x.png before b.png), as in ``camkit run``'s store."""
    from camkit.io.inputs import discover_images
    from camkit.run.sources import collect_items

    for rel in ("b.png", "a/x.png", "a/c/y.jpg", "c.png", ".hid/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)
    found = [p.relative_to(tmp_path).as_posix() for p in collect_images([tmp_path])]
    assert found == ["a/c/y.jpg", "a/x.png", "b.png", "c.png"]
    assert collect_images([tmp_path]) == discover_images([tmp_path])
    run_order = [
        Path(it.path).resolve().relative_to(tmp_path.resolve()).as_posix() for it in collect_items([tmp_path])
    ]
    assert run_order == found


def test_evaluate_scores_the_maps_of_the_model_as_given(pretrained) -> None:
    """Deletion and insertion rank pixels by the map, so the prepared copy's rounding-level map differences move
    them (on the pretrained Lite0: chelsea's Grad-CAM insertion by 1.9e-5, astronaut's Grad-CAM++ deletion by
    2.6e-5); ``evaluate`` scores the maps of the model as given, as computed by hand here."""
    from camkit import compare
    from camkit.io import sample_image
    from camkit.metrics import deletion, insertion

    names, methods = ("chelsea", "astronaut"), ["gradcam", "gradcam++"]
    res = evaluate(
        pretrained.model,
        [(n, sample_image(n)) for n in names],
        methods=methods,
        metrics=["deletion", "insertion"],
        preprocess=pretrained.preprocess,
        steps=50,
    )
    for name in names:
        x = pretrained.preprocess(sample_image(name))
        own = compare(pretrained.model, x, methods=methods, accelerate=False)
        for method in methods:
            row = next(r for r in res.rows if r["image"] == name and r["method"] == method)
            maps = own[method].maps
            assert row["deletion"] == pytest.approx(deletion(pretrained.model, x, maps).auc.item(), abs=3e-6)
            assert row["insertion"] == pytest.approx(
                insertion(pretrained.model, x, maps).auc.item(), abs=3e-6
            )


def test_evaluate_and_its_reexplaining_metrics_prepare_no_copy(tiny, monkeypatch) -> None:
    """MPRT changes its copy of the model at every step: a prepared copy per step (made and checked against the
    model) would cost more than the step's explanation. ``evaluate`` and the metrics that explain again run on
    the model as given: the prepared-copy lookup is never reached."""
    import camkit.core.pipeline as pipeline

    calls: list[int] = []
    real = pipeline.lookup

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "lookup", spy)
    g = torch.Generator().manual_seed(0)
    imgs = [
        (f"im{i}.png", Image.fromarray((torch.rand(40, 60, 3, generator=g) * 255).byte().numpy()))
        for i in range(2)
    ]
    res = evaluate(
        tiny,
        imgs,
        methods=["gradcam"],
        metrics=["deletion", "mprt", "max_sensitivity", "random_logit"],
        preprocess=Preprocess(size=(32, 32)),
        layers="features.2",
        steps=4,
    )
    assert len(res.rows) == 2 and all(not math.isnan(r["mprt"]) for r in res.rows)
    assert calls == []
    camkit_explain = __import__("camkit").explain
    camkit_explain(tiny, torch.rand(1, 3, 32, 32), "gradcam", "features.2")
    assert calls == [1]  # the spy sees the default path's lookup
