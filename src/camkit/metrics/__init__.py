"""Metrics for judging maps: faithfulness, localization against boxes, and the sanity check.

>>> from camkit import metrics
>>> curve = metrics.deletion(model, x, expl.maps)          # RISE deletion, .auc per image (lower is better)
>>> metrics.pointing_game(expl.maps, gt_boxes, image_sizes=[im.size for im in expl.images])
>>> metrics.cascading_randomization(model, images, method="gradcam").correlation
"""

from camkit.metrics._common import Forward
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
from camkit.metrics.sanity import SanityResult, cascading_randomization, randomizable_modules, spearman

__all__ = [
    "BoxAccuracy",
    "ConfidenceChange",
    "Curve",
    "Forward",
    "MaxBoxAcc",
    "RoadResult",
    "SanityResult",
    "average_drop",
    "box_accuracy",
    "box_iou",
    "cascading_randomization",
    "confidence_change",
    "deletion",
    "increase_in_confidence",
    "insertion",
    "iou_curves",
    "max_box_acc_v2",
    "noisy_linear_impute",
    "pointing_game",
    "randomizable_modules",
    "road",
    "spearman",
]
