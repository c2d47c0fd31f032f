"""Batched inference forwards with channels-last inputs, where that gives the model's own outputs faster.

On CPU, oneDNN runs convolutions on NHWC ("channels last") tensors faster than on NCHW ones: measured on this
project's 2-core CPU, batches of 8-32 images at 224 px, 1.2-1.4x for ResNet-18 and 1.4-1.8x for
EfficientNet-Lite0 (depthwise convolutions). A channels-last input is enough: PyTorch's convolutions keep the
format of their input, so the whole network runs NHWC without touching the model's weights.

On top of that, on a copy of the model (never the user's), every ``BatchNorm2d`` that reads a ``Conv2d``'s output
directly is folded into that convolution (inference BatchNorm is an affine map per channel: ``w' = w * g``,
``b' = (b - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)``), which saves a pass over every feature map
(ResNet-18: a further 1.07-1.1x).

On CPU, the copy's 3x3 stride-1 convolutions of at least 128 channels also become
:class:`camkit._winograd.WinogradConv2d`: Winograd F(4x4, 3x3), which each layer uses only where its own first
calls show it agrees with and is faster than the direct convolution (ResNet-18's ``layer3``/``layer4``: 1.3-1.9x
per layer here).

Each of these copies (and a copy of the model itself when nothing else applies) is then traced with ``torch.fx``
and its convolutions packed for oneDNN and fused with the activation and residual add after them
(:mod:`camkit._fusion`; ResNet-18 a further 1.10-1.14x); a model that cannot be traced keeps the copy unfused.

The outputs are the same up to float rounding (the sums are taken in another order). Models whose code depends on
the memory layout (``.view`` on a feature map, custom kernels), or that use a convolution's output elsewhere than in
its BatchNorm, could fail or differ: the first batch is run every way, and a faster path is used only when it runs
and agrees with the plain one (``rtol=1e-3``, ``atol=1e-4`` of the output's scale): the folded copy (with Winograd
layers where there are any), else the unfolded copy with Winograd layers, else channels-last alone, each fused
first and then unfused, else every batch runs as given.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from camkit import _fusion, _winograd

__all__ = ["CHECK_ROWS", "FastForward"]

CHECK_ROWS = 2
"""The first batch's first rows run every way to choose the path; the rest of that batch runs the chosen way."""


