"""Deletion and insertion of several maps in one stream of model calls (``deletion_insertion``, what
``camkit evaluate`` runs): the same numbers as :func:`deletion` / :func:`insertion` called map by map."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from camkit import compare
from camkit.adapters import Preprocess
from camkit.evaluate import baseline_map, evaluate
from camkit.metrics import Forward
from camkit.metrics._common import make_baseline
from camkit.metrics.faithfulness import confidence_change, deletion, deletion_insertion, insertion
from testbed import TinyNonlinearHead

METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyNonlinearHead().eval()


def test_joint_curves_equal_the_curves_map_by_map() -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 12, 12, generator=g)
    maps = {"a": torch.rand(3, 12, 12, generator=g), "b": torch.rand(3, 12, 12, generator=g)}
    maps["flat"] = torch.ones(3, 12, 12)  # ties: raster order
    fwd = Forward(model, batch_size=5)  # chunks that straddle curves, maps and images
    joint = deletion_insertion(model, x, maps, classes=torch.tensor([0, 2, 4]), steps=7, forward=fwd)
    clean = Forward(model)(x)
    again = deletion_insertion(model, x, maps, steps=7, clean=clean)  # classes: the top-1 of clean
    for name, m in maps.items():
        d = deletion(model, x, m, torch.tensor([0, 2, 4]), steps=7)
        i = insertion(model, x, m, torch.tensor([0, 2, 4]), steps=7)
        torch.testing.assert_close(joint[name][0].scores, d.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(joint[name][1].scores, i.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(joint[name][0].auc, d.auc, rtol=0, atol=1e-6)
        torch.testing.assert_close(joint[name][1].auc, i.auc, rtol=0, atol=1e-6)
        top = clean.argmax(dim=1)
        torch.testing.assert_close(
            again[name][0].auc, deletion(model, x, m, top, steps=7).auc, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            again[name][1].auc, insertion(model, x, m, top, steps=7).auc, atol=1e-6, rtol=0
        )
    # the ends are shared: 3 images per image (itself, zeroed, blurred) instead of 4 per image and map
    assert fwd.images == 3 * 3 + 3 * 3 * 2 * 6


def _curve_by_definition(model, x, m, cls, steps, start, finish) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Each step's image built alone: the first ``round(k * H * W / steps)`` pixels in decreasing map order (ties
    in raster order) taken from ``finish``, the rest from ``start``; its class probability."""
    b, _, h, w = x.shape
    out = torch.empty(b, steps + 1)
    for i in range(b):
        order = torch.argsort(-m[i].flatten(), stable=True)
        for k in range(steps + 1):
            switched = torch.zeros(h * w, dtype=torch.bool)
            switched[order[: round(k * h * w / steps)]] = True
            img = torch.where(switched.view(1, h, w), finish[i], start[i])
            with torch.no_grad():
                out[i, k] = model(img[None]).softmax(dim=1)[0, cls[i]]
    return out


@pytest.mark.parametrize("batch_size", [1, 4, 5, 64])
def test_deletion_and_insertion_follow_their_definition_step_by_step(batch_size: int) -> None:
    """Every step's image built alone, against the chunked stream (chunks that straddle images and curves)."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 12, 12, generator=g)
    m = torch.rand(3, 12, 12, generator=g)
    m[1] = m[1].round(decimals=1)  # ties
    cls = torch.tensor([1, 0, 3])
    zeros, blur = torch.zeros_like(x), make_baseline(x, "blur", "blur")
    fwd = Forward(model, batch_size=batch_size)
    d = deletion(model, x, m, cls, steps=7, forward=fwd)
    i = insertion(model, x, m, cls, steps=7, forward=fwd)
    torch.testing.assert_close(
        d.scores, _curve_by_definition(model, x, m, cls, 7, x, zeros), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        i.scores, _curve_by_definition(model, x, m, cls, 7, blur, x), rtol=0, atol=1e-6
    )
    joint = deletion_insertion(model, x, {"m": m, "flat": torch.ones(3, 12, 12)}, cls, steps=7, forward=fwd)
    torch.testing.assert_close(joint["m"][0].scores, d.scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(joint["m"][1].scores, i.scores, rtol=0, atol=1e-6)
    flat = torch.ones(3, 12, 12)
    torch.testing.assert_close(
        joint["flat"][1].scores, _curve_by_definition(model, x, flat, cls, 7, blur, x), rtol=0, atol=1e-6
    )


def test_evaluate_equals_the_metrics_method_by_method() -> None:
    """``camkit evaluate``'s numbers (joint deletion/insertion, the clean forward reused) against the old path:
    the maps of one :func:`camkit.compare`, each metric called per method."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    pics = [
        (f"im{i}.png", Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()))
        for i in range(5)
    ]
    pre = Preprocess(size=(16, 16))
    metrics = ["deletion", "insertion", "avg_drop", "increase"]
    res = evaluate(
        model, pics, [*METHODS, "center"], metrics, preprocess=pre, steps=9, images_per_batch=3, batch_size=4
    )
    got = {(r.image, r.method): r.values for r in res.rows}
    for start in (0, 3):
        part = pics[start : start + 3]
        x = pre([im for _, im in part])
        classes = model(x).argmax(dim=1)
        expl = compare(model, x, METHODS, targets=classes.tolist())
        maps = {m: expl[m].maps for m in METHODS}
        maps["center"] = baseline_map("center", len(part), (16, 16))
        for method, m in maps.items():
            want = {
                "deletion": deletion(model, x, m, classes, steps=9).auc,
                "insertion": insertion(model, x, m, classes, steps=9).auc,
                "avg_drop": confidence_change(model, x, m, classes).drop,
                "increase": confidence_change(model, x, m, classes).increase,
            }
            for j, (name, _) in enumerate(part):
                for col, v in want.items():
                    assert abs(got[(name, method)][col] - float(v[j])) <= 1e-5, (name, method, col)


def test_evaluate_compile_gives_the_same_numbers_and_refuses_unknown_backends() -> None:
    model = _model()
    g = torch.Generator().manual_seed(3)
    pics = [
        (f"im{i}.png", Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()))
        for i in range(2)
    ]
    kw = {"preprocess": Preprocess(size=(16, 16)), "steps": 5}
    plain = evaluate(model, pics, ["gradcam"], ["deletion", "insertion"], **kw)
    for backend in ("jit", "onnx"):
        fast = evaluate(model, pics, ["gradcam"], ["deletion", "insertion"], compile=backend, **kw)
        for a, b in zip(plain.rows, fast.rows, strict=True):
            for col in ("deletion", "insertion"):
                assert abs(a.values[col] - b.values[col]) <= 1e-5, (backend, col)
    with pytest.raises(ValueError, match="compile must be"):
        evaluate(model, pics, ["gradcam"], ["deletion"], compile="tvm", **kw)  # type: ignore[arg-type]
