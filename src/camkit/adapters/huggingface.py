"""Hugging Face ``transformers`` vision models: ``hf:PATH_OR_ID``.

:func:`load` reads a model from a ``save_pretrained`` folder (offline: nothing is downloaded) or from a hub id
(which needs a network, or the model already in the local Hugging Face cache). The task comes from the config's
architecture (:func:`task_of`): ``...ForImageClassification`` (and DeiT / LeViT ``...WithTeacher``),
``...ForSemanticSegmentation`` or ``...ForObjectDetection``. It returns

* the model's camkit view, in eval mode, the transformers model under the name ``model`` (its layers are named as in
  the transformers code: ``model.vit.layers.10.layernorm_before``), whose forward takes camkit's normalised batch
  ``Tensor[B, 3, H, W]`` as ``pixel_values``:

  - :class:`HFClassifier`: the **logits** ``Tensor[B, classes]``;
  - :class:`HFSegmenter`: the logits upsampled (bilinear) to the input's size, ``Tensor[B, classes, H, W]``, as
    transformers' ``post_process_semantic_segmentation`` does, so :class:`~camkit.core.tasks.SegmentationTarget` and
    the default target read them as they read torchvision's segmentation models;
  - :class:`HFDetector`: torchvision's detection output, one dict per image with ``boxes`` (x1, y1, x2, y2 in input
    pixels, from ``pred_boxes``), ``scores`` and ``labels`` (the best class of the softmax of ``logits`` without
    the last, "no object", class), for the queries scoring above ``score_thresh`` (0.5, as
    ``post_process_object_detection``), so :class:`~camkit.core.tasks.DetectionTarget` scores a query's
    probability and box, with gradients through both;
* the :class:`~camkit.adapters.Preprocess` of the model's own image processor (``AutoImageProcessor`` saved in the
  same folder): the crop size when it crops (camkit resizes the whole image to that size, so the map covers all the
  image), else its ``size``; its ``image_mean`` / ``image_std`` (0 and 1 when it does not normalise). A folder
  without a processor: the config's ``image_size`` and ImageNet's mean and std;
* the class names of ``config.id2label``.

The model's attention implementation (``sdpa`` or ``eager``) is kept as it was saved; the attention methods read
the probabilities without changing it (:mod:`camkit.methods.attention`).

Importing this module does not import transformers; :func:`load` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from camkit.adapters.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from camkit.errors import CamkitError

__all__ = [
    "HFClassifier",
    "HFDetector",
    "HFModel",
    "HFSegmenter",
    "hf_prefix_tokens",
    "labels_of",
    "load",
    "preprocess_of",
    "task_of",
]

_SUFFIXES = (
    ("ForImageClassification", "classification"),
    ("ForImageClassificationWithTeacher", "classification"),
    ("ForSemanticSegmentation", "segmentation"),
    ("ForObjectDetection", "detection"),
)


def hf_prefix_tokens(model: nn.Module) -> int | None:
    """The prefix tokens of a transformers ViT-family model (class, distillation and register tokens of its
    ``embeddings``), or None when it has no such ``embeddings``."""
    base = getattr(model, "base_model", None)
    embeddings = getattr(base if isinstance(base, nn.Module) else model, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        return None
    count = 0
    found = False
    for attr in ("cls_token", "distillation_token"):
        if isinstance(getattr(embeddings, attr, None), Tensor):
            found = True
            count += 1
    registers = getattr(embeddings, "register_tokens", None)
    if isinstance(registers, Tensor):
        found = True
        count += int(registers.shape[-2]) if registers.dim() >= 2 else 1
    return count if found else None


_AUTO_LAYERS = {"MobileViTForImageClassification": "model.mobilevit.conv_1x1_exp"}
"""Automatic layers named in advance (:func:`camkit.core.layers.auto_layer`): MobileViT's transformer blocks run on
unfolded patches, so its last feature map before pooling is named here."""


def _detection_tokens(model: nn.Module) -> int:
    """YOLOS's detection tokens (appended after the patch tokens), 0 for other models."""
    base = getattr(model, "base_model", None)
    embeddings = getattr(base, "embeddings", None)
    tokens = getattr(embeddings, "detection_tokens", None)
    return int(tokens.shape[-2]) if isinstance(tokens, Tensor) and tokens.dim() >= 2 else 0


