"""Winograd F(4x4, 3x3) convolution for CPU inference (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016), for the batched forwards of :mod:`camkit._fastforward`.

A 3x3 convolution computes each 4x4 block of outputs from a 6x6 block of inputs with 36 multiplications per
(input channel, output channel) pair instead of 144: the input tile d and the kernel g are transformed
(``V = B^T d B``, ``U = G g G^T``), multiplied element by element and summed over the input channels (36 matrix
products ``V[xi] @ U[xi]``, one per tile position xi), and transformed back (``Y = A^T M A``). The matrices are
those of the paper for the interpolation points 0, 1, -1, 2, -2 and infinity.

Why: on a CPU without AVX-512, oneDNN has no Winograd kernel and its direct 3x3 convolutions already run near the
cores' peak. On this project's 2-core AVX2 CPU, batches of 12 images, channels-last: 256 channels at 14x14
1.2-1.5x and 512 channels at 7x7 1.6-1.9x faster than ``torch.nn.functional.conv2d``; 128 channels at 28x28 about
even; 64 channels at 56x56 two to three times slower (the transforms, here plain tensor operations, move more
memory than the products save). The result is the same sum taken another way: the error measured against
``conv2d`` is about 1e-5 of the output's largest value (float32), against about 1e-6 for a direct convolution in
another order.

:class:`WinogradConv2d` therefore chooses per layer: its first call computes both ways and checks that they agree,
the next six alternate between them and are timed, and the faster is kept (either is correct).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["MIN_CHANNELS", "WinogradConv2d", "eligible", "install", "winograd_conv2d"]

MIN_CHANNELS = 128
"""Convolutions with fewer input or output channels keep the direct path (never faster here, see above)."""

_F64 = torch.float64
_BT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=_F64,
)
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=_F64,
)
_AT = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=_F64
)
_M = 4  # output tile
_A = _M + 2  # input tile


_CONST: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def _transforms(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(B^T, A^T) on ``device`` in ``dtype``."""
    key = (device, dtype)
    if key not in _CONST:
        with torch.inference_mode(False), torch.no_grad():  # a cache: plain tensors, usable in any mode
            _CONST[key] = (_BT.to(device=device, dtype=dtype), _AT.to(device=device, dtype=dtype))
    return _CONST[key]


def _sandwich(left: Tensor, x: Tensor) -> Tensor:
    """``left @ X @ left^T`` for every column of ``x``: Tensor[a, a, R] -> Tensor[m, m, R] for ``left`` [m, a];
    two small matrix products (one per axis), cheaper than one with the Kronecker product."""
    a, r = x.shape[0], x.shape[2]
    rows = (left @ x.reshape(a, a * r)).view(left.shape[0], a, r)
    return torch.matmul(left, rows)


def transform_weight(weight: Tensor) -> Tensor:
    """U = G g G^T for every (output, input) channel pair: Tensor[36, C_in, C_out], in ``weight``'s dtype.

    Two matrix products over all pairs at once (G's entries such as 1/6 are rounded in float32 either way: the
    result equals a float64 computation to about 3e-8 of its largest value)."""
    co, ci = weight.shape[:2]
    g = _G.to(device=weight.device, dtype=weight.dtype)
    w = weight.detach().permute(2, 3, 1, 0).reshape(3, 3 * ci * co)  # [row i, (column j, C_in, C_out)]
    left = (g @ w).view(_A, 3, ci * co)  # sum_i G[a, i] w[i, j]
    return torch.matmul(g, left).view(_A * _A, ci, co).contiguous()  # sum_j G[b, j] (G w)[a, j]


