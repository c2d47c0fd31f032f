"""Video and 3-D models: clips in, one map per frame out, per-frame overlays and animations.

A 3-D network (torchvision ``r3d_18``, ``mc3_18``, ``r2plus1d_18``, or any model of ``nn.Conv3d``) reads a clip
Tensor[B, C, T, H, W]. :func:`camkit.explain` takes such a tensor as is: the target layer's output
[B, K, t, h, w] is read with its time axis (:mod:`camkit.core.tokens`, layout ``"ncthw"``), so every layer method
(gradient CAMs, CAM, Eigen-CAM) gives

* ``Explanation.raw[layer]``: Tensor[B, t, h, w] (``[B, k, t, h, w]`` for ``TopK(k)``), the signed map at the
  layer's resolution in time and space;
* ``Explanation.maps`` and ``layer_maps``: Tensor[B, T, H, W] (``[B, k, T, H, W]``) in [0, 1], resized to the
  clip's frames and size (trilinear, ``align_corners=False``) and min-max normalised over the **whole clip**, so
  that frames can be compared with each other (a frame the model ignores stays dark).

Perturbation methods (Score-CAM family, Ablation-CAM) and attention methods work on images only and are refused
for clips with a message.

This module reads clips (:func:`read_frames`, :func:`load_clip`: any format imageio reads, ``.mp4``/``.avi``
through imageio-ffmpeg, ``.gif`` through Pillow), preprocesses them (:class:`ClipPreprocess`, Kinetics-400 mean
and std at 112x112 by default, as torchvision's video weights expect), draws one overlay per frame
(:func:`overlay_frames`) and writes an animated GIF or MP4 (:func:`save_animation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from camkit import viz
from camkit.adapters.preprocess import Preprocess
from camkit.core.postprocess import fuse, normalize
from camkit.errors import CamkitError
from camkit.io.images import to_rgb

__all__ = [
    "KINETICS_MEAN",
    "KINETICS_STD",
    "VIDEO_SUFFIXES",
    "Clip",
    "ClipPreprocess",
    "load_clip",
    "overlay_frames",
    "postprocess_clip",
    "read_frames",
    "save_animation",
]

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif"})


@dataclass(frozen=True)
class ClipPreprocess(Preprocess):
    """Frames of one clip -> Tensor[1, 3, T, H, W]: ``frames`` frames evenly spaced over the clip (all of them when
    the clip is shorter or ``frames`` is 0), each resized whole to ``size`` and normalised as
    :class:`~camkit.adapters.preprocess.Preprocess` does (default: Kinetics-400 mean and std at 112x112).

    Calling it on a list of PIL frames gives one clip (a batch of 1), not a batch of images.
    """

    size: tuple[int, int] = (112, 112)
    mean: tuple[float, float, float] = KINETICS_MEAN
    std: tuple[float, float, float] = KINETICS_STD
    frames: int = 16

    def pick(self, count: int) -> list[int]:
        """The indices of the frames used out of ``count``."""
        if count < 1:
            raise CamkitError("the clip has no frame")
        if self.frames <= 0 or count <= self.frames:
            return list(range(count))
        return [round(float(i)) for i in np.linspace(0, count - 1, self.frames)]

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> Tensor:
        frames = [images] if isinstance(images, Image.Image) else list(images)
        chosen = [frames[i] for i in self.pick(len(frames))]
        x = Preprocess(self.size, self.mean, self.std)(chosen)  # [T, 3, H, W]
        return x.permute(1, 0, 2, 3).unsqueeze(0).contiguous()


@dataclass
class Clip:
    """A clip ready to explain.

    Attributes:
        x: the model input, Tensor[1, 3, T, H, W].
        frames: the T frames it was made of, RGB at their original size (for overlays).
        fps: the clip's frame rate when the file declares one (after sampling), else None.
        source: the file it was read from.
    """

    x: Tensor
    frames: list[Image.Image]
    fps: float | None
    source: Path


def read_frames(path: str | Path, max_frames: int = 10_000) -> tuple[list[Image.Image], float | None]:
    """All frames of a video or animated image, as RGB PIL images, and its frame rate (None if not declared).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be decoded (the message names it), has no frame, or more than ``max_frames``.
    """
    import imageio.v3 as iio

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"clip not found: {str(p)!r}")
    fps: float | None = None
    try:
        meta = iio.immeta(p)
        if isinstance(meta.get("fps"), (int, float)) and meta["fps"] > 0:
            fps = float(meta["fps"])
        elif (
            isinstance(meta.get("duration"), (int, float))
            and meta["duration"] > 0
            and p.suffix.lower() == ".gif"
        ):
            fps = 1000.0 / float(meta["duration"])  # Pillow: milliseconds per frame
        frames: list[Image.Image] = []
        for arr in iio.imiter(p):
            frames.append(to_rgb(Image.fromarray(np.asarray(arr))))
            if len(frames) > max_frames:
                raise CamkitError(f"{str(p)!r} has more than {max_frames} frames; cut it shorter first")
    except ValueError:
        raise
    except Exception as err:
        raise CamkitError(
            f"cannot read {str(p)!r} as a video ({type(err).__name__}: {err}); camkit reads clips with imageio "
            "(MP4/AVI through imageio-ffmpeg, GIF through Pillow)"
        ) from err
    if not frames:
        raise CamkitError(f"{str(p)!r} holds no frame")
    return frames, fps


def load_clip(path: str | Path, preprocess: ClipPreprocess | None = None) -> Clip:
    """Read a clip and turn it into the model input (``preprocess``, default :class:`ClipPreprocess` ()).

    ``Clip.frames`` are the frames actually used (``preprocess.frames`` of them, evenly spaced).
    """
    pre = preprocess or ClipPreprocess()
    frames, fps = read_frames(path)
    idx = pre.pick(len(frames))
    used = [frames[i] for i in idx]
    if fps is not None and len(idx) > 1:
        fps = fps * (len(idx) - 1) / max(idx[-1] - idx[0], 1)
    return Clip(pre(used), used, fps, Path(path))


def _resize_clip(maps: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Trilinear resize of Tensor[..., t, h, w] to ``size`` (T, H, W), ``align_corners=False``."""
    if tuple(maps.shape[-3:]) == size:
        return maps.float()
    lead = maps.shape[:-3]
    x = maps.reshape(-1, 1, *maps.shape[-3:]).float()
    y = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return y.reshape(*lead, *size)


