"""Max-Sensitivity and Avg-Sensitivity of :mod:`camkit.metrics.robustness` against Quantus 0.6.0, on the same tiny
random-weight CNN, inputs, classes and method (camkit's Grad-CAM, run by both on the perturbed inputs).

The noise draws are the same on both sides: camkit's :func:`uniform_noise` (seeded) is fed to Quantus through its
``perturb_func`` argument, one draw per call; then the values agree to 1e-5 (relative).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import quantus
import torch
from torch import Tensor, nn

import camkit
from camkit.metrics import robustness

pytestmark = [pytest.mark.reference]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.features(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_sensitivity_equals_quantus(kind: str) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    classes = [1, 3]
    samples, radius, seed = 3, 0.2, 4

    def remap(z: Tensor) -> Tensor:
        return camkit.explain(model, z, "gradcam", layers="features.2", targets=classes).maps

    maps = remap(x)
    noise = robustness.uniform_noise(tuple(x.shape), samples, radius, seed)
    draw = iter(range(samples))

    def perturb(arr: np.ndarray, indices: np.ndarray, **kwargs: Any) -> np.ndarray:
        return arr + noise[next(draw)].reshape(arr.shape).numpy()

    def explain(model: Any, inputs: np.ndarray, targets: np.ndarray, **kwargs: Any) -> np.ndarray:
        return remap(torch.as_tensor(inputs))[:, None].numpy()

    cls = quantus.MaxSensitivity if kind == "max" else quantus.AvgSensitivity
    metric = cls(nr_samples=samples, lower_bound=radius, perturb_func=perturb, disable_warnings=True)
    ref = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=np.array(classes),
        a_batch=maps[:, None].numpy(),
        explain_func=explain,
        device="cpu",
        channel_first=True,
    )
    result = robustness.sensitivity(model, x, maps, remap, samples=samples, radius=radius, seed=seed)
    ours = result.max if kind == "max" else result.mean
    assert float(ours.min()) > 0.01  # the maps do move
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref), rtol=1e-5)


def test_noise_bounds_are_quantus_upper_bound(monkeypatch) -> None:
    """``radius=(low, high)``: noise from U(low, high), Quantus' ``lower_bound`` and ``upper_bound`` with its own
    ``batch_uniform_noise``; camkit's draws are fed to Quantus' ``np.random.uniform``, which must be asked for
    the same bounds."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    classes = [1, 3]

    def remap(z: Tensor) -> Tensor:
        return camkit.explain(model, z, "gradcam", layers="features.2", targets=classes).maps

    maps = remap(x)
    noise = robustness.uniform_noise(tuple(x.shape), 2, (0.05, 0.3), seed=1)
    assert float(noise.min()) >= 0.05 and float(noise.max()) < 0.3
    draw = iter(range(2))

    def uniform(low: float, high: float, size: tuple[int, ...]) -> np.ndarray:
        assert (low, high) == (0.05, 0.3)
        return noise[next(draw)].reshape(size).double().numpy()

    monkeypatch.setattr(np.random, "uniform", uniform)
    metric = quantus.MaxSensitivity(nr_samples=2, lower_bound=0.05, upper_bound=0.3, disable_warnings=True)
    ref = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=np.array(classes),
        a_batch=maps[:, None].numpy(),
        explain_func=lambda model, inputs, targets, **kw: remap(torch.as_tensor(inputs))[:, None].numpy(),
        device="cpu",
        channel_first=True,
    )
    ours = robustness.sensitivity(model, x, maps, remap, samples=2, radius=(0.05, 0.3), seed=1).max
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref), rtol=1e-5)
