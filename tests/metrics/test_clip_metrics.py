"""Deletion, insertion, average drop and increase in confidence on clips Tensor[B, C, T, H, W] with maps
[B, T, H, W]: voxels are removed in the order of the map over the whole clip (known answers computed here by hand);
the metrics defined on images refuse a clip in one line."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit import metrics
from camkit.errors import CamkitError
from camkit.metrics._common import gaussian_blur, make_baseline

T, SIDE = 4, 12


@pytest.fixture(scope="module")
def clip_setup() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 4)
    ).eval()
    x = torch.randn(2, 3, T, SIDE, SIDE)
    maps = camkit.explain(model, x, method="gradcam", layers="0").maps
    return model, x, maps


def _switched(x: Tensor, start: Tensor, finish: Tensor, maps: Tensor, k: int) -> Tensor:
    """``start`` with the k voxels of highest map value taken from ``finish`` (ties in raster order)."""
    order = torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)[:, :k]
    out = start.clone().flatten(2)
    for b in range(x.shape[0]):
        out[b][:, order[b]] = finish.flatten(2)[b][:, order[b]]
    return out.view_as(x)


def test_deletion_and_insertion_remove_voxels_of_the_whole_clip(
    clip_setup: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, maps = clip_setup
    steps = 7  # does not divide T * H * W = 576: step i switches round(i * 576 / 7) voxels
    d = metrics.deletion(model, x, maps, steps=steps)
    ins = metrics.insertion(model, x, maps, steps=steps)
    assert d.scores.shape == ins.scores.shape == (2, steps + 1)
    n = T * SIDE * SIDE
    blur = make_baseline(x, None, "blur")
    with torch.no_grad():
        for i in range(steps + 1):
            k = round(i * n / steps)
            gone = _switched(x, x, torch.zeros_like(x), maps, k)
            back = _switched(x, blur, x, maps, k)
            p_gone = torch.softmax(model(gone), 1)[torch.arange(2), d.classes]
            p_back = torch.softmax(model(back), 1)[torch.arange(2), ins.classes]
            torch.testing.assert_close(d.scores[:, i], p_gone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ins.scores[:, i], p_back, rtol=1e-5, atol=1e-6)
    joint = metrics.deletion_insertion(model, x, {"gradcam": maps}, steps=steps)["gradcam"]
    torch.testing.assert_close(joint[0].auc, d.auc)
    torch.testing.assert_close(joint[1].auc, ins.auc)


def test_clip_blur_is_each_frame_blurred(clip_setup: tuple[nn.Module, Tensor, Tensor]) -> None:
    _, x, _ = clip_setup
    blur = make_baseline(x, None, "blur")
    for t in range(T):
        torch.testing.assert_close(blur[:, :, t], gaussian_blur(x[:, :, t]))


def test_confidence_change_on_a_clip(clip_setup: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, maps = clip_setup
    c = metrics.confidence_change(model, x, maps)
    with torch.no_grad():
        y = torch.softmax(model(x), 1)[torch.arange(2), c.classes]
        o = torch.softmax(model(x * maps[:, None]), 1)[torch.arange(2), c.classes]
    torch.testing.assert_close(c.drop, torch.clamp(y - o, min=0) / y)
    torch.testing.assert_close(c.increase, (o > y).float())


def test_image_metrics_refuse_a_clip(clip_setup: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, maps = clip_setup
    with pytest.raises(CamkitError, match=r"takes images.*deletion, insertion"):
        metrics.road(model, x, maps)
    with pytest.raises(CamkitError, match=r"maps must be Tensor\[B, T, H, W\]"):
        metrics.deletion(model, x, maps[:, 0])
