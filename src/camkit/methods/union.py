"""Union-CAM (Hu, Wang, Lin & Yu, "UnionCAM: enhancing CNN interpretability through denoising, weighted fusion,
and selective high-quality class activation mapping", Frontiers in Neurorobotics 2024,
doi 10.3389/fnbot.2024.1490198).

A: the target layer's activation (Tensor[B, K, h, w]); G = dS/dA, the gradient of the explained score S; p_c the
softmax probability of the explained class c (a callable target: its value); up(.) bilinear resizing to the input
size; n(.) min-max normalisation to [0, 1]; X the model input, 0 the all-zero input (X * 0, what every mask value 0
gives). Three modules, per image:

1. **Denoising**: each channel's gradient is cut at its own percentile, G'_k = G_k where G_k >= q_theta(G_k) over
   the h x w grid, else 0 (theta = 10, :data:`UNIONCAM_THETA`); the map weights every cell by the channel's share
   of its positive gradient, L_den = n(up(ReLU(sum_k ReLU(G'_k) / sum_ij ReLU(G'_k) * A_k))) (a channel with no
   positive gradient left adds 0).
2. **Union**: the region map is camkit's ``scorecam`` at the same layer, L_reg = n(up(ReLU(sum_k w_k A_k))),
   w_k = p_c(X * n(up(A_k))) (constant channels w_k = 0). Each map is weighted by how much of the class it keeps
   over the zero input, beta(L) = p_c(X * L) - p_c(0), and the fused map is
   L_fus = n(beta(L_den) L_den + beta(L_reg) L_reg).
3. **Selection**: the map is L_fus when beta(L_fus) > beta(L_reg), else L_reg.

Cost per image: 1 forward + 1 backward (A and G), Score-CAM's K masked forwards (one per non-constant channel,
fewer when two channels give the same mask), then 3 forwards (0, X * L_den, X * L_reg, in one batch) and 1
(X * L_fus): on EfficientNet-Lite0's ``bn2`` (1280 channels) about 1,285 forwards.

The three modules are the paper's as its abstract describes them; their details below are camkit's choices, fixed
before any measurement and not checked against the paper's equations: theta = 10; the denoised gradient map is the per-cell, per-channel
normalised form above (not a single weight per channel); the ReLU before normalising L_den (the sum is >= 0 on a
layer after a ReLU, and CAMs drop negative evidence); the zero input as the baseline (the input a mask of 0 gives,
as in Score-CAM's masking); the region CAM is Score-CAM with camkit's defaults (the authors' probability weights);
the deepest target layer when several are given; the selection is between L_fus and L_reg, and the selected map is
returned as it is (not multiplied by its beta). The method explains one target per image and leaves the model as
it was.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from camkit.core.capture import Captured, capture
from camkit.core.postprocess import normalize, upsample
from camkit.core.targets import score_fn
from camkit.core.tokens import FeatureMaps, to_spatial
from camkit.errors import CamkitError
from camkit.methods.engine import PerturbationContext
from camkit.methods.passes import image_rows
from camkit.methods.perturbation import scorecam
from camkit.methods.registry import PassInput, PassMethod, configured_name, register

__all__ = ["UNIONCAM_THETA", "denoised_map", "region_map", "select_map", "union_map", "unioncam"]

UNIONCAM_THETA = 10.0
"""The percentile of each channel's gradient below which Union-CAM's denoising sets it to 0."""


# ----------------------------------------------------------------------------------------------- helpers


def _layer(inp: PassInput) -> tuple[str, nn.Module]:
    """The deepest of the target layers (the last to run in one traced forward when several are given)."""
    if not inp.layers:
        raise CamkitError(
            "unioncam needs a target layer (layers='auto' or a name from `camkit layers MODEL`)"
        )
    if len(inp.layers) == 1:
        return next(iter(inp.layers.items()))
    last = capture(inp.model, inp.x[:1], inp.layers, None, inp.output_fn).order[-1]
    return last, inp.layers[last]


def _scores(inp: PassInput, out: Tensor, image: int) -> Tensor:
    """p_c of image ``image``'s class for each row of ``out`` (a callable target: its value)."""
    if inp.classes is None:
        return image_rows(inp, out, image)
    return torch.softmax(out.float(), dim=1)[:, int(inp.classes[image])]


# ----------------------------------------------------------------------------------------------- the modules


