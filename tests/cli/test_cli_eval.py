"""``camkit evaluate`` / ``layers`` / ``methods`` from outside: annotation errors, box rules, --out checked first,
folders and unreadable images, progress, and machine-readable output (--format tsv|json, nothing cut).

The CLI tests swap the model loader for a tiny random network (weights do not matter here), so they run in
seconds; the one test with a real model is marked slow.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import camkit
import camkit.cli.evaluate as cli_evaluate
import camkit.cli.layers as cli_layers
from camkit.adapters import Preprocess
from camkit.adapters.zoo import LoadedModel
from camkit.cli import app
from camkit.evaluate import collect_images, evaluate, probe_images
from camkit.io import Annotation, read_annotations
from camkit.io.annotations import fit_boxes

runner = CliRunner()


def _strict(text: str) -> object:
    """json.loads that refuses NaN / Infinity (what strict JSON readers do)."""

    def refuse(const: str) -> object:
        raise ValueError(f"not strict JSON: {const}")

    return json.loads(text, parse_constant=refuse)


class Tiny(nn.Module):
    """conv -> ReLU -> Identity -> Dropout -> GAP -> Flatten -> Linear (pass-through modules included)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.skip = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.drop(self.skip(self.act(self.conv(x)))))))


@pytest.fixture
def loads(monkeypatch):
    """The commands load a tiny model; returns the list of ModelOptions they asked for."""
    asked: list[object] = []

    def fake(options, input_size=None):
        asked.append(options)
        torch.manual_seed(0)
        return LoadedModel(Tiny().eval(), Preprocess(size=(16, 16)), None, "tiny")

    monkeypatch.setattr(cli_evaluate, "load_model", fake)
    monkeypatch.setattr(cli_layers, "load_model", fake)
    return asked


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a test failure: the command must stop before."""

    def fake(options, input_size=None):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli_evaluate, "load_model", fake)


def _image(path, size=(40, 30), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _one_error_line(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in res.output, (needle, res.output)


# ------------------------------------------------------------------------------------------- box rules (3)


@pytest.mark.parametrize(
    ("box", "why"),
    [
        ("[NaN, 0, 5, 5]", "non-finite"),
        ("[0, 0, 5]", "four numbers"),
        ('[0, 0, "x", 5]', "four numbers"),
        ("[10, 0, 5, 5]", "inverted"),
        ("[3, 0, 3, 5]", "inverted"),  # empty: x1 == x0
        ("[-4, 0, 5, 5]", "outside"),
    ],
)
def test_bad_boxes_are_refused_when_read(tmp_path, box, why) -> None:
    p = tmp_path / "ann.json"
    p.write_text('{"a.jpg": {"boxes": [[1, 1, 4, 4], ' + box + "]}}")
    with pytest.raises(ValueError, match=why) as err:
        read_annotations(p)
    assert str(p) in str(err.value) and "box 2 of 'a.jpg'" in str(err.value)


def test_boxes_are_clipped_to_the_image_and_outside_ones_refused() -> None:
    ann = Annotation(boxes=[[10, 5, 80, 30], [0, 0, 4, 4]], source="'ann.json'")
    assert fit_boxes(ann, (64, 48), "a.png").boxes == [[10, 5, 64, 30], [0, 0, 4, 4]]
    with pytest.raises(ValueError, match=r"'ann.json'.*outside image 'a.png' of 64x48"):
        fit_boxes(Annotation(boxes=[[70, 0, 90, 10]], source="'ann.json'"), (64, 48), "a.png")


def test_box_outside_its_image_stops_evaluate_before_the_model_runs(tmp_path) -> None:
    calls = []
    model = Tiny().eval()
    model.register_forward_hook(lambda *a: calls.append(1))
    img = _image(tmp_path / "a.png", size=(40, 30))
    anns = {"a.png": Annotation(boxes=[[0, 35, 10, 50]], source="'ann.json'")}
    with pytest.raises(ValueError, match=r"outside image 'a\.png'"):
        evaluate(model, [img], ["gradcam"], ["box"], anns, preprocess=Preprocess(size=(16, 16)))
    assert calls == []


def test_images_without_boxes_are_excluded_not_misses(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = [
        (f"im{i}.png", Image.fromarray((torch.rand(30, 40, 3, generator=g) * 255).byte().numpy()))
        for i in range(3)
    ]
    anns = {"im0.png": Annotation(boxes=[[0, 0, 40, 30]])}  # the whole image: every predicted box scores
    res = evaluate(
        Tiny().eval(),
        imgs,
        ["center"],
        ["box", "pointing"],
        anns,
        preprocess=Preprocess(size=(16, 16)),
        steps=2,
    )
    rows = {r.image: r for r in res.rows}
    assert rows["im0.png"].values["box_acc"] == 0.0 or rows["im0.png"].values["box_acc"] == 1.0
    assert math.isnan(rows["im1.png"].values["box_acc"]) and math.isnan(rows["im2.png"].values["box_iou"])
    # the mean is over the one image with a box (old code: im1, im2 counted as misses -> at most 1/3)
    assert res.summary["center"]["box_acc"] == rows["im0.png"].values["box_acc"]
    assert res.summary["center"]["box_acc"] == 1.0
    assert res.excluded == ["im1.png", "im2.png"]
    out = tmp_path / "e.json"
    res.to_json(out)
    data = _strict(out.read_text())
    assert data["excluded_from_box_metrics"] == {"count": 2, "images": ["im1.png", "im2.png"]}


# ------------------------------------------------------------------------------------ XML and COCO (5)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("<annotation><filename>a.jpg", "not valid XML"),
        ("<annotation><filename>&undefined;</filename></annotation>", "not valid XML"),
        ("<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>", "no <ymin>"),
        (
            "<annotation><object><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>3</xmax><ymax>5</ymax>"
            "</bndbox></object></annotation>",
            "inverted",
        ),
    ],
)
def test_bad_xml_is_one_error_naming_the_file(tmp_path, text, why) -> None:
    p = tmp_path / "a.xml"
    p.write_text(text)
    with pytest.raises(ValueError, match=why) as err:
        read_annotations(p)
    assert str(p) in str(err.value)


def test_xml_entities_are_never_expanded(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xxe = f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]><annotation><filename>&x;</filename></annotation>'
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l "lol">'
        + "".join(
            f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";" if i > 1 else "&l;") * 10}">' for i in range(1, 10)
        )
        + "]><annotation><filename>&l9;</filename></annotation>"
    )
    for name, text in (("xxe.xml", xxe), ("laughs.xml", laughs)):
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(ValueError, match="entities") as err:
            read_annotations(p)
        assert "TOP-SECRET" not in str(err.value)


@pytest.mark.parametrize(
    ("coco", "why"),
    [
        ({"images": [{"id": 1}], "annotations": []}, r"images\[0\] has no 'file_name' key"),
        ({"images": [{"file_name": "a.jpg"}], "annotations": []}, r"images\[0\] has no 'id' key"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"bbox": [0, 0, 2, 2]}]},
            r"annotations\[0\] has no 'image_id' key",
        ),
        (
            {
                "images": [{"id": 1, "file_name": "a.jpg"}],
                "annotations": [{"image_id": 1, "bbox": [0, 0, -2, 2]}],
            },
            "inverted",
        ),
        ({"images": {}, "annotations": []}, "must be a list"),
    ],
)
def test_bad_coco_is_one_error_naming_the_file(tmp_path, coco, why) -> None:
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=why) as err:
        read_annotations(p)
    assert str(p) in str(err.value)


def test_cli_annotation_errors_stop_before_the_model(tmp_path, no_model) -> None:
    img = _image(tmp_path / "a.png")
    bad_xml = tmp_path / "a.xml"
    bad_xml.write_text("<annotation><filename>a.png</filename")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"a.png": {"boxes": [[0, 50, 10, 60]]}}))
    for ann, needle in ((bad_xml, "not valid XML"), (coco, "'file_name'"), (outside, "outside image")):
        res = runner.invoke(app, ["evaluate", str(img), "-a", str(ann), "--out", str(tmp_path / "o")])
        _one_error_line(res, needle, ann.name)


# ------------------------------------------------------------------------------------------------- --out (6)


def test_out_that_is_a_file_fails_before_the_model(tmp_path, no_model) -> None:
    img = _image(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        res = runner.invoke(app, ["evaluate", str(img), "--out", str(out), "--methods", "gradcam"])
        _one_error_line(res, "is a file" if out == blocker else "has a file on its path")
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("size", ["0", "-3"])
def test_batch_size_below_1_fails_before_the_model(tmp_path, no_model, size) -> None:
    img = _image(tmp_path / "a.png")
    res = runner.invoke(app, ["evaluate", str(img), "--batch-size", size, "-o", str(tmp_path / "o")])
    _one_error_line(res, f"--batch-size must be at least 1, got {size}")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------- folders and unreadable images (13)


def test_collect_images_is_recursive(tmp_path) -> None:
    _image(tmp_path / "b.png")
    _image(tmp_path / "sub" / "deeper" / "a.jpg")
    _image(tmp_path / ".hidden" / "c.png")
    (tmp_path / "notes.txt").write_text("")
    found = [p.relative_to(tmp_path).as_posix() for p in collect_images([tmp_path])]
    assert found == ["b.png", "sub/deeper/a.jpg"]


def test_unreadable_images_are_skipped_and_listed(tmp_path) -> None:
    good = _image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    truncated = tmp_path / "cut.png"
    _image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])  # the header reads, the pixels do not
    seen = []
    res = evaluate(
        Tiny().eval(),
        [bad, good, truncated],
        ["center"],
        ["deletion"],
        preprocess=Preprocess(size=(16, 16)),
        steps=2,
        on_skip=seen.append,
    )
    assert {r.image for r in res.rows} == {"good.png"}
    assert [s.file for s in res.skipped] == [str(bad), str(truncated)] == [s.file for s in seen]
    assert all("cannot read" in s.reason for s in res.skipped)
    with pytest.raises(ValueError, match="none of the 2 image"):
        evaluate(
            Tiny().eval(), [bad, truncated], ["center"], ["deletion"], preprocess=Preprocess(size=(16, 16))
        )


def test_probe_images_skips_images_over_the_pixel_limit(tmp_path) -> None:
    big = _image(tmp_path / "big.png", size=(100, 100))
    ok, _, skipped = probe_images([("big.png", big)], {}, max_pixels=5000)
    assert ok == [] and "more than the limit" in skipped[0].reason


def test_cli_folder_with_a_corrupt_image_exits_1(tmp_path, loads) -> None:
    folder = tmp_path / "photos"
    _image(folder / "a.png")
    _image(folder / "sub" / "b.png", colour=(10, 200, 10))
    (folder / "sub" / "bad.jpg").write_bytes(b"junk")
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(folder),
            "--methods",
            "gradcam,center",
            "--metrics",
            "deletion",
            "--steps",
            "2",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert f"error: skipped {str(folder / 'sub' / 'bad.jpg')!r}: cannot read" in res.stderr
    data = _strict((out / "evaluate.json").read_text())
    assert {r["image"] for r in data["rows"]} == {"a.png", "b.png"}
    assert data["skipped"][0]["file"] == str(folder / "sub" / "bad.jpg")
    assert data["config"]["images"] == 2
    assert not list(out.glob(".*part"))  # atomic writes leave no temporary file


# ------------------------------------------------------------------------------------------- progress (14)


def test_progress_has_one_total_and_moves_within_a_batch(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = [
        (f"im{i}.png", Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()))
        for i in range(3)
    ]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    calls: list[tuple[float, int]] = []
    evaluate(
        Tiny().eval(),
        [*imgs, bad],
        ["gradcam", "center", "gradcam"],  # a repeated method counts once
        ["deletion", "insertion", "avg_drop"],
        preprocess=Preprocess(size=(16, 16)),
        steps=2,
        images_per_batch=2,
        progress=lambda done, total, _d: calls.append((done, total)),
    )
    totals = {t for _, t in calls}
    assert totals == {4 * 2}  # images x distinct methods, set once
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == 8
    # it moves after each metric: more updates than (batch, method) steps, with fractions of a batch
    assert len(calls) > 2 * 2 + 1 and any(d != int(d) for d in done)


# -------------------------------------------------------------------------------- output formats (15)


def test_methods_lists_family_cost_paper_prefer_in_every_format() -> None:
    names = camkit.method_names()
    res = runner.invoke(app, ["methods", "--format", "json"])
    assert res.exit_code == 0, res.output
    data = _strict(res.stdout)
    assert [d["name"] for d in data] == names
    for d in data:
        assert d["family"] and d["cost"] and d["paper"] and d["prefer"], d
    res = runner.invoke(app, ["methods", "--format", "tsv"])
    lines = res.stdout.splitlines()
    assert lines[0].split("\t") == [
        "name",
        "family",
        "parameters",
        "what",
        "cost per image",
        "prefer it when",
        "paper",
    ]
    assert [ln.split("\t")[0] for ln in lines[1:]] == names
    # piped table: nothing cut (old: 'gradcam…' at 80 columns)
    res = runner.invoke(app, ["methods"])
    assert "…" not in res.stdout
    first_cells = [ln.split("│")[1].strip() for ln in res.stdout.splitlines() if ln.startswith("│")]
    assert [c for c in first_cells if c] == names


def test_layers_hides_pass_through_modules_unless_all(loads) -> None:
    res = runner.invoke(app, ["layers", "tiny", "--format", "tsv"])
    assert res.exit_code == 0, res.output
    names = [ln.split("\t")[0] for ln in res.stdout.splitlines()[1:]]
    assert "conv" in names and "act" in names
    assert "skip" not in names and "drop" not in names and "flat" not in names
    res = runner.invoke(app, ["layers", "tiny", "--format", "json", "--all"])
    data = _strict(res.stdout)
    assert {"skip", "drop", "flat", "fc"} <= {d["name"] for d in data}
    assert sum(d["auto"] for d in data) == 1
    res = runner.invoke(app, ["layers", "tiny"])
    assert "auto:" in res.stdout and "(--all lists them)" in res.stdout


def test_evaluate_formats_and_model_options(tmp_path, loads) -> None:
    img = _image(tmp_path / "a.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"a.png": {"boxes": [[0, 0, 20, 20]]}}))
    base = ["evaluate", str(img), "-m", "gradcam,center", "--metrics", "deletion,box", "--steps", "2"]
    res = runner.invoke(app, [*base, "-a", str(ann), "-o", str(tmp_path / "o"), "--format", "tsv",
                              "--no-pretrained", "--seed", "7", "--threads", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split("\t") == ["method", "deletion", "box_iou", "box_acc"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["gradcam", "center"]
    assert loads[-1].pretrained is False and loads[-1].seed == 7 and loads[-1].threads == 1
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "o2"), "--format", "json", "-a", str(ann)])
    data = _strict(res.stdout)
    assert data["run"]["seed"] == 0 and set(data["summary"]) == {"gradcam", "center"}
    assert data == {**_strict((tmp_path / "o2" / "evaluate.json").read_text()), "files": data["files"]}
    # the table says how many images the box metrics left out
    img2 = _image(tmp_path / "b.png")
    res = runner.invoke(app, [*base[:2], str(img2), *base[2:], "-a", str(ann), "-o", str(tmp_path / "o3")])
    assert res.exit_code == 0, res.output
    assert "1 without ground-truth boxes excluded (b.png)" in res.stdout


@pytest.mark.slow
def test_evaluate_offline_with_random_weights(tmp_path) -> None:
    img = _image(tmp_path / "a.png", size=(64, 48))
    res = runner.invoke(
        app,
        ["evaluate", str(img), "--model", "resnet18", "--no-pretrained", "--seed", "1", "-m", "gradcam",
         "--metrics", "deletion", "--steps", "2", "-o", str(tmp_path / "o"), "--format", "json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = _strict(res.stdout)
    assert data["run"]["model"] == "resnet18" and data["run"]["pretrained"] is False


def test_progress_total_does_not_restart_with_perturbation_methods() -> None:
    img = Image.new("RGB", (20, 20), (120, 40, 200))
    calls: list[tuple[float, int, str]] = []
    evaluate(
        Tiny().eval(),
        [("a.png", img), ("b.png", img)],
        ["scorecam", "ablationcam"],
        ["avg_drop"],
        preprocess=Preprocess(size=(16, 16)),
        progress=lambda done, total, d: calls.append((done, total, d)),
    )
    assert {t for _, t, _ in calls} == {4}  # old: 469/469 then a new total of 988
    assert any("forwards" in d for _, _, d in calls)  # the perturbation passes show as they run
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == 4


def test_images_that_share_a_file_name_get_distinct_rows(tmp_path, loads) -> None:
    folder = tmp_path / "photos"
    _image(folder / "a" / "x.png")
    _image(folder / "b" / "x.png", colour=(10, 200, 10))
    out = tmp_path / "out"
    args = ["evaluate", str(folder), "--methods", "center", "--metrics", "deletion", "--steps", "2"]
    res = runner.invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = _strict((out / "evaluate.json").read_text())["rows"]
    assert sorted(r["image"] for r in rows) == ["a/x.png", "b/x.png"]
    assert "replaced" not in res.stderr
    again = runner.invoke(app, [*args, "-o", str(out)])
    assert again.exit_code == 0 and "note: replaced" in again.stderr and "evaluate.csv" in again.stderr
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"x.png": {"boxes": [[0, 0, 4, 4]]}}))
    res = runner.invoke(app, [*args, "-a", str(ann), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "2 images are named 'x.png'" in res.output


def test_evaluate_compile_runs_the_metrics_through_onnx_with_the_same_numbers(
    tmp_path, loads, monkeypatch
) -> None:
    from camkit.core import accel

    exports: list[object] = []
    real = accel._onnx_model
    monkeypatch.setattr(accel, "_onnx_model", lambda m, x: exports.append(m) or real(m, x))
    accel.clear_cache()
    img = _image(tmp_path / "a.png", size=(64, 48))
    base = ["evaluate", str(img), "-m", "gradcam,layercam", "--metrics", "deletion,insertion,avg_drop"]
    base += ["--steps", "5", "--format", "json"]
    plain = runner.invoke(app, [*base, "-o", str(tmp_path / "o1")])
    fast = runner.invoke(app, [*base, "--compile", "-o", str(tmp_path / "o2")])
    assert plain.exit_code == 0 and fast.exit_code == 0, (plain.output, fast.output)
    assert "warning" not in fast.stderr.lower()
    assert exports, "--compile did not run the metrics through ONNX Runtime"
    a, b = _strict(plain.stdout)["summary"], _strict(fast.stdout)["summary"]
    assert a.keys() == b.keys()
    for method, values in a.items():
        for column, value in values.items():
            assert abs(value - b[method][column]) <= 1e-5, (method, column, value, b[method][column])


@pytest.mark.parametrize(
    ("argv", "preset", "expected"),
    [
        (["camkit", "evaluate", "x.png", "--compile"], None, "PASSIVE"),  # before torch is imported
        (["camkit", "evaluate", "x.png", "--compile"], "ACTIVE", "ACTIVE"),  # the user's own setting stays
        (["camkit", "evaluate", "x.png"], None, None),  # the default path: spinning threads are faster
        (["camkit", "explain", "x.png", "--compile"], None, None),
    ],
)
def test_evaluate_compile_lets_torchs_openmp_threads_sleep(monkeypatch, argv, preset, expected) -> None:
    from camkit import _entry

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if preset is not None:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    _entry._passive_openmp(argv)
    assert os.environ.get("OMP_WAIT_POLICY") == expected
