"""The runner of ``camkit run``: inputs -> DataLoader -> :func:`camkit.compare` per batch -> shards of the store.

* :class:`ModelSpec`: how to build the model (every process or Ray actor builds its own, once).
* :class:`RunOptions`: what decides the results (methods, layers, target, resolution, metrics, batch and shard
  sizes...). They are recorded in the store; a later run with other options is refused (or ``overwrite``).
* :class:`Explainer`: one batch of decoded images -> table rows and maps, through the library's own
  :func:`camkit.compare` (one forward, and one backward shared by every gradient method).
* :func:`process_shards`: a DataLoader (with worker processes) over the batches of some shards; each finished
  shard is written atomically with its done-marker.
* :func:`run`: the whole run: the store looked at first (a finished one with the same settings: nothing is
  loaded or written), created or resumed under its lock, shards split over torchrun ranks or Ray actors (see
  :mod:`camkit.run.distributed`, :mod:`camkit.run.raydata`), the table merged and the summary written.

Batches never straddle shards (each shard is cut into batches of ``batch_size`` the same way every time), so a
resumed, distributed or Ray run computes every image in the same batch as an uninterrupted one: the results are
identical bit for bit on the same machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from camkit.adapters.preprocess import Preprocess
from camkit.adapters.spec import ModelSpec
from camkit.errors import CamkitError
from camkit.evaluate import METRICS, MetricScorer
from camkit.io.files import save_image
from camkit.io.images import DEFAULT_MAX_PIXELS
from camkit.run.sources import ImageDataset, Item, Sample, collate, collect_items, die_with_parent
from camkit.run.store import (
    Store,
    create_store,
    open_store,
    settings_differences,
    store_lock,
    summarize,
    survey,
)

__all__ = [
    "METRIC_COLUMNS",
    "Explainer",
    "ModelSpec",
    "RunOptions",
    "RunResult",
    "process_shards",
    "run",
    "shard_batches",
]

#: ``--metrics`` names -> their per-method columns: the metrics of :data:`camkit.evaluate.METRICS`, computed by
#: the same :class:`camkit.evaluate.MetricScorer`; ``maxboxacc`` (a value over the whole data set) keeps each
#: image's IoU curve (``<method>.iou_curve``, one IoU per threshold of :data:`camkit.evaluate.IOU_THRESHOLDS`),
#: and the summary computes MaxBoxAccV2 from them.
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    name: (metric.columns if name != "maxboxacc" else ("iou_curve",)) for name, metric in METRICS.items()
}
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
            ``insertion`` (``steps`` steps), ``avg_drop``, ``increase``, ``road``, and with ground-truth boxes
            ``pointing``, ``pointing_strict``, ``box`` (at ``threshold``) and ``maxboxacc`` (NaN without boxes).
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
        from camkit.methods import get_method

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
            if m not in METRIC_COLUMNS:
                raise CamkitError(f"unknown metric {m!r}; choose from {', '.join(METRIC_COLUMNS)}")
        if self.image_size is not None and self.image_size < 16:
            raise CamkitError(f"--image-size must be at least 16 pixels, got {self.image_size}")


@dataclass
class RunResult:
    """What :func:`run` did: the store, how many images this call computed, its seconds, the summary."""

    store: Store
    computed: int
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


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
        from camkit.methods import get_method

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
            from camkit.core.pipeline import compare

            x = torch.zeros(1, 3, *self.preprocess.size, device=self.device)
            expl = compare(self.model, x, self.methods, self.options.layers, labels=self.labels)
            first = expl[self.methods[0]]
            if first.classes is None or first.output is None or first.output.dim() != 2:
                raise CamkitError(
                    "camkit run explains classifiers (a model whose output is Tensor[B, classes]); explain "
                    "segmentation and detection models with `camkit explain` or camkit.explain"
                )
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
        """The per-image metrics of the run (the same computation as :func:`camkit.evaluate.evaluate`)."""
        if self._scorer is None:
            from camkit.metrics._common import Forward

            o = self.options
            self._scorer = MetricScorer(
                self.model, Forward(self.model), list(o.metrics), o.steps, o.threshold
            )
        return self._scorer

    def __call__(
        self, samples: Sequence[Sample]
    ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], list[Any]]:
        """Rows (one per sample, in order), maps per method float16 [B, H, W] (NaN for unreadable images) and
        the thumbnails to write: (method, index, PIL image)."""
        from camkit.core.pipeline import compare
        from camkit.core.postprocess import normalize
        from camkit.localize import localize

        opts = self.options
        shapes = self.map_shapes()
        b = len(samples)
        maps = {m: np.full((b, *shapes[m]), np.nan, dtype=np.float16) for m in self.methods}
        rows = [self._base_row(s) for s in samples]
        thumbs: list[Any] = []
        ok = [k for k, s in enumerate(samples) if s.x is not None]
        if not ok:
            return rows, maps, thumbs
        # channels-last, the layout of a batch made by Preprocess (as camkit.evaluate makes it): the same kernels
        # run, so a store's metrics equal evaluate's bit for bit on the same batches
        x = torch.stack([samples[k].x for k in ok]).to(self.device)  # type: ignore[misc]
        x = x.contiguous(memory_format=torch.channels_last)
        targets = [self._classes[samples[k].index] for k in ok] if self._classes is not None else None
        expl = compare(self.model, x, self.methods, opts.layers, targets, labels=self.labels)
        first = expl[self.methods[0]]
        assert first.output is not None and first.classes is not None and first.probs is not None
        probs_all = torch.softmax(first.output.float(), dim=1)
        top = probs_all.topk(min(opts.topk, probs_all.shape[1]), dim=1)
        classes = first.classes
        sizes = [samples[k].size for k in ok]
        gt = [_clipped(self.items[samples[k].index].boxes, samples[k].size) for k in ok]
        for j, k in enumerate(ok):
            row = rows[k]
            row["topk_classes"] = [int(c) for c in top.indices[j]]
            row["topk_probs"] = [float(p) for p in top.values[j]]
            row["topk_labels"] = [self.labels[int(c)] for c in top.indices[j]] if self.labels else None
            row["class"] = int(classes[j])
            row["label"] = self.labels[int(classes[j])] if self.labels else None
            row["prob"] = float(first.probs[j])
        for m in self.methods:
            e = expl[m]
            full = e.maps.float()
            if opts.resolution == "input":
                stored = full
            else:
                stored = normalize(torch.relu(next(iter(e.raw.values())).float()))
            maps[m][ok] = stored.detach().cpu().numpy().astype(np.float16)
            boxes = localize(full, threshold=opts.threshold, image_sizes=sizes)
            values: dict[str, Tensor] = {}
            curves: Tensor | None = None
            if opts.metrics:
                values, curves = self.scorer()(x, full, classes, gt, sizes)
            for j, k in enumerate(ok):
                rows[k][f"{m}.box"] = boxes[j][0].xyxy if boxes[j] else None
                for col, v in values.items():
                    rows[k][f"{m}.{col}"] = float(v[j])
                if curves is not None:
                    rows[k][f"{m}.iou_curve"] = None if bool(curves[j].isnan().any()) else curves[j].tolist()
            if opts.thumbnails:
                from camkit.viz import overlay

                for j, k in enumerate(ok):
                    pic = samples[k].thumb
                    if pic is not None:
                        thumbs.append((m, samples[k].index, overlay(pic, full[j].cpu())))
        return rows, maps, thumbs

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
                    for col in METRIC_COLUMNS[metric]
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


def process_shards(
    store: Store,
    explainer: Explainer,
    shards: Sequence[int],
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Compute and write these shards; returns the number of images computed.

    A DataLoader with ``workers`` processes decodes and preprocesses the images (0: in this process); each batch
    goes through ``explainer``; a shard is written (maps, rows, thumbnails, then its done-marker) as soon as its
    last batch is done. ``progress(n)`` after each batch of n images.
    """
    opts = explainer.options
    batches = shard_batches(store, shards, opts.batch_size)
    if not batches:
        return 0
    dataset = ImageDataset(explainer.items, explainer.preprocess, opts.max_pixels, opts.thumbnails)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers > 0 else None,
    )
    pending: dict[int, tuple[list[dict[str, Any]], list[dict[str, np.ndarray]]]] = {}
    done = 0
    for samples in loader:
        rows, maps, thumbs = explainer(samples)
        for method, index, pic in thumbs:
            folder = store.path / "thumbs" / method
            folder.mkdir(parents=True, exist_ok=True)
            save_image(pic, folder / f"{index:08d}.jpg", quality=85)
        shard = samples[0].index // store.shard_size
        acc = pending.setdefault(shard, ([], []))
        acc[0].extend(rows)
        acc[1].append(maps)
        if len(acc[0]) == len(store.shard_range(shard)):
            store.write_shard(
                shard,
                explainer.table(acc[0]),
                {m: np.concatenate([part[m] for part in acc[1]]) for m in explainer.methods},
            )
            del pending[shard]
        done += len(samples)
        if progress is not None:
            progress(len(samples))
    return done


