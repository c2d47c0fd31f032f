"""Keras 3 models on the torch backend: explained like any PyTorch model.

With ``KERAS_BACKEND=torch`` (set before keras is imported) a Keras 3 model is a ``torch.nn.Module`` and each of
its layers is one too, whose forward hooks fire. But the layers are not in ``named_modules()`` (Keras tracks them
itself), inputs and outputs are channels-last (NHWC), and Keras Applications end in a softmax. camkit handles all
of it: :func:`camkit.explain` given a Keras model explains it through :class:`KerasModel`, a thin view that

* takes camkit's input Tensor[B, 3, H, W] and calls the Keras model on ``x.permute(0, 2, 3, 1)`` with
  ``training=False`` (BGR models get their channels flipped first);
* lists the Keras layers under their Keras names (``block5_conv3``; layers of a nested model under its name,
  ``mobilenetv2_1_00_224.out_relu``, a dot in a Keras name becoming ``_``), so that ``layers="block5_conv3"``, ``layers="auto"``, ``camkit layers`` and the
  layer hooks work as for any module;
* returns the **logits** of a model whose last layer is a ``Dense`` with a softmax (every Keras Applications
  classifier): the input of that layer is read by a forward hook and multiplied by its kernel, so the score
  explained is the class logit, as in the classic Keras Grad-CAM recipe (which rebuilt the model without the
  softmax). Other models: their output as is;
* declares the preprocessing of the Keras Applications family it recognises by the model's name
  (``preprocess_input``'s "caffe" mode for VGG and ResNet: BGR, ImageNet means subtracted on the 0..255 scale;
  "tf" mode for MobileNet, Inception, Xception, NASNet, ResNetV2: [-1, 1]; "torch" mode for DenseNet; raw 0..255
  pixels for EfficientNet and ConvNeXt, which rescale inside), as :class:`camkit.adapters.Preprocess` reads it. Another
  Keras model gets raw 0..255 pixels (what ``keras.utils.img_to_array`` gives) at its input size.

Nothing of the Keras model is changed: no attribute is set on it or on its layers, no layer is replaced, the
``trainable`` flags and ``requires_grad`` of its variables are untouched, and camkit's hooks are removed after each
call. The Keras layers' torch ``training`` flags are not read (Keras decides by its ``training`` argument, which
camkit passes as False).

Importing this module does not import keras; :func:`load` does (and sets ``KERAS_BACKEND=torch`` when it is not
set yet).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from torch import Tensor, nn

from camkit.adapters.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from camkit.errors import CamkitError, CamkitRuntimeError

__all__ = ["KerasModel", "as_torch", "is_keras_model", "load", "preprocess_for"]

# preprocess_input modes as camkit Preprocess values (mean, std on the 0..1 scale) and whether channels go BGR
_CAFFE_MEAN_RGB = (123.68 / 255.0, 116.779 / 255.0, 103.939 / 255.0)
_MODES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], bool]] = {
    "caffe": (_CAFFE_MEAN_RGB, (1 / 255.0, 1 / 255.0, 1 / 255.0), True),
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
    "torch": (IMAGENET_MEAN, IMAGENET_STD, False),
    "raw": ((0.0, 0.0, 0.0), (1 / 255.0, 1 / 255.0, 1 / 255.0), False),
}
# model-name prefix (as Keras Applications name their models) -> mode; the first match wins
_FAMILIES = (
    ("resnet50v2", "tf"),
    ("resnet101v2", "tf"),
    ("resnet152v2", "tf"),
    ("vgg", "caffe"),
    ("resnet", "caffe"),
    ("mobilenet", "tf"),
    ("inception", "tf"),
    ("xception", "tf"),
    ("nasnet", "tf"),
    ("densenet", "torch"),
    ("efficientnet", "raw"),
    ("convnext", "raw"),
)
# camkit names of Keras Applications (``keras:NAME``) -> the constructor in keras.applications
APPLICATIONS = {
    "vgg16": "VGG16",
    "vgg19": "VGG19",
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet50v2": "ResNet50V2",
    "mobilenet": "MobileNet",
    "mobilenetv2": "MobileNetV2",
    "mobilenetv3small": "MobileNetV3Small",
    "densenet121": "DenseNet121",
    "efficientnetb0": "EfficientNetB0",
    "xception": "Xception",
    "inceptionv3": "InceptionV3",
    "convnexttiny": "ConvNeXtTiny",
}


def is_keras_model(obj: object) -> bool:
    """Whether ``obj`` is a Keras 3 model or layer (checked by its classes' modules: keras is not imported)."""
    return any(cls.__module__.split(".")[0] == "keras" for cls in type(obj).__mro__)


def _mode(keras_model: Any) -> str:
    name = str(getattr(keras_model, "name", "")).lower()
    for prefix, mode in _FAMILIES:
        if name.startswith(prefix):
            return mode
    return "raw"


def _input_size(keras_model: Any) -> tuple[int, int]:
    try:
        shape = keras_model.input_shape
    except (AttributeError, ValueError):
        return (224, 224)
    if isinstance(shape, list):
        shape = shape[0]
    if (
        isinstance(shape, tuple)
        and len(shape) == 4
        and isinstance(shape[1], int)
        and isinstance(shape[2], int)
    ):
        return (shape[1], shape[2])
    return (224, 224)


def _input_channels(keras_model: Any) -> int | None:
    try:
        shape = keras_model.input_shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, list):
        shape = shape[0]
    if isinstance(shape, tuple) and len(shape) == 4 and isinstance(shape[3], int):
        return shape[3]
    return None


