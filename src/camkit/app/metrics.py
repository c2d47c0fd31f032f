"""The metrics of ``POST /api/explain``: the metric registry's metrics of the map the request just produced.

The names are those of :data:`camkit.metrics.METRICS` (``all`` too), with settings as ``camkit evaluate --metrics``
takes them (``infidelity(perturbation=gaussian)``), checked by :func:`camkit.metrics.resolve_metrics` as
``camkit evaluate`` checks them, among the metrics the operator offers (``camkit serve --metrics``); the values come from the code that
``camkit evaluate`` and ``camkit run`` score with: :func:`camkit.evaluate.joint_scores` for deletion and
insertion, :class:`camkit.metrics.MetricScorer` for the others, and :func:`camkit.metrics.max_box_acc_v2` for
``maxboxacc`` (here over one image). The box metrics take the request's boxes (``[[x0, y0, x1, y1], ...]`` in the
image's pixels, checked by :func:`camkit.io.annotations.read_boxes`, the box rules of annotation files).

Cost: the steps are the registry's default (:data:`camkit.metrics.registry.DEFAULT_STEPS`), not a request's
choice, nor are the settings that set how many model calls a metric makes (:data:`COST_SETTINGS`); every model call runs on the request's worker thread, in chunks, and stops at the next chunk once the
client has disconnected (as a perturbation method's forwards do); the metrics that explain again (``arcc``,
``max_sensitivity``, ``avg_sensitivity``, ``random_logit``, ``mprt``) explain with the request's method and layers,
stopping likewise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image
from torch import Tensor, nn

from camkit.core.outputs import model_device
from camkit.core.spec import split_specs
from camkit.errors import CamkitError
from camkit.evaluate import JOINT, joint_scores
from camkit.io.annotations import Annotation, fit_boxes, read_boxes
from camkit.metrics import Forward, max_box_acc_v2
from camkit.metrics.registry import (
    BY_STEPS,
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_STEPS,
    IOU_THRESHOLDS,
    METRICS,
    MetricScorer,
    metric_columns,
    metric_of,
    parse_metric,
    resolve_metrics,
)

if TYPE_CHECKING:
    from camkit.adapters import LoadedModel
    from camkit.core.explanation import Explanation

__all__ = [
    "COST_SETTINGS",
    "DEFAULT_OFFERED",
    "EXPLAIN_MANY",
    "STEPS",
    "MetricJob",
    "Watch",
    "choose_metrics",
    "metric_rows",
    "offered_metrics",
    "parse_boxes",
    "score_metrics",
]

#: Deletion/insertion steps (and the size of the Quantus family's perturbations) of the app's metrics.
STEPS = DEFAULT_STEPS

#: The metrics that explain the image many times again, left out of what the app offers unless the operator names
#: them (``camkit serve --metrics``): ``max_sensitivity`` and ``avg_sensitivity`` (one explanation per perturbed
#: sample, 10 at the registry's default steps) and ``mprt`` (one per module with parameters: 99 for
#: EfficientNet-Lite0). ``arcc`` and ``random_logit`` explain once more each and stay offered.
EXPLAIN_MANY = ("max_sensitivity", "avg_sensitivity", "mprt")

#: The settings that a request cannot give (a 422): they set how many model calls or explanations a metric makes
#: (as do those the registry sizes by ``steps``, :data:`camkit.metrics.registry.BY_STEPS`).
COST_SETTINGS = frozenset({"samples", "runs", "regions", "percentages", "fractions", "steps"})

#: The metrics the app offers by default: every metric of the registry but :data:`EXPLAIN_MANY`.
DEFAULT_OFFERED: tuple[str, ...] = tuple(name for name in METRICS if name not in EXPLAIN_MANY)

#: The column of ``maxboxacc`` (its value over the request's one image).
MAXBOXACC = "maxboxacc"

#: What to do about the boxes field, said when a box metric is asked for without boxes.
BOXES_HINT = "give them in the boxes field as [[x0, y0, x1, y1], ...] in the image's own pixels"


class Watch(Protocol):
    """A request's cancellation as the metrics see it (the app's ``_Watch``)."""

    def check(self) -> None:
        """Raise once the client has disconnected."""

    def progress(self, done: int, total: int) -> None:
        """A perturbation engine's ``f(done, total)`` (one run per watch)."""

    def count(self, n: int) -> None:
        """Count ``n`` forwards of the metrics."""

    def again(self) -> Watch:
        """A watch of the same request for another perturbation run."""


