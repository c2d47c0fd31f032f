"""Metrics for judging maps: faithfulness, localization against boxes, and the sanity check.

>>> from camkit import metrics
>>> curve = metrics.deletion(model, x, expl.maps)          # RISE deletion, .auc per image (lower is better)
>>> metrics.pointing_game(expl.maps, gt_boxes, image_sizes=[im.size for im in expl.images])
>>> metrics.cascading_randomization(model, images, method="gradcam").correlation
>>> metrics.faithfulness_correlation(model, x, expl.maps)   # the Quantus family: correlation, regions, robustness
>>> metrics.mask_auc(expl.maps, metrics.box_mask(gt_boxes, expl.maps.shape[-2:], image_sizes=sizes))
>>> metrics.sparseness(expl.maps)                           # Gini index; entropy_complexity, effective_complexity

:data:`METRICS` (:mod:`camkit.metrics.registry`) names the metrics that ``camkit evaluate``, ``camkit run`` and
``camkit report`` compute per batch of maps, and :class:`MetricScorer` computes them: a new metric is added there.
"""

from camkit.metrics._common import Forward
from camkit.metrics.arcc import ArccResult, arcc, coherency, complexity
from camkit.metrics.bootstrap import PairedBootstrap, max_box_acc_value, paired_bootstrap
from camkit.metrics.correlation import (
    SensitivityN,
    faithfulness_correlation,
    faithfulness_estimate,
    infidelity,
    monotonicity_arya,
    monotonicity_nguyen,
    sensitivity_n,
)
from camkit.metrics.faithfulness import (
    ConfidenceChange,
    Curve,
    RoadResult,
    average_drop,
    confidence_change,
    deletion,
    deletion_insertion,
    increase_in_confidence,
    insertion,
    noisy_linear_impute,
    road,
)
from camkit.metrics.localization import (
    BoxAccuracy,
    MaxBoxAcc,
    box_accuracy,
    box_iou,
    iou_curves,
    max_box_acc_v2,
    pointing_game,
)
from camkit.metrics.map_complexity import effective_complexity, entropy_complexity, sparseness
from camkit.metrics.mask import (
    box_mask,
    energy_pointing_game,
    mask_auc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)
from camkit.metrics.randomisation import MprtResult, mprt, random_logit
from camkit.metrics.regions import (
    IrofResult,
    RegionCurve,
    irof,
    pixel_flipping,
    region_perturbation,
    selectivity,
)
from camkit.metrics.registry import (
    DEFAULT_METRICS,
    IOU_THRESHOLDS,
    METRICS,
    Metric,
    MetricBatch,
    MetricScorer,
    resolve_metrics,
)
from camkit.metrics.robustness import SensitivityResult, avg_sensitivity, max_sensitivity, sensitivity
from camkit.metrics.sanity import SanityResult, cascading_randomization, randomizable_modules, spearman

__all__ = [
    "DEFAULT_METRICS",
    "IOU_THRESHOLDS",
    "METRICS",
    "ArccResult",
    "BoxAccuracy",
    "ConfidenceChange",
    "Curve",
    "Forward",
    "IrofResult",
    "MaxBoxAcc",
    "Metric",
    "MetricBatch",
    "MetricScorer",
    "MprtResult",
    "PairedBootstrap",
    "RegionCurve",
    "RoadResult",
    "SanityResult",
    "SensitivityN",
    "SensitivityResult",
    "arcc",
    "average_drop",
    "avg_sensitivity",
    "box_accuracy",
    "box_iou",
    "box_mask",
    "cascading_randomization",
    "coherency",
    "complexity",
    "confidence_change",
    "deletion",
    "deletion_insertion",
    "effective_complexity",
    "energy_pointing_game",
    "entropy_complexity",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "increase_in_confidence",
    "infidelity",
    "insertion",
    "iou_curves",
    "irof",
    "mask_auc",
    "max_box_acc_v2",
    "max_box_acc_value",
    "max_sensitivity",
    "monotonicity_arya",
    "monotonicity_nguyen",
    "mprt",
    "noisy_linear_impute",
    "paired_bootstrap",
    "pixel_flipping",
    "pointing_game",
    "random_logit",
    "randomizable_modules",
    "region_perturbation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "resolve_metrics",
    "road",
    "selectivity",
    "sensitivity",
    "sensitivity_n",
    "sparseness",
    "spearman",
    "top_k_intersection",
]
