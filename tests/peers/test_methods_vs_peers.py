"""Methods from the peers (1): FullGrad, guided backprop, Guided Grad-CAM, ShapleyCAM, Finer-CAM, SmoothGrad-CAM++
and the multi-scale method (``multiscalecam``; RefineCAM, the multi-layer product: test_fem_segeigen_refine_vs_peers.py).

Each has a known-answer test on a tiny model whose answer is computed by hand here, an agreement test with the
peer library (pytorch-grad-cam 1.5.7, torchcam 0.5.0) where the definitions coincide (Pearson >= 0.999 on the
same input), and the model must come back exactly as it was, also when an exception is raised mid-way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import camkit
from camkit.core.outputs import output_fn
from camkit.methods import PassInput, get_method
from camkit.methods.finer import finercam, similar_classes
from camkit.methods.fullgrad import bias_of, full_gradients
from camkit.methods.guided import guided_gradcam, guided_gradients
from camkit.methods.multiscale import multiscalecam
from camkit.methods.shapley import rest_target, shapley_gradients
from camkit.methods.smooth import smoothgradcampp

NEW = (
    "fullgrad",
    "guided-backprop",
    "guided-gradcam",
    "shapleycam",
    "finercam",
    "smoothgradcam++",
    "multiscalecam",
)
MIN_PEARSON = 0.999


# ----------------------------------------------------------------------------------------------------- helpers


def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
    """Pearson correlation per image of two [B, ...] arrays."""
    x = torch.as_tensor(np.asarray(a)).double().flatten(1)
    y = torch.as_tensor(np.asarray(b)).double().flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1))


def minmax(t: Tensor) -> Tensor:
    flat = t.double().flatten(1)
    flat = flat - flat.amin(dim=1, keepdim=True)
    return (flat / flat.amax(dim=1, keepdim=True)).reshape(t.shape)


class PeerNet(nn.Module):
    """conv(bias) -> BN -> ReLU(inplace) -> conv -> BN -> ReLU -> 1x1 conv -> tanh -> pool -> square -> linear.

    The squared, tanh head makes dS/dA vary over space and gives a non-zero Hessian (ShapleyCAM)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Conv2d(8, 6, 1), nn.Tanh())
        self.fc = nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.adaptive_avg_pool2d(self.head(self.features(x)), 2) ** 2
        return self.fc(h.flatten(1))


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)


@pytest.fixture
def peer() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = PeerNet()
    _randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    return model, x, classes


def pass_input(
    model: nn.Module, x: Tensor, classes: Tensor, layers: dict[str, nn.Module] | None = None
) -> PassInput:
    return PassInput(model, x, layers or {}, output_fn(None), classes)


def pgc_targets(classes: Tensor) -> list[object]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(c)) for c in classes]


# --------------------------------------------------------------------------------------------------- registry


def test_every_new_method_is_registered_with_its_keywords_and_runs() -> None:
    torch.manual_seed(0)
    model = PeerNet().eval()
    x = torch.randn(2, 3, 32, 32)
    for name in NEW:
        m = get_method(name)
        assert m.family == "own-pass" and m.paper and m.summary and m.cost and m.prefer and m.aliases
        e = camkit.explain(model, x, name, layers="features")
        assert e.maps.shape == (2, 32, 32) and torch.isfinite(e.maps).all()
        assert float(e.maps.amax()) == pytest.approx(1.0)
        k2 = camkit.explain(model, x, name, layers="features", targets=camkit.TopK(2))
        assert k2.maps.shape == (2, 2, 32, 32)


# --------------------------------------------------------------------------------------------------- FullGrad


