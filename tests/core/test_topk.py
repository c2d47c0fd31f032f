"""Top-k targets from one batched backward: the same maps as one backward per target, at one backward's count."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

import camkit
import camkit.core.capture
from camkit.core.capture import target_gradients


class _NoVmap(torch.autograd.Function):
    """x -> 2x with a backward that vmap cannot batch (``.item()``, data-dependent): forces the fallback."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: object, g: Tensor) -> Tensor:
        return g * (2.0 if g.abs().max().item() >= 0 else 0.0)


class NoVmapHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1))
        self.fc = nn.Linear(6 * 16, 7)

    def forward(self, x: Tensor) -> Tensor:
        h = _NoVmap.apply(self.features(x))
        return self.fc((nn.functional.adaptive_avg_pool2d(h, 4) ** 2).flatten(1))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=20).eval()


def _loop(monkeypatch: pytest.MonkeyPatch) -> None:
    original = target_gradients
    monkeypatch.setattr(
        camkit.core.capture, "target_gradients", lambda s, leaves: original(s, leaves, batched=False)
    )


def _count_grad_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    real = torch.autograd.grad

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("is_grads_batched", False)))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_topk_batched_equals_loop(resnet: nn.Module, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    layers = "layer2,layer4"
    # the first call of a shape also checks the prepared copy against the model (a second capture): warm it up
    camkit.explain(resnet, x, method=method, layers=layers, targets=camkit.TopK(5))
    calls = _count_grad_calls(monkeypatch)
    batched = camkit.explain(resnet, x, method=method, layers=layers, targets=camkit.TopK(5))
    assert calls == [True], "k targets must cost one (batched) backward"
    with monkeypatch.context() as m:
        _loop(m)
        looped = camkit.explain(resnet, x, method=method, layers=layers, targets=camkit.TopK(5))
    assert len(calls) == 1 + 5
    assert batched.maps.shape == (2, 5, 64, 64)
    for layer in ("layer2", "layer4"):
        a, b = batched.raw[layer], looped.raw[layer]
        assert a.shape == (2, 5, *b.shape[2:])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    torch.testing.assert_close(batched.maps, looped.maps, rtol=1e-5, atol=1e-5)
    # and each target's map is the single-target explanation of that class
    for t in (0, 4) if method == "gradcam" else ():
        single = camkit.explain(
            resnet, x, method=method, layers=layers, targets=batched.classes[:, t].tolist()
        )
        torch.testing.assert_close(batched.maps[:, t], single.maps, rtol=1e-5, atol=1e-5)


def test_fallback_when_vmap_cannot_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    model = NoVmapHead().eval()
    x = torch.randn(3, 3, 32, 32)
    camkit.explain(model, x, layers="features.0", targets=camkit.TopK(3))  # the prepared copy checked
    calls = _count_grad_calls(monkeypatch)
    got = camkit.explain(model, x, layers="features.0", targets=camkit.TopK(3))
    assert calls == [True, False, False, False]  # the batched try, then one backward per target
    with monkeypatch.context() as m:
        _loop(m)
        want = camkit.explain(model, x, layers="features.0", targets=camkit.TopK(3))
    torch.testing.assert_close(got.raw["features.0"], want.raw["features.0"], rtol=1e-5, atol=1e-7)


def test_target_gradients_unused_leaf_and_single_row() -> None:
    a = torch.randn(2, 3, requires_grad=True)
    unused = torch.randn(2, 4, requires_grad=True)
    scores = torch.stack([(a * a).sum(1), a.sum(1), 3 * a[:, 0]])  # [T=3, B=2]
    grads = target_gradients(scores, [a, unused])
    assert len(grads) == 3
    torch.testing.assert_close(grads[0][0], 2 * a.detach())
    torch.testing.assert_close(grads[1][0], torch.ones(2, 3))
    torch.testing.assert_close(grads[2][0], torch.tensor([[3.0, 0, 0], [3.0, 0, 0]]))
    assert all(bool((g[1] == 0).all()) and g[1].shape == (2, 4) for g in grads)
    one = target_gradients(a.sum(1), [a])
    torch.testing.assert_close(one[0][0], torch.ones(2, 3))


class PackedDetector(nn.Module):
    """A stand-in detection model: D fixed boxes whose scores come from the features, packed as Tensor[B, D, 6]
    (x0, y0, x1, y1, score, label) like camkit.core.tasks.pack_detections."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6 * 16, 3)
        self.register_buffer(
            "boxes", torch.tensor([[0, 0, 16, 16], [16, 16, 32, 32], [0, 16, 16, 32]]).float()
        )

    def forward(self, x: Tensor) -> Tensor:
        f = nn.functional.adaptive_avg_pool2d(torch.tanh(self.features(x)), 4).flatten(1)
        scores = torch.sigmoid(self.head(f))  # [B, D]
        b = x.shape[0]
        boxes = self.boxes.expand(b, 3, 4)
        labels = torch.tensor([1.0, 2.0, 1.0]).expand(b, 3)
        return torch.cat([boxes, scores[..., None], labels[..., None]], dim=2)


def test_multi_label_and_multi_box_targets_share_one_backward(
    resnet: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64)
    camkit.explain(resnet, x, layers="layer3")  # the prepared copy checked for this shape and layer
    calls = _count_grad_calls(monkeypatch)
    per_label = camkit.explain(
        resnet, x, layers="layer3", targets=camkit.MultiLabelTarget([3, 7, 11], separate=True)
    )
    assert calls == [True] and per_label.maps.shape == (2, 3, 64, 64) and per_label.scores.shape == (2, 3)
    for t, c in ((0, 3), (2, 11)):
        single = camkit.explain(resnet, x, layers="layer3", targets=camkit.MultiLabelTarget(c))
        torch.testing.assert_close(per_label.maps[:, t], single.maps, rtol=1e-5, atol=1e-5)

    det = PackedDetector().eval()
    y = torch.randn(2, 3, 32, 32)
    boxes = [camkit.DetectionTarget([0, 0, 16, 16]), camkit.DetectionTarget([16, 16, 32, 32], label=2)]
    del calls[:]
    both = camkit.explain(det, y, layers="features.0", targets=camkit.EachTarget(boxes))
    assert calls[-1:] == [True] and both.maps.shape == (2, 2, 32, 32)
    for t, box in enumerate(boxes):
        single = camkit.explain(det, y, layers="features.0", targets=box)
        torch.testing.assert_close(both.maps[:, t], single.maps, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"Tensor\[B, T\]"):
        camkit.explain(det, y, method="scorecam", layers="features.0", targets=camkit.EachTarget(boxes))
    with pytest.raises(ValueError, match=r"Tensor\[B\] .* or Tensor\[B, T\]"):
        camkit.explain(det, y, layers="features.0", targets=lambda out: out[:, :, 4].T)
