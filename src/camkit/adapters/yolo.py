"""Ultralytics YOLO models: ``yolo:PATH``.

:func:`load` builds a YOLO detection, instance-segmentation or classification model with the ``ultralytics``
package (the ``camkit[yolo]`` extra) from

* a model ``.yaml``: a local file, or one of the package's own configs by name (``yolov8n.yaml``,
  ``yolo11n.yaml``, ``yolov8n-seg.yaml``, ``yolov8n-cls.yaml``...), with random weights (nothing is downloaded);
* a local ``.pt`` checkpoint, read by ultralytics' loader with ``weights_only=True`` against its allow-list of
  model classes. A ``.pt`` name that is not a local file is refused: ultralytics would download it.

and returns it as

* :class:`YOLODetector` (detection and segmentation heads): the normalised batch in, the detections out as
  ``Tensor[B, D, 6]`` rows ``(x1, y1, x2, y2, score, class)`` in input pixels (the packed layout of
  :func:`camkit.core.outputs.pack_detections`, padded with class -1), after YOLO's own confidence threshold and
  per-class non-maximum suppression. The selection is done on detached values; the boxes and scores of the rows
  kept carry the graph, so :class:`~camkit.core.targets.DetectionTarget` explains one detection (its class score
  plus its IoU with the box) with any gradient method;
* :class:`YOLOClassifier` (classification heads): the **logits** of the ``Classify`` head (the model itself returns
  the softmax);

with its :class:`~camkit.adapters.Preprocess` (RGB in [0, 1], no mean or std, the whole image resized to a square
side that is a multiple of the model's stride) and its class names (the checkpoint's ``names``; a config of 80
classes gets COCO's names, shipped with ultralytics).

Both views keep the ultralytics model as the submodule ``model`` (the very object), so layer names read
``model.model.15``; ``layers="auto"`` takes the first input of a detection head (the finest neck map, stride 8,
which every detection's score reaches through the neck) and the input of a classification head.

Importing this module imports neither torch's extras nor ultralytics; :func:`load` imports ultralytics, with
``YOLO_OFFLINE=1`` set when unset so that it does not probe the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from camkit.adapters.preprocess import Preprocess
from camkit.errors import CamkitError

__all__ = ["DEFAULT_SIZE", "YOLOClassifier", "YOLODetector", "load", "yolo_head"]

DEFAULT_SIZE = 640  # YOLO's own input size


def yolo_head(model: nn.Module) -> nn.Module:
    """The last layer of an ultralytics model (its head: ``Detect``, ``Segment``, ``Classify``...)."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or len(layers) == 0:
        raise CamkitError(f"{type(model).__name__} is not an ultralytics YOLO model (no model.model layers)")
    return layers[-1]


def _head_input(model: nn.Module) -> str:
    """The name (under the view) of the layer feeding the head: its first input."""
    head = yolo_head(model)
    source = getattr(head, "f", -1)
    first = source[0] if isinstance(source, (list, tuple)) else source
    index = int(first) if int(first) >= 0 else int(getattr(head, "i", len(model.model) - 1)) + int(first)  # type: ignore[arg-type]
    return f"model.model.{index}"


class YOLODetector(nn.Module):
    """An ultralytics detection (or segmentation) model seen as ``x -> Tensor[B, D, 6]`` detections.

    Attributes:
        score_thresh: the confidence a detection must exceed (YOLO's ``conf``, 0.25);
            :func:`camkit.core.tasks.set_score_threshold` (``--det-threshold``) changes it.
        iou_thresh: the IoU of per-class non-maximum suppression (YOLO's ``iou``, 0.7).
        max_det: the most detections kept per image (300).
    """

    camkit_task = "detection"

    def __init__(
        self, model: nn.Module, score_thresh: float = 0.25, iou_thresh: float = 0.7, max_det: int = 300
    ) -> None:
        super().__init__()
        self.training = bool(
            model.training
        )  # the view's own flag follows the model; the model is not touched
        self.model = model
        self.score_thresh = score_thresh
        self.iou_thresh = iou_thresh
        self.max_det = max_det
        self.camkit_auto_layer = _head_input(model)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        pred = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(pred, (tuple, list)):  # Segment: (predictions, prototypes)
            pred = pred[0]
        head = yolo_head(self.model)
        nc = int(getattr(head, "nc", 0))
        if not isinstance(pred, Tensor) or pred.dim() != 3:
            raise CamkitError(
                f"unexpected YOLO output {type(pred).__name__}: expected Tensor[B, 4 + classes, N]"
            )
        if bool(getattr(head, "end2end", False)):
            rows = [self._end2end(p) for p in pred]
        else:
            rows = [self._select(p, nc, x.shape[-1], x.shape[-2]) for p in pred]
        return _pad(rows)

    def _select(self, pred: Tensor, nc: int, width: int, height: int) -> Tensor:
        """One image's ``[4 + nc (+ extra), N]`` predictions (centre x, y, width, height, class scores) -> kept rows,
        the boxes clipped to the image after the suppression (as ultralytics' predictor does)."""
        from torchvision.ops import batched_nms

        xywh, cls = pred[:4].T, pred[4 : 4 + nc].T
        score, label = cls.max(dim=1)
        keep = (score.detach() > self.score_thresh).nonzero()[:, 0]
        half = xywh[:, 2:] / 2
        boxes = torch.cat([xywh[:, :2] - half, xywh[:, :2] + half], dim=1)
        order = batched_nms(
            boxes[keep].detach().float(), score[keep].detach().float(), label[keep], self.iou_thresh
        )
        keep = keep[order[: self.max_det]]
        kept = torch.stack(
            [
                boxes[keep, 0].clamp(0, width),
                boxes[keep, 1].clamp(0, height),
                boxes[keep, 2].clamp(0, width),
                boxes[keep, 3].clamp(0, height),
            ],
            dim=1,
        )
        return torch.cat([kept, score[keep, None], label[keep, None].to(boxes.dtype)], dim=1)

    def _end2end(self, pred: Tensor) -> Tensor:
        """One image's end-to-end rows ``[K, 6 (+ extra)]`` (x1, y1, x2, y2, score, class): those above the threshold."""
        keep = pred[:, 4].detach() > self.score_thresh
        return pred[keep, :6][: self.max_det]


