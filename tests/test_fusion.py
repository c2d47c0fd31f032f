"""Packed convolutions fused with their activation and residual add (camkit._fusion) against the unfused model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit import _fusion, _winograd
from camkit._fastforward import FastForward
from camkit._fusion import FusedConv2d, fuse
from conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(not _fusion.available(), reason="no oneDNN fused convolution in this build")

ACTS = {
    "relu": (None, F.relu),
    "hardtanh": ([0.0, 6.0], F.relu6),
    "swish": (None, F.silu),
    "hardswish": (None, F.hardswish),
}


@pytest.mark.parametrize("unary", [None, *ACTS])
@pytest.mark.parametrize("binary", [False, True])
def test_fused_conv_matches_the_unfused_operations(unary: str | None, binary: bool) -> None:
    if binary and unary not in (None, "relu"):
        with pytest.raises(ValueError, match="only"):  # oneDNN has no other activation after its fused add
            FusedConv2d(nn.Conv2d(6, 10, 3), (4, 6, 9, 9), unary, ACTS[unary][0], binary=True)
        return
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    scalars, act = ACTS[unary] if unary else (None, lambda y: y)
    fused = FusedConv2d(conv, (4, 6, 9, 9), unary, scalars, binary=binary)
    # packed for 4 images of 9x9; other batch sizes and sizes, NCHW and channels-last inputs all work
    for shape in ((4, 6, 9, 9), (1, 6, 9, 9), (3, 6, 5, 12)):
        x = torch.randn(shape)
        other = torch.randn(shape[0], 10, *shape[2:]) if binary else None
        y = conv(x) + other if other is not None else conv(x)
        ref = act(y)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            with torch.inference_mode():
                out = fused(inp, other) if binary else fused(inp)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False),  # depthwise, strided, no bias
        nn.Conv2d(8, 4, 3, padding=2, dilation=2),
        nn.Conv2d(3, 16, 7, stride=2, padding=3),  # a ResNet stem
        nn.Conv2d(8, 12, 1),
    ],
)
def test_fused_conv_geometries(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 15, 15).contiguous(memory_format=torch.channels_last)
    fused = FusedConv2d(conv, tuple(x.shape), "relu")
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), F.relu(conv(x)), rtol=1e-5, atol=1e-5)


def test_fused_conv_keeps_gradients_and_rejects_what_it_cannot_pack() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    fused = FusedConv2d(conv, (1, 3, 6, 6), "relu", binary=True)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    other = torch.randn(1, 4, 6, 6)
    fused(x, other).sum().backward()  # a gradient is needed: the unfused reference path
    g = x.grad
    assert g is not None
    x2 = x.detach().clone().requires_grad_(True)
    F.relu(conv(x2) + other).sum().backward()
    torch.testing.assert_close(g, x2.grad)
    with pytest.raises(TypeError, match="binary=True"):
        fused(x.detach())
    with pytest.raises(ValueError, match="FusedConv2d can pack"):
        FusedConv2d(nn.Conv2d(3, 4, 3, padding="same"), (1, 3, 6, 6))
    with pytest.raises(ValueError, match="FusedConv2d can pack"):
        FusedConv2d(nn.Conv2d(3, 4, 3, padding_mode="reflect"), (1, 3, 6, 6))
    with pytest.raises(ValueError, match="unknown post-op"):
        FusedConv2d(conv, (1, 3, 6, 6), "tanh-ish")


class Patterns(nn.Module):
    """Every pattern fuse() looks for, and the near-misses it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        c = 8
        self.stem = nn.Conv2d(3, c, 3, padding=1)  # -> nn.ReLU module
        self.act = nn.ReLU(inplace=True)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)  # -> F.relu6
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)  # -> nn.Identity -> += skip -> torch.relu
        self.skip = nn.Identity()
        self.c3 = nn.Conv2d(c, c, 1)  # -> + skip, no activation
        self.c4 = nn.Conv2d(c, c, 3, padding=1)  # -> nn.SiLU
        self.silu = nn.SiLU()
        self.c5 = nn.Conv2d(c, c, 3, padding=1)  # output used twice: packed alone
        self.c6 = nn.Conv2d(c, 1, 1)  # + a broadcast [B, c, H, W] tensor: the add is not fused
        self.c7 = nn.Conv2d(c, c, 3, padding=1)  # -> torch.tanh: not a supported activation
        self.hs = nn.Hardswish()
        self.fc = nn.Linear(c, 4)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.stem(x))
        b = F.relu6(self.c1(a))
        out = self.skip(self.c2(b))
        out += a
        b = torch.relu(out)
        b = self.c3(b) + b
        b = self.silu(self.c4(b))
        d = self.c5(b)
        b = self.hs(d) + d
        b = self.c6(b) + b
        b = torch.tanh(self.c7(b))
        return self.fc(b.mean(dim=(2, 3)))


