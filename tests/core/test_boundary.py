"""Argument checks at the public boundary: a wrong argument is a ValueError / TypeError saying what was expected,
never an IndexError or AttributeError from inside torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camkit
from camkit import metrics
from testbed import TinyGapNet


def _net(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return TinyGapNet(classes=classes).eval()


def _data(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(b, 3, 8, 8), torch.rand(b, 8, 8)


# --------------------------------------------------------------------------------------------- metrics arguments


def test_metrics_class_out_of_range() -> None:
    net, (x, m) = _net(classes=2), _data()
    for fn in (metrics.deletion, metrics.insertion, metrics.confidence_change, metrics.road):
        with pytest.raises(ValueError, match=r"class indices must be in \[0, 1\].*2 outputs"):
            fn(net, x, m, classes=2)
    with pytest.raises(ValueError, match="class indices"):
        metrics.deletion(net, x, m, classes=[0, -1], steps=2)


def test_metrics_bool_classes() -> None:
    net, (x, m) = _net(), _data()
    with pytest.raises(TypeError, match="bool"):
        metrics.deletion(net, x, m, classes=[False, 0], steps=2)
    with pytest.raises(TypeError, match="bool"):
        metrics.deletion(net, x, m, classes=True, steps=2)
    with pytest.raises(TypeError, match="bool"):
        metrics.confidence_change(net, x, m, classes=torch.tensor([True, False]))


@pytest.mark.parametrize("steps", [1.5, 1.25, 0.5, "3", True])
def test_metrics_steps_must_be_int(steps: object) -> None:
    net, (x, m) = _net(), _data()
    with pytest.raises(TypeError, match="steps must be an int"):
        metrics.deletion(net, x, m, steps=steps)  # type: ignore[arg-type]


def test_metrics_steps_numpy_int_ok() -> None:
    import numpy as np

    net, (x, m) = _net(), _data()
    a = metrics.deletion(net, x, m, steps=np.int64(4)).auc
    assert torch.equal(a, metrics.deletion(net, x, m, steps=4).auc)


def test_metrics_bad_baselines() -> None:
    net, (x, m) = _net(), _data()
    with pytest.raises(TypeError, match=r"baseline function must return a Tensor.*got int"):
        metrics.deletion(net, x, m, steps=2, baseline=lambda t: 0)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"baseline function's result has shape \(2, 3, 4, 4\)"):
        metrics.insertion(net, x, m, steps=2, baseline=lambda t: t[..., :4, :4])
    with pytest.raises(ValueError, match=r"baseline tensor has shape \(5, 3\)"):
        metrics.confidence_change(net, x, m, baseline=torch.zeros(5, 3))
    # broadcastable baselines stay valid
    metrics.deletion(net, x, m, steps=2, baseline=torch.zeros(3, 1, 1))


# --------------------------------------------------------------------------------------------- non-finite maps


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_metrics_refuse_non_finite_maps(bad: float) -> None:
    net, (x, m) = _net(), _data(3)
    m[1, 2, 3] = bad
    for fn in (metrics.deletion, metrics.insertion, metrics.confidence_change, metrics.road):
        with pytest.raises(ValueError, match=r"maps of images \[1\] contain NaN or Inf"):
            fn(net, x, m)


# --------------------------------------------------------------------------------------------- explain arguments


def test_explain_model_none() -> None:
    x, _ = _data()
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        camkit.explain(None, x)  # type: ignore[arg-type]


def test_explain_method_module() -> None:
    x, _ = _data()
    with pytest.raises(TypeError, match="method is given by its name"):
        camkit.explain(_net(), x, method=_net())  # type: ignore[arg-type]


def test_explain_too_few_labels() -> None:
    x, _ = _data()
    with pytest.raises(ValueError, match="3 labels for a model with 5 outputs"):
        camkit.explain(_net(), x, labels=["a", "b", "c"])
    e = camkit.explain(_net(), x, labels=list("abcde"))
    assert e.labels is not None and len(e.labels) == 2


# --------------------------------------------------------------------------------------------- model dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_metrics_on_a_model_in_its_own_dtype(dtype: torch.dtype) -> None:
    """float32 inputs and maps; the model runs in its dtype, the scores come back in float32."""
    ref, (x, m) = _net(), _data()
    net = _net().to(dtype)
    tol = 1e-6 if dtype == torch.float64 else 5e-2
    d, d32 = metrics.deletion(net, x, m, steps=4), metrics.deletion(ref, x, m, steps=4)
    i = metrics.insertion(net, x, m, steps=4, classes=d32.classes)
    c = metrics.confidence_change(net, x, m, classes=d32.classes)
    r = metrics.road(net, x, m, classes=d32.classes, percentages=(0.2, 0.5))
    for got in (d.scores, i.scores, c.original, c.explained, r.scores):
        assert got.dtype == torch.float32
    torch.testing.assert_close(d.scores, d32.scores, atol=tol, rtol=tol)
    torch.testing.assert_close(
        i.scores, metrics.insertion(ref, x, m, steps=4, classes=d32.classes).scores, atol=tol, rtol=tol
    )
    torch.testing.assert_close(
        r.scores,
        metrics.road(ref, x, m, classes=d32.classes, percentages=(0.2, 0.5)).scores,
        atol=tol,
        rtol=tol,
    )
    assert next(net.parameters()).dtype == dtype  # the model is not converted


# --------------------------------------------------------------------------------------------- CAM, 1x1-conv head


class ConvHeadNet(nn.Module):
    """features -> 1x1 conv (K -> C) -> global average pooling: CAM's own case, SqueezeNet's head without ReLU."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2))
        self.classifier = nn.Sequential(
            nn.Conv2d(6, 4, 1), *([nn.ReLU()] if relu else []), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_cam_on_a_1x1_conv_head() -> None:
    torch.manual_seed(0)
    net = ConvHeadNet().eval()
    x = torch.randn(2, 3, 12, 12)
    e = camkit.explain(net, x, method="cam", layers="features", targets=[1, 3], relu=False)
    a = net.features(x).detach()
    w = net.classifier[0].weight.detach()[:, :, 0, 0]
    expected = torch.einsum("bk,bkhw->bhw", w[[1, 3]], a)
    assert torch.equal(e.raw["features"], expected)
    # for such a head Grad-CAM is CAM / (h*w)
    g = camkit.explain(net, x, method="gradcam", layers="features", targets=[1, 3], relu=False)
    torch.testing.assert_close(g.raw["features"] * a.shape[-2] * a.shape[-1], expected, rtol=1e-4, atol=1e-5)


def test_cam_refuses_a_relu_between_the_1x1_conv_and_the_pooling() -> None:
    torch.manual_seed(0)
    net = ConvHeadNet(relu=True).eval()
    with torch.no_grad():
        net.classifier[0].bias.fill_(-0.5)  # the ReLU clips: the head is not linear in A
    with pytest.raises(ValueError, match=r"not mean_hw\(conv1x1\(A\)\).*ReLU"):
        camkit.explain(net, torch.randn(2, 3, 12, 12), method="cam", layers="features")


def test_cam_on_torchvision_squeezenet_is_refused() -> None:
    """torchvision's SqueezeNet: conv 1x1 -> ReLU -> average pooling. The ReLU makes the head non-linear in A, so
    CAM refuses it (use Grad-CAM), unless no output is clipped on these images, which the numeric check sees."""
    from torchvision.models import squeezenet1_1

    torch.manual_seed(0)
    net = squeezenet1_1(weights=None, num_classes=10).eval()
    with pytest.raises(ValueError, match=r"SqueezeNet.*gradcam"):
        camkit.explain(net, torch.randn(1, 3, 64, 64), method="cam", layers="features")


# --------------------------------------------------------------------------------------------- Ablation-CAM, tokens


def test_ablationcam_on_a_token_layout_works() -> None:
    """A ViT block outputs [B, N, D]: the ablated [B, K, h, w] maps go back in as tokens (it used to be 'too many
    values to unpack' inside timm); tests/test_peers_b_ablation.py checks the values against whole forwards."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    assert camkit.explain(net, x, method="ablationcam").maps.shape == (1, 32, 32)
    assert camkit.explain(net, x, method="scorecam").maps.shape == (1, 32, 32)
