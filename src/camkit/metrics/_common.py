"""Helpers shared by the metrics: batched model calls, class scores, pixel orders."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from camkit.core.accel import BatchForward, Compile
from camkit.core.capture import check_eval
from camkit.core.outputs import logits_of, model_device
from camkit.errors import CamkitError

ScoreKind = str  # "prob" (softmax probability) or "logit"


def class_scores(out: Tensor, classes: Tensor, kind: ScoreKind) -> Tensor:
    """Score of ``classes`` (LongTensor[N]) in logits Tensor[N, C]: softmax probability or logit."""
    out = out.float()
    n = out.shape[1]
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= n):
        bad = sorted({int(c) for c in classes.flatten() if not 0 <= int(c) < n})
        raise CamkitError(f"class indices must be in [0, {n - 1}] for a model with {n} outputs, got {bad}")
    if kind == "prob":
        out = torch.softmax(out, dim=1)
    elif kind != "logit":
        raise CamkitError(f"unknown score {kind!r}: 'prob' (softmax) or 'logit'")
    return out.gather(1, classes[:, None].to(out.device))[:, 0]


def default_batch_size(model: nn.Module) -> int:
    """Images per model call: 64 on a GPU; 8 on a CPU, where a small batch's activations stay in the CPU caches
    (larger batches measured slower per image there, see ``benchmarks/README.md``)."""
    return 64 if model_device(model).type != "cpu" else 8


class Forward:
    """Calls ``model`` under ``torch.inference_mode()`` in chunks of ``batch_size`` and keeps count.

    The chunks go through :class:`camkit.core.accel.BatchForward`: by default a BatchNorm-folded copy of the model with
    channels-last inputs on CPU, checked once against the model on the first chunk (``channels_last=False``: the
    model as given); ``compile``: a traced and frozen copy (``"jit"``), a ``torch.compile``'d one (``"inductor"``)
    or an ONNX Runtime session of an exported copy (``"onnx"``, CPU; True: ``"onnx"`` on CPU where ONNX Runtime is
    installed, else ``"jit"``, and ``"inductor"`` elsewhere), prepared once per model and chunk shape and
    reused by every later ``Forward`` of the same model in the process (see :mod:`camkit.core.accel`).

    Attributes:
        calls: number of model calls; images: number of images sent; seconds: wall time inside the model
            (synchronised on CUDA), for benchmarks.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int | None = None,
        channels_last: bool | None = None,
        compile: Compile = False,
    ) -> None:
        if batch_size is None:
            batch_size = default_batch_size(model)
        if batch_size < 1:
            raise CamkitError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.dtype = _param_dtype(model)
        self.fast = BatchForward(
            model, logits_of, channels_last=channels_last, compile=compile, batch=batch_size
        )
        self.batch_size = batch_size
        self.calls = 0
        self.images = 0
        self.seconds = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        import time

        outs = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], self.batch_size):
                chunk = x[i : i + self.batch_size]
                if chunk.is_floating_point() and chunk.dtype != self.dtype:
                    # the model runs in its own dtype; its scores come back in float32
                    chunk = chunk.to(self.dtype)
                t0 = time.perf_counter()
                out = self.fast(chunk).float()
                if out.is_cuda:
                    torch.cuda.synchronize(out.device)
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self.images += chunk.shape[0]
                outs.append(out)
        return torch.cat(outs)

    def scores(self, x: Tensor, classes: Tensor, kind: ScoreKind) -> Tensor:
        return class_scores(self(x), classes, kind)


def _param_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating dtype (its first floating parameter or buffer; float32 when it has none)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def check_inputs(
    model: nn.Module, inputs: Tensor, maps: Tensor, clips: bool = False
) -> tuple[Tensor, Tensor]:
    """Move inputs and maps to the model's device; check shapes: inputs [B, C, H, W], maps [B, H, W] (with
    ``clips``, also clips [B, C, T, H, W] with maps [B, T, H, W])."""
    check_eval(model, stacklevel=3)
    if inputs.dim() == 5 and not clips:
        raise CamkitError(
            f"this metric takes images Tensor[B, C, H, W], got a clip {tuple(inputs.shape)}; on clips camkit "
            "computes deletion, insertion, average drop and increase in confidence"
        )
    if inputs.dim() not in (4, 5):
        what = "Tensor[B, C, H, W] (or a clip Tensor[B, C, T, H, W])" if clips else "Tensor[B, C, H, W]"
        raise CamkitError(f"inputs must be a normalised {what}, got shape {tuple(inputs.shape)}")
    if maps.dim() == inputs.dim() - 2:
        maps = maps[None]
    if (
        maps.dim() != inputs.dim() - 1
        or maps.shape[0] != inputs.shape[0]
        or maps.shape[1:] != inputs.shape[2:]
    ):
        want = "Tensor[B, T, H, W]" if inputs.dim() == 5 else "Tensor[B, H, W]"
        raise CamkitError(
            f"maps must be {want} matching the inputs {tuple(inputs.shape)}, got {tuple(maps.shape)}; "
            "use Explanation.maps (at the model's input size)"
        )
    bad = (~torch.isfinite(maps.detach().float())).flatten(1).any(dim=1)
    if bool(bad.any()):
        images = bad.nonzero()[:, 0].tolist()
        raise CamkitError(
            f"maps of images {images} contain NaN or Inf: a metric of such a map would be meaningless"
        )
    device = model_device(model)
    return inputs.to(device).float(), maps.to(device).float()


