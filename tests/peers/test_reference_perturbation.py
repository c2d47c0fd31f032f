"""Score-CAM and Ablation-CAM against pytorch-grad-cam 1.5.7 and torchcam 0.5.0.

Setting: torchvision ResNet-18 with random weights (the definitions, not the weights, are under test), two 48x48
random images, explicit classes. Pearson correlation of the maps at input size, per image.

* Score-CAM. The paper's authors weight channel k by the class *probability* of the masked input (camkit's
  default). torchcam uses a softmax over channels of the masked logits: camkit's ``weighting="channel-softmax"``
  reproduces it. pytorch-grad-cam does the same and also upsamples the masks with ``align_corners=True``
  (``nn.UpsamplingBilinear2d``): adding ``align_corners=True`` reproduces it. The paper's variant is pinned as
  different from both.
* Ablation-CAM. On ``layer4`` (after a ReLU, minimum 0) pytorch-grad-cam zeroes the channel as the paper does.
  On a signed layer it means to write ``min(A) - 1e7`` instead, but it recomputes the minimum over the batch it is
  modifying, so row i of each batch of ablations gets ``min - (i + 1) * 1e7``: the weight of a channel depends on
  its position in the batch. camkit's ``ablation="gradcam-min"`` implements the documented intent (every channel
  gets ``min - 1e7``; tested against a hand loop in test_perturbation.py); the cumulative effect is pinned here.

Score-CAM runs on ``layer3`` (256 channels) to keep the five full Score-CAM runs in CI's time.
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
from camkit import PerturbationOptions

pytestmark = [pytest.mark.slow, pytest.mark.reference]


torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Tensor, list[int]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        classes = model(x).argmax(dim=1).tolist()
    return model, x, classes


def _pearson(a: object, b: object) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _gradcam_lib(cls: type, model: nn.Module, layer: nn.Module, x: Tensor, classes: list[int]) -> np.ndarray:
    targets = [pgc_targets.ClassifierOutputTarget(c) for c in classes]
    with cls(model, [layer]) as cam:
        if hasattr(cam, "batch_size"):
            cam.batch_size = 64
        return cam(x, targets)


def _torchcam_scorecam(model: nn.Module, x: Tensor, classes: list[int]) -> Tensor:
    extractor = tcm.ScoreCAM(model, "layer3", batch_size=64, input_shape=tuple(x.shape[1:]))
    try:
        with torch.no_grad():
            out = model(x)
        maps = extractor(classes, out)[0]
    finally:
        extractor.remove_hooks()
    return F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def test_scorecam_variants(setup: tuple[nn.Module, Tensor, list[int]]) -> None:
    model, x, classes = setup

    def ours(**kw: object) -> Tensor:
        return camkit.explain(
            model, x, "scorecam", "layer3", classes, perturbation=PerturbationOptions(**kw)
        ).maps

    torchcam_maps = _torchcam_scorecam(model, x, classes)
    gradcam_maps = _gradcam_lib(pgc.ScoreCAM, model, model.layer3, x, classes)
    softmax = ours(weighting="channel-softmax")
    softmax_ac = ours(weighting="channel-softmax", align_corners=True)
    paper = ours()
    for i in range(2):
        assert _pearson(softmax[i], torchcam_maps[i]) >= 0.9999
        assert _pearson(softmax_ac[i], gradcam_maps[i]) >= 0.9999
    # the paper's weighting (class probability, no softmax over channels) is a different map (measured max
    # difference 0.0245 on [0, 1] maps; the exact reproductions above differ by < 1e-4)
    assert (paper - softmax).abs().amax() > 0.01


def test_ablation_variants(setup: tuple[nn.Module, Tensor, list[int]]) -> None:
    model, x, classes = setup
    lib = _gradcam_lib(pgc.AblationCAM, model, model.layer4, x, classes)
    ours = camkit.explain(model, x, "ablationcam", "layer4", classes).maps
    for i in range(2):
        assert _pearson(ours[i], lib[i]) >= 0.9999

    # pytorch-grad-cam's AblationLayer on a signed activation: the value written drifts down by 1e7 per row
    ablation = pgc.ablation_layer.AblationLayer()
    acts = torch.tensor([[[[-1.0, 2.0]], [[0.5, 3.0]]]])  # [1, 2, 1, 2], minimum -1
    ablation.set_next_batch(input_batch_index=0, activations=acts, num_channels_to_ablate=3)
    ablation.indices = np.array([0, 1, 0])
    out = ablation(None)
    written = [float(out[0, 0, 0, 0]), float(out[1, 1, 0, 0]), float(out[2, 0, 0, 0])]
    assert written == pytest.approx([-1 - 1e7, -1 - 2e7, -1 - 3e7])


@pytest.mark.parametrize(("ours", "theirs"), [("scorecam", "ScoreCAM"), ("iscam", "ISCAM")])
def test_score_cam_family_on_clips_vs_torchcam(ours: str, theirs: str) -> None:
    """torchcam 0.5.0 explains Conv3d models with its Score-CAM family; camkit's clip masks (trilinear, min-max
    over the whole volume) give the same maps with its variant (softmax over channels of the masked logits)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(8, 8, 3, padding=1, stride=(1, 2, 2)),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    extractor = getattr(tcm, theirs)(model, target_layer=model[2], input_shape=tuple(x.shape[1:]))
    try:
        with torch.no_grad():
            out = model(x)  # with torchcam's hooks on
        classes = out.argmax(dim=1).tolist()
        theirs_maps = extractor(classes, out)[0]  # [B, t, h, w] at the layer's grid
    finally:
        extractor.remove_hooks()
    options = PerturbationOptions(weighting="channel-softmax", integration_steps=10)
    mine = camkit.explain(model, x, ours, "2", classes, perturbation=options)
    for i in range(2):
        assert _pearson(mine.raw["2"][i].clamp(min=0), theirs_maps[i]) >= 0.9999, (ours, i)