@dataclass(frozen=True)
class MetricJob:
    """The metrics of one request.

    Attributes:
        names: metric keys, names of :data:`METRICS` or configured specs (from :func:`choose_metrics`).
        boxes: the ground-truth boxes, ``[x0, y0, x1, y1]`` in the image's pixels (from :func:`parse_boxes`).
        method: the request's method (the metrics that explain again use it).
        layers: the request's layer spec.
        batch_size: images per model call (None: camkit's automatic size).
    """

    names: tuple[str, ...]
    boxes: tuple[tuple[float, ...], ...]
    method: str
    layers: str
    batch_size: int | None = None


def offered_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """The metric names the app offers, in the registry's order: ``names`` (names of :data:`METRICS` or ``all``,
    as ``camkit serve --metrics`` gives them), or :data:`DEFAULT_OFFERED` when empty.

    Raises:
        CamkitError: an unknown name (the message of ``camkit evaluate --metrics``), or a name with settings (a
            request gives its own).
    """
    if not names:
        return DEFAULT_OFFERED
    chosen = set(resolve_metrics(names, have_boxes=True))
    configured = sorted(key for key in chosen if key not in METRICS)
    if configured:
        raise CamkitError(
            f"camkit serve --metrics takes metric names, not settings (got {configured[0]!r}): each request gives "
            f"its own settings; write {parse_metric(configured[0])[0]}"
        )
    return tuple(name for name in METRICS if name in chosen)


def metric_rows(offered: Sequence[str] = DEFAULT_OFFERED) -> list[dict[str, Any]]:
    """The metrics the app offers (``GET /api/config``), in the registry's order: name, columns, whether it
    needs boxes and whether lower is better (for the metric, and for each column)."""
    return [
        {
            "name": name,
            "columns": list(metric.columns) or [MAXBOXACC],
            "needs_boxes": metric.needs_boxes,
            "lower_is_better": metric.lower_is_better,
            "columns_lower_is_better": {
                col: metric.column_lower_is_better(col) for col in metric.columns or (MAXBOXACC,)
            },
        }
        for name, metric in METRICS.items()
        if name in offered
    ]


def choose_metrics(
    raw: Sequence[str], have_boxes: bool, offered: Sequence[str] = DEFAULT_OFFERED
) -> tuple[str, ...]:
    """The metric names asked for (each field may hold comma-separated names), checked before any work.

    Args:
        raw: the request's ``metrics`` fields: names or specs with settings (``infidelity(perturbation=gaussian)``),
            comma-separated.
        have_boxes: the request gave ground-truth boxes.
        offered: the metric names the app offers (``all``: these).

    Raises:
        CamkitError: an unknown name or setting, a value its function refuses (the messages of ``camkit evaluate
            --metrics``), a metric the app does not offer, a setting of :data:`COST_SETTINGS`, or a box metric named without boxes (``all`` without boxes leaves the box metrics out, as
            ``camkit evaluate`` does).
    """
    names = [part for field in raw for part in split_specs(field)]
    if not names:
        return ()
    named = [n for n in names if n.lower() != "all"]
    asked = resolve_metrics(named, have_boxes=True)  # unknown names or settings: the command's own messages
    refused = [m for m in asked if parse_metric(m)[0] not in offered]
    if refused:
        raise CamkitError(
            f"metric {parse_metric(refused[0])[0]!r} is not offered by this server; it offers {', '.join(offered)} "
            "(the operator chooses them with camkit serve --metrics)"
        )
    for key in asked:
        _check_cost(key)
    if not have_boxes:
        missing = [m for m in asked if metric_of(m).needs_boxes]
        if missing:
            what = f"metric {missing[0]!r} needs" if len(missing) == 1 else f"metrics {missing} need"
            raise CamkitError(f"{what} ground-truth boxes: {BOXES_HINT}")
    every = (
        [m for m in offered if have_boxes or not METRICS[m].needs_boxes] if len(named) < len(names) else []
    )
    return tuple(dict.fromkeys(asked + every))


def _check_cost(key: str) -> None:
    """Refuse a setting of :data:`COST_SETTINGS`: a request does not choose how much work its metrics do."""
    name, settings = parse_metric(key)
    costly = [k for k in settings if k in COST_SETTINGS or METRICS[name].settings[k] is BY_STEPS]
    if costly:
        raise CamkitError(
            f"{key}: the app does not take the setting {costly[0]!r}, which sets how many model calls the metric "
            "makes (the app's metrics run at the default size); compute it with camkit evaluate"
        )


