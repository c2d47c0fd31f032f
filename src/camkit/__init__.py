"""camkit: Class Activation Maps for PyTorch vision models.

>>> import camkit
>>> loaded = camkit.load_model()                       # offline pretrained EfficientNet-Lite0
>>> expl = camkit.explain(loaded.model, camkit.sample_image(), preprocess=loaded.preprocess)
>>> expl.labels, expl.maps.shape                        # (['Egyptian cat'], torch.Size([1, 224, 224]))
>>> expl.overlay(0).save("cat.png")
"""

from camkit.augment import Augment
from camkit.explanation import Explanation
from camkit.io import LoadedModel, Preprocess, load_image, load_model, sample_image
from camkit.layers import auto_layer, describe_layers
from camkit.methods import method_names
from camkit.methods.engine import PerturbationOptions
from camkit.methods.projection import Factorization, factorize
from camkit.pipeline import compare, explain
from camkit.runtime import tune_allocator
from camkit.targets import (
    DetectionTarget,
    EachTarget,
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
    TopK,
)
from camkit.viz import colorize, grid, overlay

__version__ = "0.1.0"

__all__ = [
    "Augment",
    "DetectionTarget",
    "EachTarget",
    "Explanation",
    "Factorization",
    "LoadedModel",
    "MultiLabelTarget",
    "PerturbationOptions",
    "Preprocess",
    "RegressionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "TopK",
    "__version__",
    "auto_layer",
    "colorize",
    "compare",
    "describe_layers",
    "explain",
    "factorize",
    "grid",
    "load_image",
    "load_model",
    "method_names",
    "overlay",
    "sample_image",
    "tune_allocator",
]
