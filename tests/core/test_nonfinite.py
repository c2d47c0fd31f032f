"""NaN and Inf: a non-finite model output, explained score or map is a ValueError naming the images, never a
silent class 0 with an all-zero map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camkit
from testbed import TinyGapNet, assert_unchanged, snapshot


class Poison(nn.Module):
    """Multiplies the given images of the batch by ``value`` (inf, or NaN via inf * 0)."""

    def __init__(self, images: list[int], value: float) -> None:
        super().__init__()
        self.images = images
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype)
        scale[[i for i in self.images if i < x.shape[0]]] = self.value
        return x * scale


def _net(head: nn.Module | None = None) -> TinyGapNet:
    torch.manual_seed(0)
    net = TinyGapNet()
    if head is not None:
        net.fc = nn.Sequential(net.fc, head)
    return net.eval()


def _same_state(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    return all(torch.equal(v.nan_to_num(), model.state_dict()[k].nan_to_num()) for k, v in before.items())


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "cam", "scorecam"])
def test_nan_weights_are_an_error_naming_every_image(method: str, x_small: torch.Tensor) -> None:
    net = _net()
    with torch.no_grad():
        net.fc.weight[1, 2] = float("nan")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"model's output is not finite \(NaN\) for image\(s\) 0, 1, 2, 3 "):
        camkit.explain(net, x_small, method)
    assert _same_state(state, net)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize(("value", "kind"), [(float("inf"), "Inf"), (float("nan"), "NaN")])
def test_non_finite_logits_of_some_images_are_named(value: float, kind: str, x_small: torch.Tensor) -> None:
    net = _net(Poison([1, 3], value))
    before = snapshot(net)
    with pytest.raises(
        ValueError, match=rf"not finite \({kind}\) for image\(s\) 1, 3 \(indices in the batch of 4\)"
    ):
        camkit.explain(net, x_small, "gradcam")
    assert_unchanged(before, net)
    with pytest.raises(ValueError, match=r"image\(s\) 1, 3 "):
        camkit.compare(net, x_small, ["gradcam", "layercam"], targets=2)


def test_non_finite_explained_score_is_named(x_small: torch.Tensor) -> None:
    net = _net()

    def target(out: torch.Tensor) -> torch.Tensor:
        s = out[:, 0].clone()
        s[2] = float("nan")
        return s

    before = snapshot(net)
    with pytest.raises(ValueError, match=r"explained score is not finite \(NaN\) for image\(s\) 2 "):
        camkit.explain(net, x_small, "gradcam", targets=target)
    assert_unchanged(before, net)


class SqrtHead(nn.Module):
    """Finite scores whose gradient at the target layer is not: d sqrt(a) / da = inf where the ReLU output a is 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sqrt(self.features(x)).mean((2, 3)))


def test_non_finite_map_is_an_error_not_a_zero_map(x_small: torch.Tensor) -> None:
    net = SqrtHead().eval()
    before = snapshot(net)
    with pytest.raises(
        ValueError, match=r"gradcam map of 'features.1' is not finite \(NaN\) for image\(s\) 0, 1, 2, 3"
    ):
        camkit.explain(net, x_small, "gradcam", layers="features.1")
    assert_unchanged(before, net)
    # a method that reads no gradient explains the same model
    assert torch.isfinite(camkit.explain(net, x_small, "eigencam", layers="features.1").maps).all()


def test_finite_model_is_unaffected(tiny: nn.Module, x_small: torch.Tensor) -> None:
    expl = camkit.explain(tiny, x_small, "gradcam")
    assert torch.isfinite(expl.maps).all() and torch.isfinite(expl.scores).all()


class ZeroPoison(nn.Module):
    """inf for the rows holding an all-zero channel map: finite on the images themselves, not on a masked input
    (its mask is 0 somewhere: the input's channels are 0 there... and everywhere for an ablated channel)."""

    def __init__(self, whole_channel: bool) -> None:
        super().__init__()
        self.whole_channel = whole_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = x.flatten(2) == 0
        bad = (zero.all(2) if self.whole_channel else zero.any(2)).any(1)
        return x * torch.where(bad, float("inf"), 1.0).to(x.dtype)[:, None, None, None]


def _poisoned(whole_channel: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        ZeroPoison(whole_channel=False) if not whole_channel else nn.Identity(),
        nn.Conv2d(3, 4, 3, padding=1),
        ZeroPoison(whole_channel=True) if whole_channel else nn.Identity(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


@pytest.mark.parametrize(
    ("method", "whole_channel", "what"),
    [("scorecam", False, "a masked input"), ("ablationcam", True, "an ablated activation")],
)
def test_non_finite_perturbed_score_is_named(method: str, whole_channel: bool, what: str) -> None:
    net = _poisoned(whole_channel)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()
    before = snapshot(net)
    opts = camkit.PerturbationOptions(batch_size=64, replay=False)
    with pytest.raises(ValueError, match=rf"score of {what} is not finite \(NaN or Inf\) for image\(s\) 0"):
        camkit.explain(net, x, method, layers="1", perturbation=opts)
    assert_unchanged(before, net)


def test_finite_values_whose_sum_overflows_are_finite() -> None:
    """The finiteness checks sum first: a sum that overflows (finite values near the float32 maximum) must still
    pass, and one NaN or infinity anywhere must still be found."""
    from camkit.core.pipeline import _all_finite

    big = torch.full((2, 3, 8, 8), 3e38)
    assert not torch.isfinite(big.sum()) and _all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = big.clone()
        t[1, 2, 7, 7] = bad
        assert not _all_finite(t)
        small = torch.zeros(5)
        small[3] = bad
        assert not _all_finite(small)
    assert _all_finite(torch.tensor([1, 2, 3])) and _all_finite(torch.zeros(0))
    net = _net()
    with pytest.raises(ValueError, match="NaN or infinite"):
        camkit.explain(net, torch.full((1, 3, 16, 16), float("nan")))
