"""FEM, Seg-Eigen-CAM and RefineCAM (the multi-layer product) against pytorch-grad-cam 1.5.7 and torchcam 0.5.0,
on a tiny random-weight CNN with the same explicit classes for every library.

Measured (the bounds below): FEM, Seg-Eigen-CAM and RefineCAM (on Grad-CAM, LayerCAM and the paper's Grad-CAM++)
equal pytorch-grad-cam's maps to Pearson > 0.9999 per image (the residue: cv2's resize against torch's bilinear
one). pytorch-grad-cam's stock RefineCAM uses its Grad-CAM++ with eps = 1e-6 in alpha's denominator (not the
paper's): 0.949 to 0.983 here (``PGC_EPS_REFINE_MIN``). torchcam's RefineCAM multiplies the normalised layer maps at
the largest layer's resolution (the caller upsamples after); camkit and pytorch-grad-cam multiply at the input
size: equal (> 0.9999) when the largest layer is at the input size, 0.963 to 0.985 for layers of 16 and 8 px on
32 px inputs (``TORCHCAM_REFINE_MIN``).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import pytorch_grad_cam.utils.model_targets as pgc_targets
import torch
import torch.nn.functional as F
import torchcam.methods as tcm
from torch import Tensor, nn

import camkit
from camkit.methods.refine import refinecam

pytestmark = [pytest.mark.slow, pytest.mark.reference]


MIN_PEARSON = 0.999
TORCHCAM_REFINE_MIN = 0.96
PGC_EPS_REFINE_MIN = 0.94
LAYERS = ("features.1", "features.3", "features.5")


class Net(nn.Module):
    """conv-ReLU x 6 (32 -> 8 px, layers at 32, 16 and 8 px), GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Tensor, list[int]]:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 3, 32, 32)
    classes = [1, 3, 0]
    return model, x, classes


def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(np.asarray(a)).double().flatten(1)
    y = torch.as_tensor(np.asarray(b)).double().flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1))


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def pgc_map(cls: type, model: nn.Module, x: Tensor, classes: list[int], layers: list[str]) -> np.ndarray:
    cam = cls(model, [module(model, n) for n in layers])
    targets = [pgc_targets.ClassifierOutputTarget(c) for c in classes]
    return np.asarray(cam(input_tensor=x, targets=targets))


@pytest.mark.parametrize(("name", "peer"), [("fem", "FEM"), ("segeigencam", "SegEigenCAM")])
@pytest.mark.parametrize("layer", ["features.3", "features.5"])
def test_fem_and_segeigencam_equal_pytorch_grad_cam(setup, name: str, peer: str, layer: str) -> None:
    model, x, classes = setup
    mine = camkit.explain(model, x, name, layers=layer, targets=classes).maps
    ref = pgc_map(getattr(pgc, peer), model, x, classes, [layer])
    r = pearson(mine, ref)
    assert (r > MIN_PEARSON).all(), r
    assert np.abs(mine.numpy() - ref).max() < 0.02


class PaperGradCAMPlusPlus(pgc.GradCAMPlusPlus):  # type: ignore[misc,name-defined]
    """pytorch-grad-cam's Grad-CAM++ without its eps = 1e-6 in alpha's denominator: the paper's eq. 19, camkit's."""

    def get_cam_weights(self, input_tensor, target_layers, target_category, activations, grads):  # type: ignore[no-untyped-def]
        g2 = grads**2
        total = activations.sum(axis=(2, 3), keepdims=True)
        denom = 2 * g2 + total * g2 * grads
        with np.errstate(divide="ignore", invalid="ignore"):
            aij = np.where((grads != 0) & (denom != 0), g2 / np.where(denom != 0, denom, 1), 0)
        return (np.maximum(grads, 0) * aij).sum(axis=(2, 3))


def pgc_refine(model: nn.Module, x: Tensor, classes: list[int], base: type, layers=LAYERS) -> np.ndarray:
    cam = pgc.RefineCAM(model, [module(model, n) for n in layers], base_method=base)
    return np.asarray(cam(x, [pgc_targets.ClassifierOutputTarget(c) for c in classes]))


@pytest.mark.parametrize(
    ("base", "peer"), [("gradcam++", PaperGradCAMPlusPlus), ("gradcam", "GradCAM"), ("layercam", "LayerCAM")]
)
def test_refinecam_equals_pytorch_grad_cam(setup, base: str, peer: type | str) -> None:
    model, x, classes = setup
    mine = camkit.explain(model, x, refinecam(base), layers=",".join(LAYERS), targets=classes)
    assert mine.method == ("refinecam" if base == "gradcam++" else f"refinecam(base={base!r})")
    ref = pgc_refine(model, x, classes, getattr(pgc, peer) if isinstance(peer, str) else peer)
    r = pearson(mine.maps, ref)
    assert (r > MIN_PEARSON).all(), r
    assert np.abs(mine.maps.numpy() - ref).max() < 0.02


def test_refinecam_against_pytorch_grad_cams_eps(setup) -> None:
    """pytorch-grad-cam's stock RefineCAM (its Grad-CAM++ with eps = 1e-6, not the paper's; see
    tests/peers/test_reference.py): on this model's small gradients eps changes each layer's map (Pearson 0.94 to
    0.9998 per layer), so the product too: PGC_EPS_REFINE_MIN pins it."""
    model, x, classes = setup
    mine = camkit.explain(model, x, "refinecam", layers=",".join(LAYERS), targets=classes).maps
    r = pearson(mine, pgc_refine(model, x, classes, pgc.GradCAMPlusPlus))
    assert (r > PGC_EPS_REFINE_MIN).all(), r


def _torchcam_refine(
    model: nn.Module, x: Tensor, classes: list[int], layers: tuple[str, ...] = LAYERS
) -> Tensor:
    """torchcam's RefineCAM on Grad-CAM (its Grad-CAM++ never applies alpha's denominator: tests/peers/test_reference.py)."""
    with tcm.RefineCAM(model, list(layers), input_shape=(3, 32, 32), base_method=tcm.GradCAM) as extractor:
        scores = model(x)
        out = extractor(class_idx=classes, scores=scores)[0]
    return out.detach()


def test_refinecam_against_torchcam(setup) -> None:
    model, x, classes = setup
    mine = camkit.explain(model, x, refinecam("gradcam"), layers=",".join(LAYERS), targets=classes).maps
    # torchcam's product at the largest layer's size (32 px here = the input): then the same as camkit's
    same = _torchcam_refine(model, x, classes)
    assert same.shape == mine.shape
    r = pearson(mine, same)
    assert (r > MIN_PEARSON).all(), r
    # layers of 16 and 8 px: torchcam multiplies at 16 px, upsampled after; camkit at 32 px. Pinned here
    deep = ",".join(LAYERS[1:])
    mine = camkit.explain(model, x, refinecam("gradcam"), layers=deep, targets=classes).maps
    small = _torchcam_refine(model, x, classes, LAYERS[1:])
    up = F.interpolate(small[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    r = pearson(mine, up)
    assert (r > TORCHCAM_REFINE_MIN).all(), r
