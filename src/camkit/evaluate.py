"""Judge several methods on a set of images: the logic behind ``camkit evaluate``.

Images are processed in batches: one preprocessing, one shared forward + backward for all gradient methods
(:func:`camkit.compare`), then each metric sends the perturbed images of all steps and images of the batch to the
model in chunks (:mod:`camkit.metrics`). The per-image metrics of a batch are computed by :class:`MetricScorer`,
which ``camkit run`` (:class:`camkit.run.Explainer`) calls too: a run's store and :func:`evaluate` give the same
numbers for the same images and options. Two reference maps can be evaluated like methods: ``center`` (a centred
Gaussian blob, sigma = 1/4 of the side), ``random`` (seeded uniform noise on a grid of 1/32 of the side, upsampled:
as smooth as a CAM of a stride-32 network) and ``noise`` (seeded uniform noise per pixel).

Ground truth (a class to explain and boxes per image, optional) comes from annotation files read by
:func:`camkit.io.annotations.read_annotations` (camkit JSON, COCO JSON, Pascal VOC XML), re-exported here.
"""

from __future__ import annotations

import csv
import io
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

from camkit.adapters import Preprocess
from camkit.core.capture import check_eval
from camkit.errors import CamkitError
from camkit.io import load_image
from camkit.io.annotations import Annotation, fit_boxes, read_annotations
from camkit.io.files import atomic_write, write_json
from camkit.io.images import DEFAULT_MAX_PIXELS
from camkit.io.inputs import IMAGE_SUFFIXES, discover_images

if TYPE_CHECKING:
    from camkit.metrics._common import Forward

__all__ = [
    "BASELINES",
    "IOU_THRESHOLDS",
    "METRICS",
    "Annotation",
    "EvaluationConfig",
    "EvaluationResult",
    "EvaluationRow",
    "Metric",
    "MetricScorer",
    "Skipped",
    "collect_images",
    "evaluate",
    "probe_images",
    "read_annotations",
]

#: The image suffixes a folder is searched for (:data:`camkit.io.inputs.IMAGE_SUFFIXES`).
IMAGE_EXTENSIONS = IMAGE_SUFFIXES
BASELINES = ("center", "random", "noise")