class _ReluNet(nn.Module):
    """Piecewise linear: conv(bias) -> BN -> ReLU(inplace) -> conv -> BN -> F.relu -> GAP -> linear(bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b2(self.c2(self.act(self.b1(self.c1(x))))))
        return self.fc(h.mean(dim=(2, 3)))


def test_fullgrad_completeness_input_and_bias_terms_sum_to_the_score() -> None:
    # The paper's completeness: for a piecewise-linear net the input term and every bias term add up to S exactly.
    torch.manual_seed(3)
    model = _ReluNet()
    _randomize_bn(model)
    model = model.double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    classes = torch.tensor([0, 2, 3])
    (fg,) = full_gradients(pass_input(model, x, classes))
    score = model(x).gather(1, classes[:, None])[:, 0]
    assert torch.allclose(fg.total(), score, atol=1e-10)
    assert [n for n, _ in fg.bias_terms] == ["c1", "b1", "b2", "fc"]  # c2 has no bias


def test_fullgrad_completeness_with_timm_batch_norms_fused_with_their_activation() -> None:
    # timm's BatchNormAct2d applies its activation inside the module: the bias-gradient is read before it.
    from timm.layers import BatchNormAct2d

    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        BatchNormAct2d(6, act_layer=nn.ReLU),
        nn.Conv2d(6, 4, 3, padding=1),
        BatchNormAct2d(4, act_layer=nn.ReLU, inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    _randomize_bn(model)
    model = model.double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    classes = torch.tensor([1, 2])
    (fg,) = full_gradients(pass_input(model, x, classes))
    assert [n for n, _ in fg.bias_terms] == ["1", "2", "3", "6"]
    assert torch.allclose(fg.total(), model(x).gather(1, classes[:, None])[:, 0], atol=1e-10)


def test_fullgrad_batch_norm_bias_is_the_effective_bias() -> None:
    bn = nn.BatchNorm2d(2, eps=0.0).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
        bn.weight.copy_(torch.tensor([3.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.25, 1.0]))
    b = bias_of(bn)
    assert b is not None
    # beta - mu * gamma / sqrt(var + eps): 0.25 - 1 * 3 / 2 = -1.25; 1 - (-2) * 0.5 / 1 = 2
    assert b.tolist() == [-1.25, 2.0]
    with pytest.raises(ValueError, match="running statistics"):
        bias_of(nn.BatchNorm2d(2, track_running_stats=False))


def test_fullgrad_known_answer_on_a_one_pixel_conv() -> None:
    # S = mean(w * x + b): the bias term is constant over space (psi -> 0), the input term is w * x / 4, so the
    # FullGrad map is |x| min-maxed.
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(-2.0)
        conv.bias.fill_(0.5)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
    (fg,) = full_gradients(pass_input(model, x, torch.tensor([0])))
    assert torch.allclose(fg.input_term, torch.tensor([[[[-0.5, 1.0], [-1.5, 0.0]]]]))
    assert torch.allclose(fg.bias_terms[0][1], torch.full((1, 1, 2, 2), 0.125))
    e = camkit.explain(model, x, "fullgrad", targets=0)
    assert torch.allclose(e.maps, torch.tensor([[[1 / 3, 2 / 3], [1.0, 0.0]]]), atol=1e-6)


def test_fullgrad_agrees_with_pytorch_grad_cam(peer: tuple[nn.Module, Tensor, Tensor]) -> None:
    from pytorch_grad_cam import FullGrad

    model, x, classes = peer
    ours = camkit.explain(model, x, "fullgrad", targets=classes.tolist())
    ref = FullGrad(model, [])(input_tensor=x, targets=pgc_targets(classes))
    assert (pearson(ours.maps, ref) >= MIN_PEARSON).all()


# ------------------------------------------------------------------------------------------ guided backprop


class _TwoRelus(nn.Module):
    """x (1 channel) -> 1x1 conv u = [1, -1] -> a ReLU of the given kind -> 1x1 conv w = [2, -3] -> sum."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.u = nn.Conv2d(1, 2, 1, bias=False)
        self.w = nn.Conv2d(2, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=kind == "module-inplace")
        with torch.no_grad():
            self.u.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
            self.w.weight.copy_(torch.tensor([2.0, -3.0]).reshape(1, 2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.u(x)
        if self.kind.startswith("module"):
            h = self.relu(h)
        elif self.kind == "F.relu":
            h = F.relu(h)
        elif self.kind == "F.relu-inplace":
            h = F.relu(h, inplace=True)
        elif self.kind == "torch.relu":
            h = torch.relu(h)
        elif self.kind == "Tensor.relu_":
            h = h.relu_()
        elif self.kind == "relu6":
            h = nn.ReLU6()(h)
        return self.w(h).flatten(1).sum(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "kind", ["module", "module-inplace", "F.relu", "F.relu-inplace", "torch.relu", "Tensor.relu_", "relu6"]
)
def test_guided_backprop_known_answer_for_every_relu_kind_and_every_image(kind: str) -> None:
    # Pixel s > 0: channel 0 is active (u s > 0) and its upstream gradient w0 = 2 > 0: guided = u0 * 2 = 2.
    # Pixel s < 0: channel 1 is active, its upstream gradient w1 = -3 < 0: guided = 0 (ordinary: -1 * -3 = 3).
    model = _TwoRelus(kind).eval()
    x = torch.tensor([[[[1.0, -1.0]]], [[[-0.5, 2.0]]]])
    (g,) = guided_gradients(pass_input(model, x, torch.tensor([0, 0])))
    assert g.tolist() == [[[[2.0, 0.0]]], [[[0.0, 2.0]]]]
    xr = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xr).sum(), [xr])
    assert plain.tolist() == [[[[2.0, 3.0]]], [[[3.0, 2.0]]]]  # the ordinary gradient differs where w1 < 0


