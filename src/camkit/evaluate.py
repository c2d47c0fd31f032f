"""Judge several methods on a set of images: the logic behind ``camkit evaluate``.

Images are processed in batches: one preprocessing, one shared forward + backward for all gradient methods
(:func:`camkit.compare`), then each metric sends the perturbed images of all steps and images of the batch to the
model in chunks (:mod:`camkit.metrics`). Two reference maps can be evaluated like methods: ``center`` (a centred
Gaussian blob, sigma = 1/4 of the side), ``random`` (seeded uniform noise on a grid of 1/32 of the side, upsampled:
as smooth as a CAM of a stride-32 network) and ``noise`` (seeded uniform noise per pixel).

Ground truth (a class to explain and boxes per image, optional) comes from annotation files read by
:func:`camkit.io.annotations.read_annotations` (camkit JSON, COCO JSON, Pascal VOC XML), re-exported here.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from PIL import Image
from torch import Tensor, nn

from camkit.io import Preprocess, load_image
from camkit.io.annotations import Annotation, read_annotations

if TYPE_CHECKING:
    from camkit.metrics._common import Forward

__all__ = [
    "BASELINES",
    "METRICS",
    "Annotation",
    "EvaluationConfig",
    "EvaluationResult",
    "EvaluationRow",
    "Metric",
    "collect_images",
    "evaluate",
    "read_annotations",
]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BASELINES = ("center", "random", "noise")


class Metric(NamedTuple):
    """What a metric of :func:`evaluate` produces.

    Attributes:
        columns: its per-image column(s) in :attr:`EvaluationResult.rows` (none for ``maxboxacc``, a value
            over all images).
        needs_boxes: it compares the maps with ground-truth boxes.
        lower_is_better: a lower value means a better map.
    """

    columns: tuple[str, ...]
    needs_boxes: bool
    lower_is_better: bool


METRICS: dict[str, Metric] = {
    "deletion": Metric(("deletion",), False, True),
    "insertion": Metric(("insertion",), False, False),
    "avg_drop": Metric(("avg_drop",), False, True),
    "increase": Metric(("increase",), False, False),
    "road": Metric(("road_morf", "road_lerf"), False, True),
    "pointing": Metric(("pointing",), True, False),
    "pointing_strict": Metric(("pointing_strict",), True, False),
    "box": Metric(("box_iou", "box_acc"), True, False),
    "maxboxacc": Metric((), True, False),
}
DEFAULT_METRICS = ("deletion", "insertion", "avg_drop", "increase")
BOX_METRICS = ("pointing", "pointing_strict", "box", "maxboxacc")


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder contributes its image files, sorted, not recursively)."""
    files: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise ValueError(f"no image file in folder {str(p)!r}")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"image file not found: {str(p)!r}")
    return files


def baseline_map(name: str, n: int, size: tuple[int, int], seed: int = 0) -> Tensor:
    """Reference maps Tensor[n, H, W]: ``center`` (Gaussian, sigma = side / 4), ``random`` (smooth uniform noise)
    or ``noise`` (uniform per pixel). Per-pixel noise is an unfair deletion baseline: scattered zeroed pixels
    make an image the network never saw and its score collapses fast (measured: it scores better than Grad-CAM
    on deletion on the real photos), hence the smooth ``random``."""
    h, w = size
    if name == "center":
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        m = torch.exp(-(((xx - w / 2) / (w / 4)) ** 2 + ((yy - h / 2) / (h / 4)) ** 2) / 2)
        return m.expand(n, h, w).clone()
    if name == "random":
        # Smooth like a CAM: uniform noise on a grid of 1/32 of the side (7x7 at 224 px), upsampled bilinearly.
        gh, gw = max(1, round(h / 32)), max(1, round(w / 32))
        grid = torch.rand(n, 1, gh, gw, generator=torch.Generator().manual_seed(seed))
        return torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    if name == "noise":
        return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown baseline map {name!r}: {', '.join(BASELINES)}")