def winograd_conv2d(x: Tensor, u: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """conv2d(x, w, bias, stride=1, padding=padding) for a 3x3 kernel w given as ``u = transform_weight(w)``.

    Args:
        x: Tensor[N, C_in, H, W], any memory format (read once into a padded channels-last buffer).
        u: Tensor[36, C_in, C_out].
        bias: Tensor[C_out] or None.
        padding: zero padding (rows, columns), each 0, 1 or 2.

    Returns:
        Tensor[N, C_out, H + 2 p_h - 2, W + 2 p_w - 2] in channels-last memory format.
    """
    n, c, h, w = x.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    if ho < 1 or wo < 1:
        raise ValueError(f"input {h}x{w} with padding {padding} is too small for a 3x3 kernel")
    th, tw = -(-ho // _M), -(-wo // _M)
    # Zero-padded NHWC input holding every 6x6 tile (tiles overlap by 2 rows/columns).
    hp, wp = _M * th + 2, _M * tw + 2
    buf = x.new_zeros(n, hp, wp, c)
    buf[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
    s = buf.stride()
    tiles = buf.as_strided((_A, _A, n, th, tw, c), (s[1], s[2], s[0], _M * s[1], _M * s[2], 1))
    p = n * th * tw
    bt, at = _transforms(x.device, x.dtype)
    v = _sandwich(bt, tiles.reshape(_A, _A, p * c)).view(_A * _A, p, c)  # B^T d B for all tiles
    m = torch.bmm(v, u)  # [36, P, C_out]: the sum over input channels, per tile position
    co = m.shape[-1]
    y = _sandwich(at, m.view(_A, _A, p * co)).view(_M, _M, n, th, tw, co).permute(2, 3, 0, 4, 1, 5)
    out = x.new_empty(n, th * _M, tw * _M, co)
    if bias is not None:
        torch.add(y, bias.to(x.dtype), out=out.view(n, th, _M, tw, _M, co))
    else:
        out.view(n, th, _M, tw, _M, co).copy_(y)
    if th * _M != ho or tw * _M != wo:
        out = out[:, :ho, :wo].contiguous()
    return out.permute(0, 3, 1, 2)


def eligible(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain float32 CPU ``nn.Conv2d`` this module can run: 3x3, stride 1, dilation 1, no
    groups, zero padding of 0-2 given as numbers, at least :data:`MIN_CHANNELS` input and output channels."""
    if type(conv) is not nn.Conv2d:
        return False
    pad = conv.padding
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(pad, tuple)
        and all(isinstance(q, int) and 0 <= q <= 2 for q in pad)
        and conv.weight.dtype == torch.float32
        and conv.weight.device.type == "cpu"
        and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
    )


class WinogradConv2d(nn.Module):
    """Runs a 3x3 ``nn.Conv2d`` (see :func:`eligible`) the Winograd way where that is measured faster.

    Calls 1-7 decide: call 1 computes both ways and keeps the direct path for good if they disagree; calls 2-7
    alternate between the two, timed; then the faster (best of three) is used for every later call. Inputs it does
    not handle (not float32 on CPU, or a gradient needed) always take the direct path.

    Args:
        conv: the convolution.
        direct: what computes the direct path (default ``conv``), e.g. a :class:`camkit._fusion.FusedConv2d` of
            ``conv`` that also applies ``post`` (and the add, with ``binary``).
        post: applied in place to the Winograd path's result (after the add); it must match what ``direct`` does.
        binary: ``forward`` takes a second tensor that is added to the convolution's output before ``post``.
        u: ``transform_weight(conv.weight)`` when already computed (shared, not copied).

    Attributes:
        conv: the wrapped convolution.
        choice: ``"tune"`` while deciding, then ``"winograd"`` or ``"direct"``.
    """

    TUNE_ROUNDS = 3
    """Timed calls of each kind before the choice."""

    def __init__(
        self,
        conv: nn.Conv2d,
        direct: nn.Module | None = None,
        post: Callable[[Tensor], Tensor] | None = None,
        binary: bool = False,
        u: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"not a convolution WinogradConv2d can run: {conv}")
        if direct is None and (post is not None or binary):
            raise ValueError("post and binary need a direct path that applies them too")
        self.conv = conv
        self.direct = direct
        self.post = post
        self.binary = binary
        self.u: Tensor | None = transform_weight(conv.weight) if u is None else u
        self.padding = (int(conv.padding[0]), int(conv.padding[1]))
        self.choice: Literal["tune", "winograd", "direct"] = "tune"
        self.seconds: dict[str, list[float]] = {"winograd": [], "direct": []}
        self._calls = 0

    def _winograd(self, x: Tensor, other: Tensor | None) -> Tensor:
        assert self.u is not None
        y = winograd_conv2d(x, self.u, self.conv.bias, self.padding)
        if other is not None:
            y = y.add_(other)
        return y if self.post is None else self.post(y)

    def _direct(self, x: Tensor, other: Tensor | None) -> Tensor:
        if self.direct is None:
            return self.conv(x)
        return self.direct(x) if other is None else self.direct(x, other)

    def _decide(self, choice: Literal["winograd", "direct"]) -> None:
        self.choice = choice
        if choice == "direct":
            self.u = None  # 36/9 of the weight's memory, no longer needed

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        if (other is not None) != self.binary:
            raise TypeError(f"WinogradConv2d(binary={self.binary}) called with other={other is not None}")
        if (
            self.choice == "direct"
            or x.dim() != 4
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or (other is not None and (other.dtype != torch.float32 or other.device.type != "cpu"))
            or (
                torch.is_grad_enabled()
                and (
                    x.requires_grad
                    or self.conv.weight.requires_grad
                    or (other is not None and other.requires_grad)
                )
            )
        ):
            return self._direct(x, other)
        if self.choice == "winograd":
            return self._winograd(x, other)
        self._calls += 1
        if self._calls == 1:
            from camkit._fastforward import _agree  # the fast path's own test (imported here: it imports us)

            ref = self._direct(x, other)
            if not _agree(ref, self._winograd(x, other)):
                self._decide("direct")
            return ref
        kind = "winograd" if self._calls % 2 == 0 else "direct"
        t0 = time.perf_counter()
        out = self._winograd(x, other) if kind == "winograd" else self._direct(x, other)
        self.seconds[kind].append(time.perf_counter() - t0)
        if min(len(t) for t in self.seconds.values()) >= self.TUNE_ROUNDS:
            self._decide(
                "winograd" if min(self.seconds["winograd"]) < min(self.seconds["direct"]) else "direct"
            )
        return out

    def extra_repr(self) -> str:
        return f"choice={self.choice!r}" + (", binary=True" if self.binary else "")


def install(model: nn.Module) -> int:
    """Replaces every :func:`eligible` convolution of ``model`` (in place: call it on a copy) by a
    :class:`WinogradConv2d`; returns how many."""
    found = [(name, m) for name, m in model.named_modules() if name and eligible(m)]
    for name, conv in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, WinogradConv2d(conv))  # type: ignore[arg-type]
    return len(found)
