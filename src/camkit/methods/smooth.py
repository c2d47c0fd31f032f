"""SmoothGrad-CAM++ (Omeiza et al., 2019, "Smooth Grad-CAM++: An Enhanced Inference Level Visualization
Technique for Deep Convolutional Neural Network Models").

Grad-CAM++ with its first-, second- and third-order gradient terms averaged over ``n`` noisy copies of the input,
``x + N(0, sigma^2)`` (sigma in the units of the model input, i.e. after normalisation), drawn from a generator
seeded with ``seed`` (the same maps on every call). With g_t = dS/dA of copy t and A the clean input's
activation:

    D1 = mean_t g_t,  D2 = mean_t g_t^2,  D3 = mean_t g_t^3
    alpha = D2 / (2 D2 + sum_ab A[ab] * D3)   (0 where the denominator is 0)
    w_k = sum_ij alpha_k[ij] ReLU(D1_k[ij]),  map = sum_k w_k A_k

The class explained is the clean input's (the noisy copies explain the same class).

torchcam's ``SmoothGradCAMpp`` differs in three places: its denominator's sum is ``sum_ab A[ab] D3[ab]`` per
channel (not ``sum_ab A[ab]`` times D3 per pixel), its ReLU takes the last noisy copy's gradient instead of D1,
and its map weights the last noisy copy's activation. ``smoothgradcampp(variant="torchcam")`` computes exactly
that (tests pin both against the formulas and the variant against torchcam).
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.errors import CamkitError
from camkit.methods.passes import layer_features, per_target, stack_targets, target_count
from camkit.methods.registry import PassInput, PassMethod, configured_name, register

__all__ = ["smoothgradcampp"]


def smoothgradcampp(n: int = 4, sigma: float = 0.3, seed: int = 0, variant: str = "paper") -> PassMethod:
    """A SmoothGrad-CAM++ method with these settings (``explain(..., method=smoothgradcampp(n=16))``), named
    ``smoothgradcam++`` with the default settings, else after the settings that differ (``smoothgradcam++(n=16)``).

    Args:
        n: noisy copies (each costs 1 forward + 1 backward to the layer).
        sigma: the noise's standard deviation, in model-input units.
        seed: the noise generator's seed.
        variant: ``"paper"`` (the formulas above) or ``"torchcam"`` (torchcam's SmoothGradCAMpp).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CamkitError(f"n (noisy copies) must be an integer >= 1, got {n!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < float("inf"):
        raise CamkitError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if variant not in ("paper", "torchcam"):
        raise CamkitError(f"variant must be 'paper' or 'torchcam', got {variant!r}")

    def run(inp: PassInput) -> dict[str, Tensor]:
        return _run(inp, n, float(sigma), seed, variant)

    settings = {"n": n, "sigma": sigma, "seed": seed, "variant": variant}
    defaults = {"n": 4, "sigma": 0.3, "seed": 0, "variant": "paper"}
    return PassMethod(
        name=configured_name("smoothgradcam++", settings, defaults),
        run=run,
        cost=f"n noisy forwards + backwards to the layer (n = {n}), its own passes",
        paper="Omeiza et al., 2019",
        summary="Grad-CAM++ with D1, D2, D3 = mean over n noisy inputs of g, g^2, g^3 (seeded)",
        prefer="a steadier Grad-CAM++ on noisy-gradient models, for n times its cost",
        aliases=("smoothgradcampp", "smooth-gradcam++", "smoothgradcamplusplus"),
    )


def _run(inp: PassInput, n: int, sigma: float, seed: int, variant: str) -> dict[str, Tensor]:
    k = target_count(inp)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums: dict[str, list[list[Tensor]]] = {}  # layer -> target -> [D1, D2, D3] sums
    last = None
    for _ in range(n):
        noise = torch.normal(0.0, sigma, size=tuple(inp.x.shape), generator=gen, dtype=torch.float32)
        noisy = inp.x + noise.to(device=inp.x.device, dtype=inp.x.dtype)
        last = layer_features(inp, noisy)
        for name, grads in last.gradients.items():
            per = per_target(grads, k)
            if name not in sums:
                sums[name] = [[torch.zeros_like(g) for _ in range(3)] for g in per]
            for acc, g in zip(sums[name], per, strict=True):
                acc[0] += g
                acc[1] += g * g
                acc[2] += g * g * g
    assert last is not None
    out = {}
    for name, per_t in sums.items():
        maps = []
        for t, (s1, s2, s3) in enumerate(per_t):
            d1, d2, d3 = s1 / n, s2 / n, s3 / n
            if variant == "paper":
                a = inp.activations[name].float()
                denom = 2 * d2 + a.sum(dim=(2, 3), keepdim=True) * d3
                alpha = torch.where(
                    denom != 0, d2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0
                )
                w = (alpha * torch.relu(d1)).sum(dim=(2, 3))
            else:
                a = last.activations[name].float()
                clean = inp.activations[name].float()
                denom = 2 * d2 + (d3 * clean).sum(dim=(2, 3), keepdim=True) + 1e-8
                g_last = per_target(last.gradients[name], k)[t]
                w = (d2 / denom * torch.relu(g_last)).sum(dim=(2, 3))
            maps.append(torch.einsum("bk,bkhw->bhw", w, a))
        out[name] = stack_targets(inp, maps)
    return out


register(smoothgradcampp(), smoothgradcampp)
