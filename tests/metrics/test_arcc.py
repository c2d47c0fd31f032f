"""ARCC (camkit.metrics.arcc): its formula by hand and its place in the metric registry (evaluate, run, report)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from camkit.adapters import LoadedModel, Preprocess
from camkit.errors import CamkitError
from camkit.evaluate import evaluate
from camkit.metrics import METRICS, Forward, MetricScorer, arcc, road
from camkit.report.records import build_records


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def test_arcc_is_the_harmonic_mean_of_its_parts_by_hand() -> None:
    model = _model()
    with torch.no_grad():
        model[4].weight.mul_(20)
    x = torch.randn(2, 3, 16, 16)
    maps = torch.rand(2, 16, 16)
    classes = torch.tensor([0, 2])
    res = arcc(model, x, maps, lambda xm: maps, classes, noise=0.0)
    # coherency of a map with itself: (1 + 1) / 2 (up to the 1e-8 in the correlation)
    torch.testing.assert_close(res.coherency, torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.complexity, maps.flatten(1).mean(1))
    pct = (0.2, 0.4, 0.6, 0.8)
    morf = road(model, x, maps, classes, pct, "morf", noise=0.0).mean_score
    lerf = road(model, x, maps, classes, pct, "lerf", noise=0.0).mean_score
    r = (lerf - morf).clamp(0, 1)
    torch.testing.assert_close(res.road, r)
    expected = 3 / (1 / (res.coherency + 1e-8) + 1 / (1 - res.complexity + 1e-8) + 1 / (r + 1e-8))
    torch.testing.assert_close(res.arcc, expected)
    with pytest.raises(CamkitError, match="remap must give maps"):
        arcc(model, x, maps, lambda xm: maps[:1], classes)


def test_arcc_is_registered_and_needs_the_method() -> None:
    assert METRICS["arcc"].columns == ("arcc",) and not METRICS["arcc"].lower_is_better
    model = _model()
    scorer = MetricScorer(model, Forward(model), ["arcc"], 3, 0.2)
    x, maps, classes = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16), torch.tensor([0, 1])
    with pytest.raises(CamkitError, match="arcc re-explains"):
        scorer(x, maps, classes, [[], []], [(16, 16)] * 2)
    values, _ = scorer(x, maps, classes, [[], []], [(16, 16)] * 2, remap=lambda xm: maps)
    torch.testing.assert_close(values["arcc"], arcc(model, x, maps, lambda xm: maps, classes).arcc)


def _pictures() -> list[tuple[str, Image.Image]]:
    g = torch.Generator().manual_seed(1)
    return [
        (f"im{i}", Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()))
        for i in range(2)
    ]


def test_evaluate_and_report_compute_arcc() -> None:
    model = _model()
    pre = Preprocess(size=(16, 16))
    result = evaluate(model, _pictures(), ["gradcam", "center"], ["arcc"], preprocess=pre, steps=3)
    for method in ("gradcam", "center"):
        value = result.summary[method]["arcc"]
        assert math.isfinite(value) and 0 <= value <= 1
    records = list(
        build_records(
            LoadedModel(model, pre, None, "tiny"), _pictures(), ["gradcam"], metrics=["arcc"], steps=3
        )
    )
    assert all(math.isfinite(r.metrics["gradcam"]["arcc"]) for r in records)