def denoised_map(a: Tensor, g: Tensor, theta: float = UNIONCAM_THETA) -> Tensor:
    """The denoising module's signed map on the layer's grid.

    Args:
        a: Tensor[B, K, h, w], the activation.
        g: Tensor[B, K, h, w], dS/dA.
        theta: the percentile (0-100) of each channel's gradient over the grid; values below it are set to 0
            (``torch.quantile``'s linear interpolation, as NumPy's ``percentile``).

    Returns:
        Tensor[B, h, w], sum_k ReLU(G'_k) / sum_ij ReLU(G'_k) * A_k.
    """
    flat = g.float().flatten(2)
    cut = torch.quantile(flat, theta / 100.0, dim=2, keepdim=True)
    kept = torch.relu(torch.where(flat >= cut, flat, torch.zeros_like(flat)))
    total = kept.sum(dim=2, keepdim=True)
    share = torch.where(total > 0, kept / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    return (share.view_as(a) * a.float()).sum(dim=1)


def region_map(inp: PassInput, cap: Captured, features: FeatureMaps, name: str) -> Tensor:
    """Score-CAM's signed map at layer ``name`` from the capture ``cap``: sum_k w_k A_k, Tensor[B, h, w]."""
    a = features.activations[name].float()
    ctx = PerturbationContext(
        model=inp.model,
        x=inp.x,
        layer=inp.layers[name],
        layer_name=name,
        calls=cap.calls.get(name, 1),
        activations=a,
        output=cap.output.detach(),
        classes=inp.classes,
        target_fn=inp.target_fn,
        output_fn=inp.output_fn,
        layout=features.layouts.get(name),
    )
    w = scorecam(ctx)[:, 0]  # [B, K]
    return (w[:, :, None, None].to(a.dtype) * a).sum(dim=1)


def select_map(inp: PassInput, image: int, den: Tensor, reg: Tensor) -> Tensor:
    """The union and selection modules for one image, given its maps L_den and L_reg (Tensor[H, W] in [0, 1]).

    Returns:
        Tensor[H, W]: L_fus = n(beta(L_den) L_den + beta(L_reg) L_reg) if beta(L_fus) > beta(L_reg), else L_reg.
    """
    x = inp.x[image : image + 1]
    with torch.inference_mode():
        batch = torch.cat([torch.zeros_like(x), x * den.to(x.dtype), x * reg.to(x.dtype)])
        p = _scores(inp, inp.output_fn(inp.model(batch)), image)
        beta_den, beta_reg = p[1] - p[0], p[2] - p[0]
        fused = normalize(beta_den * den + beta_reg * reg)
        beta_fus = _scores(inp, inp.output_fn(inp.model(x * fused.to(x.dtype))), image)[0] - p[0]
    return fused if bool(beta_fus > beta_reg) else reg


def union_map(inp: PassInput, theta: float = UNIONCAM_THETA) -> Tensor:
    """Union-CAM's map (see the module's notes).

    Args:
        inp: the model, input, targets and layers (the deepest layer is used).
        theta: the denoising percentile.

    Returns:
        Tensor[B, H, W] at the input's resolution, in [0, 1].
    """
    if inp.classes is not None and inp.classes.dim() != 1:
        raise CamkitError(
            f"unioncam explains one target per image; got {inp.classes.shape[1]} per image (TopK): explain each "
            "class in its own call"
        )
    name, layer = _layer(inp)
    cap = capture(inp.model, inp.x, {name: layer}, score_fn(inp.classes, inp.target_fn), inp.output_fn)
    size = (int(inp.x.shape[-2]), int(inp.x.shape[-1]))
    features = to_spatial(cap.activations, cap.gradients, inp.model, {name: layer}, size, inp.reshape)
    a, g = features.activations[name].float(), features.gradients[name]
    if a.dim() != 4:
        raise CamkitError(
            f"unioncam needs a target layer whose output is a feature map Tensor[B, K, h, w]; {name!r} outputs "
            f"shape {tuple(a.shape)} (pick a convolutional layer, see `camkit layers MODEL`)"
        )
    assert isinstance(g, Tensor)
    den = normalize(upsample(torch.relu(denoised_map(a, g, theta)), size))
    sub = PassInput(inp.model, inp.x, {name: layer}, inp.output_fn, inp.classes, inp.target_fn)
    reg = normalize(upsample(torch.relu(region_map(sub, cap, features, name)), size))
    return torch.stack([select_map(inp, b, den[b], reg[b]) for b in range(a.shape[0])])


def unioncam(theta: float = UNIONCAM_THETA) -> PassMethod:
    """Union-CAM with its setting: ``unioncam(theta=20)`` on the command line (``--methods``).

    Args:
        theta: the percentile (0-100) of each channel's gradient below which the denoising sets it to 0.
    """
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 <= theta <= 100:
        raise CamkitError(f"unioncam's theta is a percentile from 0 to 100, got {theta!r}")
    name = configured_name("unioncam", {"theta": theta}, {"theta": UNIONCAM_THETA})
    value = float(theta)

    def run(inp: PassInput) -> dict[str, Tensor]:
        return {name: union_map(inp, value)}

    return PassMethod(
        name=name,
        needs_grad=False,
        cost="1 forward + 1 backward, then Score-CAM's K masked forwards and 4 more (about 1,285 on "
        "EfficientNet-Lite0)",
        paper="Hu, Wang, Lin & Yu, Frontiers in Neurorobotics 2024 (UnionCAM)",
        summary="the better (by p_c(X*L) - p_c(0)) of Score-CAM and its beta-weighted fusion with a "
        "percentile-denoised gradient CAM",
        aliases=("union-cam",),
        run=run,
        prefer="Score-CAM's faithfulness with a gradient map's detail where the fusion keeps more of the class; "
        "Score-CAM's cost",
    )


register(unioncam(), unioncam, {"theta": UNIONCAM_THETA})
