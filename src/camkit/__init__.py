"""camkit: Class Activation Maps for PyTorch vision models.

>>> import camkit
>>> loaded = camkit.load_model()                       # offline pretrained EfficientNet-Lite0
>>> expl = camkit.explain(loaded.model, camkit.sample_image(), preprocess=loaded.preprocess)
>>> expl.labels, expl.maps.shape                        # (['Egyptian cat'], torch.Size([1, 224, 224]))
>>> expl.overlay(0).save("cat.png")

The names below are imported on first use (``import camkit`` itself loads neither torch nor the library), so that
the ``camkit`` command can take over Ctrl-C before its heavy imports start.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = (
    False  # not typing's: importing typing would cost tens of milliseconds of the command's start-up
)
if TYPE_CHECKING:
    from camkit.adapters import LoadedModel, Preprocess, load_model
    from camkit.core.augment import Augment
    from camkit.core.explanation import Explanation
    from camkit.core.factorize import factorize
    from camkit.core.layers import auto_layer, describe_layers
    from camkit.core.pipeline import compare, explain
    from camkit.core.targets import (
        DetectionTarget,
        EachTarget,
        MultiLabelTarget,
        RegressionTarget,
        SegmentationTarget,
        SimilarityTarget,
        TopK,
    )
    from camkit.errors import CamkitError
    from camkit.io import load_image, sample_image
    from camkit.methods import method_names
    from camkit.methods.engine import PerturbationOptions
    from camkit.methods.projection import Factorization
    from camkit.viz import colorize, grid, overlay

__version__ = "0.1.0"
"""The version of camkit: the one place it is written (``pyproject.toml`` reads it from here)."""

__all__ = [
    "Augment",
    "CamkitError",
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
]

_EXPORTS = {
    "Augment": "camkit.core.augment",
    "CamkitError": "camkit.errors",
    "DetectionTarget": "camkit.core.targets",
    "EachTarget": "camkit.core.targets",
    "Explanation": "camkit.core.explanation",
    "Factorization": "camkit.methods.projection",
    "LoadedModel": "camkit.adapters",
    "MultiLabelTarget": "camkit.core.targets",
    "PerturbationOptions": "camkit.methods.engine",
    "Preprocess": "camkit.adapters",
    "RegressionTarget": "camkit.core.targets",
    "SegmentationTarget": "camkit.core.targets",
    "SimilarityTarget": "camkit.core.targets",
    "TopK": "camkit.core.targets",
    "auto_layer": "camkit.core.layers",
    "colorize": "camkit.viz",
    "compare": "camkit.core.pipeline",
    "describe_layers": "camkit.core.layers",
    "explain": "camkit.core.pipeline",
    "factorize": "camkit.core.factorize",
    "grid": "camkit.viz",
    "load_image": "camkit.io",
    "load_model": "camkit.adapters",
    "method_names": "camkit.methods",
    "overlay": "camkit.viz",
    "sample_image": "camkit.io",
}
"""Where each public name lives: imported from there on first use."""


if not TYPE_CHECKING:  # type checkers see the imports above; at run time the names come on first use

    def __getattr__(name: str) -> object:
        """A public name (imported now, then kept), or a submodule (``camkit.metrics``) imported on first use."""
        module = _EXPORTS.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
            globals()[name] = value
            return value
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *_EXPORTS})
