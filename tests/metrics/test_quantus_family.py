"""The Quantus-family metrics (camkit.metrics.correlation, regions, robustness): known answers on a linear model,
where the exact attribution of a pixel is w_i (x_i - baseline_i), their errors, and their registry entries."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from camkit.adapters import LoadedModel, Preprocess
from camkit.errors import CamkitError
from camkit.evaluate import evaluate
from camkit.metrics import (
    METRICS,
    Forward,
    MetricScorer,
    deletion,
    faithfulness_correlation,
    faithfulness_estimate,
    infidelity,
    irof,
    monotonicity_arya,
    monotonicity_nguyen,
    pixel_flipping,
    region_perturbation,
    selectivity,
    sensitivity,
    sensitivity_n,
)
from camkit.metrics.perturbed import fill_baseline, random_subsets
from camkit.report.records import build_records
from testbed import assert_unchanged, snapshot

QUANTUS_FAMILY = (
    "faithfulness_correlation",
    "faithfulness_estimate",
    "monotonicity_arya",
    "monotonicity_nguyen",
    "sensitivity_n",
    "infidelity",
    "pixel_flipping",
    "region_perturbation",
    "selectivity",
    "irof",
    "max_sensitivity",
    "avg_sensitivity",
)


def _linear(positive: bool = False) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A linear 1-channel 8 x 8 model, inputs, classes and the exact attribution maps w (x - black)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    with torch.no_grad():
        if positive:
            model[1].weight.abs_()
    x = torch.randn(2, 1, 8, 8)
    classes = torch.tensor([0, 1])
    w = model[1].weight.detach()[classes].view(2, 8, 8)
    maps = w * (x - fill_baseline(x, "black"))[:, 0]
    return model, x, classes, maps


def test_exact_attributions_correlate_perfectly_and_have_no_infidelity() -> None:
    model, x, classes, maps = _linear()
    before = snapshot(model)
    one = torch.ones(2)
    torch.testing.assert_close(faithfulness_correlation(model, x, maps, classes, runs=8, subset_size=5), one)
    torch.testing.assert_close(faithfulness_estimate(model, x, maps, classes, features_in_step=4), one)
    res = sensitivity_n(model, x, maps, classes, fractions=(0.05, 0.5), runs=6, score="logit")
    torch.testing.assert_close(res.correlation, torch.ones(2, 2))
    assert res.ns.tolist() == [3, 32]
    # infidelity's I^T g takes the map as a gradient: the weights are its exact answer for a linear model
    w = model[1].weight.detach()[classes].view(2, 8, 8)
    zero = infidelity(model, x, w, classes, patch_sizes=(2, 3))
    torch.testing.assert_close(zero, torch.zeros(2), atol=1e-8, rtol=0)
    # a map that puts the relevance on the wrong pixels does not
    shuffled = maps.flatten(1)[:, torch.randperm(64)].view(2, 8, 8)
    assert (faithfulness_estimate(model, x, shuffled, classes, features_in_step=4) < 0.9).all()
    assert (infidelity(model, x, w.flatten(1)[:, torch.randperm(64)].view(2, 8, 8), classes) > 1e-3).all()
    # whatever the perturbation: Gaussian noise on the squares, uniform values, another loss
    for kwargs in ({"perturbation": "gaussian", "noise_std": 0.5}, {"baseline": "uniform", "samples": 2}):
        torch.testing.assert_close(
            infidelity(model, x, w, classes, **kwargs), torch.zeros(2), atol=1e-8, rtol=0
        )
    mae = infidelity(model, x, 2 * w, classes, loss=lambda d, g: (d - g).abs().mean(dim=1))
    mse = infidelity(model, x, 2 * w, classes)
    assert (mae > 1e-3).all() and not torch.allclose(mae, mse)
    assert_unchanged(before, model)


def test_monotonicity_known_answers() -> None:
    model, x, classes, maps = _linear(positive=True)
    x = x.abs() + 0.1  # every pixel raises the logits above the black baseline
    maps = model[1].weight.detach()[classes].view(2, 8, 8) * (x - fill_baseline(x, "black"))[:, 0]
    # the logit only rises as pixels come back: monotonic in any order
    assert monotonicity_arya(model, x, maps.flip(1), classes, features_in_step=8, score="logit").tolist() == [
        1,
        1,
    ]
    # a pixel that lowers the logit breaks it
    model[1].weight.data[0, 5] = -50.0
    assert monotonicity_arya(model, x, maps, classes, features_in_step=8, score="logit").tolist() == [0, 1]
    model[1].weight.data[0, 5] = 1.0
    maps = model[1].weight.detach()[classes].view(2, 8, 8) * (x - fill_baseline(x, "black"))[:, 0]
    # the squared change of one pixel's removal is its attribution squared: the same ranking
    rho = monotonicity_nguyen(model, x, maps, classes, baseline="black", score="logit")
    torch.testing.assert_close(rho, torch.ones(2))


def test_monotonicity_nguyen_uniform_draws_are_seeded() -> None:
    model, x, classes, maps = _linear()
    a = monotonicity_nguyen(model, x, maps, classes, samples=2, features_in_step=16, seed=1)
    b = monotonicity_nguyen(model, x, maps, classes, samples=2, features_in_step=16, seed=1)
    c = monotonicity_nguyen(model, x, maps, classes, samples=2, features_in_step=16, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_subsets_are_distinct_and_seeded() -> None:
    idx = random_subsets(2, 3, 10, 4, seed=7)
    assert idx.shape == (2, 3, 4) and all(len(set(r.tolist())) == 4 for r in idx.flatten(0, 1))
    assert torch.equal(idx, random_subsets(2, 3, 10, 4, seed=7))
    with pytest.raises(CamkitError, match="between 1 and 10"):
        random_subsets(1, 1, 10, 11)


def test_pixel_flipping_is_deletion_to_black() -> None:
    model, x, classes, maps = _linear()
    pf = pixel_flipping(model, x, maps, classes, features_in_step=4, score="logit")
    ref = deletion(model, x, maps, classes, steps=16, baseline=fill_baseline(x, "black"), score="logit")
    torch.testing.assert_close(pf.scores, ref.scores)
    # the logit falls by the removed pixels' attributions
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    removed = maps.flatten(1).gather(1, order).cumsum(dim=1)[:, 3::4]
    torch.testing.assert_close(pf.scores[:, :1] - pf.scores[:, 1:], removed, atol=1e-4, rtol=1e-4)


def test_region_perturbation_and_selectivity_by_hand() -> None:
    model, x, classes, maps = _linear()
    morf = region_perturbation(model, x, maps, classes, patch_size=4, regions=3, score="logit")
    patches = maps.view(2, 2, 4, 2, 4).sum(dim=(2, 4)).flatten(1)  # 2 x 2 squares of 4 x 4, raster order
    drops = patches.sort(dim=1, descending=True).values.cumsum(dim=1)[:, :3]
    torch.testing.assert_close(morf.scores[:, :1] - morf.scores[:, 1:], drops, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        morf.aopc, torch.cat([torch.zeros(2, 1), drops], 1).mean(1), atol=1e-4, rtol=1e-4
    )
    lerf = region_perturbation(
        model, x, maps, classes, patch_size=4, order="lerf", regions=None, score="logit"
    )
    assert lerf.scores.shape == (2, 5)
    assert (morf.aopc > lerf.aopc[:, None].expand(2, 1)[:, 0] - 1e-6).all()
    sel = selectivity(model, x, maps, classes, patch_size=4, score="logit")
    torch.testing.assert_close(sel.auc, torch.trapezoid(sel.scores, dx=0.25, dim=1))
    # random order: the squares in the seeded permutation torch.rand(B, squares).argsort(dim=1)
    rnd = region_perturbation(
        model, x, maps, classes, patch_size=4, order="random", regions=None, score="logit"
    )
    perm = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    drops = patches.gather(1, perm).cumsum(dim=1)
    torch.testing.assert_close(rnd.scores[:, :1] - rnd.scores[:, 1:], drops, atol=1e-4, rtol=1e-4)
    other = region_perturbation(model, x, maps, classes, patch_size=4, order="random", regions=None, seed=1)
    assert not torch.equal(
        other.scores, region_perturbation(model, x, maps, classes, 4, "random", None).scores
    )
    with pytest.raises(CamkitError, match="unknown order"):
        region_perturbation(model, x, maps, classes, order="sideways")


def test_irof_removes_segments_by_mean_relevance() -> None:
    model, x, classes, _ = _linear()
    maps = torch.zeros(2, 8, 8)
    maps[:, :, :4] = 1.0  # the left half is the relevant one
    segments = torch.zeros(2, 8, 8, dtype=torch.long)
    segments[:, :, 4:] = 1
    res = irof(model, x, maps, classes, segments=segments, baseline=0.0)
    fwd = Forward(model)
    y = fwd.scores(x, classes, "prob")
    left = torch.where(segments[:, None] == 0, torch.zeros_like(x), x)
    first = fwd.scores(left, classes, "prob") / y
    last = fwd.scores(torch.zeros_like(x), classes, "prob") / y
    torch.testing.assert_close(res.curve, torch.stack([torch.ones(2), first, last], 1))
    torch.testing.assert_close(res.aoc, 1 - torch.trapezoid(res.curve, dx=0.5, dim=1))
    assert res.segments.tolist() == [2, 2]
    with pytest.raises(CamkitError, match="segments must be labels"):
        irof(model, x, maps, classes, segments=segments[:, :4])


def test_sensitivity_known_answers() -> None:
    model, x, _, maps = _linear()
    maps = maps.abs()
    assert sensitivity(model, x, maps, lambda z: maps, samples=3).max.tolist() == [0, 0]
    res = sensitivity(model, x, maps, lambda z: 3 * maps, samples=3)
    torch.testing.assert_close(res.values, torch.full((2, 3), 2.0))
    torch.testing.assert_close(res.mean, torch.full((2,), 2.0))
    # the draws are seeded; a draw that changes the top-1 is NaN when asked
    grow = sensitivity(model, x, maps, lambda z: maps + (z - x)[:, 0], samples=4, radius=5.0, seed=1)
    again = sensitivity(model, x, maps, lambda z: maps + (z - x)[:, 0], samples=4, radius=5.0, seed=1)
    assert torch.equal(grow.values, again.values) and (grow.max >= grow.mean).all()
    nan = sensitivity(
        model, x, maps, lambda z: maps + (z - x)[:, 0], 4, 5.0, 1, nan_when_prediction_changes=True
    )
    assert nan.values.isnan().any() and not nan.values.isnan().all()
    with pytest.raises(CamkitError, match="remap must give maps"):
        sensitivity(model, x, maps, lambda z: maps[:1])
    with pytest.raises(CamkitError, match="samples must be"):
        sensitivity(model, x, maps, lambda z: maps, samples=0)
    with pytest.raises(CamkitError, match="low < high"):
        sensitivity(model, x, maps, lambda z: maps, radius=(0.3, 0.1))
    with pytest.raises(CamkitError, match="radius must be"):
        sensitivity(model, x, maps, lambda z: maps, radius=-0.1)


def test_bad_arguments_are_camkit_errors() -> None:
    model, x, classes, maps = _linear()
    with pytest.raises(CamkitError, match="features_in_step"):
        faithfulness_estimate(model, x, maps, classes, features_in_step=0)
    with pytest.raises(CamkitError, match="patch sizes"):
        infidelity(model, x, maps, classes, patch_sizes=(0,))
    with pytest.raises(CamkitError, match="unknown perturbation"):
        infidelity(model, x, maps, classes, perturbation="blur")
    with pytest.raises(CamkitError, match="samples must be"):
        infidelity(model, x, maps, classes, perturbation="gaussian", samples=0)
    with pytest.raises(CamkitError, match="noise_std"):
        infidelity(model, x, maps, classes, perturbation="gaussian", noise_std=-1.0)
    with pytest.raises(CamkitError, match="unknown loss"):
        infidelity(model, x, maps, classes, loss="mae")
    with pytest.raises(CamkitError, match=r"loss must give a Tensor of shape \(2,\)"):
        infidelity(model, x, maps, classes, loss=lambda d, g: d - g)
    with pytest.raises(CamkitError, match="unknown similarity"):
        faithfulness_estimate(model, x, maps, classes, similarity="kendall")
    with pytest.raises(CamkitError, match="unknown segmentation"):
        irof(model, x, maps, classes, segmentation="quickshift")
    with pytest.raises(CamkitError, match="patch_size"):
        selectivity(model, x, maps, classes, patch_size=0)
    with pytest.raises(CamkitError, match="unknown baseline"):
        faithfulness_correlation(model, x, maps, classes, baseline="grey")


def test_registry_entries() -> None:
    for name in QUANTUS_FAMILY:
        assert METRICS[name].columns == (name,) and not METRICS[name].needs_boxes
    lower = {"infidelity", "pixel_flipping", "selectivity", "max_sensitivity", "avg_sensitivity"}
    assert {n for n in QUANTUS_FAMILY if METRICS[n].lower_is_better} == lower
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).eval()
    x, maps, classes = torch.randn(2, 3, 16, 16), torch.rand(2, 16, 16), torch.tensor([0, 1])
    scorer = MetricScorer(model, Forward(model), list(QUANTUS_FAMILY), 4, 0.2)
    with pytest.raises(CamkitError, match="re-explain perturbed inputs"):
        scorer(x, maps, classes, [[], []], [(16, 16)] * 2)
    values, _ = scorer(x, maps, classes, [[], []], [(16, 16)] * 2, remap=lambda z: maps)
    assert set(values) == set(QUANTUS_FAMILY)
    assert all(torch.isfinite(v).all() and v.shape == (2,) for v in values.values())
    assert values["max_sensitivity"].tolist() == [0, 0]


def test_evaluate_computes_the_quantus_family() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).eval()
    g = torch.Generator().manual_seed(1)
    pics = [
        (f"im{i}", Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()))
        for i in range(2)
    ]
    metrics = ["faithfulness_correlation", "irof", "max_sensitivity", "avg_sensitivity"]
    result = evaluate(
        model, pics, ["gradcam", "center"], metrics, preprocess=Preprocess(size=(16, 16)), steps=3
    )
    for method in ("gradcam", "center"):
        assert all(math.isfinite(result.summary[method][m]) for m in metrics), result.summary[method]
    assert result.summary["center"]["max_sensitivity"] == 0  # a reference map does not depend on the input
    loaded = LoadedModel(model, Preprocess(size=(16, 16)), None, "tiny")
    records = list(build_records(loaded, pics[:1], ["gradcam"], metrics=["avg_sensitivity", "irof"], steps=3))
    assert all(math.isfinite(records[0].metrics["gradcam"][m]) for m in ("avg_sensitivity", "irof"))