def resolve_targets(fwd: Forward, inputs: Tensor, classes: Tensor | int | None) -> Tensor:
    """LongTensor[B] of the classes to score: given, or the model's top-1 on ``inputs``."""
    b = inputs.shape[0]
    if classes is None:
        return fwd(inputs).argmax(dim=1)
    if isinstance(classes, bool) or (isinstance(classes, Tensor) and classes.dtype == torch.bool):
        raise TypeError(f"classes must be class indices (ints), got a bool {classes!r}")
    if isinstance(classes, (list, tuple)) and any(isinstance(c, bool) for c in classes):
        raise TypeError(f"classes must be class indices (ints), got bools in {list(classes)!r}")
    if isinstance(classes, int):
        return torch.full((b,), classes, dtype=torch.long, device=inputs.device)
    classes = torch.as_tensor(classes, dtype=torch.long, device=inputs.device).flatten()
    if classes.shape[0] != b:
        raise CamkitError(f"{classes.shape[0]} classes for {b} images")
    return classes


def pixel_ranks(maps: Tensor, descending: bool = True) -> Tensor:
    """Rank of every pixel in the order of its map value, LongTensor[B, H*W] (0 = first).

    Ties are broken by raster order (a stable sort), so a uniform map removes pixels row by row.
    """
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return ranks


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for i in range(0, n, size):
        yield i, min(n, i + size)


def gaussian_blur(x: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Depthwise Gaussian blur of Tensor[B, C, H, W] in float32 with reflect padding (RISE: kernel 11, sigma 5;
    ``torchvision.transforms.v2.functional.gaussian_blur``). An image with a side of at most ``kernel_size // 2``
    pixels, too small to reflect, is padded by repeating its edge pixels instead."""
    from torchvision.transforms.v2.functional import gaussian_blur as blur

    r = kernel_size // 2
    x = x.float()
    h, w = x.shape[-2:]
    if min(h, w) > r:
        out: Tensor = blur(x, [kernel_size, kernel_size], [sigma, sigma])
        return out
    # edge padding first; the blur's own reflect padding then only reaches pixels the crop drops
    y = nn.functional.pad(x, (r, r, r, r), mode="replicate")
    out = blur(y, [kernel_size, kernel_size], [sigma, sigma])
    return out[..., r : r + h, r : r + w]


Baseline = Tensor | float | str | Callable[[Tensor], Tensor] | None


def make_baseline(inputs: Tensor, baseline: Baseline, default: str) -> Tensor:
    """The substrate pixels are replaced with, Tensor like ``inputs``.

    ``"zeros"`` (zeros of the *normalised* input, i.e. the dataset's mean colour for mean/std normalisation, as
    in RISE's code), ``"blur"`` (Gaussian blur, kernel 11, sigma 5, as in RISE's code), a float (a constant),
    a Tensor (broadcast to the inputs), or a function of the inputs.
    """
    b = default if baseline is None else baseline
    if isinstance(b, str):
        if b == "zeros":
            return torch.zeros_like(inputs)
        if b == "blur":  # a clip: each frame blurred in space
            if inputs.dim() == 5:
                n, c, t, h, w = inputs.shape
                frames = inputs.transpose(1, 2).reshape(n * t, c, h, w)
                return gaussian_blur(frames).view(n, t, c, h, w).transpose(1, 2).contiguous()
            return gaussian_blur(inputs)
        if b == "mean":
            space = tuple(range(2, inputs.dim()))
            return inputs.mean(dim=space, keepdim=True).expand_as(inputs).clone()
        raise CamkitError(
            f"unknown baseline {b!r}: 'zeros', 'blur', 'mean', a number, a tensor or a function"
        )
    if isinstance(b, (int, float)):
        return torch.full_like(inputs, float(b))
    if isinstance(b, Tensor):
        return _fit_baseline(b, inputs, "the baseline tensor")
    if callable(b):
        out = b(inputs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"a baseline function must return a Tensor shaped like the inputs {tuple(inputs.shape)}, "
                f"got {type(out).__name__}"
            )
        return _fit_baseline(out, inputs, "the baseline function's result")
    raise TypeError(f"unsupported baseline {type(b).__name__}")


def _fit_baseline(b: Tensor, inputs: Tensor, what: str) -> Tensor:
    try:
        return b.to(inputs.device, inputs.dtype).expand_as(inputs).contiguous()
    except RuntimeError:
        raise CamkitError(
            f"{what} has shape {tuple(b.shape)}: it must be shaped like (or broadcast to) the inputs "
            f"{tuple(inputs.shape)}"
        ) from None
