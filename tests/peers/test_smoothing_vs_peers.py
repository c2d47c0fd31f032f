"""Eigen-smoothing and test-time augmentation as options of any layer method: known answers and agreement with
pytorch-grad-cam 1.5.7's ``eigen_smooth`` and ``aug_smooth``."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

import camkit
from camkit import Augment
from camkit.core.capture import capture
from camkit.methods.projection import smooth_projection


def _pearson(a, b) -> float:
    a = a.detach().double().flatten().numpy() if isinstance(a, torch.Tensor) else np.asarray(a).flatten()
    b = b.detach().double().flatten().numpy() if isinstance(b, torch.Tensor) else np.asarray(b).flatten()
    return float(np.corrcoef(a, b)[0, 1])


class Net(nn.Module):
    """Small CNN with a non-linear head at 32 px (random weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Conv2d(12, 6, 1), nn.Tanh())
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(self.head(self.features(x)), 4).flatten(1))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def test_smooth_projection_of_rank_one_terms_is_the_spatial_factor():
    # terms_k = u_k * m: the centred first component is m minus its mean, with the plain map's sign
    torch.manual_seed(0)
    m = torch.rand(5, 6)
    u = torch.rand(4) + 0.1
    terms = (u[:, None, None] * m)[None]
    got = smooth_projection(terms)[0]
    expected = (m - m.mean()) * u.norm()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        smooth_projection(-terms)[0], -expected, rtol=1e-5, atol=1e-6
    )  # follows the sum


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "gradcam++", "xgradcam"])
def test_eigen_smooth_is_the_first_component_of_the_weighted_activations(net, method):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    e = camkit.explain(net, x, method, "features.3", targets=[1, 3], eigen_smooth=True)
    cap = capture(
        net, x, {"features.3": net.features[3]}, lambda o: o.gather(1, torch.tensor([[1], [3]]))[:, 0]
    )
    a, g = cap.activations["features.3"], cap.gradients["features.3"]
    assert isinstance(g, torch.Tensor)
    terms = {
        "gradcam": g.mean(dim=(2, 3), keepdim=True) * a,
        "hirescam": g * a,
        "layercam": torch.relu(g) * a,
    }
    if method in terms:
        torch.testing.assert_close(
            e.raw["features.3"], smooth_projection(terms[method]), rtol=1e-4, atol=1e-6
        )
        ref = torch.from_numpy(
            get_2d_projection(terms[method].numpy())
        )  # pytorch-grad-cam, its arbitrary sign
        for i in range(2):
            assert abs(_pearson(e.raw["features.3"][i], ref[i])) > 0.9999
    plain = camkit.explain(net, x, method, "features.3", targets=[1, 3])
    assert not torch.allclose(plain.raw["features.3"], e.raw["features.3"])


def test_eigen_smooth_agrees_with_pytorch_grad_cam_end_to_end(net):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32)
    e = camkit.explain(net, x, "gradcam", "features.3", targets=2, eigen_smooth=True)
    with pgc.GradCAM(net, [net.features[3]]) as cam:
        ref = cam(x, [ClassifierOutputTarget(2)], eigen_smooth=True)
    # pytorch-grad-cam keeps the SVD's arbitrary sign: compare with camkit's map of either sign
    r_pos = _pearson(e.maps[0], ref[0])
    neg = camkit.core.postprocess.normalize(
        camkit.core.postprocess.upsample(torch.relu(-e.raw["features.3"]), (32, 32))
    )
    r = max(r_pos, _pearson(neg[0], ref[0]))
    assert r > 0.999


def test_eigen_smooth_for_scorecam_weights_and_refused_for_projections(net):
    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 32)
    plain = camkit.explain(net, x, "ablationcam", "features.3", targets=0)
    smooth = camkit.explain(net, x, "ablationcam", "features.3", targets=0, eigen_smooth=True)
    assert smooth.raw["features.3"].shape == plain.raw["features.3"].shape
    assert _pearson(smooth.raw["features.3"], plain.raw["features.3"]) > 0  # sign follows the plain map
    with pytest.raises(ValueError, match="sum over channels"):
        camkit.explain(net, x, "eigencam", "features.3", eigen_smooth=True)
    with pytest.raises(TypeError, match="eigen_smooth"):
        camkit.explain(net, x, "gradcam", "features.3", eigen_smooth="yes")  # type: ignore[arg-type]


