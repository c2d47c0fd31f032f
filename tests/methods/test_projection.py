"""Eigen-CAM and EigenGrad-CAM."""

from __future__ import annotations

import torch

import camkit
from camkit.methods.projection import first_component
from testbed import GapHead


def test_rank_one_activations_give_the_spatial_factor():
    torch.manual_seed(0)
    m = torch.rand(5, 6)  # spatial pattern
    u = torch.rand(4) + 0.1  # channel loadings
    a = (u[:, None, None] * m)[None]  # A_k = u_k * m: rank one
    proj = first_component(a)[0]
    torch.testing.assert_close(proj / proj.max(), m / m.max(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        first_component(-a)[0] / proj.max(), m / m.max(), rtol=1e-5, atol=1e-6
    )  # sign fixed


def test_eigencam_runs_without_backward_and_ignores_the_target():
    torch.manual_seed(1)
    a = torch.rand(2, 4, 5, 5)
    model = GapHead(torch.randn(3, 4)).eval()
    e0 = camkit.explain(model, a, method="eigencam", layers="feat", targets=0)
    e1 = camkit.explain(model, a, method="eigencam", layers="feat", targets=2)
    torch.testing.assert_close(e0.maps, e1.maps)
    torch.testing.assert_close(e0.raw["feat"], first_component(a))


def test_eigengradcam_is_projection_of_g_times_a(nonlinear):
    from camkit.core.capture import capture

    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8)
    e = camkit.explain(nonlinear, x, method="eigengradcam", layers="features.1")
    cls = e.classes
    cap = capture(
        nonlinear, x, {"features.1": nonlinear.features[1]}, lambda o: o.gather(1, cls[:, None])[:, 0]
    )
    expected = first_component(cap.gradients["features.1"] * cap.activations["features.1"])
    torch.testing.assert_close(e.raw["features.1"], expected)
