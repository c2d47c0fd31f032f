"""The result of :func:`camkit.explain`: maps, scores, classes and the images they explain."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image
from torch import Tensor

from camkit import viz
from camkit.core.tasks import ChosenTarget

__all__ = ["Explanation"]


@dataclass
class Explanation:
    """The result of :func:`explain`.

    Attributes:
        maps: Tensor[B, H, W] in [0, 1] at the model's input size (Tensor[B, k, H, W] for ``TopK(k)``), fused over
            the target layers. A clip Tensor[B, C, T, H, W] (3-D models): Tensor[B, T, H, W] (``[B, k, T, H, W]``),
            see :mod:`camkit.adapters.video` for its per-frame overlays.
        layer_maps: layer name -> its own normalised map, same shape as ``maps``.
        raw: layer name -> the signed map at feature resolution before ReLU, Tensor[B, h, w] (or [B, k, h, w];
            a clip: [B, t, h, w]).
        classes: explained class indices, LongTensor[B] (or [B, k]); None for a callable target.
        scores: the explained scores (logits), Tensor[B] (or [B, k]).
        probs: softmax probabilities of the explained classes, or None for a callable target.
        labels: class names of ``classes`` when known.
        method: canonical method name.
        layers: target layer names, shallow to deep.
        images: the original RGB images when the input was given as images or paths (for overlays).
        chosen: torchvision segmentation / detection models explained with no target or with a class (index or
            name): what was chosen for each image (:func:`camkit.core.tasks.default_target`: that class, or the main
            non-background one, over its predicted mask; or the best detection of it); else None.
        output: the model output (logits) of the explained forward, detached; None when not recorded.
    """

    maps: Tensor
    layer_maps: dict[str, Tensor]
    raw: dict[str, Tensor]
    classes: Tensor | None
    scores: Tensor
    probs: Tensor | None
    labels: list[str] | list[list[str]] | None
    method: str
    layers: list[str]
    images: list[Image.Image] | None = field(default=None, repr=False)
    chosen: list[ChosenTarget] | None = field(default=None, repr=False)
    output: Tensor | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"Explanation(method={self.method!r}, layers={self.layers}, maps={tuple(self.maps.shape)}, "
            f"classes={self.classes.tolist() if self.classes is not None else None}, labels={self.labels})"
        )

    def overlay(
        self,
        index: int = 0,
        target: int = 0,
        cmap: str = "jet",
        alpha: float = 0.5,
        layer: str | None = None,
        max_side: int | None = None,
    ) -> Image.Image:
        """The map of image ``index`` over its original image (or over nothing: the colored map alone).

        Args:
            index: which image of the batch.
            target: which target for ``TopK`` explanations.
            cmap: a matplotlib colormap name.
            alpha: weight of the heatmap; the photo gets ``1 - alpha``.
            layer: show one layer's map instead of the fused one.
            max_side: shrink the picture (aspect kept) so that its longer side is at most this many pixels; the
                photo is shrunk before blending, so a big photo costs memory in proportion to the output.
        """
        m = self.layer_maps[layer] if layer is not None else self.maps
        m = m[index]
        if m.dim() == 3:
            m = m[target]
        if self.images is not None:
            return viz.overlay(self.images[index], m, cmap=cmap, alpha=alpha, max_side=max_side)
        return viz.colorize(m, cmap=cmap, max_side=max_side)

    def _repr_png_(self) -> bytes:
        pics = [self.overlay(i) for i in range(self.maps.shape[0])]
        buf = io.BytesIO()
        viz.hstack(pics, height=224).save(buf, format="PNG")
        return buf.getvalue()
