"""Random logit and MPRT (camkit.metrics.randomisation), SSIM against scikit-image, and the new metrics' place in
the metric registry (evaluate, report)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from torch import Tensor, nn

import camkit
from camkit.adapters import LoadedModel, Preprocess
from camkit.errors import CamkitError
from camkit.evaluate import evaluate
from camkit.io.annotations import Annotation
from camkit.metrics import METRICS, Forward, MetricScorer, randomizable_modules
from camkit.metrics.mask import box_mask, mask_auc
from camkit.metrics.randomisation import mprt, off_classes, random_logit, ssim
from camkit.report.records import build_records
from testbed import TinyGapNet, assert_unchanged, snapshot


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyGapNet().eval()


def _gradcam(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    return camkit.explain(model, x, "gradcam", layers="features.2", targets=classes.tolist()).maps


def test_ssim_is_scikit_image_on_the_2d_maps() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 12, 10, generator=g), torch.rand(3, 12, 10, generator=g)
    b[1] = 0.7 * a[1] + 0.2  # a similar pair
    got = ssim(a, b)
    for i in range(3):
        both = torch.cat([a[i], b[i]])
        rng = float(both.max() - both.min())
        want = structural_similarity(a[i].double().numpy(), b[i].double().numpy(), data_range=rng)
        assert float(got[i]) == pytest.approx(want, abs=1e-6)
    assert float(got[1]) > 0.5 > float(got[0])
    torch.testing.assert_close(ssim(a, a), torch.ones(3))
    torch.testing.assert_close(ssim(torch.ones(1, 8, 8), torch.ones(1, 8, 8)), torch.ones(1))
    with pytest.raises(CamkitError, match="at least 7 x 7"):
        ssim(torch.rand(1, 6, 9), torch.rand(1, 6, 9))


def test_off_classes_are_uniform_over_the_other_classes() -> None:
    classes = torch.tensor([0, 2, 4] * 400)
    off = off_classes(classes, 5, seed=3)
    assert not bool((off == classes).any()) and int(off.min()) >= 0 and int(off.max()) <= 4
    assert torch.equal(off, off_classes(classes, 5, seed=3))
    counts = torch.bincount(off[classes == 2], minlength=5)
    assert counts[2] == 0 and bool((counts[[0, 1, 3, 4]] > 70).all())  # 400 draws over 4 classes
    with pytest.raises(CamkitError, match="at least 2 outputs"):
        off_classes(torch.tensor([0]), 1)


def test_random_logit_compares_with_another_class_map() -> None:
    model = _model()
    x, classes = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    maps = _gradcam(model, x, classes)
    before = snapshot(model)
    got = random_logit(model, x, maps, _gradcam, classes, seed=1)
    others = off_classes(classes, 5, seed=1)
    torch.testing.assert_close(got, ssim(maps, _gradcam(model, x, others)))
    assert float(got.max()) < 1.0
    # a map that ignores the class: SSIM 1
    torch.testing.assert_close(random_logit(model, x, maps, lambda m, xx, c: maps, classes), torch.ones(3))
    with pytest.raises(CamkitError, match="different from the image's explained class"):
        random_logit(model, x, maps, _gradcam, classes, others=classes)
    with pytest.raises(CamkitError, match="must give maps of shape"):
        random_logit(model, x, maps, lambda m, xx, c: maps[:1], classes)
    assert_unchanged(before, model)


def test_mprt_randomises_a_copy_top_down() -> None:
    model = _model()
    x, classes = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    maps = _gradcam(model, x, classes)
    before, rng = snapshot(model), torch.random.get_rng_state()
    seen: list[list[float]] = []

    def explain(m: nn.Module, xx: Tensor, c: Tensor) -> Tensor:
        assert m is not model and torch.equal(c, classes)
        seen.append([float(p.detach().abs().sum()) for p in m.parameters()])
        return _gradcam(m, xx, c)

    res = mprt(model, x, maps, explain, classes)
    assert res.steps == randomizable_modules(model) == ["fc", "features.2", "features.0"]
    assert res.correlation.shape == (3, 2)
    torch.testing.assert_close(res.mean, res.correlation.mean(dim=0))
    torch.testing.assert_close(res.last, res.correlation[-1])
    assert float(res.last.max()) < 0.9
    # cumulative: each step changes one more layer (features.0's weights first change at the last step)
    assert seen[0][0] == seen[1][0] != seen[2][0]
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_unchanged(before, model)
    # a map that ignores the model keeps its ranking: correlation 1 at every step
    flat = mprt(model, x, maps, lambda m, xx, c: maps, classes, modules=["fc", ["features.2", "features.0"]])
    assert flat.steps == ["fc", "features.2+features.0"]
    torch.testing.assert_close(flat.correlation, torch.ones(2, 2))
    with pytest.raises(CamkitError, match="no module named 'head'"):
        mprt(model, x, maps, explain, classes, modules=["head"])
    with pytest.raises(CamkitError, match="unknown layer_order"):
        mprt(model, x, maps, explain, classes, layer_order="bottom_up")


def test_the_new_metrics_are_registered() -> None:
    model = _model()
    x, classes = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    maps = _gradcam(model, x, classes)
    names = ["mask_auc", "sparseness", "entropy", "effective_complexity", "random_logit", "mprt"]
    scorer = MetricScorer(model, Forward(model), names, 3, 0.2)
    boxes, sizes = [[[0, 0, 16, 8]], []], [(32, 32), (16, 16)]
    for name in ("random_logit", "mprt"):
        with pytest.raises(CamkitError, match=f"{name} explains again"):
            MetricScorer(model, Forward(model), [name], 3, 0.2)(x, maps, classes, boxes, sizes)
    values, _ = scorer(x, maps, classes, boxes, sizes, explain=_gradcam)
    assert set(values) == {"mask_auc", "sparseness", "entropy", "effective_complexity", "random_logit", "mprt",
                           "mprt_last"}  # fmt: skip
    torch.testing.assert_close(
        values["mask_auc"], mask_auc(maps, box_mask(boxes, (16, 16), sizes)), equal_nan=True
    )
    assert math.isnan(float(values["mask_auc"][1]))  # no boxes
    torch.testing.assert_close(values["mprt"], mprt(model, x, maps, _gradcam, classes).mean)
    for name in ("energy_pointing", "relevance_mass", "relevance_rank", "mask_auc", "top_k"):
        assert METRICS[name].needs_boxes and not METRICS[name].lower_is_better
    assert [n for n in ("sparseness", "entropy", "effective_complexity", "random_logit", "mprt")
            if METRICS[n].lower_is_better] == ["entropy", "effective_complexity", "random_logit", "mprt"]  # fmt: skip


def _pictures() -> list[tuple[str, Image.Image]]:
    g = np.random.default_rng(1)
    return [(f"im{i}", Image.fromarray(g.integers(0, 255, (20, 24, 3), dtype=np.uint8))) for i in range(2)]


def test_evaluate_and_report_compute_them() -> None:
    model = _model()
    pre = Preprocess(size=(16, 16))
    names = ["energy_pointing", "relevance_rank", "top_k", "sparseness", "random_logit", "mprt"]
    ann = {
        "im0": Annotation(cls=None, boxes=[[2, 2, 14, 12]]),
        "im1": Annotation(cls=None, boxes=[[0, 0, 24, 10]]),
    }
    result = evaluate(model, _pictures(), ["gradcam", "center"], names, ann, preprocess=pre, steps=3)
    for method in ("gradcam", "center"):
        for col in (
            "energy_pointing",
            "relevance_rank",
            "top_k",
            "sparseness",
            "random_logit",
            "mprt",
            "mprt_last",
        ):
            value = result.summary[method][col]
            assert math.isfinite(value) and -1 <= value <= 1, (method, col, value)
    # a reference map depends on neither the class nor the model
    assert result.summary["center"]["random_logit"] == 1.0 and result.summary["center"]["mprt"] == 1.0
    records = build_records(
        LoadedModel(model, pre, None, "tiny"),
        _pictures(),
        ["gradcam"],
        metrics=["random_logit", "mprt"],
        steps=3,
    )
    for r in records:
        assert {"random_logit", "mprt", "mprt_last"} <= set(r.metrics["gradcam"])
        assert all(math.isfinite(v) for v in r.metrics["gradcam"].values())
