"""The shared engine of the perturbation methods: batching masked inputs under ``torch.inference_mode()``,
selecting, skipping and deduplicating channels, seeded noise, replaying the layers after the target (Ablation-CAM)
and progress reports.

The weight formulas themselves, with their papers, are in :mod:`camkit.methods.perturbation`; they call
:func:`masked_scores` (scores of the input times perturbed channel masks) or :func:`ablated_scores` (scores with one
channel of the target layer replaced), then :func:`channel_weights` to lay the scores out as Tensor[B, T, K].
The batches of masked inputs go through :class:`camkit.core.accel.BatchForward` (BatchNorm-folded, channels-last copy;
optionally compiled; or the user's ``forward``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit.core.accel import BatchForward, Compile, check_compile
from camkit.core.capture import hook_forward
from camkit.core.tokens import Layout
from camkit.errors import CamkitError

__all__ = [
    "ChannelScores",
    "PerturbationContext",
    "PerturbationOptions",
    "Progress",
    "ablated_scores",
    "channel_weights",
    "masked_scores",
    "noise",
]

Perturb = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``perturb(masks[n, H, W], image[n], channel[n]) -> Tensor[n, R, H, W]``: the R masks to score per channel
(for a clip: masks[n, T, H, W] -> Tensor[n, R, T, H, W])."""