@dataclass
class EvaluationRow:
    """The scores of one method on one image.

    A row also reads like its CSV line: ``row["class"]``, ``row["deletion"]``.

    Attributes:
        image: the image's name.
        method: the method (or reference map) name.
        cls: the explained class index.
        label: its name when labels are known.
        prob: its softmax probability, rounded to 6 decimals.
        values: metric column -> value (NaN when it does not apply, e.g. a box metric on an image without boxes).
    """

    image: str
    method: str
    cls: int
    label: str | None
    prob: float
    values: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The CSV / JSON record: image, method, class, label, prob, then the metric columns."""
        return {
            "image": self.image,
            "method": self.method,
            "class": self.cls,
            "label": self.label,
            "prob": self.prob,
            **self.values,
        }

    def __getitem__(self, key: str) -> object:
        return self.to_dict()[key]


@dataclass
class EvaluationConfig:
    """The settings an :class:`EvaluationResult` was measured with (``config`` in evaluate.json)."""

    methods: list[str]
    metrics: list[str]
    layers: str
    steps: int
    box_threshold: float
    images: int


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        rows: one :class:`EvaluationRow` per (image, method), image by image.
        summary: method -> column -> mean over images (NaN values, e.g. images without boxes, left out).
        maxboxacc: method -> {"value", "iou_0.3", "iou_0.5", "iou_0.7"} over the images with boxes.
        columns: metric columns, in order.
        timing: seconds: ``total``, ``explain`` (the shared CAM passes), ``metric_forwards`` (model calls of the
            metrics), ``metric_images`` (images sent to the model by the metrics).
        config: the settings.
    """

    rows: list[EvaluationRow]
    summary: dict[str, dict[str, float]]
    maxboxacc: dict[str, dict[str, float]]
    columns: list[str]
    timing: dict[str, float]
    config: EvaluationConfig

    def to_csv(self, path: str | Path) -> None:
        """One line per row: image, method, class, label, prob and the metric columns."""
        keys = ["image", "method", "class", "label", "prob", *self.columns]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r.to_dict() for r in self.rows)

    def to_json(self, path: str | Path) -> None:
        """config, summary, maxboxacc, timing and rows; NaN written as null."""

        def clean(v: object) -> object:
            return None if isinstance(v, float) and math.isnan(v) else v

        data = {
            "config": asdict(self.config),
            "summary": {m: {k: clean(v) for k, v in d.items()} for m, d in self.summary.items()},
            "maxboxacc": self.maxboxacc,
            "timing": self.timing,
            "rows": [{k: clean(v) for k, v in r.to_dict().items()} for r in self.rows],
        }
        Path(path).write_text(json.dumps(data, indent=2))


def _resolve_metrics(metrics: Sequence[str] | None, have_boxes: bool) -> list[str]:
    if metrics is None:
        return list(DEFAULT_METRICS) + (list(BOX_METRICS) if have_boxes else [])
    out: list[str] = []
    for m in metrics:
        key = m.strip().lower().replace("-", "_")
        if key == "all":
            out.extend(k for k in METRICS if have_boxes or not METRICS[k].needs_boxes)
            continue
        if key not in METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)} (or all)")
        if METRICS[key].needs_boxes and not have_boxes:
            raise ValueError(f"metric {m!r} needs ground-truth boxes: pass an annotation file with boxes")
        out.append(key)
    return list(dict.fromkeys(out))


def _class_indices(fwd_logits: Tensor, anns: list[Annotation | None], labels: Sequence[str] | None) -> Tensor:
    """The top-1 of each image, or its annotated class (a class the model does not know: an error when
    the annotation is strict, else a warning and the top-1)."""
    from camkit.targets import resolve_classes

    classes = fwd_logits.argmax(dim=1).cpu()
    for i, a in enumerate(anns):
        if a is None or a.cls is None:
            continue
        try:
            resolved = resolve_classes(a.cls, fwd_logits[i : i + 1].cpu(), labels)
        except (ValueError, TypeError):
            if a.strict_class:
                raise
            warnings.warn(f"class {a.cls!r} is not a class of the model: explaining the top-1", stacklevel=3)
            continue
        assert resolved is not None  # a class index or name, never a callable
        classes[i] = resolved[0]
    return classes


