"""Group-CAM (Zhang, Rao & Yang 2021, "Group-CAM: Group score-weighted visual explanations for deep convolutional
networks", arXiv 2103.13859).

A: the target layer's activation (Tensor[B, K, h, w]); G = dS/dA; alpha_k = mean_ij G_k (Grad-CAM's weights); X the
input; X~ = blur(X), a Gaussian blur (kernel 51, sigma 50, the paper's); p_c the softmax probability of the
explained class (a callable target's value instead).

1. The K channels are split into ``groups`` consecutive groups (32, the paper's); group g's map is
   M_g = ReLU(sum_{k in g} alpha_k A_k).
2. Denoising: the values of M_g at or below its 70th percentile (over the h x w grid) are set to 0.
3. M'_g = n(up(M_g)): bilinear upsampling to the input size, min-max normalised; a constant M_g is skipped.
4. Each group is scored by a forward of the input kept where the mask is high and blurred elsewhere:
   s_g = p_c(X * M'_g + X~ * (1 - M'_g)) - p_c(X~).
5. map = ReLU(sum_g s_g M'_g), at the input's resolution.

Cost per image: 1 forward + 1 backward (alpha), 1 forward of the blurred input, and one forward per group
(32): about 35 forwards. The group forwards run in one batch per image under ``torch.inference_mode()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkit.core.capture import capture
from camkit.core.postprocess import normalize, upsample
from camkit.errors import CamkitError
from camkit.methods.registry import PassInput, PassMethod, register
from camkit.methods.sharper import _deepest, _features, _one_target, _probabilities, _spatial

__all__ = ["GROUPCAM_GROUPS", "blur", "group_maps", "groupcam"]

GROUPCAM_GROUPS = 32
"""Channel groups of ``groupcam`` (the paper's default)."""

DENOISE_PERCENTILE = 0.7
"""Values of a group map at or below this quantile of the map are set to 0 (the paper's 70th percentile)."""


def blur(x: Tensor, kernel_size: int = 51, sigma: float = 50.0) -> Tensor:
    """Group-CAM's baseline: a separable, depthwise Gaussian blur of Tensor[B, C, H, W] (kernel 51, sigma 50),
    reflect padding (edge padding when a side is too short to reflect), as torchvision's ``gaussian_blur``."""
    r = kernel_size // 2
    t = torch.linspace(-r, r, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = torch.nn.functional.pad(x.float(), (r, r, r, r), mode=mode)
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y.to(x.dtype)


def group_maps(a: Tensor, alpha: Tensor, groups: int = GROUPCAM_GROUPS) -> Tensor:
    """Steps 1-2: Tensor[B, G, h, w], ReLU(sum_{k in g} alpha_k A_k) with the values at or below the group map's
    70th percentile set to 0. ``torch.chunk`` splits the channels (K not divisible by G: fewer, larger groups,
    as in the authors' code)."""
    if groups < 1:
        raise CamkitError(f"groupcam needs at least 1 channel group, got {groups}")
    weighted = a * alpha[:, :, None, None]
    maps = torch.stack([torch.relu(part.sum(dim=1)) for part in weighted.chunk(groups, dim=1)], dim=1)
    flat = maps.flatten(2)
    cut = torch.quantile(flat, DENOISE_PERCENTILE, dim=2, keepdim=True)
    return torch.where(flat > cut, flat, torch.zeros_like(flat)).view_as(maps)


def groupcam(inp: PassInput, groups: int = GROUPCAM_GROUPS) -> Tensor:
    """Group-CAM: ReLU(sum_g s_g M'_g), s_g = p_c(X * M'_g + blur(X) * (1 - M'_g)) - p_c(blur(X)).

    Returns:
        Tensor[B, H, W] at the input's resolution.
    """
    score = _one_target(inp, "groupcam")
    name, layer = _deepest(inp, "groupcam")
    cap = capture(inp.model, inp.x, {name: layer}, score, inp.output_fn)
    features = _features(inp, cap, {name: layer}, inp.x)
    a = _spatial(features.activations[name], name, "groupcam").float()
    g = features.gradients[name]
    assert isinstance(g, Tensor)
    alpha = g.float().mean(dim=(2, 3))
    size = (int(inp.x.shape[-2]), int(inp.x.shape[-1]))
    masks = group_maps(a, alpha, groups)
    out = torch.zeros(a.shape[0], *size, device=a.device)
    with torch.inference_mode():
        blurred = blur(inp.x)
        for b in range(a.shape[0]):
            m = masks[b]
            keep = m.flatten(1).amax(dim=1) > m.flatten(1).amin(dim=1)
            if not bool(keep.any()):
                continue
            up = normalize(upsample(m[keep][None], size)[0])[:, None]  # [G', 1, H, W]
            xb, bb = inp.x[b : b + 1], blurred[b : b + 1]
            mixed = xb * up.to(xb.dtype) + bb * (1 - up.to(xb.dtype))
            scores = _probabilities(inp, inp.output_fn(inp.model(torch.cat([bb, mixed]))), b)
            s = scores[1:] - scores[0]
            out[b] = torch.relu((s[:, None, None] * up[:, 0]).sum(dim=0))
    return out


def _run(inp: PassInput) -> dict[str, Tensor]:
    return {"groupcam": groupcam(inp)}


register(
    PassMethod(
        name="groupcam",
        needs_grad=False,
        cost="1 forward + 1 backward, then 1 + 32 forwards (the blurred input and one per channel group)",
        paper="Zhang, Rao & Yang 2021 (Group-CAM, arXiv 2103.13859)",
        summary="sum_g [p_c(X*M_g + blur(X)*(1-M_g)) - p_c(blur(X))] M_g over 32 denoised Grad-CAM group maps",
        aliases=("group-cam",),
        run=_run,
        prefer="a score-weighted map (faithfulness) at about 35 forwards instead of Score-CAM's one per channel",
    )
)
