"""Metrics on cases with known answers (hand-computed curves, perfect/inverted/uniform maps, exact boxes), ROAD's
imputation against its reference (scipy) formulation, and the ground-truth test bed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camkit
from camkit import metrics
from camkit.metrics import imputation
from camkit.metrics._common import Forward, pixel_ranks
from testbed import assert_unchanged, normalize, snapshot

# ---------------------------------------------------------------- a toy model with a known answer


class SumProb(nn.Module):
    """p = sum of the pixels of channel 0; logits = (log p, log(1 - p)), so softmax = (p, 1 - p) exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0].flatten(1).sum(1).clamp(1e-6, 1 - 1e-6)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


VALUES = torch.tensor([[0.1, 0.4], [0.2, 0.3]])  # raster order 0.1, 0.4, 0.2, 0.3; sum 1


@pytest.fixture
def toy() -> tuple[nn.Module, torch.Tensor]:
    return SumProb().eval(), VALUES[None, None].clone()


def trapz(ys: list[float]) -> float:
    n = len(ys) - 1
    return sum((ys[i] + ys[i + 1]) / 2 for i in range(n)) / n


@pytest.mark.parametrize(
    ("name", "map_", "curve"),
    [
        ("perfect", VALUES, [1.0, 0.6, 0.3, 0.1, 0.0]),  # removes 0.4, 0.3, 0.2, 0.1
        ("inverted", 1 - VALUES, [1.0, 0.9, 0.7, 0.4, 0.0]),  # removes 0.1, 0.2, 0.3, 0.4
        ("uniform", torch.ones(2, 2), [1.0, 0.9, 0.5, 0.3, 0.0]),  # ties: raster order 0.1, 0.4, 0.2, 0.3
    ],
)
def test_deletion_hand_computed(toy, name, map_, curve) -> None:
    model, x = toy
    res = metrics.deletion(model, x, map_[None], classes=0, steps=4)
    assert torch.allclose(res.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(res.scores[0], torch.tensor(curve), atol=1e-5), name
    assert res.auc[0].item() == pytest.approx(trapz(curve), abs=1e-5)


def test_deletion_auc_values_and_order(toy) -> None:
    model, x = toy
    auc = {
        n: metrics.deletion(model, x, m[None], classes=0, steps=4).auc.item()
        for n, m in [("perfect", VALUES), ("inverted", 1 - VALUES)]
    }
    assert auc["perfect"] == pytest.approx(0.375, abs=1e-5)
    assert auc["inverted"] == pytest.approx(0.625, abs=1e-5)


def test_insertion_hand_computed(toy) -> None:
    model, x = toy
    res = metrics.insertion(model, x, VALUES[None], classes=0, steps=4, baseline="zeros")
    assert torch.allclose(res.scores[0], torch.tensor([0.0, 0.4, 0.7, 0.9, 1.0]), atol=1e-5)
    assert res.auc.item() == pytest.approx(0.625, abs=1e-5)
    inv = metrics.insertion(model, x, 1 - VALUES[None], classes=0, steps=4, baseline="zeros")
    assert inv.auc.item() == pytest.approx(0.375, abs=1e-5)


def test_steps_coarser_than_pixels(toy) -> None:
    model, x = toy
    res = metrics.deletion(model, x, VALUES[None], classes=0, steps=2)  # removes 2 pixels per step
    assert torch.allclose(res.scores[0], torch.tensor([1.0, 0.3, 0.0]), atol=1e-5)
    assert res.auc.item() == pytest.approx(0.5 * (0.5 + 0.3), abs=1e-5)


def test_deletion_batched_and_chunked_agree(toy) -> None:
    model, x = toy
    xs = torch.cat([x, x.flip(-1), x.flip(-2)])
    ms = torch.stack([VALUES, 1 - VALUES, torch.rand(2, 2)])
    whole = metrics.deletion(model, xs, ms, classes=0, steps=4, batch_size=64)
    one = metrics.deletion(model, xs, ms, classes=0, steps=4, batch_size=1)
    assert torch.allclose(whole.scores, one.scores)
    for i in range(3):
        single = metrics.deletion(model, xs[i : i + 1], ms[i : i + 1], classes=0, steps=4)
        assert torch.allclose(single.scores[0], whole.scores[i])


def test_one_model_call_per_chunk(toy) -> None:
    model, x = toy
    fwd = Forward(model, batch_size=4)
    metrics.deletion(model, x.expand(2, -1, -1, -1), VALUES.expand(2, 2, 2), classes=0, steps=4, forward=fwd)
    # 2 end points x 2 images in one call, then 3 inner steps x 2 images = 6 images in chunks of 4
    assert fwd.images == 4 + 6 and fwd.calls == 1 + 2


def test_pixel_ranks_ties_in_raster_order() -> None:
    r = pixel_ranks(torch.tensor([[[0.5, 0.9], [0.5, 0.1]]]))
    assert r.tolist() == [[1, 0, 2, 3]]


def _rise_causal_auc(model: nn.Module, img: torch.Tensor, sal: np.ndarray, step: int, start, finish) -> float:
    """RISE's CausalMetric.single_run, one image, written from the paper's code's steps: sort the pixels by
    saliency (descending), score, then copy ``step`` pixels from ``finish`` into ``start``, until all moved; the
    AUC is (sum - first/2 - last/2) / (n - 1)."""
    hw = img.shape[-1] * img.shape[-2]
    n_steps = (hw + step - 1) // step
    start, finish = start.clone(), finish.clone()
    c = int(model(img).argmax())
    order = np.flip(np.argsort(sal.reshape(-1), kind="stable"), axis=0)
    scores = []
    with torch.no_grad():
        for i in range(n_steps + 1):
            scores.append(float(torch.softmax(model(start), dim=1)[0, c]))
            if i < n_steps:
                coords = torch.as_tensor(order[step * i : step * (i + 1)].copy())
                start.view(1, 3, hw)[0, :, coords] = finish.view(1, 3, hw)[0, :, coords]
    arr = np.array(scores)
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (len(arr) - 1))


