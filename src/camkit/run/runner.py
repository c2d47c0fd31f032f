"""The per-batch work of ``camkit run``: a batch of decoded images -> rows and maps, and shards written.

* :class:`RunOptions`: what decides the results (methods, layers, target, resolution, metrics, batch and shard
  sizes...). They are recorded in the store; a later run with other options is refused (or ``overwrite``).
* :class:`Explainer`: one batch of decoded images -> table rows and maps, through the library's own
  :func:`camkit.compare` (one forward, and one backward shared by every gradient method; the rows' predictions
  come from that forward's output).
* :func:`process_shards`: a DataLoader (with worker processes) over the batches of some shards; each finished
  shard is written atomically with its done-marker.

The model is built from a :class:`camkit.adapters.ModelSpec` (every process or Ray actor builds its own, once);
the whole run (the store, processes, engines) is :func:`camkit.run.driver.run`.

Batches never straddle shards (each shard is cut into batches of ``batch_size`` the same way every time), so a
resumed, distributed or Ray run computes every image in the same batch as an uninterrupted one: the results are
identical bit for bit on the same machine.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from camkit.adapters.preprocess import Preprocess
from camkit.adapters.spec import ModelSpec
from camkit.core.explanation import Explanation
from camkit.core.pipeline import compare
from camkit.core.postprocess import normalize
from camkit.core.tasks import model_task
from camkit.errors import CamkitError
from camkit.evaluate import JOINT, METRICS, MetricScorer, joint_scores
from camkit.io.files import save_image
from camkit.io.images import DEFAULT_MAX_PIXELS
from camkit.localize import localize
from camkit.methods import get_method
from camkit.metrics._common import Forward
from camkit.metrics.registry import metric_columns, parse_metric, resolve_metrics
from camkit.run.sources import ImageDataset, Item, Sample, collate, die_with_parent
from camkit.run.store import Store
from camkit.viz import overlay

try:  # the camkit[run] extra: camkit.run.run checks it (camkit.run.extra) before any work
    import pyarrow as pa
except ImportError:
    pass

__all__ = [
    "METRIC_COLUMNS",
    "Explainer",
    "ModelSpec",
    "RunOptions",
    "ShardWriter",
    "process_shards",
    "run_metric_columns",
    "shard_batches",
]

#: ``--metrics`` names -> their per-method columns: the metrics of :data:`camkit.evaluate.METRICS`, computed by
#: the same :class:`camkit.evaluate.MetricScorer`; ``maxboxacc`` (a value over the whole data set) keeps each
#: image's IoU curve (``<method>.iou_curve``, one IoU per threshold of :data:`camkit.evaluate.IOU_THRESHOLDS`),
#: and the summary computes MaxBoxAccV2 from them.
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    name: (metric.columns if name != "maxboxacc" else ("iou_curve",)) for name, metric in METRICS.items()
}


def run_metric_columns(key: str) -> tuple[str, ...]:
    """A metric key's per-method columns in a run's table (:data:`METRIC_COLUMNS`; a configured metric's columns
    end with its settings, :func:`camkit.metrics.registry.metric_columns`)."""
    return ("iou_curve",) if key == "maxboxacc" else metric_columns(key)


TARGETS = ("top1", "true")
RESOLUTIONS = ("feature", "input")


@dataclass(frozen=True)
class RunOptions:
    """What decides a run's results; recorded in the store.

    Attributes:
        methods: CAM method names (gradient methods share one forward and one backward per batch).
        layers: target layer(s), ``"auto"`` or names.
        target: ``"top1"`` (the predicted class) or ``"true"`` (each image's ground-truth class: a class index or
            a name of the model's labels).
        resolution: ``"feature"`` (the map at the target layer's resolution, one layer only) or ``"input"`` (at
            the model's input size).
        topk: predicted classes (with probabilities) kept per image.
        threshold: map threshold (fraction of its max) of the box per image (and of the ``box`` metric).
        metrics: per-image metrics, those of ``camkit evaluate`` (:data:`camkit.evaluate.METRICS`): ``deletion``,
            ``insertion`` (``steps`` steps), ``avg_drop``, ``increase``, ``road``, ``arcc``, the complexity and
            randomisation metrics, and with ground-truth boxes ``pointing``, ``pointing_strict``, ``box`` (at
            ``threshold``), ``maxboxacc`` and the mask metrics (NaN without boxes); see ``docs/metrics.md``. A
            metric with settings is given by its key (:func:`camkit.metrics.resolve_metrics`:
            ``infidelity(perturbation=gaussian)``); its columns end with its settings, and a store is resumed
            only with the same keys.
        steps: deletion/insertion steps.
        thumbnails: longer side of the JPEG overlays written per image and method (0: none).
        image_size: resize images to this square size instead of the model's own input size (None: the model's).
        batch_size: images per model call. shard_size: images per shard (a multiple of ``batch_size`` is best).
        max_pixels: larger images are recorded as errors (None: no limit).
    """

    methods: tuple[str, ...] = ("gradcam",)
    layers: str = "auto"
    target: str = "top1"
    resolution: str = "feature"
    topk: int = 5
    threshold: float = 0.2
    metrics: tuple[str, ...] = ()
    steps: int = 20
    thumbnails: int = 0
    image_size: int | None = None
    batch_size: int = 16
    shard_size: int = 256
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def check(self) -> None:
        """Raise ValueError for an option out of range (before any model work)."""
        if not self.methods:
            raise CamkitError("--methods is empty; give at least one method (see `camkit methods`)")
        for m in self.methods:
            get_method(m)
        if self.target not in TARGETS:
            raise CamkitError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.resolution not in RESOLUTIONS:
            raise CamkitError(
                f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {self.resolution!r}"
            )
        for name, value, low in (
            ("--topk", self.topk, 1),
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--shard-size", self.shard_size, 1),
            ("--thumbnails", self.thumbnails, 0),
        ):
            if value < low:
                raise CamkitError(f"{name} must be at least {low}, got {value}")
        if not 0.0 < self.threshold < 1.0:
            raise CamkitError(f"--threshold is a fraction of the map's max, in (0, 1); got {self.threshold}")
        for m in self.metrics:
            if parse_metric(m)[0] not in METRIC_COLUMNS:
                raise CamkitError(f"unknown metric {m!r}; choose from {', '.join(METRIC_COLUMNS)}")
            key = resolve_metrics([m], have_boxes=True)[0]  # its settings checked, as evaluate checks them
            if key != m:
                raise CamkitError(
                    f"metric {m!r} is written {key!r} in a run (its key, as the store records it)"
                )
        if self.image_size is not None and self.image_size < 16:
            raise CamkitError(f"--image-size must be at least 16 pixels, got {self.image_size}")


def _resolve_true_class(item: Item, labels: Sequence[str] | None, n_classes: int) -> int:
    cls = item.cls
    if cls is None:
        raise CamkitError(
            f"--target true: {item.path!r} has no class (give a class column, or use --target top1)"
        )
    if cls.lstrip("-").isdigit():
        c = int(cls)
    elif labels is not None and cls in labels:
        c = list(labels).index(cls)
    else:
        raise CamkitError(
            f"--target true: the class {cls!r} of {item.path!r} is neither an index nor a class name of the model"
        )
    if not 0 <= c < n_classes:
        raise CamkitError(f"--target true: class {c} of {item.path!r} is not in [0, {n_classes - 1}]")
    return c


def _clipped(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> list[list[float]]:
    """Boxes cut at the image's right and bottom edges, as :func:`camkit.evaluate.evaluate` fits them (a box
    wholly outside the image, an error there, is kept: it scores as a miss)."""
    w, h = size
    out = []
    for x0, y0, x1, y1 in boxes:
        inside = x0 < w and y0 < h
        out.append([x0, y0, min(x1, float(w)), min(y1, float(h))] if inside else [x0, y0, x1, y1])
    return out


class Explainer:
    """A model and the run's options: a batch of :class:`Sample` -> rows and maps (the user's model is used as
    :func:`camkit.compare` uses it: it comes back as it was)."""

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess,
        labels: Sequence[str] | None,
        options: RunOptions,
        items: Sequence[Item],
    ) -> None:
        self.model = model
        self.labels = list(labels) if labels is not None else None
        self.options = options
        self.items = list(items)
        self.methods = [get_method(m).name for m in options.methods]
        if options.image_size is not None:
            preprocess = Preprocess(
                size=(options.image_size, options.image_size), mean=preprocess.mean, std=preprocess.std
            )
        self.preprocess = preprocess
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # maps that metrics score are the model's own (as camkit evaluate's): no prepared copy then
        self.accelerate = not options.metrics
        self._classes: list[int] | None = None
        self._scorer: MetricScorer | None = None
        self._shapes: dict[str, tuple[int, int]] | None = None
        self._layers: list[str] = []

    def layer_names(self) -> list[str]:
        """The target layers ``options.layers`` resolved to on this model (``auto`` -> the name it chose)."""
        self.map_shapes()
        return list(self._layers)

    def map_shapes(self) -> dict[str, tuple[int, int]]:
        """(H, W) of each method's stored maps, from one explained blank image (checks the layers and methods
        too). At ``resolution="feature"`` each method keeps its own grid (Poly-CAM's is its shallowest layer's,
        FullGrad's the input's); at ``"input"`` all are the model's input size."""
        if self._shapes is None:
            refusal = CamkitError(
                "camkit run explains classifiers (a model whose output is Tensor[B, classes]); explain "
                "segmentation and detection models with `camkit explain` or camkit.explain"
            )
            if model_task(self.model) != "classification":  # before a forward that would choose a target
                raise refusal
            x = torch.zeros(1, 3, *self.preprocess.size, device=self.device)
            expl = compare(
                self.model,
                x,
                self.methods,
                self.options.layers,
                labels=self.labels,
                accelerate=self.accelerate,
            )
            first = expl[self.methods[0]]
            if first.classes is None or first.output is None or first.output.dim() != 2:
                raise refusal
            self._layers = list(first.raw)
            shapes: dict[str, tuple[int, int]] = {}
            for m in self.methods:
                e = expl[m]
                if self.options.resolution == "input":
                    shapes[m] = (int(e.maps.shape[-2]), int(e.maps.shape[-1]))
                    continue
                if len(e.raw) != 1:
                    raise CamkitError(
                        f"--resolution feature keeps one layer's map, but {m} has {len(e.raw)} layers "
                        f"({', '.join(e.raw)}); use --resolution input for a fused map"
                    )
                raw = next(iter(e.raw.values()))
                shapes[m] = (int(raw.shape[-2]), int(raw.shape[-1]))
            out = first.output
            n_classes = int(out.shape[1]) if out is not None and out.dim() == 2 else 0
            if self.options.target == "true":
                self._classes = [_resolve_true_class(it, self.labels, n_classes) for it in self.items]
            self._shapes = shapes
        return self._shapes

    def scorer(self) -> MetricScorer:
        """The per-image metrics of the run scored method by method: all but deletion and insertion, which
        :meth:`__call__` scores for every method together (:func:`camkit.evaluate.joint_scores`); the same
        computation as :func:`camkit.evaluate.evaluate`."""
        if self._scorer is None:
            o = self.options
            rest = [m for m in o.metrics if m not in JOINT]
            self._scorer = MetricScorer(self.model, Forward(self.model), rest, o.steps, o.threshold)
        return self._scorer

    def __call__(
        self, samples: Sequence[Sample]
    ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], list[Any]]:
        """Rows (one per sample, in order), maps per method float16 [B, H, W] (NaN for unreadable images) and
        the thumbnails to write: (method, index, PIL image).

        One call of :func:`camkit.compare` per batch: its forward gives the maps of every method and the
        predictions (top-k, class, probability) of the rows; only the metrics run the model again."""
        shapes = self.map_shapes()
        maps = {m: np.full((len(samples), *shapes[m]), np.nan, dtype=np.float16) for m in self.methods}
        rows = [self._base_row(s) for s in samples]
        ok = [k for k, s in enumerate(samples) if s.x is not None]
        if not ok:
            return rows, maps, []
        read = [samples[k] for k in ok]
        # channels-last, the layout of a batch made by Preprocess (as camkit.evaluate makes it): the same kernels
        # run, so a store's metrics equal evaluate's bit for bit on the same batches
        x = torch.stack([s.x for s in read if s.x is not None]).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        targets = [self._classes[s.index] for s in read] if self._classes is not None else None
        expl = compare(
            self.model,
            x,
            self.methods,
            self.options.layers,
            targets,
            labels=self.labels,
            accelerate=self.accelerate,
        )
        first = expl[self.methods[0]]
        for k, cells in zip(ok, self._prediction_cells(first), strict=True):
            rows[k].update(cells)
        joint: dict[str, dict[str, Tensor]] = {}
        if any(m in JOINT for m in self.options.metrics):
            assert first.classes is not None
            fwd, full = self.scorer().forward, {m: expl[m].maps.float() for m in self.methods}
            steps = self.options.steps
            joint = joint_scores(self.model, fwd, x, full, first.classes, self.options.metrics, steps)
        thumbs: list[Any] = []
        for m in self.methods:
            stored, cells_of, pics = self._method_cells(m, expl[m], x, first.classes, read, joint.get(m, {}))
            maps[m][ok] = stored
            for k, cells in zip(ok, cells_of, strict=True):
                rows[k].update(cells)
            thumbs += pics
        return rows, maps, thumbs

    def _prediction_cells(self, first: Explanation) -> list[dict[str, Any]]:
        """Each image's top-k classes and probabilities, explained class, label and probability, read from the
        explained forward's output (:attr:`camkit.Explanation.output`)."""
        assert first.output is not None and first.classes is not None and first.probs is not None
        probs = torch.softmax(first.output.float(), dim=1)
        top = probs.topk(min(self.options.topk, probs.shape[1]), dim=1)
        labels = self.labels
        out = []
        for j, c in enumerate(int(c) for c in first.classes):
            indices = [int(i) for i in top.indices[j]]
            out.append(
                {
                    "topk_classes": indices,
                    "topk_probs": [float(p) for p in top.values[j]],
                    "topk_labels": [labels[i] for i in indices] if labels else None,
                    "class": c,
                    "label": labels[c] if labels else None,
                    "prob": float(first.probs[j]),
                }
            )
        return out

    def _method_cells(
        self,
        method: str,
        e: Explanation,
        x: Tensor,
        classes: Tensor | None,
        read: Sequence[Sample],
        joint: dict[str, Tensor],
    ) -> tuple[np.ndarray, list[dict[str, Any]], list[Any]]:
        """One method's maps as stored (float16), its cells of each row (box, metrics; ``joint``: its deletion
        and insertion, scored with the other methods') and its thumbnails."""
        opts = self.options
        full = e.maps.float()
        stored = (
            full if opts.resolution == "input" else normalize(torch.relu(next(iter(e.raw.values())).float()))
        )
        sizes = [s.size for s in read]
        boxes = localize(full, threshold=opts.threshold, image_sizes=sizes)
        values: dict[str, Tensor] = dict(joint)
        curves: Tensor | None = None
        if self.scorer().chosen:
            assert classes is not None
            gt = [_clipped(self.items[s.index].boxes, s.size) for s in read]
            targets = classes.tolist()

            def remap(xm: Tensor) -> Tensor:
                return compare(self.model, xm, [method], opts.layers, targets, accelerate=False)[method].maps

            def again(model: nn.Module, xm: Tensor, cls: Tensor) -> Tensor:
                return compare(model, xm, [method], opts.layers, cls.tolist(), accelerate=False)[method].maps

            more, curves = self.scorer()(x, full, classes, gt, sizes, remap=remap, explain=again)
            values.update(more)
        cells = []
        for j in range(len(read)):
            cell: dict[str, Any] = {f"{method}.box": boxes[j][0].xyxy if boxes[j] else None}
            cell.update({f"{method}.{col}": float(v[j]) for col, v in values.items()})
            if curves is not None:
                cell[f"{method}.iou_curve"] = None if bool(curves[j].isnan().any()) else curves[j].tolist()
            cells.append(cell)
        thumbs = [
            (method, s.index, overlay(s.thumb, full[j].cpu()))
            for j, s in enumerate(read)
            if opts.thumbnails and s.thumb is not None
        ]
        return stored.detach().cpu().numpy().astype(np.float16), cells, thumbs

    def _base_row(self, s: Sample) -> dict[str, Any]:
        item = self.items[s.index]
        row: dict[str, Any] = {
            "index": s.index,
            "path": item.path,
            "width": s.size[0] if s.x is not None else None,
            "height": s.size[1] if s.x is not None else None,
            "status": "ok" if s.x is not None else "error",
            "error": s.error,
            "true_class": item.cls,
            "gt_boxes": [list(b) for b in item.boxes],
        }
        return row

    def schema(self) -> pa.Schema:
        """The table's columns and types (the same in every shard)."""
        fields = [
            ("index", pa.int64()),
            ("path", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("true_class", pa.string()),
            ("gt_boxes", pa.list_(pa.list_(pa.float64()))),
            ("topk_classes", pa.list_(pa.int64())),
            ("topk_probs", pa.list_(pa.float32())),
            ("topk_labels", pa.list_(pa.string())),
            ("class", pa.int64()),
            ("label", pa.string()),
            ("prob", pa.float32()),
        ]
        for m in self.methods:
            fields.append((f"{m}.box", pa.list_(pa.int64())))
            for metric in self.options.metrics:
                fields += [
                    (f"{m}.{col}", pa.list_(pa.float32()) if col == "iou_curve" else pa.float64())
                    for col in run_metric_columns(metric)
                ]
        return pa.schema(fields)

    def table(self, rows: Sequence[dict[str, Any]]) -> pa.Table:
        """Rows -> a table with :meth:`schema` (missing values null; metric columns NaN)."""
        schema = self.schema()
        cols = {}
        for f in schema:
            default = float("nan") if pa.types.is_float64(f.type) else None
            cols[f.name] = pa.array([r.get(f.name, default) for r in rows], type=f.type)
        return pa.table(cols, schema=schema)


def shard_batches(store: Store, shards: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches of row indices of these shards: each shard cut into ``batch_size`` pieces from its start."""
    out = []
    for s in shards:
        r = store.shard_range(s)
        out += [list(range(i, min(i + batch_size, r.stop))) for i in range(r.start, r.stop, batch_size)]
    return out


class ShardWriter:
    """Writes thumbnails and finished shards on one background thread, off the critical path of the model.

    The queue is bounded (``depth`` jobs: a producer faster than the disk waits instead of holding every shard in
    memory). Jobs run in the order given, so a shard's thumbnails are on disk before its done-marker. The first
    error of a job is raised in the caller at its next :meth:`put` or at :meth:`close`; later jobs are dropped
    (their shards have no marker, so a resume computes them again). A SIGKILL loses the queued jobs the same way:
    a shard is complete only once its marker is written, last, by :meth:`camkit.run.Store.write_shard`.
    """

    def __init__(self, depth: int = 4) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="camkit-run-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as err:  # raised again in the caller's thread
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (waits while the queue is full); raises the error of an earlier job."""
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for the queued jobs to finish; raises the first error of any."""
        self._jobs.put(None)
        self._thread.join()
        self._raise()


def _save_thumbs(store: Store, thumbs: Sequence[Any]) -> None:
    for method, index, pic in thumbs:
        folder = store.path / "thumbs" / method
        folder.mkdir(parents=True, exist_ok=True)
        save_image(pic, folder / f"{index:08d}.jpg", quality=85)


def _write_shard(
    store: Store,
    explainer: Explainer,
    shard: int,
    rows: list[dict[str, Any]],
    parts: list[dict[str, np.ndarray]],
) -> None:
    maps = {m: np.concatenate([part[m] for part in parts]) for m in explainer.methods}
    store.write_shard(shard, explainer.table(rows), maps)


def _loader(explainer: Explainer, batches: list[list[int]], workers: int) -> Iterable[list[Sample]]:
    """The DataLoader of these batches: ``workers`` processes decode the next batches (``prefetch_factor`` 4
    each) while the model computes the current one (0: in this process, in turn)."""
    opts = explainer.options
    dataset = ImageDataset(explainer.items, explainer.preprocess, opts.max_pixels, opts.thumbnails)
    loader: Iterable[list[Sample]] = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers > 0 else None,
    )
    return loader


def process_shards(
    store: Store,
    explainer: Explainer,
    shards: Sequence[int],
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Compute and write these shards; returns the number of images computed.

    A DataLoader with ``workers`` processes decodes and preprocesses the next images while the model runs
    (0: in this process); each batch goes through ``explainer``; a :class:`ShardWriter` thread writes the
    thumbnails and, as soon as its last batch is done, the shard (maps, rows, then its done-marker), while the
    model goes on with the next batch. ``progress(n)`` after each batch of n images. Returns once every write is
    done; an error of a write is raised here.
    """
    batches = shard_batches(store, shards, explainer.options.batch_size)
    if not batches:
        return 0
    pending: dict[int, tuple[list[dict[str, Any]], list[dict[str, np.ndarray]]]] = {}
    done = 0
    writer = ShardWriter()
    try:
        for samples in _loader(explainer, batches, workers):
            rows, maps, thumbs = explainer(samples)
            if thumbs:
                writer.put(functools.partial(_save_thumbs, store, thumbs))
            shard = samples[0].index // store.shard_size
            acc = pending.setdefault(shard, ([], []))
            acc[0].extend(rows)
            acc[1].append(maps)
            if len(acc[0]) == len(store.shard_range(shard)):
                writer.put(functools.partial(_write_shard, store, explainer, shard, *pending.pop(shard)))
            done += len(samples)
            if progress is not None:
                progress(len(samples))
    finally:
        writer.close()  # the shards finished so far are written (and their errors raised) even on an error
    return done
