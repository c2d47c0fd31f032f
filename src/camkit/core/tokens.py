"""From any layer output to a feature map Tensor[B, K, h, w]: token sequences and channels-last layouts.

CAM methods read a target layer's output as ``K`` channels over an ``h x w`` grid. Transformers produce other
layouts, and the hand-written ``reshape_transform`` that other libraries ask for (often with a hard-coded 14x14
grid and one class token) is the most common source of wrong maps. camkit infers it from the output shape, the
actual input size and what the model declares:

* ``[B, N, C]`` tokens (ViT, DeiT, BEiT...): ``N = p + h*w`` with ``p`` prefix tokens (class, distillation,
  register tokens) taken from the model (timm's ``num_prefix_tokens``; ``cls_token`` / ``class_token``,
  ``dist_token``, ``reg_token`` otherwise) or, failing that, the ``p`` in 0..8 for which ``N - p`` factors into
  the grid closest to the input's aspect ratio (the smallest such ``p`` on ties). The prefix tokens are dropped, the rest reshaped row-major to
  ``[B, C, h, w]``. A sequence-first ``[N, B, C]`` output (``nn.Transformer`` without ``batch_first``) is read too.
* ``[B, h, w, C]`` channels-last maps (Swin in torchvision and timm): detected when the two middle dimensions form a
  grid consistent with the input (same stride in both directions) and the ``[B, C, h, w]`` reading does not, or
  when the layer is a ``LayerNorm`` over the last dimension. Permuted to ``[B, C, h, w]``.
* ``[B, K, h, w]``: used as is (also when the model's own input transform resizes, as detection models do).
* ``[B, K, t, h, w]`` (3-D convolutions on a clip ``[B, C, T, H, W]``: torchvision ``r3d_18``, ``mc3_18``,
  ``r2plus1d_18``): the frames are stacked along the height, ``[B, K, t*h, w]``. Every CAM formula sums or
  averages over all positions of a channel, and over the stacked map that is over the whole space-time volume
  (Grad-CAM's weight is the mean of dS/dA over t, h and w, as for a 3-D network); element-wise formulas do not
  care. :meth:`Layout.unfold` gives the map back its time axis, ``[..., t, h, w]``.

The same reshape is applied to the activation and to its gradient: dropping tokens, reshaping and permuting are
linear index maps, so the gradient of the reshaped activation is the reshaped gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import Tensor, nn

from camkit.errors import CamkitError

__all__ = [
    "FeatureMaps",
    "Layout",
    "Reshape",
    "infer_layout",
    "prefix_tokens",
    "suffix_tokens",
    "to_spatial",
    "unwrap",
]

Reshape = Callable[[Tensor], Tensor]

# Two strides closer than this factor count as "the same" (padding and ceil/floor make them differ slightly).
_STRIDE_RATIO = 1.5


@dataclass(frozen=True)
class Layout:
    """How one layer's output maps to Tensor[B, K, h, w].

    Attributes:
        kind: ``"nchw"`` (as is), ``"nhwc"`` (channels last), ``"tokens"`` ([B, N, C]), ``"tokens-seq-first"``
            ([N, B, C]) or ``"ncthw"`` (a 3-D convolution's [B, K, t, h, w], frames stacked along the height).
        grid: (h, w) of the spatial grid (of one frame for ``"ncthw"``).
        channels: K.
        prefix: number of leading non-spatial tokens dropped (tokens only).
        suffix: number of trailing non-spatial tokens dropped (tokens only: YOLOS's detection tokens).
        frames: t, the number of time steps (``"ncthw"`` only; 1 otherwise).
    """

    kind: str
    grid: tuple[int, int]
    channels: int
    prefix: int = 0
    frames: int = 1
    suffix: int = 0

    def __call__(self, t: Tensor) -> Tensor:
        """Tensor in this layout -> Tensor[B, K, h, w] (a view or a permuted copy; values unchanged)."""
        h, w = self.grid
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        if self.kind == "ncthw":
            return t.reshape(t.shape[0], t.shape[1], self.frames * h, w)
        if self.kind == "tokens-seq-first":
            t = t.transpose(0, 1)
        spatial = t[:, self.prefix : t.shape[1] - self.suffix, :]
        return spatial.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    def write(self, acts: Tensor, live: Tensor) -> Tensor:
        """The inverse of reading: feature maps Tensor[n, K, h, w] back in this layout, for a replay of the layers
        after the target: as is (``"nchw"``), channels-last [n, h, w, K], or tokens [n, p + h*w, K] whose p prefix
        tokens (class, distillation, ...) and suffix tokens are taken from the live output ``live`` of the same forward ([1 or n, N,
        K]; sequence-first [N, 1 or n, K])."""
        n = acts.shape[0]
        if self.kind == "nchw":
            return acts
        if self.kind == "nhwc":
            return acts.permute(0, 2, 3, 1).contiguous()
        if self.kind == "ncthw":
            h, w = self.grid
            return acts.reshape(n, acts.shape[1], self.frames, h, w)
        tokens = acts.flatten(2).transpose(1, 2)  # [n, h*w, K]
        seq_first = self.kind == "tokens-seq-first"
        base = live.transpose(0, 1) if seq_first else live
        out = base.expand(n, *base.shape[1:]).clone() if base.shape[0] != n else base.clone()
        out[:, self.prefix : self.prefix + tokens.shape[1], :] = tokens.to(out.dtype)
        return out.transpose(0, 1).contiguous() if seq_first else out

    def unfold(self, m: Tensor) -> Tensor:
        """A map computed on the stacked layout, Tensor[..., t*h, w] -> Tensor[..., t, h, w] (``"ncthw"``); any
        other layout: ``m`` as is."""
        if self.kind != "ncthw":
            return m
        h, w = self.grid
        return m.reshape(*m.shape[:-2], self.frames, h, w)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(K, h, w) for one image (one frame for ``"ncthw"``)."""
        return (self.channels, *self.grid)

    def describe(self) -> str:
        if self.kind == "nchw":
            return ""
        if self.kind == "nhwc":
            return "channels-last"
        if self.kind == "ncthw":
            return f"{self.frames} time step{'s' if self.frames != 1 else ''}"
        return f"tokens, {self.prefix} prefix" if self.prefix else "tokens"


def unwrap(model: nn.Module) -> nn.Module:
    """The module that really runs: inside ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``, the eager original with the same parameters); for a Keras 3 model its
    :class:`camkit.adapters.keras.KerasModel` view (NCHW in, Keras layers as named submodules)."""
    if any(cls.__module__.split(".")[0] == "keras" for cls in type(model).__mro__):
        from camkit.adapters.keras import (
            as_torch,  # only for a Keras model: keras itself is not imported here
        )

        return as_torch(model)
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            model = inner
        else:
            break
    return model


def prefix_tokens(model: nn.Module) -> int | None:
    """Number of prefix (non-patch) tokens the model declares, or None when it declares nothing."""
    model = unwrap(model)
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    count = 0
    found = False
    for attr in ("cls_token", "class_token", "dist_token"):
        t = getattr(model, attr, None)
        if isinstance(t, Tensor):
            found = True
            count += 1
    reg = getattr(model, "reg_token", None)
    if isinstance(reg, Tensor):
        found = True
        count += int(reg.shape[-2]) if reg.dim() >= 2 else 1
    return count if found else None


def suffix_tokens(model: nn.Module) -> int:
    """Number of trailing non-patch tokens the model declares in ``num_suffix_tokens`` (YOLOS's detection tokens
    in :class:`camkit.adapters.huggingface.HFDetector`), else 0."""
    n = getattr(unwrap(model), "num_suffix_tokens", 0)
    return n if isinstance(n, int) and n > 0 else 0


def _stride_ratio(h: int, w: int, size: tuple[int, int]) -> float | None:
    """How far apart the strides H/h and W/w are (1.0 = equal), or None when (h, w) cannot be a grid."""
    big_h, big_w = size
    if h < 1 or w < 1 or h > big_h or w > big_w:
        return None
    sh, sw = big_h / h, big_w / w
    return max(sh, sw) / min(sh, sw)


def _grid_ok(h: int, w: int, size: tuple[int, int]) -> bool:
    r = _stride_ratio(h, w, size)
    return r is not None and r <= _STRIDE_RATIO


def _factor_grid(n: int, size: tuple[int, int]) -> tuple[float, tuple[int, int]] | None:
    """The (h, w) with h*w = n whose strides agree best with the input size (and how well), if well enough."""
    best: tuple[float, tuple[int, int]] | None = None
    for h in range(1, n + 1):
        if n % h:
            continue
        w = n // h
        r = _stride_ratio(h, w, size)
        if r is None or r > _STRIDE_RATIO:
            continue
        if best is None or r < best[0]:
            best = (r, (h, w))
    return best


def _token_layout(
    n: int, c: int, size: tuple[int, int], prefix: int | None, kind: str, suffix: int = 0
) -> Layout | None:
    """The declared prefix if it leaves a grid; otherwise the prefix (0..8) whose grid fits the input best. The
    declared suffix tokens are dropped first."""
    if suffix:
        inner = _token_layout(n - suffix, c, size, prefix, kind)
        return None if inner is None else replace(inner, suffix=suffix)
    if prefix is not None and n - prefix >= 1:
        fit = _factor_grid(n - prefix, size)
        if fit is not None:
            return Layout(kind, fit[1], c, prefix)
    best: tuple[float, int, tuple[int, int]] | None = None
    for p in range(0, 9):
        if n - p < 2:
            break
        fit = _factor_grid(n - p, size)
        if fit is not None and (best is None or fit[0] < best[0] - 1e-9):
            best = (fit[0], p, fit[1])
    return Layout(kind, best[2], c, best[1]) if best else None


def _fits(suffix: int, n: int) -> int:
    return suffix if 0 < suffix < n - 1 else 0


def _is_channels_last_norm(module: nn.Module | None, last: int) -> bool:
    if not isinstance(module, nn.LayerNorm) or "2d" in type(module).__name__.lower():
        return False
    return tuple(module.normalized_shape) == (last,)


def infer_layout(
    shape: tuple[int, ...],
    input_size: tuple[int, int],
    batch: int | None = None,
    prefix: int | None = None,
    module: nn.Module | None = None,
    channels_last: bool = False,
    suffix: int = 0,
) -> Layout | None:
    """Infer how an output of ``shape`` (batch included) maps to [B, K, h, w].

    Args:
        shape: the layer output's shape, e.g. (B, 197, 768), (B, 7, 7, 768) or (B, 512, 1, 7, 7) (a 3-D network).
        input_size: (H, W) of the model input.
        batch: B, to tell [B, N, C] from sequence-first [N, B, C] (default: shape[0]).
        prefix: number of prefix tokens the model declares (see :func:`prefix_tokens`); tried first.
        module: the layer itself (a LayerNorm over the last dimension of a 4-D output means channels-last).
        channels_last: the model's 4-D outputs are NHWC (Keras models), whatever the shape.
        suffix: number of trailing tokens the model declares (see :func:`suffix_tokens`), dropped from token
            outputs whose count exceeds it.

    Returns:
        a :class:`Layout`, or None when the output cannot be read as a spatial map.
    """
    b = shape[0] if batch is None else batch
    if len(shape) == 5:
        if shape[0] != b:
            return None
        _, k, t, h, w = shape
        return Layout("ncthw", (h, w), k, frames=t)
    if len(shape) == 4:
        if shape[0] != b:
            return None
        _, d1, d2, d3 = shape
        if channels_last:
            return Layout("nhwc", (d1, d2), d3)
        nchw = _grid_ok(d2, d3, input_size)
        nhwc = _grid_ok(d1, d2, input_size)
        if nhwc and (not nchw or _is_channels_last_norm(module, d3)):
            return Layout("nhwc", (d1, d2), d3)
        # Anything else 4-D is read as NCHW: also grids larger than the input (detection models resize inside).
        return Layout("nchw", (d2, d3), d1)
    if len(shape) == 3:
        if shape[0] == b:
            return _token_layout(shape[1], shape[2], input_size, prefix, "tokens", _fits(suffix, shape[1]))
        if shape[1] == b:
            return _token_layout(
                shape[0], shape[2], input_size, prefix, "tokens-seq-first", _fits(suffix, shape[0])
            )
    return None


@dataclass(frozen=True)
class FeatureMaps:
    """Captured activations and gradients read as feature maps.

    Attributes:
        activations: layer name -> Tensor[B, K, h, w].
        gradients: layer name -> dS/dA of the same shape (a list with one per target), where captured.
        layouts: layer name -> the inferred :class:`Layout` (None where ``reshape`` was given).
    """

    activations: dict[str, Tensor]
    gradients: dict[str, Tensor | list[Tensor]]
    layouts: dict[str, Layout | None]


def to_spatial(
    activations: dict[str, Tensor],
    gradients: dict[str, Tensor | list[Tensor]],
    model: nn.Module,
    modules: dict[str, nn.Module],
    input_size: tuple[int, int],
    reshape: Reshape | None = None,
) -> FeatureMaps:
    """Read captured activations and gradients as Tensor[B, K, h, w] (the given dicts are not modified).

    Args:
        activations: layer name -> captured output (any layout).
        gradients: layer name -> dS/dA (a tensor, or a list with one per target), same layout.
        model: the network (for the number of prefix tokens it declares).
        modules: layer name -> module.
        input_size: (H, W) of the model input.
        reshape: a user function applied instead of the inference (same function for activations and gradients).

    Returns:
        the :class:`FeatureMaps`.

    Raises:
        ValueError: an output that cannot be read as a feature map, with the shape and what to do.
    """
    prefix, suffix = prefix_tokens(model), suffix_tokens(model)
    layouts: dict[str, Layout | None] = {}
    spatial: dict[str, Tensor] = {}
    spatial_grads: dict[str, Tensor | list[Tensor]] = {}
    for name, a in activations.items():
        if reshape is not None:
            fn: Reshape = reshape
            layouts[name] = None
        else:
            layout = infer_layout(
                tuple(a.shape),
                input_size,
                prefix=prefix,
                module=modules.get(name),
                channels_last=bool(getattr(model, "channels_last", False)),
                suffix=suffix,
            )
            if layout is None:
                raise CamkitError(
                    f"layer {name!r} outputs shape {tuple(a.shape)}, which camkit cannot read as a feature map "
                    f"[B, K, h, w] for an input of {input_size[0]}x{input_size[1]} (neither NCHW, channels-last "
                    "nor [B, prefix + h*w, C] tokens). Choose another layer (`camkit layers MODEL`) or pass "
                    "reshape=f with f(Tensor) -> Tensor[B, K, h, w]"
                )
            layouts[name] = layout
            fn = layout
        out = fn(a)
        if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != a.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise CamkitError(f"reshape of layer {name!r} must give Tensor[B, K, h, w], got {shape}")
        spatial[name] = out
        g = gradients.get(name)
        if isinstance(g, list):
            spatial_grads[name] = [fn(t) for t in g]
        elif g is not None:
            spatial_grads[name] = fn(g)
    return FeatureMaps(spatial, spatial_grads, layouts)