def _pad(rows: list[Tensor]) -> Tensor:
    most = max(max(r.shape[0] for r in rows), 1)
    padded = []
    for r in rows:
        pad = torch.zeros(most - r.shape[0], 6, dtype=r.dtype, device=r.device)
        pad[:, 5] = -1
        padded.append(torch.cat([r, pad], dim=0))
    return torch.stack(padded)


class YOLOClassifier(nn.Module):
    """An ultralytics classification model seen as ``x -> logits`` (the ``Classify`` head's linear output; the
    model itself returns ``(softmax, logits)`` in eval mode)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.training = bool(model.training)
        self.model = model
        self.camkit_auto_layer = _head_input(model)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        logits = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else out
        if not isinstance(logits, Tensor):
            raise CamkitError(f"unexpected YOLO classifier output {type(out).__name__}")
        return logits


def _import_ultralytics() -> Any:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics probes the network on import otherwise
    try:
        import ultralytics.nn.tasks as tasks
    except ImportError as err:
        raise CamkitError("yolo: models need the ultralytics package: pip install 'camkit[yolo]'") from err
    return tasks


def _from_yaml(tasks: Any, source: str) -> nn.Module:
    """A model with random weights from a config: a local file or one of the package's by name."""
    try:
        cfg = tasks.yaml_model_load(source)
    except (FileNotFoundError, OSError) as err:
        raise CamkitError(
            f"yolo:{source}: no such model config, neither a local file nor one of ultralytics' (yolov8n.yaml, "
            "yolo11n.yaml, yolov8n-seg.yaml, yolov8n-cls.yaml...)"
        ) from err
    task = tasks.guess_model_task(cfg)
    classes = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel}
    if task == "classify":
        return tasks.ClassificationModel(cfg, verbose=False)  # type: ignore[no-any-return]
    if task not in classes:
        raise CamkitError(
            f"yolo:{source} is a {task} model; camkit explains YOLO detect, segment and classify models"
        )
    return classes[task](cfg, verbose=False)  # type: ignore[no-any-return]


def _from_checkpoint(tasks: Any, source: str) -> nn.Module:
    path = Path(source).expanduser()
    if not path.is_file():
        raise CamkitError(
            f"yolo:{source} is not a local file; ultralytics would download it, which needs a network: give the "
            "path of a .pt file, or a model .yaml (yolo:yolov8n.yaml) for random weights"
        )
    try:
        ckpt, _ = tasks.torch_safe_load(str(path.resolve()), safe_only=True)
    except Exception as err:
        raise CamkitError(
            f"yolo:{source}: ultralytics could not read this checkpoint with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(model, nn.Module):
        raise CamkitError(
            f"yolo:{source} holds no model (a checkpoint saved by ultralytics has one under 'model')"
        )
    return model.float()


def _labels(tasks: Any, model: nn.Module) -> list[str] | None:
    names = getattr(model, "names", None)
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or sorted(names) != list(range(len(names))):
        return None
    labels = [str(names[i]) for i in range(len(names))]
    if labels == [str(i) for i in range(len(labels))] and len(labels) == 80:
        from ultralytics.utils import ROOT, YAML

        coco = YAML.load(Path(ROOT) / "cfg" / "datasets" / "coco.yaml")["names"]
        labels = [str(coco[i]) for i in range(80)]
    return labels


def load(
    source: str, device: str | torch.device = "cpu", input_size: int | None = None
) -> tuple[YOLODetector | YOLOClassifier, Preprocess, list[str] | None, str]:
    """A YOLO model from a model ``.yaml`` (random weights) or a local ``.pt`` checkpoint.

    Returns:
        (its :class:`YOLODetector` or :class:`YOLOClassifier` view in eval mode, its Preprocess, its class names or
        None, its task: ``"detection"`` or ``"classification"``).
    """
    tasks = _import_ultralytics()
    if source.lower().endswith((".yaml", ".yml")):
        model = _from_yaml(tasks, source)
    elif source.lower().endswith(".pt"):
        model = _from_checkpoint(tasks, source)
    else:
        raise CamkitError(f"yolo:{source}: give a model .yaml (random weights) or a .pt checkpoint")
    model = model.eval().to(device)
    stride = max(int(torch.as_tensor(getattr(model, "stride", 32)).max()), 32)
    side = input_size if input_size is not None else _checkpoint_size(model)
    side = max(stride, (side + stride - 1) // stride * stride)
    preprocess = Preprocess(size=(side, side), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    labels = _labels(tasks, model)
    if type(yolo_head(model)).__name__ == "Classify":
        return YOLOClassifier(model).eval(), preprocess, labels, "classification"
    return YOLODetector(model).eval(), preprocess, labels, "detection"


def _checkpoint_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    size = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    return int(size) if isinstance(size, int) else DEFAULT_SIZE
