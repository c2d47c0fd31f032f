"""Metrics for judging maps: faithfulness, localization against boxes, and the sanity check.

>>> from camkit import metrics
>>> curve = metrics.deletion(model, x, expl.maps)          # RISE deletion, .auc per image (lower is better)
>>> metrics.pointing_game(expl.maps, gt_boxes, image_sizes=[im.size for im in expl.images])
>>> metrics.cascading_randomization(model, images, method="gradcam").correlation

:data:`METRICS` (:mod:`camkit.metrics.registry`) names the metrics that ``camkit evaluate``, ``camkit run`` and
``camkit report`` compute per batch of maps, and :class:`MetricScorer` computes them: a new metric is added there.
"""

from camkit.metrics._common import Forward
from camkit.metrics.arcc import ArccResult, arcc, coherency, complexity
from camkit.metrics.bootstrap import PairedBootstrap, max_box_acc_value, paired_bootstrap
from camkit.metrics.faithfulness import (
    ConfidenceChange,
    Curve,
    RoadResult,
    average_drop,
    confidence_change,
    deletion,
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
from camkit.metrics.registry import (
    DEFAULT_METRICS,
    IOU_THRESHOLDS,
    METRICS,
    Metric,
    MetricBatch,
    MetricScorer,
    resolve_metrics,
)
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
    "MaxBoxAcc",
    "Metric",
    "MetricBatch",
    "MetricScorer",
    "PairedBootstrap",
    "RoadResult",
    "SanityResult",
    "arcc",
    "average_drop",
    "box_accuracy",
    "box_iou",
    "cascading_randomization",
    "coherency",
    "complexity",
    "confidence_change",
    "deletion",
    "increase_in_confidence",
    "insertion",
    "iou_curves",
    "max_box_acc_v2",
    "max_box_acc_value",
    "noisy_linear_impute",
    "paired_bootstrap",
    "pointing_game",
    "randomizable_modules",
    "resolve_metrics",
    "road",
    "spearman",
]
