"""Models in: every model enters camkit through this package.

An adapter turns a model (by name, from a file, or another framework's object) into what the core runs: a
``torch.nn.Module`` in eval mode that takes a normalised batch ``Tensor[B, 3, H, W]`` (``[B, 3, T, H, W]`` for
video) and returns something :mod:`camkit.core.outputs` reads (logits, a dict, ``.logits``, torchvision
detections), together with its :class:`Preprocess` and class names, as a :class:`LoadedModel`.

The modules:

* :mod:`camkit.adapters.zoo`: :func:`load_model`, the entry by name: the offline pretrained default, torchvision and
  timm models (classifiers, segmentation, detection, video), a local weights file, ``keras:NAME``.
* :mod:`camkit.adapters.spec`: :class:`ModelSpec`, how to build a model (name, weights, seed, device, ...), the
  one record every command and the app load models from (it can be named without importing torch).
* :mod:`camkit.adapters.preprocess`: :class:`Preprocess` (whole-image resize, mean/std) and the ImageNet labels.
* :mod:`camkit.adapters.task`: what a model does (:func:`model_task`: classification, segmentation, detection).
* :mod:`camkit.adapters.keras`: Keras 3 models on the torch backend, seen as a module with NCHW input and the Keras
  layers by name (keras itself is imported only when a Keras model is loaded).
* :mod:`camkit.adapters.video`: 3-D video models: clips in, per-frame maps and animations out.

The next adapters go here, one module each, with the same shape as :mod:`camkit.adapters.keras`: a module
``camkit/adapters/<source>.py`` (``huggingface.py`` for Hugging Face ``transformers`` vision models, ``yolo.py``
for Ultralytics YOLO detectors, ``clip.py`` for CLIP image-text similarity) that imports its library only inside
its ``load`` function, returns the model's module view and its :class:`Preprocess`, and is reached from
:func:`load_model` by a name prefix (``hf:``, ``yolo:``, ``clip:``, as ``keras:`` is); an output the core cannot
read yet gets its reader in :mod:`camkit.core.outputs`, and a task-specific target in :mod:`camkit.core.targets`.
Adapters depend on the core's leaf modules only (:mod:`camkit.core.capture`, :mod:`camkit.core.postprocess`),
never on the pipeline: ``tests/test_structure.py`` fails on any import cycle.

The names below are imported on first use (``import camkit.adapters`` loads no model library).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing costs start-up time of the command
if TYPE_CHECKING:
    from camkit.adapters.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, imagenet_labels
    from camkit.adapters.spec import DEFAULT_MODEL, ModelSpec
    from camkit.adapters.task import model_task
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
    "model_task",
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
    "model_task": "camkit.adapters.task",
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
