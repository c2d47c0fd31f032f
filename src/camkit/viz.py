"""Pictures: colormaps, overlays, and grids of methods x layers.

``overlay(image, map, alpha)`` blends ``(1 - alpha) * image + alpha * colormap(map)``: ``alpha`` is the weight of
the heatmap. The map is resized (bilinear) to the image's size, so a map at the model's input size lands on the
original photo whatever resize the preprocessing did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from camkit.localize import Box
from camkit.postprocess import upsample

__all__ = ["colorize", "draw_boxes", "grid", "hstack", "overlay"]


def _as_map(heatmap: Tensor | np.ndarray) -> Tensor:
    m = (
        torch.as_tensor(np.asarray(heatmap) if not isinstance(heatmap, Tensor) else heatmap)
        .detach()
        .float()
        .cpu()
    )
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(f"a heatmap must be 2-D [H, W], got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError("the heatmap contains NaN or infinite values")
    return m


def colorize(
    heatmap: Tensor | np.ndarray, cmap: str = "jet", size: tuple[int, int] | None = None
) -> Image.Image:
    """A [0, 1] heatmap as an RGB picture with a matplotlib colormap; ``size`` = (width, height)."""
    import matplotlib

    m = _as_map(heatmap)
    if size is not None:
        m = upsample(m, (size[1], size[0]))
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise ValueError(f"unknown colormap {cmap!r}; try jet, turbo, viridis, inferno, magma") from err
    rgba = colormap(m.clamp(0, 1).numpy())
    return Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8), mode="RGB")


def overlay(
    image: Image.Image, heatmap: Tensor | np.ndarray, cmap: str = "jet", alpha: float = 0.5
) -> Image.Image:
    """Blend a [0, 1] heatmap over ``image``: ``(1 - alpha) * image + alpha * colormap(heatmap)``.

    Args:
        image: the original picture (any size; converted to RGB).
        heatmap: Tensor/array [h, w] in [0, 1], resized bilinearly to the image size.
        cmap: matplotlib colormap name.
        alpha: weight of the heatmap, in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the heatmap's weight and must lie in [0, 1], got {alpha}")
    base = image.convert("RGB")
    heat = colorize(heatmap, cmap=cmap, size=base.size)
    return Image.blend(base, heat, alpha)


def hstack(pictures: Sequence[Image.Image], height: int = 224) -> Image.Image:
    """Pictures side by side, each scaled to ``height``."""
    scaled = [p.resize((max(1, round(p.width * height / p.height)), height)) for p in pictures]
    out = Image.new("RGB", (sum(p.width for p in scaled), height), "white")
    x = 0
    for p in scaled:
        out.paste(p, (x, 0))
        x += p.width
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def grid(
    cells: Mapping[str, Mapping[str, Image.Image]],
    image: Image.Image | None = None,
    cell: int = 224,
    title: str | None = None,
) -> Image.Image:
    """A grid with one row per key of ``cells`` (e.g. method) and one column per inner key (e.g. layer).

    Args:
        cells: row title -> (column title -> picture).
        image: the original, shown in a first column.
        cell: side of each cell in pixels.
        title: a line above the grid.
    """
    rows = list(cells)
    cols: list[str] = []
    for r in rows:
        for c in cells[r]:
            if c not in cols:
                cols.append(c)
    font = _font(max(10, cell // 14))
    pad_top = cell // 8 + (cell // 8 if title else 0)
    pad_left = cell // 2 + 20
    extra = 1 if image is not None else 0
    width = pad_left + cell * (len(cols) + extra)
    height = pad_top + cell * len(rows)
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    y0 = pad_top - cell // 8 + 2
    if image is not None:
        draw.text((pad_left + 4, y0), "input", fill="black", font=font)
    for j, c in enumerate(cols):
        draw.text((pad_left + cell * (j + extra) + 4, y0), c, fill="black", font=font)
    for i, r in enumerate(rows):
        y = pad_top + cell * i
        draw.text((4, y + cell // 2 - 8), r, fill="black", font=font)
        if image is not None:
            out.paste(image.convert("RGB").resize((cell, cell)), (pad_left, y))
        for j, c in enumerate(cols):
            if c in cells[r]:
                out.paste(cells[r][c].convert("RGB").resize((cell, cell)), (pad_left + cell * (j + extra), y))
    return out


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Box | Sequence[float] | Tensor],
    color: str | tuple[int, int, int] = "lime",
    width: int | None = None,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """A copy of ``image`` with boxes drawn on it.

    Args:
        image: any picture (e.g. an overlay, or the original photo).
        boxes: :class:`camkit.localize.Box` objects, ``[x0, y0, x1, y1]`` or Tensor[4] in the picture's pixels, half-open
            (``x1``, ``y1`` exclusive): the outline covers the pixels ``x0 .. x1 - 1``.
        color: outline color.
        width: line width in pixels (default: about 1/150 of the picture's larger side, at least 2).
        labels: a caption per box, written at its top-left corner.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    lw = width if width is not None else max(2, round(max(out.size) / 150))
    font = _font(max(10, lw * 6))
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in (b.xyxy if isinstance(b, Box) else b))
        if x1 <= x0 or y1 <= y0:
            continue
        # a box under one pixel wide (a detector's sliver) still gets a one-pixel outline
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=lw)
        if labels is not None and i < len(labels) and labels[i]:
            draw.text((x0 + lw + 1, y0 + lw + 1), labels[i], fill=color, font=font)
    return out
