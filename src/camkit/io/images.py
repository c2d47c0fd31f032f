"""Reading images: :func:`load_image` with clear errors and documented conversions (grayscale -> RGB by
replication, transparency composited onto white, CMYK/16-bit -> 8-bit RGB), and the sample photos shipped inside
scikit-image."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from camkit.errors import CamkitError

__all__ = ["DEFAULT_MAX_PIXELS", "SAMPLES", "load_image", "open_image", "sample_image", "to_rgb"]

DEFAULT_MAX_PIXELS = 89_478_485
"""PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` as PIL ships it): the default of
:func:`load_image`'s ``max_pixels``."""

_PIL_LIMIT_LOCK = threading.Lock()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Grayscale is replicated to 3 channels; images with transparency (RGBA, LA, P with a transparent colour) are
    composited onto white; 16/32-bit grayscale is scaled to 0..255 by its own min/max.

    Raises:
        ValueError: a floating-point image holds NaN or infinite values.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise CamkitError(
                f"the image holds {bad} NaN or infinite pixel value(s) (mode {im.mode}); camkit cannot tell "
                "what they should look like: replace them (e.g. numpy.nan_to_num) and save the image again"
            )
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(p: Path | IO[bytes]) -> Image.Image:
    """``Image.open`` (lazy: the header only) without PIL's own bomb check (camkit checks ``max_pixels``
    itself, any limit allowed). ``p``: a file, or a readable binary stream (a tar member)."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(p)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as 8-bit RGB (see :func:`to_rgb` for the conversions).

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this (width x height), checked from the file's header
            before anything is decoded (decompression bombs). Default: PIL's limit, :data:`DEFAULT_MAX_PIXELS`.
            None: no limit.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image, has more than ``max_pixels`` pixels, or holds NaN/Inf.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {str(p)!r}")
    if p.is_dir():
        raise CamkitError(f"{str(p)!r} is a folder, not an image file")
    if max_pixels is not None and max_pixels < 1:
        raise CamkitError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}")
    try:
        im = open_image(p)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CamkitError(
            f"cannot read {str(p)!r} as an image ({err}); is the file complete and an image?"
        ) from err
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise CamkitError(
                f"{str(p)!r} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} (a guard against "
                "decompression bombs); if you trust the file, raise the limit: --max-pixels N on the command "
                "line (0: no limit), load_image(..., max_pixels=N or None) in Python"
            )
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise CamkitError(
                f"cannot read {str(p)!r} as an image ({err}); is the file complete and an image?"
            ) from err
        try:
            return to_rgb(im)
        except ValueError as err:
            raise CamkitError(f"{str(p)!r}: {err}") from err


SAMPLES = ("chelsea", "coffee", "astronaut")


def sample_image(name: str = "chelsea") -> Image.Image:
    """A sample photo shipped inside scikit-image (no download): ``chelsea`` (a cat), ``coffee``, ``astronaut``."""
    if name not in SAMPLES:
        raise CamkitError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")
