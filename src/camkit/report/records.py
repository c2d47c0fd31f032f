"""What a report shows about one image: :class:`ImageRecord`, and :func:`build_records` to make them.

A record holds the photo (a PIL image, or a file path read when the report is rendered), the model's top-5, the
class that was explained, one :class:`MapEntry` per method x layer (the map in [0, 1] at any size, with the
localisation boxes of the fused map) and metric values per method. The renderer (:func:`camkit.report.render`)
only reads records, so any source of maps (a live model here, a stored run later) can feed it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from camkit.adapters import LoadedModel
from camkit.core.capture import check_eval
from camkit.core.explanation import Explanation
from camkit.core.pipeline import compare
from camkit.core.targets import TopK
from camkit.errors import CamkitError
from camkit.localize import Box, localize
from camkit.methods import get_method
from camkit.methods.spec import split_specs
from camkit.metrics import Forward, MetricScorer, registry

if TYPE_CHECKING:
    from camkit.core.targets import TargetSpec
    from camkit.localize import Threshold

__all__ = [
    "FUSED",
    "METRICS",
    "OWN_MAP",
    "ImageRecord",
    "MapEntry",
    "Prediction",
    "build_records",
    "top_predictions",
]

#: The metrics a report can compute per image and method: those of the metric registry
#: (:data:`camkit.metrics.METRICS`) that need no ground-truth boxes.
METRICS = tuple(
    name for name, metric in registry.METRICS.items() if not metric.needs_boxes and metric.columns
)

#: The layer name of the map fused over several layers.
FUSED = "fused"

#: The layer name of a map a method makes in its own passes (``fullgrad``, ``polycam``, ...): one column shared
#: by all such methods in the report's methods x layers grid.
OWN_MAP = "own map"


@dataclass(frozen=True)
class Prediction:
    """A class and its softmax probability."""

    cls: int
    label: str | None
    prob: float


@dataclass
class MapEntry:
    """One method's map at one layer (or fused over layers: ``layer == "fused"``).

    Attributes:
        method: the method's name.
        layer: the layer's dotted name, or :data:`FUSED`.
        map: the map in [0, 1], ``[H, W]`` (any size: it is stretched over the whole photo).
        boxes: the localisation boxes in original-image pixels (x1, y1 exclusive); empty when not computed.
    """

    method: str
    layer: str
    map: np.ndarray
    boxes: list[Box] = field(default_factory=list)


@dataclass
class ImageRecord:
    """Everything a report shows about one image.

    Attributes:
        name: the image's name (its row in the table).
        image: the photo as a PIL image, or the path of its file (read when the report is rendered).
        top5: the model's best classes, most probable first (empty when the model gives no class scores).
        target: the class the maps explain, or None (a callable target).
        maps: one entry per method x layer.
        metrics: method -> metric name -> value (NaN when it could not be computed).
        source: where the image came from (a path, ``sample:chelsea``).
        error: why the image could not be explained (an error row of a stored run), or None; its card shows it.
        notes: remarks shown in the image's card (a stored photo that is gone, ...).
        size: the photo's original (width, height) when ``image`` is a reduced copy (boxes are in original
            pixels); None: ``image``'s own size.
    """

    name: str
    image: Image.Image | Path
    top5: list[Prediction] = field(default_factory=list)
    target: Prediction | None = None
    maps: list[MapEntry] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"ImageRecord.name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.image, (Image.Image, Path)):
            raise TypeError(
                f"ImageRecord.image must be a PIL image or a pathlib.Path, got {type(self.image).__name__}"
            )

    def photo(self) -> Image.Image:
        """The photo as RGB (read from disk when the record holds a path)."""
        if isinstance(self.image, Path):
            from camkit.io import load_image

            return load_image(self.image)
        return self.image.convert("RGB") if self.image.mode != "RGB" else self.image


def top_predictions(logits: Tensor, labels: Sequence[str] | None, k: int = 5) -> list[Prediction]:
    """The ``k`` most probable classes of one image's logits ``[C]`` (softmax), most probable first."""
    probs = torch.softmax(logits.detach().float().flatten(), dim=0)
    values, indices = probs.topk(min(k, probs.numel()))
    return [
        Prediction(int(i), labels[int(i)] if labels is not None and int(i) < len(labels) else None, float(p))
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


@dataclass(frozen=True)
class _Job:
    """The checked arguments of :func:`build_records`."""

    loaded: LoadedModel
    methods: list[str]
    layers: str | list[str]
    target: TargetSpec
    metrics: list[str]
    steps: int
    threshold: Threshold
    targets: Mapping[str, TargetSpec] | None = None
    stage: Callable[[str], None] | None = None


def _check(
    loaded: LoadedModel,
    methods: Sequence[str],
    layers: str | Sequence[str],
    target: TargetSpec,
    metrics: Sequence[str],
    steps: int,
    threshold: Threshold,
) -> _Job:
    """Refuse bad arguments before any image is read or the model runs."""
    if not isinstance(loaded, LoadedModel):
        raise TypeError(
            f"loaded must be a camkit.LoadedModel (from camkit.load_model), got {type(loaded).__name__}; for "
            "your own network: LoadedModel(model=..., preprocess=camkit.Preprocess(...), labels=...)"
        )
    check_eval(loaded.model, stacklevel=4)  # before any forward, which would update BatchNorm stats
    unknown = [n for n in metrics if registry.parse_metric(n)[0] not in METRICS]
    if unknown:
        raise CamkitError(
            f"unknown metric(s) {', '.join(map(repr, unknown))}; choose among {', '.join(METRICS)}"
        )
    metrics = [registry.resolve_metrics([n], have_boxes=True)[0] for n in metrics]  # settings checked: keys
    if isinstance(target, TopK):
        raise CamkitError("a report explains one class per image: give a class index or name, not topK")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CamkitError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(methods, str):
        methods = split_specs(methods)
    if not methods:
        raise CamkitError("no method given: pass at least one method name (see `camkit methods`)")
    for name in methods:
        get_method(name)  # an unknown name raises here, before any image is read
    layer_spec: str | list[str] = layers if isinstance(layers, str) else list(layers)
    return _Job(loaded, list(methods), layer_spec, target, list(metrics), steps, threshold)


def _entries(method: str, expl: Explanation, size: tuple[int, int], threshold: Threshold) -> list[MapEntry]:
    """The method's maps: each layer's and the fused one (with its boxes), or its one map.

    A map of the method's own passes is named after the method, not after a layer: it goes in the one
    :data:`OWN_MAP` column that all such methods share (as in ``camkit explain``'s grid).
    """
    fused = expl.maps[0].detach().float().cpu()
    boxes = localize(fused[None], threshold=threshold, image_sizes=[size])[0]
    if len(expl.layers) > 1:
        entries = [
            MapEntry(method, layer, expl.layer_maps[layer][0].float().cpu().numpy()) for layer in expl.layers
        ]
        return [*entries, MapEntry(method, FUSED, fused.numpy(), boxes)]
    layer = expl.layers[0]
    return [MapEntry(method, OWN_MAP if layer in (method, expl.method) else layer, fused.numpy(), boxes)]


def _explained(
    result: dict[str, Explanation], labels: Sequence[str] | None
) -> tuple[list[Prediction], Prediction | None]:
    """The top-5 and the explained class, read from the explanations (no second forward): the top-5 from the
    model output of the explained forward, when it holds class scores."""
    top5: list[Prediction] = []
    chosen: Prediction | None = None
    for expl in result.values():
        if not top5 and expl.output is not None and expl.output.dim() == 2:
            top5 = top_predictions(expl.output[0], labels)
        if chosen is None and expl.classes is not None:
            label = expl.labels[0] if expl.labels else None
            prob = float(expl.probs[0]) if expl.probs is not None else math.nan
            chosen = Prediction(int(expl.classes[0]), label if isinstance(label, str) else None, prob)
    return top5, chosen


def _metric_values(
    scorer: MetricScorer, x: Tensor, expl: Explanation, size: tuple[int, int], job: _Job, stage: str
) -> dict[str, float]:
    """The metrics of the fused map, metric column -> value, from the one metric dispatcher; each explanation a
    metric asks for again (MPRT's steps, the sensitivities' samples) is counted in the stage text after
    ``stage``."""
    method = expl.method
    targets = expl.classes.tolist() if expl.classes is not None else None
    count = itertools.count(1)

    def counted() -> None:
        if job.stage is not None:
            job.stage(f"{stage}, explained again: {next(count)}")

    def remap(xm: Tensor) -> Tensor:
        counted()
        return compare(job.loaded.model, xm, [method], job.layers, targets, accelerate=False)[method].maps

    def again(model: nn.Module, xm: Tensor, classes: Tensor) -> Tensor:
        counted()
        return compare(model, xm, [method], job.layers, classes.tolist(), accelerate=False)[method].maps

    values, _ = scorer(x, expl.maps[:1].float(), expl.classes, [[]], [size], remap=remap, explain=again)
    names = job.metrics
    return {col: float(values[col][0]) for name in names for col in registry.metric_columns(name)}


def _record(job: _Job, name: str, image: Image.Image | Path, scorer: MetricScorer | None) -> ImageRecord:
    """Explain one image with every method (one :func:`camkit.compare`) and make its record."""
    pil = _read(image)
    loaded = job.loaded
    notes: list[str] = []
    target = job.target
    if job.targets is not None:
        if name in job.targets:
            target = job.targets[name]
        else:
            notes.append(
                "no class given for this image: "
                + ("its top-1" if target is None else "the default target")
                + " is explained"
            )
    if job.stage is not None:
        job.stage(f"{name}: explaining")
    result = compare(
        loaded.model,
        [pil],
        job.methods,
        job.layers,
        target,
        preprocess=loaded.preprocess,
        labels=loaded.labels,
    )
    top5, chosen = _explained(result, loaded.labels)
    entries = [e for method, expl in result.items() for e in _entries(method, expl, pil.size, job.threshold)]
    values: dict[str, dict[str, float]] = {}
    if scorer is not None:
        x = loaded.preprocess([pil])
        for m, expl in result.items():
            if job.stage is not None:
                job.stage(f"{name}: metrics of {m}")
            values[m] = _metric_values(scorer, x, expl, pil.size, job, f"{name}: metrics of {m}")
    source = str(image) if isinstance(image, Path) else name
    return ImageRecord(name, image, top5, chosen, entries, values, source, notes=notes)


def build_records(
    loaded: LoadedModel,
    images: Iterable[tuple[str, Image.Image | Path]],
    methods: Sequence[str] = ("gradcam",),
    layers: str | Sequence[str] = "auto",
    target: TargetSpec = None,
    metrics: Sequence[str] = (),
    steps: int = 20,
    threshold: Threshold = 0.2,
    targets: Mapping[str, TargetSpec] | None = None,
    stage: Callable[[str], None] | None = None,
) -> Iterator[ImageRecord]:
    """Explain each image with every method (one :func:`camkit.compare` per image) and make its record.

    Images are read and explained one at a time, as the records are consumed (a generator), so a long list
    costs the memory of one image at a time when passed straight to :func:`camkit.report.write_report`. The
    model runs only as the explanations need: the top-5 and the explained class are read from them.

    Args:
        loaded: a model from :func:`camkit.load_model`.
        images: (name, PIL image or file path) pairs.
        methods: method names (``camkit methods``).
        layers: ``"auto"``, or layer names (a comma-separated string or a list): with several, each layer's map
            and the fused one are shown; a method that makes its map in its own passes shows it in the
            :data:`OWN_MAP` column.
        target: the class to explain (None: the top-1 of each image); a ``TopK`` is refused.
        metrics: names among :data:`METRICS` or their specs with settings (``infidelity(perturbation=gaussian)``,
            :func:`camkit.metrics.resolve_metrics`), computed per image and method on the fused map (their columns:
            ``road`` gives ``road_morf`` and ``road_lerf``).
        steps: steps of the deletion and insertion curves.
        threshold: the localisation threshold (:func:`camkit.localize.localize`).
        targets: image name -> the class to explain for that image (its annotated class), instead of
            ``target``; an image not in it gets ``target`` and a note in its card saying so.
        stage: called with what an image's work is at as it starts each part (``"NAME: explaining"``, then
            ``"NAME: metrics of METHOD"`` per method): a progress display's text.

    Raises:
        ValueError: an unknown metric or method, a ``TopK`` target, ``steps`` below 1.
    """
    job = replace(
        _check(loaded, methods, layers, target, metrics, steps, threshold), targets=targets, stage=stage
    )
    if targets is not None and any(isinstance(t, TopK) for t in targets.values()):
        raise CamkitError("a report explains one class per image: give a class index or name, not topK")
    scorer = (
        MetricScorer(loaded.model, Forward(loaded.model), job.metrics, job.steps, box_threshold=0.2)
        if job.metrics
        else None
    )
    for item in images:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"images must be (name, PIL image or path) pairs, got {item!r:.80}")
        yield _record(job, item[0], item[1], scorer)


def _read(image: Image.Image | Path) -> Image.Image:
    if isinstance(image, Path):
        from camkit.io import load_image

        return load_image(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"an image is a PIL image or a pathlib.Path, got {type(image).__name__}")
    return image.convert("RGB") if image.mode != "RGB" else image
