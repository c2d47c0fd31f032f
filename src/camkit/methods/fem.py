"""FEM, the Feature Explanation Method (Fuad, Martin, Giot, Bourqui, Benois-Pineau & Zemmari, IPTA 2020, "Features
understanding in 3D CNNs for actions recognition in video"), as pytorch-grad-cam 1.5.7's ``FEM``.

Per channel k of the activations A (Tensor[B, K, h, w]) a threshold t_k = mean(A_k) + k_sigma * std(A_k) over the
positions (the population standard deviation, numpy's ``std``); the channel's weight is the fraction of its
positions above the threshold, w_k = mean(A_k > t_k) (the k-sigma rule: a channel that fires strongly in a few
places weighs most); the map is sum_k w_k A_k. No gradient: FEM is class-agnostic, one forward.
"""

from __future__ import annotations

from torch import Tensor

from camkit.errors import CamkitError
from camkit.methods.registry import LayerMethod, MethodInput, configured_name, register

__all__ = ["fem", "fem_map"]


def fem_map(a: Tensor, k: float = 2.0) -> Tensor:
    """FEM's map of Tensor[B, K, h, w] -> Tensor[B, h, w] with the k-sigma threshold."""
    dims = tuple(range(2, a.dim()))
    x = a.float()
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    weights = (x > mean + k * std).float().mean(dim=dims, keepdim=True)
    return (weights * x).sum(dim=1).to(a.dtype)


def fem(k: float = 2.0) -> LayerMethod:
    """FEM with this k-sigma threshold (``explain(..., method=fem(3))``), named ``fem`` for k = 2 (the paper's and
    pytorch-grad-cam's), else ``fem(k=3.0)``.

    Args:
        k: the threshold in standard deviations above each channel's mean (a finite number).
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != k or abs(k) == float("inf"):
        raise CamkitError(f"k must be a finite number of standard deviations, got {k!r}")
    sigma = float(k)

    def fn(x: MethodInput) -> Tensor:
        return fem_map(x.activations, sigma)

    return LayerMethod(
        name=configured_name("fem", {"k": sigma}, {"k": 2.0}),
        fn=fn,
        needs_grad=False,
        cost="1 forward, no backward (class-agnostic)",
        paper="Fuad et al., IPTA 2020 (Feature Explanation Method)",
        summary="w_k = fraction of positions where A_k > mean + k std of A_k (k = 2); map = sum_k w_k A_k",
        prefer="what the layer sees regardless of class, with no backward; strongly and locally firing channels",
        aliases=("feature-explanation",),
    )


register(fem(), fem)
