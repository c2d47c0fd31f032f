"""KPCA-CAM and Deep Feature Factorization: known answers and agreement with pytorch-grad-cam 1.5.7."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import camkit
from camkit.methods.projection import Factorization, kpca_projection, nmf
from testbed import GapHead


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def test_kpca_linear_kernel_is_centred_pca_by_hand():
    # 4 positions in 2 channels on a line: the first principal component is the line's coordinate.
    a = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]], [[0.0, 2.0], [4.0, 8.0]]]])  # x = t * (1, 2), t = 0, 1, 2, 4
    proj = kpca_projection(a, "linear")[0].flatten().double()
    # centred coordinates (t - 1.75) * |(1, 2)|; the largest magnitude (t = 4) is made positive
    expected = (torch.tensor([0.0, 1.0, 2.0, 4.0]).double() - 1.75) * 5**0.5
    torch.testing.assert_close(proj, expected.float().double(), rtol=1e-5, atol=1e-5)


def test_kpca_sigmoid_kernel_by_hand():
    # 2 positions: the centred kernel matrix is [[c, -c], [-c, c]] / ... with one non-zero eigenvalue.
    a = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # K=2, positions x=(1,0), (3,0) -> centred (-1,0), (1,0)
    g = 0.5  # 1/K
    k11 = np.tanh(g * 1 + 1)
    k12 = np.tanh(g * -1 + 1)
    # doubly centred 2x2 kernel: [[d, -d], [-d, d]], d = (k11 - k12) / 2; eigenvalue 2d, vector (-1, 1)/sqrt(2)
    d = (k11 - k12) / 2
    expected = np.array([-1.0, 1.0]) / np.sqrt(2) * np.sqrt(2 * d)
    proj = kpca_projection(a)[0].flatten().double().numpy()
    # a tie of magnitudes: either sign is the component
    assert np.allclose(np.abs(proj), np.abs(expected), atol=1e-6)
    assert proj[0] * proj[1] < 0


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "linear", "poly", "cosine"])
def test_kpca_agrees_with_pytorch_grad_cam(kernel):
    pytest.importorskip("sklearn")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

    torch.manual_seed(0)
    a = torch.relu(torch.randn(2, 16, 7, 7))
    ref = torch.from_numpy(get_2d_projection_kernel(a.numpy(), kernel, None))
    mine = kpca_projection(a, kernel)
    for i in range(2):
        r = _pearson(ref[i], mine[i])
        assert r > 0.9999  # the same component, with the same sign rule (largest magnitude positive)
        torch.testing.assert_close(mine[i], ref[i], rtol=1e-4, atol=1e-5)


def test_kpcacam_method_through_explain_is_class_agnostic():
    torch.manual_seed(1)
    a = torch.rand(2, 6, 5, 5)
    model = GapHead(torch.randn(3, 6)).eval()
    e0 = camkit.explain(model, a, method="kpcacam", layers="feat", targets=0)
    e1 = camkit.explain(model, a, method="kpca-cam", layers="feat", targets=2)
    torch.testing.assert_close(e0.maps, e1.maps)
    torch.testing.assert_close(e0.raw["feat"], kpca_projection(a))
    flat = e0.raw["feat"].flatten(1)
    assert (flat.gather(1, flat.abs().argmax(dim=1, keepdim=True)) > 0).all()  # sign rule


def test_kpca_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="kernel must be"):
        kpca_projection(torch.rand(1, 2, 3, 3), "laplace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deeper layer"):
        kpca_projection(torch.rand(1, 1, 128, 128))


def _planted(n=3, k=12, b=2, h=6, w=6, seed=0):
    """A = W0 H0 with disjoint supports: the NMF is unique up to order and scale."""
    g = torch.Generator().manual_seed(seed)
    h0 = torch.zeros(n, b * h * w)
    idx = torch.randperm(b * h * w, generator=g)
    for c in range(n):
        h0[c, idx[c::n]] = torch.rand(len(idx[c::n]), generator=g) + 0.5
    w0 = torch.zeros(k, n)
    w0[torch.arange(k), torch.arange(k) % n] = torch.rand(k, generator=g) + 0.5
    acts = (w0 @ h0).reshape(k, b, h, w).transpose(0, 1).contiguous()
    return w0, h0, acts


def _match(found: torch.Tensor, planted: torch.Tensor) -> list[float]:
    """Best Pearson of each planted row with a found row."""
    return [
        max(_pearson(found[d], planted[c]) for d in range(found.shape[0])) for c in range(planted.shape[0])
    ]


def test_nmf_recovers_planted_factors_and_is_seeded():
    _, h0, acts = _planted()
    v = acts.transpose(0, 1).reshape(12, -1)
    w, h = nmf(v, 3, seed=0)
    assert float(torch.linalg.matrix_norm(v.double() - w @ h) / torch.linalg.matrix_norm(v.double())) < 1e-3
    assert min(_match(h, h0)) > 0.9999
    w2, h2 = nmf(v, 3, seed=0)
    assert torch.equal(w, w2) and torch.equal(h, h2)
    with pytest.raises(ValueError, match="non-negative"):
        nmf(-v, 3)


def test_factorize_concepts_maps_and_class_scores():
    w0, h0, acts = _planted()
    torch.manual_seed(3)
    weight, bias = torch.randn(4, 12), torch.randn(4)
    model = GapHead(weight, bias).eval()
    hooks_before = len(model.feat._forward_hooks)
    f = camkit.factorize(model, acts, "feat", n_concepts=3)
    assert isinstance(f, Factorization)
    assert f.maps.shape == (2, 3, 6, 6) and f.raw.shape == (2, 3, 6, 6) and f.concepts.shape == (3, 12)
    assert f.maps.min() >= 0 and f.maps.max() <= 1
    assert min(_match(f.raw.transpose(0, 1).reshape(3, -1), h0)) > 0.9999
    # each concept vector is a planted one up to scale (the offset is 0 here: some cell of every channel is 0)
    assert min(_match(f.concepts, w0.T)) > 0.9999
    # scores: the head applied to the concept vectors
    assert f.scores is not None
    torch.testing.assert_close(f.scores, f.concepts @ weight.T + bias, rtol=1e-4, atol=1e-4)
    assert f.top_classes(2).shape == (3, 2)
    assert len(model.feat._forward_hooks) == hooks_before
    # same seed, same result; a given classifier is used as is
    g = camkit.factorize(model, acts, "feat", n_concepts=3, classifier=model.fc)
    torch.testing.assert_close(g.concepts, f.concepts)
    assert g.scores is not None
    torch.testing.assert_close(g.scores, f.scores, rtol=1e-4, atol=1e-4)


def test_factorize_agrees_with_pytorch_grad_cam_dff():
    pytest.importorskip("sklearn")
    import warnings

    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff

    _, _, acts = _planted(seed=1)
    model = GapHead(torch.randn(4, 12)).eval()
    f = camkit.factorize(model, acts, "feat", n_concepts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning
        concepts, expl = dff(acts.numpy().copy(), 3)
    ref_maps = torch.from_numpy(expl.transpose(1, 0, 2, 3).reshape(3, -1))
    assert min(_match(f.raw.transpose(0, 1).reshape(3, -1), ref_maps)) > 0.999
    assert min(_match(f.concepts, torch.from_numpy(concepts.T))) > 0.999


def test_factorize_on_a_cnn_and_argument_checks(tiny):
    x = torch.randn(2, 3, 32, 32)
    f = camkit.factorize(tiny, x, "features.3", n_concepts=2, seed=1)
    assert f.maps.shape == (2, 2, 32, 32) and f.scores is not None and f.scores.shape == (2, 5)
    assert torch.isfinite(f.maps).all()
    with pytest.raises(ValueError, match="n_concepts"):
        camkit.factorize(tiny, x, "features.3", n_concepts=0)
    with pytest.raises(ValueError, match="one target layer"):
        camkit.factorize(tiny, x, "features.1,features.3")
    assert not any(m._forward_hooks for m in tiny.modules())
