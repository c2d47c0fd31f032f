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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

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
    "CURVE",
    "DEFAULT_BOX_THRESHOLD",
    "DEFAULT_METRICS",
    "DEFAULT_STEPS",
    "IOU_THRESHOLDS",
    "METRICS",
    "Metric",
    "MetricBatch",
    "MetricScorer",
    "resolve_metrics",
]

#: The map thresholds of the MaxBoxAccV2 IoU curves (wsolevaluation's 0, 0.01, ..., 0.99).
IOU_THRESHOLDS: Tensor = torch.arange(0, 1, 0.01)

#: The default deletion/insertion steps (and the size of the Quantus family's perturbations, see below).
DEFAULT_STEPS = 50

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


@dataclass(frozen=True)
class Metric:
    """One metric of the registry.

    Attributes:
        columns: its per-image column(s) in a table of results (none for ``maxboxacc``, a value over all images).
        needs_boxes: it compares the maps with ground-truth boxes.
        lower_is_better: a lower value means a better map.
        compute: the values of one batch, column -> Tensor[B] (``maxboxacc``: :data:`CURVE` -> Tensor[B, T]);
            it may give more columns than its own (``avg_drop`` and ``increase`` come from one pass).
    """

    columns: tuple[str, ...]
    needs_boxes: bool
    lower_is_better: bool
    compute: Callable[[MetricBatch], dict[str, Tensor]] = field(repr=False, compare=False)


def _deletion(b: MetricBatch) -> dict[str, Tensor]:
    return {"deletion": deletion(b.model, b.x, b.maps, b.classes, steps=b.steps, forward=b.forward).auc}


def _insertion(b: MetricBatch) -> dict[str, Tensor]:
    return {"insertion": insertion(b.model, b.x, b.maps, b.classes, steps=b.steps, forward=b.forward).auc}


def _confidence(b: MetricBatch) -> dict[str, Tensor]:
    cc = confidence_change(b.model, b.x, b.maps, b.classes, forward=b.forward)
    return {"avg_drop": cc.drop, "increase": cc.increase}


def _road(b: MetricBatch) -> dict[str, Tensor]:
    return {
        "road_morf": road(b.model, b.x, b.maps, b.classes, forward=b.forward).mean_score,
        "road_lerf": road(b.model, b.x, b.maps, b.classes, order="lerf", forward=b.forward).mean_score,
    }


def _arcc(b: MetricBatch) -> dict[str, Tensor]:
    if b.remap is None:
        raise CamkitError(
            "arcc re-explains the inputs masked by the maps with their method: compute it from evaluate, run or "
            "report (or camkit.metrics.arcc with remap=...), not on maps without a method"
        )
    return {"arcc": arcc(b.model, b.x, b.maps, b.remap, b.classes, forward=b.forward).arcc}


def _pointing(b: MetricBatch) -> dict[str, Tensor]:
    return {"pointing": pointing_game(b.maps, b.boxes, image_sizes=b.sizes)}


def _pointing_strict(b: MetricBatch) -> dict[str, Tensor]:
    return {"pointing_strict": pointing_game(b.maps, b.boxes, tolerance=0, image_sizes=b.sizes)}