def test_deletion_and_insertion_match_rise_loop() -> None:
    from camkit.metrics._common import gaussian_blur

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)
    ).eval()
    with torch.no_grad():
        net[4].weight.mul_(20)  # confident predictions: the curves move far from 1/5
    x = torch.randn(3, 3, 16, 16)
    maps = torch.rand(3, 16, 16)  # distinct values: no ties
    blurred = gaussian_blur(x)
    dele = metrics.deletion(net, x, maps, steps=16).auc
    ins = metrics.insertion(net, x, maps, steps=16, baseline=blurred).auc
    for i in range(3):
        xi, sal = x[i : i + 1], maps[i].numpy()
        ref_d = _rise_causal_auc(net, xi, sal, 16, xi, torch.zeros_like(xi))
        ref_i = _rise_causal_auc(net, xi, sal, 16, blurred[i : i + 1], xi)
        assert float(dele[i]) == pytest.approx(ref_d, abs=1e-5)
        assert float(ins[i]) == pytest.approx(ref_i, abs=1e-5)


def test_blur_baseline_is_rise_kernel() -> None:
    from camkit.metrics._common import gaussian_blur

    x = torch.zeros(1, 1, 31, 31)
    x[0, 0, 15, 15] = 1.0
    y = gaussian_blur(x)
    t = torch.arange(11.0) - 5
    k = torch.exp(-(t**2) / 50)
    k2 = torch.outer(k, k) / torch.outer(k, k).sum()
    assert torch.allclose(y[0, 0, 10:21, 10:21], k2, atol=1e-6)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)