def test_guided_backprop_relu6_rule_stops_above_the_clip() -> None:
    model = _TwoRelus("relu6").eval()
    x = torch.tensor([[[[7.0, 3.0]]]])  # u0 * 7 = 7 > 6: clipped, no gradient; 3 inside (0, 6): 2
    (g,) = guided_gradients(pass_input(model, x, torch.tensor([0])))
    assert g.tolist() == [[[[0.0, 2.0]]]]


def test_silu_keeps_its_ordinary_gradient() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.SiLU(), nn.Flatten()).eval()
    x = torch.tensor([[[[-1.0, 2.0]]]])
    (g,) = guided_gradients(pass_input(model, x, torch.tensor([0])))
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xr)[:, 0].sum(), [xr])
    assert torch.allclose(g, ref)


def test_guided_backprop_agrees_with_pytorch_grad_cam_on_every_image(
    peer: tuple[nn.Module, Tensor, Tensor],
) -> None:
    from pytorch_grad_cam import GuidedBackpropReLUModel

    model, x, classes = peer
    (g,) = guided_gradients(pass_input(model, x, classes))
    for i in range(x.shape[0]):  # pytorch-grad-cam explains image 0 of a batch only: one call per image
        ref = GuidedBackpropReLUModel(model, device="cpu")(x[i : i + 1], target_category=int(classes[i]))
        assert float(pearson(g[i].permute(1, 2, 0)[None], ref[None])[0]) >= MIN_PEARSON


