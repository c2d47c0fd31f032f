"""The prepared copy of camkit.core.accel (BatchNorm folded, channels-last, cached per model) under changes made to the
model after it was prepared: a BatchNorm's ``eps``, a ``forward`` replaced on an instance or on a class, a plain
attribute a ``forward`` reads. Each change must reach the next Score-CAM map (the copy is rebuilt), and computing
the cache signature must stay cheap."""

from __future__ import annotations

import time
import types

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit import PerturbationOptions
from camkit.core import accel


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    accel.clear_cache()


class Net(nn.Module):
    """conv -> BN -> ReLU twice, small running variances so that ``eps`` weighs on the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        with torch.no_grad():
            for bn in (self.b1, self.b2):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.01, 0.05)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        self.fc = nn.Linear(6, 4)
        self.scale = 1.0  # a plain attribute its forward reads

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.fc(h.mean(dim=(2, 3)) * self.scale)


def _maps(net: nn.Module, x: Tensor, prepared: bool) -> Tensor:
    """Score-CAM's raw map at ``c2`` for class 0: through the prepared copy, or through the model as given."""
    opts = PerturbationOptions(channels_last=None if prepared else False, batch_size=4)
    return camkit.explain(net, x, "scorecam", "c2", 0, perturbation=opts).raw["c2"]


def _prepared_then(change: types.FunctionType) -> tuple[Tensor, Tensor, Tensor]:
    """The map before the change (prepared), after it (prepared, the cache already filled), after it (as given)."""
    net = Net().eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    before = _maps(net, x, prepared=True)
    assert any(e.paths for e in accel._CACHE.values())  # a prepared copy is cached now
    change(net)
    return before, _maps(net, x, prepared=True), _maps(net, x, prepared=False)


def _set_eps(net: Net) -> None:
    net.b1.eps = 0.05
    net.b2.eps = 0.05


def _patch_instance_forward(net: Net) -> None:
    original = net.b2.forward

    def doubled(self: nn.Module, x: Tensor) -> Tensor:
        return original(x) * 2.0 - 0.3

    net.b2.forward = types.MethodType(doubled, net.b2)  # type: ignore[method-assign]


def _patch_instance_forward_plain(net: Net) -> None:
    original = net.c2.forward
    net.c2.forward = lambda x: original(x) * 1.5 + 0.2  # type: ignore[method-assign]


def _set_attribute(net: Net) -> None:
    net.scale = -0.5


def _set_conv_geometry(net: Net) -> None:
    net.c2.padding = (2, 2)  # same output size, another receptive field
    net.c2.dilation = (2, 2)


@pytest.mark.parametrize(
    "change",
    [_set_eps, _patch_instance_forward, _patch_instance_forward_plain, _set_attribute, _set_conv_geometry],
)
def test_a_change_after_preparing_reaches_the_map(change: types.FunctionType) -> None:
    before, after, reference = _prepared_then(change)
    assert not torch.allclose(before, reference, atol=1e-4)  # the change matters
    torch.testing.assert_close(after, reference, rtol=0, atol=1e-6)


def test_a_class_forward_patched_after_preparing_reaches_the_map(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net().eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    before = _maps(net, x, prepared=True)  # its BatchNorms are folded away in the prepared copy
    original = nn.BatchNorm2d.forward
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, x: original(self, x) * 0.5 + 0.25)
    after, reference = _maps(net, x, prepared=True), _maps(net, x, prepared=False)
    assert not torch.allclose(before, reference, atol=1e-4)
    torch.testing.assert_close(after, reference, rtol=0, atol=1e-6)


def test_an_unchanged_model_keeps_its_prepared_copy() -> None:
    net = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    first = _maps(net, x, prepared=True)
    entry = accel._CACHE[net]
    second = _maps(net, x, prepared=True)
    assert accel._CACHE[net] is entry  # nothing was rebuilt: the signature is stable
    assert torch.equal(first, second)


def test_a_patched_forward_does_not_keep_the_model_alive() -> None:
    import gc
    import weakref

    net = Net().eval()
    net.forward = types.MethodType(Net.forward, net)  # type: ignore[method-assign]  # refers to the model
    _maps(net, torch.randn(1, 3, 12, 12), prepared=True)
    gone = weakref.ref(net)
    del net
    gc.collect()
    assert gone() is None  # the cache's signature holds no strong reference to it


def test_signature_is_cheap_on_efficientnet_lite0() -> None:
    loaded = camkit.load_model("efficientnet_lite0", pretrained=False)
    accel._signature(loaded.model)
    runs = 50
    start = time.perf_counter()
    for _ in range(runs):
        accel._signature(loaded.model)
    per_call = (time.perf_counter() - start) / runs
    # a Score-CAM batch on this model takes tens of milliseconds at least; the signature stays a small part
    assert per_call < 0.01, f"{per_call * 1e6:.0f} us per signature"