def _separable_blur(x: torch.Tensor, padding: str = "reflect", kernel_size: int = 11, sigma: float = 5.0):
    """The blur camkit computed by hand before it called torchvision: a sampled 1-D Gaussian applied along rows
    then columns; reflect padding, edge (replicate) padding when a side is too short to reflect."""
    r = kernel_size // 2
    t = torch.arange(kernel_size, dtype=torch.float32) - r
    k1 = torch.exp(-(t**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    c = x.shape[1]
    if padding == "reflect" and min(x.shape[-2:]) <= r:
        padding = "replicate"
    y = nn.functional.pad(x.float(), (r, r, r, r), mode=padding)
    y = nn.functional.conv2d(y, k1.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return nn.functional.conv2d(y, k1.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


@pytest.mark.parametrize(
    "shape", [(2, 3, 224, 224), (3, 3, 16, 16), (1, 3, 6, 40), (1, 3, 5, 5), (2, 3, 3, 9)]
)
def test_blur_matches_the_hand_written_separable_blur(shape: tuple[int, int, int, int]) -> None:
    """torchvision's blur pads by reflection like the hand-written one did (not with zeros, as RISE's code): the
    borders agree, and so do images with a side of 5 pixels or less (edge padding)."""
    from camkit.metrics._common import gaussian_blur

    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    y = gaussian_blur(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y, _separable_blur(x), rtol=0, atol=1e-6)
    # the comparison can tell the paddings apart
    assert not torch.allclose(y, _separable_blur(x, padding="constant"), rtol=0, atol=1e-3)


def test_insertion_auc_unchanged_by_the_library_blur() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)
    ).eval()
    with torch.no_grad():
        net[4].weight.mul_(20)
    x, maps = torch.randn(4, 3, 32, 32), torch.rand(4, 32, 32)
    new = metrics.insertion(net, x, maps, steps=32).auc
    old = metrics.insertion(net, x, maps, steps=32, baseline=_separable_blur(x)).auc
    assert torch.allclose(new, old, rtol=0, atol=1e-6)
    assert not torch.allclose(new, metrics.insertion(net, x, maps, steps=32, baseline="zeros").auc, atol=1e-3)


def test_confidence_change_known(toy) -> None:
    model, x = toy
    half = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # keeps 0.1 + 0.4
    res = metrics.confidence_change(model, x, half, classes=0)
    assert res.original.item() == pytest.approx(1.0, abs=1e-5)
    assert res.explained.item() == pytest.approx(0.5, abs=1e-5)
    assert res.drop.item() == pytest.approx(0.5, abs=1e-5)
    assert res.increase.item() == 0.0
    full = metrics.confidence_change(model, x, torch.ones(1, 2, 2), classes=0)
    assert full.drop.item() == pytest.approx(0.0, abs=1e-6) and full.increase.item() == 0.0
    # class 1 has probability 1 - p: masking raises it from ~0 to 0.5
    up = metrics.confidence_change(model, x, half, classes=1)
    assert up.drop.item() == 0.0 and up.increase.item() == 1.0
    assert metrics.average_drop(model, x, half, classes=0).item() == pytest.approx(0.5, abs=1e-5)


# ---------------------------------------------------------------- ROAD's imputation


def road_reference(img: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """ROAD's NoisyLinearImputer (road_evaluation/imputations.py) without noise: scipy sparse system."""
    sparse = pytest.importorskip("scipy.sparse")
    linalg = pytest.importorskip("scipy.sparse.linalg")
    weights = [
        ((1, 1), 1 / 12),
        ((0, 1), 1 / 6),
        ((-1, 1), 1 / 12),
        ((1, -1), 1 / 12),
        ((0, -1), 1 / 6),
        ((-1, -1), 1 / 12),
        ((1, 0), 1 / 6),
        ((-1, 0), 1 / 6),
    ]
    c, h, w = img.shape
    flat = img.reshape(c, -1)
    kflat = keep.reshape(-1)
    idx = np.argwhere(kflat == 0).flatten()
    vidx = np.zeros(len(kflat), dtype=int)
    vidx[idx] = np.arange(len(idx))
    n = len(idx)
    a = sparse.lil_matrix((n, n))
    b = np.zeros((n, c))
    total = np.ones(n)
    for (o0, o1), wt in weights:
        r, q = idx // w + o0, idx % w + o1
        valid = (r >= 0) & (q >= 0) & (r < h) & (q < w)
        coords = (r * w + q)[valid]
        ids = np.argwhere(valid).flatten()
        known = kflat[coords] > 0.5
        b[ids[known]] -= wt * flat[:, coords[known]].T
        a[ids[~known], vidx[coords[~known]]] = wt
        total[~valid] -= wt
    a[np.arange(n), np.arange(n)] = -total
    sol = linalg.spsolve(sparse.csc_matrix(a), b)
    out = flat.copy()
    out[:, idx] = sol.reshape(n, c).T
    return out.reshape(c, h, w)


def test_imputation_matches_road_reference() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 20, 24, generator=g)
    remove = torch.rand(20, 24, generator=g) < 0.6
    remove[5:15, 0:10] = True  # a large hole touching the border
    ours = metrics.noisy_linear_impute(img[None], remove[None], noise=0.0, tol=1e-7)[0]
    ref = road_reference(img.double().numpy(), (~remove).numpy().astype(float))
    assert np.abs(ours.numpy() - ref).max() < 1e-4
    assert torch.equal(ours[:, ~remove], img[:, ~remove])  # kept pixels untouched


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_imputation_at_the_default_tolerance_is_close_to_road_reference(fraction: float) -> None:
    """A 96 x 112 image with most or few pixels removed in one smooth region plus scattered ones: the multigrid
    levels all take part, and the default tolerance lands within 5e-4 of the exact solve in a few iterations."""
    g = torch.Generator().manual_seed(1)
    img = F.avg_pool2d(torch.rand(1, 3, 96, 112, generator=g), 5, 1, 2)[0]
    score = F.interpolate(torch.rand(1, 1, 6, 7, generator=g), size=(96, 112), mode="bilinear")[0, 0]
    score = score + 0.05 * torch.rand(96, 112, generator=g)
    remove = score < torch.quantile(score.flatten(), fraction)
    calls = []
    real = imputation.neighbour_sum

    def counting(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[-1])
        return real(v)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imputation, "neighbour_sum", counting)
        ours = metrics.noisy_linear_impute(img[None], remove[None], noise=0.0)[0]
    ref = road_reference(img.double().numpy(), (~remove).numpy().astype(float))
    assert np.abs(ours.numpy() - ref).max() < 5e-4
    assert (
        calls.count(112) < 150
    )  # fine-grid neighbour sums: 6 per iteration (CG + V-cycle), about 10 iterations


def test_imputation_recovers_a_linear_ramp_and_adds_noise() -> None:
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = (0.03 * xx - 0.02 * yy)[None, None].expand(1, 2, 32, 32)
    remove = torch.zeros(1, 32, 32, dtype=torch.bool)
    remove[0, 6:26, 4:20] = True  # interior hole: the ramp solves the neighbour-mean equations exactly
    filled = metrics.noisy_linear_impute(ramp, remove, noise=0.0, tol=1e-7)
    assert torch.allclose(filled, ramp, atol=1e-4)
    assert torch.allclose(
        metrics.noisy_linear_impute(ramp, remove, noise=0.0), ramp, atol=1e-2
    )  # default tol
    noisy = metrics.noisy_linear_impute(ramp, remove, noise=0.05, generator=torch.Generator().manual_seed(1))
    diff = (noisy - ramp)[:, :, remove[0]]
    assert diff.std().item() == pytest.approx(0.05, rel=0.1)


# ---------------------------------------------------------------- localization


def test_box_iou_known() -> None:
    assert metrics.box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10]]).item() == 1.0
    assert metrics.box_iou([[0, 0, 10, 10]], [[10, 0, 20, 10]]).item() == 0.0  # touching, half-open
    assert metrics.box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]]).item() == pytest.approx(50 / 150)
    iou = metrics.box_iou([[0, 0, 4, 4], [0, 0, 2, 2]], [[0, 0, 4, 4], [2, 2, 4, 4], [8, 8, 9, 9]])
    assert torch.allclose(iou, torch.tensor([[1.0, 0.25, 0.0], [0.25, 0.0, 0.0]], dtype=iou.dtype))


