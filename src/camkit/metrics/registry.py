"""The metric registry: every metric that ``camkit evaluate``, ``camkit run``, ``camkit report`` and the web app
(``camkit serve``) compute per batch of maps, by name, with its columns and how it is computed. A new metric is one
:class:`Metric` entry in :data:`METRICS`; :class:`MetricScorer` is the one dispatcher the three commands and the
app share, so their numbers cannot drift apart.

>>> from camkit.metrics.registry import METRICS, MetricBatch, MetricScorer
>>> METRICS["road"].columns
('road_morf', 'road_lerf')
>>> values, curves = MetricScorer(model, Forward(model), ["deletion", "box"], steps=50, box_threshold=0.2)(
...     x, maps, classes, gt_boxes, image_sizes)
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from camkit.core.spec import parse_spec
from camkit.errors import CamkitError
from camkit.metrics._common import Forward
from camkit.metrics.arcc import arcc
from camkit.metrics.correlation import (
    faithfulness_correlation,
    faithfulness_estimate,
    infidelity,
    monotonicity_arya,
    monotonicity_nguyen,
    sensitivity_n,
)
from camkit.metrics.faithfulness import confidence_change, deletion, insertion, road
from camkit.metrics.localization import box_accuracy, iou_curves, pointing_game
from camkit.metrics.map_complexity import effective_complexity, entropy_complexity, sparseness
from camkit.metrics.mask import (
    box_mask,
    energy_pointing_game,
    mask_auc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)
from camkit.metrics.randomisation import Explainer, mprt, random_logit
from camkit.metrics.regions import irof, pixel_flipping, region_perturbation, selectivity
from camkit.metrics.robustness import sensitivity

__all__ = [
    "BY_STEPS",
    "CURVE",
    "DEFAULT_BOX_THRESHOLD",
    "DEFAULT_METRICS",
    "DEFAULT_STEPS",
    "IOU_THRESHOLDS",
    "METRICS",
    "Metric",
    "MetricBatch",
    "MetricScorer",
    "check_settings",
    "metric_columns",
    "metric_key",
    "metric_of",
    "parse_metric",
    "resolve_metrics",
    "settings_table",
]

#: The map thresholds of the MaxBoxAccV2 IoU curves (wsolevaluation's 0, 0.01, ..., 0.99).
IOU_THRESHOLDS: Tensor = torch.arange(0, 1, 0.01)

#: The default deletion/insertion steps (and the size of the Quantus family's perturbations, see below).
DEFAULT_STEPS = 50

#: The samples of ``monotonicity_nguyen`` (its function's default is 100).
NGUYEN_SAMPLES = 5

#: The default map threshold (fraction of the max) of the ``box`` metric.
DEFAULT_BOX_THRESHOLD = 0.2

#: The value key of the per-image IoU curves (``maxboxacc``: a value over the whole data set, made from them).
CURVE = "iou_curve"


@dataclass(frozen=True)
class MetricBatch:
    """One batch of maps to score and what the metrics need with it.

    Attributes:
        model: the classifier (in eval mode).
        forward: how perturbed images reach the model (in chunks, counted).
        x: the model inputs, Tensor[B, C, H, W].
        maps: the maps, Tensor[B, H, W] at the input size.
        classes: the explained classes, LongTensor[B] (None: each image's top-1).
        boxes: per image, its ground-truth boxes (x0, y0, x1, y1) in original-image pixels (may be empty).
        sizes: per image, its original (width, height).
        steps: deletion/insertion steps.
        box_threshold: map threshold (fraction of the max) of ``box``.
        thresholds: the map thresholds of the ``maxboxacc`` IoU curves.
        remap: the method's maps of other inputs for the same classes (``arcc``'s coherency explains the inputs
            masked by the maps with it); None where the caller has no method to run.
        explain: the method's maps for any model, inputs and classes, ``explain(model, x, classes)``
            (``random_logit`` explains other classes, ``mprt`` re-initialised copies of the model); None where the
            caller has no method to run.
        settings: the settings of the metric being computed that differ from its defaults (:attr:`Metric.settings`),
            passed to its function as keyword arguments.
    """

    model: nn.Module
    forward: Forward
    x: Tensor
    maps: Tensor
    classes: Tensor | None
    boxes: Sequence[Sequence[Sequence[float]]]
    sizes: Sequence[tuple[int, int]]
    steps: int = DEFAULT_STEPS
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    thresholds: Tensor = field(default_factory=lambda: IOU_THRESHOLDS.clone())
    remap: Callable[[Tensor], Tensor] | None = None
    explain: Explainer | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


class BySteps:
    """The default of a setting that the registry sizes from ``steps`` and the image's size unless it is given
    (shown as ``auto``; docs/evaluation.md)."""

    def __repr__(self) -> str:
        return "auto"


#: The default of the settings sized by ``steps`` (:class:`BySteps`).
BY_STEPS = BySteps()


@dataclass(frozen=True)
class Metric:
    """One metric of the registry.

    Attributes:
        columns: its per-image column(s) in a table of results (none for ``maxboxacc``, a value over all images).
        needs_boxes: it compares the maps with ground-truth boxes.
        lower_is_better: a lower value means a better map (for every column but ``higher_columns``).
        compute: the values of one batch, column -> Tensor[B] (``maxboxacc``: :data:`CURVE` -> Tensor[B, T]);
            it may give more columns than its own (``avg_drop`` and ``increase`` come from one pass).
        settings: its settings, name -> default: keyword arguments of its function
            (``infidelity(perturbation=gaussian)``; :data:`BY_STEPS`: sized from ``steps`` unless given).
        higher_columns: the columns where, against ``lower_is_better``, a higher value is better (ROAD's LeRF).
    """

    columns: tuple[str, ...]
    needs_boxes: bool
    lower_is_better: bool
    compute: Callable[[MetricBatch], dict[str, Tensor]] = field(repr=False, compare=False)
    settings: Mapping[str, object] = field(default_factory=dict)
    higher_columns: tuple[str, ...] = ()

    def column_lower_is_better(self, column: str) -> bool:
        """Whether a lower value of this column (a configured metric's too: ``road_lerf(noise=0.05)``) is better."""
        return self.lower_is_better and column.partition("(")[0] not in self.higher_columns


def _deletion(b: MetricBatch) -> dict[str, Tensor]:
    s = {"steps": b.steps, **b.settings}
    return {"deletion": deletion(b.model, b.x, b.maps, b.classes, forward=b.forward, **s).auc}


def _insertion(b: MetricBatch) -> dict[str, Tensor]:
    s = {"steps": b.steps, **b.settings}
    return {"insertion": insertion(b.model, b.x, b.maps, b.classes, forward=b.forward, **s).auc}


def _confidence(b: MetricBatch) -> dict[str, Tensor]:
    cc = confidence_change(b.model, b.x, b.maps, b.classes, forward=b.forward, **b.settings)
    return {"avg_drop": cc.drop, "increase": cc.increase}


def _road(b: MetricBatch) -> dict[str, Tensor]:
    s = b.settings
    return {
        "road_morf": road(b.model, b.x, b.maps, b.classes, forward=b.forward, **s).mean_score,
        "road_lerf": road(b.model, b.x, b.maps, b.classes, order="lerf", forward=b.forward, **s).mean_score,
    }


def _arcc(b: MetricBatch) -> dict[str, Tensor]:
    if b.remap is None:
        raise CamkitError(
            "arcc re-explains the inputs masked by the maps with their method: compute it from evaluate, run or "
            "report (or camkit.metrics.arcc with remap=...), not on maps without a method"
        )
    return {"arcc": arcc(b.model, b.x, b.maps, b.remap, b.classes, forward=b.forward, **b.settings).arcc}


def _pointing(b: MetricBatch) -> dict[str, Tensor]:
    return {"pointing": pointing_game(b.maps, b.boxes, image_sizes=b.sizes, **b.settings)}


def _pointing_strict(b: MetricBatch) -> dict[str, Tensor]:
    return {"pointing_strict": pointing_game(b.maps, b.boxes, tolerance=0, image_sizes=b.sizes)}


def _box(b: MetricBatch) -> dict[str, Tensor]:
    acc = box_accuracy(b.maps, b.boxes, threshold=b.box_threshold, image_sizes=b.sizes, **b.settings)
    return {"box_iou": acc.iou, "box_acc": acc.correct}


def _maxboxacc(b: MetricBatch) -> dict[str, Tensor]:
    return {CURVE: iou_curves(b.maps, b.boxes, b.thresholds, image_sizes=b.sizes)}


# The Quantus family (camkit/metrics/correlation.py, regions.py, robustness.py), sized by ``steps``: about
# ``steps`` groups of pixels, squares, runs or samples per image (see docs/evaluation.md), seed 0.


def _group(b: MetricBatch) -> int:
    """Pixels per step so that an image takes about ``steps`` steps."""
    return max(1, math.ceil(b.maps[0].numel() / b.steps))


def _square(b: MetricBatch) -> int:
    """The side of the squares so that an image has about ``steps`` of them."""
    return max(1, math.ceil(math.sqrt(b.maps[0].numel() / b.steps)))


def _faith_corr(b: MetricBatch) -> dict[str, Tensor]:
    s = {"runs": max(3, b.steps), "subset_size": min(224, max(1, b.maps[0].numel() // 4)), **b.settings}
    value = faithfulness_correlation(b.model, b.x, b.maps, b.classes, forward=b.forward, **s)
    return {"faithfulness_correlation": value}


def _faith_est(b: MetricBatch) -> dict[str, Tensor]:
    s = {"features_in_step": _group(b), **b.settings}
    value = faithfulness_estimate(b.model, b.x, b.maps, b.classes, forward=b.forward, **s)
    return {"faithfulness_estimate": value}


def _mono_arya(b: MetricBatch) -> dict[str, Tensor]:
    s = {"features_in_step": _group(b), **b.settings}
    return {"monotonicity_arya": monotonicity_arya(b.model, b.x, b.maps, b.classes, forward=b.forward, **s)}


def _mono_nguyen(b: MetricBatch) -> dict[str, Tensor]:
    s = {"samples": NGUYEN_SAMPLES, "features_in_step": _group(b), **b.settings}
    value = monotonicity_nguyen(b.model, b.x, b.maps, b.classes, forward=b.forward, **s)
    return {"monotonicity_nguyen": value}


def _sens_n(b: MetricBatch) -> dict[str, Tensor]:
    s = {"runs": max(3, b.steps), **b.settings}
    value = sensitivity_n(b.model, b.x, b.maps, b.classes, forward=b.forward, **s).mean
    return {"sensitivity_n": value}


def _infidelity(b: MetricBatch) -> dict[str, Tensor]:
    s = {"patch_sizes": (_square(b),), **b.settings}
    return {"infidelity": infidelity(b.model, b.x, b.maps, b.classes, forward=b.forward, **s)}


def _pixel_flipping(b: MetricBatch) -> dict[str, Tensor]:
    s = {"features_in_step": _group(b), **b.settings}
    curve = pixel_flipping(b.model, b.x, b.maps, b.classes, forward=b.forward, **s)
    return {"pixel_flipping": curve.auc}


def _region(b: MetricBatch) -> dict[str, Tensor]:
    s = {"patch_size": _square(b), **b.settings}
    curve = region_perturbation(b.model, b.x, b.maps, b.classes, forward=b.forward, **s)
    return {"region_perturbation": curve.aopc}


def _selectivity(b: MetricBatch) -> dict[str, Tensor]:
    s = {"patch_size": _square(b), **b.settings}
    return {"selectivity": selectivity(b.model, b.x, b.maps, b.classes, forward=b.forward, **s).auc}


def _irof(b: MetricBatch) -> dict[str, Tensor]:
    return {"irof": irof(b.model, b.x, b.maps, b.classes, forward=b.forward, **b.settings).aoc}


def _sensitivity(b: MetricBatch) -> dict[str, Tensor]:
    if b.remap is None:
        raise CamkitError(
            "max_sensitivity and avg_sensitivity re-explain perturbed inputs with the maps' method: compute them "
            "from evaluate, run or report (or camkit.metrics.sensitivity with remap=...), not on maps alone"
        )
    s = {"samples": max(2, min(10, b.steps)), **b.settings}
    result = sensitivity(b.model, b.x, b.maps, b.remap, forward=b.forward, **s)
    return {"max_sensitivity": result.max, "avg_sensitivity": result.mean}


def _mask(b: MetricBatch) -> Tensor:
    """The union of each image's boxes at the maps' size (:func:`camkit.metrics.mask.box_mask`)."""
    h, w = b.maps.shape[-2:]
    return box_mask(b.boxes, (h, w), image_sizes=b.sizes, device=b.maps.device)


def _energy_pointing(b: MetricBatch) -> dict[str, Tensor]:
    return {"energy_pointing": energy_pointing_game(b.maps, _mask(b))}


def _relevance_mass(b: MetricBatch) -> dict[str, Tensor]:
    return {"relevance_mass": relevance_mass_accuracy(b.maps, _mask(b))}


def _relevance_rank(b: MetricBatch) -> dict[str, Tensor]:
    return {"relevance_rank": relevance_rank_accuracy(b.maps, _mask(b))}


def _mask_auc(b: MetricBatch) -> dict[str, Tensor]:
    return {"mask_auc": mask_auc(b.maps, _mask(b))}


def _top_k(b: MetricBatch) -> dict[str, Tensor]:
    return {"top_k": top_k_intersection(b.maps, _mask(b), **b.settings)}


def _sparseness(b: MetricBatch) -> dict[str, Tensor]:
    return {"sparseness": sparseness(b.maps)}


def _entropy(b: MetricBatch) -> dict[str, Tensor]:
    return {"entropy": entropy_complexity(b.maps)}


def _effective_complexity(b: MetricBatch) -> dict[str, Tensor]:
    return {"effective_complexity": effective_complexity(b.maps, **b.settings)}


def _need_explain(b: MetricBatch, name: str) -> Explainer:
    if b.explain is None:
        raise CamkitError(
            f"{name} explains again with the maps' method: compute it from evaluate, run or report (or "
            f"camkit.metrics.{name} with explain=...), not on maps without a method"
        )
    return b.explain


def _random_logit(b: MetricBatch) -> dict[str, Tensor]:
    explain = _need_explain(b, "random_logit")
    value = random_logit(b.model, b.x, b.maps, explain, b.classes, forward=b.forward, **b.settings)
    return {"random_logit": value}


def _mprt(b: MetricBatch) -> dict[str, Tensor]:
    result = mprt(b.model, b.x, b.maps, _need_explain(b, "mprt"), b.classes, forward=b.forward, **b.settings)
    return {"mprt": result.mean, "mprt_last": result.last}


def _settings(fn: Callable[..., object], names: str, **own: object) -> dict[str, object]:
    """A metric's settings: ``names`` (space-separated keyword arguments of ``fn``) with ``fn``'s defaults, then
    ``own`` (the registry's own defaults, :data:`BY_STEPS` for those sized from ``steps``)."""
    params = inspect.signature(fn).parameters
    return {**own, **{name: params[name].default for name in names.split()}}


_CONFIDENCE = _settings(confidence_change, "baseline score")
_SENSITIVITY = _settings(sensitivity, "radius seed nan_when_prediction_changes", samples=BY_STEPS)

#: name -> :class:`Metric`, in the order they are computed.
METRICS: dict[str, Metric] = {
    "deletion": Metric(
        ("deletion",), False, True, _deletion, _settings(deletion, "baseline score", steps=BY_STEPS)
    ),
    "insertion": Metric(
        ("insertion",), False, False, _insertion, _settings(insertion, "baseline score", steps=BY_STEPS)
    ),
    "avg_drop": Metric(("avg_drop",), False, True, _confidence, _CONFIDENCE),
    "increase": Metric(("increase",), False, False, _confidence, _CONFIDENCE),
    "road": Metric(
        ("road_morf", "road_lerf"),
        False,
        True,
        _road,
        _settings(road, "percentages noise seed score"),
        higher_columns=("road_lerf",),
    ),
    "arcc": Metric(("arcc",), False, False, _arcc, _settings(arcc, "percentages noise seed")),
    "pointing": Metric(("pointing",), True, False, _pointing, _settings(pointing_game, "tolerance")),
    "pointing_strict": Metric(("pointing_strict",), True, False, _pointing_strict),
    "box": Metric(("box_iou", "box_acc"), True, False, _box, _settings(box_accuracy, "iou_threshold")),
    "maxboxacc": Metric((), True, False, _maxboxacc),
    # the Quantus family
    "faithfulness_correlation": Metric(
        ("faithfulness_correlation",),
        False,
        False,
        _faith_corr,
        _settings(
            faithfulness_correlation, "baseline score seed similarity", runs=BY_STEPS, subset_size=BY_STEPS
        ),
    ),
    "faithfulness_estimate": Metric(
        ("faithfulness_estimate",),
        False,
        False,
        _faith_est,
        _settings(faithfulness_estimate, "baseline score similarity seed", features_in_step=BY_STEPS),
    ),
    "monotonicity_arya": Metric(
        ("monotonicity_arya",),
        False,
        False,
        _mono_arya,
        _settings(monotonicity_arya, "baseline score", features_in_step=BY_STEPS),
    ),
    "monotonicity_nguyen": Metric(
        ("monotonicity_nguyen",),
        False,
        False,
        _mono_nguyen,
        _settings(
            monotonicity_nguyen,
            "baseline eps score seed similarity",
            samples=NGUYEN_SAMPLES,
            features_in_step=BY_STEPS,
        ),
    ),
    "sensitivity_n": Metric(
        ("sensitivity_n",),
        False,
        False,
        _sens_n,
        _settings(sensitivity_n, "fractions baseline score seed", runs=BY_STEPS),
    ),
    "infidelity": Metric(
        ("infidelity",),
        False,
        True,
        _infidelity,
        _settings(
            infidelity, "baseline score perturbation samples noise_mean noise_std seed", patch_sizes=BY_STEPS
        ),
    ),
    "pixel_flipping": Metric(
        ("pixel_flipping",),
        False,
        True,
        _pixel_flipping,
        _settings(pixel_flipping, "baseline score seed", features_in_step=BY_STEPS),
    ),
    "region_perturbation": Metric(
        ("region_perturbation",),
        False,
        False,
        _region,
        _settings(region_perturbation, "order regions baseline score seed", patch_size=BY_STEPS),
    ),
    "selectivity": Metric(
        ("selectivity",),
        False,
        True,
        _selectivity,
        _settings(selectivity, "baseline score seed", patch_size=BY_STEPS),
    ),
    "irof": Metric(("irof",), False, False, _irof, _settings(irof, "baseline score segmentation")),
    "max_sensitivity": Metric(("max_sensitivity",), False, True, _sensitivity, _SENSITIVITY),
    "avg_sensitivity": Metric(("avg_sensitivity",), False, True, _sensitivity, _SENSITIVITY),
    # against the mask of the boxes (metrics/mask.py)
    "energy_pointing": Metric(("energy_pointing",), True, False, _energy_pointing),
    "relevance_mass": Metric(("relevance_mass",), True, False, _relevance_mass),
    "relevance_rank": Metric(("relevance_rank",), True, False, _relevance_rank),
    "mask_auc": Metric(("mask_auc",), True, False, _mask_auc),
    "top_k": Metric(("top_k",), True, False, _top_k, _settings(top_k_intersection, "k concept_influence")),
    # complexity of the map alone (metrics/map_complexity.py)
    "sparseness": Metric(("sparseness",), False, False, _sparseness),
    "entropy": Metric(("entropy",), False, True, _entropy),
    "effective_complexity": Metric(
        ("effective_complexity",), False, True, _effective_complexity, _settings(effective_complexity, "eps")
    ),
    # explaining again: other classes, re-initialised models (metrics/randomisation.py)
    "random_logit": Metric(("random_logit",), False, True, _random_logit, _settings(random_logit, "seed")),
    "mprt": Metric(("mprt", "mprt_last"), False, True, _mprt, _settings(mprt, "seed layer_order")),
}

#: The metrics chosen when none are named (the box metrics join them when there are boxes).
DEFAULT_METRICS = ("deletion", "insertion", "avg_drop", "increase")


def resolve_metrics(names: Sequence[str] | None, have_boxes: bool) -> list[str]:
    """The metric keys to compute, in the order given, without repeats: a metric's name, or its spec with the
    settings that differ from its defaults (``infidelity(perturbation=gaussian,samples=5)``, :func:`metric_key`),
    which is also the prefix of its columns (:func:`metric_columns`).

    Args:
        names: names or specs (``name(key=value, ...)``) of :data:`METRICS` (case and ``-``/``_`` free) or ``all``
            (every metric, the box ones when there are boxes); None: :data:`DEFAULT_METRICS`, and the box metrics
            when there are boxes.
        have_boxes: ground-truth boxes are known.

    Raises:
        CamkitError: an unknown name, an unknown setting or a value its function refuses (:func:`check_settings`),
            or a box metric without boxes.
    """
    box_metrics = [k for k, m in METRICS.items() if m.needs_boxes]
    if names is None:
        return list(DEFAULT_METRICS) + (box_metrics if have_boxes else [])
    out: list[str] = []
    for m in names:
        raw, settings = parse_spec(m, "metric")
        key = raw.strip().lower().replace("-", "_")
        if key == "all" and settings is None:
            out.extend(k for k in METRICS if have_boxes or not METRICS[k].needs_boxes)
            continue
        if key not in METRICS:
            raise CamkitError(f"unknown metric {raw!r}; choose from {', '.join(METRICS)} (or all)")
        if METRICS[key].needs_boxes and not have_boxes:
            raise CamkitError(f"metric {raw!r} needs ground-truth boxes: pass an annotation file with boxes")
        out.append(check_settings(key, settings or {}))
    return list(dict.fromkeys(out))


def metric_key(name: str, settings: Mapping[str, object]) -> str:
    """The key of metric ``name`` with ``settings``: ``name`` alone when they are its defaults, else
    ``name(key=value,...)`` with the settings that differ, in the order of :attr:`Metric.settings` (a spec that
    :func:`parse_metric` reads back)."""
    declared = METRICS[name].settings
    given = [(k, settings[k]) for k in declared if k in settings and not _same(settings[k], declared[k])]
    if not given:
        return name
    return f"{name}({','.join(f'{k}={_text(v)}' for k, v in given)})"


def parse_metric(key: str) -> tuple[str, dict[str, object]]:
    """A metric key (:func:`resolve_metrics`) -> its name in :data:`METRICS` and its settings that differ from
    the defaults."""
    name, settings = parse_spec(key, "metric")
    return name, dict(settings or {})


def metric_of(key: str) -> Metric:
    """The :class:`Metric` of a metric key (a name or a configured spec)."""
    return METRICS[parse_metric(key)[0]]


def metric_columns(key: str) -> tuple[str, ...]:
    """The columns of a metric key: the metric's own, each followed by the key's settings when it has some
    (``infidelity(perturbation=gaussian)``; ``road(noise=0.05)``: ``road_morf(noise=0.05)``,
    ``road_lerf(noise=0.05)``), so that a configured metric never shares a column with the default one."""
    name = parse_metric(key)[0]
    suffix = key[len(name) :]
    return tuple(col + suffix for col in METRICS[name].columns)


def _same(a: object, b: object) -> bool:
    if isinstance(b, BySteps) or type(a) is bool or type(b) is bool:
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return (type(a) is type(b) and a == b) or (
        isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b
    )


def _text(value: object) -> str:
    """A setting's value as a spec writes it: bare words bare, sequences in brackets without spaces."""
    if isinstance(value, str) and value.isidentifier() and value not in ("True", "False", "None"):
        return value
    if isinstance(value, (list, tuple)):
        items = ",".join(_text(v) for v in value) + (
            "," if isinstance(value, tuple) and len(value) == 1 else ""
        )
        return f"({items})" if isinstance(value, tuple) else f"[{items}]"
    return repr(value)


def check_settings(name: str, settings: Mapping[str, object]) -> str:
    """Check a metric's settings before any model is loaded, and give its key (:func:`metric_key`): each name
    must be one of :attr:`Metric.settings`, and the metric's function must accept the values (it runs once on
    a small random model and image, and its own message is the error).

    Raises:
        CamkitError: an unknown setting (naming the metric's settings and the closest one), or a value the
            function refuses.
    """
    declared = METRICS[name].settings
    for key in settings:
        if key not in declared:
            if not declared:
                raise CamkitError(f"metric {name!r} has no settings; write {name} alone")
            close = difflib.get_close_matches(key, list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CamkitError(
                f"metric {name!r} has no setting {key!r}{hint}; its settings: {', '.join(declared)}"
            )
    for key, value in settings.items():
        if key in _COUNTS and value is not None and (type(value) is not int or value < 1):
            raise CamkitError(f"{name}({key}={_text(value)}): {key} must be an int >= 1, got {value!r}")
    key = metric_key(name, settings)
    if key != name:
        _try_settings(name, key, parse_metric(key)[1])
    return key


def _try_settings(name: str, key: str, settings: Mapping[str, object]) -> None:
    """Run metric ``name`` with ``settings`` on a small random model and image; its refusal is a CamkitError."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)
        )
        x, maps = torch.rand(1, 3, 32, 32), torch.rand(1, 32, 32)
        batch = MetricBatch(model.eval(), Forward(model), x, maps, None, [[[4, 4, 20, 20]]], [(32, 32)], steps=4,
                            remap=lambda z: torch.rand(z.shape[0], 32, 32),
                            explain=lambda _m, z, _c: torch.rand(z.shape[0], 32, 32), settings=_small(settings))  # fmt: skip
        try:
            with torch.no_grad():
                METRICS[name].compute(batch)
        except CamkitError as err:
            raise CamkitError(f"{key}: {err}") from err
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            raise CamkitError(
                f"{key}: a setting's value is refused ({err}); the settings and their defaults: docs/metrics.md"
            ) from err


def settings_table() -> str:
    """The Markdown table of every metric's settings and their defaults (docs/metrics.md, "Settings")."""
    lines = ["| metric | settings (default) |", "| --- | --- |"]
    for name, metric in METRICS.items():
        cells = ", ".join(f"`{k}` ({_text(v) if not isinstance(v, BySteps) else 'auto'})" for k, v in
                          metric.settings.items())  # fmt: skip
        lines.append(f"| `{name}` | {cells or 'none'} |")
    return "\n".join(lines) + "\n"


#: Settings that count repetitions: checked with at most 2 of them (a valid count stays valid, the check stays fast).
_COUNTS = ("samples", "runs", "regions", "steps")


def _small(settings: Mapping[str, object]) -> dict[str, object]:
    """``settings`` with the counts of :data:`_COUNTS` above 2 lowered to 2, for the check run."""
    return {
        k: 2 if k in _COUNTS and type(v) is int and v > 2 else v  # bool is no count
        for k, v in settings.items()
    }


def _passes(chosen: Sequence[str]) -> list[str]:
    """The chosen metric keys to compute, in registry order (configured keys after their metric's default),
    leaving out those whose columns an earlier one gives (``increase`` after ``avg_drop`` with the same
    settings: one pass)."""
    order = {name: i for i, name in enumerate(METRICS)}
    keys = sorted(dict.fromkeys(chosen), key=lambda k: order[parse_metric(k)[0]])
    out: list[str] = []
    for key in keys:
        name, settings = parse_metric(key)
        if any(
            METRICS[name].compute is METRICS[parse_metric(done)[0]].compute
            and parse_metric(done)[1] == settings
            for done in out
        ):
            continue
        out.append(key)
    return out


@dataclass
class MetricScorer:
    """The per-image metrics of one batch of maps: the one dispatcher behind ``camkit evaluate``
    (:func:`camkit.evaluate.evaluate`), ``camkit run`` (:class:`camkit.run.Explainer`) and ``camkit report``.

    Attributes:
        model: the classifier (in eval mode).
        forward: how the perturbed images reach the model (:class:`camkit.metrics.Forward`, in chunks).
        chosen: metric keys: names of :data:`METRICS` or configured specs (:func:`resolve_metrics`).
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
        classes: Tensor | None,
        gt: Sequence[Sequence[Sequence[float]]],
        sizes: Sequence[tuple[int, int]],
        tick: Callable[[float, str], None] | None = None,
        remap: Callable[[Tensor], Tensor] | None = None,
        explain: Explainer | None = None,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Metric column -> Tensor[B] of values, and the IoU curves of ``maxboxacc`` (None when not chosen);
        ``tick(fraction done, metric)`` after each metric; ``remap``: the maps' method on other inputs, for the
        same classes (``arcc``); ``explain``: the maps' method for any model, inputs and classes
        (``random_logit``, ``mprt``)."""
        batch = MetricBatch(
            self.model,
            self.forward,
            x,
            maps,
            classes,
            gt,
            sizes,
            self.steps,
            self.box_threshold,
            self.thresholds,
            remap,
            explain,
        )
        passes = _passes(self.chosen)
        values: dict[str, Tensor] = {}
        for i, key in enumerate(passes, 1):
            name, settings = parse_metric(key)
            got = METRICS[name].compute(replace(batch, settings=settings))
            suffix = key[len(name) :]
            values.update({col if col == CURVE else col + suffix: v for col, v in got.items()})
            if tick is not None:
                tick(i / len(passes), key)
        return values, values.pop(CURVE, None)
