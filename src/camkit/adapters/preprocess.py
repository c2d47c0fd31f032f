"""Preprocessing: :class:`Preprocess` resizes the *whole* image to the model's input size (no centre crop, so the
map covers all the user sees) and normalises with the model's mean/std; the ImageNet class names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from camkit.adapters.task import detection_transform, model_task
from camkit.core.targets import imagenet_labels
from camkit.io.images import to_rgb

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SEGMENTATION_SIZE", "Preprocess", "imagenet_labels"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEGMENTATION_SIZE = 520  # torchvision's segmentation weights are evaluated at 520 pixels


@dataclass(frozen=True)
class Preprocess:
    """Resize the whole image to ``size`` (H, W) and normalise: ``(x / 255 - mean) / std``.

    Calling it on PIL images gives Tensor[B, 3, H, W] float32.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        arrays = []
        for im in images:
            im = to_rgb(im).resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(im, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[None, :, None, None]
        return (x - mean) / std

    @classmethod
    def for_model(cls, model: nn.Module) -> Preprocess:
        """The preprocessing a model declares (timm's ``pretrained_cfg``), else ImageNet mean/std at 224x224.

        torchvision detection models normalise and resize inside: images in [0, 1] (no normalisation) at the
        square size their transform keeps as is (``fixed_size``, else ``min(min_size, max_size)``).
        torchvision segmentation models: ImageNet mean/std at 520x520. A model that carries its own
        ``camkit_preprocess`` (the transformers views of :mod:`camkit.adapters.huggingface`): that one.
        """
        own = getattr(model, "camkit_preprocess", None)
        if isinstance(own, Preprocess):
            return own
        task = model_task(model)
        if task == "detection":
            t = detection_transform(model)
            if t.fixed_size is not None:  # (width, height)
                size = (int(t.fixed_size[1]), int(t.fixed_size[0]))
            else:
                side = int(min(t.min_size[-1], t.max_size))
                size = (side, side)
            return cls(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        if task == "segmentation":
            return cls(size=(SEGMENTATION_SIZE, SEGMENTATION_SIZE))
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, dict) and "input_size" in cfg:
            _, h, w = cfg["input_size"]
            return cls(
                size=(int(h), int(w)),
                mean=_rgb(cfg.get("mean", IMAGENET_MEAN)),
                std=_rgb(cfg.get("std", IMAGENET_STD)),
            )
        return cls()


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """Three per-channel values (a timm ``pretrained_cfg`` mean or std)."""
    r, g, b = values
    return float(r), float(g), float(b)