def test_eigen_smooth_for_cam_projects_the_classifier_weighted_activations(tiny):
    torch.manual_seed(7)
    x = torch.randn(2, 3, 16, 16)
    e = camkit.explain(tiny, x, "cam", "features.3", targets=[1, 2], eigen_smooth=True)
    a = capture(tiny, x, {"features.3": tiny.features[3]}).activations["features.3"]
    w = tiny.fc.weight.detach()[[1, 2]]
    torch.testing.assert_close(
        e.raw["features.3"], smooth_projection(w[:, :, None, None] * a), rtol=1e-4, atol=1e-6
    )


def test_augment_by_hand_flip(net):
    """augment='flip' = mean of the map and the mirrored map of the mirrored input, renormalised."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    e = camkit.explain(net, x, "gradcam", "features.3", targets=[0, 4], augment="flip")
    a = camkit.explain(net, x, "gradcam", "features.3", targets=[0, 4])
    b = camkit.explain(net, x.flip(-1), "gradcam", "features.3", targets=[0, 4])
    expected = camkit.core.postprocess.normalize((a.maps + b.maps.flip(-1)) / 2)
    torch.testing.assert_close(e.maps, expected)
    torch.testing.assert_close(e.raw["features.3"], a.raw["features.3"])  # raw, scores: the original input's
    torch.testing.assert_close(e.scores, a.scores)
    both = camkit.compare(net, x, ["gradcam", "layercam"], "features.3", targets=[0, 4], augment="flip")
    torch.testing.assert_close(both["gradcam"].maps, expected)
    assert set(both) == {"gradcam", "layercam"}


def test_augment_scale_is_warped_back(net):
    torch.manual_seed(5)
    x = torch.randn(1, 3, 32, 32)
    e = camkit.explain(net, x, "gradcam", "features.3", targets=1, augment=[Augment(scale=2.0)])
    big = camkit.explain(
        net,
        torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear"),
        "gradcam",
        "features.3",
        targets=1,
    )
    small = torch.nn.functional.interpolate(big.maps[:, None], size=(32, 32), mode="bilinear")[:, 0]
    torch.testing.assert_close(e.maps, camkit.core.postprocess.normalize(small))


def test_augment_agrees_with_pytorch_grad_cam_aug_smooth(net):
    torch.manual_seed(6)
    x = torch.randn(1, 3, 32, 32)
    e = camkit.explain(net, x, "gradcam", "features.3", targets=3, augment=True)
    with pgc.GradCAM(net, [net.features[3]]) as cam:
        ref = cam(x, [ClassifierOutputTarget(3)], aug_smooth=True)
    assert _pearson(e.maps[0], ref[0]) > 0.999


def test_augment_argument_checks(net):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown augment"):
        camkit.explain(net, x, augment="rotate")
    with pytest.raises(ValueError, match="TopK"):
        camkit.explain(net, x, "gradcam", "features.3", targets=camkit.TopK(2), augment=True)
    with pytest.raises(ValueError, match=r"Augment\.scale"):
        Augment(scale=0)
    with pytest.raises(TypeError, match=r"list of camkit\.Augment"):
        camkit.explain(net, x, augment=[1.0])  # type: ignore[list-item]
    assert not any(m._forward_hooks for m in net.modules())


def test_cli_eigen_smooth_and_augment(tmp_path):
    """`camkit explain --eigen-smooth --augment flip` on the offline default model and sample photo."""
    import json

    from typer.testing import CliRunner

    from camkit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["explain", "--augment", "rotate", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--augment" in res.output
    res = runner.invoke(
        app, ["explain", "--eigen-smooth", "--augment", "flip", "--max-side", "128", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary[0]["options"]["eigen_smooth"] is True and summary[0]["options"]["augment"] == "flip"
    assert (tmp_path / "chelsea_gradcam.png").exists()