class HFClassifier(nn.Module):
    """A transformers image classifier seen as ``pixel_values -> logits``.

    ``camkit_task`` tells :func:`camkit.adapters.task.model_task` the model's task; ``camkit_preprocess`` (set by
    :func:`load`) is the preprocessing :meth:`camkit.adapters.Preprocess.for_model` returns for it.

    The transformers model is the submodule ``model`` (the very object: nothing of it is copied or changed), so
    the layer names are the transformers ones under ``model.`` (the hand-written recipe's
    ``model.vit.encoder.layer[-2].output`` of older transformers is ``model.vit.layers.10`` in transformers 5).
    """

    camkit_task: ClassVar[str] = "classification"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_prefix_tokens = hf_prefix_tokens(model)
        self.num_suffix_tokens = _detection_tokens(model)
        self.camkit_auto_layer = _AUTO_LAYERS.get(type(model).__name__)
        self.camkit_preprocess: Preprocess | None = None

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(pixel_values=x).logits
        assert isinstance(logits, Tensor)
        return logits


class HFSegmenter(HFClassifier):
    """A transformers semantic segmentation model seen as ``pixel_values -> logits Tensor[B, C, H, W]`` at the
    input's size (bilinear upsampling of the model's logits, ``align_corners=False``)."""

    camkit_task: ClassVar[str] = "segmentation"

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(pixel_values=x).logits
        assert isinstance(logits, Tensor)
        if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class HFDetector(HFClassifier):
    """A transformers DETR-style detector (DETR, Conditional / Deformable DETR, YOLOS...) seen as torchvision's
    detection output: per image ``{"boxes", "scores", "labels"}`` for the queries scoring above ``score_thresh``.

    A query's score is its highest class probability (softmax over ``logits`` without the last, "no object",
    class); its box is ``pred_boxes`` (centre, size in [0, 1]) in input pixels.
    """

    camkit_task: ClassVar[str] = "detection"

    def __init__(self, model: nn.Module, score_thresh: float = 0.5) -> None:
        super().__init__(model)
        self.score_thresh = score_thresh

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:  # type: ignore[override]
        out = self.model(pixel_values=x)
        probs = out.logits.softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        cx, cy, w, h = out.pred_boxes.unbind(-1)
        height, width = x.shape[-2:]
        boxes = torch.stack(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], dim=-1
        )
        keep = scores > self.score_thresh
        return [
            {"boxes": boxes[i][keep[i]], "scores": scores[i][keep[i]], "labels": labels[i][keep[i]]}
            for i in range(x.shape[0])
        ]


HFModel = HFClassifier | HFSegmenter | HFDetector
"""The camkit views of transformers models (:class:`HFSegmenter` and :class:`HFDetector` subclass
:class:`HFClassifier`)."""
_VIEWS: dict[str, type[HFClassifier]] = {
    "classification": HFClassifier,
    "segmentation": HFSegmenter,
    "detection": HFDetector,
}


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return (int(value["shortest_edge"]), int(value["shortest_edge"]))
    if value is not None and hasattr(value, "height") and hasattr(value, "width"):  # transformers SizeDict
        h, w = getattr(value, "height", None), getattr(value, "width", None)
        if isinstance(h, int) and isinstance(w, int):
            return (h, w)
        edge = getattr(value, "shortest_edge", None)
        if isinstance(edge, int):
            return (edge, edge)
    return None