class Skipped(NamedTuple):
    """An input :func:`evaluate` could not read and left out: its file and why."""

    file: str
    reason: str


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
#: The map thresholds of the MaxBoxAccV2 IoU curves (wsolevaluation's 0, 0.01, ..., 0.99).
IOU_THRESHOLDS: Tensor = torch.arange(0, 1, 0.01)
BOX_METRICS = ("pointing", "pointing_strict", "box", "maxboxacc")


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders: :func:`camkit.io.inputs.discover_images` (a folder's whole tree, in
    the one order every command uses, so an evaluation lists a folder's images as ``camkit run`` stores them)."""
    return discover_images(paths)


def probe_images(
    items: Sequence[tuple[str, Path | Image.Image]],
    annotations: dict[str, Annotation],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[list[tuple[str, Path | Image.Image]], dict[str, Annotation], list[Skipped]]:
    """Read each image's size (the header only for files) and fit the annotation boxes to it, before any model work.

    Args:
        items: (name, path or image) pairs.
        annotations: file name -> :class:`Annotation`.
        max_pixels: an image file with more pixels is left out (None: no limit), as :func:`load_image` would.

    Returns:
        the readable items, the annotations with boxes clipped to their image (:func:`fit_boxes`), and the
        files that could not be read.

    Raises:
        ValueError: a box lies outside its image (the message names the annotation file, box and image).
    """
    ok: list[tuple[str, Path | Image.Image]] = []
    skipped: list[Skipped] = []
    fitted = dict(annotations)
    for name, im in items:
        if isinstance(im, Image.Image):
            size = im.size
        else:
            try:
                with Image.open(im) as opened:
                    size = opened.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                skipped.append(Skipped(str(im), f"cannot read it as an image ({err})"))
                continue
            if max_pixels is not None and size[0] * size[1] > max_pixels:
                skipped.append(
                    Skipped(
                        str(im),
                        f"{size[0]}x{size[1]} pixels is more than the limit of {max_pixels} (--max-pixels)",
                    )
                )
                continue
        ok.append((name, im))
        ann = annotations.get(name)
        if ann is not None and ann.boxes:
            fitted[name] = fit_boxes(ann, size, name)
    return ok, fitted, skipped


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
    raise CamkitError(f"unknown baseline map {name!r}: {', '.join(BASELINES)}")


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
        summary: method -> column -> mean over images (NaN values left out: images without boxes do not count
            in the box metrics).
        maxboxacc: method -> {"value", "iou_0.3", "iou_0.5", "iou_0.7"} over the images with boxes.
        columns: metric columns, in order.
        timing: seconds: ``total``, ``explain`` (the shared CAM passes), ``metric_forwards`` (model calls of the
            metrics), ``metric_images`` (images sent to the model by the metrics).
        config: the settings.
        excluded: images left out of the box metrics (``pointing``, ``box``, ``maxboxacc``) because they have no
            ground-truth box; empty when no box metric was chosen.
        skipped: inputs that could not be read (file, reason); they are in no row.
    """

    rows: list[EvaluationRow]
    summary: dict[str, dict[str, float]]
    maxboxacc: dict[str, dict[str, float]]
    columns: list[str]
    timing: dict[str, float]
    config: EvaluationConfig
    excluded: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_csv(self, path: str | Path) -> None:
        """One line per row: image, method, class, label, prob and the metric columns; written atomically."""
        keys = ["image", "method", "class", "label", "prob", *self.columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.to_dict() for r in self.rows)
        with atomic_write(path, "w") as f:
            f.write(buf.getvalue())

    def to_dict(self) -> dict[str, object]:
        """config, summary, maxboxacc, the excluded and skipped inputs, timing and rows (NaN kept as float)."""
        return {
            "config": asdict(self.config),
            "summary": self.summary,
            "maxboxacc": self.maxboxacc,
            "excluded_from_box_metrics": {"count": len(self.excluded), "images": self.excluded},
            "skipped": [s._asdict() for s in self.skipped],
            "timing": self.timing,
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, path: str | Path) -> None:
        """:meth:`to_dict` as strict JSON (NaN written as null), atomically."""
        write_json(path, self.to_dict())


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
            raise CamkitError(f"unknown metric {m!r}; choose from {', '.join(METRICS)} (or all)")
        if METRICS[key].needs_boxes and not have_boxes:
            raise CamkitError(f"metric {m!r} needs ground-truth boxes: pass an annotation file with boxes")
        out.append(key)
    return list(dict.fromkeys(out))


def _class_indices(fwd_logits: Tensor, anns: list[Annotation | None], labels: Sequence[str] | None) -> Tensor:
    """The top-1 of each image, or its annotated class (a class the model does not know: an error when
    the annotation is strict, else a warning and the top-1)."""
    from camkit.core.targets import resolve_classes

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
class MetricScorer:
    """The per-image metrics of one batch of maps: the one computation behind both :func:`evaluate` and
    ``camkit run`` (:class:`camkit.run.Explainer`), so their numbers cannot drift apart.

    Attributes:
        model: the classifier (in eval mode).
        forward: how the perturbed images reach the model (:class:`camkit.metrics._common.Forward`, in chunks).
        chosen: metric names of :data:`METRICS` (``increase`` comes with ``avg_drop`` in one pass).
        steps: deletion/insertion steps.
        box_threshold: map threshold (fraction of the max) of ``box``.
        thresholds: the map thresholds of the ``maxboxacc`` IoU curves (:data:`IOU_THRESHOLDS`).
    """

    model: nn.Module
    forward: Forward
    chosen: list[str]
    steps: int
    box_threshold: float
    thresholds: Tensor = field(default_factory=lambda: IOU_THRESHOLDS.clone())

    def __call__(
        self,
        x: Tensor,
        maps: Tensor,
        classes: Tensor,
        gt: Sequence[Sequence[Sequence[float]]],
        sizes: list[tuple[int, int]],
        tick: Callable[[float, str], None] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Metric column -> Tensor[B] of values, and the IoU curves of ``maxboxacc`` (None when not chosen);
        ``tick(fraction done, metric)`` after each metric."""
        from camkit import metrics as M

        model, fwd, chosen = self.model, self.forward, self.chosen
        values: dict[str, Tensor] = {}
        # confidence_change gives avg_drop and increase at once
        parts = [m for m in chosen if m != "increase" or "avg_drop" not in chosen]
        finished = 0

        def step(what: str) -> None:
            nonlocal finished
            finished += 1
            if tick is not None:
                tick(finished / len(parts), what)

        if "deletion" in chosen:
            values["deletion"] = M.deletion(model, x, maps, classes, steps=self.steps, forward=fwd).auc
            step("deletion")
        if "insertion" in chosen:
            values["insertion"] = M.insertion(model, x, maps, classes, steps=self.steps, forward=fwd).auc
            step("insertion")
        if "avg_drop" in chosen or "increase" in chosen:
            cc = M.confidence_change(model, x, maps, classes, forward=fwd)
            values["avg_drop"], values["increase"] = cc.drop, cc.increase
            step("avg_drop")
        if "road" in chosen:
            values["road_morf"] = M.road(model, x, maps, classes, forward=fwd).mean_score
            values["road_lerf"] = M.road(model, x, maps, classes, order="lerf", forward=fwd).mean_score
            step("road")
        if "pointing" in chosen:
            values["pointing"] = M.pointing_game(maps, gt, image_sizes=sizes)
            step("pointing")
        if "pointing_strict" in chosen:
            values["pointing_strict"] = M.pointing_game(maps, gt, tolerance=0, image_sizes=sizes)
            step("pointing_strict")
        if "box" in chosen:
            acc = M.box_accuracy(maps, gt, threshold=self.box_threshold, image_sizes=sizes)
            values["box_iou"], values["box_acc"] = acc.iou, acc.correct
            step("box")
        curves = None
        if "maxboxacc" in chosen:
            curves = M.iou_curves(maps, gt, self.thresholds, image_sizes=sizes)
            step("maxboxacc")
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
    images: Sequence[str | Path | tuple[str, Path | Image.Image]],
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
    progress: Callable[[float, int, str], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> EvaluationResult:
    """Evaluate methods (and the ``center``/``random`` reference maps) on images with the chosen metrics.

    Before the model runs, the annotations are read and checked, every image's size is read and the boxes are
    fitted to it (:func:`probe_images`). An image file that cannot be read (there, or when it is decoded) is
    skipped and listed in :attr:`EvaluationResult.skipped`; when none can be read, a ValueError.

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
        progress: called as ``progress(done, total, description)``; the work is counted in (image, method)
            pairs, ``total`` = images x methods is the same in every call and ``done`` grows after each metric
            (fractions of a batch) up to ``total``, skipped images included.
        on_skip: called with each :class:`Skipped` input as it is found.
        max_pixels: image files with more pixels are skipped (decompression bombs); None: no limit.
    """
    from camkit import metrics as M
    from camkit.core.pipeline import compare
    from camkit.methods import get_method
    from camkit.methods.engine import PerturbationOptions
    from camkit.metrics._common import Forward, model_device

    t_start = time.perf_counter()
    anns = read_annotations(annotations) if isinstance(annotations, (str, Path)) else (annotations or {})
    given: list[tuple[str, Path | Image.Image]] = [
        (it[0], it[1]) if isinstance(it, tuple) else (Path(it).name, Path(it)) for it in images
    ]
    if not given:
        raise CamkitError("no images given")
    method_list = [m.strip() for m in methods if m.strip()]
    if not method_list:
        raise CamkitError("no method given")
    cam_methods = [get_method(m).name for m in method_list if m not in BASELINES]
    order = list(dict.fromkeys(m if m in BASELINES else get_method(m).name for m in method_list))
    check_eval(model, stacklevel=3)
    items, anns, skipped = probe_images(given, anns, max_pixels)
    have_boxes = any(anns.get(n) is not None and anns[n].boxes for n, _ in given)
    chosen = _resolve_metrics(metrics, have_boxes)
    total = len(given) * len(order)
    done = 0.0

    def skip(entry: Skipped) -> None:
        nonlocal done
        skipped.append(entry)
        if on_skip is not None:
            on_skip(entry)
        done += len(order)
        if progress is not None:
            progress(done, total, f"skipped {Path(entry.file).name}")

    unreadable, skipped = skipped, []
    for entry in unreadable:
        skip(entry)
    if not items:
        raise CamkitError(
            f"none of the {len(given)} image(s) could be read; first: {skipped[0].file} ({skipped[0].reason})"
        )
    if progress is not None:
        progress(done, total, "starting")
    pre = preprocess or Preprocess.for_model(model)
    device = model_device(model)
    fwd = Forward(model, batch_size)
    thresholds = IOU_THRESHOLDS.clone()
    score = MetricScorer(model, fwd, chosen, steps, box_threshold, thresholds)
    columns = [c for m in chosen for c in METRICS[m].columns]
    rows: list[EvaluationRow] = []
    curves: dict[str, list[Tensor]] = {m: [] for m in order}
    t_explain = 0.0
    evaluated: list[str] = []
    for start in range(0, len(items), images_per_batch):
        batch, pils = [], []
        for name, im in items[start : start + images_per_batch]:
            if isinstance(im, Image.Image):
                pils.append(im)
            else:
                try:
                    pils.append(load_image(im, max_pixels=max_pixels))
                except (ValueError, OSError, Image.DecompressionBombError) as err:
                    skip(Skipped(str(im), str(err)))
                    continue
            batch.append((name, im))
        if not batch:
            continue
        evaluated.extend(n for n, _ in batch)
        sizes = [im.size for im in pils]
        batch_anns = [anns.get(n) for n, _ in batch]
        x = pre(pils).to(device)
        logits = fwd(x)
        lab = labels
        if lab is None and logits.shape[1] == 1000:
            from camkit.adapters import imagenet_labels

            lab = imagenet_labels()
        classes = _class_indices(logits, batch_anns, lab).to(device)
        probs = torch.softmax(logits, dim=1).gather(1, classes[:, None])[:, 0]
        t0 = time.perf_counter()
        options = None
        if progress is not None and any(get_method(m).family == "perturbation" for m in cam_methods):
            # the forwards of the perturbation methods show in the description; the count stays in
            # (image, method) pairs, so the total never changes
            def forwards(d: int, t: int, at: float = done, last: str = batch[-1][0]) -> None:
                assert progress is not None
                progress(at, total, f"explaining up to {last}: {d}/{t} forwards")

            options = PerturbationOptions(progress=forwards)
        expl = (
            compare(
                model,
                x,
                methods=cam_methods,
                layers=layers,
                targets=classes.tolist(),
                labels=lab,
                perturbation=options,
            )
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
            step_start = done

            def tick(
                fraction: float,
                what: str,
                method: str = method,
                step_start: float = step_start,
                n: int = len(batch),
                last: str = batch[-1][0],
            ) -> None:
                if progress is not None:
                    progress(step_start + fraction * n, total, f"{method}: {what} on {last}")

            values, iou = score(x, maps, classes, gt, sizes, tick)
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
            done = step_start + len(batch)
            if progress is not None:
                progress(done, total, f"{method} on {batch[-1][0]}")
    if not evaluated:
        raise CamkitError(
            f"none of the {len(given)} image(s) could be read; first: {skipped[0].file} ({skipped[0].reason})"
        )
    summary = _means(rows, order, columns)
    mba: dict[str, dict[str, float]] = {}
    if "maxboxacc" in chosen:
        for method in order:
            res = M.max_box_acc_v2(torch.cat(curves[method]), thresholds)
            mba[method] = {"value": res.value} | {f"iou_{k}": v for k, v in res.per_iou.items()}
            summary[method]["maxboxacc"] = res.value
    excluded = (
        [n for n in evaluated if anns.get(n) is None or not anns[n].boxes]
        if any(METRICS[m].needs_boxes for m in chosen)
        else []
    )
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
        images=len(evaluated),
    )
    return EvaluationResult(
        rows=rows,
        summary=summary,
        maxboxacc=mba,
        columns=columns,
        timing=timing,
        config=config,
        excluded=excluded,
        skipped=skipped,
    )
