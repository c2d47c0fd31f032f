"""Method parameters from text (``--methods "finercam(alpha=0.5),gradcam"``, ``get_method("sscam(samples=2)")``)
and per-image targets from ``--annotations`` in ``camkit explain`` and ``camkit report``.

The CLI tests swap the model loader for a tiny random network with three named classes (weights do not matter).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import camkit
import camkit.cli.explain as cli_explain
import camkit.cli.report as cli_report
from camkit.adapters import Preprocess
from camkit.adapters.zoo import LoadedModel
from camkit.cli import app
from camkit.errors import CamkitError
from camkit.methods import get_method
from camkit.methods.finer import finercam
from camkit.methods.registry import method_parameters
from camkit.methods.smooth import smoothgradcampp
from camkit.methods.spec import parse_spec, split_specs
from camkit.report import build_records

runner = CliRunner()
LABELS = ["apple", "banana", "cherry"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.act(self.conv(x)))))


def _loaded() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(Tiny().eval(), Preprocess(size=(16, 16)), LABELS, "tiny")


@pytest.fixture
def tiny_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(options: object, input_size: int | None = None) -> LoadedModel:
        return _loaded()

    monkeypatch.setattr(cli_explain, "load_model", fake)
    monkeypatch.setattr(cli_report, "load_model", fake)


def _folder(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 18), (40 * i + 30, 200 - 50 * i, 90)).save(root / f"img{i}.png")
    return root


def _one_error_line(res: object, *needles: str) -> str:
    assert res.exit_code == 2, res.output  # type: ignore[attr-defined]
    lines = [ln for ln in res.output.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output  # type: ignore[attr-defined]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ the parser


def test_split_specs_respects_parentheses_and_quotes() -> None:
    assert split_specs("finercam(alpha=0.5, n_similar=2),gradcam") == [
        "finercam(alpha=0.5, n_similar=2)",
        "gradcam",
    ]
    assert split_specs("refinecam(scales=(1.0, 2.0)), smoothgradcam++(variant='a,b') ,") == [
        "refinecam(scales=(1.0, 2.0))",
        "smoothgradcam++(variant='a,b')",
    ]
    assert split_specs("gradcam,,layercam") == ["gradcam", "layercam"]
    with pytest.raises(CamkitError, match="unclosed"):
        split_specs("finercam(alpha=0.5,gradcam")
    with pytest.raises(CamkitError, match="unbalanced"):
        split_specs("finercam)alpha=0.5(")


def test_parse_spec_reads_literals_and_bare_words() -> None:
    assert parse_spec("gradcam") == ("gradcam", None)
    assert parse_spec("finercam()") == ("finercam", {})
    assert parse_spec("finercam(alpha=0.5, base=layercam)") == (
        "finercam",
        {"alpha": 0.5, "base": "layercam"},
    )
    assert parse_spec("refinecam(scales=(1, 2))") == ("refinecam", {"scales": (1, 2)})
    with pytest.raises(CamkitError, match="key=value"):
        parse_spec("finercam(0.5)")
    with pytest.raises(CamkitError, match="twice"):
        parse_spec("finercam(alpha=1, alpha=2)")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("finercam(alpha=0.5)", finercam(alpha=0.5).name),
        ("Finer-CAM(alpha=0.5, base=layercam)", finercam(alpha=0.5, base="layercam").name),
        ("smoothgradcampp(n=16)", smoothgradcampp(n=16).name),
        ("sscam(samples=10)", "sscam(samples=10)"),
        ("scorecam(weighting=channel-softmax)", "scorecam(weighting='channel-softmax')"),
        ("finercam(alpha=1.0)", "finercam"),  # the defaults: the registered name
        ("gradcam()", "gradcam"),
    ],
)
def test_configured_names_round_trip(spec: str, expected: str) -> None:
    method = get_method(spec)
    assert method.name == expected
    assert get_method(method.name).name == method.name  # a configured name is a spec of the same method


def test_unknown_parameter_lists_the_parameters_with_the_closest() -> None:
    with pytest.raises(CamkitError) as err:
        get_method("finercam(alfa=0.5)")
    msg = str(err.value)
    assert "no parameter 'alfa'" in msg and "Did you mean alpha?" in msg
    assert "alpha=1.0, n_similar=3, base='gradcam'" in msg
    with pytest.raises(CamkitError, match="gradcam takes no parameters"):
        get_method("gradcam(alpha=1)")
    with pytest.raises(CamkitError, match="unknown method 'nocam'"):
        get_method("nocam(alpha=1)")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (
            "finercam(alpha=abc)",
            "finercam: alpha must be a finite number, got 'abc' (str)",
        ),  # the factory's own TypeError
        ("finercam(n_similar=0)", "n_similar must be an integer >= 1"),
        ("smoothgradcam++(seed=1.5)", "seed must be an int"),
        ("sscam(samples=two)", "sscam: samples must be of type int"),
        ("sscam(samples=0)", "samples must be >= 1"),
        ("sscam(noise_std=True)", "noise_std must be of type float"),
        ("scorecam(weighting=soft)", "weighting must be 'prob' or 'channel-softmax'"),
        ("multiscalecam(scales=2.0)", "scales must be a non-empty sequence"),
    ],
)
def test_bad_values_raise_the_api_messages(spec: str, needle: str) -> None:
    with pytest.raises(CamkitError, match=None) as err:
        get_method(spec)
    assert needle in str(err.value)


def test_parameters_listed_with_defaults() -> None:
    assert method_parameters("finercam") == {"alpha": 1.0, "n_similar": 3, "base": "gradcam"}
    assert method_parameters("sscam")["samples"] == 35
    assert method_parameters("opticam") == {"samples": 100}
    assert method_parameters("gradcam") == {}


def test_configured_methods_compute_what_the_python_api_computes() -> None:
    """A spec gives the map of the factory's instance; a perturbation method's ``samples`` is its own count."""
    loaded = _loaded()
    x = torch.rand(2, 3, 16, 16)
    by_text = camkit.explain(loaded.model, x, "finercam(alpha=0.5)")
    by_api = camkit.explain(loaded.model, x, finercam(alpha=0.5))
    assert by_text.method == "finercam(alpha=0.5)"
    torch.testing.assert_close(by_text.maps, by_api.maps)
    configured = camkit.explain(loaded.model, x, "sscam(samples=3, noise_std=1.0)")
    options = camkit.PerturbationOptions(noise_draws=3, noise_std=1.0, samples=50)
    call_level = camkit.explain(loaded.model, x, "sscam", perturbation=options)
    torch.testing.assert_close(configured.maps, call_level.maps)
    other = camkit.explain(loaded.model, x, "sscam(samples=3, noise_std=1.0, seed=5)")
    assert not torch.allclose(other.maps, configured.maps)  # the seed is the method's, not the call's
    # the method's samples win over the call's
    over = camkit.explain(loaded.model, x, "sscam(samples=3, noise_std=1.0)", perturbation=options)
    torch.testing.assert_close(over.maps, configured.maps)


def test_compare_keeps_two_configurations_apart() -> None:
    loaded = _loaded()
    out = camkit.compare(loaded.model, torch.rand(1, 3, 16, 16), ["finercam(alpha=0.5)", "finercam(alpha=0)"])
    assert list(out) == ["finercam(alpha=0.5)", "finercam(alpha=0)"]


# ------------------------------------------------------------------------------------------------ commands


def test_methods_lists_parameters_in_every_format() -> None:
    res = runner.invoke(app, ["methods", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["finercam"]["parameters"] == {"alpha": 1.0, "n_similar": 3, "base": "gradcam"}
    assert rows["multiscalecam"]["parameters"]["scales"] == [1.0, 1.5, 2.0]
    assert rows["gradcam"]["parameters"] == {}
    res = runner.invoke(app, ["methods", "--format", "tsv"])
    header, *lines = res.output.splitlines()
    assert header.split("\t")[2] == "parameters"
    sscam = next(ln.split("\t") for ln in lines if ln.startswith("sscam\t"))
    assert sscam[2].startswith("samples=35, noise_std=2.0, seed=0")
    res = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert "n_similar=3" in res.output


def test_explain_takes_configured_methods(tmp_path: Path, tiny_cli: None) -> None:
    img = _folder(tmp_path / "in", 1) / "img0.png"
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        ["explain", str(img), "--methods", "finercam(alpha=0.5, base='layercam'),gradcam", "-o", str(out)],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    methods = [e["method"] for e in summary]
    assert "finercam(alpha=0.5, base='layercam')" in methods and "gradcam" in methods
    assert (out / "img0_finercam(alpha=0.5,base=layercam).png").is_file()


@pytest.mark.parametrize(
    ("command", "spec", "needles"),
    [
        ("explain", "finercam(alfa=0.5)", ("no parameter 'alfa'", "Did you mean alpha?")),
        ("report", "sscam(samples=x)", ("samples must be of type int",)),
        ("evaluate", "gradcam(n=2)", ("gradcam takes no parameters",)),
        ("run", "finercam(alpha=0.5", ("unclosed",)),
        ("localize", "smoothgradcam++(n=0)", ("n (noisy copies) must be an integer >= 1",)),
    ],
)
def test_every_command_refuses_bad_parameters_in_one_line(
    tmp_path: Path, command: str, spec: str, needles: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the methods were checked")

    for module in ("explain", "report", "evaluate", "localize"):
        monkeypatch.setattr(f"camkit.cli.{module}.load_model", refuse)
    monkeypatch.setattr("camkit.run.runner.ModelSpec.load", refuse)
    img = _folder(tmp_path / "in", 1) / "img0.png"
    extra = ["--out", str(tmp_path / "store")] if command == "run" else []
    flag = "--method" if command == "localize" else "--methods"
    res = runner.invoke(app, [command, str(img), flag, spec, *extra])
    _one_error_line(res, *needles)


def test_run_records_a_configured_method_in_the_store_settings(tmp_path: Path) -> None:
    """Resume compares the configured method: the same spec resumes, another alpha is refused."""
    from camkit.run import ModelSpec, RunOptions, open_store, run

    data = _folder(tmp_path / "data", 2)
    model = ModelSpec("resnet18", pretrained=False, seed=3, threads=1)
    opts = RunOptions(methods=("finercam(alpha=0.5)", "gradcam"), image_size=32, shard_size=2, batch_size=2)
    out = tmp_path / "store"
    run([data], out, model=model, options=opts, workers=0)
    store = open_store(out)
    assert store.methods == ["finercam(alpha=0.5)", "gradcam"]
    assert store.config["options"]["methods"] == ["finercam(alpha=0.5)", "gradcam"]
    run([data], out, model=model, options=opts, workers=0)  # finished, same settings: nothing to do
    other = RunOptions(methods=("finercam(alpha=0.25)", "gradcam"), image_size=32, shard_size=2, batch_size=2)
    with pytest.raises(CamkitError, match="other settings"):
        run([data], out, model=model, options=other, workers=0)


# ------------------------------------------------------------------------------------------------ --annotations


def _annotations(tmp_path: Path) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"img0.png": {"class": 2}, "img1.png": {"class": "banana"}}))
    return path


def test_explain_explains_each_image_for_its_annotated_class(tmp_path: Path, tiny_cli: None) -> None:
    data = _folder(tmp_path / "in")
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["explain", str(data), "--annotations", str(_annotations(tmp_path)), "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "img2 has no annotated class: explaining its top-1" in " ".join(res.output.split())
    entries = {e["image"]: e for e in json.loads((out / "summary.json").read_text())}
    assert (entries["img0"]["class"], entries["img0"]["annotation"]) == (2, 2)
    assert (entries["img1"]["class"], entries["img1"]["label"], entries["img1"]["annotation"]) == (
        1,
        "banana",
        "banana",
    )
    top1 = int(_loaded().model(_loaded().preprocess([Image.open(data / "img2.png").convert("RGB")])).argmax())
    assert (entries["img2"]["class"], entries["img2"]["annotation"]) == (top1, None)
    assert entries["img0"]["options"]["annotations"] == str(tmp_path / "ann.json")


def test_explain_annotations_with_target_for_the_others(tmp_path: Path, tiny_cli: None) -> None:
    data = _folder(tmp_path / "in")
    out = tmp_path / "out"
    ann = _annotations(tmp_path)
    res = runner.invoke(
        app, ["explain", str(data), "--annotations", str(ann), "--target", "0", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    entries = {e["image"]: e for e in json.loads((out / "summary.json").read_text())}
    assert [entries[k]["class"] for k in ("img0", "img1", "img2")] == [2, 1, 0]


def test_explain_annotations_refused_before_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_explain, "load_model", refuse)
    data = _folder(tmp_path / "in")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    _one_error_line(runner.invoke(app, ["explain", str(data), "--annotations", str(bad)]), "bad.json")
    _one_error_line(
        runner.invoke(app, ["explain", str(data), "--annotations", str(tmp_path / "none.json")]), "not found"
    )
    (tmp_path / "in" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "sub" / "img0.png")
    ann = _annotations(tmp_path)
    _one_error_line(runner.invoke(app, ["explain", str(data), "--annotations", str(ann)]), "named 'img0.png'")


def test_explain_unknown_annotated_class_is_an_error_for_camkit_json(tmp_path: Path, tiny_cli: None) -> None:
    data = _folder(tmp_path / "in", 1)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"img0.png": {"class": "durian"}}))
    _one_error_line(
        runner.invoke(app, ["explain", str(data), "--annotations", str(ann), "-o", str(tmp_path / "o")]),
        "unknown class name 'durian'",
    )


def test_explain_coco_class_unknown_to_the_model_falls_back_with_a_note(
    tmp_path: Path, tiny_cli: None
) -> None:
    data = _folder(tmp_path / "in", 2)
    coco = {
        "images": [{"id": 1, "file_name": "img0.png"}, {"id": 2, "file_name": "img1.png"}],
        "annotations": [
            {"image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
            {"image_id": 2, "category_id": 8, "bbox": [1, 1, 5, 5]},
        ],
        "categories": [{"id": 7, "name": "cherry"}, {"id": 8, "name": "person"}],
    }
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", str(data), "--annotations", str(ann), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "annotated class 'person' is not a class of tiny" in " ".join(res.output.split())
    entries = {e["image"]: e for e in json.loads((out / "summary.json").read_text())}
    assert (entries["img0"]["class"], entries["img0"]["annotation"]) == (2, "cherry")
    assert entries["img1"]["annotation"] == "person"


def test_report_records_each_images_annotated_class(tmp_path: Path, tiny_cli: None) -> None:
    data = _folder(tmp_path / "in")
    out = tmp_path / "report.html"
    res = runner.invoke(
        app, ["report", str(data), "--annotations", str(_annotations(tmp_path)), "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert out.is_file()
    loaded = _loaded()
    images = [(f"img{i}", Image.open(data / f"img{i}.png").convert("RGB")) for i in range(3)]
    records = list(
        build_records(
            loaded, images, ["gradcam", "finercam(alpha=0.5)"], targets={"img0": 2, "img1": "banana"}
        )
    )
    assert [r.target.cls for r in records[:2] if r.target] == [2, 1]
    assert records[0].notes == [] and records[2].notes == [
        "no class given for this image: its top-1 is explained"
    ]
    assert {m.method for m in records[0].maps} == {"gradcam", "finercam(alpha=0.5)"}


def test_report_cli_passes_the_annotated_classes(
    tmp_path: Path, tiny_cli: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}
    real = cli_report.build_records if hasattr(cli_report, "build_records") else None
    assert real is None  # imported inside the command: patch the library's
    import camkit.report as report_pkg

    original = report_pkg.build_records

    def spy(*args: object, **kwargs: object) -> object:
        seen["targets"] = args[8] if len(args) > 8 else kwargs.get("targets")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(report_pkg, "build_records", spy)
    data = _folder(tmp_path / "in")
    res = runner.invoke(
        app,
        ["report", str(data), "--annotations", str(_annotations(tmp_path)), "-o", str(tmp_path / "r.html")],
    )
    assert res.exit_code == 0, res.output
    assert seen["targets"] == {"img0": 2, "img1": "banana"}