def _triple(value: object, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return default


def preprocess_of(processor: Any, config: Any) -> Preprocess:
    """camkit's :class:`~camkit.adapters.Preprocess` from a transformers image processor (None: from the config's
    ``image_size``, ImageNet mean/std)."""
    size = _pair(getattr(config, "image_size", None)) or (224, 224)
    if processor is None:
        return Preprocess(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    crop = (
        _pair(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    )
    size = crop or _pair(getattr(processor, "size", None)) or size
    if not getattr(processor, "do_normalize", True):
        return Preprocess(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    mean = _triple(getattr(processor, "image_mean", None), IMAGENET_MEAN)
    std = _triple(getattr(processor, "image_std", None), IMAGENET_STD)
    return Preprocess(size=size, mean=mean, std=std)


def labels_of(config: Any) -> list[str] | None:
    """The class names of ``config.id2label`` in class order, or None when it does not name every class."""
    id2label = getattr(config, "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        return None
    table = {int(k): str(v) for k, v in id2label.items()}
    if sorted(table) != list(range(len(table))):
        return None
    return [table[i] for i in range(len(table))]


def task_of(config: Any) -> tuple[str, str | None]:
    """The task of a transformers model from its config's first architecture, and that architecture.

    ``...ForImageClassification`` (or ``...WithTeacher``): classification; ``...ForSemanticSegmentation``:
    segmentation; ``...ForObjectDetection``: detection; a config naming no architecture: classification (None).

    Raises:
        CamkitError: the architecture is of none of these tasks.
    """
    archs = getattr(config, "architectures", None) or []
    if not archs:
        return "classification", None
    arch = str(archs[0])
    for suffix, task in _SUFFIXES:
        if arch.endswith(suffix):
            return task, arch
    raise CamkitError(
        f"{arch} is not a model camkit reads: it reads transformers image classifiers "
        "(...ForImageClassification), semantic segmentation (...ForSemanticSegmentation) and object detection "
        "(...ForObjectDetection) models; save one of those with save_pretrained"
    )


def _model_class(transformers: Any, task: str, arch: str | None) -> Any:
    """The transformers class that builds ``arch`` (the task's Auto class when none is named)."""
    named = getattr(transformers, arch, None) if arch else None
    if named is not None:
        return named
    return {
        "classification": transformers.AutoModelForImageClassification,
        "segmentation": transformers.AutoModelForSemanticSegmentation,
        "detection": transformers.AutoModelForObjectDetection,
    }[task]


def _hub_error(source: str, local: bool, err: OSError) -> CamkitError:
    if local:
        return CamkitError(f"hf:{source}: not a save_pretrained folder of a transformers model ({err})")
    return CamkitError(
        f"hf:{source}: could not get this hub model ({type(err).__name__}); a network is needed to download it: "
        "without one, pass a local folder written by save_pretrained (hf:PATH)"
    )


def _read(source: str, local: bool, pretrained: bool) -> tuple[nn.Module, Any, str]:
    """The transformers model (random weights from its config when not ``pretrained``), its image processor (None
    when there is none) and its task."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        task, arch = task_of(config)
        cls = _model_class(transformers, task, arch)
        if pretrained:
            model = cls.from_pretrained(source, local_files_only=local)
        elif hasattr(cls, "from_config"):  # an Auto class
            model = cls.from_config(config)
        else:
            model = cls._from_config(config)
    except CamkitError:
        raise
    except ValueError as err:
        raise CamkitError(
            f"hf:{source} is not a model transformers can load as an image classifier, a semantic segmentation "
            f"or an object detection model ({err})"
        ) from err
    except OSError as err:
        raise _hub_error(source, local, err) from err
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, KeyError):
        processor = None
    return model, processor, task


def load(
    source: str, pretrained: bool = True, device: str | Any = "cpu"
) -> tuple[HFClassifier, Preprocess, list[str] | None]:
    """A transformers vision model from a ``save_pretrained`` folder or a hub id.

    Args:
        source: a local folder (read offline) or a hub id such as ``google/vit-base-patch16-224`` (needs a network
            unless it is in the Hugging Face cache).
        pretrained: False: random weights from the model's config.
        device: where to put the model.

    Returns:
        (the model's view in eval mode: :class:`HFClassifier`, :class:`HFSegmenter` or :class:`HFDetector`, whose
        ``camkit_task`` is its task; its Preprocess; its class names or None).
    """
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise CamkitError("hf: models need the transformers library: pip install 'camkit[hf]'") from err
    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and (source.startswith((".", "/", "~")) or path.exists()):
        raise CamkitError(f"hf:{source}: no such folder; give a save_pretrained folder or a hub id")
    model, processor, task = _read(str(path) if local else source, local, pretrained)
    model = model.eval().to(device)
    view = _VIEWS[task](model).eval()
    view.camkit_preprocess = preprocess_of(processor, model.config)
    return view, view.camkit_preprocess, labels_of(model.config)