def test_guided_gradcam_is_guided_backprop_times_the_gradcam_map(
    peer: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, classes = peer
    layers = {"features": model.features}
    grad = camkit.explain(model, x, "gradcam", layers="features", targets=classes.tolist())
    from camkit.core.capture import capture
    from camkit.core.targets import score_fn

    cap = capture(model, x, layers, score_fn(classes, None))
    inp = PassInput(model, x, layers, output_fn(None), classes, None, cap.activations, cap.gradients)
    (gg,) = guided_gradcam(inp)
    (g,) = guided_gradients(inp)
    assert torch.allclose(gg, g * grad.maps[:, None], atol=1e-6)
    e = camkit.explain(model, x, "guided-gradcam", layers="features", targets=classes.tolist())
    assert torch.allclose(e.maps, minmax(gg.abs().amax(dim=1)).float(), atol=1e-5)


# --------------------------------------------------------------------------------------------------- ShapleyCAM


class _Quadratic(nn.Module):
    """A = identity(x) (one channel), S_0 = sum(W * A) + c * (sum A)^2, S_1 = -sum(A)."""

    def __init__(self, w: Tensor, c: float) -> None:
        super().__init__()
        self.a = nn.Identity()
        self.register_buffer("w", w)
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        a = self.a(x)
        s = a.flatten(1).sum(dim=1)
        s0 = (a * self.w).flatten(1).sum(dim=1) + self.c * s**2
        return torch.stack([s0, -s], dim=1)


def test_shapleycam_known_answer_with_a_quadratic_head() -> None:
    # g = W + 2 c S, H A = 2 c S (H = 2 c 11^T), so g - H A / 2 = W + c S and w = mean(W) + c S.
    w = torch.tensor([[[[1.0, -2.0], [0.5, 4.0]]]])
    model = _Quadratic(w, c=0.25).eval()
    x = torch.tensor([[[[1.0, 2.0], [3.0, -2.0]]], [[[0.5, 0.5], [0.0, 1.0]]]])
    layers = {"a": model.a}
    _, comb = shapley_gradients(pass_input(model, x, torch.tensor([0, 0]), layers))
    s = x.flatten(1).sum(dim=1)
    assert torch.allclose(comb["a"][0], w + 0.25 * s[:, None, None, None])
    e = camkit.explain(model, x, "shapleycam", layers="a", targets=0, relu=False)
    expected = (w.mean() + 0.25 * s)[:, None, None] * x[:, 0]
    assert torch.allclose(e.raw["a"], expected)


def test_shapleycam_agrees_with_pytorch_grad_cam(peer: tuple[nn.Module, Tensor, Tensor]) -> None:
    from pytorch_grad_cam import ShapleyCAM

    model, x, classes = peer
    ours = camkit.explain(model, x, "shapleycam", layers="features", targets=classes.tolist())
    ref = ShapleyCAM(model, [model.features])(input_tensor=x, targets=pgc_targets(classes))
    assert (pearson(ours.maps, ref) >= MIN_PEARSON).all()
    grad = camkit.explain(model, x, "gradcam", layers="features", targets=classes.tolist())
    assert not torch.allclose(ours.maps, grad.maps, atol=1e-3)  # the Hessian term matters on this model


def test_rest_target_is_the_logit_minus_the_cross_entropy(peer: tuple[nn.Module, Tensor, Tensor]) -> None:
    y = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = [3.0 + 3.0 - math.log(math.e + math.e**2 + math.e**3), 0.0 - math.log(3.0)]
    assert torch.allclose(rest_target([2, 0])(y), torch.tensor(expected))
    with pytest.raises(TypeError, match="integers"):
        rest_target(1.5)  # type: ignore[arg-type]
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST

    model, x, classes = peer
    ours = camkit.explain(model, x, "shapleycam", layers="features", targets=rest_target(classes))
    ref = ShapleyCAM(model, [model.features])(
        input_tensor=x, targets=[ClassifierOutputReST(int(c)) for c in classes]
    )
    assert (pearson(ours.maps, ref) >= MIN_PEARSON).all()


def test_shapleycam_and_fullgrad_on_a_vit_with_fused_attention() -> None:
    # Fused attention kernels have no double backward: ShapleyCAM computes attention explicitly in its pass. The
    # map equals the one of the same ViT with timm's explicit attention path switched on (a copy).
    import copy

    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=4
    ).eval()
    explicit = copy.deepcopy(vit)
    for m in explicit.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = torch.randn(2, 3, 32, 32)
    ours = camkit.explain(vit, x, "shapleycam", layers="blocks.0.norm1", targets=1)
    ref = camkit.explain(explicit, x, "shapleycam", layers="blocks.0.norm1", targets=1)
    assert (pearson(ours.maps, ref.maps) >= 0.99999).all()
    # FullGrad: linear layers' biases act on the token axis (no spatial map), the patch embedding's on the grid
    (fg,) = full_gradients(pass_input(vit, x, torch.tensor([1, 1])))
    shapes = {n: tuple(t.shape) for n, t in fg.bias_terms}
    assert shapes["patch_embed.proj"] == (2, 192, 4, 4) and shapes["blocks.0.attn.qkv"] == (2, 17, 576)
    assert camkit.explain(vit, x, "fullgrad", targets=1).maps.shape == (2, 32, 32)


# --------------------------------------------------------------------------------------------------- Finer-CAM


