"""Group-CAM and Poly-CAM matched (camkit.methods.groupcam, camkit.methods.sharper): known answers on tiny
models, the cost in images sent through the model, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

import camkit
from camkit.core.targets import TopK
from camkit.errors import CamkitError
from camkit.methods.sharper import blur, group_maps, match_values, polycam_recursion
from testbed import images_through, two_conv_net


def _net(channels: int = 4, seed: int = 0) -> nn.Sequential:
    return two_conv_net(channels, seed)


def _state(model: nn.Module) -> list[object]:
    return [
        (n, m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    ] + [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()]


def test_group_maps_and_blur_known_answers() -> None:
    a = torch.arange(1.0, 17.0).view(1, 4, 2, 2)  # 4 channels of 2x2
    alpha = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    maps = group_maps(a, alpha, groups=2)  # groups {0,1} and {2,3}
    g0 = torch.relu(a[0, 0] - a[0, 1])  # all -4 -> 0
    g1 = 2 * a[0, 2]  # 18, 20, 22, 24: the 70th percentile is 22.2, only 24 is kept
    assert torch.equal(maps[0, 0], g0)
    assert torch.equal(maps[0, 1], torch.tensor([[0.0, 0.0], [0.0, 24.0]]))
    assert g1.max() == 24
    with pytest.raises(CamkitError, match="group"):
        group_maps(a, alpha, groups=0)
    const = torch.full((1, 3, 40, 40), 0.3)
    torch.testing.assert_close(blur(const), const)
    torch.testing.assert_close(blur(torch.full((1, 3, 8, 8), 0.3)), torch.full((1, 3, 8, 8), 0.3))  # edge pad
    img = torch.rand(2, 3, 60, 60)
    torch.testing.assert_close(blur(img), tv_blur(img, [51, 51], [50.0, 50.0]), rtol=1e-5, atol=1e-6)
    step = torch.zeros(1, 1, 64, 64)
    step[..., 32:] = 1
    smooth = blur(step)
    assert (
        0.3 < float(smooth[0, 0, 32, 31]) < 0.5 < float(smooth[0, 0, 32, 32]) < 0.7
    )  # sigma 50: nearly flat


def _act_grad(model: nn.Sequential, x: torch.Tensor, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target layer's activation and dS/dA, without touching the parameters' ``.grad``."""
    feats = model[:4](x)
    (grads,) = torch.autograd.grad(model[4:](feats)[0, cls], feats)
    return feats.detach(), grads


def _groupcam_by_hand(model: nn.Sequential, x: torch.Tensor, cls: int) -> torch.Tensor:
    """The paper's five steps written out, every channel its own group (K = 4 < 32 groups)."""
    feats, grads = _act_grad(model, x, cls)
    alpha = grads.mean(dim=(2, 3))[0]
    size = x.shape[-2:]
    with torch.no_grad():
        base = torch.softmax(model(blur(x)), dim=1)[0, cls]
        total = torch.zeros(size)
        for k in range(feats.shape[1]):
            m = torch.relu(alpha[k] * feats[0, k].detach())
            m = torch.where(m > torch.quantile(m.flatten(), 0.7), m, torch.zeros_like(m))
            if m.max() == m.min():
                continue
            up = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            up = (up - up.min()) / (up.max() - up.min())
            s = torch.softmax(model(x * up + blur(x) * (1 - up)), dim=1)[0, cls] - base
            total += s * up
    return torch.relu(total)


def test_groupcam_follows_the_paper_and_costs_one_forward_per_group() -> None:
    model = _net()
    x = torch.randn(1, 3, 16, 16)
    before = _state(model)
    expl = camkit.explain(model, x, method="groupcam", layers="r2", targets=1, relu=False)
    torch.testing.assert_close(expl.raw["groupcam"][0], _groupcam_by_hand(model, x, 1), rtol=1e-4, atol=1e-6)
    assert _state(model) == before
    # cost: 4 channels -> 4 groups; the pipeline's forward, Group-CAM's forward + backward, then the blurred
    # input and one masked input per non-constant group in one batch
    plain = images_through(model, lambda: camkit.explain(model, x, method="gradcam", layers="r2", targets=1))
    n = images_through(model, lambda: camkit.explain(model, x, method="groupcam", layers="r2", targets=1))
    groups = int((group_maps(*_act_alpha(model, x, 1)).flatten(2).amax(2) > 0).sum())
    assert n == plain + 1 + 1 + groups


