"""Random logit and MPRT against Quantus 0.6.0 (``RandomLogit``, ``MPRT``) on the same tiny random-weight CNN,
inputs, classes and explanation function (camkit's Grad-CAM), without Quantus's normalisation.

Random logit: Quantus draws the other class from numpy's global generator (``np.random.seed(42)``), camkit from a
seeded torch generator, so the test gives camkit the classes Quantus explained. Quantus's default similarity is
``skimage``'s SSIM of the *flattened* maps (a 1-D signal with a window of 7 values); camkit's is the 2-D SSIM of
the maps (Sixt et al. compare images), so Quantus is given its own ``ssim`` on the maps reshaped to 2-D.
MPRT: the same layers top down and the same re-initialised weights (camkit ``seed=43`` is Quantus's ``seed=42``,
which seeds 43 before each layer), Spearman correlation per layer. Measured: max |difference| below 1e-6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import quantus
import torch
from quantus.functions.similarity_func import ssim as quantus_ssim
from torch import Tensor, nn

import camkit
from camkit.metrics.randomisation import mprt, random_logit

pytestmark = [pytest.mark.slow, pytest.mark.reference]

ATOL = 1e-5
SIDE = 32


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def explain(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """camkit's maps: Grad-CAM at the last convolution."""
    return camkit.explain(model, x, "gradcam", layers="features.2", targets=classes.tolist()).maps


class QuantusExplain:
    """The same explanation as Quantus's ``explain_func``, remembering the classes it was asked for."""

    def __init__(self) -> None:
        self.targets: list[np.ndarray] = []

    def __call__(self, model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: Any) -> np.ndarray:
        self.targets.append(np.asarray(targets))
        return explain(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()


def ssim_2d(a: np.ndarray, b: np.ndarray, batched: bool = False, **kw: Any) -> Any:
    return quantus_ssim(a.reshape(-1, SIDE, SIDE), b.reshape(-1, SIDE, SIDE), batched=True, **kw)


@pytest.fixture(scope="module")
def case() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 3, SIDE, SIDE)
    classes = torch.tensor([0, 1, 2, 3])
    return model, x, classes, explain(model, x, classes)


def test_random_logit_is_quantus(case: tuple[nn.Module, Tensor, Tensor, Tensor]) -> None:
    model, x, classes, maps = case
    ref_explain = QuantusExplain()
    ref = quantus.RandomLogit(
        num_classes=5, seed=42, similarity_func=ssim_2d, normalise=False, disable_warnings=True
    )
    want = ref(
        model=model,
        x_batch=x.numpy(),
        y_batch=classes.numpy(),
        a_batch=maps[:, None].numpy(),
        explain_func=ref_explain,
        device="cpu",
    )
    (others,) = ref_explain.targets
    assert not (others == classes.numpy()).any()
    got = random_logit(model, x, maps, explain, classes, others=torch.as_tensor(others))
    np.testing.assert_allclose(got.double().numpy(), np.asarray(want, dtype=np.float64), atol=ATOL, rtol=0)
    assert float(got.min()) < 0.9  # another class's map differs: the comparison is not of equal maps


def test_mprt_is_quantus(case: tuple[nn.Module, Tensor, Tensor, Tensor]) -> None:
    model, x, classes, maps = case
    with torch.random.fork_rng():
        ref = quantus.MPRT(seed=42, normalise=False, abs=False, disable_warnings=True)
        want = ref(
            model=model,
            x_batch=x.numpy(),
            y_batch=classes.numpy(),
            a_batch=maps[:, None].numpy(),
            explain_func=QuantusExplain(),
            device="cpu",
        )
    got = mprt(model, x, maps, explain, classes)
    layers = [k for k in want if k != "original"]
    assert got.steps == layers == ["fc", "features.2", "features.0"]
    np.testing.assert_allclose(
        got.correlation.double().numpy(), np.array([want[k] for k in layers]), atol=ATOL
    )
    assert float(got.last.max()) < 0.9  # the randomised model's maps differ


def test_mprt_independent_is_quantus(case: tuple[nn.Module, Tensor, Tensor, Tensor]) -> None:
    """``layer_order="independent"``: each layer re-initialised alone on the trained weights, as Quantus'."""
    model, x, classes, maps = case
    with torch.random.fork_rng():
        ref = quantus.MPRT(
            seed=42, layer_order="independent", normalise=False, abs=False, disable_warnings=True
        )
        want = ref(
            model=model,
            x_batch=x.numpy(),
            y_batch=classes.numpy(),
            a_batch=maps[:, None].numpy(),
            explain_func=QuantusExplain(),
            device="cpu",
        )
    got = mprt(model, x, maps, explain, classes, layer_order="independent")
    assert sorted(got.steps) == sorted(k for k in want if k != "original")
    np.testing.assert_allclose(
        got.correlation.double().numpy(), np.array([want[k] for k in got.steps]), atol=ATOL
    )
    cascade = mprt(model, x, maps, explain, classes)
    assert not torch.allclose(got.correlation[1:], cascade.correlation[1:])  # the earlier steps are undone
