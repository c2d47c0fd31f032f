"""Models in: the model zoo (timm, torchvision, a local file, the offline pretrained default), their
preprocessing and labels, how to build a model (:class:`ModelSpec`), and the adapters for models that are not
plain 2-D PyTorch classifiers (Keras 3 models, 3-D video models). A new kind of model (a model hub, a detector
family) gets its adapter module here.

The names below are imported on first use, so that :class:`ModelSpec` (:mod:`camkit.adapters.spec`) can be
named without importing torch.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing costs start-up time of the command
if TYPE_CHECKING:
    from camkit.adapters.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, imagenet_labels
    from camkit.adapters.spec import DEFAULT_MODEL, ModelSpec
    from camkit.adapters.zoo import LoadedModel, load_model

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "ModelSpec",
    "Preprocess",
    "imagenet_labels",
    "load_model",
]

_EXPORTS = {
    "DEFAULT_MODEL": "camkit.adapters.spec",
    "IMAGENET_MEAN": "camkit.adapters.preprocess",
    "IMAGENET_STD": "camkit.adapters.preprocess",
    "LoadedModel": "camkit.adapters.zoo",
    "ModelSpec": "camkit.adapters.spec",
    "Preprocess": "camkit.adapters.preprocess",
    "imagenet_labels": "camkit.adapters.preprocess",
    "load_model": "camkit.adapters.zoo",
}
"""Where each public name lives: imported from there on first use."""


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """A public name (imported now, then kept), or a submodule (``camkit.adapters.zoo``) imported on first
        use."""
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
