"""Reading images: :func:`load_image` with clear errors and documented conversions (grayscale -> RGB by
replication, transparency composited onto white, CMYK/16-bit -> 8-bit RGB), and the sample photos shipped inside
scikit-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["SAMPLES", "load_image", "sample_image", "to_rgb"]


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Grayscale is replicated to 3 channels; images with transparency (RGBA, LA, P with a transparent colour) are
    composited onto white; 16/32-bit grayscale is scaled to 0..255 by its own min/max.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
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


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB (see :func:`to_rgb` for the conversions).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a folder, not an image file")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"cannot read {str(p)!r} as an image ({err}); is the file complete and an image?"
        ) from err


SAMPLES = ("chelsea", "coffee", "astronaut")


def sample_image(name: str = "chelsea") -> Image.Image:
    """A sample photo shipped inside scikit-image (no download): ``chelsea`` (a cat), ``coffee``, ``astronaut``."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")