def peak_map(row: int, col: int, h: int = 64, w: int = 64) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[0, row, col] = 1.0
    return m


def test_pointing_game_tolerance_and_strict() -> None:
    m = peak_map(20, 30)  # point (30.5, 20.5)
    inside = [[[25, 15, 40, 25]]]
    near = [[[40, 10, 50, 30]]]  # 9.5 px to the right of the point
    far = [[[51, 10, 60, 30]]]  # 20.5 px
    assert metrics.pointing_game(m, inside, tolerance=0).item() == 1.0
    assert metrics.pointing_game(m, near, tolerance=0).item() == 0.0
    assert metrics.pointing_game(m, near).item() == 1.0
    assert metrics.pointing_game(m, far).item() == 0.0
    # scaled to an original image twice as wide: the point moves to x = 61
    assert metrics.pointing_game(m, [[[58, 15, 64, 25]]], tolerance=0, image_sizes=[(128, 64)]).item() == 1.0
    assert metrics.pointing_game(m, [[[25, 15, 40, 25]]], tolerance=0, image_sizes=[(128, 64)]).item() == 0.0
    assert torch.isnan(metrics.pointing_game(m, [[]])).all()


def box_map(box: list[int], h: int = 64, w: int = 64) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[box[1] : box[3], box[0] : box[2]] = 1.0
    return m