def inputs_digest(items: Sequence[Item]) -> str:
    """A digest of the inputs (paths, classes, boxes, in order)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.path, it.cls, it.boxes]).encode("utf-8"))
    return h.hexdigest()[:16]


def run_config(
    spec: ModelSpec, options: RunOptions, items: Sequence[Item], methods: Sequence[str]
) -> dict[str, Any]:
    """The store's ``run.json`` settings, known before the model is loaded (the resolved ``layers`` and the map
    shape are added once it is)."""
    return {
        "options": {
            **spec.identity(),
            **asdict(options),
            "methods": list(methods),
            "metrics": list(options.metrics),
        },
        "weights_path": spec.weights,
        "methods": list(methods),
        "n": len(items),
        "shard_size": options.shard_size,
        "inputs_digest": inputs_digest(items),
        "path_roots": path_roots(items),
    }


def path_roots(items: Sequence[Item]) -> list[list[Any]]:
    """Where the items' relative paths resolve: ``[[first index, absolute folder], ...]``, one entry where the
    folder changes (a manifest's rows: its folder; other inputs: the current folder). Kept in ``run.json`` and
    read back by :meth:`camkit.run.Store.path_root`."""
    out: list[list[Any]] = []
    for i, it in enumerate(items):
        if not out or out[-1][1] != it.root:
            out.append([i, it.root])
    return out


#: The metrics that compare a map with ground-truth boxes.
BOX_METRICS = tuple(name for name, metric in METRICS.items() if metric.needs_boxes)


def check_boxes(items: Sequence[Item], metrics: Sequence[str]) -> str | None:
    """Box metrics asked for on images without boxes: a ValueError when none has a box (before any work), else
    a note saying how many images the box metrics leave out (None when all have boxes or none is asked for)."""
    asked = [m for m in metrics if m in BOX_METRICS]
    if not asked:
        return None
    without = sum(1 for it in items if not it.boxes)
    if without == len(items):
        raise CamkitError(
            f"--metrics {','.join(asked)} needs ground-truth boxes, and none of the {len(items)} image(s) has one: "
            "give boxes (a manifest's 'boxes' column, a tar shard's .json member, or --annotations FILE), or "
            "leave the box metrics out"
        )
    if without:
        return (
            f"box metrics ({', '.join(asked)}) over {len(items) - without} image(s): {without} without "
            "ground-truth boxes are left out (NaN)"
        )
    return None


def _agreed(dist: Any, work: Callable[[], Any] | None) -> Any:
    """Rank 0 does ``work``; every rank gets its value, or raises the ValueError it raised (so that no rank
    waits for one that gave up)."""
    if dist.world == 1:
        return work() if work is not None else None
    outcome: tuple[str, Any] = ("ok", None)
    error: Exception | None = None
    if dist.rank == 0 and work is not None:
        try:
            outcome = ("ok", work())
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            error = err
            outcome = ("error", str(err))
    outcome = dist.broadcast(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise CamkitError(outcome[1])
    return outcome[1]


def _nothing_to_do(out: str | Path, t0: float, engine: str, world: int) -> RunResult:
    """The result of a run on a finished store: its summary, this run's counts (nothing written)."""
    store = open_store(out)
    seconds = time.perf_counter() - t0
    summary = {k: v for k, v in store.summary().items() if k != "table"}
    summary["this_run"] = {
        "computed": 0,
        "seconds": round(seconds, 3),
        "images_per_s": None,
        "processes": world,
        "engine": engine,
    }
    return RunResult(store=store, computed=0, seconds=seconds, summary=summary)


def run(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    model: ModelSpec | None = None,
    options: RunOptions | None = None,
    layout: str = "auto",
    annotations: str | Path | None = None,
    overwrite: bool = False,
    workers: int = 2,
    engine: str = "local",
    ray_workers: int = 2,
    num_gpus: float = 0.0,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    note: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunResult:
    """Explain every image of ``inputs`` into the store ``out`` (created, or resumed where it stopped).

    The store is looked at before anything is loaded: a folder that is neither new, empty nor a camkit store is
    refused, as is a store made with other settings; a finished store with the same settings is left as it is
    (no model is loaded, nothing is written, so it may be on a read-only file system). A run that creates,
    resumes or overwrites a store holds the store's lock until it is done (another run on it is refused at
    once); a resume verifies every done shard and computes again those that do not verify.

    Args:
        inputs: folders, files, a manifest or tar shards (:func:`camkit.run.sources.collect_items`).
        out: the store folder.
        model: how to build the model (default: the offline pretrained EfficientNet-Lite0).
        options: what to compute (:class:`RunOptions`).
        layout: how to read ``inputs`` (``auto``, ``folder``, ``imagefolder``, ``manifest``, ``tar``).
        annotations: an annotation file (camkit JSON, COCO JSON, Pascal VOC XML, as ``camkit evaluate
            --annotations``): class and boxes of the images it names (by file name) whose input gives none.
        overwrite: start the store again, deleting camkit's own files of it (a folder that holds other files is
            refused), instead of refusing other settings.
        workers: DataLoader worker processes per process (0: decode in the main process).
        engine: ``"local"`` (one process, or one per rank under torchrun: see :mod:`camkit.run.distributed`) or
            ``"ray"`` (Ray Data actors, :mod:`camkit.run.raydata`).
        ray_workers: Ray actors. num_gpus: GPUs per Ray actor.
        progress: ``progress(to_do, total) -> advance(n)``: called once with the images this process will
            compute and the total; ``advance`` after each batch.
        note: called with a remark before any work (box metrics that leave out images without boxes); default:
            a Python warning.
        warn: called with a line for each done shard that does not verify (default: :func:`warnings.warn`).

    Raises:
        ValueError: bad options or inputs, box metrics asked for on images none of which has boxes, an ``out``
            that cannot hold the store, a store made with other settings (and not ``overwrite``), or one in use
            by another run.
    """
    from camkit.methods import get_method
    from camkit.run import distributed

    spec = model or ModelSpec()
    opts = options or RunOptions()
    opts.check()
    if engine not in ("local", "ray"):
        raise CamkitError(f"unknown engine {engine!r}: 'local' (also under torchrun) or 'ray'")
    if workers < 0:
        raise CamkitError(f"--workers must be 0 or more, got {workers}")
    items = collect_items(inputs, layout, annotations)
    box_note = check_boxes(items, opts.metrics)
    if box_note is not None:
        if note is not None:
            note(box_note)
        else:
            warnings.warn(box_note, stacklevel=2)
    config = run_config(spec, opts, items, [get_method(m).name for m in opts.methods])
    t0 = time.perf_counter()
    with distributed.session(spec.device) as dist:
        if dist.world > 1 and engine == "ray":
            raise CamkitError("--engine ray is not run under torchrun: start it as one process")
        # the store first: refused, or finished with these settings (nothing loaded, nothing written)
        if _agreed(dist, lambda: survey(out, config, overwrite)):
            return _nothing_to_do(out, t0, engine, dist.world)
        spec = replace(spec, device=dist.device)
        loaded = spec.load()
        explainer = Explainer(loaded.model, loaded.preprocess, loaded.labels, opts, items)
        shapes = explainer.map_shapes()
        config = {**config, "layers": explainer.layer_names()}
        if _agreed(dist, lambda: survey(out, config, overwrite)):  # --layers given another way, same layers
            return _nothing_to_do(out, t0, engine, dist.world)
        with ExitStack() as held:

            def prepare() -> list[int]:
                held.enter_context(store_lock(out))  # held until the table is merged
                made = create_store(out, config, items, shapes, overwrite=overwrite, warn=warn)
                return sorted(set(range(made.n_shards)) - made.done_shards())

            pending: list[int] = _agreed(dist, prepare if dist.rank == 0 else None)
            store = open_store(out)
            diff = settings_differences(store.config, config)
            if dist.total(1 if diff else 0):  # every rank must run with rank 0's settings (weights, inputs)
                raise CamkitError(
                    f"the processes of this run have other settings than its first one ({'; '.join(diff)})"
                    if diff
                    else "another process of this run has other settings (model weights or inputs)"
                )
            mine = pending[dist.rank :: dist.world]
            to_do = sum(len(store.shard_range(s)) for s in mine)
            advance = progress(to_do, store.n) if progress is not None else None
            if engine == "ray":
                from camkit.run import raydata

                computed = raydata.process_shards(
                    store,
                    spec,
                    opts,
                    items,
                    mine,
                    ray_workers=ray_workers,
                    num_gpus=num_gpus,
                    progress=advance,
                )
            else:
                computed = process_shards(store, explainer, mine, workers=workers, progress=advance)
            computed = dist.total(computed)
            seconds = time.perf_counter() - t0
            summary: dict[str, Any] = {}
            if dist.rank == 0:
                table = store.merge()
                summary = summarize(table, store.methods, store.config)
                summary["this_run"] = {
                    "computed": computed,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(computed / seconds, 2) if seconds > 0 else None,
                    "processes": dist.world,
                    "engine": engine,
                }
                store.write_summary(summary)
            dist.barrier()
    return RunResult(store=store, computed=computed, seconds=seconds, summary=summary)
