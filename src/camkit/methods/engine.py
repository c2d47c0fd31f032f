"""The shared engine of the perturbation methods: batching masked inputs under ``torch.inference_mode()``,
skipping and deduplicating channels, and replaying the layers after the target (Ablation-CAM).

The weight formulas themselves, with their papers, are in :mod:`camkit.methods.perturbation`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit._fastforward import FastForward

__all__ = ["PerturbationContext", "PerturbationOptions", "Progress"]


@dataclass(frozen=True)
class PerturbationOptions:
    """Settings of the perturbation methods (``explain(..., perturbation=PerturbationOptions(...))``).

    Attributes:
        batch_size: masked inputs per forward pass; None: chosen from an estimate of one image's activation
            memory: what fits in a quarter of the free memory, and on CPU in 128 MiB (larger batches are not
            faster there), at most 64 on CPU and 256 on GPU.
        weighting: ``"prob"`` (the Score-CAM authors' code: the class probability of each masked input) or
            ``"channel-softmax"`` (pytorch-grad-cam / torchcam: softmax over channels of the masked logits).
        ablation: ``"zero"`` (the paper) or ``"gradcam-min"`` (pytorch-grad-cam: ``min(A) - 1e7`` when the
            activation's minimum is not 0).
        top_channels: only the k channels of highest mean activation per image get a forward pass (others:
            weight 0). Faster, approximate; None (default) is exact.
        samples: noise draws (SS-CAM, default 35) or integration steps (IS-CAM, default 10).
        noise_std: standard deviation of SS-CAM's mask noise.
        seed: seed of SS-CAM's noise.
        replay: Ablation-CAM re-runs only the layers after the target (default); False runs whole forwards.
        channels_last: Score-CAM family: send the masked inputs in channels-last memory format to a copy of
            the model whose BatchNorms are folded into the convolutions before them and, on CPU, whose wide 3x3
            convolutions run the Winograd way where that is faster and whose convolutions are packed for oneDNN
            with their ReLU and residual add fused (same outputs up to float rounding, checked on the first
            batch, see :mod:`camkit._fastforward`). None (default): on CPU; True: on any device;
            False: never (the model as given, NCHW).
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
    noise_std: float = 2.0
    seed: int = 0
    replay: bool = True
    align_corners: bool = False
    channels_last: bool | None = None
    progress: Callable[[int, int], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weighting not in ("prob", "channel-softmax"):
            raise ValueError(f"weighting must be 'prob' or 'channel-softmax', got {self.weighting!r}")
        if self.ablation not in ("zero", "gradcam-min"):
            raise ValueError(f"ablation must be 'zero' or 'gradcam-min', got {self.ablation!r}")
        if self.top_channels is not None and self.top_channels < 1:
            raise ValueError(f"top_channels must be >= 1, got {self.top_channels}")
        if self.channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be None, True or False, got {self.channels_last!r}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


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
    fast: FastForward | None = None  # made on first use; remembers whether channels-last inputs agree


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
            raise ValueError(
                f"the target function must return one score per image, Tensor[{out.shape[0]}], got shape "
                f"{tuple(s.shape)}"
            )
        return s.float()[:, None]
    values = torch.softmax(out.float(), dim=1) if prob else out.float()
    cls = ctx.classes.to(out.device)[image.to(out.device)]
    if cls.dim() == 1:
        cls = cls[:, None]
    return values.gather(1, cls)


def _forward(ctx: PerturbationContext, inputs: Tensor, rows: int | None = None, fast: bool = False) -> Tensor:
    """The model's output for a batch; ``fast``: through :class:`FastForward` (not for hooked replays, whose
    hooks count calls)."""
    if fast:
        if ctx.fast is None:
            ctx.fast = FastForward(ctx.model, ctx.output_fn, ctx.options.channels_last)
        out = ctx.fast(inputs)
    else:
        out = ctx.output_fn(ctx.model(inputs))
    rows = inputs.shape[0] if rows is None else rows
    if out.shape[0] != rows:
        raise RuntimeError(f"the model returned {out.shape[0]} rows for a batch of {rows} perturbed inputs")
    return out


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


def _per_image_bytes(model: nn.Module, x1: Tensor, output_fn: Callable[[object], Tensor]) -> int:
    """Estimate of the memory one extra image adds to an inference forward: 3x the largest module output."""
    largest = [x1.numel() * x1.element_size()]

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            output_fn(model(x1))
    finally:
        for h in handles:
            h.remove()
    return 3 * largest[0] + 2 * x1.numel() * x1.element_size()


def batch_size_for(ctx: PerturbationContext) -> int:
    """The number of masked inputs per forward: the user's setting, or what fits in a quarter of free memory."""
    if ctx.options.batch_size is not None:
        return ctx.options.batch_size
    if ctx.progress is not None and ctx.progress.batch is not None:
        return ctx.progress.batch
    device = ctx.x.device
    per_image = _per_image_bytes(ctx.model, ctx.x[:1], ctx.output_fn)
    budget = _free_memory(device) // 4
    if device.type == "cuda":
        cap = 256
    else:  # on CPU a batch whose activations outgrow the caches is slower per image, not faster
        cap = 64
        budget = min(budget, 128 << 20)
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
    """H_k = minmax(upsample(A_k)) for the (image, channel) pairs -> Tensor[n, H, W]; constant maps -> zeros."""
    a = ctx.activations[b, k].float()[:, None]  # [n, 1, h, w]
    up = F.interpolate(a, size=ctx.x.shape[-2:], mode="bilinear", align_corners=ctx.options.align_corners)[
        :, 0
    ]
    lo = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - lo
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


def _noise(ctx: PerturbationContext, b: int, k: int, n: int) -> Tensor:
    """SS-CAM's n noise maps of pair (b, k), Tensor[n, H, W], from the pair's own seeded generator."""
    g = torch.Generator().manual_seed(ctx.options.seed * 1_000_003 + b * ctx.activations.shape[1] + k)
    h, w = ctx.x.shape[-2:]
    return torch.randn(n, h, w, generator=g) * ctx.options.noise_std


# ----------------------------------------------------------------------------------------------- Score-CAM family


def _score_family(ctx: PerturbationContext, variant: Literal["score", "smooth", "integrated"]) -> Tensor:
    """Channel weights Tensor[B, T, K] of Score-CAM / SS-CAM / IS-CAM."""
    opts = ctx.options
    a = ctx.activations
    bsz, kch = a.shape[:2]
    t = _n_targets(ctx)
    prob = opts.weighting == "prob" and ctx.classes is not None
    channel_softmax = opts.weighting == "channel-softmax"
    # forward passes per mask
    n_rep = 1 if variant == "score" else (opts.samples or (35 if variant == "smooth" else 10))
    # SS-CAM's constant channels still get noisy masks in the channel-softmax variant (as torchcam).
    sel = _selected(ctx, include_constant=channel_softmax and variant == "smooth")
    bidx, kidx = sel.nonzero(as_tuple=True)
    # Equal masks give equal masked inputs: one forward per distinct mask (SS-CAM's noise differs per channel).
    if variant == "smooth":
        reps, owner = torch.arange(len(bidx)), torch.arange(len(bidx))
    else:
        reps, owner = _distinct(ctx, bidx, kidx)
    rb, rk = bidx[reps.to(bidx.device)], kidx[reps.to(kidx.device)]
    need_baseline = channel_softmax and variant != "smooth" and bool((~sel).any())
    batch = batch_size_for(ctx)
    items_per_batch = max(1, batch // n_rep)
    if ctx.progress is not None:
        ctx.progress.total += len(rb) * n_rep + (bsz if need_baseline else 0)
    device = ctx.x.device
    rep_scores = torch.zeros(len(rb), t, device=device)
    with torch.inference_mode():
        for start in range(0, len(rb), items_per_batch):
            b, k = rb[start : start + items_per_batch], rk[start : start + items_per_batch]
            masks = _masks(ctx, b, k)  # [n, H, W]
            if variant == "smooth":
                noise = torch.stack(
                    [_noise(ctx, int(bi), int(ki), n_rep) for bi, ki in zip(b, k, strict=True)]
                )
                masks = (masks[:, None] + noise.to(device)).flatten(0, 1)
            elif variant == "integrated":
                steps = torch.arange(1, n_rep + 1, device=device, dtype=masks.dtype) / n_rep
                masks = (masks[:, None] * steps[None, :, None, None]).flatten(0, 1)
            images = b.repeat_interleave(n_rep)
            inputs = ctx.x[images] * masks[:, None].to(ctx.x.dtype)
            s = _scores(ctx, _forward(ctx, inputs, fast=True), images, prob)
            rep_scores[start : start + len(b)] = s.view(len(b), n_rep, t).mean(dim=1)
            if ctx.progress is not None:
                ctx.progress.add(len(images))
        item_scores = rep_scores[owner.to(device)]
        baseline = None
        if need_baseline:
            baseline = _scores(
                ctx, _forward(ctx, torch.zeros_like(ctx.x), fast=True), torch.arange(bsz), prob
            )  # [B, T]
            if ctx.progress is not None:
                ctx.progress.add(bsz)
    weights = torch.zeros(bsz, kch, t, device=device)
    if channel_softmax:
        filled = (
            baseline[:, None, :].expand(bsz, kch, t).clone()
            if baseline is not None
            else torch.full((bsz, kch, t), float("-inf"), device=device)
        )
        if opts.top_channels is not None:  # channels outside the top-k do not take part in the softmax
            filled[~_selected(ctx, include_constant=True)] = float("-inf")
        filled[bidx, kidx] = item_scores
        weights = torch.softmax(filled, dim=1)
    else:
        weights[bidx, kidx] = item_scores
    return weights.transpose(1, 2)  # [B, T, K]


# ----------------------------------------------------------------------------------------------- Ablation-CAM


class _Replace:
    """Forward hook that swaps the layer's output on its explained (last) call for a given tensor."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.seen = 0
        self.value: Tensor | None = None
        self.shape: tuple[int, ...] | None = None

    def __call__(self, _m: nn.Module, _i: object, out: object) -> Tensor | None:
        self.seen += 1
        if self.seen != self.calls:
            return None
        assert self.value is not None
        if isinstance(out, Tensor):
            self.shape = tuple(out.shape[1:])
        return self.value


def _run_replaced(ctx: PerturbationContext, inputs: Tensor, acts: Tensor) -> Tensor:
    hook = _Replace(ctx.calls)
    hook.value = acts
    handle = ctx.layer.register_forward_hook(hook)
    try:
        out = _forward(ctx, inputs, rows=acts.shape[0])
    finally:
        handle.remove()
    if hook.shape != tuple(acts.shape[1:]):
        raise ValueError(
            f"Ablation-CAM needs a target layer whose output is the feature map Tensor[B, K, h, w]; "
            f"{ctx.layer_name!r} outputs {hook.shape} (use Score-CAM for token layouts)"
        )
    return out


def _ablation(ctx: PerturbationContext) -> Tensor:
    """Channel weights Tensor[B, T, K] of Ablation-CAM."""
    opts = ctx.options
    a = ctx.activations
    bsz, kch = a.shape[:2]
    t = _n_targets(ctx)
    device = a.device
    base = _scores(ctx, ctx.output, torch.arange(bsz), prob=False)  # [B, T]
    if opts.ablation == "gradcam-min":
        lows = a.flatten(1).amin(dim=1)
        value = torch.where(lows == 0, torch.zeros_like(lows), lows - 1e7)  # [B]
    else:
        value = torch.zeros(bsz, device=device, dtype=a.dtype)
    flat = a.flatten(2)
    # Channels already equal to the ablation value everywhere: ablating them changes nothing (w_k = 0).
    noop = (flat == value[:, None, None]).all(dim=2)
    sel = _selected(ctx, include_constant=True) & ~noop
    batch = batch_size_for(ctx)
    replay = opts.replay
    if replay and opts.batch_size is None:
        # A replayed batch holds only the tail's activations: batch many more ablations per prefix run.
        per_row = 4 * a[0].numel() * a.element_size()
        budget = _free_memory(device) // 4 if device.type == "cuda" else 128 << 20
        batch = max(batch, min(1024, kch, budget // max(per_row, 1)))
    if ctx.progress is not None:
        ctx.progress.total += int(sel.sum())
    new = base[:, None, :].expand(bsz, kch, t).clone()  # y_c^k; no-op and skipped channels keep y_c
    checked = False
    with torch.inference_mode():
        for b in range(bsz):
            ks = sel[b].nonzero()[:, 0]
            for start in range(0, len(ks), batch):
                k = ks[start : start + batch]
                n = len(k)
                acts = a[b : b + 1].expand(n + (0 if checked else 1), *a.shape[1:]).clone()
                rows = torch.arange(n) + (0 if checked else 1)
                acts[rows, k] = value[b].to(acts.dtype)
                images = torch.full((acts.shape[0],), b, dtype=torch.long)
                out = None
                if replay:
                    try:
                        out = _run_replaced(ctx, ctx.x[b : b + 1], acts)
                    except (RuntimeError, IndexError):  # e.g. a concatenation with an earlier tensor
                        out = None
                    if out is not None and not checked and not _same(out[:1], ctx.output[b : b + 1]):
                        out = None
                    if out is None:
                        replay = False
                if out is None:
                    out = _run_replaced(ctx, ctx.x[b : b + 1].expand(acts.shape[0], *ctx.x.shape[1:]), acts)
                    if not checked and not _same(out[:1], ctx.output[b : b + 1]):
                        raise RuntimeError(
                            "the model does not give the same output when its target-layer activation is fed "
                            "back unchanged; is it deterministic and in eval mode?"
                        )
                s = _scores(ctx, out, images, prob=False)
                if not checked:
                    s = s[1:]
                    checked = True
                new[b, k] = s
                if ctx.progress is not None:
                    ctx.progress.add(n)
    weights = (base[:, None, :] - new) / base[:, None, :]
    weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
    return weights.transpose(1, 2)  # [B, T, K]


def _same(a: Tensor, b: Tensor) -> bool:
    a, b = a.float(), b.float().to(a.device)
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max().clamp_min(1.0))))
