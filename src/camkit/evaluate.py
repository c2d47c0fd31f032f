"""Judge several methods on a set of images: the logic behind ``camkit evaluate``.

Images are processed in batches: one preprocessing and one clean forward, one shared forward + backward for all
gradient methods (:func:`camkit.compare`), then deletion and insertion of every method's maps together
(:func:`joint_scores`: one stream of chunks of perturbed images, the curves' ends scored once per image, the clean
forward reused), and each other metric method by method (:mod:`camkit.metrics`). The per-image metrics of a batch are computed by :class:`MetricScorer`
(the dispatcher of the metric registry, :mod:`camkit.metrics.registry`), which ``camkit run``
(:class:`camkit.run.Explainer`) and ``camkit report`` call too: a run's store and :func:`evaluate` give the same
numbers for the same images and options.

:func:`evaluate` is :func:`plan_evaluation` (arguments checked, annotations read, image sizes probed, before any
model work), :func:`iter_evaluate` (one :class:`BatchResult` per batch of images, as they are done) and
:func:`summarize` (the means over the rows, MaxBoxAccV2 over the data set, the timing). Two reference maps can be evaluated like methods: ``center`` (a centred
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor, nn

from camkit.adapters import Preprocess, imagenet_labels
from camkit.core.accel import Compile, check_compile, one_lookup
from camkit.core.capture import check_eval
from camkit.core.explanation import Explanation
from camkit.core.outputs import model_device
from camkit.core.pipeline import compare
from camkit.core.targets import resolve_classes
from camkit.core.tasks import model_task
from camkit.errors import CamkitError
from camkit.io import load_image
from camkit.io.annotations import Annotation, fit_boxes, read_annotations
from camkit.io.files import atomic_write, write_json
from camkit.io.images import DEFAULT_MAX_PIXELS
from camkit.io.inputs import IMAGE_SUFFIXES, discover_images
from camkit.methods import get_method
from camkit.methods.engine import PerturbationOptions
from camkit.metrics import Forward, max_box_acc_v2
from camkit.metrics.faithfulness import deletion_insertion
from camkit.metrics.randomisation import Explainer
from camkit.metrics.registry import (
    DEFAULT_METRICS,
    IOU_THRESHOLDS,
    METRICS,
    Metric,
    MetricScorer,
    metric_columns,
    metric_of,
    resolve_metrics,
)

__all__ = [
    "BASELINES",
    "DEFAULT_METRICS",
    "IOU_THRESHOLDS",
    "JOINT",
    "METRICS",
    "Annotation",
    "BatchResult",
    "EvaluationConfig",
    "EvaluationPlan",
    "EvaluationResult",
    "EvaluationRow",
    "Metric",
    "MetricScorer",
    "Skipped",
    "collect_images",
    "evaluate",
    "iter_evaluate",
    "joint_scores",
    "plan_evaluation",
    "probe_images",
    "read_annotations",
    "summarize",
]

#: The image suffixes a folder is searched for (:data:`camkit.io.inputs.IMAGE_SUFFIXES`).
IMAGE_EXTENSIONS = IMAGE_SUFFIXES
BASELINES = ("center", "random", "noise")
#: The metrics that compare maps with ground-truth boxes.
BOX_METRICS = tuple(name for name, metric in METRICS.items() if metric.needs_boxes)

#: The image files of paths and folders, in the one order of every command (:func:`camkit.io.inputs.discover_images`).
collect_images = discover_images


class Skipped(NamedTuple):
    """An input :func:`evaluate` could not read and left out: its file and why."""

    file: str
    reason: str


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
        iou_curves: method -> image -> its IoU curve (the best box's IoU at map thresholds 0, 0.01, ..., 0.99),
            for the images with boxes (``maxboxacc`` only; else empty): what MaxBoxAccV2 is computed from, kept
            so that it can be recomputed on a subset or a resample of the images.
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
    iou_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)

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
        """config, summary, maxboxacc, the excluded and skipped inputs, timing, rows (NaN kept as float) and
        the per-image IoU curves (4 decimals)."""
        return {
            "config": asdict(self.config),
            "summary": self.summary,
            "maxboxacc": self.maxboxacc,
            "iou_curves": self.iou_curves,
            "excluded_from_box_metrics": {"count": len(self.excluded), "images": self.excluded},
            "skipped": [s._asdict() for s in self.skipped],
            "timing": self.timing,
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, path: str | Path) -> None:
        """:meth:`to_dict` as strict JSON (NaN written as null), atomically."""
        write_json(path, self.to_dict())


def _means(rows: list[EvaluationRow], order: list[str], columns: list[str]) -> dict[str, dict[str, float]]:
    """method -> column -> mean over the rows of that method (NaN values left out; NaN when all are)."""
    summary: dict[str, dict[str, float]] = {}
    for method in order:
        summary[method] = {}
        for col in columns:
            vals = [r.values[col] for r in rows if r.method == method and not math.isnan(r.values[col])]
            summary[method][col] = sum(vals) / len(vals) if vals else float("nan")
    return summary


def _class_indices(fwd_logits: Tensor, anns: list[Annotation | None], labels: Sequence[str] | None) -> Tensor:
    """The top-1 of each image, or its annotated class (a class the model does not know: an error when
    the annotation is strict, else a warning and the top-1)."""
    classes = fwd_logits.argmax(dim=1).cpu()
    for i, a in enumerate(anns):
        if a is None or a.cls is None:
            continue
        try:
            resolved = resolve_classes(a.cls, fwd_logits[i : i + 1].cpu(), labels)
        except (ValueError, TypeError):
            if a.strict_class:
                raise
            warnings.warn(f"class {a.cls!r} is not a class of the model: explaining the top-1", stacklevel=6)
            continue
        assert resolved is not None  # a class index or name, never a callable
        classes[i] = resolved[0]
    return classes


@dataclass(frozen=True)
class EvaluationPlan:
    """What :func:`plan_evaluation` resolved before any model work; :func:`iter_evaluate` and :func:`summarize`
    read it.

    Attributes:
        model: the classifier (in eval mode).
        items: the readable (name, path or image) pairs, in order.
        annotations: file name -> :class:`Annotation`, boxes fitted to their image.
        unreadable: the inputs whose header could not be read (or over the pixel limit).
        given: the number of inputs given (readable or not).
        order: the methods and reference maps evaluated, canonical names, in order.
        cam_methods: the CAM methods among them (explained in one :func:`camkit.compare` per batch).
        chosen: the metric names (:data:`METRICS`).
        columns: their per-image columns, in order.
        preprocess: the model input preprocessing.
        labels: class names (None: ImageNet's for a 1000-class model, else none).
        layers: target layer(s).
        steps: deletion/insertion steps.
        box_threshold: map threshold (fraction of the max) of the box metrics.
        images_per_batch: images explained together.
        max_pixels: image files with more pixels are skipped; None: no limit.
        forward: the counted, chunked model calls of the metrics.
        scorer: the metrics of one batch of maps.
        started: :func:`time.perf_counter` when the plan was made (the start of ``timing["total"]``).
    """

    model: nn.Module
    items: list[tuple[str, Path | Image.Image]]
    annotations: dict[str, Annotation]
    unreadable: list[Skipped]
    given: int
    order: list[str]
    cam_methods: list[str]
    chosen: list[str]
    columns: list[str]
    preprocess: Preprocess
    labels: Sequence[str] | None
    layers: str
    steps: int
    box_threshold: float
    images_per_batch: int
    max_pixels: int | None
    forward: Forward
    scorer: MetricScorer
    started: float

    @property
    def total(self) -> int:
        """The work counted by ``progress``: (image, method) pairs, unreadable images included."""
        return self.given * len(self.order)


@dataclass(frozen=True)
class BatchResult:
    """What :func:`iter_evaluate` measured on one batch of images.

    Attributes:
        rows: one :class:`EvaluationRow` per (image, method), image by image within each method.
        curves: method -> the IoU curves of the batch's images, Tensor[B, T] (``maxboxacc`` only; else empty).
        images: the names of the batch's images that were evaluated.
        skipped: the batch's images that could not be decoded.
        explain_seconds: the time of the batch's shared CAM passes.
    """

    rows: list[EvaluationRow]
    curves: dict[str, Tensor]
    images: list[str]
    skipped: list[Skipped]
    explain_seconds: float


def _given(
    images: Sequence[str | Path | tuple[str, Path | Image.Image]],
) -> list[tuple[str, Path | Image.Image]]:
    given: list[tuple[str, Path | Image.Image]] = [
        (it[0], it[1]) if isinstance(it, tuple) else (Path(it).name, Path(it)) for it in images
    ]
    if not given:
        raise CamkitError("no images given")
    return given


def _method_order(methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """The methods and reference maps in order (canonical names, no repeats), and the CAM methods among them."""
    method_list = [m.strip() for m in methods if m.strip()]
    if not method_list:
        raise CamkitError("no method given")
    cam_methods = [get_method(m).name for m in method_list if m not in BASELINES]
    order = list(dict.fromkeys(m if m in BASELINES else get_method(m).name for m in method_list))
    return order, cam_methods


def plan_evaluation(
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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    compile: Compile = False,
) -> EvaluationPlan:
    """Check the arguments, read the annotations and probe every image's size (:func:`probe_images`) before any
    model work. The arguments are those of :func:`evaluate`.

    Raises:
        CamkitError: a segmentation or detection model, no image, no method, an unknown method or metric, a box
            metric without boxes, a box outside its image.
    """
    started = time.perf_counter()
    task = model_task(model)
    if task != "classification":
        raise CamkitError(
            f"camkit evaluate scores the maps of classifiers (its metrics follow one class's score); this is a "
            f"{task} model: explain it with `camkit explain` or camkit.explain"
        )
    anns = read_annotations(annotations) if isinstance(annotations, (str, Path)) else (annotations or {})
    given = _given(images)
    order, cam_methods = _method_order(methods)
    check_eval(model, stacklevel=4)
    items, anns, unreadable = probe_images(given, anns, max_pixels)
    have_boxes = any(anns.get(n) is not None and anns[n].boxes for n, _ in given)
    chosen = resolve_metrics(metrics, have_boxes)
    check_compile(compile)
    fwd = Forward(model, batch_size, compile=compile)
    return EvaluationPlan(
        model=model,
        items=items,
        annotations=anns,
        unreadable=unreadable,
        given=len(given),
        order=order,
        cam_methods=cam_methods,
        chosen=chosen,
        columns=[c for m in chosen for c in metric_columns(m)],
        preprocess=preprocess or Preprocess.for_model(model),
        labels=labels,
        layers=layers,
        steps=steps,
        box_threshold=box_threshold,
        images_per_batch=images_per_batch,
        max_pixels=max_pixels,
        forward=fwd,
        scorer=MetricScorer(model, fwd, chosen, steps, box_threshold, IOU_THRESHOLDS.clone()),
        started=started,
    )


@dataclass
class _Progress:
    """The ``progress`` callback of :func:`evaluate` and the work done so far, in (image, method) pairs."""

    callback: Callable[[float, int, str], None] | None
    total: int
    done: float = 0.0

    def report(self, done: float, description: str) -> None:
        self.done = done
        if self.callback is not None:
            self.callback(done, self.total, description)

    def tick(self, start: float, method: str, n: int, last: str, fraction: float, what: str) -> None:
        """After each metric of one method on a batch of ``n`` images (``done`` moves at the method's end)."""
        if self.callback is not None:
            self.callback(start + fraction * n, self.total, f"{method}: {what} on {last}")

    def forwards(self, at: float, last: str, done: int, total: int) -> None:
        """The forwards of the perturbation methods, in the description; the count stays in (image, method)
        pairs, so the total never changes."""
        if self.callback is not None:
            self.callback(at, self.total, f"explaining up to {last}: {done}/{total} forwards")


def _skip(
    entry: Skipped, per_image: int, track: _Progress, on_skip: Callable[[Skipped], None] | None
) -> None:
    if on_skip is not None:
        on_skip(entry)
    track.report(track.done + per_image, f"skipped {Path(entry.file).name}")


def _none_read(given: int, skipped: Sequence[Skipped]) -> CamkitError:
    first = skipped[0]
    return CamkitError(f"none of the {given} image(s) could be read; first: {first.file} ({first.reason})")


def _read_batch(
    plan: EvaluationPlan,
    chunk: Sequence[tuple[str, Path | Image.Image]],
    track: _Progress,
    on_skip: Callable[[Skipped], None] | None,
) -> tuple[list[tuple[str, Image.Image]], list[Skipped]]:
    """The batch's images decoded (name, RGB image), and those that could not be."""
    pictures: list[tuple[str, Image.Image]] = []
    skipped: list[Skipped] = []
    for name, im in chunk:
        if isinstance(im, Image.Image):
            pictures.append((name, im))
            continue
        try:
            pictures.append((name, load_image(im, max_pixels=plan.max_pixels)))
        except (ValueError, OSError, Image.DecompressionBombError) as err:
            skipped.append(Skipped(str(im), str(err)))
            _skip(skipped[-1], len(plan.order), track, on_skip)
    return pictures, skipped


def _explain(
    plan: EvaluationPlan,
    x: Tensor,
    classes: Tensor,
    labels: Sequence[str] | None,
    track: _Progress,
    last: str,
) -> dict[str, Explanation]:
    """The batch's CAM methods, in one :func:`camkit.compare` on the model as given (``accelerate=False``): the
    metrics rank pixels by the map, and the prepared copy's rounding-level differences reorder near-equal pixels
    (deletion and insertion areas move by up to 2e-4), so the scores are those of the user's model's own maps."""
    if not plan.cam_methods:
        return {}
    options = None
    if track.callback is not None and any(get_method(m).family == "perturbation" for m in plan.cam_methods):
        options = PerturbationOptions(progress=partial(track.forwards, track.done, last))
    return compare(
        plan.model,
        x,
        methods=plan.cam_methods,
        layers=plan.layers,
        targets=classes.tolist(),
        labels=labels,
        perturbation=options,
        accelerate=False,
    )


def _remap(plan: EvaluationPlan, method: str, classes: Tensor, maps: Tensor) -> Callable[[Tensor], Tensor]:
    """The method's maps of other inputs for the same classes (the ``arcc`` metric's coherency); a baseline map
    does not depend on the input, so it is its own."""
    if method in BASELINES:
        return lambda _x: maps
    targets = classes.tolist()
    return lambda x: (
        compare(plan.model, x, methods=[method], layers=plan.layers, targets=targets, accelerate=False)[
            method
        ].maps
    )


def _explainer(plan: EvaluationPlan, method: str, maps: Tensor) -> Explainer:
    """The method's maps for any model, inputs and classes (``random_logit``, ``mprt``); a baseline map depends
    on neither, so it is its own."""
    if method in BASELINES:
        return lambda _model, _x, _classes: maps
    return lambda model, x, classes: (
        compare(model, x, [method], plan.layers, classes.tolist(), accelerate=False)[method].maps
    )


def _rows(
    names: Sequence[str],
    method: str,
    classes: Tensor,
    probs: Tensor,
    labels: Sequence[str] | None,
    values: dict[str, Tensor],
    columns: Sequence[str],
) -> list[EvaluationRow]:
    rows = []
    for i, name in enumerate(names):
        c = int(classes[i])
        rows.append(
            EvaluationRow(
                image=name,
                method=method,
                cls=c,
                label=labels[c] if labels is not None else None,
                prob=round(float(probs[i]), 6),
                values={col: float(values[col][i]) if col in values else float("nan") for col in columns},
            )
        )
    return rows


#: The metrics :func:`_evaluate_batch` computes for every map of a batch together
#: (:func:`camkit.metrics.faithfulness.deletion_insertion`).
JOINT = ("deletion", "insertion")


def joint_scores(
    model: nn.Module,
    forward: Forward,
    x: Tensor,
    maps: dict[str, Tensor],
    classes: Tensor,
    chosen: Sequence[str],
    steps: int,
    clean: Tensor | None = None,
) -> dict[str, dict[str, Tensor]]:
    """method -> column -> Tensor[B] of the chosen :data:`JOINT` metrics (deletion, insertion): every map of the
    batch in one stream of model calls (:func:`camkit.metrics.faithfulness.deletion_insertion`), reusing the
    batch's clean forward ``clean`` when given (the logits of ``forward`` on ``x``). ``camkit evaluate`` and
    ``camkit run`` both score so: the same numbers for the same batches."""
    wanted = [m for m in JOINT if m in chosen]
    if not wanted:
        return {}
    curves = deletion_insertion(model, x, maps, classes, steps, forward=forward, clean=clean)
    return {
        method: {name: curve.auc for name, curve in zip(JOINT, pair, strict=True) if name in wanted}
        for method, pair in curves.items()
    }


def _batch_maps(
    plan: EvaluationPlan, x: Tensor, expl: dict[str, Explanation], start: int
) -> dict[str, Tensor]:
    """method -> the batch's maps: the CAM methods' and the reference maps (seeded by the batch's start)."""
    n, device = x.shape[0], x.device
    return {
        method: (
            baseline_map(method, n, (x.shape[-2], x.shape[-1]), seed=start).to(device)
            if method in BASELINES
            else expl[method].maps
        )
        for method in plan.order
    }


def _score_methods(
    plan: EvaluationPlan,
    x: Tensor,
    maps: dict[str, Tensor],
    classes: Tensor,
    logits: Tensor,
    names: Sequence[str],
    batch_anns: Sequence[Annotation | None],
    sizes: Sequence[tuple[int, int]],
    track: _Progress,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """method -> metric column -> Tensor[B], and the IoU curves of ``maxboxacc``: deletion and insertion of all
    methods together (:func:`_joint_curves`), the other metrics method by method (:class:`MetricScorer`)."""
    joint = joint_scores(plan.model, plan.forward, x, maps, classes, plan.chosen, plan.steps, logits)
    rest = [m for m in plan.chosen if m not in JOINT]
    scorer = MetricScorer(
        plan.model, plan.forward, rest, plan.steps, plan.box_threshold, plan.scorer.thresholds
    )
    gt = [a.boxes if a is not None else [] for a in batch_anns]
    shared = len(plan.chosen) - len(rest)
    out: dict[str, dict[str, Tensor]] = {}
    curves: dict[str, Tensor] = {}
    for method in plan.order:
        at = track.done
        tick = partial(track.tick, at, method, len(names), names[-1])
        values = dict(joint.get(method, {}))
        for k, name in enumerate(values, 1):
            tick(k / len(plan.chosen), name)
        if rest:
            part = partial(_part_tick, tick, shared, len(plan.chosen))
            remap, again = _remap(plan, method, classes, maps[method]), _explainer(plan, method, maps[method])
            more, iou = scorer(x, maps[method], classes, gt, sizes, part, remap, again)
            values.update(more)
            if iou is not None:
                curves[method] = iou
        out[method] = values
        track.report(at + len(names), f"{method} on {names[-1]}")
    return out, curves


def _part_tick(
    tick: Callable[[float, str], None], shared: int, total: int, fraction: float, what: str
) -> None:
    """The scorer's ``tick`` of the metrics after the shared ones, as a fraction of all the chosen metrics."""
    tick((shared + fraction * (total - shared)) / total, what)


def _evaluate_batch(
    plan: EvaluationPlan, start: int, track: _Progress, on_skip: Callable[[Skipped], None] | None
) -> BatchResult:
    """Explain and score the batch of images that starts at item ``start``."""
    pictures, skipped = _read_batch(plan, plan.items[start : start + plan.images_per_batch], track, on_skip)
    if not pictures:
        return BatchResult([], {}, [], skipped, 0.0)
    names = [n for n, _ in pictures]
    batch_anns = [plan.annotations.get(n) for n in names]
    device = model_device(plan.model)
    x = plan.preprocess([im for _, im in pictures]).to(device)
    logits = plan.forward(x)
    labels = plan.labels
    if labels is None and logits.shape[1] == 1000:
        labels = imagenet_labels()
    classes = _class_indices(logits, batch_anns, labels).to(device)
    probs = torch.softmax(logits, dim=1).gather(1, classes[:, None])[:, 0]
    t0 = time.perf_counter()
    expl = _explain(plan, x, classes, labels, track, names[-1])
    seconds = time.perf_counter() - t0
    maps = _batch_maps(plan, x, expl, start)
    sizes = [im.size for _, im in pictures]
    values, curves = _score_methods(plan, x, maps, classes, logits, names, batch_anns, sizes, track)
    rows: list[EvaluationRow] = []
    for method in plan.order:
        rows.extend(_rows(names, method, classes, probs, labels, values[method], plan.columns))
    return BatchResult(rows, curves, names, skipped, seconds)


def iter_evaluate(
    plan: EvaluationPlan,
    progress: Callable[[float, int, str], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
) -> Iterator[BatchResult]:
    """Evaluate the plan's images batch by batch: one :class:`BatchResult` per batch of images, as it is done.

    Args:
        plan: from :func:`plan_evaluation`.
        progress: called as ``progress(done, total, description)`` (see :func:`evaluate`).
        on_skip: called with each :class:`Skipped` input as it is found (the unreadable ones of the plan first).

    Raises:
        CamkitError: none of the images could be read by :func:`probe_images`.
    """
    track = _Progress(progress, plan.total)
    for entry in plan.unreadable:
        _skip(entry, len(plan.order), track, on_skip)
    if not plan.items:
        raise _none_read(plan.given, plan.unreadable)
    track.report(track.done, "starting")
    for start in range(0, len(plan.items), plan.images_per_batch):
        with one_lookup(plan.model):  # the model's prepared-copy cache checked once per batch, not per chunk
            batch = _evaluate_batch(plan, start, track, on_skip)
        yield batch


def _maxboxacc(curves: dict[str, list[Tensor]]) -> dict[str, dict[str, float]]:
    """method -> {"value", "iou_0.3", "iou_0.5", "iou_0.7"}: MaxBoxAccV2 of the IoU curves of all images."""
    out: dict[str, dict[str, float]] = {}
    for method, parts in curves.items():
        res = max_box_acc_v2(torch.cat(parts), IOU_THRESHOLDS)
        out[method] = {"value": res.value} | {f"iou_{k}": v for k, v in res.per_iou.items()}
    return out


def _per_image(names: list[str], curves: dict[str, list[Tensor]]) -> dict[str, dict[str, list[float]]]:
    """method -> image -> IoU curve (4 decimals), the images without boxes (NaN rows) left out."""
    out: dict[str, dict[str, list[float]]] = {}
    for method, parts in curves.items():
        if not parts:
            continue
        rows = torch.cat(parts)
        out[method] = {
            n: [round(float(v), 4) for v in row]
            for n, row in zip(names, rows, strict=True)
            if not bool(row.isnan().any())
        }
    return out


def summarize(plan: EvaluationPlan, batches: Iterable[BatchResult]) -> EvaluationResult:
    """The :class:`EvaluationResult` of a plan's batches (from :func:`iter_evaluate`), consumed here.

    Raises:
        CamkitError: no image could be read.
    """
    rows: list[EvaluationRow] = []
    evaluated: list[str] = []
    skipped = list(plan.unreadable)
    curves: dict[str, list[Tensor]] = {m: [] for m in plan.order}
    t_explain = 0.0
    for batch in batches:
        rows += batch.rows
        evaluated += batch.images
        skipped += batch.skipped
        t_explain += batch.explain_seconds
        for method, iou in batch.curves.items():
            curves[method].append(iou)
    if not evaluated:
        raise _none_read(plan.given, skipped)
    summary = _means(rows, plan.order, plan.columns)
    mba = _maxboxacc(curves) if "maxboxacc" in plan.chosen else {}
    for method, values in mba.items():
        summary[method]["maxboxacc"] = values["value"]
    boxed = any(metric_of(m).needs_boxes for m in plan.chosen)
    anns = plan.annotations
    timing = {
        "total": time.perf_counter() - plan.started,
        "explain": t_explain,
        "metric_forwards": plan.forward.seconds,
        "metric_images": float(plan.forward.images),
    }
    return EvaluationResult(
        rows=rows,
        summary=summary,
        maxboxacc=mba,
        columns=list(plan.columns),
        timing=timing,
        config=EvaluationConfig(
            methods=plan.order,
            metrics=plan.chosen,
            layers=plan.layers,
            steps=plan.steps,
            box_threshold=plan.box_threshold,
            images=len(evaluated),
        ),
        excluded=[n for n in evaluated if anns.get(n) is None or not anns[n].boxes] if boxed else [],
        skipped=skipped,
        iou_curves=_per_image(evaluated, curves) if "maxboxacc" in plan.chosen else {},
    )


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
    compile: Compile = False,
) -> EvaluationResult:
    """Evaluate methods (and the ``center``/``random`` reference maps) on images with the chosen metrics:
    :func:`summarize` of :func:`iter_evaluate` of :func:`plan_evaluation`.

    Before the model runs, the annotations are read and checked, every image's size is read and the boxes are
    fitted to it (:func:`probe_images`). An image file that cannot be read (there, or when it is decoded) is
    skipped and listed in :attr:`EvaluationResult.skipped`; when none can be read, a ValueError.

    The methods explain on the model as given (``camkit.compare(..., accelerate=False)``), not on the prepared
    copy that :func:`camkit.explain` uses by default: the metrics rank pixels by the map, and the copy's
    rounding-level differences reorder near-equal pixels. The scores are therefore those of the model's own maps
    (explaining is a small part of an evaluation's time); the metrics' perturbed images still run through the
    fast path (``compile``), whose outputs agree with the model to float rounding.

    Args:
        model: classifier in eval mode.
        images: paths, or (name, PIL image) pairs.
        methods: CAM method names and/or ``center``, ``random``; gradient methods share one pass per batch.
        metrics: names from :data:`METRICS`, or specs with settings (``infidelity(perturbation=gaussian)``,
            :func:`camkit.metrics.resolve_metrics`; their columns end with the settings) (default: deletion,
            insertion, avg_drop, increase, and the box metrics when boxes are given).
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
        compile: how the metrics' perturbed images run (:class:`camkit.metrics.Forward`): False (default) the
            BatchNorm-folded, channels-last copy of the model; ``"jit"`` a traced and frozen copy, prepared once
            (seconds); ``"onnx"`` the copy exported to ONNX and run by ONNX Runtime on the CPU (seconds;
            ``camkit[onnx]``); ``"inductor"`` ``torch.compile``; True ``"onnx"`` on CPU where ONNX Runtime is
            installed, else ``"jit"``, and ``"inductor"`` elsewhere. A model that cannot be prepared so
            falls back to the default with a warning (:mod:`camkit.core.accel`).
    """
    plan = plan_evaluation(
        model,
        images,
        methods,
        metrics,
        annotations,
        preprocess=preprocess,
        labels=labels,
        layers=layers,
        steps=steps,
        batch_size=batch_size,
        images_per_batch=images_per_batch,
        box_threshold=box_threshold,
        max_pixels=max_pixels,
        compile=compile,
    )
    return summarize(plan, iter_evaluate(plan, progress, on_skip))
