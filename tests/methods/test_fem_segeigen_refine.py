"""FEM, Seg-Eigen-CAM and RefineCAM (the multi-layer product): known answers on tiny models, computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import camkit
from camkit.errors import CamkitError
from camkit.methods import get_method
from camkit.methods.fem import fem, fem_map
from camkit.methods.multiscale import multiscalecam
from camkit.methods.projection import signed_component
from camkit.methods.refine import refinecam
from testbed import GapHead


def test_fem_by_hand() -> None:
    # channel 0: one spike among 9 positions (mean 1, std sqrt(8)) -> 1 of 9 above mean + 2 std (6.66);
    # channel 1: constant -> none above; channel 2: spike at 4 of 9 over k = 0 -> 4/9 above the mean
    a = torch.zeros(1, 3, 3, 3)
    a[0, 0, 1, 1] = 9.0
    a[0, 1] += 5.0
    a[0, 2, 0] = 3.0
    a[0, 2, 1, 0] = 3.0
    m = fem_map(a)
    torch.testing.assert_close(m, a[:, 0] / 9)
    m0 = fem_map(a, k=0.0)
    torch.testing.assert_close(m0, a[:, 0] / 9 + a[:, 2] * 4 / 9)


def test_fem_method_is_class_agnostic_and_configurable() -> None:
    torch.manual_seed(0)
    a = torch.rand(2, 6, 5, 5) ** 4
    model = GapHead(torch.randn(3, 6)).eval()
    e0 = camkit.explain(model, a, "fem", layers="feat", targets=0)
    e1 = camkit.explain(model, a, "FEM", layers="feat", targets=2)
    torch.testing.assert_close(e0.maps, e1.maps)
    torch.testing.assert_close(e0.raw["feat"], fem_map(a))
    assert fem(3).name == "fem(k=3.0)" and fem().name == "fem"
    torch.testing.assert_close(camkit.explain(model, a, fem(1), layers="feat").raw["feat"], fem_map(a, 1.0))
    with pytest.raises(CamkitError, match="finite number"):
        fem(float("nan"))


def test_segeigen_projection_sign_and_gradient_weighting() -> None:
    # 4 positions on a line in 2 channels: the centred projection is (t - mean) * |(1, 2)| up to sign; eq. 13
    # makes the entry of largest magnitude positive (t = 0 is farthest from the mean 3).
    a = torch.tensor([[[[0.0, 4.0], [4.0, 4.0]], [[0.0, 8.0], [8.0, 8.0]]]])
    proj = signed_component(a)[0].flatten().double()
    expected = -(torch.tensor([0.0, 4.0, 4.0, 4.0]).double() - 3.0) * 5**0.5
    torch.testing.assert_close(proj, expected, rtol=1e-5, atol=1e-5)
    # through explain: GapHead's dS/dA = W[c] / (h w), so |g| * A weights channel k by |W[c, k]| / 4
    w = torch.tensor([[-2.0, 1.0]])
    e = camkit.explain(GapHead(w).eval(), a, "seg-eigen-cam", layers="feat", targets=0)
    g = w[0].abs()[None, :, None, None] / 4
    torch.testing.assert_close(e.raw["feat"], signed_component(g * a))
    assert get_method("segeigencam").needs_grad


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean(dim=(2, 3)))


def _minmax(t: Tensor) -> Tensor:
    flat = t.flatten(1)
    flat = flat - flat.amin(dim=1, keepdim=True)
    return (flat / flat.amax(dim=1, keepdim=True)).reshape(t.shape)


@pytest.mark.parametrize("base", ["gradcam++", "gradcam", "eigencam"])
def test_refinecam_is_the_product_of_the_normalised_layer_maps(base: str) -> None:
    torch.manual_seed(0)
    model = TwoLayers().eval()
    x = torch.randn(2, 3, 16, 16)
    method = refinecam(base)
    e = camkit.explain(model, x, method, layers="a,b", targets=[0, 2])
    assert e.method == method.name and list(e.raw) == ["refinecam"]
    per = [camkit.explain(model, x, base, layers=name, targets=[0, 2]).raw[name] for name in ("a", "b")]
    up = [_minmax(F.interpolate(torch.relu(r)[:, None], size=(16, 16), mode="bilinear")[:, 0]) for r in per]
    torch.testing.assert_close(e.maps, _minmax(up[0] * up[1]), atol=1e-5, rtol=1e-5)
    # one layer: the base method's map
    one = camkit.explain(model, x, method, layers="b", targets=[0, 2])
    base_map = camkit.explain(model, x, base, layers="b", targets=[0, 2]).maps
    torch.testing.assert_close(one.maps, base_map, atol=1e-5, rtol=1e-5)
    k2 = camkit.explain(model, x, method, layers="a,b", targets=camkit.TopK(2))
    assert k2.maps.shape == (2, 2, 16, 16)


def test_refinecam_is_the_peers_method_and_the_multiscale_one_is_multiscalecam() -> None:
    assert get_method("refinecam").paper.startswith("How to Evaluate and Refine your CAM")
    assert get_method("refine-cam").name == "refinecam"
    for alias in ("multiscalecam", "multiscale", "sess"):
        assert get_method(alias).name == "multiscalecam"
    assert multiscalecam().name == "multiscalecam"
    with pytest.raises(CamkitError, match="multiscalecam"):
        refinecam((1.0, 2.0))  # type: ignore[arg-type]
    with pytest.raises(CamkitError, match=r"scales belonged to the multi-scale method.*multiscalecam"):
        refinecam(scales=(1.0, 2.0))
    with pytest.raises(CamkitError, match="layer method"):
        refinecam("cam")