def test_box_accuracy_perfect_map_and_scaling() -> None:
    gt = [10, 20, 30, 50]
    res = metrics.box_accuracy(box_map(gt)[None], [[gt]])
    assert res.iou.item() == 1.0 and res.correct.item() == 1.0
    scaled = metrics.box_accuracy(box_map(gt)[None], [[[20, 10, 60, 25]]], image_sizes=[(128, 32)])
    assert scaled.iou.item() == 1.0
    empty = metrics.box_accuracy(torch.zeros(1, 64, 64), [[gt]])
    assert empty.iou.item() == 0.0 and empty.boxes == [[]]


def test_box_accuracy_excludes_images_without_ground_truth() -> None:
    gt = [10, 20, 30, 50]
    maps = torch.stack([box_map(gt), box_map(gt)])
    res = metrics.box_accuracy(maps, [[gt], []])
    assert res.correct[0].item() == 1.0
    assert torch.isnan(res.iou[1]) and torch.isnan(res.correct[1])  # not a miss (old: 0.0)
    assert torch.nanmean(res.correct).item() == 1.0


def test_non_finite_boxes_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        metrics.box_iou([[0, 0, float("nan"), 5]], [[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="finite"):
        metrics.pointing_game(torch.rand(1, 8, 8), [[[0, 0, float("inf"), 5]]])


def test_max_box_acc_v2_known_answers() -> None:
    gts = [[8, 8, 40, 48], [20, 4, 60, 30], [0, 0, 64, 40]]
    perfect = torch.stack([box_map(b) for b in gts])
    assert metrics.max_box_acc_v2(metrics.iou_curves(perfect, [[b] for b in gts])).value == 1.0
    # uniform maps: the box is the whole image, IoU = box area / image area (0.3125, 0.254, 0.625)
    uniform = torch.ones(3, 64, 64)
    res = metrics.max_box_acc_v2(metrics.iou_curves(uniform, [[b] for b in gts]))
    assert res.per_iou == {0.3: pytest.approx(2 / 3), 0.5: pytest.approx(1 / 3), 0.7: 0.0}
    assert res.value == pytest.approx(1 / 3)
    # inverted map of an interior box: the ring around it is one component spanning the whole image
    ring = 1 - box_map(gts[0])
    curve = metrics.iou_curves(ring[None], [[gts[0]]], thresholds=[0.5])
    assert curve.item() == pytest.approx(32 * 40 / 64**2)


def test_multi_contour_finds_the_smaller_object() -> None:
    m = box_map([2, 2, 30, 30]) + box_map([40, 40, 50, 50])
    gt = [[[40, 40, 50, 50]]]
    multi = metrics.iou_curves(m[None], gt, thresholds=[0.5])
    single = metrics.iou_curves(m[None], gt, thresholds=[0.5], multi_contour=False)
    assert multi.item() == 1.0 and single.item() == 0.0


# ---------------------------------------------------------------- sanity check


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(3, 50, generator=g))  # about half zeros: many ties
    b = torch.relu(torch.randn(3, 50, generator=g) + a)
    ours = metrics.spearman(a, b)
    for i in range(3):
        ref = stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
    assert metrics.spearman(a, a).tolist() == pytest.approx([1.0] * 3)
    assert metrics.spearman(a, -a).tolist() == pytest.approx([-1.0] * 3)
    assert metrics.spearman(a, torch.zeros_like(a)).tolist() == [0.0] * 3


def test_cascading_randomization_leaves_the_model_alone(tiny, x_small) -> None:
    before = snapshot(tiny)
    rng = torch.random.get_rng_state()
    res = metrics.cascading_randomization(tiny, x_small, method="gradcam", layers="features.2")
    assert_unchanged(before, tiny)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert res.steps == ["original", "fc", "features.2", "features.0"]
    assert res.correlation.shape == (4, 4)
    assert torch.allclose(res.correlation[0], torch.ones(4))
    again = metrics.cascading_randomization(tiny, x_small, method="gradcam", layers="features.2")
    assert torch.equal(res.correlation, again.correlation)  # seeded


def test_randomizing_only_an_unused_module_keeps_the_map(tiny, x_small) -> None:
    model = copy.deepcopy(tiny)
    model.unused = nn.Linear(2, 2)
    res = metrics.cascading_randomization(model, x_small, layers="features.2", modules=["unused"])
    assert torch.allclose(res.correlation[1], torch.ones(4))


# ---------------------------------------------------------------- the ground-truth test bed


def centre_prior(n: int, size: int = 64, sigma: float = 16.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    m = torch.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * sigma**2))
    return m.expand(n, size, size).clone()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids the synchronisation cost of two (large when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def testbed_maps(trained_cnn, testbed_data):
    x = normalize(testbed_data.images)
    res = camkit.compare(trained_cnn, x, methods=["gradcam", "gradcam++", "layercam"], layers="features.3")
    n = x.shape[0]
    maps = {k: v.maps for k, v in res.items()}
    maps["centre"] = centre_prior(n)
    maps["random"] = torch.rand(n, 64, 64, generator=torch.Generator().manual_seed(0))
    return x, maps


def test_testbed_model_is_accurate(trained_cnn, testbed_data) -> None:
    with torch.no_grad():
        pred = trained_cnn(normalize(testbed_data.images)).argmax(1)
    assert (pred == testbed_data.labels).float().mean().item() >= 0.95


def test_gradcam_points_at_the_object(testbed_maps, testbed_data) -> None:
    _, maps = testbed_maps
    gt = [b[None] for b in testbed_data.boxes]
    hits = {k: metrics.pointing_game(m, gt, tolerance=0).mean().item() for k, m in maps.items()}
    # objects are 16-26 px in 64 px images: the strict game; a 15 px tolerance would let the centre win
    for method in ("gradcam", "gradcam++", "layercam"):
        assert hits[method] >= 0.9, hits
        assert hits[method] >= hits["centre"] + 0.4, hits
        assert hits[method] >= hits["random"] + 0.5, hits
    thresholds = torch.arange(0, 1, 0.05)
    acc = {
        k: metrics.max_box_acc_v2(metrics.iou_curves(maps[k], gt, thresholds), thresholds).value
        for k in ("gradcam", "centre", "random")
    }
    assert acc["gradcam"] >= 0.6 and acc["gradcam"] >= acc["centre"] + 0.3 and acc["gradcam"] > acc["random"]


def test_faithfulness_orders_methods_on_the_testbed(trained_cnn, testbed_maps) -> None:
    x, maps = testbed_maps
    x = x[:16]
    maps = {k: maps[k][:16] for k in ("gradcam", "centre", "random")}
    maps["inverted"] = 1 - maps["gradcam"]
    ins = {k: metrics.insertion(trained_cnn, x, m, steps=8).auc.mean().item() for k, m in maps.items()}
    dele = {k: metrics.deletion(trained_cnn, x, m, steps=8).auc.mean().item() for k, m in maps.items()}
    assert ins["gradcam"] > ins["random"] + 0.1 and ins["gradcam"] > ins["centre"], ins
    assert ins["gradcam"] > ins["inverted"] + 0.2, ins
    assert dele["gradcam"] < dele["centre"] and dele["gradcam"] < dele["inverted"] - 0.1, dele
    morf = metrics.road(trained_cnn, x[:8], maps["gradcam"][:8], percentages=(0.2, 0.5))
    lerf = metrics.road(trained_cnn, x[:8], maps["gradcam"][:8], percentages=(0.2, 0.5), order="lerf")
    assert morf.mean_score.mean() < lerf.mean_score.mean() - 0.3
    assert lerf.correct.mean() > morf.correct.mean()


def test_sanity_check_separates_trained_from_randomized(trained_cnn, testbed_data) -> None:
    x = normalize(testbed_data.images[:16])
    before = snapshot(trained_cnn)
    res = metrics.cascading_randomization(trained_cnn, x, method="gradcam", layers="features.3")
    assert_unchanged(before, trained_cnn)
    mean = res.correlation.mean(dim=1)
    assert mean[0] == pytest.approx(1.0)
    assert mean[-1] < 0.3, dict(zip(res.steps, mean.tolist(), strict=True))
    # randomising the classifier alone already changes which features Grad-CAM weighs
    assert mean[1] < 0.7
