"""Winograd F(4x4, 3x3) convolutions (camkit._winograd) against torch's conv2d, and how the fast path uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import camkit
from camkit import PerturbationOptions, _fusion, _winograd
from camkit._fastforward import FastForward
from camkit._winograd import WinogradConv2d, eligible, install, transform_weight, winograd_conv2d
from conftest import assert_unchanged, snapshot


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    ("n", "c", "co", "h", "w", "padding", "bias"),
    [
        (1, 3, 5, 4, 4, (1, 1), True),  # one tile
        (2, 8, 16, 7, 9, (1, 1), False),  # partial tiles on both axes
        (3, 16, 4, 14, 14, (0, 0), True),  # no padding: 12x12 output
        (2, 4, 4, 5, 3, (2, 1), True),  # unequal padding, output larger than the input
        (1, 2, 2, 3, 3, (0, 2), False),  # a 1-row output
        (2, 32, 24, 12, 16, (1, 1), True),  # whole tiles only
    ],
)
def test_matches_conv2d(
    n: int, c: int, co: int, h: int, w: int, padding: tuple[int, int], bias: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    weight = torch.randn(co, c, 3, 3)
    b = torch.randn(co) if bias else None
    ref = F.conv2d(x, weight, b, padding=padding)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out = winograd_conv2d(inp, transform_weight(weight), b, padding)
        assert out.shape == ref.shape
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert _rel(out, ref) < 5e-5
    with pytest.raises(ValueError, match="too small"):
        winograd_conv2d(torch.randn(1, c, 1, 1), transform_weight(weight), b, (0, 0))


def test_eligible_convolutions_only() -> None:
    assert eligible(nn.Conv2d(128, 128, 3, padding=1))
    assert eligible(nn.Conv2d(256, 128, 3, padding=0, bias=False))
    for conv in (
        nn.Conv2d(128, 128, 3, padding=1, stride=2),
        nn.Conv2d(128, 128, 3, padding=1, groups=2),
        nn.Conv2d(128, 128, 3, padding=2, dilation=2),
        nn.Conv2d(128, 128, 1),
        nn.Conv2d(128, 128, 5, padding=2),
        nn.Conv2d(64, 128, 3, padding=1),  # too few channels to gain on a CPU
        nn.Conv2d(128, 128, 3, padding="same"),
        nn.Conv2d(128, 128, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(128, 128, 3, padding=3),
        nn.Conv2d(128, 128, 3, padding=1).double(),
        type("MyConv", (nn.Conv2d,), {})(128, 128, 3, padding=1),  # a subclass may do more than convolve
    ):
        assert not eligible(conv), conv
    with pytest.raises(ValueError, match="not a convolution"):
        WinogradConv2d(nn.Conv2d(128, 128, 1))  # type: ignore[arg-type]


def test_layer_tunes_then_keeps_one_way() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1).eval()
    layer = WinogradConv2d(conv)
    x = torch.randn(2, 128, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = conv(x)
        for i in range(9):
            assert _rel(layer(x), ref) < 5e-5, i
            assert layer.choice == ("tune" if i < 6 else layer.choice)
    assert layer.choice in ("winograd", "direct")
    assert len(layer.seconds["winograd"]) == 3 and len(layer.seconds["direct"]) == 3
    assert (layer.u is None) == (layer.choice == "direct")
    # A gradient needed: always the convolution itself.
    fresh = WinogradConv2d(conv)
    out = fresh(x.clone().requires_grad_())
    assert out.requires_grad and fresh.choice == "tune" and fresh._calls == 0


def test_layer_that_disagrees_keeps_the_convolution() -> None:
    conv = nn.Conv2d(128, 128, 3, padding=1).eval()
    layer = WinogradConv2d(conv)
    assert layer.u is not None
    layer.u = layer.u.flip(0)  # a wrong transform: the first call must notice
    x = torch.randn(1, 128, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), conv(x))
    assert layer.choice == "direct" and layer.u is None


class Wide(nn.Module):
    """Two 3x3 convolutions of 128 channels with a BatchNorm: eligible for folding and Winograd."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 128, 3, padding=1, stride=2)
        self.c1, self.b1 = nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128)
        self.c2 = nn.Conv2d(128, 128, 3, padding=1)
        self.b1.running_mean.uniform_(-0.5, 0.5)
        self.b1.running_var.uniform_(0.5, 2)
        self.fc = nn.Linear(128, 6)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.stem(x))
        a = torch.relu(self.c2(torch.relu(self.b1(self.c1(a)))))
        return self.fc(a.mean(dim=(2, 3)))


def test_install_replaces_eligible_convolutions() -> None:
    net = Wide().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = net(x)
        assert install(net) == 2
        assert isinstance(net.c1, WinogradConv2d) and isinstance(net.c2, WinogradConv2d)
        assert type(net.stem) is nn.Conv2d  # stride 2
        for _ in range(6):
            torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def _identity(out: object) -> Tensor:
    assert isinstance(out, Tensor)
    return out


def test_fast_path_uses_winograd_and_leaves_the_model() -> None:
    net = Wide().eval()
    before = snapshot(net)
    x = torch.randn(6, 3, 16, 16)
    with torch.inference_mode():
        ref = net(x)
        ff = FastForward(net, _identity)
        out = torch.cat([ff(x[i : i + 2]) for i in range(0, 6, 2)])
    assert ff.path == (
        "folded+fused+winograd+channels-last" if _fusion.available() else "folded+winograd+channels-last"
    )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert type(net.c1) is nn.Conv2d and isinstance(net.b1, nn.BatchNorm2d)
    assert_unchanged(before, net)
    # Score-CAM's map is the same either way.
    maps = {
        cl: camkit.explain(
            net, x[:2], "scorecam", "c2", perturbation=PerturbationOptions(channels_last=cl)
        ).raw["c2"]
        for cl in (None, False)
    }
    torch.testing.assert_close(maps[None], maps[False], rtol=1e-4, atol=1e-5 * float(maps[False].abs().max()))
    assert_unchanged(before, net)


def test_winograd_without_batchnorm_and_when_folding_changes_the_output(monkeypatch) -> None:
    monkeypatch.setattr(_winograd, "MIN_CHANNELS", 4)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode():
        ff = FastForward(plain, _identity)
        torch.testing.assert_close(torch.cat([ff(x[:2]), ff(x[2:])]), plain(x), rtol=1e-4, atol=1e-4)
    assert ff.path == ("fused+winograd+channels-last" if _fusion.available() else "winograd+channels-last")