def test_finercam_picks_the_classes_with_the_nearest_logits() -> None:
    y = torch.tensor([[5.0, 1.0, 4.5, 7.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    # image 0, class 0: |y - 5| = [-, 4, 0.5, 2, 5]; image 1, class 4: every gap is 0, ties kept in index order
    assert similar_classes(y, torch.tensor([0, 4]), 3).tolist() == [[2, 3, 1], [0, 1, 2]]


def test_finercam_known_answer_with_a_linear_head() -> None:
    # Logits y_j = sum(W_j * A): with one similar class the score is y_c - alpha * y_d (p_d cancels), so the
    # Grad-CAM weight is mean(W_c - alpha * W_d).
    torch.manual_seed(0)
    head = nn.Conv2d(1, 4, 2, bias=False)
    model = nn.Sequential(nn.Identity(), head, nn.Flatten()).eval()
    x = torch.tensor([[[[1.0, 2.0], [0.5, -1.0]]]])
    y = model(x)[0].detach()
    c = int(y.argmax())
    d = int((y - y[c]).abs().scatter(0, torch.tensor([c]), float("inf")).argmin())
    wts = head.weight.detach()[:, 0]
    e = camkit.explain(model, x, finercam(alpha=0.5, n_similar=1), layers="0", relu=False)
    expected = (wts[c] - 0.5 * wts[d]).mean() * x[:, 0]
    assert torch.allclose(e.raw["0"], expected, atol=1e-6)
    plain = camkit.explain(model, x, finercam(alpha=0.0, n_similar=1), layers="0", relu=False)
    assert torch.allclose(plain.raw["0"], wts[c].mean() * x[:, 0], atol=1e-6)


def test_finercam_agrees_with_pytorch_grad_cam(peer: tuple[nn.Module, Tensor, Tensor]) -> None:
    from pytorch_grad_cam import FinerCAM

    model, x, _ = peer
    ours = camkit.explain(model, x, "finercam", layers="features")  # top-1, as the peer's default
    ref = FinerCAM(model, [model.features])(input_tensor=x)
    assert (pearson(ours.maps, ref) >= MIN_PEARSON).all()


def test_finercam_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="n_similar"):
        finercam(n_similar=0)
    with pytest.raises(ValueError, match="gradient layer method"):
        finercam(base="scorecam")
    with pytest.raises(TypeError, match="alpha"):
        finercam(alpha="1")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- SmoothGrad-CAM++


class _Square(nn.Module):
    """A = identity(x), S = sum(W * A^2) / 2: g = W * A, so every noisy copy's gradient is known."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.a = nn.Identity()
        self.register_buffer("w", w)

    def forward(self, x: Tensor) -> Tensor:
        a = self.a(x)
        s = (self.w * a * a).flatten(1).sum(dim=1) / 2
        return torch.stack([s, -s], dim=1)


def test_smoothgradcampp_known_answer_from_the_noisy_gradients() -> None:
    w = torch.tensor([[[[1.0, -1.0], [2.0, 0.5]], [[0.5, 1.0], [-1.0, 1.0]]]])
    model = _Square(w).eval()
    x = torch.tensor([[[[1.0, 0.5], [2.0, 1.0]], [[0.3, -0.2], [1.0, 2.0]]]])
    n, sigma, seed = 3, 0.4, 7
    gen = torch.Generator().manual_seed(seed)
    gs = [w * (x + torch.normal(0.0, sigma, size=tuple(x.shape), generator=gen)) for _ in range(n)]
    d1 = sum(gs) / n
    d2 = sum(g * g for g in gs) / n
    d3 = sum(g**3 for g in gs) / n
    alpha = d2 / (2 * d2 + x.sum(dim=(2, 3), keepdim=True) * d3)
    weights = (alpha * torch.relu(d1)).sum(dim=(2, 3))
    expected = torch.einsum("bk,bkhw->bhw", weights, x)
    method = smoothgradcampp(n=n, sigma=sigma, seed=seed)
    e = camkit.explain(model, x, method, layers="a", targets=0, relu=False)
    assert torch.allclose(e.raw["a"], expected, atol=1e-5)
    again = camkit.explain(model, x, method, layers="a", targets=0, relu=False)
    assert torch.equal(again.raw["a"], e.raw["a"])  # seeded
    other = camkit.explain(
        model, x, smoothgradcampp(n=n, sigma=sigma, seed=8), layers="a", targets=0, relu=False
    )
    assert not torch.allclose(other.raw["a"], e.raw["a"])


def test_smoothgradcampp_without_noise_is_gradcampp(peer: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, classes = peer
    smooth = camkit.explain(
        model, x, smoothgradcampp(n=2, sigma=0.0), layers="features", targets=classes.tolist()
    )
    plain = camkit.explain(model, x, "gradcam++", layers="features", targets=classes.tolist())
    assert torch.allclose(smooth.maps, plain.maps, atol=1e-5)


def test_smoothgradcampp_torchcam_variant_agrees_with_torchcam(
    peer: tuple[nn.Module, Tensor, Tensor],
) -> None:
    from torchcam.methods import SmoothGradCAMpp

    model, x, classes = peer
    extractor = SmoothGradCAMpp(
        model, target_layer="features", num_samples=4, std=0.3, input_shape=(3, 32, 32)
    )
    try:
        scores = model(x)
        torch.manual_seed(
            0
        )  # torchcam draws from the global generator: the same numbers as a generator seeded 0
        ref = extractor(class_idx=classes.tolist(), scores=scores)[0]
    finally:
        extractor.remove_hooks()
    ref_up = F.interpolate(ref[:, None].double(), size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    ours = camkit.explain(
        model,
        x,
        smoothgradcampp(n=4, sigma=0.3, seed=0, variant="torchcam"),
        layers="features",
        targets=classes.tolist(),
    )
    assert (pearson(ours.maps, ref_up) >= MIN_PEARSON).all()
    paper = camkit.explain(
        model, x, smoothgradcampp(n=4, sigma=0.3, seed=0), layers="features", targets=classes.tolist()
    )
    assert (pearson(paper.maps, ref_up) < MIN_PEARSON).all()  # the documented difference shows on this model


def test_smoothgradcampp_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="n"):
        smoothgradcampp(n=0)
    with pytest.raises(ValueError, match="sigma"):
        smoothgradcampp(sigma=-1.0)
    with pytest.raises(ValueError, match="variant"):
        smoothgradcampp(variant="other")


# ------------------------------------------------------------------------------------------------- refinement


def test_multiscalecam_is_the_mean_of_the_base_maps_over_scales_and_fuses_layers(
    peer: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, classes = peer
    t = classes.tolist()
    one = camkit.explain(model, x, multiscalecam(scales=(1.0,)), layers="features", targets=t)
    grad = camkit.explain(model, x, "gradcam", layers="features", targets=t)
    assert torch.allclose(one.maps, grad.maps, atol=1e-6)
    # two scales by hand: Grad-CAM of the resized input, resized back, min-maxed, averaged, min-maxed
    big = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    at_big = torch.relu(camkit.explain(model, big, "gradcam", layers="features", targets=t).raw["features"])
    back = minmax(F.interpolate(at_big[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0])
    expected = minmax((grad.maps.double() + back) / 2)
    two = camkit.explain(model, x, multiscalecam(scales=(1.0, 1.5)), layers="features", targets=t)
    assert torch.allclose(two.maps.double(), expected, atol=1e-5)
    # several layers: one averaged map per layer, fused by the pipeline (max by default, min-maxed again)
    multi = camkit.explain(
        model, x, multiscalecam(scales=(1.0, 1.5)), layers="features.2,features", targets=t
    )
    assert multi.layers == ["features.2", "features"]
    fused = minmax(torch.maximum(*multi.layer_maps.values()))
    assert torch.allclose(multi.maps.double(), fused, atol=1e-6)


def test_multiscalecam_on_a_fixed_size_model_says_what_to_do() -> None:
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"resizes the input by 1.5 to 48x48.*scales=\(1.0,\)"):
        camkit.explain(vit, x, "multiscalecam", targets=0)
    assert camkit.explain(vit, x, multiscalecam(scales=(1.0,)), targets=0).maps.shape == (1, 32, 32)


def test_multiscalecam_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="scales"):
        multiscalecam(scales=())
    with pytest.raises(ValueError, match="scales"):
        multiscalecam(scales=(1.0, -2.0))
    with pytest.raises(ValueError, match="gradient layer method"):
        multiscalecam(base="cam")


# --------------------------------------------------------------------------- the model comes back as it was


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "modules": [(n, id(m), type(m), m.training) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad_mode": torch.is_grad_enabled(),
        "modes": torch._C._len_torch_function_stack(),
    }


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["modules"] == b["modules"]
    assert a["params"] == b["params"]
    assert a["hooks"] == b["hooks"] == 0
    assert a["grad_mode"] == b["grad_mode"] and a["modes"] == b["modes"] == 0
    sa, sb = a["state"], b["state"]
    assert isinstance(sa, dict) and isinstance(sb, dict)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Bomb(nn.Module):
    """Identity that raises from its ``fuse``-th call on (0: never)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fuse = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.fuse and self.calls >= self.fuse:
            raise RuntimeError("boom")
        return x


class _BombNet(PeerNet):
    def __init__(self) -> None:
        super().__init__()
        self.bomb = _Bomb()

    def forward(self, x: Tensor) -> Tensor:
        h = self.bomb(F.relu(self.features(x)))
        h = F.adaptive_avg_pool2d(self.head(h), 2) ** 2
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("name", NEW)
def test_the_model_comes_back_exactly_as_it_was(name: str) -> None:
    torch.manual_seed(0)
    model = _BombNet().eval()
    model.features[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    x = torch.randn(2, 3, 32, 32)
    before = _snapshot(model)
    camkit.explain(model, x, name, layers="features")
    _same(before, _snapshot(model))
    # an exception in the method's own pass (the shared capture forward is call 1, the method's first is call 2)
    model.bomb.calls, model.bomb.fuse = 0, 2
    with pytest.raises(RuntimeError, match="boom"):
        camkit.explain(model, x, name, layers="features")
    assert model.bomb.calls >= 2
    model.bomb.fuse = 0
    _same(before, _snapshot(model))


def test_after_guided_backprop_gradients_are_ordinary_again() -> None:
    # The guided rule is active during guided backprop's own forward only.
    model = _TwoRelus("module").eval()
    x = torch.tensor([[[[-1.0]]]])
    guided_gradients(pass_input(model, x, torch.tensor([0])))
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xr).sum(), [xr])
    assert g.item() == 3.0
