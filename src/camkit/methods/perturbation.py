"""Perturbation CAMs: the channel weights come from extra forward passes, not from gradients.

A_k: channel k of the target layer (Tensor[B, K, h, w]); H_k = minmax(upsample(A_k)) its mask at input size;
p_c(X) the softmax probability of the explained class c; y_c(X) its logit. Every map is ``sum_k w_k A_k``, then
ReLU, upsampling and min-max as for every method (:mod:`camkit.core.postprocess`).

* **Score-CAM** (Wang et al., CVPRW 2020), as in the authors' code: w_k = p_c(X * H_k).
  A channel that is constant over the map has no mask; the authors skip it (w_k = 0) and so do we, without a
  forward pass. ``weighting="channel-softmax"`` gives pytorch-grad-cam's and torchcam's variant instead:
  w = softmax_k(y_c(X * H_k)) over the channels, where a constant channel's mask is all zeros, so its masked input
  is the zero image: that score is computed once per image. That is torchcam's ScoreCAM exactly (its subtraction
  of the unmasked score is a constant under the softmax); with ``align_corners=True`` (the masks'
  upsampling) it is pytorch-grad-cam's ScoreCAM too (both measured: Pearson 1.0 on ResNet-18).
* **SS-CAM** (Naidu, Wang et al. 2020, "smoothed Score-CAM"): the mask is perturbed with Gaussian noise,
  w_k = mean_i p_c(X * (H_k + n_i)), n_i ~ N(0, noise_std^2), ``noise_draws`` draws (default 35, noise_std 2.0 as
  torchcam). The noise of channel (b, k) comes from its own seeded generator, so results do not depend on the
  batch size. torchcam's variant (softmax over channels of mean logits) is ``weighting="channel-softmax"``.
* **IS-CAM** (Naidu et al. 2020, "integrated Score-CAM"): the score is integrated along the straight path from
  the zero mask to the full mask, w_k = (1/N) sum_{i=1..N} p_c(X * (i/N) H_k) (``integration_steps`` = N, default 10).
  torchcam multiplies the mask by a *cumulative* coefficient sum_{j<=i} j/N (up to (N+1)/2) instead of i/N.
* **Ablation-CAM** (Desai & Ramaswamy, WACV 2020): w_k = (y_c - y_c^k) / y_c with y_c^k the score when channel k
  of the target layer is set to zero. Only the layers *after* the target run again: the cached activation is
  replayed with one channel zeroed (checked against the original output on the first batch; a model where that
  is not possible falls back to full forwards). A channel that is already all zero gives y_c^k = y_c: w_k = 0, no
  forward. ``ablation="gradcam-min"`` reproduces pytorch-grad-cam, which sets the channel to
  ``min(A) - 1e7`` instead of 0 when the activation's minimum is not 0.

For a callable target the score is its value (no softmax): w_k = f(X * H_k).

The shared machinery (batching under ``torch.inference_mode()``, channel selection and skipping, equal-mask
dedupe, seeded noise, Ablation-CAM's replay, progress, and the accelerated forward of :mod:`camkit.core.accel`) is in
:mod:`camkit.methods.engine`; each method below is only its weight formula on top of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from camkit.errors import CamkitError
from camkit.methods.engine import (
    PerturbationContext,
    PerturbationOptions,
    ablated_scores,
    channel_weights,
    masked_scores,
    noise,
)
from camkit.methods.registry import ClipPerturbationMethod, PerturbationMethod, configured_name, register

__all__ = [
    "PerturbationContext",
    "PerturbationOptions",
    "ablationcam",
    "iscam",
    "register_tunable",
    "scorecam",
    "sscam",
    "tunable",
]


# ----------------------------------------------------------------------------------------------- formulas


def _softmax_variant(ctx: PerturbationContext) -> bool:
    return ctx.options.weighting == "channel-softmax"


def scorecam(ctx: PerturbationContext) -> Tensor:
    """Score-CAM (Wang et al., CVPRW 2020): w_k = p_c(X * H_k); constant channels w_k = 0 (no mask).

    ``weighting="channel-softmax"``: w = softmax_k(y_c(X * H_k)), a constant channel scoring the zero input."""
    softmax = _softmax_variant(ctx)
    s = masked_scores(ctx, prob=not softmax, baseline=softmax)
    return channel_weights(ctx, s, s.values[:, 0])


def sscam(ctx: PerturbationContext) -> Tensor:
    """SS-CAM (Naidu, Wang et al. 2020): w_k = (1/N) sum_i p_c(X * (H_k + n_i)), n_i ~ N(0, noise_std^2).

    N = ``noise_draws`` (default 35). ``weighting="channel-softmax"`` (torchcam): softmax over the channels of the
    mean logits, constant channels included (their noisy masks are not zero)."""
    o, softmax = ctx.options, _softmax_variant(ctx)
    n = o.count("noise_draws", 35)
    s = masked_scores(
        ctx,
        lambda h, b, k: h[:, None] + noise(ctx, b, k, n, o.noise_std),
        repeats=n,
        prob=not softmax,
        include_constant=softmax,
        deterministic=False,
    )
    return channel_weights(ctx, s, s.values.mean(dim=1))


def iscam(ctx: PerturbationContext) -> Tensor:
    """IS-CAM (Naidu et al. 2020): w_k = (1/N) sum_{i=1..N} p_c(X * (i/N) H_k), N = ``integration_steps`` (default 10)."""
    softmax = _softmax_variant(ctx)
    n = ctx.options.count("integration_steps", 10)
    steps = torch.arange(1, n + 1, device=ctx.x.device, dtype=torch.float32) / n
    shape = (1, n) + (1,) * (ctx.x.dim() - 2)  # one step per mask, over the H, W (or T, H, W) of each
    s = masked_scores(
        ctx, lambda h, b, k: h[:, None] * steps.view(shape), repeats=n, prob=not softmax, baseline=softmax
    )
    return channel_weights(ctx, s, s.values.mean(dim=1))


def ablationcam(ctx: PerturbationContext) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): w_k = (y_c - y_c^k) / y_c, y_c^k with channel k set to 0.

    ``ablation="gradcam-min"`` (pytorch-grad-cam): the channel is set to ``min(A) - 1e7`` instead when the
    activation's minimum is not 0. A zero y_c gives w_k = 0."""
    lows = ctx.activations.flatten(1).amin(dim=1)
    if ctx.options.ablation == "gradcam-min":
        value = torch.where(lows == 0, torch.zeros_like(lows), lows - 1e7)
    else:
        value = torch.zeros_like(lows)
    y, y_k = ablated_scores(ctx, value)  # [B, T], [B, K, T]
    w = (y[:, None, :] - y_k) / y[:, None, :]
    return torch.where(torch.isfinite(w), w, torch.zeros_like(w)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- settings

#: The :class:`PerturbationOptions` field that a method's ``samples`` parameter sets (its own count).
_COUNTS = {"sscam": "noise_draws", "iscam": "integration_steps", "opticam": "iterations"}


def _check_type(method: str, key: str, value: object, default: object) -> None:
    """A setting of the default's type (an int for a float, an int for a None default), else a CamkitError."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif default is None:
        ok = value is None or isinstance(value, int)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = "an int or None" if default is None else f"of type {type(default).__name__} (like {default!r})"
        raise CamkitError(f"{method}: {key} must be {want}, got {value!r}")
    if key == "samples" and value < 1:  # type: ignore[operator]  # an int here
        raise CamkitError(f"{method}: samples must be >= 1, got {value}")


def tunable(
    method: PerturbationMethod, parameters: Mapping[str, object]
) -> Callable[..., PerturbationMethod]:
    """A factory of configured copies of a perturbation method: ``factory(samples=10)`` is the method with these
    :class:`PerturbationOptions` fields set for it alone, over the call's (``samples`` sets the method's own
    count: SS-CAM's ``noise_draws``, IS-CAM's ``integration_steps``, Opti-CAM's ``iterations``), named
    ``sscam(samples=10)``. Types are checked against ``parameters`` (the defaults), values by
    :class:`PerturbationOptions`, with its messages."""

    def factory(**settings: object) -> PerturbationMethod:
        for key, value in settings.items():
            if key not in parameters:
                raise CamkitError(f"{method.name} has no parameter {key!r}")
            _check_type(method.name, key, value, parameters[key])
        fields = {_COUNTS.get(method.name, k) if k == "samples" else k: v for k, v in settings.items()}
        PerturbationOptions(**fields)  # type: ignore[arg-type]  # checks the values, with the API's messages
        if not fields:
            return method
        base = method.weights

        def weights(ctx: PerturbationContext) -> Tensor:
            options = dataclasses.replace(ctx.options, **fields)  # type: ignore[arg-type]
            return base(dataclasses.replace(ctx, options=options))

        name = configured_name(method.name, settings, parameters)
        return dataclasses.replace(method, name=name, weights=weights)

    return factory


def register_tunable(method: PerturbationMethod, parameters: Mapping[str, object]) -> None:
    """Register a perturbation method with its settings (:func:`tunable`)."""
    register(method, tunable(method, parameters), parameters)


_SCORE = {"weighting": "prob", "top_channels": None}

# ----------------------------------------------------------------------------------------------- registry

register_tunable(
    ClipPerturbationMethod(
        name="scorecam",
        needs_grad=False,
        cost="1 forward + K masked forwards (K channels), batched",
        paper="Wang et al., CVPRW 2020",
        summary="w_k = p_c(X * minmax(up(A_k))); map = sum_k w_k A_k",
        aliases=("score-cam",),
        weights=scorecam,
        prefer="no gradients needed, or gradients that saturate: weights from the class score itself; K forwards",
    ),
    {**_SCORE, "align_corners": False},
)
register_tunable(
    ClipPerturbationMethod(
        name="sscam",
        needs_grad=False,
        cost="1 forward + K x samples noisy masked forwards, batched",
        paper="Naidu, Wang et al. 2020 (SS-CAM)",
        summary="w_k = mean_i p_c(X * (H_k + noise_i)); map = sum_k w_k A_k",
        aliases=("ss-cam", "smoothscorecam"),
        weights=sscam,
        prefer="Score-CAM with less noise in the weights, when its maps look speckled; K x samples forwards",
    ),
    {"samples": 35, "noise_std": 2.0, "seed": 0, **_SCORE},
)
register_tunable(
    ClipPerturbationMethod(
        name="iscam",
        needs_grad=False,
        cost="1 forward + K x samples scaled masked forwards, batched",
        paper="Naidu et al. 2020 (IS-CAM)",
        summary="w_k = mean_i p_c(X * (i/N) H_k); map = sum_k w_k A_k",
        aliases=("is-cam", "integratedscorecam"),
        weights=iscam,
        prefer="Score-CAM that integrates the mask from 0 to 1, smoother weights for low-confidence classes",
    ),
    {"samples": 10, **_SCORE},
)
register_tunable(
    ClipPerturbationMethod(
        name="ablationcam",
        needs_grad=False,
        cost="1 forward + K replays of the layers after the target, batched",
        paper="Desai & Ramaswamy, WACV 2020",
        summary="w_k = (y_c - y_c with A_k := 0) / y_c; map = sum_k w_k A_k",
        aliases=("ablation-cam", "ablation"),
        weights=ablationcam,
        prefer="gradient-free and cheap with the replay (only the layers after the target rerun); CNN layers",
    ),
    {"ablation": "zero", "replay": True},
)