def _normalize_clip(maps: Tensor) -> Tensor:
    """Min-max over each whole clip of Tensor[..., T, H, W] (frames stacked, then :func:`normalize`)."""
    return normalize(maps.flatten(-3, -2)).reshape(maps.shape)


def postprocess_clip(
    raw: dict[str, Tensor],
    size: tuple[int, int, int],
    relu: bool = True,
    fusion: str | None = None,
    shallow_tanh: float | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per layer: ReLU, resize to the clip (T, H, W), min-max over the clip; then the fusion of the layers.

    Args:
        raw: layer name -> signed map Tensor[..., t, h, w].
        size: (T, H, W) of the clip.
        relu: apply the ReLU first.
        fusion: ``"max"`` (default) or ``"mean"`` (see :func:`camkit.core.postprocess.fuse`).
        shallow_tanh: LayerCAM's rescaling of the shallower layers (see :func:`camkit.core.postprocess.fuse`).

    Returns:
        (layer name -> Tensor[..., T, H, W] in [0, 1], the fused map of the same shape).
    """
    layer_maps = {
        name: _normalize_clip(_resize_clip(torch.relu(r) if relu else r, size)) for name, r in raw.items()
    }
    stacked = [m.flatten(-3, -2) for m in layer_maps.values()]  # normalise over the clip inside fuse too
    fused = fuse(stacked, mode=fusion or "max", shallow_tanh=shallow_tanh).reshape(
        next(iter(layer_maps.values())).shape
    )
    return layer_maps, fused


def overlay_frames(
    frames: Sequence[Image.Image],
    maps: Tensor,
    cmap: str = "jet",
    alpha: float = 0.5,
    max_side: int | None = None,
) -> list[Image.Image]:
    """One overlay per frame: ``maps[t]`` (Tensor[T, H, W] in [0, 1], e.g. ``expl.maps[0]``) over ``frames[t]``.

    Raises:
        ValueError: ``maps`` is not [T, H, W] with one map per frame.
    """
    if maps.dim() != 3 or maps.shape[0] != len(frames):
        raise CamkitError(
            f"overlay_frames needs one map per frame, Tensor[T, H, W] with T = {len(frames)} frames; got shape "
            f"{tuple(maps.shape)} (for a batch take expl.maps[i], for TopK expl.maps[i, k])"
        )
    return [
        viz.overlay(f, m, cmap=cmap, alpha=alpha, max_side=max_side)
        for f, m in zip(frames, maps, strict=True)
    ]


def save_animation(pictures: Sequence[Image.Image], path: str | Path, fps: float = 8.0) -> Path:
    """Write pictures as an animation: ``.gif`` (looping, through Pillow) or ``.mp4`` (H.264 through
    imageio-ffmpeg; sizes rounded up to even numbers as the codec needs). Written to a temporary file in the same
    folder and renamed into place.

    Raises:
        ValueError: no picture, ``fps`` not positive, or another suffix.
    """
    import imageio.v3 as iio

    from camkit.io.files import atomic_write

    p = Path(path)
    suffix = p.suffix.lower()
    if not pictures:
        raise CamkitError("no picture to animate")
    if not fps > 0:
        raise CamkitError(f"fps must be positive, got {fps}")
    if suffix not in (".gif", ".mp4"):
        raise CamkitError(f"an animation is written as .gif or .mp4, got {str(p)!r}")
    w, h = pictures[0].size
    if suffix == ".mp4":
        w, h = w + w % 2, h + h % 2
    arrays = np.stack([np.asarray(to_rgb(pic).resize((w, h), Image.Resampling.BILINEAR)) for pic in pictures])
    if suffix == ".gif":
        data = iio.imwrite("<bytes>", arrays, extension=".gif", duration=1000.0 / fps, loop=0)
    else:
        data = iio.imwrite("<bytes>", arrays, extension=".mp4", plugin="FFMPEG", fps=fps, macro_block_size=1)
    with atomic_write(p) as f:
        f.write(data)
    return p