def _box(b: MetricBatch) -> dict[str, Tensor]:
    acc = box_accuracy(b.maps, b.boxes, threshold=b.box_threshold, image_sizes=b.sizes)
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
    runs, size = max(3, b.steps), min(224, max(1, b.maps[0].numel() // 4))
    value = faithfulness_correlation(b.model, b.x, b.maps, b.classes, runs, size, forward=b.forward)
    return {"faithfulness_correlation": value}


def _faith_est(b: MetricBatch) -> dict[str, Tensor]:
    value = faithfulness_estimate(b.model, b.x, b.maps, b.classes, _group(b), forward=b.forward)
    return {"faithfulness_estimate": value}


def _mono_arya(b: MetricBatch) -> dict[str, Tensor]:
    return {
        "monotonicity_arya": monotonicity_arya(b.model, b.x, b.maps, b.classes, _group(b), forward=b.forward)
    }


def _mono_nguyen(b: MetricBatch) -> dict[str, Tensor]:
    value = monotonicity_nguyen(b.model, b.x, b.maps, b.classes, 5, _group(b), forward=b.forward)
    return {"monotonicity_nguyen": value}


def _sens_n(b: MetricBatch) -> dict[str, Tensor]:
    value = sensitivity_n(b.model, b.x, b.maps, b.classes, runs=max(3, b.steps), forward=b.forward).mean
    return {"sensitivity_n": value}


def _infidelity(b: MetricBatch) -> dict[str, Tensor]:
    return {"infidelity": infidelity(b.model, b.x, b.maps, b.classes, (_square(b),), forward=b.forward)}


def _pixel_flipping(b: MetricBatch) -> dict[str, Tensor]:
    curve = pixel_flipping(b.model, b.x, b.maps, b.classes, _group(b), forward=b.forward)
    return {"pixel_flipping": curve.auc}


def _region(b: MetricBatch) -> dict[str, Tensor]:
    curve = region_perturbation(b.model, b.x, b.maps, b.classes, _square(b), forward=b.forward)
    return {"region_perturbation": curve.aopc}


def _selectivity(b: MetricBatch) -> dict[str, Tensor]:
    return {"selectivity": selectivity(b.model, b.x, b.maps, b.classes, _square(b), forward=b.forward).auc}


def _irof(b: MetricBatch) -> dict[str, Tensor]:
    return {"irof": irof(b.model, b.x, b.maps, b.classes, forward=b.forward).aoc}


def _sensitivity(b: MetricBatch) -> dict[str, Tensor]:
    if b.remap is None:
        raise CamkitError(
            "max_sensitivity and avg_sensitivity re-explain perturbed inputs with the maps' method: compute them "
            "from evaluate, run or report (or camkit.metrics.sensitivity with remap=...), not on maps alone"
        )
    result = sensitivity(b.model, b.x, b.maps, b.remap, samples=max(2, min(10, b.steps)), forward=b.forward)
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
    return {"top_k": top_k_intersection(b.maps, _mask(b))}


def _sparseness(b: MetricBatch) -> dict[str, Tensor]:
    return {"sparseness": sparseness(b.maps)}


def _entropy(b: MetricBatch) -> dict[str, Tensor]:
    return {"entropy": entropy_complexity(b.maps)}


def _effective_complexity(b: MetricBatch) -> dict[str, Tensor]:
    return {"effective_complexity": effective_complexity(b.maps)}


def _need_explain(b: MetricBatch, name: str) -> Explainer:
    if b.explain is None:
        raise CamkitError(
            f"{name} explains again with the maps' method: compute it from evaluate, run or report (or "
            f"camkit.metrics.{name} with explain=...), not on maps without a method"
        )
    return b.explain


def _random_logit(b: MetricBatch) -> dict[str, Tensor]:
    explain = _need_explain(b, "random_logit")
    return {"random_logit": random_logit(b.model, b.x, b.maps, explain, b.classes, forward=b.forward)}


def _mprt(b: MetricBatch) -> dict[str, Tensor]:
    result = mprt(b.model, b.x, b.maps, _need_explain(b, "mprt"), b.classes, forward=b.forward)
    return {"mprt": result.mean, "mprt_last": result.last}


#: name -> :class:`Metric`, in the order they are computed.
METRICS: dict[str, Metric] = {
    "deletion": Metric(("deletion",), False, True, _deletion),
    "insertion": Metric(("insertion",), False, False, _insertion),
    "avg_drop": Metric(("avg_drop",), False, True, _confidence),
    "increase": Metric(("increase",), False, False, _confidence),
    "road": Metric(("road_morf", "road_lerf"), False, True, _road),
    "arcc": Metric(("arcc",), False, False, _arcc),
    "pointing": Metric(("pointing",), True, False, _pointing),
    "pointing_strict": Metric(("pointing_strict",), True, False, _pointing_strict),
    "box": Metric(("box_iou", "box_acc"), True, False, _box),
    "maxboxacc": Metric((), True, False, _maxboxacc),
    # the Quantus family
    "faithfulness_correlation": Metric(("faithfulness_correlation",), False, False, _faith_corr),
    "faithfulness_estimate": Metric(("faithfulness_estimate",), False, False, _faith_est),
    "monotonicity_arya": Metric(("monotonicity_arya",), False, False, _mono_arya),
    "monotonicity_nguyen": Metric(("monotonicity_nguyen",), False, False, _mono_nguyen),
    "sensitivity_n": Metric(("sensitivity_n",), False, False, _sens_n),
    "infidelity": Metric(("infidelity",), False, True, _infidelity),
    "pixel_flipping": Metric(("pixel_flipping",), False, True, _pixel_flipping),
    "region_perturbation": Metric(("region_perturbation",), False, False, _region),
    "selectivity": Metric(("selectivity",), False, True, _selectivity),
    "irof": Metric(("irof",), False, False, _irof),
    "max_sensitivity": Metric(("max_sensitivity",), False, True, _sensitivity),
    "avg_sensitivity": Metric(("avg_sensitivity",), False, True, _sensitivity),
    # against the mask of the boxes (metrics/mask.py)
    "energy_pointing": Metric(("energy_pointing",), True, False, _energy_pointing),
    "relevance_mass": Metric(("relevance_mass",), True, False, _relevance_mass),
    "relevance_rank": Metric(("relevance_rank",), True, False, _relevance_rank),
    "mask_auc": Metric(("mask_auc",), True, False, _mask_auc),
    "top_k": Metric(("top_k",), True, False, _top_k),
    # complexity of the map alone (metrics/map_complexity.py)
    "sparseness": Metric(("sparseness",), False, False, _sparseness),
    "entropy": Metric(("entropy",), False, True, _entropy),
    "effective_complexity": Metric(("effective_complexity",), False, True, _effective_complexity),
    # explaining again: other classes, re-initialised models (metrics/randomisation.py)
    "random_logit": Metric(("random_logit",), False, True, _random_logit),
    "mprt": Metric(("mprt", "mprt_last"), False, True, _mprt),
}

#: The metrics chosen when none are named (the box metrics join them when there are boxes).
DEFAULT_METRICS = ("deletion", "insertion", "avg_drop", "increase")


def resolve_metrics(names: Sequence[str] | None, have_boxes: bool) -> list[str]:
    """The metric names to compute, in the order given, without repeats.

    Args:
        names: names of :data:`METRICS` (case and ``-``/``_`` free) or ``all`` (every metric, the box ones when
            there are boxes); None: :data:`DEFAULT_METRICS`, and the box metrics when there are boxes.
        have_boxes: ground-truth boxes are known.

    Raises:
        CamkitError: an unknown name, or a box metric without boxes.
    """
    box_metrics = [k for k, m in METRICS.items() if m.needs_boxes]
    if names is None:
        return list(DEFAULT_METRICS) + (box_metrics if have_boxes else [])
    out: list[str] = []
    for m in names:
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


def _passes(chosen: Sequence[str]) -> list[str]:
    """The chosen metrics to compute, in registry order, leaving out those whose columns an earlier one gives
    (``increase`` after ``avg_drop``: one pass)."""
    out: list[str] = []
    for name, metric in METRICS.items():
        if name not in chosen:
            continue
        if any(metric.compute is METRICS[done].compute for done in out):
            continue
        out.append(name)
    return out


@dataclass
class MetricScorer:
    """The per-image metrics of one batch of maps: the one dispatcher behind ``camkit evaluate``
    (:func:`camkit.evaluate.evaluate`), ``camkit run`` (:class:`camkit.run.Explainer`) and ``camkit report``.

    Attributes:
        model: the classifier (in eval mode).
        forward: how the perturbed images reach the model (:class:`camkit.metrics.Forward`, in chunks).
        chosen: metric names of :data:`METRICS`.
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
        for i, name in enumerate(passes, 1):
            values.update(METRICS[name].compute(batch))
            if tick is not None:
                tick(i / len(passes), name)
        return values, values.pop(CURVE, None)