def test_fuse_finds_the_patterns_and_leaves_the_model() -> None:
    net = Patterns().eval()
    before = snapshot(net)
    x = torch.randn(3, 3, 10, 10)
    with torch.inference_mode():
        ref = net(x)
        got = fuse(net, x[:1], batch=3)
        assert got is not None
        gm, count = got
        assert count == 8
        posts = {m.conv: repr(m) for m in gm.modules() if isinstance(m, FusedConv2d)}
        assert "post='relu'" in posts[net.stem]
        assert "post='hardtanh'" in posts[net.c1]
        assert "post='add+relu'" in posts[net.c2]
        assert "post='add'" in posts[net.c3]
        assert "post='swish'" in posts[net.c4]
        assert (
            "post='none'" in posts[net.c5]
            and "post='none'" in posts[net.c6]
            and "post='none'" in posts[net.c7]
        )
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(gm(inp), ref, rtol=1e-5, atol=1e-5)
    assert_unchanged(before, net)
    assert all(type(m) is not FusedConv2d for m in net.modules())


class ValueControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y.relu() if float(y.mean()) > 0 else y  # data-dependent: torch.fx cannot trace it


def test_fuse_declines_what_it_cannot_trace_and_the_fast_path_still_works() -> None:
    net = ValueControlFlow().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        assert fuse(net, x[:1]) is None
        assert fuse(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4)) is None  # nothing to pack
        ff = FastForward(net, lambda o: o)  # type: ignore[arg-type,return-value]
        torch.testing.assert_close(ff(x), net(x))
    assert ff.path == "channels-last"


def test_fast_path_on_a_model_without_batchnorm_is_a_fused_copy() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6()
    ).eval()
    before = snapshot(net)
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode():
        ff = FastForward(net, lambda o: o)  # type: ignore[arg-type,return-value]
        out = torch.cat([ff(x[:2]), ff(x[2:])])
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
    assert ff.path == "fused+channels-last"
    assert (
        ff._fast_model is not net and sum(isinstance(m, FusedConv2d) for m in ff._fast_model.modules()) == 2
    )
    assert_unchanged(before, net)


def test_torchvision_resnet_is_fused_throughout() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    before = snapshot(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        ff = FastForward(net, lambda o: o)  # type: ignore[arg-type,return-value]
        out = torch.cat([ff(x[:1]), ff(x[1:])])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert ff.path is not None and ff.path.startswith("folded+fused+")
    fused = [m for m in ff._fast_model.modules() if isinstance(m, FusedConv2d)]
    winos = [m for m in ff._fast_model.modules() if isinstance(m, _winograd.WinogradConv2d)]
    assert len(winos) == sum(_winograd.eligible(m) for m in net.modules()) > 0
    assert len(fused) == 20  # every convolution is packed, the Winograd layers' direct paths included
    assert all(isinstance(w.direct, FusedConv2d) for w in winos)
    # Each block's residual add and ReLU go with its second conv (Winograd or not), each first conv and the stem
    # carry their ReLU, the downsample convs nothing.
    assert sum(m.binary and m.unary == "relu" for m in fused) == 8
    assert sum(m.unary == "relu" and not m.binary for m in fused) == 9
    assert sum(w.binary and w.post is not None for w in winos) == sum(
        _winograd.eligible(b.conv2)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
        for b in layer
    )
    assert_unchanged(before, net)


@pytest.mark.parametrize("choice", ["winograd", "direct"])
def test_winograd_layer_with_post_ops(choice: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1).eval()
    x = torch.randn(3, 128, 9, 9).contiguous(memory_format=torch.channels_last)
    other = torch.randn(3, 128, 9, 9).contiguous(memory_format=torch.channels_last)
    direct = FusedConv2d(conv, tuple(x.shape), "relu", binary=True)
    layer = _winograd.WinogradConv2d(conv, direct, F.relu_, binary=True)
    with torch.inference_mode():
        ref = F.relu(conv(x) + other)
        for _ in range(8):  # the check, the timed calls, and beyond
            torch.testing.assert_close(layer(x, other), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert layer.choice in ("winograd", "direct")
        layer.choice = choice  # both ways give the same result
        if choice == "winograd":
            layer.u = _winograd.transform_weight(conv.weight)
        torch.testing.assert_close(layer(x, other), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        with pytest.raises(TypeError, match="binary=True"):
            layer(x)
    with pytest.raises(ValueError, match="direct path"):
        _winograd.WinogradConv2d(conv, post=F.relu_)
