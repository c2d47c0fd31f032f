"""What a model does, told from its classes (no forward): :func:`model_task` (classification, torchvision's
segmentation or detection models), and :func:`detection_transform`, the resizing and normalising transform a
torchvision detection model runs inside. The preprocessing, the model zoo and the pipeline's default targets
(:mod:`camkit.core.tasks`) all ask here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

__all__ = ["detection_transform", "model_task"]


def model_task(model: object) -> str:
    """``"detection"`` (torchvision detection models: they resize and normalise inside), ``"segmentation"``
    (torchvision FCN / DeepLabV3 / LRASPP), else ``"classification"``. A model view that declares its task in a
    ``camkit_task`` attribute (:class:`camkit.adapters.yolo.YOLODetector`) has that task."""
    declared = getattr(model, "camkit_task", None)
    if isinstance(declared, str):
        return declared
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        from torchvision.models.segmentation import LRASPP
        from torchvision.models.segmentation._utils import _SimpleSegmentationModel
    except ImportError:  # pragma: no cover - torchvision without these modules
        return "classification"
    if isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
        return "detection"
    if isinstance(model, (_SimpleSegmentationModel, LRASPP)):
        return "segmentation"
    return "classification"


def detection_transform(model: nn.Module) -> GeneralizedRCNNTransform:
    """The resizing and normalising transform a torchvision detection model runs inside (``model.transform``)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    t = getattr(model, "transform", None)
    if not isinstance(t, GeneralizedRCNNTransform):
        raise TypeError(
            f"{type(model).__name__} is not a torchvision detection model (no GeneralizedRCNNTransform)"
        )
    return t