def _act_alpha(model: nn.Sequential, x: torch.Tensor, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, grads = _act_grad(model, x, cls)
    return feats, grads.mean(dim=(2, 3))


def test_match_values_known_answer() -> None:
    src = torch.tensor([[[3.0, 1.0], [2.0, 1.0]]])
    ref = torch.tensor([[[10.0, 40.0], [30.0, 20.0]]])
    # ranks of src (ties in order of appearance): 1 (pos 1), 1 (pos 3), 2 (pos 2), 3 (pos 0)
    assert torch.equal(match_values(src, ref), torch.tensor([[[40.0, 10.0], [30.0, 20.0]]]))
    with pytest.raises(CamkitError, match="one shape"):
        match_values(src, ref[..., :1])


def test_polycam_matched_is_polycam_order_with_gradcam_values() -> None:
    model = _net(channels=6, seed=1)
    x = torch.randn(2, 3, 16, 16)
    before = _state(model)
    kw: dict[str, object] = {"layers": "r1,r2", "targets": [0, 2], "relu": False}
    out = camkit.explain(model, x, method="polycam-matched", **kw).raw["polycam-matched"]  # type: ignore[arg-type]
    poly = camkit.explain(model, x, method="polycam", **kw).raw["polycam"]  # type: ignore[arg-type]
    gc = camkit.explain(model, x, method="gradcam", layers="r2", targets=[0, 2], relu=False).raw["r2"]
    ref = F.interpolate(torch.relu(gc)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out, match_values(poly, ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.flatten(1).sort(dim=1).values, ref.flatten(1).sort(dim=1).values)
    assert _state(model) == before
    # the same passes as Poly-CAM
    n_poly = images_through(model, lambda: camkit.explain(model, x, method="polycam", **kw))  # type: ignore[arg-type]
    n_match = images_through(model, lambda: camkit.explain(model, x, method="polycam-matched", **kw))  # type: ignore[arg-type]
    assert n_match == n_poly


@pytest.mark.parametrize("name", ["groupcam", "polycam-matched", "pcamp", "pcampm"])
def test_candidates_refuse_several_targets(name: str) -> None:
    model = _net()
    before = _state(model)
    with pytest.raises(ValueError, match="one target per image"):
        camkit.explain(model, torch.randn(1, 3, 16, 16), method=name, targets=TopK(2))
    assert _state(model) == before


def _pcam_by_hand(model: nn.Sequential, x: torch.Tensor, cls: int, signed: bool) -> torch.Tensor:
    """PCAM+ / PCAM+/- written out from the authors' definitions, layers r1 (16x16) and r2 (8x8)."""
    with torch.no_grad():
        prob = lambda inp: torch.softmax(model(inp), dim=1)[:, cls]  # noqa: E731
        base = prob(x)[0]
        maps = []
        for depth in (2, 4):  # outputs of r1 and r2
            a = model[:depth](x)[0]
            masks = []
            for k in range(a.shape[0]):
                lo, hi = torch.quantile(a[k].flatten(), 0.001), torch.quantile(a[k].flatten(), 0.999)
                m = ((a[k] - lo) / hi).clamp(0, 1)
                masks.append(F.interpolate(m[None, None], size=x.shape[-2:], mode="bilinear")[0])
            h = torch.stack(masks)  # [K, 1, H, W]
            w = prob(x * h)
            if signed:
                w = torch.relu(w + base - prob(x * (1 - h)))
            maps.append(torch.relu((w[:, None, None] * a).sum(dim=0))[None])
    return polycam_recursion(maps)


@pytest.mark.parametrize(("name", "signed"), [("pcam+", False), ("pcam±", True)])
def test_pcam_variants_follow_the_authors_weights_and_cost(name: str, signed: bool) -> None:
    model = _net(channels=5, seed=2)
    x = torch.randn(1, 3, 16, 16)
    before = _state(model)
    kw: dict[str, object] = {"layers": "r1,r2", "targets": 2, "relu": False}
    expl = camkit.explain(model, x, method=name, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(
        next(iter(expl.raw.values())), _pcam_by_hand(model, x, 2, signed), rtol=1e-4, atol=1e-7
    )
    assert _state(model) == before
    # cost: Poly-CAM's passes, then one masked input per channel of each layer (4 + 5), two each for PCAM+/-
    n_poly = images_through(model, lambda: camkit.explain(model, x, method="polycam", **kw))  # type: ignore[arg-type]
    n = images_through(model, lambda: camkit.explain(model, x, method=name, **kw))  # type: ignore[arg-type]
    assert n == n_poly + (2 if signed else 1) * (4 + 5)
