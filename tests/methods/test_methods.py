"""Method formulas: exact numbers on hand-built cases, identities, and independent re-implementations."""

from __future__ import annotations

import pytest
import torch

import camkit
from camkit.core.capture import capture
from camkit.methods import METHODS, method_names
from camkit.methods.engine import PerturbationOptions
from testbed import GapHead

GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam"]


def _run(model, x, method, layer, **kw):
    return camkit.explain(model, x, method=method, layers=layer, **kw)


def test_exact_numbers_on_a_2x2_map():
    # K = 2 channels, 2 classes; A chosen by hand.
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]])
    w = torch.tensor([[2.0, -4.0], [1.0, 1.0]])
    model = GapHead(w, torch.tensor([0.5, 0.0])).eval()
    # class 0: dS/dA_k = w[0,k]/4 -> grad-cam weights (0.5, -1.0)
    # map = 0.5*A_0 - 1.0*A_1 = [[0.5, 0.0], [1.5, 3.0]]
    g = _run(model, a, "gradcam", "feat", targets=0)
    torch.testing.assert_close(g.raw["feat"], torch.tensor([[[0.5, 0.0], [1.5, 3.0]]]))
    cam = _run(model, a, "cam", "feat", targets=0)
    torch.testing.assert_close(cam.raw["feat"], torch.tensor([[[2.0, 0.0], [6.0, 12.0]]]))
    # xgrad-cam: channel 0: sum(A0*g)/sum(A0) = (10*0.5)/10 = 0.5; channel 1: sum(A1)=0 -> weight 0
    x = _run(model, a, "xgradcam", "feat", targets=0)
    torch.testing.assert_close(x.raw["feat"], torch.tensor([[[0.5, 1.0], [1.5, 2.0]]]))
    # layercam: ReLU(g) = (0.5, 0) -> 0.5 * A0
    lc = _run(model, a, "layercam", "feat", targets=0)
    torch.testing.assert_close(lc.raw["feat"], torch.tensor([[[0.5, 1.0], [1.5, 2.0]]]))
    # grad-cam++ with constant g: alpha = g^2 / (2 g^2 + sum(A) g^3) = 1 / (2 + sum(A) g)
    # channel 0: g=0.5, sum=10 -> alpha = 1/7 per pixel, w0 = 4 * (1/7) * 0.5 = 2/7; channel 1: ReLU(g)=0 -> 0
    gpp = _run(model, a, "gradcam++", "feat", targets=0)
    torch.testing.assert_close(gpp.raw["feat"], (2 / 7) * a[:, 0])
    # normalised map: ReLU then min-max: [[1/6, 0], [1/2, 1]]
    torch.testing.assert_close(g.maps, torch.tensor([[[0.5 / 3, 0.0], [0.5, 1.0]]]))


def test_gradcam_equals_cam_over_z_and_hirescam_on_gap_head(tiny, x_small):
    res = camkit.compare(tiny, x_small, methods=["gradcam", "cam", "hirescam"], layers="features.3")
    h, w = res["cam"].raw["features.3"].shape[-2:]
    torch.testing.assert_close(res["gradcam"].raw["features.3"], res["cam"].raw["features.3"] / (h * w))
    torch.testing.assert_close(res["hirescam"].raw["features.3"], res["gradcam"].raw["features.3"])
    torch.testing.assert_close(res["gradcam"].maps, res["cam"].maps)


