"""Judge several methods on a set of images: the logic behind ``camkit evaluate``.

Images are processed in batches: one preprocessing, one shared forward + backward for all gradient methods
(:func:`camkit.compare`), then each metric sends the perturbed images of all steps and images of the batch to the
model in chunks (:mod:`camkit.metrics`). Two reference maps can be evaluated like methods: ``center`` (a centred
Gaussian blob, sigma = 1/4 of the side), ``random`` (seeded uniform noise on a grid of 1/32 of the side, upsampled:
as smooth as a CAM of a stride-32 network) and ``noise`` (seeded uniform noise per pixel).

Annotation files (optional; boxes in original-image pixels, ``x1``/``y1`` exclusive):

* camkit JSON: ``{"cat.jpg": {"class": 281, "boxes": [[x0, y0, x1, y1], ...]}, ...}``; ``class`` is an index
  or a class name (``"tabby cat"``) and is explained instead of the top-1; both keys are optional.
* COCO JSON (``images`` / ``annotations`` / ``categories``; ``bbox`` = ``[x, y, w, h]``): all boxes of an image;
  its class is the category name of the first annotation when the model knows that name, else the top-1.
* Pascal VOC XML (a file or a folder of them): ``<object><name>`` and ``<bndbox>`` (1-based inclusive
  ``xmin..xmax``, so x0 = xmin - 1, x1 = xmax).

Images are matched to annotations by file name.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from camkit.io import Preprocess, load_image

__all__ = [
    "BASELINES",
    "METRICS",
    "Annotation",
    "EvaluationResult",
    "collect_images",
    "evaluate",
    "read_annotations",
]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BASELINES = ("center", "random", "noise")
# metric name -> (per-image column(s), needs boxes, lower is better)
METRICS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "deletion": (("deletion",), False, True),
    "insertion": (("insertion",), False, False),
    "avg_drop": (("avg_drop",), False, True),
    "increase": (("increase",), False, False),
    "road": (("road_morf", "road_lerf"), False, True),
    "pointing": (("pointing",), True, False),
    "pointing_strict": (("pointing_strict",), True, False),
    "box": (("box_iou", "box_acc"), True, False),
    "maxboxacc": ((), True, False),
}
DEFAULT_METRICS = ("deletion", "insertion", "avg_drop", "increase")
BOX_METRICS = ("pointing", "pointing_strict", "box", "maxboxacc")


@dataclass
class Annotation:
    """Ground truth of one image: a class (index or name, or None = top-1) and boxes [x0, y0, x1, y1]."""

    cls: int | str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    strict_class: bool = True  # False: an unknown class name falls back to the top-1 (COCO/VOC vocabularies)


def _voc(path: Path) -> tuple[str, Annotation]:
    root = ET.parse(path).getroot()
    name = root.findtext("filename") or path.with_suffix(".jpg").name
    ann = Annotation(strict_class=False)
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        xmin, ymin, xmax, ymax = (float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
        ann.boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        if ann.cls is None:
            ann.cls = obj.findtext("name")
    return name, ann


def read_annotations(path: str | Path) -> dict[str, Annotation]:
    """Read a camkit JSON, COCO JSON, Pascal VOC XML file or a folder of VOC XML files (see the module doc).

    Returns:
        file name -> :class:`Annotation`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"annotation file not found: {str(p)!r}")
    if p.is_dir():
        xmls = sorted(p.glob("*.xml"))
        if not xmls:
            raise ValueError(f"no .xml annotation in folder {str(p)!r}")
        return dict(_voc(x) for x in xmls)
    if p.suffix.lower() == ".xml":
        return dict([_voc(p)])
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r} is not valid JSON ({err})") from err
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        cats = {c["id"]: c.get("name") for c in data.get("categories", [])}
        by_id = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
        out = {name: Annotation(strict_class=False) for name in by_id.values()}
        for a in data["annotations"]:
            if a.get("image_id") not in by_id or "bbox" not in a:
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            ann = out[by_id[a["image_id"]]]
            ann.boxes.append([x, y, x + w, y + h])
            if ann.cls is None:
                ann.cls = cats.get(a.get("category_id"))
        return out
    if not isinstance(data, dict):
        raise ValueError(f"{str(p)!r}: expected an object {{file name: {{class, boxes}}}} or a COCO file")
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"{str(p)!r}: the entry of {name!r} must be an object with 'class' and/or 'boxes'"
            )
        boxes = [[float(v) for v in b] for b in entry.get("boxes", [])]
        for b in boxes:
            if len(b) != 4 or b[2] < b[0] or b[3] < b[1]:
                raise ValueError(
                    f"{str(p)!r}: box {b} of {name!r} is not [x0, y0, x1, y1] with x1 >= x0, y1 >= y0"
                )
        out[Path(name).name] = Annotation(cls=entry.get("class"), boxes=boxes)
    return out


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
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        rows: one dict per (image, method): image, method, class, label, prob, and one column per metric.
        summary: method -> column -> mean over images (NaN values, e.g. images without boxes, left out).
        maxboxacc: method -> {"value", "iou_0.3", "iou_0.5", "iou_0.7"} over the images with boxes.
        columns: metric columns, in order.
        timing: seconds: ``total``, ``explain`` (the shared CAM passes), ``metric_forwards`` (model calls of the
            metrics), ``metric_images`` (images sent to the model by the metrics).
    """

    rows: list[dict[str, object]]
    summary: dict[str, dict[str, float]]
    maxboxacc: dict[str, dict[str, float]]
    columns: list[str]
    timing: dict[str, float]
    config: dict[str, object] = field(default_factory=dict)

    def to_csv(self, path: str | Path) -> None:
        keys = ["image", "method", "class", "label", "prob", *self.columns]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def to_json(self, path: str | Path) -> None:
        def clean(v: object) -> object:
            return None if isinstance(v, float) and math.isnan(v) else v

        data = {
            "config": self.config,
            "summary": {m: {k: clean(v) for k, v in d.items()} for m, d in self.summary.items()},
            "maxboxacc": self.maxboxacc,
            "timing": self.timing,
            "rows": [{k: clean(v) for k, v in r.items()} for r in self.rows],
        }
        Path(path).write_text(json.dumps(data, indent=2))


def _resolve_metrics(metrics: Sequence[str] | None, have_boxes: bool) -> list[str]:
    if metrics is None:
        return list(DEFAULT_METRICS) + (list(BOX_METRICS) if have_boxes else [])
    out = []
    for m in metrics:
        key = m.strip().lower().replace("-", "_")
        if key == "all":
            out.extend(k for k in METRICS if have_boxes or not METRICS[k][1])
            continue
        if key not in METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)} (or all)")
        if METRICS[key][1] and not have_boxes:
            raise ValueError(f"metric {m!r} needs ground-truth boxes: pass an annotation file with boxes")
        out.append(key)
    return list(dict.fromkeys(out))


def _class_indices(fwd_logits: Tensor, anns: list[Annotation | None], labels: Sequence[str] | None) -> Tensor:
    from camkit.targets import resolve_classes

    classes = fwd_logits.argmax(dim=1).cpu()
    for i, a in enumerate(anns):
        if a is None or a.cls is None:
            continue
        try:
            classes[i] = resolve_classes(a.cls, fwd_logits[i : i + 1].cpu(), labels)[0]  # type: ignore[index]
        except (ValueError, TypeError):
            if a.strict_class:
                raise
            warnings.warn(f"class {a.cls!r} is not a class of the model: explaining the top-1", stacklevel=3)
    return classes


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
    names = [n for n, _ in items]
    have_boxes = any(anns.get(n) is not None and anns[n].boxes for n in names)
    chosen = _resolve_metrics(metrics, have_boxes)
    method_list = [m.strip() for m in methods if m.strip()]
    if not method_list:
        raise ValueError("no method given")
    cam_methods = [get_method(m).name for m in method_list if m not in BASELINES]
    order = [m if m in BASELINES else get_method(m).name for m in method_list]
    order = list(dict.fromkeys(order))
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() first")
    pre = preprocess or Preprocess.for_model(model)
    device = model_device(model)
    fwd = Forward(model, batch_size)
    columns = [c for m in chosen for c in METRICS[m][0]]
    rows: list[dict[str, object]] = []
    curves: dict[str, list[Tensor]] = {m: [] for m in order}
    thresholds = torch.arange(0, 1, 0.01)
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
                maps = baseline_map(method, len(batch), tuple(x.shape[-2:]), seed=start).to(device)
            else:
                maps = expl[method].maps
            values: dict[str, Tensor] = {}
            if "deletion" in chosen:
                values["deletion"] = M.deletion(model, x, maps, classes, steps=steps, forward=fwd).auc
            if "insertion" in chosen:
                values["insertion"] = M.insertion(model, x, maps, classes, steps=steps, forward=fwd).auc
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
                acc = M.box_accuracy(maps, gt, threshold=box_threshold, image_sizes=sizes)
                values["box_iou"], values["box_acc"] = acc.iou, acc.correct
            if "maxboxacc" in chosen:
                curves[method].append(M.iou_curves(maps, gt, thresholds, image_sizes=sizes))
            for i, (name, _) in enumerate(batch):
                c = int(classes[i])
                row: dict[str, object] = {
                    "image": name,
                    "method": method,
                    "class": c,
                    "label": lab[c] if lab is not None else None,
                    "prob": round(float(probs[i]), 6),
                }
                for col in columns:
                    row[col] = float(values[col][i]) if col in values else float("nan")
                rows.append(row)
            done += len(batch)
            if progress is not None:
                progress(done, f"{method} on {name}")
    summary: dict[str, dict[str, float]] = {}
    for method in order:
        summary[method] = {}
        for col in columns:
            vals = [float(r[col]) for r in rows if r["method"] == method and not math.isnan(float(r[col]))]  # type: ignore[arg-type]
            summary[method][col] = sum(vals) / len(vals) if vals else float("nan")
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
    config = {
        "methods": order,
        "metrics": chosen,
        "layers": layers,
        "steps": steps,
        "box_threshold": box_threshold,
        "images": len(items),
    }
    return EvaluationResult(
        rows=rows, summary=summary, maxboxacc=mba, columns=columns, timing=timing, config=config
    )
