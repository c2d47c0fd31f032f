"""Perturbation CAMs: the channel weights come from extra forward passes, not from gradients.

A_k: channel k of the target layer (Tensor[B, K, h, w]); H_k = minmax(upsample(A_k)) its mask at input size;
p_c(X) the softmax probability of the explained class c; y_c(X) its logit. Every map is ``sum_k w_k A_k``, then
ReLU, upsampling and min-max as for every method (:mod:`camkit.postprocess`).

* **Score-CAM** (Wang et al., CVPRW 2020), as in the authors' code (haofanwang/Score-CAM): w_k = p_c(X * H_k).
  A channel that is constant over the map has no mask; the authors skip it (w_k = 0) and so do we, without a
  forward pass. ``weighting="channel-softmax"`` gives pytorch-grad-cam's and torchcam's variant instead:
  w = softmax_k(y_c(X * H_k)) over the channels, where a constant channel's mask is all zeros, so its masked input
  is the zero image: that score is computed once per image. That is torchcam's ScoreCAM exactly (its subtraction
  of the unmasked score is a constant under the softmax); with ``align_corners=True`` (the masks'
  upsampling) it is pytorch-grad-cam's ScoreCAM too (both measured: Pearson 1.0 on ResNet-18).
* **SS-CAM** (Naidu, Wang et al. 2020, "smoothed Score-CAM"): the mask is perturbed with Gaussian noise,
  w_k = mean_i p_c(X * (H_k + n_i)), n_i ~ N(0, noise_std^2), ``samples`` draws (default 35, noise_std 2.0 as
  torchcam). The noise of channel (b, k) comes from its own seeded generator, so results do not depend on the
  batch size. torchcam's variant (softmax over channels of mean logits) is ``weighting="channel-softmax"``.
* **IS-CAM** (Naidu et al. 2020, "integrated Score-CAM"): the score is integrated along the straight path from
  the zero mask to the full mask, w_k = (1/N) sum_{i=1..N} p_c(X * (i/N) H_k) (``samples`` = N, default 10).
  torchcam multiplies the mask by a *cumulative* coefficient sum_{j<=i} j/N (up to (N+1)/2) instead of i/N.
* **Ablation-CAM** (Desai & Ramaswamy, WACV 2020): w_k = (y_c - y_c^k) / y_c with y_c^k the score when channel k
  of the target layer is set to zero. Only the layers *after* the target run again: the cached activation is
  replayed with one channel zeroed (checked against the original output on the first batch; a model where that
  is not possible falls back to full forwards). A channel that is already all zero gives y_c^k = y_c: w_k = 0, no
  forward. ``ablation="gradcam-min"`` reproduces pytorch-grad-cam, which sets the channel to
  ``min(A) - 1e7`` instead of 0 when the activation's minimum is not 0.

For a callable target the score is its value (no softmax): w_k = f(X * H_k).

Speed: all masked inputs go through the model in batches under ``torch.inference_mode()``, with no hook of ours
attached (Score-CAM family) or only the replay hook (Ablation-CAM). ``PerturbationOptions.batch_size`` sets the
batch; by default it comes from the free memory and a per-image estimate of the forward's activations. Channels
of one image whose normalised maps are equal (to 1e-6) share one forward pass (Score-CAM, IS-CAM).
``top_channels`` (off by default) keeps only the k channels with the highest mean activation per image, the
others get w_k = 0: an approximation, with its measured effect in the README.
"""

from __future__ import annotations

from camkit.methods.engine import PerturbationContext, PerturbationOptions, _ablation, _score_family
from camkit.methods.registry import PerturbationMethod, register

__all__ = ["PerturbationContext", "PerturbationOptions"]


# ----------------------------------------------------------------------------------------------- registry


register(
    PerturbationMethod(
        name="scorecam",
        needs_grad=False,
        cost="1 forward + K masked forwards (K channels), batched",
        paper="Wang et al., CVPRW 2020",
        summary="w_k = p_c(X * minmax(up(A_k))); map = sum_k w_k A_k",
        prefer="gradients are unavailable or untrustworthy (saturated or non-differentiable heads): weights "
        "from the class score itself, at K forwards per image",
        aliases=("score-cam",),
        weights=lambda ctx: _score_family(ctx, "score"),
    )
)
register(
    PerturbationMethod(
        name="sscam",
        needs_grad=False,
        cost="1 forward + K x samples noisy masked forwards, batched",
        paper="Naidu, Wang et al. 2020 (SS-CAM)",
        summary="w_k = mean_i p_c(X * (H_k + noise_i)); map = sum_k w_k A_k",
        prefer="Score-CAM maps look noisy: averaging over noisy masks smooths them, at samples x the cost",
        aliases=("ss-cam", "smoothscorecam"),
        weights=lambda ctx: _score_family(ctx, "smooth"),
    )
)
register(
    PerturbationMethod(
        name="iscam",
        needs_grad=False,
        cost="1 forward + K x samples scaled masked forwards, batched",
        paper="Naidu et al. 2020 (IS-CAM)",
        summary="w_k = mean_i p_c(X * (i/N) H_k); map = sum_k w_k A_k",
        prefer="Score-CAM with masks at several strengths (integrated), less sensitive to one mask scale, "
        "at samples x the cost",
        aliases=("is-cam", "integratedscorecam"),
        weights=lambda ctx: _score_family(ctx, "integrated"),
    )
)
register(
    PerturbationMethod(
        name="ablationcam",
        needs_grad=False,
        cost="1 forward + K replays of the layers after the target, batched",
        paper="Desai & Ramaswamy, WACV 2020",
        summary="w_k = (y_c - y_c with A_k := 0) / y_c; map = sum_k w_k A_k",
        prefer="gradient-free weights that measure each channel's effect on the score; cheapest of the "
        "perturbation methods when the layer is near the output (only the layers after it are replayed)",
        aliases=("ablation-cam", "ablation"),
        weights=_ablation,
    )
)