class FastForward:
    """``output_fn(model(inputs))`` for batches of perturbed inputs: channels-last, on a copy with BatchNorms folded
    and Winograd convolutions, where the first batch shows that this agrees with the model as given.

    Args:
        model: the model, in eval mode; never modified (the faster model is a deep copy).
        output_fn: turns the model's output into the Tensor that is scored.
        channels_last: None: on CPU for 4-D inputs (measured faster there); True: on any device; False: never.

    Attributes:
        active: None until the first batch; then whether a faster path is used.
        path: once decided, ``"folded+winograd+channels-last"``, ``"folded+channels-last"``,
            ``"winograd+channels-last"``, ``"channels-last"`` (each also with ``"fused+"`` after ``"folded+"`` or
            first) or ``"plain"``.
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: Callable[[object], Tensor],
        channels_last: bool | None = None,
    ) -> None:
        self.model = model
        self.output_fn = output_fn
        self.wanted = channels_last
        self.active: bool | None = None if channels_last is not False else False
        self.path: str | None = None if channels_last is not False else "plain"
        self._fast_model: nn.Module = model

    def _applies(self, inputs: Tensor) -> bool:
        if inputs.dim() != 4 or inputs.is_contiguous(memory_format=torch.channels_last):
            return False
        return self.wanted is True or inputs.device.type == "cpu"

    def __call__(self, inputs: Tensor) -> Tensor:
        if self.active is False or not self._applies(inputs):
            return self.output_fn(self.model(inputs))
        if self.active:
            return self.output_fn(self._fast_model(inputs.contiguous(memory_format=torch.channels_last)))
        if inputs.shape[0] > CHECK_ROWS:
            # Decide on the first rows only (the candidates' check forwards are the overhead), then run the rest.
            head = self._decide(inputs[:CHECK_ROWS], inputs.shape[0])
            tail = self(inputs[CHECK_ROWS:])
            if head.dim() and tail.dim() and head.shape[1:] == tail.shape[1:]:
                return torch.cat([head, tail])
            return self(inputs)  # an output whose shape depends on the batch (padded detections): whole batch
        return self._decide(inputs, inputs.shape[0])

    def _decide(self, inputs: Tensor, batch: int) -> Tensor:
        fast = inputs.contiguous(memory_format=torch.channels_last)
        ref = self.output_fn(self.model(inputs))
        for name, model in _candidates(self.model, inputs[:1], batch):
            try:
                out = self.output_fn(model(fast))
            except Exception:  # a layout-dependent model (e.g. .view on a feature map): not this way
                continue
            if _agree(ref, out):
                self.active, self.path, self._fast_model = True, name, model
                return ref
        self.active, self.path = False, "plain"
        return ref


def _candidates(model: nn.Module, example: Tensor, batch: int) -> Iterator[tuple[str, nn.Module]]:
    """The faster ways to run ``model``, best first, each made only when the one before failed: a copy with
    BatchNorms folded and Winograd convolutions (CPU), the copy without folding (when the fold is what made it
    differ), then the model itself; all with channels-last inputs, and each first with its convolutions packed
    and fused with the activation and add that follow (:mod:`camkit._fusion`, CPU) where ``torch.fx`` can trace
    it."""
    cpu = example.device.type == "cpu"
    wino = cpu and any(_winograd.eligible(m) for m in model.modules())
    fusing = cpu and _fusion.available()

    def with_fused(parts: list[str], m: nn.Module, own: bool = True) -> Iterator[tuple[str, nn.Module]]:
        # Tracing runs the forward code with proxies: only ever on a copy (``own``), never on the user's modules.
        if fusing:
            try:
                got = _fusion.fuse(m if own else copy.deepcopy(m), example, batch)
            except Exception:
                got = None
            if got is not None:
                at = 1 if parts[0] == "folded" else 0
                yield "+".join([*parts[:at], "fused", *parts[at:]]), got[0]
        yield "+".join(parts), m

    folded = fold_batchnorm(model, example)
    if folded is not None:
        n = _winograd.install(folded) if wino else 0
        yield from with_fused(["folded", *(["winograd"] if n else []), "channels-last"], folded)
    if wino:
        try:
            twin = copy.deepcopy(model)
        except Exception:
            twin = None
        if twin is not None and _winograd.install(twin):
            yield from with_fused(["winograd", "channels-last"], twin)
    yield from with_fused(["channels-last"], model, own=False)


def _agree(ref: Tensor, out: Tensor) -> bool:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    a, b = ref.float(), out.float()
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return False
    if not bool(finite.all()):  # boolean indexing is slow (nonzero): only when there is something to drop
        a, b = a[finite], b[finite]
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-6)))


def fold_batchnorm(model: nn.Module, example: Tensor) -> nn.Module | None:
    """A copy of ``model`` where each ``nn.BatchNorm2d`` (exactly that class, running statistics, called once) that
    receives a ``nn.Conv2d``'s output tensor (that conv called once) is folded into the conv and replaced by
    ``nn.Identity``; None when there is nothing to fold or the model cannot be copied. One forward of ``example``
    (one image) finds the pairs. The caller must check the copy's output: a conv output that is also used
    elsewhere (a skip connection before the BatchNorm) makes the copy differ."""
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        return None  # e.g. timm's BatchNormAct2d only: no copy made
    try:
        twin = copy.deepcopy(model)
    except Exception:
        return None
    convs = {m for m in twin.modules() if type(m) is nn.Conv2d}
    norms = {
        m
        for m in twin.modules()
        if type(m) is nn.BatchNorm2d and m.running_mean is not None and m.running_var is not None
    }
    if not convs or not norms:
        return None
    produced: list[tuple[Tensor, nn.Conv2d]] = []
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(m: nn.Module, _i: object, out: object) -> None:
        calls[m] = calls.get(m, 0) + 1
        if isinstance(out, Tensor):
            produced.append((out, m))  # type: ignore[arg-type]

    def before_norm(m: nn.Module, inputs: tuple[object, ...]) -> None:
        calls[m] = calls.get(m, 0) + 1
        for out, conv in produced:
            if inputs and inputs[0] is out:
                pairs.append((conv, m))  # type: ignore[arg-type]
                break

    handles = [m.register_forward_hook(after_conv) for m in convs]
    handles += [m.register_forward_pre_hook(before_norm) for m in norms]
    try:
        with torch.inference_mode():
            twin(example)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    produced.clear()
    pairs = [(c, n) for c, n in pairs if calls.get(c) == 1 and calls.get(n) == 1]
    if not pairs:
        return None
    names = {id(m): name for name, m in twin.named_modules()}
    with torch.no_grad():
        for conv, norm in pairs:
            var = norm.running_var
            mean = norm.running_mean
            assert var is not None and mean is not None
            g = torch.rsqrt(var.double() + norm.eps)
            if norm.weight is not None:
                g = g * norm.weight.double()
            shift = -mean.double() * g
            if norm.bias is not None:
                shift = shift + norm.bias.double()
            w = conv.weight.double() * g.view(-1, *([1] * (conv.weight.dim() - 1)))
            b = shift if conv.bias is None else conv.bias.double() * g + shift
            conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
            conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
            parent_name, _, child = names[id(norm)].rpartition(".")
            setattr(twin.get_submodule(parent_name), child, nn.Identity())
    return twin