def preprocess_for(keras_model: Any, size: tuple[int, int] | None = None) -> Preprocess:
    """The :class:`~camkit.adapters.Preprocess` of a Keras model: its Keras Applications family's ``preprocess_input``
    (BGR models: :class:`KerasModel` flips the channels) at its input size, or raw 0..255 pixels."""
    mean, std, _ = _MODES[_mode(keras_model)]
    return Preprocess(size=size or _input_size(keras_model), mean=mean, std=std)


class _Node(nn.Module):
    """Holds the layers of a nested Keras model under their names (the layers themselves, not copies)."""


def _add_layers(node: nn.Module, keras_model: Any) -> None:
    for layer in getattr(keras_model, "layers", []):
        name = str(layer.name).replace(".", "_")
        if name in node._modules or not isinstance(layer, nn.Module):
            continue
        if getattr(layer, "layers", None):  # a nested model: its layers under a node of ours
            sub = _Node()
            _add_layers(sub, layer)
            node._modules[name] = sub
        else:
            node._modules[name] = layer


class KerasModel(nn.Module):
    """A view of a Keras 3 model (torch backend) as camkit reads models: input Tensor[B, C, H, W], output the
    logits (see the module docstring), the Keras layers as named submodules.

    The Keras model is not a registered submodule of the view, and the view changes nothing of it. Build one with
    :func:`as_torch` (cached per Keras model) or let :func:`camkit.explain` do it.

    Attributes:
        keras_model: the Keras model.
        bgr: whether the channels are flipped to BGR before the Keras model (caffe-mode models).
        logits: whether the output is the logits read before a final softmax ``Dense``.
        pretrained_cfg: the input size, mean and std camkit's :class:`~camkit.adapters.Preprocess` reads.
    """

    channels_last = True
    """The Keras layers' 4-D outputs are NHWC (read by :mod:`camkit.core.tokens`)."""

    keras_model: Any
    bgr: bool
    logits: bool
    pretrained_cfg: dict[str, Any]
    _head: Any

    def __init__(self, keras_model: Any, logits: bool = True) -> None:
        super().__init__()
        if not is_keras_model(keras_model) or not isinstance(keras_model, nn.Module):
            raise TypeError(
                f"KerasModel needs a Keras 3 model on the torch backend (KERAS_BACKEND=torch), got "
                f"{type(keras_model).__name__}"
            )
        self.__dict__["keras_model"] = keras_model  # not a registered submodule
        self.__dict__["bgr"] = _MODES[_mode(keras_model)][2]
        layers: Any = getattr(keras_model, "layers", None) or []
        last = layers[-1] if layers else None
        act = getattr(getattr(last, "activation", None), "__name__", "")
        self.__dict__["_head"] = (
            last if (logits and type(last).__name__ == "Dense" and act == "softmax") else None
        )
        self.__dict__["logits"] = self._head is not None
        pre = preprocess_for(keras_model)
        self.__dict__["pretrained_cfg"] = {"input_size": (3, *pre.size), "mean": pre.mean, "std": pre.std}
        _add_layers(self, keras_model)
        self.training = False  # this view only: Keras runs with training=False

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[B, C, H, W] -> the Keras model's output (the logits for a softmax classifier)."""
        if x.dim() != 4:
            raise CamkitError(
                f"a Keras image model takes Tensor[B, C, H, W] here, got shape {tuple(x.shape)}"
            )
        channels = _input_channels(self.keras_model)
        if channels is not None and x.shape[1] != channels:
            hint = (
                ": camkit takes images channels-first, permute a Keras NHWC batch with x.permute(0, 3, 1, 2)"
                if x.shape[-1] == channels
                else ""
            )
            raise CamkitError(
                f"the Keras model expects {channels} channel(s), the input Tensor[B, C, H, W] has shape "
                f"{tuple(x.shape)}{hint}"
            )
        if self.bgr:
            x = x.flip(1)
        nhwc = x.permute(0, 2, 3, 1)
        head: Any = self.__dict__["_head"]
        if head is None:
            out: Tensor = self.keras_model(nhwc, training=False)
            return out
        seen: list[Tensor] = []

        def read_input(_m: nn.Module, inputs: tuple[object, ...]) -> None:
            if inputs and isinstance(inputs[0], Tensor):
                seen.append(inputs[0])

        from camkit.core.capture import hook_forward

        handle = hook_forward(head, read_input, pre=True)
        try:
            self.keras_model(nhwc, training=False)
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"the last layer {head.name!r} of the Keras model did not run")
        kernel = head.kernel.value if hasattr(head.kernel, "value") else head.kernel
        z = seen[-1] @ kernel.to(seen[-1].dtype)
        if getattr(head, "use_bias", False) and head.bias is not None:
            bias = head.bias.value if hasattr(head.bias, "value") else head.bias
            z = z + bias.to(z.dtype)
        out_z: Tensor = z
        return out_z

    def train(self, mode: bool = True) -> KerasModel:
        """Only this view's flag (the Keras layers are not touched)."""
        self.training = mode
        return self

    def __repr__(self) -> str:
        name = getattr(self.keras_model, "name", type(self.keras_model).__name__)
        return f"KerasModel({name!r}, logits={self.logits}, bgr={self.bgr})"


