"""Projection CAMs (no class weights).

* Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the activations as a matrix X = [h*w, K]; the map is the projection
  X v1 on the first right singular vector of X. As in the paper X is not mean-centred (pytorch-grad-cam centres it).
  The SVD's sign is arbitrary: it is fixed so that the map sums to a non-negative value.
* EigenGrad-CAM (pytorch-grad-cam's EigenGradCAM): the same projection applied to g * A.
* Seg-Eigen-CAM (Chung & Ying, Applied Sciences 15(13) 7562, 2025; pytorch-grad-cam's SegEigenCAM): the
  projection of |g| * A (eq. 10: the absolute gradient weights each activation, pixel-wise) on its first principal
  component, with the positions centred as pytorch-grad-cam does; the SVD's arbitrary sign is fixed by the paper's
  eq. 13: the map is flipped when |min| > |max|, so its largest magnitude is positive.
* KPCA-CAM (Karmani, Hamdi & Ben Amar, 2024): the positions' activation vectors (rows of X = [h*w, K], centred
  over the positions as pytorch-grad-cam does) are projected on the first principal component of a kernel PCA:
  with the kernel matrix G_ij = k(x_i, x_j) doubly centred (G~ = G - 1G - G1 + 1G1, 1 = the matrix of 1/n), the map
  at position i is sqrt(lambda_1) v_1[i] for the top eigenpair (lambda_1, v_1) of G~. Default kernel: sigmoid,
  k(x, y) = tanh(gamma <x, y> + 1) with gamma = 1/K (scikit-learn's defaults, which pytorch-grad-cam uses). The
  component sums to 0 (centring), so its sign is fixed by making its entry of largest magnitude positive
  (scikit-learn's rule). torch only (``torch.linalg.eigh``), no
  scikit-learn.
* Deep Feature Factorization (Collins, Achanta & Süsstrunk, ECCV 2018): :func:`camkit.factorize`
  (:mod:`camkit.core.factorize`, an entry point like :func:`camkit.explain`; :func:`nmf` and the
  :class:`Factorization` record are here). Non-negative matrix
  factorisation of the activations of a batch, A^T = [K, B*h*w] ~ W H (W: n concept vectors over the channels, H: n
  heatmaps), by Lee & Seung's multiplicative updates from a seeded random start, in torch; each concept vector
  passed through the model's classifier gives the concept's class scores.
Eigen-CAM and KPCA-CAM are class-agnostic: the target changes nothing, and they need no backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from camkit.errors import CamkitError
from camkit.methods.registry import LayerMethod, MethodInput, configured_name, register

__all__ = [
    "Factorization",
    "first_component",
    "kpca_projection",
    "nmf",
    "signed_component",
    "smooth_projection",
]

Kernel = Literal["sigmoid", "rbf", "linear", "poly", "cosine"]


def first_component(x: Tensor) -> Tensor:
    """Projection of Tensor[B, K, h, w] on its first principal direction over channels -> Tensor[B, h, w]."""
    b, k, h, w = x.shape
    mat = x.reshape(b, k, h * w).transpose(1, 2).double()  # [B, h*w, K]
    _, _, vh = torch.linalg.svd(mat, full_matrices=False)
    proj: Tensor = mat @ vh[:, 0, :, None]  # [B, h*w, 1]
    sign = torch.where(proj.sum(dim=(1, 2), keepdim=True) < 0, -1.0, 1.0).to(proj.dtype)
    return (proj * sign).reshape(b, h, w).to(x.dtype)


def signed_component(x: Tensor) -> Tensor:
    """Seg-Eigen-CAM's projection: Tensor[B, K, h, w] with its positions centred, projected on the first right
    singular vector, flipped where |min| > |max| (eq. 13) -> Tensor[B, h, w]."""
    b, k, h, w = x.shape
    mat = torch.nan_to_num(x.double()).reshape(b, k, h * w).transpose(1, 2)  # [B, h*w, K]
    mat = mat - mat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(mat, full_matrices=False)
    proj = (mat @ vh[:, 0, :, None])[:, :, 0]  # [B, h*w]
    flip = proj.amin(dim=1, keepdim=True).abs() > proj.amax(dim=1, keepdim=True).abs()
    signed: Tensor = torch.where(flip, -proj, proj)
    return signed.reshape(b, h, w).to(x.dtype)


_KPCA_MAX_POSITIONS = 8192
"""Largest h*w KPCA-CAM accepts: its float64 kernel matrix then takes 512 MiB per image."""


def _check_kernel(kernel: object, gamma: object, degree: object, coef0: object) -> dict[str, object]:
    """KPCA-CAM's kernel settings, or a CamkitError that says which one is wrong."""

    def number(v: object) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and abs(v) < float("inf")

    if kernel not in ("sigmoid", "rbf", "linear", "poly", "cosine"):
        raise CamkitError(f"kernel must be 'sigmoid', 'rbf', 'linear', 'poly' or 'cosine', got {kernel!r}")
    if gamma is not None and not (number(gamma) and gamma > 0):  # type: ignore[operator]  # a number here
        raise CamkitError(f"kpcacam: gamma must be a number > 0 or None (1/K), got {gamma!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise CamkitError(f"kpcacam: degree must be an integer >= 1, got {degree!r}")
    if not number(coef0):
        raise CamkitError(f"kpcacam: coef0 must be a finite number, got {coef0!r}")
    return {"kernel": kernel, "gamma": gamma, "degree": degree, "coef0": coef0}


def kpca_projection(
    x: Tensor, kernel: Kernel = "sigmoid", gamma: float | None = None, degree: int = 3, coef0: float = 1.0
) -> Tensor:
    """KPCA-CAM's map: projection of Tensor[B, K, h, w] on the first kernel principal component -> Tensor[B, h, w].

    Args:
        x: the activations.
        kernel: ``"sigmoid"`` tanh(gamma <x, y> + coef0) (default, as pytorch-grad-cam), ``"rbf"``
            exp(-gamma |x - y|^2), ``"linear"`` <x, y> (then the map is PCA's, Eigen-CAM with centring), ``"poly"``
            (gamma <x, y> + coef0)^degree, ``"cosine"``.
        gamma: kernel coefficient; None: 1/K.
        degree, coef0: of the polynomial and sigmoid kernels.

    Each image's positions are centred over the positions first (as pytorch-grad-cam does); the sign of the
    component is fixed so that its entry of largest magnitude is positive.
    """
    _check_kernel(kernel, gamma, degree, coef0)
    b, k, h, w = x.shape
    n = h * w
    if n > _KPCA_MAX_POSITIONS:
        raise CamkitError(
            f"KPCA-CAM forms an [h*w, h*w] kernel matrix per image; this layer's {h}x{w} grid ({n} positions) would "
            f"need {n * n * 8 >> 20} MiB per image: choose a deeper layer (at most {_KPCA_MAX_POSITIONS} positions)"
        )
    mat = torch.nan_to_num(x.double()).reshape(b, k, n).transpose(1, 2)  # [B, n, K]
    mat = mat - mat.mean(dim=1, keepdim=True)
    g = 1.0 / k if gamma is None else float(gamma)
    dot = mat @ mat.transpose(1, 2)
    if kernel == "sigmoid":
        gram = torch.tanh(g * dot + coef0)
    elif kernel == "rbf":
        sq = dot.diagonal(dim1=1, dim2=2)
        gram = torch.exp(-g * (sq[:, :, None] + sq[:, None, :] - 2 * dot).clamp_min(0))
    elif kernel == "poly":
        gram = (g * dot + coef0) ** degree
    elif kernel == "cosine":
        norm = mat.norm(dim=2).clamp_min(1e-300)
        gram = dot / (norm[:, :, None] * norm[:, None, :])
    else:
        gram = dot
    # double centring of the kernel matrix (the feature-space mean is removed)
    gram = (
        gram
        - gram.mean(dim=1, keepdim=True)
        - gram.mean(dim=2, keepdim=True)
        + gram.mean(dim=(1, 2), keepdim=True)
    )
    gram = 0.5 * (gram + gram.transpose(1, 2))
    values, vectors = torch.linalg.eigh(gram)  # ascending
    top = vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()
    # the component sums to 0 (it is orthogonal to the constant vector after centring): its sign is fixed by its
    # entry of largest magnitude, made positive (scikit-learn's convention, so pytorch-grad-cam's sign too)
    peak = top.gather(1, top.abs().argmax(dim=1, keepdim=True))
    signed: Tensor = top * torch.where(peak < 0, -1.0, 1.0).to(top.dtype)
    return signed.reshape(b, h, w).to(x.dtype)


def smooth_projection(terms: Tensor) -> Tensor:
    """Eigen-smoothing (pytorch-grad-cam's ``eigen_smooth``): the first principal component of a map's per-channel
    terms Tensor[B, K, h, w] (w_k A_k for Grad-CAM, g_k A_k for HiResCAM, ...) -> Tensor[B, h, w].

    The positions' term vectors (rows of [h*w, K]) are centred over the positions, as pytorch-grad-cam does, and
    projected on their first right singular vector. The sign, arbitrary in the SVD, is chosen so that the result
    correlates non-negatively with the plain map sum_k terms_k (smoothing never turns a map into its negative).
    """
    b, k, h, w = terms.shape
    mat = torch.nan_to_num(terms.double()).reshape(b, k, h * w).transpose(1, 2)  # [B, n, K]
    mat = mat - mat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(mat, full_matrices=False)
    proj = (mat @ vh[:, 0, :, None])[:, :, 0]  # [B, n]
    plain = terms.double().sum(dim=1).reshape(b, h * w)
    plain = plain - plain.mean(dim=1, keepdim=True)
    sign = torch.where((proj * plain).sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(proj.dtype)
    smoothed: Tensor = (proj * sign).reshape(b, h, w).to(terms.dtype)
    return smoothed


def kpcacam(
    x: MethodInput,
    kernel: Kernel = "sigmoid",
    gamma: float | None = None,
    degree: int = 3,
    coef0: float = 1.0,
) -> Tensor:
    return kpca_projection(x.activations, kernel, gamma, degree, coef0)


def eigencam(x: MethodInput) -> Tensor:
    return first_component(x.activations)


def eigengradcam(x: MethodInput) -> Tensor:
    assert x.gradients is not None
    return first_component(x.gradients * x.activations)


register(
    LayerMethod(
        name="eigencam",
        fn=eigencam,
        needs_grad=False,
        cost="1 forward, no backward (class-agnostic)",
        paper="Muhammad & Yeasin, IJCNN 2020",
        summary="map = projection of A on its first principal component (SVD over channels)",
        prefer="what the layer sees regardless of class (class-agnostic), with no backward; any head",
    )
)
register(
    LayerMethod(
        name="eigengradcam",
        fn=eigengradcam,
        needs_grad=True,
        cost="1 forward + 1 backward to the layer (shared)",
        paper="pytorch-grad-cam's EigenGradCAM",
        summary="map = first principal component of g * A",
        prefer="an Eigen-CAM that follows the explained class, denoised by the projection",
    )
)


def segeigencam(x: MethodInput) -> Tensor:
    assert x.gradients is not None
    return signed_component(x.gradients.abs() * x.activations)


register(
    LayerMethod(
        name="segeigencam",
        fn=segeigencam,
        needs_grad=True,
        cost="1 forward + 1 backward to the layer (shared)",
        paper="Chung & Ying, Seg-Eigen-CAM, Applied Sciences 2025",
        summary="map = first principal component of |g| * A (centred), sign: largest magnitude positive",
        prefer="segmentation models: pixel-wise gradient weighting instead of a global average; any head",
        aliases=("seg-eigen-cam", "segeigen"),
    )
)
_KPCA = {"kernel": "sigmoid", "gamma": None, "degree": 3, "coef0": 1.0}
_KPCA_TEMPLATE = LayerMethod(
    name="kpcacam",
    fn=kpcacam,
    needs_grad=False,
    cost="1 forward, no backward (class-agnostic); an eigendecomposition of [h*w, h*w] per image",
    paper="Karmani, Hamdi & Ben Amar, KPCA-CAM, 2024",
    summary="map = projection of the (centred) positions on the first kernel principal component (sigmoid kernel)",
    prefer="an Eigen-CAM that captures non-linear structure of the activations; class-agnostic, no backward",
    aliases=("kpca-cam", "kpca"),
)


def _kpca_factory(**settings: object) -> LayerMethod:
    """KPCA-CAM with these kernel settings (``kpcacam(kernel=rbf, gamma=0.5)``, :func:`kpca_projection`'s)."""
    values = _check_kernel(**{**_KPCA, **settings})
    fn = functools.partial(kpcacam, **values)  # type: ignore[arg-type]  # checked values
    return dataclasses.replace(_KPCA_TEMPLATE, name=configured_name("kpcacam", values, _KPCA), fn=fn)


register(_kpca_factory(), _kpca_factory, _KPCA)


# ------------------------------------------------------------------------------------------ Deep Feature Factorization


def nmf(
    v: Tensor, n: int, *, seed: int = 0, iterations: int = 500, tol: float = 1e-7
) -> tuple[Tensor, Tensor]:
    """Non-negative matrix factorisation V ~ W H of Tensor[m, p] (>= 0) with ``n`` components, in torch.

    Lee & Seung's multiplicative updates for the Frobenius loss, in float64, from a seeded random start
    (|N(0, 1)| * sqrt(mean(V) / n), scikit-learn's ``init="random"`` scale). Stops after ``iterations`` or when the
    relative loss decrease of an iteration falls below ``tol``. The same call gives the same result.

    Returns:
        (W Tensor[m, n], H Tensor[n, p]), both >= 0, float64.
    """
    if v.dim() != 2:
        raise CamkitError(f"nmf factorises a matrix, got shape {tuple(v.shape)}")
    if bool((v < 0).any()):
        raise CamkitError("nmf needs a non-negative matrix")
    m, p = v.shape
    gen = torch.Generator().manual_seed(int(seed))
    vd = v.detach().double().cpu()
    scale = float(vd.mean().clamp_min(1e-12) / n) ** 0.5
    w = torch.randn(m, n, generator=gen, dtype=torch.float64).abs() * scale
    h = torch.randn(n, p, generator=gen, dtype=torch.float64).abs() * scale
    eps = 1e-12
    prev = float("inf")
    for it in range(iterations):
        h = h * (w.T @ vd) / (w.T @ w @ h + eps)
        w = w * (vd @ h.T) / (w @ (h @ h.T) + eps)
        if it % 10 == 9 or it == iterations - 1:
            loss = float(torch.linalg.matrix_norm(vd - w @ h))
            if prev - loss <= tol * max(prev, 1e-300) and prev != float("inf"):
                break
            prev = loss
    return w.to(v.device), h.to(v.device)


@dataclass(frozen=True)
class Factorization:
    """The result of :func:`camkit.factorize` (Deep Feature Factorization).

    Attributes:
        maps: Tensor[B, n, H, W], each concept's heatmap in [0, 1] at the input size (min-max per image and concept,
            after bilinear upsampling; a concept absent from an image is all zeros).
        raw: Tensor[B, n, h, w], the NMF heatmaps H at feature size (non-negative, not normalised).
        concepts: Tensor[n, K], the concept vectors over the layer's channels (W^T, the channel offset added back).
        scores: Tensor[n, C], the model's classifier applied to each concept vector (logits), or None when the
            layer is not followed by global average pooling and a Linear layer (or a 1x1 convolution) and no
            ``classifier`` was given.
        layer: the target layer's name.
    """

    maps: Tensor
    raw: Tensor
    concepts: Tensor
    scores: Tensor | None
    layer: str

    def top_classes(self, k: int = 1) -> Tensor:
        """LongTensor[n, k]: the k classes each concept scores highest (needs ``scores``)."""
        if self.scores is None:
            raise CamkitError(
                "no class scores: pass classifier=... to factorize (the layer's head was not found)"
            )
        return self.scores.topk(k, dim=1).indices