def parse_boxes(raw: str) -> tuple[tuple[float, ...], ...]:
    """The boxes field, JSON ``[[x0, y0, x1, y1], ...]`` (empty: none), checked by the box rules of annotation
    files (:func:`camkit.io.annotations.read_boxes`)."""
    return tuple(tuple(b) for b in read_boxes(raw.strip() or None, "the boxes field"))


def _fit(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> list[list[float]]:
    """The boxes clipped to the image (:func:`camkit.io.annotations.fit_boxes`); a box wholly outside it is an
    error naming the image's size."""
    w, h = size
    for box in boxes:
        if box[0] >= w or box[1] >= h:
            raise CamkitError(
                f"the boxes field: box {list(box)} lies outside the image of {w}x{h} pixels; {BOXES_HINT}"
            )
    return fit_boxes(Annotation(boxes=[list(b) for b in boxes]), size, "the image").boxes


class _Checked(Forward):
    """:class:`camkit.metrics.Forward` that checks the request's watch before each chunk and counts the forwards."""

    def __init__(self, model: nn.Module, watch: Watch, batch_size: int | None) -> None:
        super().__init__(model, batch_size)
        self.watch = watch

    def __call__(self, x: Tensor) -> Tensor:
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            self.watch.check()
            chunk = x[i : i + self.batch_size]
            outs.append(super().__call__(chunk))
            self.watch.count(chunk.shape[0])
        return torch.cat(outs)


class _Again:
    """The request's method on other inputs, classes or models (the metrics that explain again)."""

    def __init__(self, job: MetricJob, model: nn.Module, classes: Tensor, watch: Watch) -> None:
        self.job, self.model, self.classes, self.watch = job, model, classes, watch

    def explain(self, model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
        """``explain(model, x, classes)``: ``random_logit``'s and ``mprt``'s explainer."""
        from camkit.core.pipeline import explain
        from camkit.methods.engine import PerturbationOptions

        self.watch.check()
        options = PerturbationOptions(batch_size=self.job.batch_size, progress=self.watch.again().progress)
        expl = explain(model, x, method=self.job.method, layers=self.job.layers, targets=classes.tolist(),
                       perturbation=options, accelerate=False)  # fmt: skip
        return expl.maps

    def remap(self, x: Tensor) -> Tensor:
        """The maps of other inputs for the same classes (``arcc``, the sensitivities)."""
        return self.explain(self.model, x, self.classes)


def _number(value: Tensor) -> float | None:
    """One image's value as JSON reads it (None for NaN or infinity)."""
    v = float(value.reshape(-1)[0])
    return v if math.isfinite(v) else None


def score_metrics(
    loaded: LoadedModel, image: Image.Image, expl: Explanation, job: MetricJob, watch: Watch
) -> list[dict[str, Any]]:
    """The metrics of ``expl``'s map of ``image`` (its first), in the order asked: name, column -> value (None
    where it is undefined), lower is better.

    Raises:
        CamkitError: a model that is not a classifier, a box outside the image.
    """
    if loaded.task != "classification" or expl.classes is None:
        raise CamkitError(
            f"metrics follow one class's score, so the app computes them for classifiers; {loaded.name!r} is a "
            f"{loaded.task} model: ask for no metric"
        )
    model, classes, maps = loaded.model, expl.classes[:1], expl.maps[:1].float()
    x = loaded.preprocess([image]).to(model_device(model))
    gt = _fit(job.boxes, image.size)
    forward = _Checked(model, watch, job.batch_size)
    values = dict(joint_scores(model, forward, x, {"map": maps}, classes, job.names, STEPS).get("map", {}))
    rest = [n for n in job.names if n not in JOINT]
    if rest:
        again = _Again(job, model, classes, watch)
        scorer = MetricScorer(model, forward, rest, STEPS, DEFAULT_BOX_THRESHOLD)
        more, curve = scorer(x, maps, classes, [gt], [image.size], lambda _f, _m: watch.check(), again.remap,
                             again.explain)  # fmt: skip
        values.update(more)
        if curve is not None:
            values[MAXBOXACC] = torch.tensor([max_box_acc_v2(curve, IOU_THRESHOLDS).value])
    return [
        {
            "name": name,
            "values": {col: _number(values[col]) for col in metric_columns(name) or (MAXBOXACC,)},
            "lower_is_better": metric_of(name).lower_is_better,
            "columns_lower_is_better": {
                col: metric_of(name).column_lower_is_better(col)
                for col in metric_columns(name) or (MAXBOXACC,)
            },
        }
        for name in job.names
    ]