def _independent(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Straightforward per-channel loops, written from the papers, for comparison."""
    b, k = a.shape[:2]
    out = torch.zeros(b, *a.shape[2:], dtype=torch.float64)
    a = a.double()
    g = g.double()
    for i in range(b):
        for c in range(k):
            A, G = a[i, c], g[i, c]
            if method == "gradcam":
                out[i] += G.mean() * A
            elif method == "gradcam++":
                s = A.sum()
                wk = 0.0
                for y in range(A.shape[0]):
                    for x in range(A.shape[1]):
                        gg = G[y, x]
                        den = 2 * gg**2 + s * gg**3
                        alpha = gg**2 / den if den != 0 else 0.0
                        wk += alpha * max(float(gg), 0.0)
                out[i] += wk * A
            elif method == "xgradcam":
                s = A.sum()
                out[i] += ((A * G).sum() / s if s != 0 else 0.0) * A
            elif method == "hirescam":
                out[i] += G * A
            elif method == "gradcam-elementwise":
                out[i] += torch.relu(G * A)
            elif method == "layercam":
                out[i] += torch.relu(G) * A
    return out.float()


@pytest.mark.parametrize("layer", ["features.0", "features.1", "head.0"])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_formulas_match_loop_implementations(nonlinear, method, layer):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    res = camkit.explain(nonlinear, x, method=method, layers=layer)
    cls = res.classes
    cap = capture(
        nonlinear, x, {layer: nonlinear.get_submodule(layer)}, lambda out: out.gather(1, cls[:, None])[:, 0]
    )
    g = cap.gradients[layer]
    assert g.flatten(2).std(dim=2).max() > 0, "gradients must vary over space for this test to mean anything"
    expected = _independent(method, cap.activations[layer], g)
    torch.testing.assert_close(res.raw[layer], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "cam"])
def test_batch_equals_single_calls(tiny, x_small, method):
    batch = camkit.explain(tiny, x_small, method=method, layers="features.3")
    for i in range(x_small.shape[0]):
        single = camkit.explain(tiny, x_small[i : i + 1], method=method, layers="features.3")
        torch.testing.assert_close(batch.maps[i], single.maps[0], rtol=1e-4, atol=1e-5)
        assert int(batch.classes[i]) == int(single.classes[0])


def test_compare_shares_one_pass_and_matches_explain(tiny, x_small):
    calls = []
    h = tiny.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        res = camkit.compare(tiny, x_small, methods=GRADIENT_METHODS, layers="features.3")
    finally:
        h.remove()
    assert len(calls) == 1
    for m in GRADIENT_METHODS:
        torch.testing.assert_close(
            res[m].maps, camkit.explain(tiny, x_small, method=m, layers="features.3").maps
        )


def test_methods_differ_where_they_should(nonlinear):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8)
    # head.0 feeds a tanh: signed activations with non-zero gradients, so every formula differs
    res = camkit.compare(nonlinear, x, methods=GRADIENT_METHODS, layers="head.0")
    maps = {m: r.raw["head.0"] for m, r in res.items()}
    for a in GRADIENT_METHODS:
        for b in GRADIENT_METHODS:
            if a < b:
                assert not torch.allclose(maps[a], maps[b]), f"{a} and {b} gave the same map"


def test_cam_refuses_a_non_gap_head(nonlinear):
    with pytest.raises(ValueError, match="global average pooling"):
        camkit.explain(nonlinear, torch.randn(1, 3, 8, 8), method="cam", layers="features.1")


def test_cam_refuses_a_callable_target(tiny, x_small):
    with pytest.raises(ValueError, match="class targets"):
        camkit.explain(tiny, x_small, method="cam", layers="features.3", targets=lambda out: out[:, 0])


def test_relu_false_keeps_signed_map():
    a = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
    model = GapHead(torch.tensor([[1.0]])).eval()
    e = camkit.explain(model, a, method="cam", layers="feat", relu=False)
    torch.testing.assert_close(e.maps, torch.tensor([[[0.6, 0.0], [1.0, 0.4]]]))
    e2 = camkit.explain(model, a, method="cam", layers="feat")
    torch.testing.assert_close(e2.maps, torch.tensor([[[1 / 3, 0.0], [1.0, 0.0]]]))


def test_multi_layer_fusion(tiny, x_small):
    both = camkit.explain(tiny, x_small, method="layercam", layers="features.3,features.1")
    assert both.layers == ["features.1", "features.3"]  # shallow to deep, whatever the order given
    shallow, deep = both.layer_maps["features.1"], both.layer_maps["features.3"]
    expected = torch.maximum(torch.tanh(2 * shallow), deep)
    expected = camkit.core.postprocess.normalize(expected)
    torch.testing.assert_close(both.maps, expected)
    mean = camkit.explain(tiny, x_small, method="gradcam", layers="features.1,features.3", fusion="mean")
    exp_mean = camkit.core.postprocess.normalize(
        (mean.layer_maps["features.1"] + mean.layer_maps["features.3"]) / 2
    )
    torch.testing.assert_close(mean.maps, exp_mean)


def test_every_registered_method_runs(tiny, x_small):
    # Attention methods (AttentionMethod.run) need a transformer: tests/test_tokens.py runs them.
    cnn_methods = [
        m for m in method_names() if not isinstance(camkit.methods.METHODS[m], camkit.methods.AttentionMethod)
    ]
    res = camkit.compare(tiny, x_small, methods=cnn_methods, layers="features.3")
    for name, e in res.items():
        assert e.maps.shape == (4, 16, 16), name
        assert torch.isfinite(e.maps).all() and e.maps.min() >= 0 and e.maps.max() <= 1


def test_every_method_says_when_to_prefer_it():
    for name, method in METHODS.items():
        assert method.prefer and "\n" not in method.prefer, name


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match="gradcam"):
        camkit.methods.get_method("gradcm")


def test_two_configurations_of_one_method_in_one_compare_stay_apart(tiny):
    """A configured instance is named after the settings that differ from the defaults, so two configurations
    in one compare give two results; two different methods under one name are refused, by name."""
    from dataclasses import replace

    from camkit.methods.smooth import smoothgradcampp

    x = torch.randn(1, 3, 32, 32)
    assert smoothgradcampp().name == "smoothgradcam++"
    two = camkit.compare(tiny, x, [smoothgradcampp(n=2), smoothgradcampp(n=3)], targets=0)  # type: ignore[list-item]
    assert list(two) == ["smoothgradcam++(n=2)", "smoothgradcam++(n=3)"]
    assert two["smoothgradcam++(n=2)"].method == "smoothgradcam++(n=2)"
    alone = camkit.explain(tiny, x, smoothgradcampp(n=3, variant="torchcam"), targets=0)  # type: ignore[arg-type]
    assert alone.method == "smoothgradcam++(n=3, variant='torchcam')"
    same = camkit.compare(tiny, x, ["gradcam", "grad-cam", "gradcam"], targets=0)
    assert list(same) == ["gradcam"]
    other = replace(camkit.methods.get_method("gradcam++"), name="gradcam")
    with pytest.raises(ValueError, match="two different methods are named 'gradcam'"):
        camkit.compare(tiny, x, ["gradcam", other], targets=0)  # type: ignore[list-item]


def test_per_method_counts_of_perturbation_options():
    """SS-CAM, IS-CAM and Opti-CAM each have their own count; ``samples`` stays the shared default."""
    o = PerturbationOptions(samples=7, integration_steps=3)
    assert (o.count("noise_draws", 35), o.count("integration_steps", 10), o.count("iterations", 100)) == (
        7,
        3,
        7,
    )
    assert PerturbationOptions().count("iterations", 100) == 100
    with pytest.raises(ValueError, match="noise_draws must be >= 1"):
        PerturbationOptions(noise_draws=0)
