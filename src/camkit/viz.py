"""Pictures: colormaps, overlays, grids of methods x layers, and captions with a colour bar.

``overlay(image, map, alpha)`` blends ``(1 - alpha) * image + alpha * colormap(map)``: ``alpha`` is the weight of
the heatmap. The map is resized (bilinear) to the image's size, so a map at the model's input size lands on the
original photo whatever resize the preprocessing did.

Pictures are rendered in 8 bits, a band of rows at a time: the map is resized by PIL (bilinear, as a 32-bit float
image), turned into an index ``min(floor(256 * value), 255)`` into a 256-colour table taken once per colormap from
matplotlib (the same colour matplotlib gives for a 256-colour map), and blended in integers. Beyond the decoded
photo a call holds the output picture (4 bytes a pixel in PIL) and one band of temporaries, whatever the photo's
size; ``max_side`` shrinks the photo before blending, so the output and the memory shrink with it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from camkit.errors import CamkitError
from camkit.localize import Box

__all__ = [
    "annotate",
    "caption_text",
    "colorize",
    "colormap_table",
    "draw_boxes",
    "grid",
    "hstack",
    "overlay",
]

# pixels per band when rendering: bounds the temporaries of one call, whatever the picture's size
_BAND_PIXELS = 1 << 17

# modes that are cropped / resized a band at a time and converted to RGB band by band
_BANDED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})

ImageLike = Image.Image | np.ndarray | Tensor


def _as_map(heatmap: Tensor | np.ndarray) -> np.ndarray:
    """A heatmap as float32[H, W] (leading dimensions of 1 dropped); numpy only, so a forked worker never runs a
    torch kernel here."""
    if isinstance(heatmap, Tensor):
        t = heatmap.detach().cpu()
        arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    else:
        arr = np.asarray(heatmap)
    if arr.dtype.kind not in "biuf":
        raise CamkitError(f"a heatmap must hold numbers, got dtype {arr.dtype}")
    m = arr.astype(np.float32, copy=False)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise CamkitError(f"a heatmap must be 2-D [H, W], got shape {tuple(m.shape)}")
    if m.size == 0:
        raise CamkitError(f"a heatmap must not be empty, got shape {tuple(m.shape)}")
    if not np.isfinite(m).all():
        raise CamkitError("the heatmap contains NaN or infinite values")
    return m


def _as_image(image: ImageLike) -> Image.Image:
    """A PIL image from a PIL image, a numpy array ([H, W] or [H, W, C]) or a tensor ([C, H, W] or [H, W]).

    A leading batch dimension of 1 is dropped. Channels: 1 (grey), 3 (RGB) or 4 (RGBA). A numpy array is read as
    HWC unless only its first dimension can be channels; a tensor as CHW unless only its last one can. Integer
    values must lie in [0, 255]; floating values in [0, 1] (a normalised model input is not a picture).
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Tensor):
        arr = image.detach().cpu().numpy()
        channels_first = True
    elif isinstance(image, np.ndarray):
        arr = image
        channels_first = False
    else:
        raise TypeError(
            f"an image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}"
        )
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        first, last = arr.shape[0] in (1, 3, 4), arr.shape[-1] in (1, 3, 4)
        if first and (channels_first or not last):
            arr = np.moveaxis(arr, 0, -1)
        elif not last:
            raise CamkitError(f"an image array needs 1, 3 or 4 channels, got shape {tuple(image.shape)}")
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 2:
        raise CamkitError(f"an image array must be [H, W] or have channels, got shape {tuple(image.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CamkitError(f"an image must not be empty, got shape {tuple(image.shape)}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise CamkitError("the image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise CamkitError(
                f"a floating-point image must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                "(scale 0..255 pixels to an integer type, undo a normalisation first)"
            )
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype.kind in "iu":
        if arr.dtype != np.uint8:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 255:
                raise CamkitError(f"an integer image must lie in [0, 255], got values in [{lo}, {hi}]")
            arr = arr.astype(np.uint8)
    else:
        raise CamkitError(f"cannot read an image of dtype {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


@functools.lru_cache(maxsize=64)
def colormap_table(cmap: str = "jet") -> np.ndarray:
    """The 256 colours of a matplotlib colormap, uint8[256, 3] (read-only; computed once per name).

    Entry ``i`` is the colour matplotlib gives to the values in ``[i / 256, (i + 1) / 256)`` (for a 256-colour
    map, its own ``i``-th colour), so a map value ``v`` in [0, 1] gets ``table[min(floor(256 * v), 255)]``.
    """
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise CamkitError(f"unknown colormap {cmap!r}; try jet, turbo, viridis, inferno, magma") from err
    rgba = colormap((np.arange(256) + 0.5) / 256)
    table: np.ndarray = (np.asarray(rgba)[:, :3] * 255).round().astype(np.uint8)
    table.setflags(write=False)
    return table


def _capped(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` (width, height) shrunk, aspect kept, so that its longer side is at most ``max_side``."""
    if max_side is None:
        return size
    if isinstance(max_side, bool) or not isinstance(max_side, int | np.integer) or max_side < 1:
        raise CamkitError(f"max_side must be a positive integer or None, got {max_side!r}")
    w, h = size
    if max(w, h) <= max_side:
        return size
    scale = max_side / max(w, h)
    return (min(max_side, max(1, round(w * scale))), min(max_side, max(1, round(h * scale))))


def _map_band(src: Image.Image, size: tuple[int, int], y0: int, y1: int) -> np.ndarray:
    """Rows ``y0:y1`` of the 'F' image ``src`` resized bilinearly to ``size`` (width, height), float32[y1 - y0, W].

    Enlarging, this is :func:`camkit.core.postprocess.upsample` (``align_corners=False``) up to float rounding;
    shrinking, PIL widens the filter (antialiasing) where ``upsample`` samples two pixels.
    """
    width, height = size
    w, h = src.size
    if (w, h) == size:
        return np.asarray(src.crop((0, y0, width, y1)))
    box = (0.0, y0 * h / height, float(w), y1 * h / height)
    return np.asarray(src.resize((width, y1 - y0), Image.Resampling.BILINEAR, box=box))


def _render(
    m: np.ndarray, size: tuple[int, int], table: np.ndarray, base: Image.Image | None, alpha: float
) -> Image.Image:
    """The map ``m`` [h, w] resized to ``size`` (width, height), coloured by ``table`` and blended over ``base``.

    ``base`` (any size: resized to ``size`` with a Lanczos filter; or None for the colours alone) gets
    ``1 - alpha``; rounding to nearest, with ``alpha`` taken to 1/65536. Works a band of rows at a time.
    """
    width, height = size
    src = Image.fromarray(np.ascontiguousarray(np.clip(m, 0.0, 1.0)))
    out = Image.new("RGB", size)
    a = np.uint32(round(alpha * 65536))
    band = max(1, _BAND_PIXELS // width)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        vals = _map_band(src, size, y0, y1)
        idx = np.minimum(vals * 256.0, 255.0).astype(np.uint8)  # floor: values are >= 0
        heat = table[idx]
        if base is not None:
            if base.size == size:
                photo = base.crop((0, y0, width, y1))
            else:  # shrink (or grow) the photo band by band: no whole-photo intermediate
                box = (0.0, y0 * base.height / height, float(base.width), y1 * base.height / height)
                photo = base.resize((width, y1 - y0), Image.Resampling.LANCZOS, box=box)
            if photo.mode != "RGB":
                photo = photo.convert("RGB")
            mix = np.asarray(photo).astype(np.uint32) * (np.uint32(65536) - a)
            mix += heat.astype(np.uint32) * a
            mix += np.uint32(32768)
            mix >>= np.uint32(16)
            heat = mix.astype(np.uint8)
        out.paste(Image.fromarray(heat), (0, y0))
    return out


def colorize(
    heatmap: Tensor | np.ndarray,
    cmap: str = "jet",
    size: tuple[int, int] | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """A [0, 1] heatmap as an RGB picture with a matplotlib colormap.

    Args:
        heatmap: Tensor/array [h, w] (values outside [0, 1] are clipped).
        cmap: matplotlib colormap name.
        size: (width, height) of the picture; default the map's own size. The map is resized bilinearly.
        max_side: if set, the picture is shrunk (aspect kept) so that its longer side is at most this.
    """
    table = colormap_table(cmap)
    m = _as_map(heatmap)
    target = _capped(size if size is not None else (m.shape[1], m.shape[0]), max_side)
    return _render(m, (int(target[0]), int(target[1])), table, None, 1.0)


def overlay(
    image: ImageLike,
    heatmap: Tensor | np.ndarray,
    cmap: str = "jet",
    alpha: float = 0.5,
    max_side: int | None = None,
) -> Image.Image:
    """Blend a [0, 1] heatmap over ``image``: ``round((1 - alpha) * image + alpha * colormap(heatmap))``.

    Args:
        image: the original picture, any size: a PIL image (any mode; converted to RGB), a numpy array [H, W] or
            [H, W, C], or a tensor [C, H, W] (uint8 in [0, 255], or floating in [0, 1]).
        heatmap: Tensor/array [h, w] in [0, 1], resized bilinearly to the picture's size.
        cmap: matplotlib colormap name.
        alpha: weight of the heatmap, in [0, 1].
        max_side: if set, the picture is shrunk (aspect kept) so that its longer side is at most this, before
            blending: big photos then cost memory and time in proportion to the output, not the photo.

    Returns:
        An RGB picture at the image's size (or shrunk to ``max_side``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise CamkitError(f"alpha is the heatmap's weight and must lie in [0, 1], got {alpha}")
    table = colormap_table(cmap)
    m = _as_map(heatmap)
    base = _as_image(image)
    if base.mode not in _BANDED_MODES:  # e.g. 16-bit grey: converted whole, as PIL resizes few such modes
        base = base.convert("RGB")
    return _render(m, _capped(base.size, max_side), table, base, alpha)


def hstack(pictures: Sequence[Image.Image], height: int = 224) -> Image.Image:
    """Pictures side by side, each scaled to ``height`` (aspect kept)."""
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


def _fit(picture: Image.Image, height: int, max_width: int) -> Image.Image:
    """``picture`` in RGB at ``height`` with its aspect ratio kept; narrower than ``max_width`` (then lower)."""
    pic = picture.convert("RGB") if picture.mode != "RGB" else picture
    scale = min(height / pic.height, max_width / pic.width)
    size = (max(1, round(pic.width * scale)), max(1, round(pic.height * scale)))
    return pic if size == pic.size else pic.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def grid(
    cells: Mapping[str, Mapping[str, Image.Image]],
    image: Image.Image | None = None,
    cell: int = 224,
    title: str | None = None,
) -> Image.Image:
    """A grid with one row per key of ``cells`` (e.g. method) and one column per inner key (e.g. layer).

    Every picture keeps its aspect ratio: it is scaled to the row height ``cell`` and its column is as wide as
    its widest picture (a picture wider than 4 cells is scaled to that width and centred vertically instead).

    Args:
        cells: row title -> (column title -> picture).
        image: the original, shown in a first column.
        cell: height of each row of pictures in pixels.
        title: a line above the grid.
    """
    if cell < 1:
        raise CamkitError(f"cell must be a positive number of pixels, got {cell}")
    rows = list(cells)
    cols: list[str] = []
    for r in rows:
        for c in cells[r]:
            if c not in cols:
                cols.append(c)
    limit = 4 * cell
    original = _fit(image, cell, limit) if image is not None else None
    fitted = {r: {c: _fit(p, cell, limit) for c, p in cells[r].items()} for r in rows}
    widths = [max((fitted[r][c].width for r in rows if c in fitted[r]), default=cell) for c in cols]
    if original is not None:
        widths.insert(0, original.width)
    font = _font(max(10, cell // 14))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max((measure.textlength(r, font=font) for r in rows), default=0.0)
    pad_top = cell // 8 + (cell // 8 if title else 0)
    pad_left = max(cell // 2 + 20, int(label_width) + 12)
    height = pad_top + cell * len(rows)
    out = Image.new("RGB", (pad_left + sum(widths), height), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    lefts = [pad_left + sum(widths[:k]) for k in range(len(widths))]
    y0 = pad_top - cell // 8 + 2
    names = (["input"] if original is not None else []) + cols
    for x, name in zip(lefts, names, strict=True):
        draw.text((x + 4, y0), name, fill="black", font=font)
    extra = 1 if original is not None else 0
    for i, r in enumerate(rows):
        y = pad_top + cell * i
        draw.text((4, y + cell // 2 - 8), r, fill="black", font=font)
        if original is not None:
            out.paste(original, (lefts[0], y + (cell - original.height) // 2))
        for j, c in enumerate(cols):
            if c in fitted[r]:
                pic = fitted[r][c]
                x = lefts[j + extra] + (widths[j + extra] - pic.width) // 2
                out.paste(pic, (x, y + (cell - pic.height) // 2))
    return out


def caption_text(
    label: str | None = None,
    cls: int | None = None,
    prob: float | None = None,
    method: str | None = None,
    layer: str | Sequence[str] | None = None,
) -> str:
    """A one-line caption for :func:`annotate` from what is known, e.g. ``"tabby (281) p=0.93 · gradcam · layer4"``.

    Args:
        label: class name.
        cls: class index.
        prob: the class's probability, in [0, 1].
        method: the CAM method.
        layer: the target layer, or several (joined with ``+``).
    """
    parts: list[str] = []
    what = " ".join(
        s
        for s in (
            label or "",
            f"({cls})" if cls is not None and label else str(cls) if cls is not None else "",
        )
        if s
    )
    if prob is not None:
        what = f"{what} p={prob:.2f}".strip()
    if what:
        parts.append(what)
    if method:
        parts.append(method)
    if layer:
        parts.append(layer if isinstance(layer, str) else "+".join(layer))
    return " · ".join(parts)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (word by word; a word too long is cut)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for para in text.splitlines():
        line = ""
        for word in para.split():
            trial = f"{line} {word}" if line else word
            if measure.textlength(trial, font=font) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
            while len(line) > 1 and measure.textlength(line, font=font) > width:
                cut = len(line) - 1
                while cut > 1 and measure.textlength(line[:cut], font=font) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def annotate(
    picture: ImageLike,
    caption: str | None = None,
    colorbar: str | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of ``picture`` (e.g. one overlay) with a caption strip below it and a colour bar to its right.

    The picture itself is unchanged at the top-left corner of the result. The colour bar shows the colormap from
    0 (bottom) to 1 (top), as the overlay maps heatmap values, with marks and labels at 0, 0.5 and 1. The caption
    is wrapped to the picture's width. With neither, the result is a plain RGB copy.

    Args:
        picture: a PIL image, numpy array [H, W(, C)] or tensor [C, H, W] (as :func:`overlay` takes).
        caption: text under the picture, e.g. from :func:`caption_text` (class, probability, method, layer).
        colorbar: the colormap name the overlay was drawn with (e.g. ``"jet"``); None: no colour bar.
        font_size: text size in pixels (default: from the picture's size, at least 12).

    Example:
        >>> pic = overlay(photo, expl.maps[0], cmap="jet")  # doctest: +SKIP
        >>> annotate(pic, caption_text("tabby", 281, 0.93, "gradcam", "layer4"), colorbar="jet")  # doctest: +SKIP
    """
    pic = _as_image(picture)
    pic = pic.convert("RGB") if pic.mode != "RGB" else pic.copy()
    table = colormap_table(colorbar) if colorbar is not None else None
    size = font_size if font_size is not None else max(12, round(min(pic.size) / 28))
    font = _font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(4, size // 2)
    bar_w = max(8, size) if table is not None else 0
    tick = max(3, size // 3)
    label_w = (
        int(max(measure.textlength(t, font=font) for t in ("0", "0.5", "1"))) if table is not None else 0
    )
    side = margin + bar_w + tick + 2 + label_w + margin if table is not None else 0
    lines = _wrap(caption, font, pic.width + side - 2 * margin) if caption else []
    line_h = size + max(2, size // 4)
    strip = 2 * margin + line_h * len(lines) if lines else 0
    out = Image.new("RGB", (pic.width + side, pic.height + strip), "white")
    out.paste(pic, (0, 0))
    draw = ImageDraw.Draw(out)
    if table is not None:
        x0 = pic.width + margin
        top = min(size // 2 + 2, pic.height // 4)  # room for the labels of 0 and 1
        bottom = max(top + 1, pic.height - top)  # exclusive
        n = bottom - top
        values = 1.0 - (np.arange(n) + 0.5) / n  # 1 at the top row, 0 at the bottom one
        idx = np.minimum(values * 256.0, 255.0).astype(np.uint8)
        if n > 1:
            idx[0], idx[-1] = 255, 0  # the ends show exactly the colours of 1 and 0
        column = np.repeat(table[idx][:, None, :], bar_w, axis=1)
        out.paste(Image.fromarray(np.ascontiguousarray(column)), (x0, top))
        draw.rectangle([x0 - 1, top - 1, x0 + bar_w, bottom], outline="black")
        for value, text in ((1.0, "1"), (0.5, "0.5"), (0.0, "0")):
            y = round(top + (1.0 - value) * (n - 1))
            draw.line([(x0 + bar_w, y), (x0 + bar_w + tick, y)], fill="black", width=1)
            draw.text((x0 + bar_w + tick + 2, y), text, fill="black", font=font, anchor="lm")
    for k, line in enumerate(lines):
        draw.text((margin, pic.height + margin + k * line_h), line, fill="black", font=font)
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
