"""Per-metric settings (``--metrics "infidelity(perturbation=gaussian,samples=5)"``): the registry's settings,
their keys and columns, their checks, and their values through ``camkit evaluate``.

* A configured metric through :func:`camkit.evaluate.evaluate` equals its function called with those settings on
  the same maps (the ``center`` reference map on a tiny model), next to the default metric in its own column.
* Settings equal to the defaults give the default metric; an unknown setting names the metric's settings and the
  closest one; a bad value is the function's own message; the command refuses both (exit 2, one line) before the
  model loads.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from camkit.adapters import LoadedModel, Preprocess
from camkit.cli import app as cli
from camkit.errors import CamkitError
from camkit.evaluate import baseline_map, evaluate
from camkit.metrics import (
    METRICS,
    Forward,
    MetricScorer,
    confidence_change,
    infidelity,
    region_perturbation,
    road,
)
from camkit.metrics.registry import BY_STEPS, metric_columns, metric_key, resolve_metrics, settings_table
from camkit.report.records import build_records

SIDE = 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).eval()


def _pictures() -> list[tuple[str, Image.Image]]:
    g = torch.Generator().manual_seed(1)
    return [
        (f"im{i}", Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()))
        for i in range(2)
    ]


def test_a_configured_metric_through_evaluate_equals_its_function_with_those_settings() -> None:
    model, pics = _model(), _pictures()
    asked = ["infidelity(perturbation=gaussian, samples=5)", "infidelity", "region_perturbation(order=random,patch_size=4)",
             "road(noise=0.05)"]  # fmt: skip
    result = evaluate(model, pics, ["center"], asked, preprocess=Preprocess(size=(SIDE, SIDE)), steps=4)
    gauss, region = (
        "infidelity(perturbation=gaussian,samples=5)",
        "region_perturbation(patch_size=4,order=random)",
    )
    assert result.columns == [gauss, "infidelity", region, "road_morf(noise=0.05)", "road_lerf(noise=0.05)"]
    x = Preprocess(size=(SIDE, SIDE))([im for _, im in pics])
    maps = baseline_map("center", 2, (SIDE, SIDE))
    classes = torch.tensor([row.cls for row in result.rows])
    want = {
        gauss: infidelity(model, x, maps, classes, (8,), perturbation="gaussian", samples=5),
        "infidelity": infidelity(model, x, maps, classes, (8,)),  # the registry's own size: 4 squares of 8 px
        region: region_perturbation(model, x, maps, classes, 4, order="random").aopc,
        "road_morf(noise=0.05)": road(model, x, maps, classes, noise=0.05).mean_score,
        "road_lerf(noise=0.05)": road(model, x, maps, classes, order="lerf", noise=0.05).mean_score,
    }
    for col, values in want.items():
        got = [row.values[col] for row in result.rows]
        assert got == pytest.approx(values.tolist(), rel=1e-6, abs=1e-9), col
    assert result.rows[0].values[gauss] != result.rows[0].values["infidelity"]
    assert all(math.isfinite(v) for row in result.rows for v in row.values.values())


def test_settings_declared_from_the_functions_and_keys_that_name_only_what_differs() -> None:
    assert METRICS["infidelity"].settings["perturbation"] == "baseline"
    assert METRICS["infidelity"].settings["patch_sizes"] is BY_STEPS  # sized by --steps unless given
    assert (
        METRICS["irof"].settings["segmentation"]
        == inspect.signature(__import__("camkit.metrics", fromlist=["irof"]).irof)
        .parameters["segmentation"]
        .default
    )
    for metric in METRICS.values():
        assert not {"batch_size", "forward", "generator", "model", "inputs", "maps"} & set(metric.settings)
    assert resolve_metrics(["infidelity(perturbation=baseline)", "Infidelity", "road(noise=0.01, seed=0)"], False) == [
        "infidelity", "road"]  # fmt: skip
    assert metric_key("road", {"percentages": (0.1, 0.5)}) == "road(percentages=(0.1,0.5))"
    assert resolve_metrics(["road(percentages=(0.1,0.5))"], False) == ["road(percentages=(0.1,0.5))"]
    assert metric_columns("box(iou_threshold=0.7)") == (
        "box_iou(iou_threshold=0.7)",
        "box_acc(iou_threshold=0.7)",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("infidelity(perturbaton=gaussian)", "metric 'infidelity' has no setting 'perturbaton' (did you mean "
         "'perturbation'?); its settings: patch_sizes, baseline, score, perturbation, samples, noise_mean, "
         "noise_std, seed"),
        ("sparseness(k=1)", "metric 'sparseness' has no settings; write sparseness alone"),
        ("infidelity(perturbation=uniform)", "infidelity(perturbation=uniform): unknown perturbation 'uniform': "
         "'baseline' or 'gaussian'"),
        ("irof(segmentation=quick)", "unknown segmentation 'quick': 'slic' or 'felzenszwalb'"),
        ("max_sensitivity(radius=-1)", "radius must be a number >= 0 or a pair (low, high), got -1"),
        ("region_perturbation(order=sideways)", "unknown order 'sideways'"),
        ("faithfulness_correlation(similarity=kendall)", "unknown similarity 'kendall'"),
        ("road(percentages=(0.5,2))", "percentages are fractions in [0, 1]"),
        ("sensitivity_n(runs=-1)", "sensitivity_n(runs=-1): runs must be an int >= 1, got -1"),
        ("road(percentages=abc)", "road(percentages=abc): a setting's value is refused (could not convert"),
    ],
)  # fmt: skip
def test_a_bad_setting_is_one_line_with_the_functions_own_message(spec: str, message: str) -> None:
    with pytest.raises(CamkitError) as err:
        resolve_metrics([spec], have_boxes=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_evaluate_refuses_a_bad_setting_before_the_model_loads(tmp_path: Path) -> None:
    _pictures()[0][1].save(tmp_path / "p.png")
    for spec, message in [("infidelity(perturbaton=gaussian)", "has no setting 'perturbaton'"),
                          ("deletion,irof(segmentation=quick)", "unknown segmentation 'quick'")]:  # fmt: skip
        res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "p.png"), "--model", "no_such_model", "--metrics",
                                       spec, "--out", str(tmp_path / "out")])  # fmt: skip
        assert res.exit_code == 2, res.output
        line = " ".join(res.output.split())
        assert line.startswith("error: ") and message in line and "no_such_model" not in line


def test_the_scorer_keeps_configured_and_default_passes_apart() -> None:
    model = _model()
    x, maps, classes = torch.randn(2, 3, SIDE, SIDE), torch.rand(2, SIDE, SIDE), torch.tensor([0, 1])
    chosen = resolve_metrics(["avg_drop(baseline=blur)", "increase", "avg_drop"], False)
    values, _ = MetricScorer(model, Forward(model), chosen, 4, 0.2)(
        x, maps, classes, [[], []], [(SIDE, SIDE)] * 2
    )
    blur = confidence_change(model, x, maps, classes, baseline="blur")
    zeros = confidence_change(model, x, maps, classes)
    assert values["avg_drop(baseline=blur)"].tolist() == pytest.approx(blur.drop.tolist())
    assert values["avg_drop"].tolist() == pytest.approx(zeros.drop.tolist())
    assert values["increase"].tolist() == pytest.approx(zeros.increase.tolist())


def test_report_records_carry_the_configured_columns() -> None:
    loaded = LoadedModel(_model(), Preprocess(size=(SIDE, SIDE)), None, "tiny")
    asked = ["road(noise=0.2, seed=1)", "road"]
    record = next(iter(build_records(loaded, _pictures()[:1], ["gradcam"], metrics=asked, steps=4)))
    values = record.metrics["gradcam"]
    assert set(values) == {
        "road_morf(noise=0.2,seed=1)",
        "road_lerf(noise=0.2,seed=1)",
        "road_morf",
        "road_lerf",
    }
    assert all(math.isfinite(v) for v in values.values())
    assert values["road_morf(noise=0.2,seed=1)"] != values["road_morf"]
    with pytest.raises(CamkitError, match="unknown order 'sideways'"):
        list(
            build_records(
                loaded, _pictures()[:1], ["gradcam"], metrics=["region_perturbation(order=sideways)"]
            )
        )


def test_the_docs_table_of_settings_is_the_registrys() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    assert settings_table() in docs


def test_roads_lerf_column_is_higher_is_better_also_when_configured() -> None:
    """ROAD gives two columns that go opposite ways: fewer MoRF points is better, more LeRF points is better."""
    road = METRICS["road"]
    assert road.column_lower_is_better("road_morf") and road.column_lower_is_better("road_morf(noise=0.05)")
    assert not road.column_lower_is_better("road_lerf")
    assert not road.column_lower_is_better("road_lerf(noise=0.05)")
    assert all(
        m.column_lower_is_better(c) == m.lower_is_better
        for k, m in METRICS.items()
        if k != "road"
        for c in m.columns
    )
