"""Known-answer tests of the candidate methods (Recipro-CAM, CAMERAS, Poly-CAM, Opti-CAM) on tiny models whose
maps can be computed by hand from each paper's formula."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camkit
from camkit.core.targets import TopK
from camkit.methods import get_method
from camkit.methods.engine import PerturbationOptions
from camkit.methods.registry import PassInput
from camkit.methods.sharper import cameras, polycam_recursion


def _gap_net(seed: int = 0) -> nn.Sequential:
    """conv 3->4 (the target, 'feat') -> GAP -> Linear 4->3: dS/dA and the head are known in closed form."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            feat=nn.Conv2d(3, 4, 3, padding=1, stride=2),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 3),
        )
    ).eval()


def _state(model: nn.Module) -> list[object]:
    return [
        (n, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    ] + [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()]


def test_reciprocam_is_the_class_probability_with_one_cell_kept() -> None:
    """Byun & Lee 2022: S(i, j) = softmax(head(A * onehot_ij))_c, here head = fc(GAP(.))."""
    model = _gap_net()
    x = torch.randn(2, 3, 8, 8)
    before = _state(model)
    expl = camkit.explain(model, x, method="reciprocam", layers="feat", targets=[1, 2])
    raw = expl.raw["reciprocam"]
    with torch.no_grad():
        a = model.feat(x)  # [2, 4, 4, 4]
        h, w = a.shape[-2:]
        want = torch.zeros(2, h, w)
        for b, c in enumerate((1, 2)):
            for i in range(h):
                for j in range(w):
                    pooled = a[b, :, i, j] / (h * w)  # GAP of a map that is zero except at (i, j)
                    want[b, i, j] = torch.softmax(model.fc(pooled[None]), dim=1)[0, c]
    torch.testing.assert_close(raw, want, rtol=1e-5, atol=1e-6)
    assert _state(model) == before


def test_cameras_accumulates_activations_and_gradients_over_scales() -> None:
    """Jalwana et al. 2021: ReLU(sum_k mean_r up(A_r)_k * mean_r up(G_r)_k); for GAP + Linear, G_r = W_c / (h w)."""
    model = _gap_net(1)
    x = torch.randn(1, 3, 8, 8)
    c = 2
    inp = PassInput(model, x, {"feat": model.feat}, lambda o: o, torch.tensor([c]), None)
    got = cameras(inp, scales=(1.0, 2.0))
    with torch.no_grad():
        a1 = model.feat(x)  # 4x4 grid
        a2 = model.feat(F.interpolate(x, size=(16, 16), mode="bilinear"))  # 8x8 grid
        wc = model.fc.weight[c][None, :, None, None]
        g1 = wc.expand_as(a1) / 16
        g2 = wc.expand_as(a2) / 64
        up = lambda t: F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)  # noqa: E731
        want = (((up(a1) + a2) / 2) * ((up(g1) + g2) / 2)).sum(dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # through explain: the registered method, map at the largest grid, model untouched
    before = _state(model)
    expl = camkit.explain(model, x, method="cameras", layers="feat", targets=c)
    assert expl.raw["cameras"].shape == (1, 8, 8)  # default scales 1, 1.5, 2: the x2 grid
    assert _state(model) == before


def test_polycam_recursion_redistributes_the_coarse_map_inside_each_cell() -> None:
    """Englebert et al. 2022: S_l = up(S_{l+1}) * M_l / up(avgpool(M_l)). With a constant coarse map and shallow
    blocks of equal mean, S_1 = S_2 * M_1 exactly; the shallow map's resolution is kept."""
    coarse = torch.full((1, 2, 2), 3.0)
    fine = torch.tensor(
        [[[1.0, 3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]
    )
    # every 2x2 block of `fine` has mean 1
    out = polycam_recursion([fine, coarse])
    torch.testing.assert_close(out, 3.0 * fine)
    # one layer: the map itself
    torch.testing.assert_close(polycam_recursion([coarse]), coarse)
    # a cell where the coarse map is zero stays zero whatever the fine map says
    coarse2 = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    out2 = polycam_recursion([torch.ones(1, 4, 4), coarse2])
    assert float(out2[0, 0, 0]) == 0.0 and out2.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="at least one"):
        polycam_recursion([])


def test_polycam_uses_the_shallowest_layer_grid() -> None:
    model = nn.Sequential(
        OrderedDict(
            c1=nn.Conv2d(3, 4, 3, padding=1),
            r1=nn.ReLU(),
            c2=nn.Conv2d(4, 4, 3, padding=1, stride=2),
            r2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 3),
        )
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    before = _state(model)
    expl = camkit.explain(model, x, method="polycam", layers="r1,r2", targets=0)
    assert expl.raw["polycam"].shape == (1, 8, 8)
    auto = camkit.explain(model, x, method="polycam", targets=0)  # one layer: the last of each resolution
    assert auto.raw["polycam"].shape == (1, 8, 8)
    assert _state(model) == before


class _Quadrants(nn.Module):
    """feat = identity on 2 channels; score of class 0 = mean of channel 0 of the (masked) input."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(2)[:, :, None, None])
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).mean(dim=(2, 3)))


def test_opticam_first_adam_step_and_convergence() -> None:
    """Zhang et al. 2023: u <- Adam(lr 0.1) ascent of y_c(X * n(up(sum softmax(u)_k A_k))) from u = 0.

    A_0 = left half, A_1 = top half, y_0 = mean(X_0 * mask) with X_0 = left half: y_0 = (1 + w_0/(w_0+w_1)) / 4
    grows with w_0, so Adam's first step (lr * sign) gives u = (0.1, -0.1), w = softmax(u)."""
    model = _Quadrants().eval()
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, :, :2] = 1.0  # left half
    x[0, 1, :2, :] = 1.0  # top half
    before = _state(model)
    one = camkit.explain(
        model, x, method="opticam", layers="feat", targets=0, perturbation=PerturbationOptions(samples=1)
    )
    w = torch.softmax(torch.tensor([0.1, -0.1]), dim=0)
    raw = one.raw["feat"][0]
    # raw = w_0 * left + w_1 * top: bottom-left cell = w_0, top-right = w_1
    torch.testing.assert_close(raw[3, 0], w[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw[0, 3], w[1], rtol=1e-5, atol=1e-6)
    many = camkit.explain(
        model, x, method="opticam", layers="feat", targets=0, perturbation=PerturbationOptions(samples=30)
    )
    assert float(many.raw["feat"][0, 3, 0]) > 0.9  # the weight moved to the channel that keeps the score
    assert _state(model) == before


@pytest.mark.parametrize("name", ["reciprocam", "cameras", "polycam", "opticam"])
def test_candidates_refuse_several_targets_and_leave_the_model_as_it_was(name: str) -> None:
    model = _gap_net(2)
    for p in model.fc.parameters():
        p.requires_grad_(False)
    before = _state(model)
    with pytest.raises(ValueError, match="one target per image"):
        camkit.explain(model, torch.randn(1, 3, 8, 8), method=name, layers="feat", targets=TopK(2))
    assert _state(model) == before
    assert get_method(name).name == name


def test_candidates_need_a_feature_map_layer() -> None:
    model = _gap_net(3)
    with pytest.raises(ValueError, match=r"Tensor\[B, K, h, w\]"):
        camkit.explain(model, torch.randn(1, 3, 8, 8), method="reciprocam", layers="flat", targets=0)


class _ChannelsLast(nn.Module):
    """conv 3->6 (NCHW, 'conv') -> permute to [B, h, w, C] -> LayerNorm ('norm', channels-last) -> mean over h, w ->
    Linear 6->3: the target layer 'norm' outputs channels-last maps whose last axis (6) differs from h = w = 8."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.fc(y.mean(dim=(1, 2)))


def test_reciprocam_on_a_channels_last_layer_maps_the_grid_not_width_by_channels():
    """Recipro-CAM reads a channels-last layer through the layout reader: its map is over h x w (it was over
    w x C), and each cell is p_c of the head applied to that cell's activation alone (the mean over h*w of a
    one-hot masked map is A[i, j] / (h*w))."""
    model = _ChannelsLast().eval()
    x = torch.randn(2, 3, 16, 16)
    e = camkit.explain(model, x, "reciprocam", layers="norm", targets=[0, 2], relu=False)
    raw = e.raw["reciprocam"]
    assert raw.shape == (2, 8, 8)
    with torch.no_grad():
        a = model.norm(model.conv(x).permute(0, 2, 3, 1))  # [B, h, w, C]
        p = torch.softmax(model.fc(a / 64), dim=-1)  # [B, h, w, classes]
    expected = torch.stack([p[0, :, :, 0], p[1, :, :, 2]])
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-5)


def test_cameras_and_polycam_on_a_channels_last_layer_read_the_grid():
    """CAMERAS and Poly-CAM read activations and gradients through the same layout reader: Poly-CAM over the
    channels-last layer equals its recursion over LayerCAM's maps of that layer, and CAMERAS's grid is the
    largest scale's h x w (16 x 16 for x2), not w x C."""
    model = _ChannelsLast().eval()
    x = torch.randn(2, 3, 16, 16)
    poly = camkit.explain(model, x, "polycam", layers="conv,norm", targets=[1, 0], relu=False)
    layer = camkit.explain(model, x, "layercam", layers="conv,norm", targets=[1, 0], relu=False)
    expected = polycam_recursion([torch.relu(layer.raw["conv"]), torch.relu(layer.raw["norm"])])
    torch.testing.assert_close(poly.raw["polycam"], expected, rtol=1e-4, atol=1e-6)
    cams = camkit.explain(model, x, "cameras", layers="norm", targets=[1, 0], relu=False)
    assert cams.raw["cameras"].shape == (2, 16, 16)
