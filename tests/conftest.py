"""Shared fixtures: tiny random-weight networks (weights do not matter), the ground-truth test bed and the real
pretrained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import testbed

torch.set_num_threads(2)


class TinyGapNet(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU(inplace) -> GAP -> Linear: a CAM-compatible head."""

    def __init__(self, k: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, k, 3, padding=1, stride=2),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(k, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class TinyNonlinearHead(nn.Module):
    """Features followed by a non-linear head, so dS/dA varies over space (distinguishes the methods)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Conv2d(6, 4, 1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.features(x))
        h = nn.functional.adaptive_avg_pool2d(h, 4) ** 2
        return self.fc(h.flatten(1))


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyGapNet().eval()


@pytest.fixture
def nonlinear() -> nn.Module:
    torch.manual_seed(1)
    return TinyNonlinearHead().eval()


@pytest.fixture
def x_small() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(4, 3, 16, 16)


@pytest.fixture(scope="session")
def trained_cnn(request: pytest.FixtureRequest) -> testbed.SmallCNN:
    """The trained test-bed CNN: trained once per session; kept between sessions in pytest's cache folder when
    the cache plugin is on (``-p no:cacheprovider`` works too, it only trains again)."""
    cache = getattr(request.config, "cache", None)
    return testbed.trained_model(Path(cache.mkdir("camkit-testbed")) if cache is not None else None)


@pytest.fixture(scope="session")
def testbed_data() -> testbed.Batch:
    return testbed.test_set(64)


@pytest.fixture(scope="session")
def pretrained():
    import camkit

    return camkit.load_model()


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything about a model that camkit must leave as it found it."""
    hooks = {}
    for name, m in model.named_modules():
        hooks[name] = tuple(
            len(getattr(m, attr))
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_forward_hooks_with_kwargs",
                "_state_dict_hooks",
            )
        )
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": hooks,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_unchanged(before: dict[str, object], model: nn.Module) -> None:
    after = snapshot(model)
    assert after["hooks"] == before["hooks"], "hooks left on the model"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["grad_mode"] == before["grad_mode"]
    for k, v in before["state"].items():  # type: ignore[union-attr]
        assert torch.equal(after["state"][k], v), f"state {k} changed"  # type: ignore[index]
    for k, g in before["grad"].items():  # type: ignore[union-attr]
        g2 = after["grad"][k]  # type: ignore[index]
        assert (g is None and g2 is None) or (g is not None and g2 is not None and torch.equal(g, g2)), k
