"""The faithfulness metrics of :mod:`camkit.metrics.correlation` and :mod:`camkit.metrics.regions` against Quantus
0.6.0, on the same tiny random-weight CNNs, inputs, maps (random, without ties) and classes.

Quantus' features are the elements of the input (the map broadcast to its channels); camkit's are pixels. They
are the same on one-channel inputs, which the order-based metrics use here; infidelity and IROF treat a pixel's
channels alike on both sides and are compared on three channels. Quantus' ``normalise`` and ``abs`` are off
(camkit uses maps as given). The random metrics get the same draws on both sides: Faithfulness Correlation's
subsets are fed to Quantus by replacing ``numpy.random.choice`` with camkit's :func:`random_subsets`, Monotonicity
Correlation's uniform values and Monotonicity's re-insertion through Quantus' ``perturb_func`` argument. Every
comparison is to ``ATOL`` (1e-5) except where stated.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import quantus
import torch
from torch import Tensor, nn

from camkit.metrics import correlation, regions
from camkit.metrics.perturbed import pearson, random_subsets, step_sums

pytestmark = [pytest.mark.reference]

ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4)
        )
        self.fc = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


def _setup(channels: int, b: int = 3, size: int = 16) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    torch.manual_seed(channels)
    model = Net(channels).eval()
    with torch.no_grad():
        model.fc.weight.mul_(10.0)  # scores that move when pixels are replaced
    x = torch.randn(b, channels, size, size)
    maps = torch.rand(b, size, size)  # no ties (almost surely)
    classes = torch.arange(b) % 4
    return model, x, maps, classes


@pytest.fixture(scope="module")
def gray() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    return _setup(1)


def _quantus(metric: Any, model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor, **kwargs: Any) -> Any:
    return metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=classes.numpy(),
        a_batch=maps[:, None].numpy(),
        device="cpu",
        channel_first=True,
        **kwargs,
    )


def test_faithfulness_correlation(gray, monkeypatch) -> None:
    model, x, maps, classes = gray
    idx = random_subsets(3, 10, 256, 20, seed=3)
    calls = itertools.product(range(10), range(3))  # Quantus draws run by run, image by image

    def choice(n: int, size: int, replace: bool = True) -> np.ndarray:
        run, img = next(calls)
        return idx[img, run].numpy()

    monkeypatch.setattr(np.random, "choice", choice)
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=10, subset_size=20, normalise=False, return_aggregate=False, disable_warnings=True
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    ours = correlation.faithfulness_correlation(model, x, maps, classes, runs=10, subset_size=20, seed=3)
    assert np.abs(ref).max() > 0.05
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)


def test_faithfulness_estimate(gray) -> None:
    model, x, maps, classes = gray
    metric = quantus.FaithfulnessEstimate(features_in_step=8, normalise=False, disable_warnings=True)
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    ours = correlation.faithfulness_estimate(model, x, maps, classes, features_in_step=8)
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)


def test_monotonicity_arya(gray) -> None:
    model, x, maps, classes = gray
    flat = x.flatten(1).numpy()

    def insert(arr: np.ndarray, indices: np.ndarray, **kwargs: Any) -> np.ndarray:
        out = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, indices] = flat[rows, indices]  # put the image's values back (the paper)
        return out

    kwargs = {"features_in_step": 128, "normalise": False, "abs": False, "disable_warnings": True}
    default = _quantus(quantus.Monotonicity(**kwargs), model, x, maps, classes, softmax=True)
    assert all(default)  # 0.6.0's default writes the baseline back: the images never change
    ref = np.asarray(_quantus(quantus.Monotonicity(perturb_func=insert, **kwargs), model, x, maps, classes))
    ours = correlation.monotonicity_arya(model, x, maps, classes, features_in_step=128)
    assert 0 < ref.sum() < 3  # both outcomes occur
    np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float32))


def test_monotonicity_nguyen(gray) -> None:
    model, x, maps, classes = gray
    steps, samples = 16, 3
    gen = torch.Generator(device="cpu").manual_seed(5)
    draws = torch.rand(3, steps, samples, generator=gen)  # what camkit draws with seed=5
    calls = itertools.product(range(steps), range(samples))

    def fill(arr: np.ndarray, indices: np.ndarray, **kwargs: Any) -> np.ndarray:
        t, j = next(calls)
        out = arr.copy()
        out[np.arange(arr.shape[0])[:, None], indices] = draws[:, t, j].numpy()[:, None]
        return out

    metric = quantus.MonotonicityCorrelation(
        nr_samples=samples,
        features_in_step=16,
        normalise=False,
        abs=False,
        perturb_func=fill,
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    ours = correlation.monotonicity_nguyen(
        model, x, maps, classes, samples=samples, features_in_step=16, seed=5
    )
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)


def test_pixel_flipping_is_deletion(gray) -> None:
    model, x, maps, classes = gray
    metric = quantus.PixelFlipping(features_in_step=8, normalise=False, disable_warnings=True)
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    curve = regions.pixel_flipping(model, x, maps, classes, features_in_step=8)
    np.testing.assert_allclose(curve.scores[:, 1:].numpy(), ref, atol=ATOL)
    auc = np.trapezoid(ref, dx=1, axis=1)
    np.testing.assert_allclose(torch.trapezoid(curve.scores[:, 1:], dim=1).numpy(), auc, rtol=1e-5)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation(gray, order) -> None:
    model, x, maps, classes = gray
    metric = quantus.RegionPerturbation(
        patch_size=4, regions_evaluation=10, order=order, normalise=False, disable_warnings=True
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    ours = regions.region_perturbation(model, x, maps, classes, patch_size=4, order=order, regions=10)
    np.testing.assert_allclose((ours.scores[:, :1] - ours.scores[:, 1:]).numpy(), ref, atol=ATOL)


def test_selectivity(gray) -> None:
    model, x, maps, classes = gray
    metric = quantus.Selectivity(patch_size=4, normalise=False, disable_warnings=True)
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    ours = regions.selectivity(model, x, maps, classes, patch_size=4)
    np.testing.assert_allclose(ours.scores[:, 1:].numpy(), ref, atol=ATOL)


def test_sensitivity_n_quantus_quantity_from_the_deletion_curve() -> None:
    """Quantus' SensitivityN correlates, at each step of the pixel-flipping curve, the score drops with the map's
    sum on that step's pixels over the images of the batch; camkit's pixel-flipping curve gives the same values.
    (camkit's :func:`sensitivity_n` is Ancona et al.'s per-image definition, tested in tests/metrics.)"""
    model, x, maps, classes = _setup(1, b=5)
    metric = quantus.SensitivityN(
        features_in_step=16,
        n_max_percentage=0.8,
        normalise=False,
        return_aggregate=False,
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    curve = regions.pixel_flipping(model, x, maps, classes, features_in_step=16)
    drops = curve.scores[:, :1] - curve.scores[:, 1:]
    key = torch.argsort(torch.argsort(maps.flatten(1), dim=1, descending=True), dim=1) // 16
    sums = step_sums(maps, key, 16)
    steps = int(0.8 * 256 // 16)
    ours = pearson(drops[:, :steps].T, sums[:, :steps].T)
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)


def test_infidelity_three_channels() -> None:
    model, x, maps, classes = _setup(3)
    metric = quantus.Infidelity(perturb_patch_sizes=[4, 8], n_perturb_samples=1, disable_warnings=True)
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    ours = correlation.infidelity(model, x, maps, classes, patch_sizes=(4, 8))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5)  # values about 1e5: relative


def test_irof(monkeypatch) -> None:
    # Quantus 0.6.0 integrates with np.trapz, which numpy 2 removed (np.trapezoid is the same rule)
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    model, x, maps, classes = _setup(1, size=24)  # Quantus 0.6.0's IROF masks one channel only
    metric = quantus.IROF(
        perturb_baseline=0.0, normalise=False, disable_warnings=True, return_aggregate=False
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True, batch_size=1))
    ours = regions.irof(model, x, maps, classes, baseline=0.0)
    n = ours.segments
    assert int(n.min()) > 5
    theirs = [float(n[i]) - float(torch.trapezoid(ours.curve[i, 1 : int(n[i]) + 1])) for i in range(3)]
    np.testing.assert_allclose(theirs, ref, rtol=1e-5)  # values about n = 20: relative, not 1e-5 absolute
    # camkit's IROF is the same curve over the fraction of segments, the unperturbed point included
    expected = [
        1 - float(torch.trapezoid(ours.curve[i, : int(n[i]) + 1], dx=1 / int(n[i]))) for i in range(3)
    ]
    np.testing.assert_allclose(ours.aoc.numpy(), expected, atol=1e-6)


def _feed(monkeypatch: pytest.MonkeyPatch, name: str, values: list[np.ndarray]) -> list[np.ndarray]:
    """Replace ``numpy.random.<name>`` by one that returns ``values`` in order (camkit's draws); the list of what
    is left is returned, so that a test can check that Quantus took every value."""
    left = list(values)

    def draw(*args: Any, **kwargs: Any) -> np.ndarray:
        return left.pop(0)

    monkeypatch.setattr(np.random, name, draw)
    return left


def test_infidelity_gaussian_noise(monkeypatch) -> None:
    """The noisy perturbation (Quantus' ``batch_gaussian_noise`` on the squares, 2 draws): camkit's noise given to
    Quantus step by step, the same values at every step of one draw and patch size (each step keeps its square)."""
    model, x, maps, classes = _setup(3)
    gen = torch.Generator(device="cpu").manual_seed(7)
    values = []
    for _ in range(2):  # what camkit draws: per sample, per patch size, torch.randn(B, C, H, W)
        for p in (4, 8):
            noise = (torch.randn(x.shape, generator=gen) * 0.5 + 0.1).flatten(1).double().numpy()
            values += [noise] * (16 // p) ** 2
    left = _feed(monkeypatch, "normal", values)
    metric = quantus.Infidelity(
        perturb_patch_sizes=[4, 8],
        n_perturb_samples=2,
        perturb_func=quantus.functions.perturb_func.batch_gaussian_noise,
        perturb_func_kwargs={"perturb_mean": 0.1, "perturb_std": 0.5},
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    assert not left
    ours = correlation.infidelity(
        model,
        x,
        maps,
        classes,
        (4, 8),
        perturbation="gaussian",
        samples=2,
        noise_mean=0.1,
        noise_std=0.5,
        seed=7,
    )
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5)


def test_infidelity_uniform_baseline_and_a_loss_function(monkeypatch) -> None:
    """``baseline="uniform"``: one U(0, 1) value per image and square (Quantus' batched ``"uniform"``), 3 draws;
    and a loss function in place of the mean squared error, called alike on both sides."""
    model, x, maps, classes = _setup(3)
    gen = torch.Generator(device="cpu").manual_seed(2)
    values = []
    for _ in range(3):  # per sample: torch.rand(B, squares), the value of square t in column t
        values += list(torch.rand(3, 16, generator=gen).double().numpy().T)
    left = _feed(monkeypatch, "uniform", values)

    def mae(a: Any, b: Any, **kwargs: Any) -> Any:
        return (a - b).abs().mean(1) if isinstance(a, Tensor) else np.abs(a - b).mean(axis=1)

    metric = quantus.Infidelity(
        perturb_patch_sizes=[4],
        n_perturb_samples=3,
        perturb_baseline="uniform",
        loss_func=mae,
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    assert not left
    ours = correlation.infidelity(model, x, maps, classes, (4,), "uniform", samples=3, loss=mae, seed=2)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5)
    mse = correlation.infidelity(model, x, maps, classes, (4,), "uniform", samples=3, seed=2)
    assert not np.allclose(mse.numpy(), ours.numpy())  # the loss is used


@pytest.mark.parametrize("baseline", ["black", "uniform"])
def test_region_perturbation_random_order(gray, monkeypatch, baseline) -> None:
    """``order="random"``: camkit's permutations of the squares given to Quantus' ``np.random.permutation`` (one
    per image), and with ``baseline="uniform"`` its values per removed square to ``np.random.uniform``."""
    model, x, maps, classes = gray
    gen = torch.Generator(device="cpu").manual_seed(4)
    perms = torch.rand(3, 16, generator=gen).argsort(dim=1)  # what camkit draws with seed=4, then the values
    fills = torch.rand(3, 16, generator=gen).double().numpy().T
    left = _feed(monkeypatch, "permutation", list(perms.numpy()))
    left_u = _feed(monkeypatch, "uniform", list(fills[:10]))  # Quantus draws them for "black" too, unused
    metric = quantus.RegionPerturbation(
        patch_size=4,
        regions_evaluation=10,
        order="random",
        perturb_baseline=baseline,
        normalise=False,
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    assert not left and not left_u
    ours = regions.region_perturbation(
        model, x, maps, classes, patch_size=4, order="random", regions=10, baseline=baseline, seed=4
    )
    np.testing.assert_allclose((ours.scores[:, :1] - ours.scores[:, 1:]).numpy(), ref, atol=ATOL)
    morf = regions.region_perturbation(model, x, maps, classes, patch_size=4, regions=10, baseline=baseline)
    assert not torch.allclose(ours.scores, morf.scores)


def test_irof_felzenszwalb(monkeypatch) -> None:
    """``segmentation="felzenszwalb"``: the same superpixels as Quantus' ``segmentation_method``, so the same
    values (Quantus' value from camkit's curve, as in :func:`test_irof`)."""
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    model, x, maps, classes = _setup(1, size=24)
    metric = quantus.IROF(
        segmentation_method="felzenszwalb",
        perturb_baseline=0.0,
        normalise=False,
        disable_warnings=True,
        return_aggregate=False,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True, batch_size=1))
    ours = regions.irof(model, x, maps, classes, baseline=0.0, segmentation="felzenszwalb")
    n = ours.segments
    assert int(n.min()) > 3 and not torch.equal(
        n, regions.irof(model, x, maps, classes, baseline=0.0).segments
    )
    theirs = [float(n[i]) - float(torch.trapezoid(ours.curve[i, 1 : int(n[i]) + 1])) for i in range(3)]
    np.testing.assert_allclose(theirs, ref, rtol=1e-5)


def test_similarity_functions(gray, monkeypatch) -> None:
    """``similarity``: Spearman's correlation for Faithfulness Correlation and Estimate, Pearson's for Monotonicity
    Correlation, as Quantus' ``similarity_func`` (the draws fed as in the tests above)."""
    model, x, maps, classes = gray
    spearman, pearson_ = (
        quantus.similarity_func.correlation_spearman,
        quantus.similarity_func.correlation_pearson,
    )
    metric = quantus.FaithfulnessEstimate(
        features_in_step=8, similarity_func=spearman, normalise=False, disable_warnings=True
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    ours = correlation.faithfulness_estimate(model, x, maps, classes, 8, similarity="spearman")
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)
    assert not np.allclose(ref, correlation.faithfulness_estimate(model, x, maps, classes, 8).numpy())

    idx = random_subsets(3, 10, 256, 20, seed=3)
    left = _feed(monkeypatch, "choice", [idx[img, run].numpy() for run in range(10) for img in range(3)])
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=10,
        subset_size=20,
        similarity_func=spearman,
        normalise=False,
        return_aggregate=False,
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    assert not left
    ours = correlation.faithfulness_correlation(
        model, x, maps, classes, 10, 20, seed=3, similarity="spearman"
    )
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)

    draws = torch.rand(3, 16, 2, generator=torch.Generator(device="cpu").manual_seed(5))
    calls = itertools.product(range(16), range(2))

    def fill(arr: np.ndarray, indices: np.ndarray, **kwargs: Any) -> np.ndarray:
        t, j = next(calls)
        out = arr.copy()
        out[np.arange(arr.shape[0])[:, None], indices] = draws[:, t, j].numpy()[:, None]
        return out

    metric = quantus.MonotonicityCorrelation(
        nr_samples=2,
        features_in_step=16,
        similarity_func=pearson_,
        normalise=False,
        abs=False,
        perturb_func=fill,
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    ours = correlation.monotonicity_nguyen(model, x, maps, classes, 2, 16, seed=5, similarity="pearson")
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)


def test_uniform_baseline_of_the_pixel_order_metrics(gray, monkeypatch) -> None:
    """``baseline="uniform"``: one U(0, 1) value per image and group (Faithfulness Estimate, Pixel Flipping) or run
    (Faithfulness Correlation), camkit's values fed to Quantus' ``np.random.uniform`` call by call."""
    model, x, maps, classes = gray
    steps = torch.rand(3, 32, generator=torch.Generator(device="cpu").manual_seed(6)).double().numpy().T
    left = _feed(monkeypatch, "uniform", list(steps))  # per group of 8 pixels, in decreasing map order
    metric = quantus.FaithfulnessEstimate(
        features_in_step=8, perturb_baseline="uniform", normalise=False, disable_warnings=True
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    assert not left
    ours = correlation.faithfulness_estimate(model, x, maps, classes, 8, "uniform", seed=6)
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)

    left = _feed(monkeypatch, "uniform", list(steps))
    metric = quantus.PixelFlipping(
        features_in_step=8, perturb_baseline="uniform", normalise=False, disable_warnings=True
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=True))
    assert not left
    curve = regions.pixel_flipping(model, x, maps, classes, 8, "uniform", seed=6)
    np.testing.assert_allclose(curve.scores[:, 1:].numpy(), ref, atol=ATOL)

    gen = torch.Generator(device="cpu").manual_seed(3)
    idx = random_subsets(3, 10, 256, 20, gen)  # then the values, from the same generator
    values = torch.rand(3, 10, generator=gen).double().numpy()
    left = _feed(monkeypatch, "choice", [idx[img, run].numpy() for run in range(10) for img in range(3)])
    left_u = _feed(monkeypatch, "uniform", list(values.T))
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=10,
        subset_size=20,
        perturb_baseline="uniform",
        normalise=False,
        return_aggregate=False,
        disable_warnings=True,
    )
    ref = np.asarray(_quantus(metric, model, x, maps, classes, softmax=False))
    assert not left and not left_u
    ours = correlation.faithfulness_correlation(model, x, maps, classes, 10, 20, "uniform", seed=3)
    np.testing.assert_allclose(ours.numpy(), ref, atol=ATOL)
    black = correlation.faithfulness_correlation(model, x, maps, classes, 10, 20, seed=3)
    assert not np.allclose(ours.numpy(), black.numpy())