# id(Keras model) -> its view while the view is alive (the view holds the model, so the cache holds neither)
_VIEWS: weakref.WeakValueDictionary[int, KerasModel] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def as_torch(keras_model: Any) -> KerasModel:
    """The :class:`KerasModel` view of ``keras_model``: the same view while one is alive. Keep it (or load with
    ``camkit.load_model("keras:...")``) to explain the same model many times: camkit's per-model caches (the
    automatic layer) live on the view."""
    if isinstance(keras_model, KerasModel):
        return keras_model
    with _LOCK:
        view = _VIEWS.get(id(keras_model))
        if view is None or view.keras_model is not keras_model:
            view = KerasModel(keras_model)
            _VIEWS[id(keras_model)] = view
        return view


def load(
    name: str, pretrained: bool = True, input_size: int | None = None, weights: str | None = None
) -> Any:
    """A Keras Applications model by camkit name (``vgg16``, ``resnet50``, ``mobilenetv2``, ...; see
    :data:`APPLICATIONS`), on the torch backend.

    Args:
        name: the name, without the ``keras:`` prefix.
        pretrained: download the ImageNet weights (needs a network); False: random weights.
        input_size: a square input size (default 224); random weights only for sizes Keras has no weights for.
        weights: a local ``.weights.h5`` / ``.keras`` weights file instead.

    Raises:
        ValueError: an unknown name, or a wrong backend.
        RuntimeError: the weights could not be downloaded (offline): the message says what to do.
    """
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() != "torch":
        raise CamkitError(
            f"camkit explains Keras models on the torch backend; keras was imported with {keras.backend.backend()!r}"
            ": set KERAS_BACKEND=torch before importing keras"
        )
    key = name.strip().lower()
    if key not in APPLICATIONS:
        raise CamkitError(f"unknown Keras model {name!r}; camkit knows keras:{', keras:'.join(APPLICATIONS)}")
    build = getattr(keras.applications, APPLICATIONS[key])
    shape = None if input_size is None else (input_size, input_size, 3)
    download = pretrained and weights is None
    try:
        model = build(weights="imagenet" if download else None, input_shape=shape)
    except Exception as err:
        if download:
            raise CamkitRuntimeError(
                f"could not get the ImageNet weights of keras:{key} ({type(err).__name__}: {err}). Keras "
                "downloads them on first use; without a network pass a local weights file with --weights PATH "
                "(weights=...), or --no-pretrained for random weights"
            ) from err
        raise
    if weights is not None:
        model.load_weights(weights)
    return model