@dataclass(frozen=True)
class PerturbationOptions:
    """Settings of the perturbation methods (``explain(..., perturbation=PerturbationOptions(...))``).

    Attributes:
        batch_size: masked inputs per forward pass; None: chosen from an estimate of one image's activation
            memory: on CPU what fits in a fixed 128 MiB (larger batches are not faster there; fixed, so that two
            identical calls batch alike and round alike), at most 64; on GPU a quarter of the free memory, at
            most 256.
        weighting: ``"prob"`` (the Score-CAM authors' code: the class probability of each masked input) or
            ``"channel-softmax"`` (pytorch-grad-cam / torchcam: softmax over channels of the masked logits).
        ablation: ``"zero"`` (the paper) or ``"gradcam-min"`` (pytorch-grad-cam: ``min(A) - 1e7`` when the
            activation's minimum is not 0).
        top_channels: only the k channels of highest mean activation per image get a forward pass (others:
            weight 0). Faster, approximate; None (default) is exact.
        samples: the default of ``noise_draws``, ``integration_steps`` and ``iterations`` when those are None (one
            setting for the three methods, kept for existing callers).
        noise_draws: SS-CAM's noise draws per channel (default 35).
        integration_steps: IS-CAM's integration steps (default 10).
        iterations: Opti-CAM's optimisation steps (default 100).
        noise_std: standard deviation of SS-CAM's mask noise.
        seed: seed of SS-CAM's noise.
        replay: Ablation-CAM re-runs only the layers after the target (default); False runs whole forwards.
        channels_last: Score-CAM family: the masked inputs go to a copy of the model whose BatchNorms are
            folded into the convolutions before them, in channels-last memory format (same outputs up to float
            rounding, checked once on the first batch, see :mod:`camkit.core.accel`). None (default): channels-last
            on CPU; True: on any device; False: neither (the model as given, NCHW).
        compile: Score-CAM family: run the masked inputs through a prepared copy of the model, prepared once per
            model and batch shape and reused by later calls in the process (invalidated when the weights
            change), checked once against the model (see :mod:`camkit.core.accel`). ``"jit"``: ``torch.jit.trace`` of
            the BatchNorm-folded copy, ``torch.jit.freeze`` and ``torch.jit.optimize_for_inference`` (seconds to
            prepare; a model whose trace warns, e.g. data-dependent control flow, falls back to the default path
            with one ``AccelWarning``); ``"inductor"``: ``torch.compile`` with freezing (tens of seconds to
            compile); ``"onnx"``: the BatchNorm-folded copy exported by ``torch.onnx.export`` and run by ONNX
            Runtime on the CPU (seconds to prepare; ``pip install 'camkit[onnx]'``); True: ``"onnx"`` on CPU where
            ONNX Runtime is installed, else ``"jit"``, and ``"inductor"`` on other devices; False (default):
            none. It also
            covers the shared capture of the methods that need dS/dA (Grad-CAM and the methods sharing its forward
            and backward): the prepared copy of :mod:`camkit.core.prepared` is cut by ``torch.fx`` before the
            earliest target layer and the part before it, which needs no gradient, runs compiled by the same
            backend (:mod:`camkit.core.split`; prepared once per input shape: seconds with ``"jit"`` and
            ``"onnx"``, tens of seconds with ``"inductor"``; checked once against the model; a model ``torch.fx`` cannot trace falls
            back to the uncompiled copy with one ``AccelWarning``).
        forward: a callable ``Tensor[N, C, H, W] -> model output`` used for the masked inputs instead of the
            model (Score-CAM family), for example your own compiled model or an ONNX Runtime session::

                sess = onnxruntime.InferenceSession("model.onnx")
                run = lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
                camkit.explain(model, x, "scorecam", perturbation=PerturbationOptions(forward=run))

            It must compute what the model computes: camkit does not check it.
        align_corners: upsample the Score-CAM masks with ``align_corners=True``, as pytorch-grad-cam's
            ``nn.UpsamplingBilinear2d`` does (the Score-CAM authors use ``False``, the default). With
            ``weighting="channel-softmax"`` this reproduces pytorch-grad-cam's ScoreCAM.
        progress: ``f(done, total)`` called after each batch of forward passes.
    """

    batch_size: int | None = None
    weighting: Literal["prob", "channel-softmax"] = "prob"
    ablation: Literal["zero", "gradcam-min"] = "zero"
    top_channels: int | None = None
    samples: int | None = None
    noise_draws: int | None = None
    integration_steps: int | None = None
    iterations: int | None = None
    noise_std: float = 2.0
    seed: int = 0
    replay: bool = True
    align_corners: bool = False
    channels_last: bool | None = None
    compile: Compile = False
    forward: Callable[[Tensor], object] | None = field(default=None, compare=False)
    progress: Callable[[int, int], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise CamkitError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weighting not in ("prob", "channel-softmax"):
            raise CamkitError(f"weighting must be 'prob' or 'channel-softmax', got {self.weighting!r}")
        if self.ablation not in ("zero", "gradcam-min"):
            raise CamkitError(f"ablation must be 'zero' or 'gradcam-min', got {self.ablation!r}")
        if not 0 <= self.noise_std < float("inf"):  # NaN too
            raise CamkitError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")
        if self.top_channels is not None and self.top_channels < 1:
            raise CamkitError(f"top_channels must be >= 1, got {self.top_channels}")
        if self.channels_last not in (None, True, False):
            raise CamkitError(f"channels_last must be None, True or False, got {self.channels_last!r}")
        check_compile(self.compile)
        for name in ("samples", "noise_draws", "integration_steps", "iterations"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CamkitError(f"{name} must be >= 1, got {value}")
            if value is not None and value >= 2**63:
                raise CamkitError(f"{name} must be below 2**63, got {value}")
        if self.forward is not None and not callable(self.forward):
            raise TypeError(
                f"forward must be a callable Tensor[N, C, H, W] -> model output, got {self.forward!r}"
            )

    def count(self, name: str, default: int) -> int:
        """A method's own count (``noise_draws``, ``integration_steps``, ``iterations``), else ``samples``, else
        the method's default."""
        value = getattr(self, name)
        return int(value if value is not None else self.samples if self.samples is not None else default)


@dataclass
class PerturbationContext:
    """What a perturbation method needs besides the activation (built by :func:`camkit.explain`)."""

    model: nn.Module
    x: Tensor  # the model input, Tensor[B, C, H, W]
    layer: nn.Module
    layer_name: str
    calls: int  # how many times the layer runs in one forward (the last call is the explained one)
    activations: Tensor  # Tensor[B, K, h, w]
    output: Tensor  # the model output for x
    classes: Tensor | None  # LongTensor[B] or [B, T]; None for a callable target
    target_fn: Callable[[Tensor], Tensor] | None
    output_fn: Callable[[object], Tensor]
    options: PerturbationOptions = field(default_factory=PerturbationOptions)
    progress: Progress | None = None
    batched: BatchForward | None = None  # made on first use (see :mod:`camkit.core.accel`)
    layout: Layout | None = (
        None  # how the layer's own output maps to ``activations`` (None: as is, or unknown)
    )


class Progress:
    """Counts forward passes over all layers and methods of one call and reports them."""

    def __init__(self, callback: Callable[[int, int], None] | None) -> None:
        self.callback = callback
        self.total = 0
        self.done = 0
        self.batch: int | None = None  # the automatic batch size, found once per call

    def add(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


# ----------------------------------------------------------------------------------------------- helpers


def _n_targets(ctx: PerturbationContext) -> int:
    return 1 if ctx.classes is None or ctx.classes.dim() == 1 else ctx.classes.shape[1]


def _scores(ctx: PerturbationContext, out: Tensor, image: Tensor, prob: bool) -> Tensor:
    """Scores Tensor[n, T] of the explained target(s) of image ``image[i]`` for each row of the output."""
    if ctx.classes is None:
        assert ctx.target_fn is not None
        score_rows = getattr(ctx.target_fn, "score_rows", None)  # one target per image (PerImageTargets)
        s = score_rows(out, image) if score_rows is not None else ctx.target_fn(out)
        if s.shape != (out.shape[0],):
            raise CamkitError(
                f"the target function must return one score per image, Tensor[{out.shape[0]}], got shape "
                f"{tuple(s.shape)}"
            )
        return s.float()[:, None]
    values = torch.softmax(out.float(), dim=1) if prob else out.float()
    cls = ctx.classes.to(out.device)[image.to(out.device)]
    if cls.dim() == 1:
        cls = cls[:, None]
    return values.gather(1, cls)


def _check_finite(scores: Tensor, image: Tensor, what: str) -> None:
    """Raise a ValueError naming the images (indices in the batch) whose perturbed score is NaN or Inf.

    Args:
        scores: Tensor[n, T], the scores of n perturbed inputs.
        image: Tensor[n], the image each row perturbs.
        what: which perturbation, for the message.
    """
    bad = ~torch.isfinite(scores).flatten(1).all(dim=1)
    if bool(bad.any()):
        images = sorted({int(i) for i in image.cpu()[bad.cpu()]})
        shown = ", ".join(map(str, images[:10])) + (
            f" and {len(images) - 10} more" if len(images) > 10 else ""
        )
        raise CamkitError(
            f"the model's score of {what} is not finite (NaN or Inf) for image(s) {shown} (indices in the "
            "batch): nothing can be weighted there; check the model's weights and that it accepts perturbed inputs"
        )


def _forward(ctx: PerturbationContext, inputs: Tensor, rows: int | None = None, fast: bool = False) -> Tensor:
    """The model's output for a batch; ``fast``: through :class:`camkit.core.accel.BatchForward` (not for hooked
    replays, which need the real model)."""
    if fast:
        if ctx.batched is None:
            o = ctx.options
            ctx.batched = BatchForward(
                ctx.model, ctx.output_fn, channels_last=o.channels_last, compile=o.compile, forward=o.forward
            )
        out = ctx.batched(inputs)
    else:
        out = ctx.output_fn(ctx.model(inputs))
    rows = inputs.shape[0] if rows is None else rows
    if out.shape[0] != rows:
        raise RuntimeError(f"the model returned {out.shape[0]} rows for a batch of {rows} perturbed inputs")
    return out


_CPU_BUDGET = 128 << 20
"""Activation memory of one CPU batch: fixed, so the batch (and the float rounding) never depends on free memory."""


def _free_memory(device: torch.device) -> int:
    """Free memory of the device, in bytes (GPU: the CUDA driver's count; else psutil's available memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _budget(device: torch.device) -> int:
    """Bytes a batch may use: a quarter of the free GPU memory; on CPU the fixed :data:`_CPU_BUDGET`, lowered only
    when less than four times that is available (then a warning says the batch depends on free memory)."""
    if device.type == "cuda":
        return _free_memory(device) // 4
    free = _free_memory(device)
    if free < 4 * _CPU_BUDGET:
        warnings.warn(
            f"only {free >> 20} MiB of memory available: smaller perturbation batches than usual (set "
            "PerturbationOptions(batch_size=...) for results that do not depend on free memory)",
            ResourceWarning,
            stacklevel=3,
        )
        return max(free // 4, 1)
    return _CPU_BUDGET


def _per_image_bytes(model: nn.Module, x1: Tensor, output_fn: Callable[[object], Tensor]) -> int:
    """Estimate of the memory one extra image adds to an inference forward: 3x the largest module output."""
    largest = [x1.numel() * x1.element_size()]

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [hook_forward(m, hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            output_fn(model(x1))
    finally:
        for h in handles:
            h.remove()
    return 3 * largest[0] + 2 * x1.numel() * x1.element_size()


def batch_size_for(ctx: PerturbationContext) -> int:
    """The number of masked inputs per forward: the user's setting, or what fits the budget (:func:`_budget`)."""
    if ctx.options.batch_size is not None:
        return ctx.options.batch_size
    if ctx.progress is not None and ctx.progress.batch is not None:
        return ctx.progress.batch
    device = ctx.x.device
    per_image = _per_image_bytes(ctx.model, ctx.x[:1], ctx.output_fn)
    budget = _budget(device)
    cap = 256 if device.type == "cuda" else 64  # on CPU a batch that outgrows the caches is slower per image
    batch = int(max(1, min(cap, budget // max(per_image, 1))))
    if ctx.progress is not None:
        ctx.progress.batch = batch
    return batch


def _selected(ctx: PerturbationContext, include_constant: bool) -> Tensor:
    """Bool[B, K]: the channels that get forward passes (non-constant, and in the top-k when asked)."""
    a = ctx.activations
    flat = a.flatten(2)
    sel = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
    if not include_constant:
        sel &= flat.amax(dim=2) != flat.amin(dim=2)
    k = ctx.options.top_channels
    if k is not None and k < a.shape[1]:
        top = flat.mean(dim=2).topk(k, dim=1).indices
        keep = torch.zeros_like(sel)
        keep.scatter_(1, top, True)
        sel &= keep
    return sel


def _masks(ctx: PerturbationContext, b: Tensor, k: Tensor) -> Tensor:
    """H_k = minmax(upsample(A_k)) for the (image, channel) pairs -> Tensor[n, H, W] (a clip: Tensor[n, T, H, W],
    the stacked 3-D activation unfolded and upsampled trilinearly); constant maps -> zeros."""
    a = ctx.activations[b, k].float()
    if ctx.x.dim() == 5:
        a = ctx.layout.unfold(a) if ctx.layout is not None else a
        if a.dim() != 4:
            raise CamkitError(
                f"{ctx.layer_name} gives no [T, h, w] volume for a clip: pick a 3-D convolution layer for a clip"
            )
    mode = "trilinear" if a.dim() == 4 else "bilinear"
    up = F.interpolate(a[:, None], size=ctx.x.shape[2:], mode=mode, align_corners=ctx.options.align_corners)[
        :, 0
    ]
    dims = tuple(range(1, up.dim()))
    lo = up.amin(dim=dims, keepdim=True)
    span = up.amax(dim=dims, keepdim=True) - lo
    ok = span > 0
    return torch.where(ok, (up - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(up))


def _distinct(ctx: PerturbationContext, bidx: Tensor, kidx: Tensor) -> tuple[Tensor, Tensor]:
    """Positions (in ``bidx``) of one (image, channel) pair per distinct normalised map, sorted, and for every pair
    the index of its representative among them.

    Channels of one image whose maps are equal after min-max normalisation (ReLU maps with one non-zero cell at the
    same place: ResNet-50 with random weights, 27 of 1949 channels; or one map a multiple of another) give the same
    mask, so one forward pass serves them all. Maps are grouped on a coarse grid (2^-10), then each member is
    checked against its group's first: merged only when no cell differs by more than 2^-20 (1e-6, the float32
    rounding of the normalisation itself); a pair the grid splits is merely not shared."""
    a = ctx.activations[bidx, kidx].float().flatten(1).cpu()
    n = a.shape[0]
    lo, hi = a.amin(dim=1, keepdim=True), a.amax(dim=1, keepdim=True)
    norm = (a - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    key = torch.cat([bidx.cpu()[:, None].float(), torch.round(norm * 2.0**10)], dim=1)
    _, group = torch.unique(key, dim=0, return_inverse=True)
    rep = torch.arange(n)
    order = torch.argsort(group, stable=True)
    sizes = torch.bincount(group)
    for members in torch.split(order, sizes.tolist()):
        if len(members) < 2:
            continue
        head = int(members[0])
        same = (norm[members[1:]] - norm[head]).abs().amax(dim=1) <= 2.0**-20
        rep[members[1:][same]] = head
    reps = torch.unique(rep)  # sorted positions of the representatives
    return reps, torch.searchsorted(reps, rep)


def _seed64(seed: int) -> int:
    """``seed`` as torch's generators take it (-2**63 .. 2**64 - 1): as it is when it fits, else modulo 2**64."""
    return seed if -(2**63) <= seed < 2**64 else seed % 2**64


def noise(ctx: PerturbationContext, image: Tensor, channel: Tensor, n: int, std: float) -> Tensor:
    """n Gaussian noise maps N(0, std^2) per (image, channel) pair, Tensor[len(image), n, H, W] (a clip:
    Tensor[len(image), n, T, H, W]).

    Each pair draws from its own generator seeded from ``options.seed``, the image and the channel, so the noise
    (and the result) does not depend on the batch size or on which other channels are computed."""
    space = ctx.x.shape[2:]
    kch = ctx.activations.shape[1]
    maps = [
        torch.randn(
            n,
            *space,
            generator=torch.Generator().manual_seed(_seed64(ctx.options.seed * 1_000_003 + b * kch + k)),
        )
        for b, k in zip(image.tolist(), channel.tolist(), strict=True)
    ]
    return (torch.stack(maps) * std).to(ctx.x.device)


# ----------------------------------------------------------------------------------------------- masked inputs


@dataclass(frozen=True)
class ChannelScores:
    """Scores of perturbed inputs, one row per (image, channel) pair that got forward passes.

    Attributes:
        image, channel: LongTensor[n], the pairs.
        values: Tensor[n, R, T], the explained target(s)' score of each of the pair's R perturbed inputs.
        baseline: Tensor[B, T], the score of the all-zero input (the masked input of a constant channel), when
            asked for; else None.
    """

    image: Tensor
    channel: Tensor
    values: Tensor
    baseline: Tensor | None = None


def _identity_mask(masks: Tensor, _image: Tensor, _channel: Tensor) -> Tensor:
    return masks[:, None]


def masked_scores(
    ctx: PerturbationContext,
    perturb: Perturb = _identity_mask,
    *,
    repeats: int = 1,
    prob: bool = True,
    include_constant: bool = False,
    deterministic: bool = True,
    baseline: bool = False,
) -> ChannelScores:
    """Scores of ``X * m`` for the masks ``m = perturb(H_k)`` of the selected channels, all in batches.

    H_k = minmax(upsample(A_k)) is channel k's mask at input size (all zeros for a constant channel).

    Args:
        perturb: ``(masks[n, H, W], image[n], channel[n]) -> Tensor[n, repeats, H, W]``; default: H_k itself.
        repeats: R, how many masks ``perturb`` makes per channel.
        prob: score the softmax probability of the class (else the logit; a callable target: its value).
        include_constant: also give forward passes to constant channels (else they are skipped).
        deterministic: ``perturb`` is a function of the mask alone, so channels with equal masks share their
            forward passes (False for noise).
        baseline: also score the all-zero input of each image (``ChannelScores.baseline``), when some channel
            of the top-k set is skipped.

    Channels outside ``options.top_channels`` are never scored.
    """
    sel = _selected(ctx, include_constant=include_constant)
    bidx, kidx = sel.nonzero(as_tuple=True)
    # Equal masks give equal masked inputs: one forward per distinct mask.
    if deterministic:
        reps, owner = _distinct(ctx, bidx, kidx)
    else:
        reps = owner = torch.arange(len(bidx))
    rb, rk = bidx[reps.to(bidx.device)], kidx[reps.to(kidx.device)]
    bsz, t = ctx.activations.shape[0], _n_targets(ctx)
    need_baseline = baseline and bool((_selected(ctx, include_constant=True) & ~sel).any())
    per_batch = max(1, batch_size_for(ctx) // repeats)
    if ctx.progress is not None:
        ctx.progress.total += len(rb) * repeats + (bsz if need_baseline else 0)
    device = ctx.x.device
    prob = prob and ctx.classes is not None
    rep_scores = torch.zeros(len(rb), repeats, t, device=device)
    if ctx.batched is None:
        o = ctx.options
        ctx.batched = BatchForward(
            ctx.model,
            ctx.output_fn,
            channels_last=o.channels_last,
            compile=o.compile,
            forward=o.forward,
            batch=per_batch * repeats,
        )
    with torch.inference_mode():
        for start in range(0, len(rb), per_batch):
            b, k = rb[start : start + per_batch], rk[start : start + per_batch]
            masks = perturb(_masks(ctx, b, k), b, k)  # [n, R, H, W]
            if masks.shape[:2] != (len(b), repeats):
                raise CamkitError(
                    f"perturb must return Tensor[{len(b)}, {repeats}, H, W], got {tuple(masks.shape)}"
                )
            images = b.repeat_interleave(repeats)
            inputs = ctx.x[images] * masks.flatten(0, 1)[:, None].to(ctx.x.dtype)
            s = _scores(ctx, _forward(ctx, inputs, fast=True), images, prob)
            _check_finite(s, images, "a masked input")
            rep_scores[start : start + len(b)] = s.view(len(b), repeats, t)
            if ctx.progress is not None:
                ctx.progress.add(len(images))
        base = None
        if need_baseline:
            base = _scores(ctx, _forward(ctx, torch.zeros_like(ctx.x), fast=True), torch.arange(bsz), prob)
            _check_finite(base, torch.arange(bsz), "the all-zero input")
            if ctx.progress is not None:
                ctx.progress.add(bsz)
    return ChannelScores(bidx, kidx, rep_scores[owner.to(device)], base)


def channel_weights(ctx: PerturbationContext, scores: ChannelScores, per_channel: Tensor) -> Tensor:
    """Lay per-channel values Tensor[n, T] (one per scored pair) out as weights Tensor[B, T, K].

    ``weighting="prob"``: the value itself; unscored channels get 0. ``weighting="channel-softmax"``: softmax over
    the channels of each image, where an unscored constant channel takes the score of the zero input
    (``scores.baseline``) and channels outside ``top_channels`` do not take part."""
    bsz, kch = ctx.activations.shape[:2]
    t = _n_targets(ctx)
    device = per_channel.device
    if ctx.options.weighting != "channel-softmax":
        weights = torch.zeros(bsz, kch, t, device=device)
        weights[scores.image, scores.channel] = per_channel
        return weights.transpose(1, 2)
    if scores.baseline is not None:
        filled = scores.baseline[:, None, :].expand(bsz, kch, t).clone()
    else:
        filled = torch.full((bsz, kch, t), float("-inf"), device=device)
    if ctx.options.top_channels is not None:  # channels outside the top-k do not take part in the softmax
        filled[~_selected(ctx, include_constant=True)] = float("-inf")
    filled[scores.image, scores.channel] = per_channel
    return torch.softmax(filled, dim=1).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- Ablation-CAM


class _Replace:
    """Forward hook that swaps the layer's output on its explained (last) call for a given tensor.

    The tensor is a batch of feature maps [n, K, h, w]; for a token, channels-last or 3-D ``layout`` it is put back
    into that layout first (:meth:`camkit.core.tokens.Layout.write`), so the layers after the target read what they always read."""

    def __init__(self, calls: int, layout: Layout | None = None) -> None:
        self.calls = calls
        self.layout = layout if layout is not None and layout.kind != "nchw" else None
        self.seen = 0
        self.value: Tensor | None = None
        self.shape: tuple[int, ...] | None = None

    def expected(self, out: Tensor) -> bool:
        """Whether the live output ``out`` has the layout the feature maps came from."""
        assert self.value is not None
        if self.layout is None:
            return tuple(out.shape[1:]) == tuple(self.value.shape[1:])
        k, h, w = self.value.shape[1:]
        if self.layout.kind == "nhwc":
            return out.dim() == 4 and tuple(out.shape[1:]) == (h, w, k)
        if (
            self.layout.kind == "ncthw"
        ):  # frames stacked along the height: [K, t*h', w] read from [K, t, h', w]
            return out.dim() == 5 and tuple(out.shape[1:]) == (k, self.layout.frames, *self.layout.grid)
        n_tok = self.layout.prefix + h * w
        dims = (
            (out.shape[0], out.shape[2]) if self.layout.kind == "tokens-seq-first" else tuple(out.shape[1:])
        )
        return out.dim() == 3 and dims == (n_tok, k)

    def __call__(self, _m: nn.Module, _i: object, out: object) -> Tensor | None:
        self.seen += 1
        if self.seen != self.calls:
            return None
        assert self.value is not None
        if isinstance(out, Tensor):
            self.shape = tuple(out.shape[1:])
        if not isinstance(out, Tensor) or not self.expected(out):
            # an output the feature maps cannot be put back into: stop here, before the layers after it run (they
            # would fail with an error of their own)
            raise _LayoutMismatch(self.shape)
        if self.layout is None:
            return self.value
        return self.layout.write(self.value, out)


class _LayoutMismatch(Exception):
    def __init__(self, shape: tuple[int, ...] | None) -> None:
        super().__init__(shape)
        self.shape = shape


def _run_replaced(ctx: PerturbationContext, inputs: Tensor, acts: Tensor) -> Tensor:
    hook = _Replace(ctx.calls, ctx.layout)
    hook.value = acts
    handle = hook_forward(ctx.layer, hook)  # this thread only
    try:
        out = _forward(ctx, inputs, rows=acts.shape[0])
    except _LayoutMismatch as err:
        shape = "a non-tensor" if err.shape is None else f"[B, {', '.join(map(str, err.shape))}]"
        raise CamkitError(
            f"Ablation-CAM cannot feed the ablated feature maps [B, {', '.join(map(str, acts.shape[1:]))}] back "
            f"into {ctx.layer_name!r}, which outputs {shape}: a layout camkit could not read back (with a custom "
            "reshape=, the inverse is unknown); use Score-CAM or a gradient method there, or leave reshape= "
            "to camkit"
        ) from None
    finally:
        handle.remove()
    if hook.seen < ctx.calls:
        raise CamkitError(
            f"Ablation-CAM: the target layer {ctx.layer_name!r} did not run in the replayed forward"
        )
    return out


def ablated_scores(ctx: PerturbationContext, value: Tensor) -> tuple[Tensor, Tensor]:
    """The explained score y_c (logit, or a callable target's value) of each image, Tensor[B, T], and y_c^k with
    channel k of the target layer's activation set to ``value[b]`` everywhere, Tensor[B, K, T].

    By default only the layers after the target run again (the cached activation is replayed with the channel
    replaced, through a forward hook on the real model; checked against the original output on the first batch,
    else whole forwards). A token or channels-last layer (``ctx.layout``) gets the ablated maps back in its own
    layout: channel k of the patch tokens is ablated, prefix tokens (class, distillation) are kept. Channels already equal to ``value[b]`` everywhere, and channels outside
    ``top_channels``, get no forward: y_c^k = y_c."""
    a = ctx.activations
    bsz, kch = a.shape[:2]
    base = _scores(ctx, ctx.output, torch.arange(bsz), prob=False)  # [B, T]
    value = value.to(device=a.device, dtype=a.dtype)
    # Channels already equal to the ablation value everywhere: ablating them changes nothing (w_k = 0).
    noop = (a.flatten(2) == value[:, None, None]).all(dim=2)
    sel = _selected(ctx, include_constant=True) & ~noop
    if ctx.progress is not None:
        ctx.progress.total += int(sel.sum())
    new = base[:, None, :].expand(bsz, kch, _n_targets(ctx)).clone()  # y_c^k; no-op and skipped keep y_c
    run = _AblationRun(ctx, replay=ctx.options.replay)
    batch = _ablation_batch(ctx)
    with torch.inference_mode():
        for b in range(bsz):
            ks = sel[b].nonzero()[:, 0]
            for start in range(0, len(ks), batch):
                k = ks[start : start + batch]
                new[b, k] = run.scores(b, k, value[b])
                if ctx.progress is not None:
                    ctx.progress.add(len(k))
    return base, new


def _ablation_batch(ctx: PerturbationContext) -> int:
    """Ablations per forward: a replayed batch holds only the tail's activations, so many more fit."""
    batch = batch_size_for(ctx)
    if ctx.options.replay and ctx.options.batch_size is None:
        a = ctx.activations
        per_row = 4 * a[0].numel() * a.element_size()
        batch = max(batch, min(1024, a.shape[1], _budget(a.device) // max(per_row, 1)))
    return batch


class _AblationRun:
    """The forwards of one :func:`ablated_scores` call: replays of the layers after the target while they give the
    model's output (checked on the first batch, which carries one unablated row), else whole forwards."""

    def __init__(self, ctx: PerturbationContext, replay: bool) -> None:
        self.ctx, self.replay, self.checked = ctx, replay, False

    def scores(self, b: int, k: Tensor, value: Tensor) -> Tensor:
        """y_c^k of image ``b`` for the channels ``k``, Tensor[n, T]."""
        ctx, a = self.ctx, self.ctx.activations
        extra = 0 if self.checked else 1
        acts = a[b : b + 1].expand(len(k) + extra, *a.shape[1:]).clone()
        acts[torch.arange(len(k)) + extra, k] = value.to(acts.dtype)
        images = torch.full((acts.shape[0],), b, dtype=torch.long)
        out = self._replayed(b, acts) if self.replay else None
        if out is None:
            out = _run_replaced(ctx, ctx.x[b : b + 1].expand(acts.shape[0], *ctx.x.shape[1:]), acts)
            if not self.checked and not _same(out[:1], ctx.output[b : b + 1]):
                raise RuntimeError(
                    "the model does not give the same output when its target-layer activation is fed "
                    "back unchanged; is it deterministic and in eval mode?"
                )
        s = _scores(ctx, out, images, prob=False)
        _check_finite(s, images, "an ablated activation")
        if not self.checked:
            self.checked = True
            return s[1:]
        return s

    def _replayed(self, b: int, acts: Tensor) -> Tensor | None:
        """The replay's output, or None (and whole forwards from now on, with a warning) when it does not work."""
        ctx = self.ctx
        why = "its output differs from the model's"
        try:
            out: Tensor | None = _run_replaced(ctx, ctx.x[b : b + 1], acts)
        except (RuntimeError, IndexError) as err:  # e.g. a concatenation with an earlier tensor
            out, why = None, f"{type(err).__name__}: {err}"
        if out is not None and not self.checked and not _same(out[:1], ctx.output[b : b + 1]):
            out = None
        if out is None:
            self.replay = False
            warnings.warn(
                f"Ablation-CAM: replaying the layers after {ctx.layer_name!r} does not work for this "
                f"model ({why}); running whole forwards instead (slower, same weights)",
                RuntimeWarning,
                stacklevel=4,
            )
        return out


def _same(a: Tensor, b: Tensor) -> bool:
    a, b = a.float(), b.float().to(a.device)
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max().clamp_min(1.0))))
