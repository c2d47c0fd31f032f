"""Union-CAM (camkit.methods.union): its three modules against the steps written out by hand on tiny models, the
number of images it sends through the model, its setting, and the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camkit
from camkit.core.targets import TopK
from camkit.errors import CamkitError
from camkit.methods import get_method, method_parameters
from camkit.methods.registry import PassInput
from camkit.methods.union import denoised_map, select_map
from testbed import assert_unchanged, images_through, snapshot, two_conv_net


def _net(channels: int = 5, seed: int = 3) -> nn.Sequential:
    return two_conv_net(channels, seed)


def test_denoised_map_known_answer() -> None:
    g = torch.tensor(
        [
            [[-1.0, 2.0], [3.0, 4.0]],  # 10th percentile -0.1: -1 is cut; shares 0, 2/9, 3/9, 4/9
            [[1.0, 1.0], [1.0, 5.0]],  # 10th percentile 1: all kept; shares 1/8, 1/8, 1/8, 5/8
            [[-2.0, -1.0], [-3.0, -4.0]],  # no positive gradient: adds nothing
        ]
    )[None]
    a = torch.stack([torch.full((2, 2), 9.0), 8 * torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2)])[
        None
    ]
    torch.testing.assert_close(denoised_map(a, g), torch.tensor([[[1.0, 4.0], [6.0, 24.0]]]))
    # theta = 50: channel 0 is cut at its median 2.5 (shares 0, 0, 3/7, 4/7), channel 1 at 1 (all kept)
    expected = torch.tensor([[9 * 0 + 1.0, 2.0], [9 * 3 / 7 + 3.0, 9 * 4 / 7 + 20.0]])
    torch.testing.assert_close(denoised_map(a, g, theta=50)[0], expected)


@pytest.mark.parametrize(
    ("den", "reg", "fused_wins"),
    [
        ([1.0, 0.0, 1.0], [1.0, 0.5, 0.0], True),  # beta_fus 0.492 > beta_reg 0.381
        ([0.0, 1.0, 0.5], [1.0, 0.0, 1.0], False),  # beta_fus 0.496 < beta_reg 0.498
    ],
)
def test_union_and_selection_known_answers(den: list[float], reg: list[float], fused_wins: bool) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[4.0, -4.0, 2.0], [0.0, 0.0, 0.0]]))
    x = torch.ones(1, 1, 1, 3)
    inp = PassInput(model, x, {}, lambda out: out, torch.tensor([0]))  # type: ignore[arg-type, return-value]
    d, r = torch.tensor([den]), torch.tensor([reg])
    p = lambda m: torch.sigmoid(model[1].weight[0] @ m.flatten())  # noqa: E731  p_0 of two classes
    with torch.no_grad():
        beta_den, beta_reg = p(d) - 0.5, p(r) - 0.5
        fused = beta_den * d + beta_reg * r
        fused = (fused - fused.min()) / (fused.max() - fused.min())
        beta_fus = p(fused) - 0.5
    assert bool(beta_fus > beta_reg) is fused_wins
    out = select_map(inp, 0, d, r)
    torch.testing.assert_close(out, fused if fused_wins else r)


def _unioncam_by_hand(model: nn.Sequential, x: torch.Tensor, cls: int, theta: float) -> torch.Tensor:
    """The three modules written out for one image, with NumPy's percentile and a plain Score-CAM loop."""
    feats = model[:4](x)
    (grads,) = torch.autograd.grad(model[4:](feats)[0, cls], feats)
    a, g = feats.detach()[0], grads[0]
    size = x.shape[-2:]
    up = lambda m: F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]  # noqa: E731
    mm = lambda m: (m - m.min()) / (m.max() - m.min())  # noqa: E731
    prob = lambda inp: torch.softmax(model(inp), dim=1)[:, cls]  # noqa: E731
    with torch.no_grad():
        den = torch.zeros_like(a[0])
        for k in range(a.shape[0]):
            gk = g[k].clone()
            gk[gk < float(np.percentile(g[k].numpy(), theta))] = 0
            gk = torch.relu(gk)
            if gk.sum() > 0:
                den += gk / gk.sum() * a[k]
        den = mm(up(torch.relu(den)))
        reg = torch.zeros_like(a[0])
        for k in range(a.shape[0]):
            if a[k].max() > a[k].min():
                reg += prob(x * mm(up(a[k])))[0] * a[k]
        reg = mm(up(torch.relu(reg)))
        base = prob(torch.zeros_like(x))[0]
        beta_den, beta_reg = prob(x * den)[0] - base, prob(x * reg)[0] - base
        fused = mm(beta_den * den + beta_reg * reg)
        return fused if prob(x * fused)[0] - base > beta_reg else reg


@pytest.mark.parametrize("theta", [10.0, 60.0])
def test_unioncam_follows_the_paper_and_counts_its_forwards(theta: float) -> None:
    model = _net()
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(model)
    spec = "unioncam" if theta == 10.0 else f"unioncam(theta={theta})"
    expl = camkit.explain(model, x, method=spec, layers="r2", targets=[1, 2], relu=False)
    out = expl.raw[spec]
    for b, cls in enumerate((1, 2)):
        torch.testing.assert_close(
            out[b], _unioncam_by_hand(model, x[b : b + 1], cls, theta), rtol=1e-4, atol=1e-5
        )
    assert_unchanged(before, model)
    # cost: camkit's Score-CAM (one masked forward per non-constant channel, one image for the engine's batch-size
    # estimate, two for the accelerated path's check of its first batch against the model: rerun in each counted
    # call, as the counting hook changes the model) + per image its own capture forward, the zero input,
    # X * L_den, X * L_reg and X * L_fus
    kw: dict[str, object] = {"layers": "r2", "targets": [1, 2]}
    plain = images_through(model, lambda: camkit.explain(model, x, method="gradcam", **kw))  # type: ignore[arg-type]
    score = images_through(model, lambda: camkit.explain(model, x, method="scorecam", **kw))  # type: ignore[arg-type]
    n = images_through(model, lambda: camkit.explain(model, x, method=spec, **kw))  # type: ignore[arg-type]
    a = model[:4](x).detach().flatten(2)
    assert score - plain == int((a.amax(2) > a.amin(2)).sum()) + 1 + 2 == 13
    assert n == score + 2 * (1 + 4)
    assert_unchanged(before, model)


def test_unioncam_setting_and_refusals() -> None:
    assert method_parameters("union-cam") == {"theta": 10.0}
    assert get_method("unioncam(theta=25)").name == "unioncam(theta=25)"
    assert get_method("unioncam(theta=10)").name == "unioncam"
    for bad in ("unioncam(theta=101)", "unioncam(theta=-1)", "unioncam(theta='x')"):
        with pytest.raises(CamkitError, match="percentile"):
            get_method(bad)
    model = _net()
    before = snapshot(model)
    with pytest.raises(ValueError, match="one target per image"):
        camkit.explain(model, torch.randn(1, 3, 16, 16), method="unioncam", targets=TopK(2))
    assert_unchanged(before, model)