@dataclass
class _Scorer:
    """Computes the chosen metrics of one batch of maps (the model calls go through ``forward``)."""

    model: nn.Module
    forward: Forward
    chosen: list[str]
    steps: int
    box_threshold: float
    thresholds: Tensor  # of the MaxBoxAccV2 IoU curves

    def __call__(
        self,
        x: Tensor,
        maps: Tensor,
        classes: Tensor,
        gt: list[list[list[float]]],
        sizes: list[tuple[int, int]],
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Metric column -> Tensor[B] of values, and the IoU curves of ``maxboxacc`` (None when not chosen)."""
        from camkit import metrics as M

        model, fwd, chosen = self.model, self.forward, self.chosen
        values: dict[str, Tensor] = {}
        if "deletion" in chosen:
            values["deletion"] = M.deletion(model, x, maps, classes, steps=self.steps, forward=fwd).auc
        if "insertion" in chosen:
            values["insertion"] = M.insertion(model, x, maps, classes, steps=self.steps, forward=fwd).auc
        if "avg_drop" in chosen or "increase" in chosen:
            cc = M.confidence_change(model, x, maps, classes, forward=fwd)
            values["avg_drop"], values["increase"] = cc.drop, cc.increase
        if "road" in chosen:
            values["road_morf"] = M.road(model, x, maps, classes, forward=fwd).mean_score
            values["road_lerf"] = M.road(model, x, maps, classes, order="lerf", forward=fwd).mean_score
        if "pointing" in chosen:
            values["pointing"] = M.pointing_game(maps, gt, image_sizes=sizes)
        if "pointing_strict" in chosen:
            values["pointing_strict"] = M.pointing_game(maps, gt, tolerance=0, image_sizes=sizes)
        if "box" in chosen:
            acc = M.box_accuracy(maps, gt, threshold=self.box_threshold, image_sizes=sizes)
            values["box_iou"], values["box_acc"] = acc.iou, acc.correct
        curves = M.iou_curves(maps, gt, self.thresholds, image_sizes=sizes) if "maxboxacc" in chosen else None
        return values, curves


def _means(rows: list[EvaluationRow], order: list[str], columns: list[str]) -> dict[str, dict[str, float]]:
    """method -> column -> mean over the rows of that method (NaN values left out; NaN when all are)."""
    summary: dict[str, dict[str, float]] = {}
    for method in order:
        summary[method] = {}
        for col in columns:
            vals = [r.values[col] for r in rows if r.method == method and not math.isnan(r.values[col])]
            summary[method][col] = sum(vals) / len(vals) if vals else float("nan")
    return summary


def evaluate(
    model: nn.Module,
    images: Sequence[str | Path | tuple[str, Image.Image]],
    methods: Sequence[str] = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"),
    metrics: Sequence[str] | None = None,
    annotations: dict[str, Annotation] | str | Path | None = None,
    *,
    preprocess: Preprocess | None = None,
    labels: Sequence[str] | None = None,
    layers: str = "auto",
    steps: int = 50,
    batch_size: int | None = None,
    images_per_batch: int = 8,
    box_threshold: float = 0.2,
    progress: Callable[[int, str], None] | None = None,
) -> EvaluationResult:
    """Evaluate methods (and the ``center``/``random`` reference maps) on images with the chosen metrics.

    Args:
        model: classifier in eval mode.
        images: paths, or (name, PIL image) pairs.
        methods: CAM method names and/or ``center``, ``random``; gradient methods share one pass per batch.
        metrics: names from :data:`METRICS` (default: deletion, insertion, avg_drop, increase, and the box
            metrics when boxes are given).
        annotations: a dict from :func:`read_annotations`, or its file.
        preprocess: model input preprocessing (default: the model's own).
        labels: class names (ImageNet's for 1000-class models by default).
        layers: target layer(s).
        steps: deletion/insertion steps.
        batch_size: images per model call in the metrics (default: 8 on CPU, 64 on GPU).
        images_per_batch: images explained together.
        box_threshold: map threshold (fraction of the max) of the box metrics.
        progress: called as ``progress(n_done, description)`` after each (batch, method).
    """
    from camkit import metrics as M
    from camkit.methods import get_method
    from camkit.metrics._common import Forward, model_device
    from camkit.pipeline import compare

    t_start = time.perf_counter()
    anns = read_annotations(annotations) if isinstance(annotations, (str, Path)) else (annotations or {})
    items: list[tuple[str, Path | Image.Image]] = [
        (it[0], it[1]) if isinstance(it, tuple) else (Path(it).name, Path(it)) for it in images
    ]
    if not items:
        raise ValueError("no images given")
    have_boxes = any(anns.get(n) is not None and anns[n].boxes for n, _ in items)
    chosen = _resolve_metrics(metrics, have_boxes)
    method_list = [m.strip() for m in methods if m.strip()]
    if not method_list:
        raise ValueError("no method given")
    cam_methods = [get_method(m).name for m in method_list if m not in BASELINES]
    order = list(dict.fromkeys(m if m in BASELINES else get_method(m).name for m in method_list))
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() first")
    pre = preprocess or Preprocess.for_model(model)
    device = model_device(model)
    fwd = Forward(model, batch_size)
    thresholds = torch.arange(0, 1, 0.01)
    score = _Scorer(model, fwd, chosen, steps, box_threshold, thresholds)
    columns = [c for m in chosen for c in METRICS[m].columns]
    rows: list[EvaluationRow] = []
    curves: dict[str, list[Tensor]] = {m: [] for m in order}
    t_explain = 0.0
    done = 0
    for start in range(0, len(items), images_per_batch):
        batch = items[start : start + images_per_batch]
        pils = [im if isinstance(im, Image.Image) else load_image(im) for _, im in batch]
        sizes = [im.size for im in pils]
        batch_anns = [anns.get(n) for n, _ in batch]
        x = pre(pils).to(device)
        logits = fwd(x)
        lab = labels
        if lab is None and logits.shape[1] == 1000:
            from camkit.io import imagenet_labels

            lab = imagenet_labels()
        classes = _class_indices(logits, batch_anns, lab).to(device)
        probs = torch.softmax(logits, dim=1).gather(1, classes[:, None])[:, 0]
        t0 = time.perf_counter()
        expl = (
            compare(model, x, methods=cam_methods, layers=layers, targets=classes.tolist(), labels=lab)
            if cam_methods
            else {}
        )
        t_explain += time.perf_counter() - t0
        gt = [a.boxes if a is not None else [] for a in batch_anns]
        for method in order:
            if method in BASELINES:
                size = (x.shape[-2], x.shape[-1])
                maps = baseline_map(method, len(batch), size, seed=start).to(device)
            else:
                maps = expl[method].maps
            values, iou = score(x, maps, classes, gt, sizes)
            if iou is not None:
                curves[method].append(iou)
            for i, (name, _) in enumerate(batch):
                c = int(classes[i])
                rows.append(
                    EvaluationRow(
                        image=name,
                        method=method,
                        cls=c,
                        label=lab[c] if lab is not None else None,
                        prob=round(float(probs[i]), 6),
                        values={
                            col: float(values[col][i]) if col in values else float("nan") for col in columns
                        },
                    )
                )
            done += len(batch)
            if progress is not None:
                progress(done, f"{method} on {batch[-1][0]}")
    summary = _means(rows, order, columns)
    mba: dict[str, dict[str, float]] = {}
    if "maxboxacc" in chosen:
        for method in order:
            res = M.max_box_acc_v2(torch.cat(curves[method]), thresholds)
            mba[method] = {"value": res.value} | {f"iou_{k}": v for k, v in res.per_iou.items()}
            summary[method]["maxboxacc"] = res.value
    timing = {
        "total": time.perf_counter() - t_start,
        "explain": t_explain,
        "metric_forwards": fwd.seconds,
        "metric_images": float(fwd.images),
    }
    config = EvaluationConfig(
        methods=order,
        metrics=chosen,
        layers=layers,
        steps=steps,
        box_threshold=box_threshold,
        images=len(items),
    )
    return EvaluationResult(
        rows=rows, summary=summary, maxboxacc=mba, columns=columns, timing=timing, config=config
    )
